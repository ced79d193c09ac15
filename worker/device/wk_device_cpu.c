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
#include <pthread.h>
#include <stdio.h>
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

/* ---- Sparse models. Every loop runs in a fixed order, so the CPU's
 * results are deterministic (the staged device gives the same bits). */

static void cpu_fill(wk_device *d, size_t n, float value, float *y) {
    (void)d;
    for (size_t i = 0; i < n; i++) y[i] = value;
}

static void cpu_gather_rows(wk_device *d, int n, const int32_t *idx, const float *rows,
                            int row_dim, int col0, int ncols, float *out, int out_ld) {
    (void)d;
    for (int i = 0; i < n; i++) {
        const float *restrict src = rows + (size_t)idx[i] * (size_t)row_dim + (size_t)col0;
        float *restrict dst = out + (size_t)i * (size_t)out_ld;
        for (int j = 0; j < ncols; j++) dst[j] = src[j];
    }
}

static void cpu_scatter_add_rows(wk_device *d, int n, const int32_t *idx, const float *src,
                                 int src_ld, int ncols, float *rows, int row_dim, int col0) {
    (void)d;
    /* In order of i: positions that share a row add to it one after another,
     * so the sum's rounding is the same on every run. */
    for (int i = 0; i < n; i++) {
        const float *restrict s = src + (size_t)i * (size_t)src_ld;
        float *restrict dst = rows + (size_t)idx[i] * (size_t)row_dim + (size_t)col0;
        for (int j = 0; j < ncols; j++) dst[j] += s[j];
    }
}

/* The factors are summed in double, in chunks of FM_CHUNK columns so the
 * sums live in registers/stack and the f loop's inner j loop vectorises:
 * (sum v)^2 - sum v^2 cancels, and double keeps the difference exact to
 * float precision. The order (f ascending per column, columns ascending)
 * is the one the CUDA kernel uses. */
enum { FM_CHUNK = 64 };

static void cpu_fm_forward(wk_device *d, int n, int F, int k, const float *v, float *out) {
    (void)d;
    const size_t ex = (size_t)F * (size_t)k;
    for (int e = 0; e < n; e++) {
        const float *ve = v + (size_t)e * ex;
        double total = 0.0;
        for (int j0 = 0; j0 < k; j0 += FM_CHUNK) {
            int w = k - j0 < FM_CHUNK ? k - j0 : FM_CHUNK;
            double s[FM_CHUNK] = {0}, q[FM_CHUNK] = {0};
            for (int f = 0; f < F; f++) {
                const float *restrict x = ve + (size_t)f * (size_t)k + (size_t)j0;
                for (int j = 0; j < w; j++) {
                    s[j] += (double)x[j];
                    q[j] += (double)x[j] * (double)x[j];
                }
            }
            for (int j = 0; j < w; j++) total += s[j] * s[j] - q[j];
        }
        out[e] = (float)(0.5 * total);
    }
}

static void cpu_fm_backward(wk_device *d, int n, int F, int k, const float *v,
                            const float *dout, float *dv) {
    (void)d;
    const size_t ex = (size_t)F * (size_t)k;
    for (int e = 0; e < n; e++) {
        const float *ve = v + (size_t)e * ex;
        float *dve = dv + (size_t)e * ex;
        const double g = (double)dout[e];
        for (int j0 = 0; j0 < k; j0 += FM_CHUNK) {
            int w = k - j0 < FM_CHUNK ? k - j0 : FM_CHUNK;
            double s[FM_CHUNK] = {0};
            for (int f = 0; f < F; f++) {
                const float *restrict x = ve + (size_t)f * (size_t)k + (size_t)j0;
                for (int j = 0; j < w; j++) s[j] += (double)x[j];
            }
            for (int f = 0; f < F; f++) {
                const float *restrict x = ve + (size_t)f * (size_t)k + (size_t)j0;
                float *restrict y = dve + (size_t)f * (size_t)k + (size_t)j0;
                for (int j = 0; j < w; j++) y[j] = (float)(g * (s[j] - (double)x[j]));
            }
        }
    }
}

static void cpu_row_sum(wk_device *d, int rows, int cols, const float *x, int ld, float *out) {
    (void)d;
    /* Left to right in float, as the CUDA kernel's thread per row does. */
    for (int r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * (size_t)ld;
        float s = 0.0f;
        for (int c = 0; c < cols; c++) s += row[c];
        out[r] = s;
    }
}

/* One logit z against label y: returns the logloss, computed from z as
 * log1p(exp(-|z|)) + max(z, 0) - y z so it stays finite for any finite z;
 * p = sigmoid(z) from the same exp(-|z|) (never overflows). The CUDA
 * kernel has the same function (wk_cuda_kernels.cu). */
static double sigmoid_xent_one(float z, int32_t y, float scale, float *dz, float *p, int *right) {
    double zd = z, e = exp(-fabs(zd));
    double pd = zd >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
    *p = (float)pd;
    *dz = (float)(pd - (double)y) * scale;
    *right = (pd >= 0.5) == (y != 0);
    return log1p(e) + (zd > 0.0 ? zd : 0.0) - (double)y * zd;
}

static void cpu_sigmoid_xent(wk_device *d, int n, const float *logits, const int32_t *labels,
                             float scale, float *dlogits, float *probs, double *loss_sum,
                             int64_t *correct) {
    (void)d;
    double loss = 0.0;
    int64_t right = 0;
    for (int i = 0; i < n; i++) {
        int ok;
        float p;
        loss += sigmoid_xent_one(logits[i], labels[i], scale, &dlogits[i], &p, &ok);
        if (probs) probs[i] = p;
        right += ok;
    }
    if (loss_sum) *loss_sum += loss;
    if (correct) *correct += right;
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
    .fill = cpu_fill,
    .gather_rows = cpu_gather_rows,
    .scatter_add_rows = cpu_scatter_add_rows,
    .fm_forward = cpu_fm_forward,
    .fm_backward = cpu_fm_backward,
    .row_sum = cpu_row_sum,
    .sigmoid_xent = cpu_sigmoid_xent,
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

#ifdef WK_NAIVE_GEMM
const char *wk_device_cpu_gemm_name(void) { return "naive"; }
#else
static char gemm_name[96];
static void name_gemm(void) {
    /* "OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ...": its first two words. */
    const char *cfg = openblas_get_config(), *core = openblas_get_corename();
    int words = 0;
    size_t n = 0;
    while (cfg[n] && !(cfg[n] == ' ' && ++words == 2)) n++;
    snprintf(gemm_name, sizeof gemm_name, "%.*s, %s kernels", (int)n, cfg, core);
}

const char *wk_device_cpu_gemm_name(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, name_gemm);
    return gemm_name;
}
#endif
