/* wk_cuda_int.h - the kernels of the CUDA device (wk_cuda_kernels.cu), as
 * launchers callable from C (wk_device_cuda.c).
 * SPDX-License-Identifier: MIT
 *
 * Internal to worker/device. Each launcher queues one kernel on 'stream' and
 * returns cudaGetLastError() (launch errors only; execution errors surface
 * at the stream's next synchronisation). Semantics are those of the ops of
 * the same name in wk_device.h; pointers are device pointers.
 */
#ifndef WK_CUDA_INT_H
#define WK_CUDA_INT_H
#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

cudaError_t wk__cuda_bias_add(cudaStream_t s, int rows, int cols, float *x, const float *bias);
cudaError_t wk__cuda_relu(cudaStream_t s, size_t n, const float *x, float *y);
cudaError_t wk__cuda_relu_backward(cudaStream_t s, size_t n, const float *y, const float *dy,
                                   float *dx);
/* acc: device [0] summed loss (double), [1] correct count (as an unsigned
 * long long stored in the same 8 bytes). Either may be skipped with
 * want_acc = 0. */
cudaError_t wk__cuda_softmax_xent(cudaStream_t s, int rows, int classes, const float *logits,
                                  const int32_t *labels, float scale, float *dlogits,
                                  double *loss_acc, unsigned long long *correct_acc);
cudaError_t wk__cuda_col_sum(cudaStream_t s, int rows, int cols, const float *x, float *out);
cudaError_t wk__cuda_axpby(cudaStream_t s, size_t n, float alpha, const float *x, float beta,
                           float *y);
cudaError_t wk__cuda_fill(cudaStream_t s, size_t n, float value, float *y);
cudaError_t wk__cuda_gather_rows(cudaStream_t s, int n, const int32_t *idx, const float *rows,
                                 int row_dim, int col0, int ncols, float *out, int out_ld);
/* With atomicAdd: positions sharing a row add in no fixed order. */
cudaError_t wk__cuda_scatter_add_rows(cudaStream_t s, int n, const int32_t *idx,
                                      const float *src, int src_ld, int ncols, float *rows,
                                      int row_dim, int col0);
cudaError_t wk__cuda_fm_forward(cudaStream_t s, int n, int F, int k, const float *v, float *out);
cudaError_t wk__cuda_fm_backward(cudaStream_t s, int n, int F, int k, const float *v,
                                 const float *dout, float *dv);
cudaError_t wk__cuda_row_sum(cudaStream_t s, int rows, int cols, const float *x, int ld,
                             float *out);
/* acc as for softmax_xent; probs may be NULL. */
cudaError_t wk__cuda_sigmoid_xent(cudaStream_t s, int n, const float *logits,
                                  const int32_t *labels, float scale, float *dlogits,
                                  float *probs, double *loss_acc,
                                  unsigned long long *correct_acc);
/* dst (rows x cols, row stride cols) = bf16(src (rows x cols, row stride
 * ld)); dst is __nv_bfloat16, passed as void. */
cudaError_t wk__cuda_to_bf16(cudaStream_t s, int rows, int cols, const float *src, int ld,
                             void *dst);
/* A one-thread kernel that busy-waits for ms milliseconds (GPU time): a
 * stalled stream for the NCCL watchdog's test (wk_nccl_world_test_stall). */
cudaError_t wk__cuda_spin(cudaStream_t s, int ms);

#ifdef __cplusplus
}
#endif
#endif /* WK_CUDA_INT_H */
