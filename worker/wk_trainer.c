/* wk_trainer.c - the training loop of every mode, with progress, logs and recovery.
 * SPDX-License-Identifier: MIT
 */
#include "worker/wk_trainer.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <xxhash.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_auc.h"
#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_optim.h"
#include "worker/device/wk_device.h"
#include "worker/device/wk_device_cuda.h"
#include "worker/input/wk_ctrdata.h"
#include "worker/input/wk_dataset.h"
#include "worker/input/wk_order.h"
#include "worker/input/wk_prefetch.h"
#include "worker/wk_metrics.h"
#include "worker/sync/wk_ring.h"
#include "worker/sync/wk_sync.h"
#include "worker/wk_export.h"
#include "worker/wk_replicas.h"

void wk_train_cfg_defaults(wk_train_cfg *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->mode = "local";
    cfg->model = "mlp";
    cfg->emb_dim = 10;
    cfg->nhidden = 3;
    cfg->hidden[0] = cfg->hidden[1] = cfg->hidden[2] = 400;
    cfg->table_optimizer = PS_OPTIM_ADAGRAD;
    cfg->table_lr = 0.3f;
    cfg->max_bad_lines = 1000;
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
    cfg->ring_transport = WK_RING_AUTO;
    cfg->ring_algorithm = WK_RING_ALG_AUTO;
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
                          " s:i, s:i, s:f, s:i, s:s, s:i, s:I, s:I, s:s, s:i, s:s, s:s}",
                          "mode", cfg->mode, "test_accuracy", r->test_accuracy, "test_loss",
                          r->test_loss, "steps", (json_int_t)r->steps, "examples_per_sec",
                          r->examples_per_sec, "seconds", r->seconds, "final_train_loss",
                          r->final_train_loss, "workers", r->workers, "ps", nps, "local_devices",
                          cfg->local_devices, "batch_size", cfg->batch_size, "optimizer",
                          ps_optim_name(cfg->optimizer), "lr", (double)lr, "seed",
                          (json_int_t)cfg->seed, "epochs", cfg->epochs, "threads",
                          wk_device_cpu_threads(), "steady_examples_per_sec",
                          r->steady_examples_per_sec, "rank", r->rank, "sync",
                          cfg->async ? "async" : cfg->backup_sync ? "backup" : "sync",
                          "rollbacks", r->rollbacks,
                          "steps_redone", (json_int_t)r->steps_redone, "versions_lost",
                          (json_int_t)r->versions_lost, "device",
                          wk_train_simulated(cfg) ? "sim" : on_gpu ? "cuda" : "cpu", "devices",
                          ndevs, "precision",
                          wk_precision_name(cfg->precision), "wire_dtype",
                          cfg->wire_bf16 ? "bf16" : "fp32");
    if (!o) return CM_ENOMEM;
    json_object_set_new(o, "model", json_string(cfg->model));
    json_object_set_new(o, "numel", json_integer((json_int_t)r->numel));
    json_object_set_new(o, "blas", json_string(wk_device_cpu_gemm_name()));
    json_object_set_new(o, "prefetch", json_boolean(!cfg->no_prefetch));
    json_object_set_new(o, "simulated", json_boolean(wk_train_simulated(cfg)));
    if (wk_train_simulated(cfg)) {
        /* The accuracy of a simulated run means nothing: its gradients are
         * a fixed pattern. */
        json_t *sim = json_pack("{s:f, s:f, s:f, s:f, s:f}", "tflops", cfg->sim.tflops,
                                "step_ms", cfg->sim.step_ms, "intra_gbps", cfg->sim.intra_gbps,
                                "jitter", cfg->sim.jitter, "input_ms", cfg->sim_input_s * 1e3);
        if (sim) json_object_set_new(o, "sim", sim);
    }
    if (!isnan(r->test_auc)) {
        json_object_set_new(o, "auc", json_real(r->test_auc));
        json_object_set_new(o, "logloss", json_real(r->test_loss));
        json_object_set_new(o, "bayes_auc", isnan(r->bayes_auc) ? json_null()
                                                                 : json_real(r->bayes_auc));
        json_object_set_new(o, "rows_pulled_per_sec", json_real(r->rows_pulled_per_sec));
        json_object_set_new(o, "unique_ids_per_batch", json_real(r->unique_ids_per_batch));
        json_object_set_new(o, "table_optimizer", json_string(ps_optim_name(cfg->table_optimizer)));
    }
    if (r->ps_stats_valid) {
        const ps_client_stats *st = &r->ps_stats;
        const uint64_t asked = st->row_hits + st->row_misses;
        json_t *p = json_pack(
            "{s:I, s:I, s:I, s:f, s:I, s:f, s:f, s:I, s:I, s:I, s:I, s:f, s:f, s:f}", "rows",
            (json_int_t)st->rows, "in_memory", (json_int_t)st->rows_resident, "in_row_stores",
            (json_int_t)st->rows_on_disk, "hit_rate",
            asked ? (double)st->row_hits / (double)asked : 0.0, "evictions",
            (json_int_t)st->row_evictions, "mb_written",
            (double)st->row_bytes_written / (1 << 20), "budget_mb",
            (double)st->rows_budget / (1 << 20), "reads_not_admitted",
            (json_int_t)st->rows_not_admitted, "updates_dropped",
            (json_int_t)st->row_updates_dropped, "expired", (json_int_t)st->rows_expired,
            "last_checkpoint_rows", (json_int_t)st->ckpt_rows, "last_checkpoint_mb",
            (double)st->ckpt_row_bytes / (1 << 20), "misses_per_sec",
            r->seconds > 0 ? (double)st->row_misses / r->seconds : 0.0, "evictions_per_sec",
            r->seconds > 0 ? (double)st->row_evictions / r->seconds : 0.0);
        if (p) json_object_set_new(o, "ps_rows", p);
    }
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
    if ((cfg->call_bytes || cfg->call_window || cfg->client_spin_us || cfg->unary_calls ||
         cfg->poll_spin_us) &&
        strcmp(cfg->mode, "ps") != 0) {
        cm_error("--call-bytes, --call-window, --client-spin-us, --poll-spin-us and --unary-calls "
                 "are for --mode ps (the calls to the PS); this run is --mode %s", cfg->mode);
        return CM_EINVAL;
    }
    if (strcmp(cfg->model, "mlp") != 0 && strcmp(cfg->model, "deepfm") != 0 &&
        strcmp(cfg->model, "lr") != 0) {
        cm_error("--model must be mlp, deepfm or lr, not %s", cfg->model);
        return CM_EINVAL;
    }
    if (cfg->table_lr <= 0.0f) return cm_error("--table-lr must be > 0"), CM_EINVAL;
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
    if (strcmp(cfg->model, "mlp") != 0) {
        cm_error("an evaluator task evaluates the mlp model only (this run: --model %s); the "
                 "chief evaluates click models at the end of every epoch", cfg->model);
        status = CM_EUNSUPPORTED;
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
        .max_message = cfg->max_message_mb << 20,
        /* Short: the PS going away is how training's end shows here. */
        .connect_timeout_ms = cfg->connect_timeout_ms ? cfg->connect_timeout_ms : 5000,
        .sec = cfg->sec};
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
        /* Below what was asked for: the shards shut down and answered with
         * their last version (training is over). */
        const int final = status == CM_OK && version < want;
        if (final && evaluated && version == result->steps) {
            cm_info("the shards shut down at version %lld, evaluated already: training is over",
                    (long long)version);
            break;
        }
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
        if (final) {
            cm_info("the shards shut down at version %lld: training is over, its final version "
                    "evaluated", (long long)version);
            break;
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
int wk_train_sim_devices(const wk_train_cfg *cfg) {
    if (!wk_train_simulated(cfg)) return 0;
    if (cfg->devices[3] == '\0') return 1;
    char *end;
    long n = strtol(cfg->devices + 4, &end, 10);
    return end == cfg->devices + 4 || *end || n < 1 || n > 64 ? -1 : (int)n;
}

static int open_devices(const wk_train_cfg *cfg, wk_device **devs, int *ndevs, int *on_gpu) {
    const char *spec = cfg->devices ? cfg->devices : "auto";
    char why[512];
    int idx[64], n = 0;
    *ndevs = 0;
    *on_gpu = 0;
    if (wk_train_simulated(cfg)) {
        /* Simulated devices: no wk_device at all (the replicas sleep). */
        int nd = wk_train_sim_devices(cfg);
        if (nd < 1) {
            cm_error("--devices sim:N needs N in 1..64; got '%s'", spec);
            return CM_EINVAL;
        }
        if ((cfg->sim.tflops > 0) == (cfg->sim.step_ms > 0)) {
            cm_error("--devices sim needs one of --sim-tflops X or --sim-step-ms X");
            return CM_EINVAL;
        }
        if (cfg->local_devices > 1) {
            cm_error("--devices sim:N sets the simulated devices; drop --local-devices");
            return CM_EINVAL;
        }
        memset(devs, 0, (size_t)nd * sizeof *devs);
        *ndevs = nd;
        return CM_OK;
    }
    if (cfg->sim.tflops > 0 || cfg->sim.step_ms > 0 || cfg->sim.intra_gbps > 0 ||
        cfg->sim.jitter > 0) {
        cm_error("--sim-tflops, --sim-step-ms, --sim-intra-gbps and --sim-jitter go with "
                 "--devices sim");
        return CM_EINVAL;
    }
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

int wk_train_model_create(const wk_train_cfg *cfg, cm_model **out) {
    const char *kind = cfg->model ? cfg->model : "mlp";
    int rc = CM_EINVAL;
    if (!strcmp(kind, "mlp")) {
        if ((rc = cm_model_create_mlp(cfg->sizes, cfg->nsizes, out)) != CM_OK)
            cm_error("bad layer sizes");
        return rc;
    }
    cm_ctr_spec sp = {.nfields = WK_CRITEO_NFIELDS, .emb_dim = cfg->emb_dim,
                      .nhidden = cfg->nhidden};
    memcpy(sp.hidden, cfg->hidden, sizeof sp.hidden);
    if (!strcmp(kind, "deepfm"))
        rc = cm_model_create_deepfm(&sp, out);
    else if (!strcmp(kind, "lr"))
        rc = cm_model_create_lr(&sp, out);
    else
        cm_error("unknown model %s (mlp, deepfm or lr)", kind);
    if (rc != CM_OK && (!strcmp(kind, "deepfm") || !strcmp(kind, "lr")))
        cm_error("bad %s sizes (--emb-dim %d, %d hidden layers)", kind, cfg->emb_dim,
                 cfg->nhidden);
    return rc;
}

/* ------------------------------------------------------------ one run
 *
 * wk_train_run in named steps, each logging its own errors:
 *   open_devices -> load_data -> open_sync -> begin_training -> train_loop
 *   -> finish_training, then cleanup. The state they share is a 'run'. */

typedef struct run {
    const wk_train_cfg *cfg;
    wk_train_result *result;
    int is_ps, is_ar, dist, W, rank, is_chief, nps;
    size_t B; /* Global batch. */
    /* Data: images, or click logs. */
    wk_dataset train, test;
    wk_ctrdata ctr;
    cm_model *model;
    int sparse;  /* The model reads embedding rows. */
    int row_dim;
    wk_device *devs[64];
    int D, on_gpu, threads;
    wk_replicas *reps;
    wk_prefetch_cfg pcfg;
    wk_prefetch *pf;
    wk_sync *sync;
    float *params, *grad;
    /* Sparse models: row values of the current and the next batch, and
     * the current batch's row gradients. */
    float *vals[2], *row_grad;
    float lr;
    ps_optim_cfg opt, table_opt;
    int64_t spe, total, first_step;
    int slice;     /* This worker's examples of each global batch... */
    int max_slice; /* ...at most (an elastic ring that lost ranks: more). */
    float grad_scale;
    FILE *log;
    const char **ar_addrs;
    int began;
    /* Sparse models: rows fetched for training, and steps counted. */
    double rows_pulled;
    int64_t sparse_steps;
} run;

/* Devices, BLAS threads and the optimizers' settings. */
static int setup_compute(run *r) {
    const wk_train_cfg *cfg = r->cfg;
    int status = open_devices(cfg, r->devs, &r->D, &r->on_gpu);
    if (status != CM_OK) return status;
    if (r->D > cfg->batch_size) {
        cm_error("%d devices exceed the batch of %d examples per worker", r->D, cfg->batch_size);
        return CM_EINVAL;
    }
    /* Adam on a click model's DNN: slower than on the MLP, so that it
     * corrects the factorization machine rather than overfit the rows it
     * reads (measured: docs/bench-log.md, "DeepFM"). */
    int ctr = cfg->model && strcmp(cfg->model, "mlp") != 0;
    r->lr = cfg->lr > 0.0f ? cfg->lr
            : cfg->optimizer == PS_OPTIM_ADAM ? (ctr ? 1e-4f : 1e-3f)
                                              : 0.05f;
    r->opt = ps_optim_defaults(cfg->optimizer, r->lr);
    r->table_opt = ps_optim_defaults(cfg->table_optimizer, cfg->table_lr);
    r->threads = cfg->threads > 0 ? cfg->threads
                                  : (r->D == 1 && !r->dist ? (int)sysconf(_SC_NPROCESSORS_ONLN) : 1);
    wk_device_cpu_set_threads(r->threads);
    return CM_OK;
}

/* The model, the data it trains on, and the schedule (steps per epoch,
 * total steps, this worker's slice of every batch). */
static int load_data(run *r) {
    const wk_train_cfg *cfg = r->cfg;
    char err[512];
    int status = wk_train_model_create(cfg, &r->model);
    if (status != CM_OK) return status;
    r->sparse = wk_model_is_sparse(r->model);
    r->row_dim = wk_model_row_dim(r->model);
    double t_load = cm_now();
    size_t n_train, n_test;
    const char *dir;
    if (r->sparse) {
        dir = cfg->data_dir ? cfg->data_dir : wk_ctrdata_default_dir();
        wk_criteo_opts co = {.max_bad_lines = cfg->max_bad_lines};
        if ((status = wk_ctrdata_load(dir, cfg->train_limit, cfg->test_limit, &co, &r->ctr, err,
                                      sizeof err)) != CM_OK) {
            cm_error("%s", err);
            return status;
        }
        n_train = r->ctr.n_train;
        n_test = r->ctr.n_test;
        r->result->bayes_auc = r->ctr.bayes_auc;
    } else {
        dir = cfg->data_dir ? cfg->data_dir : wk_dataset_default_dir();
        if ((status = wk_dataset_load(dir, "train", cfg->train_limit, &r->train, err,
                                      sizeof err)) != CM_OK ||
            (status = wk_dataset_load(dir, "t10k", cfg->test_limit, &r->test, err,
                                      sizeof err)) != CM_OK) {
            cm_error("%s", err);
            return status;
        }
        const cm_model *m = r->model;
        if (r->train.dim != (size_t)m->sizes[0] || r->test.dim != r->train.dim ||
            r->train.nclasses > m->sizes[m->nsizes - 1] ||
            r->test.nclasses > m->sizes[m->nsizes - 1]) {
            cm_error("data (%zu inputs, %d classes) does not fit the model (%d inputs, %d "
                     "classes)",
                     r->train.dim, r->train.nclasses, m->sizes[0], m->sizes[m->nsizes - 1]);
            return CM_EINVAL;
        }
        n_train = r->train.n;
        n_test = r->test.n;
    }
    r->spe = (int64_t)wk_order_steps_per_epoch(n_train, r->B);
    if (r->spe == 0) {
        cm_error("the global batch (%zu = %d workers x %d) exceeds the %zu training examples",
                 r->B, r->W, cfg->batch_size, n_train);
        return CM_EINVAL;
    }
    r->total = r->spe * cfg->epochs;
    if (cfg->max_steps > 0 && cfg->max_steps < r->total) r->total = cfg->max_steps;
    cm_info("loaded %zu training and %zu test examples from %s in %.2f s%s", n_train, n_test, dir,
            cm_now() - t_load, r->sparse ? " (training lines counted; they stream)" : "");
    if (r->sparse && (r->ctr.bad_train || r->ctr.bad_test))
        cm_warn("skipped %llu bad training and %llu bad test lines",
                (unsigned long long)r->ctr.bad_train, (unsigned long long)r->ctr.bad_test);
    size_t lo, hi;
    wk_order_slice(r->B, r->rank, r->W, &lo, &hi);
    r->slice = (int)(hi - lo); /* Set again, with grad_scale, by apply_membership. */
    r->max_slice = r->slice;
    if (r->is_ar && cfg->min_workers > 0 && cfg->min_workers < r->W) {
        wk_order_slice(r->B, 0, cfg->min_workers, &lo, &hi); /* Rank 0's is the largest. */
        r->max_slice = (int)(hi - lo);
    }
    size_t numel = r->model->numel;
    r->params = cm_alloc_aligned((numel ? numel : 1) * sizeof(float));
    r->grad = cm_alloc_aligned((numel ? numel : 1) * sizeof(float));
    if (!r->params || !r->grad) return CM_ENOMEM;
    if (r->sparse) {
        size_t nv = (size_t)(r->max_slice ? r->max_slice : 1) * (size_t)r->model->nfields *
                    (size_t)r->row_dim;
        r->vals[0] = cm_alloc_aligned(nv * sizeof(float));
        r->vals[1] = cm_alloc_aligned(nv * sizeof(float));
        r->row_grad = cm_alloc_aligned(nv * sizeof(float));
        if (!r->vals[0] || !r->vals[1] || !r->row_grad) return CM_ENOMEM;
    }
    return CM_OK;
}

/* The mode: local, PS or allreduce. */
static int open_sync(run *r, const float *init_values) {
    const wk_train_cfg *cfg = r->cfg;
    char err[512];
    int status;
    int fault = cfg->fault_zero_gradient && (cfg->fault_rank < 0 || cfg->fault_rank == r->rank);
    if (r->is_ps || r->is_ar) { /* Every rank's address: the ring's peers, or named in errors. */
        r->ar_addrs = cm_calloc((size_t)r->W, sizeof *r->ar_addrs);
        for (int k = 0; k < r->W; k++) r->ar_addrs[k] = cm_cluster_trainer_addr(cfg->cluster, k);
    }
    if (r->is_ps) {
        wk_sync_ps_cfg pc = {
            .model = r->model,
            .min_part_bytes = cfg->min_part_bytes ? cfg->min_part_bytes
                                                  : CM_PLACEMENT_MIN_PART_BYTES,
            .ps_addrs = (const char *const *)cfg->cluster->addrs[CM_TASK_PS],
            .nps = r->nps,
            .rank = r->rank,
            .nworkers = r->W,
            .is_chief = r->is_chief,
            .optim = r->opt,
            .table_optim = r->table_opt,
            .seed = cfg->seed,
            .async = cfg->async,
            .deadline_ms = cfg->deadline_ms ? cfg->deadline_ms : 60000,
            .max_message = cfg->max_message_mb << 20,
            .connect_timeout_ms = cfg->connect_timeout_ms ? cfg->connect_timeout_ms : 30000,
            .separate_pull = cfg->separate_pull,
            .overlap = !cfg->no_overlap && !cfg->async && !cfg->separate_pull && !r->sparse,
            .no_pipeline = cfg->no_pipeline,
            .wire_bf16 = cfg->wire_bf16,
            .call_bytes = cfg->call_bytes,
            .call_window = cfg->call_window,
            .spin_us = cfg->client_spin_us,
            .unary_calls = cfg->unary_calls,
            .poll_spin_us = cfg->poll_spin_us,
            .fault_zero_gradient = fault,
            .global_batch = (unsigned)r->B,
            .steps_per_epoch = (uint64_t)r->spe,
            .recovery_timeout_ms = cfg->recovery_timeout_ms,
            .init_values = init_values,
            .sec = cfg->sec,
            .worker_addrs = r->ar_addrs,
            .backup_ms = !cfg->backup_sync       ? 0
                         : cfg->worker_timeout_ms ? cfg->worker_timeout_ms
                                                  : 10000,
            .end_wait_ms = cfg->worker_timeout_ms};
        if ((status = wk_sync_ps_create(&pc, &r->sync, err, sizeof err)) != CM_OK) {
            cm_error("%s", err);
            return status;
        }
    } else if (r->is_ar) {
        if (cfg->min_workers > r->W) {
            cm_error("--min-workers %d exceeds the %d workers of the cluster", cfg->min_workers,
                     r->W);
            return CM_EINVAL;
        }
        wk_sync_ar_cfg ac = {.model = r->model,
                             .worker_addrs = r->ar_addrs,
                             .rank = r->rank,
                             .nworkers = r->W,
                             .is_chief = r->is_chief,
                             .optim = r->opt,
                             .table_optim = r->table_opt,
                             .seed = cfg->seed,
                             .global_batch = (unsigned)r->B,
                             .timeout_ms = cfg->deadline_ms,
                             .connect_timeout_ms = cfg->connect_timeout_ms,
                             .fault_zero_gradient = fault,
                             .init_values = init_values,
                             .checkpoint_dir = cfg->checkpoint_dir,
                             .checkpoint_every = cfg->checkpoint_every,
                             .gpu = r->on_gpu && !cfg->no_nccl ? r->devs[0] : NULL,
                             .sec = cfg->sec,
                             .min_workers = cfg->min_workers,
                             .worker_timeout_ms = cfg->worker_timeout_ms,
                             .ring_transport = cfg->ring_transport,
                             .ring_algorithm = cfg->ring_algorithm};
        if ((status = wk_sync_allreduce_create(&ac, &r->sync, err, sizeof err)) != CM_OK) {
            cm_error("%s", err);
            return status;
        }
    } else {
        r->sync = wk_sync_local_create(r->model, &r->opt, &r->table_opt, r->cfg->seed);
    }
    return CM_OK;
}

static void log_start(const run *r) {
    const wk_train_cfg *cfg = r->cfg;
    char simdev[96];
    if (wk_train_simulated(cfg))
        snprintf(simdev, sizeof simdev, "simulated (%g %s)",
                 cfg->sim.tflops > 0 ? cfg->sim.tflops : cfg->sim.step_ms,
                 cfg->sim.tflops > 0 ? "TFLOPS" : "ms a step");
    const char *dev = wk_train_simulated(cfg) ? simdev
                      : r->on_gpu ? (cfg->precision == WK_PRECISION_BF16 ? "gpu (bf16)" : "gpu")
                                  : "cpu";
    char what[256];
    if (r->sparse)
        snprintf(what, sizeof what, "%s (%d tables of %d floats a row, %zu dense parameters; "
                 "tables: %s lr %g)", r->model->kind, r->model->ntables, r->row_dim,
                 r->model->numel, ps_optim_name(r->table_opt.kind), (double)r->table_opt.lr);
    else
        snprintf(what, sizeof what, "%zu parameters", r->model->numel);
    const char *th = r->threads == 1 ? "" : "s", *blas = wk_device_cpu_gemm_name();
    if (r->is_ar)
        cm_info("training allreduce: rank %d of %d workers%s, %s, %s lr %g, batch %d per "
                "worker (%zu global), %d BLAS thread%s (%s), %lld steps",
                r->rank, r->W, r->is_chief ? " (chief)" : "", what, ps_optim_name(r->opt.kind),
                (double)r->lr, cfg->batch_size, r->B, r->threads, th, blas, (long long)r->total);
    else if (r->is_ps)
        cm_info("training %s (%s%s): rank %d of %d workers%s, %d PS, %s, %s lr %g, batch %d "
                "per worker (%zu global) on %d %s device%s, %d BLAS thread%s (%s), %lld steps",
                cfg->mode, cfg->async ? "async" : cfg->backup_sync ? "backup sync" : "sync",
                cfg->wire_bf16 ? ", bf16 gradients on the wire" : "", r->rank, r->W,
                r->is_chief ? " (chief)" : "", r->nps, what, ps_optim_name(r->opt.kind),
                (double)r->lr, cfg->batch_size, r->B, r->D, dev, r->D == 1 ? "" : "s",
                r->threads, th, blas, (long long)r->total);
    else
        cm_info("training %s: %s, %s lr %g, batch %d on %d %s replica%s, %d BLAS thread%s "
                "(%s), %lld steps (%lld per epoch)",
                cfg->mode, what, ps_optim_name(r->opt.kind), (double)r->lr, cfg->batch_size,
                r->D, dev, r->D == 1 ? "" : "s", r->threads, th, blas, (long long)r->total,
                (long long)r->spe);
}

/* Collective mode: split each global batch by the current ring (an
 * elastic ring may have formed without a dead rank): this worker's place
 * and the ring's size go to the reader thread's config. */
static int apply_membership(run *r) {
    int pos = r->sync->nmembers ? r->sync->member : r->rank;
    int n = r->sync->nmembers ? r->sync->nmembers : r->W;
    size_t lo, hi;
    wk_order_slice(r->B, pos, n, &lo, &hi);
    if ((int)(hi - lo) > r->max_slice) {
        cm_error("a ring of %d workers gives this one %zu examples a step, more than the %d "
                 "it was sized for (--min-workers)", n, hi - lo, r->max_slice);
        return CM_EINVAL;
    }
    if (n != r->W)
        cm_warn("training on in a ring of %d of %d workers: this one takes %zu of every %zu "
                "examples (place %d)", n, r->W, hi - lo, r->B, pos);
    r->slice = (int)(hi - lo);
    /* Pushed gradients are means over each worker's slice; weighting them by
     * slice size keeps the plain average (PS or ring) equal to the global
     * batch's mean gradient when B is not a multiple of the workers. */
    r->grad_scale = (float)((double)r->slice * n / (double)r->B);
    r->pcfg.rank = pos;
    r->pcfg.nranks = n;
    return CM_OK;
}

/* Initial parameters (the mode's begin), the replicas, the reader thread
 * and the step log. */
static int begin_training(run *r, const float *init_values) {
    const wk_train_cfg *cfg = r->cfg;
    int status;
    if ((status = r->sync->ops->begin(r->sync, r->params, &r->first_step)) != CM_OK) {
        if (status == CM_ESHUTDOWN && r->is_ar) { /* A replacement that came too late. */
            cm_warn("%s: nothing left to do", r->sync->err);
            r->result->run_ended = 1;
            return status;
        }
        cm_error("cannot get the initial parameters: %s", r->sync->err);
        return status;
    }
    if (r->first_step > r->total) {
        cm_error("the checkpoint is at step %lld, past the %lld steps of this run: nothing to "
                 "do (start on fresh checkpoint directories for a new run)",
                 (long long)r->first_step, (long long)r->total);
        return CM_EINVAL;
    }
    if (r->first_step == r->total) /* E.g. a chief started again after its last step. */
        cm_warn("the run is already at its last step (%lld): nothing to train%s",
                (long long)r->total, r->is_chief ? "; evaluating the final parameters" : "");
    r->began = 1;
    size_t numel = r->model->numel;
    if (init_values && !r->dist) memcpy(r->params, init_values, numel * sizeof(float));
    if (r->is_chief && cfg->init_out &&
        (status = write_params(cfg->init_out, r->params, numel)) != CM_OK)
        return status;
    if ((status = apply_membership(r)) != CM_OK) return status;
    int pos = r->pcfg.rank, npos = r->pcfg.nranks;
    if (wk_train_simulated(cfg)) {
        wk_sim_cfg sc = {.tflops = cfg->sim.tflops, .step_ms = cfg->sim.step_ms,
                         .intra_gbps = cfg->sim.intra_gbps, .seed = cfg->seed,
                         .jitter = cfg->sim.jitter, .stream = (uint64_t)pos};
        status = wk_replicas_create_sim(r->model, &sc, r->D, r->max_slice, &r->reps);
        if (status != CM_OK) return status;
    } else if ((status = wk_replicas_create(r->model, r->devs, r->D, r->max_slice, &r->reps)) !=
               CM_OK) {
        return status;
    }
    if ((status = wk_replicas_set_params(r->reps, r->params)) != CM_OK) return status;
    r->pcfg = (wk_prefetch_cfg){.data = r->sparse ? NULL : &r->train,
                                .ctr = r->sparse ? &r->ctr : NULL,
                                .field_table = r->model->field_table,
                                .ntables = r->model->ntables,
                                .seed = cfg->seed,
                                .global_batch = r->B,
                                .rank = pos,
                                .nranks = npos,
                                .first_step = r->first_step,
                                .nsteps = r->total - r->first_step,
                                .depth = 4,
                                .on_demand = cfg->no_prefetch,
                                .input_delay_s = cfg->sim_input_s};
    if ((status = wk_prefetch_start(&r->pcfg, &r->pf)) != CM_OK) return status;
    if (cfg->log_path && !(r->log = fopen(cfg->log_path, "w"))) {
        cm_error("cannot open --log %s: %s", cfg->log_path, strerror(errno));
        return CM_EIO;
    }
    /* A line a step, as it happens: for whoever follows the file (the
     * launcher's chaos option kills at a step it reads there). */
    if (r->log) setvbuf(r->log, NULL, _IOLBF, 0);
    log_start(r);
    return CM_OK;
}

/* ------------------------------------------------------------ evaluation */

typedef struct eval_result {
    double accuracy, loss, auc;
} eval_result;

/* Click models: AUC, logloss and accuracy over the test set, whose rows
 * are read (never created) as of version 'version'. */
static int evaluate_ctr(run *r, int64_t version, eval_result *out) {
    const size_t F = WK_CRITEO_NFIELDS, n = r->ctr.n_test;
    size_t chunk = (size_t)wk_replicas_eval_max(r->reps);
    wk_rowset keys;
    float *vals = cm_alloc_aligned(chunk * F * (size_t)r->row_dim * sizeof(float));
    float *probs = cm_alloc_aligned(n * sizeof(float));
    int status = wk_rowset_init(&keys, chunk, (int)F, r->model->ntables);
    if (!vals || !probs) status = CM_ENOMEM;
    double loss = 0.0;
    int64_t right = 0;
    for (size_t at = 0; at < n && status == CM_OK; at += chunk) {
        size_t m = n - at < chunk ? n - at : chunk;
        const uint64_t *ids = r->ctr.test_ids + at * F;
        wk_rowset_build(&keys, ids, m, r->model->field_table);
        if ((status = r->sync->ops->rows(r->sync, version, &keys, vals, 0)) != CM_OK) {
            if (status != CM_EABORTED) /* A rollback: the caller recovers. */
                cm_error("evaluation: cannot read the test set's rows: %s", r->sync->err);
            break;
        }
        wk_rows_in sp = {.inv = keys.inv, .rows = vals, .nrows = keys.nuniq};
        status = wk_replicas_evaluate_batch(r->reps, NULL, r->ctr.test_labels + at, (int)m, &sp,
                                            &loss, &right, probs + at);
    }
    if (status == CM_OK) {
        out->auc = cm_auc(probs, r->ctr.test_labels, n);
        out->loss = loss / (double)n;
        out->accuracy = (double)right / (double)n;
    }
    wk_rowset_free(&keys);
    free(vals);
    free(probs);
    return status;
}

/* The chief's evaluation of the parameters of version 'version'. */
static int evaluate(run *r, int64_t version, eval_result *out) {
    out->auc = NAN;
    int status;
    if (r->sync->ops->settle && (status = r->sync->ops->settle(r->sync)) != CM_OK) {
        if (status != CM_EABORTED) /* A rollback: the caller recovers. */
            cm_error("step %lld: %s", (long long)version, r->sync->err);
        return status;
    }
    if ((status = wk_replicas_set_params(r->reps, r->params)) != CM_OK) return status;
    if (r->sparse) return evaluate_ctr(r, version, out);
    return wk_replicas_evaluate(r->reps, &r->test, &out->accuracy, &out->loss);
}

static void report_eval(const run *r, int64_t epoch, double train_loss, double train_acc,
                        const eval_result *e) {
    if (r->cfg->progress_every < 0) return;
    if (r->sparse) {
        char bayes[64] = "";
        if (!isnan(r->ctr.bayes_auc))
            snprintf(bayes, sizeof bayes, " (Bayes optimum %.4f)", r->ctr.bayes_auc);
        cm_info("epoch %lld/%d done: train logloss %.4f | test auc %.4f%s logloss %.4f acc %.4f",
                (long long)epoch + 1, r->cfg->epochs, train_loss, e->auc, bayes, e->loss,
                e->accuracy);
    } else {
        cm_info("epoch %lld/%d done: train loss %.4f acc %.4f | test loss %.4f acc %.4f",
                (long long)epoch + 1, r->cfg->epochs, train_loss, train_acc, e->loss,
                e->accuracy);
    }
}

static void keep_eval(run *r, const eval_result *e) {
    r->result->test_accuracy = e->accuracy;
    r->result->test_loss = e->loss;
    r->result->test_auc = e->auc;
}

/* ------------------------------------------------------------ the loop */

/* Sparse models: the rows of batch b for version 'version' into vals. */
static int fetch_rows(run *r, const wk_batch *b, int64_t version, float *vals) {
    int status = r->sync->ops->rows(r->sync, version, &b->rows, vals, 1);
    if (status == CM_OK) r->rows_pulled += (double)b->rows.nuniq;
    return status;
}

static int next_batch(run *r, int64_t step, wk_batch **b) {
    int status = wk_prefetch_next(r->pf, b);
    if (status != CM_OK) {
        const char *why = wk_prefetch_error(r->pf);
        cm_error("input pipeline ended early at step %lld: %s", (long long)step,
                 *why ? why : cm_strerror(status));
    }
    return status;
}

/* After a rollback: the reader thread again from 'resume'. */
static int restart_input(run *r, int64_t resume) {
    wk_prefetch_stop(r->pf);
    r->pf = NULL;
    r->pcfg.first_step = resume;
    r->pcfg.nsteps = r->total - resume;
    int status = wk_prefetch_start(&r->pcfg, &r->pf);
    if (status == CM_OK) status = wk_replicas_set_params(r->reps, r->params);
    return status;
}

/* After CM_EABORTED at 'step': agree with the cluster on where to resume
 * (*resume, with r->params its parameters) and restart the input there. */
static int recover(run *r, int64_t step, int from_sync, int64_t *resume) {
    int status;
    *resume = step;
    if ((status = r->sync->ops->recover(r->sync, step, resume, r->params)) != CM_OK) {
        cm_error("step %lld: recovery failed: %s", (long long)step, r->sync->err);
        return status;
    }
    if ((status = apply_membership(r)) != CM_OK) return status;
    if (r->is_ar)
        cm_warn("step %lld: the ring formed again (%s); resuming at step %lld", (long long)step,
                r->sync->err, (long long)*resume);
    else if (*resume > step)
        cm_warn("step %lld: %s", (long long)step, r->sync->err);
    else
        cm_warn("step %lld: the cluster rolled back%s; resuming at step %lld (%lld step%s "
                "redone)", (long long)step,
                from_sync ? " (seen by the forward pass, waiting for the parameters)" : "",
                (long long)*resume, (long long)(step - *resume), step - *resume == 1 ? "" : "s");
    r->result->rollbacks++;
    if (step > *resume) r->result->steps_redone += step - *resume;
    r->result->versions_lost = r->sync->versions_lost;
    return restart_input(r, *resume);
}

static int train_loop(run *r) {
    const wk_train_cfg *cfg = r->cfg;
    wk_train_result *result = r->result;
    const size_t numel = r->model->numel;
    double t_start = cm_now(), t_print = t_start;
    double window_loss = 0.0, epoch_loss = 0.0;
    int64_t window_n = 0, epoch_n = 0, epoch_correct = 0;
    int64_t step = r->first_step;
    double eval_seconds = 0.0;
    int64_t warm_steps = r->total / 20 < 50 ? r->total / 20 : 50;
    double t_warm = t_start, eval_warm = 0.0;
    double uniq_sum = 0.0;
    int status;
    /* Sparse models hold the current batch and, during step(), the next
     * one (whose rows the mode may fetch with this step's push). */
    wk_batch *b = NULL, *nb = NULL;
    int cur = 0;
    if (step >= r->total && r->is_chief && !(r->is_ps && cfg->async)) {
        /* Nothing to train (a finished run started again): the final
         * evaluation only (PS async mode has it in finish_training). */
        eval_result e;
        if ((status = evaluate(r, step, &e)) != CM_OK) return status;
        keep_eval(r, &e);
        report_eval(r, (step - 1) / r->spe, NAN, NAN, &e);
    }
    while (step < r->total) {
        double t0 = cm_now();
        if (!b) {
            if ((status = next_batch(r, step, &b)) != CM_OK) return status;
            if (r->sparse && (status = fetch_rows(r, b, step, r->vals[cur])) != CM_OK) {
                if (status != CM_EABORTED || !r->sync->ops->recover) {
                    cm_error("step %lld: cannot read the batch's rows: %s", (long long)step,
                             r->sync->err);
                    return status;
                }
                b = NULL; /* Released by the input's restart. */
                if ((status = recover(r, step, 0, &step)) != CM_OK) return status;
                continue;
            }
        }
        double t1 = cm_now();
        double loss = 0.0;
        int64_t correct = 0;
        wk_phase_times pt = {0};
        /* Overlap: the mode may send parts of the gradient as the backward
         * pass finishes them; it then applies grad_scale itself. */
        const wk_grad_hook *hook = NULL;
        if (r->sync->ops->overlap && wk_replicas_can_hook(r->reps))
            hook = r->sync->ops->overlap(r->sync, step, r->grad, r->params, r->grad_scale);
        wk_replicas_set_hook(r->reps, hook);
        wk_rows_in sp_in = {.inv = b->rows.inv, .rows = r->vals[cur], .nrows = b->rows.nuniq};
        status = wk_replicas_gradient(r->reps, b->x, b->y, (int)b->n, r->sparse ? &sp_in : NULL,
                                      r->grad, r->row_grad, &loss, &correct, &pt);
        int64_t epoch = b->epoch;
        size_t n = b->n;
        /* With hook->need the forward pass waited for the last pieces of
         * this step's parameters (PS mode's pipelined pull): a failure there
         * is the mode's, with its message, and a rollback is recovered from
         * as one seen by step(). */
        int from_sync = hook && hook->need && r->sync->err[0];
        if (status != CM_OK && !(status == CM_EABORTED && from_sync)) {
            cm_error("gradient computation failed at step %lld: %s", (long long)step,
                     from_sync ? r->sync->err : cm_strerror(status));
            return status;
        }
        if (!hook && r->grad_scale != 1.0f)
            for (size_t i = 0; i < numel; i++) r->grad[i] *= r->grad_scale;
        wk_sparse_step sp = {0};
        if (r->sparse) {
            size_t nr = b->rows.nuniq * (size_t)r->row_dim;
            if (r->grad_scale != 1.0f)
                for (size_t i = 0; i < nr; i++) r->row_grad[i] *= r->grad_scale;
            uniq_sum += (double)b->rows.nuniq;
            r->sparse_steps++;
            if (status == CM_OK && step + 1 < r->total &&
                (status = next_batch(r, step + 1, &nb)) != CM_OK)
                return status;
            sp = (wk_sparse_step){.keys = &b->rows, .row_grad = r->row_grad,
                                  .next = nb ? &nb->rows : NULL, .next_values = r->vals[!cur]};
        }
        wk_sync_times st = {0};
        if (status == CM_OK)
            status = r->sync->ops->step(r->sync, step, r->grad, r->params, r->sparse ? &sp : NULL,
                                        &st);
        if (status == CM_OK || !r->sync->ops->recover) {
            wk_prefetch_release(r->pf, b);
            b = NULL;
        }
        if (status == CM_OK && nb) {
            if (sp.next_done)
                r->rows_pulled += (double)nb->rows.nuniq;
            else
                status = fetch_rows(r, nb, step + 1, r->vals[!cur]);
            b = nb;
            nb = NULL;
            cur = !cur;
        }
        if (status == CM_EABORTED && r->sync->ops->recover) {
            /* The cluster rolls back (a PS restarted from its checkpoint):
             * resume where every shard agrees, with the data of that step.
             * Batches still held go with the reader thread. */
            b = nb = NULL;
            if ((status = recover(r, step, from_sync, &step)) != CM_OK) return status;
            continue;
        }
        if (status != CM_OK) {
            cm_error("step %lld failed: %s", (long long)step, r->sync->err);
            return status;
        }
        /* The new parameters reach the replicas: nothing to do on the CPU
         * (they read 'params' in place), an upload (and a broadcast) on
         * GPUs. */
        if ((status = wk_replicas_set_params(r->reps, r->params)) != CM_OK) {
            cm_error("step %lld: cannot copy the parameters to the devices: %s", (long long)step,
                     cm_strerror(status));
            return status;
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
        if (r->log)
            fprintf(r->log,
                    "{\"step\":%lld,\"epoch\":%lld,\"examples\":%zu,\"loss\":%.6f,"
                    "\"data_wait_ms\":%.4f,\"compute_ms\":%.4f,\"local_reduce_ms\":%.4f,"
                    "\"comm_ms\":%.4f,\"push_ms\":%.4f,\"pull_ms\":%.4f,\"apply_ms\":%.4f,"
                    "\"step_ms\":%.4f}\n",
                    (long long)step, (long long)epoch, n, loss / (double)n, (t1 - t0) * 1e3,
                    (pt.compute - st.pull_in_compute) * 1e3, pt.local_reduce * 1e3,
                    (st.push + st.pull) * 1e3, st.push * 1e3, st.pull * 1e3, st.apply * 1e3,
                    (t3 - t0) * 1e3);
        if (cfg->metrics)
            wk_metrics_step(cfg->metrics, (uint64_t)n, t3 - t0, t1 - t0, pt.compute - st.pull_in_compute + pt.local_reduce,
                            st.push + st.pull, st.apply, n ? loss / (double)n : 0.0);
        int epoch_end = step % r->spe == 0 || step == r->total;
        if (epoch_end) {
            double te = cm_now();
            result->final_train_loss = epoch_loss / (double)epoch_n;
            if (r->is_chief && (!cfg->async || step < r->total)) {
                /* In async mode the final evaluation waits for all workers. */
                eval_result e;
                if ((status = evaluate(r, step, &e)) != CM_OK) {
                    /* A PS restarted while the chief evaluated: recover
                     * as from a failed step, and evaluate when the
                     * redone steps reach the epoch's end again. */
                    if (status != CM_EABORTED || !r->sync->ops->recover) return status;
                    eval_seconds += cm_now() - te;
                    epoch_loss = 0.0;
                    epoch_n = epoch_correct = 0;
                    /* The batch held for the next step (a sparse model's,
                     * its rows already fetched) goes with the reader
                     * thread: the loop reads the resume step's afresh. */
                    b = NULL;
                    if ((status = recover(r, step, 0, &step)) != CM_OK) return status;
                    continue;
                }
                keep_eval(r, &e);
                report_eval(r, epoch, epoch_loss / (double)epoch_n,
                            (double)epoch_correct / (double)epoch_n, &e);
            }
            eval_seconds += cm_now() - te;
            epoch_loss = 0.0;
            epoch_n = epoch_correct = 0;
        }
        double now = cm_now();
        if (cfg->progress_every >= 0 &&
            (now - t_print >= cfg->progress_every || step == r->total) && window_n > 0) {
            double train_s = now - t_start - eval_seconds;
            double eps = (double)(step - r->first_step) * (double)r->B / train_s;
            char el[32], left[32];
            fmt_duration(now - t_start, el, sizeof el);
            fmt_duration((double)(r->total - step) * (train_s / (double)(step - r->first_step)),
                         left, sizeof left);
            cm_info("step %lld/%lld epoch %lld/%d loss %.4f | %.0f ex/s | elapsed %s left %s",
                    (long long)step, (long long)r->total, (long long)epoch + 1, cfg->epochs,
                    window_loss / (double)window_n, eps, el, left);
            window_loss = 0.0;
            window_n = 0;
            t_print = now;
        }
    }
    if (b) wk_prefetch_release(r->pf, b);
    result->steps = step;
    if (step == r->first_step) return CM_OK; /* Nothing trained: no rates. */
    result->seconds = cm_now() - t_start - eval_seconds;
    result->examples_per_sec = (double)(step - r->first_step) * (double)r->B / result->seconds;
    result->steady_examples_per_sec =
        (double)(step - warm_steps) * (double)r->B /
        (cm_now() - t_warm - (eval_seconds - eval_warm));
    if (r->sparse) {
        result->rows_pulled_per_sec = r->rows_pulled / result->seconds;
        result->unique_ids_per_batch = r->sparse_steps ? uniq_sum / (double)r->sparse_steps : 0;
    }
    return CM_OK;
}

/* --export of a sparse model: its rows, from wherever the mode keeps them. */
static int export_rows(void *ud, int table,
                       int (*emit)(void *, uint64_t, const float *, const float *, int64_t),
                       void *emit_ud) {
    run *r = ud;
    return r->sync->ops->dump_rows(r->sync, table, emit, emit_ud);
}

/* The shards' row counters into the result, and a line when a row budget,
 * admission or expiry is at work. Counters only: a failure is logged, not
 * fatal. */
static void ps_rows_report(run *r) {
    wk_train_result *res = r->result;
    if (r->sync->ops->row_stats(r->sync, &res->ps_stats) != CM_OK) {
        cm_warn("cannot read the PS shards' row counters: %s", r->sync->err);
        return;
    }
    res->ps_stats_valid = 1;
    const ps_client_stats st = res->ps_stats;
    if (!st.rows_budget && !st.rows_not_admitted && !st.rows_expired && !st.ckpt_rows) return;
    const uint64_t asked = st.row_hits + st.row_misses;
    cm_info("PS rows: %llu, %llu in memory (budgets %.1f MiB), %llu in the row stores; %.1f %% "
            "of rows asked for found in memory, %llu evicted, %.1f MiB written; %llu reads "
            "not admitted, %llu rows expired; the last checkpoint wrote %llu rows (%.1f MiB)",
            (unsigned long long)st.rows,
            (unsigned long long)st.rows_resident, (double)st.rows_budget / (1 << 20),
            (unsigned long long)st.rows_on_disk,
            asked ? 100.0 * (double)st.row_hits / (double)asked : 0.0,
            (unsigned long long)st.row_evictions, (double)st.row_bytes_written / (1 << 20),
            (unsigned long long)st.rows_not_admitted, (unsigned long long)st.rows_expired,
            (unsigned long long)st.ckpt_rows, (double)st.ckpt_row_bytes / (1 << 20));
}

/* The final parameters, the async chief's last evaluation, summary,
 * parameters and export. */

/* Test hook, PSTRAIN_TEST_DIE_BEFORE_OUTPUTS=FILE: the chief dies by SIGKILL
 * after its last step, before it writes any output, once (FILE marks it
 * done): what allreduce mode's last barrier must get the run out of. */
static void test_die_before_outputs(void) {
    const char *file = getenv("PSTRAIN_TEST_DIE_BEFORE_OUTPUTS");
    if (!file || access(file, F_OK) == 0) return;
    int fd = open(file, O_CREAT | O_WRONLY, 0600);
    if (fd >= 0) close(fd);
    fprintf(stderr, "test: the chief dies before its outputs\n");
    raise(SIGKILL);
}

/* Test hooks, PSTRAIN_TEST_END_DELAY_MS=N: the chief waits N ms after its
 * last step before it ends the run, so that a test can kill processes
 * there (before the final commit); PSTRAIN_TEST_WORKER_END_DELAY_MS=N: a
 * worker other than the chief does, so that it comes to the run's end
 * after the chief has shut the PS down. */
static void test_end_delay(int chief) {
    const char *v =
        getenv(chief ? "PSTRAIN_TEST_END_DELAY_MS" : "PSTRAIN_TEST_WORKER_END_DELAY_MS");
    long ms = v ? strtol(v, NULL, 10) : 0;
    if (ms <= 0 || ms > 60000) return;
    fprintf(stderr, "test: the %s waits %ld ms before it ends the run\n",
            chief ? "chief" : "worker", ms);
    usleep((useconds_t)ms * 1000);
}

static int finish_training(run *r) {
    const wk_train_cfg *cfg = r->cfg;
    wk_train_result *result = r->result;
    size_t numel = r->model->numel;
    int status;
    result->test_examples = r->sparse ? r->ctr.n_test : r->test.n;
    test_end_delay(r->is_chief);
    while ((status = r->sync->ops->end(r->sync, result->steps, r->params)) != CM_OK) {
        /* A PS restarted after this worker's last step (async: the chief
         * waits for the others'): roll back, and train again from where
         * the checkpoint has this worker. */
        int64_t resume;
        if (status != CM_EABORTED || !r->sync->ops->recover) {
            cm_error("cannot get the final parameters: %s", r->sync->err);
            return status;
        }
        if ((status = recover(r, result->steps, 0, &resume)) != CM_OK) return status;
        if (resume < r->total) {
            r->first_step = resume;
            if ((status = train_loop(r)) != CM_OK) return status;
        }
    }
    result->versions_lost = r->sync->versions_lost; /* The end may count more. */
    result->params_checksum = XXH64(r->params, numel * sizeof(float), 0);
    result->numel = numel;
    if (r->is_chief && r->sparse && r->sync->ops->row_stats) ps_rows_report(r);
    if (r->is_chief && r->is_ps && cfg->async) {
        eval_result e;
        if ((status = evaluate(r, result->steps, &e)) != CM_OK) return status;
        keep_eval(r, &e);
    }
    if (r->is_chief) test_die_before_outputs();
    /* Only the chief reports: in PS mode every worker gets the same flags. */
    if (r->is_chief && cfg->summary_path &&
        (status = write_summary(cfg->summary_path, cfg, r->lr, r->nps, result, r->D,
                                r->on_gpu)) != CM_OK)
        return status;
    if (r->is_chief && cfg->params_out &&
        (status = write_params(cfg->params_out, r->params, numel)) != CM_OK)
        return status;
    if (r->is_chief && cfg->export_path &&
        (status = wk_export_save_run(cfg->export_path, cfg, r->model, r->params, export_rows, r,
                                     result)) != CM_OK)
        return status;
    if (cfg->report) {
        cfg->report(cfg, result);
        fflush(stdout);
        result->reported = 1;
    }
    return CM_OK;
}

static int cleanup(run *r, int status) {
    if (r->sync && r->began) {
        int rc = r->sync->ops->finish(r->sync, status == CM_OK);
        if (rc != CM_OK) {
            cm_error("%s", r->sync->err);
            if (status == CM_OK) status = rc;
        }
    }
    if (r->log && fclose(r->log) != 0 && status == CM_OK) {
        cm_error("error writing --log %s", r->cfg->log_path);
        status = CM_EIO;
    }
    wk_prefetch_stop(r->pf);
    wk_replicas_destroy(r->reps);
    for (int d = 0; d < r->D; d++) wk_device_destroy(r->devs[d]);
    wk_sync_destroy(r->sync);
    free(r->ar_addrs);
    free(r->params);
    free(r->grad);
    free(r->vals[0]);
    free(r->vals[1]);
    free(r->row_grad);
    cm_model_destroy(r->model);
    wk_dataset_free(&r->train);
    wk_dataset_free(&r->test);
    wk_ctrdata_free(&r->ctr);
    return status;
}

int wk_train_eval_tables(const wk_train_cfg *cfg, const cm_model *model, const float *params,
                         const wk_export_table *tables, uint64_t seed,
                         wk_train_result *result) {
    run r = {.cfg = cfg, .result = result, .W = 1, .is_chief = 1, .D = 1};
    char err[512];
    const char *dir = cfg->data_dir ? cfg->data_dir : wk_ctrdata_default_dir();
    wk_criteo_opts co = {.max_bad_lines = cfg->max_bad_lines};
    int status = wk_ctrdata_load_test(dir, cfg->test_limit, &co, &r.ctr, err, sizeof err);
    if (status != CM_OK) {
        cm_error("%s", err);
        return status;
    }
    result->bayes_auc = r.ctr.bayes_auc;
    r.sparse = 1;
    r.row_dim = wk_model_row_dim(model);
    ps_optim_cfg any = ps_optim_defaults(PS_OPTIM_SGD, 1.0f);
    r.sync = wk_sync_local_create(model, &any, &any, seed);
    for (int t = 0; t < model->ntables && status == CM_OK; t++)
        status = wk_sync_local_put_rows(r.sync, t, tables[t].ids, tables[t].values, tables[t].n);
    wk_device_cpu_set_threads(cfg->threads > 0 ? cfg->threads : 1);
    r.devs[0] = wk_device_cpu_create(0);
    r.params = cm_alloc_aligned((model->numel ? model->numel : 1) * sizeof(float));
    if (!r.params) status = CM_ENOMEM;
    if (status == CM_OK) {
        memcpy(r.params, params, model->numel * sizeof(float));
        status = wk_replicas_create(model, r.devs, 1, cfg->batch_size, &r.reps);
    }
    /* The model is the caller's: evaluate with a borrowed one. */
    r.model = (cm_model *)model;
    eval_result e;
    if (status == CM_OK && (status = evaluate(&r, 0, &e)) == CM_OK) {
        keep_eval(&r, &e);
        result->test_examples = r.ctr.n_test;
    }
    r.model = NULL;
    return cleanup(&r, status);
}

int wk_train_run(const wk_train_cfg *cfg, wk_train_result *result) {
    memset(result, 0, sizeof *result);
    if (cfg->eval_only) return wk_export_eval_run(cfg, result);
    int status = check_cfg(cfg);
    if (status != CM_OK) return status;
    result->test_auc = result->bayes_auc = NAN;
    if (!strcmp(cfg->mode, "ps") && cfg->cluster->task_type == CM_TASK_EVALUATOR) {
        result->rank = -1;
        return evaluate_run(cfg, result);
    }
    run r = {.cfg = cfg, .result = result};
    r.is_ps = !strcmp(cfg->mode, "ps");
    r.is_ar = !strcmp(cfg->mode, "allreduce");
    r.dist = r.is_ps || r.is_ar; /* Several worker processes. */
    r.W = r.dist ? cm_cluster_num_trainers(cfg->cluster) : 1;
    r.rank = r.dist ? cm_cluster_rank(cfg->cluster) : 0;
    r.is_chief = r.dist ? cm_cluster_is_chief(cfg->cluster) : 1;
    r.nps = r.is_ps ? cfg->cluster->n[CM_TASK_PS] : 0;
    r.B = (size_t)cfg->batch_size * (size_t)r.W;
    result->is_chief = r.is_chief;
    result->rank = r.rank;
    result->workers = r.W;
    if (cfg->metrics) wk_metrics_set_rank(cfg->metrics, r.rank);
    if ((status = setup_compute(&r)) != CM_OK || (status = load_data(&r)) != CM_OK)
        return cleanup(&r, status);
    /* --init-from: the file's values, staged in grad until the first step. */
    if (cfg->init_from &&
        (status = wk_export_load_init(cfg->init_from, r.model, r.grad)) != CM_OK)
        return cleanup(&r, status);
    const float *init_values = cfg->init_from ? r.grad : NULL;
    if ((status = open_sync(&r, init_values)) == CM_OK &&
        (status = begin_training(&r, init_values)) == CM_OK &&
        (status = train_loop(&r)) == CM_OK)
        status = finish_training(&r);
    return cleanup(&r, status);
}
