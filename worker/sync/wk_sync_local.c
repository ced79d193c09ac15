/* wk_sync_local.c - local mode: the optimizer runs in the worker.
 * SPDX-License-Identifier: MIT
 */
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "worker/sync/wk_sync.h"

typedef struct local {
    wk_sync base;
    const cm_model *model;
    ps_optim_cfg opt;
    uint64_t seed;
    float *slots;
} local;

static int local_begin(wk_sync *s, float *params, int64_t *first_step) {
    *first_step = 0;
    local *l = (local *)s;
    cm_model_init(l->model, l->seed, params);
    return CM_OK;
}

static int local_step(wk_sync *s, int64_t step, float *grad, float *params, wk_sync_times *t) {
    local *l = (local *)s;
    double t0 = cm_now();
    ps_optim_apply(&l->opt, step + 1, params, grad, l->slots, l->model->numel);
    t->apply = cm_now() - t0;
    return CM_OK;
}

static int local_end(wk_sync *s, int64_t steps, float *params) {
    (void)s;
    (void)steps;
    (void)params;
    return CM_OK;
}

static int local_finish(wk_sync *s, int ok) {
    (void)s;
    (void)ok;
    return CM_OK;
}

static void local_destroy(wk_sync *s) {
    local *l = (local *)s;
    free(l->slots);
    free(l);
}

static const wk_sync_ops local_ops = {"local", local_begin, local_step, local_end, local_finish,
                                      local_destroy, NULL, NULL, NULL};

wk_sync *wk_sync_local_create(const cm_model *m, const ps_optim_cfg *opt, uint64_t seed) {
    local *l = cm_calloc(1, sizeof *l);
    l->base.ops = &local_ops;
    l->model = m;
    l->opt = *opt;
    l->seed = seed;
    int nslots = ps_optim_nslots(opt->kind);
    if (nslots) l->slots = cm_calloc((size_t)nslots * m->numel, sizeof(float));
    return &l->base;
}
