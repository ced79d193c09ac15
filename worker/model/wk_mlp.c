/* wk_mlp.c - forward and backward of an MLP against the wk_device interface.
 * SPDX-License-Identifier: MIT
 *
 * Layer i (0-based, L layers): z_i = a_i W_i + b_i, a_{i+1} = relu(z_i) for
 * i < L-1; z_{L-1} are the logits. Backward, with dz_{L-1} from the softmax:
 *   dW_i = a_i^T dz_i,  db_i = colsum(dz_i),  dz_{i-1} = relu'(a_i) * (dz_i W_i^T).
 * The first layer's input gradient is never computed. With a hook, layer i's
 * gradients are announced once dz_{i-1} (which reads W_i) is computed, and
 * the first layer's kernel, computed last, may be computed in row pieces
 * dW_0[a:b) = x[:, a:b)^T dz_0, each announced at once.
 */
#include "worker/model/wk_mlp.h"

#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"

struct wk_mlp {
    const cm_model *model;
    wk_device *dev;
    int max_batch;
    int nlayers;
    float *act[CM_MLP_MAX_SIZES]; /* act[i], i >= 1: output of layer i-1. */
    float *delta[2];              /* Ping-pong buffers for dz. */
};

int wk_mlp_create(const cm_model *model, wk_device *dev, int max_batch, wk_mlp **out) {
    *out = NULL;
    if (strcmp(model->kind, "mlp") != 0 || max_batch < 1 || model->nsizes < 2)
        return CM_EINVAL;
    wk_mlp *net = cm_calloc(1, sizeof *net);
    net->model = model;
    net->dev = dev;
    net->max_batch = max_batch;
    net->nlayers = model->nsizes - 1;
    int widest = 0;
    for (int i = 1; i < model->nsizes; i++) {
        if (model->sizes[i] > widest) widest = model->sizes[i];
        net->act[i] = wk_device_alloc(dev, (size_t)max_batch * (size_t)model->sizes[i] *
                                               sizeof(float));
        if (!net->act[i]) goto fail;
    }
    for (int k = 0; k < 2; k++) {
        net->delta[k] = wk_device_alloc(dev, (size_t)max_batch * (size_t)widest * sizeof(float));
        if (!net->delta[k]) goto fail;
    }
    *out = net;
    return CM_OK;
fail:
    wk_mlp_destroy(net);
    return CM_ENOMEM;
}

void wk_mlp_destroy(wk_mlp *net) {
    if (!net) return;
    for (int i = 1; i < CM_MLP_MAX_SIZES; i++) wk_device_free(net->dev, net->act[i]);
    for (int k = 0; k < 2; k++) wk_device_free(net->dev, net->delta[k]);
    free(net);
}

/* Layer i's kernel and bias inside the flat vector. */
static const float *kernel_of(const wk_mlp *net, const float *params, int i) {
    return params + net->model->vars[2 * i].offset;
}
static const float *bias_of(const wk_mlp *net, const float *params, int i) {
    return params + net->model->vars[2 * i + 1].offset;
}

static size_t rows_of(const cm_model *m, int var) {
    const cm_var *v = &m->vars[var];
    return v->ndims >= 1 && v->dims[0] >= 1 ? (size_t)v->dims[0] : 1;
}

/* hook->need for all of variable var (CM_OK without one). */
static int need_var(const wk_grad_hook *hook, const cm_model *m, int var) {
    return hook && hook->need ? hook->need(hook->ud, var, 0, rows_of(m, var)) : CM_OK;
}

/* Forward to the logits (left in act[nlayers]). With hook->need, every
 * variable is asked for before it is read, and the first kernel piece by
 * piece: z_0 = sum_k x[:, a_k:b_k) W_0[a_k:b_k), accumulated in order. */
static int forward(wk_mlp *net, const float *params, const float *x, int n,
                   const wk_grad_hook *hook) {
    const wk_device_ops *o = net->dev->ops;
    const cm_model *m = net->model;
    const int *s = m->sizes;
    const float *in = x;
    int rc;
    for (int i = 0; i < net->nlayers; i++) {
        float *z = net->act[i + 1];
        const float *w = kernel_of(net, params, i);
        int np = i == 0 && hook && hook->need && hook->splits && hook->nsplits
                     ? hook->nsplits[0]
                     : 0;
        if (np >= 3) {
            const size_t *sp = hook->splits[0];
            for (int k = 0; k + 1 < np; k++) {
                int a = (int)sp[k], b = (int)sp[k + 1];
                if ((rc = hook->need(hook->ud, 0, (size_t)a, (size_t)b)) != CM_OK) return rc;
                o->gemm(net->dev, 0, 0, n, s[1], b - a, 1.0f, in + a, s[0],
                        w + (size_t)a * (size_t)s[1], s[1], k == 0 ? 0.0f : 1.0f, z, s[1]);
            }
        } else {
            if ((rc = need_var(hook, m, 2 * i)) != CM_OK) return rc;
            o->gemm(net->dev, 0, 0, n, s[i + 1], s[i], 1.0f, in, s[i], w, s[i + 1], 0.0f, z,
                    s[i + 1]);
        }
        if ((rc = need_var(hook, m, 2 * i + 1)) != CM_OK) return rc;
        o->bias_add(net->dev, n, s[i + 1], z, bias_of(net, params, i));
        if (i + 1 < net->nlayers) o->relu(net->dev, (size_t)n * (size_t)s[i + 1], z, z);
        in = z;
    }
    return CM_OK;
}

static void announce(const wk_grad_hook *hook, const cm_model *m, int var) {
    if (hook) hook->ready(hook->ud, var, 0, rows_of(m, var));
}

int wk_mlp_gradient(wk_mlp *net, const float *params, const float *x, const int32_t *y, int n,
                    float *grad, double *loss_sum, int64_t *correct, const wk_grad_hook *hook) {
    if (n < 1 || n > net->max_batch) return CM_EINVAL;
    const wk_device_ops *o = net->dev->ops;
    const int *s = net->model->sizes;
    const int L = net->nlayers;
    int rc = forward(net, params, x, n, hook);
    if (rc != CM_OK) {
        wk_device_sync(net->dev);
        return rc;
    }
    float *dz = net->delta[0];
    o->softmax_xent(net->dev, n, s[L], net->act[L], y, 1.0f / (float)n, dz, loss_sum, correct);
    for (int i = L - 1; i >= 0; i--) {
        const float *a_in = i == 0 ? x : net->act[i];
        float *dw = grad + net->model->vars[2 * i].offset;
        float *db = grad + net->model->vars[2 * i + 1].offset;
        o->col_sum(net->dev, n, s[i + 1], dz, db);
        int np = hook && hook->splits && hook->nsplits ? hook->nsplits[2 * i] : 0;
        if (i == 0 && np >= 3) {
            /* In pieces: dW[a:b) = a_in[:, a:b)^T dz, [b-a, n] x [n, s_1]. */
            announce(hook, net->model, 1);
            const size_t *sp = hook->splits[0];
            for (int k = 0; k + 1 < np; k++) {
                int a = (int)sp[k], b = (int)sp[k + 1];
                o->gemm(net->dev, 1, 0, b - a, s[1], n, 1.0f, a_in + a, s[0], dz, s[1], 0.0f,
                        dw + (size_t)a * (size_t)s[1], s[1]);
                hook->ready(hook->ud, 0, (size_t)a, (size_t)b);
            }
            break;
        }
        /* dW = a_in^T dz: [s_i, n] x [n, s_{i+1}]. */
        o->gemm(net->dev, 1, 0, s[i], s[i + 1], n, 1.0f, a_in, s[i], dz, s[i + 1], 0.0f, dw,
                s[i + 1]);
        if (i > 0) {
            /* da = dz W^T: [n, s_{i+1}] x [s_{i+1}, s_i], then through the ReLU. */
            float *da = net->delta[(L - i) & 1];
            o->gemm(net->dev, 0, 1, n, s[i], s[i + 1], 1.0f, dz, s[i + 1],
                    kernel_of(net, params, i), s[i + 1], 0.0f, da, s[i]);
            o->relu_backward(net->dev, (size_t)n * (size_t)s[i], net->act[i], da, da);
            dz = da;
        }
        announce(hook, net->model, 2 * i);
        announce(hook, net->model, 2 * i + 1);
    }
    return wk_device_sync(net->dev);
}

int wk_mlp_evaluate(wk_mlp *net, const float *params, const float *x, const int32_t *y, int n,
                    double *loss_sum, int64_t *correct) {
    if (n < 1 || n > net->max_batch) return CM_EINVAL;
    const int L = net->nlayers;
    forward(net, params, x, n, NULL);
    net->dev->ops->softmax_xent(net->dev, n, net->model->sizes[L], net->act[L], y, 0.0f,
                                net->delta[0], loss_sum, correct);
    return wk_device_sync(net->dev);
}

double wk_mlp_gemm_flops(const cm_model *model, int n) {
    double f = 0.0;
    for (int i = 0; i + 1 < model->nsizes; i++) {
        double layer = 2.0 * n * model->sizes[i] * model->sizes[i + 1];
        f += layer * (i == 0 ? 2.0 : 3.0); /* forward, dW, and dX except layer 0 */
    }
    return f;
}

/* ------------------------------------------------------------ model ops */

static int ops_create(const cm_model *model, wk_device *dev, int max_batch, wk_model **out) {
    return wk_mlp_create(model, dev, max_batch, (wk_mlp **)out);
}

static void ops_destroy(wk_model *net) { wk_mlp_destroy((wk_mlp *)net); }

static int ops_gradient(wk_model *net, const float *params, const wk_dev_batch *b, float *grad,
                        float *row_grad, double *loss_sum, int64_t *correct,
                        const wk_grad_hook *hook) {
    (void)row_grad;
    return wk_mlp_gradient((wk_mlp *)net, params, b->x, b->y, b->n, grad, loss_sum, correct,
                           hook);
}

static int ops_evaluate(wk_model *net, const float *params, const wk_dev_batch *b,
                        double *loss_sum, int64_t *correct, float *probs) {
    (void)probs;
    return wk_mlp_evaluate((wk_mlp *)net, params, b->x, b->y, b->n, loss_sum, correct);
}

const wk_model_ops wk_mlp_ops = {.name = "mlp",
                                 .create = ops_create,
                                 .destroy = ops_destroy,
                                 .gradient = ops_gradient,
                                 .evaluate = ops_evaluate,
                                 .flops = wk_mlp_gemm_flops};
