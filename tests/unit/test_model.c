/* test_model.c - variable lists, fingerprints and deterministic init.
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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mlp_layout),
        cmocka_unit_test(test_bad_sizes_refused),
        cmocka_unit_test(test_init_independent_of_partitioning),
        cmocka_unit_test(test_fingerprint),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
