/* pst_loop.c - the public client API's step loop (pstrain/pstrain.h), timed:
 * the C side of bench/pyclient.py, which runs the same loop from Python.
 *
 *   pst_loop --ps-hosts H:P --floats N --steps S [--warmup W]
 *
 * One worker (the chief) initialises the shards, then pushes a gradient of
 * N floats and gets the parameters back (pst_step) W times untimed and S
 * times timed, and shuts the shards down. Prints one JSON line: seconds per
 * step and GB/s counting the bytes pushed and pulled (2 x 4N per step).
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "pstrain/pstrain.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    static const struct option lo[] = {{"ps-hosts", 1, 0, 'p'}, {"floats", 1, 0, 'n'},
                                       {"steps", 1, 0, 's'},    {"warmup", 1, 0, 'w'},
                                       {0, 0, 0, 0}};
    const char *hosts = NULL;
    long long n = 4 << 20, steps = 30, warm = 3;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'p': hosts = optarg; break;
        case 'n': n = atoll(optarg); break;
        case 's': steps = atoll(optarg); break;
        case 'w': warm = atoll(optarg); break;
        default: fprintf(stderr, "usage: pst_loop --ps-hosts H:P --floats N --steps S\n"); return 2;
        }
    }
    if (!hosts || n < 1 || steps < 1 || warm < 0) {
        fprintf(stderr, "usage: pst_loop --ps-hosts H:P --floats N --steps S\n");
        return 2;
    }
    pst_var v = {"v", (size_t)n};
    pst_options o;
    pst_options_default(&o);
    o.ps_hosts = hosts;
    o.num_workers = 1;
    o.vars = &v;
    o.nvars = 1;
    char err[512];
    pst_client *ps;
    if (pst_client_create(&o, &ps, err, sizeof err) || pst_init(ps, NULL, err, sizeof err)) {
        fprintf(stderr, "pst_loop: %s\n", err);
        return 1;
    }
    float *g = calloc((size_t)n, sizeof *g), *p = calloc((size_t)n, sizeof *p);
    double t0 = 0;
    for (long long t = 0; t < warm + steps; t++) {
        if (t == warm) t0 = now();
        if (pst_step(ps, t, g, p, err, sizeof err)) {
            fprintf(stderr, "pst_loop: %s\n", err);
            return 1;
        }
    }
    double sec = (now() - t0) / (double)steps;
    printf("{\"bench\":\"pst_loop\",\"impl\":\"c\",\"floats\":%lld,\"steps\":%lld,"
           "\"step_s\":%.6f,\"gbs\":%.4f}\n",
           n, steps, sec, 2.0 * 4.0 * (double)n / sec / 1e9);
    pst_shutdown(ps, 0, err, sizeof err);
    pst_client_destroy(ps);
    free(g);
    free(p);
    return 0;
}
