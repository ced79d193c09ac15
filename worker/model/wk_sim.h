/* wk_sim.h - a simulated accelerator: a gradient takes a set time, no CPU.
 * SPDX-License-Identifier: MIT
 *
 * For scaling experiments on machines without the devices (pstrain
 * --devices sim[:N]): each step's gradient "takes" the time a device of
 * --sim-tflops would take for the model's FLOPs on its slice of the batch
 * (or a fixed --sim-step-ms), spent asleep, and comes out as a fixed,
 * deterministic pattern of the model's real size and layout (the same every
 * step and on every device: a pure function of the seed). Everything after
 * it is real: the trainer, the push/pull or the ring, the optimizer. The N
 * devices of a worker run in parallel, so a step costs one device's time;
 * their local reduce costs the time of a ring reduce-and-broadcast over a
 * modelled device-to-device bandwidth (--sim-intra-gbps, NVLink-like), also
 * asleep. Loss and accuracy are not computed (0): a simulated run's
 * summary says "simulated" and its accuracy means nothing.
 */
#ifndef WK_SIM_H
#define WK_SIM_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "worker/model/wk_model.h"

typedef struct wk_sim_cfg {
    double tflops;     /* > 0: a device's speed: a slice of n examples takes
                        * the model's flops(n) / (tflops * 1e12) seconds. */
    double step_ms;    /* > 0 instead: every gradient takes this long. */
    double intra_gbps; /* GB/s between a worker's devices: the local reduce
                        * of D > 1 takes 2 (D - 1) / D * bytes / that; 0:
                        * free. */
    uint64_t seed;     /* The gradients' pattern. */
    double jitter;     /* 0 <= jitter < 1: each gradient takes T (1 + jitter
                        * (2u - 1)) for u uniform in [0, 1), drawn from
                        * (seed, stream, the step's count), so devices vary as
                        * real ones do and workers do not stay in one phase;
                        * 0: exactly T. The pattern does not change. */
    uint64_t stream;   /* Which worker: its draws differ from the others'. */
} wk_sim_cfg;

typedef struct wk_sim wk_sim;

/* A simulator for 'model' (borrowed: it must outlive the simulator) on
 * ndevs devices, batches up to max_batch examples (sparse models: up to
 * max_batch * nfields rows). CM_EINVAL for a bad config (neither or both
 * of tflops and step_ms, negatives, jitter outside [0, 1)), CM_ENOMEM. */
int wk_sim_create(const cm_model *model, const wk_sim_cfg *cfg, int ndevs, int max_batch,
                  wk_sim **out);
void wk_sim_destroy(wk_sim *s);

/* The seconds one device takes for a slice of n examples (the mean, with
 * jitter). */
double wk_sim_compute_seconds(const wk_sim *s, int n);

/* The seconds the k-th gradient (k = 0, 1, ...) of a slice of n examples
 * takes: wk_sim_compute_seconds, times its jitter's draw. */
double wk_sim_step_seconds(const wk_sim *s, int n, uint64_t k);

/* The seconds of the local reduce (0 with one device). */
double wk_sim_reduce_seconds(const wk_sim *s, size_t nrows);

/* One step's gradient of a batch of n examples split over the devices:
 * sleeps the slowest device's time and writes the pattern over grad
 * (model->numel floats) and row_grad (nrows x row_dim floats, sparse
 * models), then sleeps the local reduce. With one device, hook (may be
 * NULL) is called as the real backward pass would: need() for the pieces
 * of the first layer's kernel during the forward third of the time, and
 * ready() for each variable as its share of the backward two thirds ends,
 * last layer first. Returns CM_OK, or the status a need() returned. */
int wk_sim_gradient(wk_sim *s, int n, float *grad, float *row_grad, size_t nrows,
                    const wk_grad_hook *hook);

#endif /* WK_SIM_H */
