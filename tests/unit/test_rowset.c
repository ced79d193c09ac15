/* test_rowset.c - unit tests for the batch rowset (dedup of (table, id) keys).
 * SPDX-License-Identifier: MIT
 *
 * Hand examples pin the numbering; random batches (several shapes, id
 * distributions with many and with no duplicates, extreme ids) are checked
 * against a naive quadratic dedup; the gradient test checks the property
 * the trainer relies on: scatter-adding per-position gradients through inv
 * gives each unique row the sum over its positions.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "worker/input/wk_rowset.h"

/* ===== Helpers ===== */

typedef struct key {
    uint32_t table;
    uint64_t id;
} key;

static int cmp_key(const void *a, const void *b) {
    const key *x = a, *y = b;
    if (x->table != y->table) return x->table < y->table ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* The unique keys of the batch by a quadratic scan, then sorted: what the
 * rowset must hold. Returns their count; *out is malloc'ed. */
static size_t naive_unique(const uint64_t *ids, size_t n, int nfields, const int *field_table,
                           key **out) {
    size_t npos = n * (size_t)nfields, nu = 0;
    key *u = malloc((npos ? npos : 1) * sizeof *u);
    assert_non_null(u);
    for (size_t p = 0; p < npos; p++) {
        key k = {(uint32_t)field_table[p % (size_t)nfields], ids[p]};
        size_t j = 0;
        while (j < nu && cmp_key(&u[j], &k) != 0) j++;
        if (j == nu) u[nu++] = k;
    }
    qsort(u, nu, sizeof *u, cmp_key);
    *out = u;
    return nu;
}

/* Everything the header promises about the last build, against the naive
 * dedup. */
static void check_rowset(const wk_rowset *r, const uint64_t *ids, size_t n,
                         const int *field_table) {
    key *want;
    size_t nu = naive_unique(ids, n, r->nfields, field_table, &want);
    assert_int_equal(r->n, n);
    assert_int_equal(r->nuniq, nu);
    for (size_t u = 0; u < nu; u++) {
        assert_int_equal(r->tables[u], want[u].table);
        assert_true(r->ids[u] == want[u].id);
    }
    /* tab_begin: contiguous, ascending, covering exactly table t's rows. */
    assert_int_equal(r->tab_begin[0], 0);
    assert_int_equal(r->tab_begin[r->ntables], nu);
    for (int t = 0; t < r->ntables; t++) {
        assert_true(r->tab_begin[t] <= r->tab_begin[t + 1]);
        for (size_t u = r->tab_begin[t]; u < r->tab_begin[t + 1]; u++)
            assert_int_equal(r->tables[u], (uint32_t)t);
    }
    for (size_t p = 0; p < n * (size_t)r->nfields; p++) {
        int32_t u = r->inv[p];
        assert_true(u >= 0 && (size_t)u < nu);
        assert_int_equal(r->tables[u], (uint32_t)field_table[p % (size_t)r->nfields]);
        assert_true(r->ids[u] == ids[p]);
    }
    free(want);
}

enum { IDS_FEW, IDS_WIDE, IDS_EXTREME, IDS_ZIPFISH, IDS_LOW_VARYING };

/* Random ids of five kinds: few distinct (heavy duplication), full 64-bit
 * (almost none), extremes (0, 1, UINT64_MAX and neighbours, values that
 * differ only in one high or low byte), a skewed mix of both, and ids
 * whose high bytes take two values each while the low ones vary widely
 * (the sort's radix passes on the high bytes leave long unsorted runs, so
 * it must fall back to passes over every byte). */
static void random_ids(cm_rng *g, int kind, uint64_t *ids, size_t count) {
    static const uint64_t extremes[] = {0,
                                        1,
                                        UINT64_MAX,
                                        UINT64_MAX - 1,
                                        (uint64_t)1 << 63,
                                        ((uint64_t)1 << 63) - 1,
                                        0xff00000000000000ULL,
                                        0x00000000000000ffULL,
                                        0x0100000000000000ULL,
                                        0x0000000000000100ULL};
    for (size_t i = 0; i < count; i++) {
        switch (kind) {
        case IDS_FEW:
            ids[i] = cm_rng_below(g, 7);
            break;
        case IDS_WIDE:
            ids[i] = cm_rng_next(g);
            break;
        case IDS_EXTREME:
            ids[i] = extremes[cm_rng_below(g, sizeof extremes / sizeof extremes[0])];
            break;
        case IDS_ZIPFISH: {
            uint64_t x = cm_rng_next(g);
            ids[i] = (x & 3) ? cm_mix64(cm_rng_below(g, 1 + (x >> 60))) : x;
            break;
        }
        default: {
            uint64_t x = cm_rng_next(g);
            ids[i] = (x & 1) << 56 | (x & 2) << 47 | (x >> 40);
        }
        }
    }
}

/* ===== Tests ===== */

/* Two examples, three fields; fields 0 and 1 read table 0, field 2 table 1.
 * Id 5 repeats within a field, across fields of one table, and appears in
 * table 1 too, where it is a row of its own. */
static void test_hand_example(void **state) {
    (void)state;
    const int field_table[] = {0, 0, 1};
    const uint64_t ids[] = {5, 5, 5, /* example 0 */
                            7, 5, 0 /* example 1 */};
    wk_rowset r;
    assert_int_equal(wk_rowset_init(&r, 4, 3, 2), CM_OK);
    wk_rowset_build(&r, ids, 2, field_table);
    assert_int_equal(r.nuniq, 4);
    const uint32_t want_t[] = {0, 0, 1, 1};
    const uint64_t want_id[] = {5, 7, 0, 5};
    for (int u = 0; u < 4; u++) {
        assert_int_equal(r.tables[u], want_t[u]);
        assert_int_equal(r.ids[u], want_id[u]);
    }
    assert_int_equal(r.tab_begin[0], 0);
    assert_int_equal(r.tab_begin[1], 2);
    assert_int_equal(r.tab_begin[2], 4);
    const int32_t want_inv[] = {0, 0, 3, 1, 0, 2};
    for (int p = 0; p < 6; p++) assert_int_equal(r.inv[p], want_inv[p]);
    wk_rowset_free(&r);
}

/* n = 0 after a non-empty build: nothing left over, every range empty;
 * a table no field reads has an empty range. */
static void test_empty_and_unused_table(void **state) {
    (void)state;
    const int field_table[] = {2, 0};
    const uint64_t ids[] = {9, 9, 8, 9};
    wk_rowset r;
    assert_int_equal(wk_rowset_init(&r, 2, 2, 3), CM_OK);
    wk_rowset_build(&r, ids, 2, field_table);
    check_rowset(&r, ids, 2, field_table);
    assert_int_equal(r.nuniq, 3);
    assert_int_equal(r.tab_begin[1], r.tab_begin[2]); /* table 1: no field */
    wk_rowset_build(&r, ids, 0, field_table);
    assert_int_equal(r.n, 0);
    assert_int_equal(r.nuniq, 0);
    for (int t = 0; t <= 3; t++) assert_int_equal(r.tab_begin[t], 0);
    wk_rowset_free(&r);
    wk_rowset_free(&r); /* zeroed: fine */
    wk_rowset_free(NULL);
}

/* 0 and UINT64_MAX sort to the ends; keys that differ in one byte only
 * (each radix digit, both the skipped and the sorted ones) stay apart. */
static void test_extreme_ids(void **state) {
    (void)state;
    enum { N = 100 };
    int field_table[1] = {0};
    uint64_t ids[N];
    for (int i = 0; i < N; i++) {
        int d = i % 8;
        ids[i] = (i % 3 == 0) ? UINT64_MAX : (i % 3 == 1) ? 0 : (uint64_t)(i % 5) << (8 * d);
    }
    wk_rowset r;
    assert_int_equal(wk_rowset_init(&r, N, 1, 1), CM_OK);
    wk_rowset_build(&r, ids, N, field_table);
    check_rowset(&r, ids, N, field_table);
    assert_int_equal(r.ids[0], 0);
    assert_true(r.ids[r.nuniq - 1] == UINT64_MAX);
    wk_rowset_free(&r);
}

/* Random batches of many shapes against the naive dedup, reusing one
 * rowset (so a smaller batch after a larger one must leave nothing stale). */
static void test_random_vs_naive(void **state) {
    (void)state;
    cm_rng g;
    cm_rng_init(&g, 42);
    const size_t sizes[] = {1, 2, 7, 31, 33, 64, 200, 1};
    struct {
        int nfields, ntables;
    } shapes[] = {{1, 1}, {3, 5}, {39, 39}, {8, 3}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int nf = shapes[s].nfields, nt = shapes[s].ntables;
        int *field_table = malloc((size_t)nf * sizeof *field_table);
        assert_non_null(field_table);
        /* Shape 1 leaves tables unused; shape 3 shares tables. */
        for (int f = 0; f < nf; f++) field_table[f] = (int)((f * 7 + (int)s) % nt);
        wk_rowset r;
        assert_int_equal(wk_rowset_init(&r, 200, nf, nt), CM_OK);
        uint64_t *ids = malloc(200 * (size_t)nf * sizeof *ids);
        assert_non_null(ids);
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            for (int kind = IDS_FEW; kind <= IDS_LOW_VARYING; kind++) {
                size_t n = sizes[i];
                random_ids(&g, kind, ids, n * (size_t)nf);
                wk_rowset_build(&r, ids, n, field_table);
                check_rowset(&r, ids, n, field_table);
            }
        }
        free(ids);
        free(field_table);
        wk_rowset_free(&r);
    }
}

/* One large segment of each kind (the fallback path sorts thousands of
 * keys), against the naive dedup. */
static void test_large_segment(void **state) {
    (void)state;
    enum { N = 3000 };
    const int field_table[] = {1, 0, 1};
    cm_rng g;
    cm_rng_init(&g, 5);
    uint64_t *ids = malloc(N * 3 * sizeof *ids);
    assert_non_null(ids);
    wk_rowset r;
    assert_int_equal(wk_rowset_init(&r, N, 3, 2), CM_OK);
    for (int kind = IDS_FEW; kind <= IDS_LOW_VARYING; kind++) {
        random_ids(&g, kind, ids, N * 3);
        wk_rowset_build(&r, ids, N, field_table);
        check_rowset(&r, ids, N, field_table);
    }
    free(ids);
    wk_rowset_free(&r);
}

/* Dedup and summing of a batch's gradient: scatter-adding per-position
 * gradients (dim floats each) through inv gives, for every unique row, the
 * sum of the gradients of the positions holding its (table, id), computed
 * here naively. Values are small integers, so float sums are exact and
 * the comparison can be exact. */
static void test_gradient_sum(void **state) {
    (void)state;
    enum { N = 256, NF = 39, NT = 26, DIM = 3 };
    cm_rng g;
    cm_rng_init(&g, 7);
    int field_table[NF];
    for (int f = 0; f < NF; f++) field_table[f] = f % NT; /* fields 26..38 share */
    uint64_t *ids = malloc((size_t)N * NF * sizeof *ids);
    float *pg = malloc((size_t)N * NF * DIM * sizeof *pg);
    assert_non_null(ids);
    assert_non_null(pg);
    random_ids(&g, IDS_ZIPFISH, ids, (size_t)N * NF);
    for (size_t i = 0; i < (size_t)N * NF * DIM; i++) pg[i] = (float)cm_rng_below(&g, 17) - 8.0f;

    wk_rowset r;
    assert_int_equal(wk_rowset_init(&r, N, NF, NT), CM_OK);
    wk_rowset_build(&r, ids, N, field_table);
    assert_true(r.nuniq < (size_t)N * NF); /* there were duplicates to sum */
    float *rg = calloc(r.nuniq * DIM, sizeof *rg);
    assert_non_null(rg);
    for (size_t p = 0; p < (size_t)N * NF; p++)
        for (int j = 0; j < DIM; j++) rg[(size_t)r.inv[p] * DIM + j] += pg[p * DIM + j];

    for (size_t u = 0; u < r.nuniq; u++) {
        float want[DIM] = {0};
        int hits = 0;
        for (size_t p = 0; p < (size_t)N * NF; p++) {
            if ((uint32_t)field_table[p % NF] != r.tables[u] || ids[p] != r.ids[u]) continue;
            hits++;
            for (int j = 0; j < DIM; j++) want[j] += pg[p * DIM + j];
        }
        assert_true(hits > 0);
        for (int j = 0; j < DIM; j++) assert_true(rg[u * DIM + j] == want[j]);
    }
    free(rg);
    free(pg);
    free(ids);
    wk_rowset_free(&r);
}

/* Copy holds the source's build and keeps it when the source is rebuilt. */
static void test_copy(void **state) {
    (void)state;
    const int field_table[] = {0, 1, 1};
    cm_rng g;
    cm_rng_init(&g, 3);
    uint64_t a[30], b[30];
    random_ids(&g, IDS_FEW, a, 30);
    random_ids(&g, IDS_WIDE, b, 30);
    wk_rowset src, dst;
    assert_int_equal(wk_rowset_init(&src, 10, 3, 2), CM_OK);
    assert_int_equal(wk_rowset_init(&dst, 16, 3, 2), CM_OK);
    wk_rowset_build(&src, a, 10, field_table);
    wk_rowset_copy(&dst, &src);
    wk_rowset_build(&src, b, 4, field_table);
    check_rowset(&dst, a, 10, field_table);
    check_rowset(&src, b, 4, field_table);
    wk_rowset_free(&src);
    wk_rowset_free(&dst);
}

static void test_init_errors(void **state) {
    (void)state;
    wk_rowset r;
    memset(&r, 0xab, sizeof r);
    assert_int_equal(wk_rowset_init(&r, 0, 3, 3), CM_EINVAL);
    assert_null(r.inv);
    assert_int_equal(r.max_n, 0);
    assert_int_equal(wk_rowset_init(&r, 10, 0, 3), CM_EINVAL);
    assert_int_equal(wk_rowset_init(&r, 10, 3, 0), CM_EINVAL);
    /* max_n * nfields must stay below 2^31 (inv is int32). */
    assert_int_equal(wk_rowset_init(&r, (size_t)1 << 26, 32, 1), CM_EINVAL);
    assert_int_equal(wk_rowset_init(&r, SIZE_MAX / 2, 39, 39), CM_EINVAL);
    assert_null(r.scratch);
}

/* The prefetch thread's workload: 1024 examples x 39 fields, one table a
 * field, Criteo-like ids (a few small-valued integer fields, skewed hashed
 * categorical ones). Prints the time per batch and checks the last one. */
static void test_speed(void **state) {
    (void)state;
    enum { N = 1024, NF = 39, BATCHES = 50 };
    int field_table[NF];
    for (int f = 0; f < NF; f++) field_table[f] = f;
    uint64_t *ids = malloc((size_t)BATCHES * N * NF * sizeof *ids);
    assert_non_null(ids);
    cm_rng g;
    cm_rng_init(&g, 11);
    for (size_t i = 0; i < (size_t)BATCHES * N * NF; i++) {
        int f = (int)(i % NF);
        uint64_t vocab = f < 13 ? 40 : (uint64_t)4 << (f - 13) % 22;
        /* A crude skew: the minimum of two uniforms. */
        uint64_t a = cm_rng_below(&g, vocab), b = cm_rng_below(&g, vocab);
        ids[i] = f < 13 ? (a < b ? a : b) : cm_mix64((a < b ? a : b) ^ (uint64_t)f);
    }
    wk_rowset r;
    assert_int_equal(wk_rowset_init(&r, N, NF, NF), CM_OK);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int b = 0; b < BATCHES; b++) wk_rowset_build(&r, ids + (size_t)b * N * NF, N, field_table);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double us = ((double)(t1.tv_sec - t0.tv_sec) * 1e6 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e3) /
                BATCHES;
    printf("wk_rowset_build: 1024 x 39 keys, %zu unique: %.1f us per batch (%.1f ns per key)\n",
           r.nuniq, us, us * 1e3 / (N * NF));
    check_rowset(&r, ids + (size_t)(BATCHES - 1) * N * NF, N, field_table);
    free(ids);
    wk_rowset_free(&r);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hand_example),     cmocka_unit_test(test_empty_and_unused_table),
        cmocka_unit_test(test_extreme_ids),      cmocka_unit_test(test_random_vs_naive),
        cmocka_unit_test(test_large_segment),    cmocka_unit_test(test_gradient_sum),
        cmocka_unit_test(test_copy),
        cmocka_unit_test(test_init_errors),      cmocka_unit_test(test_speed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
