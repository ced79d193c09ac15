/* wk_device_cuda.h - the CUDA backend of wk_device, and GPU discovery.
 * SPDX-License-Identifier: MIT
 *
 * Built when CMake finds nvcc (PS_WITH_CUDA=AUTO|ON); otherwise a stub with
 * the same functions reports no GPU, so callers need no #ifdef. Only the
 * CUDA runtime and cuBLAS are linked, never libcuda: without a driver every
 * function here fails cleanly instead of aborting.
 *
 * A CUDA device (ops->name "cuda", host_visible 0) owns one stream and one
 * cuBLAS handle on one GPU. Every op is queued on that stream and returns at
 * once; wk_device_sync() waits for the stream and returns the first error
 * since the last sync (CM_ENOMEM for device memory, else CM_EIO, logged
 * with CUDA's or cuBLAS's error string). Details:
 *  - GEMMs are cuBLAS with TF32 off (CUBLAS_DEFAULT_MATH on cublasSgemm is
 *    pure fp32), so fp32 results compare with the CPU backend's.
 *  - WK_PRECISION_BF16: parameters, activations and gradients stay fp32 in
 *    memory (fp32 master weights); each GEMM converts its two operands to
 *    bf16 in scratch buffers and multiplies them with fp32 accumulation and
 *    an fp32 result (cublasGemmEx, CUBLAS_COMPUTE_32F). Everything else
 *    (bias, ReLU, softmax, column sums, axpby) is fp32.
 *  - softmax_xent accumulates the loss and correct count on the device;
 *    they are added to the caller's host doubles at the next sync, so those
 *    pointers must stay valid until then. A call naming other host targets
 *    than the pending ones syncs first.
 *  - upload/download take any host memory; download's destination is
 *    complete after wk_device_sync(). Host memory from
 *    wk_cuda_host_alloc() (pinned) makes the copies truly asynchronous.
 *  - Each op makes the device current on the calling thread, so a device
 *    may move between threads (one at a time, as for every wk_device).
 */
#ifndef WK_DEVICE_CUDA_H
#define WK_DEVICE_CUDA_H
#include <stddef.h>
#include <string.h>

#include "worker/device/wk_device.h"

enum { WK_PRECISION_FP32 = 0, WK_PRECISION_BF16 = 1 };

/* "fp32" / "bf16" -> WK_PRECISION_*, or -1. */
static inline int wk_precision_parse(const char *s) {
    return !strcmp(s, "fp32") ? WK_PRECISION_FP32 : !strcmp(s, "bf16") ? WK_PRECISION_BF16 : -1;
}
static inline const char *wk_precision_name(int precision) {
    return precision == WK_PRECISION_BF16 ? "bf16" : "fp32";
}

/* Number of usable GPUs: 0 on any error (no driver, "insufficient driver",
 * no device, built without CUDA), with the reason written to err (may be
 * NULL) in that case. Never aborts. */
int wk_device_cuda_count(char *err, size_t errlen);

/* Create the device for GPU 'index' (0-based) computing in 'precision'.
 * Returns CM_OK, CM_EUNSUPPORTED (built without CUDA, or no such GPU),
 * CM_ENOMEM or CM_EIO after logging why; *out is NULL on error. Release with
 * wk_device_destroy() (waits for queued work). */
int wk_device_cuda_create(int index, int precision, wk_device **out);

/* 1 if d is a CUDA device. */
int wk_device_is_cuda(const wk_device *d);

/* The device's cudaStream_t (as void *, so C callers need no CUDA headers)
 * and its CUDA ordinal; for NCCL (wk_nccl.c). */
void *wk_device_cuda_stream(wk_device *d);
int wk_device_cuda_ordinal(const wk_device *d);

/* Host memory, pinned (page-locked, registered with CUDA) when a GPU is
 * usable so copies to and from it are asynchronous; ordinary 64-byte
 * aligned memory otherwise (no driver, or built without CUDA). NULL on
 * error. Release with wk_cuda_host_free() (NULL is a no-op). */
void *wk_cuda_host_alloc(size_t bytes);
void wk_cuda_host_free(void *p);

/* Name and memory of GPU 'index' into name (may be NULL); CM_OK or an
 * error code. For logs and benchmark records. */
int wk_device_cuda_describe(int index, char *name, size_t namelen, size_t *mem_bytes);

#endif /* WK_DEVICE_CUDA_H */
