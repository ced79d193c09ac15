/* wk_device_cuda_none.c - wk_device_cuda.h in a build without CUDA: no GPU.
 * SPDX-License-Identifier: MIT
 *
 * Linked instead of wk_device_cuda.c when CMake found no nvcc (or
 * PS_WITH_CUDA=OFF), so callers need no #ifdef and get a clear error.
 */
#include <stdlib.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "worker/device/wk_device_cuda.h"

int wk_device_cuda_count(char *err, size_t errlen) {
    cm_seterr(err, errlen, "this build has no CUDA support (nvcc was not found at configure "
                           "time, or PS_WITH_CUDA=OFF)");
    return 0;
}

int wk_device_cuda_create(int index, int precision, wk_device **out) {
    (void)precision;
    *out = NULL;
    cm_error("cuda device %d: this build has no CUDA support (rebuild with nvcc on the PATH, "
             "-DPS_WITH_CUDA=ON)",
             index);
    return CM_EUNSUPPORTED;
}

int wk_device_is_cuda(const wk_device *d) {
    (void)d;
    return 0;
}

void *wk_device_cuda_stream(wk_device *d) {
    (void)d;
    return NULL;
}

int wk_device_cuda_ordinal(const wk_device *d) {
    (void)d;
    return -1;
}

void *wk_cuda_host_alloc(size_t bytes) { return cm_alloc_aligned(bytes ? bytes : 1); }

void wk_cuda_host_free(void *p) { free(p); }

int wk_device_cuda_describe(int index, char *name, size_t namelen, size_t *mem_bytes) {
    (void)index;
    (void)name;
    (void)namelen;
    (void)mem_bytes;
    return CM_EUNSUPPORTED;
}
