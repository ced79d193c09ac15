/* test_mlp.c - MLP gradients against finite differences; D local replicas.
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
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "ps/ps_optim.h"
#include "worker/device/wk_device.h"
#include "worker/model/wk_mlp.h"
#include "worker/wk_replicas.h"

static double norm_rel(const float *a, const float *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num) / sqrt(den);
}

static void random_batch(uint64_t seed, int n, int dim, int classes, float *x, int32_t *y) {
    cm_rng r;
    cm_rng_init(&r, seed);
    for (int i = 0; i < n * dim; i++) x[i] = cm_rng_uniform(&r);
    for (int i = 0; i < n; i++) y[i] = (int32_t)cm_rng_below(&r, (uint64_t)classes);
}

static double mean_loss(wk_mlp *net, const float *p, const float *x, const int32_t *y, int n) {
    double loss = 0.0;
    assert_int_equal(wk_mlp_evaluate(net, p, x, y, n, &loss, NULL), CM_OK);
    return loss / n;
}

/* Central differences in double over every parameter of a small MLP. */
static void test_gradient_matches_finite_differences(void **state) {
    (void)state;
    int sizes[] = {9, 7, 6, 4};
    const int n = 5;
    cm_model *m;
    assert_int_equal(cm_model_create_mlp(sizes, 4, &m), CM_OK);
    wk_device *dev = wk_device_cpu_create(0);
    wk_mlp *net;
    assert_int_equal(wk_mlp_create(m, dev, n, &net), CM_OK);
    float *p = malloc(m->numel * sizeof(float)), *g = malloc(m->numel * sizeof(float));
    float *fd = malloc(m->numel * sizeof(float));
    cm_model_init(m, 7, p);
    /* Non-zero biases so every ReLU path is exercised away from its kink. */
    cm_rng r;
    cm_rng_init(&r, 5);
    for (size_t i = 0; i < m->numel; i++) p[i] += 0.1f * (cm_rng_uniform(&r) - 0.5f);
    float x[5 * 9];
    int32_t y[5];
    random_batch(11, n, 9, 4, x, y);
    double loss = 0.0;
    int64_t correct = 0;
    assert_int_equal(wk_mlp_gradient(net, p, x, y, n, g, &loss, &correct, NULL), CM_OK);
    assert_true(fabs(loss / n - mean_loss(net, p, x, y, n)) < 1e-6);
    assert_true(correct >= 0 && correct <= n);
    const float eps = 1e-2f;
    for (size_t i = 0; i < m->numel; i++) {
        float keep = p[i];
        p[i] = keep + eps;
        double up = mean_loss(net, p, x, y, n);
        p[i] = keep - eps;
        double down = mean_loss(net, p, x, y, n);
        p[i] = keep;
        fd[i] = (float)((up - down) / (2.0 * eps));
    }
    double err = norm_rel(g, fd, m->numel);
    print_message("gradient vs finite differences: normwise relative error %.2e\n", err);
    assert_true(err < 1e-3);
    /* The check can fail: a gradient missing one layer's bias is caught. */
    memset(g + m->vars[3].offset, 0, m->vars[3].numel * sizeof(float));
    assert_true(norm_rel(g, fd, m->numel) > 1e-3);
    free(p);
    free(g);
    free(fd);
    wk_mlp_destroy(net);
    wk_device_destroy(dev);
    cm_model_destroy(m);
}

/* One optimizer step of a batch of 10 on D = 1 and on D = 3 replicas (slices
 * of 4, 3 and 3) gives the same update. */
static void test_three_replicas_equal_one(void **state) {
    (void)state;
    int sizes[] = {20, 16, 12, 5};
    const int n = 10;
    cm_model *m;
    assert_int_equal(cm_model_create_mlp(sizes, 4, &m), CM_OK);
    float x[10 * 20];
    int32_t y[10];
    random_batch(3, n, 20, 5, x, y);
    float *p0 = malloc(m->numel * sizeof(float));
    cm_model_init(m, 9, p0);
    float *delta[2];
    for (int run = 0; run < 2; run++) {
        int D = run == 0 ? 1 : 3;
        wk_device *devs[3];
        for (int d = 0; d < D; d++) devs[d] = wk_device_cpu_create(d);
        wk_replicas *rs;
        assert_int_equal(wk_replicas_create(m, devs, D, n, &rs), CM_OK);
        assert_int_equal(wk_replicas_count(rs), D);
        float *p = malloc(m->numel * sizeof(float)), *g = malloc(m->numel * sizeof(float));
        float *slots = calloc(2 * m->numel, sizeof(float));
        memcpy(p, p0, m->numel * sizeof(float));
        assert_int_equal(wk_replicas_set_params(rs, p), CM_OK);
        double loss = 0.0;
        wk_phase_times t;
        assert_int_equal(wk_replicas_gradient(rs, x, y, n, NULL, g, NULL, &loss, NULL, &t), CM_OK);
        assert_true(loss > 0.0);
        ps_optim_cfg c = ps_optim_defaults(PS_OPTIM_SGD, 0.1f);
        ps_optim_apply(&c, 1, p, g, slots, m->numel);
        delta[run] = malloc(m->numel * sizeof(float));
        for (size_t i = 0; i < m->numel; i++) delta[run][i] = p[i] - p0[i];
        free(p);
        free(g);
        free(slots);
        wk_replicas_destroy(rs);
        for (int d = 0; d < D; d++) wk_device_destroy(devs[d]);
    }
    double err = norm_rel(delta[1], delta[0], m->numel);
    print_message("D=3 vs D=1 update: normwise relative difference %.2e\n", err);
    assert_true(err <= 1e-5);

    /* Negative control: averaging the three slice gradients without weighting
     * by example count is a different update, and the bound catches it. */
    wk_device *dev = wk_device_cpu_create(0);
    wk_mlp *net;
    assert_int_equal(wk_mlp_create(m, dev, n, &net), CM_OK);
    float *g = malloc(m->numel * sizeof(float)), *sum = calloc(m->numel, sizeof(float));
    int lo[] = {0, 4, 7}, hi[] = {4, 7, 10};
    for (int d = 0; d < 3; d++) {
        assert_int_equal(wk_mlp_gradient(net, p0, x + lo[d] * 20, y + lo[d], hi[d] - lo[d], g,
                                         NULL, NULL, NULL),
                         CM_OK);
        for (size_t i = 0; i < m->numel; i++) sum[i] += -0.1f * g[i] / 3.0f;
    }
    assert_true(norm_rel(sum, delta[0], m->numel) > 1e-5);
    free(g);
    free(sum);
    wk_mlp_destroy(net);
    wk_device_destroy(dev);
    free(delta[0]);
    free(delta[1]);
    free(p0);
    cm_model_destroy(m);
}

static void test_bad_batch_sizes(void **state) {
    (void)state;
    int sizes[] = {4, 3, 2};
    cm_model *m;
    assert_int_equal(cm_model_create_mlp(sizes, 3, &m), CM_OK);
    wk_device *dev = wk_device_cpu_create(0);
    wk_mlp *net = (wk_mlp *)1;
    assert_int_equal(wk_mlp_create(m, dev, 0, &net), CM_EINVAL);
    assert_null(net);
    assert_int_equal(wk_mlp_create(m, dev, 2, &net), CM_OK);
    float p[4 * 3 + 3 + 3 * 2 + 2] = {0}, g[sizeof p / sizeof p[0]], x[12] = {0};
    int32_t y[3] = {0, 1, 0};
    assert_int_equal(wk_mlp_gradient(net, p, x, y, 0, g, NULL, NULL, NULL), CM_EINVAL);
    assert_int_equal(wk_mlp_gradient(net, p, x, y, 3, g, NULL, NULL, NULL), CM_EINVAL);
    wk_mlp_destroy(net);
    wk_device_destroy(dev);
    cm_model_destroy(m);
}

/* Records the hook's announcements: every row once, in an order where no
 * variable is announced before its gradient is written, and the values at
 * announcement time are final. */
typedef struct hook_log {
    const cm_model *m;
    const float *grad;
    float *seen; /* Copy of each range when announced. */
    int *count;  /* Per element: times announced. */
    int calls, kernel0_pieces;
} hook_log;

static void on_ready(void *ud, int var, size_t rb, size_t re) {
    hook_log *h = ud;
    const cm_var *v = &h->m->vars[var];
    size_t rows = v->ndims >= 1 ? (size_t)v->dims[0] : 1, row = v->numel / rows;
    assert_true(rb < re && re <= rows);
    size_t a = v->offset + rb * row, b = v->offset + re * row;
    for (size_t i = a; i < b; i++) {
        h->count[i]++;
        h->seen[i] = h->grad[i];
    }
    h->calls++;
    if (var == 0) h->kernel0_pieces++;
}

/* The hook tests' set-up: an 11-7-6-4 MLP, a batch of 5, parameters p
 * (seed 7), the plain gradient g, and splits of the first kernel in 3
 * pieces (rows 0-4, 4-8, 8-11). */
typedef struct hook_fixture {
    cm_model *m;
    wk_device *dev;
    wk_mlp *net;
    float *p, *g;
    float x[5 * 11];
    int32_t y[5];
    size_t sp0[4];
    const size_t *splits[6];
    int nsplits[6];
} hook_fixture;
enum { HOOK_N = 5 };

static void fixture_init(hook_fixture *f) {
    int sizes[] = {11, 7, 6, 4};
    memset(f, 0, sizeof *f);
    assert_int_equal(cm_model_create_mlp(sizes, 4, &f->m), CM_OK);
    f->dev = wk_device_cpu_create(0);
    assert_int_equal(wk_mlp_create(f->m, f->dev, HOOK_N, &f->net), CM_OK);
    f->p = malloc(f->m->numel * sizeof(float));
    f->g = malloc(f->m->numel * sizeof(float));
    cm_model_init(f->m, 7, f->p);
    random_batch(13, HOOK_N, 11, 4, f->x, f->y);
    assert_int_equal(wk_mlp_gradient(f->net, f->p, f->x, f->y, HOOK_N, f->g, NULL, NULL, NULL),
                     CM_OK);
    const size_t sp[] = {0, 4, 8, 11};
    memcpy(f->sp0, sp, sizeof sp);
    f->splits[0] = f->sp0;
    f->nsplits[0] = 4;
}

static void fixture_free(hook_fixture *f) {
    free(f->p);
    free(f->g);
    wk_mlp_destroy(f->net);
    wk_device_destroy(f->dev);
    cm_model_destroy(f->m);
}

/* With a hook that splits the first kernel into 3 row pieces, the gradient
 * equals the unsplit one (within float rounding of the GEMM blocking), every
 * element is announced exactly once, and its value never changes after. */
static void test_gradient_hook_pieces(void **state) {
    (void)state;
    hook_fixture f;
    fixture_init(&f);
    const cm_model *m = f.m;
    float *g2 = malloc(m->numel * sizeof(float)), *seen = malloc(m->numel * sizeof(float));
    int *count = calloc(m->numel, sizeof(int));
    hook_log h = {.m = m, .grad = g2, .seen = seen, .count = count};
    wk_grad_hook hook = {.ready = on_ready, .ud = &h, .splits = f.splits, .nsplits = f.nsplits};
    assert_int_equal(wk_mlp_gradient(f.net, f.p, f.x, f.y, HOOK_N, g2, NULL, NULL, &hook), CM_OK);
    assert_int_equal(h.kernel0_pieces, 3);
    assert_int_equal(h.calls, 3 + 5);
    for (size_t i = 0; i < m->numel; i++) {
        assert_int_equal(count[i], 1);
        assert_memory_equal(&seen[i], &g2[i], sizeof(float));
    }
    assert_true(norm_rel(g2, f.g, m->numel) < 1e-6);
    free(g2);
    free(seen);
    free(count);
    fixture_free(&f);
}

/* need(): the forward pass may read a part of params only after asking for
 * it. The test keeps the true values aside and writes NaN over params; each
 * need() copies the asked rows in. If the forward pass read any row before
 * asking, NaN would reach the gradient. Every element is asked for exactly
 * once before the first announcement of the step, the first kernel in its
 * 3 pieces in order, and the gradient equals the plain one (within the
 * rounding of summing the first layer piece by piece). */
typedef struct need_log {
    const cm_model *m;
    const float *truth;
    float *params;
    int *asked;     /* Per element: times asked for. */
    int pieces;     /* Of var 0. */
    size_t next_row; /* Of var 0: pieces come in row order. */
    int ready_calls;
    int asked_after_ready;
    int fail_at;    /* Return CM_EABORTED at this call (0 = never). */
    int calls;
} need_log;

static int on_need(void *ud, int var, size_t rb, size_t re) {
    need_log *h = ud;
    h->calls++;
    if (h->fail_at && h->calls == h->fail_at) return CM_EABORTED;
    const cm_var *v = &h->m->vars[var];
    size_t rows = v->ndims >= 1 ? (size_t)v->dims[0] : 1, row = v->numel / rows;
    assert_true(rb < re && re <= rows);
    if (h->ready_calls) h->asked_after_ready++;
    if (var == 0) {
        assert_int_equal(rb, h->next_row);
        h->next_row = re;
        h->pieces++;
    }
    size_t a = v->offset + rb * row, b = v->offset + re * row;
    for (size_t i = a; i < b; i++) {
        h->asked[i]++;
        h->params[i] = h->truth[i];
    }
    return CM_OK;
}

static void on_ready_count(void *ud, int var, size_t rb, size_t re) {
    (void)var;
    (void)rb;
    (void)re;
    ((need_log *)ud)->ready_calls++;
}

static void test_gradient_need_pieces(void **state) {
    (void)state;
    hook_fixture f;
    fixture_init(&f);
    const cm_model *m = f.m;
    float *p = malloc(m->numel * sizeof(float)), *g2 = malloc(m->numel * sizeof(float));
    int *asked = calloc(m->numel, sizeof(int));
    for (size_t i = 0; i < m->numel; i++) p[i] = NAN;
    need_log h = {.m = m, .truth = f.p, .params = p, .asked = asked};
    wk_grad_hook hook = {.ready = on_ready_count, .ud = &h, .splits = f.splits,
                         .nsplits = f.nsplits, .need = on_need};
    double loss = 0.0;
    assert_int_equal(wk_mlp_gradient(f.net, p, f.x, f.y, HOOK_N, g2, &loss, NULL, &hook), CM_OK);
    assert_int_equal(h.pieces, 3);
    assert_int_equal(h.next_row, 11);
    assert_int_equal(h.asked_after_ready, 0);
    for (size_t i = 0; i < m->numel; i++) {
        assert_int_equal(asked[i], 1);
        assert_false(isnan(g2[i]));
    }
    assert_false(isnan(loss));
    assert_true(norm_rel(g2, f.g, m->numel) < 1e-6);

    /* A failing need() ends the gradient with its status. */
    for (size_t i = 0; i < m->numel; i++) p[i] = NAN;
    need_log fail = {.m = m, .truth = f.p, .params = p, .asked = asked, .fail_at = 2};
    hook.ud = &fail;
    assert_int_equal(wk_mlp_gradient(f.net, p, f.x, f.y, HOOK_N, g2, NULL, NULL, &hook),
                     CM_EABORTED);
    assert_int_equal(fail.calls, 2);
    assert_int_equal(fail.ready_calls, 0);
    free(p);
    free(g2);
    free(asked);
    fixture_free(&f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_gradient_matches_finite_differences),
        cmocka_unit_test(test_three_replicas_equal_one),
        cmocka_unit_test(test_bad_batch_sizes),
        cmocka_unit_test(test_gradient_hook_pieces),
        cmocka_unit_test(test_gradient_need_pieces),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
