/* test_rowacc.c - row gradient lists and per-(table, id) sums (ps/ps_rowacc.c).
 * SPDX-License-Identifier: MIT
 *
 * The reference for every sum is a plain float loop over the same inputs in
 * the same order, compared bit for bit; the inputs are chosen so that
 * another order gives other bits (1 + 2^-25 - 1 is 0 left to right, 2^-25
 * right to left), so a sum in any order but the one added fails.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_rng.h"
#include "ps/ps_rowacc.h"
#include "ps/ps_wire.h"

#define DIM 6 /* The stride: the widest row in these tests. */

/* The entry of (tab, id), or -1. */
static long find(const ps_rowacc *a, uint32_t tab, uint64_t id) {
    for (size_t i = 0; i < a->e.n; i++)
        if (a->e.tab[i] == tab && a->e.id[i] == id) return (long)i;
    return -1;
}

static void expect_bits(const float *want, const float *got, int n) {
    for (int j = 0; j < n; j++)
        if (memcmp(&want[j], &got[j], sizeof(float)) != 0)
            fail_msg("value %d: want %.9g got %.9g", j, (double)want[j], (double)got[j]);
}

/* Add n float32 values through an odd address, as the shard reads the wire. */
static void add_f32(ps_rowacc *a, uint32_t tab, uint64_t id, const float *g, int n) {
    uint8_t raw[1 + DIM * sizeof(float)];
    memcpy(raw + 1, g, (size_t)n * sizeof(float));
    ps_rowacc_add(a, tab, id, raw + 1, n, 0);
}

static void add_bf16(ps_rowacc *a, uint32_t tab, uint64_t id, const uint16_t *h, int n) {
    uint8_t raw[1 + DIM * sizeof(uint16_t)];
    memcpy(raw + 1, h, (size_t)n * sizeof(uint16_t));
    ps_rowacc_add(a, tab, id, raw + 1, n, 1);
}

/* ===== Sums ===== */

/* Entries are summed per (table, id) in the order they are added, and keep
 * their first-seen order; the same id of another table is another entry. */
static void test_sums_in_order_added(void **state) {
    (void)state;
    ps_rowacc a = {0};
    a.e.dim = DIM;
    const float tiny = 0x1p-25f; /* Below half an ulp of 1. */
    float x1[DIM] = {1.0f, tiny, -1.0f, 0.5f, 3.0f, 0.0f};
    float x2[DIM] = {tiny, 1.0f, tiny, 0.25f, -3.0f, 1.0f};
    float x3[DIM] = {-1.0f, -1.0f, 1.0f, 0.125f, tiny, -1.0f};
    add_f32(&a, 2, 77, x1, DIM);
    add_f32(&a, 0, 77, x3, DIM);  /* Same id, another table. */
    add_f32(&a, 2, 5, x2, 4);     /* A narrower table: 4 values. */
    add_f32(&a, 2, 77, x2, DIM);
    add_f32(&a, 2, 77, x3, DIM);
    assert_int_equal(a.e.n, 3);
    /* First-seen order. */
    assert_int_equal(a.e.tab[0], 2);
    assert_int_equal(a.e.id[0], 77);
    assert_int_equal(a.e.tab[1], 0);
    assert_int_equal(a.e.id[1], 77);
    assert_int_equal(a.e.tab[2], 2);
    assert_int_equal(a.e.id[2], 5);
    float want[DIM];
    for (int j = 0; j < DIM; j++) want[j] = (x1[j] + x2[j]) + x3[j];
    expect_bits(want, a.e.g + 0 * DIM, DIM);
    /* The order matters for these values: the check above can fail. */
    int differs = 0;
    for (int j = 0; j < DIM; j++) {
        float other = x1[j] + (x2[j] + x3[j]);
        differs |= memcmp(&other, &want[j], sizeof other) != 0;
    }
    assert_true(differs);
    expect_bits(x3, a.e.g + 1 * DIM, DIM);
    expect_bits(x2, a.e.g + 2 * DIM, 4);
    ps_rowacc_free(&a);
    assert_null(a.map);
    assert_null(a.e.g);
    assert_int_equal(a.e.n, 0);
}

/* bfloat16 input is widened exactly (the upper half of the float32) and may
 * be mixed with float32 input in one entry, first or later. */
static void test_bf16_widened(void **state) {
    (void)state;
    ps_rowacc a = {0};
    a.e.dim = DIM;
    float v[DIM] = {1.0f, -2.5f, 0x1p-20f, 3.140625f, -0.0078125f, 65536.0f};
    uint16_t h[DIM];
    ps_wire_bf16_from_f32(h, v, DIM);
    /* Every value is exact in bfloat16: widening gives it back. */
    for (int j = 0; j < DIM; j++) {
        uint32_t u = (uint32_t)h[j] << 16;
        float w;
        memcpy(&w, &u, sizeof w);
        assert_true(w == v[j]);
    }
    add_bf16(&a, 1, 9, h, DIM);        /* Created from bf16. */
    float f[DIM] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    add_f32(&a, 1, 9, f, DIM);         /* Then float32 added. */
    add_f32(&a, 1, 10, f, DIM);        /* Created from float32... */
    add_bf16(&a, 1, 10, h, DIM);       /* ...then bf16 added. */
    assert_int_equal(a.e.n, 2);
    float want[DIM];
    for (int j = 0; j < DIM; j++) want[j] = v[j] + f[j];
    expect_bits(want, a.e.g, DIM);
    for (int j = 0; j < DIM; j++) want[j] = f[j] + v[j];
    expect_bits(want, a.e.g + DIM, DIM);
    /* A bf16 value that is not a float32's upper half rounded: the low bits
     * are zero after widening, not garbage. */
    ps_rowacc_reset(&a);
    uint16_t odd[1] = {0x3f81}; /* 1.0078125 */
    add_bf16(&a, 0, 1, odd, 1);
    assert_true(a.e.g[0] == 1.0078125f);
    ps_rowacc_free(&a);
}

/* reset empties the accumulator and keeps its memory: after it the same
 * keys start new sums (nothing of the old ones is found), and the map and
 * buffers are reused as they are. */
static void test_reset_reuses_memory_and_empties(void **state) {
    (void)state;
    ps_rowacc a = {0};
    a.e.dim = DIM;
    ps_rowacc_reset(&a); /* Empty and never used: fine. */
    float g[DIM] = {1, 2, 3, 4, 5, 6};
    for (uint64_t id = 0; id < 100; id++) add_f32(&a, (uint32_t)(id % 3), id * 1000, g, DIM);
    assert_int_equal(a.e.n, 100);
    int32_t *map = a.map;
    float *buf = a.e.g;
    size_t mcap = a.mcap, cap = a.e.cap;
    ps_rowacc_reset(&a);
    assert_int_equal(a.e.n, 0);
    assert_ptr_equal(a.map, map);
    assert_ptr_equal(a.e.g, buf);
    assert_int_equal(a.mcap, mcap);
    assert_int_equal(a.e.cap, cap);
    for (size_t h = 0; h < a.mcap; h++) assert_int_equal(a.map[h], 0);
    /* The same keys again, in another order: new entries, new sums. */
    float g2[DIM] = {-1, -1, -1, -1, -1, -1};
    for (uint64_t k = 0; k < 100; k++) {
        uint64_t id = 99 - k;
        add_f32(&a, (uint32_t)(id % 3), id * 1000, g2, DIM);
    }
    assert_int_equal(a.e.n, 100);
    assert_ptr_equal(a.map, map);
    assert_ptr_equal(a.e.g, buf);
    for (size_t i = 0; i < a.e.n; i++) {
        assert_int_equal(a.e.id[i], (99 - i) * 1000);
        expect_bits(g2, a.e.g + i * DIM, DIM);
    }
    ps_rowacc_free(&a);
}

/* Enough keys for several rehashes, every id in several tables, each key
 * added twice in two passes with other keys between: every sum is the two values in order, entries keep
 * first-seen order, the map stays under half full, and a reset followed by
 * as many keys again needs no new memory. */
static void test_many_keys_rehash(void **state) {
    (void)state;
    enum { N = 50000 };
    ps_rowacc a = {0};
    a.e.dim = 2;
    cm_rng rng;
    cm_rng_init(&rng, 99);
    uint64_t *ids = malloc(N * sizeof *ids);
    float *v = malloc(2 * N * sizeof *v);
    assert_true(ids && v);
    for (size_t i = 0; i < N; i++) {
        /* Every id in all 5 tables (entry i is table i % 5): consecutive
         * small ids, and hashed-looking ones with only high bits set. */
        size_t k = i / 5;
        ids[i] = (k % 2) ? (uint64_t)k << 40 : (uint64_t)k;
        v[2 * i] = cm_rng_uniform(&rng) - 0.5f;
        v[2 * i + 1] = 1.0f + cm_rng_uniform(&rng);
    }
    for (int pass = 0; pass < 2; pass++)
        for (size_t i = 0; i < N; i++) {
            float g[2] = {v[2 * i] * (float)(pass + 1), v[2 * i + 1] - (float)pass};
            add_f32(&a, (uint32_t)(i % 5), ids[i], g, 2);
        }
    assert_int_equal(a.e.n, N);
    assert_true(a.mcap >= 2 * a.e.n);
    assert_true((a.mcap & (a.mcap - 1)) == 0);
    for (size_t i = 0; i < N; i++) {
        assert_int_equal(a.e.id[i], ids[i]);
        assert_int_equal(a.e.tab[i], i % 5);
        float want[2] = {v[2 * i] + v[2 * i] * 2.0f, v[2 * i + 1] + (v[2 * i + 1] - 1.0f)};
        expect_bits(want, a.e.g + 2 * i, 2);
    }
    /* Spot checks through the map as well as the list. */
    assert_int_equal(find(&a, 3, ids[3]), 3);
    assert_int_equal(find(&a, 4, ids[3]), 4);
    assert_int_equal(find(&a, 5, ids[3]), -1);
    int32_t *map = a.map;
    float *buf = a.e.g;
    ps_rowacc_reset(&a);
    for (size_t i = 0; i < N; i++)
        add_f32(&a, (uint32_t)(7 + (N - 1 - i) % 5), ids[N - 1 - i], v + 2 * i, 2);
    assert_int_equal(a.e.n, N);
    assert_ptr_equal(a.map, map);
    assert_ptr_equal(a.e.g, buf);
    for (size_t i = 0; i < N; i++) {
        assert_int_equal(a.e.tab[i], 7 + (N - 1 - i) % 5);
        assert_int_equal(a.e.id[i], ids[N - 1 - i]);
        expect_bits(v + 2 * i, a.e.g + 2 * i, 2);
    }
    ps_rowacc_free(&a);
    free(ids);
    free(v);
}

/* The plain list: reserve grows it (keeping what it holds) to room for
 * n + more, and free empties it. */
static void test_rowlist_reserve(void **state) {
    (void)state;
    ps_rowlist l = {0};
    l.dim = 3;
    ps_rowlist_reserve(&l, 0);
    ps_rowlist_reserve(&l, 1);
    assert_true(l.cap >= 1);
    for (size_t i = 0; i < 1000; i++) {
        ps_rowlist_reserve(&l, 1);
        assert_true(l.cap >= l.n + 1);
        l.tab[l.n] = (uint32_t)i;
        l.id[l.n] = i * 3;
        for (int j = 0; j < 3; j++) l.g[l.n * 3 + (size_t)j] = (float)(i + (size_t)j);
        l.n++;
    }
    ps_rowlist_reserve(&l, 5000);
    assert_true(l.cap >= 6000);
    for (size_t i = 0; i < 1000; i++) {
        assert_int_equal(l.tab[i], i);
        assert_int_equal(l.id[i], i * 3);
        assert_true(l.g[i * 3 + 2] == (float)(i + 2));
    }
    ps_rowlist_free(&l);
    assert_int_equal(l.n, 0);
    assert_int_equal(l.cap, 0);
    assert_null(l.g);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sums_in_order_added),
        cmocka_unit_test(test_bf16_widened),
        cmocka_unit_test(test_reset_reuses_memory_and_empties),
        cmocka_unit_test(test_many_keys_rehash),
        cmocka_unit_test(test_rowlist_reserve),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
