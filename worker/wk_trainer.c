/* wk_trainer.c - the training loop of every mode, with progress, logs and recovery.
 * SPDX-License-Identifier: MIT
 */
#include "worker/wk_trainer.h"

#include <errno.h>
#include <jansson.h>
#include <xxhash.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_optim.h"
#include "worker/device/wk_device.h"
#include "worker/device/wk_device_cuda.h"
#include "worker/input/wk_dataset.h"
#include "worker/input/wk_order.h"
#include "worker/input/wk_prefetch.h"
#include "worker/sync/wk_sync.h"
#include "worker/wk_export.h"
#include "worker/wk_replicas.h"

void wk_train_cfg_defaults(wk_train_cfg *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->mode = "local";
    cfg->epochs = 10;
    cfg->batch_size = 128;
    cfg->lr = 0.0f; /* Chosen by optimizer in wk_train_run. */
    cfg->optimizer = PS_OPTIM_ADAM;
    cfg->seed = 1;
    cfg->local_devices = 1;
    cfg->devices = "auto";
    cfg->nsizes = 4;
    cfg->sizes[0] = 784;
    cfg->sizes[1] = 256;
    cfg->sizes[2] = 128;
    cfg->sizes[3] = 10;
    cfg->progress_every = 2.0;
    cfg->fault_rank = -1;
}

static void fmt_duration(double s, char *buf, size_t len) {
    if (s < 0 || s > 1e7) {
        snprintf(buf, len, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, len, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    else
        snprintf(buf, len, "%ld:%02ld", t / 60, t % 60);
}

static int write_summary(const char *path, const wk_train_cfg *cfg, float lr, int nps,
                         const wk_train_result *r, int ndevs, int on_gpu) {
    json_t *o = json_pack("{s:s, s:f, s:f, s:I, s:f, s:f, s:f, s:i, s:i, s:i, s:i, s:s, s:f, s:I,"
                          " s:i, s:i, s:f, s:i, s:s, s:i, s:I, s:s, s:i, s:s, s:s}",
                          "mode", cfg->mode, "test_accuracy", r->test_accuracy, "test_loss",
                          r->test_loss, "steps", (json_int_t)r->steps, "examples_per_sec",
                          r->examples_per_sec, "seconds", r->seconds, "final_train_loss",
                          r->final_train_loss, "workers", r->workers, "ps", nps, "local_devices",
                          cfg->local_devices, "batch_size", cfg->batch_size, "optimizer",
                          ps_optim_name(cfg->optimizer), "lr", (double)lr, "seed",
                          (json_int_t)cfg->seed, "epochs", cfg->epochs, "threads",
                          wk_device_cpu_threads(), "steady_examples_per_sec",
                          r->steady_examples_per_sec, "rank", r->rank, "sync",
                          cfg->async ? "async" : "sync", "rollbacks", r->rollbacks,
                          "steps_redone", (json_int_t)r->steps_redone, "device",
                          on_gpu ? "cuda" : "cpu", "devices", ndevs, "precision",
                          wk_precision_name(cfg->precision), "wire_dtype",
                          cfg->wire_bf16 ? "bf16" : "fp32");
    if (!o) return CM_ENOMEM;
    int rc = json_dump_file(o, path, JSON_INDENT(2)) == 0 ? CM_OK : CM_EIO;
    json_decref(o);
    if (rc != CM_OK) cm_error("cannot write summary %s: %s", path, strerror(errno));
    return rc;
}

static int write_params(const char *path, const float *p, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        cm_error("cannot write parameters to %s: %s", path, strerror(errno));
        return CM_EIO;
    }
    size_t w = fwrite(p, sizeof *p, n, f);
    int bad = fclose(f) != 0 || w != n;
    if (bad) cm_error("short write of parameters to %s", path);
    return bad ? CM_EIO : CM_OK;
}

static int check_cfg(const wk_train_cfg *cfg) {
    if (strcmp(cfg->mode, "local") != 0 && strcmp(cfg->mode, "ps") != 0 &&
        strcmp(cfg->mode, "allreduce") != 0) {
        cm_error("--mode must be local, ps or allreduce, not %s", cfg->mode);
        return CM_EINVAL;
    }
    if (!strcmp(cfg->mode, "allreduce")) {
        const cm_cluster *c = cfg->cluster;
        if (!c || cm_cluster_num_trainers(c) < 1) {
            cm_error("--mode allreduce needs the workers' addresses (TF_CONFIG or "
                     "--worker-hosts)");
            return CM_EINVAL;
        }
        if (cm_cluster_rank(c) < 0) {
            cm_error("this task is %s:%d; --mode allreduce runs chief and worker tasks only "
                     "(no PS, no evaluator)",
                     cm_task_type_name(c->task_type), c->task_index);
            return CM_EUNSUPPORTED;
        }
    }
    if (!strcmp(cfg->mode, "ps")) {
        const cm_cluster *c = cfg->cluster;
        if (!c || c->n[CM_TASK_PS] < 1) {
            cm_error("--mode ps needs PS addresses (TF_CONFIG or --ps-hosts)");
            return CM_EINVAL;
        }
        if (cm_cluster_rank(c) < 0 && c->task_type != CM_TASK_EVALUATOR) {
            cm_error("this task is %s:%d; pstrain runs chief and worker tasks (start a ps task "
                     "with psserver)",
                     cm_task_type_name(c->task_type), c->task_index);
            return CM_EUNSUPPORTED;
        }
    }
    if (cfg->wire_bf16 && strcmp(cfg->mode, "ps") != 0) {
        cm_error("--wire-dtype bf16 is for --mode ps (the gradients pushed to the PS); this "
                 "run is --mode %s", cfg->mode);
        return CM_EINVAL;
    }
    if (cfg->epochs < 1) return cm_error("--epochs must be >= 1"), CM_EINVAL;
    if (cfg->batch_size < 1) return cm_error("--batch-size must be >= 1"), CM_EINVAL;
    if (cfg->local_devices < 1 || cfg->local_devices > 64)
        return cm_error("--local-devices must be in 1..64"), CM_EINVAL;
    if (cfg->local_devices > cfg->batch_size)
        return cm_error("--local-devices (%d) exceeds --batch-size (%d)", cfg->local_devices,
                        cfg->batch_size),
               CM_EINVAL;
    if (cfg->lr < 0.0f) return cm_error("--lr must be > 0"), CM_EINVAL;
    if (cfg->threads < 0) return cm_error("--threads must be >= 1"), CM_EINVAL;
    return CM_OK;
}

/* An evaluator task: never pushes; pulls the parameters every
 * cfg->eval_every versions, evaluates them on the test set and reports,
 * until the PS processes go away at the end of training. */
static int evaluate_run(const wk_train_cfg *cfg, wk_train_result *result) {
    const cm_cluster *c = cfg->cluster;
    const char *dir = cfg->data_dir ? cfg->data_dir : wk_dataset_default_dir();
    wk_dataset test = {0};
    cm_model *model = NULL;
    wk_device *dev = NULL;
    wk_replicas *reps = NULL;
    wk_sync *sync = NULL;
    float *params = NULL;
    FILE *log = NULL;
    char err[512];
    int status = wk_dataset_load(dir, "t10k", cfg->test_limit, &test, err, sizeof err);
    if (status != CM_OK) {
        cm_error("%s", err);
        goto out;
    }
    if ((status = cm_model_create_mlp(cfg->sizes, cfg->nsizes, &model)) != CM_OK) goto out;
    status = CM_ENOMEM;
    if (!(params = cm_alloc_aligned(model->numel * sizeof(float)))) goto out;
    wk_device_cpu_set_threads(cfg->threads > 0 ? cfg->threads : 1);
    dev = wk_device_cpu_create(0);
    if ((status = wk_replicas_create(model, &dev, 1, cfg->batch_size, &reps)) != CM_OK) goto out;
    const int W = cm_cluster_num_trainers(c);
    wk_sync_ps_cfg pc = {
        .model = model,
        .min_part_bytes = cfg->min_part_bytes ? cfg->min_part_bytes : CM_PLACEMENT_MIN_PART_BYTES,
        .ps_addrs = (const char *const *)c->addrs[CM_TASK_PS],
        .nps = c->n[CM_TASK_PS],
        .rank = W, /* Not a training rank: a shard refuses its pushes. */
        .nworkers = W,
        .deadline_ms = cfg->deadline_ms ? cfg->deadline_ms : 60000,
        /* Short: the PS going away is how training's end shows here. */
        .connect_timeout_ms = cfg->connect_timeout_ms ? cfg->connect_timeout_ms : 5000};
    if ((status = wk_sync_ps_create(&pc, &sync, err, sizeof err)) != CM_OK) {
        cm_error("%s", err);
        goto out;
    }
    if (cfg->log_path && !(log = fopen(cfg->log_path, "w"))) {
        cm_error("cannot open --log %s: %s", cfg->log_path, strerror(errno));
        status = CM_EIO;
        goto out;
    }
    const int64_t every = cfg->eval_every > 0 ? cfg->eval_every : 500;
    cm_info("evaluating every %lld versions on %zu test images", (long long)every, test.n);
    int64_t want = 0;
    int evaluated = 0;
    double aborted_since = 0.0;
    for (;;) {
        int64_t version = 0;
        status = wk_sync_ps_pull(sync, want, params, &version);
        if (status == CM_EABORTED) { /* The cluster rolls back: wait for it. */
            if (aborted_since == 0.0) aborted_since = cm_now();
            if ((cm_now() - aborted_since) * 1e3 < (double)(cfg->recovery_timeout_ms > 0
                                                                ? cfg->recovery_timeout_ms
                                                                : 120000)) {
                usleep(200000);
                want = 0;
                continue;
            }
        }
        aborted_since = 0.0;
        if (status != CM_OK) {
            if (evaluated) {
                cm_info("the PS went away after version %lld: training is over (%s)",
                        (long long)result->steps, sync->err);
                status = CM_OK;
            } else {
                cm_error("%s", sync->err);
            }
            break;
        }
        double acc = 0.0, loss = 0.0;
        if ((status = wk_replicas_set_params(reps, params)) != CM_OK ||
            (status = wk_replicas_evaluate(reps, &test, &acc, &loss)) != CM_OK)
            break;
        evaluated++;
        result->steps = version;
        result->test_accuracy = acc;
        result->test_loss = loss;
        cm_info("version %lld: test loss %.4f acc %.4f", (long long)version, loss, acc);
        if (log) {
            fprintf(log, "{\"version\":%lld,\"test_accuracy\":%.6f,\"test_loss\":%.6f}\n",
                    (long long)version, acc, loss);
            fflush(log);
        }
        want = version + every;
    }
    result->test_examples = test.n;
out:
    if (log) fclose(log);
    wk_sync_destroy(sync);
    wk_replicas_destroy(reps);
    wk_device_destroy(dev);
    free(params);
    cm_model_destroy(model);
    wk_dataset_free(&test);
    return status;
}

/* "0,1,3" -> idx[0..n), n returned; -1 unless 1..max comma-separated
 * decimal numbers below 1024. */
static int parse_indices(const char *s, int *idx, int max) {
    int n = 0;
    for (const char *p = s;;) {
        if (*p < '0' || *p > '9' || n >= max) return -1;
        char *end;
        long v = strtol(p, &end, 10);
        if (v >= 1024) return -1;
        idx[n++] = (int)v;
        if (*end == '\0') return n;
        if (*end != ',') return -1;
        p = end + 1;
    }
}

/* The worker's devices from --devices (auto | all | cpu | staged | 0,1,...)
 * and --precision: GPUs, or cfg->local_devices CPU replicas (staged: CPU
 * devices that are used like GPUs, a test hook). On success devs[0..
 * *ndevs) are created (the caller destroys them); on error, after logging,
 * none is left. */
static int open_devices(const wk_train_cfg *cfg, wk_device **devs, int *ndevs, int *on_gpu) {
    const char *spec = cfg->devices ? cfg->devices : "auto";
    char why[512];
    int idx[64], n = 0;
    *ndevs = 0;
    *on_gpu = 0;
    int staged = !strcmp(spec, "staged");
    if (strcmp(spec, "cpu") != 0 && !staged) {
        int ngpu = wk_device_cuda_count(why, sizeof why);
        if (!strcmp(spec, "auto") || !strcmp(spec, "all")) {
            if (ngpu == 0 && !strcmp(spec, "all")) {
                cm_error("--devices all: no usable GPU (%s)", why);
                return CM_EUNSUPPORTED;
            }
            if (ngpu == 0) cm_debug("--devices auto: training on the CPU: %s", why);
            /* auto with --local-devices D > 1 asks for CPU replicas. */
            if (!strcmp(spec, "auto") && cfg->local_devices > 1) ngpu = 0;
            for (int g = 0; g < ngpu && g < 64; g++) idx[n++] = g;
        } else {
            n = parse_indices(spec, idx, 64);
            if (n < 0) {
                cm_error("--devices must be auto, all, cpu or GPU indices like 0,1; got '%s'",
                         spec);
                return CM_EINVAL;
            }
            for (int i = 0; i < n; i++)
                for (int j = 0; j < i; j++)
                    if (idx[i] == idx[j]) {
                        cm_error("--devices lists GPU %d twice (one replica per GPU)", idx[i]);
                        return CM_EINVAL;
                    }
        }
    }
    if (n == 0) {
        if (cfg->precision != WK_PRECISION_FP32) {
            cm_error("--precision %s needs GPU devices: the CPU backend computes in fp32",
                     wk_precision_name(cfg->precision));
            return CM_EUNSUPPORTED;
        }
        for (int d = 0; d < cfg->local_devices; d++)
            devs[d] = staged ? wk_device_cpu_staged_create(d) : wk_device_cpu_create(d);
        *ndevs = cfg->local_devices;
        return CM_OK;
    }
    if (cfg->local_devices > 1) {
        cm_error("--local-devices sets CPU replicas; with GPUs (--devices %s) each GPU is a "
                 "replica: add --devices cpu, or drop --local-devices",
                 spec);
        return CM_EINVAL;
    }
    for (int i = 0; i < n; i++) {
        /* Indices from the list are checked here (0 <= idx < GPUs). */
        int status = wk_device_cuda_create(idx[i], cfg->precision, &devs[i]);
        if (status != CM_OK) {
            for (int j = 0; j < i; j++) wk_device_destroy(devs[j]);
            memset(devs, 0, (size_t)n * sizeof *devs);
            return status;
        }
    }
    *ndevs = n;
    *on_gpu = 1;
    return CM_OK;
}

int wk_train_run(const wk_train_cfg *cfg, wk_train_result *result) {
    if (cfg->eval_only) return wk_export_eval_run(cfg, result);
    int status = check_cfg(cfg);
    if (status != CM_OK) return status;
    if (!strcmp(cfg->mode, "ps") && cfg->cluster->task_type == CM_TASK_EVALUATOR) {
        memset(result, 0, sizeof *result);
        result->rank = -1;
        return evaluate_run(cfg, result);
    }
    memset(result, 0, sizeof *result);
    const int is_ps = !strcmp(cfg->mode, "ps");
    const int is_ar = !strcmp(cfg->mode, "allreduce");
    const int dist = is_ps || is_ar; /* Several worker processes. */
    const int W = dist ? cm_cluster_num_trainers(cfg->cluster) : 1;
    const int rank = dist ? cm_cluster_rank(cfg->cluster) : 0;
    const int is_chief = dist ? cm_cluster_is_chief(cfg->cluster) : 1;
    const int nps = is_ps ? cfg->cluster->n[CM_TASK_PS] : 0;
    const size_t B = (size_t)cfg->batch_size * (size_t)W; /* Global batch. */
    result->is_chief = is_chief;
    result->rank = rank;
    result->workers = W;
    const char *dir = cfg->data_dir ? cfg->data_dir : wk_dataset_default_dir();
    wk_dataset train = {0}, test = {0};
    cm_model *model = NULL;
    wk_device *devs[64] = {0};
    wk_replicas *reps = NULL;
    wk_prefetch *pf = NULL;
    wk_sync *sync = NULL;
    float *params = NULL, *grad = NULL;
    const char **ar_addrs = NULL; /* Allreduce: the workers' addresses by rank. */
    FILE *log = NULL;
    char err[512];
    int D = 0, on_gpu = 0;
    int began = 0;
    if ((status = open_devices(cfg, devs, &D, &on_gpu)) != CM_OK) return status;
    if (D > cfg->batch_size) {
        cm_error("%d devices exceed the batch of %d examples per worker", D, cfg->batch_size);
        status = CM_EINVAL;
        goto out;
    }

    float lr = cfg->lr > 0.0f ? cfg->lr : (cfg->optimizer == PS_OPTIM_ADAM ? 1e-3f : 0.05f);
    ps_optim_cfg opt = ps_optim_defaults(cfg->optimizer, lr);
    int threads = cfg->threads > 0 ? cfg->threads
                                   : (D == 1 && !dist ? (int)sysconf(_SC_NPROCESSORS_ONLN) : 1);
    wk_device_cpu_set_threads(threads);

    double t_load = cm_now();
    if ((status = wk_dataset_load(dir, "train", cfg->train_limit, &train, err, sizeof err)) !=
            CM_OK ||
        (status = wk_dataset_load(dir, "t10k", cfg->test_limit, &test, err, sizeof err)) !=
            CM_OK) {
        cm_error("%s", err);
        goto out;
    }
    if ((status = cm_model_create_mlp(cfg->sizes, cfg->nsizes, &model)) != CM_OK) {
        cm_error("bad layer sizes");
        goto out;
    }
    if (train.dim != (size_t)model->sizes[0] || test.dim != train.dim ||
        train.nclasses > model->sizes[model->nsizes - 1] ||
        test.nclasses > model->sizes[model->nsizes - 1]) {
        cm_error("data (%zu inputs, %d classes) does not fit the model (%d inputs, %d classes)",
                 train.dim, train.nclasses, model->sizes[0], model->sizes[model->nsizes - 1]);
        status = CM_EINVAL;
        goto out;
    }
    size_t spe = wk_order_steps_per_epoch(train.n, B);
    if (spe == 0) {
        cm_error("the global batch (%zu = %d workers x %d) exceeds the %zu training examples", B,
                 W, cfg->batch_size, train.n);
        status = CM_EINVAL;
        goto out;
    }
    int64_t total = (int64_t)spe * cfg->epochs;
    if (cfg->max_steps > 0 && cfg->max_steps < total) total = cfg->max_steps;
    cm_info("loaded %zu training and %zu test examples from %s in %.2f s", train.n, test.n, dir,
            cm_now() - t_load);

    size_t lo, hi;
    wk_order_slice(B, rank, W, &lo, &hi);
    const int slice = (int)(hi - lo);
    /* Pushed gradients are means over each worker's slice; weighting them by
     * slice size keeps the PS's plain average equal to the global batch's
     * mean gradient when B is not a multiple of W. */
    const float grad_scale = (float)((double)slice * W / (double)B);

    status = CM_ENOMEM;
    size_t numel = model->numel;
    params = cm_alloc_aligned(numel * sizeof(float));
    grad = cm_alloc_aligned(numel * sizeof(float));
    if (!params || !grad) goto out;
    /* --init-from: the file's values, staged in grad until the first step. */
    if (cfg->init_from && (status = wk_export_load_init(cfg->init_from, model, grad)) != CM_OK)
        goto out;
    const float *init_values = cfg->init_from ? grad : NULL;
    if (is_ps) {
        wk_sync_ps_cfg pc = {
            .model = model,
            .min_part_bytes = cfg->min_part_bytes ? cfg->min_part_bytes
                                                  : CM_PLACEMENT_MIN_PART_BYTES,
            .ps_addrs = (const char *const *)cfg->cluster->addrs[CM_TASK_PS],
            .nps = nps,
            .rank = rank,
            .nworkers = W,
            .is_chief = is_chief,
            .optim = opt,
            .seed = cfg->seed,
            .async = cfg->async,
            .deadline_ms = cfg->deadline_ms ? cfg->deadline_ms : 60000,
            .connect_timeout_ms = cfg->connect_timeout_ms ? cfg->connect_timeout_ms : 30000,
            .separate_pull = cfg->separate_pull,
            .overlap = !cfg->no_overlap && !cfg->async && !cfg->separate_pull,
            .no_pipeline = cfg->no_pipeline,
            .wire_bf16 = cfg->wire_bf16,
            .fault_zero_gradient = cfg->fault_zero_gradient &&
                                   (cfg->fault_rank < 0 || cfg->fault_rank == rank),
            .global_batch = (unsigned)B,
            .steps_per_epoch = spe,
            .recovery_timeout_ms = cfg->recovery_timeout_ms,
            .init_values = init_values};
        if ((status = wk_sync_ps_create(&pc, &sync, err, sizeof err)) != CM_OK) {
            cm_error("%s", err);
            goto out;
        }
    } else if (is_ar) {
        ar_addrs = cm_calloc((size_t)W, sizeof *ar_addrs);
        for (int r = 0; r < W; r++) ar_addrs[r] = cm_cluster_trainer_addr(cfg->cluster, r);
        wk_sync_ar_cfg ac = {
            .model = model,
            .worker_addrs = ar_addrs,
            .rank = rank,
            .nworkers = W,
            .is_chief = is_chief,
            .optim = opt,
            .seed = cfg->seed,
            .global_batch = (unsigned)B,
            .timeout_ms = cfg->deadline_ms,
            .connect_timeout_ms = cfg->connect_timeout_ms,
            .fault_zero_gradient = cfg->fault_zero_gradient &&
                                   (cfg->fault_rank < 0 || cfg->fault_rank == rank),
            .init_values = init_values,
            .checkpoint_dir = cfg->checkpoint_dir,
            .checkpoint_every = cfg->checkpoint_every,
            .gpu = on_gpu && !cfg->no_nccl ? devs[0] : NULL};
        if ((status = wk_sync_allreduce_create(&ac, &sync, err, sizeof err)) != CM_OK) {
            cm_error("%s", err);
            goto out;
        }
    } else {
        sync = wk_sync_local_create(model, &opt, cfg->seed);
    }
    int64_t first_step = 0;
    if ((status = sync->ops->begin(sync, params, &first_step)) != CM_OK) {
        cm_error("cannot get the initial parameters: %s", sync->err);
        goto out;
    }
    if (first_step >= total) {
        cm_error("the checkpoint is at step %lld, past the %lld steps of this run: nothing to "
                 "do (start on fresh checkpoint directories for a new run)",
                 (long long)first_step, (long long)total);
        status = CM_EINVAL;
        goto out;
    }
    began = 1;
    if (init_values && !dist) memcpy(params, init_values, numel * sizeof(float));
    if (is_chief && cfg->init_out && (status = write_params(cfg->init_out, params, numel)) != CM_OK)
        goto out;
    if ((status = wk_replicas_create(model, devs, D, slice, &reps)) != CM_OK) goto out;
    if ((status = wk_replicas_set_params(reps, params)) != CM_OK) goto out;
    wk_prefetch_cfg pcfg = {.data = &train, .seed = cfg->seed, .global_batch = B, .rank = rank,
                            .nranks = W, .first_step = first_step,
                            .nsteps = total - first_step, .depth = 4};
    if ((status = wk_prefetch_start(&pcfg, &pf)) != CM_OK) goto out;
    if (cfg->log_path && !(log = fopen(cfg->log_path, "w"))) {
        cm_error("cannot open --log %s: %s", cfg->log_path, strerror(errno));
        status = CM_EIO;
        goto out;
    }
    if (is_ar)
        cm_info("training allreduce: rank %d of %d workers%s, %zu parameters, %s lr %g, batch %d "
                "per worker (%zu global), %d BLAS thread%s, %lld steps",
                rank, W, is_chief ? " (chief)" : "", numel, ps_optim_name(opt.kind), (double)lr,
                cfg->batch_size, B, threads, threads == 1 ? "" : "s", (long long)total);
    else if (is_ps)
        cm_info("training %s (%s%s): rank %d of %d workers%s, %d PS, %zu parameters, %s lr %g, "
                "batch %d per worker (%zu global) on %d %s device%s, %d BLAS thread%s, %lld "
                "steps",
                cfg->mode, cfg->async ? "async" : "sync",
                cfg->wire_bf16 ? ", bf16 gradients on the wire" : "", rank, W,
                is_chief ? " (chief)" : "",
                nps, numel, ps_optim_name(opt.kind), (double)lr, cfg->batch_size, B, D,
                on_gpu ? (cfg->precision == WK_PRECISION_BF16 ? "gpu (bf16)" : "gpu") : "cpu",
                D == 1 ? "" : "s", threads, threads == 1 ? "" : "s", (long long)total);
    else
        cm_info("training %s: %zu parameters, %s lr %g, batch %d on %d %s replica%s, %d BLAS "
                "thread%s, %lld steps (%zu per epoch)",
                cfg->mode, numel, ps_optim_name(opt.kind), (double)lr, cfg->batch_size, D,
                on_gpu ? (cfg->precision == WK_PRECISION_BF16 ? "gpu (bf16)" : "gpu") : "cpu",
                D == 1 ? "" : "s", threads, threads == 1 ? "" : "s", (long long)total, spe);

    double t_start = cm_now(), t_print = t_start;
    double window_loss = 0.0, epoch_loss = 0.0;
    int64_t window_n = 0, epoch_n = 0, epoch_correct = 0;
    int64_t step = first_step;
    double eval_seconds = 0.0;
    int64_t warm_steps = total / 20 < 50 ? total / 20 : 50;
    double t_warm = t_start, eval_warm = 0.0;
    while (step < total) {
        double t0 = cm_now();
        wk_batch *b = NULL;
        status = wk_prefetch_next(pf, &b);
        if (status != CM_OK) {
            cm_error("input pipeline ended early at step %lld: %s", (long long)step,
                     cm_strerror(status));
            goto out;
        }
        double t1 = cm_now();
        double loss = 0.0;
        int64_t correct = 0;
        wk_phase_times pt = {0};
        /* Overlap: the mode may send parts of the gradient as the backward
         * pass finishes them; it then applies grad_scale itself. */
        const wk_grad_hook *hook = NULL;
        if (sync->ops->overlap && wk_replicas_can_hook(reps))
            hook = sync->ops->overlap(sync, step, grad, params, grad_scale);
        wk_replicas_set_hook(reps, hook);
        status = wk_replicas_gradient(reps, b->x, b->y, (int)b->n, grad, &loss, &correct, &pt);
        int64_t epoch = b->epoch;
        size_t n = b->n;
        wk_prefetch_release(pf, b);
        /* With hook->need the forward pass waited for the last pieces of
         * this step's parameters (PS mode's pipelined pull): a failure there
         * is the mode's, with its message, and a rollback is recovered from
         * as one seen by step(). */
        int from_sync = hook && hook->need && sync->err[0];
        if (status != CM_OK && !(status == CM_EABORTED && from_sync)) {
            cm_error("gradient computation failed at step %lld: %s", (long long)step,
                     from_sync ? sync->err : cm_strerror(status));
            goto out;
        }
        if (!hook && grad_scale != 1.0f)
            for (size_t i = 0; i < numel; i++) grad[i] *= grad_scale;
        wk_sync_times st = {0};
        if (status == CM_OK) status = sync->ops->step(sync, step, grad, params, &st);
        if (status == CM_EABORTED && sync->ops->recover) {
            /* The cluster rolls back (a PS restarted from its checkpoint):
             * resume where every shard agrees, with the data of that step. */
            int64_t resume = step;
            if ((status = sync->ops->recover(sync, step, &resume, params)) != CM_OK) {
                cm_error("step %lld: recovery failed: %s", (long long)step, sync->err);
                goto out;
            }
            cm_warn("step %lld: the cluster rolled back%s; resuming at step %lld (%lld step%s "
                    "redone)",
                    (long long)step,
                    from_sync ? " (seen by the forward pass, waiting for the parameters)" : "",
                    (long long)resume, (long long)(step - resume), step - resume == 1 ? "" : "s");
            result->rollbacks++;
            result->steps_redone += step - resume;
            wk_prefetch_stop(pf);
            pf = NULL;
            pcfg.first_step = resume;
            pcfg.nsteps = total - resume;
            if ((status = wk_prefetch_start(&pcfg, &pf)) != CM_OK ||
                (status = wk_replicas_set_params(reps, params)) != CM_OK)
                goto out;
            step = resume;
            continue;
        }
        if (status != CM_OK) {
            cm_error("step %lld failed: %s", (long long)step, sync->err);
            goto out;
        }
        /* The new parameters reach the replicas: nothing to do on the CPU
         * (they read 'params' in place), an upload (and a broadcast) on
         * GPUs. */
        if ((status = wk_replicas_set_params(reps, params)) != CM_OK) {
            cm_error("step %lld: cannot copy the parameters to the devices: %s", (long long)step,
                     cm_strerror(status));
            goto out;
        }
        double t3 = cm_now();
        step++;
        if (step == warm_steps) {
            t_warm = t3;
            eval_warm = eval_seconds;
        }
        window_loss += loss;
        window_n += (int64_t)n;
        epoch_loss += loss;
        epoch_n += (int64_t)n;
        epoch_correct += correct;
        if (log)
            fprintf(log,
                    "{\"step\":%lld,\"epoch\":%lld,\"examples\":%zu,\"loss\":%.6f,"
                    "\"data_wait_ms\":%.4f,\"compute_ms\":%.4f,\"local_reduce_ms\":%.4f,"
                    "\"comm_ms\":%.4f,\"push_ms\":%.4f,\"pull_ms\":%.4f,\"apply_ms\":%.4f,"
                    "\"step_ms\":%.4f}\n",
                    (long long)step, (long long)epoch, n, loss / (double)n, (t1 - t0) * 1e3,
                    (pt.compute - st.pull_in_compute) * 1e3, pt.local_reduce * 1e3, (st.push + st.pull) * 1e3,
                    st.push * 1e3, st.pull * 1e3, st.apply * 1e3, (t3 - t0) * 1e3);
        int epoch_end = step % (int64_t)spe == 0 || step == total;
        if (epoch_end) {
            double te = cm_now(), acc = 0.0, tl = 0.0;
            result->final_train_loss = epoch_loss / (double)epoch_n;
            if (is_chief && (!cfg->async || step < total)) {
                /* In async mode the final evaluation waits for all workers. */
                if (sync->ops->settle && (status = sync->ops->settle(sync)) != CM_OK) {
                    cm_error("step %lld: %s", (long long)step, sync->err);
                    goto out;
                }
                status = wk_replicas_evaluate(reps, &test, &acc, &tl);
                if (status != CM_OK) goto out;
                result->test_accuracy = acc;
                result->test_loss = tl;
                if (cfg->progress_every >= 0)
                    cm_info("epoch %lld/%d done: train loss %.4f acc %.4f | test loss %.4f acc "
                            "%.4f",
                            (long long)epoch + 1, cfg->epochs, epoch_loss / (double)epoch_n,
                            (double)epoch_correct / (double)epoch_n, tl, acc);
            }
            eval_seconds += cm_now() - te;
            epoch_loss = 0.0;
            epoch_n = epoch_correct = 0;
        }
        double now = cm_now();
        if (cfg->progress_every >= 0 && (now - t_print >= cfg->progress_every || step == total) &&
            window_n > 0) {
            double train_s = now - t_start - eval_seconds;
            double eps = (double)step * (double)B / train_s;
            char el[32], left[32];
            fmt_duration(now - t_start, el, sizeof el);
            fmt_duration((double)(total - step) * (train_s / (double)step), left, sizeof left);
            cm_info("step %lld/%lld epoch %lld/%d loss %.4f | %.0f ex/s | elapsed %s left %s",
                    (long long)step, (long long)total, (long long)epoch + 1, cfg->epochs,
                    window_loss / (double)window_n, eps, el, left);
            window_loss = 0.0;
            window_n = 0;
            t_print = now;
        }
    }
    result->steps = step;
    result->seconds = cm_now() - t_start - eval_seconds;
    result->examples_per_sec = (double)step * (double)B / result->seconds;
    result->steady_examples_per_sec =
        (double)(step - warm_steps) * (double)B /
        (cm_now() - t_warm - (eval_seconds - eval_warm));
    result->test_examples = test.n;
    if ((status = sync->ops->end(sync, step, params)) != CM_OK) {
        cm_error("cannot get the final parameters: %s", sync->err);
        goto out;
    }
    result->params_checksum = XXH64(params, numel * sizeof(float), 0);
    if (is_chief && is_ps && cfg->async) {
        if ((status = wk_replicas_set_params(reps, params)) != CM_OK ||
            (status = wk_replicas_evaluate(reps, &test, &result->test_accuracy,
                                           &result->test_loss)) != CM_OK)
            goto out;
    }
    status = CM_OK;
    /* Only the chief reports: in PS mode every worker gets the same flags. */
    if (is_chief && cfg->summary_path)
        status = write_summary(cfg->summary_path, cfg, lr, nps, result, D, on_gpu);
    if (is_chief && status == CM_OK && cfg->params_out)
        status = write_params(cfg->params_out, params, numel);
    if (is_chief && status == CM_OK && cfg->export_path)
        status = wk_export_save_run(cfg->export_path, cfg, model, params, result);
out:
    if (sync && began) {
        int rc = sync->ops->finish(sync, status == CM_OK);
        if (rc != CM_OK) {
            cm_error("%s", sync->err);
            if (status == CM_OK) status = rc;
        }
    }
    if (log && fclose(log) != 0 && status == CM_OK) {
        cm_error("error writing --log %s", cfg->log_path);
        status = CM_EIO;
    }
    wk_prefetch_stop(pf);
    wk_replicas_destroy(reps);
    for (int d = 0; d < D; d++) wk_device_destroy(devs[d]);
    wk_sync_destroy(sync);
    free(ar_addrs);
    free(params);
    free(grad);
    cm_model_destroy(model);
    wk_dataset_free(&train);
    wk_dataset_free(&test);
    return status;
}
