/* wk_metrics.c - a worker's Prometheus metrics (see wk_metrics.h).
 * SPDX-License-Identifier: MIT
 */
#include "worker/wk_metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void wk_metrics_set_rank(wk_metrics *m, int rank) { atomic_store(&m->rank, rank); }

static void add_s(_Atomic uint64_t *c, double s) {
    if (s > 0) atomic_fetch_add_explicit(c, (uint64_t)(s * 1e9), memory_order_relaxed);
}

void wk_metrics_step(wk_metrics *m, uint64_t n, double step_s, double data_s, double compute_s,
                     double comm_s, double apply_s, double mean_loss) {
    /* The step count last (release), read first by the render (acquire): a
     * scrape never counts more steps than it has examples, times and
     * histogram observations for. */
    atomic_fetch_add_explicit(&m->examples, n, memory_order_relaxed);
    add_s(&m->data_ns, data_s);
    add_s(&m->compute_ns, compute_s);
    add_s(&m->comm_ns, comm_s);
    add_s(&m->apply_ns, apply_s);
    uint64_t bits;
    memcpy(&bits, &mean_loss, sizeof bits);
    atomic_store_explicit(&m->loss_bits, bits, memory_order_relaxed);
    cm_hist_add(&m->step, step_s);
    atomic_fetch_add_explicit(&m->steps, 1, memory_order_release);
}

char *wk_metrics_render(wk_metrics *m, size_t *len) {
    cm_prom_doc doc;
    if (!cm_prom_begin(&doc)) return NULL;
    FILE *f = doc.f;
    char lb[32];
    snprintf(lb, sizeof lb, "rank=\"%d\"", atomic_load(&m->rank));
    uint64_t steps = atomic_load_explicit(&m->steps, memory_order_acquire);
    uint64_t bits = atomic_load(&m->loss_bits);
    double loss;
    memcpy(&loss, &bits, sizeof loss);
    cm_prom_family(f, "pstrain_worker_steps_total", "counter", "training steps done");
    cm_prom_sample(f, "pstrain_worker_steps_total", lb, (double)steps);
    cm_prom_family(f, "pstrain_worker_examples_total", "counter", "training examples done");
    cm_prom_sample(f, "pstrain_worker_examples_total", lb, (double)atomic_load(&m->examples));
    struct {
        const char *name, *help;
        _Atomic uint64_t *ns;
    } parts[] = {
        {"pstrain_worker_data_wait_seconds_total", "time steps waited for their batch",
         &m->data_ns},
        {"pstrain_worker_compute_seconds_total", "forward, backward and the local reduce",
         &m->compute_ns},
        {"pstrain_worker_comm_seconds_total",
         "push and pull (PS) or the ring (allreduce), waiting for the others included",
         &m->comm_ns},
        {"pstrain_worker_apply_seconds_total", "the optimizer on the worker (allreduce, local)",
         &m->apply_ns},
    };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        cm_prom_family(f, parts[i].name, "counter", parts[i].help);
        cm_prom_sample(f, parts[i].name, lb, (double)atomic_load(parts[i].ns) * 1e-9);
    }
    cm_prom_family(f, "pstrain_worker_loss", "gauge", "the last step's mean training loss");
    cm_prom_sample(f, "pstrain_worker_loss", lb, loss);
    cm_prom_family(f, "pstrain_worker_step_seconds", "histogram", "time of a training step");
    cm_prom_hist(f, "pstrain_worker_step_seconds", lb, &m->step);
    return cm_prom_end(&doc, len);
}
