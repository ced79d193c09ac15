/* wk_sync_local.c - local mode: the optimizer runs in the worker.
 * SPDX-License-Identifier: MIT
 *
 * A sparse model's tables live here whole, in a ps_rows store: the same
 * row store and row-wise optimizers the PS shards run, so sync PS training
 * and local training on the same global batch agree.
 */
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_rows.h"
#include "worker/sync/wk_sync.h"

typedef struct local {
    wk_sync base;
    const cm_model *model;
    ps_optim_cfg opt;
    uint64_t seed;
    float *slots;
    ps_rows *rows; /* Sparse models: every table. */
    int row_dim;
} local;

void wk_rows_read(ps_rows *r, const wk_rowset *keys, int row_dim, int train, float *values) {
    for (int t = 0; t < keys->ntables; t++) {
        size_t a = keys->tab_begin[t], b = keys->tab_begin[t + 1];
        if (b > a)
            ps_rows_read(r, t, keys->ids + a, b - a, train, values + a * (size_t)row_dim);
    }
}

void wk_rows_apply(ps_rows *r, const wk_rowset *keys, int row_dim, const float *grads) {
    for (int t = 0; t < keys->ntables; t++) {
        size_t a = keys->tab_begin[t], b = keys->tab_begin[t + 1];
        if (b > a) ps_rows_apply(r, t, keys->ids + a, b - a, grads + a * (size_t)row_dim, 1.0f);
    }
}

static int local_begin(wk_sync *s, float *params, int64_t *first_step) {
    *first_step = 0;
    local *l = (local *)s;
    cm_model_init(l->model, l->seed, params);
    return CM_OK;
}

static int local_step(wk_sync *s, int64_t step, float *grad, float *params, wk_sparse_step *sp,
                      wk_sync_times *t) {
    local *l = (local *)s;
    double t0 = cm_now();
    ps_optim_apply(&l->opt, step + 1, params, grad, l->slots, l->model->numel);
    if (sp && l->rows) {
        wk_rows_apply(l->rows, sp->keys, l->row_dim, sp->row_grad);
        if (sp->next) {
            wk_rows_read(l->rows, sp->next, l->row_dim, 1, sp->next_values);
            sp->next_done = 1;
        }
    }
    t->apply = cm_now() - t0;
    return CM_OK;
}

static int local_rows(wk_sync *s, int64_t version, const wk_rowset *keys, float *values,
                      int train) {
    (void)version;
    local *l = (local *)s;
    if (!l->rows) return CM_EINVAL;
    wk_rows_read(l->rows, keys, l->row_dim, train, values);
    return CM_OK;
}

static int local_dump(wk_sync *s, int table, ps_rows_visit_fn fn, void *ud) {
    local *l = (local *)s;
    return l->rows ? ps_rows_visit(l->rows, table, fn, ud) : CM_EINVAL;
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
    ps_rows_destroy(l->rows);
    free(l->slots);
    free(l);
}

int wk_sync_local_put_rows(wk_sync *s, int table, const uint64_t *ids, const float *values,
                           size_t n) {
    local *l = (local *)s;
    if (!l->rows || table < 0 || table >= l->model->ntables) return CM_EINVAL;
    int dim = ps_rows_dim(l->rows, table);
    for (size_t i = 0; i < n; i++)
        ps_rows_put(l->rows, table, ids[i], values + i * (size_t)dim, NULL, 0);
    return CM_OK;
}

static const wk_sync_ops local_ops = {.name = "local",
                                      .begin = local_begin,
                                      .step = local_step,
                                      .rows = local_rows,
                                      .dump_rows = local_dump,
                                      .end = local_end,
                                      .finish = local_finish,
                                      .destroy = local_destroy};

wk_sync *wk_sync_local_create(const cm_model *m, const ps_optim_cfg *opt,
                              const ps_optim_cfg *table_opt, uint64_t seed) {
    local *l = cm_calloc(1, sizeof *l);
    l->base.ops = &local_ops;
    l->model = m;
    l->opt = *opt;
    l->seed = seed;
    int nslots = ps_optim_nslots(opt->kind);
    if (nslots && m->numel) l->slots = cm_calloc((size_t)nslots * m->numel, sizeof(float));
    if (m->ntables > 0) {
        l->rows = ps_rows_create(m, table_opt, seed);
        l->row_dim = cm_model_max_dim(m);
    }
    return &l->base;
}
