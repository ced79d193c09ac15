/* wk_nccl.c - NCCL local reduce and broadcast over this process's GPUs.
 * SPDX-License-Identifier: MIT
 *
 * NCCL's codes are converted here, once, logging ncclGetErrorString. One
 * thread issues the per-rank calls of a collective inside
 * ncclGroupStart/End, as NCCL requires when a thread drives several GPUs.
 */
#include "worker/device/wk_nccl.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdlib.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "worker/device/wk_device_cuda.h"

struct wk_nccl {
    int n;
    ncclComm_t *comms;
    wk_device **devs; /* Borrowed. */
};

static int check(ncclResult_t r, const char *what) {
    if (r == ncclSuccess) return CM_OK;
    cm_error("nccl: %s: %s (%s)", what, ncclGetErrorString(r), ncclGetLastError(NULL));
    return CM_EIO;
}

int wk_nccl_create(wk_device **devs, int ndevs, wk_nccl **out) {
    *out = NULL;
    if (ndevs < 1) return CM_EINVAL;
    int *ordinals = cm_calloc((size_t)ndevs, sizeof *ordinals);
    for (int d = 0; d < ndevs; d++) {
        ordinals[d] = wk_device_cuda_ordinal(devs[d]);
        if (ordinals[d] < 0) {
            cm_error("nccl: device %d is not a CUDA device", d);
            free(ordinals);
            return CM_EINVAL;
        }
    }
    wk_nccl *c = cm_calloc(1, sizeof *c);
    c->n = ndevs;
    c->devs = cm_calloc((size_t)ndevs, sizeof *c->devs);
    for (int d = 0; d < ndevs; d++) c->devs[d] = devs[d];
    c->comms = cm_calloc((size_t)ndevs, sizeof *c->comms);
    int status = check(ncclCommInitAll(c->comms, ndevs, ordinals), "ncclCommInitAll");
    free(ordinals);
    if (status != CM_OK) {
        free(c->comms);
        c->comms = NULL;
        wk_nccl_destroy(c);
        return status;
    }
    *out = c;
    return CM_OK;
}

void wk_nccl_destroy(wk_nccl *c) {
    if (!c) return;
    if (c->comms)
        for (int d = 0; d < c->n; d++)
            if (c->comms[d]) ncclCommDestroy(c->comms[d]);
    free(c->comms);
    free(c->devs);
    free(c);
}

/* One collective: kind 0 reduce-sum to rank 0, 1 broadcast from rank 0. */
static int collective(wk_nccl *c, int kind, float *const *bufs, size_t n) {
    int status = check(ncclGroupStart(), "ncclGroupStart");
    if (status != CM_OK) return status;
    for (int d = 0; d < c->n && status == CM_OK; d++) {
        cudaStream_t s = (cudaStream_t)wk_device_cuda_stream(c->devs[d]);
        if (kind == 0)
            status = check(ncclReduce(bufs[d], bufs[d], n, ncclFloat32, ncclSum, 0, c->comms[d], s),
                           "ncclReduce");
        else
            status = check(ncclBroadcast(bufs[d], bufs[d], n, ncclFloat32, 0, c->comms[d], s),
                           "ncclBroadcast");
    }
    /* End the group even after a failed call, so NCCL's state is clean. */
    int end = check(ncclGroupEnd(), "ncclGroupEnd");
    return status != CM_OK ? status : end;
}

int wk_nccl_reduce_sum(wk_nccl *c, float *const *bufs, size_t n) {
    return collective(c, 0, bufs, n);
}

int wk_nccl_broadcast(wk_nccl *c, float *const *bufs, size_t n) {
    return collective(c, 1, bufs, n);
}

int wk_nccl_version(void) {
    int v = 0;
    return ncclGetVersion(&v) == ncclSuccess ? v : 0;
}
