/* train_local.c - local-mode training throughput and its GEMM efficiency.
 * SPDX-License-Identifier: MIT
 *
 * For batch sizes 64, 128 and 256 it runs the real trainer (prefetch,
 * replicas, optimizer) for a fixed number of steps and reports examples/s,
 * then the GEMM FLOP/s the step achieves as a share of OpenBLAS's own sgemm
 * rate measured in the same run, two ways: a large square sgemm (the
 * machine's BLAS peak) and the step's exact GEMM shapes called back to back
 * (what the step could reach if it did nothing but its GEMMs).
 * Output: one JSON object per line. Medians of --repeats runs.
 */
#include <cblas.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "worker/device/wk_device.h"
#include "worker/model/wk_mlp.h"
#include "worker/wk_trainer.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void fill(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
}

/* GFLOP/s of a square sgemm of size s (best of a few calls). */
static double sgemm_square(int s) {
    size_t n = (size_t)s * (size_t)s;
    float *a = cm_alloc_aligned(n * 4), *b = cm_alloc_aligned(n * 4), *c = cm_alloc_aligned(n * 4);
    fill(a, n);
    fill(b, n);
    double best = 1e30;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = cm_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, s, s, s, 1.0f, a, s, b, s, 0.0f,
                    c, s);
        double t = cm_now() - t0;
        if (t < best) best = t;
    }
    free(a);
    free(b);
    free(c);
    return 2.0 * s * s * (double)s / best * 1e-9;
}

/* GFLOP/s of the GEMMs of one MLP step at batch B, called back to back. */
static double sgemm_step_shapes(const cm_model *m, int B, int iters) {
    int widest = 0;
    for (int i = 0; i < m->nsizes; i++)
        if (m->sizes[i] > widest) widest = m->sizes[i];
    size_t big = (size_t)widest * (size_t)(widest > B ? widest : B);
    float *x = cm_alloc_aligned(big * 4), *w = cm_alloc_aligned(big * 4),
          *y = cm_alloc_aligned(big * 4);
    fill(x, big);
    fill(w, big);
    double t0 = 0.0;
    for (int it = -2; it < iters; it++) {
        if (it == 0) t0 = cm_now();
        for (int i = 0; i + 1 < m->nsizes; i++) {
            int in = m->sizes[i], out = m->sizes[i + 1];
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, B, out, in, 1.0f, x, in, w,
                        out, 0.0f, y, out);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, in, out, B, 1.0f, x, in, y, out,
                        0.0f, w, out);
            if (i > 0)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, B, in, out, 1.0f, y, out, w,
                            out, 0.0f, x, in);
        }
    }
    double t = cm_now() - t0;
    free(x);
    free(w);
    free(y);
    return wk_mlp_gemm_flops(m, B) * iters / t * 1e-9;
}

int main(int argc, char **argv) {
    int steps = 1000, repeats = 3, threads = 0;
    const char *data_dir = NULL;
    static const struct option opts[] = {{"steps", required_argument, 0, 's'},
                                         {"repeats", required_argument, 0, 'r'},
                                         {"threads", required_argument, 0, 't'},
                                         {"data-dir", required_argument, 0, 'd'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 's': steps = atoi(optarg); break;
        case 'r': repeats = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'd': data_dir = optarg; break;
        default:
            fprintf(c == 'h' ? stdout : stderr,
                    "usage: train_local [--steps N] [--repeats R] [--threads T] [--data-dir D]\n"
                    "Local-mode examples/s at batch 64/128/256 and GEMM efficiency as JSON "
                    "lines.\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (steps < 10 || repeats < 1 || repeats > 15) {
        fprintf(stderr, "train_local: need --steps >= 10 and 1 <= --repeats <= 15\n");
        return 2;
    }
    if (threads < 1) threads = (int)sysconf(_SC_NPROCESSORS_ONLN);
    cm_log_set_level(CM_LOG_WARN);
    wk_device_cpu_set_threads(threads);
    const int batches[] = {64, 128, 256};
    double peak = sgemm_square(1024);
    printf("{\"bench\":\"sgemm_peak\",\"size\":1024,\"threads\":%d,\"gflops\":%.2f}\n", threads,
           peak);
    fflush(stdout);
    for (int bi = 0; bi < 3; bi++) {
        int B = batches[bi];
        wk_train_cfg cfg;
        wk_train_cfg_defaults(&cfg);
        cfg.batch_size = B;
        cfg.threads = threads;
        cfg.data_dir = data_dir;
        cfg.max_steps = steps;
        cfg.test_limit = 1000;
        cfg.progress_every = -1.0;
        cfg.epochs = 1000;
        double eps[15], step_ms[15];
        for (int r = 0; r < repeats; r++) {
            wk_train_result res;
            int status = wk_train_run(&cfg, &res);
            if (status != CM_OK) {
                fprintf(stderr, "train_local: training failed: %s\n", cm_strerror(status));
                return 1;
            }
            eps[r] = res.steady_examples_per_sec;
            step_ms[r] = (double)B / res.steady_examples_per_sec * 1e3;
        }
        wk_device_cpu_set_threads(threads);
        cm_model *m;
        cm_model_create_mlp(cfg.sizes, cfg.nsizes, &m);
        double ex_s = median(eps, repeats), ms = median(step_ms, repeats);
        double step_gflops = wk_mlp_gemm_flops(m, B) / (ms * 1e-3) * 1e-9;
        double shapes = sgemm_step_shapes(m, B, 200);
        printf("{\"bench\":\"train_local\",\"model\":\"mlp-784-256-128-10\",\"batch\":%d,"
               "\"threads\":%d,\"steps\":%d,\"repeats\":%d,\"examples_per_sec\":%.0f,"
               "\"step_ms\":%.4f,\"step_gemm_gflops\":%.2f,\"sgemm_peak_gflops\":%.2f,"
               "\"share_of_sgemm_peak\":%.3f,\"sgemm_same_shapes_gflops\":%.2f,"
               "\"share_of_same_shapes\":%.3f}\n",
               B, threads, steps, repeats, ex_s, ms, step_gflops, peak, step_gflops / peak,
               shapes, step_gflops / shapes);
        fflush(stdout);
        cm_model_destroy(m);
    }
    return 0;
}
