/* test_cuda_grad.c - the CUDA device computes what the CPU device computes.
 * SPDX-License-Identifier: MIT
 *
 * 1. Every GEMM transpose combination, with row strides wider than the rows
 *    and beta != 0, against the CPU device (the row-major <-> cuBLAS
 *    column-major mapping is where a backend goes wrong), in fp32 and in
 *    bf16 (against the emulated bf16 reference of 3.).
 * 2. The MLP gradient of one batch for the same weights: normwise relative
 *    error <= 1e-5 in fp32 (TF32 off) against the CPU; loss and correct
 *    count too.
 * 3. bf16 (bf16 GEMM operands, fp32 accumulation) against the CPU device
 *    with its GEMM operands rounded to bf16 the same way (an emulated bf16
 *    reference): <= 1e-2. Against the plain fp32 CPU gradient bf16 is only
 *    reported and held to <= 0.1: rounding the forward GEMMs' operands
 *    flips ReLUs whose input is within bf16's 2^-9 of zero, and each flip
 *    changes a whole term of a weight gradient; simulated on the CPU this
 *    is 2-5% normwise for this network at batch 20-100 whatever the GEMM
 *    library, so 1e-2 against fp32 cannot hold for bf16 forward passes.
 * Negative controls: perturbed weights must fail the fp32 bound (the check
 * can fail), and bf16 must differ from fp32 by more than fp32 rounding
 * (bf16 really ran). Skips (77) without a usable GPU.
 */
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "tests/gpu/gpu_test.h"
#include "worker/model/wk_mlp.h"
#include "worker/model/wk_synth.h"

static const char *TEST = "test_cuda_grad";

static void fill_random(float *p, size_t n, uint64_t key) {
    for (size_t i = 0; i < n; i++) p[i] = 2.0f * cm_randf(key, i) - 1.0f;
}

/* C = alpha op(A) op(B) + beta C on both devices, all transpose cases. */
static void check_gemm(wk_device *gpu, wk_device *cpu, double tol) {
    const int m = 37, n = 53, k = 29;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            int a_rows = ta ? k : m, a_cols = ta ? m : k, lda = a_cols + 3;
            int b_rows = tb ? n : k, b_cols = tb ? k : n, ldb = b_cols + 5;
            int ldc = n + 2;
            size_t na = (size_t)a_rows * lda, nb = (size_t)b_rows * ldb, nc = (size_t)m * ldc;
            float *a = cm_malloc(na * 4), *b = cm_malloc(nb * 4), *c_ref = cm_malloc(nc * 4),
                  *c_got = cm_malloc(nc * 4);
            fill_random(a, na, 11 + (uint64_t)ta);
            fill_random(b, nb, 13 + (uint64_t)tb);
            fill_random(c_ref, nc, 17);
            memcpy(c_got, c_ref, nc * 4);
            cpu->ops->gemm(cpu, ta, tb, m, n, k, 0.75f, a, lda, b, ldb, 0.5f, c_ref, ldc);
            float *da = wk_device_alloc(gpu, na * 4), *db = wk_device_alloc(gpu, nb * 4),
                  *dc = wk_device_alloc(gpu, nc * 4);
            CHECK(da && db && dc, "device alloc");
            if (da && db && dc) {
                gpu->ops->upload(gpu, da, a, na * 4);
                gpu->ops->upload(gpu, db, b, nb * 4);
                gpu->ops->upload(gpu, dc, c_got, nc * 4);
                gpu->ops->gemm(gpu, ta, tb, m, n, k, 0.75f, da, lda, db, ldb, 0.5f, dc, ldc);
                gpu->ops->download(gpu, c_got, dc, nc * 4);
                int st = wk_device_sync(gpu);
                CHECK(st == CM_OK, "sync: %s", cm_strerror(st));
                double rel = gpu_test_rel_err(c_got, c_ref, nc);
                printf("%s: gemm trans_a=%d trans_b=%d: relative error %.3g (bound %.0e)\n", TEST,
                       ta, tb, rel, tol);
                CHECK(rel <= tol, "gemm %d%d rel %.3g", ta, tb, rel);
                /* The padding past each row of C is never written. */
                int pad_ok = 1;
                for (int i = 0; i < m; i++)
                    for (int j = n; j < ldc; j++)
                        pad_ok &= c_got[(size_t)i * ldc + j] == c_ref[(size_t)i * ldc + j];
                CHECK(pad_ok, "gemm %d%d wrote past n columns", ta, tb);
            }
            wk_device_free(gpu, da);
            wk_device_free(gpu, db);
            wk_device_free(gpu, dc);
            free(a);
            free(b);
            free(c_ref);
            free(c_got);
        }
}

/* The emulated bf16 reference: the CPU device, with both GEMM operands
 * rounded to bf16 (round to nearest even) before an fp32 GEMM. */
static const wk_device_ops *cpu_ops;

static float to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    u &= 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

static float *rounded_copy(const float *p, int rows, int ld) {
    size_t n = (size_t)rows * (size_t)ld;
    float *q = cm_malloc(n * 4);
    for (size_t i = 0; i < n; i++) q[i] = to_bf16(p[i]);
    return q;
}

static void bf16_ref_gemm(wk_device *d, int ta, int tb, int m, int n, int k, float alpha,
                          const float *a, int lda, const float *b, int ldb, float beta, float *c,
                          int ldc) {
    float *ra = rounded_copy(a, ta ? k : m, lda), *rb = rounded_copy(b, tb ? n : k, ldb);
    cpu_ops->gemm(d, ta, tb, m, n, k, alpha, ra, lda, rb, ldb, beta, c, ldc);
    free(ra);
    free(rb);
}

typedef struct result {
    float *grad;
    double loss;
    int64_t correct;
} result;

/* Gradient of (x, y) at params on dev; host inputs, host result. */
static int gradient_on(wk_device *dev, const cm_model *m, const float *params, const float *x,
                       const int32_t *y, int n, result *r) {
    size_t pbytes = m->numel * 4, xbytes = (size_t)n * (size_t)m->sizes[0] * 4;
    wk_mlp *net = NULL;
    int st = wk_mlp_create(m, dev, n, &net);
    if (st != CM_OK) return st;
    float *dp = wk_device_alloc(dev, pbytes), *dg = wk_device_alloc(dev, pbytes),
          *dx = wk_device_alloc(dev, xbytes);
    int32_t *dy = wk_device_alloc(dev, (size_t)n * 4);
    r->loss = 0.0;
    r->correct = 0;
    if (!dp || !dg || !dx || !dy) {
        st = CM_ENOMEM;
        goto out;
    }
    dev->ops->upload(dev, dp, params, pbytes);
    dev->ops->upload(dev, dx, x, xbytes);
    dev->ops->upload(dev, dy, y, (size_t)n * 4);
    st = wk_mlp_gradient(net, dp, dx, dy, n, dg, &r->loss, &r->correct, NULL);
    if (st == CM_OK) {
        dev->ops->download(dev, r->grad, dg, pbytes);
        st = wk_device_sync(dev);
    }
out:
    wk_device_free(dev, dp);
    wk_device_free(dev, dg);
    wk_device_free(dev, dx);
    wk_device_free(dev, dy);
    wk_mlp_destroy(net);
    return st;
}

int main(void) {
    if (gpu_test_count(TEST) == 0) return gpu_test_skip(TEST);
    wk_device *bad = (wk_device *)1;
    CHECK(wk_device_cuda_create(1 << 20, WK_PRECISION_FP32, &bad) == CM_EUNSUPPORTED && !bad,
          "a missing GPU index is refused cleanly");

    const int sizes[] = {784, 256, 128, 10};
    const int n = 100;
    cm_model *m = NULL;
    if (cm_model_create_mlp(sizes, 4, &m) != CM_OK) return 1;
    float *params = cm_malloc(m->numel * 4), *x = cm_malloc((size_t)n * 784 * 4);
    int32_t *y = cm_malloc((size_t)n * 4);
    cm_model_init(m, 7, params);
    /* Non-zero biases, so bias_add and col_sum are really compared. */
    for (int v = 1; v < m->nvars; v += 2)
        for (size_t i = 0; i < m->vars[v].numel; i++)
            params[m->vars[v].offset + i] = 0.2f * cm_randf(99, i) - 0.1f;
    wk_synth_fill(5, 784, 10, 0, (size_t)n, x, y);

    wk_device *cpu = wk_device_cpu_create(0);
    result ref = {.grad = cm_malloc(m->numel * 4)};
    int st = gradient_on(cpu, m, params, x, y, n, &ref);
    CHECK(st == CM_OK, "cpu gradient: %s", cm_strerror(st));
    printf("%s: cpu reference (%s gemm): loss %.6f, %lld correct of %d\n", TEST,
           wk_device_cpu_gemm_name(), ref.loss / n, (long long)ref.correct, n);

    /* The emulated bf16 reference. */
    cpu_ops = cpu->ops;
    wk_device_ops bf_ops = *cpu->ops;
    bf_ops.gemm = bf16_ref_gemm;
    wk_device bf_cpu = {.ops = &bf_ops, .host_visible = 1, .index = 0, .impl = NULL};
    result bf_ref = {.grad = cm_malloc(m->numel * 4)};
    st = gradient_on(&bf_cpu, m, params, x, y, n, &bf_ref);
    CHECK(st == CM_OK, "emulated bf16 gradient: %s", cm_strerror(st));
    printf("%s: emulated bf16 reference against fp32: relative error %.3g\n", TEST,
           gpu_test_rel_err(bf_ref.grad, ref.grad, m->numel));

    const double tols[2] = {1e-5, 1e-2};
    double rel_of[2] = {0, 0};
    for (int prec = WK_PRECISION_FP32; prec <= WK_PRECISION_BF16; prec++) {
        const char *pn = wk_precision_name(prec);
        wk_device *gpu = NULL;
        st = wk_device_cuda_create(0, prec, &gpu);
        CHECK(st == CM_OK, "create cuda device 0 (%s): %s", pn, cm_strerror(st));
        if (st != CM_OK) continue;
        printf("%s: %s GEMMs\n", TEST, pn);
        /* Products of bf16 values are exact in fp32, so against the
         * emulated reference only the summation order differs. */
        check_gemm(gpu, prec == WK_PRECISION_FP32 ? cpu : &bf_cpu,
                   prec == WK_PRECISION_FP32 ? 1e-5 : 1e-4);
        result got = {.grad = cm_malloc(m->numel * 4)};
        st = gradient_on(gpu, m, params, x, y, n, &got);
        CHECK(st == CM_OK, "%s gradient: %s", pn, cm_strerror(st));
        /* fp32 against the CPU; bf16 against the emulated bf16 CPU. */
        const result *want = prec == WK_PRECISION_FP32 ? &ref : &bf_ref;
        double rel = gpu_test_rel_err(got.grad, want->grad, m->numel);
        double loss_rel = fabs(got.loss - want->loss) / want->loss;
        rel_of[prec] = gpu_test_rel_err(got.grad, ref.grad, m->numel);
        printf("%s: %s gradient against the %s reference: normwise relative error %.3g (bound "
               "%.0e), loss %.6f (rel diff %.3g), %lld correct; against fp32 cpu: %.3g\n",
               TEST, pn, prec == WK_PRECISION_FP32 ? "cpu" : "emulated bf16", rel, tols[prec],
               got.loss / n, loss_rel, (long long)got.correct, rel_of[prec]);
        for (int v = 0; v < m->nvars; v++)
            printf("%s:   %-14s rel %.3g\n", TEST, m->vars[v].name,
                   gpu_test_rel_err(got.grad + m->vars[v].offset, want->grad + m->vars[v].offset,
                                    m->vars[v].numel));
        CHECK(rel <= tols[prec], "%s gradient rel %.3g > %.0e", pn, rel, tols[prec]);
        CHECK(loss_rel <= tols[prec], "%s loss rel %.3g", pn, loss_rel);
        CHECK(rel_of[prec] <= 0.1, "%s gradient against fp32 rel %.3g > 0.1", pn, rel_of[prec]);
        if (prec == WK_PRECISION_FP32) {
            CHECK(got.correct == ref.correct, "correct %lld vs %lld", (long long)got.correct,
                  (long long)ref.correct);
            /* Negative control: 1% off in one kernel must fail the bound. */
            float *pert = cm_malloc(m->numel * 4);
            memcpy(pert, params, m->numel * 4);
            const cm_var *k1 = &m->vars[2];
            for (size_t i = 0; i < k1->numel; i++) pert[k1->offset + i] *= 1.01f;
            st = gradient_on(gpu, m, pert, x, y, n, &got);
            double rel_bad = gpu_test_rel_err(got.grad, ref.grad, m->numel);
            printf("%s: negative control (dense1/kernel x 1.01): relative error %.3g, must "
                   "exceed %.0e\n",
                   TEST, rel_bad, tols[0]);
            CHECK(st == CM_OK && rel_bad > tols[0], "negative control rel %.3g", rel_bad);
            free(pert);
        }
        free(got.grad);
        wk_device_destroy(gpu);
    }
    /* bf16 really ran: its error is well above fp32 rounding. */
    printf("%s: bf16 vs fp32 error ratio %.3g\n", TEST,
           rel_of[0] > 0 ? rel_of[1] / rel_of[0] : 0.0);
    CHECK(rel_of[1] > 1e-5, "bf16 gradient is as exact as fp32 (%.3g): bf16 GEMMs did not run",
          rel_of[1]);
    free(ref.grad);
    free(bf_ref.grad);
    wk_device_destroy(cpu);
    free(params);
    free(x);
    free(y);
    cm_model_destroy(m);
    return gpu_test_result(TEST);
}
