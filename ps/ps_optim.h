/* ps_optim.h - optimizers as pure functions over float arrays.
 * SPDX-License-Identifier: MIT
 *
 * The same code runs in local mode, on the PS shards and in collective mode,
 * so every mode applies bit-for-bit the same update to the same inputs. An
 * update touches only the n elements given: a partition of a variable is
 * updated exactly as the same range of the whole variable would be.
 *
 * Update rules (t is the 1-based step count of this variable):
 *   sgd:      w -= lr * g
 *   momentum: a = mu * a + g;  w -= lr * a              (TensorFlow's Momentum)
 *   adam:     m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
 *             w -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
 *   adagrad:  acc += g^2;  w -= lr * g / (sqrt(acc) + eps)   (TensorFlow's Adagrad,
 *             acc starting at initial_accumulator; t is not used)
 *
 * Slots start zeroed for every optimizer, so Adagrad's slot holds
 * acc - initial_accumulator and the update uses (slot + initial_accumulator).
 */
#ifndef PS_OPTIM_H
#define PS_OPTIM_H
#include <stddef.h>
#include <stdint.h>

enum ps_optim_kind {
    PS_OPTIM_SGD = 0,
    PS_OPTIM_MOMENTUM = 1,
    PS_OPTIM_ADAM = 2,
    PS_OPTIM_ADD = 3, /* w += g: no learning rate; benchmarks and tests. */
    PS_OPTIM_ADAGRAD = 4
};

typedef struct ps_optim_cfg {
    int kind;         /* enum ps_optim_kind */
    float lr;         /* Learning rate. */
    float momentum;   /* mu, for momentum (default 0.9). */
    float beta1;      /* Adam (default 0.9). */
    float beta2;      /* Adam (default 0.999). */
    float epsilon;    /* Adam (default 1e-8), Adagrad (default 1e-7). */
    float initial_accumulator; /* Adagrad's acc before the first step (default 0.1). */
} ps_optim_cfg;

/* Defaults for 'kind' with learning rate 'lr'. */
ps_optim_cfg ps_optim_defaults(int kind, float lr);

/* "sgd" | "momentum" | "adam" | "add" | "adagrad" -> kind, or -1. */
int ps_optim_parse(const char *name);
const char *ps_optim_name(int kind);

/* Number of float slots per parameter the optimizer keeps (0, 1 or 2).
 * Slot arrays are laid out as nslots consecutive arrays of n floats and must
 * start zeroed. */
int ps_optim_nslots(int kind);

/* Apply one update to w[0..n) with gradient g[0..n) and slots[0..nslots*n).
 * 't' is the 1-based step number (used by Adam's bias correction). w, g and
 * slots must not alias each other. */
void ps_optim_apply(const ps_optim_cfg *cfg, int64_t t, float *w, const float *g, float *slots,
                    size_t n);

/* The same update written elsewhere: w_out = update(w_in). w_in and w_out
 * are the same array or do not overlap; the result is bit-for-bit that of
 * ps_optim_apply. Lets a PS write the next version straight into a new
 * snapshot buffer instead of updating in place and copying. */
void ps_optim_apply_to(const ps_optim_cfg *cfg, int64_t t, const float *w_in, float *w_out,
                       const float *g, float *slots, size_t n);

/* ps_optim_apply_to over a sub-range whose slots are strided: slot k of
 * element i is slots[k * slot_stride + i]. Lets a PS update one partition of
 * its flat arrays (slots laid out as nslots arrays of the shard's size) while
 * the others wait; bit-for-bit the same as the whole-array update there. */
void ps_optim_apply_strided(const ps_optim_cfg *cfg, int64_t t, const float *w_in, float *w_out,
                            const float *g, float *slots, size_t slot_stride, size_t n);

#endif /* PS_OPTIM_H */
