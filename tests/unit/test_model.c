/* test_model.c - variable lists, fingerprints and deterministic init.
 * SPDX-License-Identifier: MIT
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

static void test_mlp_layout(void **state) {
    (void)state;
    int sizes[] = {784, 256, 128, 10};
    cm_model *m;
    assert_int_equal(cm_model_create_mlp(sizes, 4, &m), CM_OK);
    assert_int_equal(m->nvars, 6);
    assert_string_equal(m->vars[0].name, "dense0/kernel");
    assert_string_equal(m->vars[5].name, "dense2/bias");
    size_t expect = 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10;
    assert_int_equal(m->numel, expect);
    size_t off = 0;
    for (int i = 0; i < m->nvars; i++) {
        assert_int_equal(m->vars[i].offset, off);
        off += m->vars[i].numel;
    }
    assert_int_equal(cm_model_find(m, "dense1/kernel"), 2);
    assert_int_equal(cm_model_find(m, "nope"), -1);
    cm_model_destroy(m);
}

static void test_bad_sizes_refused(void **state) {
    (void)state;
    int one[] = {10}, zero[] = {10, 0, 3};
    cm_model *m = (cm_model *)1;
    assert_int_equal(cm_model_create_mlp(one, 1, &m), CM_EINVAL);
    assert_null(m);
    assert_int_equal(cm_model_create_mlp(zero, 3, &m), CM_EINVAL);
    int s[CM_MLP_MAX_SIZES];
    assert_int_equal(cm_parse_sizes("784,256,10", s, CM_MLP_MAX_SIZES), 3);
    assert_int_equal(s[1], 256);
    assert_int_equal(cm_parse_sizes("784", s, CM_MLP_MAX_SIZES), CM_EINVAL);
    assert_int_equal(cm_parse_sizes("784,,10", s, CM_MLP_MAX_SIZES), CM_EINVAL);
    assert_int_equal(cm_parse_sizes("784,x", s, CM_MLP_MAX_SIZES), CM_EINVAL);
    assert_int_equal(cm_parse_sizes("784,-3", s, CM_MLP_MAX_SIZES), CM_EINVAL);
}

/* Any slice of a variable initialises to the same values as that range of
 * the whole variable: init never depends on partitioning. */
static void test_init_independent_of_partitioning(void **state) {
    (void)state;
    int sizes[] = {50, 30, 7};
    cm_model *m;
    assert_int_equal(cm_model_create_mlp(sizes, 3, &m), CM_OK);
    float *all = malloc(m->numel * sizeof(float));
    cm_model_init(m, 42, all);
    for (int i = 0; i < m->nvars; i++) {
        const cm_var *v = &m->vars[i];
        size_t cuts[] = {0, 1, v->numel / 3, v->numel / 2 + 1, v->numel};
        for (int c = 0; c + 1 < 5; c++) {
            size_t a = cuts[c], b = cuts[c + 1];
            if (b <= a) continue;
            float part[1500];
            cm_var_init(v, 42, a, b - a, part);
            assert_memory_equal(part, all + v->offset + a, (b - a) * sizeof(float));
        }
    }
    /* Glorot range and not all equal; biases zero; seed changes values. */
    const cm_var *k = &m->vars[0];
    float lim = sqrtf(6.0f / 80.0f);
    double mean = 0.0;
    for (size_t j = 0; j < k->numel; j++) {
        assert_true(fabsf(all[j]) <= lim);
        mean += all[j];
    }
    assert_true(fabs(mean / (double)k->numel) < 0.1 * lim);
    assert_true(all[0] != all[1]);
    for (size_t j = 0; j < m->vars[1].numel; j++) assert_true(all[m->vars[1].offset + j] == 0.0f);
    float other[10];
    cm_var_init(k, 43, 0, 10, other);
    assert_memory_not_equal(other, all, sizeof other);
    free(all);
    cm_model_destroy(m);
}

static void test_fingerprint(void **state) {
    (void)state;
    int a[] = {784, 256, 10}, b[] = {784, 128, 10};
    cm_model *ma, *ma2, *mb;
    assert_int_equal(cm_model_create_mlp(a, 3, &ma), CM_OK);
    assert_int_equal(cm_model_create_mlp(a, 3, &ma2), CM_OK);
    assert_int_equal(cm_model_create_mlp(b, 3, &mb), CM_OK);
    assert_true(cm_model_fingerprint(ma) == cm_model_fingerprint(ma2));
    assert_true(cm_model_fingerprint(ma) != cm_model_fingerprint(mb));
    cm_model_destroy(ma);
    cm_model_destroy(ma2);
    cm_model_destroy(mb);
}


/* ===== Models with embedding tables ===== */

static void expect_dense(const cm_model *m, int i, const char *name, int ndims, int64_t d0,
                         int64_t d1, int init, size_t offset) {
    const cm_var *v = &m->vars[i];
    assert_string_equal(v->name, name);
    assert_int_equal(v->kind, CM_VAR_DENSE);
    assert_int_equal(v->ndims, ndims);
    assert_int_equal(v->dims[0], d0);
    if (ndims > 1) assert_int_equal(v->dims[1], d1);
    assert_int_equal(v->numel, (size_t)d0 * (size_t)(ndims > 1 ? d1 : 1));
    assert_int_equal(v->init, init);
    assert_int_equal(v->offset, offset);
    assert_int_equal(v->dim, 0);
    if (init == CM_INIT_GLOROT_UNIFORM) {
        assert_int_equal(v->fan_in, d0);
        assert_int_equal(v->fan_out, ndims > 1 ? d1 : d0);
    }
}

static void expect_table(const cm_model *m, int i, const char *name, int dim, int table,
                         float scale) {
    const cm_var *v = &m->vars[i];
    assert_string_equal(v->name, name);
    assert_int_equal(v->kind, CM_VAR_TABLE);
    assert_int_equal(v->ndims, 1);
    assert_int_equal(v->dims[0], dim);
    assert_int_equal(v->dim, dim);
    assert_int_equal(v->numel, 0);
    assert_int_equal(v->table, table);
    assert_int_equal(v->init, CM_INIT_UNIFORM);
    assert_true(v->init_scale == scale);
    assert_int_equal(m->table_var[table], i);
}

/* DeepFM: one table per field (dim k + 1, U(-0.01, 0.01) by default), then
 * fm/bias and the DNN's kernels and biases, dense ones back to back from
 * offset 0; numel counts the dense variables only. */
static void test_deepfm_variables(void **state) {
    (void)state;
    cm_ctr_spec sp = {.nfields = 3, .emb_dim = 4, .nhidden = 2, .hidden = {8, 5}};
    cm_model *m = NULL;
    assert_int_equal(cm_model_create_deepfm(&sp, &m), CM_OK);
    assert_string_equal(m->kind, "deepfm");
    assert_int_equal(m->nvars, 3 + 1 + 2 * 3);
    assert_int_equal(m->ntables, 3);
    assert_int_equal(m->nfields, 3);
    assert_int_equal(m->emb_dim, 4);
    assert_int_equal(m->nsizes, 2);
    assert_int_equal(m->sizes[0], 8);
    assert_int_equal(m->sizes[1], 5);
    for (int f = 0; f < 3; f++) {
        char name[16];
        snprintf(name, sizeof name, "field%d", f);
        expect_table(m, f, name, 5, f, 0.01f);
        assert_int_equal(m->field_table[f], f);
    }
    static const struct {
        const char *name;
        int ndims;
        int64_t d0, d1;
        int init;
    } dense[] = {
        {"fm/bias", 1, 1, 0, CM_INIT_ZERO},
        {"dnn0/kernel", 2, 12, 8, CM_INIT_GLOROT_UNIFORM}, /* in = 3 fields x k 4 */
        {"dnn0/bias", 1, 8, 0, CM_INIT_ZERO},
        {"dnn1/kernel", 2, 8, 5, CM_INIT_GLOROT_UNIFORM},
        {"dnn1/bias", 1, 5, 0, CM_INIT_ZERO},
        {"dnn2/kernel", 2, 5, 1, CM_INIT_GLOROT_UNIFORM},
        {"dnn2/bias", 1, 1, 0, CM_INIT_ZERO},
    };
    size_t off = 0;
    for (int i = 0; i < 7; i++) {
        expect_dense(m, 3 + i, dense[i].name, dense[i].ndims, dense[i].d0, dense[i].d1,
                     dense[i].init, off);
        off += m->vars[3 + i].numel;
    }
    assert_int_equal(off, 1 + 96 + 8 + 40 + 5 + 5 + 1);
    assert_int_equal(m->numel, off);
    assert_int_equal(cm_model_max_dim(m), 5);
    assert_int_equal(cm_model_find(m, "field2"), 2);
    cm_model_destroy(m);

    /* No hidden layer: the output layer reads the factors directly; a given
     * init scale is kept. */
    cm_ctr_spec flat = {.nfields = 2, .emb_dim = 1, .nhidden = 0, .emb_init_scale = 0.5f};
    assert_int_equal(cm_model_create_deepfm(&flat, &m), CM_OK);
    assert_int_equal(m->nvars, 2 + 1 + 2);
    expect_table(m, 1, "field1", 2, 1, 0.5f);
    expect_dense(m, 3, "dnn0/kernel", 2, 2, 1, CM_INIT_GLOROT_UNIFORM, 1);
    assert_int_equal(m->numel, 1 + 2 + 1);
    cm_model_destroy(m);

    /* Bad specs. */
    cm_ctr_spec bad[] = {
        {.nfields = 0, .emb_dim = 4},
        {.nfields = CM_MAX_TABLES + 1, .emb_dim = 4},
        {.nfields = 2, .emb_dim = 0},
        {.nfields = 2, .emb_dim = 4097},
        {.nfields = 2, .emb_dim = 4, .nhidden = -1},
        {.nfields = 2, .emb_dim = 4, .nhidden = CM_MLP_MAX_SIZES - 1},
        {.nfields = 2, .emb_dim = 4, .nhidden = 2, .hidden = {8, 0}},
        {.nfields = 2, .emb_dim = 4, .emb_init_scale = -0.1f},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        m = (cm_model *)1;
        assert_int_equal(cm_model_create_deepfm(&bad[i], &m), CM_EINVAL);
        assert_null(m);
    }
    m = (cm_model *)1;
    assert_int_equal(cm_model_create_deepfm(NULL, &m), CM_EINVAL);
    assert_null(m);
}

/* LR: tables of dim 1 per field, then lr/bias, the only dense variable. */
static void test_lr_variables(void **state) {
    (void)state;
    cm_ctr_spec sp = {.nfields = 4, .emb_dim = 99 /* unused */};
    cm_model *m = NULL;
    assert_int_equal(cm_model_create_lr(&sp, &m), CM_OK);
    assert_string_equal(m->kind, "lr");
    assert_int_equal(m->nvars, 5);
    assert_int_equal(m->ntables, 4);
    assert_int_equal(m->nfields, 4);
    for (int f = 0; f < 4; f++) {
        char name[16];
        snprintf(name, sizeof name, "field%d", f);
        expect_table(m, f, name, 1, f, 0.01f);
        assert_int_equal(m->field_table[f], f);
    }
    expect_dense(m, 4, "lr/bias", 1, 1, 0, CM_INIT_ZERO, 0);
    assert_int_equal(m->numel, 1);
    assert_int_equal(cm_model_max_dim(m), 1);
    cm_model_destroy(m);
    cm_ctr_spec bad = {.nfields = 0};
    m = (cm_model *)1;
    assert_int_equal(cm_model_create_lr(&bad, &m), CM_EINVAL);
    assert_null(m);

    /* A model without tables: max dim 0, no table list. */
    int sizes[] = {3, 2};
    assert_int_equal(cm_model_create_mlp(sizes, 2, &m), CM_OK);
    assert_int_equal(m->ntables, 0);
    assert_int_equal(cm_model_max_dim(m), 0);
    assert_null(m->table_var);
    cm_model_destroy(m);
}

/* A copy of m's variables as a PS learns them (what create_from_vars gets:
 * offsets, numel and table indices left for it to compute). */
static cm_var *vars_of(const cm_model *m) {
    cm_var *v = calloc((size_t)m->nvars, sizeof *v);
    assert_non_null(v);
    for (int i = 0; i < m->nvars; i++) {
        v[i] = m->vars[i];
        v[i].offset = 12345;
        v[i].numel = 777;
        v[i].table = -5;
    }
    return v;
}

/* create_from_vars rebuilds DeepFM's variables exactly (layout, table list,
 * fingerprint; fields stay empty: they are the worker's), and refuses bad
 * lists naming the fault. */
static void test_create_from_vars(void **state) {
    (void)state;
    cm_ctr_spec sp = {.nfields = 3, .emb_dim = 4, .nhidden = 1, .hidden = {6}};
    cm_model *d = NULL, *m = NULL;
    assert_int_equal(cm_model_create_deepfm(&sp, &d), CM_OK);
    cm_var *v = vars_of(d);
    char err[256] = "";
    assert_int_equal(cm_model_create_from_vars("deepfm", v, d->nvars, &m, err, sizeof err), CM_OK);
    assert_int_equal(m->nvars, d->nvars);
    assert_int_equal(m->numel, d->numel);
    assert_int_equal(m->ntables, d->ntables);
    assert_int_equal(m->nfields, 0);
    assert_null(m->field_table);
    for (int i = 0; i < d->nvars; i++) {
        assert_string_equal(m->vars[i].name, d->vars[i].name);
        assert_int_equal(m->vars[i].kind, d->vars[i].kind);
        assert_int_equal(m->vars[i].ndims, d->vars[i].ndims);
        assert_memory_equal(m->vars[i].dims, d->vars[i].dims, sizeof d->vars[i].dims);
        assert_int_equal(m->vars[i].numel, d->vars[i].numel);
        assert_int_equal(m->vars[i].offset, d->vars[i].offset);
        assert_int_equal(m->vars[i].dim, d->vars[i].dim);
        assert_int_equal(m->vars[i].init, d->vars[i].init);
        assert_true(m->vars[i].init_scale == d->vars[i].init_scale);
        if (d->vars[i].kind == CM_VAR_TABLE) assert_int_equal(m->vars[i].table, d->vars[i].table);
    }
    for (int t = 0; t < d->ntables; t++) assert_int_equal(m->table_var[t], d->table_var[t]);
    assert_true(cm_model_fingerprint(m) == cm_model_fingerprint(d));
    cm_model_destroy(m);

    /* Tables after dense variables: table indices count tables only. */
    cm_var mixed[3];
    memcpy(&mixed[0], &v[3], sizeof mixed[0]); /* fm/bias */
    memcpy(&mixed[1], &v[1], sizeof mixed[1]); /* field1 */
    memcpy(&mixed[2], &v[4], sizeof mixed[2]); /* dnn0/kernel */
    assert_int_equal(cm_model_create_from_vars("x", mixed, 3, &m, err, sizeof err), CM_OK);
    assert_int_equal(m->ntables, 1);
    assert_int_equal(m->table_var[0], 1);
    assert_int_equal(m->vars[1].table, 0);
    assert_int_equal(m->vars[0].offset, 0);
    assert_int_equal(m->vars[2].offset, 1);
    assert_int_equal(m->numel, 1 + 12 * 6);
    cm_model_destroy(m);

    /* Faults, each on a fresh copy, each named. */
    struct {
        const char *what;
        int var;
        const char *want;
    } cases[] = {
        {"duplicate", 5, "appears twice"},
        {"empty name", 2, "has no name"},
        {"unterminated name", 2, "has no name"},
        {"table dim 0", 1, "dim 0 out of range"},
        {"table dim huge", 1, "out of range"},
        {"dense dim 0", 4, "dimension 1 is 0"},
        {"dense dim negative", 4, "dimension 0 is -3"},
        {"too many elements", 4, "too large"},
        {"too many dims", 4, "dimensions"},
        {"bad kind", 4, "unknown kind 7"},
        {"bad init", 0, "unknown initialiser"},
        {"nan scale", 0, "unknown initialiser"},
        {"glorot without fan_in", 4, "Glorot needs fan_in and fan_out"},
        {"glorot without fan_out", 4, "Glorot needs fan_in and fan_out"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        cm_var *w = vars_of(d);
        cm_var *x = &w[cases[c].var];
        const char *what = cases[c].what;
        if (!strcmp(what, "duplicate")) memcpy(x->name, w[4].name, sizeof x->name);
        if (!strcmp(what, "empty name")) x->name[0] = 0;
        if (!strcmp(what, "unterminated name")) memset(x->name, 'a', sizeof x->name);
        if (!strcmp(what, "table dim 0")) x->dim = 0;
        if (!strcmp(what, "table dim huge")) x->dim = 65537;
        if (!strcmp(what, "dense dim 0")) x->dims[1] = 0;
        if (!strcmp(what, "dense dim negative")) x->dims[0] = -3;
        if (!strcmp(what, "too many elements")) x->dims[0] = x->dims[1] = (int64_t)1 << 20;
        if (!strcmp(what, "too many dims")) x->ndims = CM_VAR_MAX_DIMS + 1;
        if (!strcmp(what, "bad kind")) x->kind = 7;
        if (!strcmp(what, "bad init")) x->init = 3;
        if (!strcmp(what, "nan scale")) x->init_scale = NAN;
        if (!strcmp(what, "glorot without fan_in")) x->fan_in = 0;
        if (!strcmp(what, "glorot without fan_out")) x->fan_out = 0;
        m = (cm_model *)1;
        err[0] = 0;
        int rc = cm_model_create_from_vars("deepfm", w, d->nvars, &m, err, sizeof err);
        if (rc != CM_EINVAL || m != NULL) fail_msg("%s: accepted", what);
        if (!strstr(err, cases[c].want)) fail_msg("%s: '%s' lacks '%s'", what, err, cases[c].want);
        free(w);
    }
    /* The list itself. */
    m = (cm_model *)1;
    assert_int_equal(cm_model_create_from_vars("deepfm", v, 0, &m, err, sizeof err), CM_EINVAL);
    assert_null(m);
    assert_non_null(strstr(err, "1 to 65536 variables"));
    assert_int_equal(cm_model_create_from_vars("", v, d->nvars, &m, err, sizeof err), CM_EINVAL);
    assert_int_equal(cm_model_create_from_vars("a-kind-far-too-long", v, d->nvars, &m, err,
                                               sizeof err),
                     CM_EINVAL);
    assert_non_null(strstr(err, "bad model kind"));
    free(v);
    cm_model_destroy(d);
}

/* cm_row_init is a pure function of (seed, table name, id): the same
 * arguments give the same bits whatever was computed before, and another
 * id, table or seed gives other values; values lie in [-scale, scale] and
 * a zero-initialised table gives zeros. */
static void test_row_init_pure(void **state) {
    (void)state;
    cm_ctr_spec sp = {.nfields = 3, .emb_dim = 7, .emb_init_scale = 0.25f};
    cm_model *m = NULL, *m2 = NULL;
    assert_int_equal(cm_model_create_deepfm(&sp, &m), CM_OK);
    assert_int_equal(cm_model_create_deepfm(&sp, &m2), CM_OK);
    const cm_var *t0 = &m->vars[m->table_var[0]], *t1 = &m->vars[m->table_var[1]];
    enum { DIM = 8, N = 500 }; /* Rows of k + 1 = 8. */
    assert_int_equal(t0->dim, DIM);
    float a[DIM], b[DIM];
    float (*first)[DIM] = malloc(N * sizeof *first);
    assert_non_null(first);
    for (uint64_t id = 0; id < N; id++) cm_row_init(t0, 5, id * 977, first[id]);
    /* Again, in another order, from another model object: the same bits. */
    for (uint64_t k = 0; k < N; k++) {
        uint64_t id = N - 1 - k;
        cm_row_init(&m2->vars[m2->table_var[0]], 5, id * 977, a);
        assert_memory_equal(a, first[id], DIM * sizeof(float));
    }
    double sum = 0.0;
    int same_id = 0, same_table = 0, same_seed = 0;
    for (uint64_t id = 0; id < N; id++) {
        for (int j = 0; j < DIM; j++) {
            assert_true(fabsf(first[id][j]) <= 0.25f);
            sum += first[id][j];
        }
        if (id > 0 && !memcmp(first[id], first[id - 1], sizeof a)) same_id++;
        cm_row_init(t1, 5, id * 977, b);
        if (!memcmp(first[id], b, sizeof a)) same_table++;
        cm_row_init(t0, 6, id * 977, b);
        if (!memcmp(first[id], b, sizeof a)) same_seed++;
    }
    assert_int_equal(same_id, 0);
    assert_int_equal(same_table, 0);
    assert_int_equal(same_seed, 0);
    assert_true(fabs(sum / (N * DIM)) < 0.02); /* Centred. */
    /* Not constant within a row. */
    assert_true(first[1][0] != first[1][1]);
    /* Every bit of the id counts: ids 1 << k all differ from each other. */
    float bits[64][DIM];
    for (int k = 0; k < 64; k++) {
        cm_row_init(t0, 5, (uint64_t)1 << k, bits[k]);
        for (int j = 0; j < k; j++) assert_memory_not_equal(bits[j], bits[k], sizeof a);
    }
    /* Extreme ids. */
    cm_row_init(t0, 5, UINT64_MAX, a);
    cm_row_init(t0, 5, UINT64_MAX - 1, b);
    assert_memory_not_equal(a, b, sizeof a);
    /* Zero init: zeros. */
    cm_var z = *t0;
    z.init = CM_INIT_ZERO;
    z.dim = 5;
    memset(a, 0x7f, sizeof a);
    cm_row_init(&z, 5, 3, a);
    for (int j = 0; j < 5; j++) assert_true(a[j] == 0.0f);
    for (int j = 5; j < DIM; j++) assert_true(a[j] != 0.0f); /* Only dim values written. */
    z.init = CM_INIT_UNIFORM;
    cm_row_init(&z, 5, 3, a);
    for (int j = 5; j < DIM; j++) assert_true(a[j] != 0.0f && fabsf(a[j]) > 1.0f);
    free(first);
    cm_model_destroy(m);
    cm_model_destroy(m2);
}

/* The fingerprint as it was before tables existed (commit 2fcc195's
 * cm_model_fingerprint, kept here on purpose as the reference): kind, then
 * per variable name, ndims, dims and init. Dense-only models must keep it
 * (a running cluster's workers and checkpoints carry it). */
static uint64_t old_fingerprint(const cm_model *m) {
    uint64_t h = cm_hash_str(m->kind, 0x6d6f64656cULL);
    for (int i = 0; i < m->nvars; i++) {
        const cm_var *v = &m->vars[i];
        h = cm_hash_str(v->name, h);
        h = cm_hash_bytes(&v->ndims, sizeof v->ndims, h);
        h = cm_hash_bytes(v->dims, sizeof(int64_t) * (size_t)v->ndims, h);
        h = cm_hash_bytes(&v->init, sizeof v->init, h);
    }
    return h;
}

static void test_fingerprint_dense_only_unchanged(void **state) {
    (void)state;
    int sizes[] = {784, 256, 128, 10};
    cm_model *m = NULL;
    assert_int_equal(cm_model_create_mlp(sizes, 4, &m), CM_OK);
    assert_true(cm_model_fingerprint(m) == old_fingerprint(m));
    /* Pinned: what the first fingerprint function (commit 2fcc195) gave. */
    assert_true(old_fingerprint(m) == 0x2ce74398ff19b0b9ULL);
    cm_model_destroy(m);
    assert_int_equal(cm_model_create_vector(1000, &m), CM_OK);
    assert_true(cm_model_fingerprint(m) == old_fingerprint(m));
    cm_model_destroy(m);

    /* Tables are covered: their dim, init scale and kind. */
    cm_ctr_spec sp = {.nfields = 2, .emb_dim = 4};
    cm_model *a = NULL, *b = NULL;
    assert_int_equal(cm_model_create_deepfm(&sp, &a), CM_OK);
    sp.emb_init_scale = 0.02f;
    assert_int_equal(cm_model_create_deepfm(&sp, &b), CM_OK);
    assert_true(cm_model_fingerprint(a) != cm_model_fingerprint(b));
    cm_model_destroy(b);
    sp.emb_init_scale = 0.0f;
    assert_int_equal(cm_model_create_deepfm(&sp, &b), CM_OK);
    assert_true(cm_model_fingerprint(a) == cm_model_fingerprint(b));
    cm_model_destroy(b);
    /* A table and a dense variable of the same name and shape differ. */
    cm_var t = {.kind = CM_VAR_TABLE, .ndims = 1, .dims = {4}, .dim = 4,
                .init = CM_INIT_UNIFORM, .init_scale = 0.01f};
    cm_var dv = {.kind = CM_VAR_DENSE, .ndims = 1, .dims = {4}, .init = CM_INIT_UNIFORM,
                 .init_scale = 0.01f};
    snprintf(t.name, sizeof t.name, "w");
    snprintf(dv.name, sizeof dv.name, "w");
    char err[128];
    assert_int_equal(cm_model_create_from_vars("k", &t, 1, &b, err,
                                               sizeof err),
                     CM_OK);
    cm_model *c = NULL;
    assert_int_equal(cm_model_create_from_vars("k", &dv, 1, &c, err, sizeof err), CM_OK);
    assert_true(cm_model_fingerprint(b) != cm_model_fingerprint(c));
    cm_model_destroy(b);
    cm_model_destroy(c);
    cm_model_destroy(a);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mlp_layout),
        cmocka_unit_test(test_bad_sizes_refused),
        cmocka_unit_test(test_init_independent_of_partitioning),
        cmocka_unit_test(test_fingerprint),
        cmocka_unit_test(test_deepfm_variables),
        cmocka_unit_test(test_lr_variables),
        cmocka_unit_test(test_create_from_vars),
        cmocka_unit_test(test_row_init_pure),
        cmocka_unit_test(test_fingerprint_dense_only_unchanged),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
