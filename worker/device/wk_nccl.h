/* wk_nccl.h - the local reduce across a node's GPUs with NCCL.
 * SPDX-License-Identifier: MIT
 *
 * One communicator clique over D CUDA devices of this process
 * (ncclCommInitAll), one rank per device. Collectives are queued on each
 * device's own stream (wk_device_cuda_stream), so they are ordered after
 * the gradient kernels already queued there; call wk_device_sync() on the
 * devices to wait. Built only when CMake finds NCCL (WK_HAVE_NCCL).
 *
 * NCCL refuses two ranks on one GPU, so on a one-GPU machine the clique has
 * one rank (the collectives then only copy); several ranks need as many
 * GPUs. Not thread-safe: one thread drives a wk_nccl.
 */
#ifndef WK_NCCL_H
#define WK_NCCL_H
#include <stddef.h>

#include "worker/device/wk_device.h"

typedef struct wk_nccl wk_nccl;

/* A clique over devs[0..ndevs) (borrowed CUDA devices on distinct GPUs,
 * which must outlive it); rank d is devs[d]. Returns CM_OK, CM_EINVAL (not
 * CUDA devices), CM_EIO (NCCL failed; logged with NCCL's string); *out is
 * NULL on error. Release with wk_nccl_destroy() (NULL is a no-op). */
int wk_nccl_create(wk_device **devs, int ndevs, wk_nccl **out);
void wk_nccl_destroy(wk_nccl *c);

/* bufs[0] on rank 0 = sum over d of bufs[d] (n floats on device d each),
 * in place; the other ranks' buffers are left as they were. */
int wk_nccl_reduce_sum(wk_nccl *c, float *const *bufs, size_t n);

/* bufs[d] = bufs[0] for every rank d (n floats), in place on rank 0. */
int wk_nccl_broadcast(wk_nccl *c, float *const *bufs, size_t n);

/* NCCL's version as major*10000 + minor*100 + patch (from ncclGetVersion). */
int wk_nccl_version(void);

#endif /* WK_NCCL_H */
