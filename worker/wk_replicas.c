/* wk_replicas.c - local replicas, their threads, and the local reduce.
 * SPDX-License-Identifier: MIT
 *
 * Threads: replica 0 runs on the caller's thread; replicas 1..D-1 each have a
 * helper thread that sleeps on 'cv' until 'generation' moves, runs its slice,
 * and counts itself in 'done'. The caller waits for done == D - 1.
 *
 * The local reduce: on host-visible devices a weighted sum on the host. On
 * several CUDA devices with NCCL, each device scales its gradient by its
 * example share (axpby), ncclReduce sums them on device 0, and one download
 * brings the result to the host; set_params uploads to device 0 and
 * ncclBroadcast copies it to the others. Without NCCL (or if its
 * communicator cannot be created) GPUs fall back to the host reduce.
 */
#include "worker/wk_replicas.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "common/cm_log.h"
#include "worker/device/wk_device_cuda.h"
#include "worker/input/wk_order.h"
#include "worker/model/wk_model.h"
#include "worker/model/wk_sim.h"
#ifdef WK_HAVE_NCCL
#include "worker/device/wk_nccl.h"
#endif

typedef struct replica {
    struct wk_replicas *set;
    int index;
    wk_device *dev;
    wk_model *net;
    const float *params; /* Device copy, or the host params on host-visible. */
    float *params_copy;  /* Owned device copy (NULL on host-visible). */
    float *grad;         /* Device gradient of this slice. */
    float *out;          /* Where this job writes its gradient: grad, or the
                          * caller's buffer when one host replica needs no
                          * reduce. */
    float *x_dev;        /* Device input staging (NULL on host-visible). */
    int32_t *y_dev;
    /* Sparse models: the batch's rows and this slice's row map on the
     * device (NULL on host-visible), and this replica's row gradient. */
    int32_t *inv_dev;
    float *rows_dev;
    float *row_grad;
    float *row_out;      /* Where the row gradient goes: row_grad, or the
                          * caller's buffer (one host replica). */
    float *probs_dev;    /* Evaluation: predicted probabilities. */
    const wk_grad_hook *hook; /* Of the current job, or NULL. */
    /* Inputs and outputs of the current job. */
    const float *x;
    const int32_t *y;
    const int32_t *inv;
    const float *rows;
    int nrows;
    int n;
    double loss;
    int64_t correct;
    double seconds;
    int status;
    pthread_t thread;
} replica;

struct wk_replicas {
    const cm_model *model;
    const wk_model_ops *mops;
    int ndevs;
    int max_batch;
    int slice_max;    /* Examples one replica takes at most. */
    size_t in_dim;    /* Dense models: input floats per example. */
    int nfields;      /* Sparse models: fields per example, */
    int row_dim;      /* floats per row, */
    size_t max_rows;  /* and rows a batch may need (max_batch * nfields). */
    const wk_grad_hook *hook; /* For replica 0 when it writes directly. */
    wk_sim *sim;      /* Simulated devices (wk_replicas_create_sim): the
                       * reps then have no device, model or buffers. */
    replica *reps;
    float *host_scratch; /* Download buffer for non-host-visible devices
                          * (wk_cuda_host_alloc: pinned when it can be). */
#ifdef WK_HAVE_NCCL
    struct wk_nccl *nccl; /* Several CUDA devices: the NCCL reduce. */
    float **grads;        /* reps[d].grad, for wk_nccl calls. */
    float **params;       /* reps[d].params_copy. */
    float *zeros;         /* numel host zeros, for empty slices. */
#endif
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* Signals a new generation or shutdown. */
    pthread_cond_t done_cv; /* Signals 'done' moved. */
    /* Protected by mu. */
    uint64_t generation;
    int done;
    int stopping;
    int threads_started;
};

/* The current job's inputs as the device sees them (uploaded first when
 * it is not host-visible). */
static wk_dev_batch stage(replica *r) {
    const wk_replicas *rs = r->set;
    wk_dev_batch b = {.n = r->n, .x = r->x, .y = r->y, .inv = r->inv, .rows = r->rows,
                      .nrows = r->nrows};
    if (r->dev->host_visible) return b;
    const wk_device_ops *o = r->dev->ops;
    o->upload(r->dev, r->y_dev, r->y, (size_t)r->n * sizeof(int32_t));
    b.y = r->y_dev;
    if (rs->nfields > 0) {
        o->upload(r->dev, r->inv_dev, r->inv, (size_t)r->n * (size_t)rs->nfields * sizeof(int32_t));
        o->upload(r->dev, r->rows_dev, r->rows, (size_t)r->nrows * (size_t)rs->row_dim * sizeof(float));
        b.inv = r->inv_dev;
        b.rows = r->rows_dev;
    } else {
        o->upload(r->dev, r->x_dev, r->x, (size_t)r->n * rs->in_dim * sizeof(float));
        b.x = r->x_dev;
    }
    return b;
}

static void run_slice(replica *r) {
    double t0 = cm_now();
    r->loss = 0.0;
    r->correct = 0;
    r->status = CM_OK;
    if (r->n > 0) {
        wk_dev_batch b = stage(r);
        r->status = r->set->mops->gradient(r->net, r->params, &b, r->out, r->row_out, &r->loss,
                                           &r->correct, r->hook);
    } else if (r->nrows > 0) {
        /* An empty slice reads no row: its row gradient is zero. */
        r->dev->ops->fill(r->dev, (size_t)r->nrows * (size_t)r->set->row_dim, 0.0f, r->row_out);
        r->status = wk_device_sync(r->dev);
    }
    r->seconds = cm_now() - t0;
}

static void *replica_main(void *arg) {
    replica *r = arg;
    wk_replicas *rs = r->set;
    uint64_t seen = 0;
    pthread_mutex_lock(&rs->mu);
    for (;;) {
        while (!rs->stopping && rs->generation == seen) pthread_cond_wait(&rs->cv, &rs->mu);
        if (rs->stopping) break;
        seen = rs->generation;
        pthread_mutex_unlock(&rs->mu);
        run_slice(r);
        pthread_mutex_lock(&rs->mu);
        rs->done++;
        pthread_cond_signal(&rs->done_cv);
    }
    pthread_mutex_unlock(&rs->mu);
    return NULL;
}

int wk_replicas_create(const cm_model *model, wk_device **devs, int ndevs, int max_batch,
                       wk_replicas **out) {
    *out = NULL;
    if (ndevs < 1 || max_batch < 1) return CM_EINVAL;
    const wk_model_ops *mops = wk_model_ops_for(model);
    if (!mops) return CM_EINVAL;
    wk_replicas *rs = cm_calloc(1, sizeof *rs);
    int status = CM_ENOMEM;
    rs->model = model;
    rs->mops = mops;
    rs->ndevs = ndevs;
    rs->max_batch = max_batch;
    rs->reps = cm_calloc((size_t)ndevs, sizeof *rs->reps);
    pthread_mutex_init(&rs->mu, NULL);
    pthread_cond_init(&rs->cv, NULL);
    pthread_cond_init(&rs->done_cv, NULL);
    size_t pbytes = (model->numel ? model->numel : 1) * sizeof(float);
    int slice_max = (max_batch + ndevs - 1) / ndevs;
    rs->slice_max = slice_max;
    rs->nfields = model->nfields;
    rs->in_dim = rs->nfields == 0 && model->nsizes > 0 ? (size_t)model->sizes[0] : 0;
    rs->row_dim = wk_model_row_dim(model);
    rs->max_rows = (size_t)max_batch * (size_t)rs->nfields;
    size_t rbytes = (rs->max_rows ? rs->max_rows : 1) * (size_t)(rs->row_dim ? rs->row_dim : 1) *
                    sizeof(float);
    size_t scratch = pbytes > rbytes || !rs->nfields ? pbytes : rbytes;
    for (int d = 0; d < ndevs; d++) {
        replica *r = &rs->reps[d];
        r->set = rs;
        r->index = d;
        r->dev = devs[d];
        if ((status = mops->create(model, r->dev, slice_max, &r->net)) != CM_OK) goto fail;
        status = CM_ENOMEM;
        if (!(r->grad = wk_device_alloc(r->dev, pbytes))) goto fail;
        if (rs->nfields && !(r->row_grad = wk_device_alloc(r->dev, rbytes))) goto fail;
        if (!(r->probs_dev = wk_device_alloc(r->dev, (size_t)slice_max * sizeof(float))))
            goto fail;
        if (!r->dev->host_visible) {
            if (!(r->params_copy = wk_device_alloc(r->dev, pbytes))) goto fail;
            r->params = r->params_copy;
            r->y_dev = wk_device_alloc(r->dev, (size_t)slice_max * sizeof(int32_t));
            if (!r->y_dev) goto fail;
            if (rs->nfields) {
                r->inv_dev = wk_device_alloc(r->dev, (size_t)slice_max * (size_t)rs->nfields *
                                                         sizeof(int32_t));
                r->rows_dev = wk_device_alloc(r->dev, rbytes);
                if (!r->inv_dev || !r->rows_dev) goto fail;
            } else {
                r->x_dev = wk_device_alloc(r->dev, (size_t)slice_max * rs->in_dim * sizeof(float));
                if (!r->x_dev) goto fail;
            }
            if (!rs->host_scratch && !(rs->host_scratch = wk_cuda_host_alloc(scratch))) goto fail;
        }
    }
#ifdef WK_HAVE_NCCL
    int all_cuda = ndevs > 1;
    for (int d = 0; d < ndevs; d++) all_cuda &= wk_device_is_cuda(devs[d]);
    if (all_cuda) {
        if (wk_nccl_create(devs, ndevs, &rs->nccl) == CM_OK) {
            rs->grads = cm_calloc((size_t)ndevs, sizeof *rs->grads);
            rs->params = cm_calloc((size_t)ndevs, sizeof *rs->params);
            rs->zeros = cm_calloc(model->numel, sizeof(float));
            for (int d = 0; d < ndevs; d++) {
                rs->grads[d] = rs->reps[d].grad;
                rs->params[d] = rs->reps[d].params_copy;
            }
            cm_info("local reduce: NCCL over %d GPUs", ndevs);
        } else {
            cm_warn("local reduce: NCCL unavailable, reducing %d GPUs' gradients on the host",
                    ndevs);
        }
    }
#endif
    for (int d = 1; d < ndevs; d++) {
        if (pthread_create(&rs->reps[d].thread, NULL, replica_main, &rs->reps[d]) != 0) {
            status = CM_ENOMEM;
            goto fail;
        }
        rs->threads_started = d;
    }
    *out = rs;
    return CM_OK;
fail:
    wk_replicas_destroy(rs);
    return status;
}

int wk_replicas_create_sim(const cm_model *model, const wk_sim_cfg *cfg, int ndevs, int max_batch,
                           wk_replicas **out) {
    *out = NULL;
    if (ndevs < 1 || max_batch < 1 || !wk_model_ops_for(model)) return CM_EINVAL;
    wk_sim *sim;
    int status = wk_sim_create(model, cfg, ndevs, max_batch, &sim);
    if (status != CM_OK) return status;
    wk_replicas *rs = cm_calloc(1, sizeof *rs);
    rs->model = model;
    rs->mops = wk_model_ops_for(model);
    rs->sim = sim;
    rs->ndevs = ndevs;
    rs->max_batch = max_batch;
    rs->slice_max = (max_batch + ndevs - 1) / ndevs;
    rs->nfields = model->nfields;
    rs->in_dim = rs->nfields == 0 && model->nsizes > 0 ? (size_t)model->sizes[0] : 0;
    rs->row_dim = wk_model_row_dim(model);
    rs->max_rows = (size_t)max_batch * (size_t)rs->nfields;
    rs->reps = cm_calloc((size_t)ndevs, sizeof *rs->reps); /* No device: see destroy. */
    pthread_mutex_init(&rs->mu, NULL);
    pthread_cond_init(&rs->cv, NULL);
    pthread_cond_init(&rs->done_cv, NULL);
    *out = rs;
    return CM_OK;
}

void wk_replicas_destroy(wk_replicas *rs) {
    if (!rs) return;
    wk_sim_destroy(rs->sim);
    pthread_mutex_lock(&rs->mu);
    rs->stopping = 1;
    pthread_cond_broadcast(&rs->cv);
    pthread_mutex_unlock(&rs->mu);
    for (int d = 1; d <= rs->threads_started; d++) pthread_join(rs->reps[d].thread, NULL);
    for (int d = 0; d < rs->ndevs; d++) {
        replica *r = &rs->reps[d];
        if (!r->dev) continue;
        if (r->net) rs->mops->destroy(r->net);
        wk_device_free(r->dev, r->grad);
        wk_device_free(r->dev, r->row_grad);
        wk_device_free(r->dev, r->probs_dev);
        wk_device_free(r->dev, r->inv_dev);
        wk_device_free(r->dev, r->rows_dev);
        wk_device_free(r->dev, r->params_copy);
        wk_device_free(r->dev, r->x_dev);
        wk_device_free(r->dev, r->y_dev);
    }
#ifdef WK_HAVE_NCCL
    wk_nccl_destroy(rs->nccl);
    free(rs->grads);
    free(rs->params);
    free(rs->zeros);
#endif
    wk_cuda_host_free(rs->host_scratch);
    pthread_cond_destroy(&rs->done_cv);
    pthread_cond_destroy(&rs->cv);
    pthread_mutex_destroy(&rs->mu);
    free(rs->reps);
    free(rs);
}

int wk_replicas_count(const wk_replicas *rs) { return rs->ndevs; }

int wk_replicas_can_hook(const wk_replicas *rs) {
    if (rs->sim) return rs->ndevs == 1;
    return rs->ndevs == 1 && rs->reps[0].dev->host_visible;
}

void wk_replicas_set_hook(wk_replicas *rs, const wk_grad_hook *hook) { rs->hook = hook; }

#ifdef WK_HAVE_NCCL
/* Wait for every device; the first error. */
static int sync_all(wk_replicas *rs) {
    int status = CM_OK;
    for (int d = 0; d < rs->ndevs; d++) {
        int st = wk_device_sync(rs->reps[d].dev);
        if (status == CM_OK) status = st;
    }
    return status;
}
#endif

int wk_replicas_set_params(wk_replicas *rs, const float *params) {
    if (rs->sim) return CM_OK; /* Simulated devices read nothing. */
    size_t pbytes = rs->model->numel * sizeof(float);
#ifdef WK_HAVE_NCCL
    if (rs->nccl) {
        wk_device *d0 = rs->reps[0].dev;
        d0->ops->upload(d0, rs->params[0], params, pbytes);
        int status = wk_device_sync(d0);
        if (status == CM_OK) status = wk_nccl_broadcast(rs->nccl, rs->params, rs->model->numel);
        int st = sync_all(rs);
        return status != CM_OK ? status : st;
    }
#endif
    for (int d = 0; d < rs->ndevs; d++) {
        replica *r = &rs->reps[d];
        if (r->dev->host_visible) {
            r->params = params;
        } else {
            r->dev->ops->upload(r->dev, r->params_copy, params, pbytes);
            int status = wk_device_sync(r->dev);
            if (status != CM_OK) return status;
        }
    }
    return CM_OK;
}

#ifdef WK_HAVE_NCCL
/* grad = sum_d (n_d / n) g_d: scaled on each GPU, summed on GPU 0 by NCCL,
 * downloaded once. */
static int nccl_reduce(wk_replicas *rs, int n, float *grad) {
    size_t numel = rs->model->numel;
    for (int d = 0; d < rs->ndevs; d++) {
        replica *r = &rs->reps[d];
        if (r->n == 0)
            r->dev->ops->upload(r->dev, r->grad, rs->zeros, numel * sizeof(float));
        else if (r->n != n)
            r->dev->ops->axpby(r->dev, numel, (float)r->n / (float)n, r->grad, 0.0f, r->grad);
    }
    int status = wk_nccl_reduce_sum(rs->nccl, rs->grads, numel);
    if (status == CM_OK)
        rs->reps[0].dev->ops->download(rs->reps[0].dev, grad, rs->grads[0],
                                       numel * sizeof(float));
    int st = sync_all(rs);
    return status != CM_OK ? status : st;
}
#endif

/* out = sum_d (n_d / n) g_d on the host, over 'count' floats of each
 * replica's dense gradient (rows = 0) or row gradient (rows = 1). */
static int reduce_host(wk_replicas *rs, int n, float *out, size_t count, int rows) {
    int first = 1;
    for (int d = 0; d < rs->ndevs; d++) {
        replica *r = &rs->reps[d];
        if (r->n == 0 && !rows) continue; /* Rows: an empty slice wrote zeros. */
        float w = (float)r->n / (float)n;
        const float *g = rows ? r->row_grad : r->grad;
        if (!r->dev->host_visible) {
            r->dev->ops->download(r->dev, rs->host_scratch, g, count * sizeof(float));
            int status = wk_device_sync(r->dev);
            if (status != CM_OK) return status;
            g = rs->host_scratch;
        }
        float *restrict o = out;
        const float *restrict in = g;
        if (first) {
            if (w == 1.0f)
                memcpy(o, in, count * sizeof(float));
            else
                for (size_t i = 0; i < count; i++) o[i] = w * in[i];
            first = 0;
        } else {
            for (size_t i = 0; i < count; i++) o[i] += w * in[i];
        }
    }
    return CM_OK;
}

/* grad = sum_d (n_d / n) g_d (and the same for the row gradients). */
static int local_reduce(wk_replicas *rs, int n, float *grad, float *row_grad, int nrows) {
    size_t numel = rs->model->numel;
    size_t rcount = (size_t)nrows * (size_t)rs->row_dim;
    if (rs->ndevs == 1 && !rs->reps[0].dev->host_visible) {
        /* One GPU: its gradient is the batch's; straight into grad. */
        wk_device *d = rs->reps[0].dev;
        d->ops->download(d, grad, rs->reps[0].grad, numel * sizeof(float));
        if (rcount) d->ops->download(d, row_grad, rs->reps[0].row_grad, rcount * sizeof(float));
        return wk_device_sync(d);
    }
    int status = rcount ? reduce_host(rs, n, row_grad, rcount, 1) : CM_OK;
    if (status != CM_OK) return status;
#ifdef WK_HAVE_NCCL
    if (rs->nccl) return nccl_reduce(rs, n, grad);
#endif
    return reduce_host(rs, n, grad, numel, 0);
}

int wk_replicas_gradient(wk_replicas *rs, const float *x, const int32_t *y, int n,
                         const wk_rows_in *sp, float *grad, float *row_grad, double *loss_sum,
                         int64_t *correct, wk_phase_times *times) {
    if (n < 1 || n > rs->max_batch) return CM_EINVAL;
    if (rs->nfields && (!sp || sp->nrows > rs->max_rows || !row_grad)) return CM_EINVAL;
    int nrows = rs->nfields ? (int)sp->nrows : 0;
    if (rs->sim) {
        double t0 = cm_now(), red = wk_sim_reduce_seconds(rs->sim, (size_t)nrows);
        int status = wk_sim_gradient(rs->sim, n, grad, row_grad, (size_t)nrows,
                                     wk_replicas_can_hook(rs) ? rs->hook : NULL);
        if (times) {
            times->local_reduce = red;
            times->compute = cm_now() - t0 - red;
        }
        return status;
    }
    for (int d = 0; d < rs->ndevs; d++) {
        size_t lo, hi;
        wk_order_slice((size_t)n, d, rs->ndevs, &lo, &hi);
        replica *r = &rs->reps[d];
        r->x = x ? x + lo * rs->in_dim : NULL;
        r->y = y + lo;
        r->inv = rs->nfields ? sp->inv + lo * (size_t)rs->nfields : NULL;
        r->rows = rs->nfields ? sp->rows : NULL;
        r->nrows = nrows;
        r->n = (int)(hi - lo);
        r->out = r->grad;
        r->row_out = r->row_grad;
        r->hook = NULL;
    }
    /* One host replica: no reduce, the gradient goes straight to the caller
     * (and a hook hears of it as it is computed). */
    int direct = wk_replicas_can_hook(rs);
    if (direct) {
        rs->reps[0].out = grad;
        rs->reps[0].row_out = row_grad;
        rs->reps[0].hook = rs->hook;
    }
    double t0 = cm_now();
    if (rs->ndevs > 1) {
        pthread_mutex_lock(&rs->mu);
        rs->done = 0;
        rs->generation++;
        pthread_cond_broadcast(&rs->cv);
        pthread_mutex_unlock(&rs->mu);
    }
    run_slice(&rs->reps[0]);
    if (rs->ndevs > 1) {
        pthread_mutex_lock(&rs->mu);
        while (rs->done < rs->ndevs - 1) pthread_cond_wait(&rs->done_cv, &rs->mu);
        pthread_mutex_unlock(&rs->mu);
    }
    double t1 = cm_now();
    int status = CM_OK;
    for (int d = 0; d < rs->ndevs; d++) {
        replica *r = &rs->reps[d];
        if (r->status != CM_OK && status == CM_OK) status = r->status;
        if (loss_sum) *loss_sum += r->loss;
        if (correct) *correct += r->correct;
    }
    if (status == CM_OK && !direct) status = local_reduce(rs, n, grad, row_grad, nrows);
    if (times) {
        times->compute = t1 - t0;
        times->local_reduce = cm_now() - t1;
    }
    return status;
}

int wk_replicas_eval_max(const wk_replicas *rs) { return rs->slice_max; }

int wk_replicas_evaluate_batch(wk_replicas *rs, const float *x, const int32_t *y, int n,
                               const wk_rows_in *sp, double *loss_sum, int64_t *correct,
                               float *probs) {
    replica *r = &rs->reps[0];
    if (n < 1 || n > rs->slice_max) return CM_EINVAL;
    if (rs->nfields && (!sp || sp->nrows > rs->max_rows)) return CM_EINVAL;
    if (rs->sim) {
        /* Nothing is computed: no loss, nothing right, a coin's odds. */
        if (probs)
            for (int i = 0; i < n; i++) probs[i] = 0.5f;
        return CM_OK;
    }
    r->x = x;
    r->y = y;
    r->n = n;
    r->inv = rs->nfields ? sp->inv : NULL;
    r->rows = rs->nfields ? sp->rows : NULL;
    r->nrows = rs->nfields ? (int)sp->nrows : 0;
    wk_dev_batch b = stage(r);
    float *pd = NULL;
    if (probs) pd = r->dev->host_visible ? probs : r->probs_dev;
    int status = rs->mops->evaluate(r->net, r->params, &b, loss_sum, correct, pd);
    if (status == CM_OK && probs && pd != probs) {
        r->dev->ops->download(r->dev, probs, pd, (size_t)n * sizeof(float));
        status = wk_device_sync(r->dev);
    }
    return status;
}

int wk_replicas_evaluate(wk_replicas *rs, const wk_dataset *data, double *accuracy,
                         double *mean_loss) {
    size_t dim = data->dim;
    if (dim != rs->in_dim || data->n == 0) return CM_EINVAL;
    size_t batch = (size_t)rs->slice_max;
    float *x = cm_alloc_aligned(batch * dim * sizeof(float));
    int32_t *y = cm_alloc_aligned(batch * sizeof(int32_t));
    uint32_t *idx = cm_alloc_aligned(batch * sizeof(uint32_t));
    int status = CM_ENOMEM;
    double loss = 0.0;
    int64_t right = 0;
    if (!x || !y || !idx) goto out;
    status = CM_OK;
    for (size_t at = 0; at < data->n && status == CM_OK; at += batch) {
        size_t n = data->n - at < batch ? data->n - at : batch;
        for (size_t i = 0; i < n; i++) idx[i] = (uint32_t)(at + i);
        wk_dataset_gather(data, idx, n, x, y);
        status = wk_replicas_evaluate_batch(rs, x, y, (int)n, NULL, &loss, &right, NULL);
    }
    if (status == CM_OK) {
        *accuracy = (double)right / (double)data->n;
        *mean_loss = loss / (double)data->n;
    }
out:
    free(x);
    free(y);
    free(idx);
    return status;
}
