/* test_rowspill.c - embedding rows beyond memory: ps_rows with a row budget
 * over a LevelDB row store (storage/st_rowdb).
 * SPDX-License-Identifier: MIT
 *
 * The reference is the same store without a budget, given the same calls:
 * every row (values, optimizer slots, update count) must be bit-identical,
 * whichever tier it was in, while the rows in memory stay within the
 * budget. Also: the row store's key order, reads for evaluation of rows
 * that are only stored, clear, restore (put) over stored rows, and that
 * CLOCK keeps rows used on every batch in memory.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "tests/unit/tu_tmpdir.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/cm_model.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "ps/ps_rows.h"
#include "storage/st_rowdb.h"

#define SEED 99
#define DIM 8


static int group_setup(void **state) {
    (void)state;
    return tu_tmpdir_create("test_rowspill");
}

static int group_teardown(void **state) {
    (void)state;
    return tu_tmpdir_remove();
}

/* Two tables of DIM floats a row (after a dense variable). */
static cm_model *make_model(void) {
    cm_var vars[3];
    memset(vars, 0, sizeof vars);
    snprintf(vars[0].name, sizeof vars[0].name, "bias");
    vars[0].kind = CM_VAR_DENSE;
    vars[0].ndims = 1;
    vars[0].dims[0] = 1;
    for (int t = 0; t < 2; t++) {
        cm_var *v = &vars[1 + t];
        snprintf(v->name, sizeof v->name, "emb%d", t);
        v->kind = CM_VAR_TABLE;
        v->ndims = 1;
        v->dims[0] = DIM;
        v->dim = DIM;
        v->init = CM_INIT_UNIFORM;
        v->init_scale = 0.05f;
    }
    cm_model *m = NULL;
    char err[128];
    assert_int_equal(cm_model_create_from_vars("spill", vars, 3, &m, err, sizeof err), CM_OK);
    return m;
}

/* A store with a budget of 'rows' rows of the model (and its row store in
 * the temporary directory), and the same without a budget. */
typedef struct pair {
    cm_model *m;
    st_rowdb *db;
    ps_rows *small, *ref;
    size_t budget;
} pair;

static pair make_pair(int kind, size_t rows) {
    pair p = {.m = make_model()};
    ps_optim_cfg oc = ps_optim_defaults(kind, 0.1f);
    p.small = ps_rows_create(p.m, &oc, SEED);
    p.ref = ps_rows_create(p.m, &oc, SEED);
    char dir[128], err[256];
    snprintf(dir, sizeof dir, "%s/rows", tmpdir);
    assert_int_equal(st_rowdb_open(dir, &p.db, err, sizeof err), CM_OK);
    /* One row's cost as ps_rows counts it: floats, id, count, flags and two
     * map entries. */
    size_t cost = (size_t)DIM * (size_t)(1 + ps_rows_nslots(p.small)) * 4 + 17 + 32;
    p.budget = rows * cost;
    ps_rows_set_spill(p.small, p.db, p.budget);
    return p;
}

static void free_pair(pair *p) {
    ps_rows_destroy(p->small);
    ps_rows_destroy(p->ref);
    st_rowdb_close(p->db);
    cm_model_destroy(p->m);
}

/* Batches of distinct ids drawn from a skewed range (some hot, many cold),
 * applied (and read for training) on both stores. */
static void train(pair *p, cm_rng *rng, int batches, size_t n, uint64_t range) {
    uint64_t *ids = malloc(n * sizeof *ids);
    float *g = malloc(n * DIM * sizeof *g), *a = malloc(n * DIM * sizeof *a),
          *b = malloc(n * DIM * sizeof *b);
    for (int it = 0; it < batches; it++) {
        int table = it % 2;
        size_t k = 0;
        while (k < n) {
            uint64_t r = cm_rng_next(rng);
            /* Half the ids from 64 hot ones, the rest spread (scrambled). */
            uint64_t id = (r & 1) ? (r >> 8) % 64 : ((r >> 8) % range) * 0x9E3779B97F4A7C15ull;
            int dup = 0;
            for (size_t j = 0; j < k; j++) dup |= ids[j] == id;
            if (!dup) ids[k++] = id;
        }
        ps_rows_read(p->small, table, ids, n, 1, a);
        ps_rows_read(p->ref, table, ids, n, 1, b);
        assert_memory_equal(a, b, n * DIM * sizeof *a);
        for (size_t i = 0; i < n * DIM; i++) g[i] = (float)(cm_rng_uniform(rng) - 0.5);
        ps_rows_apply(p->small, table, ids, n, g, 0.5f);
        ps_rows_apply(p->ref, table, ids, n, g, 0.5f);
        ps_rows_spill_stats st;
        ps_rows_spill_stats_get(p->small, &st);
        assert_true(st.resident_bytes <= p->budget);
    }
    free(ids);
    free(g);
    free(a);
    free(b);
}

/* Every row of the reference, found bit-identical in the budgeted store
 * (and the counts agree). */
typedef struct cmp_ctx {
    ps_rows *other;
    int table, nslots;
    size_t seen;
} cmp_ctx;

static int compare_row(void *ud, uint64_t id, const float *values, const float *slots,
                       int64_t count) {
    cmp_ctx *c = ud;
    int64_t oc = -1;
    const float *o = ps_rows_find(c->other, c->table, id, &oc);
    assert_non_null(o);
    assert_memory_equal(o, values, DIM * sizeof(float));
    if (c->nslots) assert_memory_equal(o + DIM, slots, (size_t)c->nslots * DIM * sizeof(float));
    assert_int_equal(oc, count);
    c->seen++;
    return CM_OK;
}

static void assert_same_rows(pair *p) {
    for (int t = 0; t < 2; t++) {
        assert_int_equal(ps_rows_count(p->small, t), ps_rows_count(p->ref, t));
        /* Visiting the budgeted store (memory, then stored rows) against
         * finds in the reference, and the other way round (finds in the
         * budgeted store load stored rows). */
        cmp_ctx c = {.other = p->ref, .table = t, .nslots = ps_rows_nslots(p->ref)};
        assert_int_equal(ps_rows_visit(p->small, t, compare_row, &c), CM_OK);
        assert_int_equal(c.seen, ps_rows_count(p->ref, t));
        cmp_ctx d = {.other = p->small, .table = t, .nslots = ps_rows_nslots(p->ref)};
        assert_int_equal(ps_rows_visit(p->ref, t, compare_row, &d), CM_OK);
        assert_int_equal(d.seen, ps_rows_count(p->ref, t));
    }
}

/* Adam (two slots, a per-row step count) and Adagrad: 40 batches of 200
 * rows from 20,000 ids through a budget of 300 rows. */
static void check_optimizer(int kind) {
    pair p = make_pair(kind, 300);
    cm_rng rng;
    cm_rng_init(&rng, 7);
    train(&p, &rng, 40, 200, 20000);
    ps_rows_spill_stats st;
    ps_rows_spill_stats_get(p.small, &st);
    assert_true(st.evictions > 1000);
    assert_true(st.loads > 100);  /* Rows read back from the store. */
    assert_true(st.on_disk > 1000);
    assert_true(st.bytes_written > 0);
    assert_true(st.resident <= 300);
    assert_true(ps_rows_total(p.ref) > 3000);
    assert_same_rows(&p);
    free_pair(&p);
}

static void test_adam_rows_bit_identical(void **state) {
    (void)state;
    check_optimizer(PS_OPTIM_ADAM);
}

static void test_adagrad_rows_bit_identical(void **state) {
    (void)state;
    check_optimizer(PS_OPTIM_ADAGRAD);
}

/* An evaluation read of a row that is only stored gives its stored values,
 * not its initial ones; of a row that never existed, the initial values. */
static void test_eval_read_of_stored_row(void **state) {
    (void)state;
    pair p = make_pair(PS_OPTIM_SGD, 10);
    cm_rng rng;
    cm_rng_init(&rng, 8);
    train(&p, &rng, 10, 50, 5000);
    uint64_t ids[256];
    size_t n = 0;
    for (uint64_t id = 0; n < 256 && id < 64; id++) ids[n++] = id; /* hot ids */
    for (uint64_t k = 0; n < 256; k++) ids[n++] = (k + 100000) * 0x9E3779B97F4A7C15ull;
    float a[256 * DIM], b[256 * DIM];
    ps_rows_read(p.small, 0, ids, n, 0, a);
    ps_rows_read(p.ref, 0, ids, n, 0, b);
    assert_memory_equal(a, b, sizeof a);
    assert_int_equal(ps_rows_count(p.small, 0), ps_rows_count(p.ref, 0)); /* none created */
    free_pair(&p);
}

/* Clear drops stored rows too; restore (put) over stored rows counts each
 * row once and the newest values win. */
static void test_clear_and_put(void **state) {
    (void)state;
    pair p = make_pair(PS_OPTIM_ADAGRAD, 20);
    cm_rng rng;
    cm_rng_init(&rng, 9);
    train(&p, &rng, 6, 100, 3000);
    assert_true(ps_rows_total(p.small) > 100);
    ps_rows_clear(p.small);
    ps_rows_clear(p.ref);
    assert_int_equal(ps_rows_total(p.small), 0);
    float v[DIM], s[DIM], out[DIM];
    for (int round = 0; round < 2; round++)
        for (uint64_t id = 0; id < 500; id++) {
            for (int j = 0; j < DIM; j++) v[j] = (float)(id * 10 + (uint64_t)round) + (float)j;
            for (int j = 0; j < DIM; j++) s[j] = (float)round;
            ps_rows_put(p.small, 1, id, v, s, (int64_t)round);
        }
    assert_int_equal(ps_rows_count(p.small, 1), 500);
    ps_rows_spill_stats st;
    ps_rows_spill_stats_get(p.small, &st);
    assert_true(st.on_disk >= 480);
    for (uint64_t id = 0; id < 500; id += 37) {
        ps_rows_read(p.small, 1, &id, 1, 0, out);
        assert_true(out[0] == (float)(id * 10 + 1));
        int64_t count = 0;
        const float *r = ps_rows_find(p.small, 1, id, &count);
        assert_non_null(r);
        assert_int_equal(count, 1);
        assert_true(r[DIM] == 1.0f); /* the slot of the second put */
    }
    free_pair(&p);
}

/* Rows used in every batch stay in memory (CLOCK): after the warm-up, the
 * hot rows of each batch are hits. */
static void test_clock_keeps_hot_rows(void **state) {
    (void)state;
    pair p = make_pair(PS_OPTIM_SGD, 200);
    enum { HOT = 50, COLD = 50 };
    uint64_t ids[HOT + COLD];
    float out[(HOT + COLD) * DIM];
    ps_rows_spill_stats before, after;
    for (int it = 0; it < 100; it++) {
        for (int i = 0; i < HOT; i++) ids[i] = (uint64_t)i;
        for (int i = 0; i < COLD; i++) ids[HOT + i] = 1000 + (uint64_t)(it * COLD + i);
        if (it == 50) ps_rows_spill_stats_get(p.small, &before);
        ps_rows_read(p.small, 0, ids, HOT + COLD, 1, out);
    }
    ps_rows_spill_stats_get(p.small, &after);
    /* 50 batches: every cold row is new (a miss); the hot ones are hits
     * but for a few (CLOCK gives a new row the same second chance as a
     * used one, so a sweep that goes round once now and then takes a hot
     * row: 20 of 2,500 here). */
    const uint64_t hot_misses = after.misses - before.misses - 50 * COLD;
    assert_true(after.misses - before.misses >= 50 * COLD);
    assert_true(hot_misses <= 50 * HOT / 50);
    assert_int_equal(after.hits - before.hits, 50 * HOT - hot_misses);
    assert_true(after.evictions > 2000);
    free_pair(&p);
}

/* Admission after 3 training reads: before, reads give initial values
 * and gradients are dropped; then the row is created and trained. A count
 * is never under the truth (count-min), so every id read 3 times is in. */
static void test_admission(void **state) {
    (void)state;
    cm_model *m = make_model();
    ps_optim_cfg oc = ps_optim_defaults(PS_OPTIM_SGD, 0.5f);
    ps_rows *r = ps_rows_create(m, &oc, SEED);
    ps_rows_set_admission(r, 3);
    uint64_t id = 12345;
    float v[DIM], init[DIM], g[DIM];
    for (int j = 0; j < DIM; j++) g[j] = 1.0f;
    cm_row_init(&m->vars[m->table_var[0]], SEED, id, init);
    for (int seen = 1; seen <= 2; seen++) {
        ps_rows_read(r, 0, &id, 1, 1, v);
        assert_memory_equal(v, init, sizeof v);
        ps_rows_apply(r, 0, &id, 1, g, 1.0f);
        assert_int_equal(ps_rows_total(r), 0);
    }
    ps_rows_read(r, 0, &id, 1, 1, v); /* the third: admitted */
    assert_int_equal(ps_rows_total(r), 1);
    ps_rows_apply(r, 0, &id, 1, g, 1.0f);
    ps_rows_read(r, 0, &id, 1, 0, v);
    assert_true(v[0] == init[0] - 0.5f);
    ps_rows_spill_stats st;
    ps_rows_spill_stats_get(r, &st);
    assert_int_equal(st.not_admitted, 2);
    assert_int_equal(st.dropped_updates, 2);
    /* 5,000 ids read three times each (in three batches): all admitted. */
    enum { N = 5000 };
    static uint64_t ids[N];
    static float out[N * DIM];
    for (int i = 0; i < N; i++) ids[i] = 1000000 + (uint64_t)i * 7919;
    for (int k = 0; k < 3; k++) ps_rows_read(r, 1, ids, N, 1, out);
    assert_int_equal(ps_rows_count(r, 1), N);
    ps_rows_clear(r); /* counts start again */
    ps_rows_read(r, 1, ids, N, 1, out);
    assert_true(ps_rows_count(r, 1) < N / 100); /* only collisions with nothing: ~0 */
    ps_rows_destroy(r);
    cm_model_destroy(m);
}

/* Expiry after 8 steps, with a row budget so that expired rows are found
 * in memory and in the row store: a row used every step stays, rows used
 * once go (and read as their initial values after). */
static void test_expiry(void **state) {
    (void)state;
    pair p = make_pair(PS_OPTIM_SGD, 50);
    ps_rows_set_expiry(p.small, 8);
    uint64_t hot = 7, cold[400];
    float out[400 * DIM], g[400 * DIM];
    for (size_t i = 0; i < 400 * DIM; i++) g[i] = 0.25f;
    for (int i = 0; i < 400; i++) cold[i] = 5000 + (uint64_t)i;
    ps_rows_set_step(p.small, 1);
    ps_rows_read(p.small, 0, cold, 400, 1, out); /* 400 rows at step 1, most evicted */
    ps_rows_apply(p.small, 0, cold, 400, g, 1.0f);
    ps_rows_spill_stats st;
    ps_rows_spill_stats_get(p.small, &st);
    assert_true(st.on_disk > 300 && st.resident < 60);
    for (int64_t step = 2; step <= 12; step++) {
        ps_rows_set_step(p.small, step);
        ps_rows_read(p.small, 0, &hot, 1, 1, out);
        ps_rows_apply(p.small, 0, &hot, 1, g, 1.0f);
        if (step <= 9) assert_int_equal(ps_rows_count(p.small, 0), 401);
    }
    /* 1 + 8 < 12, and a sweep ran at step 12 (every 2 steps). */
    assert_int_equal(ps_rows_count(p.small, 0), 1);
    ps_rows_spill_stats_get(p.small, &st);
    assert_int_equal(st.expired, 400);
    assert_int_equal(st.on_disk, 0);
    int64_t count = 0;
    assert_non_null(ps_rows_find(p.small, 0, hot, &count));
    assert_int_equal(count, 11);
    float init[DIM];
    cm_row_init(&p.m->vars[p.m->table_var[0]], SEED, cold[3], init);
    ps_rows_read(p.small, 0, &cold[3], 1, 0, out);
    assert_memory_equal(out, init, sizeof init);
    free_pair(&p);
}

/* A row only read (not updated) since it was loaded from the row store is
 * used all the same: evicted again, its new last step goes with it, and
 * expiry counts from there, as it would with the row in memory. */
static void test_expiry_counts_reads_of_stored_rows(void **state) {
    (void)state;
    pair p = make_pair(PS_OPTIM_SGD, 20);
    ps_rows_set_expiry(p.small, 8);
    uint64_t a = 42, filler[100];
    float out[100 * DIM], g[100 * DIM];
    for (size_t i = 0; i < 100 * DIM; i++) g[i] = 0.5f;
    ps_rows_set_step(p.small, 1);
    ps_rows_read(p.small, 0, &a, 1, 1, out);
    ps_rows_apply(p.small, 0, &a, 1, g, 1.0f);
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 100; i++) filler[i] = 1000 + (uint64_t)(round * 100 + i);
        if (round == 1) { /* step 6: a training read of a, stored by now */
            ps_rows_set_step(p.small, 6);
            ps_rows_read(p.small, 0, &a, 1, 1, out);
        }
        ps_rows_read(p.small, 0, filler, 100, 1, out); /* evict a (CLOCK: within two) */
    }
    ps_rows_spill_stats st;
    ps_rows_spill_stats_get(p.small, &st);
    assert_true(st.loads >= 1 && st.resident < 30);
    ps_rows_set_step(p.small, 12); /* a sweep: cutoff 4 < 6 */
    int64_t count = -1;
    assert_non_null(ps_rows_find(p.small, 0, a, &count));
    assert_int_equal(count, 1);
    free_pair(&p);
}

static int count_rows(void *ud, uint64_t id, int64_t count, int64_t last, const float *row) {
    (void)id, (void)count, (void)last, (void)row;
    (*(int *)ud)++;
    return CM_OK;
}

typedef struct put_ctx {
    ps_rows *dst;
    int table;
} put_ctx;

static int put_into(void *ud, uint64_t id, const float *values, const float *slots,
                    int64_t count) {
    const put_ctx *c = ud;
    ps_rows_put(c->dst, c->table, id, values, slots, count);
    return CM_OK;
}

/* Every row of src into dst (no budget). */
static void copy_all(ps_rows *src, ps_rows *dst) {
    for (int t = 0; t < 2; t++) {
        put_ctx c = {dst, t};
        assert_int_equal(ps_rows_visit(src, t, put_into, &c), CM_OK);
    }
}

/* One table's keys sort together, ids ascending (big-endian), and a row's
 * entries newest first: later epochs, then higher versions. */
static void test_key_order(void **state) {
    (void)state;
    const struct {
        int table;
        uint64_t id;
        uint32_t epoch;
        int64_t version;
    } k[] = {{0, 0, 0, 0},         {0, 1, 2, 3},   {0, 1, 2, 2},         {0, 1, 1, 100},
             {0, 1, 0, INT64_MAX - 1}, {0, 1, 0, 0}, {0, 1, 0, -1},       {0, 255, 0, 0},
             {0, 256, 0, 0},       {0, UINT64_MAX, 0, 0}, {1, 0, 7, 7},   {2, 0, 0, 0}};
    const size_t n = sizeof k / sizeof k[0];
    for (size_t i = 0; i + 1 < n; i++) {
        uint8_t a[ST_ROWDB_KEY], b[ST_ROWDB_KEY];
        st_rowdb_key(k[i].table, k[i].id, k[i].epoch, k[i].version, a);
        st_rowdb_key(k[i + 1].table, k[i + 1].id, k[i + 1].epoch, k[i + 1].version, b);
        assert_true(memcmp(a, b, ST_ROWDB_KEY) < 0);
    }
}

/* A scratch row store opened on a directory that held one starts empty. */
static void test_open_empties(void **state) {
    (void)state;
    char dir[128], err[256];
    snprintf(dir, sizeof dir, "%s/again", tmpdir);
    st_rowdb *db;
    assert_int_equal(st_rowdb_open(dir, &db, err, sizeof err), CM_OK);
    float row[4] = {1, 2, 3, 4}, got[4];
    int64_t count = 0, last = 0;
    st_rowdb_put(db, 0, 42, 1, 3, 17, row, 4);
    st_rowdb_put(db, 0, 43, 1, 1, 1, row, 4);
    assert_int_equal(st_rowdb_flush(db, err, sizeof err), CM_OK);
    assert_int_equal(st_rowdb_get(db, 0, 42, &count, &last, got, 4, err, sizeof err), 1);
    assert_memory_equal(got, row, sizeof row);
    assert_int_equal(count, 3);
    assert_int_equal(last, 17);
    assert_int_equal(st_rowdb_get(db, 0, 42, &count, &last, got, 3, err, sizeof err),
                     CM_ECORRUPT);
    st_rowdb_del(db, 0, 43, 2);
    assert_int_equal(st_rowdb_flush(db, err, sizeof err), CM_OK);
    assert_int_equal(st_rowdb_get(db, 0, 43, &count, &last, got, 4, err, sizeof err), 0);
    st_rowdb_close(db);
    assert_int_equal(st_rowdb_open(dir, &db, err, sizeof err), CM_OK);
    assert_int_equal(st_rowdb_get(db, 0, 42, &count, &last, got, 4, err, sizeof err), 0);
    st_rowdb_close(db);
    /* A path that cannot be a directory: an error naming it. */
    snprintf(dir, sizeof dir, "%s/again/CURRENT/x", tmpdir);
    assert_int_equal(st_rowdb_open(dir, &db, err, sizeof err), CM_EIO);
    assert_non_null(strstr(err, dir));
}

/* Row 7's first value at 'db' as a float (-1: none). */
static float value_of(st_rowdb *db, uint64_t id) {
    float got[2];
    int64_t count, last;
    char err[256];
    int rc = st_rowdb_get(db, 0, id, &count, &last, got, 2, err, sizeof err);
    assert_true(rc == 0 || rc == 1);
    return rc ? got[0] : -1.0f;
}

static void put_value(st_rowdb *db, uint64_t id, int64_t version, float v) {
    float row[2] = {v, v};
    char err[256];
    st_rowdb_put(db, 0, id, version, 1, version, row, 2);
    assert_int_equal(st_rowdb_flush(db, err, sizeof err), CM_OK);
}

static st_rowdb *open_durable(const char *dir, uint64_t identity) {
    st_rowdb_opts o = {.durable = 1, .identity = identity};
    st_rowdb *db;
    char err[512];
    assert_int_equal(st_rowdb_open_with(dir, &o, &db, err, sizeof err), CM_OK);
    return db;
}

/* The rollback rule on incremental generations: a row changed in g1 and
 * g3, rolled back to g2, reads g1's value; the abandoned g3 stays out of
 * sight after later writes, a reopen, and a second rollback; forking at -1
 * hides everything. */
static void test_rollback_rule(void **state) {
    (void)state;
    char dir[128], err[512];
    snprintf(dir, sizeof dir, "%s/durable", tmpdir);
    st_rowdb *db = open_durable(dir, 11);
    assert_int_equal(st_rowdb_epoch(db), 0);
    put_value(db, 7, 1, 1.0f);
    put_value(db, 8, 2, 20.0f);
    put_value(db, 7, 3, 3.0f);
    assert_true(value_of(db, 7) == 3.0f);
    assert_int_equal(st_rowdb_fork(db, 2, err, sizeof err), CM_OK); /* back to g2 */
    assert_true(value_of(db, 7) == 1.0f);
    assert_true(value_of(db, 8) == 20.0f);
    put_value(db, 8, 4, 40.0f); /* the new history's g4 */
    assert_true(value_of(db, 8) == 40.0f);
    /* Durable: the epochs survive a reopen. */
    st_rowdb_close(db);
    db = open_durable(dir, 11);
    assert_int_equal(st_rowdb_epoch(db), 1);
    assert_true(value_of(db, 7) == 1.0f);
    assert_true(value_of(db, 8) == 40.0f);
    /* Back to g3 of the new history: g4 goes, and the old history's g3
     * (abandoned at the first fork) does not come back. */
    assert_int_equal(st_rowdb_fork(db, 3, err, sizeof err), CM_OK);
    assert_true(value_of(db, 7) == 1.0f);
    assert_true(value_of(db, 8) == 20.0f);
    /* A removal hides older values; a visit skips it. */
    st_rowdb_del(db, 0, 8, 5);
    assert_int_equal(st_rowdb_flush(db, err, sizeof err), CM_OK);
    assert_true(value_of(db, 8) == -1.0f);
    int n = 0;
    assert_int_equal(st_rowdb_visit(db, 0, 2, count_rows, &n, err, sizeof err), CM_OK);
    assert_int_equal(n, 1);
    /* Another model's or shard's rows are refused, naming the directory. */
    st_rowdb_close(db);
    st_rowdb_opts o = {.durable = 1, .identity = 12};
    assert_int_equal(st_rowdb_open_with(dir, &o, &db, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, dir));
    db = open_durable(dir, 11);
    assert_int_equal(st_rowdb_fork(db, -1, err, sizeof err), CM_OK);
    assert_true(value_of(db, 7) == -1.0f);
    st_rowdb_close(db);
    st_rowdb_remove(dir);
}

/* Compaction keeps what a restore of 'keep' or newer reads, nothing else. */
static void test_compact(void **state) {
    (void)state;
    char dir[128], err[512];
    snprintf(dir, sizeof dir, "%s/compact", tmpdir);
    st_rowdb *db = open_durable(dir, 5);
    put_value(db, 1, 1, 1.0f);
    put_value(db, 1, 2, 2.0f);
    put_value(db, 1, 3, 3.0f);
    put_value(db, 2, 1, 10.0f); /* only an old entry: kept (g2 and g3 read it) */
    put_value(db, 3, 1, 100.0f);
    st_rowdb_del(db, 0, 3, 2); /* removed at 2: nothing of it is needed */
    assert_int_equal(st_rowdb_flush(db, err, sizeof err), CM_OK);
    put_value(db, 4, 3, 1000.0f);
    assert_int_equal(st_rowdb_fork(db, 2, err, sizeof err), CM_OK); /* 4 @ 3 abandoned */
    put_value(db, 1, 4, 4.0f);
    /* Entries: 1@1 (dropped), 1@2 (kept: newest <= 2), 1@3 (abandoned), 1@4,
     * 2@1 (kept), 3@1 and 3@2 (dropped), 4@3 (abandoned). */
    assert_int_equal(st_rowdb_compact(db, 2, err, sizeof err), 5);
    assert_true(value_of(db, 1) == 4.0f);
    assert_true(value_of(db, 2) == 10.0f);
    assert_true(value_of(db, 3) == -1.0f);
    assert_true(value_of(db, 4) == -1.0f);
    assert_int_equal(st_rowdb_fork(db, 2, err, sizeof err), CM_OK); /* g2 again */
    assert_true(value_of(db, 1) == 2.0f);
    assert_true(value_of(db, 2) == 10.0f);
    assert_int_equal(st_rowdb_compact(db, 2, err, sizeof err), 1); /* 1@4 */
    st_rowdb_stats st;
    st_rowdb_stats_get(db, &st);
    assert_int_equal(st.compacted, 6);
    st_rowdb_close(db);
    st_rowdb_remove(dir);
}

/* Incremental checkpoints through ps_rows: each writes only the rows
 * changed since the last, and a new ps_rows over the store, reset to a
 * checkpoint's version and counts (a restart), reads every row of that
 * version bit-identically, though rows were evicted and changed after it. */
typedef struct ckpt_writer {
    st_rowdb *db;
    st_rowdb_batch *b;
    int64_t version;
    size_t n;
} ckpt_writer;

static void write_ckpt_row(void *ud, int table, uint64_t id, int64_t count, int64_t last,
                           const float *row) {
    ckpt_writer *w = ud;
    st_rowdb_batch_put(w->db, w->b, table, id, w->version, count, last, row, 2 * DIM);
    w->n++;
}

static size_t checkpoint(ps_rows *r, st_rowdb *db, int64_t v, uint64_t counts[2]) {
    ps_rows_set_step(r, v);
    ckpt_writer w = {.db = db, .b = st_rowdb_batch_create(), .version = v};
    size_t n = ps_rows_checkpoint(r, write_ckpt_row, &w);
    char err[256];
    assert_int_equal(st_rowdb_write(db, w.b, 1, err, sizeof err), CM_OK);
    st_rowdb_batch_destroy(w.b);
    for (int t = 0; t < 2; t++) counts[t] = ps_rows_count(r, t);
    assert_int_equal(n, w.n);
    return n;
}

static void test_incremental_checkpoint(void **state) {
    (void)state;
    pair p = make_pair(PS_OPTIM_ADAGRAD, 300);
    st_rowdb_close(p.db);
    char dir[128];
    snprintf(dir, sizeof dir, "%s/ckpt", tmpdir);
    p.db = open_durable(dir, 3);
    ps_rows_set_spill(p.small, p.db, p.budget);
    ps_rows_clear(p.small);
    cm_rng rng;
    cm_rng_init(&rng, 5);
    train(&p, &rng, 20, 200, 5000);
    uint64_t counts[2], counts2[2];
    size_t first = checkpoint(p.small, p.db, 20, counts);
    assert_true(first > 0 && first <= 300); /* only rows in memory are copied */
    /* The state at 20: the reference's (which has every row). */
    ps_optim_cfg oc = ps_optim_defaults(PS_OPTIM_ADAGRAD, 0.1f);
    ps_rows *at20 = ps_rows_create(p.m, &oc, SEED);
    copy_all(p.ref, at20);
    /* A few rows change: the next checkpoint writes about those only. */
    uint64_t few[5] = {1, 2, 3, 4, 5};
    float g[5 * DIM];
    for (int i = 0; i < 5 * DIM; i++) g[i] = 0.25f;
    ps_rows_apply(p.small, 0, few, 5, g, 1.0f);
    ps_rows_apply(p.ref, 0, few, 5, g, 1.0f);
    assert_int_equal(checkpoint(p.small, p.db, 21, counts2), 5);
    /* More training after 21 (evicting changed rows, tagged > 21). */
    ps_rows_set_step(p.small, 22);
    train(&p, &rng, 10, 200, 5000);
    ps_rows_destroy(p.small);
    /* Restart at 20: rows read on demand equal the state at 20. */
    p.small = ps_rows_create(p.m, &oc, SEED);
    ps_rows_set_spill(p.small, p.db, p.budget);
    ps_rows_reset(p.small, 20, counts);
    for (int t = 0; t < 2; t++) {
        assert_int_equal(ps_rows_count(p.small, t), counts[t]);
        assert_int_equal(ps_rows_count(p.small, t), ps_rows_count(at20, t));
        cmp_ctx c = {.other = p.small, .table = t, .nslots = 1};
        assert_int_equal(ps_rows_visit(at20, t, compare_row, &c), CM_OK);
        assert_int_equal(c.seen, counts[t]);
    }
    ps_rows_destroy(at20);
    free_pair(&p);
    st_rowdb_remove(dir);
}

/* A full disk while evicting (here: a file size limit, so LevelDB's log
 * write fails with EFBIG): the process stops with status 1 and a message
 * naming the row store and the error, instead of losing the rows. */
static void test_full_disk_stops(void **state) {
    (void)state;
    char dir[128];
    snprintf(dir, sizeof dir, "%s/full", tmpdir);
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 2);
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit lim = {256 << 10, 256 << 10};
        setrlimit(RLIMIT_FSIZE, &lim);
        cm_model *m = make_model();
        ps_optim_cfg oc = ps_optim_defaults(PS_OPTIM_ADAGRAD, 0.1f);
        ps_rows *r = ps_rows_create(m, &oc, SEED);
        st_rowdb *db;
        char err[256];
        if (st_rowdb_open(dir, &db, err, sizeof err) != CM_OK) _exit(3);
        ps_rows_set_spill(r, db, 64 << 10);
        uint64_t ids[512];
        float out[512 * DIM];
        for (uint64_t b = 0; b < 100000; b++) { /* 20 MiB of rows through 256 KiB files */
            for (int i = 0; i < 512; i++) ids[i] = b * 512 + (uint64_t)i;
            ps_rows_read(r, 0, ids, 512, 1, out);
        }
        _exit(4); /* never stopped */
    }
    close(fds[1]);
    char buf[4096] = "";
    size_t n = 0;
    ssize_t k;
    while ((k = read(fds[0], buf + n, sizeof buf - 1 - n)) > 0) n += (size_t)k;
    buf[n] = '\0';
    close(fds[0]);
    int status;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), CM_EXIT_RETRY);
    assert_non_null(strstr(buf, dir));
    assert_non_null(strstr(buf, "evicting rows"));
    assert_non_null(strstr(buf, "File too large"));
    st_rowdb_remove(dir);
}

/* Stored rows read off the owner's lock (ps_rows_fetch): those still
 * missing are put into memory, except any written since the reader's
 * snapshot (here: rows loaded, updated and evicted again between begin and
 * end, whose snapshot copy is stale), and nothing after a reset; the rows
 * stay bit-identical to the reference. */
typedef struct ids_ctx {
    uint64_t ids[400];
    size_t n;
} ids_ctx;

static int collect_id(void *ud, uint64_t id, const float *values, const float *slots,
                      int64_t count) {
    (void)values, (void)slots, (void)count;
    ids_ctx *c = ud;
    if (c->n < 400) c->ids[c->n++] = id;
    return CM_OK;
}

static void test_fetch_off_lock(void **state) {
    (void)state;
    pair p = make_pair(PS_OPTIM_ADAGRAD, 100);
    cm_rng rng;
    cm_rng_init(&rng, 21);
    train(&p, &rng, 10, 200, 5000);
    ids_ctx c = {.n = 0};
    ps_rows_visit(p.ref, 0, collect_id, &c);
    assert_int_equal(c.n, 400);
    ps_rows_fetch *f = ps_rows_fetch_begin(p.small, 0, c.ids, c.n);
    assert_non_null(f);
    /* Meanwhile the first 50 are updated and then evicted by more batches. */
    float g[50 * DIM];
    for (int i = 0; i < 50 * DIM; i++) g[i] = 0.5f;
    ps_rows_apply(p.small, 0, c.ids, 50, g, 1.0f);
    ps_rows_apply(p.ref, 0, c.ids, 50, g, 1.0f);
    train(&p, &rng, 4, 200, 5000);
    ps_rows_fetch_read(f);
    size_t got = ps_rows_fetch_end(p.small, f);
    assert_true(got > 0);
    assert_same_rows(&p);
    /* A reset between begin and end: nothing is put. */
    ps_rows_clear(p.small);
    ps_rows_clear(p.ref);
    train(&p, &rng, 10, 200, 5000);
    f = ps_rows_fetch_begin(p.small, 1, c.ids, c.n);
    assert_non_null(f);
    ps_rows_clear(p.small);
    ps_rows_clear(p.ref);
    ps_rows_fetch_read(f);
    assert_int_equal(ps_rows_fetch_end(p.small, f), 0);
    assert_int_equal(ps_rows_total(p.small), 0);
    free_pair(&p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adam_rows_bit_identical),
        cmocka_unit_test(test_adagrad_rows_bit_identical),
        cmocka_unit_test(test_eval_read_of_stored_row),
        cmocka_unit_test(test_clear_and_put),
        cmocka_unit_test(test_clock_keeps_hot_rows),
        cmocka_unit_test(test_admission),
        cmocka_unit_test(test_expiry),
        cmocka_unit_test(test_expiry_counts_reads_of_stored_rows),
        cmocka_unit_test(test_key_order),
        cmocka_unit_test(test_open_empties),
        cmocka_unit_test(test_rollback_rule),
        cmocka_unit_test(test_compact),
        cmocka_unit_test(test_incremental_checkpoint),
        cmocka_unit_test(test_full_disk_stops),
        cmocka_unit_test(test_fetch_off_lock),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
