/* test_optim.c - SGD, momentum, Adam and Adagrad against independent references.
 * SPDX-License-Identifier: MIT
 *
 * References: closed forms for a constant gradient (derived by hand, see each
 * test), and a straightforward double-precision recurrence for a varying
 * gradient. Neither shares code with ps_optim.c.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <string.h>

#include "common/cm_rng.h"
#include "ps/ps_optim.h"

#define N 37

static double rel_err(const float *a, const double *ref, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - ref[i]) * (a[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1.0));
}

static void fill(float *w, float *g, uint64_t seed) {
    cm_rng r;
    cm_rng_init(&r, seed);
    for (int i = 0; i < N; i++) {
        w[i] = 2.0f * cm_rng_uniform(&r) - 1.0f;
        g[i] = 2.0f * cm_rng_uniform(&r) - 1.0f;
    }
}

/* Constant gradient g for k steps: w_k = w_0 - k lr g. */
static void test_sgd_constant_gradient(void **state) {
    (void)state;
    float w[N], g[N];
    double ref[N];
    fill(w, g, 1);
    ps_optim_cfg c = ps_optim_defaults(PS_OPTIM_SGD, 0.1f);
    const int k = 25;
    for (int i = 0; i < N; i++) ref[i] = (double)w[i] - k * 0.1 * (double)g[i];
    for (int t = 1; t <= k; t++) ps_optim_apply(&c, t, w, g, NULL, N);
    assert_true(rel_err(w, ref, N) < 1e-5);
}

/* a_t = g (1 - mu^t) / (1 - mu), so
 * w_k = w_0 - lr g / (1 - mu) * (k - mu (1 - mu^k) / (1 - mu)). */
static void test_momentum_constant_gradient(void **state) {
    (void)state;
    float w[N], g[N], slots[N] = {0};
    double ref[N];
    fill(w, g, 2);
    const double lr = 0.05, mu = 0.9;
    const int k = 40;
    ps_optim_cfg c = ps_optim_defaults(PS_OPTIM_MOMENTUM, (float)lr);
    assert_int_equal(ps_optim_nslots(PS_OPTIM_MOMENTUM), 1);
    double s = (k - mu * (1.0 - pow(mu, k)) / (1.0 - mu)) / (1.0 - mu);
    for (int i = 0; i < N; i++) ref[i] = (double)w[i] - lr * (double)g[i] * s;
    for (int t = 1; t <= k; t++) ps_optim_apply(&c, t, w, g, slots, N);
    assert_true(rel_err(w, ref, N) < 1e-5);
}

/* With a constant gradient the bias-corrected moments are exactly g and g^2,
 * so every step moves w by lr g / (|g| + eps). */
static void test_adam_constant_gradient(void **state) {
    (void)state;
    float w[N], g[N], slots[2 * N] = {0};
    double ref[N];
    fill(w, g, 3);
    const double lr = 1e-3;
    const int k = 100;
    ps_optim_cfg c = ps_optim_defaults(PS_OPTIM_ADAM, (float)lr);
    assert_int_equal(ps_optim_nslots(PS_OPTIM_ADAM), 2);
    for (int i = 0; i < N; i++)
        ref[i] = (double)w[i] - k * lr * (double)g[i] / (fabs((double)g[i]) + 1e-8);
    for (int t = 1; t <= k; t++) ps_optim_apply(&c, t, w, g, slots, N);
    assert_true(rel_err(w, ref, N) < 1e-5);
}

/* Two Adagrad steps by hand (lr 0.1, acc_0 0.1, eps 1e-7), in double:
 *   w = 1, g = 0.5:   acc = 0.1 + 0.25 = 0.35,     w = 1 - 0.05 / (sqrt(0.35) + eps)
 *                                                    = 0.91548458881286
 *        g = -0.25:   acc = 0.35 + 0.0625 = 0.4125, w += 0.025 / (sqrt(0.4125) + eps)
 *                                                    = 0.95440952996033
 *   w = -0.75, g = -2: acc = 4.1,      w = -0.65122704521309
 *        g = 0.125:   acc = 4.115625, w = -0.65738862523698
 * and the slot holds acc - 0.1 (0.3125 and 4.015625 after two steps). */
static void test_adagrad_two_steps_by_hand(void **state) {
    (void)state;
    float w[2] = {1.0f, -0.75f}, s[2] = {0.0f, 0.0f};
    const float g1[2] = {0.5f, -2.0f}, g2[2] = {-0.25f, 0.125f};
    ps_optim_cfg c = ps_optim_defaults(PS_OPTIM_ADAGRAD, 0.1f);
    assert_int_equal(ps_optim_nslots(PS_OPTIM_ADAGRAD), 1);
    assert_true(c.initial_accumulator == 0.1f && c.epsilon == 1e-7f);
    ps_optim_apply(&c, 1, w, g1, s, 2);
    assert_float_equal(w[0], 0.91548458881286, 1e-6);
    assert_float_equal(w[1], -0.65122704521309, 1e-6);
    ps_optim_apply(&c, 2, w, g2, s, 2);
    assert_float_equal(w[0], 0.95440952996033, 1e-6);
    assert_float_equal(w[1], -0.65738862523698, 1e-6);
    assert_float_equal(s[0], 0.3125, 1e-6);
    assert_float_equal(s[1], 4.015625, 1e-6);
}

/* Constant gradient g: acc_t = acc_0 + t g^2, so
 * w_k = w_0 - lr g sum_{t=1..k} 1 / (sqrt(acc_0 + t g^2) + eps). */
static void test_adagrad_constant_gradient(void **state) {
    (void)state;
    float w[N], g[N], slots[N] = {0};
    double ref[N];
    fill(w, g, 6);
    const double lr = 0.05, a0 = 0.1, eps = 1e-7;
    const int k = 60;
    ps_optim_cfg c = ps_optim_defaults(PS_OPTIM_ADAGRAD, (float)lr);
    for (int i = 0; i < N; i++) {
        double gi = g[i], sum = 0.0;
        for (int t = 1; t <= k; t++) sum += 1.0 / (sqrt(a0 + t * gi * gi) + eps);
        ref[i] = (double)w[i] - lr * gi * sum;
    }
    for (int t = 1; t <= k; t++) ps_optim_apply(&c, t, w, g, slots, N);
    assert_true(rel_err(w, ref, N) < 1e-5);
}

/* The slot starts at zero and holds acc - initial_accumulator: the same
 * trajectory, within float rounding, as TensorFlow's accumulator started at
 * initial_accumulator (here 0.1 and, to see the value is used, 2.5). */
static void test_adagrad_zeroed_slot_equals_initial_accumulator(void **state) {
    (void)state;
    const float inits[2] = {0.1f, 2.5f};
    for (int j = 0; j < 2; j++) {
        float w[N], g[N], slots[N] = {0}, tw[N], acc[N];
        fill(w, g, 8);
        for (int i = 0; i < N; i++) {
            tw[i] = w[i];
            acc[i] = inits[j];
        }
        ps_optim_cfg c = ps_optim_defaults(PS_OPTIM_ADAGRAD, 0.02f);
        c.initial_accumulator = inits[j];
        cm_rng r;
        cm_rng_init(&r, 11);
        for (int t = 1; t <= 30; t++) {
            for (int i = 0; i < N; i++) g[i] = 2.0f * cm_rng_uniform(&r) - 1.0f;
            ps_optim_apply(&c, t, w, g, slots, N);
            for (int i = 0; i < N; i++) { /* TensorFlow's form, in float */
                acc[i] += g[i] * g[i];
                tw[i] -= 0.02f * g[i] / (sqrtf(acc[i]) + 1e-7f);
            }
        }
        for (int i = 0; i < N; i++) {
            assert_float_equal(w[i], tw[i], 1e-6f * (1.0f + fabsf(tw[i])));
            assert_float_equal(slots[i] + inits[j], acc[i], 1e-5f * acc[i]);
        }
    }
}

/* Varying gradients against a double-precision recurrence. */
static void test_varying_gradient(void **state) {
    (void)state;
    const int kinds[] = {PS_OPTIM_MOMENTUM, PS_OPTIM_ADAM, PS_OPTIM_ADAGRAD};
    for (int k = 0; k < 3; k++) {
        const int kind = kinds[k];
        float w[N], g[N], slots[2 * N] = {0};
        double rw[N], m[N] = {0}, v[N] = {0};
        fill(w, g, 4);
        for (int i = 0; i < N; i++) rw[i] = w[i];
        ps_optim_cfg c = ps_optim_defaults(kind, 0.01f);
        cm_rng r;
        cm_rng_init(&r, 99);
        for (int t = 1; t <= 50; t++) {
            for (int i = 0; i < N; i++) g[i] = 2.0f * cm_rng_uniform(&r) - 1.0f;
            ps_optim_apply(&c, t, w, g, slots, N);
            for (int i = 0; i < N; i++) {
                double gi = g[i];
                if (kind == PS_OPTIM_MOMENTUM) {
                    m[i] = 0.9 * m[i] + gi;
                    rw[i] -= 0.01 * m[i];
                } else if (kind == PS_OPTIM_ADAGRAD) {
                    m[i] += gi * gi; /* acc - 0.1, as the slot holds it */
                    rw[i] -= 0.01 * gi / (sqrt(m[i] + 0.1) + 1e-7);
                } else {
                    m[i] = 0.9 * m[i] + 0.1 * gi;
                    v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                    double mh = m[i] / (1.0 - pow(0.9, t)), vh = v[i] / (1.0 - pow(0.999, t));
                    rw[i] -= 0.01 * mh / (sqrt(vh) + 1e-8);
                }
            }
        }
        assert_true(rel_err(w, rw, N) < 1e-5);
    }
}

/* Updating a range of an array is the same as updating the whole array
 * there: what lets a PS shard own a partition of a variable. */
static void test_partition_update_equals_whole(void **state) {
    (void)state;
    const int kinds[] = {PS_OPTIM_ADAM, PS_OPTIM_ADAGRAD};
    for (int k = 0; k < 2; k++) {
        float w1[N], w2[N], g[N], s1[2 * N] = {0}, s2a[2 * 20] = {0}, s2b[2 * (N - 20)] = {0};
        fill(w1, g, 5);
        memcpy(w2, w1, sizeof w1);
        ps_optim_cfg c = ps_optim_defaults(kinds[k], 0.01f);
        for (int t = 1; t <= 5; t++) {
            ps_optim_apply(&c, t, w1, g, s1, N);
            ps_optim_apply(&c, t, w2, g, s2a, 20);
            ps_optim_apply(&c, t, w2 + 20, g + 20, s2b, N - 20);
        }
        assert_memory_equal(w1, w2, sizeof w1);
    }
}

/* The kernels are built twice on x86-64 (SSE2 and AVX2, picked at load
 * time); whichever runs must give exactly what the scalar formula gives in
 * float: same operations, same order, no FMA. 1031 elements cover full
 * vectors and a tail, with and without aliasing of w_in and w_out. */
#define NB 1031
static void test_kernels_bit_identical_to_scalar(void **state) {
    (void)state;
    static float w[NB], wo[NB], g[NB], sl[2 * NB], rw[NB], rm[NB], rv[NB];
    cm_rng r;
    cm_rng_init(&r, 7);
    for (int i = 0; i < NB; i++) {
        w[i] = rw[i] = 2.0f * cm_rng_uniform(&r) - 1.0f;
        sl[i] = rm[i] = 0.0f;
        sl[NB + i] = rv[i] = 0.0f;
    }
    ps_optim_cfg c = ps_optim_defaults(PS_OPTIM_ADAM, 1e-3f);
    for (int t = 1; t <= 20; t++) {
        for (int i = 0; i < NB; i++) g[i] = 0.02f * cm_rng_uniform(&r) - 0.01f;
        if (t % 2)
            ps_optim_apply(&c, t, w, g, sl, NB);
        else {
            ps_optim_apply_to(&c, t, w, wo, g, sl, NB);
            memcpy(w, wo, sizeof w);
        }
        const float c1 = (float)(1.0 / (1.0 - pow((double)0.9f, (double)t)));
        const float c2 = (float)(1.0 / (1.0 - pow((double)0.999f, (double)t)));
        const float b1 = 0.9f, b2 = 0.999f, lr = 1e-3f, eps = 1e-8f;
        for (int i = 0; i < NB; i++) {
            volatile float m = b1 * rm[i] + (1.0f - b1) * g[i];
            volatile float v = b2 * rv[i] + (1.0f - b2) * g[i] * g[i];
            rm[i] = m;
            rv[i] = v;
            volatile float step = lr * (rm[i] * c1);
            volatile float den = sqrtf(rv[i] * c2) + eps;
            rw[i] = rw[i] - step / den;
        }
        assert_memory_equal(w, rw, sizeof w);
        assert_memory_equal(sl, rm, sizeof rm);
        assert_memory_equal(sl + NB, rv, sizeof rv);
    }
    /* SGD the same way. */
    ps_optim_cfg sg = ps_optim_defaults(PS_OPTIM_SGD, 0.05f);
    ps_optim_apply(&sg, 1, w, g, NULL, NB);
    for (int i = 0; i < NB; i++) {
        volatile float d = 0.05f * g[i];
        rw[i] = rw[i] - d;
    }
    assert_memory_equal(w, rw, sizeof w);

    /* Adagrad the same way, through each entry point in turn; the strided
     * one updates the two halves of the array as two partitions of it. */
    ps_optim_cfg ag = ps_optim_defaults(PS_OPTIM_ADAGRAD, 0.05f);
    const float init = 0.1f, lr = 0.05f, eps = 1e-7f;
    memset(sl, 0, sizeof sl);
    memset(rm, 0, sizeof rm);
    for (int t = 1; t <= 9; t++) {
        for (int i = 0; i < NB; i++) g[i] = 0.2f * cm_rng_uniform(&r) - 0.1f;
        if (t % 3 == 0)
            ps_optim_apply(&ag, t, w, g, sl, NB);
        else if (t % 3 == 1) {
            ps_optim_apply_to(&ag, t, w, wo, g, sl, NB);
            memcpy(w, wo, sizeof w);
        } else {
            const size_t h = NB / 2;
            ps_optim_apply_strided(&ag, t, w, wo, g, sl, NB, h);
            ps_optim_apply_strided(&ag, t, w + h, wo + h, g + h, sl + h, NB, NB - h);
            memcpy(w, wo, sizeof w);
        }
        for (int i = 0; i < NB; i++) {
            volatile float a = rm[i] + g[i] * g[i];
            rm[i] = a;
            volatile float step = lr * g[i];
            volatile float den = sqrtf(rm[i] + init) + eps;
            rw[i] = rw[i] - step / den;
        }
        assert_memory_equal(w, rw, sizeof w);
        assert_memory_equal(sl, rm, sizeof rm);
    }
}

static void test_names(void **state) {
    (void)state;
    assert_int_equal(ps_optim_parse("sgd"), PS_OPTIM_SGD);
    assert_int_equal(ps_optim_parse("momentum"), PS_OPTIM_MOMENTUM);
    assert_int_equal(ps_optim_parse("adam"), PS_OPTIM_ADAM);
    assert_int_equal(ps_optim_parse("adagrad"), PS_OPTIM_ADAGRAD);
    assert_int_equal(PS_OPTIM_ADAGRAD, 4);
    assert_int_equal(ps_optim_parse("rmsprop"), -1);
    assert_string_equal(ps_optim_name(PS_OPTIM_ADAM), "adam");
    assert_string_equal(ps_optim_name(PS_OPTIM_ADAGRAD), "adagrad");
    /* Adagrad's epsilon default is TensorFlow's; Adam keeps its own. */
    assert_true(ps_optim_defaults(PS_OPTIM_ADAGRAD, 1.0f).epsilon == 1e-7f);
    assert_true(ps_optim_defaults(PS_OPTIM_ADAM, 1.0f).epsilon == 1e-8f);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sgd_constant_gradient),
        cmocka_unit_test(test_momentum_constant_gradient),
        cmocka_unit_test(test_adam_constant_gradient),
        cmocka_unit_test(test_adagrad_two_steps_by_hand),
        cmocka_unit_test(test_adagrad_constant_gradient),
        cmocka_unit_test(test_adagrad_zeroed_slot_equals_initial_accumulator),
        cmocka_unit_test(test_varying_gradient),
        cmocka_unit_test(test_partition_update_equals_whole),
        cmocka_unit_test(test_kernels_bit_identical_to_scalar),
        cmocka_unit_test(test_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
