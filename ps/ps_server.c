/* ps_server.c - the gRPC handlers of a PS shard.
 * SPDX-License-Identifier: MIT
 *
 * Handlers run on the rpc layer's threads. Push is answered before the
 * handler returns; Pull registers with the shard and is answered from
 * whichever thread publishes the version it waits for, so no thread blocks
 * while a pull waits. PushPull answers with the pushed partitions only, as
 * soon as they are final (ps_shard_pull_parts). Pull replies point into the snapshot (zero-copy); each
 * tensor segment holds a snapshot reference that gRPC releases once sent.
 *
 * The model. A server started without one (psserver) learns it from the
 * chief's first Initialize (its ModelSpec): the placement follows from it
 * and the number of PS, the request's cluster fingerprint must match what
 * the server computed, and only then is the shard created. Until then
 * Push and Pull answer UNAVAILABLE (clients retry), Checkpoints answers
 * "not initialised", everything else FAILED_PRECONDITION. With a data
 * directory the model is kept as the store's "model" record, so a
 * restarted server rebuilds its shard from the directory alone.
 */
#include "ps/ps_server.h"

#include <errno.h>
#include <limits.h>
#include <sys/stat.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <xxhash.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_prom.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "proto/health.pb-c.h"
#include "proto/rpc.h"
#include "ps/ps_shard.h"
#include "ps/ps_wire.h"
#include "storage/st_rowdb.h"
#include "storage/st_store.h"

_Static_assert((int)PS_DTYPE_FLOAT32 == (int)PSRPC__DTYPE__DTYPE_FLOAT32 &&
                   (int)PS_DTYPE_BFLOAT16 == (int)PSRPC__DTYPE__DTYPE_BFLOAT16,
               "ps_grad.dtype takes psrpc.DType's numbers");


int ps_server_default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 4 ? 2 : 1;
}

/* A checkpoint handed to the writer thread: the snapshot of 'version'
 * (a reference) and a copy of the slots at that version. */
typedef struct ckpt_job {
    ps_snapshot *snap; /* NULL: no job. */
    float *slots;      /* Reused copy buffer (nslots * numel floats). */
    size_t slots_cap;  /* Floats it holds. */
    int nslots;
    ps_shard_config cfg;
    /* Tables: the rows changed since the last checkpoint (ps_rows_checkpoint),
     * records of ROW_HEAD bytes (table, floats, id, count, last) and the
     * floats, for the row store; and every table's row count then. */
    uint8_t *rows;
    size_t rows_len, rows_cap;
    size_t nrows;
    uint64_t *counts; /* NULL: no tables. */
    int64_t *wsteps;  /* Each worker's last step at the version... */
    int nworkers;     /* ...of this many (cfg.num_workers). */
} ckpt_job;
#define ROW_HEAD 32

/* A checkpoint's rows: blob part ROWS_PART | t. Kind ROWS_COUNT (8 bytes,
 * little-endian): table t's row count, the rows being in the row store
 * (st_rowdb, tagged <= the version). Kind 0, written before the row store
 * held checkpoints and still read: every row of table t, records of u64 id,
 * i64 update count, then dim values and nslots * dim slots. */
#define ROWS_PART 0x80000000u
#define ROWS_COUNT 1u
/* The workers' positions: blob part STEPS_PART, kind 0, one i64 (little-
 * endian) per worker: its last step the shard took by the version, -1 none.
 * Older checkpoints have none: the positions are then unknown (-1). */
#define STEPS_PART 0x7fffffffu

struct ps_server {
    ps_server_cfg cfg;
    /* Metrics (ps_server_metrics; lock-free): the time to take a push, a
     * checkpoint's write, rollbacks done, the last checkpoint's bytes. */
    cm_hist push_hist, pull_hist, ckpt_hist;
    _Atomic uint64_t rollbacks;
    /* Bytes of Push, PushPull and Pull requests received, and of the
     * answers to Pull and PushPull sent (messages, not gRPC's framing). */
    _Atomic uint64_t bytes_in, bytes_out;
    _Atomic uint64_t ckpt_bytes;
    /* The model, its placement and the shard: set once (at create, or by
     * the first Initialize) under mu, immutable afterwards; handlers read
     * 'shard' under mu (get_shard) and may then use the rest. */
    ps_shard *shard;
    const cm_model *model;
    const cm_placement *pl;
    cm_model *own_model; /* Learnt from an Init or the store. */
    cm_placement *own_pl;
    uint64_t bad_early; /* Bad requests before there was a shard (mu). */
    rpc_server *rpc;
    st_rowdb *rowdb;         /* Rows beyond cfg.rows_memory (NULL: none). */
    char rows_tmp[256];      /* A private row store directory to remove. */
    char *own_data_dir, *own_rows_dir; /* Copies of cfg's. */
    uint64_t fingerprint;
    char identity[256];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* Protected by mu. */
    int stopping;
    char reason[256];
    int stop_failed; /* The Shutdown said the run failed. */
    /* An evaluator's pulls were seen; a Shutdown then defers the stop until
     * its final pull is answered (final_answers) or stop_after passes. */
    int evaluator_seen, finishing;
    uint64_t final_answers;
    /* The run's end (sync): the version the chief's commit made durable
     * (-1: none yet), and the newest committed version each other training
     * worker (rank 1-63) was last told by a Checkpoints (-1: none): a
     * Shutdown waits until the first told_needed of them have seen
     * final_commit, so that a worker waiting for the end finds this shard
     * still up. */
    int64_t final_commit;
    int64_t seen[64];
    int told_needed;
    double stop_after;
    char pending_reason[256];
    /* Checkpoints. */
    st_store *store;
    pthread_t writer;
    int writer_started;
    pthread_mutex_t ck_mu; /* Taken inside the shard's lock (the hook). */
    pthread_cond_t ck_cv;
    ckpt_job job;          /* Protected by ck_mu; busy while job.snap. */
    int ck_stop;           /* Protected by ck_mu. */
    int thawing;           /* Protected by ck_mu: the writer has finished a
                            * checkpoint and thaws the shard (--checkpoint-
                            * sync, or a deferred one); handlers wait for it. */
    int64_t deferred;      /* Protected by ck_mu: --checkpoint-async, the
                            * version (> 0) due while the writer was busy:
                            * the shard is frozen there until the writer
                            * takes it. */
    int64_t gc_floor;      /* Protected by ck_mu: every shard has committed
                            * this version (the chief says so), -1 unknown. */
    int gc_pending;        /* Protected by ck_mu: the floor rose; collect. */
    /* The writer's: the last checkpoint's rows and their bytes, and the row
     * store's puts at its last compaction (read under ck_mu). */
    uint64_t ck_rows, ck_row_bytes, ck_total, compact_puts;
    int64_t compact_keep; /* The 'keep' of the last compaction. */
    double peak_anon; /* MiB (sample_anon; under ck_mu). */
    double rc_start;  /* When the server was created. */
    double rc_at;     /* The last row cache report (log_row_cache; under ck_mu)... */
    uint64_t rc_misses, rc_evictions; /* ...and its counts. */
    /* Recovery. Push, PushPull and Pull handlers hold 'gate' shared from
     * their epoch check until they are registered with the shard; Rollback
     * holds it exclusively, so no request of an old epoch reaches the new
     * state. epoch and recovering are protected by mu. */
    pthread_rwlock_t gate;
    uint64_t epoch;        /* 0 until initialised; then >= 1. */
    int recovering;        /* Restored from disk, waiting for a Rollback. */
};

static ps_shard *get_shard(ps_server *s) {
    pthread_mutex_lock(&s->mu);
    ps_shard *sh = s->shard;
    pthread_mutex_unlock(&s->mu);
    return sh;
}

static void count_bad(ps_server *s) {
    ps_shard *sh = get_shard(s);
    if (sh) {
        ps_shard_count_bad(sh);
        return;
    }
    pthread_mutex_lock(&s->mu);
    s->bad_early++;
    pthread_mutex_unlock(&s->mu);
}

/* Refuse a request with more fields and elements than any honest one has
 * (PS_WIRE_MAX_ELEMS) before protobuf-c unpacks it: 63 MiB of empty
 * tensors would otherwise cost gigabytes and seconds of the handler. */
static int admit(ps_server *s, rpc_call *call, const ProtobufCMessageDescriptor *d,
                 const uint8_t *req, size_t len) {
    char err[256];
    int rc = ps_wire_check_elems(d, req, len, PS_WIRE_MAX_ELEMS, err, sizeof err);
    if (rc != CM_ENOMEM) return 1; /* Malformed: the decoder says precisely how. */
    count_bad(s);
    rpc_fail(call, RPC_RESOURCE_EXHAUSTED, "%s", err);
    return 0;
}

/* No shard yet (the model comes with the chief's Initialize): fail the call
 * and return 0. 'code' UNAVAILABLE lets clients retry until it is there. */
static int need_shard(ps_server *s, rpc_call *call, int code) {
    if (get_shard(s)) return 1;
    rpc_fail(call, code, "PS shard %d is not initialised yet: it learns the model from the "
             "chief's Initialize", s->cfg.shard);
    return 0;
}

static int check_cluster(ps_server *s, rpc_call *call, const Psrpc__Cluster *c) {
    if (c && c->fingerprint == s->fingerprint) return 1;
    count_bad(s);
    if (!c)
        rpc_fail(call, RPC_FAILED_PRECONDITION,
                 "request carries no cluster fingerprint; this PS shard %d serves %s",
                 s->cfg.shard, s->identity);
    else
        rpc_fail(call, RPC_FAILED_PRECONDITION,
                 "cluster mismatch: this PS shard %d serves %s [%016llx]; the caller (rank %u) "
                 "has %s [%016llx]",
                 s->cfg.shard, s->identity, (unsigned long long)s->fingerprint, c->rank,
                 c->description && c->description[0] ? c->description : "(no description)",
                 (unsigned long long)c->fingerprint);
    return 0;
}

/* Checkpoints are kept (a store and its writer: --data-dir with
 * --checkpoint-every): a restart restores them, so a rollback may take
 * steps back, and the end of a run is worth committing. */
static int durable(const ps_server *s) { return s->store != NULL && s->writer_started; }

/* How many of the other training workers (ranks 1 .. told_needed) have
 * been told a committed version >= final_commit (mu held). */
static int told_count(const ps_server *s) {
    int n = 0;
    for (int r = 1; r <= s->told_needed && r < 64; r++)
        n += s->final_commit >= 0 && s->seen[r] >= s->final_commit;
    return n;
}

/* Refuse a request of another recovery epoch, or any while the shard
 * waits for the chief's Rollback (ABORTED: the caller must resynchronise).
 * Called with the gate held shared. */
static int check_epoch(ps_server *s, rpc_call *call, const Psrpc__Cluster *c) {
    pthread_mutex_lock(&s->mu);
    int recovering = s->recovering;
    uint64_t epoch = s->epoch;
    pthread_mutex_unlock(&s->mu);
    if (!recovering && (c->epoch == 0 || c->epoch == epoch)) return 1;
    ps_shard_stats st;
    ps_shard_stats_get(s->shard, &st);
    if (recovering)
        rpc_fail(call, RPC_ABORTED,
                 "PS shard %d restarted from its checkpoint of version %lld and waits for the "
                 "chief to roll the cluster back",
                 s->cfg.shard, (long long)st.version);
    else
        rpc_fail(call, RPC_ABORTED,
                 "epoch %llu is over: PS shard %d is at version %lld of epoch %llu (rolled back)",
                 (unsigned long long)c->epoch, s->cfg.shard, (long long)st.version,
                 (unsigned long long)epoch);
    return 0;
}

static void reply_packed(rpc_call *call, const ProtobufCMessage *m) {
    uint8_t small[256];
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *p = n <= sizeof small ? small : cm_malloc(n);
    protobuf_c_message_pack(m, p);
    rpc_seg seg = {.data = p, .len = n};
    rpc_reply(call, &seg, 1);
    if (p != small) free(p);
}

/* ------------------------------------------------------------ Init */

/* An Init's values (--init-from) as the shard's flat array: every owned
 * partition exactly once, float32 of its size. *out: cm_alloc_aligned,
 * free(); CM_EINVAL with a message otherwise. */
static int init_values(ps_server *s, const Psrpc__InitRequest *r, float **out, char *err,
                       size_t errlen) {
    int nparts;
    ps_shard_parts(s->shard, &nparts);
    size_t n = ps_shard_numel(s->shard);
    float *vals = cm_alloc_aligned((n ? n : 1) * sizeof(float));
    uint8_t *seen = cm_calloc((size_t)nparts + 1, 1);
    int rc = CM_EINVAL;
    if (!vals) abort();
    if (r->zero_init) {
        cm_seterr(err, errlen, "an Init with values cannot also ask for zero_init");
        goto fail;
    }
    for (size_t k = 0; k < r->n_values; k++) {
        const Psrpc__Tensor *t = r->values[k];
        int li = ps_shard_local_index(s->shard, t->part);
        size_t off = li < 0 ? 0 : ps_shard_part_offset(s->shard, li);
        size_t count = li < 0 ? 0 : ps_shard_part_offset(s->shard, li + 1) - off;
        if (li < 0 || seen[li] || t->dtype != PSRPC__DTYPE__DTYPE_FLOAT32 ||
            t->data.len != count * sizeof(float)) {
            cm_seterr(err, errlen,
                      "Init value %zu: partition %u %s (shard %d)", k, t->part,
                      li < 0      ? "is not on this shard"
                      : seen[li]  ? "is given twice"
                      : t->dtype != PSRPC__DTYPE__DTYPE_FLOAT32 ? "is not float32"
                                  : "has the wrong size",
                      s->cfg.shard);
            goto fail;
        }
        seen[li] = 1;
        memcpy(vals + off, t->data.data, t->data.len);
    }
    for (int i = 0; i < nparts; i++)
        if (!seen[i]) {
            cm_seterr(err, errlen, "Init values lack this shard's local partition %d", i);
            goto fail;
        }
    *out = vals;
    vals = NULL;
    rc = CM_OK;
fail:
    free(vals);
    free(seen);
    return rc;
}

/* An OptimizerConfig as ps_optim_cfg; -1 if its kind is unknown. */
static int optim_from(const Psrpc__OptimizerConfig *o, ps_optim_cfg *out) {
    int kind = o ? ps_optim_parse(o->kind) : -1;
    if (kind < 0) return -1;
    *out = (ps_optim_cfg){.kind = kind, .lr = o->lr, .momentum = o->momentum, .beta1 = o->beta1,
                          .beta2 = o->beta2, .epsilon = o->epsilon,
                          .initial_accumulator = o->initial_accumulator};
    return 0;
}

static int on_publish(void *ud, ps_snapshot *snap, const float *slots, int nslots,
                      const ps_shard_config *cfg, ps_rows *rows, const int64_t *worker_steps);

/* The row store of a model with tables (mu held, no shard yet): with a
 * data directory a durable one, the checkpoints' rows (cfg.rows_dir, else
 * DATA_DIR-rows), emptied when the checkpoint store holds no generation;
 * else, with a row budget, a scratch one in cfg.rows_dir or a private
 * directory. None otherwise: every row in memory. */
static int open_rows(ps_server *s, const cm_model *model, uint64_t fingerprint) {
    if (s->rowdb || model->ntables == 0 || (!s->cfg.data_dir && !s->cfg.rows_memory))
        return CM_OK;
    const char *dir = s->cfg.rows_dir;
    char def[4200];
    if (!dir && s->cfg.data_dir) {
        snprintf(def, sizeof def, "%s-rows", s->cfg.data_dir);
        dir = def;
    } else if (!dir) {
        const char *tmp = getenv("TMPDIR");
        snprintf(s->rows_tmp, sizeof s->rows_tmp, "%s/psserver-rows.XXXXXX",
                 tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(s->rows_tmp)) {
            cm_error("cannot create a directory for the row store (%s): %s", s->rows_tmp,
                     strerror(errno));
            s->rows_tmp[0] = '\0';
            return CM_EIO;
        }
        dir = s->rows_tmp;
    }
    st_rowdb_opts o = {.durable = s->cfg.data_dir != NULL,
                       .identity = cm_mix64(fingerprint ^ cm_mix64((uint64_t)s->cfg.shard + 1))};
    char err[768];
    int rc = st_rowdb_open_with(dir, &o, &s->rowdb, err, sizeof err);
    int64_t v;
    if (rc == CM_OK && o.durable && s->store &&
        st_store_latest(s->store, &v, err, sizeof err) == CM_ENOTFOUND)
        rc = st_rowdb_clear(s->rowdb, err, sizeof err);
    if (rc != CM_OK) {
        cm_error("%s", err);
        st_rowdb_close(s->rowdb);
        s->rowdb = NULL;
        return rc;
    }
    if (s->cfg.rows_memory)
        cm_info("embedding rows beyond %.1f MiB of memory go to %s",
                (double)s->cfg.rows_memory / (1 << 20), dir);
    else
        cm_info("embedding rows: all in memory, checkpointed to %s", dir);
    return CM_OK;
}

/* Make 'model' and 'pl' (the server's own from now on when owned) the
 * server's and create its shard with the checkpoint hook (mu not held).
 * CM_EBUSY if a shard exists already (another Init won): then the caller
 * keeps and frees what it passed. */
static int adopt_model(ps_server *s, const cm_model *model, const cm_placement *pl, int owned) {
    ps_shard *sh;
    pthread_mutex_lock(&s->mu);
    int rc = s->shard ? CM_EBUSY : open_rows(s, model, pl->fingerprint);
    pthread_mutex_unlock(&s->mu);
    if (rc != CM_OK) return rc;
    rc = ps_shard_create(model, pl, s->cfg.shard, &sh);
    if (rc != CM_OK) return rc;
    ps_shard_set_skip_nonfinite(sh, s->cfg.skip_nonfinite);
    ps_shard_set_memory_limit(sh, s->cfg.memory_limit);
    if (s->rowdb) ps_shard_set_row_spill(sh, s->rowdb, s->cfg.rows_memory);
    ps_shard_set_row_admission(sh, s->cfg.admit_after, s->cfg.expire_after);
    if (s->cfg.max_step_ahead > 0) ps_shard_set_max_step_ahead(sh, s->cfg.max_step_ahead);
    if (s->writer_started) ps_shard_set_publish_hook(sh, s->cfg.checkpoint_every, on_publish, s);
    pthread_mutex_lock(&s->mu);
    if (s->shard) {
        pthread_mutex_unlock(&s->mu);
        ps_shard_destroy(sh);
        return CM_EBUSY;
    }
    s->model = model;
    s->pl = pl;
    if (owned) {
        s->own_model = (cm_model *)model;
        s->own_pl = (cm_placement *)pl;
    }
    s->fingerprint = ps_wire_identity(model, pl, s->identity, sizeof s->identity);
    s->shard = sh;
    pthread_mutex_unlock(&s->mu);
    return CM_OK;
}

/* The model of the store's "model" record into *model / *pl (owned by the
 * caller). CM_ENOTFOUND if the store has none. */
static int store_model(ps_server *s, cm_model **model, cm_placement **pl, char *err,
                       size_t errlen) {
    void *rec = NULL;
    size_t len = 0, min_part = 0;
    *model = NULL;
    *pl = NULL;
    int rc = st_store_get_record(s->store, "model", &rec, &len, err, errlen);
    if (rc != CM_OK) return rc;
    Psrpc__ModelSpec *spec = psrpc__model_spec__unpack(NULL, len, rec);
    free(rec);
    if (!spec) {
        cm_seterr(err, errlen, "its model record does not parse");
        return CM_ECORRUPT;
    }
    rc = ps_wire_spec_model(spec, model, &min_part, err, errlen);
    psrpc__model_spec__free_unpacked(spec, NULL);
    if (rc == CM_OK && cm_placement_create(*model, s->cfg.nshards, min_part, pl) != CM_OK) {
        cm_seterr(err, errlen, "cannot place its model on %d PS", s->cfg.nshards);
        rc = CM_EINVAL;
    }
    if (rc != CM_OK) {
        cm_model_destroy(*model);
        *model = NULL;
    }
    return rc;
}

/* Keep the model in the store, so that a restart needs no model flag. */
static int store_put_model(ps_server *s, const cm_model *m, char *err, size_t errlen) {
    ps_wire_spec sp;
    ps_wire_spec_init(&sp, m, s->pl->min_part_bytes);
    size_t n = protobuf_c_message_get_packed_size(&sp.spec.base);
    uint8_t *b = cm_malloc(n ? n : 1);
    protobuf_c_message_pack(&sp.spec.base, b);
    int rc = st_store_put_record(s->store, "model", b, n, err, errlen);
    free(b);
    ps_wire_spec_free(&sp);
    return rc;
}

/* The first Initialize of a server without a model: learn it from the
 * request. Returns 1 to go on, or 0 after failing the call. */
static int learn_model(ps_server *s, rpc_call *call, const Psrpc__InitRequest *r) {
    char err[640];
    cm_model *model = NULL;
    cm_placement *pl = NULL;
    size_t min_part = 0;
    if (!r->model) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "PS shard %d has no model yet and this Initialize "
                 "carries none (InitRequest.model)", s->cfg.shard);
        return 0;
    }
    if (ps_wire_spec_model(r->model, &model, &min_part, err, sizeof err) != CM_OK) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "Initialize: bad model: %s", err);
        return 0;
    }
    if (cm_placement_create(model, s->cfg.nshards, min_part, &pl) != CM_OK) {
        cm_model_destroy(model);
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "Initialize: cannot place the model on %d PS",
                 s->cfg.nshards);
        return 0;
    }
    char desc[256];
    uint64_t fp = ps_wire_identity(model, pl, desc, sizeof desc);
    if (!r->cluster || r->cluster->fingerprint != fp) {
        count_bad(s);
        rpc_fail(call, RPC_FAILED_PRECONDITION,
                 "cluster mismatch: the model of this Initialize on this PS's cluster of %d PS "
                 "is %s [%016llx]; the caller has %s [%016llx]",
                 s->cfg.nshards, desc, (unsigned long long)fp,
                 r->cluster && r->cluster->description ? r->cluster->description : "(none)",
                 r->cluster ? (unsigned long long)r->cluster->fingerprint : 0ULL);
        cm_placement_destroy(pl);
        cm_model_destroy(model);
        return 0;
    }
    int rc = adopt_model(s, model, pl, 1);
    if (rc == CM_EBUSY) { /* Another Init was first: check_cluster decides. */
        cm_placement_destroy(pl);
        cm_model_destroy(model);
        return 1;
    }
    if (rc != CM_OK) {
        cm_placement_destroy(pl);
        cm_model_destroy(model);
        rpc_fail(call, RPC_INTERNAL, "PS shard %d cannot create its shard: %s", s->cfg.shard,
                 cm_strerror(rc));
        return 0;
    }
    if (s->store && store_put_model(s, model, err, sizeof err) != CM_OK)
        cm_warn("cannot record the model in the store: %s", err);
    cm_info("serving %s: %d partitions (%zu bytes) of shard %d of %d%s", s->identity,
            s->pl->shard_nparts[s->cfg.shard], s->pl->shard_bytes[s->cfg.shard], s->cfg.shard,
            s->cfg.nshards, model->ntables ? ", and the rows of every table placed here" : "");
    return 1;
}

static void on_init(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    if (!admit(s, call, &psrpc__init_request__descriptor, req, len)) return;
    Psrpc__InitRequest *r = psrpc__init_request__unpack(NULL, len, req);
    if (!r) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed InitRequest");
        return;
    }
    if (!get_shard(s) && !learn_model(s, call, r)) goto out;
    if (!check_cluster(s, call, r->cluster)) goto out;
    if (s->cfg.num_workers > 0 && r->num_workers != (uint32_t)s->cfg.num_workers) {
        /* The chief's cluster has another number of training ranks than
         * this PS's: in sync mode the shards would wait for workers that do
         * not exist (or miss some). */
        count_bad(s);
        rpc_fail(call, RPC_FAILED_PRECONDITION,
                 "cluster mismatch: PS shard %d was started for %d training workers (its "
                 "TF_CONFIG or --worker-hosts), the chief (rank %u) initialises it for %u; "
                 "start every task with the same cluster",
                 s->cfg.shard, s->cfg.num_workers, r->cluster ? r->cluster->rank : 0,
                 r->num_workers);
        goto out;
    }
    ps_optim_cfg optim, table_optim = {0};
    if (optim_from(r->optimizer, &optim) != 0 ||
        (s->model->ntables && optim_from(r->table_optimizer, &table_optim) != 0)) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "unknown optimizer '%s'",
                 optim_from(r->optimizer, &optim) != 0
                     ? (r->optimizer ? r->optimizer->kind : "(none)")
                     : (r->table_optimizer ? r->table_optimizer->kind : "(no table optimizer)"));
        goto out;
    }
    ps_shard_config cfg = {
        .optim = optim,
        .table_optim = table_optim,
        .seed = r->seed,
        .num_workers = (int)r->num_workers,
        .sync = r->sync == PSRPC__SYNC_MODE__SYNC_ASYNC ? PS_ASYNC
                : r->sync == PSRPC__SYNC_MODE__SYNC_SYNC ? PS_SYNC
                                                          : 0,
        .aggregate = r->aggregate == PSRPC__AGGREGATE__AGGREGATE_SUM ? PS_AGG_SUM : PS_AGG_MEAN,
        .zero_init = r->zero_init,
        .global_batch = r->global_batch,
        .steps_per_epoch = r->steps_per_epoch,
        .backup_ms = r->backup_ms,
    };
    char err[1280];
    int64_t version = 0;
    float *vals = NULL;
    int rc;
    if (!r->n_values) {
        rc = ps_shard_init(s->shard, &cfg, &version, err, sizeof err);
    } else if ((rc = init_values(s, r, &vals, err, sizeof err)) == CM_OK) {
        /* Version 0 from the given values; a shard already initialised
         * (a retry, or restored from a checkpoint) takes the same config
         * only, and the values' hash is part of it. */
        cfg.init_hash = XXH64(vals, ps_shard_numel(s->shard) * sizeof(float), 0);
        rc = ps_shard_restore(s->shard, &cfg, 0, vals, NULL, err, sizeof err);
        free(vals);
        /* The seed cannot bring these values back: checkpoint version 0
         * now, so that a rollback to it finds them. */
        if (rc == CM_OK && s->writer_started && ps_shard_publish_now(s->shard))
            ps_server_checkpoint_wait(s);
        if (rc == CM_EBUSY) rc = ps_shard_init(s->shard, &cfg, &version, err, sizeof err);
    }
    if (rc == CM_EBUSY) {
        rpc_fail(call, RPC_FAILED_PRECONDITION, "%s", err);
    } else if (rc == CM_ENOMEM) {
        count_bad(s);
        rpc_fail(call, RPC_RESOURCE_EXHAUSTED, "%s", err);
    } else if (rc != CM_OK) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "%s", err);
    } else {
        cm_debug("shard %d initialised by rank %u", s->cfg.shard, r->cluster->rank);
        Psrpc__InitReply rep = PSRPC__INIT_REPLY__INIT;
        rep.version = version;
        pthread_mutex_lock(&s->mu);
        if (s->epoch == 0 && !s->recovering) s->epoch = 1;
        rep.epoch = s->epoch;
        rep.recovering = s->recovering;
        pthread_mutex_unlock(&s->mu);
        reply_packed(call, &rep.base);
    }
out:
    psrpc__init_request__free_unpacked(r, NULL);
}

/* ------------------------------------------------------------ Push */

/* Rows a pull answers: what a request's 'want' asks for, decoded, and the
 * buffer the shard reads them into (all tables back to back), which the
 * reply's segments share until gRPC is done with them. */
typedef struct row_answer {
    int n;                /* Tables asked for. */
    ps_row_req *rq;       /* n requests, into 'vals'. */
    uint64_t **ids;       /* n id arrays (owned). */
    float *vals;
    int train;
    int refs;             /* Segments holding vals (atomic). */
} row_answer;

static void row_answer_free(row_answer *a) {
    if (!a) return;
    for (int i = 0; i < a->n; i++) free(a->ids[i]);
    free(a->ids);
    free(a->rq);
    free(a->vals);
    free(a);
}

static void row_answer_release(void *ud) {
    row_answer *a = ud;
    if (__atomic_sub_fetch(&a->refs, 1, __ATOMIC_ACQ_REL) == 0) row_answer_free(a);
}

/* Decode want[0..n) (ids only) against the shard: tables that exist, ids
 * that live here. NULL (after failing the call) if they do not. */
static row_answer *decode_want(ps_server *s, rpc_call *call, Psrpc__Rows *const *want, size_t n,
                               int train) {
    char err[384];
    row_answer *a = cm_calloc(1, sizeof *a);
    a->n = (int)n;
    a->train = train;
    a->rq = cm_calloc(n ? n : 1, sizeof *a->rq);
    a->ids = cm_calloc(n ? n : 1, sizeof *a->ids);
    /* The reply carries each id (8 bytes) and its values: one that could
     * not be sent is refused before its buffer is made (a few bytes of
     * repeated ids must not cost the PS gigabytes). */
    size_t limit = (size_t)(s->cfg.max_message ? s->cfg.max_message : RPC_DEFAULT_MAX_MESSAGE);
    size_t total = 0, ids_total = 0;
    for (size_t i = 0; i < n; i++) {
        int dim = ps_shard_row_dim(s->shard, want[i]->table);
        size_t k = 0;
        if (dim < 0) {
            cm_seterr(err, sizeof err, "rows asked of table %u: the model has %d tables",
                      want[i]->table, s->model->ntables);
            goto bad;
        }
        if (ps_wire_ids(want[i], &a->ids[i], &k, err, sizeof err) != CM_OK) goto bad;
        for (size_t j = 0; j < k; j++)
            if (cm_row_shard((int)want[i]->table, a->ids[i][j], s->pl->nshards) != s->cfg.shard) {
                cm_seterr(err, sizeof err, "row %llu of table %u lives on shard %d, not %d",
                          (unsigned long long)a->ids[i][j], want[i]->table,
                          cm_row_shard((int)want[i]->table, a->ids[i][j], s->pl->nshards),
                          s->cfg.shard);
                goto bad;
            }
        a->rq[i] = (ps_row_req){.table = want[i]->table, .ids = a->ids[i], .n = k};
        total += k * (size_t)dim;
        ids_total += k;
        if (total * sizeof(float) + ids_total * 8 > limit) {
            cm_seterr(err, sizeof err, "the rows asked for (%zu ids, %zu values so far) make a "
                      "reply over the message limit of %zu bytes: ask in several pulls",
                      ids_total, total, limit);
            goto bad;
        }
    }
    a->vals = cm_alloc_aligned((total ? total : 1) * sizeof(float));
    if (!a->vals) abort();
    total = 0;
    for (size_t i = 0; i < n; i++) {
        a->rq[i].out = a->vals + total;
        total += a->rq[i].n * (size_t)ps_shard_row_dim(s->shard, a->rq[i].table);
    }
    return a;
bad:
    count_bad(s);
    rpc_fail(call, RPC_INVALID_ARGUMENT, "%s", err);
    row_answer_free(a);
    return NULL;
}

/* Decode and apply a push. Returns 1 with *step and *version set when it
 * was accepted (or a duplicate); otherwise the call has been failed. With
 * 'want' (PushPull), *want gets the rows the reply must carry (NULL for
 * none) and *async whether the shard applies pushes at once. */
static int do_push(ps_server *s, rpc_call *call, const rpc_piece *req, int nreq, int64_t *step,
                   int64_t *version, int *duplicate, uint32_t **parts, int *nparts,
                   row_answer **want, int *with_rows) {
    ps_wire_msg m;
    char err[512];
    if (want) *want = NULL;
    if (!need_shard(s, call, RPC_UNAVAILABLE)) return 0;
    /* Read in place (gRPC's slices, no copy); the decoder counts fields and
     * elements as admit() does before protobuf-c unpacks any. */
    int drc = ps_wire_decode_pieces(&psrpc__push_request__descriptor, 3, 4, req, nreq,
                                    PS_WIRE_MAX_ELEMS, &m, err, sizeof err);
    if (drc != CM_OK) {
        count_bad(s);
        rpc_fail(call, drc == CM_ENOMEM ? RPC_RESOURCE_EXHAUSTED : RPC_INVALID_ARGUMENT, "%s",
                 err);
        return 0;
    }
    Psrpc__PushRequest *r = (Psrpc__PushRequest *)m.msg;
    int ok = 0;
    ps_row_grad *rg = NULL;
    uint64_t **rids = NULL;
    if (!check_cluster(s, call, r->cluster) || !check_epoch(s, call, r->cluster)) goto out;
    if (want && r->n_want && !(*want = decode_want(s, call, r->want, r->n_want, r->train)))
        goto out;
    if (with_rows) *with_rows = r->rows_final || m.nrows > 0 || r->n_want > 0;
    rg = cm_calloc((size_t)m.nrows + 1, sizeof *rg);
    rids = cm_calloc((size_t)m.nrows + 1, sizeof *rids);
    for (int i = 0; i < m.nrows; i++) {
        size_t k;
        if (ps_wire_ids(m.rows[i].meta, &rids[i], &k, err, sizeof err) != CM_OK) {
            count_bad(s);
            rpc_fail(call, RPC_INVALID_ARGUMENT, "%s", err);
            goto out;
        }
        rg[i] = (ps_row_grad){.table = m.rows[i].meta->table, .ids = rids[i], .n = k,
                              .dtype = (int)m.rows[i].meta->dtype, .data = m.rows[i].data,
                              .len = m.rows[i].len};
    }
    ps_grad small[16];
    ps_grad *g = m.ntensors <= 16 ? small : cm_malloc((size_t)m.ntensors * sizeof *g);
    for (int i = 0; i < m.ntensors; i++) {
        const ps_wire_tensor *t = &m.tensors[i];
        g[i] = (ps_grad){.part = t->meta->part,
                         .dtype = (int)t->meta->dtype, /* ps_shard checks it. */
                         .nshape = (int)t->meta->n_shape,
                         .shape = t->meta->shape,
                         .data = t->data,
                         .len = t->len,
                         .pieces = t->pieces,
                         .npieces = t->npieces};
    }
    *step = r->step;
    if (parts) {
        *nparts = m.ntensors;
        *parts = cm_malloc(((size_t)m.ntensors + 1) * sizeof **parts);
        for (int i = 0; i < m.ntensors; i++) (*parts)[i] = g[i].part;
    }
    int rc;
    for (;;) {
        rc = ps_shard_push_step(s->shard, (int)r->cluster->rank, r->step,
                                r->step_parts > INT_MAX ? INT_MAX : (int)r->step_parts, g,
                                m.ntensors, rg, m.nrows, r->rows_final, version, err,
                                sizeof err);
        if (rc != PS_PUSH_BUSY) break;
        /* Frozen for a checkpoint: wait for the writer to thaw it. */
        pthread_mutex_lock(&s->ck_mu);
        while (((s->cfg.checkpoint_sync && s->job.snap) || s->deferred || s->thawing) &&
               !s->ck_stop)
            pthread_cond_wait(&s->ck_cv, &s->ck_mu);
        int stopping = s->ck_stop;
        pthread_mutex_unlock(&s->ck_mu);
        if (stopping) {
            snprintf(err, sizeof err, "shard %d is stopping", s->cfg.shard);
            break; /* PS_PUSH_BUSY: UNAVAILABLE below. */
        }
    }
    if (g != small) free(g);
    if (rc == PS_PUSH_OK || rc == PS_PUSH_DUPLICATE) {
        *duplicate = rc == PS_PUSH_DUPLICATE;
        ok = 1;
    } else {
        rpc_fail(call,
                 rc == PS_PUSH_INVALID   ? RPC_INVALID_ARGUMENT
                 : rc == PS_PUSH_NOMEM   ? RPC_RESOURCE_EXHAUSTED
                 : rc == PS_PUSH_SKIPPED ? RPC_OUT_OF_RANGE
                 : rc == PS_PUSH_BUSY    ? RPC_UNAVAILABLE
                                         : RPC_FAILED_PRECONDITION,
                 "%s", err);
        if (parts) {
            free(*parts);
            *parts = NULL;
        }
    }
out:
    if (!ok && want) {
        row_answer_free(*want);
        *want = NULL;
    }
    for (int i = 0; rids && i < m.nrows; i++) free(rids[i]);
    free(rids);
    free(rg);
    ps_wire_msg_free(&m);
    return ok;
}

static void on_push(void *ctx, rpc_call *call, const rpc_piece *req, int nreq, size_t len) {
    ps_server *s = ctx;
    atomic_fetch_add(&s->bytes_in, len);
    int64_t step = 0, version = 0;
    int duplicate = 0;
    double t0 = cm_now();
    pthread_rwlock_rdlock(&s->gate);
    int ok = do_push(s, call, req, nreq, &step, &version, &duplicate, NULL, NULL, NULL, NULL);
    pthread_rwlock_unlock(&s->gate);
    if (!ok) return;
    cm_hist_add(&s->push_hist, cm_now() - t0);
    Psrpc__PushReply rep = PSRPC__PUSH_REPLY__INIT;
    rep.version = version;
    rep.duplicate = duplicate;
    reply_packed(call, &rep.base);
}

/* ------------------------------------------------------------ Pull */

static void release_snapshot(void *ud) { ps_snapshot_unref(ud); }

typedef struct pull_ctx {
    ps_server *s;
    rpc_call *call;
    int nparts;      /* 0: every partition of the shard; -1: none. */
    uint32_t *parts; /* Placement ids to answer with (PushPull), owned. */
    row_answer *rows; /* Rows to answer with (NULL: none), owned until
                       * the reply's segments release it. */
    int or_final;     /* An evaluator's pull (PullRequest.or_final). */
    int64_t min_version; /* What it asked for. */
    double t0;        /* When it came (PushPull: when its push was taken). */
} pull_ctx;

/* How long a Shutdown waits for an evaluator's pull of the final version. */
#define FINAL_GRACE_S 3.0

static void answer_pull(void *ud, ps_snapshot *snap) {
    pull_ctx *pc = ud;
    ps_server *s = pc->s;
    rpc_call *call = pc->call;
    /* The evaluator has the final version (answered below what it asked:
     * only the end of training does that): stop now. An answer it asked for
     * may come after the Shutdown too (another shard still a version
     * behind), and then its pull of the final version is still to come. */
    if (pc->or_final && snap && ps_snapshot_version(snap) < pc->min_version) {
        pthread_mutex_lock(&s->mu);
        if (s->finishing) s->final_answers++;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
    if (!snap) {
        free(pc->parts);
        row_answer_free(pc->rows);
        free(pc);
        pthread_mutex_lock(&s->mu);
        int stopping = s->stopping;
        pthread_mutex_unlock(&s->mu);
        if (stopping)
            rpc_fail(call, RPC_UNAVAILABLE, "PS shard %d is shutting down", s->cfg.shard);
        else
            rpc_fail(call, RPC_ABORTED,
                     "PS shard %d rolled back, or abandoned the step this call waited for (a "
                     "worker rejoined with it half pushed)", s->cfg.shard);
        return;
    }
    cm_hist_add(&s->pull_hist, cm_now() - pc->t0); /* Parked time included. */
    int nparts = pc->nparts;
    const uint32_t *parts = pc->parts;
    if (!nparts) parts = ps_shard_parts(s->shard, &nparts);
    ps_wire_writer w;
    ps_wire_writer_init(&w);
    Psrpc__PullReply rep = PSRPC__PULL_REPLY__INIT;
    rep.version = ps_snapshot_version(snap);
    ps_wire_put_message(&w, &rep.base);
    for (int i = 0; i < nparts; i++) {
        ps_snapshot_ref(snap);
        ps_wire_put_part(&w, 2, s->model, s->pl, parts[i],
                         ps_snapshot_part(snap, ps_shard_local_index(s->shard, parts[i])),
                         release_snapshot, snap);
    }
    row_answer *ra = pc->rows;
    if (ra) {
        /* The rows were read into ra->vals as the pull was answered; the
         * segments send them in place and the last release frees them. */
        __atomic_store_n(&ra->refs, ra->n + 1, __ATOMIC_RELAXED);
        for (int i = 0; i < ra->n; i++) {
            const ps_row_req *q = &ra->rq[i];
            size_t bytes = q->n * (size_t)ps_shard_row_dim(s->shard, q->table) * sizeof(float);
            ps_wire_put_rows(&w, 3, q->table, q->ids, q->n, PSRPC__DTYPE__DTYPE_FLOAT32, q->out,
                             bytes, row_answer_release, ra);
        }
    }
    int nsegs;
    const rpc_seg *segs = ps_wire_segs(&w, &nsegs);
    uint64_t out = 0;
    for (int i = 0; i < nsegs; i++) out += segs[i].len;
    atomic_fetch_add(&s->bytes_out, out);
    rpc_reply(call, segs, nsegs);
    ps_wire_writer_free(&w, 0);
    ps_snapshot_unref(snap);
    if (ra) row_answer_release(ra); /* The reference of this function. */
    free(pc->parts);
    free(pc);
}

/* A page of one table's rows, for export (PullRequest.dump). */
static void answer_dump(ps_server *s, rpc_call *call, const Psrpc__PullRequest *r) {
    int dim = ps_shard_row_dim(s->shard, r->dump_table);
    /* Pages stay well inside the message limit. */
    size_t max = r->dump_max ? r->dump_max : 65536;
    size_t cap = (size_t)(s->cfg.max_message ? s->cfg.max_message : (64 << 20)) / 2 /
                 ((size_t)(dim > 0 ? dim : 1) * sizeof(float) + 8);
    if (max > cap) max = cap;
    if (dim < 0) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "dump of table %u: the model has %d tables",
                 r->dump_table, s->model->ntables);
        return;
    }
    uint64_t *ids = cm_malloc(max * sizeof *ids);
    float *vals = cm_alloc_aligned(max * (size_t)dim * sizeof(float) + 64);
    if (!vals) abort();
    uint64_t next = 0;
    size_t n = ps_shard_dump_rows(s->shard, r->dump_table, r->dump_from, max, ids, vals, &next);
    ps_shard_stats st;
    ps_shard_stats_get(s->shard, &st);
    Psrpc__PullReply rep = PSRPC__PULL_REPLY__INIT;
    rep.version = st.version;
    rep.dump_next = next;
    ps_wire_writer w;
    ps_wire_writer_init(&w);
    ps_wire_put_message(&w, &rep.base);
    ps_wire_put_rows(&w, 3, r->dump_table, ids, n, PSRPC__DTYPE__DTYPE_FLOAT32, vals,
                     n * (size_t)dim * sizeof(float), NULL, NULL);
    int nsegs;
    const rpc_seg *segs = ps_wire_segs(&w, &nsegs);
    rpc_reply(call, segs, nsegs); /* Copies what it sends before returning. */
    ps_wire_writer_free(&w, 0);
    free(ids);
    free(vals);
}

/* A Pull waits for min_version; one that could never come would hold its
 * call (and its memory) until the client goes away. The versions a run
 * reaches are its steps, far fewer than PS_PULL_MAX_AHEAD beyond now. */
#define PS_PULL_MAX_AHEAD (INT64_C(1) << 24)
static int check_reach(ps_server *s, rpc_call *call, int64_t min_version) {
    if (min_version <= PS_PULL_MAX_AHEAD) return 1;
    ps_shard_stats st;
    ps_shard_stats_get(s->shard, &st);
    if (min_version - st.version <= PS_PULL_MAX_AHEAD) return 1;
    count_bad(s);
    rpc_fail(call, RPC_OUT_OF_RANGE,
             "min_version %lld is more than %lld versions ahead of the shard's %lld",
             (long long)min_version, (long long)PS_PULL_MAX_AHEAD, (long long)st.version);
    return 0;
}

/* A Pull that would wait while max_parked already do is refused: a client
 * could otherwise hold any number of calls (and their memory). PushPull's
 * waits are not counted against it: only the workers' steps make them. */
static int check_room(ps_server *s, rpc_call *call, int64_t min_version) {
    int max = s->cfg.max_parked ? s->cfg.max_parked : PS_SERVER_MAX_PARKED;
    if (!ps_shard_park_full(s->shard, min_version, max)) return 1;
    rpc_fail(call, RPC_RESOURCE_EXHAUSTED,
             "%d pulls already wait for versions of this shard (--max-parked-pulls)", max);
    return 0;
}

/* PullRequest.parts: partitions of this shard, none twice, and not with
 * or_final (an evaluator's pull is answered once, whole). */
static int check_pull_parts(ps_server *s, rpc_call *call, const Psrpc__PullRequest *r) {
    if (!r->n_parts) return 1;
    const char *why = NULL;
    uint32_t bad = 0;
    if (r->or_final) why = "a pull of some partitions cannot be or_final";
    else bad = r->parts[0];
    if (!why && r->n_parts > (size_t)s->pl->nparts) why = "more partitions than the model has";
    uint8_t *seen = why ? NULL : cm_calloc((size_t)s->pl->nparts, 1);
    for (size_t i = 0; !why && i < r->n_parts; i++) {
        bad = r->parts[i];
        if (bad >= (uint32_t)s->pl->nparts)
            why = "no such partition";
        else if (s->pl->parts[bad].shard != s->cfg.shard)
            why = "the partition belongs to another shard";
        else if (seen[bad]++)
            why = "the partition is asked for twice";
    }
    free(seen);
    if (!why) return 1;
    count_bad(s);
    rpc_fail(call, RPC_INVALID_ARGUMENT, "pull of partition %u from shard %d: %s", bad,
             s->cfg.shard, why);
    return 0;
}

static void on_pull(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    atomic_fetch_add(&s->bytes_in, len);
    if (!admit(s, call, &psrpc__pull_request__descriptor, req, len)) return;
    Psrpc__PullRequest *r = psrpc__pull_request__unpack(NULL, len, req);
    if (!r) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed PullRequest");
        return;
    }
    if (r->dump) {
        if (need_shard(s, call, RPC_UNAVAILABLE) && check_cluster(s, call, r->cluster))
            answer_dump(s, call, r);
        psrpc__pull_request__free_unpacked(r, NULL);
        return;
    }
    double t0 = cm_now();
    if (r->or_final && !r->rows_only && !r->n_want && !r->n_parts) {
        /* An evaluator's pull (of this cluster, or before the shard knows
         * its model) counts at once, also when refused below (before the
         * chief's Initialize, or during a recovery): it retries, and the
         * Shutdown must wait for it. A run shorter than its retry backoff
         * used to end before it was counted, and the evaluator, having
         * evaluated nothing, failed. */
        pthread_mutex_lock(&s->mu);
        if (!s->shard || (r->cluster && r->cluster->fingerprint == s->fingerprint))
            s->evaluator_seen = 1;
        pthread_mutex_unlock(&s->mu);
    }
    pthread_rwlock_rdlock(&s->gate);
    row_answer *ra = NULL;
    if (need_shard(s, call, RPC_UNAVAILABLE) && check_cluster(s, call, r->cluster) &&
        check_epoch(s, call, r->cluster) && check_pull_parts(s, call, r) &&
        check_reach(s, call, r->min_version) &&
        check_room(s, call, r->min_version) &&
        (!r->n_want || (ra = decode_want(s, call, r->want, r->n_want, r->train)))) {
        pull_ctx *pc = cm_calloc(1, sizeof *pc);
        pc->s = s;
        pc->call = call;
        pc->nparts = r->rows_only ? -1 : 0;
        if (r->n_parts && !r->rows_only) {
            pc->nparts = (int)r->n_parts;
            pc->parts = cm_malloc(r->n_parts * sizeof *pc->parts);
            memcpy(pc->parts, r->parts, r->n_parts * sizeof *pc->parts);
        }
        pc->rows = ra;
        pc->or_final = r->or_final && !r->rows_only && !ra; /* (Counted above.) */
        pc->min_version = r->min_version;
        pc->t0 = t0;
        if (ra)
            ps_shard_pull_rows(s->shard, r->min_version, ra->rq, ra->n, ra->train, answer_pull,
                               pc);
        else if (r->or_final && !r->rows_only)
            ps_shard_pull_final(s->shard, r->min_version, answer_pull, pc);
        else
            ps_shard_pull(s->shard, r->min_version, answer_pull, pc);
    }
    pthread_rwlock_unlock(&s->gate);
    psrpc__pull_request__free_unpacked(r, NULL);
}

static void on_push_pull(void *ctx, rpc_call *call, const rpc_piece *req, int nreq,
                         size_t len) {
    ps_server *s = ctx;
    atomic_fetch_add(&s->bytes_in, len);
    int64_t step = 0, version = 0;
    int duplicate = 0, nparts = 0, with_rows = 0;
    uint32_t *parts = NULL;
    row_answer *ra = NULL;
    double t0 = cm_now();
    pthread_rwlock_rdlock(&s->gate);
    if (!do_push(s, call, req, nreq, &step, &version, &duplicate, &parts, &nparts, &ra,
                 &with_rows)) {
        pthread_rwlock_unlock(&s->gate);
        return;
    }
    double t1 = cm_now();
    cm_hist_add(&s->push_hist, t1 - t0);
    /* The reply carries the pushed partitions: in sync mode as soon as they
     * are final for step + 1 (maybe before the rest of the shard), in async
     * mode at once, from the newest version. */
    pull_ctx *pc = cm_calloc(1, sizeof *pc);
    pc->s = s;
    pc->call = call;
    pc->nparts = nparts ? nparts : -1;
    pc->parts = parts;
    pc->rows = ra;
    pc->t0 = t1;
    if (with_rows) /* A sparse model's step: the pushed partitions and the
                    * rows asked for, once the whole step is applied. */
        ps_shard_pull_rows(s->shard, ps_shard_is_async(s->shard) ? 0 : step + 1,
                           ra ? ra->rq : NULL, ra ? ra->n : 0, ra ? ra->train : 0, answer_pull,
                           pc);
    else if (ps_shard_is_async(s->shard))
        ps_shard_pull(s->shard, 0, answer_pull, pc);
    else if (nparts == 0) /* A shard that owns nothing. */
        ps_shard_pull(s->shard, step + 1, answer_pull, pc);
    else if (ps_shard_pull_parts(s->shard, step, parts, nparts, answer_pull, pc) != CM_OK)
        answer_pull(pc, NULL); /* Cannot happen: the push validated them. */
    pthread_rwlock_unlock(&s->gate);
}

/* A parked pull's client went away: forget it, unless it is being
 * answered (then the answer finishes the call). */
static int pull_of_call(void *ud, void *call) { return ((pull_ctx *)ud)->call == call; }

static void on_cancel(void *ctx, rpc_call *call) {
    ps_server *s = ctx;
    ps_shard *sh = get_shard(s);
    void *ud;
    if (!sh || !ps_shard_cancel_pull(sh, pull_of_call, call, &ud)) return;
    pull_ctx *pc = ud;
    free(pc->parts);
    row_answer_free(pc->rows);
    free(pc);
    rpc_fail(call, RPC_CANCELLED, "the client went away");
}

/* ------------------------------------------------------------ Stats, Shutdown */

static void on_stats(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    if (!admit(s, call, &psrpc__stats_request__descriptor, req, len)) return;
    Psrpc__StatsRequest *r = psrpc__stats_request__unpack(NULL, len, req);
    if (!r) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed StatsRequest");
        return;
    }
    /* A tool (psctl) may read the counters without the fingerprint, and
     * gets an answer before the model came too. */
    if (!r->cluster && !get_shard(s)) {
        Psrpc__StatsReply rep = PSRPC__STATS_REPLY__INIT;
        rep.shard = (uint32_t)s->cfg.shard;
        rep.identity = (char *)"(no model yet: waiting for the chief's Initialize)";
        reply_packed(call, &rep.base);
    } else if (need_shard(s, call, RPC_UNAVAILABLE) &&
        (!r->cluster || check_cluster(s, call, r->cluster))) {
        ps_shard_stats st;
        ps_shard_stats_get(s->shard, &st);
        Psrpc__StatsReply rep = PSRPC__STATS_REPLY__INIT;
        rep.shard = (uint32_t)s->cfg.shard;
        rep.identity = s->identity;
        rep.rows = st.rows;
        rep.rows_pulled = st.rows_pulled;
        rep.rows_pushed = st.rows_pushed;
        rpc_server_stats rs;
        rpc_server_stats_get(s->rpc, &rs);
        rep.parked_pulls = (uint32_t)st.parked;
        rep.refused_unauthenticated = rs.unauthenticated;
        rep.refused_denied = rs.denied;
        rep.refused_exhausted = rs.exhausted + st.parked_refused;
        rep.cancelled_pulls = rs.cancelled_held;
        rep.nonfinite_pushes = st.nonfinite_pushes;
        rep.mem_bytes = st.mem_bytes;
        rep.mem_limit = st.mem_limit;
        rep.rows_resident = st.row_cache.resident;
        rep.rows_on_disk = st.row_cache.on_disk;
        rep.row_hits = st.row_cache.hits;
        rep.row_misses = st.row_cache.misses;
        rep.row_evictions = st.row_cache.evictions;
        rep.row_bytes_written = st.row_cache.bytes_written;
        rep.rows_budget = st.row_cache.budget;
        rep.rows_not_admitted = st.row_cache.not_admitted;
        rep.row_updates_dropped = st.row_cache.dropped_updates;
        rep.rows_expired = st.row_cache.expired;
        pthread_mutex_lock(&s->ck_mu);
        rep.ckpt_rows = s->ck_rows;
        rep.ckpt_row_bytes = s->ck_row_bytes;
        pthread_mutex_unlock(&s->ck_mu);
        int64_t wsteps[1024];
        int nw = ps_shard_worker_steps(s->shard, wsteps, 1024);
        rep.n_worker_steps = (size_t)(nw < 1024 ? nw : 1024);
        rep.worker_steps = wsteps;
        rep.version = st.version;
        rep.pushes = st.pushes;
        rep.duplicate_pushes = st.duplicate_pushes;
        rep.stale_pushes = st.stale_pushes;
        rep.backup_closes = st.backup_closes;
        rep.updates_lost = st.updates_lost;
        rep.early_pushes = st.early_pushes;
        rep.pulls = st.pulls;
        rep.bad_requests = st.bad_requests;
        rep.num_parts = (uint32_t)st.nparts;
        rep.bytes = st.bytes;
        rep.min_worker_step = st.min_worker_step;
        pthread_mutex_lock(&s->mu);
        rep.recovering = s->recovering;
        pthread_mutex_unlock(&s->mu);
        reply_packed(call, &rep.base);
    }
    psrpc__stats_request__free_unpacked(r, NULL);
}

static void on_shutdown(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    if (!admit(s, call, &psrpc__shutdown_request__descriptor, req, len)) return;
    Psrpc__ShutdownRequest *r = psrpc__shutdown_request__unpack(NULL, len, req);
    if (!r) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed ShutdownRequest");
        return;
    }
    if (need_shard(s, call, RPC_FAILED_PRECONDITION) && check_cluster(s, call, r->cluster)) {
        char why[256];
        snprintf(why, sizeof why, "shutdown requested by rank %u: %s", r->cluster->rank,
                 r->reason && r->reason[0] ? r->reason : "(no reason)");
        Psrpc__ShutdownReply rep = PSRPC__SHUTDOWN_REPLY__INIT;
        reply_packed(call, &rep.base);
        /* (The shard's lock is not taken under mu: a publish takes mu.) */
        ps_shard_config sc;
        int sync = ps_shard_config_get(s->shard, &sc) && sc.sync;
        pthread_mutex_lock(&s->mu);
        if (r->failed) s->stop_failed = 1;
        /* Sync, after the chief's final commit: the other training workers
         * wait for it (a Checkpoints now and then) before they exit. */
        int others = 0;
        if (sync && durable(s) && s->final_commit >= 0 && !r->failed)
            others = sc.num_workers - 1 < 63 ? (int)sc.num_workers - 1 : 63;
        s->told_needed = others;
        /* An evaluator pulls now and then: its pull of the final version
         * may still be on its way (it evaluates the one before). Keep
         * serving it, and the workers' last looks, for up to FINAL_GRACE_S
         * before stopping. */
        int wait_eval = (s->evaluator_seen || told_count(s) < others) && !r->failed &&
                        !s->stopping;
        if (wait_eval) {
            s->finishing = 1;
            s->stop_after = cm_now() + FINAL_GRACE_S;
            snprintf(s->pending_reason, sizeof s->pending_reason, "%s", why);
        }
        pthread_mutex_unlock(&s->mu);
        ps_shard_finish(s->shard);
        if (!wait_eval) ps_server_request_stop(s, why);
    }
    psrpc__shutdown_request__free_unpacked(r, NULL);
}

/* ------------------------------------------------------------ checkpoints */

/* The extra record: the shard's config, little-endian. */
#define CFG_MAGIC "pscfg4\0\0"
#define CFG_LEN (8 + 17 * 4 + 8 * 4 + 4) /* v4: + backup sync's ms */
#define CFG_MAGIC_V3 "pscfg3\0\0"
#define CFG_LEN_V3 (8 + 17 * 4 + 8 * 4) /* v3: + Adagrad's accumulator, the tables' optimizer */
#define CFG_MAGIC_V2 "pscfg2\0\0"
#define CFG_LEN_V2 (8 + 4 + 5 * 4 + 8 + 4 * 4 + 8 + 4 + 8) /* v2: + init_hash, data layout */
#define CFG_MAGIC_V1 "pscfg1\0\0"
#define CFG_LEN_V1 (8 + 4 + 5 * 4 + 8 + 4 * 4)

static uint8_t *put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) *p++ = (uint8_t)(v >> (8 * i));
    return p;
}
static const uint8_t *get32(const uint8_t *p, uint32_t *v) {
    *v = 0;
    for (int i = 0; i < 4; i++) *v |= (uint32_t)p[i] << (8 * i);
    return p + 4;
}
static uint32_t fbits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bitsf(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void cfg_encode(const ps_shard_config *c, uint8_t out[CFG_LEN]) {
    uint8_t *p = out;
    memcpy(p, CFG_MAGIC, 8);
    p = put32(p + 8, (uint32_t)c->optim.kind);
    p = put32(p, fbits(c->optim.lr));
    p = put32(p, fbits(c->optim.momentum));
    p = put32(p, fbits(c->optim.beta1));
    p = put32(p, fbits(c->optim.beta2));
    p = put32(p, fbits(c->optim.epsilon));
    p = put32(p, (uint32_t)c->seed);
    p = put32(p, (uint32_t)(c->seed >> 32));
    p = put32(p, (uint32_t)c->num_workers);
    p = put32(p, (uint32_t)c->sync);
    p = put32(p, (uint32_t)c->aggregate);
    p = put32(p, (uint32_t)c->zero_init);
    p = put32(p, (uint32_t)c->init_hash);
    p = put32(p, (uint32_t)(c->init_hash >> 32));
    p = put32(p, c->global_batch);
    p = put32(p, (uint32_t)c->steps_per_epoch);
    p = put32(p, (uint32_t)(c->steps_per_epoch >> 32));
    p = put32(p, fbits(c->optim.initial_accumulator));
    const ps_optim_cfg *t = &c->table_optim;
    p = put32(p, (uint32_t)t->kind);
    p = put32(p, fbits(t->lr));
    p = put32(p, fbits(t->momentum));
    p = put32(p, fbits(t->beta1));
    p = put32(p, fbits(t->beta2));
    p = put32(p, fbits(t->epsilon));
    p = put32(p, fbits(t->initial_accumulator));
    put32(p, (uint32_t)c->backup_ms);
}

static int cfg_decode(const void *buf, size_t len, ps_shard_config *c) {
    int v1 = len == CFG_LEN_V1 && memcmp(buf, CFG_MAGIC_V1, 8) == 0;
    int v2 = len == CFG_LEN_V2 && memcmp(buf, CFG_MAGIC_V2, 8) == 0;
    int v3 = len == CFG_LEN_V3 && memcmp(buf, CFG_MAGIC_V3, 8) == 0;
    if (!v1 && !v2 && !v3 && (len != CFG_LEN || memcmp(buf, CFG_MAGIC, 8) != 0))
        return CM_ECORRUPT;
    const uint8_t *p = (const uint8_t *)buf + 8;
    uint32_t v[26] = {0};
    for (int i = 0; i < (v1 ? 12 : v2 ? 17 : v3 ? 25 : 26); i++) p = get32(p, &v[i]);
    *c = (ps_shard_config){.optim = {.kind = (int)v[0], .lr = bitsf(v[1]),
                                     .momentum = bitsf(v[2]), .beta1 = bitsf(v[3]),
                                     .beta2 = bitsf(v[4]), .epsilon = bitsf(v[5])},
                           .seed = (uint64_t)v[6] | (uint64_t)v[7] << 32,
                           .num_workers = (int)v[8],
                           .sync = (int)v[9],
                           .aggregate = (int)v[10],
                           .zero_init = (int)v[11],
                           .init_hash = (uint64_t)v[12] | (uint64_t)v[13] << 32,
                           .global_batch = v[14],
                           .steps_per_epoch = (uint64_t)v[15] | (uint64_t)v[16] << 32,
                           .backup_ms = v[25]};
    if (!v1 && !v2) {
        c->optim.initial_accumulator = bitsf(v[17]);
        c->table_optim = (ps_optim_cfg){.kind = (int)v[18], .lr = bitsf(v[19]),
                                        .momentum = bitsf(v[20]), .beta1 = bitsf(v[21]),
                                        .beta2 = bitsf(v[22]), .epsilon = bitsf(v[23]),
                                        .initial_accumulator = bitsf(v[24])};
    } else {
        /* Written before those existed: the defaults they ran with. */
        c->optim.initial_accumulator = ps_optim_defaults(c->optim.kind, 1.0f).initial_accumulator;
    }
    return CM_OK;
}

/* A changed row into the job's buffer (ps_rows_checkpoint callback). */
typedef struct rows_copy {
    ckpt_job *job;
    const ps_rows *rows;
} rows_copy;

static void copy_row(void *ud, int table, uint64_t id, int64_t count, int64_t last,
                     const float *row) {
    rows_copy *c = ud;
    ckpt_job *j = c->job;
    uint32_t nf = (uint32_t)ps_rows_dim(c->rows, table) * (uint32_t)(1 + ps_rows_nslots(c->rows));
    size_t rec = ROW_HEAD + (size_t)nf * sizeof(float);
    if (j->rows_len + rec > j->rows_cap) {
        size_t cap = j->rows_cap ? j->rows_cap : 1 << 20;
        while (cap < j->rows_len + rec) cap *= 2;
        j->rows = cm_realloc(j->rows, cap);
        j->rows_cap = cap;
    }
    uint8_t *p = j->rows + j->rows_len;
    uint32_t t = (uint32_t)table;
    memcpy(p, &t, 4);
    memcpy(p + 4, &nf, 4);
    memcpy(p + 8, &id, 8);
    memcpy(p + 16, &count, 8);
    memcpy(p + 24, &last, 8);
    memcpy(p + ROW_HEAD, row, (size_t)nf * sizeof(float));
    j->rows_len += rec;
    j->nrows++;
}

/* The publish hook (the shard's lock held): hand the version to the writer
 * and freeze the shard until it is committed (--checkpoint-sync). With
 * --checkpoint-async the shard goes on, unless the writer is still busy
 * with the last one: then the shard freezes at this version, which the
 * writer takes next (on_publish again, through ps_shard_publish_now), so a
 * crash never loses more than two intervals. */
static int on_publish(void *ud, ps_snapshot *snap, const float *slots, int nslots,
                      const ps_shard_config *cfg, ps_rows *rows, const int64_t *worker_steps) {
    ps_server *s = ud;
    int64_t v = ps_snapshot_version(snap);
    pthread_mutex_lock(&s->ck_mu);
    if (s->ck_stop) {
        pthread_mutex_unlock(&s->ck_mu);
        return 0;
    }
    if (s->job.snap) {
        /* Only --checkpoint-async gets here (a synchronous shard is frozen
         * until the writer is done), and only at a hook's version. */
        cm_debug("checkpoint of version %lld waits: version %lld is still being written",
                 (long long)v, (long long)ps_snapshot_version(s->job.snap));
        s->deferred = v;
        pthread_mutex_unlock(&s->ck_mu);
        return 1;
    }
    size_t n = (size_t)nslots * ps_shard_numel(s->shard);
    if (n > s->job.slots_cap) {
        free(s->job.slots);
        s->job.slots = cm_alloc_aligned(n * sizeof(float));
        if (!s->job.slots) abort();
        s->job.slots_cap = n;
    }
    if (n && slots) memcpy(s->job.slots, slots, n * sizeof(float));
    s->job.nslots = slots ? nslots : 0;
    s->job.cfg = *cfg;
    if (!s->job.wsteps) s->job.wsteps = cm_calloc((size_t)cfg->num_workers + 1, sizeof(int64_t));
    s->job.nworkers = cfg->num_workers; /* The config never changes once set. */
    memcpy(s->job.wsteps, worker_steps, (size_t)cfg->num_workers * sizeof(int64_t));
    s->job.rows_len = 0;
    s->job.nrows = 0;
    if (rows) {
        /* Only the rows changed since the last checkpoint: the others are
         * in the row store already (an adopted model with tables always
         * has one when it checkpoints). */
        int nt = s->model->ntables;
        if (!s->job.counts) s->job.counts = cm_calloc((size_t)nt + 1, sizeof *s->job.counts);
        rows_copy c = {.job = &s->job, .rows = rows};
        ps_rows_checkpoint(rows, copy_row, &c);
        for (int t = 0; t < nt; t++) s->job.counts[t] = ps_rows_count(rows, t);
    }
    ps_snapshot_ref(snap);
    s->job.snap = snap;
    pthread_cond_broadcast(&s->ck_cv);
    pthread_mutex_unlock(&s->ck_mu);
    return s->cfg.checkpoint_sync;
}

/* Drop the generations every shard has superseded: those older than the
 * newest version the chief saw committed everywhere (gc_floor), and beyond
 * GC_KEEP_MAX generations the oldest, so that a cluster whose chief never
 * says does not fill the disk. */
#define GC_KEEP_MAX 8
static void gc(ps_server *s) {
    char err[512];
    pthread_mutex_lock(&s->ck_mu);
    int64_t floor = s->gc_floor;
    pthread_mutex_unlock(&s->ck_mu);
    int64_t committed[GC_KEEP_MAX];
    int n = st_store_committed(s->store, committed, GC_KEEP_MAX, err, sizeof err);
    if (n < 1) return;
    int64_t keep = floor;
    if (keep > committed[0]) keep = committed[0];
    if (n > GC_KEEP_MAX && committed[GC_KEEP_MAX - 1] > keep) keep = committed[GC_KEEP_MAX - 1];
    if (keep <= 0) return;
    if (st_store_drop_older(s->store, keep, err, sizeof err) != CM_OK) {
        cm_warn("cannot drop checkpoints older than %lld: %s", (long long)keep, err);
        return;
    }
    /* The row store's entries no generation from 'keep' on reads: once as
     * many rows were written since the last time as the tables hold (at
     * least 64 Ki), so a compaction's read of every entry costs O(1) a
     * write. */
    if (!s->rowdb) return;
    st_rowdb_stats rs;
    st_rowdb_stats_get(s->rowdb, &rs);
    pthread_mutex_lock(&s->ck_mu);
    uint64_t since = rs.puts - s->compact_puts, rows = s->ck_total;
    int64_t last_keep = s->compact_keep;
    pthread_mutex_unlock(&s->ck_mu);
    /* Nothing more to drop below the same 'keep' but what later rollbacks
     * abandoned (rare). */
    if (keep <= last_keep || since < (rows > (1u << 16) ? rows : (1u << 16))) return;
    double t0 = cm_now();
    int64_t gone = st_rowdb_compact(s->rowdb, keep, err, sizeof err);
    if (gone < 0) {
        cm_warn("cannot compact the row store: %s", err);
        return;
    }
    pthread_mutex_lock(&s->ck_mu);
    s->compact_puts = rs.puts;
    s->compact_keep = keep;
    pthread_mutex_unlock(&s->ck_mu);
    cm_info("row store compacted below version %lld: %lld entries dropped in %.0f ms",
            (long long)keep, (long long)gone, (cm_now() - t0) * 1e3);
}

/* This process's anonymous resident memory (RssAnon in /proc/self/status,
 * MiB; 0 if unreadable): the heap and stacks, without the file pages
 * mapped in, which for LevelDB's table files (it maps them to read them)
 * are page cache the kernel can take back. */
static double rss_anon_mib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return 0;
    char line[256];
    double kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "RssAnon: %lf", &kib) == 1) break;
    fclose(f);
    return kib / 1024.0;
}

/* The highest anonymous RSS seen at a sample (after every checkpoint, when
 * its copy of the changed rows is largest, and at exit). */
static void sample_anon(ps_server *s) {
    double a = rss_anon_mib();
    pthread_mutex_lock(&s->ck_mu);
    if (a > s->peak_anon) s->peak_anon = a;
    pthread_mutex_unlock(&s->ck_mu);
}

static void log_row_cache(ps_server *s, ps_shard *sh, const char *when, int whole);

/* A checkpoint's rows could not be written: they were handed over as
 * written (ps_rows_checkpoint), so going on would lose them. The process
 * stops; its supervisor restarts it and the cluster rolls back. */
static void rows_fatal(ps_server *s, int64_t v, const char *err) {
    fprintf(stderr, "fatal: checkpoint of version %lld: the row store %s: %s; stopping (its "
            "rows would be lost)\n", (long long)v, st_rowdb_path(s->rowdb), err);
    fflush(stderr);
    _exit(CM_EXIT_RETRY);
}

/* The job's changed rows into the row store, tagged v, and every write
 * before them (evictions tagged <= v) made durable. */
static uint64_t write_rows(ps_server *s, const ckpt_job *j, int64_t v) {
    st_rowdb_batch *b = st_rowdb_batch_create();
    char err[512];
    uint64_t bytes = 0;
    for (size_t at = 0; at < j->rows_len;) {
        const uint8_t *p = j->rows + at;
        uint32_t t, nf;
        uint64_t id;
        int64_t count, last;
        memcpy(&t, p, 4);
        memcpy(&nf, p + 4, 4);
        memcpy(&id, p + 8, 8);
        memcpy(&count, p + 16, 8);
        memcpy(&last, p + 24, 8);
        st_rowdb_batch_put(s->rowdb, b, (int)t, id, v, count, last,
                           (const float *)(const void *)(p + ROW_HEAD), nf);
        at += ROW_HEAD + (size_t)nf * sizeof(float);
        /* Batches of about 4 MiB: LevelDB's memtable takes a batch whole. */
        if (st_rowdb_batch_bytes(b) >= ((size_t)4 << 20)) {
            bytes += st_rowdb_batch_bytes(b);
            if (st_rowdb_write(s->rowdb, b, 0, err, sizeof err) != CM_OK) rows_fatal(s, v, err);
        }
    }
    /* Always one synced write, even of no row. */
    st_rowdb_batch_mark(s->rowdb, b, v);
    bytes += st_rowdb_batch_bytes(b);
    if (st_rowdb_write(s->rowdb, b, 1, err, sizeof err) != CM_OK ||
        st_rowdb_sync(s->rowdb, err, sizeof err) != CM_OK)
        rows_fatal(s, v, err);
    st_rowdb_batch_destroy(b);
    return bytes;
}

/* Write one job (ck_mu not held: the job is the writer's while snap is
 * set). Errors of the checkpoint store are logged and training goes on
 * (the next checkpoint tries again); the row store's stop the process. */
static void write_job(ps_server *s, const ckpt_job *j) {
    int nparts;
    ps_shard_parts(s->shard, &nparts);
    size_t numel = ps_shard_numel(s->shard);
    int nt = j->counts ? s->model->ntables : 0;
    int nblobs = nparts * (1 + j->nslots) + nt + 1;
    st_blob *b = cm_malloc((size_t)nblobs * sizeof *b);
    uint8_t *counts = cm_malloc((size_t)(nt + j->nworkers + 1) * 8);
    const uint32_t *parts = ps_shard_parts(s->shard, &nparts);
    int k = 0;
    for (int i = 0; i < nparts; i++) {
        size_t off = ps_shard_part_offset(s->shard, i);
        size_t len = (ps_shard_part_offset(s->shard, i + 1) - off) * sizeof(float);
        b[k++] = (st_blob){.part = parts[i], .kind = ST_KIND_PARAMS,
                           .data = ps_snapshot_part(j->snap, i), .len = len};
        for (int sl = 0; sl < j->nslots; sl++)
            b[k++] = (st_blob){.part = parts[i], .kind = (uint32_t)sl + 1,
                               .data = j->slots + (size_t)sl * numel + off, .len = len};
    }
    for (int t = 0; t < nt; t++) {
        for (int i = 0; i < 8; i++) counts[8 * t + i] = (uint8_t)(j->counts[t] >> (8 * i));
        b[k++] = (st_blob){.part = ROWS_PART | (uint32_t)t, .kind = ROWS_COUNT,
                           .data = counts + 8 * t, .len = 8};
    }
    uint8_t *steps = counts + 8 * (size_t)nt;
    for (int w = 0; w < j->nworkers; w++)
        for (int i = 0; i < 8; i++) steps[8 * w + i] = (uint8_t)((uint64_t)j->wsteps[w] >> (8 * i));
    b[k++] = (st_blob){.part = STEPS_PART, .kind = ST_KIND_PARAMS, .data = steps,
                       .len = 8 * (size_t)j->nworkers};
    uint8_t extra[CFG_LEN];
    cfg_encode(&j->cfg, extra);
    int64_t v = ps_snapshot_version(j->snap);
    char err[512];
    int64_t newest;
    if (!j->nrows && st_store_latest(s->store, &newest, err, sizeof err) == CM_OK &&
        newest >= v) {
        /* Already there (a final checkpoint of a checkpointed version).
         * Unless rows changed since (training reads create rows after the
         * version was published): then version v is written again. */
        free(b);
        free(counts);
        return;
    }
    double t0 = cm_now();
    uint64_t row_bytes = nt ? write_rows(s, j, v) : 0;
    int rc = st_store_checkpoint(s->store, v, b, nblobs, extra, sizeof extra, err, sizeof err);
    free(b);
    free(counts);
    if (rc == CM_EIO) {
        /* A write error (a full disk, a failing device): going on would
         * train with nothing durable behind it, and end "successfully"
         * with no checkpoint. Stop, retryably: the supervisor restarts
         * this PS, the cluster rolls back, and it fails again for good if
         * the cause stays. */
        fprintf(stderr, "fatal: checkpoint of version %lld failed: %s; stopping (training on "
                "would keep nothing durable)\n", (long long)v, err);
        fflush(stderr);
        _exit(CM_EXIT_RETRY);
    }
    if (rc != CM_OK) {
        cm_error("checkpoint of version %lld failed: %s", (long long)v, err);
        return;
    }
    cm_hist_add(&s->ckpt_hist, cm_now() - t0);
    atomic_store(&s->ckpt_bytes, (uint64_t)numel * sizeof(float) * (uint64_t)(1 + j->nslots) +
                                     row_bytes);
    pthread_mutex_lock(&s->ck_mu);
    s->ck_rows = j->nrows;
    s->ck_row_bytes = row_bytes;
    s->ck_total = 0;
    for (int t = 0; t < nt; t++) s->ck_total += j->counts[t];
    pthread_mutex_unlock(&s->ck_mu);
    gc(s);
    sample_anon(s);
    if (s->cfg.rows_memory && nt) {
        pthread_mutex_lock(&s->ck_mu);
        int due = cm_now() - s->rc_at >= 30.0;
        pthread_mutex_unlock(&s->ck_mu);
        char when[48];
        snprintf(when, sizeof when, "at version %lld", (long long)v);
        if (due) log_row_cache(s, s->shard, when, 0);
    }
    if (nt)
        cm_info("checkpoint of version %lld committed in %.0f ms (%zu rows changed, %.1f MiB "
                "to the row store)",
                (long long)v, (cm_now() - t0) * 1e3, j->nrows, (double)row_bytes / (1 << 20));
    else
        cm_info("checkpoint of version %lld committed in %.0f ms", (long long)v,
                (cm_now() - t0) * 1e3);
}

static void *writer_main(void *arg) {
    ps_server *s = arg;
    /* Nice values are per thread on Linux. */
    if (s->cfg.checkpoint_nice > 0 &&
        setpriority(PRIO_PROCESS, (id_t)gettid(), s->cfg.checkpoint_nice) != 0)
        cm_warn("checkpoint writer: setpriority(%d): %s", s->cfg.checkpoint_nice,
                strerror(errno));
    pthread_mutex_lock(&s->ck_mu);
    for (;;) {
        while (!s->job.snap && !s->gc_pending && !s->ck_stop)
            pthread_cond_wait(&s->ck_cv, &s->ck_mu);
        if (!s->job.snap && s->gc_pending) {
            pthread_mutex_unlock(&s->ck_mu);
            gc(s);
            pthread_mutex_lock(&s->ck_mu);
            s->gc_pending = 0;
            pthread_cond_broadcast(&s->ck_cv);
            continue;
        }
        if (!s->job.snap) break;
        ckpt_job j = s->job;
        pthread_mutex_unlock(&s->ck_mu);
        write_job(s, &j);
        ps_snapshot_unref(j.snap);
        /* The job is done before the shard thaws: a shard thawed first could
         * reach its next checkpoint while this thread (at a low priority) has
         * not said so yet, and that checkpoint would wait for a writer that
         * is not coming. The thaw is not under ck_mu (see on_publish); the
         * handlers wait for it (thawing). A version put off while this one
         * was written (deferred) is taken now, before the shard thaws. */
        pthread_mutex_lock(&s->ck_mu);
        s->job.snap = NULL;
        int64_t deferred = s->deferred;
        s->deferred = 0;
        s->thawing = s->cfg.checkpoint_sync || deferred;
        pthread_cond_broadcast(&s->ck_cv); /* ps_server_checkpoint_wait */
        if (s->thawing) {
            pthread_mutex_unlock(&s->ck_mu);
            /* Frozen at 'deferred'; publish_now declines only with a sync
             * step half applied (then the next checkpoint is the one). */
            if (deferred && !ps_shard_publish_now(s->shard))
                cm_debug("checkpoint of version %lld skipped: a step is half applied",
                         (long long)deferred);
            ps_shard_thaw(s->shard);
            pthread_mutex_lock(&s->ck_mu);
            s->thawing = 0;
            pthread_cond_broadcast(&s->ck_cv);
        }
    }
    pthread_mutex_unlock(&s->ck_mu);
    return NULL;
}

void ps_server_checkpoint_wait(ps_server *s) {
    pthread_mutex_lock(&s->ck_mu);
    while (s->job.snap || s->deferred || s->thawing || (s->gc_pending && s->writer_started))
        pthread_cond_wait(&s->ck_cv, &s->ck_mu);
    pthread_mutex_unlock(&s->ck_mu);
}

/* Gathers a generation's blobs into flat arrays laid out as the shard's,
 * and its tables' rows (copies, put into the shard once it holds the
 * generation's config). */
typedef struct restore_ctx {
    ps_shard *shard;
    const cm_model *model;
    float *params, *slots;
    int nslots;
    size_t numel;
    int nseen;
    uint8_t **rows;   /* Per table: its rows blob (or NULL)... */
    size_t *rows_len; /* ...and its length (an older checkpoint), */
    uint64_t *counts; /* or its row count, the rows in the row store. */
    uint8_t *have_count;
    int in_store;     /* The generation's rows are in the row store. */
    int64_t *wsteps;  /* The workers' positions (STEPS_PART), NULL none... */
    int nwsteps;      /* ...and how many. */
} restore_ctx;

static void restore_ctx_free(restore_ctx *c) {
    for (int t = 0; c->rows && t < c->model->ntables; t++) free(c->rows[t]);
    free(c->rows);
    free(c->rows_len);
    free(c->counts);
    free(c->have_count);
    free(c->wsteps);
    c->wsteps = NULL;
}

static int on_blob(void *ud, uint32_t part, uint32_t kind, const void *data, size_t len) {
    restore_ctx *c = ud;
    if (part == STEPS_PART) {
        if (kind != ST_KIND_PARAMS || len % 8 || len > 8 * 65536 || c->wsteps) return CM_ECORRUPT;
        c->nwsteps = (int)(len / 8);
        c->wsteps = cm_calloc((size_t)c->nwsteps + 1, sizeof *c->wsteps);
        const uint8_t *p = data;
        for (int w = 0; w < c->nwsteps; w++) {
            uint64_t x = 0;
            for (int i = 0; i < 8; i++) x |= (uint64_t)p[8 * w + i] << (8 * i);
            c->wsteps[w] = (int64_t)x;
        }
        return CM_OK;
    }
    if (part & ROWS_PART) {
        uint32_t t = part & ~ROWS_PART;
        if (t >= (uint32_t)c->model->ntables || c->rows[t] || c->have_count[t])
            return CM_ECORRUPT;
        if (kind == ROWS_COUNT) {
            if (len != 8) return CM_ECORRUPT;
            const uint8_t *p = data;
            for (int i = 0; i < 8; i++) c->counts[t] |= (uint64_t)p[i] << (8 * i);
            c->have_count[t] = 1;
            return CM_OK;
        }
        if (kind != ST_KIND_PARAMS) return CM_ECORRUPT;
        c->rows[t] = cm_malloc(len ? len : 1);
        memcpy(c->rows[t], data, len);
        c->rows_len[t] = len;
        return CM_OK;
    }
    int li = ps_shard_local_index(c->shard, part);
    if (li < 0 || kind > (uint32_t)c->nslots) return CM_ECORRUPT;
    size_t off = ps_shard_part_offset(c->shard, li);
    if (len != (ps_shard_part_offset(c->shard, li + 1) - off) * sizeof(float))
        return CM_ECORRUPT;
    float *dst = kind == ST_KIND_PARAMS ? c->params : c->slots + (size_t)(kind - 1) * c->numel;
    memcpy(dst + off, data, len);
    c->nseen++;
    return CM_OK;
}

/* Read committed generation v into params and slots (ps_shard_numel floats,
 * and 2 * that: the most any optimizer keeps) and its config into *sc. */
static int load_generation(ps_server *s, int64_t v, ps_shard_config *sc, float *params,
                           float *slots, restore_ctx *c_out, char *err, size_t errlen) {
    int nparts;
    ps_shard_parts(s->shard, &nparts);
    restore_ctx c = {.shard = s->shard, .model = s->model, .numel = ps_shard_numel(s->shard),
                     .params = params, .slots = slots, .nslots = 2};
    int nt = s->model->ntables;
    c.rows = cm_calloc((size_t)nt + 1, sizeof *c.rows);
    c.rows_len = cm_calloc((size_t)nt + 1, sizeof *c.rows_len);
    c.counts = cm_calloc((size_t)nt + 1, sizeof *c.counts);
    c.have_count = cm_calloc((size_t)nt + 1, 1);
    void *extra = NULL;
    size_t extra_len = 0;
    int rc = st_store_load(s->store, v, on_blob, &c, &extra, &extra_len, err, errlen);
    if (rc == CM_OK && cfg_decode(extra, extra_len, sc) != CM_OK) {
        cm_seterr(err, errlen, "its config record is not one this server wrote");
        rc = CM_ECORRUPT;
    }
    if (rc == CM_OK && c.wsteps && c.nwsteps != sc->num_workers) {
        cm_seterr(err, errlen, "positions of %d workers, expected %d", c.nwsteps, sc->num_workers);
        rc = CM_ECORRUPT;
    }
    if (rc == CM_OK && c.nseen != nparts * (1 + ps_optim_nslots(sc->optim.kind))) {
        cm_seterr(err, errlen, "%d blobs, expected %d for %s", c.nseen,
                  nparts * (1 + ps_optim_nslots(sc->optim.kind)), ps_optim_name(sc->optim.kind));
        rc = CM_ECORRUPT;
    }
    c.in_store = nt > 0 && c.have_count[0];
    for (int t = 0; rc == CM_OK && t < nt; t++) {
        const cm_var *tv = &s->model->vars[s->model->table_var[t]];
        if (c.in_store != c.have_count[t]) {
            cm_seterr(err, errlen, "table %s has %s", tv->name,
                      c.in_store ? "no row count" : "a row count and no rows");
            rc = CM_ECORRUPT;
            continue;
        }
        if (c.in_store) {
            if (!s->rowdb) {
                cm_seterr(err, errlen, "its rows are in a row store, and this server has none");
                rc = CM_EINVAL;
            }
            continue;
        }
        size_t rec = 16 + (size_t)tv->dim * (size_t)(1 + ps_optim_nslots(sc->table_optim.kind)) *
                              sizeof(float);
        if (!c.rows[t] || c.rows_len[t] % rec) {
            cm_seterr(err, errlen, "the rows of table %s are %s", tv->name,
                      c.rows[t] ? "not whole records" : "missing");
            rc = CM_ECORRUPT;
        }
    }
    free(extra);
    if (rc == CM_OK && c_out)
        *c_out = c;
    else
        restore_ctx_free(&c);
    return rc;
}

/* Put the workers' positions and the rows a generation's load stashed into
 * the shard (its config now the generation's), and free them. */
static void put_rows(ps_server *s, const ps_shard_config *sc, restore_ctx *c) {
    if (c->wsteps) ps_shard_set_worker_steps(s->shard, c->wsteps, c->nwsteps);
    int nslots = ps_optim_nslots(sc->table_optim.kind);
    size_t n = 0;
    for (int t = 0; t < s->model->ntables; t++) {
        int dim = s->model->vars[s->model->table_var[t]].dim;
        size_t rec = 16 + (size_t)dim * (size_t)(1 + nslots) * sizeof(float);
        float *vals = cm_malloc((size_t)dim * (size_t)(1 + nslots) * sizeof(float));
        for (size_t at = 0; at + rec <= c->rows_len[t]; at += rec) {
            const uint8_t *p = c->rows[t] + at;
            uint64_t id;
            int64_t count;
            memcpy(&id, p, 8);
            memcpy(&count, p + 8, 8);
            memcpy(vals, p + 16, rec - 16);
            ps_shard_rows_put(s->shard, (uint32_t)t, id, vals,
                              nslots ? vals + dim : NULL, count);
            n++;
        }
        free(vals);
    }
    if (n) cm_info("restored %zu rows of %d tables", n, s->model->ntables);
    if (c->in_store) {
        uint64_t total = 0;
        for (int t = 0; t < s->model->ntables; t++) total += c->counts[t];
        cm_info("%llu rows of %d tables stay in the row store %s, read when used",
                (unsigned long long)total, s->model->ntables, st_rowdb_path(s->rowdb));
    }
    restore_ctx_free(c);
}

static float *state_buffer(ps_server *s, int nslots) {
    size_t n = ps_shard_numel(s->shard);
    float *b = cm_alloc_aligned((n ? n : 1) * (size_t)nslots * sizeof(float));
    if (!b) abort(); /* A PS that cannot hold its state cannot go on. */
    return b;
}

/* Open the store and restore its newest generation, if any. A restored
 * shard then waits for the chief's Rollback (recovering): the other shards
 * may hold another version. */
/* The identity of every PS shard's store: which model it holds is its
 * "model" record (the model may come with the first Initialize). */
#define STORE_FINGERPRINT PS_SERVER_STORE_FINGERPRINT

/* The model of a server that has one (cfg.model) against its store's
 * record: recorded if the store has none, refused if it holds another. */
static int store_check_model(ps_server *s, char *err, size_t errlen) {
    cm_model *m = NULL;
    cm_placement *pl = NULL;
    int rc = store_model(s, &m, &pl, err, errlen);
    if (rc == CM_ENOTFOUND) return store_put_model(s, s->model, err, errlen);
    if (rc != CM_OK) return rc;
    char desc[256];
    uint64_t fp = ps_wire_identity(m, pl, desc, sizeof desc);
    if (fp != s->fingerprint) {
        cm_seterr(err, errlen, "it was written for %s [%016llx], not for %s [%016llx]", desc,
                  (unsigned long long)fp, s->identity, (unsigned long long)s->fingerprint);
        rc = CM_EINVAL;
    }
    cm_placement_destroy(pl);
    cm_model_destroy(m);
    return rc;
}

static int open_store(ps_server *s) {
    const ps_server_cfg *cfg = &s->cfg;
    char err[768];
    st_identity id = {.fingerprint = STORE_FINGERPRINT, .description = PS_SERVER_STORE_DESC,
                      .shard = cfg->shard};
    double t0 = cm_now();
    int rc = st_store_open(NULL, cfg->data_dir, &id, &s->store, err, sizeof err);
    if (rc != CM_OK) {
        cm_error("cannot open the checkpoint store %s: %s", cfg->data_dir, err);
        return rc;
    }
    if (s->model) {
        rc = store_check_model(s, err, sizeof err);
    } else {
        cm_model *m = NULL;
        cm_placement *pl = NULL;
        rc = store_model(s, &m, &pl, err, sizeof err);
        if (rc == CM_ENOTFOUND) {
            cm_info("no model in %s yet: waiting for the chief's Initialize", cfg->data_dir);
            return CM_OK;
        }
        if (rc == CM_OK && (rc = adopt_model(s, m, pl, 1)) != CM_OK) {
            cm_placement_destroy(pl);
            cm_model_destroy(m);
        }
        if (rc == CM_OK) cm_info("the store holds %s", s->identity);
    }
    if (rc != CM_OK) {
        cm_error("the checkpoint store %s: %s", cfg->data_dir, err);
        return rc;
    }
    int64_t v;
    /* The newest generation that reads back intact: a damaged newer one is
     * named in the log, left on disk, and not offered to the chief, whose
     * rollback then takes the newest version every shard has. */
    rc = st_store_newest_intact(s->store, &v, err, sizeof err);
    if (rc == CM_ENOTFOUND) {
        cm_info("no checkpoint in %s yet", cfg->data_dir);
        /* Rows of no generation: from a run that never committed one. */
        if (s->rowdb && (rc = st_rowdb_clear(s->rowdb, err, sizeof err)) != CM_OK)
            cm_error("%s", err);
        return rc == CM_ENOTFOUND ? CM_OK : rc;
    }
    if (rc != CM_OK) {
        cm_error("cannot read the checkpoints in %s: %s", cfg->data_dir, err);
        return rc;
    }
    double t1 = cm_now();
    float *params = state_buffer(s, 1), *slots = state_buffer(s, 2);
    ps_shard_config sc;
    restore_ctx rows;
    rc = load_generation(s, v, &sc, params, slots, &rows, err, sizeof err);
    double t2 = cm_now();
    /* The buffers become the shard's (ps_shard_restore_owned): a large
     * shard's memory is touched once, not twice. */
    if (rc == CM_OK) {
        ps_shard_rows_from_store(s->shard, v, rows.in_store ? rows.counts : NULL);
        rc = ps_shard_restore_owned(s->shard, &sc, v, params, slots, err, sizeof err);
        if (rc == CM_OK)
            put_rows(s, &sc, &rows);
        else
            restore_ctx_free(&rows);
    }
    if (rc == CM_OK) params = slots = NULL; /* The shard's now. */
    free(params);
    free(slots);
    if (rc != CM_OK) {
        cm_error("cannot restore version %lld from %s: %s", (long long)v, cfg->data_dir, err);
        return rc;
    }
    s->recovering = 1;
    double t3 = cm_now();
    cm_info("restored version %lld from %s in %.1f ms (open %.1f ms, load %.1f ms, restore "
            "%.1f ms); waiting for the chief's rollback",
            (long long)v, cfg->data_dir, (t3 - t0) * 1e3, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
            (t3 - t2) * 1e3);
    return CM_OK;
}

/* ------------------------------------------------------------ recovery */

/* grpc.health.v1.Health/Check, for anyone (Kubernetes' gRPC probes carry no
 * token): SERVING while the shard takes calls (also while it waits for the
 * chief's Initialize, which must reach it), NOT_SERVING while it waits for
 * the chief's rollback after a restart, and while it stops. Service "" or
 * "psrpc.Ps"; another is NOT_FOUND, as the protocol says. */
static void on_health(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    Grpc__Health__V1__HealthCheckRequest *r =
        grpc__health__v1__health_check_request__unpack(NULL, len, req);
    if (!r) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed HealthCheckRequest");
        return;
    }
    if (r->service && r->service[0] && strcmp(r->service, "psrpc.Ps") != 0) {
        rpc_fail(call, RPC_NOT_FOUND, "unknown service");
    } else {
        pthread_mutex_lock(&s->mu);
        int serving = !s->recovering && !s->stopping;
        pthread_mutex_unlock(&s->mu);
        Grpc__Health__V1__HealthCheckResponse rep = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
        rep.status = serving ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                             : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING;
        reply_packed(call, &rep.base);
    }
    grpc__health__v1__health_check_request__free_unpacked(r, NULL);
}

/* A checkpoint of the version being served, committed before this returns
 * (none if it has one): the writer's job in progress first, then this one.
 * The writer must be running. */
static void checkpoint_current(ps_server *s, ps_shard *sh) {
    ps_server_checkpoint_wait(s);
    if (ps_shard_publish_now(sh)) ps_server_checkpoint_wait(s);
}

/* CheckpointsRequest.commit, the chief at the end of the run: make the
 * version being served durable (a checkpoint of it, unless it has one)
 * before the reply, and remember it as the run's last. Not while
 * recovering (the reply says so; the chief then rolls back). Returns 0
 * after failing the call. */
static int commit_final(ps_server *s, rpc_call *call) {
    pthread_rwlock_rdlock(&s->gate); /* No rollback meanwhile. */
    pthread_mutex_lock(&s->mu);
    int recovering = s->recovering;
    pthread_mutex_unlock(&s->mu);
    int keeps = durable(s);
    if (!recovering && keeps) checkpoint_current(s, s->shard);
    ps_shard_stats st;
    ps_shard_stats_get(s->shard, &st);
    int64_t newest = -1;
    char err[512];
    int rc = CM_OK;
    if (!recovering && keeps) {
        rc = st_store_latest(s->store, &newest, err, sizeof err);
        if (rc == CM_ENOTFOUND && st.version == 0) rc = CM_OK; /* Nothing trained. */
        else if (rc == CM_ENOTFOUND) newest = -1, rc = CM_OK;
        if (rc == CM_OK && newest < st.version && st.version > 0) {
            cm_seterr(err, sizeof err, "no checkpoint of it in the store (the newest is of "
                      "version %lld): its write failed (see this shard's log) or a step is "
                      "still open", (long long)newest);
            rc = CM_EINVAL;
        }
    }
    if (!recovering && rc == CM_OK) {
        pthread_mutex_lock(&s->mu);
        s->final_commit = st.version;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        cm_info("version %lld committed as the run's last (the chief's end)%s",
                (long long)st.version, keeps ? "" : "; no checkpoints are kept here");
    }
    pthread_rwlock_unlock(&s->gate);
    if (rc != CM_OK) {
        rpc_fail(call, rc == CM_EINVAL ? RPC_FAILED_PRECONDITION : RPC_INTERNAL,
                 "PS shard %d cannot commit version %lld: %s", s->cfg.shard,
                 (long long)st.version, err);
        return 0;
    }
    return 1;
}

static void on_checkpoints(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    if (!admit(s, call, &psrpc__checkpoints_request__descriptor, req, len)) return;
    Psrpc__CheckpointsRequest *r = psrpc__checkpoints_request__unpack(NULL, len, req);
    if (!r) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed CheckpointsRequest");
        return;
    }
    if (!get_shard(s)) { /* No model yet: nothing to show, nothing to check. */
        Psrpc__CheckpointsReply rep = PSRPC__CHECKPOINTS_REPLY__INIT;
        rep.durable = durable(s);
        reply_packed(call, &rep.base);
        goto out;
    }
    /* A tool (psctl) may look without the cluster's fingerprint; changing
     * anything (keep_from, abort_waiting) needs it. */
    int look = !r->cluster && r->keep_from < 0 && !r->abort_waiting && !r->commit;
    if (!look && !check_cluster(s, call, r->cluster)) goto out;
    if (r->keep_from >= 0 && rpc_call_level(call) < RPC_AUTH_ADMIN) {
        rpc_deny(call, "deleting checkpoints (keep_from) needs the admin's token");
        goto out;
    }
    if (r->abort_waiting) {
        int n = ps_shard_abort_pending(s->shard);
        cm_warn("rank %u rejoined and found a step half pushed: %d waiting pull%s answered "
                "ABORTED, for the chief to roll back", r->cluster->rank, n, n == 1 ? "" : "s");
    }
    if (r->commit && rpc_call_level(call) < RPC_AUTH_ADMIN) {
        rpc_deny(call, "committing the final version (commit) needs the admin's token");
        goto out;
    }
    if (r->commit && !commit_final(s, call)) goto out;
    int64_t committed[16];
    int n = 0;
    if (s->store) {
        char err[512];
        n = st_store_committed(s->store, committed, 16, err, sizeof err);
        if (n < 0) {
            rpc_fail(call, RPC_INTERNAL, "PS shard %d cannot list its checkpoints: %s",
                     s->cfg.shard, err);
            goto out;
        }
        if (n > 16) n = 16;
        if (r->keep_from >= 0) {
            pthread_mutex_lock(&s->ck_mu);
            if (r->keep_from > s->gc_floor) {
                s->gc_floor = r->keep_from;
                s->gc_pending = s->writer_started;
                pthread_cond_broadcast(&s->ck_cv);
            }
            pthread_mutex_unlock(&s->ck_mu);
        }
    }
    ps_shard_stats st;
    ps_shard_stats_get(s->shard, &st);
    ps_shard_config sc;
    Psrpc__CheckpointsReply rep = PSRPC__CHECKPOINTS_REPLY__INIT;
    rep.version = st.version;
    rep.n_committed = (size_t)n;
    rep.committed = committed;
    rep.initialised = ps_shard_config_get(s->shard, &sc);
    rep.durable = durable(s);
    pthread_mutex_lock(&s->mu);
    rep.epoch = s->epoch;
    rep.recovering = s->recovering;
    pthread_mutex_unlock(&s->mu);
    reply_packed(call, &rep.base);
    /* What a training worker (not the chief) was told, once the reply is on
     * its way: a deferred stop that this lets go waits for replies being
     * sent (rpc_server_shutdown's grace), not for calls still in a handler. */
    if (!r->commit && r->cluster && r->cluster->rank > 0 && r->cluster->rank < 64) {
        pthread_mutex_lock(&s->mu);
        s->seen[r->cluster->rank] = n > 0 ? committed[0] : -1;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
out:
    psrpc__checkpoints_request__free_unpacked(r, NULL);
}

/* Roll the shard back to version v (see RollbackRequest). Holds the gate
 * exclusively, and waits for a checkpoint being written, so that neither
 * a request of the old epoch nor the old history's checkpoint outlives it. */
static int rollback(ps_server *s, int64_t v, uint64_t epoch, char *err, size_t errlen) {
    ps_shard_config have;
    if (!ps_shard_config_get(s->shard, &have)) {
        cm_seterr(err, errlen, "PS shard %d is not initialised", s->cfg.shard);
        return CM_EINVAL;
    }
    /* Version 0 is the seed's unless the run started from given values. */
    int load = v > 0 || have.init_hash;
    if (load && !s->store) {
        cm_seterr(err, errlen, "PS shard %d keeps no checkpoints (no --data-dir)", s->cfg.shard);
        return CM_EINVAL;
    }
    pthread_rwlock_wrlock(&s->gate);
    ps_server_checkpoint_wait(s);
    float *params = NULL, *slots = NULL;
    int rc = CM_OK;
    ps_shard_stats st;
    ps_shard_stats_get(s->shard, &st);
    pthread_mutex_lock(&s->mu);
    /* Restored from exactly that generation and nothing accepted since: the
     * state is already the one asked for (the common case of a restart). */
    int as_restored = s->recovering && st.version == v;
    pthread_mutex_unlock(&s->mu);
    ps_shard_config sc;
    restore_ctx rows = {0};
    int have_rows = 0;
    if (!as_restored && load) {
        params = state_buffer(s, 1);
        slots = state_buffer(s, 2);
        rc = load_generation(s, v, &sc, params, slots, &rows, err, errlen);
        have_rows = rc == CM_OK;
        if (rc == CM_ENOTFOUND)
            cm_seterr(err, errlen, "PS shard %d has no committed checkpoint of version %lld",
                      s->cfg.shard, (long long)v);
        if (rc == CM_OK && sc.optim.kind != have.optim.kind) {
            cm_seterr(err, errlen, "checkpoint %lld of PS shard %d was written for %s, not %s",
                      (long long)v, s->cfg.shard, ps_optim_name(sc.optim.kind),
                      ps_optim_name(have.optim.kind));
            rc = CM_ECORRUPT;
        }
    }
    if (rc == CM_OK && s->store) rc = st_store_drop_newer(s->store, v, err, errlen);
    if (rc == CM_OK && !as_restored)
        ps_shard_rows_from_store(s->shard, v, have_rows && rows.in_store ? rows.counts : NULL);
    if (rc == CM_OK && !as_restored)
        rc = ps_shard_rollback(s->shard, v, params,
                               ps_optim_nslots(have.optim.kind) && load ? slots : NULL, err,
                               errlen);
    /* Before the new epoch opens: no request sees the rows half put. */
    if (have_rows) {
        if (rc == CM_OK)
            put_rows(s, &sc, &rows);
        else
            restore_ctx_free(&rows);
    }
    if (rc == CM_OK) {
        pthread_mutex_lock(&s->mu);
        s->epoch = epoch;
        s->recovering = 0;
        s->final_commit = -1; /* The run goes on: its end is to come again. */
        pthread_mutex_unlock(&s->mu);
    }
    pthread_rwlock_unlock(&s->gate);
    free(params);
    free(slots);
    return rc;
}

static void on_rollback(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    if (!admit(s, call, &psrpc__rollback_request__descriptor, req, len)) return;
    Psrpc__RollbackRequest *r = psrpc__rollback_request__unpack(NULL, len, req);
    if (!r) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed RollbackRequest");
        return;
    }
    if (!need_shard(s, call, RPC_FAILED_PRECONDITION) || !check_cluster(s, call, r->cluster))
        goto out;
    if (r->version < 0 || r->epoch == 0) {
        count_bad(s);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "rollback to version %lld in epoch %llu",
                 (long long)r->version, (unsigned long long)r->epoch);
        goto out;
    }
    pthread_mutex_lock(&s->mu);
    int same = s->epoch == r->epoch && !s->recovering;
    pthread_mutex_unlock(&s->mu);
    char err[768];
    ps_shard_stats st;
    int rc = CM_OK;
    if (!same) {
        double t0 = cm_now();
        rc = rollback(s, r->version, r->epoch, err, sizeof err);
        if (rc == CM_OK) atomic_fetch_add(&s->rollbacks, 1);
        if (rc == CM_OK)
            cm_info("rolled back to version %lld in epoch %llu (rank %u asked; %.0f ms)",
                    (long long)r->version, (unsigned long long)r->epoch, r->cluster->rank,
                    (cm_now() - t0) * 1e3);
    }
    ps_shard_stats_get(s->shard, &st);
    if (rc == CM_OK && same && st.version != r->version) {
        cm_seterr(err, sizeof err, "epoch %llu already rolled back to version %lld",
                  (unsigned long long)r->epoch, (long long)st.version);
        rc = CM_EINVAL;
    }
    if (rc != CM_OK) {
        cm_error("rollback to version %lld refused: %s", (long long)r->version, err);
        rpc_fail(call, RPC_FAILED_PRECONDITION, "%s", err);
    } else {
        Psrpc__RollbackReply rep = PSRPC__ROLLBACK_REPLY__INIT;
        rep.version = st.version;
        rep.epoch = r->epoch;
        reply_packed(call, &rep.base);
    }
out:
    psrpc__rollback_request__free_unpacked(r, NULL);
}

/* ------------------------------------------------------------ lifecycle */

/* One line on the row cache of a row budget. */
/* 'whole': rates over the server's life (at exit), else since the last
 * report. */
static void log_row_cache(ps_server *s, ps_shard *sh, const char *when, int whole) {
    ps_shard_stats st;
    ps_shard_stats_get(sh, &st);
    const ps_rows_spill_stats *c = &st.row_cache;
    const uint64_t looked = c->hits + c->misses;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    /* Rates since the last report (or the start). */
    pthread_mutex_lock(&s->ck_mu);
    if (whole) s->rc_at = s->rc_start, s->rc_misses = s->rc_evictions = 0;
    const double now = cm_now(), dt = now - s->rc_at;
    const double mps = dt > 0 ? (double)(c->misses - s->rc_misses) / dt : 0,
                 eps = dt > 0 ? (double)(c->evictions - s->rc_evictions) / dt : 0;
    s->rc_at = now;
    s->rc_misses = c->misses;
    s->rc_evictions = c->evictions;
    const double peak_anon = s->peak_anon;
    pthread_mutex_unlock(&s->ck_mu);
    cm_info("row cache %s: %llu rows, %llu in memory (%.2f of %.2f MiB), %llu in the row store; "
            "hit rate %.1f %% of %llu rows asked for, %llu read back (%llu off the lock), %llu "
            "evicted, %.1f MiB "
            "written; %llu reads not admitted, %llu updates dropped, %llu rows expired; "
            "peak RSS %.1f MiB (anonymous: %.1f MiB at most at the samples); %.0f misses/s, "
            "%.0f evictions/s over the last %.0f s", when,
            (unsigned long long)st.rows,
            (unsigned long long)c->resident,
            (double)c->resident_bytes / (1 << 20), (double)c->budget / (1 << 20),
            (unsigned long long)c->on_disk, looked ? 100.0 * (double)c->hits / (double)looked : 0.0,
            (unsigned long long)looked, (unsigned long long)c->loads,
            (unsigned long long)st.rows_prefetched, (unsigned long long)c->evictions, (double)c->bytes_written / (1 << 20),
            (unsigned long long)c->not_admitted, (unsigned long long)c->dropped_updates,
            (unsigned long long)c->expired, (double)ru.ru_maxrss / 1024.0, peak_anon, mps, eps,
            dt);
}

int ps_server_create(const ps_server_cfg *cfg, ps_server **out) {
    *out = NULL;
    ps_server *s = cm_calloc(1, sizeof *s);
    s->cfg = *cfg;
    s->final_commit = -1;
    for (int i = 0; i < 64; i++) s->seen[i] = -1;
    /* Kept: the row store opens when the model comes (an Init, later). */
    if (cfg->data_dir) s->cfg.data_dir = s->own_data_dir = cm_strdup(cfg->data_dir);
    if (cfg->rows_dir) s->cfg.rows_dir = s->own_rows_dir = cm_strdup(cfg->rows_dir);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_mutex_init(&s->ck_mu, NULL);
    pthread_cond_init(&s->ck_cv, NULL);
    pthread_rwlockattr_t ga;
    pthread_rwlockattr_init(&ga);
    /* A Rollback must not wait behind an endless stream of pushes. */
    pthread_rwlockattr_setkind_np(&ga, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&s->gate, &ga);
    pthread_rwlockattr_destroy(&ga);
    s->gc_floor = -1;
    s->rc_at = s->rc_start = cm_now();
    if (cfg->model && cfg->placement) s->cfg.nshards = cfg->placement->nshards;
    int rc = CM_EINVAL;
    if (s->cfg.nshards < 1 || cfg->shard < 0 || cfg->shard >= s->cfg.nshards ||
        !cfg->model != !cfg->placement) {
        cm_error("PS shard %d of %d: bad server config", cfg->shard, s->cfg.nshards);
        goto fail;
    }
    if (cfg->rows_dir && mkdir(cfg->rows_dir, 0700) != 0 && errno != EEXIST) {
        /* Now, not when the model comes: a bad flag fails at start. */
        cm_error("cannot create the row store %s: %s", cfg->rows_dir, strerror(errno));
        rc = CM_EIO;
        goto fail;
    }
    if (cfg->data_dir && cfg->checkpoint_every > 0) {
        if (pthread_create(&s->writer, NULL, writer_main, s) != 0) {
            rc = CM_ENOMEM;
            goto fail;
        }
        s->writer_started = 1;
    }
    if (cfg->model && (rc = adopt_model(s, cfg->model, cfg->placement, 0)) != CM_OK) goto fail;
    if (cfg->data_dir && (rc = open_store(s)) != CM_OK) goto fail;
    rpc_server_opts o = {.threads = cfg->threads > 0 ? cfg->threads : ps_server_default_threads(),
                         .max_message = cfg->max_message,
                         .token = cfg->auth_token,
                         .admin_token = cfg->admin_token,
                         .tls_cert = cfg->tls_cert,
                         .tls_key = cfg->tls_key,
                         .tls_ca = cfg->tls_ca,
                         .max_held = cfg->max_held,
                         .max_streams = cfg->max_streams,
                         .poll_spin_us = cfg->poll_spin_us,
                         .idle_ms = cfg->idle_ms,
                         .on_cancel = on_cancel,
                         .cancel_ctx = s};
    if ((rc = rpc_server_create(&o, &s->rpc)) != CM_OK) goto fail;
    rpc_server_add_method_level(s->rpc, "/psrpc.Ps/Initialize", RPC_AUTH_ADMIN, on_init, s);
    rpc_server_add_method_pieces(s->rpc, "/psrpc.Ps/Push", RPC_AUTH_WORKER, on_push, s);
    rpc_server_add_method(s->rpc, "/psrpc.Ps/Pull", on_pull, s);
    rpc_server_add_method_pieces(s->rpc, "/psrpc.Ps/PushPull", RPC_AUTH_WORKER, on_push_pull,
                                 s);
    rpc_server_add_method(s->rpc, "/psrpc.Ps/Stats", on_stats, s);
    rpc_server_add_method(s->rpc, "/psrpc.Ps/Checkpoints", on_checkpoints, s);
    rpc_server_add_method_level(s->rpc, "/grpc.health.v1.Health/Check", RPC_AUTH_NONE, on_health,
                                s);
    rpc_server_add_method_level(s->rpc, "/psrpc.Ps/Rollback", RPC_AUTH_ADMIN, on_rollback, s);
    rpc_server_add_method_level(s->rpc, "/psrpc.Ps/Shutdown", RPC_AUTH_ADMIN, on_shutdown, s);
    *out = s;
    return CM_OK;
fail:
    ps_server_destroy(s, 0);
    return rc;
}

int ps_server_start(ps_server *s, const char *addr, int *port) {
    return rpc_server_start(s->rpc, addr, port);
}

/* A stop the Shutdown deferred (mu held): due once the evaluator, if one
 * was seen, has the final version and the other training workers have
 * seen the final commit, or FINAL_GRACE_S passed. */
static int stop_due(ps_server *s) {
    int told = told_count(s);
    if (!s->stopping && s->stop_after > 0 &&
        (((s->final_answers > 0 || !s->evaluator_seen) && told >= s->told_needed) ||
         cm_now() >= s->stop_after)) {
        s->stopping = 1;
        snprintf(s->reason, sizeof s->reason, "%s", s->pending_reason);
        pthread_cond_broadcast(&s->cv);
    }
    return s->stopping;
}

int ps_server_wait(ps_server *s, int timeout_ms) {
    pthread_mutex_lock(&s->mu);
    double until = timeout_ms < 0 ? 1e300 : cm_now() + timeout_ms / 1e3;
    while (!stop_due(s)) {
        double now = cm_now(), slice = until - now;
        if (slice <= 0) break;
        if (slice > 0.05) slice = 0.05; /* A deferred stop is checked often. */
        /* Backup sync's deadline (outside mu: a close publishes a version,
         * whose checkpoint hook takes mu). */
        ps_shard *sh = s->shard; /* Set once, under mu, at the first Init. */
        pthread_mutex_unlock(&s->mu);
        int64_t bstep;
        double waited;
        char who[256];
        /* Under the gate, as pushes are: a step closing during a Rollback
         * would publish (and checkpoint) a version of the history being
         * rolled back, after the rollback dropped the newer checkpoints.
         * While one runs, this tick is skipped. */
        int ticked = sh && pthread_rwlock_tryrdlock(&s->gate) == 0;
        int closed = ticked && ps_shard_tick(sh, &bstep, &waited, who, sizeof who);
        if (ticked) pthread_rwlock_unlock(&s->gate);
        if (closed)
            cm_warn("step %lld closed after %.0f ms %s%s (--sync backup): each partition "
                    "averaged over the workers that pushed it", (long long)bstep, waited * 1e3,
                    who[0] ? "without workers " : "with some partitions' gradients missing",
                    who);
        pthread_mutex_lock(&s->mu);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long ns = ts.tv_nsec + (long)(slice * 1e9);
        ts.tv_sec += ns / 1000000000L;
        ts.tv_nsec = ns % 1000000000L;
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    }
    int stopping = s->stopping;
    pthread_mutex_unlock(&s->mu);
    return stopping;
}

void ps_server_request_stop(ps_server *s, const char *reason) {
    pthread_mutex_lock(&s->mu);
    if (!s->stopping) {
        s->stopping = 1;
        snprintf(s->reason, sizeof s->reason, "%s", reason ? reason : "stop requested");
    }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

const char *ps_server_stop_reason(ps_server *s) { return s->reason; }

int ps_server_stop_failed(ps_server *s) {
    pthread_mutex_lock(&s->mu);
    int f = s->stop_failed;
    pthread_mutex_unlock(&s->mu);
    return f;
}

void ps_server_destroy(ps_server *s, int grace_ms) {
    if (!s) return;
    ps_server_request_stop(s, "server destroyed"); /* Waiting pulls: UNAVAILABLE. */
    ps_shard *sh = get_shard(s);
    if (sh) ps_shard_abort_waiters(sh);
    if (s->rpc) {
        rpc_server_shutdown(s->rpc, grace_ms);
        rpc_server_destroy(s->rpc);
    }
    if (s->writer_started) {
        /* A last checkpoint of the final version, so that a run started
         * again on this directory loses nothing. Not while recovering: that
         * state is not agreed on. */
        pthread_mutex_lock(&s->mu);
        int recovering = s->recovering;
        pthread_mutex_unlock(&s->mu);
        if (!recovering && sh) checkpoint_current(s, sh);
        pthread_mutex_lock(&s->ck_mu);
        s->ck_stop = 1;
        pthread_cond_broadcast(&s->ck_cv);
        pthread_mutex_unlock(&s->ck_mu);
        pthread_join(s->writer, NULL);
    }
    sample_anon(s); /* Before the checkpoint buffers go. */
    ps_snapshot_unref(s->job.snap);
    free(s->job.slots);
    free(s->job.rows);
    free(s->job.counts);
    free(s->job.wsteps);
    st_store_close(s->store);
    if ((s->rowdb || s->cfg.admit_after > 1 || s->cfg.expire_after > 0) && sh)
        log_row_cache(s, sh, "at exit", 1);
    ps_shard_destroy(s->shard);
    st_rowdb_close(s->rowdb);
    if (s->rows_tmp[0]) st_rowdb_remove(s->rows_tmp);
    cm_placement_destroy(s->own_pl);
    cm_model_destroy(s->own_model);
    free(s->own_data_dir);
    free(s->own_rows_dir);
    pthread_cond_destroy(&s->ck_cv);
    pthread_mutex_destroy(&s->ck_mu);
    pthread_rwlock_destroy(&s->gate);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

/* ------------------------------------------------------------ metrics */

char *ps_server_metrics(ps_server *s, size_t *len) {
    cm_prom_doc doc;
    if (!cm_prom_begin(&doc)) return NULL;
    FILE *f = doc.f;
    char lb[32];
    snprintf(lb, sizeof lb, "shard=\"%d\"", s->cfg.shard);
    pthread_mutex_lock(&s->mu);
    int serving = !s->recovering && !s->stopping;
    pthread_mutex_unlock(&s->mu);
    cm_prom_family(f, "pstrain_ps_up", "gauge",
                   "1 while the shard serves, 0 while it recovers or stops (as the gRPC health "
                   "service says)");
    cm_prom_sample(f, "pstrain_ps_up", lb, serving);
    ps_shard *sh = get_shard(s);
    ps_shard_stats st;
    memset(&st, 0, sizeof st);
    if (sh) ps_shard_stats_get(sh, &st);
    rpc_server_stats rs;
    memset(&rs, 0, sizeof rs);
    if (s->rpc) rpc_server_stats_get(s->rpc, &rs);
    struct {
        const char *name, *type, *help;
        double v;
    } m[] = {
        {"pstrain_ps_version", "gauge", "the shard's current version (steps applied)",
         (double)st.version},
        {"pstrain_ps_pushes_total", "counter",
         "push calls taken (a worker's push of a shard above 512 KiB comes as several)",
         (double)st.pushes},
        {"pstrain_ps_duplicate_pushes_total", "counter", "retried push calls already counted",
         (double)st.duplicate_pushes},
        {"pstrain_ps_stale_pushes_total", "counter",
         "push calls refused as stale or early, or skipped (backup sync)",
         (double)(st.stale_pushes + st.early_pushes)},
        {"pstrain_ps_nonfinite_pushes_total", "counter", "pushes with a NaN or an infinity",
         (double)st.nonfinite_pushes},
        {"pstrain_ps_pulls_total", "counter", "pulls answered", (double)st.pulls},
        {"pstrain_ps_parked_pulls", "gauge", "pulls waiting for a version now",
         (double)st.parked},
        {"pstrain_ps_bad_requests_total", "counter", "requests refused as malformed or invalid",
         (double)st.bad_requests},
        {"pstrain_ps_unauthenticated_total", "counter", "calls refused without a valid token",
         (double)rs.unauthenticated},
        {"pstrain_ps_denied_total", "counter", "admin calls refused to a worker's token",
         (double)rs.denied},
        {"pstrain_ps_exhausted_total", "counter",
         "calls refused for lack of room (held calls, parked pulls)",
         (double)(rs.exhausted + st.parked_refused)},
        {"pstrain_ps_parameter_bytes", "gauge", "bytes of dense parameters the shard owns",
         (double)st.bytes},
        {"pstrain_ps_memory_bytes", "gauge", "memory counted against the shard's limit",
         (double)st.mem_bytes},
        {"pstrain_ps_memory_limit_bytes", "gauge", "the shard's memory limit",
         (double)st.mem_limit},
        {"pstrain_ps_rows", "gauge", "embedding rows held", (double)st.rows},
        {"pstrain_ps_received_bytes_total", "counter",
         "bytes of Push, PushPull and Pull requests received", (double)atomic_load(&s->bytes_in)},
        {"pstrain_ps_sent_bytes_total", "counter",
         "bytes of parameters and rows answered to Pull and PushPull",
         (double)atomic_load(&s->bytes_out)},
        {"pstrain_ps_rows_pulled_total", "counter", "embedding rows answered",
         (double)st.rows_pulled},
        {"pstrain_ps_rows_pushed_total", "counter", "embedding row gradients received",
         (double)st.rows_pushed},
        {"pstrain_ps_backup_closes_total", "counter",
         "steps backup sync closed without some worker", (double)st.backup_closes},
        {"pstrain_ps_updates_lost_total", "counter",
         "async updates a rollback took and no worker pushed again", (double)st.updates_lost},
        {"pstrain_ps_rollbacks_total", "counter", "rollbacks to a checkpoint (recoveries)",
         (double)atomic_load(&s->rollbacks)},
        {"pstrain_ps_checkpoint_bytes", "gauge", "bytes the last checkpoint wrote",
         (double)atomic_load(&s->ckpt_bytes)},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        cm_prom_family(f, m[i].name, m[i].type, m[i].help);
        cm_prom_sample(f, m[i].name, lb, m[i].v);
    }
    cm_prom_family(f, "pstrain_ps_push_seconds", "histogram",
                   "time to take a push: decode, checks, apply (not the pull it may carry)");
    cm_prom_hist(f, "pstrain_ps_push_seconds", lb, &s->push_hist);
    cm_prom_family(f, "pstrain_ps_pull_seconds", "histogram",
                   "time from a pull's arrival (a PushPull: its push taken) to its answer, "
                   "waiting for the version included");
    cm_prom_hist(f, "pstrain_ps_pull_seconds", lb, &s->pull_hist);
    cm_prom_family(f, "pstrain_ps_checkpoint_seconds", "histogram",
                   "time to write and commit a checkpoint");
    cm_prom_hist(f, "pstrain_ps_checkpoint_seconds", lb, &s->ckpt_hist);
    return cm_prom_end(&doc, len);
}
