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
#include "worker/model/wk_model.h"

typedef struct wk_mlp wk_mlp;

/* The MLP as a model kind ("mlp"): its ops table (wk_model.h) over the
 * functions below; a wk_model of it is a wk_mlp. */
extern const wk_model_ops wk_mlp_ops;

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
