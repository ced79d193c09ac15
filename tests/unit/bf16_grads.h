/* bf16_grads.h - gradients for the bfloat16 tests of test_ps_shard.c and
 * test_ps_server.c (static: each test program includes it once).
 * SPDX-License-Identifier: MIT
 */
#ifndef TEST_BF16_GRADS_H
#define TEST_BF16_GRADS_H
#include <stdint.h>
#include <stdlib.h>

#include "ps/ps_wire.h"

/* Full-mantissa gradients in about [-1, 1] (bfloat16 rounds almost all of
 * them), different for every (worker, step). */
static void grad_fine(float *g, size_t n, int worker, int64_t step) {
    for (size_t i = 0; i < n; i++)
        g[i] = (float)((int)((i * 7919 + (size_t)worker * 104729 + (size_t)step * 1299709) %
                             2001) -
                       1000) /
               997.0f;
}

/* g as a shard accumulates it when pushed as bfloat16: rounded, widened. */
static void bf16_round(float *g, size_t n) {
    uint16_t *h = malloc((n ? n : 1) * sizeof *h);
    if (!h) abort();
    ps_wire_bf16_from_f32(h, g, n);
    ps_wire_load_bf16(g, (const uint8_t *)h, n);
    free(h);
}

#endif /* TEST_BF16_GRADS_H */
