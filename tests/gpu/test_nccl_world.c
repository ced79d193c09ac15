/* test_nccl_world.c - the cross-process NCCL communicator, one rank.
 * SPDX-License-Identifier: MIT
 *
 * One rank on GPU 0 (NCCL refuses two ranks on one GPU; several ranks need
 * a multi-GPU machine and several processes): a world from a fresh id,
 * allreduce of a device buffer (sum and average: both equal the input with
 * one rank), the host variant, then the watchdog: a kernel spinning for
 * 3 s on the world's stream with a 300 ms timeout must give CM_ETIMEDOUT
 * well before the kernel ends would have, leave the communicator aborted,
 * and make the next allreduce fail at once. Skips (77) without NCCL in the
 * build or without a usable GPU.
 */
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "tests/gpu/gpu_test.h"
#include "worker/device/wk_nccl_world.h"

static const char *TEST = "test_nccl_world";

int main(void) {
    if (!wk_nccl_world_available()) {
        printf("%s: SKIP: this build has no NCCL (not found: set NCCL_ROOT; or "
               "PS_WITH_NCCL=OFF)\n",
               TEST);
        return gpu_test_skip(TEST);
    }
    if (gpu_test_count(TEST) == 0) return gpu_test_skip(TEST);
    const size_t n = 235146 + 7;
    float *host = cm_malloc(n * 4), *want = cm_malloc(n * 4), *back = cm_malloc(n * 4);
    for (size_t i = 0; i < n; i++) want[i] = (float)(i % 1000) * 0.5f - 100.0f;
    char err[512] = "";
    uint8_t id[WK_NCCL_ID_BYTES];
    wk_nccl_world *w = NULL;
    wk_device *dev = NULL;
    float *buf = NULL;
    int st = wk_nccl_world_id(id, err, sizeof err);
    CHECK(st == CM_OK, "wk_nccl_world_id: %s", err);
    if (st == CM_OK) {
        double t0 = cm_now();
        st = wk_nccl_world_create(id, 1, 0, 0, 60000, &w, err, sizeof err);
        CHECK(st == CM_OK, "wk_nccl_world_create: %s", err);
        printf("%s: one-rank world on GPU 0 in %.0f ms\n", TEST, (cm_now() - t0) * 1e3);
    }
    if (st == CM_OK) st = wk_device_cuda_create(0, WK_PRECISION_FP32, &dev);
    if (st == CM_OK && !(buf = wk_device_alloc(dev, n * 4))) st = CM_ENOMEM;
    CHECK(st == CM_OK, "device: %s", cm_strerror(st));
    /* On the device's stream (the path a trainer with a GPU gradient uses). */
    for (int average = 0; average <= 1 && st == CM_OK; average++) {
        dev->ops->upload(dev, buf, want, n * 4);
        st = wk_nccl_world_allreduce(w, buf, n, average, wk_device_cuda_stream(dev), 7);
        CHECK(st == CM_OK, "allreduce (average %d): %s", average, wk_nccl_world_error(w));
        dev->ops->download(dev, back, buf, n * 4);
        int s2 = wk_device_sync(dev);
        double rel = gpu_test_rel_err(back, want, n);
        printf("%s: device allreduce, average %d: relative error %.3g\n", TEST, average, rel);
        CHECK(s2 == CM_OK && rel == 0.0, "one rank must give the input back: rel %.3g", rel);
    }
    if (st == CM_OK) {
        memcpy(host, want, n * 4);
        st = wk_nccl_world_allreduce_host(w, host, n, 1, 8);
        CHECK(st == CM_OK, "host allreduce: %s", wk_nccl_world_error(w));
        CHECK(memcmp(host, want, n * 4) == 0, "host allreduce changed the values");
    }
    if (st == CM_OK) {
        /* The watchdog: 3 s of a stalled stream against a 300 ms timeout. */
        wk_nccl_world_set_timeout(w, 300);
        double t0 = cm_now();
        st = wk_nccl_world_test_stall(w, 3000);
        double ms = (cm_now() - t0) * 1e3;
        printf("%s: stalled stream: %s after %.0f ms: %s\n", TEST, cm_strerror(st), ms,
               wk_nccl_world_error(w));
        CHECK(st == CM_ETIMEDOUT, "stall gave %s, not a timeout", cm_strerror(st));
        /* The abort may wait for the spinning kernel (3 s), never longer. */
        CHECK(ms < 5000, "the watchdog took %.0f ms", ms);
        CHECK(wk_nccl_world_aborted(w), "the communicator was not aborted");
        CHECK(strstr(wk_nccl_world_error(w), "no progress for") != NULL, "message: %s",
              wk_nccl_world_error(w));
        t0 = cm_now();
        int again = wk_nccl_world_allreduce_host(w, host, n, 1, 9);
        CHECK(again == CM_EIO && cm_now() - t0 < 0.5, "allreduce after abort: %s",
              cm_strerror(again));
    }
    wk_nccl_world_destroy(w);
    if (dev) wk_device_free(dev, buf);
    wk_device_destroy(dev);
    free(host);
    free(want);
    free(back);
    return gpu_test_result(TEST);
}
