/* ps_shard.c - shard state, the sync state machine, snapshots and waiters.
 * SPDX-License-Identifier: MIT
 *
 * States: UNINITIALISED --ps_shard_init--> SERVING (version 0)
 *         UNINITIALISED --ps_shard_restore--> SERVING (the checkpoint's version)
 *         SERVING --ps_shard_push (a partition's last contribution)-->
 *             that partition applied into 'pending' (version + 1)
 *         ... --(the last partition)--> SERVING (v+1): pending published
 *         SERVING --ps_shard_push (async)--> SERVING (v+1), or SERVING (v) for a
 *             call of a step in calls that does not complete it (step_parts)
 * Invariants, under mu:
 *  - 'current' is the snapshot of the parameters at 'version' (never NULL
 *    once initialised); in async mode, with the calls of steps in calls
 *    that are not complete yet applied too (such a call changes the values,
 *    not the version). The optimizer writes the next version out of place,
 *    partition by partition, into 'pending' (sync) or a new buffer (async;
 *    in place instead when the shard holds the only reference to current:
 *    every other reference is taken under mu or from a held one, so no
 *    reader can see a snapshot change);
 *    a partition of pending is written once, when its W-th contribution
 *    arrives, and never again, so replies may reference finished partitions
 *    of pending before it is published.
 *  - Async: contrib[w * nparts + i] marks the partitions worker w's last
 *    step (last_step[w]) gave; a step may come in several calls.
 *  - Sync: pcount[i] == number of workers w with contrib[w * nparts + i] set;
 *    acc's partition i holds their sum (the first is copied, later added,
 *    each widened to float32 on the way if it came as bfloat16; with 3 or
 *    more workers in sync mode each is staged, as float32, and the sum is
 *    taken in rank order once all are in, so it does not depend on the
 *    arrival order and sync runs are reproducible bit for bit).
 *  - pdone[i] iff partition i is final in pending; ndone counts them;
 *    pending is NULL iff ndone == 0.
 *  - acc's partition i while pcount[i] == 0 (and async, always), and worker
 *    w's staging slot while w has not given i, are scratch: a push reads
 *    its gradients into them and checks them for NaN and infinity in that
 *    one pass (load_dense) before it counts anything, so a push refused
 *    for its values leaves the shard as it was.
 *  - spare, when set, is a buffer for the next version: a push takes it
 *    before it changes anything, so that running out of memory refuses the
 *    push (PS_PUSH_NOMEM) instead of aborting half way.
 *  - mem_state + mem_staged + the rows' bytes (mem_used) is what counts
 *    against mem_limit: setup() refuses a config whose state is over it,
 *    a push rows that could take it over.
 *  - Every whole-shard waiter has min_version > version; every partition
 *    waiter has min_version == version + 1 and some partition not done.
 * The publish hook (checkpoints) runs inside publish(), mu held, for the
 * versions computed here (not for init's or restore's).
 * Snapshot buffers come from a pool that outlives the shard if replies
 * still reference snapshots when the shard is destroyed.
 */
#include "ps/ps_shard.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_mem.h"
#include "common/cm_simd.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "proto/rpc.h"
#include "ps/ps_rowacc.h"
#include "ps/ps_wire.h"

#define POOL_KEEP 4

/* ------------------------------------------------------------ snapshots */

typedef struct snap_pool {
    pthread_mutex_t mu;
    atomic_int refs;
    size_t numel;
    size_t *part_off; /* The shard's layout, owned here so that snapshots
                       * stay readable after the shard is destroyed. */
    float *free_bufs[POOL_KEEP]; /* Protected by mu. */
    int nfree;
} snap_pool;

struct ps_snapshot {
    snap_pool *pool;
    atomic_int refs;
    int64_t version;
    float *data;
    const size_t *part_off; /* The pool's copy of the layout. */
};

static void pool_unref(snap_pool *p) {
    if (atomic_fetch_sub(&p->refs, 1) != 1) return;
    for (int i = 0; i < p->nfree; i++) free(p->free_bufs[i]);
    free(p->part_off);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

static float *pool_get(snap_pool *p) {
    float *b = NULL;
    pthread_mutex_lock(&p->mu);
    if (p->nfree > 0) b = p->free_bufs[--p->nfree];
    pthread_mutex_unlock(&p->mu);
    return b ? b : cm_alloc_aligned(p->numel * sizeof(float));
}

static void pool_put(snap_pool *p, float *b) {
    pthread_mutex_lock(&p->mu);
    if (p->nfree < POOL_KEEP) {
        p->free_bufs[p->nfree++] = b;
        b = NULL;
    }
    pthread_mutex_unlock(&p->mu);
    free(b);
}

int64_t ps_snapshot_version(const ps_snapshot *s) { return s->version; }
const float *ps_snapshot_part(const ps_snapshot *s, int i) { return s->data + s->part_off[i]; }
void ps_snapshot_ref(ps_snapshot *s) { atomic_fetch_add(&s->refs, 1); }

void ps_snapshot_unref(ps_snapshot *s) {
    if (!s || atomic_fetch_sub(&s->refs, 1) != 1) return;
    pool_put(s->pool, s->data);
    pool_unref(s->pool);
    free(s);
}

/* ------------------------------------------------------------ the shard */

typedef struct waiter {
    int64_t min_version;
    ps_pull_cb cb;
    void *ud;
    int nparts;    /* 0: the whole shard; else wait for these partitions. */
    int *parts;    /* Local indices, owned. */
    const ps_row_req *rq; /* Rows to read when answered (borrowed). */
    int nrq;
    int train;
    ps_snapshot *snap; /* Set when taken as ready: the reply's reference. */
    int or_final;      /* Answered at shutdown with the last version. */
} waiter;

struct ps_shard {
    const cm_model *model;
    const cm_placement *pl;
    int index;
    int nparts;
    uint32_t *parts;  /* Placement ids, ascending. */
    size_t *part_off; /* Offset of each in the shard's flat arrays (+ total). */
    int *local_of;    /* Placement id -> local index, or -1. */
    size_t numel;
    snap_pool *pool;

    pthread_mutex_t mu;
    /* Protected by mu. */
    int inited;
    ps_shard_config cfg;
    float *acc, *slots;
    float *stage; /* W >= 3, sync: each worker's gradient ([w * numel + off]),
                   * summed in rank order once all are in, so the sum does not
                   * depend on arrival order (with 2 it cannot: a+b == b+a). */
    int64_t version;
    uint8_t *contrib; /* [worker * nparts + i]: contributed to this step. */
    int *pcount;      /* Per partition: contributions this step. */
    uint8_t *pdone;   /* Per partition: applied into pending. */
    int ndone;
    int64_t *last_step;
    ps_snapshot *current;
    ps_snapshot *pending; /* Version + 1 being built (sync), or NULL. */
    waiter *waiters;
    int nwaiters, capwaiters;
    int closed; /* Set by ps_shard_abort_waiters: pulls fail at once. */
    int finished; /* ps_shard_finish: or_final pulls get the last version. */
    /* Rows (a model with tables). */
    ps_rows *rows;
    int row_dim_max;
    int *table_dims;    /* Per table: its dim. */
    ps_rowlist *rstage;    /* Sync: per worker, its row gradients of the step. */
    uint8_t *rgiven;    /* Sync: per worker, rows_final seen this step. */
    int rcount;         /* Workers whose rows are in. */
    ps_rowacc racc;        /* Sums rows before they are applied. */
    ps_shard_stats st;
    float *spare;       /* A buffer for the next version, taken before a push
                         * changes anything (see reserve_buffer). */
    /* Backup sync (cfg.backup_ms > 0): workers that gave nothing to a step
     * closed without them; the next steps close without waiting for them
     * until one of their pushes comes (a stale one too: it is alive). */
    uint8_t absent[PS_SHARD_MAX_WORKERS];
    int nabsent;
    /* Backup sync: the last step closed without all of each worker's
     * contribution (-1: none). The rest of its push, or a retry of a call
     * of it, is then late (PS_PUSH_SKIPPED), not a duplicate. */
    int64_t partial_step[PS_SHARD_MAX_WORKERS];
    /* Async: worker w's last step (last_step[w]) came with step_parts and
     * not all of its calls are in yet; its last complete step is the one
     * before (ps_shard_worker_steps). */
    uint8_t step_open[PS_SHARD_MAX_WORKERS];
    double open_since;  /* When the open step's first contribution came (0: none). */
    int frozen;          /* The hook asked, until ps_shard_thaw: pushes get
                          * PS_PUSH_BUSY. */
    size_t mem_state;   /* Bytes of the state of cfg (state_bytes). */
    size_t mem_staged;  /* Sync: bytes of the rows staged (capacity). */
    int64_t step_hw;    /* Highest step accepted, kept across rollbacks. */
    /* Settings of the server. */
    size_t mem_limit;
    struct st_rowdb *rowdb; /* Rows beyond row_budget bytes (NULL: none). */
    size_t row_budget;
    /* What the row store holds for the next setup or rollback
     * (ps_shard_rows_from_store): rows_at's checkpoint, rows_stored[t]
     * rows of table t; rows_have 0: nothing. */
    int rows_have;
    int64_t rows_at;
    uint64_t *rows_stored;
    int admit_after;        /* Row admission and expiry (ps_rows.h). */
    int64_t expire_after;
    int64_t max_ahead;
    int skip_nonfinite;
    /* Set before serving, then read-only. */
    ps_publish_fn hook;
    void *hook_ud;
    int64_t hook_every;
};

int ps_shard_create(const cm_model *model, const cm_placement *pl, int index, ps_shard **out) {
    *out = NULL;
    if (index < 0 || index >= pl->nshards) return CM_EINVAL;
    ps_shard *s = cm_calloc(1, sizeof *s);
    s->model = model;
    s->pl = pl;
    s->index = index;
    s->parts = cm_calloc((size_t)pl->nparts, sizeof *s->parts);
    s->part_off = cm_calloc((size_t)pl->nparts + 1, sizeof *s->part_off);
    s->local_of = cm_calloc((size_t)pl->nparts, sizeof *s->local_of);
    for (int i = 0; i < pl->nparts; i++) {
        s->local_of[i] = -1;
        if (pl->parts[i].shard != index) continue;
        s->local_of[i] = s->nparts;
        s->parts[s->nparts] = (uint32_t)i;
        s->part_off[s->nparts] = s->numel;
        s->numel += pl->parts[i].count;
        s->nparts++;
    }
    s->part_off[s->nparts] = s->numel;
    s->row_dim_max = cm_model_max_dim(model);
    s->table_dims = cm_calloc((size_t)model->ntables + 1, sizeof *s->table_dims);
    for (int t = 0; t < model->ntables; t++) s->table_dims[t] = model->vars[model->table_var[t]].dim;
    s->pool = cm_calloc(1, sizeof *s->pool);
    pthread_mutex_init(&s->pool->mu, NULL);
    atomic_init(&s->pool->refs, 1);
    s->pool->numel = s->numel ? s->numel : 1;
    s->pool->part_off = cm_malloc(((size_t)s->nparts + 1) * sizeof *s->pool->part_off);
    memcpy(s->pool->part_off, s->part_off, ((size_t)s->nparts + 1) * sizeof *s->part_off);
    pthread_mutex_init(&s->mu, NULL);
    s->st.nparts = s->nparts;
    s->st.bytes = s->numel * sizeof(float);
    s->step_hw = -1;
    s->mem_limit = ps_shard_default_memory_limit();
    s->max_ahead = PS_SHARD_MAX_STEP_AHEAD;
    *out = s;
    return CM_OK;
}

/* The limit of a cgroup (v2, then v1) of this process, or 0. */
static uint64_t cgroup_limit(void) {
    static const char *const files[] = {"/sys/fs/cgroup/memory.max",
                                        "/sys/fs/cgroup/memory/memory.limit_in_bytes"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        FILE *f = fopen(files[i], "r");
        if (!f) continue;
        unsigned long long v = 0;
        int ok = fscanf(f, "%llu", &v) == 1; /* "max": no limit. */
        fclose(f);
        if (ok && v > 0) return v;
    }
    return 0;
}

size_t ps_shard_default_memory_limit(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    uint64_t mem = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    uint64_t cg = cgroup_limit();
    if (cg && (!mem || cg < mem)) mem = cg;
    if (!mem) return (size_t)8 << 30;
    mem /= 2;
    return mem > SIZE_MAX ? SIZE_MAX : (size_t)mem;
}

void ps_shard_set_memory_limit(ps_shard *s, size_t bytes) {
    pthread_mutex_lock(&s->mu);
    s->mem_limit = bytes ? bytes : ps_shard_default_memory_limit();
    pthread_mutex_unlock(&s->mu);
}

void ps_shard_set_row_spill(ps_shard *s, struct st_rowdb *db, size_t budget) {
    pthread_mutex_lock(&s->mu);
    s->rowdb = db;
    s->row_budget = budget;
    pthread_mutex_unlock(&s->mu);
}

void ps_shard_rows_from_store(ps_shard *s, int64_t version, const uint64_t *counts) {
    pthread_mutex_lock(&s->mu);
    free(s->rows_stored);
    s->rows_stored = NULL;
    s->rows_have = counts != NULL;
    s->rows_at = version;
    if (counts) {
        size_t n = (size_t)(s->model->ntables > 0 ? s->model->ntables : 1);
        s->rows_stored = cm_malloc(n * sizeof *s->rows_stored);
        memcpy(s->rows_stored, counts, (size_t)s->model->ntables * sizeof *counts);
    }
    pthread_mutex_unlock(&s->mu);
}

/* The rows as the row store holds them for this setup or rollback (mu
 * held): what ps_shard_rows_from_store said, once; else nothing. */
static void rows_reset(ps_shard *s) {
    ps_rows_reset(s->rows, s->rows_at, s->rows_have ? s->rows_stored : NULL);
    s->rows_have = 0;
}

void ps_shard_set_row_admission(ps_shard *s, int k, int64_t expire_after) {
    pthread_mutex_lock(&s->mu);
    s->admit_after = k;
    s->expire_after = expire_after;
    pthread_mutex_unlock(&s->mu);
}

void ps_shard_set_skip_nonfinite(ps_shard *s, int skip) {
    pthread_mutex_lock(&s->mu);
    s->skip_nonfinite = skip != 0;
    pthread_mutex_unlock(&s->mu);
}

void ps_shard_set_max_step_ahead(ps_shard *s, int64_t steps) {
    pthread_mutex_lock(&s->mu);
    s->max_ahead = steps > 0 ? steps : PS_SHARD_MAX_STEP_AHEAD;
    pthread_mutex_unlock(&s->mu);
}

/* ------------------------------------------------------------ memory */

static size_t mul_sat(size_t a, size_t b) {
    size_t r;
    return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}

static size_t add_sat(size_t a, size_t b) { return a > SIZE_MAX - b ? SIZE_MAX : a + b; }

/* "12.5 MiB". */
static const char *fmt_bytes(size_t b, char *buf, size_t len) {
    static const char *const unit[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
    double v = (double)b;
    int u = 0;
    while (v >= 1024.0 && u < 6) {
        v /= 1024.0;
        u++;
    }
    if (u == 0)
        snprintf(buf, len, "%zu B", b);
    else
        snprintf(buf, len, "%.1f %s", v, unit[u]);
    return buf;
}

/* What the state of a config takes: what setup() allocates, and the buffer
 * of the next version. */
typedef struct state_size {
    size_t values;  /* One copy of the shard's values. */
    size_t params;  /* The current version and the next one's buffer. */
    size_t acc, slots, stage, book, total;
} state_size;

static void state_bytes(const ps_shard *s, const ps_shard_config *cfg, state_size *z) {
    size_t n = s->numel ? s->numel : 1, W = (size_t)cfg->num_workers;
    size_t np = (size_t)(s->nparts ? s->nparts : 1);
    int sync_rows = s->model->ntables > 0 && cfg->sync == PS_SYNC;
    z->values = mul_sat(n, sizeof(float));
    z->params = mul_sat(z->values, 2);
    z->acc = z->values;
    z->slots = mul_sat(z->values, (size_t)ps_optim_nslots(cfg->optim.kind));
    z->stage = cfg->sync == PS_SYNC && cfg->num_workers >= 3 ? mul_sat(z->values, W) : 0;
    /* contrib, last_step, rstage and rgiven per worker; pcount, pdone. */
    z->book = add_sat(mul_sat(W, add_sat(np, sizeof(int64_t) +
                                                 (sync_rows ? sizeof(ps_rowlist) + 1 : 0))),
                      mul_sat(np + 1, sizeof(int) + 1));
    z->total = add_sat(add_sat(add_sat(z->params, z->acc), add_sat(z->slots, z->stage)), z->book);
}

/* Bytes of a row list entry of 'dim' floats. */
static size_t entry_bytes(int dim) {
    return sizeof(uint32_t) + sizeof(uint64_t) + (size_t)dim * sizeof(float);
}

/* Bytes of a row list's arrays. */
static size_t rowlist_bytes(const ps_rowlist *l) { return mul_sat(l->cap, entry_bytes(l->dim)); }

/* Memory counted against the limit now (mu held, initialised). */
static size_t mem_used(const ps_shard *s) {
    size_t b = add_sat(s->mem_state, s->mem_staged);
    if (s->rows) {
        const ps_rowacc *a = &s->racc;
        b = add_sat(b, ps_rows_bytes(s->rows));
        b = add_sat(b, rowlist_bytes(&a->e));
        b = add_sat(b, mul_sat(a->mcap, sizeof *a->map));
        b = add_sat(b, mul_sat(a->scap, sizeof(uint64_t) + (size_t)a->e.dim * sizeof(float)));
    }
    return b;
}

/* Bytes the row store may grow by to hold n more rows of table t: their
 * values, slots, id and count, their share of the map (at most 2 / 0.7
 * entries a row) and a chunk of rows the store may start (mu held). */
static size_t row_growth(const ps_shard *s, uint32_t t, size_t n) {
    size_t row = (size_t)s->table_dims[t] * (size_t)(1 + ps_rows_nslots(s->rows)) * sizeof(float) +
                 2 * sizeof(uint64_t);
    return add_sat(mul_sat(n, row + 3 * 2 * sizeof(uint64_t)), mul_sat(PS_ROWS_CHUNK, row));
}

/* Bytes a row list grows by when 'more' entries are added. */
static size_t rowlist_growth(const ps_rowlist *l, size_t more) {
    if (l->n + more <= l->cap) return 0;
    size_t cap = l->cap ? l->cap : 256;
    while (cap < l->n + more) cap = cap > SIZE_MAX / 2 ? SIZE_MAX : cap * 2;
    return mul_sat(cap - l->cap, entry_bytes(l->dim));
}

/* Whether worker w's push of these rows keeps the shard within its memory
 * limit: the rows it may create, the staging (sync) and the accumulator's
 * entries (an upper bound: rows that exist are counted as new). Else 0
 * with a message (mu held). */
static int rows_fit(const ps_shard *s, int w, const ps_row_grad *rows, int nrows, char *err,
                    size_t errlen) {
    if (!s->rows || nrows == 0) return 1;
    size_t n = 0, more = 0;
    for (int r = 0; r < nrows; r++) {
        n = add_sat(n, rows[r].n);
        more = add_sat(more, row_growth(s, rows[r].table, rows[r].n));
    }
    if (s->cfg.sync == PS_SYNC) more = add_sat(more, rowlist_growth(&s->rstage[w], n));
    more = add_sat(more, rowlist_growth(&s->racc.e, n));
    size_t used = mem_used(s);
    if (add_sat(used, more) <= s->mem_limit) return 1;
    char a[32], b[32], c[32];
    cm_seterr(err, errlen,
              "shard %d: %zu rows from worker %d could take %s more, and it holds %s of its "
              "memory limit of %s",
              s->index, n, w, fmt_bytes(more, a, sizeof a), fmt_bytes(used, b, sizeof b),
              fmt_bytes(s->mem_limit, c, sizeof c));
    return 0;
}

/* Free what setup() allocated (not the snapshots). */
static void free_state(ps_shard *s) {
    free(s->stage);
    s->stage = NULL;
    ps_rows_destroy(s->rows);
    free(s->rows_stored);
    s->rows = NULL;
    if (s->rstage)
        for (int w = 0; w < s->cfg.num_workers; w++) ps_rowlist_free(&s->rstage[w]);
    free(s->rstage);
    s->rstage = NULL;
    free(s->rgiven);
    s->rgiven = NULL;
    s->rcount = 0;
    ps_rowacc_free(&s->racc);
    free(s->acc);
    free(s->slots);
    free(s->contrib);
    free(s->pcount);
    free(s->pdone);
    free(s->last_step);
    s->acc = s->slots = NULL;
    s->contrib = s->pdone = NULL;
    s->pcount = NULL;
    s->last_step = NULL;
    s->mem_staged = 0;
}

void ps_shard_destroy(ps_shard *s) {
    if (!s) return;
    ps_shard_abort_waiters(s);
    ps_snapshot_unref(s->current);
    ps_snapshot_unref(s->pending);
    free_state(s);
    free(s->spare);
    free(s->waiters);
    pthread_mutex_destroy(&s->mu);
    pool_unref(s->pool);
    free(s->parts);
    free(s->part_off);
    free(s->local_of);
    free(s->table_dims);
    free(s);
}

const uint32_t *ps_shard_parts(const ps_shard *s, int *nparts) {
    *nparts = s->nparts;
    return s->parts;
}

/* A snapshot of 'version' around 'data' (a pool buffer), one reference. */
static ps_snapshot *snap_new(ps_shard *s, float *data, int64_t version) {
    ps_snapshot *snap = cm_calloc(1, sizeof *snap);
    snap->data = data;
    snap->version = version;
    snap->part_off = s->pool->part_off;
    snap->pool = s->pool;
    atomic_fetch_add(&s->pool->refs, 1);
    atomic_init(&snap->refs, 1);
    return snap;
}

/* Make 'snap' (its reference moves to the shard) the current snapshot;
 * mu held. Returns the old one for the caller to unref after unlocking. */
static ps_snapshot *publish(ps_shard *s, ps_snapshot *snap) {
    ps_snapshot *old = s->current;
    s->current = snap;
    if (s->rows) ps_rows_set_step(s->rows, snap->version); /* Row expiry. */
    if (s->hook && snap->version > 0 && snap->version % s->hook_every == 0) {
        if (s->hook(s->hook_ud, snap, s->slots, ps_optim_nslots(s->cfg.optim.kind), &s->cfg,
                    s->rows, s->last_step))
            s->frozen = 1;
    }
    return old;
}

/* Make sure a buffer for the next version is at hand (mu held): a push
 * calls this before it changes anything, and fails cleanly without one. */
static int reserve_buffer(ps_shard *s) {
    if (!s->spare) s->spare = pool_get(s->pool);
    return s->spare != NULL;
}

/* A buffer for the next version: the one reserved (mu held). Every path
 * that gets here reserved it first; without one, a PS that cannot hold its
 * state cannot go on, so this aborts. */
static float *new_buffer(ps_shard *s) {
    float *b = s->spare;
    s->spare = NULL;
    if (!b) b = pool_get(s->pool);
    if (!b) abort();
    return b;
}

/* Whether waiter w can be answered now, and with which snapshot (mu
 * held): the current one once version >= min_version, or pending when all
 * the partitions a partition waiter wants are final there. */
static ps_snapshot *satisfies(const ps_shard *s, const waiter *w) {
    if (!s->inited) return NULL;
    if (s->version >= w->min_version) return s->current;
    if (w->nparts == 0 || !s->pending || w->min_version != s->version + 1) return NULL;
    for (int i = 0; i < w->nparts; i++)
        if (!s->pdone[w->parts[i]]) return NULL;
    return s->pending;
}

/* A ready waiter's rows into its buffers (mu held). */
static void read_rows(ps_shard *s, const waiter *w) {
    for (int i = 0; i < w->nrq; i++) {
        const ps_row_req *r = &w->rq[i];
        if (r->n == 0) continue;
        /* Beyond the memory limit missing rows are not created: they read
         * as their initial values all the same. */
        int create = w->train &&
                     add_sat(mem_used(s), row_growth(s, r->table, r->n)) <= s->mem_limit;
        ps_rows_read(s->rows, (int)r->table, r->ids, r->n, create, r->out);
        s->st.rows_pulled += r->n;
    }
}

/* Move the waiters that can be answered into *ready, each holding a
 * reference to its snapshot (mu held). */
static int take_ready(ps_shard *s, waiter **ready) {
    int n = 0;
    *ready = NULL;
    for (int i = 0; i < s->nwaiters; i++)
        if (satisfies(s, &s->waiters[i])) n++;
    if (n == 0) return 0;
    *ready = cm_malloc((size_t)n * sizeof **ready);
    int k = 0, keep = 0;
    for (int i = 0; i < s->nwaiters; i++) {
        ps_snapshot *snap = satisfies(s, &s->waiters[i]);
        if (snap) {
            read_rows(s, &s->waiters[i]);
            ps_snapshot_ref(snap);
            (*ready)[k] = s->waiters[i];
            (*ready)[k++].snap = snap;
        } else {
            s->waiters[keep++] = s->waiters[i];
        }
    }
    s->nwaiters = keep;
    return n;
}

/* Answer ready waiters, outside mu: each callback gets the waiter's
 * reference (NULL on shutdown). */
static void answer(waiter *ready, int n) {
    for (int i = 0; i < n; i++) {
        free(ready[i].parts);
        ready[i].cb(ready[i].ud, ready[i].snap);
    }
    free(ready);
}

static int same_config(const ps_shard_config *a, const ps_shard_config *b) {
    return a->optim.kind == b->optim.kind && a->optim.lr == b->optim.lr &&
           a->optim.momentum == b->optim.momentum && a->optim.beta1 == b->optim.beta1 &&
           a->optim.beta2 == b->optim.beta2 && a->optim.epsilon == b->optim.epsilon &&
           a->seed == b->seed && a->num_workers == b->num_workers && a->sync == b->sync &&
           a->aggregate == b->aggregate && a->zero_init == b->zero_init &&
           a->global_batch == b->global_batch && a->steps_per_epoch == b->steps_per_epoch &&
           a->init_hash == b->init_hash && a->optim.initial_accumulator == b->optim.initial_accumulator &&
           a->table_optim.kind == b->table_optim.kind && a->table_optim.lr == b->table_optim.lr &&
           a->table_optim.beta1 == b->table_optim.beta1 &&
           a->table_optim.beta2 == b->table_optim.beta2 &&
           a->table_optim.epsilon == b->table_optim.epsilon &&
           a->table_optim.momentum == b->table_optim.momentum &&
           a->table_optim.initial_accumulator == b->table_optim.initial_accumulator &&
           a->backup_ms == b->backup_ms;
}

/* An optimizer's settings beyond its kind and rate, so that two configs
 * that differ read differently. */
static void describe_more(const ps_optim_cfg *o, char *buf, size_t len) {
    snprintf(buf, len, "mom=%g b1=%g b2=%g eps=%g acc0=%g", (double)o->momentum,
             (double)o->beta1, (double)o->beta2, (double)o->epsilon,
             (double)o->initial_accumulator);
}

static void describe(const ps_shard *s, const ps_shard_config *c, char *buf, size_t len) {
    char from[40] = "", tables[192] = "", more[128], tmore[128];
    if (c->init_hash)
        snprintf(from, sizeof from, " from-values=%016llx", (unsigned long long)c->init_hash);
    describe_more(&c->optim, more, sizeof more);
    if (s->model->ntables > 0) {
        describe_more(&c->table_optim, tmore, sizeof tmore);
        snprintf(tables, sizeof tables, "; tables %s lr=%g (%s)",
                 ps_optim_name(c->table_optim.kind), (double)c->table_optim.lr, tmore);
    }
    snprintf(buf, len,
             "%s lr=%g seed=%llu workers=%d %s %s%s%s global batch %u (%llu steps/epoch) (%s)%s",
             ps_optim_name(c->optim.kind), (double)c->optim.lr, (unsigned long long)c->seed,
             c->num_workers,
             c->sync != PS_SYNC ? "async" : c->backup_ms > 0 ? "backup-sync" : "sync",
             c->aggregate == PS_AGG_SUM ? "sum" : "mean", c->zero_init ? " zero-init" : "", from,
             c->global_batch, (unsigned long long)c->steps_per_epoch, more, tables);
}

/* ------------------------------------------------------------ set-up */

/* The values of version 'version' into cur and the slots, from 'params'
 * and 'slots' when given (not NULL), else from cfg->seed (or zeros) and
 * zeros; owned: they are already in place (mu held). */
static void fill_state(ps_shard *s, const ps_shard_config *cfg, float *cur, const float *params,
                       const float *slots, int owned_params, int owned_slots) {
    size_t n = s->numel ? s->numel : 1;
    int nslots = ps_optim_nslots(cfg->optim.kind);
    if (nslots && slots)
        memcpy(s->slots, slots, (size_t)nslots * n * sizeof(float));
    else if (nslots && !owned_slots)
        memset(s->slots, 0, (size_t)nslots * n * sizeof(float));
    for (int i = 0; i < s->nparts && !owned_params; i++) {
        const cm_partition *p = &s->pl->parts[s->parts[i]];
        float *dst = cur + s->part_off[i];
        if (params)
            memcpy(dst, params + s->part_off[i], p->count * sizeof(float));
        else if (cfg->zero_init)
            memset(dst, 0, p->count * sizeof(float));
        else
            cm_var_init(&s->model->vars[p->var], cfg->seed, p->begin, p->count, dst);
    }
}

/* Allocate the state for cfg and make 'version' current: its values from
 * 'params' and the slots from 'slots' when given (a restore), else from
 * cfg->seed and zeros (mu held, not initialised). Unless 'owned' is set:
 * then owned_params and owned_slots are cm_alloc_aligned buffers that become
 * the first snapshot's buffer and the slots as they are (a restore of a
 * large shard then touches its memory once, not twice). The state's size is
 * checked against the memory limit first, and every allocation is checked:
 * CM_ENOMEM with a message, nothing changed (the owned buffers still the
 * caller's). */
static int setup(ps_shard *s, const ps_shard_config *cfg, int64_t version, const float *params,
                 const float *slots, float *owned_params, float *owned_slots, char *err,
                 size_t errlen) {
    state_size z;
    state_bytes(s, cfg, &z);
    char a[32], b[32], c[32], d[32], e[32], f[32], g[32];
    if (z.total > s->mem_limit) {
        char stage[128] = "";
        if (z.stage)
            snprintf(stage, sizeof stage, ", sync staging %d x %s = %s", cfg->num_workers,
                     fmt_bytes(z.values, a, sizeof a), fmt_bytes(z.stage, b, sizeof b));
        cm_seterr(err, errlen,
                  "shard %d: %s with %d workers needs %s (values %s twice, accumulator %s, "
                  "optimizer slots %s%s, bookkeeping %s), over the shard's memory limit of %s",
                  s->index, cfg->sync == PS_SYNC ? "sync mode" : "async mode",
                  cfg->num_workers, fmt_bytes(z.total, c, sizeof c),
                  fmt_bytes(z.values, d, sizeof d), fmt_bytes(z.acc, e, sizeof e),
                  fmt_bytes(z.slots, f, sizeof f), stage, fmt_bytes(z.book, g, sizeof g),
                  fmt_bytes(s->mem_limit, a, sizeof a));
        return CM_ENOMEM;
    }
    size_t n = s->numel ? s->numel : 1, W = (size_t)cfg->num_workers;
    size_t np = (size_t)(s->nparts ? s->nparts : 1);
    int nslots = ps_optim_nslots(cfg->optim.kind);
    int sync_rows = s->model->ntables > 0 && cfg->sync == PS_SYNC;
    float *cur = owned_params ? owned_params : pool_get(s->pool);
    float *acc = cm_alloc_aligned(n * sizeof(float));
    float *sl = !nslots ? NULL
                : owned_slots ? owned_slots
                              : cm_alloc_aligned((size_t)nslots * n * sizeof(float));
    float *stage = z.stage ? cm_alloc_aligned(z.stage) : NULL;
    uint8_t *contrib = calloc(W * np, 1);
    int *pcount = calloc((size_t)s->nparts + 1, sizeof *pcount);
    uint8_t *pdone = calloc((size_t)s->nparts + 1, 1);
    int64_t *last = malloc(W * sizeof *last);
    ps_rowlist *rstage = sync_rows ? calloc(W, sizeof *rstage) : NULL;
    uint8_t *rgiven = sync_rows ? calloc(W, 1) : NULL;
    if (!cur || !acc || (nslots && !sl) || (z.stage && !stage) || !contrib || !pcount || !pdone ||
        !last || (sync_rows && (!rstage || !rgiven))) {
        if (cur && cur != owned_params) pool_put(s->pool, cur);
        if (sl != owned_slots) free(sl);
        free(acc);
        free(stage);
        free(contrib);
        free(pcount);
        free(pdone);
        free(last);
        free(rstage);
        free(rgiven);
        cm_seterr(err, errlen, "shard %d: cannot allocate the %s its state needs", s->index,
                  fmt_bytes(z.total, a, sizeof a));
        return CM_ENOMEM;
    }
    s->acc = acc;
    s->slots = sl;
    s->stage = stage;
    s->contrib = contrib;
    s->pcount = pcount;
    s->pdone = pdone;
    s->ndone = 0;
    memset(s->absent, 0, sizeof s->absent);
    s->nabsent = 0;
    for (size_t w = 0; w < PS_SHARD_MAX_WORKERS; w++) s->partial_step[w] = -1;
    memset(s->step_open, 0, sizeof s->step_open);
    s->open_since = 0;
    s->last_step = last;
    for (size_t w = 0; w < W; w++) s->last_step[w] = -1;
    s->rstage = rstage;
    s->rgiven = rgiven;
    for (size_t w = 0; rstage && w < W; w++) rstage[w].dim = s->row_dim_max;
    s->mem_staged = 0;
    if (s->model->ntables > 0) {
        s->rows = ps_rows_create(s->model, &cfg->table_optim, cfg->seed);
        if (s->rowdb) ps_rows_set_spill(s->rows, s->rowdb, s->row_budget);
        ps_rows_set_admission(s->rows, s->admit_after);
        ps_rows_set_expiry(s->rows, s->expire_after);
        ps_rows_set_step(s->rows, version);
        rows_reset(s);
        s->racc.e.dim = s->row_dim_max;
    }
    s->cfg = *cfg;
    fill_state(s, cfg, cur, params, slots, owned_params != NULL, owned_slots != NULL);
    s->mem_state = z.total;
    s->version = version;
    /* Not publish(): the hook is for versions computed here. */
    s->current = snap_new(s, cur, version);
    s->inited = 1;
    return CM_OK;
}

/* ------------------------------------------------------------ config */

/* One optimizer's settings ('which': "optimizer" or "table optimizer"):
 * every value finite (one that is not would also never compare equal to
 * itself, so a retried Init would be refused), and in range where the kind
 * uses it. */
static int optim_ok(const ps_optim_cfg *o, const char *which, char *err, size_t errlen) {
    if (o->kind < 0 || o->kind > PS_OPTIM_ADAGRAD) {
        cm_seterr(err, errlen, "invalid init config: %s kind %d (must be 0 to %d)", which,
                  o->kind, PS_OPTIM_ADAGRAD);
        return 0;
    }
    const char *kind = ps_optim_name(o->kind);
    const struct {
        const char *name;
        float v;
    } f[] = {{"lr", o->lr},           {"momentum", o->momentum},
             {"beta1", o->beta1},     {"beta2", o->beta2},
             {"epsilon", o->epsilon}, {"initial_accumulator", o->initial_accumulator}};
    for (size_t i = 0; i < sizeof f / sizeof *f; i++)
        if (!isfinite(f[i].v)) {
            cm_seterr(err, errlen, "invalid init config: %s (%s) %s %g, must be finite", which,
                      kind, f[i].name, (double)f[i].v);
            return 0;
        }
    const char *bad = NULL, *want = NULL;
    float v = 0.0f;
    if (o->kind != PS_OPTIM_ADD && !(o->lr > 0.0f)) {
        bad = "lr", v = o->lr, want = "> 0";
    } else if (o->kind == PS_OPTIM_MOMENTUM && !(o->momentum >= 0.0f && o->momentum < 1.0f)) {
        bad = "momentum", v = o->momentum, want = "in [0, 1)";
    } else if (o->kind == PS_OPTIM_ADAM && !(o->beta1 > 0.0f && o->beta1 < 1.0f)) {
        bad = "beta1", v = o->beta1, want = "in (0, 1)";
    } else if (o->kind == PS_OPTIM_ADAM && !(o->beta2 > 0.0f && o->beta2 < 1.0f)) {
        bad = "beta2", v = o->beta2, want = "in (0, 1)";
    } else if ((o->kind == PS_OPTIM_ADAM || o->kind == PS_OPTIM_ADAGRAD) && !(o->epsilon > 0.0f)) {
        bad = "epsilon", v = o->epsilon, want = "> 0";
    } else if (o->kind == PS_OPTIM_ADAGRAD && !(o->initial_accumulator >= 0.0f)) {
        bad = "initial_accumulator", v = o->initial_accumulator, want = ">= 0";
    }
    if (bad) {
        cm_seterr(err, errlen, "invalid init config: %s (%s) %s %g, must be %s", which, kind, bad,
                  (double)v, want);
        return 0;
    }
    return 1;
}

static int config_ok(const ps_shard *s, const ps_shard_config *cfg, char *err, size_t errlen) {
    if (cfg->num_workers < 1 || cfg->num_workers > PS_SHARD_MAX_WORKERS) {
        cm_seterr(err, errlen, "invalid init config: num_workers %d (must be 1 to %d)",
                  cfg->num_workers, PS_SHARD_MAX_WORKERS);
        return 0;
    }
    if (cfg->sync != PS_SYNC && cfg->sync != PS_ASYNC) {
        cm_seterr(err, errlen, "invalid init config: sync mode %d (must be %d, sync, or %d, async)",
                  cfg->sync, PS_SYNC, PS_ASYNC);
        return 0;
    }
    if (cfg->aggregate != PS_AGG_MEAN && cfg->aggregate != PS_AGG_SUM) {
        cm_seterr(err, errlen, "invalid init config: aggregate %d (must be %d, mean, or %d, sum)",
                  cfg->aggregate, PS_AGG_MEAN, PS_AGG_SUM);
        return 0;
    }
    if (cfg->backup_ms < 0 || (cfg->backup_ms > 0 && cfg->sync != PS_SYNC)) {
        cm_seterr(err, errlen, "invalid init config: backup after %lld ms (must be >= 0, and 0 "
                  "in async mode)", (long long)cfg->backup_ms);
        return 0;
    }
    if (!optim_ok(&cfg->optim, "optimizer", err, errlen)) return 0;
    /* Only a model with tables uses (and is sent) the table optimizer. */
    if (s->model->ntables > 0) return optim_ok(&cfg->table_optim, "table optimizer", err, errlen);
    if (cfg->table_optim.kind < 0 || cfg->table_optim.kind > PS_OPTIM_ADAGRAD) {
        cm_seterr(err, errlen, "invalid init config: table optimizer kind %d",
                  cfg->table_optim.kind);
        return 0;
    }
    return 1;
}

int ps_shard_init(ps_shard *s, const ps_shard_config *cfg, int64_t *version, char *err,
                  size_t errlen) {
    if (!config_ok(s, cfg, err, errlen)) return CM_EINVAL;
    pthread_mutex_lock(&s->mu);
    if (s->inited) {
        int same = same_config(&s->cfg, cfg);
        *version = s->version;
        if (!same) {
            char have[512], got[512];
            describe(s, &s->cfg, have, sizeof have);
            describe(s, cfg, got, sizeof got);
            cm_seterr(err, errlen, "shard %d is already initialised with %s; refusing %s",
                      s->index, have, got);
        }
        pthread_mutex_unlock(&s->mu);
        return same ? CM_OK : CM_EBUSY;
    }
    int rc = setup(s, cfg, 0, NULL, NULL, NULL, NULL, err, errlen);
    if (rc != CM_OK) {
        *version = 0;
        pthread_mutex_unlock(&s->mu);
        return rc;
    }
    *version = 0;
    waiter *ready;
    int nready = take_ready(s, &ready);
    pthread_mutex_unlock(&s->mu);
    answer(ready, nready);
    return CM_OK;
}

/* Bytes a value of a (valid) pushed dtype takes on the wire. */
static size_t dtype_size(int dtype) { return dtype == PS_DTYPE_BFLOAT16 ? 2 : sizeof(float); }

/* Run fn(ud, i, src, m) over g's n values (validated: len is n values) in
 * runs: values i .. i + m - 1 at src (maybe unaligned), in order. A value
 * cut between two pieces comes alone, from a bounce buffer. Stops at the
 * first nonzero return of fn and returns it; 0 when all ran. */
typedef int (*grad_run_fn)(void *ud, size_t i, const uint8_t *src, size_t m);

static int grad_runs(const ps_grad *g, size_t n, grad_run_fn fn, void *ud) {
    if (g->data || !g->npieces) return n ? fn(ud, 0, g->data, n) : 0;
    size_t es = dtype_size(g->dtype), i = 0, have = 0;
    uint8_t bounce[sizeof(float)];
    for (int k = 0; k < g->npieces && i < n; k++) {
        const uint8_t *p = g->pieces[k].p;
        size_t len = g->pieces[k].len;
        if (have) { /* The rest of a cut value. */
            size_t t = es - have < len ? es - have : len;
            memcpy(bounce + have, p, t);
            have += t;
            p += t;
            len -= t;
            if (have < es) continue;
            int rc = fn(ud, i++, bounce, 1);
            if (rc) return rc;
            have = 0;
        }
        size_t m = len / es;
        if (m > n - i) m = n - i;
        if (m) {
            int rc = fn(ud, i, p, m);
            if (rc) return rc;
            i += m;
        }
        p += m * es;
        len -= m * es;
        if (len) {
            memcpy(bounce, p, len < es ? len : es);
            have = len < es ? len : es;
        }
    }
    return 0;
}

/* dst = g's n values as float32 (g validated: the first contribution). */
static void grad_load(float *dst, const ps_grad *g, size_t n) {
    if (g->dtype == PS_DTYPE_BFLOAT16)
        ps_wire_load_bf16(dst, g->data, n);
    else
        memcpy(dst, g->data, n * sizeof(float));
}

typedef struct run_dst {
    float *dst;
    int dtype, bad;
} run_dst;

static int add_run(void *ud, size_t i, const uint8_t *src, size_t m) {
    run_dst *d = ud;
    if (d->dtype == PS_DTYPE_BFLOAT16)
        ps_wire_load_add_bf16(d->dst + i, src, m);
    else
        ps_wire_load_add(d->dst + i, src, m);
    return 0;
}

/* dst += g's n values, widened to float32. */
static void grad_add(float *dst, const ps_grad *g, size_t n) {
    run_dst d = {dst, g->dtype, 0};
    grad_runs(g, n, add_run, &d);
}

/* Check a push's tensors against the placement (no lock needed: the layout
 * is immutable). */
static int validate(const ps_shard *s, const ps_grad *g, int ng, char *err, size_t errlen) {
    if ((ng < 1 && s->nparts > 0) || ng > s->nparts) {
        cm_seterr(err, errlen, "a push to shard %d must carry 1 to %d of its partitions, got %d",
                  s->index, s->nparts, ng);
        return PS_PUSH_INVALID;
    }
    uint8_t seen_small[256];
    uint8_t *seen = s->nparts <= 256 ? seen_small : cm_calloc((size_t)s->nparts, 1);
    memset(seen, 0, s->nparts <= 256 ? sizeof seen_small : 0);
    int rc = PS_PUSH_OK;
    for (int i = 0; i < ng && rc == PS_PUSH_OK; i++) {
        const ps_grad *x = &g[i];
        if (x->part >= (uint32_t)s->pl->nparts) {
            cm_seterr(err, errlen, "unknown partition %u (the model has %d)", x->part,
                      s->pl->nparts);
            rc = PS_PUSH_INVALID;
            break;
        }
        const cm_partition *p = &s->pl->parts[x->part];
        const cm_var *v = &s->model->vars[p->var];
        int li = s->local_of[x->part];
        if (li < 0) {
            cm_seterr(err, errlen, "partition %u (%s part %d) belongs to shard %d, not shard %d",
                      x->part, v->name, p->index, p->shard, s->index);
            rc = PS_PUSH_INVALID;
        } else if (seen[li]) {
            cm_seterr(err, errlen, "partition %u appears twice in one push", x->part);
            rc = PS_PUSH_INVALID;
        } else if (x->dtype != PS_DTYPE_FLOAT32 && x->dtype != PS_DTYPE_BFLOAT16) {
            cm_seterr(err, errlen,
                      "partition %u (%s part %d): dtype %d, must be DTYPE_FLOAT32 (1) or "
                      "DTYPE_BFLOAT16 (2)",
                      x->part, v->name, p->index, x->dtype);
            rc = PS_PUSH_INVALID;
        } else {
            seen[li] = 1;
            /* A scalar (0 dimensions) has an empty shape: no shape[0]. */
            int shape_ok = x->nshape == v->ndims &&
                           (v->ndims == 0 || x->shape[0] == p->row_end - p->row_begin);
            for (int d = 1; shape_ok && d < v->ndims; d++)
                shape_ok = x->shape[d] == (uint64_t)v->dims[d];
            if (!shape_ok) {
                char want[64];
                int n = snprintf(want, sizeof want, "[%zu", p->row_end - p->row_begin);
                for (int d = 1; d < v->ndims && n < (int)sizeof want; d++)
                    n += snprintf(want + n, sizeof want - (size_t)n, ",%lld",
                                  (long long)v->dims[d]);
                snprintf(want + n, sizeof want - (size_t)n, "]");
                cm_seterr(err, errlen, "partition %u (%s part %d): shape must be %s", x->part,
                          v->name, p->index, want);
                rc = PS_PUSH_INVALID;
            } else if (x->len != p->count * dtype_size(x->dtype)) {
                cm_seterr(err, errlen,
                          "partition %u (%s part %d): %zu data bytes, expected %zu (%zu %s)",
                          x->part, v->name, p->index, x->len, p->count * dtype_size(x->dtype),
                          p->count, x->dtype == PS_DTYPE_BFLOAT16 ? "bfloat16" : "float32");
                rc = PS_PUSH_INVALID;
            }
        }
    }
    if (seen != seen_small) free(seen);
    return rc;
}

/* Check a push's row gradients (no lock: the model is immutable). */
static int validate_rows(const ps_shard *s, const ps_row_grad *rows, int nrows, int rows_final,
                         char *err, size_t errlen) {
    if ((nrows > 0 || rows_final) && s->model->ntables == 0) {
        cm_seterr(err, errlen, "row gradients pushed, but the model has no tables");
        return PS_PUSH_INVALID;
    }
    for (int r = 0; r < nrows; r++) {
        const ps_row_grad *x = &rows[r];
        if (x->table >= (uint32_t)s->model->ntables) {
            cm_seterr(err, errlen, "rows of table %u: the model has %d tables", x->table,
                      s->model->ntables);
            return PS_PUSH_INVALID;
        }
        const cm_var *v = &s->model->vars[s->model->table_var[x->table]];
        if (x->dtype != PS_DTYPE_FLOAT32 && x->dtype != PS_DTYPE_BFLOAT16) {
            cm_seterr(err, errlen,
                      "rows of table %u (%s): dtype %d, must be DTYPE_FLOAT32 (1) or "
                      "DTYPE_BFLOAT16 (2)", x->table, v->name, x->dtype);
            return PS_PUSH_INVALID;
        }
        if (x->len != x->n * (size_t)v->dim * dtype_size(x->dtype)) {
            cm_seterr(err, errlen,
                      "rows of table %u (%s): %zu data bytes, expected %zu (%zu ids of dim %d)",
                      x->table, v->name, x->len, x->n * (size_t)v->dim * dtype_size(x->dtype),
                      x->n, v->dim);
            return PS_PUSH_INVALID;
        }
        for (size_t i = 0; i < x->n; i++)
            if (cm_row_shard((int)x->table, x->ids[i], s->pl->nshards) != s->index) {
                cm_seterr(err, errlen, "row %llu of table %u (%s) belongs to shard %d, not %d",
                          (unsigned long long)x->ids[i], x->table, v->name,
                          cm_row_shard((int)x->table, x->ids[i], s->pl->nshards), s->index);
                return PS_PUSH_INVALID;
            }
    }
    return PS_PUSH_OK;
}

/* ------------------------------------------------------------ values */

/* Values per block of the scans: each block is checked without a branch
 * (so the loop vectorises), and one with a bad value is then read value by
 * value. */
#define SCAN_BLOCK 8192

/* Whether any of n float32 at p (little-endian, maybe unaligned) is NaN or
 * infinite, i.e. has all its exponent bits set: adding one to such an
 * exponent carries into the sign bit, and no other exponent does. */
CM_SIMD_CLONES static int any_nonfinite_f32(const uint8_t *restrict p, size_t n) {
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, p + 4 * i, sizeof u);
        acc |= (u & 0x7f800000u) + 0x00800000u;
    }
    return (acc & 0x80000000u) != 0;
}

/* The same for bfloat16 (the upper half of a float32). */
CM_SIMD_CLONES static int any_nonfinite_bf16(const uint8_t *restrict p, size_t n) {
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, sizeof h);
        acc |= ((uint32_t)h & 0x7f80u) + 0x0080u;
    }
    return (acc & 0x8000u) != 0;
}

/* Value i of p (as dtype) as float32 bits. */
static uint32_t bits_at(const uint8_t *p, size_t i, int dtype) {
    uint32_t u;
    if (dtype == PS_DTYPE_BFLOAT16) {
        uint16_t h;
        memcpy(&h, p + 2 * i, sizeof h);
        u = (uint32_t)h << 16;
    } else {
        memcpy(&u, p + 4 * i, sizeof u);
    }
    return u;
}

/* The index of the first NaN or infinity among the n values (dtype) at p,
 * or n if there is none. */
static size_t first_nonfinite(const uint8_t *p, size_t n, int dtype) {
    size_t es = dtype_size(dtype);
    for (size_t b = 0; b < n; b += SCAN_BLOCK) {
        size_t m = n - b < SCAN_BLOCK ? n - b : SCAN_BLOCK;
        if (!(dtype == PS_DTYPE_BFLOAT16 ? any_nonfinite_bf16(p + b * es, m)
                                          : any_nonfinite_f32(p + b * es, m)))
            continue;
        for (size_t i = b; i < b + m; i++)
            if ((bits_at(p, i, dtype) & 0x7f800000u) == 0x7f800000u) return i;
    }
    return n;
}

static const char *nonfinite_name(uint32_t u) {
    return u & 0x007fffffu ? "nan" : u >> 31 ? "-inf" : "inf";
}

/* dst = the n float32 at p, as grad_load, in the same pass the check: 1 if
 * one is NaN or infinite (dst holds them all the same). */
CM_SIMD_CLONES static int load_check_f32(float *restrict dst, const uint8_t *restrict p, size_t n) {
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, p + 4 * i, sizeof u);
        acc |= (u & 0x7f800000u) + 0x00800000u;
        memcpy(&dst[i], &u, sizeof u);
    }
    return (acc & 0x80000000u) != 0;
}

/* The same from bfloat16, widened as ps_wire_load_bf16 does. */
CM_SIMD_CLONES static int load_check_bf16(float *restrict dst, const uint8_t *restrict p, size_t n) {
    uint32_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, p + 2 * i, sizeof h);
        acc |= ((uint32_t)h & 0x7f80u) + 0x0080u;
        uint32_t u = (uint32_t)h << 16;
        memcpy(&dst[i], &u, sizeof u);
    }
    return (acc & 0x8000u) != 0;
}

static int load_check_run(void *ud, size_t i, const uint8_t *src, size_t m) {
    run_dst *d = ud;
    d->bad |= d->dtype == PS_DTYPE_BFLOAT16 ? load_check_bf16(d->dst + i, src, m)
                                            : load_check_f32(d->dst + i, src, m);
    return 0;
}

static int grad_load_check(float *dst, const ps_grad *g, size_t n) {
    run_dst d = {dst, g->dtype, 0};
    grad_runs(g, n, load_check_run, &d);
    return d.bad;
}

typedef struct run_find {
    int dtype;
    size_t at;     /* The first non-finite value's index (n: none yet). */
    uint32_t bits; /* Its float32 bits. */
} run_find;

static int find_run(void *ud, size_t i, const uint8_t *src, size_t m) {
    run_find *f = ud;
    size_t k = first_nonfinite(src, m, f->dtype);
    if (k == m) return 0;
    f->at = i + k;
    f->bits = bits_at(src, k, f->dtype);
    return 1;
}

/* The index of g's first NaN or infinity among its n values (n if none),
 * and its float32 bits in *bits. */
static size_t grad_first_nonfinite(const ps_grad *g, size_t n, uint32_t *bits) {
    run_find f = {g->dtype, n, 0};
    grad_runs(g, n, find_run, &f);
    if (bits) *bits = f.bits;
    return f.at;
}

/* The message for a partition's gradient with a NaN or an infinity. */
static void nonfinite_part_msg(const ps_shard *s, const ps_grad *g, char *err, size_t errlen) {
    uint32_t bits = 0;
    size_t n = g->len / dtype_size(g->dtype), k = grad_first_nonfinite(g, n, &bits);
    const cm_partition *p = &s->pl->parts[g->part];
    cm_seterr(err, errlen,
              "partition %u (%s part %d): non-finite gradient: %s at element %zu of %zu (%s)",
              g->part, s->model->vars[p->var].name, p->index,
              k < n ? nonfinite_name(bits) : "?", k, n,
              g->dtype == PS_DTYPE_BFLOAT16 ? "bfloat16" : "float32");
}

/* Whether a (validated) push's rows carry a NaN or an infinity: 1 with a
 * message naming the first (no lock: reads the request only). */
static int scan_rows(const ps_shard *s, const ps_row_grad *rows, int nrows, char *err,
                     size_t errlen) {
    for (int r = 0; r < nrows; r++) {
        const ps_row_grad *x = &rows[r];
        size_t n = x->len / dtype_size(x->dtype);
        size_t k = first_nonfinite(x->data, n, x->dtype);
        if (k == n) continue;
        size_t dim = (size_t)s->table_dims[x->table];
        cm_seterr(err, errlen,
                  "rows of table %u (%s): non-finite gradient: %s at row %zu (id %llu), "
                  "element %zu (%s)",
                  x->table, s->model->vars[s->model->table_var[x->table]].name,
                  nonfinite_name(bits_at(x->data, k, x->dtype)), k / dim,
                  (unsigned long long)x->ids[k / dim], k % dim,
                  x->dtype == PS_DTYPE_BFLOAT16 ? "bfloat16" : "float32");
        return 1;
    }
    return 0;
}

/* The first pass over a push's dense gradients (mu held): each partition
 * it gives anew is read into its scratch, checked on the way (one read of
 * the gradient, not two): in async mode (mine NULL) acc; in sync mode the
 * worker's staging slot, or acc where it is the partition's first
 * contribution; one that will be added to acc (sync, the second of 2
 * workers) is only checked. Nothing is counted, so a push refused now
 * leaves the shard as it was. Returns the index in grads of the first
 * partition with a NaN or infinity, or -1. */
static int load_dense(ps_shard *s, int worker, const ps_grad *grads, int ngrads,
                      const uint8_t *mine) {
    for (int i = 0; i < ngrads; i++) {
        int li = s->local_of[grads[i].part];
        if (mine && mine[li]) continue;
        size_t off = s->part_off[li], n = s->part_off[li + 1] - off;
        int bad;
        if (mine && s->stage)
            bad = grad_load_check(s->stage + (size_t)worker * s->numel + off, &grads[i], n);
        else if (!mine || s->pcount[li] == 0)
            bad = grad_load_check(s->acc + off, &grads[i], n);
        else
            bad = grad_first_nonfinite(&grads[i], n, NULL) < n;
        if (bad) return i;
    }
    return -1;
}

/* ------------------------------------------------------------ applying */

/* Average partition li's accumulated gradient over 'contributions' (mean
 * mode) and write its version + 1 values into 'next' (mu held). */
static void apply_part(ps_shard *s, int li, int contributions, float *next) {
    size_t off = s->part_off[li], n = s->part_off[li + 1] - off;
    float *restrict a = s->acc + off;
    if (s->cfg.aggregate == PS_AGG_MEAN && contributions > 1) {
        float scale = 1.0f / (float)contributions;
        for (size_t i = 0; i < n; i++) a[i] *= scale;
    }
    ps_optim_apply_strided(&s->cfg.optim, s->version + 1, s->current->data + off, next + off, a,
                           s->slots ? s->slots + off : NULL, s->numel, n);
}

typedef struct apply_ctx {
    ps_rows *rows;
    float scale;
} apply_ctx;

static void apply_table(void *ud, uint32_t table, const uint64_t *ids, size_t n,
                        const float *g) {
    apply_ctx *c = ud;
    ps_rows_apply(c->rows, (int)table, ids, n, g, c->scale);
}

/* Apply the accumulated rows (each touched row one optimizer step, its
 * gradient times 'scale'), a table at a time (the row store looks the ids
 * of a call up ahead), and empty the accumulator (mu held). */
static void apply_acc(ps_shard *s, float scale) {
    apply_ctx c = {.rows = s->rows, .scale = scale};
    ps_rowacc_each_table(&s->racc, s->model->ntables, s->table_dims, apply_table, &c);
    ps_rowacc_reset(&s->racc);
}

/* Sync: the contributions a partition (and the rows) of the step wait for:
 * every worker, less those backup sync marked absent (mu held). */
static int need(const ps_shard *s) { return s->cfg.num_workers - s->nabsent; }

/* Sync: every worker's rows of the step are in. Sum them per row in rank
 * order and apply them, averaged as dense gradients are (mu held). */
static void apply_staged_rows(ps_shard *s) {
    for (int w = 0; w < s->cfg.num_workers; w++) {
        ps_rowlist *l = &s->rstage[w];
        for (size_t i = 0; i < l->n; i++)
            ps_rowacc_add(&s->racc, l->tab[i], l->id[i], (const uint8_t *)(l->g + i * (size_t)l->dim),
                    ps_rows_dim(s->rows, (int)l->tab[i]), 0);
        l->n = 0;
    }
    /* Averaged over the workers whose rows came (all but after a backup
     * close). */
    int n = s->rcount > 0 ? s->rcount : 1;
    float scale = s->cfg.aggregate == PS_AGG_MEAN && n > 1 ? 1.0f / (float)n : 1.0f;
    apply_acc(s, scale);
}

/* Sync: close the step once every partition is final and, with tables,
 * every worker's rows are in: the rows are applied and version + 1 is
 * published (mu held). Returns the old snapshot to unref after unlocking,
 * or NULL. */
static ps_snapshot *maybe_close(ps_shard *s) {
    if (s->ndone < s->nparts) return NULL;
    if (s->rows && s->rcount < need(s)) return NULL;
    if (s->rows) {
        apply_staged_rows(s);
        s->rcount = 0;
        memset(s->rgiven, 0, (size_t)s->cfg.num_workers);
    }
    if (!s->pending) s->pending = snap_new(s, new_buffer(s), s->version + 1);
    s->version++;
    s->open_since = 0;
    ps_snapshot *old = publish(s, s->pending);
    s->pending = NULL;
    s->ndone = 0;
    memset(s->pdone, 0, (size_t)s->nparts + 1);
    memset(s->pcount, 0, ((size_t)s->nparts + 1) * sizeof *s->pcount);
    memset(s->contrib, 0, (size_t)s->cfg.num_workers * (size_t)(s->nparts ? s->nparts : 1));
    return old;
}

/* Sync, a shard that owns nothing (no partition, no table): the step's
 * version is published as it comes (mu held). Returns the old snapshot. */
static ps_snapshot *close_empty(ps_shard *s) {
    s->version++;
    ps_snapshot *old = publish(s, snap_new(s, new_buffer(s), s->version));
    s->pcount[0] = 0;
    s->open_since = 0;
    memset(s->contrib, 0, (size_t)s->cfg.num_workers);
    return old;
}

/* Backup sync: worker w pushed, so it is alive; steps wait for it again
 * (mu held). */
static void present(ps_shard *s, int w) {
    if (!s->absent[w]) return;
    s->absent[w] = 0;
    s->nabsent--;
}

/* Sync, 3 or more workers: partition li's staged gradients of the workers
 * that gave it, summed into acc in rank order (the same sum whatever the
 * arrival order; mu held). */
static void sum_staged(ps_shard *s, int li) {
    size_t off = s->part_off[li], n = s->part_off[li + 1] - off, np = (size_t)s->nparts;
    float *restrict dst = s->acc + off;
    int first = 1;
    for (int w = 0; w < s->cfg.num_workers; w++) {
        if (!s->contrib[(size_t)w * np + (size_t)li]) continue;
        const float *restrict g = s->stage + (size_t)w * s->numel + off;
        if (first)
            memcpy(dst, g, n * sizeof(float));
        else
            for (size_t k = 0; k < n; k++) dst[k] += g[k];
        first = 0;
    }
}

/* Sync: partition li has all W contributions. Apply it into pending and,
 * when the step is complete, publish version + 1 (mu held). Returns the old
 * snapshot to unref after unlocking, or NULL. */
static ps_snapshot *finish_part(ps_shard *s, int li) {
    if (!s->pending) s->pending = snap_new(s, new_buffer(s), s->version + 1);
    apply_part(s, li, s->pcount[li], s->pending->data);
    s->pdone[li] = 1;
    ++s->ndone;
    return maybe_close(s);
}

/* Add a push's row gradients to the accumulator (mu held). */
static void acc_rows(ps_shard *s, const ps_row_grad *rows, int nrows) {
    for (int r = 0; r < nrows; r++) {
        const ps_row_grad *x = &rows[r];
        int dim = ps_rows_dim(s->rows, (int)x->table);
        size_t vb = (size_t)dim * dtype_size(x->dtype);
        for (size_t i = 0; i < x->n; i++)
            ps_rowacc_add(&s->racc, x->table, x->ids[i], x->data + i * vb, dim,
                    x->dtype == PS_DTYPE_BFLOAT16);
        s->st.rows_pushed += x->n;
    }
}

/* Sync: stage worker w's row gradients of the step, as float32 (mu held). */
static void stage_rows(ps_shard *s, int w, const ps_row_grad *rows, int nrows) {
    ps_rowlist *l = &s->rstage[w];
    s->mem_staged -= rowlist_bytes(l);
    for (int r = 0; r < nrows; r++) {
        const ps_row_grad *x = &rows[r];
        int dim = ps_rows_dim(s->rows, (int)x->table);
        size_t vb = (size_t)dim * dtype_size(x->dtype);
        ps_rowlist_reserve(l, x->n);
        for (size_t i = 0; i < x->n; i++) {
            size_t k = l->n++;
            l->tab[k] = x->table;
            l->id[k] = x->ids[i];
            grad_load(l->g + k * (size_t)l->dim,
                      &(ps_grad){.dtype = x->dtype, .data = x->data + i * vb}, (size_t)dim);
        }
        s->st.rows_pushed += x->n;
    }
    s->mem_staged += rowlist_bytes(l);
}

/* Async: apply the pushed partitions (in acc: load_dense) at once; the
 * others carry over unchanged. With bump, publish version + 1; without (a
 * call of a step whose last call is still to come: step_parts), the
 * values change and the version does not (mu held). Returns the old
 * snapshot (NULL when the values were written in place). */
static ps_snapshot *apply_async(ps_shard *s, const ps_grad *grads, int ngrads, int bump) {
    /* No reader holds the current snapshot (references are taken under
     * mu, or from one already held): write the next version into it in
     * place. Nobody can see the change, the buffer is already in cache,
     * and the partitions not pushed need no copy. */
    if (atomic_load(&s->current->refs) == 1) {
        for (int i = 0; i < ngrads; i++)
            apply_part(s, s->local_of[grads[i].part], 1, s->current->data);
        if (!bump) return NULL;
        s->version++;
        s->current->version = s->version;
        (void)publish(s, s->current); /* Itself: nothing to unref. */
        return NULL;
    }
    float *next = new_buffer(s);
    uint8_t small[256];
    uint8_t *pushed = s->nparts <= 256 ? small : cm_malloc((size_t)s->nparts);
    memset(pushed, 0, (size_t)s->nparts);
    for (int i = 0; i < ngrads; i++) {
        int li = s->local_of[grads[i].part];
        apply_part(s, li, 1, next);
        pushed[li] = 1;
    }
    for (int li = 0; li < s->nparts; li++)
        if (!pushed[li])
            memcpy(next + s->part_off[li], s->current->data + s->part_off[li],
                   (s->part_off[li + 1] - s->part_off[li]) * sizeof(float));
    if (pushed != small) free(pushed);
    if (!bump) { /* The same version: no publish hook, no row expiry step. */
        ps_snapshot *old = s->current;
        s->current = snap_new(s, next, s->version);
        return old;
    }
    s->version++;
    return publish(s, snap_new(s, next, s->version));
}

/* A push about to be taken: its dense values into their scratch and
 * checked (load_dense), its rows checked before (bad_rows, message nf).
 * With a NaN or infinity: refused (PS_PUSH_INVALID, counted), or with
 * skip_nonfinite *drop set; else PS_PUSH_OK (mu held). */
static int check_values(ps_shard *s, int worker, const ps_grad *grads, int ngrads,
                        const uint8_t *mine, int bad_rows, const char *nf, int *drop, char *err,
                        size_t errlen) {
    int bad = load_dense(s, worker, grads, ngrads, mine);
    if (bad < 0 && !bad_rows) return PS_PUSH_OK;
    if (s->skip_nonfinite) {
        *drop = 1;
        return PS_PUSH_OK;
    }
    if (bad >= 0)
        nonfinite_part_msg(s, &grads[bad], err, errlen);
    else
        cm_seterr(err, errlen, "%s", nf);
    s->st.nonfinite_pushes++;
    return PS_PUSH_INVALID;
}

/* The rows of a request that are only in the row store, brought into
 * memory with their disk reads off the shard's lock (ps_rows_fetch), so
 * that other requests are served meanwhile; the request then finds them
 * in memory. Not under mu. */
typedef struct fetch_req {
    uint32_t table;
    const uint64_t *ids;
    size_t n;
} fetch_req;

static void fetch_stored_rows(ps_shard *s, const fetch_req *q, int nq) {
    if (nq <= 0) return;
    ps_rows_fetch *stack[16];
    ps_rows_fetch **f = nq <= 16 ? stack : cm_malloc((size_t)nq * sizeof *f);
    int any = 0;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < nq; i++) {
        f[i] = s->inited && s->rows && s->rowdb && q[i].table < (uint32_t)s->model->ntables
                   ? ps_rows_fetch_begin(s->rows, (int)q[i].table, q[i].ids, q[i].n)
                   : NULL;
        any |= f[i] != NULL;
    }
    pthread_mutex_unlock(&s->mu);
    if (any) {
        for (int i = 0; i < nq; i++) ps_rows_fetch_read(f[i]);
        pthread_mutex_lock(&s->mu);
        /* s->rows outlives the shard's init: a rollback in between resets
         * it, which ps_rows_fetch_end notices. */
        for (int i = 0; i < nq; i++) s->st.rows_prefetched += ps_rows_fetch_end(s->rows, f[i]);
        pthread_mutex_unlock(&s->mu);
    }
    if (f != stack) free(f);
}

int ps_shard_push(ps_shard *s, int worker, int64_t step, const ps_grad *grads, int ngrads,
                  int64_t *version, char *err, size_t errlen) {
    return ps_shard_push_step(s, worker, step, 0, grads, ngrads, NULL, 0, 0, version, err,
                              errlen);
}

int ps_shard_push_rows(ps_shard *s, int worker, int64_t step, const ps_grad *grads, int ngrads,
                       const ps_row_grad *rows, int nrows, int rows_final, int64_t *version,
                       char *err, size_t errlen) {
    return ps_shard_push_step(s, worker, step, 0, grads, ngrads, rows, nrows, rows_final,
                              version, err, errlen);
}

/* step_parts against the call (no lock: nparts is fixed at create). */
static int step_parts_ok(const ps_shard *s, int step_parts, int ngrads, int has_rows,
                         char *err, size_t errlen) {
    if (step_parts == 0) return PS_PUSH_OK;
    if (step_parts < ngrads || step_parts > s->nparts) {
        cm_seterr(err, errlen, "step_parts %d out of range: a call with %d partitions to shard "
                  "%d (which has %d) must say %d to %d", step_parts, ngrads, s->index,
                  s->nparts, ngrads, s->nparts);
        return PS_PUSH_INVALID;
    }
    if (has_rows) {
        cm_seterr(err, errlen, "step_parts with row gradients: a step with rows comes in one "
                  "call (step_parts 0)");
        return PS_PUSH_INVALID;
    }
    return PS_PUSH_OK;
}

int ps_shard_push_step(ps_shard *s, int worker, int64_t step, int step_parts,
                       const ps_grad *grads, int ngrads, const ps_row_grad *rows, int nrows,
                       int rows_final, int64_t *version, char *err, size_t errlen) {
    int has_rows = nrows > 0 || rows_final;
    /* A push of rows alone carries no partition. */
    int rc = ngrads == 0 && has_rows ? PS_PUSH_OK : validate(s, grads, ngrads, err, errlen);
    if (rc == PS_PUSH_OK) rc = validate_rows(s, rows, nrows, rows_final, err, errlen);
    if (rc == PS_PUSH_OK) rc = step_parts_ok(s, step_parts, ngrads, has_rows, err, errlen);
    /* The rows' values, before the lock: the scan reads the request only
     * (the dense values are checked as they are read, load_dense). */
    char nf[320];
    int bad_rows = rc == PS_PUSH_OK && scan_rows(s, rows, nrows, nf, sizeof nf);
    if (rc == PS_PUSH_OK && !bad_rows && nrows > 0 && s->rowdb) {
        fetch_req stack[16];
        fetch_req *q = nrows <= 16 ? stack : cm_malloc((size_t)nrows * sizeof *q);
        for (int i = 0; i < nrows; i++) q[i] = (fetch_req){rows[i].table, rows[i].ids, rows[i].n};
        fetch_stored_rows(s, q, nrows);
        if (q != stack) free(q);
    }
    int drop = 0; /* skip_nonfinite: taken, but nothing of it applied. */
    ps_snapshot *old = NULL;
    waiter *ready = NULL;
    int nready = 0;
    pthread_mutex_lock(&s->mu);
    if (rc != PS_PUSH_OK) goto done;
    if (!s->inited) {
        cm_seterr(err, errlen, "shard %d is not initialised yet (the chief sends Init first)",
                  s->index);
        rc = PS_PUSH_NOT_READY;
        goto done;
    }
    if (s->frozen) {
        cm_seterr(err, errlen, "shard %d is writing the checkpoint of version %lld", s->index,
                  (long long)s->version);
        rc = PS_PUSH_BUSY;
        goto done;
    }
    if (worker < 0 || worker >= s->cfg.num_workers) {
        cm_seterr(err, errlen, "worker rank %d out of range: the shard expects %d workers",
                  worker, s->cfg.num_workers);
        rc = PS_PUSH_INVALID;
        goto done;
    }
    if (step < 0) {
        cm_seterr(err, errlen, "step must be >= 0, got %lld", (long long)step);
        rc = PS_PUSH_INVALID;
        goto done;
    }
    if (s->cfg.sync != PS_SYNC) {
        /* A worker's steps only grow, but one step may come in several
         * calls (a client splits a large push: ps_client_cfg.call_bytes),
         * each of other partitions: contrib marks those the worker's last
         * step gave. A push of that step is a retry when it carries one
         * of them, rows, or nothing; of an earlier step, always. */
        size_t np = (size_t)(s->nparts ? s->nparts : 1);
        uint8_t *gave = s->contrib + (size_t)worker * np;
        int same = step == s->last_step[worker];
        int retry = step < s->last_step[worker] ||
                    (same && (ngrads == 0 || nrows > 0 || rows_final));
        for (int i = 0; same && !retry && i < ngrads; i++)
            retry = gave[s->local_of[grads[i].part]];
        if (retry) {
            s->st.duplicate_pushes++;
            rc = PS_PUSH_DUPLICATE;
            goto done;
        }
        /* Steps go up one a push: one far ahead is bogus, and taken it
         * would make every later push of the worker a "duplicate". */
        int64_t ref = s->last_step[worker] >= 0 ? s->last_step[worker]
                      : s->step_hw > s->version  ? s->step_hw
                                                 : s->version;
        if (!same && step - ref > s->max_ahead) {
            cm_seterr(err, errlen,
                      "step %lld from worker %d is too far ahead: async steps may run at most "
                      "%lld past the worker's last one (%lld), or for its first push past "
                      "shard %d's version %lld and the highest step it took (%lld)",
                      (long long)step, worker, (long long)s->max_ahead,
                      (long long)s->last_step[worker], s->index, (long long)s->version,
                      (long long)s->step_hw);
            rc = PS_PUSH_INVALID;
            goto done;
        }
        /* The version goes up once a step: with step_parts, when the call
         * that brings the last of them comes (in whatever order the calls
         * arrive); without, every call. */
        int given = 0;
        for (size_t k = 0; same && step_parts > 0 && k < np; k++) given += gave[k];
        if (step_parts > 0 && given + ngrads > step_parts) {
            cm_seterr(err, errlen, "worker %d's calls of step %lld carry %d partitions of shard "
                      "%d, more than their step_parts (%d)", worker, (long long)step,
                      given + ngrads, s->index, step_parts);
            rc = PS_PUSH_INVALID;
            goto done;
        }
        int bump = step_parts == 0 || given + ngrads == step_parts;
        if ((rc = check_values(s, worker, grads, ngrads, NULL, bad_rows, nf, &drop, err,
                               errlen)) != PS_PUSH_OK)
            goto done;
        if ((!drop || (step_parts > 0 && bump)) && !reserve_buffer(s)) {
            cm_seterr(err, errlen, "shard %d: cannot allocate the next version's values",
                      s->index);
            rc = PS_PUSH_NOMEM;
            goto done;
        }
        if (!drop && !rows_fit(s, worker, rows, nrows, err, errlen)) {
            rc = PS_PUSH_NOMEM;
            goto done;
        }
        if (s->last_step[worker] >= 0 && step > s->last_step[worker] + 1)
            s->st.updates_lost += (uint64_t)(step - s->last_step[worker] - 1);
        s->last_step[worker] = step;
        if (!same) memset(gave, 0, np);
        for (int i = 0; i < ngrads; i++) gave[s->local_of[grads[i].part]] = 1;
        s->step_open[worker] = !bump;
        if (step > s->step_hw) s->step_hw = step;
        if (drop) {
            s->st.nonfinite_pushes++;
            /* Nothing of it is applied, but it ends its step: the earlier
             * calls were applied, and the step counts. */
            if (step_parts > 0 && bump) {
                old = apply_async(s, grads, 0, 1);
                nready = take_ready(s, &ready);
            }
            goto done;
        }
        s->st.pushes++;
        if (nrows > 0) {
            acc_rows(s, rows, nrows);
            apply_acc(s, 1.0f);
        }
        old = apply_async(s, grads, ngrads, bump);
        nready = take_ready(s, &ready);
        goto done;
    }
    if (nrows > 0 && !rows_final) {
        cm_seterr(err, errlen, "sync mode: a worker's row gradients of a step come in one push "
                  "with rows_final set");
        rc = PS_PUSH_INVALID;
        goto done;
    }
    if (step > s->version) {
        cm_seterr(err, errlen, "early push: step %lld from worker %d, shard %d is at version "
                  "%lld", (long long)step, worker, s->index, (long long)s->version);
        s->st.early_pushes++;
        rc = PS_PUSH_EARLY;
        goto done;
    }
    uint8_t *mine = s->contrib + (size_t)worker * (size_t)(s->nparts ? s->nparts : 1);
    int fresh = 0;
    if (step == s->version && s->nparts == 0 && !s->rows) fresh = !mine[0];
    if (step == s->version)
        for (int i = 0; i < ngrads; i++) fresh += !mine[s->local_of[grads[i].part]];
    if (step == s->version && s->rows && has_rows) fresh += !s->rgiven[worker];
    /* The rest of a push in several calls (or a retry of a call of it)
     * after backup sync closed the step without the rest: late, not a
     * duplicate. */
    if (step < s->version && step == s->last_step[worker] && step == s->partial_step[worker])
        goto late;
    if ((step == s->version && !fresh) || (step < s->version && step == s->last_step[worker])) {
        s->st.duplicate_pushes++;
        rc = PS_PUSH_DUPLICATE;
        goto done;
    }
    if (step < s->version) {
    late:
        s->st.stale_pushes++;
        if (s->cfg.backup_ms > 0) { /* Alive after all: the next step waits for it. */
            present(s, worker);
            cm_seterr(err, errlen, "step %lld closed without worker %d (backup sync); shard %d "
                      "is at version %lld", (long long)step, worker, s->index,
                      (long long)s->version);
            rc = PS_PUSH_SKIPPED;
            goto done;
        }
        cm_seterr(err, errlen, "stale push: step %lld from worker %d, shard %d is at version "
                  "%lld", (long long)step, worker, s->index, (long long)s->version);
        rc = PS_PUSH_STALE;
        goto done;
    }
    if ((rc = check_values(s, worker, grads, ngrads, mine, bad_rows, nf, &drop, err, errlen)) !=
        PS_PUSH_OK)
        goto done;
    /* Whatever this push completes needs the next version's buffer, and
     * its rows memory: both are checked before anything changes. */
    if (!reserve_buffer(s)) {
        cm_seterr(err, errlen, "shard %d: cannot allocate the next version's values", s->index);
        rc = PS_PUSH_NOMEM;
        goto done;
    }
    if (!drop && s->rows && has_rows && !s->rgiven[worker] &&
        !rows_fit(s, worker, rows, nrows, err, errlen)) {
        rc = PS_PUSH_NOMEM;
        goto done;
    }
    /* Partitions this worker already gave for this step are not counted
     * again; the others are added, and each that is now complete applied.
     * A dropped push (non-finite, skip_nonfinite) gives zeros: the step
     * still needs every worker's contribution. */
    if (drop)
        s->st.nonfinite_pushes++;
    else
        s->st.pushes++;
    s->last_step[worker] = step;
    present(s, worker);
    if (s->open_since == 0) s->open_since = cm_now();
    for (int i = 0; i < ngrads && !old; i++) {
        int li = s->local_of[grads[i].part];
        if (mine[li] || s->pdone[li]) continue; /* pdone: closed without it (backup). */
        size_t off = s->part_off[li], n = s->part_off[li + 1] - off;
        float *dst = s->acc + off;
        /* Loaded into its staging slot or acc already (load_dense). */
        if (drop && s->stage)
            memset(s->stage + (size_t)worker * s->numel + off, 0, n * sizeof(float));
        else if (drop && s->pcount[li] == 0)
            memset(dst, 0, n * sizeof(float));
        else if (!drop && !s->stage && s->pcount[li] > 0)
            grad_add(dst, &grads[i], n);
        mine[li] = 1;
        if (++s->pcount[li] >= need(s)) {
            if (s->stage) sum_staged(s, li);
            old = finish_part(s, li);
        }
    }
    if (s->rows && has_rows && !s->rgiven[worker]) {
        /* The worker's rows: staged now; counted once rows_final comes. */
        stage_rows(s, worker, rows, drop ? 0 : nrows);
        if (rows_final) {
            s->rgiven[worker] = 1;
            s->rcount++;
            if (!old) old = maybe_close(s);
        }
    } else if (s->nparts == 0 && !s->rows) {
        /* A shard that owns nothing still counts its workers' steps. */
        mine[0] = 1;
        if (++s->pcount[0] >= need(s)) old = close_empty(s);
    }
    nready = take_ready(s, &ready);
done:
    if (rc == PS_PUSH_INVALID) s->st.bad_requests++;
    *version = s->version;
    pthread_mutex_unlock(&s->mu);
    answer(ready, nready);
    ps_snapshot_unref(old);
    return rc;
}

/* Answer w now if it can be, else queue it (mu held on entry, released
 * on return). Takes ownership of w->parts. */
static void wait_or_answer(ps_shard *s, waiter w) {
    s->st.pulls++;
    ps_snapshot *snap = s->closed ? NULL : satisfies(s, &w);
    /* Training is over: an evaluator's pull gets the last version now. */
    if (!snap && !s->closed && s->finished && w.or_final && s->current && !w.nparts && !w.nrq)
        snap = s->current;
    if (s->closed || snap) {
        if (snap) {
            read_rows(s, &w);
            ps_snapshot_ref(snap);
        }
        pthread_mutex_unlock(&s->mu);
        free(w.parts);
        w.cb(w.ud, snap);
        return;
    }
    if (s->nwaiters == s->capwaiters) {
        s->capwaiters = s->capwaiters ? 2 * s->capwaiters : 8;
        s->waiters = realloc(s->waiters, (size_t)s->capwaiters * sizeof *s->waiters);
        if (!s->waiters) abort();
    }
    s->waiters[s->nwaiters++] = w;
    pthread_mutex_unlock(&s->mu);
}

int ps_shard_park_full(ps_shard *s, int64_t min_version, int max) {
    pthread_mutex_lock(&s->mu);
    int full = max > 0 && min_version > s->version && s->nwaiters >= max;
    if (full) s->st.parked_refused++;
    pthread_mutex_unlock(&s->mu);
    return full;
}

void ps_shard_pull(ps_shard *s, int64_t min_version, ps_pull_cb cb, void *ud) {
    pthread_mutex_lock(&s->mu);
    wait_or_answer(s, (waiter){.min_version = min_version, .cb = cb, .ud = ud});
}

void ps_shard_pull_final(ps_shard *s, int64_t min_version, ps_pull_cb cb, void *ud) {
    pthread_mutex_lock(&s->mu);
    wait_or_answer(s, (waiter){.min_version = min_version, .cb = cb, .ud = ud, .or_final = 1});
}

void ps_shard_pull_rows(ps_shard *s, int64_t min_version, const ps_row_req *rq, int nrq,
                        int train, ps_pull_cb cb, void *ud) {
    if (s->rowdb && nrq > 0) {
        fetch_req stack[16];
        fetch_req *q = nrq <= 16 ? stack : cm_malloc((size_t)nrq * sizeof *q);
        for (int i = 0; i < nrq; i++) q[i] = (fetch_req){rq[i].table, rq[i].ids, rq[i].n};
        fetch_stored_rows(s, q, nrq);
        if (q != stack) free(q);
    }
    pthread_mutex_lock(&s->mu);
    wait_or_answer(s, (waiter){.min_version = min_version, .cb = cb, .ud = ud, .rq = rq,
                               .nrq = s->model->ntables ? nrq : 0, .train = train});
}

typedef struct dump_ctx {
    uint64_t skip, seen;
    size_t max, n;
    int dim;
    uint64_t *ids;
    float *vals;
} dump_ctx;

static int dump_row(void *ud, uint64_t id, const float *values, const float *slots,
                    int64_t count) {
    (void)slots;
    (void)count;
    dump_ctx *c = ud;
    if (c->seen++ < c->skip) return CM_OK;
    if (c->n == c->max) return CM_EAGAIN; /* A page is full: stop. */
    c->ids[c->n] = id;
    memcpy(c->vals + c->n * (size_t)c->dim, values, (size_t)c->dim * sizeof(float));
    c->n++;
    return CM_OK;
}

size_t ps_shard_dump_rows(ps_shard *s, uint32_t table, uint64_t from, size_t max, uint64_t *ids,
                          float *vals, uint64_t *next) {
    *next = 0;
    if (table >= (uint32_t)s->model->ntables || max == 0) return 0;
    dump_ctx c = {.skip = from, .max = max, .ids = ids, .vals = vals,
                  .dim = ps_shard_row_dim(s, table)};
    pthread_mutex_lock(&s->mu);
    int more = s->rows && ps_rows_visit(s->rows, (int)table, dump_row, &c) == CM_EAGAIN;
    pthread_mutex_unlock(&s->mu);
    if (more) *next = from + c.n;
    return c.n;
}

int ps_shard_row_dim(const ps_shard *s, uint32_t table) {
    if (table >= (uint32_t)s->model->ntables) return -1;
    return s->model->vars[s->model->table_var[table]].dim;
}

void ps_shard_rows_put(ps_shard *s, uint32_t table, uint64_t id, const float *values,
                       const float *slots, int64_t count) {
    pthread_mutex_lock(&s->mu);
    if (s->rows && table < (uint32_t)s->model->ntables)
        ps_rows_put(s->rows, (int)table, id, values, slots, count);
    pthread_mutex_unlock(&s->mu);
}

int ps_shard_pull_parts(ps_shard *s, int64_t step, const uint32_t *parts, int nparts,
                        ps_pull_cb cb, void *ud) {
    if (step < 0 || step == INT64_MAX || nparts < 1 || nparts > s->nparts) return CM_EINVAL;
    int *local = cm_malloc((size_t)nparts * sizeof *local);
    for (int i = 0; i < nparts; i++) {
        if (parts[i] >= (uint32_t)s->pl->nparts || s->local_of[parts[i]] < 0) {
            free(local);
            return CM_EINVAL;
        }
        local[i] = s->local_of[parts[i]];
    }
    pthread_mutex_lock(&s->mu);
    wait_or_answer(s, (waiter){.min_version = step + 1, .cb = cb, .ud = ud, .nparts = nparts,
                               .parts = local});
    return CM_OK;
}

int ps_shard_local_index(const ps_shard *s, uint32_t part) {
    return part < (uint32_t)s->pl->nparts ? s->local_of[part] : -1;
}

int ps_shard_cancel_pull(ps_shard *s, int (*match)(void *ud, void *arg), void *arg, void **ud) {
    int found = 0;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->nwaiters; i++) {
        if (!match(s->waiters[i].ud, arg)) continue;
        *ud = s->waiters[i].ud;
        free(s->waiters[i].parts);
        s->waiters[i] = s->waiters[--s->nwaiters];
        found = 1;
        break;
    }
    pthread_mutex_unlock(&s->mu);
    return found;
}

/* Answer the waiting pulls (NULL: they fail); closing (shutdown): later
 * ones too, and those of ps_shard_pull_final get the last version (an
 * evaluator's, so that the final one is evaluated). Returns how many. */
static int drop_waiters(ps_shard *s, int closing) {
    pthread_mutex_lock(&s->mu);
    waiter *w = s->waiters;
    int n = s->nwaiters;
    s->waiters = NULL;
    s->nwaiters = s->capwaiters = 0;
    if (closing) s->closed = 1;
    for (int i = 0; i < n; i++) {
        w[i].snap = NULL;
        if (closing && w[i].or_final && s->inited && s->current && !w[i].nparts && !w[i].nrq) {
            ps_snapshot_ref(s->current);
            w[i].snap = s->current;
        }
    }
    pthread_mutex_unlock(&s->mu);
    answer(w, n);
    return n;
}

int ps_shard_abort_pending(ps_shard *s) { return drop_waiters(s, 0); }

void ps_shard_finish(ps_shard *s) {
    pthread_mutex_lock(&s->mu);
    s->finished = 1;
    waiter *ready = NULL;
    int n = 0;
    for (int i = 0; i < s->nwaiters;) {
        waiter *w = &s->waiters[i];
        if (w->or_final && s->inited && s->current && !w->nparts && !w->nrq) {
            ready = realloc(ready, (size_t)(n + 1) * sizeof *ready);
            if (!ready) abort();
            ps_snapshot_ref(s->current);
            w->snap = s->current;
            ready[n++] = *w;
            s->waiters[i] = s->waiters[--s->nwaiters];
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&s->mu);
    answer(ready, n);
}

void ps_shard_abort_waiters(ps_shard *s) { drop_waiters(s, 1); }

/* Backup sync: close the open step with what came (mu held): each
 * partition not yet final is averaged over its contributions (one with none
 * keeps its values), the rows over the workers whose rows came; workers
 * that did not give all of it become absent. Returns the old snapshot to
 * unref. */
static ps_snapshot *close_partial(ps_shard *s, char *who, size_t wlen) {
    size_t np = (size_t)(s->nparts ? s->nparts : 1), at = 0;
    who[0] = 0;
    for (int w = 0; w < s->cfg.num_workers; w++) {
        /* Whoever did not give all of the step (a worker that died half way
         * through its pushes too) is absent: not waited for again. */
        int gave = !s->rows || s->rgiven[w];
        for (size_t i = 0; i < (size_t)s->nparts && gave; i++)
            gave = s->contrib[(size_t)w * np + i];
        if (s->nparts == 0 && !s->rows) gave = s->contrib[w];
        if (gave) continue;
        s->partial_step[w] = s->version;
        if (s->absent[w]) continue;
        s->absent[w] = 1;
        s->nabsent++;
        if (at + 12 < wlen) at += (size_t)snprintf(who + at, wlen - at, "%s%d", at ? "," : "", w);
    }
    if (s->nparts == 0 && !s->rows) return close_empty(s);
    if (!s->pending) s->pending = snap_new(s, new_buffer(s), s->version + 1);
    for (int li = 0; li < s->nparts; li++) {
        if (s->pdone[li]) continue;
        size_t off = s->part_off[li], n = s->part_off[li + 1] - off;
        if (s->pcount[li] == 0) {
            memcpy(s->pending->data + off, s->current->data + off, n * sizeof(float));
        } else {
            if (s->stage) sum_staged(s, li);
            apply_part(s, li, s->pcount[li], s->pending->data);
        }
        s->pdone[li] = 1;
        s->ndone++;
    }
    /* The rows wait for need() workers: every one not absent gave them. */
    return maybe_close(s);
}

int ps_shard_tick(ps_shard *s, int64_t *step, double *waited, char *who, size_t wlen) {
    pthread_mutex_lock(&s->mu);
    if (!s->inited || s->cfg.sync != PS_SYNC || s->cfg.backup_ms <= 0 || s->open_since == 0 ||
        (cm_now() - s->open_since) * 1e3 < (double)s->cfg.backup_ms) {
        pthread_mutex_unlock(&s->mu);
        return 0;
    }
    *step = s->version;
    *waited = cm_now() - s->open_since;
    ps_snapshot *old = close_partial(s, who, wlen);
    s->st.backup_closes++;
    waiter *ready = NULL;
    int nready = take_ready(s, &ready);
    pthread_mutex_unlock(&s->mu);
    answer(ready, nready);
    ps_snapshot_unref(old);
    return 1;
}

int ps_shard_is_async(ps_shard *s) {
    pthread_mutex_lock(&s->mu);
    int a = s->inited && s->cfg.sync == PS_ASYNC;
    pthread_mutex_unlock(&s->mu);
    return a;
}

void ps_shard_count_bad(ps_shard *s) {
    pthread_mutex_lock(&s->mu);
    s->st.bad_requests++;
    pthread_mutex_unlock(&s->mu);
}

void ps_shard_set_worker_steps(ps_shard *s, const int64_t *steps, int n) {
    pthread_mutex_lock(&s->mu);
    size_t np = (size_t)(s->nparts ? s->nparts : 1);
    for (int i = 0; s->inited && i < n && i < s->cfg.num_workers; i++) {
        s->last_step[i] = steps[i];
        s->step_open[i] = 0;
        if (steps[i] > s->step_hw) s->step_hw = steps[i];
        /* Async: every call of that step was taken (sync keeps contrib
         * for the open step). */
        if (s->cfg.sync != PS_SYNC) memset(s->contrib + (size_t)i * np, 1, np);
    }
    pthread_mutex_unlock(&s->mu);
}

/* Worker w's last step with all of its calls in (mu held). */
static int64_t done_step(const ps_shard *s, int w) { return s->last_step[w] - s->step_open[w]; }

int ps_shard_worker_steps(ps_shard *s, int64_t *out, int max) {
    pthread_mutex_lock(&s->mu);
    int w = s->inited ? s->cfg.num_workers : 0;
    for (int i = 0; i < w && i < max; i++) out[i] = done_step(s, i);
    pthread_mutex_unlock(&s->mu);
    return w;
}

void ps_shard_stats_get(ps_shard *s, ps_shard_stats *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->st;
    out->version = s->version;
    out->rows = s->rows ? ps_rows_total(s->rows) : 0;
    out->parked = s->nwaiters;
    out->mem_bytes = s->inited ? mem_used(s) : 0;
    out->mem_limit = s->mem_limit;
    if (s->rows) ps_rows_spill_stats_get(s->rows, &out->row_cache);
    out->min_worker_step = -1;
    if (s->inited && s->cfg.num_workers > 0) {
        out->min_worker_step = done_step(s, 0);
        for (int w = 1; w < s->cfg.num_workers; w++) {
            int64_t d = done_step(s, w);
            if (d < out->min_worker_step) out->min_worker_step = d;
        }
    }
    pthread_mutex_unlock(&s->mu);
}

size_t ps_shard_numel(const ps_shard *s) { return s->numel; }

size_t ps_shard_part_offset(const ps_shard *s, int i) { return s->part_off[i]; }

void ps_shard_set_publish_hook(ps_shard *s, int64_t every, ps_publish_fn fn, void *ud) {
    pthread_mutex_lock(&s->mu);
    s->hook = every > 0 ? fn : NULL;
    s->hook_every = every;
    s->hook_ud = ud;
    pthread_mutex_unlock(&s->mu);
}

static int restore(ps_shard *s, const ps_shard_config *cfg, int64_t version,
                   const float *params, const float *slots, float *owned_params,
                   float *owned_slots, char *err, size_t errlen) {
    if (!config_ok(s, cfg, err, errlen)) return CM_EINVAL;
    if (version < 0) {
        cm_seterr(err, errlen, "cannot restore version %lld", (long long)version);
        return CM_EINVAL;
    }
    pthread_mutex_lock(&s->mu);
    if (s->inited) {
        pthread_mutex_unlock(&s->mu);
        cm_seterr(err, errlen, "shard %d is already initialised", s->index);
        return CM_EBUSY;
    }
    int rc = setup(s, cfg, version, params, slots, owned_params, owned_slots, err, errlen);
    if (rc != CM_OK) {
        pthread_mutex_unlock(&s->mu);
        return rc;
    }
    waiter *ready;
    int nready = take_ready(s, &ready);
    pthread_mutex_unlock(&s->mu);
    answer(ready, nready);
    return CM_OK;
}

int ps_shard_restore(ps_shard *s, const ps_shard_config *cfg, int64_t version,
                     const float *params, const float *slots, char *err, size_t errlen) {
    return restore(s, cfg, version, params, slots, NULL, NULL, err, errlen);
}

int ps_shard_restore_owned(ps_shard *s, const ps_shard_config *cfg, int64_t version,
                           float *params, float *slots, char *err, size_t errlen) {
    if (!params) {
        cm_seterr(err, errlen, "ps_shard_restore_owned: no parameters");
        return CM_EINVAL;
    }
    int rc = restore(s, cfg, version, NULL, NULL, params, slots, err, errlen);
    if (rc == CM_OK && !ps_optim_nslots(cfg->optim.kind)) free(slots);
    return rc;
}

int ps_shard_rollback(ps_shard *s, int64_t version, const float *params, const float *slots,
                      char *err, size_t errlen) {
    if (version < 0 || (version > 0 && !params)) {
        cm_seterr(err, errlen, "cannot roll back to version %lld without its values",
                  (long long)version);
        return CM_EINVAL;
    }
    pthread_mutex_lock(&s->mu);
    if (!s->inited) {
        pthread_mutex_unlock(&s->mu);
        cm_seterr(err, errlen, "shard %d is not initialised", s->index);
        return CM_EINVAL;
    }
    /* The buffer of the version first: without it nothing changes. */
    float *cur = s->spare ? s->spare : pool_get(s->pool);
    if (!cur) {
        pthread_mutex_unlock(&s->mu);
        cm_seterr(err, errlen, "shard %d: cannot allocate the values of version %lld", s->index,
                  (long long)version);
        return CM_ENOMEM;
    }
    s->spare = NULL;
    waiter *w = s->waiters;
    int nw = s->nwaiters;
    s->waiters = NULL;
    s->nwaiters = s->capwaiters = 0;
    ps_snapshot *old_cur = s->current, *old_pending = s->pending;
    /* The same config: the state is reset in place, its memory kept. */
    size_t W = (size_t)s->cfg.num_workers, np = (size_t)(s->nparts ? s->nparts : 1);
    memset(s->contrib, 0, W * np);
    memset(s->pcount, 0, ((size_t)s->nparts + 1) * sizeof *s->pcount);
    memset(s->pdone, 0, (size_t)s->nparts + 1);
    s->ndone = 0;
    memset(s->absent, 0, sizeof s->absent);
    s->nabsent = 0;
    for (size_t k = 0; k < PS_SHARD_MAX_WORKERS; k++) s->partial_step[k] = -1;
    memset(s->step_open, 0, sizeof s->step_open);
    s->open_since = 0;
    for (size_t k = 0; k < W; k++) s->last_step[k] = -1;
    if (s->rows) {
        rows_reset(s);
        ps_rowacc_reset(&s->racc);
        for (size_t k = 0; s->rstage && k < W; k++) s->rstage[k].n = 0;
        if (s->rgiven) memset(s->rgiven, 0, W);
        s->rcount = 0;
    }
    fill_state(s, &s->cfg, cur, params, slots, 0, 0);
    s->version = version;
    if (s->rows) ps_rows_set_step(s->rows, version);
    s->pending = NULL;
    s->current = snap_new(s, cur, version);
    pthread_mutex_unlock(&s->mu);
    ps_snapshot_unref(old_cur);
    ps_snapshot_unref(old_pending);
    for (int i = 0; i < nw; i++) w[i].snap = NULL;
    answer(w, nw);
    return CM_OK;
}

int ps_shard_config_get(ps_shard *s, ps_shard_config *cfg) {
    pthread_mutex_lock(&s->mu);
    int ok = s->inited;
    if (ok) *cfg = s->cfg;
    pthread_mutex_unlock(&s->mu);
    return ok;
}

void ps_shard_thaw(ps_shard *s) {
    pthread_mutex_lock(&s->mu);
    s->frozen = 0;
    pthread_mutex_unlock(&s->mu);
}

int ps_shard_publish_now(ps_shard *s) {
    pthread_mutex_lock(&s->mu);
    int ok = s->inited && s->hook && !s->pending;
    if (ok)
        (void)s->hook(s->hook_ud, s->current, s->slots, ps_optim_nslots(s->cfg.optim.kind),
                      &s->cfg, s->rows, s->last_step);
    pthread_mutex_unlock(&s->mu);
    return ok;
}
