/* wk_cuda_kernels.cu - the CUDA device's kernels other than GEMM.
 * SPDX-License-Identifier: MIT
 *
 * Elementwise kernels use grid-stride loops. softmax_xent runs one thread
 * per row (the models have few classes) in double precision like the CPU
 * backend, and adds its loss and correct count to device accumulators with
 * atomics; col_sum runs one thread per column (coalesced across a row),
 * summing rows in order, so it is deterministic.
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

/* One thread spins until 'ns' nanoseconds of the GPU's global timer pass. */
__global__ void spin_kernel(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
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
