/* wk_nccl_world.c - the cross-process NCCL communicator, under a watchdog.
 * SPDX-License-Identifier: MIT
 *
 * Non-blocking NCCL (ncclConfig_t.blocking = 0): creation, collectives and
 * finalisation may return ncclInProgress, and the communicator's state
 * (ncclCommGetAsyncError) stays ncclInProgress until the call has taken
 * effect; a collective is complete once its stream is (cudaStreamQuery).
 * Every wait below polls both with a deadline; past it, or on an error,
 * the communicator is aborted (ncclCommAbort frees it and stops its
 * kernels), so no call blocks for longer than the timeout plus the abort.
 */
#include "worker/device/wk_nccl_world.h"

#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "worker/device/wk_cuda_int.h"

_Static_assert(WK_NCCL_ID_BYTES == NCCL_UNIQUE_ID_BYTES, "NCCL's unique id size changed");

struct wk_nccl_world {
    ncclComm_t comm; /* NULL once aborted or destroyed. */
    int nranks, rank, device, timeout_ms;
    int aborted;
    cudaStream_t stream; /* Our own (non-blocking). */
    float *buf;          /* Device staging for allreduce_host. */
    size_t cap;          /* Floats in buf. */
    char err[512];
};

int wk_nccl_world_available(void) { return 1; }

static void nap(void) {
    struct timespec ts = {0, 50 * 1000}; /* 50 us: a collective takes at least that. */
    nanosleep(&ts, NULL);
}

static void seterr(wk_nccl_world *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void seterr(wk_nccl_world *w, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->err, sizeof w->err, fmt, ap);
    va_end(ap);
    cm_error("nccl world, rank %d of %d: %s", w->rank, w->nranks, w->err);
}

static void abort_comm(wk_nccl_world *w) {
    if (!w->comm) return;
    ncclCommAbort(w->comm);
    w->comm = NULL;
    w->aborted = 1;
}

/* Wait, at most until 'deadline' (cm_now seconds), for the communicator to
 * leave ncclInProgress and, if stream is not NULL, for the stream to drain.
 * On an error or at the deadline: abort, message "<what>: ...", CM_E*. */
static int watch(wk_nccl_world *w, cudaStream_t stream, double deadline, const char *what) {
    double t0 = cm_now();
    for (;;) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t r = ncclCommGetAsyncError(w->comm, &state);
        if (r != ncclSuccess) state = r;
        if (state != ncclSuccess && state != ncclInProgress) {
            seterr(w, "%s: %s (%s; a peer died or its connection broke?)", what,
                   ncclGetErrorString(state), ncclGetLastError(w->comm));
            abort_comm(w);
            return CM_EIO;
        }
        int done = state == ncclSuccess;
        if (done && stream) {
            cudaError_t q = cudaStreamQuery(stream);
            if (q != cudaSuccess && q != cudaErrorNotReady) {
                seterr(w, "%s: CUDA: %s", what, cudaGetErrorString(q));
                abort_comm(w);
                return CM_EIO;
            }
            done = q == cudaSuccess;
        }
        if (done) return CM_OK;
        double now = cm_now();
        if (now >= deadline) {
            seterr(w, "%s: no progress for %.0f ms (a peer died?); aborting the communicator",
                   what, (now - t0) * 1e3);
            abort_comm(w);
            return CM_ETIMEDOUT;
        }
        nap();
    }
}

/* The result of a non-blocking call: ncclInProgress is fine (watch() waits
 * for it), anything else but success aborts. */
static int issued(wk_nccl_world *w, ncclResult_t r, const char *what) {
    if (r == ncclSuccess || r == ncclInProgress) return CM_OK;
    seterr(w, "%s: %s (%s)", what, ncclGetErrorString(r), ncclGetLastError(w->comm));
    abort_comm(w);
    return CM_EIO;
}

static int usable(wk_nccl_world *w) {
    if (w->comm) {
        cudaError_t e = cudaSetDevice(w->device);
        if (e == cudaSuccess) return CM_OK;
        seterr(w, "cudaSetDevice(%d): %s", w->device, cudaGetErrorString(e));
        return CM_EIO;
    }
    if (!w->err[0]) snprintf(w->err, sizeof w->err, "the NCCL communicator was aborted");
    return CM_EIO;
}

int wk_nccl_world_id(uint8_t out[WK_NCCL_ID_BYTES], char *err, size_t errlen) {
    ncclUniqueId id;
    ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) {
        cm_seterr(err, errlen, "ncclGetUniqueId: %s (%s)", ncclGetErrorString(r),
                  ncclGetLastError(NULL));
        return CM_EIO;
    }
    memcpy(out, id.internal, WK_NCCL_ID_BYTES);
    return CM_OK;
}

int wk_nccl_world_create(const uint8_t id[WK_NCCL_ID_BYTES], int nranks, int rank, int device,
                         int timeout_ms, wk_nccl_world **out, char *err, size_t errlen) {
    *out = NULL;
    if (nranks < 1 || rank < 0 || rank >= nranks || device < 0) {
        cm_seterr(err, errlen, "nccl world: rank %d of %d on GPU %d", rank, nranks, device);
        return CM_EINVAL;
    }
    wk_nccl_world *w = cm_calloc(1, sizeof *w);
    w->nranks = nranks;
    w->rank = rank;
    w->device = device;
    w->timeout_ms = timeout_ms > 0 ? timeout_ms : 60000;
    cudaError_t ce = cudaSetDevice(device);
    if (ce == cudaSuccess) ce = cudaStreamCreateWithFlags(&w->stream, cudaStreamNonBlocking);
    if (ce != cudaSuccess) {
        cm_seterr(err, errlen, "nccl world: GPU %d: %s", device, cudaGetErrorString(ce));
        wk_nccl_world_destroy(w);
        return CM_EIO;
    }
    ncclUniqueId uid;
    memcpy(uid.internal, id, WK_NCCL_ID_BYTES);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    double deadline = cm_now() + w->timeout_ms / 1e3;
    ncclResult_t r = ncclCommInitRankConfig(&w->comm, nranks, uid, rank, &config);
    int rc;
    if (r != ncclSuccess && r != ncclInProgress) {
        snprintf(w->err, sizeof w->err, "ncclCommInitRankConfig: %s (%s)", ncclGetErrorString(r),
                 ncclGetLastError(NULL));
        if (w->comm) abort_comm(w);
        rc = CM_EIO;
    } else {
        char what[96];
        snprintf(what, sizeof what, "joining the communicator of %d ranks on GPU %d", nranks,
                 device);
        rc = watch(w, NULL, deadline, what);
    }
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "nccl world, rank %d of %d: %s%s", rank, nranks, w->err,
                  rc == CM_EIO ? " (NCCL needs a distinct GPU per rank)" : "");
        wk_nccl_world_destroy(w);
        return rc;
    }
    cm_debug("nccl world: rank %d of %d on GPU %d", rank, nranks, device);
    *out = w;
    return CM_OK;
}

int wk_nccl_world_allreduce(wk_nccl_world *w, float *devbuf, size_t n, int average, void *stream,
                            int64_t step) {
    int rc = usable(w);
    if (rc != CM_OK) return rc;
    cudaStream_t s = stream ? (cudaStream_t)stream : w->stream;
    char what[96];
    snprintf(what, sizeof what, "NCCL allreduce of step %lld", (long long)step);
    double deadline = cm_now() + w->timeout_ms / 1e3;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 10, 0)
    ncclRedOp_t op = average ? ncclAvg : ncclSum;
#else
#error "NCCL >= 2.10 is needed (ncclAvg)"
#endif
    rc = issued(w, ncclAllReduce(devbuf, devbuf, n, ncclFloat32, op, w->comm, s), what);
    if (rc == CM_OK) rc = watch(w, s, deadline, what);
    return rc;
}

int wk_nccl_world_allreduce_host(wk_nccl_world *w, float *host, size_t n, int average,
                                 int64_t step) {
    int rc = usable(w);
    if (rc != CM_OK) return rc;
    if (n > w->cap) {
        cudaFree(w->buf);
        w->buf = NULL;
        w->cap = 0;
        cudaError_t e = cudaMalloc((void **)&w->buf, n * sizeof(float));
        if (e != cudaSuccess) {
            seterr(w, "cudaMalloc of %zu floats: %s", n, cudaGetErrorString(e));
            return CM_ENOMEM;
        }
        w->cap = n;
    }
    cudaError_t e = cudaMemcpyAsync(w->buf, host, n * sizeof(float), cudaMemcpyHostToDevice,
                                    w->stream);
    if (e != cudaSuccess) {
        seterr(w, "upload of step %lld: %s", (long long)step, cudaGetErrorString(e));
        return CM_EIO;
    }
    rc = wk_nccl_world_allreduce(w, w->buf, n, average, NULL, step);
    if (rc != CM_OK) return rc;
    e = cudaMemcpyAsync(host, w->buf, n * sizeof(float), cudaMemcpyDeviceToHost, w->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(w->stream);
    if (e != cudaSuccess) {
        seterr(w, "download of step %lld: %s", (long long)step, cudaGetErrorString(e));
        return CM_EIO;
    }
    return CM_OK;
}

void wk_nccl_world_set_timeout(wk_nccl_world *w, int timeout_ms) {
    w->timeout_ms = timeout_ms > 0 ? timeout_ms : 60000;
}

const char *wk_nccl_world_error(const wk_nccl_world *w) { return w->err; }

int wk_nccl_world_aborted(const wk_nccl_world *w) { return w->aborted; }

int wk_nccl_world_test_stall(wk_nccl_world *w, int spin_ms) {
    int rc = usable(w);
    if (rc != CM_OK) return rc;
    cudaError_t e = wk__cuda_spin(w->stream, spin_ms);
    if (e != cudaSuccess) {
        seterr(w, "spin kernel: %s", cudaGetErrorString(e));
        return CM_EIO;
    }
    return watch(w, w->stream, cm_now() + w->timeout_ms / 1e3, "stall test");
}

void wk_nccl_world_abort(wk_nccl_world *w) {
    if (!w || !w->comm) return;
    cudaSetDevice(w->device);
    abort_comm(w);
}

void wk_nccl_world_destroy(wk_nccl_world *w) {
    if (!w) return;
    if (w->device >= 0) cudaSetDevice(w->device);
    if (w->comm) {
        ncclResult_t r = ncclCommFinalize(w->comm);
        int rc = issued(w, r, "ncclCommFinalize");
        if (rc == CM_OK)
            rc = watch(w, NULL, cm_now() + w->timeout_ms / 1e3, "finalising the communicator");
        if (rc == CM_OK) ncclCommDestroy(w->comm);
        w->comm = NULL;
    }
    if (w->buf) cudaFree(w->buf);
    if (w->stream) cudaStreamDestroy(w->stream);
    free(w);
}
