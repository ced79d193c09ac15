/* wk_mlp.h - a multilayer perceptron (ReLU, softmax cross-entropy) on a device.
 * SPDX-License-Identifier: MIT
 *
 * The parameters live outside the network, as one flat vector laid out by
 * cm_model (kernel [in, out] then bias [out], per layer), so the trainer,
 * the PS and the ring all handle the same buffer. A wk_mlp is the per-device
 * workspace (activations, deltas) for batches up to max_batch rows. It is
 * used by one thread at a time.
 */
#ifndef WK_MLP_H
#define WK_MLP_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "worker/device/wk_device.h"

typedef struct wk_mlp wk_mlp;

/* Told during the backward pass when part of the gradient is final, so a
 * caller can send it while the rest is computed (PS mode's overlap). Only
 * for host-visible devices whose operations complete before they return
 * (the CPU backend): 'ready' may read the range at once. */
typedef struct wk_grad_hook {
    /* Rows [row_begin, row_end) of variable 'var' in grad are final: this
     * call will neither write nor read them again, and will not read that
     * variable's parameters again either. */
    void (*ready)(void *ud, int var, size_t row_begin, size_t row_end);
    void *ud;
    /* Optional, per variable: row boundaries splits[var][0..nsplits[var])
     * (ascending, from 0 to the variable's rows) at which the first
     * layer's kernel gradient, computed last, is computed and announced in
     * pieces. NULL, or nsplits[var] < 3: in one piece. */
    const size_t *const *splits;
    const int *nsplits;
    /* Optional: called by the forward pass before it reads rows
     * [row_begin, row_end) of variable 'var' in params; returns once they
     * hold their final values (CM_OK), or an error status, which ends the
     * gradient with that status. With it, the first layer's kernel is read
     * in the same row pieces (splits[0]), each after its own need(), so the
     * previous step's pull of the later pieces (PS mode's pipelined pull)
     * overlaps the forward pass of the earlier ones. */
    int (*need)(void *ud, int var, size_t row_begin, size_t row_end);
} wk_grad_hook;

/* Workspace for 'model' (borrowed, must outlive the net) on 'dev'
 * (borrowed). Returns CM_EINVAL if the model is not an MLP or max_batch < 1,
 * CM_ENOMEM; *out is NULL on error. Release with wk_mlp_destroy(). */
int wk_mlp_create(const cm_model *model, wk_device *dev, int max_batch, wk_mlp **out);
void wk_mlp_destroy(wk_mlp *net);

/* Gradient of the mean loss over the n examples (1 <= n <= max_batch) with
 * respect to params, written over grad (model->numel floats). x is n rows of
 * model->sizes[0] floats, y n labels; all are device pointers. Adds the
 * summed loss to *loss_sum and the count of correct argmaxes to *correct
 * (host; either may be NULL). hook (may be NULL) hears of every variable's
 * gradient as it becomes final, each row once. Returns the device's status. */
int wk_mlp_gradient(wk_mlp *net, const float *params, const float *x, const int32_t *y, int n,
                    float *grad, double *loss_sum, int64_t *correct, const wk_grad_hook *hook);

/* Forward only: adds the summed loss and correct count of the n examples. */
int wk_mlp_evaluate(wk_mlp *net, const float *params, const float *x, const int32_t *y, int n,
                    double *loss_sum, int64_t *correct);

/* Floating-point operations of the GEMMs in one wk_mlp_gradient on n rows. */
double wk_mlp_gemm_flops(const cm_model *model, int n);

#endif /* WK_MLP_H */
