/* wk_ctr.c - DeepFM and logistic regression against the wk_device interface.
 * SPDX-License-Identifier: MIT
 *
 * One code path for both: logistic regression is DeepFM without factors
 * (k = 0: no FM term, no DNN) and with "lr/bias" for "fm/bias". With F
 * fields, rows of D = k + 1 floats and n examples (positions e * F + f):
 *   forward   w = rows[inv][:, 0] (n x F), z = rowsum(w) + bias;
 *             E = rows[inv][:, 1..k] (n x F*k: the FM's input and, as laid
 *             out, the DNN's), z += FM(E);
 *             h_0 = E, h_{i+1} = relu(h_i W_i + b_i), z += h_L W_L + b_L.
 *   loss      sigmoid_xent; dz = (p - y) / n, so every gradient below is
 *             the mean loss's.
 *   backward  dbias = colsum(dz); the DNN as in wk_mlp (dW_i = h_i^T dz_i,
 *             db_i = colsum(dz_i), dz_{i-1} = relu'(h_i) (dz_i W_i^T)); its
 *             input gradient dz_0 W_0^T is added (GEMM beta 1) onto the FM's
 *             dE = FM'(E) dz. Row gradients: zeroed, then column 0 of row
 *             inv[e, f] gets dz[e] and columns 1..k get dE[e, f, :], summed
 *             over the positions that read the row (scatter-add). dz is
 *             spread to one value per position by a rank-1 GEMM with a row
 *             of ones (exact: products by 1.0 with beta 0), so no op beyond
 *             wk_device's is needed.
 * Every buffer is allocated in create for max_batch examples.
 */
#include "worker/model/wk_ctr.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"

enum { CTR_MAX_LAYERS = CM_MLP_MAX_SIZES };

typedef struct wk_ctr {
    const cm_model *model;
    wk_device *dev;
    int max_batch;
    int F, k, D;   /* Fields, factors (0: LR), floats per row (k + 1). */
    int nlayers;   /* DNN layers, the output layer included (0: LR). */
    int width[CTR_MAX_LAYERS + 1]; /* width[0] = F * k, ..., width[nlayers] = 1. */
    size_t bias_off;               /* fm/bias or lr/bias in the flat vector. */
    size_t kernel_off[CTR_MAX_LAYERS], dbias_off[CTR_MAX_LAYERS];
    /* Device buffers, for max_batch (B) examples: */
    float *z;                   /* B: logits, then dz in place. */
    float *w;                   /* B x F: first-order weights, then dz per position. */
    float *ones;                /* F ones. */
    float *emb;                 /* B x F*k: the gathered factors. */
    float *demb;                /* B x F*k: their gradient. */
    float *fm;                  /* B: the FM term. */
    float *act[CTR_MAX_LAYERS]; /* act[i], 1 <= i < nlayers: hidden layer i-1's output. */
    float *delta[2];            /* Ping-pong buffers for the hidden layers' dz. */
} wk_ctr;

static int is_deepfm(const cm_model *m) { return strcmp(m->kind, "deepfm") == 0; }

/* The DNN's widths for model m (deepfm): width[0..nlayers]; 0 layers for LR
 * (and for more hidden layers than fit, which layout() rejects). */
static int dnn_widths(const cm_model *m, int *width) {
    if (!is_deepfm(m) || m->nsizes < 0 || m->nsizes > CTR_MAX_LAYERS - 1) return 0;
    width[0] = m->nfields * m->emb_dim;
    for (int i = 0; i < m->nsizes; i++) width[i + 1] = m->sizes[i];
    width[m->nsizes + 1] = 1;
    return m->nsizes + 1;
}

/* Offset of dense variable 'name' of exactly 'numel' elements, or -1. */
static long long dense_offset(const cm_model *m, const char *name, size_t numel) {
    int v = cm_model_find(m, name);
    if (v < 0 || m->vars[v].kind != CM_VAR_DENSE || m->vars[v].numel != numel) return -1;
    return (long long)m->vars[v].offset;
}

/* Checks the model against wk_ctr.h's layout and fills in the shapes. */
static int layout(wk_ctr *net, const cm_model *m) {
    int deepfm = is_deepfm(m);
    if (!deepfm && strcmp(m->kind, "lr") != 0) return CM_EINVAL;
    if (m->nfields < 1 || m->ntables < 1 || (deepfm && (m->emb_dim < 1 || m->nsizes < 0 ||
                                                        m->nsizes > CTR_MAX_LAYERS - 1)))
        return CM_EINVAL;
    /* Positions (n * F) and embedding widths (F * k) are ints in the ops. */
    if ((int64_t)net->max_batch * m->nfields > INT32_MAX ||
        (deepfm && (int64_t)m->nfields * m->emb_dim > INT32_MAX))
        return CM_EINVAL;
    net->F = m->nfields;
    net->k = deepfm ? m->emb_dim : 0;
    net->D = net->k + 1;
    for (int f = 0; f < m->nfields; f++)
        if (m->field_table[f] < 0 || m->field_table[f] >= m->ntables) return CM_EINVAL;
    for (int t = 0; t < m->ntables; t++)
        if (m->vars[m->table_var[t]].dim != net->D) return CM_EINVAL;
    long long off = dense_offset(m, deepfm ? "fm/bias" : "lr/bias", 1);
    if (off < 0) return CM_EINVAL;
    net->bias_off = (size_t)off;
    net->nlayers = dnn_widths(m, net->width);
    for (int i = 0; i < net->nlayers; i++) {
        char name[CM_VAR_NAME_MAX];
        if (net->width[i] < 1 || net->width[i + 1] < 1) return CM_EINVAL;
        snprintf(name, sizeof name, "dnn%d/kernel", i);
        off = dense_offset(m, name, (size_t)net->width[i] * (size_t)net->width[i + 1]);
        if (off < 0) return CM_EINVAL;
        net->kernel_off[i] = (size_t)off;
        snprintf(name, sizeof name, "dnn%d/bias", i);
        off = dense_offset(m, name, (size_t)net->width[i + 1]);
        if (off < 0) return CM_EINVAL;
        net->dbias_off[i] = (size_t)off;
    }
    return CM_OK;
}

static void ctr_destroy(wk_model *wm) {
    wk_ctr *net = (wk_ctr *)wm;
    if (!net) return;
    wk_device *d = net->dev;
    float *bufs[] = {net->z, net->w, net->ones, net->emb, net->demb, net->fm,
                     net->delta[0], net->delta[1]};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) wk_device_free(d, bufs[i]);
    for (int i = 0; i < CTR_MAX_LAYERS; i++) wk_device_free(d, net->act[i]);
    free(net);
}

/* Device memory for 'floats' floats (NULL on failure). */
static float *dev_floats(wk_device *d, size_t floats) {
    return wk_device_alloc(d, floats * sizeof(float));
}

static int ctr_create(const cm_model *model, wk_device *dev, int max_batch, wk_model **out) {
    *out = NULL;
    if (max_batch < 1) return CM_EINVAL;
    wk_ctr *net = cm_calloc(1, sizeof *net);
    net->model = model;
    net->dev = dev;
    net->max_batch = max_batch;
    int rc = layout(net, model);
    if (rc != CM_OK) {
        free(net);
        return rc;
    }
    const size_t B = (size_t)max_batch, F = (size_t)net->F, Fk = F * (size_t)net->k;
    int ok = (net->z = dev_floats(dev, B)) && (net->w = dev_floats(dev, B * F)) &&
             (net->ones = dev_floats(dev, F));
    if (ok && net->k > 0) {
        size_t widest = 1;
        for (int i = 1; i < net->nlayers; i++)
            if ((size_t)net->width[i] > widest) widest = (size_t)net->width[i];
        ok = (net->emb = dev_floats(dev, B * Fk)) && (net->demb = dev_floats(dev, B * Fk)) &&
             (net->fm = dev_floats(dev, B)) && (net->delta[0] = dev_floats(dev, B * widest)) &&
             (net->delta[1] = dev_floats(dev, B * widest));
        for (int i = 1; ok && i < net->nlayers; i++)
            ok = (net->act[i] = dev_floats(dev, B * (size_t)net->width[i])) != NULL;
    }
    if (ok) {
        dev->ops->fill(dev, F, 1.0f, net->ones);
        rc = wk_device_sync(dev);
    } else {
        rc = CM_ENOMEM;
    }
    if (rc != CM_OK) {
        ctr_destroy((wk_model *)net);
        return rc;
    }
    *out = (wk_model *)net;
    return CM_OK;
}

static int check_batch(const wk_ctr *net, const wk_dev_batch *b) {
    if (!b || b->n < 1 || b->n > net->max_batch || b->nrows < 1 || !b->inv || !b->rows || !b->y)
        return CM_EINVAL;
    return CM_OK;
}

/* Forward pass to the logits (left in net->z). */
static void forward(wk_ctr *net, const float *params, const wk_dev_batch *b) {
    wk_device *d = net->dev;
    const wk_device_ops *o = d->ops;
    const int n = b->n, F = net->F, k = net->k, D = net->D, npos = n * F;
    o->gather_rows(d, npos, b->inv, b->rows, D, 0, 1, net->w, 1);
    o->row_sum(d, n, F, net->w, F, net->z);
    if (k > 0) {
        o->gather_rows(d, npos, b->inv, b->rows, D, 1, k, net->emb, k);
        o->fm_forward(d, n, F, k, net->emb, net->fm);
        o->axpby(d, (size_t)n, 1.0f, net->fm, 1.0f, net->z);
        const float *h = net->emb;
        for (int i = 0; i < net->nlayers; i++) {
            const int in = net->width[i], out = net->width[i + 1];
            const int last = i + 1 == net->nlayers;
            /* The output layer adds its (n x 1) result onto z. */
            float *dst = last ? net->z : net->act[i + 1];
            o->gemm(d, 0, 0, n, out, in, 1.0f, h, in, params + net->kernel_off[i], out,
                    last ? 1.0f : 0.0f, dst, out);
            o->bias_add(d, n, out, dst, params + net->dbias_off[i]);
            if (!last) o->relu(d, (size_t)n * (size_t)out, dst, dst);
            h = dst;
        }
    }
    o->bias_add(d, n, 1, net->z, params + net->bias_off);
}

/* Backward pass from dz (in net->z) to grad and row_grad. */
static void backward(wk_ctr *net, const float *params, const wk_dev_batch *b, float *grad,
                     float *row_grad) {
    wk_device *d = net->dev;
    const wk_device_ops *o = d->ops;
    const int n = b->n, F = net->F, k = net->k, D = net->D, npos = n * F;
    o->col_sum(d, n, 1, net->z, grad + net->bias_off);
    if (k > 0) {
        o->fm_backward(d, n, F, k, net->emb, net->z, net->demb);
        const float *dz = net->z;
        for (int i = net->nlayers - 1; i >= 0; i--) {
            const int in = net->width[i], out = net->width[i + 1];
            const float *h = i == 0 ? net->emb : net->act[i];
            /* dW = h^T dz: [in, n] x [n, out]. */
            o->gemm(d, 1, 0, in, out, n, 1.0f, h, in, dz, out, 0.0f, grad + net->kernel_off[i],
                    out);
            o->col_sum(d, n, out, dz, grad + net->dbias_off[i]);
            /* dh = dz W^T: [n, out] x [out, in]; layer 0's onto the FM's dE. */
            float *dh = i == 0 ? net->demb : net->delta[i & 1];
            o->gemm(d, 0, 1, n, in, out, 1.0f, dz, out, params + net->kernel_off[i], out,
                    i == 0 ? 1.0f : 0.0f, dh, in);
            if (i > 0) o->relu_backward(d, (size_t)n * (size_t)in, net->act[i], dh, dh);
            dz = dh;
        }
    }
    o->fill(d, (size_t)b->nrows * (size_t)D, 0.0f, row_grad);
    /* dz (n x 1) times F ones (1 x F): position (e, f) holds dz[e]. */
    o->gemm(d, 0, 0, n, F, 1, 1.0f, net->z, 1, net->ones, F, 0.0f, net->w, F);
    o->scatter_add_rows(d, npos, b->inv, net->w, 1, 1, row_grad, D, 0);
    if (k > 0) o->scatter_add_rows(d, npos, b->inv, net->demb, k, k, row_grad, D, 1);
}

static size_t rows_of(const cm_var *v) {
    return v->ndims >= 1 && v->dims[0] >= 1 ? (size_t)v->dims[0] : 1;
}

/* The hook, by whole dense variables (no pieces: splits are ignored).
 * need() is asked for every one before the forward pass reads any, since
 * PS mode's pipelined pull may still be writing them; ready() is told of
 * every one once the gradient is complete. Both are optional. */
static int hook_need(const cm_model *m, const wk_grad_hook *hook) {
    if (!hook || !hook->need) return CM_OK;
    for (int v = 0; v < m->nvars; v++) {
        if (m->vars[v].kind != CM_VAR_DENSE) continue;
        int rc = hook->need(hook->ud, v, 0, rows_of(&m->vars[v]));
        if (rc != CM_OK) return rc;
    }
    return CM_OK;
}

static void hook_ready(const cm_model *m, const wk_grad_hook *hook) {
    if (!hook || !hook->ready) return;
    for (int v = 0; v < m->nvars; v++)
        if (m->vars[v].kind == CM_VAR_DENSE) hook->ready(hook->ud, v, 0, rows_of(&m->vars[v]));
}

static int ctr_gradient(wk_model *wm, const float *params, const wk_dev_batch *b, float *grad,
                        float *row_grad, double *loss_sum, int64_t *correct,
                        const wk_grad_hook *hook) {
    wk_ctr *net = (wk_ctr *)wm;
    int rc = check_batch(net, b);
    if (rc != CM_OK || !grad || !row_grad) return CM_EINVAL;
    if ((rc = hook_need(net->model, hook)) != CM_OK) return rc;
    forward(net, params, b);
    net->dev->ops->sigmoid_xent(net->dev, b->n, net->z, b->y, 1.0f / (float)b->n, net->z, NULL,
                                loss_sum, correct);
    backward(net, params, b, grad, row_grad);
    rc = wk_device_sync(net->dev);
    if (rc == CM_OK) hook_ready(net->model, hook);
    return rc;
}

static int ctr_evaluate(wk_model *wm, const float *params, const wk_dev_batch *b,
                        double *loss_sum, int64_t *correct, float *probs) {
    wk_ctr *net = (wk_ctr *)wm;
    int rc = check_batch(net, b);
    if (rc != CM_OK) return rc;
    forward(net, params, b);
    net->dev->ops->sigmoid_xent(net->dev, b->n, net->z, b->y, 0.0f, net->z, probs, loss_sum,
                                correct);
    return wk_device_sync(net->dev);
}

/* The GEMMs of one gradient: per DNN layer forward, dW and dX (layer 0's
 * dX too: it is the embeddings' gradient), and the rank-1 spread of dz. */
static double ctr_flops(const cm_model *model, int n) {
    int width[CTR_MAX_LAYERS + 1];
    int nl = dnn_widths(model, width);
    double f = 2.0 * n * model->nfields;
    for (int i = 0; i < nl; i++) f += 3.0 * 2.0 * n * width[i] * width[i + 1];
    return f;
}

const wk_model_ops wk_ctr_ops = {.name = "ctr",
                                 .create = ctr_create,
                                 .destroy = ctr_destroy,
                                 .gradient = ctr_gradient,
                                 .evaluate = ctr_evaluate,
                                 .flops = ctr_flops};
