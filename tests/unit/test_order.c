/* test_order.c - unit tests for the epoch order, slices and the prefetcher.
 * SPDX-License-Identifier: MIT
 *
 * The prefetcher is checked against batches computed directly from
 * wk_order_epoch() and wk_dataset_gather() over a small synthetic data set
 * whose examples all differ, so any mix-up of examples shows.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <stdio.h>
#include <unistd.h>

#include "common/cm_status.h"
#include "worker/input/wk_criteo.h"
#include "worker/input/wk_ctrdata.h"
#include "worker/input/wk_dataset.h"
#include "worker/input/wk_order.h"
#include "worker/input/wk_prefetch.h"

/* ===== Helpers ===== */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void check_permutation(const uint32_t *perm, size_t n) {
    uint8_t *seen = calloc(n, 1);
    assert_non_null(seen);
    for (size_t i = 0; i < n; i++) {
        assert_true(perm[i] < n);
        assert_int_equal(seen[perm[i]], 0);
        seen[perm[i]] = 1;
    }
    free(seen);
}

/* n examples of 'dim' bytes: byte j of example i is (3 * i + j) % 256, so
 * the first byte already tells examples apart while n < 86; label i % 10. */
static wk_dataset make_dataset(size_t n, size_t dim) {
    wk_dataset d;
    d.n = n;
    d.dim = dim;
    d.nclasses = 10;
    d.images = malloc(n * dim);
    d.labels = malloc(n);
    assert_non_null(d.images);
    assert_non_null(d.labels);
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < dim; j++) d.images[i * dim + j] = (uint8_t)((3 * i + j) % 256);
        d.labels[i] = (uint8_t)(i % 10);
    }
    return d;
}

/* The slice [lo, hi) of the global batch of 'step', computed directly. */
static void expected_batch(const wk_dataset *d, uint64_t seed, size_t B, int64_t step, size_t lo,
                           size_t hi, float *x, int32_t *y, int64_t *epoch) {
    size_t spe = wk_order_steps_per_epoch(d->n, B);
    uint32_t *perm = malloc(d->n * sizeof *perm);
    assert_non_null(perm);
    *epoch = step / (int64_t)spe;
    wk_order_epoch(seed, *epoch, d->n, perm);
    size_t first = (size_t)(step % (int64_t)spe) * B;
    wk_dataset_gather(d, perm + first + lo, hi - lo, x, y);
    free(perm);
}

static wk_prefetch *start(const wk_dataset *d, uint64_t seed, size_t B, int rank, int nranks,
                          int64_t first, int64_t nsteps, int depth) {
    wk_prefetch_cfg cfg = {.data = d, .seed = seed, .global_batch = B, .rank = rank,
                           .nranks = nranks, .first_step = first, .nsteps = nsteps,
                           .depth = depth};
    wk_prefetch *p = NULL;
    assert_int_equal(wk_prefetch_start(&cfg, &p), CM_OK);
    assert_non_null(p);
    return p;
}

/* ===== Order ===== */

static void test_epoch_is_permutation(void **state) {
    (void)state;
    size_t ns[4] = {1, 7, 1000, 60000};
    for (int k = 0; k < 4; k++) {
        uint32_t *perm = malloc(ns[k] * sizeof *perm);
        assert_non_null(perm);
        for (int64_t e = 0; e < 3; e++) {
            wk_order_epoch(42, e, ns[k], perm);
            check_permutation(perm, ns[k]);
        }
        free(perm);
    }
}

static void test_epoch_is_deterministic(void **state) {
    (void)state;
    enum { N = 1000 };
    static uint32_t a[N], b[N], c[N], d[N], id[N];
    for (uint32_t i = 0; i < N; i++) id[i] = i;
    wk_order_epoch(7, 3, N, a);
    wk_order_epoch(7, 3, N, b);
    assert_memory_equal(a, b, sizeof a);
    /* Another epoch, another seed: another order (and not the identity). */
    wk_order_epoch(7, 4, N, c);
    wk_order_epoch(8, 3, N, d);
    assert_memory_not_equal(a, c, sizeof a);
    assert_memory_not_equal(a, d, sizeof a);
    assert_memory_not_equal(c, d, sizeof a);
    assert_memory_not_equal(a, id, sizeof a);
    /* A prefix of examples is not a fixed point either: the first position
     * gets a different example in most epochs. */
    int differ = 0;
    for (int64_t e = 0; e < 20; e++) {
        wk_order_epoch(7, e, N, c);
        differ += c[0] != a[0];
    }
    assert_true(differ >= 15);
}

static void test_steps_per_epoch(void **state) {
    (void)state;
    assert_int_equal(wk_order_steps_per_epoch(10, 3), 3);
    assert_int_equal(wk_order_steps_per_epoch(10, 10), 1);
    assert_int_equal(wk_order_steps_per_epoch(9, 10), 0);
    assert_int_equal(wk_order_steps_per_epoch(60000, 128), 468);
    assert_int_equal(wk_order_steps_per_epoch(60000, 100), 600);
    assert_int_equal(wk_order_steps_per_epoch(10, 0), 0);
}

static void test_slices_tile_the_batch(void **state) {
    (void)state;
    size_t Bs[4] = {1, 7, 128, 130};
    for (int bi = 0; bi < 4; bi++) {
        size_t B = Bs[bi];
        for (int W = 1; W <= 5; W++) {
            size_t next = 0, smin = B, smax = 0;
            for (int k = 0; k < W; k++) {
                size_t lo, hi;
                wk_order_slice(B, k, W, &lo, &hi);
                assert_int_equal(lo, next);
                assert_true(hi >= lo);
                size_t s = hi - lo;
                if (s < smin) smin = s;
                if (s > smax) smax = s;
                /* The first B % W ranks get the extra example. */
                assert_int_equal(s, B / (size_t)W + ((size_t)k < B % (size_t)W ? 1 : 0));
                next = hi;
            }
            assert_int_equal(next, B);
            assert_true(smax - smin <= 1);
        }
    }
}

/* ===== Prefetch ===== */

static void test_prefetch_matches_direct_order(void **state) {
    (void)state;
    /* n = 50, B = 8: 6 steps per epoch, 2 examples dropped; 20 steps span
     * epochs 0 to 3. Depth 1 and 3 exercise the ring. */
    wk_dataset d = make_dataset(50, 3);
    const size_t B = 8;
    float want_x[8 * 3];
    int32_t want_y[8];
    int depths[3] = {1, 3, 0};
    for (int di = 0; di < 3; di++) {
        wk_prefetch *p = start(&d, 99, B, 0, 1, 0, 20, depths[di]);
        for (int64_t s = 0; s < 20; s++) {
            wk_batch *b = NULL;
            assert_int_equal(wk_prefetch_next(p, &b), CM_OK);
            assert_non_null(b);
            int64_t epoch;
            expected_batch(&d, 99, B, s, 0, B, want_x, want_y, &epoch);
            assert_int_equal(b->step, s);
            assert_int_equal(b->epoch, epoch);
            assert_int_equal(b->n, B);
            assert_memory_equal(b->x, want_x, sizeof want_x);
            assert_memory_equal(b->y, want_y, sizeof want_y);
            wk_prefetch_release(p, b);
        }
        wk_batch *b = (wk_batch *)&d; /* Must be overwritten with NULL. */
        assert_int_equal(wk_prefetch_next(p, &b), CM_ESHUTDOWN);
        assert_null(b);
        assert_int_equal(wk_prefetch_next(p, &b), CM_ESHUTDOWN);
        wk_prefetch_stop(p);
    }
    wk_dataset_free(&d);
}

static void test_prefetch_ranks_concatenate(void **state) {
    (void)state;
    /* B = 8 over W = 3: slices of 3, 3 and 2. */
    wk_dataset d = make_dataset(50, 3);
    const size_t B = 8;
    const int W = 3;
    wk_prefetch *whole = start(&d, 5, B, 0, 1, 0, 14, 2);
    wk_prefetch *part[3];
    for (int k = 0; k < W; k++) part[k] = start(&d, 5, B, k, W, 0, 14, 2);
    for (int64_t s = 0; s < 14; s++) {
        wk_batch *w;
        assert_int_equal(wk_prefetch_next(whole, &w), CM_OK);
        float x[8 * 3];
        int32_t y[8];
        size_t at = 0;
        for (int k = 0; k < W; k++) {
            wk_batch *b;
            assert_int_equal(wk_prefetch_next(part[k], &b), CM_OK);
            assert_int_equal(b->step, s);
            assert_int_equal(b->n, k < 2 ? 3 : 2);
            memcpy(x + at * 3, b->x, b->n * 3 * sizeof(float));
            memcpy(y + at, b->y, b->n * sizeof(int32_t));
            at += b->n;
            wk_prefetch_release(part[k], b);
        }
        assert_int_equal(at, B);
        assert_memory_equal(x, w->x, sizeof x);
        assert_memory_equal(y, w->y, sizeof y);
        wk_prefetch_release(whole, w);
    }
    for (int k = 0; k < W; k++) wk_prefetch_stop(part[k]);
    wk_prefetch_stop(whole);
    wk_dataset_free(&d);
}

static void test_prefetch_resume(void **state) {
    (void)state;
    /* A run resumed at step 13 (in epoch 2) sees what a fresh run sees
     * there. */
    wk_dataset d = make_dataset(50, 3);
    wk_prefetch *fresh = start(&d, 11, 8, 0, 1, 0, 20, 4);
    wk_prefetch *resumed = start(&d, 11, 8, 0, 1, 13, 7, 4);
    wk_batch *a, *b;
    for (int64_t s = 0; s < 20; s++) {
        assert_int_equal(wk_prefetch_next(fresh, &a), CM_OK);
        if (s >= 13) {
            assert_int_equal(wk_prefetch_next(resumed, &b), CM_OK);
            assert_int_equal(b->step, s);
            assert_int_equal(b->epoch, a->epoch);
            assert_int_equal(b->n, a->n);
            assert_memory_equal(b->x, a->x, a->n * 3 * sizeof(float));
            assert_memory_equal(b->y, a->y, a->n * sizeof(int32_t));
            wk_prefetch_release(resumed, b);
        }
        wk_prefetch_release(fresh, a);
    }
    assert_int_equal(wk_prefetch_next(resumed, &b), CM_ESHUTDOWN);
    assert_int_equal(wk_prefetch_next(fresh, &a), CM_ESHUTDOWN);
    wk_prefetch_stop(resumed);
    wk_prefetch_stop(fresh);
    wk_dataset_free(&d);
}

static void test_prefetch_whole_set_per_step(void **state) {
    (void)state;
    /* B = n: one step per epoch, every step a new permutation. */
    wk_dataset d = make_dataset(7, 2);
    wk_prefetch *p = start(&d, 3, 7, 0, 1, 0, 4, 1);
    for (int64_t s = 0; s < 4; s++) {
        wk_batch *b;
        assert_int_equal(wk_prefetch_next(p, &b), CM_OK);
        assert_int_equal(b->epoch, s);
        float x[14];
        int32_t y[7];
        int64_t e;
        expected_batch(&d, 3, 7, s, 0, 7, x, y, &e);
        assert_memory_equal(b->x, x, sizeof x);
        assert_memory_equal(b->y, y, sizeof y);
        wk_prefetch_release(p, b);
    }
    assert_int_equal(wk_prefetch_next(p, &(wk_batch *){NULL}), CM_ESHUTDOWN);
    wk_prefetch_stop(p);
    wk_dataset_free(&d);
}

static void test_prefetch_zero_steps(void **state) {
    (void)state;
    wk_dataset d = make_dataset(10, 2);
    wk_prefetch *p = start(&d, 1, 4, 0, 1, 0, 0, 2);
    wk_batch *b;
    assert_int_equal(wk_prefetch_next(p, &b), CM_ESHUTDOWN);
    wk_prefetch_stop(p);
    wk_prefetch_stop(NULL);
    wk_dataset_free(&d);
}

static void test_prefetch_stop_mid_run(void **state) {
    (void)state;
    wk_dataset d = make_dataset(1000, 16);
    /* Never consumed: the producer fills both slots and blocks. */
    wk_prefetch *p = start(&d, 1, 10, 0, 1, 0, 1000000, 2);
    struct timespec pause = {0, 20 * 1000 * 1000};
    nanosleep(&pause, NULL);
    double t0 = now_s();
    wk_prefetch_stop(p);
    assert_true(now_s() - t0 < 1.0);

    /* Stop while holding a batch, and right after start. */
    p = start(&d, 1, 10, 1, 2, 5, 1000000, 2);
    wk_batch *b;
    assert_int_equal(wk_prefetch_next(p, &b), CM_OK);
    assert_int_equal(b->step, 5);
    nanosleep(&pause, NULL);
    t0 = now_s();
    wk_prefetch_stop(p);
    assert_true(now_s() - t0 < 1.0);
    for (int i = 0; i < 20; i++) wk_prefetch_stop(start(&d, 1, 10, 0, 1, 0, 1000000, 1));
    wk_dataset_free(&d);
}

static void test_prefetch_rejects_bad_cfg(void **state) {
    (void)state;
    wk_dataset d = make_dataset(10, 2);
    wk_dataset empty = {0};
    wk_prefetch_cfg good = {.data = &d, .seed = 1, .global_batch = 4, .rank = 0, .nranks = 2,
                            .first_step = 0, .nsteps = 10, .depth = 0};
    wk_prefetch_cfg bad[9];
    for (int i = 0; i < 9; i++) bad[i] = good;
    bad[0].data = &empty;
    bad[1].data = NULL;
    bad[2].global_batch = 0;
    bad[3].global_batch = 11;
    bad[4].rank = 2;
    bad[5].rank = -1;
    bad[6].nranks = 0;
    bad[7].depth = -1;
    bad[8].nsteps = -1;
    for (int i = 0; i < 9; i++) {
        wk_prefetch *p = (wk_prefetch *)&d;
        assert_int_equal(wk_prefetch_start(&bad[i], &p), CM_EINVAL);
        assert_null(p);
    }
    wk_prefetch *p = NULL;
    assert_int_equal(wk_prefetch_start(&good, &p), CM_OK);
    wk_prefetch_stop(p);
    wk_dataset_free(&d);
}

/* ===== Click data ===== */

/* A click data directory of n training lines: line i has label i % 2 and
 * categorical feature C1 = i + 1 (so its id tells lines apart; integers are
 * bucketized), the rest constant;
 * 'bad' lines (wrong field count) after every 'bad_every'-th good line. */
static void write_clicks(const char *dir, size_t n, size_t bad_every) {
    char path[256];
    snprintf(path, sizeof path, "%s/train.txt", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    for (size_t i = 0; i < n; i++) {
        fprintf(f, "%zu", i % 2);
        for (int k = 0; k < WK_CRITEO_NINT; k++) fprintf(f, "\t%d", k);
        fprintf(f, "\t%zx", i + 1);
        for (int k = 1; k < WK_CRITEO_NCAT; k++) fprintf(f, "\t%08x", 0x1000 + k);
        fputc('\n', f);
        if (bad_every && (i + 1) % bad_every == 0) fputs("1\t2\n", f);
    }
    fclose(f);
    snprintf(path, sizeof path, "%s/test.txt", dir);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("1\t5", f);
    for (int k = 1; k < WK_CRITEO_NINT; k++) fprintf(f, "\t%d", k);
    for (int k = 0; k < WK_CRITEO_NCAT; k++) fprintf(f, "\t%08x", k);
    fputc('\n', f);
    fclose(f);
}

static const int field_table[WK_CRITEO_NFIELDS] = {
    0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19,
    20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38};

static wk_prefetch *start_clicks(const wk_ctrdata *c, size_t B, int rank, int nranks,
                                 int64_t first, int64_t nsteps) {
    wk_prefetch_cfg cfg = {.ctr = c, .field_table = field_table,
                           .ntables = WK_CRITEO_NFIELDS, .global_batch = B, .rank = rank,
                           .nranks = nranks, .first_step = first, .nsteps = nsteps, .depth = 3};
    wk_prefetch *p = NULL;
    assert_int_equal(wk_prefetch_start(&cfg, &p), CM_OK);
    return p;
}

/* The line number a click example came from: its C1 value, through the id. */
static size_t line_of(const uint64_t *ids) {
    for (size_t i = 0; i < 1000; i++)
        if (wk_criteo_cat_id(WK_CRITEO_NINT, i + 1, 0) == ids[WK_CRITEO_NINT]) return i;
    fail_msg("no line has id %llu", (unsigned long long)ids[WK_CRITEO_NINT]);
    return 0;
}

static void test_prefetch_clicks_ranks_resume_and_two_held(void **state) {
    (void)state;
    char dir[] = "/tmp/test_order_clicks_XXXXXX";
    assert_non_null(mkdtemp(dir));
    write_clicks(dir, 100, 0);
    wk_ctrdata c;
    char err[256];
    assert_int_equal(wk_ctrdata_load(dir, 0, 0, NULL, &c, err, sizeof err), CM_OK);
    assert_int_equal(c.n_train, 100);
    /* B = 7 over W = 2 (slices of 4 and 3): 14 steps an epoch, 2 lines
     * dropped; 30 steps cross two epoch ends. Rank 1 starts at step 9. */
    const size_t B = 7;
    wk_prefetch *r0 = start_clicks(&c, B, 0, 2, 0, 30), *r1 = start_clicks(&c, B, 1, 2, 9, 21);
    wk_batch *a, *b, *held = NULL;
    for (int64_t s = 0; s < 30; s++) {
        assert_int_equal(wk_prefetch_next(r0, &a), CM_OK);
        assert_int_equal(a->n, 4);
        assert_null(a->x);
        size_t first = (size_t)(s % 14) * B;
        for (size_t k = 0; k < a->n; k++) {
            assert_int_equal(line_of(a->ids + k * WK_CRITEO_NFIELDS), first + k);
            assert_int_equal(a->y[k], (int32_t)((first + k) % 2));
        }
        /* Every field's row is a row of the set, and the map points to it. */
        assert_int_equal(a->rows.n, 4);
        for (size_t p = 0; p < 4 * WK_CRITEO_NFIELDS; p++)
            assert_true(a->rows.ids[a->rows.inv[p]] == a->ids[p]);
        assert_int_equal(a->epoch, s / 14);
        if (s >= 9) {
            /* The resumed rank holds two batches at once, as PS mode does. */
            assert_int_equal(wk_prefetch_next(r1, &b), CM_OK);
            if (held) wk_prefetch_release(r1, held);
            assert_int_equal(b->step, s);
            assert_int_equal(b->n, 3);
            for (size_t k = 0; k < b->n; k++)
                assert_int_equal(line_of(b->ids + k * WK_CRITEO_NFIELDS), first + 4 + k);
            held = b;
        }
        wk_prefetch_release(r0, a);
    }
    wk_prefetch_release(r1, held);
    assert_int_equal(wk_prefetch_next(r0, &a), CM_ESHUTDOWN);
    wk_prefetch_stop(r0);
    wk_prefetch_stop(r1);
    wk_ctrdata_free(&c);
    char path[256];
    snprintf(path, sizeof path, "%s/train.txt", dir);
    unlink(path);
    snprintf(path, sizeof path, "%s/test.txt", dir);
    unlink(path);
    rmdir(dir);
}

static void test_prefetch_clicks_error_surfaces(void **state) {
    (void)state;
    char dir[] = "/tmp/test_order_clicks_XXXXXX";
    assert_non_null(mkdtemp(dir));
    write_clicks(dir, 60, 0);
    wk_ctrdata c;
    char err[256], path[256];
    assert_int_equal(wk_ctrdata_load(dir, 0, 0, NULL, &c, err, sizeof err), CM_OK);
    /* The file shrinks after the count: the reader says so, not a hang. */
    snprintf(path, sizeof path, "%s/train.txt", dir);
    assert_int_equal(truncate(path, 400), 0);
    wk_prefetch *p = start_clicks(&c, 10, 0, 1, 0, 6);
    wk_batch *b;
    int rc;
    while ((rc = wk_prefetch_next(p, &b)) == CM_OK) wk_prefetch_release(p, b);
    assert_int_equal(rc, CM_ECORRUPT);
    assert_non_null(strstr(wk_prefetch_error(p), "ended after"));
    wk_prefetch_stop(p);
    wk_ctrdata_free(&c);
    /* Bad lines past the threshold fail the load, naming the file. */
    write_clicks(dir, 60, 10);
    wk_criteo_opts o = {.max_bad_lines = 3, .warn_limit = -1};
    assert_int_equal(wk_ctrdata_load(dir, 0, 0, &o, &c, err, sizeof err), CM_ECORRUPT);
    assert_non_null(strstr(err, "train.txt"));
    o.max_bad_lines = 10;
    assert_int_equal(wk_ctrdata_load(dir, 0, 0, &o, &c, err, sizeof err), CM_OK);
    assert_int_equal(c.n_train, 60);
    assert_int_equal(c.bad_train, 6);
    wk_ctrdata_free(&c);
    unlink(path);
    snprintf(path, sizeof path, "%s/test.txt", dir);
    unlink(path);
    rmdir(dir);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefetch_clicks_ranks_resume_and_two_held),
        cmocka_unit_test(test_prefetch_clicks_error_surfaces),
        cmocka_unit_test(test_epoch_is_permutation),
        cmocka_unit_test(test_epoch_is_deterministic),
        cmocka_unit_test(test_steps_per_epoch),
        cmocka_unit_test(test_slices_tile_the_batch),
        cmocka_unit_test(test_prefetch_matches_direct_order),
        cmocka_unit_test(test_prefetch_ranks_concatenate),
        cmocka_unit_test(test_prefetch_resume),
        cmocka_unit_test(test_prefetch_whole_set_per_step),
        cmocka_unit_test(test_prefetch_zero_steps),
        cmocka_unit_test(test_prefetch_stop_mid_run),
        cmocka_unit_test(test_prefetch_rejects_bad_cfg),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
