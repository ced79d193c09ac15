/* wk_device_cpu.c - the CPU backend of wk_device: OpenBLAS plus plain loops.
 * SPDX-License-Identifier: MIT
 *
 * Memory is ordinary 64-byte aligned host memory, so host_visible is set and
 * upload/download are memcpy. Loops are written for gcc to vectorise.
 * Built with WK_NAIVE_GEMM (the GPU-only build, for machines without
 * OpenBLAS) the GEMM is a plain loop: correct, single-threaded and slow, a
 * reference for the GPU tests, not a CPU path to measure.
 */
#ifndef WK_NAIVE_GEMM
#include <cblas.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "worker/device/wk_device.h"
#include "worker/device/wk_softmax_row.h"

static void *cpu_alloc(wk_device *d, size_t bytes) {
    (void)d;
    return cm_alloc_aligned(bytes);
}

static void cpu_free(wk_device *d, void *p) {
    (void)d;
    free(p);
}

static void cpu_copy(wk_device *d, void *dst, const void *src, size_t bytes) {
    (void)d;
    if (dst != src && bytes) memcpy(dst, src, bytes);
}

#ifdef WK_NAIVE_GEMM
/* Row-major C = alpha op(A) op(B) + beta C, row by row (i, p, j order). */
static void naive_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha,
                        const float *a, int lda, const float *b, int ldb, float beta, float *c,
                        int ldc) {
    for (int i = 0; i < m; i++) {
        float *restrict ci = c + (size_t)i * (size_t)ldc;
        for (int j = 0; j < n; j++) ci[j] = beta == 0.0f ? 0.0f : beta * ci[j];
        for (int p = 0; p < k; p++) {
            float aip = alpha * (trans_a ? a[(size_t)p * (size_t)lda + (size_t)i]
                                         : a[(size_t)i * (size_t)lda + (size_t)p]);
            if (trans_b)
                for (int j = 0; j < n; j++) ci[j] += aip * b[(size_t)j * (size_t)ldb + (size_t)p];
            else
                for (int j = 0; j < n; j++) ci[j] += aip * b[(size_t)p * (size_t)ldb + (size_t)j];
        }
    }
}
#endif

static void cpu_gemm(wk_device *d, int trans_a, int trans_b, int m, int n, int k, float alpha,
                     const float *a, int lda, const float *b, int ldb, float beta, float *c,
                     int ldc) {
    (void)d;
#ifdef WK_NAIVE_GEMM
    naive_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#else
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c,
                ldc);
#endif
}

static void cpu_bias_add(wk_device *d, int rows, int cols, float *x, const float *bias) {
    (void)d;
    for (int r = 0; r < rows; r++) {
        float *restrict row = x + (size_t)r * (size_t)cols;
        for (int c = 0; c < cols; c++) row[c] += bias[c];
    }
}

static void cpu_relu(wk_device *d, size_t n, const float *x, float *y) {
    (void)d;
    for (size_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

static void cpu_relu_backward(wk_device *d, size_t n, const float *y, const float *dy,
                              float *dx) {
    (void)d;
    /* Load dy unconditionally: a load under the condition keeps gcc from
     * vectorising the loop (no masked loads in baseline x86-64). */
    for (size_t i = 0; i < n; i++) {
        float g = dy[i];
        dx[i] = y[i] > 0.0f ? g : 0.0f;
    }
}

static void cpu_softmax_xent(wk_device *d, int rows, int classes, float *logits,
                             const int32_t *labels, float scale, float *dlogits,
                             double *loss_sum, int64_t *correct) {
    (void)d;
    double loss = 0.0;
    int64_t right = 0;
    for (int r = 0; r < rows; r++) {
        int ok;
        loss += wk__softmax_xent_row(classes, logits + (size_t)r * (size_t)classes, labels[r],
                                     scale, dlogits + (size_t)r * (size_t)classes, &ok);
        right += ok;
    }
    if (loss_sum) *loss_sum += loss;
    if (correct) *correct += right;
}

static void cpu_col_sum(wk_device *d, int rows, int cols, const float *x, float *out) {
    (void)d;
    memset(out, 0, (size_t)cols * sizeof *out);
    for (int r = 0; r < rows; r++) {
        const float *restrict row = x + (size_t)r * (size_t)cols;
        for (int c = 0; c < cols; c++) out[c] += row[c];
    }
}

static void cpu_axpby(wk_device *d, size_t n, float alpha, const float *x, float beta,
                      float *y) {
    (void)d;
    if (beta == 0.0f) {
        for (size_t i = 0; i < n; i++) y[i] = alpha * x[i];
    } else {
        for (size_t i = 0; i < n; i++) y[i] = alpha * x[i] + beta * y[i];
    }
}

static int cpu_sync(wk_device *d) {
    (void)d;
    return CM_OK;
}

static void cpu_destroy(wk_device *d) { free(d); }

static const wk_device_ops cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .gemm = cpu_gemm,
    .bias_add = cpu_bias_add,
    .relu = cpu_relu,
    .relu_backward = cpu_relu_backward,
    .softmax_xent = cpu_softmax_xent,
    .col_sum = cpu_col_sum,
    .axpby = cpu_axpby,
    .sync = cpu_sync,
    .destroy = cpu_destroy,
};

static wk_device *cpu_device(const wk_device_ops *ops, int host_visible, int index) {
    wk_device *d = cm_calloc(1, sizeof *d);
    d->ops = ops;
    d->host_visible = host_visible;
    d->index = index;
    return d;
}

wk_device *wk_device_cpu_create(int index) { return cpu_device(&cpu_ops, 1, index); }

wk_device *wk_device_cpu_staged_create(int index) {
    /* The same operations: only host_visible differs, and callers go by it. */
    return cpu_device(&cpu_ops, 0, index);
}

#ifdef WK_NAIVE_GEMM
void wk_device_cpu_set_threads(int n) { (void)n; }

int wk_device_cpu_threads(void) { return 1; }
#else
void wk_device_cpu_set_threads(int n) { openblas_set_num_threads(n < 1 ? 1 : n); }

int wk_device_cpu_threads(void) { return openblas_get_num_threads(); }
#endif

const char *wk_device_cpu_gemm_name(void) {
#ifdef WK_NAIVE_GEMM
    return "naive";
#else
    return "openblas";
#endif
}
