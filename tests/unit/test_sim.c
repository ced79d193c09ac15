/* test_sim.c - the simulated devices: time, size, determinism, the hook.
 * SPDX-License-Identifier: MIT
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_model.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "worker/model/wk_sim.h"
#include "worker/wk_replicas.h"

static cm_model *mlp(void) {
    int sizes[] = {20, 16, 8, 4};
    cm_model *m;
    assert_int_equal(cm_model_create_mlp(sizes, 4, &m), CM_OK);
    return m;
}

static void test_bad_config(void **state) {
    (void)state;
    cm_model *m = mlp();
    wk_sim *s;
    wk_sim_cfg neither = {0}, both = {.tflops = 1, .step_ms = 1}, neg = {.step_ms = 1,
                                                                         .intra_gbps = -1};
    assert_int_equal(wk_sim_create(m, &neither, 1, 8, &s), CM_EINVAL);
    assert_int_equal(wk_sim_create(m, &both, 1, 8, &s), CM_EINVAL);
    assert_int_equal(wk_sim_create(m, &neg, 1, 8, &s), CM_EINVAL);
    wk_sim_cfg jit = {.step_ms = 1, .jitter = 1.0}, jneg = {.step_ms = 1, .jitter = -0.1};
    assert_int_equal(wk_sim_create(m, &jit, 1, 8, &s), CM_EINVAL);
    assert_int_equal(wk_sim_create(m, &jneg, 1, 8, &s), CM_EINVAL);
    assert_null(s);
    wk_replicas *rs;
    assert_int_equal(wk_replicas_create_sim(m, &neither, 2, 8, &rs), CM_EINVAL);
    cm_model_destroy(m);
}

/* --sim-jitter: each step's time within T (1 +- F), spread over that range
 * (mean about T), the same draws for the same seed and worker, others for
 * another worker; none without jitter. */
static void test_jitter(void **state) {
    (void)state;
    cm_model *m = mlp();
    wk_sim_cfg c = {.step_ms = 50, .seed = 7, .jitter = 0.2, .stream = 1};
    wk_sim_cfg other = c, none = c;
    other.stream = 2;
    none.jitter = 0;
    wk_sim *a, *b, *o, *z;
    assert_int_equal(wk_sim_create(m, &c, 1, 8, &a), CM_OK);
    assert_int_equal(wk_sim_create(m, &c, 1, 8, &b), CM_OK);
    assert_int_equal(wk_sim_create(m, &other, 1, 8, &o), CM_OK);
    assert_int_equal(wk_sim_create(m, &none, 1, 8, &z), CM_OK);
    double sum = 0, lo = 1, hi = 0;
    int differ = 0, below = 0, above = 0;
    const int n = 2000;
    for (uint64_t k = 0; k < (uint64_t)n; k++) {
        double t = wk_sim_step_seconds(a, 8, k);
        assert_true(t >= 0.040 && t <= 0.060);
        assert_true(t == wk_sim_step_seconds(b, 8, k));
        differ += t != wk_sim_step_seconds(o, 8, k);
        assert_true(wk_sim_step_seconds(z, 8, k) == 0.050);
        below += t < 0.045;
        above += t > 0.055;
        sum += t;
        lo = t < lo ? t : lo;
        hi = t > hi ? t : hi;
    }
    assert_true(differ > n * 9 / 10);
    assert_true(fabs(sum / n - 0.050) < 0.001);
    assert_true(lo < 0.041 && hi > 0.059);
    assert_true(below > n / 5 && above > n / 5); /* A quarter each, uniform. */
    wk_sim_destroy(a);
    wk_sim_destroy(b);
    wk_sim_destroy(o);
    wk_sim_destroy(z);
    cm_model_destroy(m);
}

/* Gradients of the model's size, the same every step and run, not zero;
 * the step takes the time asked, whatever the batch. */
static void test_deterministic_and_timed(void **state) {
    (void)state;
    cm_model *m = mlp();
    wk_sim_cfg c = {.step_ms = 30, .seed = 7};
    wk_replicas *a, *b;
    assert_int_equal(wk_replicas_create_sim(m, &c, 1, 8, &a), CM_OK);
    assert_int_equal(wk_replicas_create_sim(m, &c, 1, 8, &b), CM_OK);
    float *g1 = calloc(m->numel + 1, sizeof(float)), *g2 = calloc(m->numel + 1, sizeof(float));
    float x[8 * 20] = {0};
    int32_t y[8] = {0};
    g1[m->numel] = g2[m->numel] = 42.0f; /* Past the end: untouched. */
    double t0 = cm_now();
    assert_int_equal(wk_replicas_gradient(a, x, y, 8, NULL, g1, NULL, NULL, NULL, NULL), CM_OK);
    double t1 = cm_now();
    assert_true(t1 - t0 >= 0.030);
    assert_true(t1 - t0 < 3.0); /* Milliseconds, not seconds. */
    assert_int_equal(wk_replicas_gradient(b, x, y, 3, NULL, g2, NULL, NULL, NULL, NULL), CM_OK);
    assert_memory_equal(g1, g2, m->numel * sizeof(float));
    assert_true(g1[m->numel] == 42.0f && g2[m->numel] == 42.0f);
    size_t nonzero = 0;
    for (size_t i = 0; i < m->numel; i++) nonzero += g1[i] != 0.0f;
    assert_true(nonzero > m->numel * 9 / 10);
    /* Another seed, another pattern. */
    wk_replicas *o;
    wk_sim_cfg c2 = c;
    c2.seed = 8;
    assert_int_equal(wk_replicas_create_sim(m, &c2, 1, 8, &o), CM_OK);
    assert_int_equal(wk_replicas_gradient(o, x, y, 8, NULL, g2, NULL, NULL, NULL, NULL), CM_OK);
    assert_true(memcmp(g1, g2, m->numel * sizeof(float)) != 0);
    /* Evaluation computes nothing. */
    double loss = 0;
    int64_t right = 0;
    assert_int_equal(wk_replicas_evaluate_batch(a, x, y, 8, NULL, &loss, &right, NULL), CM_OK);
    assert_true(loss == 0.0 && right == 0);
    wk_replicas_destroy(a);
    wk_replicas_destroy(b);
    wk_replicas_destroy(o);
    free(g1);
    free(g2);
    cm_model_destroy(m);
}

/* The time follows the FLOPs of the largest slice at the given speed, and
 * the local reduce of D devices costs 2 (D - 1) / D of the bytes. */
static void test_tflops_and_reduce(void **state) {
    (void)state;
    cm_model *m = mlp();
    const wk_model_ops *ops = wk_model_ops_for(m);
    wk_sim_cfg c = {.tflops = 1e-6, .intra_gbps = 1e-3}; /* 1 MFLOPS, 1 MB/s */
    wk_sim *s;
    assert_int_equal(wk_sim_create(m, &c, 4, 64, &s), CM_OK);
    /* 10 examples on 4 devices: slices of 3, 3, 2, 2. */
    assert_float_equal(wk_sim_compute_seconds(s, 10), ops->flops(m, 3) / 1e6, 1e-12);
    double bytes = (double)m->numel * 4;
    assert_float_equal(wk_sim_reduce_seconds(s, 0), 2.0 * 3 / 4 * bytes / 1e6, 1e-12);
    wk_sim_destroy(s);
    assert_int_equal(wk_sim_create(m, &c, 1, 64, &s), CM_OK);
    assert_float_equal(wk_sim_reduce_seconds(s, 0), 0.0, 0.0);
    wk_sim_destroy(s);
    cm_model_destroy(m);
}

/* The hook hears what the real backward pass would say: every row of every
 * variable once, each after its gradient is written, last variable first;
 * need() for each piece of the first kernel before any ready(). */
typedef struct seen {
    const cm_model *m;
    const float *grad, *want;
    int needs, readies, first_ready_var;
    size_t rows_seen[8];
} seen;

static void on_ready(void *ud, int var, size_t lo, size_t hi) {
    seen *s = ud;
    const cm_var *v = &s->m->vars[var];
    size_t per = v->numel / (size_t)v->dims[0];
    if (s->readies++ == 0) s->first_ready_var = var;
    assert_memory_equal(s->grad + v->offset + lo * per, s->want + v->offset + lo * per,
                        (hi - lo) * per * sizeof(float));
    s->rows_seen[var] += hi - lo;
}

static int on_need(void *ud, int var, size_t lo, size_t hi) {
    seen *s = ud;
    assert_int_equal(var, 0);
    assert_int_equal(s->readies, 0);
    assert_true(lo < hi);
    s->needs++;
    return CM_OK;
}

static void test_hook(void **state) {
    (void)state;
    cm_model *m = mlp();
    wk_sim_cfg c = {.step_ms = 5, .seed = 3};
    wk_sim *sim;
    assert_int_equal(wk_sim_create(m, &c, 1, 8, &sim), CM_OK);
    float *want = calloc(m->numel, sizeof(float)), *grad = calloc(m->numel, sizeof(float));
    assert_int_equal(wk_sim_gradient(sim, 8, want, NULL, 0, NULL), CM_OK);
    size_t split0[] = {0, 5, 12, 20};
    const size_t *splits[8] = {split0};
    int nsplits[8] = {4};
    seen s = {.m = m, .grad = grad, .want = want};
    wk_grad_hook h = {.ready = on_ready, .need = on_need, .ud = &s, .splits = splits,
                      .nsplits = nsplits};
    assert_int_equal(wk_sim_gradient(sim, 8, grad, NULL, 0, &h), CM_OK);
    assert_int_equal(s.needs, 3);
    assert_int_equal(s.first_ready_var, m->nvars - 1);
    for (int v = 0; v < m->nvars; v++) assert_int_equal(s.rows_seen[v], m->vars[v].dims[0]);
    assert_memory_equal(grad, want, m->numel * sizeof(float));
    wk_sim_destroy(sim);
    free(want);
    free(grad);
    cm_model_destroy(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_deterministic_and_timed),
        cmocka_unit_test(test_jitter),
        cmocka_unit_test(test_tflops_and_reduce),
        cmocka_unit_test(test_hook),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
