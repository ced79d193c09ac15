/* ps_client.h - the PS client library: push gradients, pull parameters.
 * SPDX-License-Identifier: MIT
 *
 * What workers, benchmarks and users' own training loops link to talk to
 * the PS shards of a cluster, as ps-lite's KVWorker is. Vectors are the
 * model's flat parameter layout (cm_model); the client splits them by the
 * placement and talks to every shard in parallel.
 *
 * Conventions:
 *  - ps_client_push/pull start the calls and return a ticket at once; wait
 *    for it with ps_ticket_wait(), which frees it. Until then the buffers
 *    passed in must stay valid and unchanged (pushes are sent zero-copy from
 *    them; pulls are written into them).
 *  - Every call has a deadline (cfg.deadline_ms). UNAVAILABLE is retried
 *    with exponential backoff until cfg.connect_timeout_ms has passed since
 *    the call first got it (however long it had waited at the shard
 *    before), then the error names the PS that could not be reached. Retried pushes are
 *    safe: a shard counts each (worker, step, partition) once.
 *  - A shard's share of a dense push or pull of more than cfg.call_bytes
 *    goes as several calls at once (whole partitions each). The calls of
 *    one pull may be answered from different versions of the shard where
 *    versions move on meanwhile (async, an evaluator's pull); the ticket
 *    reports the lowest. Pulls of some partitions need servers of this
 *    release (PullRequest.parts): an older one answers with every
 *    partition and the reply is refused.
 *  - Errors return a negative CM_E* and put a message in err.
 *  - Sparse models (with embedding tables): rows are placed on shards by
 *    cm_row_shard; ps_client_push_pull_rows pushes a step's row gradients
 *    with the dense gradient and fetches the next batch's rows in the same
 *    call, one per shard; ps_client_pull_rows fetches rows alone.
 * A ps_client is used by one thread at a time.
 */
#ifndef PS_CLIENT_H
#define PS_CLIENT_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "ps/ps_optim.h"

typedef struct ps_client ps_client;
typedef struct ps_ticket ps_ticket;

#define PS_CLIENT_CALL_BYTES (512L << 10)
#define PS_CLIENT_MAX_CALLS 16 /* A shard's dense calls at most (see call_bytes). */
#define PS_CLIENT_CALL_WINDOW 3 /* A shard's dense calls in flight (see call_window). */

typedef struct ps_client_cfg {
    const cm_model *model;         /* Borrowed; outlives the client. */
    const cm_placement *placement; /* Borrowed; outlives the client. */
    const char *const *ps_addrs;   /* placement->nshards "host:port" strings. */
    int rank;                      /* This caller's training rank. */
    int64_t deadline_ms;           /* Per call (0 = 60000). */
    int64_t connect_timeout_ms;    /* Retrying UNAVAILABLE (0 = 30000). */
    int max_message;               /* Bytes (0 = the rpc default, 64 MiB). */
    int wire_bf16;                 /* Push gradients as bfloat16 (rounded to
                                    * nearest even, ps_wire_bf16_from_f32):
                                    * half the bytes. Each push converts the
                                    * pushed partitions into a buffer of its
                                    * own ticket and sends that; 0 = float32,
                                    * sent zero-copy from the caller's. Pulls
                                    * are float32 either way. */
    long call_bytes;               /* Dense pushes and pulls of a shard that
                                    * carry more than this many bytes go as
                                    * several calls at once (whole partitions,
                                    * at least one a call; at most
                                    * PS_CLIENT_MAX_CALLS a shard, larger
                                    * calls beyond), so that the PS
                                    * takes in one while the next is on the
                                    * wire and the reply of one is copied out
                                    * while the next comes: 0 =
                                    * PS_CLIENT_CALL_BYTES (512 KiB: with
                                    * calls on streams and polling gRPC
                                    * threads, 1 PS, 1 worker, 1 MiB on
                                    * loopback, +55-65 % against 1 MiB calls
                                    * and ahead of 256 KiB; docs/bench-log.md),
                                    * < 0 = one call a shard. */
    int call_window;               /* Of those calls, at most this many of a
                                    * shard's are in flight at once; each end
                                    * starts the next, in order. A call's
                                    * pull waits for every worker's push of
                                    * it, and calls all at once share a
                                    * connection's bytes: the worker whose
                                    * TCP flow runs slowest then holds up
                                    * every call's reply, and the shard's
                                    * link idles in the other direction
                                    * (measured: 4 workers on a 1 Gbit/s
                                    * link, steps 9 % shorter with 3 than
                                    * with all). 0 = PS_CLIENT_CALL_WINDOW,
                                    * < 0 = all at once. */
    int spin_us;                   /* A thread waiting for tickets first
                                    * polls for up to this long (µs, from
                                    * when it first finds them busy),
                                    * yielding its core to
                                    * any other runnable thread, before it
                                    * sleeps: a reply that comes meanwhile
                                    * costs no wake-up (unary calls, 1 PS,
                                    * 1 worker, 4 KiB on loopback: 45-57 % more
                                    * operations a second). It takes a core
                                    * while it waits: for machines with one
                                    * to spare (2 PS and 2 workers on 2
                                    * cores: 2-15 % fewer). After a spin in
                                    * vain, 16-256 waits skip it
                                    * (ps_client_wait_counts). 0 (the
                                    * default) or less: sleep at once. */
    int poll_spin_us;              /* rpc_client_opts.poll_spin_us: the
                                    * client's completion-queue thread polls
                                    * this long before it sleeps (0: 50 µs,
                                    * -1: none). */
    int unary;                     /* 1: every push and pull is a gRPC call
                                    * of its own. 0 (the default): they go on
                                    * the channel's streams, one a shard and
                                    * method (RPC_STREAM), which saves gRPC's
                                    * per-call work: 1 PS, 1 worker, 4 KiB on
                                    * loopback, 1.5x the operations a second
                                    * (docs/bench-log.md). Control calls
                                    * (Initialize, Checkpoint, ...) are unary
                                    * either way. */
    int async;                     /* The shards run async: a push split
                                    * into several calls to a shard says so
                                    * (PushRequest.step_parts), so that the
                                    * shard's version goes up once a step,
                                    * not once a call. */
    /* Security: the token every call carries and the admin's, for
     * Initialize, Rollback, Shutdown and deleting checkpoints (contents,
     * not paths; NULL: none); TLS: the CA that signed the PS's certificates
     * (PEM path; NULL: plaintext), this client's certificate and key for
     * mutual TLS, and the name on the PS's certificates when it is not the
     * address's host. */
    const char *auth_token, *admin_token;
    const char *tls_ca, *tls_cert, *tls_key, *tls_server_name;
} ps_client_cfg;

/* What the chief initialises the shards with (psrpc.InitRequest). */
typedef struct ps_init_cfg {
    ps_optim_cfg optim;
    ps_optim_cfg table_optim; /* Row-wise optimizer of the tables (sparse models). */
    uint64_t seed;
    int num_workers;
    int async;     /* 0 = synchronous steps, 1 = apply every push at once. */
    int64_t backup_ms; /* Sync: > 0 is backup sync (psrpc.InitRequest.backup_ms):
                        * a step closes after this long without the workers
                        * that have not pushed; their pushes then fail with
                        * CM_ESKIPPED. */
    int sum;       /* 0 = average the workers' gradients, 1 = sum them. */
    int zero_init; /* Start at zeros (benchmarks). */
    /* Where the data stands at a version (kept in checkpoints so that a
     * resumed run must use the same; 0 = not given). */
    unsigned global_batch;
    uint64_t steps_per_epoch;
    const float *values; /* Or start from these (model->numel floats in the
                          * flat layout; borrowed); NULL = from seed. */
} ps_init_cfg;


int ps_client_open(const ps_client_cfg *cfg, ps_client **out, char *err, size_t errlen);
void ps_client_close(ps_client *c);

/* Initialise every shard (idempotent for the same config). Blocking.
 * Adopts the shards' recovery epoch (1 for fresh shards). */
int ps_client_init(ps_client *c, const ps_init_cfg *init, char *err, size_t errlen);

/* Push 'grad' (model->numel floats) as this rank's gradient for 'step'
 * (as bfloat16 with cfg.wire_bf16, converted before this returns). */
int ps_client_push(ps_client *c, int64_t step, const float *grad, ps_ticket **t);

/* Pull every partition at version >= min_version into params. */
int ps_client_pull(ps_client *c, int64_t min_version, float *params, ps_ticket **t);
/* The same, but a shard that shuts down first answers with its last
 * version, which may be below min_version (an evaluator's pull: the final
 * version gets evaluated). */
int ps_client_pull_final(ps_client *c, int64_t min_version, float *params, ps_ticket **t);

/* Push 'grad' for 'step' and, in the same call, pull the parameters that
 * result into params: version step + 1 in sync mode, the newest in async
 * mode. One round trip per call instead of two (a call per shard, or per
 * call_bytes of it). grad and params must not overlap. */
int ps_client_push_pull(ps_client *c, int64_t step, const float *grad, float *params,
                        ps_ticket **t);

/* Push-pull of some partitions only: push parts[0..nparts) (placement ids,
 * each once, any order) of 'grad' for 'step', and write those partitions'
 * resulting values into params (the same places; nothing else of params is
 * written). Only the shards that own some of them are called, each with its
 * subset; in sync mode a shard answers as soon as those partitions have
 * every worker's contribution, so a worker can send the parts of its
 * gradient that are final while it computes the rest, and wait for all its
 * tickets at the end of the step. Returns CM_EINVAL (no ticket) for an
 * unknown or repeated id or nparts < 1. */
int ps_client_push_pull_parts(ps_client *c, int64_t step, const float *grad, float *params,
                              const uint32_t *parts, int nparts, ps_ticket **t);

/* The unique rows of a sparse step, grouped by table: the ids of table t
 * are ids[tab_begin[t] .. tab_begin[t + 1]) (ntables is the model's; a
 * wk_rowset has this shape). Values and gradients of row u are at
 * u * row_dim of the caller's arrays, row_dim being the model's widest
 * table dim (cm_model_max_dim). */
typedef struct ps_row_keys {
    int ntables;
    const size_t *tab_begin;
    const uint64_t *ids;
} ps_row_keys;

/* A sparse model's step: push 'grad' (every dense partition) and the row
 * gradients row_grad of 'keys' (NULL: none) for 'step', and pull into
 * params the dense parameters of the resulting version (step + 1 in sync
 * mode, the newest in async) and into want_values the values of the rows
 * 'want' (NULL: none; created if missing) at that version. One call per
 * shard, every shard (so that each counts this worker's rows of the step).
 * CM_EINVAL (no ticket) for a model without tables or mismatched keys. */
int ps_client_push_pull_rows(ps_client *c, int64_t step, const float *grad, float *params,
                             const ps_row_keys *keys, const float *row_grad,
                             const ps_row_keys *want, float *want_values, ps_ticket **t);

/* The values of the rows 'want' at version >= min_version into values;
 * train = 1 creates missing rows (a read for training), 0 does not (they
 * read as their initial values). Only the shards that hold some of them
 * are called. */
int ps_client_pull_rows(ps_client *c, int64_t min_version, const ps_row_keys *want,
                        float *values, int train, ps_ticket **t);

/* Export: a page of the rows of table 'table' that exist on PS 'shard',
 * from the from-th (in their order of creation) up to max of them (the
 * server may return fewer). Blocking. *ids and *vals (n x dim floats) are
 * new arrays to free(); *next is where the next page starts, 0 after the
 * last. Meant for after training (rows created meanwhile may shift). */
int ps_client_dump_rows(ps_client *c, int shard, int table, uint64_t from, size_t max,
                        uint64_t **ids, float **vals, size_t *n, uint64_t *next, char *err,
                        size_t errlen);

/* Wait for a ticket and free it. *version (may be NULL) gets the smallest
 * shard version seen (of an async push's calls to one shard, the highest:
 * the one that ended the step). Returns CM_OK or the first error, with a message. */
int ps_ticket_wait(ps_ticket *t, int64_t *version, char *err, size_t errlen);

/* Wait for n tickets together (retrying each shard's UNAVAILABLE calls on
 * its own backoff) and free them all; the buffers are the caller's again
 * on return. When a shard answers ABORTED (the cluster is rolling back)
 * this returns CM_EABORTED at once, without waiting for the other calls:
 * they are dropped (ps_tickets_drop), so their pushes' buffers are the
 * caller's again only after ps_client_quiesce (a call parked at a shard
 * that waits for a worker being recovered ends only when the cluster
 * rolled back). */
int ps_tickets_wait(ps_ticket **t, int n, int64_t *version, char *err, size_t errlen);

/* Give up on n tickets without waiting for their replies: returns once the
 * buffers are the caller's again (no push is still being sent from them);
 * calls still in flight become orphans whose replies are dropped. The
 * tickets are freed (an orphan by its last completion). For a caller that
 * failed and must not wait until these calls' deadlines. */
void ps_tickets_abandon(ps_ticket **t, int n);

/* As ps_tickets_abandon, without waiting: the buffers of pushes still
 * being sent are the caller's again only after ps_client_quiesce. */
void ps_tickets_drop(ps_ticket **t, int n);

/* Wait (at most timeout_ms) until no dropped ticket sends from its
 * buffers any more. CM_OK, or CM_ETIMEDOUT (the buffers must then not be
 * written or freed before ps_client_close, which waits for everything). */
int ps_client_quiesce(ps_client *c, int64_t timeout_ms);

/* Recovery epoch sent with every request (see proto/ps.proto, Cluster);
 * 0, the default, means not tracked. */
void ps_client_set_epoch(ps_client *c, uint64_t epoch);
uint64_t ps_client_epoch(const ps_client *c);

/* One shard's checkpoint state (psrpc.CheckpointsReply). */
#define PS_MAX_COMMITTED 16
typedef struct ps_shard_checkpoints {
    int64_t version;
    uint64_t epoch;
    int recovering, initialised, durable;
    int ncommitted;
    int64_t committed[PS_MAX_COMMITTED]; /* Newest first. */
} ps_shard_checkpoints;

/* Ask every shard (out: placement->nshards entries) for its checkpoints;
 * keep_from >= 0 tells them every shard has committed that version, so
 * older generations may go. Blocking, retries unreachable shards. */
int ps_client_checkpoints(ps_client *c, int64_t keep_from, ps_shard_checkpoints *out,
                          char *err, size_t errlen);

/* One shard's checkpoints (as ps_client_checkpoints, nothing dropped). */
int ps_client_checkpoints_shard(ps_client *c, int shard, ps_shard_checkpoints *out, char *err,
                                size_t errlen);

/* The chief, at the end of the run: every shard commits the version it
 * serves (a checkpoint of it) before answering, and keeps it as the run's
 * last; out as ps_client_checkpoints. A shard that restarted and waits for
 * a rollback commits nothing and says recovering. Needs the admin's token
 * when the cluster has tokens. */
int ps_client_commit_final(ps_client *c, ps_shard_checkpoints *out, char *err, size_t errlen);

/* A worker started again that finds the shards at different versions (a
 * step its predecessor half pushed, which cannot complete): every shard
 * answers its waiting pulls ABORTED, so that the chief rolls back; out as
 * ps_client_checkpoints. Needs only the workers' token. */
int ps_client_abort_waiting(ps_client *c, ps_shard_checkpoints *out, char *err, size_t errlen);

/* Roll every shard back to committed 'version' (0: the initial values) in
 * recovery epoch 'epoch' (> every shard's), then use that epoch. */
int ps_client_rollback(ps_client *c, int64_t version, uint64_t epoch, char *err,
                       size_t errlen);

/* Ask every shard to shut down (the chief, at the end). Blocking. */
/* Retries a shard that is unavailable for the connect timeout (one being
 * restarted must be told too); failed: the run failed (psserver exits 1). */
int ps_client_shutdown_servers(ps_client *c, const char *reason, int failed, char *err,
                               size_t errlen);

/* Per-shard counters (psrpc.StatsReply), summed over shards. */
typedef struct ps_client_stats {
    int64_t min_version;
    int64_t min_worker_step; /* Over shards and workers (-1: one has not pushed). */
    uint64_t pushes, duplicate_pushes, stale_pushes, early_pushes, pulls, bad_requests;
    uint64_t rows, rows_pulled, rows_pushed; /* Sparse models. */
    /* Bounds and security: pulls parked now, parked calls whose client
     * went away, calls refused for no or a wrong token, for the worker
     * token on an administrative method, and over the held-call limit. */
    uint64_t parked_pulls, cancelled_pulls;
    uint64_t refused_unauthenticated, refused_denied, refused_exhausted;
    uint64_t nonfinite_pushes;     /* Refused (or dropped) for NaN/inf. */
    uint64_t mem_bytes, mem_limit; /* The shards' memory and limits. */
    /* Embedding rows beyond memory, admission, expiry (psserver
     * --memory-mb, --admit-after, --expire-after-steps), over shards. */
    uint64_t rows_resident, rows_on_disk, row_hits, row_misses, row_evictions;
    uint64_t row_bytes_written, rows_budget;
    uint64_t rows_not_admitted, row_updates_dropped, rows_expired;
    /* The newest checkpoint's rows (changed since the one before) and their
     * bytes written to the row stores, over shards. */
    uint64_t ckpt_rows, ckpt_row_bytes;
    /* Async: the most updates any shard lost to rollbacks (pushes a
     * rollback took and no worker pushed again; since each shard's start). */
    uint64_t updates_lost_max;
} ps_client_stats;
int ps_client_stats_get(ps_client *c, ps_client_stats *out, char *err, size_t errlen);

/* This client's waits (ps_ticket_wait, ps_tickets_wait) since it was
 * opened: those that ended without sleeping (while spinning, cfg.spin_us,
 * or settled before the wait began), those that slept, and the spins in
 * vain among those (the wait outlasted the spin). After a spin in vain the
 * next 16 waits do not spin, after another 32, ... up to 256, until a spin
 * succeeds. */
void ps_client_wait_counts(ps_client *c, uint64_t *spun, uint64_t *slept, uint64_t *in_vain);

/* How many times a sleeping wait of this client was woken (not by its
 * timeout) only to find its tickets still busy. A ticket wakes its waiter
 * once: when its last call and its last segment are done, or when a call
 * fails; a spurious wake-up of the condition variable is the only other
 * way, so this stays near 0 however many calls a ticket makes. */
uint64_t ps_client_wakeups_in_vain(ps_client *c);

/* Each worker rank's last pushed step as every shard has it (the lowest
 * over shards; -1: some shard has none from it) into out (at most max);
 * returns the number of workers, or a negative CM_E* with err: CM_EABORTED
 * when a shard restarted from its checkpoint and waits for the chief's
 * rollback. */
int ps_client_worker_steps(ps_client *c, int64_t *out, int max, char *err, size_t errlen);

#endif /* PS_CLIENT_H */
