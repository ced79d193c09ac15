/* allreduce_common.h - what bench/allreduce.c (wk_ring) and
 * bench/allreduce_mpi.c (Open MPI's MPI_Allreduce) share, so both measure
 * and report the same way: sizes, iteration counts, the check of the
 * result, medians, and the JSON line.
 * SPDX-License-Identifier: MIT
 *
 * Header-only (static functions): the MPI reference is built by mpicc
 * outside CMake and links nothing of the project.
 */
#ifndef BENCH_ALLREDUCE_COMMON_H
#define BENCH_ALLREDUCE_COMMON_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define AR_MAX_SIZES 16
#define AR_MAX_REPEATS 15

/* Default sizes: 4 KiB ... 64 MiB of float32, powers of 4. */
static const char *const ar_default_sizes = "4K,16K,64K,256K,1M,4M,16M,64M";

/* Parse "4K,1M,..." (bytes, K/M suffixes, multiples of 4) into sizes;
 * returns the count, or -1 on a bad list. */
static int ar_parse_sizes(const char *list, size_t *sizes) {
    int n = 0;
    const char *p = list;
    while (*p && n < AR_MAX_SIZES) {
        char *end;
        unsigned long long v = strtoull(p, &end, 10);
        if (*end == 'K') v <<= 10, end++;
        else if (*end == 'M') v <<= 20, end++;
        if (end == p || v == 0 || v % 4 || (*end && *end != ',')) return -1;
        sizes[n++] = (size_t)v;
        p = *end ? end + 1 : end;
    }
    return *p ? -1 : n;
}

/* Timed iterations per window: about 64 MiB of payload, 5 to 2000. */
static int ar_iters(size_t bytes) {
    size_t it = ((size_t)64 << 20) / bytes;
    return it < 5 ? 5 : it > 2000 ? 2000 : (int)it;
}

static int ar_warmup(int iters) { return iters / 10 > 2 ? iters / 10 : 2; }

/* Input for the check: small integers, so any summation order is exact. */
static float ar_check_input(int rank, size_t i) { return (float)((rank + 1) * (int)(i % 5)); }

static float ar_check_want(int nranks, size_t i) {
    return (float)(nranks * (nranks + 1) / 2 * (int)(i % 5));
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double ar_median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* One JSON line: t is the median over windows of the slowest rank's
 * seconds per operation. extra: more fields, starting with a comma. */
static void ar_print(const char *impl, const char *transport, int nranks, size_t bytes,
                     int iters, int repeats, double t, int check_ok, const char *extra) {
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    double alg = (double)bytes / t / 1e9;
    printf("{\"bench\":\"allreduce\",\"impl\":\"%s\",\"transport\":\"%s\",\"n\":%d,"
           "\"bytes\":%zu,\"iters\":%d,\"repeats\":%d,\"time_us\":%.3f,\"algbw_gbs\":%.4f,"
           "\"busbw_gbs\":%.4f,\"cores\":%ld,\"oversubscribed\":%s,\"check\":\"%s\"%s}\n",
           impl, transport, nranks, bytes, iters, repeats, t * 1e6, alg,
           alg * 2.0 * (nranks - 1) / nranks, cores, nranks > cores ? "true" : "false",
           check_ok ? "ok" : "bad", extra ? extra : "");
    fflush(stdout);
}

#endif /* BENCH_ALLREDUCE_COMMON_H */
