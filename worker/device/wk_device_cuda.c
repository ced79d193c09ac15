/* wk_device_cuda.c - the CUDA backend of wk_device: cuBLAS GEMMs, the
 * kernels of wk_cuda_kernels.cu, one stream per device.
 * SPDX-License-Identifier: MIT
 *
 * Runtime API and cuBLAS only (never the driver API), so a machine without
 * a driver gets an error from cudaGetDeviceCount and nothing aborts. CUDA's
 * and cuBLAS's codes are converted here, once: the first failure since the
 * last sync is logged with the library's string and kept in 'status'; ops
 * after a failure are skipped until wk_device_sync() returns it.
 */
#include "worker/device/wk_device_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "worker/device/wk_cuda_int.h"

typedef struct cuda_impl {
    int ordinal;
    int precision;
    cudaStream_t stream;
    cublasHandle_t blas;
    int status; /* First error since the last sync (CM_OK if none). */
    /* The loss ops' (softmax_xent, sigmoid_xent) device accumulators (loss
     * double, correct count) and their pinned landing place, added at sync
     * to the pending targets. */
    void *acc_dev;
    void *acc_host;
    double *pending_loss;
    int64_t *pending_correct;
    int acc_pending;
    /* bf16 GEMM operands (NULL in fp32), 'bf_cap' elements each. */
    void *bf_a, *bf_b;
    size_t bf_cap;
} cuda_impl;

static cuda_impl *impl_of(wk_device *d) { return d->impl; }

static int cuda_code(cudaError_t e) {
    return e == cudaErrorMemoryAllocation ? CM_ENOMEM : CM_EIO;
}

/* Record a CUDA error (the first one since the last sync is kept). */
static int check_cuda(cuda_impl *c, cudaError_t e, const char *what) {
    if (e == cudaSuccess) return 0;
    if (c->status == CM_OK) {
        cm_error("cuda device %d: %s: %s", c->ordinal, what, cudaGetErrorString(e));
        c->status = cuda_code(e);
    }
    return -1;
}

static int check_blas(cuda_impl *c, cublasStatus_t e, const char *what) {
    if (e == CUBLAS_STATUS_SUCCESS) return 0;
    if (c->status == CM_OK) {
        cm_error("cuda device %d: %s: %s", c->ordinal, what, cublasGetStatusString(e));
        c->status = e == CUBLAS_STATUS_ALLOC_FAILED ? CM_ENOMEM : CM_EIO;
    }
    return -1;
}

/* Make the device current on this thread; 0 if ops may run. */
static int enter(cuda_impl *c) {
    if (c->status != CM_OK) return -1;
    return check_cuda(c, cudaSetDevice(c->ordinal), "cudaSetDevice");
}

static void *cuda_alloc(wk_device *d, size_t bytes) {
    cuda_impl *c = impl_of(d);
    void *p = NULL;
    if (cudaSetDevice(c->ordinal) != cudaSuccess) return NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cm_error("cuda device %d: cudaMalloc(%zu): %s", c->ordinal, bytes, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

static void cuda_free(wk_device *d, void *p) {
    cuda_impl *c = impl_of(d);
    if (cudaSetDevice(c->ordinal) == cudaSuccess) cudaFree(p);
}

static void cuda_upload(wk_device *d, void *dst, const void *host_src, size_t bytes) {
    cuda_impl *c = impl_of(d);
    if (!bytes || enter(c)) return;
    check_cuda(c, cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, c->stream),
               "upload");
}

static void cuda_download(wk_device *d, void *host_dst, const void *src, size_t bytes) {
    cuda_impl *c = impl_of(d);
    if (!bytes || enter(c)) return;
    check_cuda(c, cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, c->stream),
               "download");
}

/* Grow the bf16 scratch operands to 'n' elements each. The old buffers may
 * be in use by queued GEMMs, so the stream is drained before freeing them. */
static int bf16_reserve(cuda_impl *c, size_t n) {
    if (n <= c->bf_cap) return 0;
    if (check_cuda(c, cudaStreamSynchronize(c->stream), "cudaStreamSynchronize")) return -1;
    cudaFree(c->bf_a);
    cudaFree(c->bf_b);
    c->bf_a = c->bf_b = NULL;
    c->bf_cap = 0;
    if (check_cuda(c, cudaMalloc(&c->bf_a, n * 2), "cudaMalloc(bf16 scratch)") ||
        check_cuda(c, cudaMalloc(&c->bf_b, n * 2), "cudaMalloc(bf16 scratch)"))
        return -1;
    c->bf_cap = n;
    return 0;
}

/* Row-major C = alpha op(A) op(B) + beta C through column-major cuBLAS: a
 * row-major matrix with row stride ld is, read column-major, its transpose
 * with leading dimension ld. So C^T (n x m, ldc) = op(B)^T op(A)^T, where
 * op(B)^T is B's column-major view untransposed when trans_b == 0 and
 * transposed when trans_b == 1 (likewise A): cuBLAS gets (B, A) swapped,
 * each with its own transpose flag, and m and n swapped. */
static void cuda_gemm(wk_device *d, int trans_a, int trans_b, int m, int n, int k, float alpha,
                      const float *a, int lda, const float *b, int ldb, float beta, float *cm,
                      int ldc) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (c->precision == WK_PRECISION_FP32) {
        check_blas(c, cublasSgemm(c->blas, op_b, op_a, n, m, k, &alpha, b, ldb, a, lda, &beta, cm,
                                  ldc),
                   "cublasSgemm");
        return;
    }
    /* bf16: copy op's stored matrices (rows x cols as laid out, before any
     * transpose) into packed bf16 operands, then GemmEx with fp32 compute. */
    int a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
    int b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
    size_t need_a = (size_t)a_rows * (size_t)a_cols, need_b = (size_t)b_rows * (size_t)b_cols;
    if (bf16_reserve(c, need_a > need_b ? need_a : need_b)) return;
    if (check_cuda(c, wk__cuda_to_bf16(c->stream, a_rows, a_cols, a, lda, c->bf_a), "to_bf16") ||
        check_cuda(c, wk__cuda_to_bf16(c->stream, b_rows, b_cols, b, ldb, c->bf_b), "to_bf16"))
        return;
    check_blas(c, cublasGemmEx(c->blas, op_b, op_a, n, m, k, &alpha, c->bf_b, CUDA_R_16BF,
                               b_cols, c->bf_a, CUDA_R_16BF, a_cols, &beta, cm, CUDA_R_32F, ldc,
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx(bf16)");
}

static void cuda_bias_add(wk_device *d, int rows, int cols, float *x, const float *bias) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_bias_add(c->stream, rows, cols, x, bias), "bias_add");
}

static void cuda_relu(wk_device *d, size_t n, const float *x, float *y) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_relu(c->stream, n, x, y), "relu");
}

static void cuda_relu_backward(wk_device *d, size_t n, const float *y, const float *dy,
                               float *dx) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_relu_backward(c->stream, n, y, dy, dx), "relu_backward");
}

static int cuda_sync(wk_device *d);

/* The device accumulators a loss op adds to, for the host targets
 * (loss_sum, correct) (either NULL): one set of host targets at a time, so
 * a call naming others flushes the pending sums first. 0 if the op may
 * run; its kernel then gets *loss_acc and *correct_acc (NULL where the
 * host target is) and, once queued, acc_queued() records the targets. */
static int acc_enter(wk_device *d, double *loss_sum, int64_t *correct, double **loss_acc,
                     unsigned long long **correct_acc) {
    cuda_impl *c = impl_of(d);
    if (c->acc_pending && (c->pending_loss != loss_sum || c->pending_correct != correct)) {
        int st = cuda_sync(d);
        if (st != CM_OK) c->status = st;
    }
    if (enter(c)) return -1;
    *loss_acc = loss_sum ? (double *)c->acc_dev : NULL;
    *correct_acc = correct ? (unsigned long long *)((char *)c->acc_dev + 8) : NULL;
    return 0;
}

/* The sums for (loss_sum, correct) are on the device, added at sync. */
static void acc_queued(cuda_impl *c, double *loss_sum, int64_t *correct) {
    if (loss_sum || correct) {
        c->pending_loss = loss_sum;
        c->pending_correct = correct;
        c->acc_pending = 1;
    }
}

static void cuda_softmax_xent(wk_device *d, int rows, int classes, float *logits,
                              const int32_t *labels, float scale, float *dlogits,
                              double *loss_sum, int64_t *correct) {
    cuda_impl *c = impl_of(d);
    double *loss_acc;
    unsigned long long *correct_acc;
    if (acc_enter(d, loss_sum, correct, &loss_acc, &correct_acc)) return;
    if (!check_cuda(c, wk__cuda_softmax_xent(c->stream, rows, classes, logits, labels, scale,
                                             dlogits, loss_acc, correct_acc),
                    "softmax_xent"))
        acc_queued(c, loss_sum, correct);
}

static void cuda_sigmoid_xent(wk_device *d, int n, const float *logits, const int32_t *labels,
                              float scale, float *dlogits, float *probs, double *loss_sum,
                              int64_t *correct) {
    cuda_impl *c = impl_of(d);
    double *loss_acc;
    unsigned long long *correct_acc;
    if (acc_enter(d, loss_sum, correct, &loss_acc, &correct_acc)) return;
    if (!check_cuda(c, wk__cuda_sigmoid_xent(c->stream, n, logits, labels, scale, dlogits, probs,
                                             loss_acc, correct_acc),
                    "sigmoid_xent"))
        acc_queued(c, loss_sum, correct);
}

static void cuda_col_sum(wk_device *d, int rows, int cols, const float *x, float *out) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_col_sum(c->stream, rows, cols, x, out), "col_sum");
}

static void cuda_axpby(wk_device *d, size_t n, float alpha, const float *x, float beta,
                       float *y) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_axpby(c->stream, n, alpha, x, beta, y), "axpby");
}

static void cuda_fill(wk_device *d, size_t n, float value, float *y) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_fill(c->stream, n, value, y), "fill");
}

static void cuda_gather_rows(wk_device *d, int n, const int32_t *idx, const float *rows,
                             int row_dim, int col0, int ncols, float *out, int out_ld) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c,
               wk__cuda_gather_rows(c->stream, n, idx, rows, row_dim, col0, ncols, out, out_ld),
               "gather_rows");
}

/* Atomic adds: not bit-for-bit reproducible where positions share a row
 * (see wk_cuda_kernels.cu). */
static void cuda_scatter_add_rows(wk_device *d, int n, const int32_t *idx, const float *src,
                                  int src_ld, int ncols, float *rows, int row_dim, int col0) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c,
               wk__cuda_scatter_add_rows(c->stream, n, idx, src, src_ld, ncols, rows, row_dim,
                                         col0),
               "scatter_add_rows");
}

static void cuda_fm_forward(wk_device *d, int n, int F, int k, const float *v, float *out) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_fm_forward(c->stream, n, F, k, v, out), "fm_forward");
}

static void cuda_fm_backward(wk_device *d, int n, int F, int k, const float *v,
                             const float *dout, float *dv) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_fm_backward(c->stream, n, F, k, v, dout, dv), "fm_backward");
}

static void cuda_row_sum(wk_device *d, int rows, int cols, const float *x, int ld, float *out) {
    cuda_impl *c = impl_of(d);
    if (enter(c)) return;
    check_cuda(c, wk__cuda_row_sum(c->stream, rows, cols, x, ld, out), "row_sum");
}

static int cuda_sync(wk_device *d) {
    cuda_impl *c = impl_of(d);
    if (c->status == CM_OK && !check_cuda(c, cudaSetDevice(c->ordinal), "cudaSetDevice")) {
        if (c->acc_pending)
            check_cuda(c, cudaMemcpyAsync(c->acc_host, c->acc_dev, 16, cudaMemcpyDeviceToHost,
                                          c->stream),
                       "download of the loss");
        check_cuda(c, cudaStreamSynchronize(c->stream), "cudaStreamSynchronize");
    }
    if (c->acc_pending) {
        if (c->status == CM_OK) {
            double loss;
            unsigned long long right;
            memcpy(&loss, c->acc_host, 8);
            memcpy(&right, (char *)c->acc_host + 8, 8);
            if (c->pending_loss) *c->pending_loss += loss;
            if (c->pending_correct) *c->pending_correct += (int64_t)right;
            check_cuda(c, cudaMemsetAsync(c->acc_dev, 0, 16, c->stream), "cudaMemsetAsync");
        }
        c->acc_pending = 0;
        c->pending_loss = NULL;
        c->pending_correct = NULL;
    }
    int st = c->status;
    c->status = CM_OK;
    return st;
}

static void cuda_destroy(wk_device *d) {
    if (!d) return;
    cuda_impl *c = impl_of(d);
    if (c) {
        if (cudaSetDevice(c->ordinal) == cudaSuccess) {
            if (c->stream) cudaStreamSynchronize(c->stream);
            if (c->blas) cublasDestroy(c->blas);
            if (c->stream) cudaStreamDestroy(c->stream);
            cudaFree(c->acc_dev);
            cudaFree(c->bf_a);
            cudaFree(c->bf_b);
            cudaFreeHost(c->acc_host);
        }
        free(c);
    }
    free(d);
}

static const wk_device_ops cuda_ops = {
    .name = "cuda",
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .gemm = cuda_gemm,
    .bias_add = cuda_bias_add,
    .relu = cuda_relu,
    .relu_backward = cuda_relu_backward,
    .softmax_xent = cuda_softmax_xent,
    .col_sum = cuda_col_sum,
    .axpby = cuda_axpby,
    .sync = cuda_sync,
    .destroy = cuda_destroy,
    .fill = cuda_fill,
    .gather_rows = cuda_gather_rows,
    .scatter_add_rows = cuda_scatter_add_rows,
    .fm_forward = cuda_fm_forward,
    .fm_backward = cuda_fm_backward,
    .row_sum = cuda_row_sum,
    .sigmoid_xent = cuda_sigmoid_xent,
};

int wk_device_cuda_count(char *err, size_t errlen) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        /* Without a driver this is "insufficient driver", not "no device". */
        cm_seterr(err, errlen, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e),
                  cudaGetErrorName(e));
        cudaGetLastError(); /* Clear it, so later calls do not see it. */
        return 0;
    }
    if (n <= 0) {
        cm_seterr(err, errlen, "cudaGetDeviceCount: no CUDA device");
        return 0;
    }
    return n;
}

int wk_device_cuda_create(int index, int precision, wk_device **out) {
    *out = NULL;
    char why[256];
    int n = wk_device_cuda_count(why, sizeof why);
    if (index < 0 || index >= n) {
        if (n == 0)
            cm_error("no usable GPU for cuda device %d: %s", index, why);
        else
            cm_error("no cuda device %d: this machine has %d GPU%s (0..%d)", index, n,
                     n == 1 ? "" : "s", n - 1);
        return CM_EUNSUPPORTED;
    }
    if (precision != WK_PRECISION_FP32 && precision != WK_PRECISION_BF16) return CM_EINVAL;
    wk_device *d = cm_calloc(1, sizeof *d);
    cuda_impl *c = cm_calloc(1, sizeof *c);
    d->ops = &cuda_ops;
    d->host_visible = 0;
    d->index = index;
    d->impl = c;
    c->ordinal = index;
    c->precision = precision;
    c->status = CM_OK;
    if (check_cuda(c, cudaSetDevice(index), "cudaSetDevice") ||
        check_cuda(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking),
                   "cudaStreamCreate") ||
        check_cuda(c, cudaMalloc(&c->acc_dev, 16), "cudaMalloc") ||
        check_cuda(c, cudaMallocHost(&c->acc_host, 16), "cudaMallocHost") ||
        check_cuda(c, cudaMemsetAsync(c->acc_dev, 0, 16, c->stream), "cudaMemsetAsync") ||
        check_blas(c, cublasCreate(&c->blas), "cublasCreate") ||
        check_blas(c, cublasSetStream(c->blas, c->stream), "cublasSetStream") ||
        /* Default math: fp32 GEMMs stay fp32 (no TF32 tensor cores); only
         * cublasGemmEx's explicit bf16 operands use tensor cores. */
        check_blas(c, cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode") ||
        check_cuda(c, cudaStreamSynchronize(c->stream), "cudaStreamSynchronize"))
        goto fail;
    *out = d;
    return CM_OK;
fail:;
    int st = c->status;
    cuda_destroy(d);
    return st;
}

int wk_device_is_cuda(const wk_device *d) { return d && d->ops == &cuda_ops; }

void *wk_device_cuda_stream(wk_device *d) {
    return wk_device_is_cuda(d) ? (void *)impl_of(d)->stream : NULL;
}

int wk_device_cuda_ordinal(const wk_device *d) {
    return wk_device_is_cuda(d) ? ((const cuda_impl *)d->impl)->ordinal : -1;
}

void *wk_cuda_host_alloc(size_t bytes) {
    void *p = cm_alloc_aligned(bytes ? bytes : 1);
    /* Pin it when a driver is there; ordinary memory works too, only its
     * copies are staged through the driver's own pinned buffers. */
    if (p && cudaHostRegister(p, bytes ? bytes : 1, cudaHostRegisterDefault) != cudaSuccess)
        cudaGetLastError();
    return p;
}

void wk_cuda_host_free(void *p) {
    if (!p) return;
    if (cudaHostUnregister(p) != cudaSuccess) cudaGetLastError();
    free(p);
}

int wk_device_cuda_describe(int index, char *name, size_t namelen, size_t *mem_bytes) {
    struct cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, index);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return CM_EUNSUPPORTED;
    }
    if (name) cm_seterr(name, namelen, "%s (sm_%d%d)", prop.name, prop.major, prop.minor);
    if (mem_bytes) *mem_bytes = prop.totalGlobalMem;
    return CM_OK;
}
