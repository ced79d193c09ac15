/* ps_shard.h - one PS shard: its partitions, versions and synchronisation.
 * SPDX-License-Identifier: MIT
 *
 * Pure state, no I/O: the server (ps_server.c) decodes requests and calls
 * in here; tests drive it directly. Thread-safe: every function may be
 * called from any thread.
 *
 * Versions. After init the shard is at version 0 (the initial values). In
 * sync mode, step t's gradients are expected at version t. A push carries
 * any non-empty subset of the shard's partitions; once all W workers have
 * given partition i for step t, their gradients for it are averaged (or
 * summed) and the optimizer writes that partition of version t + 1 at once
 * (a partition reply can be sent then); when every partition is done the
 * version becomes t + 1. In async mode every push is applied at once (its
 * partitions; the others are unchanged) and bumps the version, once a
 * step: a step pushed in several calls that say so (ps_shard_push_step's
 * step_parts) bumps it with the call that completes it, and a pull
 * between its calls sees it partly applied (as it sees other workers'
 * pushes between them).
 * A gradient comes as float32 or bfloat16 (ps_grad.dtype), each widened to
 * float32 as it arrives, so workers of one step may mix them; the sums, the
 * optimizer and the snapshots are float32.
 *
 * Pushes in sync mode, from worker w for step t at version v:
 *   t == v, some partition new    accepted: the new partitions are counted,
 *                                 ones w already gave for t are not
 *   t == v, no partition new      duplicate: OK, not counted again
 *   t <  v, t == w's last push    duplicate (a retry after a lost reply): OK
 *   t <  v otherwise              stale: refused, counted
 *   t >  v                        early: refused, counted
 * In async mode a push is applied at once unless it is a retry (duplicate):
 * its step is below the worker's last one, or equal to it and the push
 * carries a partition that step already gave, rows, or nothing (one step
 * may come in several calls of other partitions). Steps below 0 are invalid, and so,
 * in async mode, is a step more than max_step_ahead (ps_shard_set_max_step_
 * ahead, default PS_SHARD_MAX_STEP_AHEAD) above the worker's last step, or,
 * for its first push since init, restore or rollback, above both the
 * shard's version and the highest step the shard has accepted from anyone
 * since it was created: one bogus step cannot make every later push of its
 * worker a "duplicate".
 *
 * Values a client controls. A pushed gradient with a NaN or an infinity
 * (float32 or bfloat16, dense or rows) is refused (PS_PUSH_INVALID, naming
 * the partition or table and the first bad element; the shard unchanged)
 * and counted in nonfinite_pushes (and bad_requests). With skip_nonfinite
 * set (ps_shard_set_skip_nonfinite) such a push is dropped instead and
 * answered OK, counted in nonfinite_pushes: in async mode nothing of it is
 * applied (its step counts as the worker's last, so a retry is a
 * duplicate); in sync mode the step must still close, so it stands for the
 * worker's contribution with a zero gradient (its partitions add zeros, its
 * rows none). Optimizer settings are checked at init and restore (finite;
 * lr > 0 except for add; momentum in [0, 1); Adam's betas in (0, 1);
 * epsilon > 0 for Adam and Adagrad; Adagrad's initial accumulator >= 0),
 * and num_workers is 1 to PS_SHARD_MAX_WORKERS.
 * Memory: the state a config needs (parameters and the next version's
 * buffer, accumulator, optimizer slots, the per-worker staging of sync
 * mode, per-worker bookkeeping) is computed before anything is allocated
 * and refused (CM_ENOMEM, with the sizes) beyond the shard's memory limit
 * (ps_shard_set_memory_limit; default ps_shard_default_memory_limit()).
 * Rows (the row store, sync staging, the accumulator) grow with pushes: a
 * push whose rows could take the total beyond the limit is refused
 * (PS_PUSH_NOMEM), and a training read then reads missing rows as their
 * initial values without creating them (the same values). Snapshots still
 * referenced by replies being sent are not counted.
 * Pulls: answered with the newest snapshot once version >= min_version.
 * Partition pulls (ps_shard_pull_parts): answered as soon as the given
 * partitions of version step + 1 are final, possibly before the version is
 * published (the reply then references the snapshot being built; only the
 * asked partitions of it may be read).
 * A snapshot is a copy of all the shard's partitions at one version whose
 * partitions are each written once (all before it is published, or one by
 * one while it is pending) and never again while anyone but the shard holds
 * a reference (an async push writes the next version into the current
 * snapshot itself when the shard holds the only one); replies reference it
 * (zero-copy) and release it when sent, so a reply never reads values being
 * written. Snapshot buffers are recycled.
 *
 * Embedding rows (a model with tables). The shard keeps the rows placed on
 * it (cm_row_shard) in a ps_rows store; a row is created when it is first
 * read for training (a pull with train set) or updated. A push may carry
 * row gradients (ps_row_grad: a table's ids and their gradients, float32
 * or bfloat16; a repeated id is summed); rows_final says the worker's rows
 * of that step are all there. In sync mode a worker's rows of a step come
 * in one push with rows_final (rows without it are refused), staged; the
 * step closes once every worker sent rows_final and every partition is
 * done: then the staged gradients are summed per row in rank order (so the
 * result does not depend on arrival order), scaled by 1 / W in mean mode
 * (as dense gradients are), and each touched row gets one step of the
 * tables' row-wise optimizer (with its own step count); only then does
 * the version become t + 1. A dense-only push of such a model counts for
 * its partitions only. Async mode applies a push's rows at once. Rows are
 * read for a pull (ps_shard_pull_rows) under the shard's lock when the pull
 * is answered: the rows as of the version answered; train = 0 reads a
 * missing row as its initial values without creating it.
 */
#ifndef PS_SHARD_H
#define PS_SHARD_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "ps/ps_optim.h"
#include "ps/ps_rows.h"

typedef struct ps_shard ps_shard;

enum ps_sync_mode { PS_SYNC = 1, PS_ASYNC = 2 };
enum ps_aggregate { PS_AGG_MEAN = 0, PS_AGG_SUM = 1 };

typedef struct ps_shard_config {
    ps_optim_cfg optim;
    uint64_t seed;
    int num_workers;
    int sync;      /* enum ps_sync_mode */
    int aggregate; /* enum ps_aggregate */
    int zero_init; /* Start at zeros instead of cm_var_init. */
    /* Where the data stands at a version (the trainer's, kept in every
     * checkpoint so a resumed run uses the same): 0 when not given. */
    uint32_t global_batch;
    uint64_t steps_per_epoch;
    uint64_t init_hash; /* Nonzero: started from given values (restored
                         * as version 0), this is their XXH64. */
    ps_optim_cfg table_optim; /* Row-wise optimizer of the tables (a model
                               * with tables only). */
    /* Sync mode: > 0 is backup sync (TensorFlow's replicas_to_aggregate
     * with a deadline): a step open this many ms since its first
     * contribution closes with the workers that gave (each partition
     * averaged over its contributions); the workers that did not give all
     * of it are absent, and the next steps do not wait for them until one
     * of their pushes comes. Their late pushes get PS_PUSH_SKIPPED. The close
     * happens in ps_shard_tick. 0: every step waits for every worker. */
    int64_t backup_ms;
} ps_shard_config;

/* The most workers a config may have. 4096: far above any cluster this PS
 * is run in (a sync step waits for all of them), and the per-worker state
 * (staging, bookkeeping) stays bounded; more is refused as invalid. */
#define PS_SHARD_MAX_WORKERS 4096

/* The default async step bound (see the top): 2^20 steps. A worker's steps
 * go up by one a push; they run ahead of its last step here only by pushes
 * that went to other shards, and ahead of the version (a worker's first
 * push after a restore) only by the pushes a restore to an older
 * checkpoint lost (about the checkpoint interval): far below this. A bogus
 * step up to it costs its worker at most that many steps' pushes, instead
 * of all of them. */
#define PS_SHARD_MAX_STEP_AHEAD ((int64_t)1 << 20)

/* The dtypes a pushed gradient may have: psrpc.DType's numbers. */
enum ps_dtype { PS_DTYPE_FLOAT32 = 1, PS_DTYPE_BFLOAT16 = 2 };

/* One gradient of a push: partition id (placement) and its values. */
typedef struct ps_grad {
    uint32_t part;
    int dtype;             /* As sent: PS_DTYPE_*; anything else is refused. */
    int nshape;
    const uint64_t *shape; /* As sent. */
    const uint8_t *data;   /* Raw little-endian float32 (4 bytes a value) or
                            * bfloat16 (2), maybe unaligned; widened to
                            * float32 as it is accumulated. NULL when the
                            * bytes come as pieces: */
    size_t len;            /* Bytes. */
    const struct rpc_piece *pieces; /* With data NULL: the len bytes in
                                     * order, in npieces pieces (as gRPC
                                     * received them: a value may be cut
                                     * between two). */
    int npieces;
} ps_grad;

/* A copy of the shard's partitions at one version, which does not change
 * while the caller holds a reference (ps_snapshot_ref). */
typedef struct ps_snapshot ps_snapshot;
int64_t ps_snapshot_version(const ps_snapshot *s);
/* The values of the i-th partition this shard owns (see ps_shard_parts). */
const float *ps_snapshot_part(const ps_snapshot *s, int i);
void ps_snapshot_ref(ps_snapshot *s);
void ps_snapshot_unref(ps_snapshot *s);

/* Results of ps_shard_push besides CM_OK. */
enum {
    PS_PUSH_OK = 0,
    PS_PUSH_DUPLICATE = 1,  /* OK on the wire, not counted again. */
    PS_PUSH_STALE = -100,   /* FAILED_PRECONDITION */
    PS_PUSH_EARLY = -101,   /* FAILED_PRECONDITION */
    PS_PUSH_INVALID = -102, /* INVALID_ARGUMENT: shape, dtype, partition */
    PS_PUSH_NOT_READY = -103, /* FAILED_PRECONDITION: not initialised */
    PS_PUSH_NOMEM = -104,     /* RESOURCE_EXHAUSTED: over the memory limit */
    PS_PUSH_SKIPPED = -105,   /* OUT_OF_RANGE: backup sync closed the step
                               * without this worker (a stale push there) */
    PS_PUSH_BUSY = -106       /* Not taken: frozen for a checkpoint (see
                               * ps_publish_fn); wait and push again */
};

/* One table's row gradients in a push. */
typedef struct ps_row_grad {
    uint32_t table;        /* The table's index among the model's tables. */
    const uint64_t *ids;   /* n ids (a repeated one is summed). */
    size_t n;
    int dtype;             /* PS_DTYPE_*, as for ps_grad. */
    const uint8_t *data;   /* n x dim values, maybe unaligned. */
    size_t len;            /* Bytes. */
} ps_row_grad;

/* One table's rows a pull asks for: their values go to out (n x dim
 * floats) when the pull is answered. */
typedef struct ps_row_req {
    uint32_t table;
    const uint64_t *ids;
    size_t n;
    float *out;
} ps_row_req;

typedef struct ps_shard_stats {
    int64_t version;
    /* Pushes taken (a push dropped by skip_nonfinite is counted in
     * nonfinite_pushes only), retries, refused as stale or early, pulls,
     * and requests refused as invalid (a non-finite push refused counts
     * here and in nonfinite_pushes). */
    uint64_t pushes, duplicate_pushes, stale_pushes, early_pushes, pulls, bad_requests;
    uint64_t rows, rows_pulled, rows_pushed; /* Rows held, answered, received. */
    uint64_t rows_prefetched; /* Read from the row store off the lock. */
    int parked;              /* Pulls waiting for a version now. */
    uint64_t parked_refused; /* Pulls refused: too many waited. */
    int nparts;
    size_t bytes;
    int64_t min_worker_step; /* Lowest last pushed step over workers (-1: some
                              * worker has not pushed since init or restart). */
    uint64_t nonfinite_pushes; /* With a NaN or infinity: refused, or dropped
                                * (skip_nonfinite). */
    size_t mem_bytes, mem_limit; /* Memory counted against the limit (the
                                  * state of the config, rows, staging), and
                                  * the limit. */
    ps_rows_spill_stats row_cache; /* Rows in memory and stored (with a row
                                    * budget: ps_shard_set_row_spill). */
    uint64_t backup_closes; /* Steps backup sync closed without some worker. */
    /* Async: a worker's steps that a rollback took from this shard and that
     * were not pushed again (the gap before its first push after it; a
     * worker's async steps are otherwise consecutive). */
    uint64_t updates_lost;
} ps_shard_stats;

/* Each worker rank's last pushed step (-1: none since Init or restart) into
 * out (at most max); returns the number of workers (0 before Init). An
 * async step in calls (step_parts) counts once all of them are in: a
 * worker that died between two of them, started again from the step after
 * this, pushes that step again, and the calls already taken are
 * duplicates. (Checkpoints record the step itself: what its later calls
 * brought came after the checkpoint.) */
int ps_shard_worker_steps(ps_shard *s, int64_t *out, int max);

/* The shard 'index' of 'placement' for 'model' (both borrowed; they must
 * outlive the shard). Not initialised yet: pushes are refused and pulls
 * wait. Returns CM_EINVAL, CM_ENOMEM; *out NULL on error. */
int ps_shard_create(const cm_model *model, const cm_placement *placement, int index,
                    ps_shard **out);

/* The default memory limit of a shard: half the memory of the machine (the
 * smaller of its physical memory and the cgroup's limit, when there is
 * one), leaving the other half to what the limit does not count: the
 * checkpoint writer's copy of the parameters and slots, replies in flight,
 * message buffers. 8 GiB if neither can be read. */
size_t ps_shard_default_memory_limit(void);

/* Settings of the server (not of the Init config, which clients send):
 * set them before the shard serves; they apply to later calls.
 * The memory limit in bytes (0: the default); an Init or restore beyond it
 * is refused with CM_ENOMEM. */
void ps_shard_set_memory_limit(ps_shard *s, size_t bytes);
/* Embedding rows in a row store (storage/st_rowdb.h): at most budget
 * bytes of rows in memory (0: no limit), the others in db (borrowed: it
 * must outlive the shard). At Init and rollback the rows start as
 * ps_shard_rows_from_store said, else empty (the store forks at -1).
 * Before the shard is initialised. */
struct st_rowdb;
void ps_shard_set_row_spill(ps_shard *s, struct st_rowdb *db, size_t budget);
/* For the next restore, Init or rollback (once): the row store holds the
 * rows of the checkpoint of 'version', counts[t] of table t (copied; one
 * per table); NULL: no rows (the initial values). */
void ps_shard_rows_from_store(ps_shard *s, int64_t version, const uint64_t *counts);
/* Rows created only once seen k times (0, 1: at once), and dropped after
 * expire_after versions unused (0: never); ps_rows_set_admission and
 * ps_rows_set_expiry. Before the shard is initialised. */
void ps_shard_set_row_admission(ps_shard *s, int k, int64_t expire_after);
/* Drop pushes with non-finite values instead of refusing them (see the
 * top). */
void ps_shard_set_skip_nonfinite(ps_shard *s, int skip);
/* The async step bound (<= 0: PS_SHARD_MAX_STEP_AHEAD). */
void ps_shard_set_max_step_ahead(ps_shard *s, int64_t steps);

/* Fail every waiting pull (callback with NULL) and free. NULL is a no-op.
 * The caller must ensure no other call is in progress. */
void ps_shard_destroy(ps_shard *s);

/* Partitions this shard owns: placement partition ids, ascending. */
const uint32_t *ps_shard_parts(const ps_shard *s, int *nparts);

/* Initialise (values from cfg->seed) or, if already initialised with the
 * same config, do nothing. A different config is refused: CM_EBUSY with a
 * message naming both. An invalid config gives CM_EINVAL, one whose state
 * would exceed the memory limit (or cannot be allocated) CM_ENOMEM, each
 * with a message naming the field or the sizes; the shard is then
 * unchanged. *version receives the current version. */
int ps_shard_init(ps_shard *s, const ps_shard_config *cfg, int64_t *version, char *err,
                  size_t errlen);

/* Push worker 'worker's gradients for 'step': 1 to nparts of the shard's
 * partitions, each at most once in a request. Everything is
 * validated before anything changes, the values included (no NaN or
 * infinity): on error the shard is unchanged. Returns PS_PUSH_OK or
 * PS_PUSH_DUPLICATE (with *version set), or a negative PS_PUSH_* with a
 * message in err. */
int ps_shard_push(ps_shard *s, int worker, int64_t step, const ps_grad *grads, int ngrads,
                  int64_t *version, char *err, size_t errlen);

/* The same, with row gradients (a model with tables; rows_final: this
 * worker's rows of 'step' are complete, see the top). Row tables, dtypes
 * and lengths are validated with the rest. */
int ps_shard_push_rows(ps_shard *s, int worker, int64_t step, const ps_grad *grads, int ngrads,
                       const ps_row_grad *rows, int nrows, int rows_final, int64_t *version,
                       char *err, size_t errlen);

/* The same, for a step whose partitions for this shard come in several
 * calls (a client splits a large push): step_parts is how many partitions
 * the step carries to this shard over all its calls; 0 (what the two above
 * pass) means this call is the whole step. In async mode each call is
 * applied as it comes and the version goes up once, with the call that
 * brings the last of step_parts (in any order; a dropped call, see
 * skip_nonfinite, counts); a step whose calls never all come leaves the
 * version where it was. Sync mode counts partitions, not calls, and only
 * checks it. PS_PUSH_INVALID: step_parts below this call's partitions,
 * above the shard's, given with rows, or exceeded by the step's calls. */
int ps_shard_push_step(ps_shard *s, int worker, int64_t step, int step_parts,
                       const ps_grad *grads, int ngrads, const ps_row_grad *rows, int nrows,
                       int rows_final, int64_t *version, char *err, size_t errlen);

/* Export: the rows of table t that exist here, from the from-th in their
 * order of creation, up to max of them: ids into ids[], values (dim each)
 * into vals[]. Returns how many (0 past the end); *next is where the next
 * page starts, 0 when this one reached the end. Consistent only while no
 * row is created (after training). */
size_t ps_shard_dump_rows(ps_shard *s, uint32_t table, uint64_t from, size_t max, uint64_t *ids,
                          float *vals, uint64_t *next);

/* The row dim of table t, or -1 if the model has no such table. */
int ps_shard_row_dim(const ps_shard *s, uint32_t table);

/* Called with a snapshot reference the callee owns (unref when done), or
 * with NULL when the shard shuts down before the version exists. */
typedef void (*ps_pull_cb)(void *ud, ps_snapshot *snap);

/* Ask for a snapshot of version >= min_version: cb runs now, on this
 * thread, if it exists, else later on the thread whose push creates it
 * (never with the shard's lock held). */
void ps_shard_pull(ps_shard *s, int64_t min_version, ps_pull_cb cb, void *ud);
/* The same, and answered at shutdown with the last version (which may be
 * below min_version) instead of NULL: an evaluator's read. */
void ps_shard_pull_final(ps_shard *s, int64_t min_version, ps_pull_cb cb, void *ud);

/* Whether a pull of min_version would wait while 'max' pulls already do
 * (max 0: never full); a full answer is counted as parked_refused, for the
 * caller refuses the pull. */
int ps_shard_park_full(ps_shard *s, int64_t min_version, int max);

/* ps_shard_pull that also reads rows rq[0..nrq) (tables checked by the
 * caller with ps_shard_row_dim; rq must stay valid until cb runs) into
 * their 'out' buffers, under the shard's lock, just before cb is called
 * with the snapshot (cb NULL snapshot: not read). train = 1 creates
 * missing rows (a read for training); 0 reads them as their initial
 * values. */
void ps_shard_pull_rows(ps_shard *s, int64_t min_version, const ps_row_req *rq, int nrq,
                        int train, ps_pull_cb cb, void *ud);

/* Ask for the values of 'parts' (placement ids, owned by this shard) at
 * version step + 1: cb runs as ps_shard_pull's, as soon as those partitions
 * are final (in sync mode that may be before version step + 1 is published;
 * the snapshot passed may then be read at those partitions only). Returns
 * CM_EINVAL (cb never runs) for a partition this shard does not own, or a
 * step below 0 or at INT64_MAX. */
int ps_shard_pull_parts(ps_shard *s, int64_t step, const uint32_t *parts, int nparts,
                        ps_pull_cb cb, void *ud);

/* The local index (for ps_snapshot_part) of placement partition 'part', or
 * -1 if this shard does not own it. */
int ps_shard_local_index(const ps_shard *s, uint32_t part);

/* Forget the first waiting pull for which match(its ud, arg) is true (its
 * client went away), without calling its callback: returns 1 and its ud in
 * *ud, or 0 if none waits (it may be being answered). */
int ps_shard_cancel_pull(ps_shard *s, int (*match)(void *ud, void *arg), void *arg, void **ud);

/* Answer the pulls waiting now with NULL (the server: ABORTED), the shard
 * staying open: a step that can never complete (a worker rejoined after
 * dying with it half pushed). Returns how many. */
int ps_shard_abort_pending(ps_shard *s);

/* Training is over (the chief's Shutdown): the pulls of ps_shard_pull_final
 * waiting now, and later ones, are answered at once with the last version. */
void ps_shard_finish(ps_shard *s);

/* Answer every waiting pull with NULL (those of ps_shard_pull_final with
 * the last version), and every later one with NULL (shutdown). */
void ps_shard_abort_waiters(ps_shard *s);

/* End a freeze the publish hook asked for (see ps_publish_fn): pushes are
 * taken again. */
void ps_shard_thaw(ps_shard *s);

/* Backup sync: close the open step without the missing workers once it
 * has waited cfg.backup_ms. Returns 1 when it did, with the step, how long
 * it waited (s) and the workers newly absent ("2,5"; may be empty) for the
 * caller to log; 0 otherwise. Call it often (psserver: every 50 ms). */
int ps_shard_tick(ps_shard *s, int64_t *step, double *waited, char *who, size_t wlen);

/* 1 if initialised in async mode. */
int ps_shard_is_async(ps_shard *s);

/* Count a request that was refused before reaching the shard. */
void ps_shard_count_bad(ps_shard *s);

void ps_shard_stats_get(ps_shard *s, ps_shard_stats *out);

/* ------------------------------------------------------------ checkpoints */

/* Floats in the shard's flat arrays (the sum of its partitions' sizes). */
size_t ps_shard_numel(const ps_shard *s);

/* Offset of local partition i in the flat arrays; i == nparts gives numel. */
size_t ps_shard_part_offset(const ps_shard *s, int i);

/* Called when version v > 0 with v % every == 0 is published, WITH THE
 * SHARD'S LOCK HELD (keep it short; call nothing of this shard): 'snap' is
 * the new current snapshot (borrowed: ps_snapshot_ref it to keep it), 'slots'
 * the optimizer slots at v (nslots arrays of ps_shard_numel floats, slot k
 * of local partition i at slots[k * numel + offset(i)]; NULL when there are
 * none), valid only during the call since the optimizer updates them in
 * place, 'cfg' the shard's config, and 'rows' the shard's rows at v (NULL
 * without tables), also valid only during the call (a checkpoint copies
 * the rows changed since the last one: ps_rows_checkpoint); 'worker_steps'
 * (cfg->num_workers entries, valid during the call) each worker's last step
 * the shard took by v, -1 for none: where each worker stands in its data at
 * v, which an async worker started again resumes after.
 * Returns nonzero to freeze the shard at v: pushes then get PS_PUSH_BUSY
 * (nothing taken) until ps_shard_thaw. A checkpoint writer freezes each
 * version it takes (synchronous checkpoints: a crash loses at most the
 * hook's interval), or one it cannot take yet because the last is still
 * being written (so it never falls more than one interval behind). */
typedef int (*ps_publish_fn)(void *ud, ps_snapshot *snap, const float *slots, int nslots,
                              const ps_shard_config *cfg, ps_rows *rows,
                              const int64_t *worker_steps);

/* Install the hook (every > 0) or remove it (fn NULL). Set it before the
 * shard serves. */
void ps_shard_set_publish_hook(ps_shard *s, int64_t every, ps_publish_fn fn, void *ud);

/* Initialise from a checkpoint instead of cfg->seed: version 'version',
 * parameters 'params' and slots 'slots' (flat, laid out as the hook gets
 * them; slots may be NULL when cfg's optimizer has none). Both are copied.
 * The shard then counts as initialised with cfg (ps_shard_init with the
 * same config is OK, another CM_EBUSY). The hook is not called for this
 * version. CM_EBUSY if already initialised, CM_EINVAL for a bad config or
 * version, CM_ENOMEM over the memory limit; on error the shard is
 * unchanged. */
int ps_shard_restore(ps_shard *s, const ps_shard_config *cfg, int64_t version,
                     const float *params, const float *slots, char *err, size_t errlen);

/* Roll an initialised shard back to 'version' with 'params' and 'slots'
 * (as for ps_shard_restore; params NULL with version 0 means the initial
 * values of its config again). Every waiting pull is answered with NULL
 * (the server fails them with ABORTED), contributions of the step in
 * progress are dropped, and the per-worker push history is reset. The
 * config stays, and so does the state's memory (reset in place). CM_EINVAL
 * if not initialised or for a bad version, CM_ENOMEM if the buffer of the
 * version cannot be allocated; on error the shard is unchanged. */
int ps_shard_rollback(ps_shard *s, int64_t version, const float *params, const float *slots,
                      char *err, size_t errlen);

/* Call the publish hook now with the current version (a final checkpoint
 * at shutdown, or one the hook put off), if there is a hook, the shard is
 * initialised and no step is half applied (the slots then belong to the
 * current version). The hook's answer freezes nothing here. Returns 1 if
 * it called the hook. */
int ps_shard_publish_now(ps_shard *s);

/* The config, if initialised: returns 1 and fills *cfg, else 0. */
int ps_shard_config_get(ps_shard *s, ps_shard_config *cfg);

/* Restore and rollback of the workers' positions: each worker's last step
 * as the checkpoint's hook had it (n entries, at most the config's workers;
 * -1 none). Call right after ps_shard_restore* or ps_shard_rollback (which
 * forget them), before the shard serves: an async shard then refuses those
 * steps as duplicates, and an async worker started again resumes after
 * them instead of at the start of its data. */
void ps_shard_set_worker_steps(ps_shard *s, const int64_t *steps, int n);

/* Restore and rollback of rows: put row 'id' of table t (values, slots
 * as ps_rows_put; count its update count) into an initialised shard. Call
 * right after ps_shard_restore* or ps_shard_rollback, before the shard
 * serves the restored version (the server holds its requests back). */
void ps_shard_rows_put(ps_shard *s, uint32_t table, uint64_t id, const float *values,
                       const float *slots, int64_t count);
/* The same, taking ownership instead of copying: 'params' (numel floats)
 * and 'slots' (NULL, or room for the optimizer's slots laid out as above)
 * come from cm_alloc_aligned and belong to the shard once this returns
 * CM_OK (slots are freed at once if cfg's optimizer keeps none); on error
 * they are still the caller's. A restore of a large shard then touches its
 * memory once instead of twice. */
int ps_shard_restore_owned(ps_shard *s, const ps_shard_config *cfg, int64_t version,
                           float *params, float *slots, char *err, size_t errlen);

#endif /* PS_SHARD_H */
