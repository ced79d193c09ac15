/* allreduce.c - bandwidth of wk_ring's AllReduce on loopback.
 * SPDX-License-Identifier: MIT
 *
 * For each n of --ranks the driver opens n listeners on 127.0.0.1 (free
 * ports), forks n rank processes (no threads exist yet, so fork is safe),
 * and each joins the ring and runs every size: a checked allreduce, then
 * warm-up, then --repeats timed windows (each opened by a 1-float
 * allreduce as a barrier, closed by one that gathers every rank's time).
 * Rank 0 prints one JSON line per (n, size): the median over windows of
 * the slowest rank's time, algbw = bytes / time and busbw = algbw x
 * 2(n-1)/n, as bench/allreduce_mpi.c does for MPI_Allreduce.
 * bench/allreduce.sh runs both and states ours as a ratio to Open MPI.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench/allreduce_common.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "worker/sync/wk_ring.h"

#define MAX_RANKS 16

typedef struct opts {
    int ranks[MAX_RANKS], nranks_list;
    size_t sizes[AR_MAX_SIZES];
    int nsizes, repeats, timeout_s;
    wk_ring_opts ring;
} opts;

static void usage(FILE *f) {
    fprintf(f,
            "usage: allreduce [--ranks 2,3,4] [--sizes %s] [--repeats 3]\n"
            "                 [--chunk-bytes 0] [--sock-buf BYTES] [--spin-us 50]\n"
            "                 [--transport tcp|shm] [--algorithm auto|ring|hd]\n"
            "                 [--timeout-s 300]\n"
            "--chunk-bytes 0: the ring's default for the transport (1 MiB over tcp,\n"
            "256 KiB with shm). --algorithm auto: halving-doubling with 4, 8, ... ranks\n"
            "over tcp, else the ring. One JSON line per (ranks, size) on stdout.\n",
            ar_default_sizes);
}

static int parse(int argc, char **argv, opts *o) {
    static const struct option lo[] = {{"ranks", 1, 0, 'r'},       {"sizes", 1, 0, 's'},
                                       {"repeats", 1, 0, 'R'},     {"chunk-bytes", 1, 0, 'c'},
                                       {"sock-buf", 1, 0, 'b'},    {"timeout-s", 1, 0, 't'},
                                       {"spin-us", 1, 0, 'S'},     {"transport", 1, 0, 'T'},
                                       {"algorithm", 1, 0, 'A'},   {"help", 0, 0, 'h'},
                                       {0, 0, 0, 0}};
    const char *ranks = "2,3,4", *sizes = ar_default_sizes;
    wk_ring_opts_default(&o->ring);
    o->ring.job_id = (uint64_t)getpid();
    o->repeats = 3;
    o->timeout_s = 300;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'r': ranks = optarg; break;
        case 's': sizes = optarg; break;
        case 'R': o->repeats = atoi(optarg); break;
        case 'c': o->ring.chunk_bytes = strtoull(optarg, NULL, 10); break;
        case 'b': o->ring.sock_buf_bytes = atoi(optarg); break;
        case 't': o->timeout_s = atoi(optarg); break;
        case 'S': o->ring.spin_us = atoi(optarg); break;
        case 'T':
            if (!strcmp(optarg, "tcp"))
                o->ring.transport = WK_RING_TCP;
            else if (!strcmp(optarg, "shm"))
                o->ring.transport = WK_RING_SHM;
            else
                return CM_EINVAL;
            break;
        case 'A':
            if (!strcmp(optarg, "ring"))
                o->ring.algorithm = WK_RING_ALG_RING;
            else if (!strcmp(optarg, "hd"))
                o->ring.algorithm = WK_RING_ALG_HD;
            else if (!strcmp(optarg, "auto"))
                o->ring.algorithm = WK_RING_ALG_AUTO;
            else
                return CM_EINVAL;
            break;
        case 'h': usage(stdout); exit(0);
        default: return CM_EINVAL;
        }
    }
    o->nranks_list = 0;
    for (const char *p = ranks; *p && o->nranks_list < MAX_RANKS;) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > MAX_RANKS) return CM_EINVAL;
        o->ranks[o->nranks_list++] = (int)v;
        p = *end == ',' ? end + 1 : end;
    }
    o->nsizes = ar_parse_sizes(sizes, o->sizes);
    if (o->nsizes <= 0 || o->nranks_list == 0 || o->repeats < 1 ||
        o->repeats > AR_MAX_REPEATS)
        return CM_EINVAL;
    return CM_OK;
}

/* ===================================================== one rank */

static int64_t next_step;

/* Collect each rank's t into the slowest one (a sum of one-hot vectors). */
static int slowest(wk_ring *ring, double t, double *out) {
    float v[MAX_RANKS] = {0};
    int n = wk_ring_size(ring);
    v[wk_ring_rank(ring)] = (float)t;
    int rc = wk_ring_allreduce(ring, v, (size_t)n, next_step++, 0);
    *out = 0;
    for (int i = 0; i < n; i++) *out = v[i] > *out ? v[i] : *out;
    return rc;
}

static int run_size(wk_ring *ring, const opts *o, float *buf, size_t bytes) {
    int n = wk_ring_size(ring), rank = wk_ring_rank(ring), rc;
    size_t count = bytes / sizeof(float);
    for (size_t i = 0; i < count; i++) buf[i] = ar_check_input(rank, i);
    if ((rc = wk_ring_allreduce(ring, buf, count, next_step++, 0)) != CM_OK) return rc;
    int ok = 1;
    for (size_t i = 0; i < count; i++) ok &= buf[i] == ar_check_want(n, i);
    memset(buf, 0, bytes);
    int iters = ar_iters(bytes), warm = ar_warmup(iters);
    for (int i = 0; i < warm; i++)
        if ((rc = wk_ring_allreduce(ring, buf, count, next_step++, 0)) != CM_OK) return rc;
    double t[AR_MAX_REPEATS];
    float token = 0;
    for (int w = 0; w < o->repeats; w++) {
        if ((rc = wk_ring_allreduce(ring, &token, 1, next_step++, 0)) != CM_OK) return rc;
        double t0 = cm_now();
        for (int i = 0; i < iters; i++)
            if ((rc = wk_ring_allreduce(ring, buf, count, next_step++, 0)) != CM_OK) return rc;
        if ((rc = slowest(ring, (cm_now() - t0) / iters, &t[w])) != CM_OK) return rc;
    }
    char extra[192];
    snprintf(extra, sizeof extra,
             ",\"chunk_bytes\":%zu,\"sock_buf\":%d,\"spin_us\":%d,\"algorithm\":\"%s\"",
             wk_ring_chunk_bytes(ring, count), o->ring.sock_buf_bytes, o->ring.spin_us,
             wk_ring_algorithm(ring, count));
    if (rank == 0)
        ar_print("ring", o->ring.transport == WK_RING_SHM ? "shm" : "tcp", n, bytes, iters,
                 o->repeats, ar_median(t, o->repeats), ok, extra);
    return ok ? CM_OK : CM_ECORRUPT;
}

static int rank_main(const opts *o, wk_ring_listener *l, int rank, int n,
                     const char *const *addrs) {
    char err[512];
    wk_ring *ring = NULL;
    size_t max = 0;
    for (int i = 0; i < o->nsizes; i++) max = o->sizes[i] > max ? o->sizes[i] : max;
    float *buf = cm_alloc_aligned(max);
    int rc = buf ? wk_ring_connect(l, rank, n, addrs, &o->ring, &ring, err, sizeof err)
                 : CM_ENOMEM;
    if (rc != CM_OK) {
        fprintf(stderr, "allreduce: rank %d: %s\n", rank, buf ? err : "no memory");
    } else {
        memset(buf, 0, max); /* First touch outside the timed windows. */
        for (int i = 0; i < o->nsizes && rc == CM_OK; i++) rc = run_size(ring, o, buf, o->sizes[i]);
        if (rc != CM_OK)
            fprintf(stderr, "allreduce: rank %d: %s: %s\n", rank, cm_strerror(rc),
                    wk_ring_status(ring) ? wk_ring_error(ring) : "wrong result");
    }
    wk_ring_destroy(ring);
    free(buf);
    return rc == CM_OK ? 0 : 1;
}

/* ===================================================== driver */

/* Fork n ranks, wait for all of them (at most timeout_s); 0 if all ok. */
static int run_ring(const opts *o, int n) {
    wk_ring_listener *ls[MAX_RANKS] = {0};
    char addr_buf[MAX_RANKS][64], err[256];
    const char *addrs[MAX_RANKS];
    pid_t pids[MAX_RANKS];
    int failed = 0, nkids = 0;
    for (int i = 0; i < n; i++) {
        if (wk_ring_listen("127.0.0.1", 0, &ls[i], err, sizeof err) != CM_OK) {
            fprintf(stderr, "allreduce: %s\n", err);
            failed = 1;
            goto done;
        }
        snprintf(addr_buf[i], sizeof addr_buf[i], "127.0.0.1:%d", wk_ring_listener_port(ls[i]));
        addrs[i] = addr_buf[i];
    }
    fflush(stdout);
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            for (int j = 0; j < n; j++)
                if (j != i) wk_ring_listener_destroy(ls[j]);
            _exit(rank_main(o, ls[i], i, n, addrs));
        }
        if (pid < 0) {
            fprintf(stderr, "allreduce: fork: %s\n", strerror(errno));
            failed = 1;
            break;
        }
        pids[nkids++] = pid;
    }
    double deadline = cm_now() + o->timeout_s;
    for (int left = nkids; left > 0;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid > 0) {
            left--;
            failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
            for (int i = 0; i < nkids; i++)
                if (pids[i] == pid) pids[i] = 0; /* Never signal a reaped pid. */
        } else if (cm_now() > deadline) {
            fprintf(stderr, "allreduce: %d ranks still running after %d s; stopping them\n",
                    left, o->timeout_s);
            for (int i = 0; i < nkids; i++)
                if (pids[i] > 0) kill(pids[i], SIGKILL);
            while (left > 0 && waitpid(-1, NULL, 0) > 0) left--;
            failed = 1;
        } else {
            usleep(20000);
        }
    }
done:
    for (int i = 0; i < n; i++) wk_ring_listener_destroy(ls[i]);
    return failed;
}

int main(int argc, char **argv) {
    opts o;
    if (parse(argc, argv, &o) != CM_OK) {
        usage(stderr);
        return 2;
    }
    int failed = 0;
    for (int i = 0; i < o.nranks_list; i++) failed |= run_ring(&o, o.ranks[i]);
    return failed;
}
