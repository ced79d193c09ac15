/* gpu_test.h - what the GPU tests share: skipping, checks, norms.
 * SPDX-License-Identifier: MIT
 *
 * The GPU tests are plain C programs (no cmocka: the GPU machine has no
 * Debian libraries). Exit 0 passes, 1 fails, 77 skips (ctest's
 * SKIP_RETURN_CODE, shown as "Skipped"): every skip prints its reason.
 */
#ifndef GPU_TEST_H
#define GPU_TEST_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "worker/device/wk_device_cuda.h"

#define GPU_TEST_SKIP 77

/* Line-buffered stdout before main: under ctest stdout is a pipe, and a
 * test that crashes must not take its last lines with it. */
__attribute__((constructor)) static void gpu_test_line_buffered(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
}

/* A test that cannot run (no usable GPU, no NCCL in the build): 77, shown
 * as Skipped; but on a machine that is there to check the GPU
 * (PS_REQUIRE_GPU=1, set by scripts/gpu-check.sh) a skip would read as
 * success, so it fails instead. */
static inline int gpu_test_skip(const char *test) {
    const char *req = getenv("PS_REQUIRE_GPU");
    if (req && req[0] == '1') {
        printf("%s: FAIL: PS_REQUIRE_GPU=1 and this test cannot run here (reason above)\n", test);
        return 1;
    }
    return GPU_TEST_SKIP;
}

static int gpu_test_failures;

#define CHECK(cond, ...)                                              \
    do {                                                              \
        if (!(cond)) {                                                \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, "\n");                                    \
            gpu_test_failures++;                                      \
        }                                                             \
    } while (0)

/* Number of usable GPUs; prints why there are none. */
static inline int gpu_test_count(const char *test) {
    char why[512];
    int n = wk_device_cuda_count(why, sizeof why);
    if (n == 0) printf("%s: SKIP: no usable GPU: %s\n", test, why);
    return n;
}

/* ||a - b||_2 / ||b||_2 over n floats. */
static inline double gpu_test_rel_err(const float *a, const float *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)b[i];
        num += d * d;
        den += (double)b[i] * (double)b[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

static inline int gpu_test_result(const char *test) {
    if (gpu_test_failures) {
        printf("%s: %d check(s) FAILED\n", test, gpu_test_failures);
        return 1;
    }
    printf("%s: passed\n", test);
    return 0;
}

#endif /* GPU_TEST_H */
