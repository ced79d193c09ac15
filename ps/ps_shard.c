/* ps_shard.c - shard state, the sync state machine, snapshots and waiters.
 * SPDX-License-Identifier: MIT
 *
 * States: UNINITIALISED --ps_shard_init--> SERVING (version 0)
 *         SERVING --ps_shard_push (last contribution / async)--> SERVING (v+1)
 * Invariants, under mu:
 *  - 'current' is the snapshot of the parameters at 'version' (never NULL
 *    once initialised) and the only copy of them: apply() writes the next
 *    version out of place into a new buffer and publishes it before mu is
 *    released, so no snapshot is ever written after it was published.
 *  - ncontrib == number of set entries in contributed[]; acc holds their sum
 *    (the first contribution is copied, later ones added).
 *  - Every waiter has min_version > version.
 * Snapshot buffers come from a pool that outlives the shard if replies
 * still reference snapshots when the shard is destroyed.
 */
#include "ps/ps_shard.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"
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
    int64_t version;
    int ncontrib;
    uint8_t *contributed;
    int64_t *last_step;
    ps_snapshot *current;
    waiter *waiters;
    int nwaiters, capwaiters;
    int closed; /* Set by ps_shard_abort_waiters: pulls fail at once. */
    ps_shard_stats st;
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
    s->pool = cm_calloc(1, sizeof *s->pool);
    pthread_mutex_init(&s->pool->mu, NULL);
    atomic_init(&s->pool->refs, 1);
    s->pool->numel = s->numel ? s->numel : 1;
    s->pool->part_off = cm_malloc(((size_t)s->nparts + 1) * sizeof *s->pool->part_off);
    memcpy(s->pool->part_off, s->part_off, ((size_t)s->nparts + 1) * sizeof *s->part_off);
    pthread_mutex_init(&s->mu, NULL);
    s->st.nparts = s->nparts;
    s->st.bytes = s->numel * sizeof(float);
    *out = s;
    return CM_OK;
}

void ps_shard_destroy(ps_shard *s) {
    if (!s) return;
    ps_shard_abort_waiters(s);
    ps_snapshot_unref(s->current);
    free(s->acc);
    free(s->slots);
    free(s->contributed);
    free(s->last_step);
    free(s->waiters);
    pthread_mutex_destroy(&s->mu);
    pool_unref(s->pool);
    free(s->parts);
    free(s->part_off);
    free(s->local_of);
    free(s);
}

const uint32_t *ps_shard_parts(const ps_shard *s, int *nparts) {
    *nparts = s->nparts;
    return s->parts;
}

/* Publish 'data' (a pool buffer holding the parameters at s->version) as
 * the current snapshot; mu held. Returns the old one for the caller to
 * unref after unlocking. */
static ps_snapshot *publish(ps_shard *s, float *data) {
    ps_snapshot *snap = cm_calloc(1, sizeof *snap);
    snap->data = data;
    snap->version = s->version;
    snap->part_off = s->pool->part_off;
    snap->pool = s->pool;
    atomic_fetch_add(&s->pool->refs, 1);
    atomic_init(&snap->refs, 1);
    ps_snapshot *old = s->current;
    s->current = snap;
    return old;
}

/* A buffer for the next version. A PS that cannot hold its state cannot go
 * on, so running out of memory here aborts. */
static float *new_buffer(ps_shard *s) {
    float *b = pool_get(s->pool);
    if (!b) abort();
    return b;
}

/* Move the waiters that 'version' satisfies into *ready (mu held). */
static int take_ready(ps_shard *s, waiter **ready) {
    int n = 0;
    *ready = NULL;
    for (int i = 0; i < s->nwaiters; i++)
        if (s->waiters[i].min_version <= s->version) n++;
    if (n == 0) return 0;
    *ready = cm_malloc((size_t)n * sizeof **ready);
    int k = 0, keep = 0;
    for (int i = 0; i < s->nwaiters; i++) {
        if (s->waiters[i].min_version <= s->version)
            (*ready)[k++] = s->waiters[i];
        else
            s->waiters[keep++] = s->waiters[i];
    }
    s->nwaiters = keep;
    return n;
}

/* Answer ready waiters with 'snap' (one ref each), outside mu. */
static void answer(waiter *ready, int n, ps_snapshot *snap) {
    for (int i = 0; i < n; i++) {
        if (snap) ps_snapshot_ref(snap);
        ready[i].cb(ready[i].ud, snap);
    }
    free(ready);
}

static int same_config(const ps_shard_config *a, const ps_shard_config *b) {
    return a->optim.kind == b->optim.kind && a->optim.lr == b->optim.lr &&
           a->optim.momentum == b->optim.momentum && a->optim.beta1 == b->optim.beta1 &&
           a->optim.beta2 == b->optim.beta2 && a->optim.epsilon == b->optim.epsilon &&
           a->seed == b->seed && a->num_workers == b->num_workers && a->sync == b->sync &&
           a->aggregate == b->aggregate && a->zero_init == b->zero_init;
}

static void describe(const ps_shard_config *c, char *buf, size_t len) {
    snprintf(buf, len, "%s lr=%g seed=%llu workers=%d %s %s%s", ps_optim_name(c->optim.kind),
             (double)c->optim.lr, (unsigned long long)c->seed, c->num_workers,
             c->sync == PS_SYNC ? "sync" : "async", c->aggregate == PS_AGG_SUM ? "sum" : "mean",
             c->zero_init ? " zero-init" : "");
}

int ps_shard_init(ps_shard *s, const ps_shard_config *cfg, int64_t *version, char *err,
                  size_t errlen) {
    if (cfg->num_workers < 1 || cfg->num_workers > 65536 ||
        (cfg->sync != PS_SYNC && cfg->sync != PS_ASYNC) ||
        (cfg->aggregate != PS_AGG_MEAN && cfg->aggregate != PS_AGG_SUM) || cfg->optim.kind < 0 ||
        cfg->optim.kind > PS_OPTIM_ADD) {
        cm_seterr(err, errlen, "invalid init config");
        return CM_EINVAL;
    }
    pthread_mutex_lock(&s->mu);
    if (s->inited) {
        int same = same_config(&s->cfg, cfg);
        *version = s->version;
        if (!same) {
            char have[160], got[160];
            describe(&s->cfg, have, sizeof have);
            describe(cfg, got, sizeof got);
            cm_seterr(err, errlen, "shard %d is already initialised with %s; refusing %s",
                      s->index, have, got);
        }
        pthread_mutex_unlock(&s->mu);
        return same ? CM_OK : CM_EBUSY;
    }
    size_t n = s->numel ? s->numel : 1;
    int nslots = ps_optim_nslots(cfg->optim.kind);
    float *params = new_buffer(s);
    s->acc = cm_alloc_aligned(n * sizeof(float));
    s->slots = nslots ? cm_alloc_aligned((size_t)nslots * n * sizeof(float)) : NULL;
    if (!s->acc || (nslots && !s->slots)) abort();
    if (nslots) memset(s->slots, 0, (size_t)nslots * n * sizeof(float));
    for (int i = 0; i < s->nparts; i++) {
        const cm_partition *p = &s->pl->parts[s->parts[i]];
        float *dst = params + s->part_off[i];
        if (cfg->zero_init)
            memset(dst, 0, p->count * sizeof(float));
        else
            cm_var_init(&s->model->vars[p->var], cfg->seed, p->begin, p->count, dst);
    }
    s->contributed = cm_calloc((size_t)cfg->num_workers, 1);
    s->last_step = cm_malloc((size_t)cfg->num_workers * sizeof *s->last_step);
    for (int w = 0; w < cfg->num_workers; w++) s->last_step[w] = -1;
    s->cfg = *cfg;
    s->version = 0;
    s->ncontrib = 0;
    ps_snapshot *old = publish(s, params);
    s->inited = 1;
    *version = 0;
    waiter *ready;
    int nready = take_ready(s, &ready);
    ps_snapshot *snap = s->current;
    ps_snapshot_ref(snap);
    pthread_mutex_unlock(&s->mu);
    answer(ready, nready, snap);
    ps_snapshot_unref(snap);
    ps_snapshot_unref(old);
    return CM_OK;
}

/* Check a push's tensors against the placement (no lock needed: the layout
 * is immutable). */
static int validate(const ps_shard *s, const ps_grad *g, int ng, char *err, size_t errlen) {
    if (ng != s->nparts) {
        cm_seterr(err, errlen, "a push to shard %d must carry its %d partitions, got %d",
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
        } else if (!x->dtype_ok) {
            cm_seterr(err, errlen, "partition %u (%s): dtype must be DTYPE_FLOAT32", x->part,
                      v->name);
            rc = PS_PUSH_INVALID;
        } else {
            seen[li] = 1;
            int shape_ok = x->nshape == v->ndims && x->shape[0] == p->row_end - p->row_begin;
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
            } else if (x->len != p->count * sizeof(float)) {
                cm_seterr(err, errlen,
                          "partition %u (%s part %d): %zu data bytes, expected %zu (%zu float32)",
                          x->part, v->name, p->index, x->len, p->count * sizeof(float), p->count);
                rc = PS_PUSH_INVALID;
            }
        }
    }
    if (seen != seen_small) free(seen);
    return rc;
}

/* Apply the accumulated gradient and publish version + 1 (mu held). */
static ps_snapshot *apply(ps_shard *s, int contributions) {
    if (s->cfg.aggregate == PS_AGG_MEAN && contributions > 1) {
        float scale = 1.0f / (float)contributions;
        float *restrict a = s->acc;
        for (size_t i = 0; i < s->numel; i++) a[i] *= scale;
    }
    float *next = new_buffer(s);
    ps_optim_apply_to(&s->cfg.optim, s->version + 1, s->current->data, next, s->acc, s->slots,
                      s->numel);
    s->version++;
    return publish(s, next);
}

int ps_shard_push(ps_shard *s, int worker, int64_t step, const ps_grad *grads, int ngrads,
                  int64_t *version, char *err, size_t errlen) {
    int rc = validate(s, grads, ngrads, err, errlen);
    ps_snapshot *old = NULL, *snap = NULL;
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
    int is_sync = s->cfg.sync == PS_SYNC;
    if (!is_sync && step <= s->last_step[worker]) {
        /* A worker's steps only grow: this is a retry of a push applied. */
        s->st.duplicate_pushes++;
        rc = PS_PUSH_DUPLICATE;
        goto done;
    }
    if (is_sync) {
        if (step > s->version) {
            cm_seterr(err, errlen, "early push: step %lld from worker %d, shard %d is at version "
                      "%lld", (long long)step, worker, s->index, (long long)s->version);
            s->st.early_pushes++;
            rc = PS_PUSH_EARLY;
            goto done;
        }
        if ((step == s->version && s->contributed[worker]) ||
            (step < s->version && step == s->last_step[worker])) {
            s->st.duplicate_pushes++;
            rc = PS_PUSH_DUPLICATE;
            goto done;
        }
        if (step < s->version) {
            cm_seterr(err, errlen, "stale push: step %lld from worker %d, shard %d is at version "
                      "%lld", (long long)step, worker, s->index, (long long)s->version);
            s->st.stale_pushes++;
            rc = PS_PUSH_STALE;
            goto done;
        }
    }
    int first = !is_sync || s->ncontrib == 0;
    for (int i = 0; i < ngrads; i++) {
        int li = s->local_of[grads[i].part];
        float *dst = s->acc + s->part_off[li];
        size_t n = s->part_off[li + 1] - s->part_off[li];
        if (first)
            memcpy(dst, grads[i].data, n * sizeof(float));
        else
            ps_wire_load_add(dst, grads[i].data, n);
    }
    s->st.pushes++;
    if (is_sync) {
        s->contributed[worker] = 1;
        s->last_step[worker] = step;
        if (++s->ncontrib == s->cfg.num_workers) {
            old = apply(s, s->ncontrib);
            memset(s->contributed, 0, (size_t)s->cfg.num_workers);
            s->ncontrib = 0;
        }
    } else {
        s->last_step[worker] = step;
        old = apply(s, 1);
    }
    if (old) {
        nready = take_ready(s, &ready);
        snap = s->current;
        ps_snapshot_ref(snap);
    }
done:
    if (rc == PS_PUSH_INVALID) s->st.bad_requests++;
    *version = s->version;
    pthread_mutex_unlock(&s->mu);
    if (snap) {
        answer(ready, nready, snap);
        ps_snapshot_unref(snap);
    }
    ps_snapshot_unref(old);
    return rc;
}

void ps_shard_pull(ps_shard *s, int64_t min_version, ps_pull_cb cb, void *ud) {
    pthread_mutex_lock(&s->mu);
    s->st.pulls++;
    if (s->closed) {
        pthread_mutex_unlock(&s->mu);
        cb(ud, NULL);
        return;
    }
    if (s->inited && s->version >= min_version) {
        ps_snapshot *snap = s->current;
        ps_snapshot_ref(snap);
        pthread_mutex_unlock(&s->mu);
        cb(ud, snap);
        return;
    }
    if (s->nwaiters == s->capwaiters) {
        s->capwaiters = s->capwaiters ? 2 * s->capwaiters : 8;
        s->waiters = realloc(s->waiters, (size_t)s->capwaiters * sizeof *s->waiters);
        if (!s->waiters) abort();
    }
    s->waiters[s->nwaiters++] = (waiter){.min_version = min_version, .cb = cb, .ud = ud};
    pthread_mutex_unlock(&s->mu);
}

void ps_shard_abort_waiters(ps_shard *s) {
    pthread_mutex_lock(&s->mu);
    waiter *w = s->waiters;
    int n = s->nwaiters;
    s->waiters = NULL;
    s->nwaiters = s->capwaiters = 0;
    s->closed = 1;
    pthread_mutex_unlock(&s->mu);
    answer(w, n, NULL);
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

void ps_shard_stats_get(ps_shard *s, ps_shard_stats *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->st;
    out->version = s->version;
    pthread_mutex_unlock(&s->mu);
}
