/* train_loop.c - your own training loop on the parameter servers, through
 * the client library only (pstrain/pstrain.h). Build it against an install:
 *
 *     cc train_loop.c $(pkg-config --cflags --libs pstrain) -lm -o train_loop
 *
 * The model is a linear regression y = x . w + b of DIM inputs, which any
 * framework could compute; here it is a few lines of C. Each worker draws
 * its own examples of one planted (w*, b*) and trains on them: every step
 * it computes the gradient of the mean squared error on a batch, pushes it,
 * and gets the averaged step's parameters back. The chief (rank 0)
 * initialises the shards first and shuts them down at the end.
 *
 *     psserver --ps-hosts 127.0.0.1:5000 --worker-hosts 127.0.0.1:5001,127.0.0.1:5002 \
 *              --task-index 0 &
 *     ./train_loop --ps-hosts 127.0.0.1:5000 --rank 1 --workers 2 &
 *     ./train_loop --ps-hosts 127.0.0.1:5000 --rank 0 --workers 2
 *
 * Exit status 0 when the loss fell below a hundredth of its start.
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pstrain/pstrain.h>

#define DIM 32
#define BATCH 64

/* A small deterministic generator (xorshift64*), uniform in [-1, 1). */
static double uniform(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return (double)((*s * 2685821657736338717ull) >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

/* The planted model every worker's examples come from. */
static double planted(int i) { return i == DIM ? 0.5 : sin(1.0 + i); }

/* Mean squared error of params (w[0..DIM), then b) on one batch, and its
 * gradient into grad. */
static double batch_loss(const float *params, float *grad, uint64_t *rng) {
    double loss = 0.0;
    memset(grad, 0, (DIM + 1) * sizeof *grad);
    for (int e = 0; e < BATCH; e++) {
        double x[DIM], y = planted(DIM), pred = params[DIM];
        for (int i = 0; i < DIM; i++) {
            x[i] = uniform(rng);
            y += planted(i) * x[i];
            pred += params[i] * x[i];
        }
        double d = pred - y;
        loss += d * d / BATCH;
        for (int i = 0; i < DIM; i++) grad[i] += (float)(2.0 * d * x[i] / BATCH);
        grad[DIM] += (float)(2.0 * d / BATCH);
    }
    return loss;
}

static void die(const char *what, const char *err) {
    fprintf(stderr, "train_loop: %s: %s\n", what, err);
    exit(1);
}

int main(int argc, char **argv) {
    static const struct option lo[] = {{"ps-hosts", 1, 0, 'p'},   {"rank", 1, 0, 'r'},
                                       {"workers", 1, 0, 'w'},    {"steps", 1, 0, 's'},
                                       {"token-file", 1, 0, 't'}, {"admin-token-file", 1, 0, 'a'},
                                       {0, 0, 0, 0}};
    pst_options o;
    pst_options_default(&o);
    o.num_workers = 1;
    o.lr = 0.05f;
    long steps = 300;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'p': o.ps_hosts = optarg; break;
        case 'r': o.rank = atoi(optarg); break;
        case 'w': o.num_workers = atoi(optarg); break;
        case 's': steps = atol(optarg); break;
        case 't': o.auth_token_file = optarg; break;
        case 'a': o.admin_token_file = optarg; break;
        default:
            fprintf(stderr, "usage: train_loop --ps-hosts H:P[,H:P...] [--rank R] [--workers W] "
                            "[--steps N] [--token-file F] [--admin-token-file F]\n");
            return 2;
        }
    }
    pst_var vars[] = {{"linear/w", DIM}, {"linear/b", 1}};
    o.vars = vars;
    o.nvars = 2;
    char err[512];
    pst_client *ps;
    if (pst_client_create(&o, &ps, err, sizeof err) != 0) die("connect", err);
    size_t n = pst_numel(ps);
    float *params = calloc(n, sizeof *params), *grad = calloc(n, sizeof *grad);
    if (o.rank == 0 && pst_init(ps, NULL, err, sizeof err) != 0) die("initialise", err);
    if (pst_pull(ps, 0, params, NULL, err, sizeof err) != 0) die("pull", err);
    uint64_t rng = 0x9e3779b97f4a7c15ull ^ (uint64_t)(o.rank + 1) * 0xbf58476d1ce4e5b9ull;
    double first = 0.0, last = 0.0;
    for (long t = 0; t < steps; t++) {
        last = batch_loss(params, grad, &rng);
        if (t == 0) first = last;
        if (pst_step(ps, t, grad, params, err, sizeof err) != 0) die("step", err);
        if (t % 50 == 0 || t == steps - 1)
            printf("rank %d step %ld loss %.6f\n", o.rank, t, last);
    }
    printf("rank %d: loss %.6f after %ld steps (from %.6f)\n", o.rank, last, steps, first);
    if (o.rank == 0 && pst_shutdown(ps, 0, err, sizeof err) != 0) die("shutdown", err);
    pst_client_destroy(ps);
    free(params);
    free(grad);
    return last < first / 100.0 ? 0 : 1;
}
