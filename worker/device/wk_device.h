/* wk_device.h - the compute interface every model is written against.
 * SPDX-License-Identifier: MIT
 *
 * A device owns memory and runs the few operations the models need: GEMM,
 * bias add, ReLU, softmax cross-entropy, column sums and a weighted sum; for
 * sparse models, gathering and scatter-adding embedding rows, the
 * factorization machine's term and the logistic loss. The
 * CPU backend (wk_device_cpu.c, OpenBLAS) is always built; the CUDA backend
 * (wk_device_cuda.h) plugs in behind the same table. Matrices are row-major
 * float32.
 *
 * Conventions:
 *  - Pointers passed to the ops are device pointers from wk_device_alloc()
 *    unless the op says "host". On a device with host_visible set (the CPU),
 *    device pointers are ordinary host pointers and host memory may be
 *    passed wherever device memory is expected.
 *  - Ops are asynchronous on devices that can be; wk_device_sync() waits for
 *    them and returns the first error (CM_OK or a negative CM_E*).
 *  - A device is used by one thread at a time.
 */
#ifndef WK_DEVICE_H
#define WK_DEVICE_H
#include <stddef.h>
#include <stdint.h>

typedef struct wk_device wk_device;

typedef struct wk_device_ops {
    const char *name;
    void *(*alloc)(wk_device *d, size_t bytes);
    void (*free)(wk_device *d, void *p);
    void (*upload)(wk_device *d, void *dst, const void *host_src, size_t bytes);
    void (*download)(wk_device *d, void *host_dst, const void *src, size_t bytes);
    /* C = alpha * op(A) * op(B) + beta * C, op(X) = X or X^T; C is m x n,
     * op(A) m x k, op(B) k x n; lda/ldb/ldc are row strides. */
    void (*gemm)(wk_device *d, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);
    /* x[r][c] += bias[c] for an rows x cols matrix. */
    void (*bias_add)(wk_device *d, int rows, int cols, float *x, const float *bias);
    /* y = max(x, 0) (in place allowed). */
    void (*relu)(wk_device *d, size_t n, const float *x, float *y);
    /* dx = dy where y > 0, else 0 (in place on dy allowed). */
    void (*relu_backward)(wk_device *d, size_t n, const float *y, const float *dy, float *dx);
    /* Softmax cross-entropy of rows x classes logits against labels. Writes
     * dlogits = (softmax - onehot) * scale (dlogits may alias logits) and
     * adds to the host doubles *loss_sum the summed loss over rows and to
     * *correct the number of rows whose argmax is the label. Either host
     * pointer may be NULL. Labels out of range are a caller bug. */
    void (*softmax_xent)(wk_device *d, int rows, int classes, float *logits,
                         const int32_t *labels, float scale, float *dlogits, double *loss_sum,
                         int64_t *correct);
    /* out[c] = sum over r of x[r][c]. */
    void (*col_sum)(wk_device *d, int rows, int cols, const float *x, float *out);
    /* y = alpha * x + beta * y over n floats. */
    void (*axpby)(wk_device *d, size_t n, float alpha, const float *x, float beta, float *y);
    int (*sync)(wk_device *d);
    void (*destroy)(wk_device *d);
    /* ---- Sparse models (embedding rows and factorization machines). ---- */
    /* y[0..n) = value. */
    void (*fill)(wk_device *d, size_t n, float value, float *y);
    /* Gather columns [col0, col0 + ncols) of rows: for i < n,
     * out[i * out_ld + j] = rows[idx[i] * row_dim + col0 + j], j < ncols. */
    void (*gather_rows)(wk_device *d, int n, const int32_t *idx, const float *rows, int row_dim,
                        int col0, int ncols, float *out, int out_ld);
    /* The reverse, summing: for i < n (in order on the CPU, so the result
     * is deterministic there; CUDA adds with atomics, in no fixed order, so
     * rows shared by several positions are not bit-for-bit reproducible),
     * rows[idx[i] * row_dim + col0 + j] += src[i * src_ld + j], j < ncols. */
    void (*scatter_add_rows)(wk_device *d, int n, const int32_t *idx, const float *src,
                             int src_ld, int ncols, float *rows, int row_dim, int col0);
    /* Factorization machine's second-order term over n examples of F
     * fields with k factors, v laid out n x F x k:
     * out[e] = 0.5 * sum_j [ (sum_f v[e,f,j])^2 - sum_f v[e,f,j]^2 ]. */
    void (*fm_forward)(wk_device *d, int n, int F, int k, const float *v, float *out);
    /* Its gradient: dv[e,f,j] = dout[e] * (sum_g v[e,g,j] - v[e,f,j]). */
    void (*fm_backward)(wk_device *d, int n, int F, int k, const float *v, const float *dout,
                        float *dv);
    /* out[r] = sum over c of x[r * ld + c], c < cols (r < rows). */
    void (*row_sum)(wk_device *d, int rows, int cols, const float *x, int ld, float *out);
    /* Binary logistic loss of n logits against 0/1 labels: p = sigmoid(z),
     * dlogits[i] = (p - y) * scale (may alias logits), probs[i] = p (probs
     * may be NULL); adds to the host doubles *loss_sum the summed logloss
     * -[y log p + (1 - y) log(1 - p)] computed stably from z (finite for
     * any finite z), and to *correct the count of (p >= 0.5) == y, p in
     * double. Either host pointer may be NULL. */
    void (*sigmoid_xent)(wk_device *d, int n, const float *logits, const int32_t *labels,
                         float scale, float *dlogits, float *probs, double *loss_sum,
                         int64_t *correct);
} wk_device_ops;

struct wk_device {
    const wk_device_ops *ops; /* read-only */
    int host_visible;         /* read-only: device pointers are host pointers */
    int index;                /* read-only: device ordinal within its kind */
    void *impl;               /* private to the backend */
};

/* Create the CPU device. Never fails (aborts on OOM). Release with
 * wk_device_destroy(). */
wk_device *wk_device_cpu_create(int index);

/* A CPU device that callers must treat as a discrete one: host_visible is
 * 0, so parameters are uploaded, batches staged and gradients downloaded
 * exactly as for a GPU, but every op runs on the CPU at once. For tests of
 * the GPU data paths on machines without a GPU (pstrain --devices staged).
 * Never fails (aborts on OOM). */
wk_device *wk_device_cpu_staged_create(int index);

/* BLAS threads for every CPU device of this process (OpenBLAS's pool is
 * process-wide). n < 1 means 1. */
void wk_device_cpu_set_threads(int n);
int wk_device_cpu_threads(void);

/* What the CPU device's GEMM is: OpenBLAS's version and the kernels it
 * picked for this CPU ("OpenBLAS 0.3.21, Haswell kernels"; results differ
 * in the last bits between kernels), or "naive" (a plain loop, in the
 * GPU-only build that has no OpenBLAS). A static string. */
const char *wk_device_cpu_gemm_name(void);

static inline void wk_device_destroy(wk_device *d) {
    if (d) d->ops->destroy(d);
}
static inline void *wk_device_alloc(wk_device *d, size_t bytes) { return d->ops->alloc(d, bytes); }
static inline void wk_device_free(wk_device *d, void *p) {
    if (p) d->ops->free(d, p);
}
static inline int wk_device_sync(wk_device *d) { return d->ops->sync(d); }

#endif /* WK_DEVICE_H */
