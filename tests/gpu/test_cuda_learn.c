/* test_cuda_learn.c - a short training run on the GPU learns.
 * SPDX-License-Identifier: MIT
 *
 * An MLP 32-64-10 trains with Adam on synthetic data from a planted linear
 * teacher (wk_synth.h), the PS-mode worker step on one GPU: upload the
 * parameters and the batch, gradient on the device, download it, apply the
 * optimizer on the host. Held-out accuracy must rise from about chance
 * (0.1) to >= 0.80 in fp32 and in bf16. `test_cuda_learn --cpu` runs the
 * same on the CPU device (a check of the test itself). Skips (77) without
 * a usable GPU.
 */
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_status.h"
#include "ps/ps_optim.h"
#include "tests/gpu/gpu_test.h"
#include "worker/model/wk_mlp.h"
#include "worker/model/wk_synth.h"

static const char *TEST = "test_cuda_learn";

enum { DIM = 32, CLASSES = 10, BATCH = 128, STEPS = 600, NTRAIN = 16384, NTEST = 4096 };

/* The batch at (x, y) as the device sees it: copied to (dx, dy) unless the
 * device reads host memory. */
static void stage(wk_device *dev, const float **x, const int32_t **y, float *dx, int32_t *dy) {
    if (dev->host_visible) return;
    dev->ops->upload(dev, dx, *x, (size_t)BATCH * DIM * 4);
    dev->ops->upload(dev, dy, *y, (size_t)BATCH * 4);
    *x = dx;
    *y = dy;
}

/* Accuracy of params on the held-out examples. */
static int evaluate(wk_device *dev, wk_mlp *net, const float *dparams, float *dx, int32_t *dy,
                    const float *x, const int32_t *y, double *acc) {
    int64_t right = 0;
    double loss = 0.0;
    for (int at = 0; at < NTEST; at += BATCH) {
        const float *xs = x + (size_t)at * DIM;
        const int32_t *ys = y + at;
        stage(dev, &xs, &ys, dx, dy);
        int st = wk_mlp_evaluate(net, dparams, xs, ys, BATCH, &loss, &right);
        if (st != CM_OK) return st;
    }
    *acc = (double)right / NTEST;
    return CM_OK;
}

static int train(wk_device *dev, const char *what, double *acc_before, double *acc_after) {
    const int sizes[] = {DIM, 64, CLASSES};
    cm_model *m = NULL;
    wk_mlp *net = NULL;
    int st = cm_model_create_mlp(sizes, 3, &m);
    if (st != CM_OK) return st;
    size_t pbytes = m->numel * 4;
    float *params = cm_malloc(pbytes), *grad = cm_malloc(pbytes),
          *slots = cm_calloc(2 * m->numel, 4);
    float *xtr = cm_malloc((size_t)NTRAIN * DIM * 4), *xte = cm_malloc((size_t)NTEST * DIM * 4);
    int32_t *ytr = cm_malloc((size_t)NTRAIN * 4), *yte = cm_malloc((size_t)NTEST * 4);
    wk_synth_fill(3, DIM, CLASSES, 0, NTRAIN, xtr, ytr);
    wk_synth_fill(3, DIM, CLASSES, NTRAIN, NTEST, xte, yte); /* held out */
    cm_model_init(m, 1, params);
    ps_optim_cfg opt = ps_optim_defaults(PS_OPTIM_ADAM, 3e-3f);
    float *dp = params, *dg = grad, *dx = NULL;
    int32_t *dy = NULL;
    if (!dev->host_visible) {
        dp = wk_device_alloc(dev, pbytes);
        dg = wk_device_alloc(dev, pbytes);
        dx = wk_device_alloc(dev, (size_t)BATCH * DIM * 4);
        dy = wk_device_alloc(dev, (size_t)BATCH * 4);
        if (!dp || !dg || !dx || !dy) {
            st = CM_ENOMEM;
            goto out;
        }
        dev->ops->upload(dev, dp, params, pbytes);
    }
    if ((st = wk_mlp_create(m, dev, BATCH, &net)) != CM_OK) goto out;
    if ((st = evaluate(dev, net, dp, dx, dy, xte, yte, acc_before)) != CM_OK) goto out;
    double loss_first = 0.0, loss_last = 0.0;
    for (int s = 0; s < STEPS; s++) {
        size_t at = (size_t)s * BATCH % NTRAIN;
        const float *xs = xtr + at * DIM;
        const int32_t *ys = ytr + at;
        stage(dev, &xs, &ys, dx, dy);
        double loss = 0.0;
        if ((st = wk_mlp_gradient(net, dp, xs, ys, BATCH, dg, &loss, NULL, NULL)) != CM_OK)
            goto out;
        if (!dev->host_visible) {
            dev->ops->download(dev, grad, dg, pbytes);
            if ((st = wk_device_sync(dev)) != CM_OK) goto out;
        }
        ps_optim_apply(&opt, s + 1, params, grad, slots, m->numel);
        if (!dev->host_visible) dev->ops->upload(dev, dp, params, pbytes);
        if (s < 20) loss_first += loss / BATCH / 20;
        if (s >= STEPS - 20) loss_last += loss / BATCH / 20;
    }
    if ((st = evaluate(dev, net, dp, dx, dy, xte, yte, acc_after)) != CM_OK) goto out;
    printf("%s: %s: %d steps of %d: train loss %.4f -> %.4f, held-out accuracy %.4f -> %.4f\n",
           TEST, what, STEPS, BATCH, loss_first, loss_last, *acc_before, *acc_after);
out:
    wk_mlp_destroy(net);
    if (!dev->host_visible) {
        wk_device_free(dev, dp);
        wk_device_free(dev, dg);
        wk_device_free(dev, dx);
        wk_device_free(dev, dy);
    }
    free(params);
    free(grad);
    free(slots);
    free(xtr);
    free(xte);
    free(ytr);
    free(yte);
    cm_model_destroy(m);
    return st;
}

static void expect_learning(int st, const char *what, double before, double after) {
    CHECK(st == CM_OK, "%s training: %s", what, cm_strerror(st));
    CHECK(before < 0.3, "%s: accuracy before training %.3f is not near chance", what, before);
    CHECK(after >= 0.80, "%s: held-out accuracy %.3f < 0.80 after training", what, after);
}

int main(int argc, char **argv) {
    double before = 0, after = 0;
    if (argc > 1 && !strcmp(argv[1], "--cpu")) {
        wk_device *cpu = wk_device_cpu_create(0);
        int st = train(cpu, "cpu", &before, &after);
        expect_learning(st, "cpu", before, after);
        wk_device_destroy(cpu);
        return gpu_test_result(TEST);
    }
    if (gpu_test_count(TEST) == 0) return gpu_test_skip(TEST);
    for (int prec = WK_PRECISION_FP32; prec <= WK_PRECISION_BF16; prec++) {
        wk_device *gpu = NULL;
        int st = wk_device_cuda_create(0, prec, &gpu);
        CHECK(st == CM_OK, "create cuda device 0: %s", cm_strerror(st));
        if (st != CM_OK) continue;
        char what[32];
        snprintf(what, sizeof what, "cuda %s", wk_precision_name(prec));
        st = train(gpu, what, &before, &after);
        expect_learning(st, what, before, after);
        wk_device_destroy(gpu);
    }
    return gpu_test_result(TEST);
}
