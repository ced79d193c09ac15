/* test_rows.c - the embedding row store: creation, reads, row-wise updates,
 * growth, visits, restore and clear.
 * SPDX-License-Identifier: MIT
 *
 * References: cm_row_init for initial values, ps_optim_apply on a private
 * copy of a row for updates (bit for bit), and a closed form for lazy
 * Adam's per-row bias correction.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_model.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "ps/ps_rows.h"

#define SEED 1234

/* Tables "emb<i>" of the given dims, with a dense variable first so table
 * index and variable index differ. */
static cm_model *make_model(const int *dims, int ntables) {
    cm_var vars[8];
    memset(vars, 0, sizeof vars);
    snprintf(vars[0].name, sizeof vars[0].name, "bias");
    vars[0].kind = CM_VAR_DENSE;
    vars[0].ndims = 1;
    vars[0].dims[0] = 1;
    vars[0].init = CM_INIT_ZERO;
    for (int t = 0; t < ntables; t++) {
        cm_var *v = &vars[1 + t];
        snprintf(v->name, sizeof v->name, "emb%d", t);
        v->kind = CM_VAR_TABLE;
        v->ndims = 1;
        v->dims[0] = dims[t];
        v->dim = dims[t];
        v->init = CM_INIT_UNIFORM;
        v->init_scale = 0.05f;
    }
    cm_model *m = NULL;
    char err[128];
    assert_int_equal(cm_model_create_from_vars("test", vars, 1 + ntables, &m, err, sizeof err),
                     CM_OK);
    assert_int_equal(m->ntables, ntables);
    return m;
}

static const cm_var *table_var(const cm_model *m, int t) { return &m->vars[m->table_var[t]]; }

/* A model of tables of these dims and a store over it (seed SEED). */
typedef struct fixture {
    cm_model *m;
    ps_rows *r;
} fixture;

static fixture setup(const int *dims, int ntables, int kind, float lr) {
    fixture f = {.m = make_model(dims, ntables)};
    ps_optim_cfg oc = ps_optim_defaults(kind, lr);
    f.r = ps_rows_create(f.m, &oc, SEED);
    return f;
}

static void teardown(fixture *f) {
    ps_rows_destroy(f->r);
    cm_model_destroy(f->m);
}

static void random_floats(cm_rng *rng, float *x, size_t n, float scale) {
    for (size_t i = 0; i < n; i++) x[i] = scale * (2.0f * cm_rng_uniform(rng) - 1.0f);
}

/* An evaluation read gives initial values and creates nothing; a training
 * read creates (once per distinct id), with cm_row_init's values, zeroed
 * slots and count 0. */
static void test_training_read_creates_eval_read_does_not(void **state) {
    (void)state;
    const int dims[] = {5};
    fixture f = setup(dims, 1, PS_OPTIM_ADAM, 0.01f);
    const uint64_t ids[] = {17, 4, 17, 99};
    float out[4 * 5], ref[5];

    ps_rows_read(f.r, 0, ids, 4, 0, out);
    assert_int_equal(ps_rows_count(f.r, 0), 0);
    assert_null(ps_rows_find(f.r, 0, 17, NULL));
    for (int i = 0; i < 4; i++) {
        cm_row_init(table_var(f.m, 0), SEED, ids[i], ref);
        assert_memory_equal(out + i * 5, ref, sizeof ref);
    }

    memset(out, 0, sizeof out);
    ps_rows_read(f.r, 0, ids, 4, 1, out);
    assert_int_equal(ps_rows_count(f.r, 0), 3);
    assert_int_equal(ps_rows_total(f.r), 3);
    for (int i = 0; i < 4; i++) {
        cm_row_init(table_var(f.m, 0), SEED, ids[i], ref);
        assert_memory_equal(out + i * 5, ref, sizeof ref);
        int64_t count = -1;
        const float *row = ps_rows_find(f.r, 0, ids[i], &count);
        assert_non_null(row);
        assert_int_equal(count, 0);
        assert_memory_equal(row, ref, sizeof ref);
        for (int j = 0; j < 2 * 5; j++) assert_true(row[5 + j] == 0.0f);
    }
    /* Reading again creates nothing more. */
    ps_rows_read(f.r, 0, ids, 4, 1, out);
    assert_int_equal(ps_rows_count(f.r, 0), 3);
    teardown(&f);
}

/* Initial values depend on the seed (the store passes its own). */
static void test_initial_values_follow_seed(void **state) {
    (void)state;
    const int dims[] = {8};
    cm_model *m = make_model(dims, 1);
    ps_optim_cfg oc = ps_optim_defaults(PS_OPTIM_SGD, 0.1f);
    ps_rows *a = ps_rows_create(m, &oc, SEED), *b = ps_rows_create(m, &oc, SEED + 1);
    uint64_t ids[50];
    float va[50 * 8], vb[50 * 8], ref[8];
    for (int i = 0; i < 50; i++) ids[i] = (uint64_t)i * 1000003u;
    ps_rows_read(a, 0, ids, 50, 1, va);
    ps_rows_read(b, 0, ids, 50, 1, vb);
    for (int i = 0; i < 50; i++) {
        cm_row_init(table_var(m, 0), SEED + 1, ids[i], ref);
        assert_memory_equal(vb + i * 8, ref, sizeof ref);
    }
    assert_memory_not_equal(va, vb, sizeof va);
    ps_rows_destroy(a);
    ps_rows_destroy(b);
    cm_model_destroy(m);
}

/* A private copy of a row: what the store must hold after the same updates. */
#define RDIM 6
typedef struct ref_row {
    uint64_t id;
    float w[RDIM];
    float s[2 * RDIM];
    int64_t t;
} ref_row;

/* Each optimizer: rows updated in varying subsets (so their counts differ),
 * with scale 1 and 0.5, are bit for bit ps_optim_apply on a copy with the
 * row's own step count. */
static void test_apply_equals_optim_on_copy(void **state) {
    (void)state;
    const int dims[] = {RDIM};
    cm_model *m = make_model(dims, 1);
    const int kinds[] = {PS_OPTIM_SGD, PS_OPTIM_MOMENTUM, PS_OPTIM_ADAM, PS_OPTIM_ADAGRAD};
    for (int k = 0; k < 4; k++) {
        ps_optim_cfg oc = ps_optim_defaults(kinds[k], 0.03f);
        ps_rows *r = ps_rows_create(m, &oc, SEED);
        assert_int_equal(ps_rows_nslots(r), ps_optim_nslots(kinds[k]));
        ref_row ref[5];
        memset(ref, 0, sizeof ref);
        const uint64_t idv[5] = {0, 3, 1000, UINT64_MAX, 77};
        for (int i = 0; i < 5; i++) {
            ref[i].id = idv[i];
            cm_row_init(table_var(m, 0), SEED, idv[i], ref[i].w);
        }
        cm_rng rng;
        cm_rng_init(&rng, 5 + (uint64_t)k);
        for (int step = 0; step < 12; step++) {
            uint64_t ids[5];
            int pick[5], n = 0;
            for (int i = 0; i < 5; i++)
                if ((step + 1) % (i + 1) == 0) { /* row i every (i+1)-th step */
                    pick[n] = i;
                    ids[n++] = idv[i];
                }
            float g[5 * RDIM], gs[RDIM];
            random_floats(&rng, g, (size_t)n * RDIM, 1.0f);
            const float scale = step % 2 ? 0.5f : 1.0f;
            ps_rows_apply(r, 0, ids, (size_t)n, g, scale);
            for (int j = 0; j < n; j++) {
                ref_row *q = &ref[pick[j]];
                for (int d = 0; d < RDIM; d++) gs[d] = g[j * RDIM + d] * scale;
                ps_optim_apply(&oc, ++q->t, q->w, gs, q->s, RDIM);
            }
        }
        const size_t nsl = (size_t)ps_optim_nslots(kinds[k]) * RDIM;
        for (int i = 0; i < 5; i++) {
            int64_t count;
            const float *row = ps_rows_find(r, 0, idv[i], &count);
            assert_non_null(row);
            assert_int_equal(count, ref[i].t);
            assert_memory_equal(row, ref[i].w, sizeof ref[i].w);
            if (nsl) assert_memory_equal(row + RDIM, ref[i].s, nsl * sizeof(float));
        }
        assert_int_equal(ref[0].t, 12);
        assert_int_equal(ref[4].t, 2);
        ps_rows_destroy(r);
    }
    cm_model_destroy(m);
}

/* Lazy Adam: each row's bias correction uses its own update count. With a
 * constant gradient g the corrected moments are exactly g and g^2 after any
 * number n of the row's own updates, so w_n = w_0 - n lr g / (|g| + eps).
 * Row A is updated at steps 1 and 3, row B at steps 1, 2 and 3, row C is
 * created by a training read at step 1 and updated only at step 3. A
 * store-wide step count would give A and C other values (at t = 3 A's
 * second update is 0.86 lr, C's first 0.53 lr). */
static void test_lazy_adam_per_row_bias_correction(void **state) {
    (void)state;
    const int dims[] = {4};
    const double lr = 0.01, eps = 1e-8;
    fixture f = setup(dims, 1, PS_OPTIM_ADAM, (float)lr);
    const uint64_t A = 10, B = 20, C = 30;
    const float ga[4] = {0.5f, -0.25f, 1.0f, 2.0f}, gb[4] = {-1.0f, 0.1f, 0.3f, -0.7f},
                gc[4] = {0.2f, 0.2f, -0.9f, 0.05f};
    float w0[3][4], tmp[4];
    cm_row_init(table_var(f.m, 0), SEED, A, w0[0]);
    cm_row_init(table_var(f.m, 0), SEED, B, w0[1]);
    cm_row_init(table_var(f.m, 0), SEED, C, w0[2]);

    float g2[8];
    memcpy(g2, ga, sizeof ga);
    memcpy(g2 + 4, gb, sizeof gb);
    const uint64_t ab[2] = {A, B};
    ps_rows_apply(f.r, 0, ab, 2, g2, 1.0f); /* step 1: A, B */
    ps_rows_read(f.r, 0, &C, 1, 1, tmp);    /* step 1: C read for training */
    ps_rows_apply(f.r, 0, &B, 1, gb, 1.0f); /* step 2: B */
    const uint64_t abc[3] = {A, B, C};
    float g3[12];
    memcpy(g3, ga, sizeof ga);
    memcpy(g3 + 4, gb, sizeof gb);
    memcpy(g3 + 8, gc, sizeof gc);
    ps_rows_apply(f.r, 0, abc, 3, g3, 1.0f); /* step 3: A, B, C */

    const float *gs[3] = {ga, gb, gc};
    const int n_updates[3] = {2, 3, 1};
    for (int i = 0; i < 3; i++) {
        int64_t count;
        const float *row = ps_rows_find(f.r, 0, abc[i], &count);
        assert_non_null(row);
        assert_int_equal(count, n_updates[i]);
        for (int d = 0; d < 4; d++) {
            double g = gs[i][d];
            double want = w0[i][d] - n_updates[i] * lr * g / (fabs(g) + eps);
            assert_float_equal(row[d], want, 1e-6);
        }
    }
    teardown(&f);
}

/* 100k rows: many chunks and map rehashes; every sampled row keeps its
 * values (created by training reads, then one 'add' update each). */
static void test_growth_keeps_rows(void **state) {
    (void)state;
    const int dims[] = {3};
    fixture f = setup(dims, 1, PS_OPTIM_ADD, 0.0f);
    const size_t n = 100000, batch = 1000;
    uint64_t *ids = malloc(n * sizeof *ids);
    float *out = malloc(batch * 3 * sizeof *out), *g = malloc(batch * 3 * sizeof *g);
    for (size_t i = 0; i < n; i++) ids[i] = i * 0x10000ULL; /* low bits all zero */
    const size_t bytes0 = ps_rows_bytes(f.r);
    for (size_t b = 0; b < n; b += batch) {
        ps_rows_read(f.r, 0, ids + b, batch, 1, out);
        for (size_t i = 0; i < batch * 3; i++) g[i] = (float)((b + i / 3) % 1000) + 0.25f;
        ps_rows_apply(f.r, 0, ids + b, batch, g, 1.0f);
    }
    assert_int_equal(ps_rows_count(f.r, 0), n);
    assert_true(n > 20 * PS_ROWS_CHUNK);
    assert_true(ps_rows_bytes(f.r) >= bytes0 + n * 3 * sizeof(float));
    for (size_t i = 0; i < n; i += 97) {
        float want[3];
        cm_row_init(table_var(f.m, 0), SEED, ids[i], want);
        for (int d = 0; d < 3; d++) want[d] += (float)(i % 1000) + 0.25f;
        int64_t count;
        const float *row = ps_rows_find(f.r, 0, ids[i], &count);
        assert_non_null(row);
        assert_memory_equal(row, want, sizeof want);
        assert_int_equal(count, 1);
    }
    /* Ids never inserted are not found. */
    for (uint64_t i = 0; i < 1000; i++) assert_null(ps_rows_find(f.r, 0, i * 0x10000ULL + 1, NULL));
    free(ids);
    free(out);
    free(g);
    teardown(&f);
}

typedef struct seen {
    uint64_t *ids;
    int64_t *counts;
    size_t n, cap;
    size_t stop_after; /* 0: never stop */
    ps_rows *r;
    int table;
    int mismatches; /* values or count differing from ps_rows_find's */
} seen;

static int collect(void *ud, uint64_t id, const float *values, const float *slots, int64_t count) {
    seen *s = ud;
    if (s->stop_after && s->n == s->stop_after) return CM_EABORTED;
    assert_true(s->n < s->cap);
    s->ids[s->n] = id;
    s->counts[s->n++] = count;
    int64_t c;
    const float *row = ps_rows_find(s->r, s->table, id, &c);
    int dim = ps_rows_dim(s->r, s->table);
    if (row != values || slots != values + dim || c != count) s->mismatches++;
    return CM_OK;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Visits give every row exactly once, in creation order, and stop when the
 * callback says so. */
static void test_visit_every_row_once(void **state) {
    (void)state;
    const int dims[] = {2};
    fixture f = setup(dims, 1, PS_OPTIM_SGD, 0.1f);
    const size_t n = 3 * PS_ROWS_CHUNK + 17;
    uint64_t *ids = malloc(n * sizeof *ids);
    cm_rng rng;
    cm_rng_init(&rng, 3);
    for (size_t i = 0; i < n; i++) ids[i] = cm_rng_next(&rng);
    ids[5] = 0;
    ids[6] = UINT64_MAX;
    float *out = malloc(n * 2 * sizeof *out);
    ps_rows_read(f.r, 0, ids, n, 1, out);
    ps_rows_read(f.r, 0, ids, n / 2, 1, out); /* again: nothing new */
    assert_int_equal(ps_rows_count(f.r, 0), n);

    seen s = {.ids = malloc(n * sizeof(uint64_t)), .counts = malloc(n * sizeof(int64_t)),
              .cap = n, .r = f.r, .table = 0};
    assert_int_equal(ps_rows_visit(f.r, 0, collect, &s), CM_OK);
    assert_int_equal(s.n, n);
    assert_int_equal(s.mismatches, 0);
    assert_memory_equal(s.ids, ids, n * sizeof *ids); /* creation order */
    qsort(s.ids, n, sizeof *s.ids, cmp_u64);
    for (size_t i = 1; i < n; i++) assert_true(s.ids[i - 1] != s.ids[i]);

    s.n = 0;
    s.stop_after = 5;
    assert_int_equal(ps_rows_visit(f.r, 0, collect, &s), CM_EABORTED);
    assert_int_equal(s.n, 5);
    free(s.ids);
    free(s.counts);
    free(ids);
    free(out);
    teardown(&f);
}

/* Copies every visited row into another store with ps_rows_put. */
static int put_into(void *ud, uint64_t id, const float *values, const float *slots,
                    int64_t count) {
    ps_rows_put(ud, 0, id, values, slots, count);
    return CM_OK;
}

typedef struct dump {
    size_t n, dim, stride;
    uint64_t ids[64];
    float rows[64 * 3 * 4];
    int64_t counts[64];
} dump;

static int dump_row(void *ud, uint64_t id, const float *values, const float *slots,
                    int64_t count) {
    dump *d = ud;
    assert_true(d->n < 64);
    d->ids[d->n] = id;
    memcpy(d->rows + d->n * d->stride, values, d->dim * sizeof(float));
    memcpy(d->rows + d->n * d->stride + d->dim, slots, (d->stride - d->dim) * sizeof(float));
    d->counts[d->n++] = count;
    return CM_OK;
}

static void dump_table(ps_rows *r, dump *d) {
    memset(d, 0, sizeof *d);
    d->dim = (size_t)ps_rows_dim(r, 0);
    d->stride = d->dim * (size_t)(1 + ps_rows_nslots(r));
    assert_int_equal(ps_rows_visit(r, 0, dump_row, d), CM_OK);
}

/* A checkpoint round trip: visit store a, put every row into a fresh store
 * b; b then holds the same ids, values, slots and counts in the same order,
 * and the next update gives the same rows in both (Adam's counts came
 * across). Put overwrites in place, and NULL slots are zeros. */
static void test_put_visit_round_trip(void **state) {
    (void)state;
    const int dims[] = {4};
    cm_model *m = make_model(dims, 1);
    ps_optim_cfg oc = ps_optim_defaults(PS_OPTIM_ADAM, 0.05f);
    ps_rows *a = ps_rows_create(m, &oc, SEED), *b = ps_rows_create(m, &oc, SEED + 9);
    cm_rng rng;
    cm_rng_init(&rng, 8);
    const uint64_t ids[6] = {UINT64_MAX, 0, 42, 43, 1ULL << 63, 7};
    for (int step = 1; step <= 6; step++) {
        float g[6 * 4];
        random_floats(&rng, g, sizeof g / sizeof *g, 1.0f);
        ps_rows_apply(a, 0, ids, (size_t)step, g, 1.0f); /* row i: 6 - i updates */
    }
    assert_int_equal(ps_rows_visit(a, 0, put_into, b), CM_OK);
    static dump da, db;
    dump_table(a, &da);
    dump_table(b, &db);
    assert_int_equal(da.n, 6);
    assert_int_equal(db.n, 6);
    assert_memory_equal(da.ids, db.ids, sizeof da.ids);
    assert_memory_equal(da.rows, db.rows, sizeof da.rows);
    assert_memory_equal(da.counts, db.counts, sizeof da.counts);
    assert_int_equal(da.counts[0], 6);
    assert_int_equal(da.counts[5], 1);

    float g[6 * 4];
    random_floats(&rng, g, sizeof g / sizeof *g, 1.0f);
    ps_rows_apply(a, 0, ids, 6, g, 1.0f);
    ps_rows_apply(b, 0, ids, 6, g, 1.0f);
    dump_table(a, &da);
    dump_table(b, &db);
    assert_memory_equal(da.rows, db.rows, sizeof da.rows);

    /* Overwrite row 42 (third): same place, new values, zero slots, count 3. */
    const float v[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    ps_rows_put(b, 0, 42, v, NULL, 3);
    assert_int_equal(ps_rows_count(b, 0), 6);
    dump_table(b, &db);
    assert_int_equal(db.ids[2], 42);
    assert_memory_equal(db.rows + 2 * db.stride, v, sizeof v);
    for (size_t j = 4; j < db.stride; j++) assert_true(db.rows[2 * db.stride + j] == 0.0f);
    assert_int_equal(db.counts[2], 3);
    ps_rows_destroy(a);
    ps_rows_destroy(b);
    cm_model_destroy(m);
}

/* Clear drops every row of every table and their memory; rows read
 * afterwards are initial again. */
static void test_clear(void **state) {
    (void)state;
    const int dims[] = {4, 2};
    fixture f = setup(dims, 2, PS_OPTIM_ADAGRAD, 0.1f);
    const size_t bytes0 = ps_rows_bytes(f.r);
    uint64_t ids[5000];
    static float g[5000 * 4], out[5000 * 4];
    for (int i = 0; i < 5000; i++) ids[i] = (uint64_t)i;
    for (size_t i = 0; i < sizeof g / sizeof *g; i++) g[i] = 1.0f;
    ps_rows_apply(f.r, 0, ids, 5000, g, 1.0f);
    ps_rows_apply(f.r, 1, ids, 10, g, 1.0f);
    assert_int_equal(ps_rows_total(f.r), 5010);
    assert_true(ps_rows_bytes(f.r) > bytes0);
    ps_rows_clear(f.r);
    assert_int_equal(ps_rows_total(f.r), 0);
    assert_int_equal(ps_rows_count(f.r, 0), 0);
    assert_int_equal(ps_rows_bytes(f.r), bytes0);
    assert_null(ps_rows_find(f.r, 0, 3, NULL));
    assert_null(ps_rows_find(f.r, 1, 3, NULL));
    ps_rows_read(f.r, 0, ids, 1, 1, out);
    float ref[4];
    cm_row_init(table_var(f.m, 0), SEED, 0, ref);
    assert_memory_equal(out, ref, sizeof ref);
    int64_t count = -1;
    assert_non_null(ps_rows_find(f.r, 0, 0, &count));
    assert_int_equal(count, 0);
    assert_int_equal(ps_rows_total(f.r), 1);
    teardown(&f);
}

/* Tables are separate: the same id is a different row in each, with the
 * table's own dim and initial values. */
static void test_tables_with_different_dims(void **state) {
    (void)state;
    const int dims[] = {16, 3, 1};
    fixture f = setup(dims, 3, PS_OPTIM_SGD, 1.0f);
    for (int t = 0; t < 3; t++) assert_int_equal(ps_rows_dim(f.r, t), dims[t]);
    const uint64_t ids[2] = {5, 6};
    float g[2 * 16], out[2 * 16], ref[16];
    for (int i = 0; i < 2 * 16; i++) g[i] = (float)i;
    ps_rows_apply(f.r, 1, ids, 2, g, 1.0f); /* rows of 3: g[0..3), g[3..6) */
    ps_rows_read(f.r, 2, ids, 1, 1, out);
    assert_int_equal(ps_rows_count(f.r, 0), 0);
    assert_int_equal(ps_rows_count(f.r, 1), 2);
    assert_int_equal(ps_rows_count(f.r, 2), 1);
    assert_int_equal(ps_rows_total(f.r), 3);
    assert_null(ps_rows_find(f.r, 0, 5, NULL));

    ps_rows_read(f.r, 1, ids, 2, 0, out);
    for (int i = 0; i < 2; i++) {
        cm_row_init(table_var(f.m, 1), SEED, ids[i], ref);
        for (int d = 0; d < 3; d++) assert_true(out[i * 3 + d] == ref[d] - g[i * 3 + d]);
    }
    ps_rows_read(f.r, 0, ids, 2, 0, out);
    cm_row_init(table_var(f.m, 0), SEED, 6, ref);
    assert_memory_equal(out + 16, ref, 16 * sizeof(float));
    cm_row_init(table_var(f.m, 2), SEED, 5, ref);
    assert_true(ps_rows_find(f.r, 2, 5, NULL)[0] == ref[0]);
    teardown(&f);
}

/* The map reserves no id: 0 and UINT64_MAX (and their neighbours) are rows
 * like any other. */
static void test_extreme_ids(void **state) {
    (void)state;
    const int dims[] = {2};
    fixture f = setup(dims, 1, PS_OPTIM_SGD, 1.0f);
    const uint64_t ids[4] = {0, UINT64_MAX, 1, UINT64_MAX - 1};
    assert_null(ps_rows_find(f.r, 0, 0, NULL));
    assert_null(ps_rows_find(f.r, 0, UINT64_MAX, NULL));
    const float g[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    ps_rows_apply(f.r, 0, ids, 2, g, 1.0f);
    assert_int_equal(ps_rows_count(f.r, 0), 2);
    assert_null(ps_rows_find(f.r, 0, 1, NULL));
    ps_rows_apply(f.r, 0, ids + 2, 2, g + 4, 1.0f);
    assert_int_equal(ps_rows_count(f.r, 0), 4);
    for (int i = 0; i < 4; i++) {
        float ref[2];
        cm_row_init(table_var(f.m, 0), SEED, ids[i], ref);
        int64_t count;
        const float *row = ps_rows_find(f.r, 0, ids[i], &count);
        assert_non_null(row);
        assert_int_equal(count, 1);
        assert_true(row[0] == ref[0] - g[2 * i] && row[1] == ref[1] - g[2 * i + 1]);
    }
    const float v[2] = {-1.0f, -2.0f};
    ps_rows_put(f.r, 0, UINT64_MAX, v, NULL, 9);
    int64_t count;
    assert_memory_equal(ps_rows_find(f.r, 0, UINT64_MAX, &count), v, sizeof v);
    assert_int_equal(count, 9);
    assert_int_equal(ps_rows_count(f.r, 0), 4);
    teardown(&f);
}

/* A model without tables gives an empty store that can be cleared. */
static void test_model_without_tables(void **state) {
    (void)state;
    int sizes[] = {4, 3};
    cm_model *m;
    assert_int_equal(cm_model_create_mlp(sizes, 2, &m), CM_OK);
    ps_optim_cfg oc = ps_optim_defaults(PS_OPTIM_ADAM, 0.1f);
    ps_rows *r = ps_rows_create(m, &oc, SEED);
    assert_int_equal(ps_rows_total(r), 0);
    assert_int_equal(ps_rows_nslots(r), 2);
    assert_true(ps_rows_bytes(r) > 0);
    ps_rows_clear(r);
    ps_rows_destroy(r);
    ps_rows_destroy(NULL);
    cm_model_destroy(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_training_read_creates_eval_read_does_not),
        cmocka_unit_test(test_initial_values_follow_seed),
        cmocka_unit_test(test_apply_equals_optim_on_copy),
        cmocka_unit_test(test_lazy_adam_per_row_bias_correction),
        cmocka_unit_test(test_growth_keeps_rows),
        cmocka_unit_test(test_visit_every_row_once),
        cmocka_unit_test(test_put_visit_round_trip),
        cmocka_unit_test(test_clear),
        cmocka_unit_test(test_tables_with_different_dims),
        cmocka_unit_test(test_extreme_ids),
        cmocka_unit_test(test_model_without_tables),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
