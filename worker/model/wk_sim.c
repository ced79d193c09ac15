/* wk_sim.c - the simulated accelerator (see wk_sim.h).
 * SPDX-License-Identifier: MIT
 */
#include "worker/model/wk_sim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "common/cm_time.h"

struct wk_sim {
    const cm_model *model;
    const wk_model_ops *mops;
    wk_sim_cfg cfg;
    int ndevs;
    int row_dim;
    uint64_t jitter_key, calls; /* The jitter's draws: key, and steps so far. */
    float *pattern;     /* numel floats: every step's dense gradient. */
    float *row_pattern; /* max_rows * row_dim floats. */
};

/* Small values in [-1e-3, 1e-3): an optimizer moves the weights a little. */
static void fill(float *p, size_t n, uint64_t key) {
    for (size_t i = 0; i < n; i++) p[i] = 2e-3f * cm_randf(key, i) - 1e-3f;
}

int wk_sim_create(const cm_model *model, const wk_sim_cfg *cfg, int ndevs, int max_batch,
                  wk_sim **out) {
    *out = NULL;
    const wk_model_ops *mops = wk_model_ops_for(model);
    if (!mops || ndevs < 1 || max_batch < 1 || cfg->tflops < 0 || cfg->step_ms < 0 ||
        cfg->intra_gbps < 0 || (cfg->tflops > 0) == (cfg->step_ms > 0) ||
        !isfinite(cfg->tflops) || !isfinite(cfg->step_ms) || !isfinite(cfg->intra_gbps) ||
        !(cfg->jitter >= 0 && cfg->jitter < 1))
        return CM_EINVAL;
    wk_sim *s = cm_calloc(1, sizeof *s);
    s->model = model;
    s->mops = mops;
    s->cfg = *cfg;
    s->ndevs = ndevs;
    s->row_dim = wk_model_row_dim(model);
    s->jitter_key =
        cm_hash_str("sim/jitter", cfg->seed ^ (0x9e3779b97f4a7c15ull * (cfg->stream + 1)));
    size_t rows = (size_t)max_batch * (size_t)model->nfields * (size_t)s->row_dim;
    s->pattern = cm_alloc_aligned((model->numel ? model->numel : 1) * sizeof(float));
    s->row_pattern = cm_alloc_aligned((rows ? rows : 1) * sizeof(float));
    if (!s->pattern || !s->row_pattern) {
        wk_sim_destroy(s);
        return CM_ENOMEM;
    }
    fill(s->pattern, model->numel, cm_hash_str("sim/dense", cfg->seed));
    fill(s->row_pattern, rows, cm_hash_str("sim/rows", cfg->seed));
    *out = s;
    return CM_OK;
}

void wk_sim_destroy(wk_sim *s) {
    if (!s) return;
    free(s->pattern);
    free(s->row_pattern);
    free(s);
}

double wk_sim_compute_seconds(const wk_sim *s, int n) {
    if (s->cfg.step_ms > 0) return s->cfg.step_ms * 1e-3;
    int slice = (n + s->ndevs - 1) / s->ndevs; /* The largest slice. */
    return s->mops->flops(s->model, slice) / (s->cfg.tflops * 1e12);
}

double wk_sim_step_seconds(const wk_sim *s, int n, uint64_t k) {
    double T = wk_sim_compute_seconds(s, n);
    if (s->cfg.jitter <= 0) return T;
    return T * (1.0 + s->cfg.jitter * (2.0 * cm_randf(s->jitter_key, k) - 1.0));
}

double wk_sim_reduce_seconds(const wk_sim *s, size_t nrows) {
    if (s->ndevs < 2 || s->cfg.intra_gbps <= 0) return 0.0;
    double bytes = ((double)s->model->numel + (double)nrows * s->row_dim) * sizeof(float);
    return 2.0 * (s->ndevs - 1) / s->ndevs * bytes / (s->cfg.intra_gbps * 1e9);
}

/* Rows of dense variable v (its first dimension). */
static size_t var_rows(const cm_var *v) { return v->ndims > 0 ? (size_t)v->dims[0] : 1; }

/* The pieces of variable v the hook asked for, or the whole: bounds into
 * b[0..*nb], returns the count of pieces. */
static int pieces(const wk_grad_hook *h, int v, const cm_var *var, const size_t **b,
                  size_t whole[2]) {
    if (h && h->splits && h->nsplits && h->splits[v] && h->nsplits[v] >= 3) {
        *b = h->splits[v];
        return h->nsplits[v] - 1;
    }
    whole[0] = 0;
    whole[1] = var_rows(var);
    *b = whole;
    return 1;
}

int wk_sim_gradient(wk_sim *s, int n, float *grad, float *row_grad, size_t nrows,
                    const wk_grad_hook *hook) {
    const cm_model *m = s->model;
    double t = cm_now(), T = wk_sim_step_seconds(s, n, s->calls++);
    double tf = T / 3.0, tb = T - tf, numel = m->numel ? (double)m->numel : 1.0;
    if (!hook || s->ndevs > 1 || m->nfields > 0 || m->nvars < 1 || !m->vars[0].numel) {
        cm_sleep_until(t + T);
        memcpy(grad, s->pattern, m->numel * sizeof(float));
    } else {
        /* Forward: the first layer's kernel, piece by piece as the hook
         * lets it be read, then the rest. */
        const cm_var *v0 = &m->vars[0];
        const size_t *b;
        size_t whole[2];
        int np = pieces(hook, 0, v0, &b, whole);
        double per_row = (double)v0->numel / (double)var_rows(v0);
        for (int i = 0; i < np; i++) {
            if (hook->need) {
                int rc = hook->need(hook->ud, 0, b[i], b[i + 1]);
                if (rc != CM_OK) return rc;
            }
            t += tf * (double)(b[i + 1] - b[i]) * per_row / numel;
            cm_sleep_until(t);
        }
        t += tf * (1.0 - (double)v0->numel / numel);
        cm_sleep_until(t);
        /* Backward: last variable first, each final when its share ends. */
        for (int v = m->nvars - 1; v >= 0; v--) {
            const cm_var *var = &m->vars[v];
            if (!var->numel) continue;
            np = pieces(hook, v, var, &b, whole);
            per_row = (double)var->numel / (double)var_rows(var);
            for (int i = 0; i < np; i++) {
                size_t lo = var->offset + (size_t)((double)b[i] * per_row);
                size_t hi = var->offset + (size_t)((double)b[i + 1] * per_row);
                t += tb * (double)(hi - lo) / numel;
                cm_sleep_until(t);
                memcpy(grad + lo, s->pattern + lo, (hi - lo) * sizeof(float));
                if (hook->ready) hook->ready(hook->ud, v, b[i], b[i + 1]);
            }
        }
    }
    if (nrows) memcpy(row_grad, s->row_pattern, nrows * (size_t)s->row_dim * sizeof(float));
    double r = wk_sim_reduce_seconds(s, nrows);
    if (r > 0) cm_sleep_until(cm_now() + r);
    return CM_OK;
}
