/* wk_model.h - what the trainer runs: one ops table per kind of model.
 * SPDX-License-Identifier: MIT
 *
 * The trainer, the replicas, the sync modes and export see a model as its
 * dense parameters (one flat vector, cm_model's layout) plus, for sparse
 * models, the embedding rows a batch needs: the batch's unique (table, id)
 * rows (wk_rowset), their values as one array of nrows x row_dim floats,
 * and for every (example, field) the index of its row. A model kind
 * implements forward, backward and evaluation against wk_device; the MLP is
 * one implementation (wk_mlp), DeepFM and logistic regression another
 * (wk_ctr).
 *
 * A wk_model is the per-device workspace for batches of up to max_batch
 * examples, used by one thread at a time.
 */
#ifndef WK_MODEL_H
#define WK_MODEL_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "worker/device/wk_device.h"

typedef struct wk_model wk_model;

/* Told during the backward pass when part of the dense gradient is final,
 * so a caller can send it while the rest is computed (PS mode's overlap).
 * Only for host-visible devices whose operations complete before they
 * return (the CPU backend): 'ready' may read the range at once. */
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

/* One slice of a batch, on the model's device. */
typedef struct wk_dev_batch {
    int n;               /* Examples (>= 1). */
    const float *x;      /* Dense models: n x input width floats. */
    const int32_t *y;    /* n labels (classes; 0/1 for click models). */
    /* Sparse models: */
    const int32_t *inv;  /* n x nfields: row index of example e's field f
                          * at inv[e * nfields + f], into rows. */
    const float *rows;   /* nrows x row_dim: the values of those rows. */
    int nrows;
} wk_dev_batch;

typedef struct wk_model_ops {
    const char *name;
    /* Workspace for 'model' (borrowed) on 'dev' (borrowed), for up to
     * max_batch examples. CM_EINVAL for a model of another kind. */
    int (*create)(const cm_model *model, wk_device *dev, int max_batch, wk_model **out);
    void (*destroy)(wk_model *net);
    /* Gradient of the mean loss over the b->n examples with respect to the
     * dense params (written over grad, model->numel floats) and, for sparse
     * models, to the batch's rows (written over row_grad, b->nrows x
     * row_dim floats: every row is written, 0 where no example of this
     * slice reads it). All pointers are device pointers. Adds the summed
     * loss to *loss_sum and the count of correct predictions to *correct
     * (host; either may be NULL). hook (may be NULL; dense models) hears of
     * every dense variable's gradient as it becomes final. Returns the
     * device's status. */
    int (*gradient)(wk_model *net, const float *params, const wk_dev_batch *b, float *grad,
                    float *row_grad, double *loss_sum, int64_t *correct,
                    const wk_grad_hook *hook);
    /* Forward only: adds the summed loss and the correct count; for binary
     * models, probs (device, n floats; may be NULL) gets each example's
     * predicted probability of label 1. */
    int (*evaluate)(wk_model *net, const float *params, const wk_dev_batch *b, double *loss_sum,
                    int64_t *correct, float *probs);
    /* Floating-point operations of one gradient on n examples (GEMMs). */
    double (*flops)(const cm_model *model, int n);
} wk_model_ops;

/* The ops for model->kind ("mlp", "deepfm", "lr"), or NULL. */
const wk_model_ops *wk_model_ops_for(const cm_model *model);

/* 1 if the model reads embedding rows (model->nfields > 0). */
static inline int wk_model_is_sparse(const cm_model *m) { return m->nfields > 0; }

/* Floats per row of the rows array a sparse model's batch carries: its
 * tables' dim (all tables of a wk_ctr model have the same). */
static inline int wk_model_row_dim(const cm_model *m) { return cm_model_max_dim(m); }

/* 1 for models with one output probability (click models): evaluated by
 * AUC and logloss rather than accuracy. */
static inline int wk_model_is_binary(const cm_model *m) { return m->nfields > 0; }

#endif /* WK_MODEL_H */
