/* test_ps_shard.c - unit tests for one PS shard (ps/ps_shard.c), no network.
 * SPDX-License-Identifier: MIT
 *
 * The shard is driven directly with an MLP 6,5,3 placed on 2 shards with a
 * 16-byte minimum partition, so both kernels are split across the shards.
 * Gradients are multiples of 1/32 in [-0.5, 0.5] and the learning rate is a
 * power of two, so sums, means and lr * mean are exact in float and every
 * expected value is computed here, element by element, and compared bit for
 * bit. Pull callbacks may run on other threads: they use CHECK, not cmocka.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "ps/ps_optim.h"
#include "ps/ps_shard.h"
#include "ps/ps_wire.h"

#include "bf16_grads.h"

/* ===== Helpers ===== */

/* For callbacks: cmocka's asserts only work on the test thread. */
#define CHECK(x)                                                                  \
    do {                                                                          \
        if (!(x)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #x); \
            abort();                                                              \
        }                                                                         \
    } while (0)

#define MAXP 16     /* Partitions per shard, at most, in these tests. */
#define MAXN 256    /* Model elements, at most. */
#define SEED 42
#define LR 0.5f

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

#define NTAB 3  /* Tables of the rows fixture (rx_setup). */
#define NRID 64 /* Ids of each table on shard 0 it keeps. */

typedef struct fixture {
    cm_model *m;
    cm_placement *pl;
    ps_shard *s; /* Shard 0. */
    int nparts;
    const uint32_t *parts;
    /* The rows fixture only: ids of each table that live on shard 0, and
     * some that live on shard 1. */
    uint64_t rid[NTAB][NRID];
    uint64_t other[NTAB][4];
} fixture;

static int fx_setup(void **state) {
    static const int sizes[] = {6, 5, 3};
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    assert_int_equal(cm_model_create_mlp(sizes, 3, &f->m), CM_OK);
    assert_true(f->m->numel <= MAXN);
    assert_int_equal(cm_placement_create(f->m, 2, 16, &f->pl), CM_OK);
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &f->s), CM_OK);
    f->parts = ps_shard_parts(f->s, &f->nparts);
    assert_true(f->nparts >= 2 && f->nparts <= MAXP);
    *state = f;
    return 0;
}

static int fx_teardown(void **state) {
    fixture *f = *state;
    ps_shard_destroy(f->s);
    cm_placement_destroy(f->pl);
    cm_model_destroy(f->m);
    free(f);
    return 0;
}

static ps_shard_config cfg_make(int kind, int workers, int sync, int aggregate) {
    ps_shard_config c = {.optim = ps_optim_defaults(kind, LR),
                         .seed = SEED,
                         .num_workers = workers,
                         .sync = sync,
                         .aggregate = aggregate};
    return c;
}

static void init_ok(fixture *f, const ps_shard_config *c) {
    char err[256] = "";
    int64_t v = -1;
    assert_int_equal(ps_shard_init(f->s, c, &v, err, sizeof err), CM_OK);
    assert_int_equal(v, 0);
}

/* The deterministic gradient of 'worker' at 'step' over the whole model:
 * multiples of 1/32 in [-0.5, 0.5]. */
static void grad_fill(float *full, size_t n, int worker, int64_t step) {
    for (size_t i = 0; i < n; i++)
        full[i] = (float)((int)((i * 7 + (size_t)worker * 13 + (size_t)step * 5) % 33) - 16) /
                  32.0f;
}

/* A push of every partition shard 'f->s' owns, taken from a whole-model
 * vector. The data is copied one byte past an aligned address so the shard
 * reads unaligned floats, as it does from the wire. */
typedef struct push_buf {
    ps_grad g[MAXP + 1];
    uint64_t shape[MAXP + 1][CM_VAR_MAX_DIMS];
    uint8_t raw[1 + 4 * MAXN + 64];
    int n;
} push_buf;

/* g[i] for each of f->s's partitions of a whole-model vector, its data
 * written into raw from raw + 1 on (one byte past an aligned address: the
 * shard reads unaligned values, as from the wire), shapes into shape[i].
 * bfloat16 partitions: at most MAXN values. */
static void grads_of(const fixture *f, const float *full, int dtype, uint8_t *raw,
                       uint64_t (*shape)[CM_VAR_MAX_DIMS], ps_grad *g) {
    size_t off = 1;
    for (int i = 0; i < f->nparts; i++) {
        const cm_partition *p = &f->pl->parts[f->parts[i]];
        const cm_var *v = &f->m->vars[p->var];
        shape[i][0] = p->row_end - p->row_begin;
        for (int d = 1; d < v->ndims; d++) shape[i][d] = (uint64_t)v->dims[d];
        size_t len = p->count * sizeof(float);
        if (dtype == PS_DTYPE_BFLOAT16) {
            uint16_t h[MAXN];
            ps_wire_bf16_from_f32(h, full + p->offset, p->count);
            len = p->count * sizeof(uint16_t);
            memcpy(raw + off, h, len);
        } else {
            memcpy(raw + off, full + p->offset, len);
        }
        g[i] = (ps_grad){.part = f->parts[i],
                         .dtype = dtype,
                         .nshape = v->ndims,
                         .shape = shape[i],
                         .data = raw + off,
                         .len = len};
        off += len;
    }
}

static void push_make_as(const fixture *f, const float *full, int dtype, push_buf *pb) {
    memset(pb, 0, sizeof *pb);
    grads_of(f, full, dtype, pb->raw, pb->shape, pb->g);
    pb->n = f->nparts;
}

static void push_make(const fixture *f, const float *full, push_buf *pb) {
    push_make_as(f, full, PS_DTYPE_FLOAT32, pb);
}

/* Push the deterministic gradient of (worker, step); returns the result. */
static int push_step(fixture *f, int worker, int64_t step, int64_t *version) {
    float g[MAXN];
    push_buf pb;
    char err[256] = "";
    grad_fill(g, f->m->numel, worker, step);
    push_make(f, g, &pb);
    return ps_shard_push(f->s, worker, step, pb.g, pb.n, version, err, sizeof err);
}

/* Records every answer of one pull; keeps the first snapshot. */
typedef struct catcher {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int calls;
    int nulls;
    ps_snapshot *snap;
    ps_shard *shard;    /* If set, the callback reads the shard's stats. */
    int64_t seen_version; /* ... and stores the version it saw. */
} catcher;

static void catcher_init(catcher *c) {
    memset(c, 0, sizeof *c);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    c->seen_version = -1;
}

static void catcher_deinit(catcher *c) {
    ps_snapshot_unref(c->snap);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
}

static void catch_cb(void *ud, ps_snapshot *snap) {
    catcher *c = ud;
    int64_t seen = -1;
    if (c->shard) {
        /* Deadlocks if the shard called us with its lock held. */
        ps_shard_stats st;
        ps_shard_stats_get(c->shard, &st);
        seen = st.version;
    }
    pthread_mutex_lock(&c->mu);
    c->calls++;
    if (!snap) c->nulls++;
    if (!c->snap && snap) {
        c->snap = snap;
        snap = NULL;
    }
    c->seen_version = seen;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    ps_snapshot_unref(snap);
}

static int catcher_calls(catcher *c) {
    pthread_mutex_lock(&c->mu);
    int n = c->calls;
    pthread_mutex_unlock(&c->mu);
    return n;
}

/* A pull that must be answered at once (on this thread). */
static ps_snapshot *pull_now(ps_shard *s, int64_t min_version) {
    catcher c;
    catcher_init(&c);
    ps_shard_pull(s, min_version, catch_cb, &c);
    assert_int_equal(c.calls, 1);
    ps_snapshot *snap = c.snap;
    c.snap = NULL;
    catcher_deinit(&c);
    assert_non_null(snap);
    return snap;
}

/* A snapshot of shard 0's values, written at their places in a whole-model
 * vector (the other shard's places are left at 0). */
static void values_of(const fixture *f, const ps_snapshot *snap, float *full) {
    memset(full, 0, f->m->numel * sizeof *full);
    for (int i = 0; i < f->nparts; i++) {
        const cm_partition *p = &f->pl->parts[f->parts[i]];
        memcpy(full + p->offset, ps_snapshot_part(snap, i), p->count * sizeof(float));
    }
}

/* The shard's current values (as values_of). Returns the version. */
static int64_t values(fixture *f, float *full) {
    ps_snapshot *snap = pull_now(f->s, 0);
    values_of(f, snap, full);
    int64_t v = ps_snapshot_version(snap);
    ps_snapshot_unref(snap);
    return v;
}

/* Only the shard's own places of a whole-model vector (others zeroed). */
static void own_only(const fixture *f, float *full) {
    float tmp[MAXN];
    memcpy(tmp, full, f->m->numel * sizeof *tmp);
    memset(full, 0, f->m->numel * sizeof *full);
    for (int i = 0; i < f->nparts; i++) {
        const cm_partition *p = &f->pl->parts[f->parts[i]];
        memcpy(full + p->offset, tmp + p->offset, p->count * sizeof(float));
    }
}

/* Bit-for-bit comparison, reporting the first difference. */
static void expect_same(const float *want, const float *got, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (memcmp(&want[i], &got[i], sizeof(float)) != 0) {
            fprintf(stderr, "element %zu: want %.9g got %.9g\n", i, (double)want[i],
                    (double)got[i]);
            fail();
        }
    }
}

/* The model's initial values on shard 0's places. */
static void initial(const fixture *f, float *full) {
    cm_model_init(f->m, SEED, full);
    own_only(f, full);
}

/* ref -= LR * mean of the workers' gradients at 'step' (SGD, mean). */
static void ref_sgd_mean(const fixture *f, float *ref, int workers, int64_t step) {
    float g[MAXN], sum[MAXN];
    for (size_t i = 0; i < f->m->numel; i++) sum[i] = 0.0f;
    for (int w = 0; w < workers; w++) {
        grad_fill(g, f->m->numel, w, step);
        for (size_t i = 0; i < f->m->numel; i++) sum[i] += g[i];
    }
    for (size_t i = 0; i < f->m->numel; i++) {
        float mean = sum[i] / (float)workers;
        ref[i] = ref[i] - LR * mean;
    }
    own_only(f, ref);
}

static void expect_stats(ps_shard *s, int64_t version, uint64_t pushes, uint64_t dup,
                         uint64_t stale, uint64_t early, uint64_t bad) {
    ps_shard_stats st;
    ps_shard_stats_get(s, &st);
    assert_int_equal(st.version, version);
    assert_int_equal(st.pushes, pushes);
    assert_int_equal(st.duplicate_pushes, dup);
    assert_int_equal(st.stale_pushes, stale);
    assert_int_equal(st.early_pushes, early);
    assert_int_equal(st.bad_requests, bad);
}

/* ===== Layout ===== */

static void test_layout_splits_kernels(void **state) {
    fixture *f = *state;
    /* The kernels are split (dense0/kernel, 120 B at a 16 B minimum, once
     * per row: 6; dense1/kernel, 60 B: 3), and the shards share the
     * partitions. */
    int nsplit = 0;
    for (int i = 0; i < f->pl->nparts; i++)
        if (f->pl->parts[i].index > 0) nsplit++;
    assert_int_equal(nsplit, 7);
    ps_shard *s1 = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 1, &s1), CM_OK);
    int n1 = 0;
    const uint32_t *p1 = ps_shard_parts(s1, &n1);
    assert_int_equal(f->nparts + n1, f->pl->nparts);
    for (int i = 0; i < f->nparts; i++) {
        assert_int_equal(f->pl->parts[f->parts[i]].shard, 0);
        if (i) assert_true(f->parts[i] > f->parts[i - 1]);
    }
    for (int i = 0; i < n1; i++) assert_int_equal(f->pl->parts[p1[i]].shard, 1);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.nparts, f->nparts);
    assert_int_equal(st.bytes, f->pl->shard_bytes[0]);
    ps_shard_destroy(s1);

    ps_shard *bad = (ps_shard *)1;
    assert_int_equal(ps_shard_create(f->m, f->pl, 2, &bad), CM_EINVAL);
    assert_null(bad);
    assert_int_equal(ps_shard_create(f->m, f->pl, -1, &bad), CM_EINVAL);
    ps_shard_destroy(NULL);
}

/* ===== Before init ===== */

static void test_push_refused_before_init(void **state) {
    fixture *f = *state;
    char err[256] = "";
    float g[MAXN];
    push_buf pb;
    grad_fill(g, f->m->numel, 0, 0);
    push_make(f, g, &pb);
    int64_t v = -1;
    assert_int_equal(ps_shard_push(f->s, 0, 0, pb.g, pb.n, &v, err, sizeof err),
                     PS_PUSH_NOT_READY);
    assert_non_null(strstr(err, "not initialised"));
    assert_int_equal(v, 0);
    expect_stats(f->s, 0, 0, 0, 0, 0, 0);

    /* After init the same push is accepted, and the refused one left no
     * trace: worker 0 is not counted yet. */
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    assert_int_equal(ps_shard_push(f->s, 0, 0, pb.g, pb.n, &v, err, sizeof err), PS_PUSH_OK);
    expect_stats(f->s, 0, 1, 0, 0, 0, 0);
}

static void test_pull_waits_until_init(void **state) {
    fixture *f = *state;
    catcher c0, c1;
    catcher_init(&c0);
    catcher_init(&c1);
    c0.shard = f->s;
    ps_shard_pull(f->s, 0, catch_cb, &c0);
    ps_shard_pull(f->s, 1, catch_cb, &c1);
    sleep_ms(20);
    assert_int_equal(catcher_calls(&c0), 0);
    assert_int_equal(catcher_calls(&c1), 0);

    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    /* Version 0 exists now: the first pull is answered, once, without the
     * shard's lock held (its callback read the stats); the second waits. */
    assert_int_equal(catcher_calls(&c0), 1);
    assert_int_equal(c0.nulls, 0);
    assert_int_equal(ps_snapshot_version(c0.snap), 0);
    assert_int_equal(c0.seen_version, 0);
    assert_int_equal(catcher_calls(&c1), 0);

    float want[MAXN], got[MAXN];
    initial(f, want);
    values_of(f, c0.snap, got);
    expect_same(want, got, f->m->numel);

    int64_t v;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(catcher_calls(&c1), 0);
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(catcher_calls(&c1), 1);
    assert_int_equal(ps_snapshot_version(c1.snap), 1);
    assert_int_equal(catcher_calls(&c0), 1);
    catcher_deinit(&c0);
    catcher_deinit(&c1);
}

/* ===== Init ===== */

static void test_init_idempotent_and_conflict(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
    float before[MAXN], after[MAXN];
    assert_int_equal(values(f, before), 1);

    /* The same config again: OK, the current version, nothing reset. */
    char err[512] = "";
    ps_shard_config same = c;
    v = -1;
    assert_int_equal(ps_shard_init(f->s, &same, &v, err, sizeof err), CM_OK);
    assert_int_equal(v, 1);
    assert_int_equal(values(f, after), 1);
    expect_same(before, after, f->m->numel);

    /* A different one: CM_EBUSY naming both configs. */
    ps_shard_config other = c;
    other.optim.lr = 0.25f;
    v = -1;
    assert_int_equal(ps_shard_init(f->s, &other, &v, err, sizeof err), CM_EBUSY);
    assert_int_equal(v, 1);
    assert_non_null(strstr(err, "already initialised"));
    assert_non_null(strstr(err, "sgd lr=0.5 seed=42 workers=2 sync mean"));
    assert_non_null(strstr(err, "sgd lr=0.25 seed=42 workers=2 sync mean"));

    other = c;
    other.num_workers = 3;
    other.sync = PS_ASYNC;
    assert_int_equal(ps_shard_init(f->s, &other, &v, err, sizeof err), CM_EBUSY);
    assert_non_null(strstr(err, "workers=2 sync"));
    assert_non_null(strstr(err, "workers=3 async"));

    other = c;
    other.seed = 43;
    assert_int_equal(ps_shard_init(f->s, &other, &v, err, sizeof err), CM_EBUSY);
    other = c;
    other.optim = ps_optim_defaults(PS_OPTIM_ADAM, LR);
    assert_int_equal(ps_shard_init(f->s, &other, &v, err, sizeof err), CM_EBUSY);
    assert_non_null(strstr(err, "adam lr=0.5"));

    /* An invalid config is refused as such, initialised or not. */
    other = c;
    other.num_workers = 0;
    assert_int_equal(ps_shard_init(f->s, &other, &v, err, sizeof err), CM_EINVAL);
    other = c;
    other.sync = 0;
    assert_int_equal(ps_shard_init(f->s, &other, &v, err, sizeof err), CM_EINVAL);
    other = c;
    other.optim.kind = 7;
    assert_int_equal(ps_shard_init(f->s, &other, &v, err, sizeof err), CM_EINVAL);

    assert_int_equal(values(f, after), 1);
    expect_same(before, after, f->m->numel);
}

/* --init-from: version 0 restored from given values; their hash is part of
 * the config, so an Init from the seed (or from another file) is refused. */
static void test_init_from_values_is_its_own_config(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 1, PS_SYNC, PS_AGG_MEAN);
    c.init_hash = 0x1234abcd5678ef00ULL;
    float given[MAXN], got[MAXN];
    size_t n = ps_shard_numel(f->s);
    for (size_t i = 0; i < n; i++) given[i] = (float)i * 0.25f - 3.0f;
    char err[512] = "";
    assert_int_equal(ps_shard_restore(f->s, &c, 0, given, NULL, err, sizeof err), CM_OK);
    ps_snapshot *snap = pull_now(f->s, 0);
    assert_int_equal(ps_snapshot_version(snap), 0);
    for (int i = 0; i < f->nparts; i++) {
        size_t off = ps_shard_part_offset(f->s, i), cnt = ps_shard_part_offset(f->s, i + 1) - off;
        memcpy(got + off, ps_snapshot_part(snap, i), cnt * sizeof(float));
    }
    ps_snapshot_unref(snap);
    assert_memory_equal(given, got, n * sizeof(float));
    int64_t v = -1;
    assert_int_equal(ps_shard_init(f->s, &c, &v, err, sizeof err), CM_OK); /* A retry. */
    assert_int_equal(v, 0);
    ps_shard_config seeded = c;
    seeded.init_hash = 0;
    assert_int_equal(ps_shard_init(f->s, &seeded, &v, err, sizeof err), CM_EBUSY);
    assert_non_null(strstr(err, "from-values=1234abcd5678ef00"));
    ps_shard_config other = c;
    other.init_hash = 1;
    assert_int_equal(ps_shard_init(f->s, &other, &v, err, sizeof err), CM_EBUSY);
}

static void test_initial_values(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 1, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    ps_snapshot *snap = pull_now(f->s, 0);
    assert_int_equal(ps_snapshot_version(snap), 0);
    int nonzero = 0;
    for (int i = 0; i < f->nparts; i++) {
        const cm_partition *p = &f->pl->parts[f->parts[i]];
        float want[MAXN];
        cm_var_init(&f->m->vars[p->var], SEED, p->begin, p->count, want);
        expect_same(want, ps_snapshot_part(snap, i), p->count);
        for (size_t k = 0; k < p->count; k++) nonzero += want[k] != 0.0f;
    }
    assert_true(nonzero > 0); /* Glorot kernels, not just zero biases. */
    ps_snapshot_unref(snap);

    /* Shard 1 with zero_init: zeros everywhere. */
    ps_shard *s1 = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 1, &s1), CM_OK);
    c.zero_init = 1;
    char err[256];
    int64_t v;
    assert_int_equal(ps_shard_init(s1, &c, &v, err, sizeof err), CM_OK);
    int n1;
    ps_shard_parts(s1, &n1);
    snap = pull_now(s1, 0);
    for (int i = 0; i < n1; i++) {
        const cm_partition *p = &f->pl->parts[ps_shard_parts(s1, &n1)[i]];
        const float *x = ps_snapshot_part(snap, i);
        for (size_t k = 0; k < p->count; k++) assert_true(x[k] == 0.0f);
    }
    ps_snapshot_unref(snap);
    ps_shard_destroy(s1);
}

/* ===== Sync mode ===== */

static void test_sync_mean_sgd_exact(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    float ref[MAXN], got[MAXN];
    initial(f, ref);

    int64_t v = -1;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(v, 0);
    /* Not applied until worker 1 pushes. */
    assert_int_equal(values(f, got), 0);
    expect_same(ref, got, f->m->numel);

    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
    ref_sgd_mean(f, ref, 2, 0);
    assert_int_equal(values(f, got), 1);
    expect_same(ref, got, f->m->numel);

    /* Step 1, workers in the other order. */
    assert_int_equal(push_step(f, 1, 1, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
    assert_int_equal(push_step(f, 0, 1, &v), PS_PUSH_OK);
    assert_int_equal(v, 2);
    ref_sgd_mean(f, ref, 2, 1);
    assert_int_equal(values(f, got), 2);
    expect_same(ref, got, f->m->numel);
    expect_stats(f->s, 2, 4, 0, 0, 0, 0);
}

/* Push all of f->s's partitions of a whole-model gradient as 'worker',
 * from raw (4 * numel + 1 bytes; grads_of). */
static int push_full(fixture *f, int worker, int64_t step, const float *full, uint8_t *raw,
                     int64_t *version) {
    ps_grad pg[MAXP];
    uint64_t shape[MAXP][CM_VAR_MAX_DIMS];
    grads_of(f, full, PS_DTYPE_FLOAT32, raw, shape, pg);
    char err[256] = "";
    int rc = ps_shard_push(f->s, worker, step, pg, f->nparts, version, err, sizeof err);
    if (rc != PS_PUSH_OK) fprintf(stderr, "push: %s\n", err);
    return rc;
}

/* Sync with 2 workers, each optimizer (its slots included), mean and sum:
 * the shard holds, bit for bit, what ps_optim_apply gives for the sum of the
 * two pushes computed here, over 3 steps. One shard of an MLP 100,60,3 (its
 * kernel 6000 values); gradients and values are not exact in float, so an
 * operation in another order, or a value of the wrong place, would show. */
static void test_sync_last_push_applied_exact(void **state) {
    (void)state;
    static const int sizes[] = {100, 60, 3};
    static const int kinds[] = {PS_OPTIM_SGD, PS_OPTIM_MOMENTUM, PS_OPTIM_ADAM, PS_OPTIM_ADAGRAD,
                                PS_OPTIM_ADD};
    fixture g = {0};
    assert_int_equal(cm_model_create_mlp(sizes, 3, &g.m), CM_OK);
    assert_int_equal(cm_placement_create(g.m, 1, 1u << 20, &g.pl), CM_OK);
    size_t n = g.m->numel;
    float *ref = malloc(n * sizeof *ref), *got = malloc(n * sizeof *got),
          *sum = malloc(n * sizeof *sum), *gr[2], *slots = malloc(2 * n * sizeof *slots);
    uint8_t *raw[2];
    assert_true(ref && got && sum && slots);
    for (int w = 0; w < 2; w++) {
        assert_non_null(gr[w] = malloc(n * sizeof *gr[w]));
        assert_non_null(raw[w] = malloc(4 * n + 1));
    }
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; k++) {
        for (int agg = 0; agg < 2; agg++) {
            assert_int_equal(ps_shard_create(g.m, g.pl, 0, &g.s), CM_OK);
            g.parts = ps_shard_parts(g.s, &g.nparts);
            assert_true(g.nparts >= 1 && g.nparts <= MAXP);
            ps_shard_config c = cfg_make(kinds[k], 2, PS_SYNC, agg ? PS_AGG_SUM : PS_AGG_MEAN);
            char err[256] = "";
            int64_t v = -1;
            assert_int_equal(ps_shard_init(g.s, &c, &v, err, sizeof err), CM_OK);
            cm_model_init(g.m, SEED, ref);
            memset(slots, 0, 2 * n * sizeof *slots); /* Adagrad's too (acc - init). */
            for (int64_t step = 0; step < 3; step++) {
                for (int w = 0; w < 2; w++) {
                    for (size_t i = 0; i < n; i++) {
                        x = x * 6364136223846793005ull + 1442695040888963407ull;
                        gr[w][i] = (float)((int32_t)(x >> 32)) / 3.0e9f;
                    }
                    assert_int_equal(push_full(&g, w, step, gr[w], raw[w], &v), PS_PUSH_OK);
                    assert_int_equal(v, step + w); /* Applied by the second. */
                }
                for (size_t i = 0; i < n; i++) {
                    sum[i] = gr[0][i] + gr[1][i];
                    if (!agg) sum[i] *= 0.5f;
                }
                ps_optim_apply(&c.optim, step + 1, ref, sum, slots, n);
                ps_snapshot *snap = pull_now(g.s, step + 1);
                assert_int_equal(ps_snapshot_version(snap), step + 1);
                values_of(&g, snap, got);
                ps_snapshot_unref(snap);
                expect_same(ref, got, n);
            }
            ps_shard_destroy(g.s);
        }
    }
    for (int w = 0; w < 2; w++) {
        free(gr[w]);
        free(raw[w]);
    }
    free(ref);
    free(got);
    free(sum);
    free(slots);
    cm_placement_destroy(g.pl);
    cm_model_destroy(g.m);
}

/* Backup sync: a step closes after backup_ms with the workers that pushed
 * (their mean), the missing one is absent (the next step does not wait
 * for it), its late push is PS_PUSH_SKIPPED and makes the steps wait for
 * it again; nothing closes before the deadline. */
static void test_backup_sync(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 3, PS_SYNC, PS_AGG_MEAN);
    c.backup_ms = 400; /* (The first tick below must come before it, also under load.) */
    init_ok(f, &c);
    float ref[MAXN], got[MAXN];
    initial(f, ref);
    int64_t v = -1, step;
    double waited;
    char who[64];
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(ps_shard_tick(f->s, &step, &waited, who, sizeof who), 0);
    assert_int_equal(values(f, got), 0); /* Before the deadline: waits for worker 2. */
    sleep_ms(430);
    assert_int_equal(ps_shard_tick(f->s, &step, &waited, who, sizeof who), 1);
    assert_int_equal(step, 0);
    assert_true(waited >= 0.4);
    assert_string_equal(who, "2");
    ref_sgd_mean(f, ref, 2, 0); /* The mean of workers 0 and 1. */
    assert_int_equal(values(f, got), 1);
    expect_same(ref, got, f->m->numel);
    /* Worker 2 absent: step 1 closes with 0 and 1, no waiting. */
    assert_int_equal(push_step(f, 1, 1, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 0, 1, &v), PS_PUSH_OK);
    assert_int_equal(v, 2);
    ref_sgd_mean(f, ref, 2, 1);
    assert_int_equal(values(f, got), 2);
    expect_same(ref, got, f->m->numel);
    /* Its late push: skipped, and it counts again from now on. */
    assert_int_equal(push_step(f, 2, 0, &v), PS_PUSH_SKIPPED);
    assert_int_equal(push_step(f, 0, 2, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 1, 2, &v), PS_PUSH_OK);
    assert_int_equal(v, 2); /* Waiting for worker 2 again. */
    assert_int_equal(push_step(f, 2, 2, &v), PS_PUSH_OK);
    assert_int_equal(v, 3);
    ref_sgd_mean(f, ref, 3, 2);
    assert_int_equal(values(f, got), 3);
    expect_same(ref, got, f->m->numel);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.backup_closes, 1);
    /* Not in async mode. */
    ps_shard_config bad = cfg_make(PS_OPTIM_SGD, 3, PS_ASYNC, PS_AGG_MEAN);
    bad.backup_ms = 100;
    char err[256] = "";
    int64_t v0;
    assert_int_not_equal(ps_shard_init(f->s, &bad, &v0, err, sizeof err), CM_OK);
}

/* Backup sync and a push in several calls: worker 1 gives one partition
 * of step 0, the step closes without the rest (worker 1 absent), and the
 * rest comes late: PS_PUSH_SKIPPED (the step closed without it; counted
 * stale), not a duplicate, and worker 1 counts again from now on, as after
 * any late push. A retry of the partition that was taken is SKIPPED too,
 * and one of a complete step stays a duplicate. */
static void test_backup_sync_split_push(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    c.backup_ms = 50;
    init_ok(f, &c);
    float g[MAXN];
    push_buf pb;
    char err[256] = "", who[64];
    int64_t v = -1, step;
    double waited;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    grad_fill(g, f->m->numel, 1, 0);
    push_make(f, g, &pb);
    assert_int_equal(ps_shard_push(f->s, 1, 0, pb.g, 1, &v, err, sizeof err), PS_PUSH_OK);
    sleep_ms(80);
    assert_int_equal(ps_shard_tick(f->s, &step, &waited, who, sizeof who), 1);
    assert_string_equal(who, "1");
    float got[MAXN];
    assert_int_equal(values(f, got), 1);
    ps_shard_stats before, after;
    ps_shard_stats_get(f->s, &before);
    err[0] = 0;
    assert_int_equal(ps_shard_push(f->s, 1, 0, pb.g + 1, pb.n - 1, &v, err, sizeof err),
                     PS_PUSH_SKIPPED);
    assert_non_null(strstr(err, "closed without worker 1"));
    assert_int_equal(ps_shard_push(f->s, 1, 0, pb.g, 1, &v, err, sizeof err), PS_PUSH_SKIPPED);
    ps_shard_stats_get(f->s, &after);
    assert_int_equal(after.duplicate_pushes, before.duplicate_pushes);
    assert_int_equal(after.stale_pushes, before.stale_pushes + 2);
    /* Present again: step 1 waits for it. */
    assert_int_equal(push_step(f, 0, 1, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
    assert_int_equal(push_step(f, 1, 1, &v), PS_PUSH_OK);
    assert_int_equal(v, 2);
    /* A retry of a step worker 0 gave whole: a duplicate. */
    assert_int_equal(push_step(f, 0, 1, &v), PS_PUSH_DUPLICATE);
}

/* Gradients whose float sums depend on the order of addition. */
static void grad_rough(float *full, size_t n, int worker) {
    static const float scale[3] = {1e-3f, 7.0f, 3e3f};
    for (size_t i = 0; i < n; i++)
        full[i] = scale[(i + (size_t)worker) % 3] * (float)(1.0 + 0.37 * (double)i + 0.11 * worker) /
                  (float)(3 + worker);
}

/* With 3 workers the shard's sum must not depend on the order the pushes
 * arrive in (it sums in rank order), so sync runs are reproducible. */
static void test_sync_sum_independent_of_arrival_order(void **state) {
    fixture *f = *state;
    static const int orders[3][3] = {{0, 1, 2}, {2, 1, 0}, {1, 2, 0}};
    float g[3][MAXN], got[3][MAXN];
    for (int w = 0; w < 3; w++) grad_rough(g[w], f->m->numel, w);
    /* Negative control: these values do sum differently in another order. */
    int differs = 0;
    for (int pi = 0; pi < f->nparts; pi++) { /* Over this shard's elements. */
        const cm_partition *p = &f->pl->parts[f->parts[pi]];
        for (size_t i = p->offset; i < p->offset + p->count; i++) {
            volatile float a = g[0][i] + g[1][i], b = g[2][i] + g[1][i];
            volatile float x = a + g[2][i], y = b + g[0][i];
            differs |= x != y;
        }
    }
    assert_true(differs);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 3, PS_SYNC, PS_AGG_SUM);
    for (int o = 0; o < 3; o++) {
        ps_shard *sh = NULL;
        assert_int_equal(ps_shard_create(f->m, f->pl, 0, &sh), CM_OK);
        char err[256] = "";
        int64_t v = -1;
        assert_int_equal(ps_shard_init(sh, &c, &v, err, sizeof err), CM_OK);
        for (int k = 0; k < 3; k++) {
            push_buf pb;
            int w = orders[o][k];
            push_make(f, g[w], &pb);
            assert_int_equal(ps_shard_push(sh, w, 0, pb.g, pb.n, &v, err, sizeof err),
                             PS_PUSH_OK);
        }
        assert_int_equal(v, 1);
        ps_snapshot *snap = pull_now(sh, 1);
        assert_non_null(snap);
        values_of(f, snap, got[o]);
        ps_snapshot_unref(snap);
        ps_shard_destroy(sh);
        if (o > 0) assert_memory_equal(got[o], got[0], f->m->numel * sizeof(float));
    }
}

static void test_duplicate_push_not_counted(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    float ref[MAXN], got[MAXN], other[MAXN];
    initial(f, ref);
    char err[256];
    push_buf pb;
    int64_t v = -1;

    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    /* The same (worker, step) before the apply, even with other values: a
     * duplicate, not added to the sum. */
    grad_fill(other, f->m->numel, 5, 9);
    push_make(f, other, &pb);
    assert_int_equal(ps_shard_push(f->s, 0, 0, pb.g, pb.n, &v, err, sizeof err),
                     PS_PUSH_DUPLICATE);
    assert_int_equal(v, 0);
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_DUPLICATE);
    expect_stats(f->s, 0, 1, 2, 0, 0, 0);

    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
    ref_sgd_mean(f, ref, 2, 0);
    assert_int_equal(values(f, got), 1);
    expect_same(ref, got, f->m->numel);

    /* After the apply: a retry of either worker's last push. */
    assert_int_equal(ps_shard_push(f->s, 0, 0, pb.g, pb.n, &v, err, sizeof err),
                     PS_PUSH_DUPLICATE);
    assert_int_equal(v, 1);
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_DUPLICATE);
    assert_int_equal(values(f, got), 1);
    expect_same(ref, got, f->m->numel);
    expect_stats(f->s, 1, 2, 4, 0, 0, 0);

    /* Worker 0 counted at step 1, retried: still one contribution, so the
     * step applies only when worker 1 pushes. */
    assert_int_equal(push_step(f, 0, 1, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 0, 1, &v), PS_PUSH_DUPLICATE);
    assert_int_equal(v, 1);
    assert_int_equal(push_step(f, 1, 1, &v), PS_PUSH_OK);
    assert_int_equal(v, 2);
    ref_sgd_mean(f, ref, 2, 1);
    assert_int_equal(values(f, got), 2);
    expect_same(ref, got, f->m->numel);
    expect_stats(f->s, 2, 4, 5, 0, 0, 0);
}

static void test_stale_and_early_counted(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    float ref[MAXN], got[MAXN];
    initial(f, ref);
    char err[256];
    float g[MAXN];
    push_buf pb;
    int64_t v = -1;

    /* Early: step 1 at version 0. */
    grad_fill(g, f->m->numel, 0, 1);
    push_make(f, g, &pb);
    assert_int_equal(ps_shard_push(f->s, 0, 1, pb.g, pb.n, &v, err, sizeof err), PS_PUSH_EARLY);
    assert_int_equal(v, 0);
    assert_non_null(strstr(err, "early push: step 1 from worker 0"));
    assert_non_null(strstr(err, "version 0"));
    expect_stats(f->s, 0, 0, 0, 0, 1, 0);

    for (int64_t t = 0; t < 2; t++) {
        assert_int_equal(push_step(f, 0, t, &v), PS_PUSH_OK);
        assert_int_equal(push_step(f, 1, t, &v), PS_PUSH_OK);
        ref_sgd_mean(f, ref, 2, t);
    }
    assert_int_equal(v, 2);

    /* Stale: step 0 at version 2 is not worker 0's last push (step 1). */
    grad_fill(g, f->m->numel, 0, 0);
    push_make(f, g, &pb);
    err[0] = 0;
    assert_int_equal(ps_shard_push(f->s, 0, 0, pb.g, pb.n, &v, err, sizeof err), PS_PUSH_STALE);
    assert_int_equal(v, 2);
    assert_non_null(strstr(err, "stale push: step 0 from worker 0"));
    assert_non_null(strstr(err, "version 2"));
    /* Early again, and a far-future step. */
    assert_int_equal(ps_shard_push(f->s, 1, 3, pb.g, pb.n, &v, err, sizeof err), PS_PUSH_EARLY);
    assert_int_equal(ps_shard_push(f->s, 1, INT64_MAX, pb.g, pb.n, &v, err, sizeof err),
                     PS_PUSH_EARLY);
    /* A negative step is invalid, not a duplicate of "never pushed". */
    assert_int_equal(ps_shard_push(f->s, 1, -1, pb.g, pb.n, &v, err, sizeof err),
                     PS_PUSH_INVALID);
    assert_non_null(strstr(err, "step must be >= 0"));
    expect_stats(f->s, 2, 4, 0, 1, 3, 1);

    /* None of them changed anything; step 2 still works. */
    assert_int_equal(values(f, got), 2);
    expect_same(ref, got, f->m->numel);
    assert_int_equal(push_step(f, 1, 2, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 0, 2, &v), PS_PUSH_OK);
    assert_int_equal(v, 3);
    ref_sgd_mean(f, ref, 2, 2);
    assert_int_equal(values(f, got), 3);
    expect_same(ref, got, f->m->numel);
}

/* A worker that has not pushed yet has no "last push": a push of step -1 at
 * version 0 is out of step (stale or invalid), not an accepted retry. */
static void test_negative_step_before_any_push(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v;
    int rc = push_step(f, 0, -1, &v);
    if (rc != PS_PUSH_STALE && rc != PS_PUSH_INVALID) {
        fprintf(stderr, "push of step -1 at version 0 by a fresh worker: %d, want %d or %d\n",
                rc, PS_PUSH_STALE, PS_PUSH_INVALID);
        fail();
    }
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.duplicate_pushes, 0);
    assert_int_equal(st.pushes, 0);
}

static void test_stats_counters(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v;
    char err[256];
    float g[MAXN];
    push_buf pb;
    grad_fill(g, f->m->numel, 0, 0);
    push_make(f, g, &pb);

    uint64_t pushes = 0, dup = 0, stale = 0, early = 0, bad = 0, pulls = 0;
    for (int64_t t = 0; t < 5; t++) {
        assert_int_equal(push_step(f, 0, t, &v), PS_PUSH_OK);
        pushes++;
        assert_int_equal(push_step(f, 0, t, &v), PS_PUSH_DUPLICATE);
        dup++;
        assert_int_equal(push_step(f, 1, t + 1, &v), PS_PUSH_EARLY);
        early++;
        assert_int_equal(ps_shard_push(f->s, 1, t, pb.g, 0, &v, err, sizeof err),
                         PS_PUSH_INVALID);
        bad++;
        assert_int_equal(push_step(f, 1, t, &v), PS_PUSH_OK);
        pushes++;
        if (t >= 2) {
            assert_int_equal(push_step(f, 1, t - 2, &v), PS_PUSH_STALE);
            stale++;
        }
        ps_shard_count_bad(f->s);
        bad++;
        ps_snapshot_unref(pull_now(f->s, t));
        pulls++;
    }
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.version, 5);
    assert_int_equal(st.pushes, pushes);
    assert_int_equal(st.duplicate_pushes, dup);
    assert_int_equal(st.stale_pushes, stale);
    assert_int_equal(st.early_pushes, early);
    assert_int_equal(st.bad_requests, bad);
    assert_int_equal(st.pulls, pulls);
    assert_int_equal(st.nparts, f->nparts);
    assert_int_equal(st.bytes, f->pl->shard_bytes[0]);
}

/* ===== Pulls and snapshots ===== */

static void test_pull_answered_once_when_version_applies(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    catcher c1, c2;
    catcher_init(&c1);
    catcher_init(&c2);
    c1.shard = f->s;
    ps_shard_pull(f->s, 1, catch_cb, &c1);
    ps_shard_pull(f->s, 2, catch_cb, &c2);
    int64_t v;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_DUPLICATE);
    assert_int_equal(push_step(f, 1, 1, &v), PS_PUSH_EARLY);
    assert_int_equal(catcher_calls(&c1), 0);

    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(catcher_calls(&c1), 1);
    assert_int_equal(c1.nulls, 0);
    assert_int_equal(ps_snapshot_version(c1.snap), 1);
    assert_int_equal(c1.seen_version, 1); /* Called without the lock held. */
    assert_int_equal(catcher_calls(&c2), 0);

    float ref[MAXN], got[MAXN];
    initial(f, ref);
    ref_sgd_mean(f, ref, 2, 0);
    values_of(f, c1.snap, got);
    expect_same(ref, got, f->m->numel);

    /* Later versions do not answer it again. */
    for (int64_t t = 1; t < 4; t++) {
        assert_int_equal(push_step(f, 0, t, &v), PS_PUSH_OK);
        assert_int_equal(push_step(f, 1, t, &v), PS_PUSH_OK);
    }
    assert_int_equal(catcher_calls(&c1), 1);
    assert_int_equal(catcher_calls(&c2), 1);
    assert_int_equal(ps_snapshot_version(c2.snap), 2);

    /* A pull for an old version gets the newest one. */
    ps_snapshot *snap = pull_now(f->s, 0);
    assert_int_equal(ps_snapshot_version(snap), 4);
    ps_snapshot_unref(snap);
    catcher_deinit(&c1);
    catcher_deinit(&c2);
}

static void test_snapshot_immutable(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    ps_snapshot *v1 = pull_now(f->s, 1);
    ps_snapshot *v1b = pull_now(f->s, 1);
    assert_ptr_equal(v1, v1b); /* The same immutable snapshot, shared. */
    ps_snapshot_unref(v1b);
    assert_int_equal(ps_snapshot_version(v1), 1);
    float copy[MAXN];
    values_of(f, v1, copy);

    /* Many more versions, so recycled snapshot buffers come around. */
    for (int64_t t = 1; t < 12; t++) {
        assert_int_equal(push_step(f, 0, t, &v), PS_PUSH_OK);
        assert_int_equal(push_step(f, 1, t, &v), PS_PUSH_OK);
        ps_snapshot *cur = pull_now(f->s, t + 1);
        assert_int_equal(ps_snapshot_version(cur), t + 1);
        float now[MAXN];
        values_of(f, cur, now);
        assert_true(memcmp(now, copy, f->m->numel * sizeof(float)) != 0);
        ps_snapshot_unref(cur);
    }
    float later[MAXN];
    assert_int_equal(ps_snapshot_version(v1), 1);
    values_of(f, v1, later);
    expect_same(copy, later, f->m->numel);
    ps_snapshot_unref(v1);
}

/* ===== Invalid pushes ===== */

typedef enum {
    BAD_UNKNOWN_PART,
    BAD_OTHER_SHARD,
    BAD_SHAPE_ROWS,
    BAD_SHAPE_COLS,
    BAD_SHAPE_NDIMS,
    BAD_LEN_SHORT,
    BAD_LEN_LONG,
    BAD_DTYPE,
    BAD_DUP_PART,
    BAD_EXTRA_PART,
    BAD_NO_PARTS,
    BAD_WORKER_HIGH,
    BAD_WORKER_NEG,
    BAD_DTYPE_UNKNOWN,
    BAD_BF16_F32_LEN,
    BAD_BF16_ODD_LEN,
    BAD_COUNT
} bad_kind;

/* Corrupt a valid push; returns the worker rank to use and writes the part
 * of the message that must appear into want. */
static int corrupt(const fixture *f, push_buf *pb, bad_kind k, char *want, size_t wlen) {
    uint32_t other = 0;
    for (int i = 0; i < f->pl->nparts; i++)
        if (f->pl->parts[i].shard == 1) other = (uint32_t)i;
    /* A partition of a 2-D kernel, to change its columns. */
    int kern = -1;
    for (int i = 0; i < pb->n; i++)
        if (pb->g[i].nshape == 2) kern = i;
    assert_true(kern >= 0);
    const cm_partition *kp = &f->pl->parts[pb->g[kern].part];
    const char *kname = f->m->vars[kp->var].name;
    int worker = 1;
    switch (k) {
    case BAD_UNKNOWN_PART:
        pb->g[0].part = (uint32_t)f->pl->nparts + 3;
        snprintf(want, wlen, "unknown partition %d (the model has %d)", f->pl->nparts + 3,
                 f->pl->nparts);
        break;
    case BAD_OTHER_SHARD:
        pb->g[0].part = other;
        snprintf(want, wlen, "partition %u (%s part %d) belongs to shard 1, not shard 0", other,
                 f->m->vars[f->pl->parts[other].var].name, f->pl->parts[other].index);
        break;
    case BAD_SHAPE_ROWS:
        pb->shape[kern][0]++;
        snprintf(want, wlen, "partition %u (%s part %d): shape must be [%zu,%lld]",
                 pb->g[kern].part, kname, kp->index, kp->row_end - kp->row_begin,
                 (long long)f->m->vars[kp->var].dims[1]);
        break;
    case BAD_SHAPE_COLS:
        pb->shape[kern][1]--;
        snprintf(want, wlen, "(%s part %d): shape must be", kname, kp->index);
        break;
    case BAD_SHAPE_NDIMS:
        pb->g[kern].nshape = 1;
        snprintf(want, wlen, "(%s part %d): shape must be", kname, kp->index);
        break;
    case BAD_LEN_SHORT:
        pb->g[kern].len -= 4;
        snprintf(want, wlen, "(%s part %d): %zu data bytes, expected %zu", kname, kp->index,
                 kp->count * 4 - 4, kp->count * 4);
        break;
    case BAD_LEN_LONG:
        pb->g[kern].len += 1;
        snprintf(want, wlen, "%zu data bytes, expected %zu", kp->count * 4 + 1, kp->count * 4);
        break;
    case BAD_DTYPE:
        pb->g[kern].dtype = 0;
        snprintf(want, wlen,
                 "partition %u (%s part %d): dtype 0, must be DTYPE_FLOAT32 (1) or "
                 "DTYPE_BFLOAT16 (2)",
                 pb->g[kern].part, kname, kp->index);
        break;
    case BAD_DUP_PART:
        pb->g[1] = pb->g[0];
        snprintf(want, wlen, "partition %u appears twice in one push", pb->g[0].part);
        break;
    case BAD_EXTRA_PART:
        pb->g[pb->n] = pb->g[0];
        pb->n++;
        snprintf(want, wlen, "must carry 1 to %d of its partitions, got %d", f->nparts,
                 f->nparts + 1);
        break;
    case BAD_NO_PARTS:
        pb->n = 0;
        snprintf(want, wlen, "must carry 1 to %d of its partitions, got 0", f->nparts);
        break;
    case BAD_WORKER_HIGH:
        worker = 2;
        snprintf(want, wlen, "worker rank 2 out of range: the shard expects 2 workers");
        break;
    case BAD_WORKER_NEG:
        worker = -1;
        snprintf(want, wlen, "worker rank -1 out of range");
        break;
    case BAD_DTYPE_UNKNOWN:
        pb->g[kern].dtype = 7;
        snprintf(want, wlen, "partition %u (%s part %d): dtype 7, must be", pb->g[kern].part,
                 kname, kp->index);
        break;
    case BAD_BF16_F32_LEN: /* Said bfloat16, sent float32's length. */
        pb->g[kern].dtype = PS_DTYPE_BFLOAT16;
        snprintf(want, wlen, "partition %u (%s part %d): %zu data bytes, expected %zu (%zu bfloat16)",
                 pb->g[kern].part, kname, kp->index, kp->count * 4, kp->count * 2, kp->count);
        break;
    case BAD_BF16_ODD_LEN:
        pb->g[kern].dtype = PS_DTYPE_BFLOAT16;
        pb->g[kern].len = kp->count * 2 + 1;
        snprintf(want, wlen, "(%s part %d): %zu data bytes, expected %zu (%zu bfloat16)", kname,
                 kp->index, kp->count * 2 + 1, kp->count * 2, kp->count);
        break;
    case BAD_COUNT: break;
    }
    return worker;
}

static void test_invalid_pushes_leave_state_unchanged(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v;
    /* Worker 0 has contributed to step 0: the pending sum must survive
     * every bad push from worker 1 untouched. */
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    float before[MAXN], after[MAXN], g[MAXN];
    assert_int_equal(values(f, before), 0);
    grad_fill(g, f->m->numel, 1, 0);
    for (int k = 0; k < BAD_COUNT; k++) {
        push_buf pb;
        push_make(f, g, &pb);
        char want[256], err[512];
        int worker = corrupt(f, &pb, (bad_kind)k, want, sizeof want);
        snprintf(err, sizeof err, "(unset)");
        v = -1;
        int rc = ps_shard_push(f->s, worker, 0, pb.g, pb.n, &v, err, sizeof err);
        if (rc != PS_PUSH_INVALID || !strstr(err, want)) {
            fprintf(stderr, "case %d: rc %d, message '%s', want '%s'\n", k, rc, err, want);
            fail();
        }
        assert_int_equal(v, 0);
        assert_int_equal(values(f, after), 0);
        expect_same(before, after, f->m->numel);
        expect_stats(f->s, 0, 1, 0, 0, 0, (uint64_t)k + 1);
    }
    /* Worker 1 was never counted: its good push is accepted and applies
     * exactly the mean of the two good gradients. */
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
    float ref[MAXN];
    initial(f, ref);
    ref_sgd_mean(f, ref, 2, 0);
    assert_int_equal(values(f, after), 1);
    expect_same(ref, after, f->m->numel);
    expect_stats(f->s, 1, 2, 0, 0, 0, BAD_COUNT);
}

/* ===== Async mode and aggregates ===== */

static void test_async_applies_each_push(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_ASYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    float ref[MAXN], got[MAXN], g[MAXN];
    initial(f, ref);
    catcher w;
    catcher_init(&w);
    ps_shard_pull(f->s, 3, catch_cb, &w);
    /* Each worker's steps only grow; every new push is one update of lr * g,
     * whatever the other workers are doing. */
    const struct { int worker; int64_t step; } seq[] = {{0, 0}, {1, 0}, {1, 5}, {0, 1}};
    for (int k = 0; k < 4; k++) {
        int64_t v = -1;
        assert_int_equal(push_step(f, seq[k].worker, seq[k].step, &v), PS_PUSH_OK);
        assert_int_equal(v, k + 1);
        assert_int_equal(catcher_calls(&w), k + 1 >= 3 ? 1 : 0);
        grad_fill(g, f->m->numel, seq[k].worker, seq[k].step);
        for (size_t i = 0; i < f->m->numel; i++) ref[i] = ref[i] - LR * g[i];
        own_only(f, ref);
        assert_int_equal(values(f, got), k + 1);
        expect_same(ref, got, f->m->numel);
    }
    assert_int_equal(ps_snapshot_version(w.snap), 3);
    /* A retry of a push already applied (a step not above the worker's last)
     * is acknowledged and not applied twice. */
    int64_t v = -1;
    assert_int_equal(push_step(f, 1, 5, &v), PS_PUSH_DUPLICATE);
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_DUPLICATE);
    assert_int_equal(v, 4);
    assert_int_equal(values(f, got), 4);
    expect_same(ref, got, f->m->numel);
    expect_stats(f->s, 4, 4, 2, 0, 0, 0);
    catcher_deinit(&w);
}

/* Async: a push while a reader holds the current snapshot writes the next
 * version into a new buffer and leaves the held one as it was; a push
 * while no one else holds it writes in place (the same buffer, the next
 * version), and the values are exact either way. */
static void test_async_in_place_only_when_unheld(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_ASYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    float ref[MAXN], got[MAXN], g[MAXN], held_before[MAXN], held_after[MAXN];
    initial(f, ref);
    int64_t v = -1;
    for (int k = 0; k < 4; k++) {
        int hold = k % 2 == 0;
        ps_snapshot *held = pull_now(f->s, 0);
        const float *before = ps_snapshot_part(held, 0);
        values_of(f, held, held_before);
        if (!hold) ps_snapshot_unref(held);
        assert_int_equal(push_step(f, 0, k, &v), PS_PUSH_OK);
        assert_int_equal(v, k + 1);
        grad_fill(g, f->m->numel, 0, k);
        for (size_t i = 0; i < f->m->numel; i++) ref[i] = ref[i] - LR * g[i];
        own_only(f, ref);
        ps_snapshot *now = pull_now(f->s, k + 1);
        assert_int_equal(ps_snapshot_version(now), k + 1);
        values_of(f, now, got);
        expect_same(ref, got, f->m->numel);
        if (hold) {
            assert_ptr_not_equal(ps_snapshot_part(now, 0), before);
            assert_int_equal(ps_snapshot_version(held), k);
            values_of(f, held, held_after);
            expect_same(held_before, held_after, f->m->numel);
            ps_snapshot_unref(held);
        } else {
            assert_ptr_equal(ps_snapshot_part(now, 0), before);
        }
        ps_snapshot_unref(now);
    }
}

static void test_sum_add_exact(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_ADD, 3, PS_SYNC, PS_AGG_SUM);
    c.zero_init = 1;
    init_ok(f, &c);
    /* Integer gradients: worker w, step t, element i -> (i + 1) * (w + 1) +
     * 100 * t. */
    float want[MAXN] = {0}, got[MAXN];
    for (int64_t t = 0; t < 3; t++) {
        for (int w = 0; w < 3; w++) {
            float g[MAXN];
            for (size_t i = 0; i < f->m->numel; i++)
                g[i] = (float)((i + 1) * (size_t)(w + 1) + 100 * (size_t)t);
            push_buf pb;
            char err[256];
            int64_t v;
            push_make(f, g, &pb);
            assert_int_equal(ps_shard_push(f->s, w, t, pb.g, pb.n, &v, err, sizeof err),
                             PS_PUSH_OK);
            assert_int_equal(v, w == 2 ? t + 1 : t);
        }
        for (size_t i = 0; i < f->m->numel; i++)
            want[i] += (float)((i + 1) * 6 + 300 * (size_t)t);
    }
    own_only(f, want);
    assert_int_equal(values(f, got), 3);
    expect_same(want, got, f->m->numel);
}

/* ===== bfloat16 gradients ===== */

static float f_of(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Round to bfloat16 one value at a time, and through the vector loop. */
static uint16_t bf16_one(uint32_t u) {
    float x = f_of(u);
    uint16_t h;
    ps_wire_bf16_from_f32(&h, &x, 1);
    return h;
}

/* An independent reference: of the two bf16 neighbours (truncation and one
 * unit away from zero, 2^128 standing for the infinity past the largest),
 * the nearer in double, the even one on a tie. Finite inputs only. */
static uint16_t bf16_ref(uint32_t u) {
    uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
    double x = (double)f_of(u), vlo = (double)f_of(lo);
    double vhi = (hi & 0x7f800000u) == 0x7f800000u ? copysign(ldexp(1.0, 128), x)
                                                     : (double)f_of(hi);
    double dlo = fabs(x - vlo), dhi = fabs(vhi - x);
    if (dlo < dhi || (dlo == dhi && !((lo >> 16) & 1u))) return (uint16_t)(lo >> 16);
    return (uint16_t)(hi >> 16);
}

static void test_bf16_rounding(void **state) {
    (void)state;
    static const struct { uint32_t in; uint16_t out; const char *what; } cases[] = {
        {0x3f800000u, 0x3f80, "1.0 is exact"},
        {0x3f807fffu, 0x3f80, "below half an ulp: down"},
        {0x3f808001u, 0x3f81, "above half an ulp: up"},
        {0x3f808000u, 0x3f80, "tie, even below: down"},
        {0x3f818000u, 0x3f82, "tie, odd below: up to even"},
        {0x3fffffffu, 0x4000, "1.99999988 rounds up into the next exponent (2.0)"},
        {0x3fff8000u, 0x4000, "tie, odd below, carries into the exponent"},
        {0x7f7f7fffu, 0x7f7f, "just under the largest bf16 stays finite"},
        {0x7f7fffffu, 0x7f80, "FLT_MAX rounds to +inf"},
        {0xbf800000u, 0xbf80, "-1.0"},
        {0xbf808000u, 0xbf80, "negative tie, even: toward zero"},
        {0xbf818000u, 0xbf82, "negative tie, odd: away from zero"},
        {0xbfffffffu, 0xc000, "negative, into the next exponent (-2.0)"},
        {0xff7fffffu, 0xff80, "-FLT_MAX rounds to -inf"},
        {0x00000000u, 0x0000, "+0"},
        {0x80000000u, 0x8000, "-0 keeps its sign"},
        {0x00018000u, 0x0002, "subnormal tie, odd: up"},
        {0x00008000u, 0x0000, "subnormal tie, even: to +0"},
        {0x7f800000u, 0x7f80, "+inf"},
        {0xff800000u, 0xff80, "-inf"},
        {0x7fc00000u, 0x7fc0, "quiet NaN"},
        {0x7f800001u, 0x7fc0, "NaN with low payload only: not inf"},
        {0x7fbfffffu, 0x7fff, "signalling NaN, payload all ones: quieted"},
        {0xffffffffu, 0xffff, "negative NaN all ones: does not wrap to 0"},
        {0x7fffffffu, 0x7fff, "NaN all ones"},
    };
    enum { NC = sizeof cases / sizeof cases[0] };
    /* 3 copies one float past alignment: the loop's vector body and tail. */
    float in[3 * NC + 1];
    uint16_t out[3 * NC + 1];
    for (int r = 0; r < 3; r++)
        for (int k = 0; k < NC; k++) in[1 + r * NC + k] = f_of(cases[k].in);
    ps_wire_bf16_from_f32(out + 1, in + 1, 3 * NC);
    for (int k = 0; k < NC; k++) {
        uint16_t one = bf16_one(cases[k].in);
        if (one != cases[k].out)
            fail_msg("%s: 0x%08x -> 0x%04x, want 0x%04x", cases[k].what, cases[k].in, one,
                     cases[k].out);
        for (int r = 0; r < 3; r++)
            if (out[1 + r * NC + k] != cases[k].out)
                fail_msg("%s (copy %d in the loop): 0x%04x, want 0x%04x", cases[k].what, r,
                         out[1 + r * NC + k], cases[k].out);
    }
    /* Widening is exact and NaN stays NaN: read back from an odd address. */
    uint8_t raw[2 * NC + 1];
    memcpy(raw + 1, out + 1, 2 * NC);
    float back[NC], sum[NC];
    ps_wire_load_bf16(back, raw + 1, NC);
    for (int k = 0; k < NC; k++) {
        uint32_t bits;
        memcpy(&bits, &back[k], sizeof bits);
        assert_int_equal(bits, (uint32_t)cases[k].out << 16);
        if (isnan(f_of(cases[k].in))) assert_true(isnan(back[k]));
        if (isinf(f_of(cases[k].in))) assert_true(isinf(back[k]));
        sum[k] = 0.25f;
    }
    ps_wire_load_add_bf16(sum, raw + 1, NC);
    for (int k = 0; k < NC; k++) {
        float want = 0.25f + back[k];
        if (memcmp(&want, &sum[k], sizeof want) != 0 && !(isnan(want) && isnan(sum[k])))
            fail_msg("%s: 0.25 + %g gave %g", cases[k].what, (double)back[k], (double)sum[k]);
    }
    /* 200,000 random finite bit patterns against the reference. */
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < 200000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        uint32_t u = (uint32_t)(x >> 16);
        if ((u & 0x7f800000u) == 0x7f800000u) continue;
        uint16_t got = bf16_one(u), want = bf16_ref(u);
        if (got != want) fail_msg("0x%08x -> 0x%04x, reference 0x%04x", u, got, want);
    }
}

static void shard_values(const fixture *f, ps_shard *s, float *full) {
    ps_snapshot *snap = pull_now(s, 0);
    values_of(f, snap, full);
    ps_snapshot_unref(snap);
}

static void push_as(const fixture *f, ps_shard *s, int worker, int64_t step, const float *g,
                    int dtype) {
    push_buf pb;
    char err[256] = "";
    int64_t v;
    push_make_as(f, g, dtype, &pb);
    int rc = ps_shard_push(s, worker, step, pb.g, pb.n, &v, err, sizeof err);
    if (rc != PS_PUSH_OK) fail_msg("push of worker %d step %lld: %d %s", worker,
                                   (long long)step, rc, err);
}

/* A shard fed bfloat16 by the workers whose bit is set in 'bf16_workers'
 * (float32 by the others) holds, bit for bit, what a shard fed float32 of
 * the same gradients rounded to bfloat16 holds; and not what float32 of
 * the unrounded ones gives, so rounding is seen. Sync with 2 workers
 * (first contribution copied, the second added, whichever has which
 * dtype), 3 workers (staged in rank order) and async; three optimizers. */
static void test_bf16_push_equals_fp32_of_rounded(void **state) {
    fixture *f = *state;
    static const struct { int kind, workers, sync; unsigned bf16_workers; } runs[] = {
        {PS_OPTIM_SGD, 2, PS_SYNC, 3u},      /* Both bf16. */
        {PS_OPTIM_SGD, 2, PS_SYNC, 2u},      /* Mixed: worker 0 fp32, worker 1 bf16. */
        {PS_OPTIM_SGD, 2, PS_SYNC, 1u},      /* Mixed, the bf16 one arrives first. */
        {PS_OPTIM_ADAM, 3, PS_SYNC, 5u},     /* Staged, mixed. */
        {PS_OPTIM_MOMENTUM, 2, PS_ASYNC, 3u}, /* Async. */
    };
    size_t n = f->m->numel;
    for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
        ps_shard *a, *b, *plain;
        assert_int_equal(ps_shard_create(f->m, f->pl, 0, &a), CM_OK);
        assert_int_equal(ps_shard_create(f->m, f->pl, 0, &b), CM_OK);
        assert_int_equal(ps_shard_create(f->m, f->pl, 0, &plain), CM_OK);
        ps_shard_config c = cfg_make(runs[r].kind, runs[r].workers, runs[r].sync, PS_AGG_MEAN);
        char err[256];
        int64_t v;
        assert_int_equal(ps_shard_init(a, &c, &v, err, sizeof err), CM_OK);
        assert_int_equal(ps_shard_init(b, &c, &v, err, sizeof err), CM_OK);
        assert_int_equal(ps_shard_init(plain, &c, &v, err, sizeof err), CM_OK);
        for (int64_t t = 0; t < 3; t++) {
            for (int w = 0; w < runs[r].workers; w++) {
                float g[MAXN], rounded[MAXN];
                grad_fine(g, n, w, t);
                memcpy(rounded, g, n * sizeof *g);
                int bf = (runs[r].bf16_workers >> w) & 1u;
                if (bf) bf16_round(rounded, n);
                push_as(f, a, w, t, g, bf ? PS_DTYPE_BFLOAT16 : PS_DTYPE_FLOAT32);
                push_as(f, b, w, t, rounded, PS_DTYPE_FLOAT32);
                push_as(f, plain, w, t, g, PS_DTYPE_FLOAT32);
            }
            float va[MAXN], vb[MAXN], vp[MAXN];
            shard_values(f, a, va);
            shard_values(f, b, vb);
            shard_values(f, plain, vp);
            expect_same(vb, va, n);
            /* After the first step: Adam's first update is about lr * sign(g),
             * which rounding rarely changes. */
            int differ = 0;
            for (size_t i = 0; i < n; i++) differ += va[i] != vp[i];
            if (t > 0 && differ < (int)(n / 4))
                fail_msg("run %zu step %lld: only %d of %zu values differ from unrounded "
                         "float32 pushes",
                         r, (long long)t, differ, n);
        }
        ps_shard_stats st;
        ps_shard_stats_get(a, &st);
        assert_int_equal(st.version, runs[r].sync == PS_SYNC ? 3 : 3 * runs[r].workers);
        assert_int_equal(st.bad_requests, 0);
        ps_shard_destroy(a);
        ps_shard_destroy(b);
        ps_shard_destroy(plain);
    }
}

/* A push whose data comes in pieces, as the PS reads it from gRPC's slices
 * (ps_grad.pieces): cut every 1 to 7 bytes (values straddle the cuts),
 * each piece a heap block of its own. With 'guard', each block has 8
 * bytes of 0xff (a NaN pattern) on either side of the piece, so a read
 * outside it shows as a refused push or a wrong value; without, the block
 * is exactly the piece, so ASan sees such a read. */
typedef struct piece_push {
    rpc_piece pc[MAXP + 1][4 * MAXN];
    uint8_t *blocks[(MAXP + 1) * 4 * MAXN];
    int nblocks;
} piece_push;

static void cut_into_pieces(push_buf *pb, piece_push *pp, int guard, uint64_t *x) {
    pp->nblocks = 0;
    for (int i = 0; i < pb->n; i++) {
        ps_grad *g = &pb->g[i];
        int np = 0;
        for (size_t at = 0; at < g->len;) {
            *x ^= *x << 13, *x ^= *x >> 7, *x ^= *x << 17;
            size_t k = 1 + (size_t)(*x % 7);
            if (k > g->len - at) k = g->len - at;
            uint8_t *blk = malloc(k + (guard ? 16 : 0));
            assert_non_null(blk);
            if (guard) memset(blk, 0xff, k + 16);
            uint8_t *p = blk + (guard ? 8 : 0);
            memcpy(p, g->data + at, k);
            pp->blocks[pp->nblocks++] = blk;
            pp->pc[i][np++] = (rpc_piece){p, k};
            at += k;
        }
        g->data = NULL;
        g->pieces = pp->pc[i];
        g->npieces = np;
    }
}

static void piece_push_free(piece_push *pp) {
    for (int i = 0; i < pp->nblocks; i++) free(pp->blocks[i]);
    pp->nblocks = 0;
}

/* Pushes in pieces give, bit for bit, what the same pushes in one range
 * give: float32 and bfloat16; sync with 1, 2 (first contribution loaded,
 * the second added) and 3 workers (staged), and async; and a NaN in a value
 * cut between two pieces is refused with the same message (the same
 * element) and leaves the shard as it was. */
static void test_pushes_in_pieces(void **state) {
    fixture *f = *state;
    static const struct { int kind, workers, sync, dtype; } runs[] = {
        {PS_OPTIM_SGD, 1, PS_SYNC, PS_DTYPE_FLOAT32},
        {PS_OPTIM_SGD, 2, PS_SYNC, PS_DTYPE_FLOAT32},
        {PS_OPTIM_ADAM, 3, PS_SYNC, PS_DTYPE_FLOAT32},
        {PS_OPTIM_MOMENTUM, 2, PS_ASYNC, PS_DTYPE_FLOAT32},
        {PS_OPTIM_SGD, 2, PS_SYNC, PS_DTYPE_BFLOAT16},
        {PS_OPTIM_ADAM, 3, PS_SYNC, PS_DTYPE_BFLOAT16},
        {PS_OPTIM_SGD, 1, PS_ASYNC, PS_DTYPE_BFLOAT16},
    };
    size_t n = f->m->numel;
    uint64_t x = 0x853c49e6748fea9bull;
    static piece_push pp;
    for (size_t r = 0; r < sizeof runs / sizeof runs[0]; r++) {
        ps_shard *whole, *cut;
        assert_int_equal(ps_shard_create(f->m, f->pl, 0, &whole), CM_OK);
        assert_int_equal(ps_shard_create(f->m, f->pl, 0, &cut), CM_OK);
        ps_shard_config c = cfg_make(runs[r].kind, runs[r].workers, runs[r].sync, PS_AGG_MEAN);
        char err[256], err2[256];
        int64_t v;
        assert_int_equal(ps_shard_init(whole, &c, &v, err, sizeof err), CM_OK);
        assert_int_equal(ps_shard_init(cut, &c, &v, err, sizeof err), CM_OK);
        for (int64_t t = 0; t < 3; t++) {
            for (int w = 0; w < runs[r].workers; w++) {
                float g[MAXN];
                grad_fine(g, n, w, t);
                push_as(f, whole, w, t, g, runs[r].dtype);
                push_buf pb;
                push_make_as(f, g, runs[r].dtype, &pb);
                cut_into_pieces(&pb, &pp, (int)((r + (size_t)t) & 1), &x);
                int rc = ps_shard_push(cut, w, t, pb.g, pb.n, &v, err, sizeof err);
                piece_push_free(&pp);
                if (rc != PS_PUSH_OK)
                    fail_msg("run %zu: push in pieces of worker %d step %lld: %d %s", r, w,
                             (long long)t, rc, err);
            }
            float vw[MAXN], vc[MAXN];
            shard_values(f, whole, vw);
            shard_values(f, cut, vc);
            expect_same(vw, vc, n);
        }
        /* A NaN in a value cut in two (bytes 1-2 of the value in one piece,
         * the rest in the next), in the last partition, the same push whole. */
        float g[MAXN], before[MAXN], after[MAXN];
        grad_fine(g, n, 0, 3);
        push_buf pb;
        push_make_as(f, g, runs[r].dtype, &pb);
        int last = pb.n - 1;
        size_t es = runs[r].dtype == PS_DTYPE_BFLOAT16 ? 2 : 4;
        size_t elems = pb.g[last].len / es, bad = elems / 2;
        uint8_t nanbytes[4];
        float nan = NAN;
        memcpy(nanbytes, &nan, 4);
        memcpy((uint8_t *)pb.g[last].data + bad * es, nanbytes + (4 - es), es);
        int rw = ps_shard_push(whole, 0, 3, pb.g, pb.n, &v, err, sizeof err);
        shard_values(f, cut, before);
        /* Cut: the bad value's first byte ends a piece. */
        static rpc_piece three[MAXP + 1][3];
        push_buf pc = pb;
        for (int i = 0; i < pc.n; i++) {
            size_t len = pc.g[i].len, m = i == last ? bad * es + 1 : len / 2;
            three[i][0] = (rpc_piece){pc.g[i].data, m};
            three[i][1] = (rpc_piece){pc.g[i].data + m, 1};
            three[i][2] = (rpc_piece){pc.g[i].data + m + 1, len - m - 1};
            pc.g[i].data = NULL;
            pc.g[i].pieces = three[i];
            pc.g[i].npieces = 3;
        }
        int rcut = ps_shard_push(cut, 0, 3, pc.g, pc.n, &v, err2, sizeof err2);
        assert_int_equal(rw, PS_PUSH_INVALID);
        assert_int_equal(rcut, PS_PUSH_INVALID);
        assert_string_equal(err, err2);
        char want[64];
        snprintf(want, sizeof want, "nan at element %zu of %zu", bad, elems);
        if (!strstr(err2, want)) fail_msg("run %zu: '%s' does not say '%s'", r, err2, want);
        shard_values(f, cut, after);
        expect_same(before, after, n);
        ps_shard_destroy(whole);
        ps_shard_destroy(cut);
    }
}

/* Async: one step may come in several calls of other partitions (a client
 * splits a large push): each is taken, one version each, and gives what
 * one whole push gives; a retry of any call of the step, of an earlier
 * step, or of a step restored as taken (ps_shard_set_worker_steps) is a
 * duplicate and changes nothing. */
static void test_async_step_in_calls(void **state) {
    fixture *f = *state;
    size_t n = f->m->numel;
    ps_shard *whole, *cut;
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &whole), CM_OK);
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &cut), CM_OK);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 1, PS_ASYNC, PS_AGG_MEAN);
    char err[256] = "";
    int64_t v;
    assert_int_equal(ps_shard_init(whole, &c, &v, err, sizeof err), CM_OK);
    assert_int_equal(ps_shard_init(cut, &c, &v, err, sizeof err), CM_OK);
    float g[MAXN], vw[MAXN], vc[MAXN];
    push_buf pb;
    for (int64_t t = 0; t < 2; t++) {
        grad_fine(g, n, 0, t);
        push_as(f, whole, 0, t, g, PS_DTYPE_FLOAT32);
        push_make(f, g, &pb);
        assert_int_equal(ps_shard_push(cut, 0, t, pb.g, 1, &v, err, sizeof err), PS_PUSH_OK);
        assert_int_equal(v, 2 * t + 1);
        assert_int_equal(ps_shard_push(cut, 0, t, pb.g + 1, pb.n - 1, &v, err, sizeof err),
                         PS_PUSH_OK);
        assert_int_equal(v, 2 * t + 2);
        /* Retries of either call, and of the whole step. */
        assert_int_equal(ps_shard_push(cut, 0, t, pb.g, 1, &v, err, sizeof err),
                         PS_PUSH_DUPLICATE);
        assert_int_equal(ps_shard_push(cut, 0, t, pb.g + 1, pb.n - 1, &v, err, sizeof err),
                         PS_PUSH_DUPLICATE);
        assert_int_equal(ps_shard_push(cut, 0, t, pb.g, pb.n, &v, err, sizeof err),
                         PS_PUSH_DUPLICATE);
        shard_values(f, whole, vw);
        shard_values(f, cut, vc);
        expect_same(vw, vc, n);
    }
    /* An earlier step's call, even of a partition it did not give. */
    assert_int_equal(ps_shard_push(cut, 0, 0, pb.g + 1, 1, &v, err, sizeof err),
                     PS_PUSH_DUPLICATE);
    /* Step 2 restored as taken (a shard restarted from its checkpoint). */
    int64_t steps[1] = {2};
    ps_shard_set_worker_steps(cut, steps, 1);
    assert_int_equal(ps_shard_push(cut, 0, 2, pb.g, 1, &v, err, sizeof err), PS_PUSH_DUPLICATE);
    shard_values(f, cut, vc);
    expect_same(vw, vc, n);
    ps_shard_stats st;
    ps_shard_stats_get(cut, &st);
    assert_int_equal(st.version, 4);
    assert_int_equal(st.pushes, 4);
    assert_int_equal(st.duplicate_pushes, 8);
    assert_int_equal(st.updates_lost, 0);
    ps_shard_destroy(whole);
    ps_shard_destroy(cut);
}

static void poke_f32(push_buf *pb, int k, size_t j, uint32_t u);

/* ref -= LR * g on shard 0's partitions k0 .. k0 + nk - 1 (SGD, one
 * contribution: what an async push of them applies). */
static void sgd_parts(const fixture *f, float *ref, const float *g, int k0, int nk) {
    for (int k = k0; k < k0 + nk; k++) {
        const cm_partition *p = &f->pl->parts[f->parts[k]];
        for (size_t i = p->offset; i < p->offset + p->count; i++) ref[i] = ref[i] - LR * g[i];
    }
}

/* Async, a step in several calls that say so (step_parts): each call is
 * applied as it comes, in either order, and the version goes up once, with
 * the call that completes the step; another worker's whole push between
 * two calls bumps it as usual; retries are duplicates; a snapshot held
 * across a call stays as it was; the values are exact. The worker's step
 * counts (ps_shard_worker_steps) once all its calls are in, so a worker
 * started again between two calls pushes the step again and only the
 * missing calls are taken. */
static void test_async_step_parts_one_version(void **state) {
    fixture *f = *state;
    size_t n = f->m->numel;
    int P = f->nparts;
    assert_true(P >= 2);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_ASYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    char err[256] = "";
    int64_t v = -1, want = 0;
    float g0[MAXN], g1[MAXN], ref[MAXN], got[MAXN], held0[MAXN], held1[MAXN];
    initial(f, ref);
    for (int64_t t = 0; t < 2; t++) {
        push_buf pb;
        grad_fill(g0, n, 0, t);
        grad_fill(g1, n, 1, t);
        push_make(f, g0, &pb);
        /* Step 0: the first partition, then the others; step 1 the other
         * way round. */
        int ka = t == 0 ? 0 : 1, na = t == 0 ? 1 : P - 1;
        int kb = t == 0 ? 1 : 0, nb = t == 0 ? P - 1 : 1;
        ps_snapshot *held = pull_now(f->s, 0);
        values_of(f, held, held0);
        assert_int_equal(ps_shard_push_step(f->s, 0, t, P, pb.g + ka, na, NULL, 0, 0, &v, err,
                                            sizeof err),
                         PS_PUSH_OK);
        assert_int_equal(v, want); /* Applied, not a version yet. */
        int64_t steps[2];
        assert_int_equal(ps_shard_worker_steps(f->s, steps, 2), 2);
        assert_int_equal(steps[0], t - 1); /* Not complete yet. */
        sgd_parts(f, ref, g0, ka, na);
        assert_int_equal(values(f, got), want);
        expect_same(ref, got, n);
        values_of(f, held, held1);
        expect_same(held0, held1, n);
        assert_int_equal(ps_snapshot_version(held), want);
        ps_snapshot_unref(held);
        /* A retry of that call. */
        assert_int_equal(ps_shard_push_step(f->s, 0, t, P, pb.g + ka, na, NULL, 0, 0, &v, err,
                                            sizeof err),
                         PS_PUSH_DUPLICATE);
        assert_int_equal(v, want);
        /* Worker 1's whole step in between: a version of its own. */
        push_buf pb1;
        push_make(f, g1, &pb1);
        assert_int_equal(ps_shard_push(f->s, 1, t, pb1.g, pb1.n, &v, err, sizeof err),
                         PS_PUSH_OK);
        assert_int_equal(v, ++want);
        sgd_parts(f, ref, g1, 0, P);
        /* The last call: the step's version. */
        assert_int_equal(ps_shard_push_step(f->s, 0, t, P, pb.g + kb, nb, NULL, 0, 0, &v, err,
                                            sizeof err),
                         PS_PUSH_OK);
        assert_int_equal(v, ++want);
        sgd_parts(f, ref, g0, kb, nb);
        assert_int_equal(ps_shard_worker_steps(f->s, steps, 2), 2);
        assert_int_equal(steps[0], t);
        assert_int_equal(ps_shard_push_step(f->s, 0, t, P, pb.g + kb, nb, NULL, 0, 0, &v, err,
                                            sizeof err),
                         PS_PUSH_DUPLICATE);
        assert_int_equal(v, want);
        assert_int_equal(values(f, got), want);
        expect_same(ref, got, n);
    }
    /* Worker 0 dies after the first call of step 2 and, started again
     * after its last complete step (1), pushes step 2 again in the same
     * calls: the first is a duplicate, the second completes the step. */
    push_buf pb;
    grad_fill(g0, n, 0, 2);
    push_make(f, g0, &pb);
    assert_int_equal(ps_shard_push_step(f->s, 0, 2, P, pb.g, 1, NULL, 0, 0, &v, err, sizeof err),
                     PS_PUSH_OK);
    sgd_parts(f, ref, g0, 0, 1);
    int64_t steps[2];
    assert_int_equal(ps_shard_worker_steps(f->s, steps, 2), 2);
    assert_int_equal(steps[0], 1);
    assert_int_equal(ps_shard_push_step(f->s, 0, 2, P, pb.g, 1, NULL, 0, 0, &v, err, sizeof err),
                     PS_PUSH_DUPLICATE);
    assert_int_equal(ps_shard_push_step(f->s, 0, 2, P, pb.g + 1, P - 1, NULL, 0, 0, &v, err,
                                        sizeof err),
                     PS_PUSH_OK);
    assert_int_equal(v, ++want);
    sgd_parts(f, ref, g0, 1, P - 1);
    assert_int_equal(values(f, got), want);
    expect_same(ref, got, n);
    assert_int_equal(ps_shard_worker_steps(f->s, steps, 2), 2);
    assert_int_equal(steps[0], 2);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.version, 5);
    assert_int_equal(st.pushes, 8);
    assert_int_equal(st.duplicate_pushes, 5);
    assert_int_equal(st.bad_requests, 0);
    assert_int_equal(st.min_worker_step, 1);
}

/* step_parts that cannot be: below the call's partitions, above the
 * shard's, or exceeded by the step's calls (with rows: test_rows_async);
 * each refused with a message, the shard unchanged. A step's last call dropped for a NaN
 * (skip_nonfinite) still ends the step: its version comes. */
static void test_async_step_parts_refused(void **state) {
    fixture *f = *state;
    size_t n = f->m->numel;
    int P = f->nparts;
    assert_true(P >= 2);
    ps_shard_set_skip_nonfinite(f->s, 1);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 1, PS_ASYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    char err[256] = "";
    int64_t v = -1;
    float g[MAXN], ref[MAXN], got[MAXN];
    initial(f, ref);
    grad_fill(g, n, 0, 0);
    push_buf pb;
    push_make(f, g, &pb);
    const struct {
        int step_parts, first, count;
        const char *says;
    } bad[] = {{1, 0, 2, "out of range"}, {P + 1, 0, 1, "out of range"}, {-1, 0, 1,
                                                                           "out of range"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        assert_int_equal(ps_shard_push_step(f->s, 0, 0, bad[i].step_parts, pb.g + bad[i].first,
                                            bad[i].count, NULL, 0, 0, &v, err, sizeof err),
                         PS_PUSH_INVALID);
        if (!strstr(err, bad[i].says)) fail_msg("step_parts %d: '%s'", bad[i].step_parts, err);
    }
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.version, 0);
    assert_int_equal(st.bad_requests, 3);
    assert_int_equal(st.pushes, 0);
    /* A step that says 1 partition (the call completes it), then brings
     * another: refused, nothing of it applied. */
    assert_int_equal(ps_shard_push_step(f->s, 0, 0, 1, pb.g, 1, NULL, 0, 0, &v, err,
                                        sizeof err),
                     PS_PUSH_OK);
    assert_int_equal(v, 1);
    sgd_parts(f, ref, g, 0, 1);
    err[0] = 0;
    assert_int_equal(ps_shard_push_step(f->s, 0, 0, 1, pb.g + 1, 1, NULL, 0, 0, &v, err,
                                        sizeof err),
                     PS_PUSH_INVALID);
    if (!strstr(err, "more than their step_parts")) fail_msg("'%s'", err);
    own_only(f, ref);
    assert_int_equal(values(f, got), 1);
    expect_same(ref, got, n);
    /* Step 1 in two calls, the last with a NaN: dropped, and the step's
     * version comes all the same; the first call's values stay. */
    int64_t before = 1;
    grad_fill(g, n, 0, 1);
    push_make(f, g, &pb);
    assert_int_equal(ps_shard_push_step(f->s, 0, 1, P, pb.g, 1, NULL, 0, 0, &v, err,
                                        sizeof err),
                     PS_PUSH_OK);
    assert_int_equal(v, before);
    sgd_parts(f, ref, g, 0, 1);
    poke_f32(&pb, 1, 0, 0x7fc00000u);
    assert_int_equal(ps_shard_push_step(f->s, 0, 1, P, pb.g + 1, P - 1, NULL, 0, 0, &v, err,
                                        sizeof err),
                     PS_PUSH_OK);
    assert_int_equal(v, before + 1);
    assert_int_equal(values(f, got), before + 1);
    expect_same(ref, got, n);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.nonfinite_pushes, 1);
    assert_int_equal(st.bad_requests, 4);
}

/* ===== Shutdown ===== */

static void test_abort_waiters(void **state) {
    fixture *f = *state;
    catcher before_init, later, after;
    catcher_init(&before_init);
    catcher_init(&later);
    catcher_init(&after);
    ps_shard_pull(f->s, 0, catch_cb, &before_init);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    assert_int_equal(catcher_calls(&before_init), 1);
    ps_shard_pull(f->s, 5, catch_cb, &later);
    ps_shard_pull(f->s, 9, catch_cb, &after);
    assert_int_equal(catcher_calls(&later), 0);

    ps_shard_abort_waiters(f->s);
    assert_int_equal(catcher_calls(&later), 1);
    assert_int_equal(later.nulls, 1);
    assert_int_equal(catcher_calls(&after), 1);
    assert_int_equal(after.nulls, 1);

    /* Later pulls fail at once, even for a version that exists. */
    catcher now;
    catcher_init(&now);
    ps_shard_pull(f->s, 0, catch_cb, &now);
    assert_int_equal(catcher_calls(&now), 1);
    assert_int_equal(now.nulls, 1);
    ps_shard_pull(f->s, 100, catch_cb, &now);
    assert_int_equal(catcher_calls(&now), 2);
    assert_int_equal(now.nulls, 2);

    /* Pushes that create versions do not answer anyone twice. */
    int64_t v;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(catcher_calls(&later), 1);
    assert_int_equal(catcher_calls(&before_init), 1);
    ps_shard_abort_waiters(f->s); /* Idempotent. */
    assert_int_equal(catcher_calls(&after), 1);
    catcher_deinit(&before_init);
    catcher_deinit(&later);
    catcher_deinit(&after);
    catcher_deinit(&now);
}

static void test_destroy_answers_waiters(void **state) {
    fixture *f = *state;
    ps_shard *s = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 1, &s), CM_OK);
    catcher a, b;
    catcher_init(&a);
    catcher_init(&b);
    ps_shard_pull(s, 0, catch_cb, &a); /* Not initialised: waits. */
    ps_shard_pull(s, 3, catch_cb, &b);
    ps_shard_destroy(s);
    assert_int_equal(catcher_calls(&a), 1);
    assert_int_equal(a.nulls, 1);
    assert_int_equal(catcher_calls(&b), 1);
    assert_int_equal(b.nulls, 1);
    catcher_deinit(&a);
    catcher_deinit(&b);
}

/* ps_shard.c keeps snapshot buffers in a pool that "outlives the shard if
 * replies still reference snapshots when the shard is destroyed": a
 * snapshot held past ps_shard_destroy must stay readable. */
static void test_snapshot_outlives_shard(void **state) {
    fixture *f = *state;
    ps_shard *s = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &s), CM_OK);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 1, PS_SYNC, PS_AGG_MEAN);
    char err[256];
    int64_t v;
    assert_int_equal(ps_shard_init(s, &c, &v, err, sizeof err), CM_OK);
    ps_snapshot *snap = pull_now(s, 0);
    float want[MAXN];
    initial(f, want);
    ps_shard_destroy(s);
    assert_int_equal(ps_snapshot_version(snap), 0);
    for (int i = 0; i < f->nparts; i++) {
        const cm_partition *p = &f->pl->parts[f->parts[i]];
        expect_same(want + p->offset, ps_snapshot_part(snap, i), p->count);
    }
    ps_snapshot_unref(snap);
}

/* ===== Concurrency ===== */

#define NTHREADS 4
#define NSTEPS 300

typedef struct worker_arg {
    fixture *f;
    int rank;
    int failures;
} worker_arg;

static void *worker_main(void *p) {
    worker_arg *a = p;
    for (int64_t t = 0; t < NSTEPS; t++) {
        /* Wait for version t (pulls answered from other threads). */
        catcher c;
        catcher_init(&c);
        ps_shard_pull(a->f->s, t, catch_cb, &c);
        pthread_mutex_lock(&c.mu);
        while (c.calls == 0) pthread_cond_wait(&c.cv, &c.mu);
        pthread_mutex_unlock(&c.mu);
        CHECK(c.nulls == 0 && ps_snapshot_version(c.snap) >= t);
        catcher_deinit(&c);
        int64_t v;
        int rc = push_step(a->f, a->rank, t, &v);
        if (rc != PS_PUSH_OK) a->failures++;
        /* A retry is always a duplicate, never a second contribution. */
        if (t % 7 == a->rank && push_step(a->f, a->rank, t, &v) != PS_PUSH_DUPLICATE)
            a->failures++;
    }
    return NULL;
}

static void test_concurrent_sync_pushes(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, NTHREADS, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    pthread_t th[NTHREADS];
    worker_arg args[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        args[i] = (worker_arg){.f = f, .rank = i};
        assert_int_equal(pthread_create(&th[i], NULL, worker_main, &args[i]), 0);
    }
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(args[i].failures, 0);
    }

    float ref[MAXN], got[MAXN];
    initial(f, ref);
    for (int64_t t = 0; t < NSTEPS; t++) ref_sgd_mean(f, ref, NTHREADS, t);
    assert_int_equal(values(f, got), NSTEPS);
    expect_same(ref, got, f->m->numel);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.version, NSTEPS);
    assert_int_equal(st.pushes, (uint64_t)NTHREADS * NSTEPS);
    assert_int_equal(st.stale_pushes, 0);
    assert_int_equal(st.early_pushes, 0);
    assert_int_equal(st.bad_requests, 0);
    uint64_t dups = 0;
    for (int64_t t = 0; t < NSTEPS; t++) dups += t % 7 < NTHREADS;
    assert_int_equal(st.duplicate_pushes, dups);
}

/* ===== Partial pushes (overlap) ===== */

/* Push partitions [lo, hi) of shard 0 with (worker, step)'s gradient. */
static int push_range(fixture *f, ps_shard *s, int worker, int64_t step, int lo, int hi,
                      int64_t *version) {
    float g[MAXN];
    push_buf pb;
    char err[256] = "";
    grad_fill(g, f->m->numel, worker, step);
    push_make(f, g, &pb);
    int rc = ps_shard_push(s, worker, step, pb.g + lo, hi - lo, version, err, sizeof err);
    if (rc < 0) fprintf(stderr, "push_range: %s\n", err);
    return rc;
}

/* Sync Adam, 2 workers: worker 0 sends each step in two pieces, worker 1 in
 * two other pieces. A partition reply comes as soon as its partitions have
 * both contributions, before the version is published, with the values a
 * shard fed whole pushes reaches; the end state is bit-for-bit the same. */
static void test_partial_pushes_sync(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_ADAM, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    ps_shard *ref = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &ref), CM_OK);
    char err[256];
    int64_t v;
    assert_int_equal(ps_shard_init(ref, &c, &v, err, sizeof err), CM_OK);
    int n = f->nparts, h = n / 2;
    for (int64_t t = 0; t < 3; t++) {
        /* The reference: whole pushes. */
        for (int w = 0; w < 2; w++) assert_int_equal(push_range(f, ref, w, t, 0, n, &v), 0);
        assert_int_equal(v, t + 1);
        float want[MAXN], got[MAXN];
        ps_snapshot *rs = pull_now(ref, t + 1);
        values_of(f, rs, want);
        ps_snapshot_unref(rs);

        assert_int_equal(push_range(f, f->s, 0, t, 0, h, &v), PS_PUSH_OK);
        assert_int_equal(push_range(f, f->s, 0, t, 0, h, &v), PS_PUSH_DUPLICATE);
        catcher early;
        catcher_init(&early);
        early.shard = f->s;
        assert_int_equal(ps_shard_pull_parts(f->s, t, f->parts, h, catch_cb, &early), CM_OK);
        assert_int_equal(catcher_calls(&early), 0);
        /* Worker 1 gives partition 0 only, then the rest: the first h
         * partitions complete with that second push. */
        assert_int_equal(push_range(f, f->s, 1, t, 0, 1, &v), PS_PUSH_OK);
        assert_int_equal(catcher_calls(&early), h == 1 ? 1 : 0);
        assert_int_equal(push_range(f, f->s, 1, t, 1, n, &v), PS_PUSH_OK);
        assert_int_equal(v, t);
        assert_int_equal(catcher_calls(&early), 1);
        assert_int_equal(early.seen_version, t); /* Answered before the bump. */
        assert_int_equal(ps_snapshot_version(early.snap), t + 1);
        for (int i = 0; i < h; i++) {
            const cm_partition *p = &f->pl->parts[f->parts[i]];
            expect_same(want + p->offset, ps_snapshot_part(early.snap, i), p->count);
        }
        /* A waiter for the rest, then worker 0's second piece (which also
         * repeats partition 0: not counted again) publishes t + 1. */
        catcher late;
        catcher_init(&late);
        assert_int_equal(ps_shard_pull_parts(f->s, t, f->parts + h, n - h, catch_cb, &late),
                         CM_OK);
        assert_int_equal(catcher_calls(&late), 0);
        assert_int_equal(push_range(f, f->s, 0, t, 0, n, &v), PS_PUSH_OK);
        assert_int_equal(v, t + 1);
        assert_int_equal(catcher_calls(&late), 1);
        assert_int_equal(values(f, got), t + 1);
        expect_same(want, got, f->m->numel);
        /* The early reply's partitions never changed after it was sent. */
        for (int i = 0; i < h; i++) {
            const cm_partition *p = &f->pl->parts[f->parts[i]];
            expect_same(want + p->offset, ps_snapshot_part(early.snap, i), p->count);
        }
        /* A retry of an earlier piece is a duplicate, and a partition pull
         * for a finished step is answered at once. */
        assert_int_equal(push_range(f, f->s, 1, t, 0, 1, &v), PS_PUSH_DUPLICATE);
        catcher again;
        catcher_init(&again);
        assert_int_equal(ps_shard_pull_parts(f->s, t, f->parts, 1, catch_cb, &again), CM_OK);
        assert_int_equal(again.calls, 1);
        catcher_deinit(&again);
        catcher_deinit(&early);
        catcher_deinit(&late);
    }
    /* A partition of the other shard is refused. */
    uint32_t other = 0;
    for (int i = 0; i < f->pl->nparts; i++)
        if (f->pl->parts[i].shard == 1) other = (uint32_t)i;
    catcher bad;
    catcher_init(&bad);
    assert_int_equal(ps_shard_pull_parts(f->s, 0, &other, 1, catch_cb, &bad), CM_EINVAL);
    assert_int_equal(ps_shard_pull_parts(f->s, 0, f->parts, 0, catch_cb, &bad), CM_EINVAL);
    assert_int_equal(bad.calls, 0);
    catcher_deinit(&bad);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.pushes, 3 * 4);
    assert_int_equal(st.duplicate_pushes, 3 * 2);
    ps_shard_destroy(ref);
}

/* A partition waiter still waiting at shutdown is answered with NULL. */
static void test_partial_waiter_aborted(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v;
    assert_int_equal(push_range(f, f->s, 0, 0, 0, 1, &v), PS_PUSH_OK);
    catcher w;
    catcher_init(&w);
    assert_int_equal(ps_shard_pull_parts(f->s, 0, f->parts, 1, catch_cb, &w), CM_OK);
    assert_int_equal(w.calls, 0);
    ps_shard_abort_waiters(f->s);
    assert_int_equal(w.calls, 1);
    assert_int_equal(w.nulls, 1);
    catcher_deinit(&w);
}

/* Async: a push of some partitions applies them at once and bumps the
 * version; the others keep their values. */
static void test_partial_push_async(void **state) {
    fixture *f = *state;
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_ASYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    float before[MAXN], after[MAXN], g[MAXN];
    assert_int_equal(values(f, before), 0);
    int64_t v;
    assert_int_equal(push_range(f, f->s, 1, 0, 1, 2, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
    assert_int_equal(values(f, after), 1);
    grad_fill(g, f->m->numel, 1, 0);
    for (int i = 0; i < f->nparts; i++) {
        const cm_partition *p = &f->pl->parts[f->parts[i]];
        for (size_t e = 0; e < p->count; e++) {
            float want = before[p->offset + e];
            if (i == 1) want = want - LR * g[p->offset + e];
            expect_same(&want, &after[p->offset + e], 1);
        }
    }
}


/* ===== Checkpoint hook and restore ===== */

/* What the publish hook saw last: a snapshot reference and a slots copy. */
typedef struct hook_rec {
    int calls;
    int64_t versions[8];
    ps_snapshot *snap;
    float slots[2 * MAXN];
    int nslots;
    size_t numel; /* Set before: the slots' stride. */
    ps_shard_config cfg;
    int64_t wsteps[4]; /* The workers' last steps at the last call. */
} hook_rec;

/* A snapshot of shard s as its flat array (what a checkpoint keeps). */
static void snapshot_flat(const ps_shard *s, const ps_snapshot *snap, float *flat) {
    int nparts;
    ps_shard_parts(s, &nparts);
    for (int i = 0; i < nparts; i++)
        memcpy(flat + ps_shard_part_offset(s, i), ps_snapshot_part(snap, i),
               (ps_shard_part_offset(s, i + 1) - ps_shard_part_offset(s, i)) * sizeof(float));
}

static int rec_hook(void *ud, ps_snapshot *snap, const float *slots, int nslots,
                     const ps_shard_config *cfg,
                     ps_rows *rows, const int64_t *worker_steps) {
    hook_rec *r = ud;
    CHECK(rows == NULL); /* A model without tables. */
    CHECK(r->calls < 8);
    r->versions[r->calls++] = ps_snapshot_version(snap);
    ps_snapshot_unref(r->snap);
    ps_snapshot_ref(snap);
    r->snap = snap;
    r->nslots = nslots;
    r->cfg = *cfg;
    CHECK(slots != NULL && nslots == 2);
    memcpy(r->slots, slots, (size_t)nslots * r->numel * sizeof(float));
    CHECK(cfg->num_workers <= 4);
    memcpy(r->wsteps, worker_steps, (size_t)cfg->num_workers * sizeof *worker_steps);
    return 0;
}

/* Synchronous checkpoints: the hook's version freezes the shard (pushes
 * get PS_PUSH_BUSY and change nothing) until it is thawed. */
static int freeze_hook_calls;
static int count_hook(void *ud, ps_snapshot *snap, const float *slots, int nslots,
                      const ps_shard_config *cfg, ps_rows *rows,
                      const int64_t *worker_steps) {
    (void)ud, (void)snap, (void)slots, (void)nslots, (void)cfg, (void)rows, (void)worker_steps;
    freeze_hook_calls++;
    return 1; /* Freeze. */
}

static void test_checkpoint_freeze(void **state) {
    fixture *f = *state;
    freeze_hook_calls = 0;
    ps_shard_set_publish_hook(f->s, 2, count_hook, NULL);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 1, PS_ASYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v = -1;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 0, 1, &v), PS_PUSH_OK); /* Version 2: the hook, frozen. */
    assert_int_equal(v, 2);
    assert_int_equal(freeze_hook_calls, 1);
    float before[MAXN], after[MAXN];
    assert_int_equal(values(f, before), 2);
    assert_int_equal(push_step(f, 0, 2, &v), PS_PUSH_BUSY);
    assert_int_equal(values(f, after), 2); /* Nothing taken. */
    expect_same(before, after, f->m->numel);
    ps_shard_thaw(f->s);
    assert_int_equal(push_step(f, 0, 2, &v), PS_PUSH_OK); /* The same push, again. */
    assert_int_equal(v, 3);
    /* publish_now calls the hook but freezes nothing. */
    assert_int_equal(ps_shard_publish_now(f->s), 1);
    assert_int_equal(freeze_hook_calls, 2);
    assert_int_equal(push_step(f, 0, 3, &v), PS_PUSH_OK);
    ps_shard_set_publish_hook(f->s, 0, NULL, NULL);
}

static void test_checkpoint_hook_and_restore(void **state) {
    fixture *f = *state;
    static hook_rec r;
    memset(&r, 0, sizeof r);
    r.numel = ps_shard_numel(f->s);
    ps_shard_set_publish_hook(f->s, 2, rec_hook, &r);
    ps_shard_config c = cfg_make(PS_OPTIM_ADAM, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    assert_int_equal(r.calls, 0); /* Not for version 0. */
    int64_t v = -1;
    for (int64_t t = 0; t < 5; t++) {
        assert_int_equal(push_step(f, 0, t, &v), PS_PUSH_OK);
        assert_int_equal(push_step(f, 1, t, &v), PS_PUSH_OK);
    }
    assert_int_equal(v, 5);
    assert_int_equal(r.calls, 2);
    assert_int_equal(r.versions[0], 2);
    assert_int_equal(r.versions[1], 4);
    assert_int_equal(ps_snapshot_version(r.snap), 4);

    /* A fresh shard restored from version 4, and the original shard rolled
     * forward the same way: both must then compute version 5 bit for bit. */
    size_t numel = ps_shard_numel(f->s);
    float params[MAXN];
    snapshot_flat(f->s, r.snap, params);
    ps_shard *orig = f->s;
    ps_shard *fresh = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &fresh), CM_OK);
    assert_int_equal(ps_shard_numel(fresh), numel);
    char err[256] = "";
    ps_shard_config bad = c;
    bad.num_workers = 0;
    assert_int_equal(ps_shard_restore(fresh, &bad, 4, params, r.slots, err, sizeof err),
                     CM_EINVAL);
    assert_int_equal(ps_shard_restore(fresh, &r.cfg, 4, params, r.slots, err, sizeof err), CM_OK);
    assert_int_equal(ps_shard_restore(fresh, &r.cfg, 4, params, r.slots, err, sizeof err),
                     CM_EBUSY);
    /* Restored: initialised with that config at version 4. */
    assert_int_equal(ps_shard_init(fresh, &c, &v, err, sizeof err), CM_OK);
    assert_int_equal(v, 4);
    ps_shard_config other = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    assert_int_equal(ps_shard_init(fresh, &other, &v, err, sizeof err), CM_EBUSY);
    float want[MAXN], got[MAXN];
    f->s = fresh;
    assert_int_equal(values(f, got), 4);
    values_of(f, r.snap, want);
    expect_same(want, got, f->m->numel);
    /* Step 4 on the restored shard gives the original's version 5. */
    assert_int_equal(push_step(f, 0, 4, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 1, 4, &v), PS_PUSH_OK);
    assert_int_equal(v, 5);
    assert_int_equal(values(f, got), 5);
    f->s = orig;
    assert_int_equal(values(f, want), 5);
    expect_same(want, got, f->m->numel);

    /* The same restore with buffers handed over instead of copied. */
    ps_shard *adopted = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &adopted), CM_OK);
    float *own_p = cm_alloc_aligned(numel * sizeof(float));
    float *own_s = cm_alloc_aligned(2 * numel * sizeof(float));
    assert_non_null(own_p);
    assert_non_null(own_s);
    memcpy(own_p, params, numel * sizeof(float));
    memcpy(own_s, r.slots, 2 * numel * sizeof(float));
    assert_int_equal(ps_shard_restore_owned(adopted, &bad, 4, own_p, own_s, err, sizeof err),
                     CM_EINVAL); /* Still ours. */
    assert_int_equal(ps_shard_restore_owned(adopted, &r.cfg, 4, own_p, own_s, err, sizeof err),
                     CM_OK);
    f->s = adopted;
    assert_int_equal(push_step(f, 0, 4, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 1, 4, &v), PS_PUSH_OK);
    assert_int_equal(values(f, got), 5);
    expect_same(want, got, f->m->numel);
    f->s = orig;
    ps_shard_destroy(adopted);
    ps_snapshot_unref(r.snap);
    ps_shard_destroy(fresh);
}

/* Async: the hook gets each worker's last step at the checkpoint's version;
 * a rollback forgets them (the pushes after it would be taken again) and
 * ps_shard_set_worker_steps brings them back: those steps are duplicates,
 * the next ones are taken, and the positions read back are the hook's. A
 * gap in a worker's steps counts as updates lost. */
static void test_checkpoint_worker_steps(void **state) {
    fixture *f = *state;
    static hook_rec r;
    memset(&r, 0, sizeof r);
    r.numel = ps_shard_numel(f->s);
    ps_shard_set_publish_hook(f->s, 2, rec_hook, &r);
    ps_shard_config c = cfg_make(PS_OPTIM_ADAM, 2, PS_ASYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v = -1, got[4];
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK); /* Version 2. */
    assert_int_equal(push_step(f, 0, 1, &v), PS_PUSH_OK);
    assert_int_equal(push_step(f, 0, 2, &v), PS_PUSH_OK); /* Version 4. */
    assert_int_equal(push_step(f, 0, 3, &v), PS_PUSH_OK);
    assert_int_equal(v, 5);
    assert_int_equal(r.calls, 2);
    assert_int_equal(r.versions[1], 4);
    assert_int_equal(r.wsteps[0], 2);
    assert_int_equal(r.wsteps[1], 0);
    float params[MAXN];
    snapshot_flat(f->s, r.snap, params);
    char err[256] = "";
    assert_int_equal(ps_shard_rollback(f->s, 4, params, r.slots, err, sizeof err), CM_OK);
    assert_int_equal(ps_shard_worker_steps(f->s, got, 4), 2);
    assert_int_equal(got[0], -1); /* Forgotten by the rollback... */
    ps_shard_set_worker_steps(f->s, r.wsteps, 2);
    assert_int_equal(ps_shard_worker_steps(f->s, got, 4), 2);
    assert_int_equal(got[0], 2); /* ...and back. */
    assert_int_equal(got[1], 0);
    assert_int_equal(push_step(f, 0, 2, &v), PS_PUSH_DUPLICATE);
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_DUPLICATE);
    assert_int_equal(push_step(f, 0, 3, &v), PS_PUSH_OK);
    assert_int_equal(v, 5);
    assert_int_equal(push_step(f, 1, 1, &v), PS_PUSH_OK);
    assert_int_equal(v, 6);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.updates_lost, 0); /* Consecutive steps: nothing lost. */
    /* Worker 1 resumes at step 4: its steps 2 and 3 (taken by a rollback,
     * say) are counted as lost. */
    assert_int_equal(push_step(f, 1, 4, &v), PS_PUSH_OK);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.updates_lost, 2);
    ps_shard_set_publish_hook(f->s, 0, NULL, NULL);
    ps_snapshot_unref(r.snap);
}

/* ===== Rows of embedding tables =====
 *
 * The rows fixture: tables emb_a (dim 4), emb_b (dim 2) and emb_c (dim 7)
 * between dense w [6,3] and b [3], placed on 2 shards with a 16-byte
 * minimum partition (w is split); shard 0 is driven. Row gradients are
 * multiples of 1/16 in [-0.5, 0.5] (exact in bfloat16). The reference for
 * rows is a ps_rows store of the same model, optimizer and seed, given per
 * (table, id) the workers' gradients summed in rank order (each worker's in
 * the order it pushed them) and scaled as the shard scales them (mean: 1/W).
 */

#define RDIM 8 /* Widest row of the rows fixture. */
#define MAXE 64 /* Row entries of one push, at most. */
static const int rdims[NTAB] = {4, 2, 7};

static int rx_setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    cm_var v[5];
    memset(v, 0, sizeof v);
    const char *names[5] = {"emb_a", "w", "emb_b", "b", "emb_c"};
    for (int i = 0; i < 5; i++) snprintf(v[i].name, sizeof v[i].name, "%s", names[i]);
    for (int t = 0, i = 0; i < 5; i += 2, t++) {
        v[i].kind = CM_VAR_TABLE;
        v[i].dim = rdims[t];
        v[i].init = CM_INIT_UNIFORM;
        v[i].init_scale = 0.125f;
    }
    v[1] = (cm_var){.kind = CM_VAR_DENSE, .ndims = 2, .dims = {6, 3},
                    .init = CM_INIT_GLOROT_UNIFORM, .fan_in = 6, .fan_out = 3};
    snprintf(v[1].name, sizeof v[1].name, "w");
    v[3] = (cm_var){.kind = CM_VAR_DENSE, .ndims = 1, .dims = {3}, .init = CM_INIT_ZERO};
    snprintf(v[3].name, sizeof v[3].name, "b");
    char err[256] = "";
    if (cm_model_create_from_vars("rows", v, 5, &f->m, err, sizeof err) != CM_OK)
        fail_msg("%s", err);
    assert_int_equal(f->m->ntables, NTAB);
    assert_int_equal(cm_model_max_dim(f->m), 7);
    assert_int_equal(cm_placement_create(f->m, 2, 16, &f->pl), CM_OK);
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &f->s), CM_OK);
    f->parts = ps_shard_parts(f->s, &f->nparts);
    assert_true(f->nparts >= 2 && f->nparts <= MAXP);
    for (int t = 0; t < NTAB; t++) {
        assert_int_equal(ps_shard_row_dim(f->s, (uint32_t)t), rdims[t]);
        int k = 0, o = 0;
        for (uint64_t id = 0; k < NRID || o < 4; id++) {
            int sh = cm_row_shard(t, id, 2);
            if (sh == 0 && k < NRID) f->rid[t][k++] = id;
            if (sh == 1 && o < 4) f->other[t][o++] = id;
        }
    }
    assert_int_equal(ps_shard_row_dim(f->s, NTAB), -1);
    *state = f;
    return 0;
}

/* One row gradient entry of a push. */
typedef struct rent {
    uint32_t t;
    uint64_t id;
    float g[RDIM];
} rent;

/* A worker's entries, in push order. */
typedef struct rlist {
    rent e[MAXE];
    int n;
} rlist;

static void rlist_add(rlist *l, uint32_t t, uint64_t id, const float *g) {
    CHECK(l->n < MAXE);
    rent *e = &l->e[l->n++];
    memset(e, 0, sizeof *e);
    e->t = t;
    e->id = id;
    memcpy(e->g, g, (size_t)rdims[t] * sizeof(float));
}

/* The deterministic row gradients of (worker, step): for every table five
 * of its first 24 shard-0 ids, overlapping between workers and steps, and
 * table 0's first id once more at the end (a repeat within a push). */
static void rlist_fill(const fixture *f, rlist *l, int worker, int64_t step) {
    l->n = 0;
    for (uint32_t t = 0; t < NTAB; t++)
        for (int i = 0; i < 5; i++) {
            uint64_t id = f->rid[t][(size_t)(worker * 3 + step * 5 + i * 4) % 24];
            float g[RDIM];
            for (int j = 0; j < rdims[t]; j++)
                g[j] = (float)((int)((id * 3 + (uint64_t)j * 5 + (uint64_t)worker * 7 +
                                      (uint64_t)step * 11 + t * 13) % 17) - 8) / 16.0f;
            rlist_add(l, t, id, g);
        }
    rlist_add(l, 0, l->e[0].id, l->e[1].g);
}

/* A list as ps_row_grads: one per run of entries of one table, data copied
 * to odd addresses, float32 or bfloat16. */
typedef struct rows_buf {
    ps_row_grad r[MAXE];
    uint64_t ids[MAXE];
    uint8_t raw[1 + MAXE * RDIM * 4 + 64];
    int n;
} rows_buf;

static void rows_make(const rlist *l, int dtype, rows_buf *rb) {
    memset(rb, 0, sizeof *rb);
    size_t off = 1, vsize = dtype == PS_DTYPE_BFLOAT16 ? 2 : 4;
    for (int i = 0; i < l->n; i++) {
        const rent *e = &l->e[i];
        size_t len = (size_t)rdims[e->t] * vsize;
        if (dtype == PS_DTYPE_BFLOAT16) {
            uint16_t h[RDIM];
            ps_wire_bf16_from_f32(h, e->g, (size_t)rdims[e->t]);
            memcpy(rb->raw + off, h, len);
        } else {
            memcpy(rb->raw + off, e->g, len);
        }
        rb->ids[i] = e->id;
        if (rb->n > 0 && rb->r[rb->n - 1].table == e->t) {
            rb->r[rb->n - 1].n++;
            rb->r[rb->n - 1].len += len;
        } else {
            rb->r[rb->n++] = (ps_row_grad){.table = e->t, .ids = &rb->ids[i], .n = 1,
                                          .dtype = dtype, .data = rb->raw + off, .len = len};
        }
        off += len;
    }
}

/* Push worker w's step: the first 'ndense' partitions of its dense
 * gradient (-1: every one) and its rows 'l' (NULL: none) as 'dtype',
 * rows_final as given. */
static int push_rows_as(fixture *f, ps_shard *s, int w, int64_t step, int ndense,
                        const rlist *l, int dtype, int final, int64_t *version, char *err,
                        size_t errlen) {
    float g[MAXN];
    push_buf pb;
    rows_buf rb;
    grad_fill(g, f->m->numel, w, step);
    push_make(f, g, &pb);
    rows_make(l ? l : &(rlist){.n = 0}, dtype, &rb);
    return ps_shard_push_rows(s, w, step, pb.g, ndense < 0 ? pb.n : ndense, rb.r, rb.n, final,
                              version, err, errlen);
}

/* The same, float32 rows and every partition (dense) or none. */
static int push_rows(fixture *f, ps_shard *s, int w, int64_t step, int dense, const rlist *l,
                     int final, int64_t *version, char *err, size_t errlen) {
    return push_rows_as(f, s, w, step, dense ? -1 : 0, l, PS_DTYPE_FLOAT32, final, version,
                        err, errlen);
}

static void push_rows_ok(fixture *f, ps_shard *s, int w, int64_t step, int dense,
                         const rlist *l, int final, int want, int64_t want_version) {
    char err[256] = "";
    int64_t v = -1;
    int rc = push_rows(f, s, w, step, dense, l, final, &v, err, sizeof err);
    if (rc != want) fail_msg("worker %d step %lld: rc %d, want %d: %s", w, (long long)step, rc,
                             want, err);
    assert_int_equal(v, want_version);
}

/* The reference step: sum per (table, id) over lists[0..W) in order (rank
 * order, then push order), apply each sum once, times scale. */
static void replay(ps_rows *ref, const rlist *const *lists, int W, float scale) {
    static rent keys[4 * MAXE];
    int nk = 0;
    for (int w = 0; w < W; w++)
        for (int i = 0; i < lists[w]->n; i++) {
            const rent *e = &lists[w]->e[i];
            int k = 0;
            while (k < nk && !(keys[k].t == e->t && keys[k].id == e->id)) k++;
            if (k == nk) {
                keys[nk++] = *e;
            } else {
                for (int j = 0; j < rdims[e->t]; j++) keys[k].g[j] += e->g[j];
            }
        }
    for (int k = 0; k < nk; k++) ps_rows_apply(ref, (int)keys[k].t, &keys[k].id, 1, keys[k].g, scale);
}

/* Every row of shard s, by dump, equals ref's (same set, same bits). */
static void expect_rows(ps_shard *s, ps_rows *ref) {
    static uint64_t ids[1024];
    static float vals[1024 * RDIM];
    for (int t = 0; t < NTAB; t++) {
        uint64_t next = 1;
        size_t n = ps_shard_dump_rows(s, (uint32_t)t, 0, 1024, ids, vals, &next);
        assert_int_equal(next, 0);
        if (n != ps_rows_count(ref, t))
            fail_msg("table %d: %zu rows, want %zu", t, n, ps_rows_count(ref, t));
        for (size_t i = 0; i < n; i++) {
            const float *want = ps_rows_find(ref, t, ids[i], NULL);
            if (!want) fail_msg("table %d: row %llu should not exist", t, (unsigned long long)ids[i]);
            for (int j = 0; j < rdims[t]; j++)
                if (memcmp(&want[j], &vals[i * (size_t)rdims[t] + (size_t)j], 4))
                    fail_msg("table %d row %llu value %d: want %.9g got %.9g", t,
                             (unsigned long long)ids[i], j, (double)want[j],
                             (double)vals[i * (size_t)rdims[t] + (size_t)j]);
        }
    }
}

static ps_shard_config rcfg(int workers, int sync, int table_kind) {
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, workers, sync, PS_AGG_MEAN);
    c.table_optim = ps_optim_defaults(table_kind, 0.5f);
    return c;
}

static void init_on(ps_shard *s, const ps_shard_config *c) {
    char err[256] = "";
    int64_t v = -1;
    if (ps_shard_init(s, c, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
}

/* Initialise f->s with c, fill both workers' row lists of step 0 and push
 * worker 0's (dense and rows, final). */
static void start_step0(fixture *f, const ps_shard_config *c, rlist *l0, rlist *l1) {
    init_on(f->s, c);
    rlist_fill(f, l0, 0, 0);
    rlist_fill(f, l1, 1, 0);
    push_rows_ok(f, f->s, 0, 0, 1, l0, 1, PS_PUSH_OK, 0);
}

/* Shard s holds exactly the rows of step 0 of two workers (mean). */
static void expect_step0_rows(fixture *f, ps_shard *s, const ps_shard_config *c,
                              const rlist *l0, const rlist *l1) {
    ps_rows *ref = ps_rows_create(f->m, &c->table_optim, SEED);
    const rlist *ls[2] = {l0, l1};
    replay(ref, ls, 2, 0.5f);
    expect_rows(s, ref);
    ps_rows_destroy(ref);
}

/* (a) Sync, 2 workers: step 0 closes only once both workers' rows are in
 * (rows_final) and every dense partition has both contributions, in either
 * order; a pull of rows at version 1 waits for it and then reads the rows
 * after the step; dense values and rows equal the references (mean). */
static void test_rows_sync_step_closes_when_all_in(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(2, PS_SYNC, PS_OPTIM_ADAGRAD);
    init_on(f->s, &c);
    ps_rows *ref = ps_rows_create(f->m, &c.table_optim, SEED);
    rlist l0, l1;
    rlist_fill(f, &l0, 0, 0);
    rlist_fill(f, &l1, 1, 0);
    /* A pull of version 1's rows, waiting. */
    uint64_t want_ids[3] = {l0.e[0].id, l1.e[0].id, f->rid[0][40]};
    float out[3 * 4];
    memset(out, 0, sizeof out);
    ps_row_req rq = {.table = 0, .ids = want_ids, .n = 3, .out = out};
    catcher w;
    catcher_init(&w);
    ps_shard_pull_rows(f->s, 1, &rq, 1, 0, catch_cb, &w);
    assert_int_equal(catcher_calls(&w), 0);

    push_rows_ok(f, f->s, 0, 0, 1, &l0, 1, PS_PUSH_OK, 0);
    push_rows_ok(f, f->s, 1, 0, 1, NULL, 0, PS_PUSH_OK, 0); /* Dense only. */
    /* Every partition has both contributions, but worker 1's rows are not
     * in: the step stays open and nothing of the rows is applied. */
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.version, 0);
    assert_int_equal(st.rows, 0);
    assert_int_equal(st.rows_pushed, (uint64_t)l0.n);
    assert_int_equal(catcher_calls(&w), 0);
    push_rows_ok(f, f->s, 1, 0, 0, &l1, 1, PS_PUSH_OK, 1); /* Rows alone: closes it. */
    assert_int_equal(catcher_calls(&w), 1);
    assert_int_equal(ps_snapshot_version(w.snap), 1);
    const rlist *ls[2] = {&l0, &l1};
    replay(ref, ls, 2, 0.5f);
    expect_rows(f->s, ref);
    float want[3 * 4];
    ps_rows_read(ref, 0, want_ids, 3, 0, want);
    expect_same(want, out, 12);
    float d_ref[MAXN], d_got[MAXN];
    initial(f, d_ref);
    ref_sgd_mean(f, d_ref, 2, 0);
    assert_int_equal(values(f, d_got), 1);
    expect_same(d_ref, d_got, f->m->numel);
    catcher_deinit(&w);

    /* Step 1 the other way round: rows first, dense partitions last, some
     * of them in a second push. */
    rlist_fill(f, &l0, 0, 1);
    rlist_fill(f, &l1, 1, 1);
    push_rows_ok(f, f->s, 1, 1, 0, &l1, 1, PS_PUSH_OK, 1);
    push_rows_ok(f, f->s, 0, 1, 0, &l0, 1, PS_PUSH_OK, 1);
    push_rows_ok(f, f->s, 1, 1, 1, NULL, 0, PS_PUSH_OK, 1);
    int64_t v = -1;
    assert_int_equal(push_range(f, f->s, 0, 1, 0, 1, &v), PS_PUSH_OK);
    assert_int_equal(v, 1); /* The other partitions are still missing. */
    assert_int_equal(push_range(f, f->s, 0, 1, 1, f->nparts, &v), PS_PUSH_OK);
    assert_int_equal(v, 2);
    replay(ref, ls, 2, 0.5f);
    expect_rows(f->s, ref);
    ref_sgd_mean(f, d_ref, 2, 1);
    assert_int_equal(values(f, d_got), 2);
    expect_same(d_ref, d_got, f->m->numel);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.rows, ps_rows_total(ref));
    assert_int_equal(st.rows_pushed, 2 * (uint64_t)(l0.n + l1.n));
    ps_rows_destroy(ref);
}

/* Row gradients whose float sum depends on the order of the terms. */
static void order_sensitive(const fixture *f, rlist *l, int worker) {
    static const float tiny = 0x1p-25f;
    static const float v[3][4] = {{1.0f, tiny, -1.0f, 0.5f},
                                  {tiny, 1.0f, tiny, 0.25f},
                                  {-1.0f, -1.0f, 1.0f, tiny}};
    l->n = 0;
    rlist_add(l, 0, f->rid[0][0], v[worker]);
    rlist_add(l, 0, f->rid[0][1], v[(worker + 1) % 3]);
    rlist_add(l, 0, f->rid[0][0], v[(worker + 2) % 3]); /* Repeat in one push. */
    float g2[2] = {v[worker][0], v[worker][1]};
    rlist_add(l, 1, f->rid[1][worker], g2); /* One worker's row only. */
    rlist_add(l, 1, f->rid[1][5], g2);
}

/* (b) Sync, 3 workers: whatever order their pushes arrive in, the rows are
 * bit for bit the same: the rank-order sum (which another order does not
 * give for these values). */
static void test_rows_sync_rank_order_sum(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(3, PS_SYNC, PS_OPTIM_SGD);
    c.table_optim.lr = 1.0f;
    rlist l[3];
    for (int w = 0; w < 3; w++) order_sensitive(f, &l[w], w);
    ps_rows *ref = ps_rows_create(f->m, &c.table_optim, SEED);
    const rlist *ls[3] = {&l[0], &l[1], &l[2]};
    replay(ref, ls, 3, 1.0f / 3.0f);
    /* Summed in arrival order 2, 0, 1 instead, some row differs. */
    ps_rows *alt = ps_rows_create(f->m, &c.table_optim, SEED);
    const rlist *alt_ls[3] = {&l[2], &l[0], &l[1]};
    replay(alt, alt_ls, 3, 1.0f / 3.0f);
    const float *a = ps_rows_find(ref, 0, f->rid[0][0], NULL);
    const float *b = ps_rows_find(alt, 0, f->rid[0][0], NULL);
    assert_memory_not_equal(a, b, 4 * sizeof(float));
    ps_rows_destroy(alt);

    static const int orders[][3] = {{0, 1, 2}, {2, 0, 1}, {1, 2, 0}, {2, 1, 0}};
    for (size_t k = 0; k < sizeof orders / sizeof orders[0]; k++) {
        ps_shard *s = NULL;
        assert_int_equal(ps_shard_create(f->m, f->pl, 0, &s), CM_OK);
        init_on(s, &c);
        for (int i = 0; i < 3; i++) {
            int w = orders[k][i];
            push_rows_ok(f, s, w, 0, 1, &l[w], 1, PS_PUSH_OK, i == 2 ? 1 : 0);
        }
        expect_rows(s, ref);
        ps_shard_destroy(s);
    }
    ps_rows_destroy(ref);
}

/* (c) Retries: a push again (before or after the step closes) is a
 * duplicate, acknowledged and not counted; rows sent once with new dense
 * partitions are counted once. */
static void test_rows_duplicate_not_counted(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(2, PS_SYNC, PS_OPTIM_ADAGRAD);
    rlist l0, l1;
    start_step0(f, &c, &l0, &l1);
    push_rows_ok(f, f->s, 0, 0, 1, &l0, 1, PS_PUSH_DUPLICATE, 0); /* The same again. */
    push_rows_ok(f, f->s, 0, 0, 0, &l0, 1, PS_PUSH_DUPLICATE, 0); /* Its rows again. */
    push_rows_ok(f, f->s, 0, 0, 0, NULL, 1, PS_PUSH_DUPLICATE, 0); /* rows_final again. */
    push_rows_ok(f, f->s, 1, 0, 1, NULL, 0, PS_PUSH_OK, 0);
    push_rows_ok(f, f->s, 1, 0, 1, NULL, 0, PS_PUSH_DUPLICATE, 0);
    /* Dense parts already given, rows new: counted for the rows only. */
    push_rows_ok(f, f->s, 1, 0, 1, &l1, 1, PS_PUSH_OK, 1);
    /* Retries after the step closed (a lost reply). */
    push_rows_ok(f, f->s, 1, 0, 1, &l1, 1, PS_PUSH_DUPLICATE, 1);
    push_rows_ok(f, f->s, 0, 0, 1, &l0, 1, PS_PUSH_DUPLICATE, 1);
    expect_step0_rows(f, f->s, &c, &l0, &l1);
    float d_ref[MAXN], d_got[MAXN];
    initial(f, d_ref);
    ref_sgd_mean(f, d_ref, 2, 0);
    assert_int_equal(values(f, d_got), 1);
    expect_same(d_ref, d_got, f->m->numel);
    expect_stats(f->s, 1, 3, 6, 0, 0, 0);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.rows_pushed, (uint64_t)(l0.n + l1.n));
}

/* A shard's observable state: version, counters, dense values, every row. */
typedef struct rstate {
    ps_shard_stats st;
    float dense[MAXN];
    size_t n[NTAB];
    uint64_t ids[NTAB][256];
    float vals[NTAB][256 * RDIM];
} rstate;

static void rstate_get(fixture *f, ps_shard *s, rstate *r) {
    memset(r, 0, sizeof *r);
    ps_shard_stats_get(s, &r->st);
    ps_shard *keep = f->s;
    f->s = s;
    values(f, r->dense);
    f->s = keep;
    for (int t = 0; t < NTAB; t++) {
        uint64_t next = 1;
        r->n[t] = ps_shard_dump_rows(s, (uint32_t)t, 0, 256, r->ids[t], r->vals[t], &next);
        assert_int_equal(next, 0);
    }
}

/* The same counters (pulls aside: reads change them), but bad_requests
 * grown by 'bad'. */
static void expect_counters(const ps_shard_stats *now, const ps_shard_stats *before,
                            uint64_t bad) {
    assert_int_equal(now->version, before->version);
    assert_int_equal(now->pushes, before->pushes);
    assert_int_equal(now->duplicate_pushes, before->duplicate_pushes);
    assert_int_equal(now->stale_pushes, before->stale_pushes);
    assert_int_equal(now->early_pushes, before->early_pushes);
    assert_int_equal(now->rows, before->rows);
    assert_int_equal(now->rows_pushed, before->rows_pushed);
    assert_int_equal(now->min_worker_step, before->min_worker_step);
    assert_int_equal(now->bad_requests, before->bad_requests + bad);
}

/* The same state, but bad_requests (pulls: the reads of rstate_get) grown
 * by 'bad'. */
static void expect_rstate(fixture *f, ps_shard *s, const rstate *before, uint64_t bad) {
    static rstate now;
    rstate_get(f, s, &now);
    expect_counters(&now.st, &before->st, bad);
    expect_same(before->dense, now.dense, f->m->numel);
    for (int t = 0; t < NTAB; t++) {
        assert_int_equal(now.n[t], before->n[t]);
        assert_memory_equal(now.ids[t], before->ids[t], now.n[t] * sizeof(uint64_t));
        expect_same(before->vals[t], now.vals[t], now.n[t] * (size_t)rdims[t]);
    }
}

/* (d) Sync: rows without rows_final are refused (a worker's rows of a step
 * come in one push) and change nothing, its dense partitions included. */
static void test_rows_sync_need_final(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(2, PS_SYNC, PS_OPTIM_ADAGRAD);
    rlist l0, l1, junk;
    start_step0(f, &c, &l0, &l1);
    rlist_fill(f, &junk, 1, 7);
    static rstate before;
    rstate_get(f, f->s, &before);
    char err[256] = "";
    int64_t v = -1;
    assert_int_equal(push_rows(f, f->s, 1, 0, 1, &junk, 0, &v, err, sizeof err),
                     PS_PUSH_INVALID);
    assert_non_null(strstr(err, "rows_final"));
    assert_int_equal(v, 0);
    assert_int_equal(push_rows(f, f->s, 1, 0, 0, &junk, 0, &v, err, sizeof err),
                     PS_PUSH_INVALID);
    expect_rstate(f, f->s, &before, 2);
    /* Worker 1 was not counted: its good push is accepted and closes the
     * step with its real rows. */
    push_rows_ok(f, f->s, 1, 0, 1, &l1, 1, PS_PUSH_OK, 1);
    expect_step0_rows(f, f->s, &c, &l0, &l1);
}

/* (e) Validation: every bad row push is refused with a message naming the
 * fault and leaves the shard as it was; bfloat16 rows are accepted and
 * widened exactly; a model without tables refuses rows. */
static void test_rows_validation(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(2, PS_SYNC, PS_OPTIM_ADAGRAD);
    rlist l0, l1;
    start_step0(f, &c, &l0, &l1);
    static rstate before;
    rstate_get(f, f->s, &before);
    enum { TABLE, SHORT, LONG, BF16_LEN, DTYPE0, DTYPE3, OTHER_SHARD, NCASES };
    for (int k = 0; k < NCASES; k++) {
        float g[MAXN];
        push_buf pb;
        rows_buf rb;
        grad_fill(g, f->m->numel, 1, 0);
        push_make(f, g, &pb);
        rows_make(&l1, PS_DTYPE_FLOAT32, &rb);
        ps_row_grad *x = &rb.r[1]; /* Table 1 (dim 2). */
        assert_int_equal(x->table, 1);
        const char *want = NULL;
        char buf[128];
        switch (k) {
        case TABLE: x->table = NTAB; want = "rows of table 3: the model has 3 tables"; break;
        case SHORT:
            x->len -= 4;
            snprintf(buf, sizeof buf, "rows of table 1 (emb_b): %zu data bytes, expected %zu",
                     x->n * 8 - 4, x->n * 8);
            want = buf;
            break;
        case LONG: x->len += 1; want = "data bytes, expected"; break;
        case BF16_LEN:
            x->dtype = PS_DTYPE_BFLOAT16;
            snprintf(buf, sizeof buf, "%zu data bytes, expected %zu (%zu ids of dim 2)", x->n * 8,
                     x->n * 4, x->n);
            want = buf;
            break;
        case DTYPE0: x->dtype = 0; want = "rows of table 1 (emb_b): dtype 0, must be"; break;
        case DTYPE3: x->dtype = 3; want = "dtype 3"; break;
        case OTHER_SHARD:
            rb.ids[(size_t)(x->ids - rb.ids) + 1] = f->other[1][2];
            snprintf(buf, sizeof buf, "row %llu of table 1 (emb_b) belongs to shard 1, not 0",
                     (unsigned long long)f->other[1][2]);
            want = buf;
            break;
        }
        char err[256] = "";
        int64_t v = -1;
        for (int dense = 0; dense < 2; dense++) {
            int rc = ps_shard_push_rows(f->s, 1, 0, pb.g, dense ? pb.n : 0, rb.r, rb.n, 1, &v,
                                        err, sizeof err);
            if (rc != PS_PUSH_INVALID || !strstr(err, want))
                fail_msg("case %d: rc %d '%s', want '%s'", k, rc, err, want);
            assert_int_equal(v, 0);
        }
    }
    expect_rstate(f, f->s, &before, 2 * NCASES);

    /* The good push, as bfloat16: the same rows as float32 would give (the
     * values are exact in bfloat16). */
    char err[256] = "";
    int64_t v = -1;
    assert_int_equal(push_rows_as(f, f->s, 1, 0, -1, &l1, PS_DTYPE_BFLOAT16, 1, &v, err,
                                  sizeof err),
                     PS_PUSH_OK);
    assert_int_equal(v, 1);
    expect_step0_rows(f, f->s, &c, &l0, &l1);
    /* Values that are not bfloat16-exact arrive rounded, not garbage. */
    rlist r0, r1;
    r0.n = r1.n = 0;
    float odd[4] = {1.0f + 0x1p-10f, -3.0f - 0x1p-12f, 0x1p-30f, 1000.1f};
    rlist_add(&r0, 0, f->rid[0][50], odd);
    rlist_add(&r1, 0, f->rid[0][50], odd);
    push_rows_ok(f, f->s, 0, 1, 1, &r0, 1, PS_PUSH_OK, 1);
    assert_int_equal(push_rows_as(f, f->s, 1, 1, -1, &r1, PS_DTYPE_BFLOAT16, 1, &v, err,
                                  sizeof err),
                     PS_PUSH_OK);
    assert_int_equal(v, 2);
    uint16_t h[4];
    ps_wire_bf16_from_f32(h, odd, 4);
    for (int j = 0; j < 4; j++) {
        uint32_t u = (uint32_t)h[j] << 16;
        memcpy(&r1.e[0].g[j], &u, 4);
    }
    ps_rows *ref = ps_rows_create(f->m, &c.table_optim, SEED);
    const rlist *ls[2] = {&l0, &l1}, *ls2[2] = {&r0, &r1};
    replay(ref, ls, 2, 0.5f);
    replay(ref, ls2, 2, 0.5f);
    expect_rows(f->s, ref);
    ps_rows_destroy(ref);
}

/* A model without tables refuses rows and rows_final, changing nothing. */
static void test_rows_refused_without_tables(void **state) {
    fixture *f = *state; /* The MLP fixture. */
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    int64_t v = -1;
    assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_OK);
    float before[MAXN], after[MAXN], g[MAXN];
    values(f, before);
    grad_fill(g, f->m->numel, 1, 0);
    push_buf pb;
    push_make(f, g, &pb);
    uint64_t id = 3;
    float row[4] = {1, 2, 3, 4};
    ps_row_grad rg = {.table = 0, .ids = &id, .n = 1, .dtype = PS_DTYPE_FLOAT32,
                      .data = (const uint8_t *)row, .len = sizeof row};
    char err[256] = "";
    assert_int_equal(ps_shard_push_rows(f->s, 1, 0, pb.g, pb.n, &rg, 1, 1, &v, err, sizeof err),
                     PS_PUSH_INVALID);
    assert_non_null(strstr(err, "the model has no tables"));
    assert_int_equal(ps_shard_push_rows(f->s, 1, 0, pb.g, pb.n, NULL, 0, 1, &v, err, sizeof err),
                     PS_PUSH_INVALID);
    assert_int_equal(ps_shard_push_rows(f->s, 1, 0, NULL, 0, NULL, 0, 1, &v, err, sizeof err),
                     PS_PUSH_INVALID);
    assert_int_equal(values(f, after), 0);
    expect_same(before, after, f->m->numel);
    expect_stats(f->s, 0, 1, 0, 0, 0, 3);
    assert_int_equal(ps_shard_row_dim(f->s, 0), -1);
    uint64_t ids[4], next = 9;
    float vals[16];
    assert_int_equal(ps_shard_dump_rows(f->s, 0, 0, 4, ids, vals, &next), 0);
    assert_int_equal(next, 0);
    /* Worker 1's dense push was never counted. */
    assert_int_equal(push_step(f, 1, 0, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
}

/* (f) Async: each push's rows are applied at once (as given, no mean), a
 * repeated id in one push summed into one update, rows_final not needed;
 * a retry is a duplicate and applies nothing. */
static void test_rows_async(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(2, PS_ASYNC, PS_OPTIM_ADAM);
    init_on(f->s, &c);
    ps_rows *ref = ps_rows_create(f->m, &c.table_optim, SEED);
    float d_ref[MAXN], d_got[MAXN], g[MAXN];
    initial(f, d_ref);
    const struct {
        int w;
        int64_t step;
        int dense, final;
    } seq[] = {{0, 0, 0, 0}, {1, 0, 1, 1}, {1, 1, 1, 0}, {0, 3, 1, 0}};
    for (int k = 0; k < 4; k++) {
        rlist l;
        rlist_fill(f, &l, seq[k].w, seq[k].step);
        push_rows_ok(f, f->s, seq[k].w, seq[k].step, seq[k].dense, &l, seq[k].final,
                     PS_PUSH_OK, k + 1);
        const rlist *ls[1] = {&l};
        replay(ref, ls, 1, 1.0f);
        expect_rows(f->s, ref);
        if (seq[k].dense) {
            grad_fill(g, f->m->numel, seq[k].w, seq[k].step);
            for (size_t i = 0; i < f->m->numel; i++) d_ref[i] = d_ref[i] - LR * g[i];
            own_only(f, d_ref);
        }
        assert_int_equal(values(f, d_got), k + 1);
        expect_same(d_ref, d_got, f->m->numel);
    }
    /* Retries. */
    rlist l;
    rlist_fill(f, &l, 0, 0);
    push_rows_ok(f, f->s, 0, 0, 0, &l, 0, PS_PUSH_DUPLICATE, 4);
    push_rows_ok(f, f->s, 1, 1, 1, &l, 0, PS_PUSH_DUPLICATE, 4);
    expect_rows(f->s, ref);
    /* A step in calls (step_parts) carries no rows: refused, nothing
     * changes. */
    {
        push_buf pb;
        rows_buf rb;
        char err[256] = "";
        int64_t v = -1;
        rlist_fill(f, &l, 0, 4);
        grad_fill(g, f->m->numel, 0, 4);
        push_make(f, g, &pb);
        rows_make(&l, PS_DTYPE_FLOAT32, &rb);
        assert_int_equal(ps_shard_push_step(f->s, 0, 4, pb.n, pb.g, pb.n, rb.r, rb.n, 0, &v, err,
                                            sizeof err),
                         PS_PUSH_INVALID);
        if (!strstr(err, "step_parts with row gradients")) fail_msg("'%s'", err);
        expect_rows(f->s, ref);
        assert_int_equal(values(f, d_got), 4);
        expect_same(d_ref, d_got, f->m->numel);
    }
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.duplicate_pushes, 2);
    assert_int_equal(st.rows, ps_rows_total(ref));
    ps_rows_destroy(ref);

    /* One push with the same row twice: one optimizer step with the sum. */
    ps_shard *s = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &s), CM_OK);
    init_on(s, &c);
    ref = ps_rows_create(f->m, &c.table_optim, SEED);
    rlist twice = {.n = 0};
    float a[4] = {0.5f, -0.25f, 0.125f, 1.0f}, b[4] = {0.25f, 0.25f, -0.5f, -1.0f};
    rlist_add(&twice, 0, f->rid[0][3], a);
    rlist_add(&twice, 0, f->rid[0][3], b);
    push_rows_ok(f, s, 0, 0, 0, &twice, 0, PS_PUSH_OK, 1);
    float sum[4];
    for (int j = 0; j < 4; j++) sum[j] = a[j] + b[j];
    ps_rows_apply(ref, 0, &f->rid[0][3], 1, sum, 1.0f);
    expect_rows(s, ref);
    ps_rows_destroy(ref);
    ps_shard_destroy(s);
}

/* Read rows of table t at once (the pull must be answered on this thread). */
static int64_t pull_rows_now(ps_shard *s, int64_t min_version, uint32_t t, const uint64_t *ids,
                             size_t n, int train, float *out) {
    ps_row_req rq = {.table = t, .ids = ids, .n = n, .out = out};
    catcher c;
    catcher_init(&c);
    ps_shard_pull_rows(s, min_version, &rq, 1, train, catch_cb, &c);
    assert_int_equal(c.calls, 1);
    assert_non_null(c.snap);
    int64_t v = ps_snapshot_version(c.snap);
    catcher_deinit(&c);
    return v;
}

/* (g) An evaluation read (train 0) gives cm_row_init's values and creates
 * nothing; a training read (train 1) gives the same and creates the rows;
 * a read of version v + 1 waits until the step closes and reads the rows
 * after it. */
static void test_rows_pull(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(1, PS_SYNC, PS_OPTIM_ADAGRAD);
    init_on(f->s, &c);
    const cm_var *tv0 = &f->m->vars[f->m->table_var[0]];
    const cm_var *tv2 = &f->m->vars[f->m->table_var[2]];
    uint64_t ids[3] = {f->rid[0][2], f->rid[0][9], f->rid[0][2]};
    float out[3 * 4], want[3 * 4], out2[7], want2[7];
    for (int i = 0; i < 3; i++) cm_row_init(tv0, SEED, ids[i], want + 4 * i);
    cm_row_init(tv2, SEED, f->rid[2][0], want2);
    assert_int_equal(pull_rows_now(f->s, 0, 0, ids, 3, 0, out), 0);
    expect_same(want, out, 12);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.rows, 0);
    assert_int_equal(st.rows_pulled, 3);
    /* Two tables in one pull, training: created, same values. */
    ps_row_req rq[2] = {{.table = 0, .ids = ids, .n = 3, .out = out},
                        {.table = 2, .ids = &f->rid[2][0], .n = 1, .out = out2}};
    catcher cc;
    catcher_init(&cc);
    ps_shard_pull_rows(f->s, 0, rq, 2, 1, catch_cb, &cc);
    assert_int_equal(cc.calls, 1);
    catcher_deinit(&cc);
    expect_same(want, out, 12);
    expect_same(want2, out2, 7);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.rows, 3); /* Two of table 0 (one repeated), one of table 2. */
    assert_int_equal(st.rows_pulled, 7);

    /* A pull of version 1 waits for the step. */
    ps_rows *ref = ps_rows_create(f->m, &c.table_optim, SEED);
    ps_rows_read(ref, 0, ids, 3, 1, want);
    ps_rows_read(ref, 2, &f->rid[2][0], 1, 1, want2);
    rlist l = {.n = 0};
    float g[4] = {0.5f, -0.5f, 0.25f, 0.0f};
    rlist_add(&l, 0, ids[0], g);
    rlist_add(&l, 0, f->rid[0][20], g); /* Not created before. */
    uint64_t later[2] = {ids[0], f->rid[0][20]};
    float lout[8];
    memset(lout, 0, sizeof lout);
    ps_row_req lrq = {.table = 0, .ids = later, .n = 2, .out = lout};
    catcher w;
    catcher_init(&w);
    ps_shard_pull_rows(f->s, 1, &lrq, 1, 0, catch_cb, &w);
    char err[256] = "";
    int64_t v = -1;
    /* Rows and one partition: the other partitions are still missing. */
    assert_int_equal(push_rows_as(f, f->s, 0, 0, 1, &l, PS_DTYPE_FLOAT32, 1, &v, err,
                                  sizeof err),
                     PS_PUSH_OK);
    assert_int_equal(v, 0);
    assert_int_equal(catcher_calls(&w), 0);
    /* Meanwhile reads of version 0 see the rows before the step. */
    assert_int_equal(pull_rows_now(f->s, 0, 0, later, 1, 0, out), 0);
    expect_same(want, out, 4);
    assert_int_equal(push_range(f, f->s, 0, 0, 1, f->nparts, &v), PS_PUSH_OK);
    assert_int_equal(v, 1);
    assert_int_equal(catcher_calls(&w), 1);
    assert_int_equal(ps_snapshot_version(w.snap), 1);
    catcher_deinit(&w);
    const rlist *ls[1] = {&l};
    replay(ref, ls, 1, 1.0f);
    float lwant[8];
    ps_rows_read(ref, 0, later, 2, 0, lwant);
    expect_same(lwant, lout, 8);
    expect_rows(f->s, ref);
    /* An evaluation read of a row never trained still creates nothing. */
    uint64_t fresh = f->rid[0][60];
    assert_int_equal(pull_rows_now(f->s, 0, 0, &fresh, 1, 0, out), 1);
    cm_row_init(tv0, SEED, fresh, want);
    expect_same(want, out, 4);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.rows, ps_rows_total(ref));
    /* A shard shut down answers a waiting row pull with NULL, unread. */
    catcher_init(&w);
    memset(lout, 0x5a, sizeof lout);
    ps_shard_pull_rows(f->s, 5, &lrq, 1, 1, catch_cb, &w);
    ps_shard_abort_waiters(f->s);
    assert_int_equal(w.calls, 1);
    assert_int_equal(w.nulls, 1);
    for (int j = 0; j < 8; j++) {
        uint32_t u;
        memcpy(&u, &lout[j], 4);
        assert_int_equal(u, 0x5a5a5a5au);
    }
    catcher_deinit(&w);
    ps_rows_destroy(ref);
}

/* The publish hook's copy of the rows (what a checkpoint keeps). */
typedef struct rows_rec {
    int calls;
    int64_t versions[8];
    ps_snapshot *snap;
    float slots[MAXN];
    size_t numel;
    size_t nrows[NTAB];
    uint64_t ids[NTAB][256];
    float vals[NTAB][256 * RDIM];
    float rslots[NTAB][256 * 2 * RDIM];
    int64_t counts[NTAB][256];
    int nslots;
    int t; /* The table being visited. */
} rows_rec;

static int rec_row(void *ud, uint64_t id, const float *values, const float *slots,
                   int64_t count) {
    rows_rec *r = ud;
    int t = r->t, dim = rdims[t];
    size_t k = r->nrows[t]++;
    CHECK(k < 256);
    r->ids[t][k] = id;
    memcpy(&r->vals[t][k * (size_t)dim], values, (size_t)dim * sizeof(float));
    memcpy(&r->rslots[t][k * 2 * (size_t)dim], slots,
           (size_t)(r->nslots * dim) * sizeof(float));
    r->counts[t][k] = count;
    return CM_OK;
}

static int rows_hook(void *ud, ps_snapshot *snap, const float *slots, int nslots,
                      const ps_shard_config *cfg, ps_rows *rows,
                      const int64_t *worker_steps) {
    (void)cfg, (void)worker_steps;
    rows_rec *r = ud;
    CHECK(rows != NULL);
    CHECK(r->calls < 8);
    r->versions[r->calls++] = ps_snapshot_version(snap);
    ps_snapshot_unref(r->snap);
    ps_snapshot_ref(snap);
    r->snap = snap;
    CHECK(nslots == 0 && slots == NULL); /* Dense SGD keeps none. */
    r->nslots = ps_rows_nslots(rows);
    for (int t = 0; t < NTAB; t++) {
        r->nrows[t] = 0;
        r->t = t;
        CHECK(ps_rows_visit(rows, t, rec_row, r) == CM_OK);
    }
    return 0;
}

static void rows_put_all(ps_shard *s, const rows_rec *r) {
    for (int t = 0; t < NTAB; t++)
        for (size_t k = 0; k < r->nrows[t]; k++)
            ps_shard_rows_put(s, (uint32_t)t, r->ids[t][k], &r->vals[t][k * (size_t)rdims[t]],
                              &r->rslots[t][k * 2 * (size_t)rdims[t]], r->counts[t][k]);
}

/* Run sync steps [from, to) of 2 workers on s (dense and rows). */
static void run_steps(fixture *f, ps_shard *s, int64_t from, int64_t to) {
    for (int64_t t = from; t < to; t++) {
        rlist l0, l1;
        rlist_fill(f, &l0, 0, t);
        rlist_fill(f, &l1, 1, t);
        push_rows_ok(f, s, 0, t, 1, &l0, 1, PS_PUSH_OK, t);
        push_rows_ok(f, s, 1, t, 1, &l1, 1, PS_PUSH_OK, t + 1);
    }
}

/* (h) The publish hook gets the rows at checkpoint versions; a rollback
 * clears the rows and ps_shard_rows_put brings them back (values, slots,
 * Adam's per-row counts), so the next step is bit for bit the original's;
 * a fresh shard restored the same way agrees too. */
static void test_rows_hook_rollback_restore(void **state) {
    fixture *f = *state;
    static rows_rec r;
    memset(&r, 0, sizeof r);
    ps_shard_set_publish_hook(f->s, 2, rows_hook, &r);
    ps_shard_config c = rcfg(2, PS_SYNC, PS_OPTIM_ADAM);
    init_on(f->s, &c);
    run_steps(f, f->s, 0, 4);
    assert_int_equal(r.calls, 2);
    assert_int_equal(r.versions[0], 2);
    assert_int_equal(r.versions[1], 4);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(r.nrows[0] + r.nrows[1] + r.nrows[2], st.rows);
    assert_int_equal(r.nslots, 2);
    /* Counts differ between rows (lazy Adam): the restore must keep them. */
    int64_t cmin = INT64_MAX, cmax = 0;
    for (size_t k = 0; k < r.nrows[0]; k++) {
        if (r.counts[0][k] < cmin) cmin = r.counts[0][k];
        if (r.counts[0][k] > cmax) cmax = r.counts[0][k];
    }
    assert_true(cmin >= 1 && cmax > cmin);
    size_t numel = ps_shard_numel(f->s);
    float params[MAXN];
    snapshot_flat(f->s, r.snap, params);
    static rows_rec v4;
    memcpy(&v4, &r, sizeof v4);
    v4.snap = NULL;
    static rstate at4, at5;
    rstate_get(f, f->s, &at4);
    run_steps(f, f->s, 4, 5);
    rstate_get(f, f->s, &at5);

    /* Back to 0: no rows, initial values. */
    char err[256] = "";
    assert_int_equal(ps_shard_rollback(f->s, 0, NULL, NULL, err, sizeof err), CM_OK);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.version, 0);
    assert_int_equal(st.rows, 0);
    float out[4], want[4];
    assert_int_equal(pull_rows_now(f->s, 0, 0, &v4.ids[0][0], 1, 0, out), 0);
    cm_row_init(&f->m->vars[f->m->table_var[0]], SEED, v4.ids[0][0], want);
    expect_same(want, out, 4);
    /* Back to 4: dense from the snapshot, rows put back. */
    assert_int_equal(ps_shard_rollback(f->s, 4, params, NULL, err, sizeof err), CM_OK);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.rows, 0);
    rows_put_all(f->s, &v4);
    static rstate now;
    rstate_get(f, f->s, &now);
    assert_int_equal(now.st.version, 4);
    for (int t = 0; t < NTAB; t++) {
        assert_int_equal(now.n[t], at4.n[t]);
        assert_memory_equal(now.ids[t], at4.ids[t], now.n[t] * sizeof(uint64_t));
        expect_same(at4.vals[t], now.vals[t], now.n[t] * (size_t)rdims[t]);
    }
    run_steps(f, f->s, 4, 5);
    rstate_get(f, f->s, &now);
    expect_same(at5.dense, now.dense, f->m->numel);
    for (int t = 0; t < NTAB; t++) {
        assert_int_equal(now.n[t], at5.n[t]);
        assert_memory_equal(now.ids[t], at5.ids[t], now.n[t] * sizeof(uint64_t));
        expect_same(at5.vals[t], now.vals[t], now.n[t] * (size_t)rdims[t]);
    }
    /* A fresh shard restored from version 4 the same way. */
    ps_shard *fresh = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &fresh), CM_OK);
    assert_int_equal(ps_shard_restore(fresh, &c, 4, params, NULL, err, sizeof err), CM_OK);
    assert_int_equal(numel, ps_shard_numel(fresh));
    rows_put_all(fresh, &v4);
    run_steps(f, fresh, 4, 5);
    rstate_get(f, fresh, &now);
    expect_same(at5.dense, now.dense, f->m->numel);
    for (int t = 0; t < NTAB; t++) {
        assert_int_equal(now.n[t], at5.n[t]);
        expect_same(at5.vals[t], now.vals[t], now.n[t] * (size_t)rdims[t]);
    }
    ps_shard_destroy(fresh);
    /* The final checkpoint (publish_now) gets the rows too. */
    int before = r.calls;
    assert_int_equal(ps_shard_publish_now(f->s), 1);
    assert_int_equal(r.calls, before + 1);
    assert_int_equal(r.versions[before], 5);
    ps_snapshot_unref(r.snap);
    r.snap = NULL;
    ps_shard_set_publish_hook(f->s, 0, NULL, NULL);
}

/* dump_rows pages (from, max, next) cover every row exactly once, in the
 * order rows were created, with their values. */
static void test_rows_dump_pages(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(2, PS_SYNC, PS_OPTIM_ADAGRAD);
    init_on(f->s, &c);
    run_steps(f, f->s, 0, 6);
    /* More rows: a training read creates them. */
    float tmp[NRID * RDIM];
    assert_int_equal(pull_rows_now(f->s, 0, 0, f->rid[0], NRID, 1, tmp), 6);
    static rstate all;
    rstate_get(f, f->s, &all);
    assert_int_equal(all.n[0], NRID);
    for (int t = 0; t < NTAB; t++) {
        size_t n = all.n[t], dim = (size_t)rdims[t];
        assert_true(n >= 10);
        static const size_t sizes[] = {1, 3, 7, 9};
        for (size_t k = 0; k < 4 + 3; k++) {
            /* Pages of several sizes, and of exactly n, n - 1 and n + 1. */
            size_t max = k < 4 ? sizes[k] : n - 1 + (k - 4);
            uint64_t from = 0, ids[256];
            float vals[256 * RDIM];
            size_t got = 0;
            for (int page = 0;; page++) {
                uint64_t next = 12345;
                size_t m = ps_shard_dump_rows(f->s, (uint32_t)t, from, max, ids, vals, &next);
                assert_true(m <= max);
                assert_int_equal(m, got + max <= n ? max : n - got);
                assert_memory_equal(ids, all.ids[t] + got, m * sizeof(uint64_t));
                expect_same(all.vals[t] + got * dim, vals, m * dim);
                got += m;
                if (got < n) {
                    assert_int_equal(next, got);
                } else {
                    assert_int_equal(next, 0);
                    break;
                }
                from = next;
                assert_true(page < 300);
            }
            assert_int_equal(got, n);
        }
        /* Every id once, and the values of an evaluation read. */
        for (size_t i = 0; i < n; i++)
            for (size_t j = i + 1; j < n; j++) assert_true(all.ids[t][i] != all.ids[t][j]);
        float rv[256 * RDIM];
        pull_rows_now(f->s, 0, (uint32_t)t, all.ids[t], n, 0, rv);
        expect_same(rv, all.vals[t], n * dim);
    }
    /* Past the end, max 0, no such table: nothing, next 0. */
    uint64_t ids[4], next = 7;
    float vals[4 * RDIM];
    assert_int_equal(ps_shard_dump_rows(f->s, 0, NRID, 4, ids, vals, &next), 0);
    assert_int_equal(next, 0);
    next = 7;
    assert_int_equal(ps_shard_dump_rows(f->s, 0, 0, 0, ids, vals, &next), 0);
    assert_int_equal(next, 0);
    next = 7;
    assert_int_equal(ps_shard_dump_rows(f->s, NTAB, 0, 4, ids, vals, &next), 0);
    assert_int_equal(next, 0);
}

/* A model with a scalar variable (0 dimensions, an empty shape on the
 * wire): a push of it is validated without reading a shape it has not. */
static void test_scalar_variable_push(void **state) {
    (void)state;
    cm_var v = {.kind = CM_VAR_DENSE, .ndims = 0, .init = CM_INIT_ZERO};
    snprintf(v.name, sizeof v.name, "scale");
    char err[256];
    cm_model *m = NULL;
    cm_placement *pl = NULL;
    ps_shard *s = NULL;
    assert_int_equal(cm_model_create_from_vars("mine", &v, 1, &m, err, sizeof err), CM_OK);
    assert_int_equal(m->numel, 1);
    assert_int_equal(cm_placement_create(m, 1, 1024, &pl), CM_OK);
    assert_int_equal(ps_shard_create(m, pl, 0, &s), CM_OK);
    ps_shard_config c = {.optim = ps_optim_defaults(PS_OPTIM_SGD, 0.5f), .num_workers = 1,
                         .sync = PS_SYNC};
    int64_t ver;
    assert_int_equal(ps_shard_init(s, &c, &ver, err, sizeof err), CM_OK);
    float g = 1.0f;
    uint64_t one = 1;
    ps_grad bad = {.part = 0, .dtype = PS_DTYPE_FLOAT32, .nshape = 1, .shape = &one,
                   .data = (const uint8_t *)&g, .len = 4};
    assert_int_equal(ps_shard_push(s, 0, 0, &bad, 1, &ver, err, sizeof err), PS_PUSH_INVALID);
    ps_grad pg = {.part = 0, .dtype = PS_DTYPE_FLOAT32, .nshape = 0, .shape = NULL,
                  .data = (const uint8_t *)&g, .len = 4};
    assert_int_equal(ps_shard_push(s, 0, 0, &pg, 1, &ver, err, sizeof err), PS_PUSH_OK);
    assert_int_equal(ver, 1);
    ps_shard_destroy(s);
    cm_placement_destroy(pl);
    cm_model_destroy(m);
}

/* ===== Values and sizes a client controls ===== */

/* Overwrite value j of gradient k of a push with the float32 bits u (or,
 * for a bfloat16 gradient, the bfloat16 bits h). */
static void poke_f32(push_buf *pb, int k, size_t j, uint32_t u) {
    uint8_t *p = pb->raw + (pb->g[k].data - pb->raw) + 4 * j;
    memcpy(p, &u, 4);
}

static void poke_bf16(push_buf *pb, int k, size_t j, uint16_t h) {
    uint8_t *p = pb->raw + (pb->g[k].data - pb->raw) + 2 * j;
    memcpy(p, &h, 2);
}

/* A shard's observable dense state: its values (bit for bit) and stats. */
typedef struct dstate {
    float vals[MAXN];
    ps_shard_stats st;
} dstate;

static void dstate_get(fixture *f, dstate *d) {
    memset(d, 0, sizeof *d);
    values(f, d->vals);
    ps_shard_stats_get(f->s, &d->st);
}

/* The same as before, but bad_requests grown by 'bad' and nonfinite_pushes
 * by 'nonfinite'. */
static void expect_dstate(fixture *f, const dstate *before, uint64_t bad, uint64_t nonfinite) {
    dstate now;
    dstate_get(f, &now);
    expect_same(before->vals, now.vals, f->m->numel);
    expect_counters(&now.st, &before->st, bad);
    assert_int_equal(now.st.nonfinite_pushes, before->st.nonfinite_pushes + nonfinite);
}

/* A fresh shard 0 in place of f->s (its partition list is the shard's). */
static void renew(fixture *f) {
    ps_shard_destroy(f->s);
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &f->s), CM_OK);
    f->parts = ps_shard_parts(f->s, &f->nparts);
}

/* Push (worker, step) and expect rc, with 'want' in the message if given. */
static void push_expect(fixture *f, int worker, int64_t step, int want, const char *msg) {
    char err[512] = "";
    int64_t v = -1;
    float g[MAXN];
    push_buf pb;
    grad_fill(g, f->m->numel, worker, step);
    push_make(f, g, &pb);
    int rc = ps_shard_push(f->s, worker, step, pb.g, pb.n, &v, err, sizeof err);
    if (rc != want || (msg && !strstr(err, msg)))
        fail_msg("worker %d step %lld: rc %d '%s', want %d '%s'", worker, (long long)step, rc,
                 err, want, msg ? msg : "");
}

/* Async: a step far ahead is refused and changes nothing, so the worker's
 * later pushes are not taken for retries; the bound is max_step_ahead past
 * the worker's last step, or for its first push past the version and the
 * highest step taken (which a rollback keeps). */
static void test_async_step_bound(void **state) {
    fixture *f = *state;
    assert_int_equal(PS_SHARD_MAX_STEP_AHEAD, (int64_t)1 << 20);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 2, PS_ASYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    /* The default bound: from version 0, step 2^20 is the last one taken. */
    push_expect(f, 0, ((int64_t)1 << 20) + 1, PS_PUSH_INVALID, "too far ahead");
    push_expect(f, 0, (int64_t)1 << 20, PS_PUSH_OK, NULL);
    /* From the worker's last step (2^20). */
    push_expect(f, 0, ((int64_t)2 << 20) + 1, PS_PUSH_INVALID, "too far ahead");
    ps_shard_rollback(f->s, 0, NULL, NULL, NULL, 0);

    ps_shard_set_max_step_ahead(f->s, 10);
    push_expect(f, 0, 0, PS_PUSH_OK, NULL); /* Version 1. */
    static const int64_t bogus[] = {INT64_MAX, (int64_t)1 << 62, 1LL << 40,
                                    ((int64_t)1 << 20) + 11};
    for (size_t k = 0; k < sizeof bogus / sizeof *bogus; k++) {
        dstate before;
        dstate_get(f, &before);
        char msg[128];
        snprintf(msg, sizeof msg, "step %lld from worker 1 is too far ahead", (long long)bogus[k]);
        push_expect(f, 1, bogus[k], PS_PUSH_INVALID, msg);
        expect_dstate(f, &before, 1, 0);
    }
    /* Worker 1's real steps are taken (not "duplicates"): its first push
     * may run 10 past max(version 1, highest step 2^20 before the
     * rollback: the last bogus step is 11 past it)... */
    push_expect(f, 1, ((int64_t)1 << 20) + 10, PS_PUSH_OK, NULL);
    /* ... then 10 past its own last step. */
    push_expect(f, 1, ((int64_t)1 << 20) + 21, PS_PUSH_INVALID, "too far ahead");
    push_expect(f, 1, ((int64_t)1 << 20) + 20, PS_PUSH_OK, NULL);
    push_expect(f, 1, ((int64_t)1 << 20) + 20, PS_PUSH_DUPLICATE, NULL);
    /* Worker 0's last step is 0. */
    push_expect(f, 0, 11, PS_PUSH_INVALID, "the worker's last one (0)");
    push_expect(f, 0, 10, PS_PUSH_OK, NULL);
    float ref[MAXN], got[MAXN], g[MAXN];
    initial(f, ref);
    const struct { int w; int64_t step; } seq[] = {
        {0, 0}, {1, ((int64_t)1 << 20) + 10}, {1, ((int64_t)1 << 20) + 20}, {0, 10}};
    for (int k = 0; k < 4; k++) {
        grad_fill(g, f->m->numel, seq[k].w, seq[k].step);
        for (size_t i = 0; i < f->m->numel; i++) ref[i] = ref[i] - LR * g[i];
    }
    own_only(f, ref);
    assert_int_equal(values(f, got), 4);
    expect_same(ref, got, f->m->numel);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.pushes, 5);
    assert_int_equal(st.bad_requests, 8);
    assert_int_equal(st.nonfinite_pushes, 0);
    /* Partition pulls: a step whose version + 1 does not exist is invalid. */
    assert_int_equal(ps_shard_pull_parts(f->s, INT64_MAX, f->parts, 1, catch_cb, NULL),
                     CM_EINVAL);
}

/* The bits of a value that must be refused, as float32 and bfloat16. */
typedef struct badval {
    uint32_t f32;
    uint16_t bf16;
    const char *name;
} badval;

static const badval badvals[] = {{0x7fc00000u, 0x7fc0u, "nan"},
                                 {0xffc00001u, 0xffc1u, "nan"},
                                 {0x7f800000u, 0x7f80u, "inf"},
                                 {0xff800000u, 0xff80u, "-inf"}};

/* The modes a bad push is tried in: who has pushed before, and where the
 * gradient goes (sync 2: worker 1 is added to worker 0's sum in acc, or
 * worker 0 is the first; sync 3: the staging; async: acc). */
enum { M_SYNC2_SECOND, M_SYNC2_FIRST, M_SYNC3, M_ASYNC, M_COUNT };

static ps_shard_config mode_cfg(int m) {
    return cfg_make(PS_OPTIM_MOMENTUM, m == M_SYNC3 ? 3 : 2, m == M_ASYNC ? PS_ASYNC : PS_SYNC,
                    PS_AGG_SUM);
}

/* A NaN or infinity in a pushed gradient (float32 or bfloat16, any
 * partition, any place) is refused with a message naming the partition,
 * the value and its index, and changes nothing: the good pushes after it
 * give exactly what they give without it. Finite extremes are taken. */
static void test_nonfinite_dense_refused(void **state) {
    fixture *f = *state;
    for (int m = 0; m < M_COUNT; m++)
        for (int dt = 0; dt < 2; dt++) {
            int dtype = dt ? PS_DTYPE_BFLOAT16 : PS_DTYPE_FLOAT32;
            renew(f);
            ps_shard_config c = mode_cfg(m);
            init_ok(f, &c);
            /* The reference: the same good pushes on a shard that never saw
             * a bad one. */
            ps_shard *ref = NULL;
            assert_int_equal(ps_shard_create(f->m, f->pl, 0, &ref), CM_OK);
            init_on(ref, &c);
            int bad_worker = m == M_SYNC2_FIRST ? 0 : 1;
            float g[MAXN];
            int64_t v;
            char err[512];
            if (m != M_SYNC2_FIRST) {
                grad_fill(g, f->m->numel, 0, 0);
                push_as(f, f->s, 0, 0, g, dtype);
                push_as(f, ref, 0, 0, g, dtype);
            }
            grad_fill(g, f->m->numel, bad_worker, 0);
            for (size_t b = 0; b < sizeof badvals / sizeof *badvals; b++)
                for (int k = 0; k < f->nparts; k++) {
                    push_buf pb;
                    push_make_as(f, g, dtype, &pb);
                    const cm_partition *p = &f->pl->parts[pb.g[k].part];
                    size_t j = (b + (size_t)k) % 2 ? p->count - 1 : (p->count / 3);
                    if (dt)
                        poke_bf16(&pb, k, j, badvals[b].bf16);
                    else
                        poke_f32(&pb, k, j, badvals[b].f32);
                    dstate before;
                    dstate_get(f, &before);
                    char want[256];
                    snprintf(want, sizeof want,
                             "partition %u (%s part %d): non-finite gradient: %s at element "
                             "%zu of %zu (%s)",
                             pb.g[k].part, f->m->vars[p->var].name, p->index, badvals[b].name, j,
                             p->count, dt ? "bfloat16" : "float32");
                    v = -1;
                    int rc = ps_shard_push(f->s, bad_worker, 0, pb.g, pb.n, &v, err, sizeof err);
                    if (rc != PS_PUSH_INVALID || !strstr(err, want))
                        fail_msg("mode %d dtype %d value %zu part %d: rc %d '%s', want '%s'", m,
                                 dtype, b, k, rc, err, want);
                    assert_int_equal(v, m == M_ASYNC ? 1 : 0);
                    expect_dstate(f, &before, 1, 1);
                }
            /* Finite extremes are values like any other. */
            float big[MAXN];
            grad_fill(big, f->m->numel, 2, 0);
            push_buf pb;
            push_make_as(f, big, dtype, &pb);
            if (dt) {
                poke_bf16(&pb, 0, 0, 0x7f7fu); /* The largest finite bfloat16. */
                poke_bf16(&pb, 1, 0, 0x0001u); /* A subnormal. */
            } else {
                poke_f32(&pb, 0, 0, 0x7f7fffffu); /* FLT_MAX. */
                poke_f32(&pb, 1, 0, 0x80000001u); /* A negative subnormal. */
            }
            /* The rest of the step, on both shards alike. */
            for (int w = 0; w < c.num_workers; w++) {
                if (m != M_SYNC2_FIRST && w == 0) continue;
                ps_grad *gs = pb.g;
                push_buf good;
                if (w != 2) {
                    grad_fill(g, f->m->numel, w, 0);
                    push_make_as(f, g, dtype, &good);
                    gs = good.g;
                }
                int rc = ps_shard_push(f->s, w, 0, gs, pb.n, &v, err, sizeof err);
                if (rc != PS_PUSH_OK) fail_msg("mode %d worker %d: %d %s", m, w, rc, err);
                assert_int_equal(ps_shard_push(ref, w, 0, gs, pb.n, &v, err, sizeof err),
                                 PS_PUSH_OK);
            }
            if (m == M_ASYNC) {
                assert_int_equal(ps_shard_push(f->s, 0, 1, pb.g, pb.n, &v, err, sizeof err),
                                 PS_PUSH_OK);
                assert_int_equal(ps_shard_push(ref, 0, 1, pb.g, pb.n, &v, err, sizeof err),
                                 PS_PUSH_OK);
            }
            float want[MAXN], got[MAXN];
            shard_values(f, ref, want);
            int64_t ver = values(f, got);
            assert_int_equal(ver, m == M_ASYNC ? 3 : 1);
            expect_same(want, got, f->m->numel);
            ps_shard_stats st;
            ps_shard_stats_get(f->s, &st);
            assert_int_equal(st.nonfinite_pushes, 4 * (uint64_t)f->nparts);
            ps_shard_destroy(ref);
        }
}

/* skip_nonfinite: a push with a NaN is answered OK and counted. Sync: it
 * stands for the worker's contribution with zeros (the step closes);
 * async: nothing of it is applied, and a retry is a duplicate. */
static void test_nonfinite_skipped(void **state) {
    fixture *f = *state;
    for (int m = 0; m < M_COUNT; m++) {
        renew(f);
        ps_shard_set_skip_nonfinite(f->s, 1);
        ps_shard_config c = cfg_make(PS_OPTIM_SGD, m == M_SYNC3 ? 3 : 2,
                                     m == M_ASYNC ? PS_ASYNC : PS_SYNC, PS_AGG_MEAN);
        init_ok(f, &c);
        int bad_worker = m == M_SYNC2_FIRST ? 0 : 1;
        float g[MAXN], ref[MAXN], got[MAXN];
        int64_t v = -1;
        char err[256] = "";
        initial(f, ref);
        /* The good workers' pushes; the bad one's in the middle. */
        for (int w = 0; w < c.num_workers; w++) {
            grad_fill(g, f->m->numel, w, 0);
            push_buf pb;
            push_make_as(f, g, m == M_SYNC3 ? PS_DTYPE_BFLOAT16 : PS_DTYPE_FLOAT32, &pb);
            if (w == bad_worker) {
                if (m == M_SYNC3)
                    poke_bf16(&pb, 1, 2, 0x7f80u);
                else
                    poke_f32(&pb, 1, 2, 0x7fc00000u);
            }
            assert_int_equal(ps_shard_push(f->s, w, 0, pb.g, pb.n, &v, err, sizeof err),
                             PS_PUSH_OK);
            if (w == bad_worker) {
                /* A retry: not counted again. */
                assert_int_equal(ps_shard_push(f->s, w, 0, pb.g, pb.n, &v, err, sizeof err),
                                 PS_PUSH_DUPLICATE);
                continue;
            }
            if (m == M_ASYNC)
                for (size_t i = 0; i < f->m->numel; i++) ref[i] = ref[i] - LR * g[i];
        }
        if (m != M_ASYNC) {
            /* The mean over W, the bad worker's gradient as zeros. */
            float sum[MAXN];
            memset(sum, 0, sizeof sum);
            for (int w = 0; w < c.num_workers; w++) {
                if (w == bad_worker) continue;
                grad_fill(g, f->m->numel, w, 0);
                for (size_t i = 0; i < f->m->numel; i++) sum[i] += g[i];
            }
            float scale = 1.0f / (float)c.num_workers; /* As the shard scales. */
            for (size_t i = 0; i < f->m->numel; i++) ref[i] = ref[i] - LR * (sum[i] * scale);
        }
        own_only(f, ref);
        assert_int_equal(values(f, got), 1);
        expect_same(ref, got, f->m->numel);
        ps_shard_stats st;
        ps_shard_stats_get(f->s, &st);
        assert_int_equal(st.nonfinite_pushes, 1);
        assert_int_equal(st.pushes, (uint64_t)c.num_workers - 1);
        assert_int_equal(st.duplicate_pushes, 1);
        assert_int_equal(st.bad_requests, 0);
    }
}

/* Rows: a NaN or infinity in a row gradient (float32 or bfloat16) is
 * refused naming the table, row, id and element, and changes nothing (the
 * push's dense partitions included); with skip_nonfinite the push is
 * dropped: the step closes without its rows and with zeros for its dense
 * gradient. */
static void test_rows_nonfinite(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(2, PS_SYNC, PS_OPTIM_ADAGRAD);
    rlist l0, l1;
    start_step0(f, &c, &l0, &l1);
    static rstate before;
    rstate_get(f, f->s, &before);
    for (int dt = 0; dt < 2; dt++)
        for (int k = 0; k < 2; k++) {
            float g[MAXN];
            push_buf pb;
            rows_buf rb;
            grad_fill(g, f->m->numel, 1, 0);
            push_make(f, g, &pb);
            rows_make(&l1, dt ? PS_DTYPE_BFLOAT16 : PS_DTYPE_FLOAT32, &rb);
            ps_row_grad *x = &rb.r[1]; /* Table 1 (emb_b, dim 2). */
            assert_int_equal(x->table, 1);
            size_t row = k ? x->n - 1 : 2, el = k ? 0 : 1, vs = dt ? 2 : 4;
            uint8_t *p = rb.raw + (x->data - rb.raw) + (row * 2 + el) * vs;
            if (dt)
                memcpy(p, &(uint16_t){k ? 0xff80u : 0x7fc0u}, 2);
            else
                memcpy(p, &(uint32_t){k ? 0xff800000u : 0x7fc00000u}, 4);
            char want[256], err[256] = "";
            snprintf(want, sizeof want,
                     "rows of table 1 (emb_b): non-finite gradient: %s at row %zu (id %llu), "
                     "element %zu (%s)",
                     k ? "-inf" : "nan", row, (unsigned long long)x->ids[row], el,
                     dt ? "bfloat16" : "float32");
            int64_t v = -1;
            for (int dense = 0; dense < 2; dense++) {
                int rc = ps_shard_push_rows(f->s, 1, 0, pb.g, dense ? pb.n : 0, rb.r, rb.n, 1,
                                            &v, err, sizeof err);
                if (rc != PS_PUSH_INVALID || !strstr(err, want))
                    fail_msg("dtype %d case %d: rc %d '%s', want '%s'", dt, k, rc, err, want);
                assert_int_equal(v, 0);
            }
        }
    expect_rstate(f, f->s, &before, 8);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.nonfinite_pushes, 8);

    /* Skipped: worker 1's push counts for the step with zeros and no rows. */
    ps_shard_set_skip_nonfinite(f->s, 1);
    float g[MAXN];
    push_buf pb;
    rows_buf rb;
    grad_fill(g, f->m->numel, 1, 0);
    push_make(f, g, &pb);
    rows_make(&l1, PS_DTYPE_BFLOAT16, &rb);
    memcpy(rb.raw + (rb.r[2].data - rb.raw), &(uint16_t){0x7f81u}, 2);
    char err[256] = "";
    int64_t v = -1;
    assert_int_equal(ps_shard_push_rows(f->s, 1, 0, pb.g, pb.n, rb.r, rb.n, 1, &v, err,
                                        sizeof err),
                     PS_PUSH_OK);
    assert_int_equal(v, 1);
    ps_rows *ref = ps_rows_create(f->m, &c.table_optim, SEED);
    const rlist *ls[1] = {&l0};
    replay(ref, ls, 1, 0.5f);
    expect_rows(f->s, ref);
    ps_rows_destroy(ref);
    float d_ref[MAXN], d_got[MAXN];
    initial(f, d_ref);
    grad_fill(g, f->m->numel, 0, 0);
    for (size_t i = 0; i < f->m->numel; i++) d_ref[i] = d_ref[i] - LR * (g[i] / 2.0f);
    own_only(f, d_ref);
    assert_int_equal(values(f, d_got), 1);
    expect_same(d_ref, d_got, f->m->numel);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.nonfinite_pushes, 9);
    assert_int_equal(st.rows_pushed, before.st.rows_pushed);

    /* Async: refused, nothing applied. */
    ps_shard *s = NULL;
    assert_int_equal(ps_shard_create(f->m, f->pl, 0, &s), CM_OK);
    ps_shard_config ca = rcfg(2, PS_ASYNC, PS_OPTIM_ADAM);
    init_on(s, &ca);
    static rstate abefore;
    rstate_get(f, s, &abefore);
    rows_make(&l1, PS_DTYPE_FLOAT32, &rb);
    memcpy(rb.raw + (rb.r[0].data - rb.raw) + 4, &(uint32_t){0x7f800000u}, 4);
    assert_int_equal(ps_shard_push_rows(s, 1, 0, pb.g, pb.n, rb.r, rb.n, 0, &v, err, sizeof err),
                     PS_PUSH_INVALID);
    assert_non_null(strstr(err, "rows of table 0 (emb_a): non-finite gradient: inf at row 0"));
    expect_rstate(f, s, &abefore, 1);
    ps_shard_destroy(s);
}

/* Init with config c must be refused as invalid with 'want' in the
 * message, leaving the shard uninitialised. */
static void init_refused(ps_shard *s, const ps_shard_config *c, const char *want) {
    char err[512] = "";
    int64_t v = -1;
    int rc = ps_shard_init(s, c, &v, err, sizeof err);
    if (rc != CM_EINVAL || !strstr(err, want))
        fail_msg("init: rc %d '%s', want CM_EINVAL '%s'", rc, err, want);
    ps_shard_config got;
    assert_false(ps_shard_config_get(s, &got));
}

/* Optimizer settings are checked, for the dense and the tables' optimizer,
 * at init and at restore, and so is num_workers. */
static void test_config_validated(void **state) {
    fixture *f = *state;
    const struct {
        int kind;
        int field; /* 0 lr, 1 momentum, 2 beta1, 3 beta2, 4 epsilon, 5 acc0 */
        float v;
        const char *want; /* NULL: accepted */
    } cases[] = {
        {PS_OPTIM_SGD, 0, NAN, "optimizer (sgd) lr nan, must be finite"},
        {PS_OPTIM_SGD, 0, INFINITY, "optimizer (sgd) lr inf, must be finite"},
        {PS_OPTIM_SGD, 0, 0.0f, "optimizer (sgd) lr 0, must be > 0"},
        {PS_OPTIM_ADAM, 0, -0.5f, "optimizer (adam) lr -0.5, must be > 0"},
        {PS_OPTIM_MOMENTUM, 1, 1.0f, "optimizer (momentum) momentum 1, must be in [0, 1)"},
        {PS_OPTIM_MOMENTUM, 1, -0.25f, "momentum -0.25, must be in [0, 1)"},
        {PS_OPTIM_ADAM, 2, 0.0f, "optimizer (adam) beta1 0, must be in (0, 1)"},
        {PS_OPTIM_ADAM, 2, 1.0f, "beta1 1, must be in (0, 1)"},
        {PS_OPTIM_ADAM, 3, 1.5f, "beta2 1.5, must be in (0, 1)"},
        {PS_OPTIM_ADAM, 3, -INFINITY, "beta2 -inf, must be finite"},
        {PS_OPTIM_ADAM, 4, 0.0f, "optimizer (adam) epsilon 0, must be > 0"},
        {PS_OPTIM_ADAGRAD, 4, -1e-7f, "optimizer (adagrad) epsilon -1e-07, must be > 0"},
        {PS_OPTIM_ADAGRAD, 5, -0.5f, "initial_accumulator -0.5, must be >= 0"},
        {PS_OPTIM_ADAGRAD, 5, NAN, "initial_accumulator nan, must be finite"},
        /* Unused by the kind: any finite value. */
        {PS_OPTIM_SGD, 1, NAN, "optimizer (sgd) momentum nan, must be finite"},
        {PS_OPTIM_SGD, 2, 0.0f, NULL},
        {PS_OPTIM_SGD, 4, -3.0f, NULL},
        {PS_OPTIM_ADD, 0, 0.0f, NULL},
        {PS_OPTIM_ADAGRAD, 5, 0.0f, NULL},
        {PS_OPTIM_MOMENTUM, 1, 0.0f, NULL},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        renew(f);
        ps_shard_config c = cfg_make(cases[k].kind, 2, PS_SYNC, PS_AGG_MEAN);
        float *fld[] = {&c.optim.lr, &c.optim.momentum, &c.optim.beta1, &c.optim.beta2,
                        &c.optim.epsilon, &c.optim.initial_accumulator};
        *fld[cases[k].field] = cases[k].v;
        if (cases[k].want) {
            init_refused(f->s, &c, cases[k].want);
            /* A restore from a checkpoint with it too. */
            float params[MAXN] = {0};
            char err[512] = "";
            assert_int_equal(ps_shard_restore(f->s, &c, 3, params, NULL, err, sizeof err),
                             CM_EINVAL);
            if (!strstr(err, cases[k].want)) fail_msg("restore: '%s'", err);
            int64_t v = -1;
            assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_NOT_READY);
        } else {
            init_ok(f, &c);
        }
    }
    /* num_workers. */
    renew(f);
    ps_shard_config c = cfg_make(PS_OPTIM_SGD, 65536, PS_SYNC, PS_AGG_MEAN);
    init_refused(f->s, &c, "invalid init config: num_workers 65536 (must be 1 to 4096)");
    c.num_workers = PS_SHARD_MAX_WORKERS + 1;
    init_refused(f->s, &c, "num_workers 4097");
    c.num_workers = 0;
    init_refused(f->s, &c, "num_workers 0");
    c.num_workers = PS_SHARD_MAX_WORKERS;
    init_ok(f, &c);

    /* The tables' optimizer, on a model with tables only. */
    c = cfg_make(PS_OPTIM_SGD, 2, PS_SYNC, PS_AGG_MEAN);
    c.table_optim = (ps_optim_cfg){.kind = PS_OPTIM_ADAM, .lr = 0.0f, .beta2 = 7.0f};
    renew(f);
    init_ok(f, &c); /* The MLP has no tables: not used. */
    cm_var tv[2];
    memset(tv, 0, sizeof tv);
    snprintf(tv[0].name, sizeof tv[0].name, "emb");
    tv[0].kind = CM_VAR_TABLE;
    tv[0].dim = 4;
    tv[0].init = CM_INIT_ZERO;
    tv[1] = (cm_var){.kind = CM_VAR_DENSE, .ndims = 1, .dims = {3}, .init = CM_INIT_ZERO};
    snprintf(tv[1].name, sizeof tv[1].name, "b");
    char err[256];
    cm_model *m = NULL;
    cm_placement *pl = NULL;
    ps_shard *s = NULL;
    if (cm_model_create_from_vars("t", tv, 2, &m, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(cm_placement_create(m, 1, 1024, &pl), CM_OK);
    assert_int_equal(ps_shard_create(m, pl, 0, &s), CM_OK);
    c.table_optim = ps_optim_defaults(PS_OPTIM_ADAM, 0.5f);
    c.table_optim.beta2 = 1.0f;
    init_refused(s, &c, "invalid init config: table optimizer (adam) beta2 1, must be in (0, 1)");
    c.table_optim = ps_optim_defaults(PS_OPTIM_ADAGRAD, NAN);
    init_refused(s, &c, "table optimizer (adagrad) lr nan");
    c.table_optim = ps_optim_defaults(PS_OPTIM_ADAGRAD, 0.5f);
    init_on(s, &c);
    ps_shard_destroy(s);
    cm_placement_destroy(pl);
    cm_model_destroy(m);
}

/* Memory: a config whose state is over the shard's limit is refused before
 * anything is allocated (init, restore, restore_owned), with the sizes; the
 * limit is exact (the state the stats report fits a limit of that many
 * bytes, and not one less). */
static void test_memory_limit(void **state) {
    fixture *f = *state;
    assert_true(ps_shard_default_memory_limit() >= ((size_t)64 << 20));
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.mem_limit, ps_shard_default_memory_limit());
    assert_int_equal(st.mem_bytes, 0);
    /* What sync with 4096 workers takes here (staging 4096 x the shard). */
    ps_shard_config c = cfg_make(PS_OPTIM_ADAM, PS_SHARD_MAX_WORKERS, PS_SYNC, PS_AGG_MEAN);
    init_ok(f, &c);
    ps_shard_stats_get(f->s, &st);
    size_t need = st.mem_bytes, numel = ps_shard_numel(f->s);
    assert_true(need >= (PS_SHARD_MAX_WORKERS + 5) * numel * sizeof(float));
    for (int k = 0; k < 2; k++) {
        renew(f);
        ps_shard_set_memory_limit(f->s, need - (size_t)(1 - k));
        char err[512] = "";
        int64_t v = -1;
        int rc = ps_shard_init(f->s, &c, &v, err, sizeof err);
        if (k == 1) {
            assert_int_equal(rc, CM_OK);
            break;
        }
        if (rc != CM_ENOMEM || !strstr(err, "shard 0: sync mode with 4096 workers needs") ||
            !strstr(err, "sync staging 4096 x") || !strstr(err, "over the shard's memory limit"))
            fail_msg("rc %d '%s'", rc, err);
        ps_shard_config got;
        assert_false(ps_shard_config_get(f->s, &got));
        assert_int_equal(push_step(f, 0, 0, &v), PS_PUSH_NOT_READY);
        /* Restores too; restore_owned leaves the buffers to the caller. */
        float params[MAXN] = {0};
        assert_int_equal(ps_shard_restore(f->s, &c, 7, params, NULL, err, sizeof err),
                         CM_ENOMEM);
        float *own = cm_alloc_aligned(numel * sizeof(float));
        float *slots = cm_alloc_aligned(2 * numel * sizeof(float));
        assert_int_equal(ps_shard_restore_owned(f->s, &c, 7, own, slots, err, sizeof err),
                         CM_ENOMEM);
        free(own);
        free(slots);
        assert_false(ps_shard_config_get(f->s, &got));
        /* Async needs no staging: it fits. */
        ps_shard_config a = c;
        a.sync = PS_ASYNC;
        init_ok(f, &a);
    }
    /* A limit of 0 is the default again. */
    ps_shard_set_memory_limit(f->s, 0);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.mem_limit, ps_shard_default_memory_limit());
}

/* Rows grow with pushes: a push whose rows could take the shard past its
 * limit is refused (PS_PUSH_NOMEM) and changes nothing; a training read
 * then reads missing rows without creating them (the same values). */
static void test_rows_memory_limit(void **state) {
    fixture *f = *state;
    ps_shard_config c = rcfg(2, PS_SYNC, PS_OPTIM_ADAGRAD);
    init_on(f->s, &c);
    ps_shard_stats st;
    ps_shard_stats_get(f->s, &st);
    /* Room for the state and less than a chunk of rows more. */
    ps_shard_set_memory_limit(f->s, st.mem_bytes + 1024);
    rlist l0, l1;
    rlist_fill(f, &l0, 0, 0);
    rlist_fill(f, &l1, 1, 0);
    static rstate before;
    rstate_get(f, f->s, &before);
    char err[256] = "";
    int64_t v = -1;
    assert_int_equal(push_rows(f, f->s, 0, 0, 1, &l0, 1, &v, err, sizeof err), PS_PUSH_NOMEM);
    if (!strstr(err, "rows from worker 0 could take") || !strstr(err, "memory limit"))
        fail_msg("'%s'", err);
    expect_rstate(f, f->s, &before, 0);
    /* A training read of missing rows: their initial values, not created. */
    const cm_var *tv = &f->m->vars[f->m->table_var[0]];
    float out[4], want[4];
    cm_row_init(tv, SEED, f->rid[0][5], want);
    assert_int_equal(pull_rows_now(f->s, 0, 0, &f->rid[0][5], 1, 1, out), 0);
    expect_same(want, out, 4);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.rows, 0);
    /* With room, the same pushes go through, and the read creates. */
    ps_shard_set_memory_limit(f->s, 0);
    push_rows_ok(f, f->s, 0, 0, 1, &l0, 1, PS_PUSH_OK, 0);
    push_rows_ok(f, f->s, 1, 0, 1, &l1, 1, PS_PUSH_OK, 1);
    expect_step0_rows(f, f->s, &c, &l0, &l1);
    ps_shard_stats_get(f->s, &st);
    uint64_t rows = st.rows;
    assert_int_equal(pull_rows_now(f->s, 1, 0, &f->rid[0][60], 1, 1, out), 1);
    ps_shard_stats_get(f->s, &st);
    assert_int_equal(st.rows, rows + 1);
    assert_true(st.mem_bytes > before.st.mem_bytes);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_scalar_variable_push),
#define T(fn) cmocka_unit_test_setup_teardown(fn, fx_setup, fx_teardown)
        T(test_layout_splits_kernels),
        T(test_push_refused_before_init),
        T(test_pull_waits_until_init),
        T(test_init_idempotent_and_conflict),
        T(test_initial_values),
        T(test_init_from_values_is_its_own_config),
        T(test_sync_mean_sgd_exact),
        cmocka_unit_test(test_sync_last_push_applied_exact),
        T(test_backup_sync_split_push),
        T(test_backup_sync),
        T(test_checkpoint_freeze),
        T(test_sync_sum_independent_of_arrival_order),
        T(test_duplicate_push_not_counted),
        T(test_stale_and_early_counted),
        T(test_negative_step_before_any_push),
        T(test_stats_counters),
        T(test_pull_answered_once_when_version_applies),
        T(test_snapshot_immutable),
        T(test_invalid_pushes_leave_state_unchanged),
        T(test_async_applies_each_push),
        T(test_async_in_place_only_when_unheld),
        T(test_sum_add_exact),
        T(test_bf16_rounding),
        T(test_bf16_push_equals_fp32_of_rounded),
        T(test_pushes_in_pieces),
        T(test_async_step_in_calls),
        T(test_async_step_parts_one_version),
        T(test_async_step_parts_refused),
        T(test_abort_waiters),
        T(test_destroy_answers_waiters),
        T(test_concurrent_sync_pushes),
        T(test_partial_pushes_sync),
        T(test_partial_waiter_aborted),
        T(test_partial_push_async),
        T(test_checkpoint_hook_and_restore),
        T(test_checkpoint_worker_steps),
        T(test_rows_refused_without_tables),
        T(test_async_step_bound),
        T(test_nonfinite_dense_refused),
        T(test_nonfinite_skipped),
        T(test_config_validated),
        T(test_memory_limit),
#define R(fn) cmocka_unit_test_setup_teardown(fn, rx_setup, fx_teardown)
        R(test_rows_sync_step_closes_when_all_in),
        R(test_rows_sync_rank_order_sum),
        R(test_rows_duplicate_not_counted),
        R(test_rows_sync_need_final),
        R(test_rows_validation),
        R(test_rows_async),
        R(test_rows_pull),
        R(test_rows_hook_rollback_restore),
        R(test_rows_dump_pages),
        R(test_rows_nonfinite),
        R(test_rows_memory_limit),
#undef R
        /* Last: under ASan a failure here ends the process. */
        T(test_snapshot_outlives_shard),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
