/* test_placement.c - variable partitioning and shard assignment.
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
#include "common/cm_placement.h"
#include "common/cm_status.h"

/* A model built by hand: shapes[i] has ndims[i] dimensions (0 for a
 * scalar). Allocated the way cm_model_destroy() releases it. */
static cm_model *make_model(int nvars, const int *ndims, const int64_t (*shapes)[CM_VAR_MAX_DIMS]) {
    cm_model *m = calloc(1, sizeof *m);
    assert_non_null(m);
    snprintf(m->kind, sizeof m->kind, "test");
    m->vars = calloc((size_t)nvars, sizeof *m->vars);
    assert_non_null(m->vars);
    m->nvars = nvars;
    for (int i = 0; i < nvars; i++) {
        cm_var *v = &m->vars[i];
        snprintf(v->name, sizeof v->name, "v%d", i);
        v->ndims = ndims[i];
        v->numel = 1;
        for (int d = 0; d < ndims[i]; d++) {
            v->dims[d] = shapes[i][d];
            v->numel *= (size_t)shapes[i][d];
        }
        v->offset = m->numel;
        m->numel += v->numel;
    }
    return m;
}

/* nvars copies of one shape. */
static cm_model *make_uniform(int nvars, int ndims, int64_t d0, int64_t d1) {
    int nd[64];
    int64_t shapes[64][CM_VAR_MAX_DIMS];
    assert_true(nvars <= 64);
    for (int i = 0; i < nvars; i++) {
        nd[i] = ndims;
        shapes[i][0] = d0;
        shapes[i][1] = d1;
    }
    return make_model(nvars, nd, shapes);
}

static cm_model *make_mlp(void) {
    int sizes[] = {784, 256, 128, 10};
    cm_model *m;
    assert_int_equal(cm_model_create_mlp(sizes, 4, &m), CM_OK);
    return m;
}

static size_t var_rows(const cm_var *v) { return v->ndims >= 1 ? (size_t)v->dims[0] : 1; }

/* Checks every structural property of p against m: partitions in
 * (var, index) order, split along dim 0 into near-equal row counts as the
 * header's formula says, every element owned exactly once, consistent
 * offsets, and per-shard totals that match the partitions. Tables have
 * none. */
static void check_placement(const cm_model *m, const cm_placement *p) {
    int ndense = 0;
    for (int v = 0; v < m->nvars; v++) ndense += m->vars[v].kind == CM_VAR_DENSE;
    assert_true(p->nparts >= ndense);
    unsigned char *owned = calloc(m->numel ? m->numel : 1, 1);
    assert_non_null(owned);
    size_t *bytes = calloc((size_t)p->nshards, sizeof *bytes);
    int *nparts = calloc((size_t)p->nshards, sizeof *nparts);
    assert_non_null(bytes);
    assert_non_null(nparts);

    int k = 0;
    for (int v = 0; v < m->nvars; v++) {
        const cm_var *var = &m->vars[v];
        if (var->kind == CM_VAR_TABLE) continue;
        size_t rows = var_rows(var), row_size = var->numel / rows;
        /* The header's formula, computed independently. */
        size_t expect_np = var->numel * sizeof(float) / p->min_part_bytes;
        if (expect_np > rows) expect_np = rows;
        if (expect_np < 1) expect_np = 1;
        size_t row = 0, min_rows = (size_t)-1, max_rows = 0;
        for (size_t i = 0; i < expect_np; i++, k++) {
            assert_true(k < p->nparts);
            const cm_partition *part = &p->parts[k];
            assert_int_equal(part->var, v);
            assert_int_equal(part->index, (int)i);
            assert_true(part->shard >= 0 && part->shard < p->nshards);
            assert_int_equal(part->row_begin, row);
            assert_true(part->row_end > part->row_begin);
            size_t nrows = part->row_end - part->row_begin;
            /* The first rows % p partitions get the extra row. */
            assert_int_equal(nrows, rows / expect_np + (i < rows % expect_np ? 1 : 0));
            if (nrows < min_rows) min_rows = nrows;
            if (nrows > max_rows) max_rows = nrows;
            assert_int_equal(part->begin, part->row_begin * row_size);
            assert_int_equal(part->count, nrows * row_size);
            assert_int_equal(part->offset, var->offset + part->begin);
            for (size_t e = 0; e < part->count; e++) owned[part->offset + e]++;
            bytes[part->shard] += part->count * sizeof(float);
            nparts[part->shard]++;
            row = part->row_end;
        }
        assert_int_equal(row, rows);
        assert_true(max_rows - min_rows <= 1);
    }
    assert_int_equal(k, p->nparts);
    for (size_t e = 0; e < m->numel; e++)
        if (owned[e] != 1) fail_msg("element %zu owned %d times", e, owned[e]);

    size_t total_bytes = 0;
    int total_parts = 0;
    for (int s = 0; s < p->nshards; s++) {
        assert_int_equal(p->shard_bytes[s], bytes[s]);
        assert_int_equal(p->shard_nparts[s], nparts[s]);
        total_bytes += p->shard_bytes[s];
        total_parts += p->shard_nparts[s];
    }
    assert_int_equal(total_bytes, m->numel * sizeof(float));
    assert_int_equal(total_parts, p->nparts);
    free(owned);
    free(bytes);
    free(nparts);
}

static void test_deterministic(void **state) {
    (void)state;
    cm_model *m = make_mlp();
    cm_placement *a, *b, *c;
    assert_int_equal(cm_placement_create(m, 3, CM_PLACEMENT_MIN_PART_BYTES, &a), CM_OK);
    assert_int_equal(cm_placement_create(m, 3, CM_PLACEMENT_MIN_PART_BYTES, &b), CM_OK);
    assert_int_equal(a->nparts, b->nparts);
    assert_memory_equal(a->parts, b->parts, (size_t)a->nparts * sizeof *a->parts);
    assert_memory_equal(a->shard_bytes, b->shard_bytes, 3 * sizeof *a->shard_bytes);
    assert_memory_equal(a->shard_nparts, b->shard_nparts, 3 * sizeof *a->shard_nparts);
    assert_true(a->fingerprint == b->fingerprint);
    assert_true(a->fingerprint != 0);

    /* A different shard count changes the fingerprint. */
    assert_int_equal(cm_placement_create(m, 2, CM_PLACEMENT_MIN_PART_BYTES, &c), CM_OK);
    assert_true(c->fingerprint != a->fingerprint);
    cm_placement_destroy(c);

    /* So does a different minimum size, even when the map is the same:
     * dense0/kernel (784 KiB) splits into 2 partitions at 280 KiB and at
     * 300 KiB. */
    cm_placement *d, *e;
    assert_int_equal(cm_placement_create(m, 2, 280 << 10, &d), CM_OK);
    assert_int_equal(cm_placement_create(m, 2, 300 << 10, &e), CM_OK);
    assert_int_equal(d->nparts, e->nparts);
    assert_memory_equal(d->parts, e->parts, (size_t)d->nparts * sizeof *d->parts);
    assert_true(d->fingerprint != e->fingerprint);
    cm_placement_destroy(d);
    cm_placement_destroy(e);

    /* And a different model with the same shard count. */
    int sizes[] = {784, 128, 10};
    cm_model *m2;
    assert_int_equal(cm_model_create_mlp(sizes, 3, &m2), CM_OK);
    assert_int_equal(cm_placement_create(m2, 3, CM_PLACEMENT_MIN_PART_BYTES, &c), CM_OK);
    assert_true(c->fingerprint != a->fingerprint);
    cm_placement_destroy(c);
    cm_model_destroy(m2);

    cm_placement_destroy(a);
    cm_placement_destroy(b);
    cm_model_destroy(m);
}

/* Many shapes, shard counts and minimum sizes: every element exactly once. */
static void test_every_element_owned_once(void **state) {
    (void)state;
    int nd[] = {2, 1, 2, 1, 0, 3, 2, 1};
    int64_t shapes[][CM_VAR_MAX_DIMS] = {{10, 3}, {7}, {1, 40}, {1},
                                         {0}, {6, 2, 5}, {33, 17}, {100}};
    cm_model *hand = make_model(8, nd, shapes);
    cm_model *mlp = make_mlp();
    cm_model *models[] = {hand, mlp};
    size_t mins[] = {1, 4, 64, 1000, 4096, CM_PLACEMENT_MIN_PART_BYTES, (size_t)1 << 40};
    for (size_t mi = 0; mi < 2; mi++) {
        for (int nshards = 1; nshards <= 9; nshards++) {
            for (size_t k = 0; k < sizeof mins / sizeof mins[0]; k++) {
                cm_placement *p = NULL;
                assert_int_equal(cm_placement_create(models[mi], nshards, mins[k], &p), CM_OK);
                assert_int_equal(p->nshards, nshards);
                assert_int_equal(p->min_part_bytes, mins[k]);
                check_placement(models[mi], p);
                cm_placement_destroy(p);
            }
        }
    }
    /* Spot checks of the split on the hand-built model with 4 shards and a
     * 30-byte minimum: v0 (120 B, 10 rows) -> 4 partitions of 3,3,2,2 rows
     * of 3 elements; v1 (28 B) stays whole. */
    cm_placement *p;
    assert_int_equal(cm_placement_create(hand, 4, 30, &p), CM_OK);
    assert_int_equal(p->parts[0].row_end - p->parts[0].row_begin, 3);
    assert_int_equal(p->parts[1].row_begin, 3);
    assert_int_equal(p->parts[1].begin, 9);
    assert_int_equal(p->parts[2].row_begin, 6);
    assert_int_equal(p->parts[2].count, 6);
    assert_int_equal(p->parts[3].row_begin, 8);
    assert_int_equal(p->parts[3].begin, 24);
    assert_int_equal(p->parts[3].offset, 24);
    assert_int_equal(p->parts[4].var, 1);
    assert_int_equal(p->parts[4].offset, 30);
    assert_int_equal(p->parts[4].count, 7);
    /* v2 has one row and v3, v4 are single elements: one partition each;
     * v5 (240 B, 6 rows) is capped by its rows, not by the 4 shards. */
    assert_int_equal(p->parts[5].var, 2);
    assert_int_equal(p->parts[5].count, 40);
    assert_int_equal(p->parts[6].var, 3);
    assert_int_equal(p->parts[7].var, 4);
    assert_int_equal(p->parts[8].var, 5);
    assert_int_equal(p->parts[13].var, 5);
    assert_int_equal(p->parts[13].count, 10);
    cm_placement_destroy(p);
    cm_model_destroy(hand);
    cm_model_destroy(mlp);
}

static void test_balanced_mlp(void **state) {
    (void)state;
    cm_model *m = make_mlp();
    cm_placement *p;
    assert_int_equal(cm_placement_create(m, 2, CM_PLACEMENT_MIN_PART_BYTES, &p), CM_OK);
    check_placement(m, p);
    /* dense0/kernel (802816 bytes) splits in three (262, 261, 261 rows)
     * whatever the shard count: part 0 to shard 0, parts 1 and 2 to the
     * lighter shard 1; dense1/kernel (131072) and every smaller variable
     * then go to shard 0. */
    assert_int_equal(p->nparts, 8);
    assert_int_equal(p->parts[0].shard, 0);
    assert_int_equal(p->parts[1].shard, 1);
    assert_int_equal(p->parts[2].shard, 1);
    assert_int_equal(p->parts[0].row_end, 262);
    assert_int_equal(p->parts[2].row_begin, 523);
    assert_int_equal(p->parts[4].var, 2);
    assert_int_equal(p->parts[4].shard, 0);
    assert_int_equal(p->shard_bytes[0], 406056);
    assert_int_equal(p->shard_bytes[1], 534528);
    assert_int_equal(p->shard_nparts[0], 6);
    assert_int_equal(p->shard_nparts[1], 2);
    double ratio = (double)p->shard_bytes[0] / (double)p->shard_bytes[1];
    printf("MLP 784,256,128,10 on 2 shards: %zu / %zu bytes, imbalance %.3f\n",
           p->shard_bytes[0], p->shard_bytes[1], ratio);
    assert_true(ratio < 1.5);
    cm_placement_destroy(p);
    cm_model_destroy(m);
}

static void test_balanced_equal_variables(void **state) {
    (void)state;
    /* 12 small variables of 4000 bytes on 4 shards: 3 each, round robin. */
    cm_model *m = make_uniform(12, 2, 100, 10);
    cm_placement *p;
    assert_int_equal(cm_placement_create(m, 4, CM_PLACEMENT_MIN_PART_BYTES, &p), CM_OK);
    check_placement(m, p);
    assert_int_equal(p->nparts, 12);
    for (int s = 0; s < 4; s++) {
        assert_int_equal(p->shard_bytes[s], 12000);
        assert_int_equal(p->shard_nparts[s], 3);
    }
    for (int i = 0; i < 12; i++) assert_int_equal(p->parts[i].shard, i % 4);
    cm_placement_destroy(p);
    cm_model_destroy(m);

    /* 4 variables of 1 MiB split 4 ways each: 16 equal partitions. */
    m = make_uniform(4, 2, 1024, 256);
    assert_int_equal(cm_placement_create(m, 4, CM_PLACEMENT_MIN_PART_BYTES, &p), CM_OK);
    check_placement(m, p);
    assert_int_equal(p->nparts, 16);
    for (int s = 0; s < 4; s++) {
        assert_int_equal(p->shard_bytes[s], (size_t)1 << 20);
        assert_int_equal(p->shard_nparts[s], 4);
    }
    cm_placement_destroy(p);
    cm_model_destroy(m);
}

static void test_variables_smaller_than_shards(void **state) {
    (void)state;
    cm_placement *p;
    /* A bias of 3 elements with 8 shards: far below the minimum size. */
    cm_model *m = make_uniform(1, 1, 3, 0);
    assert_int_equal(cm_placement_create(m, 8, CM_PLACEMENT_MIN_PART_BYTES, &p), CM_OK);
    check_placement(m, p);
    assert_int_equal(p->nparts, 1);
    assert_int_equal(p->parts[0].count, 3);
    assert_int_equal(p->parts[0].shard, 0);
    assert_int_equal(p->shard_bytes[0], 12);
    for (int s = 1; s < 8; s++) {
        assert_int_equal(p->shard_bytes[s], 0);
        assert_int_equal(p->shard_nparts[s], 0);
    }
    cm_placement_destroy(p);
    /* With a 1-byte minimum it splits once per row, never more. */
    assert_int_equal(cm_placement_create(m, 8, 1, &p), CM_OK);
    check_placement(m, p);
    assert_int_equal(p->nparts, 3);
    cm_placement_destroy(p);
    cm_model_destroy(m);

    /* A 5-row variable, 1-byte minimum, 8 shards: 5 one-row partitions on
     * shards 0..4. */
    m = make_uniform(1, 2, 5, 6);
    assert_int_equal(cm_placement_create(m, 8, 1, &p), CM_OK);
    check_placement(m, p);
    assert_int_equal(p->nparts, 5);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(p->parts[i].row_begin, (size_t)i);
        assert_int_equal(p->parts[i].row_end, (size_t)i + 1);
        assert_int_equal(p->parts[i].begin, (size_t)i * 6);
        assert_int_equal(p->parts[i].count, 6);
        assert_int_equal(p->parts[i].shard, i);
    }
    cm_placement_destroy(p);
    cm_model_destroy(m);
}

static void test_one_shard(void **state) {
    (void)state;
    cm_model *m = make_mlp();
    /* With a minimum above every variable's size, one shard holds each
     * variable whole. */
    cm_placement *p;
    assert_int_equal(cm_placement_create(m, 1, (size_t)1 << 20, &p), CM_OK);
    check_placement(m, p);
    assert_int_equal(p->nparts, m->nvars);
    for (int i = 0; i < p->nparts; i++) {
        assert_int_equal(p->parts[i].var, i);
        assert_int_equal(p->parts[i].index, 0);
        assert_int_equal(p->parts[i].shard, 0);
        assert_int_equal(p->parts[i].begin, 0);
        assert_int_equal(p->parts[i].count, m->vars[i].numel);
        assert_int_equal(p->parts[i].offset, m->vars[i].offset);
    }
    assert_int_equal(p->shard_bytes[0], m->numel * sizeof(float));
    assert_int_equal(p->shard_nparts[0], m->nvars);
    cm_placement_destroy(p);
    /* The shard count does not cap the split: at the default minimum
     * dense0/kernel is 3 partitions even on one shard. */
    assert_int_equal(cm_placement_create(m, 1, CM_PLACEMENT_MIN_PART_BYTES, &p), CM_OK);
    check_placement(m, p);
    assert_int_equal(p->nparts, m->nvars + 2);
    assert_int_equal(p->shard_nparts[0], m->nvars + 2);
    for (int i = 0; i < 3; i++) assert_int_equal(p->parts[i].var, 0);
    cm_placement_destroy(p);
    cm_model_destroy(m);
}

static void test_bad_args(void **state) {
    (void)state;
    cm_model *m = make_mlp();
    cm_placement *p = (cm_placement *)1;
    assert_int_equal(cm_placement_create(m, 0, CM_PLACEMENT_MIN_PART_BYTES, &p), CM_EINVAL);
    assert_null(p);
    p = (cm_placement *)1;
    assert_int_equal(cm_placement_create(m, -3, CM_PLACEMENT_MIN_PART_BYTES, &p), CM_EINVAL);
    assert_null(p);
    p = (cm_placement *)1;
    assert_int_equal(cm_placement_create(m, 2, 0, &p), CM_EINVAL);
    assert_null(p);
    p = (cm_placement *)1;
    assert_int_equal(cm_placement_create(NULL, 2, CM_PLACEMENT_MIN_PART_BYTES, &p), CM_EINVAL);
    assert_null(p);
    cm_placement_destroy(NULL);
    cm_model_destroy(m);
}


/* ===== Rows of embedding tables ===== */

/* Pure and in range; one shard (or fewer) is always shard 0. */
static void test_row_shard_deterministic_in_range(void **state) {
    (void)state;
    static const int shards[] = {2, 3, 4, 5, 7, 8, 16, 100};
    for (size_t k = 0; k < sizeof shards / sizeof shards[0]; k++) {
        int S = shards[k];
        int used[100] = {0};
        for (int t = 0; t < 4; t++)
            for (uint64_t i = 0; i < 3000; i++) {
                uint64_t id = (i & 1) ? UINT64_MAX - i : i;
                int sh = cm_row_shard(t, id, S);
                assert_true(sh >= 0 && sh < S);
                assert_int_equal(cm_row_shard(t, id, S), sh);
                used[sh] = 1;
            }
        for (int sh = 0; sh < S; sh++) assert_true(used[sh]);
    }
    for (uint64_t id = 0; id < 100; id++) {
        assert_int_equal(cm_row_shard(0, id * 7919, 1), 0);
        assert_int_equal(cm_row_shard(3, id, 0), 0);
        assert_int_equal(cm_row_shard(3, id, -2), 0);
    }
}

/* Chi-square of the counts of ids over S shards against uniform, and its
 * bound: df + 8 sd + 8 (df = S - 1, sd = sqrt(2 df)), generous since the
 * mapping is fixed (no flakes), yet far below what a biased map gives. */
static double chi2(const uint64_t *count, int S, uint64_t n) {
    double e = (double)n / S, c = 0.0;
    for (int s = 0; s < S; s++) c += ((double)count[s] - e) * ((double)count[s] - e) / e;
    return c;
}

static void expect_uniform(const char *what, int table, int S, uint64_t first, uint64_t stride,
                           uint64_t n) {
    uint64_t count[64] = {0};
    for (uint64_t i = 0; i < n; i++) count[cm_row_shard(table, first + i * stride, S)]++;
    double c = chi2(count, S, n), df = S - 1, bound = df + 8.0 * sqrt(2.0 * df) + 8.0;
    if (c > bound)
        fail_msg("%s: table %d, %d shards, ids %llu + %llu i (%llu): chi2 %.1f > %.1f", what,
                 table, S, (unsigned long long)first, (unsigned long long)stride,
                 (unsigned long long)n, c, bound);
}

/* Bucketized integers are small consecutive numbers; hashed categorical
 * values may share their low bits or have only high ones: each spreads
 * roughly uniformly over the shards (never id mod n). */
static void test_row_shard_uniform(void **state) {
    (void)state;
    static const int shards[] = {2, 3, 4, 8, 13, 16, 64};
    for (size_t k = 0; k < sizeof shards / sizeof shards[0]; k++) {
        int S = shards[k];
        for (int t = 0; t < 5; t++) {
            expect_uniform("sequential", t, S, 0, 1, 200 * (uint64_t)S);
            expect_uniform("sequential from 1000", t, S, 1000, 1, 200 * (uint64_t)S);
            expect_uniform("stride 2", t, S, 0, 2, 200 * (uint64_t)S);
            expect_uniform("stride S", t, S, 0, (uint64_t)S, 200 * (uint64_t)S);
            expect_uniform("stride 1024", t, S, 5, 1024, 200 * (uint64_t)S);
            expect_uniform("high bits", t, S, 0, (uint64_t)1 << 40, 200 * (uint64_t)S);
        }
    }
    /* Small ranges too: 40 consecutive ids over 2 shards are not all on
     * one side. */
    for (uint64_t start = 0; start < 400; start += 40) {
        int on0 = 0;
        for (uint64_t id = start; id < start + 40; id++) on0 += cm_row_shard(0, id, 2) == 0;
        assert_true(on0 >= 8 && on0 <= 32);
    }
}

/* Tables are placed independently: the same id is on another shard for
 * another table about as often as chance says ((S - 1) / S), so one hot id
 * of every field does not land on one PS. */
static void test_row_shard_tables_differ(void **state) {
    (void)state;
    static const int shards[] = {2, 4, 8};
    for (size_t k = 0; k < sizeof shards / sizeof shards[0]; k++) {
        int S = shards[k];
        for (int t = 1; t < 6; t++) {
            int differ = 0, n = 4000;
            for (uint64_t id = 0; id < (uint64_t)n; id++)
                differ += cm_row_shard(0, id, S) != cm_row_shard(t, id, S);
            double p = (double)differ / n, want = (double)(S - 1) / S;
            if (fabs(p - want) > 0.05)
                fail_msg("tables 0 and %d over %d shards: %.3f of ids differ, want %.3f", t, S,
                         p, want);
        }
    }
}

/* Tables get no partitions: a DeepFM's placement covers its dense
 * variables exactly, and the model fingerprint still covers the tables. */
static void test_tables_have_no_partitions(void **state) {
    (void)state;
    cm_ctr_spec sp = {.nfields = 4, .emb_dim = 8, .nhidden = 1, .hidden = {16}};
    cm_model *m = NULL;
    assert_int_equal(cm_model_create_deepfm(&sp, &m), CM_OK);
    cm_placement *p = NULL;
    assert_int_equal(cm_placement_create(m, 3, 64, &p), CM_OK);
    size_t covered = 0;
    for (int i = 0; i < p->nparts; i++) {
        assert_int_equal(m->vars[p->parts[i].var].kind, CM_VAR_DENSE);
        covered += p->parts[i].count;
    }
    assert_int_equal(covered, m->numel);
    check_placement(m, p);
    sp.emb_dim = 9; /* Other tables, other dense sizes: another placement. */
    cm_model *m2 = NULL;
    cm_placement *p2 = NULL;
    assert_int_equal(cm_model_create_deepfm(&sp, &m2), CM_OK);
    assert_int_equal(cm_placement_create(m2, 3, 64, &p2), CM_OK);
    assert_true(p->fingerprint != p2->fingerprint);
    cm_placement_destroy(p2);
    cm_model_destroy(m2);
    /* Only the table's init scale differs: same partitions, other
     * fingerprint. */
    sp.emb_dim = 8;
    sp.emb_init_scale = 0.5f;
    assert_int_equal(cm_model_create_deepfm(&sp, &m2), CM_OK);
    assert_int_equal(cm_placement_create(m2, 3, 64, &p2), CM_OK);
    assert_int_equal(p2->nparts, p->nparts);
    assert_memory_equal(p2->parts, p->parts, (size_t)p->nparts * sizeof *p->parts);
    assert_true(p->fingerprint != p2->fingerprint);
    cm_placement_destroy(p2);
    cm_model_destroy(m2);
    cm_placement_destroy(p);
    cm_model_destroy(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_every_element_owned_once),
        cmocka_unit_test(test_balanced_mlp),
        cmocka_unit_test(test_balanced_equal_variables),
        cmocka_unit_test(test_variables_smaller_than_shards),
        cmocka_unit_test(test_one_shard),
        cmocka_unit_test(test_bad_args),
        cmocka_unit_test(test_row_shard_deterministic_in_range),
        cmocka_unit_test(test_row_shard_uniform),
        cmocka_unit_test(test_row_shard_tables_differ),
        cmocka_unit_test(test_tables_have_no_partitions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
