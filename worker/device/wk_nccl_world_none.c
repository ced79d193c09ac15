/* wk_nccl_world_none.c - wk_nccl_world.h in a build without NCCL.
 * SPDX-License-Identifier: MIT
 *
 * Linked instead of wk_nccl_world.c when CMake found no NCCL (or no CUDA),
 * so callers need no #ifdef: every call reports CM_EUNSUPPORTED, and
 * collective mode keeps the TCP ring.
 */
#include "common/cm_status.h"
#include "worker/device/wk_nccl_world.h"

static const char *const NO_NCCL =
    "this build has no NCCL (CUDA or NCCL was not found at configure time: set NCCL_ROOT, "
    "PS_WITH_CUDA=ON)";

int wk_nccl_world_available(void) { return 0; }

int wk_nccl_world_id(uint8_t out[WK_NCCL_ID_BYTES], char *err, size_t errlen) {
    (void)out;
    cm_seterr(err, errlen, "%s", NO_NCCL);
    return CM_EUNSUPPORTED;
}

int wk_nccl_world_create(const uint8_t id[WK_NCCL_ID_BYTES], int nranks, int rank, int device,
                         int timeout_ms, wk_nccl_world **out, char *err, size_t errlen) {
    (void)id;
    (void)nranks;
    (void)rank;
    (void)device;
    (void)timeout_ms;
    *out = NULL;
    cm_seterr(err, errlen, "%s", NO_NCCL);
    return CM_EUNSUPPORTED;
}

/* No world can exist: the calls below are never reached with one. */
int wk_nccl_world_allreduce(wk_nccl_world *w, float *devbuf, size_t n, int average, void *stream,
                            int64_t step) {
    (void)w;
    (void)devbuf;
    (void)n;
    (void)average;
    (void)stream;
    (void)step;
    return CM_EUNSUPPORTED;
}

int wk_nccl_world_allreduce_host(wk_nccl_world *w, float *host, size_t n, int average,
                                 int64_t step) {
    return wk_nccl_world_allreduce(w, host, n, average, NULL, step);
}

void wk_nccl_world_set_timeout(wk_nccl_world *w, int timeout_ms) {
    (void)w;
    (void)timeout_ms;
}

const char *wk_nccl_world_error(const wk_nccl_world *w) {
    (void)w;
    return NO_NCCL;
}

int wk_nccl_world_aborted(const wk_nccl_world *w) {
    (void)w;
    return 0;
}

int wk_nccl_world_test_stall(wk_nccl_world *w, int spin_ms) {
    (void)spin_ms;
    return wk_nccl_world_allreduce(w, NULL, 0, 0, NULL, 0);
}

void wk_nccl_world_abort(wk_nccl_world *w) { (void)w; }

void wk_nccl_world_destroy(wk_nccl_world *w) { (void)w; }
