/* test_cuda_ctr.c - the CUDA device's sparse-model ops and the DeepFM / LR
 * gradients against the CPU device.
 * SPDX-License-Identifier: MIT
 *
 * 1. Each op (fill, gather_rows, scatter_add_rows, fm_forward, fm_backward,
 *    row_sum, sigmoid_xent) on the same inputs as the CPU, with column
 *    ranges and strides; sigmoid_xent's loss and correct count through the
 *    device accumulators, flushed by sync or by a call naming other host
 *    targets.
 * 2. The DeepFM and LR gradients (dense and row) and evaluate's loss and
 *    probabilities of one batch: normwise relative error <= 1e-5 (fp32, no
 *    TF32). scatter_add_rows adds with atomics, so the row gradients are
 *    not bitwise equal to the CPU's (nor run to run); reported.
 * Negative control: perturbed weights must fail the bound. Skips (77)
 * without a usable GPU.
 */
#include <float.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "tests/gpu/gpu_test.h"
#include "worker/model/wk_ctr.h"

static const char *TEST = "test_cuda_ctr";
static const double TOL = 1e-5;

static void fill_random(float *p, size_t n, uint64_t key, float scale) {
    for (size_t i = 0; i < n; i++) p[i] = scale * (2.0f * cm_randf(key, i) - 1.0f);
}

/* A device copy of host memory (NULL on failure, counted). */
static void *to_gpu(wk_device *gpu, const void *host, size_t bytes) {
    void *p = wk_device_alloc(gpu, bytes);
    CHECK(p != NULL, "device alloc of %zu bytes", bytes);
    if (p) gpu->ops->upload(gpu, p, host, bytes);
    return p;
}

/* Download and sync; 0 on success. */
static int from_gpu(wk_device *gpu, void *host, const void *dev, size_t bytes) {
    gpu->ops->download(gpu, host, dev, bytes);
    int st = wk_device_sync(gpu);
    CHECK(st == CM_OK, "sync: %s", cm_strerror(st));
    return st;
}

static void compare(const char *what, const float *got, const float *want, size_t n) {
    double rel = gpu_test_rel_err(got, want, n);
    int same = memcmp(got, want, n * sizeof(float)) == 0;
    printf("%s: %-34s relative error %.3g%s\n", TEST, what, rel, same ? " (bitwise equal)" : "");
    CHECK(rel <= TOL, "%s: rel %.3g > %.0e", what, rel, TOL);
}

/* ------------------------------------------------------------ the ops */

static void check_row_ops(wk_device *gpu, wk_device *cpu) {
    enum { NROWS = 50, DIM = 11, N = 3000 };
    int32_t idx[N];
    for (int i = 0; i < N; i++) idx[i] = (int32_t)(cm_rand64(5, (uint64_t)i) % NROWS);
    float *rows = cm_malloc(NROWS * DIM * 4);
    fill_random(rows, NROWS * DIM, 1, 1.0f);
    int32_t *d_idx = to_gpu(gpu, idx, sizeof idx);
    float *d_rows = to_gpu(gpu, rows, NROWS * DIM * 4);
    const int cases[][3] = {{0, 11, 11}, {1, 10, 10}, {0, 1, 1}, {3, 4, 7}};
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        int col0 = cases[t][0], ncols = cases[t][1], ld = cases[t][2];
        char what[64];
        size_t nout = (size_t)N * (size_t)ld;
        float *want = cm_malloc(nout * 4), *got = cm_malloc(nout * 4);
        fill_random(want, nout, 9, 1.0f); /* The padding must survive too. */
        memcpy(got, want, nout * 4);
        float *d_out = to_gpu(gpu, got, nout * 4);
        cpu->ops->gather_rows(cpu, N, idx, rows, DIM, col0, ncols, want, ld);
        gpu->ops->gather_rows(gpu, N, d_idx, d_rows, DIM, col0, ncols, d_out, ld);
        snprintf(what, sizeof what, "gather_rows col0 %d ncols %d ld %d", col0, ncols, ld);
        if (from_gpu(gpu, got, d_out, nout * 4) == CM_OK) {
            compare(what, got, want, nout);
            CHECK(memcmp(got, want, nout * 4) == 0, "%s: not exact", what);
        }
        /* Scatter the (random) out array back, many positions per row. */
        float *racc = cm_malloc(NROWS * DIM * 4), *gacc = cm_malloc(NROWS * DIM * 4);
        fill_random(racc, NROWS * DIM, 13, 1.0f);
        float *d_acc = to_gpu(gpu, racc, NROWS * DIM * 4);
        cpu->ops->scatter_add_rows(cpu, N, idx, want, ld, ncols, racc, DIM, col0);
        gpu->ops->scatter_add_rows(gpu, N, d_idx, d_out, ld, ncols, d_acc, DIM, col0);
        snprintf(what, sizeof what, "scatter_add_rows col0 %d ncols %d ld %d", col0, ncols, ld);
        if (from_gpu(gpu, gacc, d_acc, NROWS * DIM * 4) == CM_OK)
            compare(what, gacc, racc, NROWS * DIM);
        /* Row sums of the same array. */
        float *rs = cm_malloc(N * 4), *gs = cm_malloc(N * 4);
        float *d_s = wk_device_alloc(gpu, N * 4);
        cpu->ops->row_sum(cpu, N, ncols, want, ld, rs);
        gpu->ops->row_sum(gpu, N, ncols, d_out, ld, d_s);
        snprintf(what, sizeof what, "row_sum cols %d ld %d", ncols, ld);
        if (from_gpu(gpu, gs, d_s, N * 4) == CM_OK) compare(what, gs, rs, N);
        wk_device_free(gpu, d_out);
        wk_device_free(gpu, d_acc);
        wk_device_free(gpu, d_s);
        free(want);
        free(got);
        free(racc);
        free(gacc);
        free(rs);
        free(gs);
    }
    /* fill: exactly the value, nothing past n. */
    float f[1000], g[1000];
    for (int i = 0; i < 1000; i++) f[i] = (float)i;
    float *d_f = to_gpu(gpu, f, sizeof f);
    gpu->ops->fill(gpu, 999, -1.5f, d_f);
    cpu->ops->fill(cpu, 999, -1.5f, f);
    if (from_gpu(gpu, g, d_f, sizeof g) == CM_OK)
        CHECK(memcmp(f, g, sizeof f) == 0, "fill differs from the CPU's");
    wk_device_free(gpu, d_f);
    wk_device_free(gpu, d_idx);
    wk_device_free(gpu, d_rows);
    free(rows);
}

static void check_fm_ops(wk_device *gpu, wk_device *cpu) {
    const int shapes[][3] = {{37, 39, 10}, {5, 6, 70}, {300, 3, 1}}; /* n, F, k */
    for (size_t t = 0; t < sizeof shapes / sizeof shapes[0]; t++) {
        int n = shapes[t][0], F = shapes[t][1], k = shapes[t][2];
        size_t nv = (size_t)n * F * k;
        char what[64];
        float *v = cm_malloc(nv * 4), *dout = cm_malloc((size_t)n * 4);
        float *out = cm_malloc((size_t)n * 4), *gout = cm_malloc((size_t)n * 4);
        float *dv = cm_malloc(nv * 4), *gdv = cm_malloc(nv * 4);
        fill_random(v, nv, 31 + t, 0.5f);
        fill_random(dout, (size_t)n, 37 + t, 1.0f);
        float *d_v = to_gpu(gpu, v, nv * 4), *d_dout = to_gpu(gpu, dout, (size_t)n * 4);
        float *d_out = wk_device_alloc(gpu, (size_t)n * 4), *d_dv = wk_device_alloc(gpu, nv * 4);
        cpu->ops->fm_forward(cpu, n, F, k, v, out);
        cpu->ops->fm_backward(cpu, n, F, k, v, dout, dv);
        gpu->ops->fm_forward(gpu, n, F, k, d_v, d_out);
        gpu->ops->fm_backward(gpu, n, F, k, d_v, d_dout, d_dv);
        snprintf(what, sizeof what, "fm_forward n %d F %d k %d", n, F, k);
        if (from_gpu(gpu, gout, d_out, (size_t)n * 4) == CM_OK) compare(what, gout, out, (size_t)n);
        snprintf(what, sizeof what, "fm_backward n %d F %d k %d", n, F, k);
        if (from_gpu(gpu, gdv, d_dv, nv * 4) == CM_OK) compare(what, gdv, dv, nv);
        wk_device_free(gpu, d_v);
        wk_device_free(gpu, d_dout);
        wk_device_free(gpu, d_out);
        wk_device_free(gpu, d_dv);
        free(v);
        free(dout);
        free(out);
        free(gout);
        free(dv);
        free(gdv);
    }
}

/* Both compute each loss in double from the same float logit, so the sums
 * differ by the order of the additions and the math library's last bits. */
static const double LOSS_TOL = 1e-9;

static void check_sigmoid_xent(wk_device *gpu, wk_device *cpu) {
    enum { N = 1000 };
    float z[N], dz[N], p[N], gdz[N], gp[N];
    int32_t y[N];
    fill_random(z, N, 41, 8.0f);
    z[0] = 60.0f;
    z[1] = -60.0f;
    z[2] = 0.0f;
    for (int i = 0; i < N; i++) y[i] = (int32_t)(cm_rand64(43, (uint64_t)i) & 1);
    /* The extremes on their own (their loss would swamp the sum's check):
     * finite, and the CPU's values. */
    z[N - 4] = 1e30f;
    z[N - 3] = -1e30f;
    z[N - 2] = FLT_MAX;
    z[N - 1] = -FLT_MAX;
    double xl = 0.0, gxl = 0.0;
    float *d_x = to_gpu(gpu, z + N - 4, 16), *d_xd = wk_device_alloc(gpu, 16);
    int32_t *d_xy = to_gpu(gpu, y + N - 4, 16);
    cpu->ops->sigmoid_xent(cpu, 4, z + N - 4, y + N - 4, 1.0f, dz, p, &xl, NULL);
    gpu->ops->sigmoid_xent(gpu, 4, d_x, d_xy, 1.0f, d_xd, NULL, &gxl, NULL);
    if (from_gpu(gpu, gdz, d_xd, 16) == CM_OK) {
        printf("%s: sigmoid_xent at +-1e30, +-FLT_MAX: loss %.9g vs cpu %.9g\n", TEST, gxl, xl);
        CHECK(isfinite(gxl) && fabs(gxl - xl) <= LOSS_TOL * xl, "extreme loss %.9g", gxl);
        CHECK(memcmp(gdz, dz, 16) == 0, "extreme dlogits differ");
    }
    wk_device_free(gpu, d_x);
    wk_device_free(gpu, d_xd);
    wk_device_free(gpu, d_xy);
    const int n = N - 4;
    double loss = 0.0, gloss = 0.0, gloss2 = 0.0;
    int64_t right = 0, gright = 0, gright2 = 0;
    cpu->ops->sigmoid_xent(cpu, n, z, y, 0.25f, dz, p, &loss, &right);
    float *d_z = to_gpu(gpu, z, sizeof z), *d_dz = wk_device_alloc(gpu, sizeof dz);
    float *d_p = wk_device_alloc(gpu, sizeof p);
    int32_t *d_y = to_gpu(gpu, y, sizeof y);
    /* Twice into one set of targets, then once into another: the first two
     * add up at the flush the third call forces, the third at sync. */
    gpu->ops->sigmoid_xent(gpu, n, d_z, d_y, 0.25f, d_dz, NULL, &gloss, &gright);
    gpu->ops->sigmoid_xent(gpu, n, d_z, d_y, 0.25f, d_dz, d_p, &gloss, &gright);
    gpu->ops->sigmoid_xent(gpu, n, d_z, d_y, 0.25f, d_dz, NULL, &gloss2, &gright2);
    gpu->ops->download(gpu, gdz, d_dz, sizeof gdz);
    if (from_gpu(gpu, gp, d_p, sizeof gp) == CM_OK) {
        compare("sigmoid_xent dlogits", gdz, dz, (size_t)n);
        compare("sigmoid_xent probs", gp, p, (size_t)n);
        printf("%s: sigmoid_xent loss %.12g vs cpu %.12g, correct %lld vs %lld\n", TEST, gloss2,
               loss, (long long)gright2, (long long)right);
        CHECK(fabs(gloss2 - loss) <= LOSS_TOL * loss, "loss %.12g vs %.12g", gloss2, loss);
        CHECK(fabs(gloss - 2 * loss) <= LOSS_TOL * loss, "twice: loss %.12g vs %.12g", gloss,
              2 * loss);
        CHECK(gright2 == right && gright == 2 * right, "correct %lld, %lld vs %lld",
              (long long)gright2, (long long)gright, (long long)right);
        CHECK(isfinite(gloss), "loss not finite");
    }
    wk_device_free(gpu, d_z);
    wk_device_free(gpu, d_dz);
    wk_device_free(gpu, d_p);
    wk_device_free(gpu, d_y);
}

/* ------------------------------------------------------------ models */

typedef struct batch {
    int n, nrows, D;
    float *rows;
    int32_t *inv, *y;
} batch;

typedef struct result {
    float *grad, *row_grad, *probs;
    double loss;
    int64_t correct;
} result;

/* Gradient, then evaluate, of batch b at params on dev; host in and out. */
static int model_on(wk_device *dev, const cm_model *m, const float *params, const batch *b,
                    result *r) {
    const size_t pb = m->numel * 4, rb = (size_t)b->nrows * (size_t)b->D * 4;
    const size_t ib = (size_t)b->n * (size_t)m->nfields * 4, nb = (size_t)b->n * 4;
    wk_model *net = NULL;
    int st = wk_ctr_ops.create(m, dev, b->n, &net);
    if (st != CM_OK) return st;
    float *dp = wk_device_alloc(dev, pb), *dg = wk_device_alloc(dev, pb);
    float *drows = wk_device_alloc(dev, rb), *drg = wk_device_alloc(dev, rb);
    float *dprobs = wk_device_alloc(dev, nb);
    int32_t *dinv = wk_device_alloc(dev, ib), *dy = wk_device_alloc(dev, nb);
    r->loss = 0.0;
    r->correct = 0;
    if (!dp || !dg || !drows || !drg || !dprobs || !dinv || !dy) {
        st = CM_ENOMEM;
        goto out;
    }
    dev->ops->upload(dev, dp, params, pb);
    dev->ops->upload(dev, drows, b->rows, rb);
    dev->ops->upload(dev, dinv, b->inv, ib);
    dev->ops->upload(dev, dy, b->y, nb);
    wk_dev_batch db = {.n = b->n, .y = dy, .inv = dinv, .rows = drows, .nrows = b->nrows};
    st = wk_ctr_ops.gradient(net, dp, &db, dg, drg, &r->loss, &r->correct, NULL);
    double eval_loss = 0.0;
    if (st == CM_OK) st = wk_ctr_ops.evaluate(net, dp, &db, &eval_loss, NULL, dprobs);
    if (st == CM_OK) {
        dev->ops->download(dev, r->grad, dg, pb);
        dev->ops->download(dev, r->row_grad, drg, rb);
        dev->ops->download(dev, r->probs, dprobs, nb);
        st = wk_device_sync(dev);
    }
    CHECK(st != CM_OK || fabs(eval_loss - r->loss) <= 1e-6 * r->loss,
          "evaluate's loss %.9g vs gradient's %.9g", eval_loss, r->loss);
out:;
    void *bufs[] = {dp, dg, drows, drg, dprobs, dinv, dy};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) wk_device_free(dev, bufs[i]);
    wk_ctr_ops.destroy(net);
    return st;
}

static result alloc_result(const cm_model *m, const batch *b) {
    return (result){.grad = cm_malloc(m->numel * 4),
                    .row_grad = cm_malloc((size_t)b->nrows * (size_t)b->D * 4),
                    .probs = cm_malloc((size_t)b->n * 4)};
}

static void free_result(result *r) {
    free(r->grad);
    free(r->row_grad);
    free(r->probs);
}

/* One model's gradient on the GPU against the CPU's. */
static void check_model(wk_device *gpu, wk_device *cpu, int deepfm) {
    const char *name = deepfm ? "deepfm" : "lr";
    cm_ctr_spec sp = {.nfields = 26, .emb_dim = 10, .nhidden = 2, .hidden = {64, 32},
                      .emb_init_scale = 0.3f};
    cm_model *m = NULL;
    int st = deepfm ? cm_model_create_deepfm(&sp, &m) : cm_model_create_lr(&sp, &m);
    CHECK(st == CM_OK, "%s model", name);
    if (st != CM_OK) return;
    batch b = {.n = 200, .nrows = 700, .D = deepfm ? sp.emb_dim + 1 : 1};
    b.rows = cm_malloc((size_t)b.nrows * (size_t)b.D * 4);
    b.inv = cm_malloc((size_t)b.n * (size_t)sp.nfields * 4);
    b.y = cm_malloc((size_t)b.n * 4);
    fill_random(b.rows, (size_t)b.nrows * (size_t)b.D, 51, 0.3f);
    /* Skewed ids, as in click logs: many positions share the first rows. */
    for (size_t i = 0; i < (size_t)b.n * (size_t)sp.nfields; i++) {
        float u = cm_randf(53, i);
        b.inv[i] = (int32_t)(u * u * u * (float)(b.nrows - 1));
    }
    for (int e = 0; e < b.n; e++) b.y[e] = (int32_t)(cm_rand64(57, (uint64_t)e) & 1);
    float *params = cm_malloc(m->numel * 4);
    cm_model_init(m, 7, params);
    for (size_t i = 0; i < m->numel; i++) params[i] += 0.05f * (2.0f * cm_randf(59, i) - 1.0f);

    result ref = alloc_result(m, &b), got = alloc_result(m, &b), again = alloc_result(m, &b);
    st = model_on(cpu, m, params, &b, &ref);
    CHECK(st == CM_OK, "%s cpu: %s", name, cm_strerror(st));
    st = model_on(gpu, m, params, &b, &got);
    CHECK(st == CM_OK, "%s gpu: %s", name, cm_strerror(st));
    if (st == CM_OK) {
        char what[64];
        const size_t nr = (size_t)b.nrows * (size_t)b.D;
        snprintf(what, sizeof what, "%s dense gradient", name);
        compare(what, got.grad, ref.grad, m->numel);
        for (int v = 0; v < m->nvars; v++)
            if (m->vars[v].kind == CM_VAR_DENSE)
                printf("%s:   %-14s rel %.3g\n", TEST, m->vars[v].name,
                       gpu_test_rel_err(got.grad + m->vars[v].offset,
                                        ref.grad + m->vars[v].offset, m->vars[v].numel));
        snprintf(what, sizeof what, "%s row gradient", name);
        compare(what, got.row_grad, ref.row_grad, nr);
        snprintf(what, sizeof what, "%s probabilities", name);
        compare(what, got.probs, ref.probs, (size_t)b.n);
        double loss_rel = fabs(got.loss - ref.loss) / ref.loss;
        printf("%s: %s loss %.6f (rel diff %.3g), %lld correct vs %lld\n", TEST, name,
               got.loss / b.n, loss_rel, (long long)got.correct, (long long)ref.correct);
        CHECK(loss_rel <= TOL, "%s loss rel %.3g", name, loss_rel);
        /* A probability within fp32 rounding of 0.5 may fall either way. */
        CHECK(llabs(got.correct - ref.correct) <= 1, "%s correct %lld vs %lld", name,
              (long long)got.correct, (long long)ref.correct);
        /* Atomics: the same GPU twice need not agree bitwise on rows. */
        if (model_on(gpu, m, params, &b, &again) == CM_OK)
            printf("%s: %s row gradient run to run: relative difference %.3g\n", TEST, name,
                   gpu_test_rel_err(again.row_grad, got.row_grad, nr));
        /* Negative control: the first-order weights 1% off must fail. */
        for (size_t i = 0; i < nr; i += (size_t)b.D) b.rows[i] *= 1.01f;
        st = model_on(gpu, m, params, &b, &got);
        double bad = gpu_test_rel_err(got.row_grad, ref.row_grad, nr) +
                     gpu_test_rel_err(got.grad, ref.grad, m->numel);
        printf("%s: negative control (%s rows[:, 0] x 1.01): relative error %.3g, must exceed "
               "%.0e\n",
               TEST, name, bad, TOL);
        CHECK(st == CM_OK && bad > TOL, "%s negative control %.3g", name, bad);
    }
    free_result(&ref);
    free_result(&got);
    free_result(&again);
    free(params);
    free(b.rows);
    free(b.inv);
    free(b.y);
    cm_model_destroy(m);
}

int main(void) {
    if (gpu_test_count(TEST) == 0) return gpu_test_skip(TEST);
    wk_device *gpu = NULL;
    int st = wk_device_cuda_create(0, WK_PRECISION_FP32, &gpu);
    CHECK(st == CM_OK, "create cuda device 0: %s", cm_strerror(st));
    if (st != CM_OK) return gpu_test_result(TEST);
    wk_device *cpu = wk_device_cpu_create(0);
    printf("%s: cpu reference (%s gemm)\n", TEST, wk_device_cpu_gemm_name());
    check_row_ops(gpu, cpu);
    check_fm_ops(gpu, cpu);
    check_sigmoid_xent(gpu, cpu);
    check_model(gpu, cpu, 1);
    check_model(gpu, cpu, 0);
    wk_device_destroy(gpu);
    wk_device_destroy(cpu);
    return gpu_test_result(TEST);
}
