/* wk_order.c - epoch permutations and batch slices.
 * SPDX-License-Identifier: MIT
 *
 * The shuffle is Fisher-Yates with the swap partner of position i drawn as
 * word i of a counter-based stream (cm_rng.h) whose key mixes the seed and
 * the epoch. Nothing carries over from one epoch to the next, so any worker
 * can compute the order of any epoch, which is what resuming at an arbitrary
 * step and the distributed modes rely on.
 */
#include "worker/input/wk_order.h"

#include <assert.h>

#include "common/cm_rng.h"

void wk_order_epoch(uint64_t seed, int64_t epoch, size_t n, uint32_t *perm) {
    assert(n <= (size_t)UINT32_MAX + 1);
    /* Mixing the epoch before the XOR keeps (seed, epoch) and (seed ^ 1,
     * epoch ^ 1) and similar pairs from sharing a key. */
    uint64_t key = cm_mix64(seed ^ cm_mix64((uint64_t)epoch));
    for (size_t i = 0; i < n; i++) perm[i] = (uint32_t)i;
    for (size_t i = n; i > 1; i--) {
        /* j uniform in [0, i): the high word of a 64x64 product. */
        uint64_t r = cm_rand64(key, (uint64_t)(i - 1));
        size_t j = (size_t)(((unsigned __int128)r * i) >> 64);
        uint32_t t = perm[i - 1];
        perm[i - 1] = perm[j];
        perm[j] = t;
    }
}

size_t wk_order_steps_per_epoch(size_t n, size_t global_batch) {
    return global_batch == 0 ? 0 : n / global_batch;
}

void wk_order_slice(size_t B, int k, int W, size_t *lo, size_t *hi) {
    assert(W > 0 && k >= 0 && k < W);
    size_t w = (size_t)W, r = (size_t)k;
    size_t q = B / w, extra = B % w;
    /* Ranks below 'extra' hold q + 1 examples, the others q. */
    *lo = r * q + (r < extra ? r : extra);
    *hi = *lo + q + (r < extra ? 1 : 0);
}
