/* wk_cuda_kernels.cu - the CUDA device's kernels other than GEMM.
 * SPDX-License-Identifier: MIT
 *
 * Elementwise kernels use grid-stride loops. softmax_xent runs one thread
 * per row (the models have few classes) in double precision like the CPU
 * backend, and adds its loss and correct count to device accumulators with
 * atomics; col_sum runs one thread per column (coalesced across a row),
 * summing rows in order, so it is deterministic.
 *
 * Sparse models: gather_rows and scatter_add_rows run one thread per
 * (position, column); scatter_add_rows adds with atomicAdd, so positions
 * that share a row add in no fixed order and the sums are not bit-for-bit
 * reproducible (the CPU adds in order). fm_forward runs one warp per
 * example, lane j summing factor columns j, j + 32, ... over the fields in
 * double, then a shuffle tree: deterministic, though not the CPU's order.
 * fm_backward runs one thread per (example, factor) (consecutive threads
 * read consecutive factors), summing in the CPU's order. row_sum runs one
 * thread per row, left to right (the CPU's order, so the same bits).
 * sigmoid_xent runs grid-stride like the elementwise kernels and adds each
 * thread's loss and count to the accumulators softmax_xent uses.
 */
#include <cuda_bf16.h>

#include "worker/device/wk_cuda_int.h"
#include "worker/device/wk_softmax_row.h"

namespace {

const int kThreads = 256;

unsigned blocks_for(size_t n) {
    size_t b = (n + kThreads - 1) / kThreads;
    if (b < 1) b = 1;
    if (b > 65535u * 4u) b = 65535u * 4u; /* grid-stride loops cover the rest */
    return (unsigned)b;
}

__global__ void bias_add_kernel(size_t n, int cols, float *x, const float *bias) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += bias[i % (size_t)cols];
}

__global__ void relu_kernel(size_t n, const float *x, float *y) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

__global__ void relu_backward_kernel(size_t n, const float *y, const float *dy, float *dx) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float g = dy[i];
        dx[i] = y[i] > 0.0f ? g : 0.0f;
    }
}

__global__ void softmax_xent_kernel(int rows, int classes, const float *logits,
                                    const int32_t *labels, float scale, float *dlogits,
                                    double *loss_acc, unsigned long long *correct_acc) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    int right;
    double loss = wk__softmax_xent_row(classes, logits + (size_t)r * (size_t)classes, labels[r],
                                       scale, dlogits + (size_t)r * (size_t)classes, &right);
    if (loss_acc) atomicAdd(loss_acc, loss);
    if (correct_acc && right) atomicAdd(correct_acc, 1ull);
}

__global__ void col_sum_kernel(int rows, int cols, const float *x, float *out) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; r++) s += x[(size_t)r * (size_t)cols + c];
    out[c] = s;
}

__global__ void axpby_kernel(size_t n, float alpha, const float *x, float beta, float *y) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = beta == 0.0f ? alpha * x[i] : alpha * x[i] + beta * y[i];
}

__global__ void fill_kernel(size_t n, float value, float *y) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = value;
}

/* n positions x ncols columns: position i's columns of row idx[i]. */
__global__ void gather_rows_kernel(size_t total, int ncols, const int32_t *idx,
                                   const float *rows, int row_dim, int col0, float *out,
                                   int out_ld) {
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t i = t / (size_t)ncols, j = t % (size_t)ncols;
        out[i * (size_t)out_ld + j] = rows[(size_t)idx[i] * (size_t)row_dim + (size_t)col0 + j];
    }
}

__global__ void scatter_add_rows_kernel(size_t total, int ncols, const int32_t *idx,
                                        const float *src, int src_ld, float *rows, int row_dim,
                                        int col0) {
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t i = t / (size_t)ncols, j = t % (size_t)ncols;
        atomicAdd(&rows[(size_t)idx[i] * (size_t)row_dim + (size_t)col0 + j],
                  src[i * (size_t)src_ld + j]);
    }
}

const int kWarp = 32;

/* One warp per example (grid-stride over examples, so the loop and the
 * shuffles are warp-uniform: kThreads is a multiple of 32). */
__global__ void fm_forward_kernel(size_t n, int F, int k, const float *v, float *out) {
    const int lane = threadIdx.x % kWarp;
    const size_t warps = (size_t)gridDim.x * blockDim.x / kWarp;
    for (size_t e = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / kWarp; e < n; e += warps) {
        const float *ve = v + e * (size_t)F * (size_t)k;
        double part = 0.0;
        for (int j = lane; j < k; j += kWarp) {
            double s = 0.0, q = 0.0;
            for (int f = 0; f < F; f++) {
                double x = ve[(size_t)f * (size_t)k + (size_t)j];
                s += x;
                q += x * x;
            }
            part += s * s - q;
        }
        for (int off = kWarp / 2; off > 0; off /= 2)
            part += __shfl_down_sync(0xffffffffu, part, off);
        if (lane == 0) out[e] = (float)(0.5 * part);
    }
}

__global__ void fm_backward_kernel(size_t total, int F, int k, const float *v,
                                   const float *dout, float *dv) {
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < total;
         t += (size_t)gridDim.x * blockDim.x) {
        size_t e = t / (size_t)k, j = t % (size_t)k;
        size_t base = e * (size_t)F * (size_t)k + j;
        double s = 0.0;
        for (int f = 0; f < F; f++) s += (double)v[base + (size_t)f * (size_t)k];
        const double g = (double)dout[e];
        for (int f = 0; f < F; f++) {
            size_t at = base + (size_t)f * (size_t)k;
            dv[at] = (float)(g * (s - (double)v[at]));
        }
    }
}

__global__ void row_sum_kernel(size_t rows, int cols, const float *x, int ld, float *out) {
    for (size_t r = blockIdx.x * (size_t)blockDim.x + threadIdx.x; r < rows;
         r += (size_t)gridDim.x * blockDim.x) {
        const float *row = x + r * (size_t)ld;
        float s = 0.0f;
        for (int c = 0; c < cols; c++) s += row[c];
        out[r] = s;
    }
}

/* The CPU backend's sigmoid_xent_one (wk_device_cpu.c), on the device: the
 * logloss from z as log1p(exp(-|z|)) + max(z, 0) - y z, finite for any
 * finite z. */
__device__ double sigmoid_xent_one(float z, int32_t y, float scale, float *dz, float *p,
                                   int *right) {
    double zd = z, e = exp(-fabs(zd));
    double pd = zd >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
    *p = (float)pd;
    *dz = (float)(pd - (double)y) * scale;
    *right = (pd >= 0.5) == (y != 0);
    return log1p(e) + (zd > 0.0 ? zd : 0.0) - (double)y * zd;
}

__global__ void sigmoid_xent_kernel(size_t n, const float *logits, const int32_t *labels,
                                    float scale, float *dlogits, float *probs, double *loss_acc,
                                    unsigned long long *correct_acc) {
    double loss = 0.0;
    unsigned long long right = 0;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int ok;
        float p;
        loss += sigmoid_xent_one(logits[i], labels[i], scale, &dlogits[i], &p, &ok);
        if (probs) probs[i] = p;
        right += (unsigned long long)ok;
    }
    /* One atomic per thread that had an element. */
    if (loss_acc) atomicAdd(loss_acc, loss);
    if (correct_acc && right) atomicAdd(correct_acc, right);
}

/* One thread spins until 'ns' nanoseconds of the GPU's global timer pass,
 * or 4 * ns clock cycles (4 GHz: more than any GPU's clock), whichever
 * comes first: it ends even where the global timer does not advance. */
__global__ void spin_kernel(unsigned long long ns) {
    unsigned long long t0, t;
    long long c0 = clock64(), cmax = (long long)(ns < (1ull << 60) ? ns * 4ull : ns);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns && clock64() - c0 < cmax);
}

__global__ void to_bf16_kernel(size_t n, int cols, const float *src, int ld,
                               __nv_bfloat16 *dst) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / (size_t)cols, c = i % (size_t)cols;
        dst[i] = __float2bfloat16_rn(src[r * (size_t)ld + c]);
    }
}

} /* namespace */

extern "C" {

cudaError_t wk__cuda_bias_add(cudaStream_t s, int rows, int cols, float *x, const float *bias) {
    size_t n = (size_t)rows * (size_t)cols;
    if (n == 0) return cudaSuccess;
    bias_add_kernel<<<blocks_for(n), kThreads, 0, s>>>(n, cols, x, bias);
    return cudaGetLastError();
}

cudaError_t wk__cuda_relu(cudaStream_t s, size_t n, const float *x, float *y) {
    if (n == 0) return cudaSuccess;
    relu_kernel<<<blocks_for(n), kThreads, 0, s>>>(n, x, y);
    return cudaGetLastError();
}

cudaError_t wk__cuda_relu_backward(cudaStream_t s, size_t n, const float *y, const float *dy,
                                   float *dx) {
    if (n == 0) return cudaSuccess;
    relu_backward_kernel<<<blocks_for(n), kThreads, 0, s>>>(n, y, dy, dx);
    return cudaGetLastError();
}

cudaError_t wk__cuda_softmax_xent(cudaStream_t s, int rows, int classes, const float *logits,
                                  const int32_t *labels, float scale, float *dlogits,
                                  double *loss_acc, unsigned long long *correct_acc) {
    if (rows <= 0) return cudaSuccess;
    softmax_xent_kernel<<<(rows + 127) / 128, 128, 0, s>>>(rows, classes, logits, labels, scale,
                                                           dlogits, loss_acc, correct_acc);
    return cudaGetLastError();
}

cudaError_t wk__cuda_col_sum(cudaStream_t s, int rows, int cols, const float *x, float *out) {
    if (cols <= 0) return cudaSuccess;
    col_sum_kernel<<<(cols + 127) / 128, 128, 0, s>>>(rows, cols, x, out);
    return cudaGetLastError();
}

cudaError_t wk__cuda_axpby(cudaStream_t s, size_t n, float alpha, const float *x, float beta,
                           float *y) {
    if (n == 0) return cudaSuccess;
    axpby_kernel<<<blocks_for(n), kThreads, 0, s>>>(n, alpha, x, beta, y);
    return cudaGetLastError();
}

cudaError_t wk__cuda_fill(cudaStream_t s, size_t n, float value, float *y) {
    if (n == 0) return cudaSuccess;
    fill_kernel<<<blocks_for(n), kThreads, 0, s>>>(n, value, y);
    return cudaGetLastError();
}

cudaError_t wk__cuda_gather_rows(cudaStream_t s, int n, const int32_t *idx, const float *rows,
                                 int row_dim, int col0, int ncols, float *out, int out_ld) {
    size_t total = (size_t)(n > 0 ? n : 0) * (size_t)(ncols > 0 ? ncols : 0);
    if (total == 0) return cudaSuccess;
    gather_rows_kernel<<<blocks_for(total), kThreads, 0, s>>>(total, ncols, idx, rows, row_dim,
                                                               col0, out, out_ld);
    return cudaGetLastError();
}

cudaError_t wk__cuda_scatter_add_rows(cudaStream_t s, int n, const int32_t *idx,
                                      const float *src, int src_ld, int ncols, float *rows,
                                      int row_dim, int col0) {
    size_t total = (size_t)(n > 0 ? n : 0) * (size_t)(ncols > 0 ? ncols : 0);
    if (total == 0) return cudaSuccess;
    scatter_add_rows_kernel<<<blocks_for(total), kThreads, 0, s>>>(total, ncols, idx, src, src_ld,
                                                                    rows, row_dim, col0);
    return cudaGetLastError();
}

cudaError_t wk__cuda_fm_forward(cudaStream_t s, int n, int F, int k, const float *v,
                                float *out) {
    if (n <= 0) return cudaSuccess;
    fm_forward_kernel<<<blocks_for((size_t)n * kWarp), kThreads, 0, s>>>((size_t)n, F, k, v, out);
    return cudaGetLastError();
}

cudaError_t wk__cuda_fm_backward(cudaStream_t s, int n, int F, int k, const float *v,
                                 const float *dout, float *dv) {
    if (n <= 0 || k <= 0) return cudaSuccess;
    size_t total = (size_t)n * (size_t)k;
    fm_backward_kernel<<<blocks_for(total), kThreads, 0, s>>>(total, F, k, v, dout, dv);
    return cudaGetLastError();
}

cudaError_t wk__cuda_row_sum(cudaStream_t s, int rows, int cols, const float *x, int ld,
                             float *out) {
    if (rows <= 0) return cudaSuccess;
    row_sum_kernel<<<blocks_for((size_t)rows), kThreads, 0, s>>>((size_t)rows, cols, x, ld, out);
    return cudaGetLastError();
}

cudaError_t wk__cuda_sigmoid_xent(cudaStream_t s, int n, const float *logits,
                                  const int32_t *labels, float scale, float *dlogits,
                                  float *probs, double *loss_acc,
                                  unsigned long long *correct_acc) {
    if (n <= 0) return cudaSuccess;
    sigmoid_xent_kernel<<<blocks_for((size_t)n), kThreads, 0, s>>>(
        (size_t)n, logits, labels, scale, dlogits, probs, loss_acc, correct_acc);
    return cudaGetLastError();
}

cudaError_t wk__cuda_to_bf16(cudaStream_t s, int rows, int cols, const float *src, int ld,
                             void *dst) {
    size_t n = (size_t)rows * (size_t)cols;
    if (n == 0) return cudaSuccess;
    to_bf16_kernel<<<blocks_for(n), kThreads, 0, s>>>(n, cols, src, ld,
                                                      static_cast<__nv_bfloat16 *>(dst));
    return cudaGetLastError();
}

cudaError_t wk__cuda_spin(cudaStream_t s, int ms) {
    if (ms <= 0) return cudaSuccess;
    spin_kernel<<<1, 1, 0, s>>>((unsigned long long)ms * 1000000ull);
    return cudaGetLastError();
}

} /* extern "C" */
