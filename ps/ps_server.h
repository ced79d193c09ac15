/* ps_server.h - a PS process's service: one shard behind the gRPC methods.
 * SPDX-License-Identifier: MIT
 *
 * Methods of service psrpc.Ps (proto/ps.proto): Init, Push, Pull, Stats,
 * Shutdown. Every request's cluster fingerprint is checked first. Bad
 * requests get INVALID_ARGUMENT, a wrong cluster or a push out of step
 * FAILED_PRECONDITION, oversized messages RESOURCE_EXHAUSTED (gRPC), other
 * methods UNIMPLEMENTED; none of them changes the shard.
 *
 *   ps_server_create -> ps_server_start -> ps_server_wait -> ps_server_destroy
 */
#ifndef PS_SERVER_H
#define PS_SERVER_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "common/cm_placement.h"

typedef struct ps_server ps_server;

/* The identity of every PS shard's checkpoint store (st_store): the model
 * it holds is its "model" record. */
#define PS_SERVER_STORE_FINGERPRINT 0x7073736861726432ULL /* "psshard2" */
#define PS_SERVER_STORE_DESC "pstrain PS shard"

/* The default number of gRPC threads: 1 on machines with up to 4 online
 * CPUs, 2 otherwise. On 2 cores a second thread measured worse: the main
 * job's PS step went from 0.46-0.49 ms of overhead over local mode with one
 * thread to 0.75-0.79 ms with two (bench/ps_overhead.py), as the threads
 * take turns at every event and compete with the workers. */
int ps_server_default_threads(void);

/* Parked Pulls a shard holds at most by default: an honest cluster parks
 * about one per worker and evaluator; each costs about 14 KB of gRPC call
 * state while it waits. */
#define PS_SERVER_MAX_PARKED 4096

typedef struct ps_server_cfg {
    /* The model and its placement (borrowed; outlive the server), or both
     * NULL: the server learns them from the chief's first Initialize (or
     * from its data directory's model record) and places them on nshards
     * PS. */
    const cm_model *model;
    const cm_placement *placement;
    int nshards;                  /* PS in the cluster (with a model: its
                                   * placement's). */
    int shard;                    /* This process's shard index. */
    int threads;                  /* gRPC threads (0 = ps_server_default_threads()). */
    int max_message;              /* Bytes (0 = RPC_DEFAULT_MAX_MESSAGE). */
    /* Checkpoints: this shard's store directory (NULL: none; its parent
     * must exist) and how often (every checkpoint_every versions; 0: never,
     * but a directory given is still restored from). */
    const char *data_dir;
    int64_t checkpoint_every;
    /* The checkpoint writer thread's nice value (0..19; 0 leaves it as
     * is). LevelDB's compaction thread inherits it when the writer's
     * writes start it. With a high value the handlers keep the cores they
     * need and checkpoints take longer where the cores are busy. */
    int checkpoint_nice;
    /* Synchronous checkpoints: pushes wait while a checkpoint is being
     * written, so a crash loses at most checkpoint_every versions, at the
     * cost of a stall per checkpoint. 0 (psserver --checkpoint-async;
     * psserver's default is 1): the writer runs beside the pushes; a
     * checkpoint due while the last is still being written waits for it,
     * pushes held meanwhile, so a crash loses less than twice
     * checkpoint_every versions (plus the pushes in flight). */
    int checkpoint_sync;
    /* Security (proto/rpc.h): the workers' and the admin's tokens (their
     * contents; NULL: no authentication, anyone who reaches the port may
     * do anything), and TLS (PEM file paths; NULL cert: plaintext; with a
     * CA, mutual TLS). Initialize, Rollback, Shutdown and a Checkpoints
     * that deletes generations need the admin's token. */
    const char *auth_token, *admin_token;
    const char *tls_cert, *tls_key, *tls_ca;
    /* Bounds: Pulls waiting for a version at once (0: PS_SERVER_MAX_PARKED;
     * more get RESOURCE_EXHAUSTED), and (0: the rpc layer's defaults) calls
     * in progress at once, concurrent calls per connection (which bounds
     * one connection's parked Pulls), idle connection timeout. */
    int max_parked;
    int max_held, max_streams, idle_ms;
    int poll_spin_us; /* rpc_server_opts.poll_spin_us (0: 50 µs, -1: none). */
    /* Values: drop (and count) pushes with NaN/inf instead of refusing
     * them with INVALID_ARGUMENT; the shard's memory (bytes; 0:
     * ps_shard_default_memory_limit(), half the machine's or cgroup's);
     * how far past its last step an async push may be (0:
     * PS_SHARD_MAX_STEP_AHEAD). */
    int skip_nonfinite;
    size_t memory_limit;
    int64_t max_step_ahead;
    /* Embedding rows: at most rows_memory bytes of rows in memory (0: no
     * limit), the others in a row store (storage/st_rowdb.h) at rows_dir.
     * With a data_dir the row store is durable (default rows_dir:
     * DATA_DIR-rows) and also holds the checkpoints' rows: a checkpoint
     * writes the rows changed since the last one, and a restarted shard
     * reads rows from it when they are used instead of loading the table.
     * Without one, only with rows_memory: scratch, emptied when opened
     * (NULL rows_dir: a private directory under $TMPDIR, removed at
     * destroy). A model without tables has none. */
    size_t rows_memory;
    const char *rows_dir;
    /* Rows created only once training reads found them missing admit_after
     * times (0, 1: at once), and dropped after expire_after versions unused
     * (0: never); see ps/ps_rows.h. */
    int admit_after;
    int64_t expire_after;
    /* The training ranks (chief and workers) of the cluster this PS was
     * started in (TF_CONFIG or --worker-hosts): an Initialize for another
     * number is refused (FAILED_PRECONDITION, naming both). 0: any. */
    int num_workers;
} ps_server_cfg;

/* With a data_dir, open the shard's store there (identity: a PS shard and
 * its index; the model is its "model" record, checked against cfg.model or
 * adopted when there is none) and, if it holds a committed generation,
 * restore the newest one into the shard, rows of tables included (logged
 * as "restored version V from DIR"). Checkpoints are then written by one background
 * thread from the published snapshot and a copy of the slots taken at
 * publication; one that comes due while the last is still being written is
 * skipped. Errors are logged here: CM_EINVAL (e.g. a directory of another
 * model or shard), CM_EIO, CM_ECORRUPT, CM_ENOMEM. */
int ps_server_create(const ps_server_cfg *cfg, ps_server **out);

/* Listen on addr ("host:port"; port 0 picks one) and serve. *port gets the
 * bound port. CM_EBUSY if the address cannot be bound. */
int ps_server_start(ps_server *s, const char *addr, int *port);

/* Wait until a Shutdown request arrives, ps_server_request_stop() is
 * called, or timeout_ms passes (< 0: forever). Returns 1 if stopping. */
int ps_server_wait(ps_server *s, int timeout_ms);

/* Ask the server to stop (thread-safe; not async-signal-safe). */
void ps_server_request_stop(ps_server *s, const char *reason);

/* Why it stopped ("" if it did not). */
const char *ps_server_stop_reason(ps_server *s);

/* Whether the Shutdown that stopped it said the run failed. */
int ps_server_stop_failed(ps_server *s);

/* Wait until no checkpoint is being written (returns at once without
 * checkpoints). One that comes due meanwhile is waited for too. */
void ps_server_checkpoint_wait(ps_server *s);

/* The shard's metrics in Prometheus's text format (malloc'd, *len its
 * length; NULL without memory): counters and gauges of its Stats, the time
 * to take a push and to write a checkpoint (histograms), rollbacks; every
 * sample labelled with the shard. Thread-safe; for psserver
 * --metrics-listen (cm_http). */
char *ps_server_metrics(ps_server *s, size_t *len);

/* Fail waiting pulls, let replies in flight finish (up to grace_ms), finish
 * a checkpoint being written, stop and free. NULL is a no-op. */
void ps_server_destroy(ps_server *s, int grace_ms);

#endif /* PS_SERVER_H */
