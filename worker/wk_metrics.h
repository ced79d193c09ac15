/* wk_metrics.h - a worker's Prometheus metrics (pstrain --metrics-listen).
 * SPDX-License-Identifier: MIT
 *
 * The trainer adds every step (wk_metrics_step, lock-free); the metrics
 * endpoint (cm_http) renders them (wk_metrics_render) from its own thread:
 * steps, examples, the step time (a histogram) and its split (data wait,
 * compute with the local reduce, communication, apply: counters of
 * seconds), the last step's mean loss. Every sample is labelled with the
 * worker's rank.
 */
#ifndef WK_METRICS_H
#define WK_METRICS_H
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "common/cm_prom.h"

typedef struct wk_metrics {
    _Atomic int rank;
    _Atomic uint64_t steps, examples;
    _Atomic uint64_t data_ns, compute_ns, comm_ns, apply_ns;
    _Atomic uint64_t loss_bits; /* The last step's mean loss, a double's bits. */
    cm_hist step;
} wk_metrics;

/* A zeroed wk_metrics is ready (rank 0); set the rank when known. */
void wk_metrics_set_rank(wk_metrics *m, int rank);

/* One step of n examples and its times (seconds). */
void wk_metrics_step(wk_metrics *m, uint64_t n, double step_s, double data_s, double compute_s,
                     double comm_s, double apply_s, double mean_loss);

/* The text format (malloc'd, *len its length; NULL without memory). */
char *wk_metrics_render(wk_metrics *m, size_t *len);

#endif /* WK_METRICS_H */
