/* test_nccl.c - NCCL's local reduce and broadcast over this machine's GPUs.
 * SPDX-License-Identifier: MIT
 *
 * One rank per GPU (NCCL refuses two ranks on one GPU, so a one-GPU machine
 * runs a one-rank clique: the paths run, the sums are trivial). Rank d holds
 * (d + 1) * v; after the reduce rank 0 holds sum_d (d + 1) * v and the
 * other ranks are unchanged; after the broadcast every rank holds rank 0's
 * values. Skips (77) without a usable GPU or without NCCL in the build.
 */
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "tests/gpu/gpu_test.h"
#ifdef WK_HAVE_NCCL
#include "worker/device/wk_nccl.h"
#endif

static const char *TEST = "test_nccl";

int main(void) {
#ifndef WK_HAVE_NCCL
    printf("%s: SKIP: this build has no NCCL (not found: set NCCL_ROOT; or PS_WITH_NCCL=OFF)\n",
           TEST);
    return gpu_test_skip(TEST);
#else
    int ngpu = gpu_test_count(TEST);
    if (ngpu == 0) return gpu_test_skip(TEST);
    if (ngpu > 8) ngpu = 8;
    printf("%s: NCCL %d, %d rank%s (one per GPU)\n", TEST, wk_nccl_version(), ngpu,
           ngpu == 1 ? "" : "s");
    const size_t n = 235146 + 7; /* The MLP's size, not a multiple of anything. */
    wk_device *devs[8] = {0};
    float *bufs[8] = {0};
    float *host = cm_malloc(n * 4), *want = cm_malloc(n * 4);
    wk_nccl *comm = NULL;
    int st = CM_OK;
    for (int d = 0; d < ngpu && st == CM_OK; d++) {
        st = wk_device_cuda_create(d, WK_PRECISION_FP32, &devs[d]);
        if (st == CM_OK && !(bufs[d] = wk_device_alloc(devs[d], n * 4))) st = CM_ENOMEM;
        if (st != CM_OK) break;
        for (size_t i = 0; i < n; i++) host[i] = (float)(d + 1) * (float)(i % 1000) * 0.5f;
        devs[d]->ops->upload(devs[d], bufs[d], host, n * 4);
        st = wk_device_sync(devs[d]);
    }
    CHECK(st == CM_OK, "devices: %s", cm_strerror(st));
    if (st == CM_OK) st = wk_nccl_create(devs, ngpu, &comm);
    CHECK(st == CM_OK, "wk_nccl_create: %s", cm_strerror(st));
    if (st == CM_OK) {
        st = wk_nccl_reduce_sum(comm, bufs, n);
        for (int d = 0; d < ngpu && st == CM_OK; d++) st = wk_device_sync(devs[d]);
        CHECK(st == CM_OK, "reduce: %s", cm_strerror(st));
        double k = ngpu * (ngpu + 1) / 2.0;
        for (size_t i = 0; i < n; i++) want[i] = (float)(k * (double)(i % 1000) * 0.5);
        devs[0]->ops->download(devs[0], host, bufs[0], n * 4);
        st = wk_device_sync(devs[0]);
        double rel = gpu_test_rel_err(host, want, n);
        printf("%s: reduce to rank 0: relative error %.3g\n", TEST, rel);
        CHECK(st == CM_OK && rel <= 1e-6, "reduce result rel %.3g", rel);
        if (ngpu > 1) {
            devs[1]->ops->download(devs[1], host, bufs[1], n * 4);
            wk_device_sync(devs[1]);
            CHECK(host[3] == 2.0f * 3.0f * 0.5f, "rank 1 changed by the reduce: %g", host[3]);
        }
        /* Mark rank 0, broadcast, and every rank must hold the mark. */
        for (size_t i = 0; i < n; i++) want[i] = (float)i * 0.25f;
        devs[0]->ops->upload(devs[0], bufs[0], want, n * 4);
        st = wk_device_sync(devs[0]);
        if (st == CM_OK) st = wk_nccl_broadcast(comm, bufs, n);
        CHECK(st == CM_OK, "broadcast: %s", cm_strerror(st));
        for (int d = 0; d < ngpu && st == CM_OK; d++) {
            devs[d]->ops->download(devs[d], host, bufs[d], n * 4);
            st = wk_device_sync(devs[d]);
            double r = gpu_test_rel_err(host, want, n);
            printf("%s: broadcast, rank %d: relative error %.3g\n", TEST, d, r);
            CHECK(st == CM_OK && r == 0.0, "rank %d after broadcast rel %.3g", d, r);
        }
    }
    wk_nccl_destroy(comm);
    for (int d = 0; d < ngpu; d++) {
        if (devs[d]) wk_device_free(devs[d], bufs[d]);
        wk_device_destroy(devs[d]);
    }
    free(host);
    free(want);
    return gpu_test_result(TEST);
#endif
}
