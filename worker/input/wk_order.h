/* wk_order.h - the order of examples: a function of (seed, epoch) only.
 * SPDX-License-Identifier: MIT
 *
 * Step s of a run with global batch B over n examples reads epoch
 * e = s / (n / B), batch b = s % (n / B), i.e. positions [b*B, (b+1)*B) of
 * wk_order_epoch(seed, e, n); the last n % B examples of an epoch are
 * dropped. Worker k of W reads the slice wk_order_slice(B, k, W) of that
 * global batch, so the distributed modes see exactly the batch local mode
 * uses at the same step.
 */
#ifndef WK_ORDER_H
#define WK_ORDER_H
#include <stddef.h>
#include <stdint.h>

/* perm[0..n) := a permutation of 0..n-1 that depends only on (seed, epoch,
 * n). */
void wk_order_epoch(uint64_t seed, int64_t epoch, size_t n, uint32_t *perm);

/* Steps in one epoch: n / global_batch (0 if global_batch > n). */
size_t wk_order_steps_per_epoch(size_t n, size_t global_batch);

/* The part [*lo, *hi) of a batch of B examples that rank k of W handles:
 * near-equal, contiguous, the first B % W ranks get one more. */
void wk_order_slice(size_t B, int k, int W, size_t *lo, size_t *hi);

#endif /* WK_ORDER_H */
