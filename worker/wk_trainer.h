/* wk_trainer.h - the training loop: options, the run, and its results.
 * SPDX-License-Identifier: MIT
 *
 * wk_train_run() loads the data, starts the prefetch thread, builds the local
 * replicas, and runs steps of: next batch -> gradients on D replicas ->
 * local reduce -> synchronise (wk_sync: apply here, push/pull to the PS, or
 * ring AllReduce then apply). It starts at the step the mode says (a resumed
 * run), resumes where the cluster rolled back to after a PS restart, prints
 * progress, writes the per-step JSON log and the summary, and evaluates on
 * the test set at the end of every epoch.
 */
#ifndef WK_TRAINER_H
#define WK_TRAINER_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_cluster.h"
#include "common/cm_model.h"
#include "ps/ps_client.h"

struct wk_train_result;

typedef struct wk_train_cfg {
    const char *mode;        /* "local", "ps" or "allreduce". */
    const char *model;       /* "mlp" (default: Fashion-MNIST), "deepfm" or
                              * "lr" (click data in the Criteo format). */
    int emb_dim;             /* deepfm: embedding width k (default 10). */
    int nhidden;             /* deepfm: DNN hidden layers (default 400,400,400). */
    int hidden[CM_MLP_MAX_SIZES];
    int table_optimizer;     /* Row-wise optimizer of the tables (default adagrad). */
    float table_lr;          /* Its learning rate (default 0.3). */
    uint64_t max_bad_lines;  /* Click data: bad lines tolerated (default 1000). */
    int epochs;              /* Passes over the training set (default 10). */
    int batch_size;          /* Examples per step and worker (default 128). */
    float lr;                /* Learning rate (default: 1e-3 adam, 1e-4 adam on
                              * click models, 0.05 otherwise). */
    int optimizer;           /* enum ps_optim_kind (default adam). */
    uint64_t seed;           /* Initialisation and data order (default 1). */
    int threads;             /* BLAS threads; 0 = cores when D = 1, else 1. */
    int local_devices;       /* D CPU replicas (default 1). */
    const char *devices;     /* "auto" (default, NULL too): every usable GPU,
                              * else (or with local_devices > 1) the CPU;
                              * "all": every GPU (an error without one);
                              * "cpu"; or GPU indices "0,1". Test hook:
                              * "staged", local_devices CPU devices used
                              * as GPUs are (wk_device_cpu_staged_create).
                              * "sim" or "sim:N": N (default 1) simulated
                              * devices (wk_sim.h, with sim below). */
    int precision;           /* WK_PRECISION_FP32 (default) or _BF16 (GPUs
                              * only; see wk_device_cuda.h). */
    int nsizes;              /* Layer widths (default 784,256,128,10). */
    int sizes[CM_MLP_MAX_SIZES];
    const char *data_dir;    /* NULL = wk_dataset_default_dir() (images) or
                              * wk_ctrdata_default_dir() (clicks). */
    size_t train_limit;      /* Use only the first N training examples (0 = all). */
    size_t test_limit;       /* Evaluate on the first N test examples (0 = all). */
    int64_t max_steps;       /* Stop after this many steps (0 = all epochs). */
    double progress_every;   /* Seconds between progress lines (default 2; <0 quiet). */
    const char *summary_path; /* JSON summary (NULL = none). */
    const char *log_path;     /* JSON lines, one per step (NULL = none). */
    const char *params_out;   /* Final parameters, raw little-endian float32. */
    const char *init_out;     /* Initial parameters, same format. */
    const char *export_path;  /* The chief's final model, wk_export format. */
    const char *init_from;    /* Start from this wk_export file. */
    int eval_only;            /* Only evaluate init_from on the test set. */
    /* PS mode. */
    const cm_cluster *cluster; /* Borrowed: the cluster and this task. */
    int async;                 /* Apply every push at once (default sync). */
    size_t min_part_bytes;     /* Placement (0 = CM_PLACEMENT_MIN_PART_BYTES). */
    int64_t deadline_ms;       /* Per RPC (0 = 60000). */
    int max_message_mb;        /* gRPC message limit with the PS (0 = 64). */
    int64_t connect_timeout_ms; /* Retrying an unreachable PS (0 = 30000). */
    int fault_zero_gradient;   /* Test hook: push zeros (negative controls)... */
    int fault_rank;            /* ...on this rank only (-1 = every rank). */
    int separate_pull;         /* Push then Pull instead of one PushPull. */
    int no_overlap;            /* Sync PS: push after the backward pass, not
                                * each partition as soon as it is final. */
    int no_pipeline;           /* Sync PS with overlap: wait for the whole
                                * version at the end of each step, not piece
                                * by piece in the next forward pass. */
    int no_nccl;               /* Allreduce on GPUs: the TCP ring, not NCCL. */
    const struct cm_security *sec; /* PS and allreduce modes: the token every
                                    * call carries, the admin token the chief's
                                    * Initialize/Rollback/Shutdown carry, TLS
                                    * (borrowed; NULL: none). */
    long call_bytes;           /* PS mode: a shard's dense calls of more bytes
                                * split (ps_client_cfg.call_bytes; 0 default,
                                * < 0 one call a shard). */
    int call_window;           /* PS mode: of those, a shard's in flight at
                                * once (ps_client_cfg.call_window; 0 default,
                                * < 0 all at once). */
    int client_spin_us;        /* PS mode: ps_client_cfg.spin_us (0: off). */
    int unary_calls;           /* PS mode: ps_client_cfg.unary (1: a gRPC call a request). */
    int poll_spin_us;          /* PS mode: ps_client_cfg.poll_spin_us (0: 50 µs, -1: none). */
    int wire_bf16;             /* PS mode: push gradients as bfloat16 (RNE),
                                * half the bytes; pulls and the PS stay fp32
                                * (--wire-dtype bf16; any device). */
    int64_t eval_every;        /* Evaluator task: versions between evaluations
                                * (0 = 500). */
    int64_t recovery_timeout_ms; /* Waiting for the cluster to agree after a
                                  * PS restart (0 = 120000). */
    /* Allreduce mode: the chief's checkpoints (NULL: none). */
    const char *checkpoint_dir;
    int64_t checkpoint_every;  /* Steps between them (0: only the final one). */
    /* Allreduce mode on CPU rings: after a worker dies, wait this long for
     * its replacement (0 = 60000 ms), then go on without it if at least
     * min_workers are left (0 = every worker: wait only). PS mode, async:
     * how long the chief's final wait for the others' last steps waits
     * while none moves on (0 = 10000 ms). */
    int64_t worker_timeout_ms;
    int min_workers;
    /* Allreduce mode: the CPU ring's transport (WK_RING_TCP, WK_RING_AUTO:
     * shared memory between workers on one host, WK_RING_SHM). */
    int ring_transport;
    int ring_algorithm; /* wk_ring_opts.algorithm */
    /* PS mode, sync: backup sync (--sync backup): the shards close a step
     * after worker_timeout_ms (0 = 10000) with the workers that pushed. */
    int backup_sync;
    /* Scaling experiments: the simulated devices of --devices sim
     * (tflops or step_ms, intra_gbps, jitter: wk_sim.h; the run's seed
     * picks the gradients' pattern), a simulated input cost per batch (s; 0
     * none), and no
     * reading ahead (the step waits for its batch to be gathered). */
    struct {
        double tflops, step_ms, intra_gbps, jitter;
    } sim;
    double sim_input_s;
    int no_prefetch;
    /* pstrain --metrics-listen: every step is added here (NULL: none). */
    struct wk_metrics *metrics;
    /* Called once with the result as soon as the run's outputs are written
     * (summary, --params-out, --export), before the mode lets its cluster go
     * (allreduce: the ring's last barrier, after which a chief killed is not
     * started again); stdout is flushed after it. NULL: none. */
    void (*report)(const struct wk_train_cfg *cfg, const struct wk_train_result *r);
} wk_train_cfg;

/* 1 if cfg asks for simulated devices (--devices sim[:N]). */
static inline int wk_train_simulated(const wk_train_cfg *cfg) {
    return cfg->devices && cfg->devices[0] == 's' && cfg->devices[1] == 'i' &&
           cfg->devices[2] == 'm' && (cfg->devices[3] == '\0' || cfg->devices[3] == ':');
}

/* How many simulated devices --devices sim[:N] asks for: N (1 for "sim"),
 * -1 for an N outside 1..64 or not a number, 0 without sim. */
int wk_train_sim_devices(const wk_train_cfg *cfg);

typedef struct wk_train_result {
    int is_chief;            /* Only the chief evaluates (and evaluator tasks,
                              * whose rank is -1). */
    int rank, workers;
    int64_t steps;
    double seconds;          /* Training loop wall time, evaluation excluded. */
    double examples_per_sec;
    double steady_examples_per_sec; /* Same, without the first warm-up steps
                                     * (5% of the run, at most 50). */
    size_t test_examples;
    double final_train_loss; /* Mean loss over the last epoch's steps. */
    double test_accuracy;
    double test_loss;        /* Mean loss (click models: the logloss). */
    double test_auc;         /* Click models (NaN otherwise). */
    double bayes_auc;        /* Click models: the data's Bayes optimum, when
                              * its metadata says (NaN otherwise). */
    double rows_pulled_per_sec;   /* Sparse models: rows fetched for training. */
    double unique_ids_per_batch;  /* Sparse models: mean unique rows a step. */
    int rollbacks;           /* Times the cluster rolled back (PS restarts). */
    int64_t steps_redone;    /* Steps computed again because of them. */
    int64_t versions_lost;   /* Versions the rollbacks took back (the chief's
                              * count; async: updates lost, not redone: see
                              * wk_sync.versions_lost). */
    size_t numel;             /* Dense parameters. */
    uint64_t params_checksum; /* XXH64 of the final parameters (replicas of
                               * allreduce mode must agree). */
    /* PS mode, the chief, click models: the shards' counters at the end,
     * summed (ps_stats_valid = 1), for their rows: in memory and in their
     * row stores (--memory-mb), admission and expiry. */
    int ps_stats_valid;
    ps_client_stats ps_stats;
    int run_ended;           /* Allreduce: this worker (started again) came
                              * after the run had ended; wk_train_run
                              * returned CM_ESHUTDOWN and nothing is wrong. */
    int reported;            /* cfg->report was called. */
} wk_train_result;

/* Fill *cfg with the defaults above. */
void wk_train_cfg_defaults(wk_train_cfg *cfg);

/* The model cfg describes (cfg->model with its sizes). CM_EINVAL, with a
 * message logged, for an unknown kind or bad sizes. Release with
 * cm_model_destroy(). */
int wk_train_model_create(const wk_train_cfg *cfg, cm_model **out);

/* --eval-only of a model with tables (the file's model, dense params and
 * tables' rows, all borrowed; rows never trained read as their initial
 * values of 'seed'): AUC and logloss on cfg's click data test set. */
struct wk_export_table;
int wk_train_eval_tables(const wk_train_cfg *cfg, const cm_model *model, const float *params,
                         const struct wk_export_table *tables, uint64_t seed,
                         wk_train_result *result);

/* Run training as configured. Returns CM_OK, or an error after logging a
 * message that says what failed (bad option values give CM_EINVAL, a missing
 * or broken data set the reader's code). */
int wk_train_run(const wk_train_cfg *cfg, wk_train_result *result);

#endif /* WK_TRAINER_H */
