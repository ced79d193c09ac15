/* wk_softmax_row.h - one row of softmax cross-entropy, shared by the CPU
 * backend and the CUDA kernel so both compute it the same way.
 * SPDX-License-Identifier: MIT
 *
 * Internal to worker/device. Included from C and from CUDA (where it is a
 * __host__ __device__ function).
 */
#ifndef WK_SOFTMAX_ROW_H
#define WK_SOFTMAX_ROW_H
#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define WK__HOST_DEVICE __host__ __device__
#else
#define WK__HOST_DEVICE
#endif

/* Row z of 'classes' logits against 'label': writes dz = (softmax(z) -
 * onehot(label)) * scale (dz may alias z: the row is read before it is
 * written), returns the loss -log softmax(z)[label] (in double), and sets
 * *right to 1 if the first argmax of z is the label, else 0. */
static inline WK__HOST_DEVICE double wk__softmax_xent_row(int classes, const float *z,
                                                           int32_t label, float scale,
                                                           float *dz, int *right) {
    int best = 0;
    float mx = z[0];
    for (int c = 1; c < classes; c++)
        if (z[c] > mx) {
            mx = z[c];
            best = c;
        }
    double sum = 0.0;
    for (int c = 0; c < classes; c++) sum += exp((double)(z[c] - mx));
    double log_sum = log(sum);
    double loss = log_sum - (double)(z[label] - mx);
    *right = best == label;
    for (int c = 0; c < classes; c++) {
        double p = exp((double)(z[c] - mx) - log_sum);
        dz[c] = (float)(p - (c == label ? 1.0 : 0.0)) * scale;
    }
    return loss;
}

#endif /* WK_SOFTMAX_ROW_H */
