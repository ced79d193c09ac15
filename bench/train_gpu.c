/* train_gpu.c - training throughput on the GPU against the CPU path, fp32
 * against bf16, and the step's GEMM rate against cuBLAS's own.
 * SPDX-License-Identifier: MIT
 *
 * The model is the MLP 784-256-128-10 on synthetic data (wk_synth.h), so
 * the GPU machine needs no data files. For each batch size and each device
 * (cpu; cuda fp32; cuda bf16) it times two loops:
 *  - step: pstrain's local-mode step on that device: upload parameters and
 *    batch, forward + backward, download the gradient, Adam on the host;
 *  - compute: forward + backward only, parameters and batch resident.
 * It then times the step's exact GEMM shapes back to back through the same
 * device's gemm op (cuBLAS with nothing around it; bf16 includes the
 * operand conversion) and a 4096^3 GEMM (the card's rate), and reports the
 * step's GEMM FLOP/s as a share of both. Output: one JSON object per line.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_optim.h"
#include "worker/device/wk_device_cuda.h"
#include "worker/model/wk_mlp.h"
#include "worker/model/wk_synth.h"

enum { POOL = 8192 };

typedef struct bench {
    wk_device *dev;
    const cm_model *m;
    int batch;
    float *hparams, *hgrad, *slots; /* host (pinned for CUDA) */
    float *dparams, *dgrad, *dx;    /* device (= host ones on the CPU) */
    int32_t *dy;
    const float *x_pool;
    const int32_t *y_pool;
    wk_mlp *net;
} bench;

static void bench_free(bench *b) {
    wk_mlp_destroy(b->net);
    if (!b->dev->host_visible) {
        wk_device_free(b->dev, b->dparams);
        wk_device_free(b->dev, b->dgrad);
        wk_device_free(b->dev, b->dx);
        wk_device_free(b->dev, b->dy);
    }
    wk_cuda_host_free(b->hparams);
    wk_cuda_host_free(b->hgrad);
    free(b->slots);
}

static int bench_init(bench *b, wk_device *dev, const cm_model *m, int batch, const float *x,
                      const int32_t *y) {
    memset(b, 0, sizeof *b);
    b->dev = dev;
    b->m = m;
    b->batch = batch;
    b->x_pool = x;
    b->y_pool = y;
    size_t pbytes = m->numel * 4;
    b->hparams = wk_cuda_host_alloc(pbytes);
    b->hgrad = wk_cuda_host_alloc(pbytes);
    b->slots = cm_calloc(2 * m->numel, 4);
    if (!b->hparams || !b->hgrad) return CM_ENOMEM;
    cm_model_init(m, 1, b->hparams);
    if (dev->host_visible) {
        b->dparams = b->hparams;
        b->dgrad = b->hgrad;
    } else {
        b->dparams = wk_device_alloc(dev, pbytes);
        b->dgrad = wk_device_alloc(dev, pbytes);
        b->dx = wk_device_alloc(dev, (size_t)batch * 784 * 4);
        b->dy = wk_device_alloc(dev, (size_t)batch * 4);
        if (!b->dparams || !b->dgrad || !b->dx || !b->dy) return CM_ENOMEM;
        dev->ops->upload(dev, b->dparams, b->hparams, pbytes);
    }
    return wk_mlp_create(m, dev, batch, &b->net);
}

/* One step; full = 1: pstrain's local step, 0: compute only. */
static int bench_step(bench *b, int s, int full, const ps_optim_cfg *opt) {
    wk_device *d = b->dev;
    size_t at = (size_t)s * (size_t)b->batch % (POOL - (size_t)b->batch + 1);
    const float *x = b->x_pool + at * 784;
    const int32_t *y = b->y_pool + at;
    size_t pbytes = b->m->numel * 4;
    if (!d->host_visible) {
        if (full || s == 0) {
            d->ops->upload(d, b->dx, x, (size_t)b->batch * 784 * 4);
            d->ops->upload(d, b->dy, y, (size_t)b->batch * 4);
        }
        if (full) d->ops->upload(d, b->dparams, b->hparams, pbytes);
        x = b->dx;
        y = b->dy;
    }
    double loss = 0.0;
    int st = wk_mlp_gradient(b->net, b->dparams, x, y, b->batch, b->dgrad, &loss, NULL, NULL);
    if (st != CM_OK || !full) return st;
    if (!d->host_visible) {
        d->ops->download(d, b->hgrad, b->dgrad, pbytes);
        if ((st = wk_device_sync(d)) != CM_OK) return st;
    }
    ps_optim_apply(opt, s + 1, b->hparams, b->hgrad, b->slots, b->m->numel);
    return CM_OK;
}

/* Seconds per step over 'steps' after a few warm-up steps. */
static int time_steps(bench *b, int steps, int full, double *sec) {
    ps_optim_cfg opt = ps_optim_defaults(PS_OPTIM_ADAM, 1e-3f);
    int st = CM_OK;
    for (int s = 0; s < 3 && st == CM_OK; s++) st = bench_step(b, s, full, &opt);
    st = st == CM_OK ? wk_device_sync(b->dev) : st;
    double t0 = cm_now();
    for (int s = 0; s < steps && st == CM_OK; s++) st = bench_step(b, s, full, &opt);
    st = st == CM_OK ? wk_device_sync(b->dev) : st;
    *sec = (cm_now() - t0) / steps;
    return st;
}

/* GFLOP/s of the step's GEMM shapes at batch B through dev's gemm op. */
static int gemm_shapes_rate(wk_device *dev, const cm_model *m, int B, int iters,
                            double *gflops) {
    size_t big = 784 * (size_t)(B > 784 ? B : 784);
    float *x = wk_device_alloc(dev, big * 4), *w = wk_device_alloc(dev, big * 4),
          *y = wk_device_alloc(dev, big * 4);
    int st = x && w && y ? CM_OK : CM_ENOMEM;
    double t0 = 0.0;
    if (st == CM_OK) {
        float *h = cm_calloc(big, 4);
        for (size_t i = 0; i < big; i++) h[i] = (float)(i % 97) * 0.01f - 0.4f;
        dev->ops->upload(dev, x, h, big * 4);
        dev->ops->upload(dev, w, h, big * 4);
        dev->ops->upload(dev, y, h, big * 4);
        st = wk_device_sync(dev);
        free(h);
    }
    for (int it = -2; it < iters && st == CM_OK; it++) {
        if (it == 0) {
            st = wk_device_sync(dev);
            t0 = cm_now();
        }
        for (int i = 0; i + 1 < m->nsizes; i++) {
            int in = m->sizes[i], out = m->sizes[i + 1];
            dev->ops->gemm(dev, 0, 0, B, out, in, 1.0f, x, in, w, out, 0.0f, y, out);
            dev->ops->gemm(dev, 1, 0, in, out, B, 1.0f, x, in, y, out, 0.0f, w, out);
            if (i > 0) dev->ops->gemm(dev, 0, 1, B, in, out, 1.0f, y, out, w, out, 0.0f, x, in);
        }
    }
    if (st == CM_OK) st = wk_device_sync(dev);
    *gflops = wk_mlp_gemm_flops(m, B) * iters / (cm_now() - t0) * 1e-9;
    wk_device_free(dev, x);
    wk_device_free(dev, w);
    wk_device_free(dev, y);
    return st;
}

/* GFLOP/s of one s x s x s GEMM through dev (best of 'reps'). */
static int gemm_square_rate(wk_device *dev, int s, int reps, double *gflops) {
    size_t n = (size_t)s * (size_t)s;
    float *a = wk_device_alloc(dev, n * 4), *b = wk_device_alloc(dev, n * 4),
          *c = wk_device_alloc(dev, n * 4);
    int st = a && b && c ? CM_OK : CM_ENOMEM;
    if (st == CM_OK) {
        float *h = cm_calloc(n, 4);
        for (size_t i = 0; i < n; i++) h[i] = (float)(i % 89) * 0.01f - 0.4f;
        dev->ops->upload(dev, a, h, n * 4);
        dev->ops->upload(dev, b, h, n * 4);
        st = wk_device_sync(dev);
        free(h);
    }
    double best = 1e30;
    for (int r = 0; r < reps + 1 && st == CM_OK; r++) {
        double t0 = cm_now();
        dev->ops->gemm(dev, 0, 0, s, s, s, 1.0f, a, s, b, s, 0.0f, c, s);
        st = wk_device_sync(dev);
        double t = cm_now() - t0;
        if (r > 0 && t < best) best = t; /* the first call warms up */
    }
    *gflops = 2.0 * (double)s * s * s / best * 1e-9;
    wk_device_free(dev, a);
    wk_device_free(dev, b);
    wk_device_free(dev, c);
    return st;
}

static int run_one(wk_device *dev, const char *devname, const char *prec, const cm_model *m,
                   int B, int steps, const float *x, const int32_t *y, double square_gflops) {
    bench b;
    double step_s = 0, comp_s = 0, shapes = 0;
    int st = bench_init(&b, dev, m, B, x, y);
    if (st == CM_OK) st = time_steps(&b, steps, 1, &step_s);
    if (st == CM_OK) st = time_steps(&b, steps, 0, &comp_s);
    bench_free(&b);
    if (st == CM_OK) st = gemm_shapes_rate(dev, m, B, steps, &shapes);
    if (st != CM_OK) {
        printf("{\"bench\":\"train_gpu\",\"device\":\"%s\",\"precision\":\"%s\",\"batch\":%d,"
               "\"error\":\"%s\"}\n",
               devname, prec, B, cm_strerror(st));
        return st;
    }
    double step_gflops = wk_mlp_gemm_flops(m, B) / comp_s * 1e-9;
    printf("{\"bench\":\"train_gpu\",\"model\":\"mlp-784-256-128-10\",\"device\":\"%s\","
           "\"precision\":\"%s\",\"batch\":%d,\"steps\":%d,\"examples_per_sec\":%.0f,"
           "\"step_ms\":%.4f,\"compute_examples_per_sec\":%.0f,\"compute_ms\":%.4f,"
           "\"step_gemm_gflops\":%.2f,\"same_shapes_gflops\":%.2f,\"share_of_same_shapes\":%.3f,"
           "\"square_gflops\":%.2f,\"share_of_square\":%.3f}\n",
           devname, prec, B, steps, B / step_s, step_s * 1e3, B / comp_s, comp_s * 1e3,
           step_gflops, shapes, step_gflops / shapes, square_gflops,
           square_gflops > 0 ? step_gflops / square_gflops : 0.0);
    fflush(stdout);
    return CM_OK;
}

int main(int argc, char **argv) {
    int steps = 200, cpu_steps = 20, square = 4096;
    char batches_arg[128] = "128,512,2048";
    static const struct option opts[] = {{"steps", required_argument, 0, 's'},
                                         {"cpu-steps", required_argument, 0, 'c'},
                                         {"batches", required_argument, 0, 'b'},
                                         {"square", required_argument, 0, 'q'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 's': steps = atoi(optarg); break;
        case 'c': cpu_steps = atoi(optarg); break;
        case 'b': snprintf(batches_arg, sizeof batches_arg, "%s", optarg); break;
        case 'q': square = atoi(optarg); break;
        default:
            fprintf(c == 'h' ? stdout : stderr,
                    "usage: train_gpu [--steps N] [--cpu-steps N] [--batches B,B,...] "
                    "[--square S]\nGPU vs CPU training throughput, fp32 vs bf16, GEMM share of "
                    "cuBLAS, as JSON lines (0 CPU steps: skip the CPU path).\n");
            return c == 'h' ? 0 : 2;
        }
    }
    int batches[8], nb = 1;
    if (strchr(batches_arg, ','))
        nb = cm_parse_sizes(batches_arg, batches, 8);
    else
        batches[0] = atoi(batches_arg);
    if (nb >= 1 && batches[0] < 1) nb = 0;
    if (steps < 1 || cpu_steps < 0 || nb < 1 || square < 64) {
        fprintf(stderr, "train_gpu: bad arguments (see --help)\n");
        return 2;
    }
    cm_log_set_level(CM_LOG_WARN);
    const int sizes[] = {784, 256, 128, 10};
    cm_model *m = NULL;
    cm_model_create_mlp(sizes, 4, &m);
    float *x = wk_cuda_host_alloc((size_t)POOL * 784 * 4);
    int32_t *y = wk_cuda_host_alloc((size_t)POOL * 4);
    if (!x || !y) return 1;
    wk_synth_fill(1, 784, 10, 0, POOL, x, y);
    char why[512], name[256] = "";
    size_t mem = 0;
    int ngpu = wk_device_cuda_count(why, sizeof why);
    if (ngpu > 0) wk_device_cuda_describe(0, name, sizeof name, &mem);
    printf("{\"bench\":\"train_gpu_info\",\"gpus\":%d,\"gpu\":\"%s\",\"gpu_mem_gib\":%.1f,"
           "\"cpu_gemm\":\"%s\",\"cpu_threads\":%d%s%s%s}\n",
           ngpu, name, (double)mem / (1 << 30), wk_device_cpu_gemm_name(),
           wk_device_cpu_threads(), ngpu ? "" : ",\"no_gpu\":\"", ngpu ? "" : why,
           ngpu ? "" : "\"");
    fflush(stdout);
    int failed = 0;
    const char *req = getenv("PS_REQUIRE_GPU");
    if (ngpu == 0 && req && req[0] == '1') {
        /* On a machine that is there to measure the GPU, none is a failure. */
        fprintf(stderr, "train_gpu: PS_REQUIRE_GPU=1 but no usable GPU: %s\n", why);
        failed = 1;
    }
    for (int p = 0; p < 2 && ngpu > 0; p++) {
        wk_device *gpu = NULL;
        if (wk_device_cuda_create(0, p, &gpu) != CM_OK) {
            failed = 1;
            continue;
        }
        double sq = 0;
        if (gemm_square_rate(gpu, square, 5, &sq) != CM_OK) failed = 1;
        printf("{\"bench\":\"gemm_square\",\"device\":\"cuda\",\"precision\":\"%s\",\"size\":%d,"
               "\"gflops\":%.1f}\n",
               wk_precision_name(p), square, sq);
        for (int i = 0; i < nb; i++)
            failed |= run_one(gpu, "cuda", wk_precision_name(p), m, batches[i], steps, x, y,
                              sq) != CM_OK;
        wk_device_destroy(gpu);
    }
    if (cpu_steps > 0) {
        wk_device *cpu = wk_device_cpu_create(0);
        for (int i = 0; i < nb; i++)
            failed |= run_one(cpu, "cpu", "fp32", m, batches[i], cpu_steps, x, y, 0.0) != CM_OK;
        wk_device_destroy(cpu);
    }
    wk_cuda_host_free(x);
    wk_cuda_host_free(y);
    cm_model_destroy(m);
    return failed;
}
