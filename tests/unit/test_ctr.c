/* test_ctr.c - DeepFM and logistic regression (wk_ctr) and the sparse ops of
 * the CPU device they run on.
 * SPDX-License-Identifier: MIT
 *
 * The gradients are checked against central finite differences of the
 * model's own loss (every dense parameter, every value of every row), with
 * negative controls showing the same check fails for a gradient missing
 * the FM term or scattered to the wrong rows; the forward pass against a
 * direct double computation of wk_ctr.h's definition; the ops against
 * naive loops and hand values; the staged CPU device against the plain one
 * bit for bit; and SGD on a planted FM dataset learns.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_model.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "worker/device/wk_device.h"
#include "worker/model/wk_ctr.h"

static float uni(cm_rng *r, float lo, float hi) { return lo + (hi - lo) * cm_rng_uniform(r); }

/* max_i |got_i - want_i| / max_i |want_i|: the worst element's error,
 * relative to the variable's scale (so tiny components do not dominate). */
static double max_rel(const float *got, size_t got_stride, const double *want,
                      size_t want_stride, size_t n) {
    double err = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i * got_stride] - want[i * want_stride]);
        if (d > err) err = d;
        if (fabs(want[i * want_stride]) > scale) scale = fabs(want[i * want_stride]);
    }
    return scale > 0.0 ? err / scale : err;
}

/* ------------------------------------------------------------ fixture */

/* A model, its parameters, one batch and a workspace on a device. The
 * batch: n examples of F fields reading nrows rows through inv, with ids
 * repeated so rows are shared between examples and, within an example,
 * between fields (as when fields read one table); the last row is read by
 * no position (its gradient must be 0). */
typedef struct fixture {
    cm_model *m;
    wk_device *dev;
    wk_model *net;
    int n, F, D, nrows;
    float *p, *rows;
    int32_t *inv, *y;
} fixture;

static void fixture_init(fixture *fx, int deepfm, wk_device *dev) {
    memset(fx, 0, sizeof *fx);
    cm_ctr_spec sp = {.nfields = 5, .emb_dim = 3, .nhidden = 2, .hidden = {7, 5},
                      .emb_init_scale = 0.5f};
    if (deepfm)
        assert_int_equal(cm_model_create_deepfm(&sp, &fx->m), CM_OK);
    else
        assert_int_equal(cm_model_create_lr(&sp, &fx->m), CM_OK);
    fx->dev = dev;
    fx->n = 6;
    fx->F = sp.nfields;
    fx->D = deepfm ? sp.emb_dim + 1 : 1;
    fx->nrows = 9;
    assert_int_equal(wk_ctr_ops.create(fx->m, dev, fx->n, &fx->net), CM_OK);
    fx->p = malloc((fx->m->numel + 1) * sizeof(float));
    cm_model_init(fx->m, 7, fx->p);
    cm_rng r;
    cm_rng_init(&r, 5);
    /* Non-zero biases, so every ReLU path is exercised away from its kink. */
    for (size_t i = 0; i < fx->m->numel; i++) fx->p[i] += uni(&r, -0.1f, 0.1f);
    fx->rows = malloc((size_t)fx->nrows * (size_t)fx->D * sizeof(float));
    for (int i = 0; i < fx->nrows * fx->D; i++) fx->rows[i] = uni(&r, -0.5f, 0.5f);
    fx->inv = malloc((size_t)fx->n * (size_t)fx->F * sizeof(int32_t));
    fx->y = malloc((size_t)fx->n * sizeof(int32_t));
    for (int e = 0; e < fx->n; e++) {
        for (int f = 0; f < fx->F; f++)
            fx->inv[e * fx->F + f] = (int32_t)cm_rng_below(&r, (uint64_t)fx->nrows - 1);
        fx->y[e] = e % 2;
    }
    fx->inv[0 * fx->F + 3] = fx->inv[0 * fx->F + 1]; /* One example, two fields, one row. */
    fx->inv[4 * fx->F + 0] = fx->inv[1 * fx->F + 0]; /* Two examples, one row. */
}

static void fixture_free(fixture *fx) {
    wk_ctr_ops.destroy(fx->net);
    free(fx->p);
    free(fx->rows);
    free(fx->inv);
    free(fx->y);
    cm_model_destroy(fx->m);
}

static wk_dev_batch batch_of(const fixture *fx) {
    return (wk_dev_batch){.n = fx->n, .y = fx->y, .inv = fx->inv, .rows = fx->rows,
                          .nrows = fx->nrows};
}

static double mean_loss(const fixture *fx) {
    wk_dev_batch b = batch_of(fx);
    double loss = 0.0;
    assert_int_equal(wk_ctr_ops.evaluate(fx->net, fx->p, &b, &loss, NULL, NULL), CM_OK);
    return loss / fx->n;
}

/* The central difference of the mean loss in one float *x: the step is
 * the one the floats really took, (float)(x + eps) - (float)(x - eps). */
static double central_difference(const fixture *fx, float *x, float eps) {
    const float keep = *x, hi = keep + eps, lo = keep - eps;
    *x = hi;
    double up = mean_loss(fx);
    *x = lo;
    double down = mean_loss(fx);
    *x = keep;
    return (up - down) / ((double)hi - (double)lo);
}

/* Central differences (float forward, loss summed in double) for every
 * dense parameter and every row value. */
static void finite_differences(fixture *fx, float eps, double *fd, double *fd_rows) {
    for (size_t i = 0; i < fx->m->numel; i++) fd[i] = central_difference(fx, &fx->p[i], eps);
    for (int i = 0; i < fx->nrows * fx->D; i++)
        fd_rows[i] = central_difference(fx, &fx->rows[i], eps);
}

/* The worst max_rel over the dense variables, the rows' w column and (D >
 * 1) their v columns; each printed when 'label' is set. */
static double gradient_error(const fixture *fx, const float *g, const float *rg,
                             const double *fd, const double *fd_rows, const char *label) {
    const cm_model *m = fx->m;
    double worst = 0.0;
    for (int v = 0; v < m->nvars; v++) {
        const cm_var *var = &m->vars[v];
        if (var->kind != CM_VAR_DENSE) continue;
        double e = max_rel(g + var->offset, 1, fd + var->offset, 1, var->numel);
        if (label) print_message("%s %-12s max rel error %.2e\n", label, var->name, e);
        if (e > worst) worst = e;
    }
    double ew = max_rel(rg, (size_t)fx->D, fd_rows, (size_t)fx->D, (size_t)fx->nrows);
    if (label) print_message("%s %-12s max rel error %.2e\n", label, "rows[:, 0]", ew);
    if (ew > worst) worst = ew;
    if (fx->D > 1) {
        /* Columns 1..k of every row, as one variable. */
        double err = 0.0, scale = 0.0;
        for (int r = 0; r < fx->nrows; r++)
            for (int j = 1; j < fx->D; j++) {
                size_t i = (size_t)r * (size_t)fx->D + (size_t)j;
                err = fmax(err, fabs((double)rg[i] - fd_rows[i]));
                scale = fmax(scale, fabs(fd_rows[i]));
            }
        double ev = err / scale;
        if (label) print_message("%s %-12s max rel error %.2e\n", label, "rows[:, 1:]", ev);
        if (ev > worst) worst = ev;
    }
    return worst;
}

/* The gradient of the fixture's batch on its device (host-visible). */
static void gradient_of(const fixture *fx, wk_model *net, float *g, float *rg, double *loss) {
    wk_dev_batch b = batch_of(fx);
    assert_int_equal(wk_ctr_ops.gradient(net, fx->p, &b, g, rg, loss, NULL, NULL), CM_OK);
}

/* -------------------------------------------------- broken device ops */

/* Devices whose ops are the CPU's but for one deliberate bug, for the
 * negative controls: the FM term's gradient dropped, or each position's
 * gradient scattered to another position's row (a wrong index map). */
static void fm_backward_dropped(wk_device *d, int n, int F, int k, const float *v,
                                const float *dout, float *dv) {
    (void)v;
    (void)dout;
    d->ops->fill(d, (size_t)n * (size_t)F * (size_t)k, 0.0f, dv);
}

static void (*real_scatter)(wk_device *, int, const int32_t *, const float *, int, int, float *,
                            int, int);

static void scatter_reversed(wk_device *d, int n, const int32_t *idx, const float *src,
                             int src_ld, int ncols, float *rows, int row_dim, int col0) {
    int32_t *rev = malloc((size_t)n * sizeof *rev);
    for (int i = 0; i < n; i++) rev[i] = idx[n - 1 - i];
    real_scatter(d, n, rev, src, src_ld, ncols, rows, row_dim, col0);
    free(rev);
}

/* The fixture's gradient with one broken op. */
static double broken_error(fixture *fx, int which, const double *fd, const double *fd_rows) {
    wk_device_ops ops = *fx->dev->ops;
    if (which == 0) ops.fm_backward = fm_backward_dropped;
    real_scatter = fx->dev->ops->scatter_add_rows;
    if (which == 1) ops.scatter_add_rows = scatter_reversed;
    wk_device bad = {.ops = &ops, .host_visible = 1};
    wk_model *net;
    assert_int_equal(wk_ctr_ops.create(fx->m, &bad, fx->n, &net), CM_OK);
    float *g = malloc(fx->m->numel * sizeof(float));
    float *rg = malloc((size_t)fx->nrows * (size_t)fx->D * sizeof(float));
    gradient_of(fx, net, g, rg, NULL);
    double err = gradient_error(fx, g, rg, fd, fd_rows, NULL);
    wk_ctr_ops.destroy(net);
    free(g);
    free(rg);
    return err;
}

/* ------------------------------------------------------ gradient tests */

static const float FD_EPS = 1e-3f;
static const double FD_TOL = 1e-2;

static void check_against_fd(int deepfm) {
    wk_device *dev = wk_device_cpu_create(0);
    fixture fx;
    fixture_init(&fx, deepfm, dev);
    const size_t nrv = (size_t)fx.nrows * (size_t)fx.D;
    float *g = malloc(fx.m->numel * sizeof(float)), *rg = malloc(nrv * sizeof(float));
    double *fd = malloc(fx.m->numel * sizeof(double)), *fd_rows = malloc(nrv * sizeof(double));
    for (size_t i = 0; i < nrv; i++) rg[i] = NAN; /* Every row must be written. */
    double loss = 0.0;
    gradient_of(&fx, fx.net, g, rg, &loss);
    assert_true(fabs(loss / fx.n - mean_loss(&fx)) < 1e-6);
    for (int j = 0; j < fx.D; j++)
        assert_true(rg[(size_t)(fx.nrows - 1) * (size_t)fx.D + (size_t)j] == 0.0f);
    finite_differences(&fx, FD_EPS, fd, fd_rows);
    double err = gradient_error(&fx, g, rg, fd, fd_rows, deepfm ? "deepfm" : "lr");
    print_message("%s: gradient vs finite differences (eps %.0e): worst max rel error %.2e "
                  "(bound %.0e)\n",
                  deepfm ? "deepfm" : "lr", FD_EPS, err, FD_TOL);
    assert_true(err < FD_TOL);
    if (deepfm) {
        /* The check can fail: the same bound catches a gradient without the
         * FM term, and one scattered through a wrong index map. */
        double no_fm = broken_error(&fx, 0, fd, fd_rows);
        double wrong_idx = broken_error(&fx, 1, fd, fd_rows);
        print_message("negative controls: no FM gradient %.2e, reversed scatter index %.2e "
                      "(both must exceed %.0e)\n",
                      no_fm, wrong_idx, FD_TOL);
        assert_true(no_fm > 10 * FD_TOL);
        assert_true(wrong_idx > 10 * FD_TOL);
    } else {
        double wrong_idx = broken_error(&fx, 1, fd, fd_rows);
        print_message("negative control: reversed scatter index %.2e\n", wrong_idx);
        assert_true(wrong_idx > 10 * FD_TOL);
    }
    free(g);
    free(rg);
    free(fd);
    free(fd_rows);
    fixture_free(&fx);
    wk_device_destroy(dev);
}

static void test_deepfm_gradient_fd(void **state) {
    (void)state;
    check_against_fd(1);
}

static void test_lr_gradient_fd(void **state) {
    (void)state;
    check_against_fd(0);
}

/* wk_ctr.h's definition in double, straight from the flat parameters. */
static double reference_logit(const fixture *fx, int e) {
    const cm_model *m = fx->m;
    const int F = fx->F, k = fx->D - 1;
    const float *row[64];
    for (int f = 0; f < F; f++) row[f] = fx->rows + (size_t)fx->inv[e * F + f] * (size_t)fx->D;
    double z = fx->p[m->vars[cm_model_find(m, k ? "fm/bias" : "lr/bias")].offset];
    for (int f = 0; f < F; f++) z += row[f][0];
    if (k == 0) return z;
    /* FM as the sum over field pairs f < g of <v_f, v_g>. */
    for (int f = 0; f < F; f++)
        for (int g2 = f + 1; g2 < F; g2++)
            for (int j = 1; j <= k; j++) z += (double)row[f][j] * row[g2][j];
    double h[2][64];
    int in = F * k;
    for (int f = 0; f < F; f++)
        for (int j = 0; j < k; j++) h[0][f * k + j] = row[f][1 + j];
    for (int i = 0; i <= m->nsizes; i++) {
        int out = i < m->nsizes ? m->sizes[i] : 1;
        char name[CM_VAR_NAME_MAX];
        snprintf(name, sizeof name, "dnn%d/kernel", i);
        const float *W = fx->p + m->vars[cm_model_find(m, name)].offset;
        snprintf(name, sizeof name, "dnn%d/bias", i);
        const float *bias = fx->p + m->vars[cm_model_find(m, name)].offset;
        for (int o = 0; o < out; o++) {
            double s = bias[o];
            for (int a = 0; a < in; a++) s += h[i & 1][a] * W[a * out + o];
            h[(i + 1) & 1][o] = i < m->nsizes && s < 0.0 ? 0.0 : s;
        }
        in = out;
    }
    return z + h[(m->nsizes + 1) & 1][0];
}

/* The forward pass is the definition: loss and probabilities against the
 * double reference. */
static void test_forward_matches_definition(void **state) {
    (void)state;
    for (int deepfm = 0; deepfm < 2; deepfm++) {
        wk_device *dev = wk_device_cpu_create(0);
        fixture fx;
        fixture_init(&fx, deepfm, dev);
        wk_dev_batch b = batch_of(&fx);
        float probs[6];
        double loss = 0.0, want = 0.0;
        int64_t correct = 0, want_correct = 0;
        assert_int_equal(wk_ctr_ops.evaluate(fx.net, fx.p, &b, &loss, &correct, probs), CM_OK);
        double worst = 0.0;
        for (int e = 0; e < fx.n; e++) {
            double z = reference_logit(&fx, e), p = 1.0 / (1.0 + exp(-z));
            want += fx.y[e] ? -log(p) : -log1p(-p);
            want_correct += (p >= 0.5) == (fx.y[e] != 0);
            worst = fmax(worst, fabs(probs[e] - p));
        }
        print_message("%s forward vs double reference: loss %.8f vs %.8f, probs max abs diff "
                      "%.2e\n",
                      deepfm ? "deepfm" : "lr", loss, want, worst);
        assert_true(fabs(loss - want) < 1e-5 * want);
        assert_true(worst < 1e-6);
        assert_int_equal(correct, want_correct);
        fixture_free(&fx);
        wk_device_destroy(dev);
    }
}

/* The staged device (host_visible 0: everything uploaded and downloaded)
 * computes the plain CPU device's gradient bit for bit. */
static void test_staged_matches_cpu(void **state) {
    (void)state;
    wk_device *cpu = wk_device_cpu_create(0), *st = wk_device_cpu_staged_create(1);
    assert_int_equal(st->host_visible, 0);
    fixture fx;
    fixture_init(&fx, 1, cpu);
    const size_t np = fx.m->numel, nrv = (size_t)fx.nrows * (size_t)fx.D;
    const size_t npos = (size_t)fx.n * (size_t)fx.F;
    float *g = malloc(np * 4), *rg = malloc(nrv * 4), *g2 = malloc(np * 4), *rg2 = malloc(nrv * 4);
    double loss = 0.0, loss2 = 0.0;
    gradient_of(&fx, fx.net, g, rg, &loss);

    wk_model *net;
    assert_int_equal(wk_ctr_ops.create(fx.m, st, fx.n, &net), CM_OK);
    float *dp = wk_device_alloc(st, np * 4), *dg = wk_device_alloc(st, np * 4);
    float *drows = wk_device_alloc(st, nrv * 4), *drg = wk_device_alloc(st, nrv * 4);
    int32_t *dinv = wk_device_alloc(st, npos * 4), *dy = wk_device_alloc(st, (size_t)fx.n * 4);
    st->ops->upload(st, dp, fx.p, np * 4);
    st->ops->upload(st, drows, fx.rows, nrv * 4);
    st->ops->upload(st, dinv, fx.inv, npos * 4);
    st->ops->upload(st, dy, fx.y, (size_t)fx.n * 4);
    wk_dev_batch b = {.n = fx.n, .y = dy, .inv = dinv, .rows = drows, .nrows = fx.nrows};
    int64_t correct = 0;
    assert_int_equal(wk_ctr_ops.gradient(net, dp, &b, dg, drg, &loss2, &correct, NULL), CM_OK);
    st->ops->download(st, g2, dg, np * 4);
    st->ops->download(st, rg2, drg, nrv * 4);
    assert_int_equal(wk_device_sync(st), CM_OK);
    assert_memory_equal(g, g2, np * 4);
    assert_memory_equal(rg, rg2, nrv * 4);
    assert_memory_equal(&loss, &loss2, sizeof loss);
    void *bufs[] = {dp, dg, drows, drg, dinv, dy};
    for (size_t i = 0; i < 6; i++) wk_device_free(st, bufs[i]);
    wk_ctr_ops.destroy(net);
    free(g);
    free(rg);
    free(g2);
    free(rg2);
    fixture_free(&fx);
    wk_device_destroy(cpu);
    wk_device_destroy(st);
}

static void test_rejects(void **state) {
    (void)state;
    wk_device *dev = wk_device_cpu_create(0);
    int sizes[] = {4, 3, 2};
    cm_model *mlp;
    assert_int_equal(cm_model_create_mlp(sizes, 3, &mlp), CM_OK);
    wk_model *net = (wk_model *)1;
    assert_int_equal(wk_ctr_ops.create(mlp, dev, 4, &net), CM_EINVAL);
    assert_null(net);
    cm_model_destroy(mlp);
    fixture fx;
    fixture_init(&fx, 1, dev);
    net = (wk_model *)1;
    assert_int_equal(wk_ctr_ops.create(fx.m, dev, 0, &net), CM_EINVAL);
    assert_null(net);
    float g[512], rg[64];
    wk_dev_batch b = batch_of(&fx);
    b.n = 0;
    assert_int_equal(wk_ctr_ops.gradient(fx.net, fx.p, &b, g, rg, NULL, NULL, NULL), CM_EINVAL);
    b.n = fx.n + 1;
    assert_int_equal(wk_ctr_ops.gradient(fx.net, fx.p, &b, g, rg, NULL, NULL, NULL), CM_EINVAL);
    assert_int_equal(wk_ctr_ops.evaluate(fx.net, fx.p, &b, NULL, NULL, NULL), CM_EINVAL);
    /* flops: 3 GEMMs per DNN layer (15x7, 7x5, 5x1) plus the rank-1 spread. */
    assert_true(wk_ctr_ops.flops(fx.m, 10) == 2.0 * 10 * 5 + 6.0 * 10 * (15 * 7 + 7 * 5 + 5));
    fixture_free(&fx);
    wk_device_destroy(dev);
}

/* ------------------------------------------------------------ the ops */

static void test_fm_ops_match_double(void **state) {
    (void)state;
    /* k = 70 > the CPU's 64-column chunk. */
    const int n = 4, F = 6, k = 70;
    wk_device *dev = wk_device_cpu_create(0);
    cm_rng r;
    cm_rng_init(&r, 21);
    size_t nv = (size_t)n * F * k;
    float *v = malloc(nv * 4), *dv = malloc(nv * 4), out[4], dout[4] = {0.5f, -2.0f, 1.0f, 0.0f};
    for (size_t i = 0; i < nv; i++) v[i] = uni(&r, -1.0f, 1.0f);
    dev->ops->fm_forward(dev, n, F, k, v, out);
    dev->ops->fm_backward(dev, n, F, k, v, dout, dv);
    double worst_f = 0.0, worst_b = 0.0;
    for (int e = 0; e < n; e++) {
        const float *ve = v + (size_t)e * F * k;
        double want = 0.0; /* Sum over field pairs: no cancellation to speak of. */
        for (int f = 0; f < F; f++)
            for (int g2 = f + 1; g2 < F; g2++)
                for (int j = 0; j < k; j++) want += (double)ve[f * k + j] * ve[g2 * k + j];
        worst_f = fmax(worst_f, fabs(out[e] - want) / fabs(want));
        for (int f = 0; f < F; f++)
            for (int j = 0; j < k; j++) {
                double s = 0.0;
                for (int g2 = 0; g2 < F; g2++)
                    if (g2 != f) s += ve[g2 * k + j];
                double w = dout[e] * s;
                worst_b = fmax(worst_b, fabs(dv[(size_t)e * F * k + f * k + j] - w));
            }
    }
    print_message("fm_forward rel error %.2e, fm_backward abs error %.2e\n", worst_f, worst_b);
    assert_true(worst_f < 1e-6);
    assert_true(worst_b < 1e-5);
    free(v);
    free(dv);
    wk_device_destroy(dev);
}

static void test_sigmoid_xent_hand_values(void **state) {
    (void)state;
    wk_device *dev = wk_device_cpu_create(0);
    enum { N = 10 };
    /* Logit, label, loss log1p(e^-|z|) + max(z, 0) - y z, sigmoid(z), and
     * whether (p >= 0.5) == y; values from Python's math module. */
    static const struct {
        float z;
        int32_t y;
        double loss, prob;
        int right;
    } c[N] = {
        {0.0f, 1, 0.69314718055994531, 0.5, 1},
        {2.0f, 1, 0.12692801104297263, 0.88079707797788244, 1},
        {-2.0f, 1, 2.1269280110429727, 0.11920292202211756, 0},
        {100.0f, 0, 100.0, 1.0, 0},
        {-100.0f, 0, 3.7200759760208360e-44, 3.7200759760208360e-44, 1},
        {1e30f, 1, 0.0, 1.0, 1},
        {-1e30f, 1, (double)1e30f, 0.0, 0},
        {20.0f, 0, 20.000000002061154, 0.99999999793884642, 0},
        {FLT_MAX, 0, (double)FLT_MAX, 1.0, 0},
        {-FLT_MAX, 0, 0.0, 0.0, 1},
    };
    float z[N];
    int32_t y[N];
    for (int i = 0; i < N; i++) {
        z[i] = c[i].z;
        y[i] = c[i].y;
    }
    double total = 0.0;
    int64_t total_right = 0;
    for (int i = 0; i < N; i++) {
        float dz, p;
        double l = 0.0;
        int64_t ok = 0;
        dev->ops->sigmoid_xent(dev, 1, &z[i], &y[i], 0.5f, &dz, &p, &l, &ok);
        assert_true(isfinite(l) && isfinite(dz) && isfinite(p));
        assert_true(fabs(l - c[i].loss) <= 1e-15 * c[i].loss);
        assert_true(fabs(p - c[i].prob) <= 1e-7 * c[i].prob + 1e-45);
        assert_true(fabs(dz - 0.5 * ((double)p - y[i])) <= 1e-7);
        assert_int_equal(ok, c[i].right);
        total += c[i].loss;
        total_right += c[i].right;
    }
    /* All at once, dlogits over the logits, no probs, scale 1. */
    float zz[N];
    memcpy(zz, z, sizeof z);
    double l = 1.0;
    int64_t right = 2;
    dev->ops->sigmoid_xent(dev, N, zz, y, 1.0f, zz, NULL, &l, &right);
    assert_true(fabs(l - 1.0 - total) <= 1e-15 * total);
    assert_int_equal(right, 2 + total_right);
    for (int i = 0; i < N; i++) assert_true(fabs(zz[i] - (c[i].prob - y[i])) <= 1e-7);
    /* NULL host targets are allowed. */
    dev->ops->sigmoid_xent(dev, N, z, y, 1.0f, zz, NULL, NULL, NULL);
    wk_device_destroy(dev);
}

/* gather_rows, scatter_add_rows, row_sum and fill against plain loops, with
 * column ranges and strides. */
static void test_row_ops_match_loops(void **state) {
    (void)state;
    wk_device *dev = wk_device_cpu_create(0);
    const wk_device_ops *o = dev->ops;
    enum { NROWS = 6, DIM = 7, N = 13 };
    cm_rng r;
    cm_rng_init(&r, 3);
    float rows[NROWS * DIM];
    int32_t idx[N];
    for (int i = 0; i < NROWS * DIM; i++) rows[i] = uni(&r, -1.0f, 1.0f);
    for (int i = 0; i < N; i++) idx[i] = (int32_t)cm_rng_below(&r, NROWS);
    const int cases[][3] = {{0, 7, 7}, {2, 3, 5}, {6, 1, 1}, {1, 4, 9}, {0, 1, 3}};
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        int col0 = cases[t][0], ncols = cases[t][1], ld = cases[t][2];
        float out[N * 9], want[N * 9];
        for (int i = 0; i < N * 9; i++) out[i] = want[i] = -7.0f; /* Padding stays. */
        for (int i = 0; i < N; i++)
            for (int j = 0; j < ncols; j++) want[i * ld + j] = rows[idx[i] * DIM + col0 + j];
        o->gather_rows(dev, N, idx, rows, DIM, col0, ncols, out, ld);
        assert_memory_equal(out, want, sizeof out);

        float src[N * 9], got[NROWS * DIM], ref[NROWS * DIM];
        for (int i = 0; i < N * 9; i++) src[i] = uni(&r, -1.0f, 1.0f);
        memcpy(got, rows, sizeof rows);
        memcpy(ref, rows, sizeof rows);
        for (int i = 0; i < N; i++) /* In order of i, as the op promises. */
            for (int j = 0; j < ncols; j++) ref[idx[i] * DIM + col0 + j] += src[i * ld + j];
        o->scatter_add_rows(dev, N, idx, src, ld, ncols, got, DIM, col0);
        assert_memory_equal(got, ref, sizeof got);

        float sums[N], want_sums[N];
        for (int i = 0; i < N; i++) {
            want_sums[i] = 0.0f;
            for (int j = 0; j < ncols; j++) want_sums[i] += src[i * ld + j];
        }
        o->row_sum(dev, N, ncols, src, ld, sums);
        assert_memory_equal(sums, want_sums, sizeof sums);
    }
    float f[5] = {1, 2, 3, 4, 5};
    o->fill(dev, 4, -0.5f, f);
    for (int i = 0; i < 4; i++) assert_true(f[i] == -0.5f);
    assert_true(f[4] == 5.0f);
    wk_device_destroy(dev);
}

/* ------------------------------------------------------------ learning */

/* SGD on a planted dataset: labels from a known FM logit (first order plus
 * pairwise factors) over 4 fields of 8 ids each. The batch carries every
 * row (32), so rows not read get a zero gradient and plain SGD updates all. */
static void test_deepfm_learns_planted_fm(void **state) {
    (void)state;
    enum { F = 4, V = 8, K = 3, N = 256, STEPS = 300 };
    cm_ctr_spec sp = {.nfields = F, .emb_dim = K, .nhidden = 1, .hidden = {8},
                      .emb_init_scale = 0.1f};
    cm_model *m;
    assert_int_equal(cm_model_create_deepfm(&sp, &m), CM_OK);
    const int D = K + 1, nrows = F * V;
    cm_rng r;
    cm_rng_init(&r, 77);
    float truth[F * V][K + 1];
    for (int i = 0; i < nrows; i++)
        for (int j = 0; j < D; j++) truth[i][j] = uni(&r, -1.0f, 1.0f);
    int32_t *inv = malloc(N * F * sizeof *inv), *y = malloc(N * sizeof *y);
    int positives = 0;
    for (int e = 0; e < N; e++) {
        double z = 0.0, s[K] = {0}, q[K] = {0};
        for (int f = 0; f < F; f++) {
            int row = f * V + (int)cm_rng_below(&r, V);
            inv[e * F + f] = row;
            z += truth[row][0];
            for (int j = 0; j < K; j++) {
                s[j] += truth[row][1 + j];
                q[j] += (double)truth[row][1 + j] * truth[row][1 + j];
            }
        }
        for (int j = 0; j < K; j++) z += 0.5 * (s[j] * s[j] - q[j]);
        y[e] = z > 0.0;
        positives += y[e];
    }
    assert_true(positives > N / 5 && positives < 4 * N / 5);

    wk_device *dev = wk_device_cpu_create(0);
    wk_model *net;
    assert_int_equal(wk_ctr_ops.create(m, dev, N, &net), CM_OK);
    float *p = malloc(m->numel * 4), *g = malloc(m->numel * 4);
    float *rows = malloc((size_t)nrows * D * 4), *rg = malloc((size_t)nrows * D * 4);
    cm_model_init(m, 3, p);
    for (int f = 0; f < F; f++)
        for (int id = 0; id < V; id++)
            cm_row_init(&m->vars[m->table_var[f]], 3, (uint64_t)id, rows + (f * V + id) * D);
    wk_dev_batch b = {.n = N, .y = y, .inv = inv, .rows = rows, .nrows = nrows};
    double first = 0.0, last = 0.0;
    int64_t correct = 0;
    const float lr = 0.5f;
    for (int step = 0; step < STEPS; step++) {
        double loss = 0.0;
        correct = 0;
        assert_int_equal(wk_ctr_ops.gradient(net, p, &b, g, rg, &loss, &correct, NULL), CM_OK);
        if (step == 0) first = loss / N;
        last = loss / N;
        for (size_t i = 0; i < m->numel; i++) p[i] -= lr * g[i];
        for (int i = 0; i < nrows * D; i++) rows[i] -= lr * rg[i];
    }
    print_message("planted FM: mean loss %.4f -> %.4f after %d steps, %lld of %d right\n", first,
                  last, STEPS, (long long)correct, N);
    assert_true(last < 0.5 * first);
    assert_true(correct > 0.9 * N);
    wk_ctr_ops.destroy(net);
    free(p);
    free(g);
    free(rows);
    free(rg);
    free(inv);
    free(y);
    wk_device_destroy(dev);
    cm_model_destroy(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deepfm_gradient_fd),
        cmocka_unit_test(test_lr_gradient_fd),
        cmocka_unit_test(test_forward_matches_definition),
        cmocka_unit_test(test_staged_matches_cpu),
        cmocka_unit_test(test_rejects),
        cmocka_unit_test(test_fm_ops_match_double),
        cmocka_unit_test(test_sigmoid_xent_hand_values),
        cmocka_unit_test(test_row_ops_match_loops),
        cmocka_unit_test(test_deepfm_learns_planted_fm),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
