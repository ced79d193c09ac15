/* wk_replicas.h - D local replicas of the model, one per local device.
 * SPDX-License-Identifier: MIT
 *
 * A worker process drives D devices (CPU replicas, or GPUs). For one batch,
 * each replica computes the mean gradient of its contiguous slice
 * (wk_order_slice) in its own thread; the local reduce then averages the D
 * gradients weighted by example count, so the result is the mean gradient of
 * the whole batch whatever D is: D never changes the effective learning
 * rate. On host-visible devices the reduce is a host sum; on several CUDA
 * devices it is an NCCL reduce to device 0 (when the build has NCCL), and
 * new parameters reach the GPUs by one upload and an NCCL broadcast. Every mode (local, PS, allreduce) calls this, then synchronises the
 * reduced gradient its own way.
 *
 * Not thread-safe: one caller thread drives a wk_replicas.
 */
#ifndef WK_REPLICAS_H
#define WK_REPLICAS_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "worker/device/wk_device.h"
#include "worker/input/wk_dataset.h"
#include "worker/model/wk_model.h"
#include "worker/model/wk_sim.h"

typedef struct wk_replicas wk_replicas;

/* Seconds spent in the phases of one wk_replicas_gradient call. */
typedef struct wk_phase_times {
    double compute;      /* Slowest replica's forward + backward. */
    double local_reduce; /* Averaging the D gradients into one. */
} wk_phase_times;

/* One replica per device in devs[0..ndevs) (borrowed; they must outlive the
 * set), each sized for batches of up to max_batch examples in all. Starts
 * ndevs - 1 helper threads. Returns CM_EINVAL, CM_ENOMEM; *out NULL on
 * error. Release with wk_replicas_destroy() (joins the threads). */
int wk_replicas_create(const cm_model *model, wk_device **devs, int ndevs, int max_batch,
                       wk_replicas **out);
void wk_replicas_destroy(wk_replicas *rs);

/* ndevs simulated devices instead (wk_sim.h: cfg is copied): gradients
 * take the simulated time and come out as the simulator's pattern, straight
 * into the caller's buffers (a hook, with one device, hears of them as
 * the real backward pass would tell it); set_params reads nothing;
 * evaluation computes nothing (loss 0, nothing correct, probabilities
 * 0.5). CM_EINVAL for a bad config. */
int wk_replicas_create_sim(const cm_model *model, const wk_sim_cfg *cfg, int ndevs, int max_batch,
                           wk_replicas **out);

int wk_replicas_count(const wk_replicas *rs);

/* Make params (host, model->numel floats) the parameters of every replica.
 * On host-visible devices the replicas read 'params' in place, so it must
 * stay valid and unchanged until the next gradient call returns; other
 * devices receive a copy. */
int wk_replicas_set_params(wk_replicas *rs, const float *params);

/* The embedding rows of a sparse model's batch (host memory): the values
 * of its unique rows (nrows x row_dim, wk_model_row_dim) and, for every
 * (example, field), the index of its row (n x nfields, example-major). */
typedef struct wk_rows_in {
    const int32_t *inv;
    const float *rows;
    size_t nrows;
} wk_rows_in;

/* Mean gradient of the batch (x: n rows of host floats for dense models,
 * NULL for sparse ones; y: n labels; sp: the rows, sparse models only;
 * 1 <= n <= max_batch) into grad (host, model->numel floats) and, for
 * sparse models, row_grad (host, sp->nrows x row_dim floats: the gradient
 * of each unique row, summed over the examples that read it). Adds the
 * summed loss and correct count to *loss_sum / *correct (either may be
 * NULL) and fills *times if not NULL. */
int wk_replicas_gradient(wk_replicas *rs, const float *x, const int32_t *y, int n,
                         const wk_rows_in *sp, float *grad, float *row_grad, double *loss_sum,
                         int64_t *correct, wk_phase_times *times);

/* Forward only on replica 0 for n <= wk_replicas_eval_max() examples
 * (inputs as for wk_replicas_gradient): adds the summed loss and correct
 * count; probs (host, n floats, may be NULL) gets binary models'
 * predicted probabilities. */
int wk_replicas_evaluate_batch(wk_replicas *rs, const float *x, const int32_t *y, int n,
                               const wk_rows_in *sp, double *loss_sum, int64_t *correct,
                               float *probs);
int wk_replicas_eval_max(const wk_replicas *rs);

/* 1 if a gradient hook can be used: one replica on a host-visible device,
 * whose gradient goes straight to the caller's buffer. With several
 * replicas a gradient is final only after the local reduce. */
int wk_replicas_can_hook(const wk_replicas *rs);

/* Use 'hook' (borrowed, NULL for none) in the following gradient calls,
 * when wk_replicas_can_hook; ignored otherwise. Its ranges refer to the
 * caller's grad buffer. */
void wk_replicas_set_hook(wk_replicas *rs, const wk_grad_hook *hook);

/* Dense image models: accuracy and mean loss over all of 'data' with the
 * current parameters, using replica 0. */
int wk_replicas_evaluate(wk_replicas *rs, const wk_dataset *data, double *accuracy,
                         double *mean_loss);

#endif /* WK_REPLICAS_H */
