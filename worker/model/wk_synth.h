/* wk_synth.h - synthetic classification data from a planted linear teacher.
 * SPDX-License-Identifier: MIT
 *
 * Example i of (seed, dim, classes) has inputs x_i uniform in [-1, 1)^dim
 * and label argmax_c (x_i T)_c for a teacher T [dim x classes] drawn
 * uniformly in [-1, 1). Everything is a pure function of (seed, i), so a
 * held-out set is just another index range, and the GPU tests and
 * benchmark need no data files (the GPU machine has none).
 */
#ifndef WK_SYNTH_H
#define WK_SYNTH_H
#include <stddef.h>
#include <stdint.h>

/* Examples first .. first+n-1 into x (n rows of dim floats, host) and y (n
 * labels, host). dim >= 1, classes >= 2. */
void wk_synth_fill(uint64_t seed, int dim, int classes, size_t first, size_t n, float *x,
                   int32_t *y);

#endif /* WK_SYNTH_H */
