/* wk_sync.h - how a worker turns its gradient into the next parameters.
 * SPDX-License-Identifier: MIT
 *
 * The switchable part of the training loop, one implementation per mode:
 *   local      apply the optimizer here (wk_sync_local.c)
 *   ps         push to the PS shards, pull the new version (wk_sync_ps.c)
 * The trainer calls begin() once for the initial parameters, step() once
 * per step with this worker's reduced gradient, end() for the parameters
 * the chief evaluates, and finish() after the evaluation (the chief shuts
 * the PS processes down there). Used by one thread.
 */
#ifndef WK_SYNC_H
#define WK_SYNC_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "ps/ps_optim.h"
#include "worker/input/wk_rowset.h"
#include "worker/model/wk_model.h"

typedef struct wk_sync wk_sync;

typedef struct wk_sync_times {
    double push, pull; /* Seconds in communication (ps mode). */
    double pull_in_compute; /* Of pull: the part spent inside the gradient
                             * computation (the forward pass waiting for
                             * pieces of the parameters, pipelined pull). */
    double apply;      /* Seconds applying the optimizer locally. */
} wk_sync_times;

/* Sparse models: what a step pushes and pulls besides the dense vectors.
 * Row values and gradients are laid out by the rowset: unique row u at
 * u * row_dim (wk_model_row_dim: every table of a sparse model has that
 * dim). */
typedef struct wk_sparse_step {
    const wk_rowset *keys;  /* This step's unique rows... */
    float *row_grad;        /* ...and their gradients (scaled as grad is). */
    const wk_rowset *next;  /* The next step's rows (NULL: unknown, or none):
                             * a mode may fetch their values for version
                             * step + 1 with this step's push... */
    float *next_values;     /* ...into here, */
    int next_done;          /* and then sets this (out) to 1. */
} wk_sparse_step;

struct ps_client_stats;

typedef struct wk_sync_ops {
    const char *name;
    /* Initial parameters into params (model->numel floats), and the step
     * training starts at (0, or where a resumed run stands). */
    int (*begin)(wk_sync *s, float *params, int64_t *first_step);
    /* grad: this worker's gradient for 'step' (may be modified); params:
     * out, the parameters for step + 1. sp: the rows of a sparse model's
     * step (NULL for dense models). */
    int (*step)(wk_sync *s, int64_t step, float *grad, float *params, wk_sparse_step *sp,
                wk_sync_times *t);
    /* Sparse models: the values of the unique rows 'keys' into values
     * (keys->nuniq x row_dim) as of version 'version' (the parameters step
     * 'version' trains with). train = 1: a read for training (missing rows
     * are created); 0: an evaluation read (missing rows read as their
     * initial values and are not created). */
    int (*rows)(wk_sync *s, int64_t version, const wk_rowset *keys, float *values, int train);
    /* Sparse models, after end(): every row of table 'table' that exists
     * (wherever the mode keeps it), one call of fn each with its id and
     * values (slots and count: NULL and 0 where the mode does not have
     * them); fn's error stops it. Export. */
    int (*dump_rows)(wk_sync *s, int table,
                     int (*fn)(void *ud, uint64_t id, const float *values, const float *slots,
                               int64_t count),
                     void *ud);
    /* Final parameters after 'steps' steps of every worker. */
    int (*end)(wk_sync *s, int64_t steps, float *params);
    /* After evaluation; ok = 0 when the run failed. */
    int (*finish)(wk_sync *s, int ok);
    void (*destroy)(wk_sync *s);
    /* Optional (NULL where the mode cannot overlap): called before the
     * gradient of 'step' is computed into grad, with the buffers step()
     * will get. Returns a hook for the backward pass (wk_grad_hook) that
     * sends each part of the gradient as it becomes final, or NULL. With a
     * hook the mode multiplies the gradient by 'scale' itself, part by part
     * (the caller must not), and step() sends what the hook did not, then
     * waits for everything. Parts of params are written by replies before
     * step() returns, so nothing may read params from the first announced
     * part until step() returns (the backward pass does not: see
     * wk_grad_hook). */
    const wk_grad_hook *(*overlap)(wk_sync *s, int64_t step, float *grad, float *params,
                                   float scale);
    /* Optional: after step() failed with CM_EABORTED (the cluster rolls
     * back, e.g. a PS restarted from its checkpoint), agree with the
     * cluster on where training resumes: *resume_step, and params are the
     * parameters for it. Bounded in time; an error ends the run. */
    int (*recover)(wk_sync *s, int64_t failed_step, int64_t *resume_step, float *params);
    /* Optional: make params whole. After a step with an overlap hook, PS
     * mode may leave the first kernel's pieces still arriving for the next
     * gradient's forward pass to wait for (wk_grad_hook.need); anything else
     * that reads params between steps (evaluation) calls this first. */
    int (*settle)(wk_sync *s);
    /* Optional (PS mode): the shards' row counters, summed, after end()
     * and before finish() (which stops the shards). */
    int (*row_stats)(wk_sync *s, struct ps_client_stats *out);
} wk_sync_ops;

struct wk_sync {
    const wk_sync_ops *ops;
    char err[512]; /* Message of the last failure. */
    /* Sync: versions the rollbacks took back, over the run (recover; the
     * chief's count; the steps are redone). Async: the updates lost, which
     * no step redoes (the most any shard counted: pushes a rollback took
     * and no worker pushed again), and the steps of the workers the final
     * wait gave up on. */
    int64_t versions_lost;
    /* Collective mode: this worker's place in the current ring and the
     * ring's size (0: the mode's rank and worker count hold). An elastic
     * ring may form without a dead rank; the trainer then splits each
     * global batch by these (begin and recover set them). */
    int member, nmembers;
};

/* Local mode: the optimizer runs here; a sparse model's tables are kept
 * whole here (ps_rows) and updated with table_opt. */
wk_sync *wk_sync_local_create(const cm_model *m, const ps_optim_cfg *opt,
                              const ps_optim_cfg *table_opt, uint64_t seed);

/* PS mode (see wk_sync_ps.c). */
typedef struct wk_sync_ps_cfg {
    const cm_model *model;
    size_t min_part_bytes;
    const char *const *ps_addrs;
    int nps;
    int rank, nworkers, is_chief;
    ps_optim_cfg optim;
    ps_optim_cfg table_optim; /* Row-wise, for the tables (sparse models). */
    uint64_t seed;
    int async;
    int64_t deadline_ms, connect_timeout_ms;
    int fault_zero_gradient; /* Test hook: push zeros (negative controls). */
    int separate_pull;       /* Push, wait, then Pull (two round trips) instead
                              * of one PushPull call per shard. */
    int overlap;             /* Sync: push each partition as soon as the
                              * backward pass has computed it (the overlap
                              * op), one PushPull per group of partitions. */
    int no_pipeline;         /* With overlap: step() waits for every piece
                              * instead of leaving the first kernel's last
                              * pieces to the next forward pass. */
    int wire_bf16;           /* Push gradients as bfloat16 (ps_client_cfg). */
    long call_bytes;         /* ps_client_cfg.call_bytes. */
    int call_window;         /* ps_client_cfg.call_window. */
    int spin_us;             /* ps_client_cfg.spin_us. */
    int unary_calls;         /* ps_client_cfg.unary. */
    int poll_spin_us;        /* ps_client_cfg.poll_spin_us. */
    int max_message;         /* gRPC message limit in bytes (0: the rpc
                              * default, 64 MiB); the PS must allow as much.
                              * A shard whose parameters do not fit in one
                              * message is refused at create, naming the fix. */
    /* Where the data stands at a step (kept by the shards, so a resumed run
     * must use the same). */
    unsigned global_batch;
    uint64_t steps_per_epoch;
    int64_t recovery_timeout_ms; /* Waiting for the cluster to agree (0 = 120000). */
    const float *init_values; /* The chief: initialise the shards with these
                               * (model->numel floats, copied) instead of
                               * from seed. */
    const struct cm_security *sec; /* Tokens and TLS (borrowed; NULL: none). */
    const char *const *worker_addrs; /* nworkers, by rank (NULL: unknown): named
                                      * when a sync step waits for them. */
    int64_t backup_ms; /* Sync: > 0 is backup sync (--sync backup): the shards
                        * close a step after this long without the workers
                        * that have not pushed; such a worker skips ahead to
                        * the shards' version. */
    int64_t end_wait_ms; /* Async, the chief: how long its final wait for the
                          * other workers' last pushes waits while none of
                          * them moves on (0 = 10000); then it evaluates
                          * without them (a rollback may have taken the last
                          * steps of a worker that had finished). */
} wk_sync_ps_cfg;
int wk_sync_ps_create(const wk_sync_ps_cfg *cfg, wk_sync **out, char *err, size_t errlen);

/* PS mode only: pull version >= min_version into params (an evaluator's
 * read); *version gets the version pulled, which is below min_version when
 * the shards shut down first (training ended: that is its last version). */
int wk_sync_ps_pull(wk_sync *s, int64_t min_version, float *params, int64_t *version);

/* Local mode, before the first step: put rows of table 'table' (n ids, n x
 * dim values) into the tables (--eval-only of an exported model). */
int wk_sync_local_put_rows(wk_sync *s, int table, const uint64_t *ids, const float *values,
                           size_t n);

/* Whole tables kept by the worker (local and collective modes), by
 * rowset: read the rows of 'keys' into values (row u at u * row_dim), and
 * apply their gradients (same layout) with the store's optimizer. */
struct ps_rows;
void wk_rows_read(struct ps_rows *r, const wk_rowset *keys, int row_dim, int train,
                  float *values);
void wk_rows_apply(struct ps_rows *r, const wk_rowset *keys, int row_dim, const float *grads);

static inline void wk_sync_destroy(wk_sync *s) {
    if (s) s->ops->destroy(s);
}

/* Collective mode (see wk_sync_allreduce.c): a ring AllReduce over TCP
 * between the workers (NCCL between their GPUs), the optimizer applied on
 * every replica. */
typedef struct wk_sync_ar_cfg {
    const cm_model *model;
    const char *const *worker_addrs; /* By rank: task addresses; the chief's
                                      * serves the rendezvous. */
    int rank, nworkers, is_chief;
    ps_optim_cfg optim;
    ps_optim_cfg table_optim; /* Row-wise, for the tables (sparse models). */
    uint64_t seed;
    unsigned global_batch;
    int64_t timeout_ms;         /* A peer making no progress (0 = 60000). */
    int64_t connect_timeout_ms; /* Rendezvous and ring set-up (0 = 60000). */
    int fault_zero_gradient;    /* Test hook: reduce zeros (negative controls). */
    const float *init_values;   /* Start from these (copied at begin), else seed. */
    const char *checkpoint_dir; /* The chief's durable store (NULL: none). */
    int64_t checkpoint_every;   /* Steps between checkpoints (0: only at the end). */
    wk_device *gpu;             /* The worker's first CUDA device (borrowed), or
                                 * NULL on CPUs. With a GPU and NCCL in the build,
                                 * the gradient is averaged by one NCCL
                                 * communicator over every worker's GPU
                                 * (wk_nccl_world), not by the TCP ring. */
    const struct cm_security *sec; /* The rendezvous's token and TLS (NULL:
                                    * none). */
    /* Elastic rings (CPU rings, not NCCL): after a rank dies, the
     * survivors wait worker_timeout_ms for its replacement, then go on
     * with the ranks that joined if they are at least min_workers (0 or
     * nworkers: only whole rings, so the run fails naming the missing rank
     * once the wait ran out). */
    int min_workers;
    int64_t worker_timeout_ms;  /* 0 = 60000. */
    /* The CPU ring's transport (wk_ring_opts.transport): WK_RING_AUTO uses
     * shared memory between ranks on one host. */
    int ring_transport;
    /* Its allreduce algorithm (wk_ring_opts.algorithm; WK_RING_ALG_RING
     * is 0, so a zeroed config runs the plain ring). */
    int ring_algorithm;
} wk_sync_ar_cfg;
int wk_sync_allreduce_create(const wk_sync_ar_cfg *cfg, wk_sync **out, char *err,
                             size_t errlen);

#endif /* WK_SYNC_H */
