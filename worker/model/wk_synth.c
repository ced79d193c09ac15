/* wk_synth.c - planted-teacher synthetic data (see wk_synth.h).
 * SPDX-License-Identifier: MIT
 */
#include "worker/model/wk_synth.h"

#include "common/cm_rng.h"

void wk_synth_fill(uint64_t seed, int dim, int classes, size_t first, size_t n, float *x,
                   int32_t *y) {
    uint64_t kx = cm_hash_str("synth/x", seed), kt = cm_hash_str("synth/teacher", seed);
    for (size_t i = 0; i < n; i++) {
        float *xi = x + i * (size_t)dim;
        for (int j = 0; j < dim; j++)
            xi[j] = 2.0f * cm_randf(kx, (first + i) * (size_t)dim + (size_t)j) - 1.0f;
        int best = 0;
        double best_v = 0.0;
        for (int c = 0; c < classes; c++) {
            double v = 0.0;
            for (int j = 0; j < dim; j++)
                v += (double)xi[j] *
                     (2.0 * cm_randf(kt, (uint64_t)j * (uint64_t)classes + (uint64_t)c) - 1.0);
            if (c == 0 || v > best_v) {
                best = c;
                best_v = v;
            }
        }
        y[i] = best;
    }
}
