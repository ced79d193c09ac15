/* psbench.c - the dense push-then-pull benchmark of the PS, against plain TCP.
 * SPDX-License-Identifier: MIT
 *
 * ps-lite's dense push-then-pull workload (bench/peers.py runs ps-lite itself on
 * it, interleaved with this benchmark, for the ratio to ps-lite): S psserver and W
 * worker processes on 127.0.0.1; each worker pushes B bytes of 1.0 over the
 * shards, waits, pulls them back, one request in flight. The same shape then
 * moves the same bytes over plain TCP, the reference the result is stated
 * against. One binary, four roles, re-executed with posix_spawn (never
 * forked: docs/GRPC_LEVELDB_NOTES.md G8): driver, worker, tcp-server, tcp-worker.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <spawn.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "common/cm_token.h"
#include "proto/rpc.h"
#include "ps/ps_client.h"
#include "ps/ps_optim.h"

#define MAX_LIST 16  /* Entries of --sizes, --shapes, --modes. */
#define MAX_REPEATS 15

/* The PS's partitioning and the client's calls (--partition-bytes,
 * --call-bytes, --call-window), the same in every process of a run. */
static long g_part_bytes = 262144, g_call_bytes = 0, g_call_window = 0, g_spin_us = 0;
static int g_unary; /* --calls unary */
static long g_poll_spin = 0; /* --poll-spin-us: the PS's and the clients' (0: their default). */
static char g_poll_spin_arg[24];

/* --op push-pull: each iteration is one request that pushes and pulls back
 * (ps_client_push_pull, what pstrain's sync steps use; the TCP reference and
 * ps-lite likewise) instead of a push, then a pull. */
static int g_pushpull = 0;

static const char *op_name(void) { return g_pushpull ? "push-pull" : "push-then-pull"; }

/* Options of every role; the driver passes the role ones to its children. */
typedef struct opts {
    const char *role; /* NULL for the driver. */
    /* Driver. */
    const char *sizes, *shapes, *modes, *bin_dir;
    int quick, repeats, warmup, iters;
    double timeout_s;
    /* Worker and server roles. */
    int rank, workers, sync;
    size_t elems;
    const char *ps_addrs, *tcp_ports;
    /* Security: the driver's list (none, token, tls) and a worker's files. */
    const char *security;
    const char *token_file, *tls_ca;
} opts;

/* One timed phase (PS or TCP) of one configuration, over all workers. */
typedef struct phase_result {
    double window_s; /* The slowest worker's timed window. */
    double push_ms;  /* Mean over workers of the mean push time. */
    double pull_ms;
    int nw;          /* Workers (while the lines are summed). */
    double wall_s, others_s; /* The round's wall time, and the CPU time other
                              * processes took meanwhile (bu_cpu_sample). */
    double cpu_s;            /* The CPU time this benchmark's own processes
                              * (servers, workers, driver) took in the round:
                              * warm-up and timed steps, clock ticks. */
} phase_result;

/* Other processes using more than this many cores during a run's PS or TCP
 * window flag the run: it is left out of the medians. */
#define BUSY_CORES 0.2

/* ================================================== helpers */

/* The first element of a[0..n) that differs from 'want', or n. */
static size_t find_mismatch(const float *a, size_t n, float want) {
    for (size_t i = 0; i < n; i++)
        if (a[i] != want) return i;
    return n;
}

/* The element range [off[i], off[i + 1]) of slice i of n elements cut into
 * s contiguous slices, the first n % s of them one longer: the same split
 * as cm_placement's for a 1-D variable. */
static size_t slice_begin(size_t n, int s, int i) {
    size_t q = n / (size_t)s, r = n % (size_t)s;
    return (size_t)i * q + ((size_t)i < r ? (size_t)i : r);
}

/* ================================================== role: PS worker */

/* Announce, wait for the driver's "go", run warm-up and timed iterations
 * through ps_client, report; worker 0 then checks the final vector after the
 * driver's "check" (every worker has finished by then) and stops the PS. */
static int ps_worker_main(const opts *o) {
    int status = 1, nps = 0;
    char err[512] = "", *copy = NULL, *addrs[BU_MAX_PROCS];
    cm_model *model = NULL;
    cm_placement *pl = NULL;
    ps_client *c = NULL;
    ps_ticket *t = NULL;
    float *ones = NULL, *buf = NULL;
    size_t n = o->elems;
    int total = o->warmup + o->iters;
    int64_t version = 0;
    if ((nps = bu_split_list(o->ps_addrs ? o->ps_addrs : "", &copy, addrs, BU_MAX_PROCS)) < 1) {
        snprintf(err, sizeof err, "bad --ps-addrs");
        goto fail;
    }
    /* Partitions of --partition-bytes (the PS's default, as pstrain's), or
     * with 0 one per PS: a minimum of bytes / nps splits the vector in nps
     * (placement no longer caps the split at the shard count). */
    size_t min_part = g_part_bytes > 0 ? (size_t)g_part_bytes : n * sizeof(float) / (size_t)nps;
    if (cm_model_create_vector(n, &model) != CM_OK ||
        cm_placement_create(model, nps, min_part ? min_part : 1, &pl) != CM_OK ||
        (g_part_bytes == 0 && pl->nparts != nps)) {
        snprintf(err, sizeof err, "cannot build the model of %zu floats on %d PS", n, nps);
        goto fail;
    }
    cm_security sec = {.tls_ca = o->tls_ca};
    if (cm_security_load(&sec, o->token_file, NULL, err, sizeof err) != CM_OK) goto fail;
    ps_client_cfg cfg = {.model = model, .placement = pl, .ps_addrs = (const char *const *)addrs,
                         .rank = o->rank, .deadline_ms = 60000, .connect_timeout_ms = 30000,
                         .auth_token = cm_security_token(&sec),
                         .admin_token = cm_security_token(&sec), .tls_ca = o->tls_ca,
                         .call_bytes = g_call_bytes, .call_window = (int)g_call_window,
                         .spin_us = (int)g_spin_us, .unary = g_unary,
                         .poll_spin_us = (int)g_poll_spin,
                         .async = !o->sync};
    if (ps_client_open(&cfg, &c, err, sizeof err) != CM_OK) goto fail;
    if (o->rank == 0) {
        ps_init_cfg init = {.optim = ps_optim_defaults(PS_OPTIM_ADD, 0.0f), .seed = 1,
                            .num_workers = o->workers, .async = !o->sync, .sum = 1,
                            .zero_init = 1};
        if (ps_client_init(c, &init, err, sizeof err) != CM_OK) goto fail;
    }
    ones = cm_alloc_aligned(n * sizeof(float));
    buf = cm_alloc_aligned(n * sizeof(float));
    if (!ones || !buf) {
        snprintf(err, sizeof err, "out of memory for %zu floats", n);
        goto fail;
    }
    for (size_t i = 0; i < n; i++) ones[i] = 1.0f;
    memset(buf, 0, n * sizeof(float)); /* Touch the pages before timing. */
    /* A pull at version 0 waits until the chief's Init reached every shard. */
    ps_client_pull(c, 0, buf, &t);
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) goto fail;
    printf("{\"ready\":%d}\n", o->rank);
    fflush(stdout);
    if (bu_read_command("go")) {
        snprintf(err, sizeof err, "no \"go\" from the driver");
        goto fail;
    }
    double tprev = cm_now(), tstart = tprev, push_s = 0.0, pull_s = 0.0;
    for (int it = 0; it < total; it++) {
        if (it == o->warmup) tstart = tprev;
        double t1;
        if (g_pushpull) {
            /* Sync: the values of version it + 1; async: the newest. */
            ps_client_push_pull(c, it, ones, buf, &t);
            if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) goto fail;
            t1 = cm_now();
        } else {
            ps_client_push(c, it, ones, &t);
            if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) goto fail;
            t1 = cm_now();
            ps_client_pull(c, o->sync ? it + 1 : 0, buf, &t);
            if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) goto fail;
        }
        double t2 = cm_now();
        if (it >= o->warmup) {
            push_s += t1 - tprev;
            pull_s += t2 - t1;
        }
        tprev = t2;
        /* In sync mode every round is complete when its pull returns. */
        float want = (float)o->workers * (float)(it + 1);
        if (o->sync && (buf[0] != want || buf[n - 1] != want)) {
            snprintf(err, sizeof err, "round %d: pulled %g .. %g, expected %g", it,
                     (double)buf[0], (double)buf[n - 1], (double)want);
            goto fail;
        }
    }
    int timed = o->iters > 0 ? o->iters : 1;
    printf("{\"rank\":%d,\"window_s\":%.9f,\"push_ms\":%.6f,\"pull_ms\":%.6f}\n", o->rank,
           tprev - tstart, push_s * 1e3 / timed, pull_s * 1e3 / timed);
    fflush(stdout);
    if (o->rank == 0) {
        if (bu_read_command("check")) {
            snprintf(err, sizeof err, "no \"check\" from the driver");
            goto fail;
        }
        memset(buf, 0, n * sizeof(float));
        ps_client_pull(c, 0, buf, &t);
        if (ps_ticket_wait(t, &version, err, sizeof err) != CM_OK) goto fail;
        float want = (float)o->workers * (float)total;
        /* Async: a version per push (its calls to a shard say step_parts). */
        int64_t want_version = o->sync ? total : (int64_t)o->workers * total;
        size_t bad = find_mismatch(buf, n, want);
        if (bad < n || version != want_version)
            printf("{\"check\":\"bad\",\"index\":%zu,\"value\":%g,\"expected\":%g,"
                   "\"version\":%lld,\"expected_version\":%lld}\n",
                   bad, bad < n ? (double)buf[bad] : (double)want, (double)want,
                   (long long)version, (long long)want_version);
        else
            printf("{\"check\":\"ok\",\"version\":%lld}\n", (long long)version);
        fflush(stdout);
        if (ps_client_shutdown_servers(c, "psbench done", 0, err, sizeof err) != CM_OK) goto fail;
    }
    status = 0;
fail:
    if (status) fprintf(stderr, "psbench worker %d: %s\n", o->rank, err);
    ps_client_close(c);
    free(ones);
    free(buf);
    cm_placement_destroy(pl);
    cm_model_destroy(model);
    free(copy);
    return status;
}

/* ================================================== role: TCP server */

/* One server's slice. Pushes add under the write lock, pulls send under the
 * read lock, so several workers' pulls proceed together. */
typedef struct tcp_store {
    float *v;
    size_t n;
    pthread_rwlock_t lock;
} tcp_store;

static void add_into(float *restrict dst, const float *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

/* Serve one connection: 'P' + slice -> add, answer 'A'; 'L' -> the slice;
 * 'X' + slice -> add, answer the slice; 'Q' -> answer 'A' and stop the
 * server. */
static void tcp_serve(void *ctx, int fd, int listen_fd) {
    tcp_store *st = ctx;
    size_t bytes = st->n * sizeof(float);
    float *in = cm_alloc_aligned(bytes);
    if (in) memset(in, 0, bytes);
    const char ack = 'A';
    char op;
    while (in && bu_recv_all(fd, &op, 1) == 0) {
        if (op == 'P' || op == 'X') {
            if (bu_recv_all(fd, in, bytes)) break;
            pthread_rwlock_wrlock(&st->lock);
            add_into(st->v, in, st->n);
            pthread_rwlock_unlock(&st->lock);
            if (op == 'P' && bu_send_all(fd, &ack, 1, 0)) break;
            if (op == 'X') {
                pthread_rwlock_rdlock(&st->lock);
                int rc = bu_send_all(fd, st->v, bytes, 0);
                pthread_rwlock_unlock(&st->lock);
                if (rc) break;
            }
        } else if (op == 'L') {
            pthread_rwlock_rdlock(&st->lock);
            int rc = bu_send_all(fd, st->v, bytes, 0);
            pthread_rwlock_unlock(&st->lock);
            if (rc) break;
        } else {
            /* 'Q' (or garbage): wake the accept loop, which ends the server. */
            if (op == 'Q') bu_send_all(fd, &ack, 1, 0);
            shutdown(listen_fd, SHUT_RDWR);
            break;
        }
    }
    free(in);
}

static int tcp_server_main(const opts *o) {
    int status = 1;
    tcp_store st = {.n = o->elems};
    pthread_rwlock_init(&st.lock, NULL);
    st.v = cm_alloc_aligned(st.n * sizeof(float));
    if (st.v) {
        memset(st.v, 0, st.n * sizeof(float));
        status = bu_tcp_serve("psbench tcp-server", tcp_serve, &st);
    }
    pthread_rwlock_destroy(&st.lock);
    free(st.v);
    return status;
}

/* ================================================== role: TCP worker */

/* The worker's link to one server, run by its own thread when S > 1. */
typedef struct tcp_link {
    int fd;
    const float *src; /* This server's slice of the pushed vector. */
    float *dst;       /* This server's slice of the pull buffer. */
    size_t n;
    int total;
    pthread_barrier_t *bar;
    int failed;
    pthread_t th;
} tcp_link;

static int tcp_push(tcp_link *l) {
    const char op = 'P';
    char ack = 0;
    if (bu_send_all(l->fd, &op, 1, MSG_MORE) || bu_send_all(l->fd, l->src, l->n * sizeof(float), 0) ||
        bu_recv_all(l->fd, &ack, 1) || ack != 'A')
        return -1;
    return 0;
}

static int tcp_pull(tcp_link *l) {
    const char op = 'L';
    if (bu_send_all(l->fd, &op, 1, 0) || bu_recv_all(l->fd, l->dst, l->n * sizeof(float))) return -1;
    return 0;
}

/* --op push-pull: the slice up, the sum back, one request. */
static int tcp_push_pull(tcp_link *l) {
    const char op = 'X';
    size_t bytes = l->n * sizeof(float);
    if (bu_send_all(l->fd, &op, 1, MSG_MORE) || bu_send_all(l->fd, l->src, bytes, 0) ||
        bu_recv_all(l->fd, l->dst, bytes))
        return -1;
    return 0;
}

/* Push, barrier, pull, barrier, 'total' times (push-pull, barrier, barrier
 * with --op push-pull); the main thread is the barrier's last party and
 * takes the times. */
static void *tcp_link_run(void *arg) {
    tcp_link *l = arg;
    for (int it = 0; it < l->total; it++) {
        if (!l->failed && (g_pushpull ? tcp_push_pull(l) : tcp_push(l))) l->failed = 1;
        pthread_barrier_wait(l->bar);
        if (!l->failed && !g_pushpull && tcp_pull(l)) l->failed = 1;
        pthread_barrier_wait(l->bar);
    }
    return NULL;
}

static int tcp_worker_main(const opts *o) {
    int status = 1, ns = 0, nthreads = 0, barrier_up = 0;
    char err[256] = "", *copy = NULL, *ports[BU_MAX_PROCS];
    tcp_link links[BU_MAX_PROCS];
    pthread_barrier_t bar;
    size_t n = o->elems;
    int total = o->warmup + o->iters;
    float *ones = cm_alloc_aligned(n * sizeof(float)), *buf = cm_alloc_aligned(n * sizeof(float));
    memset(links, 0, sizeof links);
    for (int i = 0; i < BU_MAX_PROCS; i++) links[i].fd = -1;
    if (!ones || !buf) {
        snprintf(err, sizeof err, "out of memory for %zu floats", n);
        goto fail;
    }
    for (size_t i = 0; i < n; i++) ones[i] = 1.0f;
    memset(buf, 0, n * sizeof(float));
    if ((ns = bu_split_list(o->tcp_ports ? o->tcp_ports : "", &copy, ports, BU_MAX_PROCS)) < 1) {
        snprintf(err, sizeof err, "bad --tcp-ports");
        goto fail;
    }
    for (int i = 0; i < ns; i++) {
        size_t b = slice_begin(n, ns, i), e = slice_begin(n, ns, i + 1);
        links[i] = (tcp_link){.fd = bu_tcp_connect(atoi(ports[i])), .src = ones + b, .dst = buf + b,
                              .n = e - b, .total = total, .bar = &bar};
        if (links[i].fd < 0) {
            snprintf(err, sizeof err, "cannot connect to 127.0.0.1:%s", ports[i]);
            goto fail;
        }
    }
    printf("{\"ready\":%d}\n", o->rank);
    fflush(stdout);
    if (bu_read_command("go")) {
        snprintf(err, sizeof err, "no \"go\" from the driver");
        goto fail;
    }
    if (ns > 1) {
        pthread_barrier_init(&bar, NULL, (unsigned)ns + 1);
        barrier_up = 1;
        for (; nthreads < ns; nthreads++)
            if (pthread_create(&links[nthreads].th, NULL, tcp_link_run, &links[nthreads])) {
                /* The threads already started would wait at the barrier for
                 * ever: end the process, the driver reports it. */
                fprintf(stderr, "psbench tcp-worker %d: cannot start a thread\n", o->rank);
                exit(1);
            }
    }
    double tprev = cm_now(), tstart = tprev, push_s = 0.0, pull_s = 0.0;
    for (int it = 0; it < total; it++) {
        if (it == o->warmup) tstart = tprev;
        if (ns == 1 && (g_pushpull ? tcp_push_pull(&links[0]) : tcp_push(&links[0])))
            links[0].failed = 1;
        if (ns > 1) pthread_barrier_wait(&bar);
        double t1 = cm_now();
        if (ns == 1 && !g_pushpull && !links[0].failed && tcp_pull(&links[0]))
            links[0].failed = 1;
        if (ns > 1) pthread_barrier_wait(&bar);
        double t2 = cm_now();
        if (it >= o->warmup) {
            push_s += t1 - tprev;
            pull_s += t2 - t1;
        }
        tprev = t2;
    }
    for (; nthreads > 0; nthreads--) pthread_join(links[nthreads - 1].th, NULL);
    for (int i = 0; i < ns; i++)
        if (links[i].failed) {
            snprintf(err, sizeof err, "I/O error with the server on port %s", ports[i]);
            goto fail;
        }
    int timed = o->iters > 0 ? o->iters : 1;
    printf("{\"rank\":%d,\"window_s\":%.9f,\"push_ms\":%.6f,\"pull_ms\":%.6f}\n", o->rank,
           tprev - tstart, push_s * 1e3 / timed, pull_s * 1e3 / timed);
    fflush(stdout);
    if (o->rank == 0) {
        if (bu_read_command("check")) {
            snprintf(err, sizeof err, "no \"check\" from the driver");
            goto fail;
        }
        memset(buf, 0, n * sizeof(float));
        for (int i = 0; i < ns; i++)
            if (tcp_pull(&links[i])) {
                snprintf(err, sizeof err, "final pull from port %s failed", ports[i]);
                goto fail;
            }
        float want = (float)o->workers * (float)total;
        size_t bad = find_mismatch(buf, n, want);
        if (bad < n)
            printf("{\"check\":\"bad\",\"index\":%zu,\"value\":%g,\"expected\":%g}\n", bad,
                   (double)buf[bad], (double)want);
        else
            printf("{\"check\":\"ok\"}\n");
        fflush(stdout);
        for (int i = 0; i < ns; i++) {
            const char op = 'Q';
            char ack = 0;
            if (bu_send_all(links[i].fd, &op, 1, 0) || bu_recv_all(links[i].fd, &ack, 1)) {
                snprintf(err, sizeof err, "cannot stop the server on port %s", ports[i]);
                goto fail;
            }
        }
    }
    status = 0;
fail:
    if (status) fprintf(stderr, "psbench tcp-worker %d: %s\n", o->rank, err);
    /* On failure, closing the sockets ends the link threads' I/O. */
    for (int i = 0; i < BU_MAX_PROCS; i++)
        if (links[i].fd >= 0) shutdown(links[i].fd, SHUT_RDWR);
    for (; nthreads > 0; nthreads--) pthread_join(links[nthreads - 1].th, NULL);
    for (int i = 0; i < BU_MAX_PROCS; i++)
        if (links[i].fd >= 0) close(links[i].fd);
    if (barrier_up) pthread_barrier_destroy(&bar);
    free(copy);
    free(ones);
    free(buf);
    return status;
}

/* ================================================== driver: phases */

/* The PS phase's variant: plain, secured (token; token and TLS), or
 * observed (metrics: each psserver serves Prometheus metrics, scraped every
 * SCRAPE_MS by the driver). Other than none, each run also times it without,
 * and the line says the variant's cost. */
enum { SEC_NONE, SEC_TOKEN, SEC_TLS, SEC_METRICS, SEC_N };
static const char *const sec_names[] = {"none", "token", "tls", "metrics"};
#define SCRAPE_MS 100

typedef struct bench_cfg {
    int servers, workers, sync;
    size_t bytes;
    int warmup, iters;
    int security; /* SEC_*: the PS phase's; other than none, each run also
                   * has a PS phase without, the reference of its cost. */
} bench_cfg;

/* The files of the security modes (a random token; a CA and the PS's
 * certificate for 127.0.0.1, made with the openssl command), in a private
 * directory made by the driver. */
typedef struct sec_files {
    char dir[256], token[300], ca[300], cert[300], key[300];
} sec_files;
static sec_files g_sec;

/* Start the W workers of a phase: this binary as 'role', told where the
 * servers are by addr_opt addrs. CM_OK, or CM_EIO with a message. */
static int spawn_workers(bu_driver *d, const bench_cfg *b, const char *role, const char *addr_opt,
                         const char *addrs, bu_child **w, char *err, size_t errlen) {
    for (int r = 0; r < b->workers; r++) {
        char nums[10][24], name[32];
        snprintf(nums[0], 24, "%d", r);
        snprintf(nums[1], 24, "%d", b->workers);
        snprintf(nums[2], 24, "%zu", b->bytes / sizeof(float));
        snprintf(nums[3], 24, "%d", b->warmup);
        snprintf(nums[4], 24, "%d", b->iters);
        char *argv[40] = {d->exe, "--role", (char *)role, "--rank", nums[0], "--workers",
                          nums[1], "--elems", nums[2], "--warmup", nums[3], "--iters", nums[4],
                          "--mode", b->sync ? "sync" : "async", (char *)addr_opt, (char *)addrs,
                          "--partition-bytes", nums[5], "--call-bytes", nums[6],
                          "--call-window", nums[7],
                          "--op", (char *)op_name(),
                          "--spin-us", nums[8], "--calls", g_unary ? "unary" : "stream",
                          "--poll-spin-us", nums[9], NULL};
        snprintf(nums[5], 24, "%ld", g_part_bytes);
        snprintf(nums[6], 24, "%ld", g_call_bytes);
        snprintf(nums[7], 24, "%ld", g_call_window);
        snprintf(nums[8], 24, "%ld", g_spin_us);
        snprintf(nums[9], 24, "%ld", g_poll_spin);
        int k = 31;
        if (!strcmp(role, "worker") && (b->security == SEC_TOKEN || b->security == SEC_TLS)) {
            argv[k++] = "--token-file";
            argv[k++] = g_sec.token;
        }
        if (!strcmp(role, "worker") && b->security == SEC_TLS) {
            argv[k++] = "--tls-ca";
            argv[k++] = g_sec.ca;
        }
        argv[k] = NULL;
        snprintf(name, sizeof name, "%s %d", role, r);
        if (!(w[r] = bu_spawn(d, name, argv, 1, 1, err, errlen))) return CM_EIO;
    }
    return CM_OK;
}

/* A worker's timing line, added into the phase_result ctx. */
static int add_timings(void *ctx, int i, const char *line) {
    phase_result *res = ctx;
    int rank, nw = res->nw;
    double win, push, pull;
    (void)i;
    if (sscanf(line, "{\"rank\":%d,\"window_s\":%lf,\"push_ms\":%lf,\"pull_ms\":%lf}", &rank, &win,
               &push, &pull) != 4)
        return -1;
    if (win > res->window_s) res->window_s = win;
    res->push_ms += push / nw;
    res->pull_ms += pull / nw;
    return 0;
}

/* The worker protocol: W "ready" lines, "go" to all, W timing lines, then
 * "check" to worker 0 and its verdict; then every worker must exit 0. */
static int run_workers(bu_driver *d, bu_child **w, int nw, phase_result *res, char *err,
                       size_t errlen) {
    int rc;
    *res = (phase_result){.nw = nw};
    bu_cpu_sample a, b;
    if ((rc = bu_workers_ready(d, w, nw, NULL, NULL, err, errlen)) != CM_OK) return rc;
    bu_cpu_sample_take(d, &a);
    if ((rc = bu_workers_round(d, w, nw, add_timings, res, err, errlen)) != CM_OK) return rc;
    bu_cpu_sample_take(d, &b);
    res->wall_s = b.wall - a.wall;
    res->cpu_s = b.ours_s - a.ours_s;
    /* Less what the counters' clock ticks may be off by: a short window
     * is not flagged for their rounding. */
    res->others_s = bu_cpu_others_s(&a, &b) - b.res_s;
    if (res->others_s < 0) res->others_s = 0;
    return bu_workers_finish(d, w, nw, err, errlen);
}

/* A phase's workers (bu_ps_phase's and bu_tcp_phase's callback): this
 * binary as 'role', told the servers by addr_opt. */
typedef struct phase_run {
    const bench_cfg *b;
    const char *role, *addr_opt;
    phase_result *res;
} phase_run;

static int phase_workers(void *ctx, bu_driver *d, const char *addrs, char *err, size_t errlen) {
    phase_run *pr = ctx;
    bu_child *w[BU_MAX_PROCS];
    int rc = spawn_workers(d, pr->b, pr->role, pr->addr_opt, addrs, w, err, errlen);
    return rc != CM_OK ? rc : run_workers(d, w, pr->b->workers, pr->res, err, errlen);
}

/* The PS phase: S psserver processes, W workers over ps_client, with the
 * configuration's security. */
static int run_ps(bu_driver *d, const bench_cfg *b, phase_result *res, char *err, size_t errlen) {
    phase_run pr = {.b = b, .role = "worker", .addr_opt = "--ps-addrs", .res = res};
    int k = 0;
    if (g_poll_spin) {
        snprintf(g_poll_spin_arg, sizeof g_poll_spin_arg, "%ld", g_poll_spin);
        d->ps_extra[k++] = "--poll-spin-us";
        d->ps_extra[k++] = g_poll_spin_arg;
    }
    if (b->security == SEC_TOKEN || b->security == SEC_TLS) {
        d->ps_extra[k++] = "--auth-token-file";
        d->ps_extra[k++] = g_sec.token;
    }
    if (b->security == SEC_TLS) {
        d->ps_extra[k++] = "--tls-cert";
        d->ps_extra[k++] = g_sec.cert;
        d->ps_extra[k++] = "--tls-key";
        d->ps_extra[k++] = g_sec.key;
    }
    d->ps_extra[k] = NULL;
    d->scrape_ms = b->security == SEC_METRICS ? SCRAPE_MS : 0;
    int rc = bu_ps_phase(d, b->servers, b->workers, phase_workers, &pr, err, errlen);
    d->ps_extra[0] = NULL;
    d->scrape_ms = 0;
    return rc;
}

extern char **environ;

/* Run argv (a command on the PATH) and wait; 0 if it exited 0. */
static int run_cmd(char *const argv[]) {
    pid_t pid;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    int status = 0;
    if (rc != 0 || waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}

/* Make g_sec's files (the TLS ones only when tls is set). 0, or -1 after a
 * message. */
static int make_sec_files(int tls) {
    const char *tmp = getenv("TMPDIR");
    snprintf(g_sec.dir, sizeof g_sec.dir, "%s/psbench-sec-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(g_sec.dir)) {
        fprintf(stderr, "psbench: cannot make a directory for the token: %s\n", strerror(errno));
        return -1;
    }
    snprintf(g_sec.token, sizeof g_sec.token, "%s/token", g_sec.dir);
    uint8_t raw[24];
    char hex[64];
    int fd = open(g_sec.token, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) {
        fprintf(stderr, "psbench: cannot write %s\n", g_sec.token);
        if (fd >= 0) close(fd);
        return -1;
    }
    for (size_t i = 0; i < sizeof raw; i++) snprintf(hex + 2 * i, 3, "%02x", raw[i]);
    hex[2 * sizeof raw] = '\n';
    ssize_t w = write(fd, hex, 2 * sizeof raw + 1);
    close(fd);
    if (w != (ssize_t)(2 * sizeof raw + 1)) return -1;
    if (!tls) return 0;
    char cakey[300], ext[300], csr[300], subj_ext[] = "subjectAltName=IP:127.0.0.1";
    snprintf(g_sec.ca, sizeof g_sec.ca, "%s/ca.pem", g_sec.dir);
    snprintf(cakey, sizeof cakey, "%s/ca.key", g_sec.dir);
    snprintf(g_sec.cert, sizeof g_sec.cert, "%s/server.pem", g_sec.dir);
    snprintf(g_sec.key, sizeof g_sec.key, "%s/server.key", g_sec.dir);
    snprintf(csr, sizeof csr, "%s/server.csr", g_sec.dir);
    snprintf(ext, sizeof ext, "%s/server.ext", g_sec.dir);
    FILE *f = fopen(ext, "w");
    if (!f || fprintf(f, "%s\n", subj_ext) < 0 || fclose(f) != 0) return -1;
    char *ca[] = {"openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                  "-subj", "/CN=psbench CA", "-keyout", cakey, "-out", g_sec.ca, NULL};
    char *req[] = {"openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj",
                   "/CN=127.0.0.1", "-keyout", g_sec.key, "-out", csr, NULL};
    char *sign[] = {"openssl", "x509", "-req", "-in", csr, "-CA", g_sec.ca, "-CAkey", cakey,
                    "-CAcreateserial", "-days", "1", "-out", g_sec.cert, "-extfile", ext, NULL};
    if (run_cmd(ca) || run_cmd(req) || run_cmd(sign)) {
        fprintf(stderr, "psbench: the openssl command could not make a test CA (install "
                        "openssl: scripts/install-deps.sh)\n");
        return -1;
    }
    return 0;
}

static void remove_sec_files(void) {
    if (!g_sec.dir[0]) return;
    DIR *dir = opendir(g_sec.dir);
    struct dirent *e;
    char path[600];
    while (dir && (e = readdir(dir)))
        if (e->d_name[0] != '.') {
            snprintf(path, sizeof path, "%s/%s", g_sec.dir, e->d_name);
            unlink(path);
        }
    if (dir) closedir(dir);
    rmdir(g_sec.dir);
}

/* The plain-TCP phase: S tcp-server processes (each its slice of the
 * vector), W tcp-worker processes. */
static int run_tcp(bu_driver *d, const bench_cfg *b, phase_result *res, char *err,
                   size_t errlen) {
    char elems[BU_MAX_PROCS][24], *argv[BU_MAX_PROCS][6], *const *argvs[BU_MAX_PROCS];
    size_t n = b->bytes / sizeof(float);
    for (int i = 0; i < b->servers; i++) {
        snprintf(elems[i], sizeof elems[i], "%zu",
                 slice_begin(n, b->servers, i + 1) - slice_begin(n, b->servers, i));
        char *a[] = {d->exe, "--role", "tcp-server", "--elems", elems[i], NULL};
        memcpy(argv[i], a, sizeof a);
        argvs[i] = argv[i];
    }
    phase_run pr = {.b = b, .role = "tcp-worker", .addr_opt = "--tcp-ports", .res = res};
    return bu_tcp_phase(d, b->servers, argvs, phase_workers, &pr, err, errlen);
}

/* ================================================== driver: report */

static double gbps_of(const bench_cfg *b, const phase_result *r) {
    return (double)b->workers * b->iters * 2.0 * (double)b->bytes / r->window_s * 1e-9;
}

/* CPU µs the round took per MiB moved (warm-up and timed steps, both ways). */
static double cpu_us_per_mib(const bench_cfg *b, const phase_result *r) {
    double mib = (double)b->workers * (b->warmup + b->iters) * 2.0 * (double)b->bytes / 1048576.0;
    return r->cpu_s * 1e6 / mib;
}

/* Print the JSON line of one configuration from its nrep runs: medians,
 * and the ratio to TCP as the median of the runs' own ratios (each run's two
 * phases are seconds apart, so a burst of load on a shared machine mostly
 * cancels out of its ratio). */
static void report(const bench_cfg *b, const phase_result *ps, const phase_result *plain,
                   const phase_result *tcp, int nrep, const double load[2], const char *check) {
    double g[MAX_REPEATS], tg[MAX_REPEATS], ratio[MAX_REPEATS], push[MAX_REPEATS],
        pull[MAX_REPEATS], tpush[MAX_REPEATS], tpull[MAX_REPEATS];
    printf("{\"bench\":\"psbench\",\"servers\":%d,\"workers\":%d,\"mode\":\"%s\","
           "\"bytes\":%zu,\"warmup\":%d,\"iters\":%d,\"runs\":%d,\"security\":\"%s\"",
           b->servers, b->workers, b->sync ? "sync" : "async", b->bytes, b->warmup, b->iters,
           nrep, sec_names[b->security]);
    printf(",\"partition_bytes\":%ld,\"call_bytes\":%ld,\"call_window\":%ld,\"op\":\"%s\","
           "\"spin_us\":%ld,\"calls\":\"%s\",\"poll_spin_us\":%ld",
           g_part_bytes, g_call_bytes, g_call_window, op_name(),
           g_spin_us, g_unary ? "unary" : "stream",
           g_poll_spin ? g_poll_spin : (long)RPC_DEFAULT_POLL_SPIN_US);
    printf(",\"load1_start\":%.2f,\"load1_end\":%.2f", load[0], load[1]);
    /* More busy processes than cores this run may use: throughput is then
     * CPU per byte (docs/bench-log.md, "A core per process or not"). */
    cpu_set_t cpus;
    int ncpu = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 0;
    printf(",\"cpus\":%d,\"oversubscribed\":%s", ncpu,
           ncpu > 0 && b->servers + b->workers > ncpu ? "true" : "false");
    /* Runs where others used the cores are left out (all kept if none is
     * clean, and said so). */
    int keep[MAX_REPEATS], nkeep = 0;
    double others_max = 0;
    for (int i = 0; i < nrep; i++) {
        double oc = ps[i].others_s / (ps[i].wall_s > 0 ? ps[i].wall_s : 1);
        double ot = tcp[i].others_s / (tcp[i].wall_s > 0 ? tcp[i].wall_s : 1);
        if (oc > others_max) others_max = oc;
        if (ot > others_max) others_max = ot;
        if (oc <= BUSY_CORES && ot <= BUSY_CORES) keep[nkeep++] = i;
    }
    const int busy = nrep - nkeep, all_busy = nrep > 0 && nkeep == 0;
    if (all_busy)
        for (int i = 0; i < nrep; i++) keep[nkeep++] = i;
    printf(",\"runs_busy\":%d,\"others_cores_max\":%.3f,\"medians_of_busy_runs\":%s", busy,
           others_max, all_busy ? "true" : "false");
    phase_result psk[MAX_REPEATS], tcpk[MAX_REPEATS], plaink[MAX_REPEATS];
    for (int k = 0; k < nkeep; k++) {
        psk[k] = ps[keep[k]];
        tcpk[k] = tcp[keep[k]];
        if (plain) plaink[k] = plain[keep[k]];
    }
    ps = psk;
    tcp = tcpk;
    if (plain) plain = plaink;
    nrep = nkeep;
    if (nrep > 0) {
        double cpu[MAX_REPEATS], tcpu[MAX_REPEATS], cratio[MAX_REPEATS];
        for (int i = 0; i < nrep; i++) {
            cpu[i] = cpu_us_per_mib(b, &ps[i]);
            tcpu[i] = cpu_us_per_mib(b, &tcp[i]);
            cratio[i] = tcpu[i] > 0 ? cpu[i] / tcpu[i] : 0;
            g[i] = gbps_of(b, &ps[i]);
            tg[i] = gbps_of(b, &tcp[i]);
            push[i] = ps[i].push_ms;
            pull[i] = ps[i].pull_ms;
            tpush[i] = tcp[i].push_ms;
            tpull[i] = tcp[i].pull_ms;
            ratio[i] = g[i] / tg[i];
        }
        double gm = bu_median(g, nrep), tgm = bu_median(tg, nrep);
        double ops = gm * 1e9 / (double)b->bytes; /* Pushes + pulls (a push-pull: 2) a second. */
        qsort(g, (size_t)nrep, sizeof *g, bu_cmp_double);
        qsort(tg, (size_t)nrep, sizeof *tg, bu_cmp_double);
        printf(",\"gbps\":%.4f,\"gbps_min\":%.4f,\"gbps_max\":%.4f,\"ops_per_sec\":%.1f,"
               "\"push_ms\":%.4f,\"pull_ms\":%.4f,\"tcp_gbps\":%.4f,\"tcp_gbps_min\":%.4f,"
               "\"tcp_gbps_max\":%.4f,\"tcp_push_ms\":%.4f,\"tcp_pull_ms\":%.4f,"
               "\"tcp_semantics\":\"async (store += pushed) in both modes\","
               "\"ratio_to_tcp\":%.3f",
               gm, g[0], g[nrep - 1], ops, bu_median(push, nrep), bu_median(pull, nrep), tgm, tg[0],
               tg[nrep - 1], bu_median(tpush, nrep), bu_median(tpull, nrep), bu_median(ratio, nrep));
        printf(",\"cpu_us_per_mib\":%.1f,\"tcp_cpu_us_per_mib\":%.1f,\"cpu_ratio_to_tcp\":%.3f",
               bu_median(cpu, nrep), bu_median(tcpu, nrep), bu_median(cratio, nrep));
        if (b->security != SEC_NONE) { /* The cost, run by run against its own plain phase. */
            double pg[MAX_REPEATS], cost[MAX_REPEATS];
            for (int i = 0; i < nrep; i++) {
                pg[i] = gbps_of(b, &plain[i]);
                cost[i] = 1.0 - gbps_of(b, &ps[i]) / pg[i];
            }
            printf(",\"plain_gbps\":%.4f,\"%s_cost\":%.4f", bu_median(pg, nrep),
                   b->security == SEC_METRICS ? "metrics" : "security", bu_median(cost, nrep));
        }
    }
    /* The verdict is "ok" or an error message. */
    printf(",\"check\":");
    bu_print_json_string(check);
    printf("}\n");
    fflush(stdout);
}

/* ================================================== driver: main */

static int parse_size(const char *s, size_t *out) {
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (end == s) return -1;
    if (*end == 'K' || *end == 'k') v <<= 10, end++;
    else if (*end == 'M' || *end == 'm') v <<= 20, end++;
    if (*end == 'i' || *end == 'B') end++;
    if (*end == 'B') end++;
    if (*end || v < 4 || v % 4 || v > ((unsigned long long)1 << 30)) return -1;
    *out = (size_t)v;
    return 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: psbench [options]\n"
            "The dense push-then-pull workload (S PS x W workers on 127.0.0.1) through\n"
            "psserver + ps_client, and the same bytes over plain TCP in the same run.\n"
            "Prints one JSON line per configuration; exits 1 if any check failed.\n"
            "Besides throughput, each line has the CPU time all of the benchmark's\n"
            "processes took per MiB moved (warm-up and timed steps, both ways; clock\n"
            "ticks): cpu_us_per_mib for the PS, tcp_cpu_us_per_mib, and their ratio.\n\n"
            "  --shapes SxW,...     servers x workers (default 1x1,2x2)\n"
            "  --modes M,...        async, sync (default both)\n"
            "  --sizes B,...        bytes per request: 4K, 1M, 16M (default all three)\n"
            "  --repeats N          runs per configuration; medians are reported (default 1)\n"
            "  --quick              a tenth of the timed iterations (smoke runs)\n"
            "  --warmup N, --iters N  override the warm-up and timed iterations\n"
            "  --timeout S          bound on the whole run, seconds (default 1800)\n"
            "  --security S,...     none, token (every call carries a token, the PS checks\n"
            "                       it), tls (token and TLS, a throwaway CA made with the\n"
            "                       openssl command); default none. Other than none, each\n"
            "                       run also times the PS without, and the line says the\n"
            "                       cost (security_cost: 1 - secured / plain throughput);\n"
            "                       metrics (not security: each psserver serves Prometheus\n"
            "                       metrics, scraped every 100 ms during the timed window;\n"
            "                       metrics_cost likewise)\n"
            "  --partition-bytes N  the PS's partitions of the vector: N bytes each (default\n"
            "                       262144, the PS's default); 0: one partition a PS\n"
            "  --call-bytes N       the client's calls: a shard's pushes and pulls of more\n"
            "                       than N bytes go as several calls at once (default 0:\n"
            "                       the client's default, 512 KiB); -1: one call a shard\n"
            "  --call-window N      of a shard's calls, N in flight at once (default 0: the\n"
            "                       client's default, 3); -1: all at once\n"
            "  --op OP              push-then-pull (default): a push, then a pull, each\n"
            "                       waited for; push-pull: one request that pushes and\n"
            "                       pulls back (pstrain's sync steps; TCP likewise).\n"
            "                       gbps counts the bytes both ways either way, and\n"
            "                       ops_per_sec a push-pull as two (a push and a pull);\n"
            "                       push_ms is then the whole request, pull_ms 0\n"
            "  --spin-us N          the client's spin before it sleeps in a wait, µs\n"
            "                       (ps_client_cfg.spin_us; default 0: none)\n"
            "  --poll-spin-us N     the gRPC threads' poll before they sleep, µs, in the\n"
            "                       PS and the clients (default 0: theirs, 50; -1: none)\n"
            "  --calls C            stream (default): pushes and pulls go on the client's\n"
            "                       gRPC streams; unary: a gRPC call each\n"
            "                       (ps_client_cfg.unary)\n"
            "  --bin-dir DIR        where psserver is (default <this binary's dir>/../bin)\n"
            "  -h, --help           this text\n");
}

/* One configuration from its three list entries, with the reference's
 * iteration counts for its size class. Returns 0, or -1 if it is invalid. */
static int parse_cfg(const opts *o, const char *shape, const char *mode, const char *size,
                     const char *security, bench_cfg *b) {
    *b = (bench_cfg){0};
    b->security = -1;
    for (int i = 0; i < SEC_N; i++)
        if (!strcmp(security, sec_names[i])) b->security = i;
    if (b->security < 0) {
        fprintf(stderr, "psbench: --security takes none, token, tls and metrics, not '%s'\n",
                security);
        return -1;
    }
    if (sscanf(shape, "%dx%d", &b->servers, &b->workers) != 2 || b->servers < 1 ||
        b->workers < 1 || b->servers > BU_MAX_PROCS || b->workers > BU_MAX_PROCS ||
        (strcmp(mode, "sync") && strcmp(mode, "async")) || parse_size(size, &b->bytes) ||
        b->bytes / sizeof(float) < (size_t)b->servers) {
        fprintf(stderr, "psbench: bad configuration %s %s %s\n", shape, mode, size);
        return -1;
    }
    b->sync = !strcmp(mode, "sync");
    /* The 4 KiB, 1 MiB and 16 MiB classes of the reference. */
    b->warmup = b->bytes <= (64 << 10) ? 300 : b->bytes <= (4 << 20) ? 30 : 5;
    b->iters = b->bytes <= (64 << 10) ? 3000 : b->bytes <= (4 << 20) ? 300 : 40;
    if (o->quick) b->iters /= 10;
    if (o->warmup >= 0) b->warmup = o->warmup;
    if (o->iters > 0) b->iters = o->iters;
    return 0;
}

/* Run one configuration o->repeats times and print its line: each run is a
 * PS phase and a TCP phase back to back, the PS first in even runs and TCP
 * first in odd ones, so that a drift of the machine across a run favours
 * neither (the ratio is the median of the runs' own). Returns 0, or -1 if a
 * run failed or its check did. */
static int run_config(bu_driver *d, const opts *o, const bench_cfg *b) {
    phase_result ps[MAX_REPEATS], plain[MAX_REPEATS], tcp[MAX_REPEATS];
    char err[512] = "ok";
    const char *mode = b->sync ? "sync" : "async";
    bench_cfg nb = *b;
    nb.security = SEC_NONE;
    double load[2] = {bu_load_average(), 0};
    int nrep = 0;
    for (; nrep < o->repeats; nrep++) {
        /* With security, its plain twin first, so that each run holds its
         * own reference (alternating phases: a burst of load hits both). */
        int tcp_first = nrep % 2 == 1;
        if ((tcp_first && run_tcp(d, b, &tcp[nrep], err, sizeof err) != CM_OK) ||
            (b->security != SEC_NONE && run_ps(d, &nb, &plain[nrep], err, sizeof err) != CM_OK) ||
            run_ps(d, b, &ps[nrep], err, sizeof err) != CM_OK ||
            (!tcp_first && run_tcp(d, b, &tcp[nrep], err, sizeof err) != CM_OK))
            break;
        fprintf(stderr, "psbench: %dx%d %s %zu B %s run %d/%d: PS %.3f GB/s, TCP %.3f GB/s\n",
                b->servers, b->workers, mode, b->bytes, sec_names[b->security], nrep + 1,
                o->repeats, gbps_of(b, &ps[nrep]), gbps_of(b, &tcp[nrep]));
    }
    int failed = nrep < o->repeats;
    if (!failed && b->security == SEC_METRICS && d->scrapes == 0) {
        snprintf(err, sizeof err, "no metrics scrape was answered");
        failed = 1;
    }
    if (b->security == SEC_METRICS)
        fprintf(stderr, "psbench: %llu metrics scrapes answered\n",
                (unsigned long long)d->scrapes);
    d->scrapes = 0;
    if (failed)
        fprintf(stderr, "psbench: %dx%d %s %zu B: %s\n", b->servers, b->workers, mode, b->bytes,
                err);
    load[1] = bu_load_average();
    report(b, ps, plain, tcp, failed ? 0 : nrep, load, err);
    return failed ? -1 : 0;
}

static int driver_main(const opts *o) {
    bu_driver *d = cm_calloc(1, sizeof *d);
    char *copies[4] = {NULL, NULL, NULL, NULL}, *shapes[MAX_LIST], *modes[MAX_LIST],
         *sizes[MAX_LIST], *secs[MAX_LIST];
    bench_cfg *cfgs = NULL;
    int status = 1, ncfgs = 0, failures = 0;
    if (bu_driver_init(d, "psbench", o->bin_dir)) goto fail;
    int nshapes = bu_split_list(o->shapes ? o->shapes : "1x1,2x2", &copies[0], shapes, MAX_LIST);
    int nmodes = bu_split_list(o->modes ? o->modes : "async,sync", &copies[1], modes, MAX_LIST);
    int nsizes = bu_split_list(o->sizes ? o->sizes : "4K,1M,16M", &copies[2], sizes, MAX_LIST);
    int nsecs = bu_split_list(o->security ? o->security : "none", &copies[3], secs, MAX_LIST);
    if (nshapes < 1 || nmodes < 1 || nsizes < 1 || nsecs < 1) {
        fprintf(stderr, "psbench: empty or too long --shapes, --modes, --sizes or --security\n");
        goto fail;
    }
    /* Every configuration is checked before the first one runs. */
    cfgs = cm_calloc((size_t)(nshapes * nmodes * nsizes * nsecs), sizeof *cfgs);
    int want_token = 0, want_tls = 0;
    for (int si = 0; si < nshapes; si++)
        for (int mi = 0; mi < nmodes; mi++)
            for (int zi = 0; zi < nsizes; zi++)
                for (int ki = 0; ki < nsecs; ki++) {
                    bench_cfg *b = &cfgs[ncfgs++];
                    if (parse_cfg(o, shapes[si], modes[mi], sizes[zi], secs[ki], b)) goto fail;
                    want_token |= b->security == SEC_TOKEN || b->security == SEC_TLS;
                    want_tls |= b->security == SEC_TLS;
                }
    if (want_token && make_sec_files(want_tls)) goto fail;
    /* Children log only warnings unless the caller asked otherwise. */
    setenv("PS_LOG_LEVEL", "warn", 0);
    bu_catch_signals(bu_on_signal);
    d->deadline = cm_now() + o->timeout_s;
    for (int i = 0; i < ncfgs && !bu_got_signal && cm_now() < d->deadline; i++)
        if (run_config(d, o, &cfgs[i])) failures++;
    status = failures || bu_got_signal || cm_now() >= d->deadline ? 1 : 0;
fail:
    bu_stop_all(d);
    remove_sec_files();
    for (int i = 0; i < 4; i++) free(copies[i]);
    free(cfgs);
    free(d);
    return status;
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {
        {"role", required_argument, 0, 'r'},     {"sizes", required_argument, 0, 'z'},
        {"shapes", required_argument, 0, 's'},   {"modes", required_argument, 0, 'm'},
        {"bin-dir", required_argument, 0, 'b'},  {"quick", no_argument, 0, 'q'},
        {"repeats", required_argument, 0, 'R'},  {"warmup", required_argument, 0, 'W'},
        {"iters", required_argument, 0, 'I'},    {"timeout", required_argument, 0, 'T'},
        {"rank", required_argument, 0, 'k'},     {"workers", required_argument, 0, 'w'},
        {"mode", required_argument, 0, 'M'},     {"elems", required_argument, 0, 'e'},
        {"ps-addrs", required_argument, 0, 'p'}, {"tcp-ports", required_argument, 0, 't'},
        {"security", required_argument, 0, 'S'}, {"token-file", required_argument, 0, 'F'},
        {"tls-ca", required_argument, 0, 'C'},
        {"partition-bytes", required_argument, 0, 'P'}, {"call-bytes", required_argument, 0, 'B'},
        {"call-window", required_argument, 0, 'J'}, {"op", required_argument, 0, 'O'},
        {"spin-us", required_argument, 0, 'U'}, {"calls", required_argument, 0, 'L'},
        {"poll-spin-us", required_argument, 0, 'Y'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    opts o = {.repeats = 1, .warmup = -1, .timeout_s = 1800.0, .workers = 1};
    cm_mem_keep_freed(); /* As psserver and pstrain do. */
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'r': o.role = optarg; break;
        case 'z': o.sizes = optarg; break;
        case 's': o.shapes = optarg; break;
        case 'm': o.modes = optarg; break;
        case 'b': o.bin_dir = optarg; break;
        case 'q': o.quick = 1; break;
        case 'R': o.repeats = atoi(optarg); break;
        case 'W': o.warmup = atoi(optarg); break;
        case 'I': o.iters = atoi(optarg); break;
        case 'T': o.timeout_s = atof(optarg); break;
        case 'k': o.rank = atoi(optarg); break;
        case 'w': o.workers = atoi(optarg); break;
        case 'M': o.sync = !strcmp(optarg, "sync"); break;
        case 'e': o.elems = (size_t)strtoull(optarg, NULL, 10); break;
        case 'p': o.ps_addrs = optarg; break;
        case 't': o.tcp_ports = optarg; break;
        case 'S': o.security = optarg; break;
        case 'F': o.token_file = optarg; break;
        case 'C': o.tls_ca = optarg; break;
        case 'P': g_part_bytes = atol(optarg); break;
        case 'B': g_call_bytes = atol(optarg); break;
        case 'J': g_call_window = atol(optarg); break;
        case 'U': g_spin_us = atol(optarg); break;
        case 'Y': g_poll_spin = atol(optarg); break;
        case 'L':
            if (bu_parse_calls("psbench", optarg, &g_unary)) return 2;
            break;
        case 'O':
            if (strcmp(optarg, "push-pull") && strcmp(optarg, "push-then-pull")) {
                fprintf(stderr, "psbench: --op: push-then-pull or push-pull, not '%s'\n", optarg);
                return 2;
            }
            g_pushpull = !strcmp(optarg, "push-pull");
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc || o.repeats < 1 || o.repeats > MAX_REPEATS || o.timeout_s <= 0 ||
        g_part_bytes < 0 || g_spin_us < 0 || g_spin_us > 1000000 || g_poll_spin < -1 ||
        g_poll_spin > 1000000) {
        usage(stderr);
        return 2;
    }
    if (!o.role) return driver_main(&o);
    /* A role process dies with the driver, so nothing outlives a killed run. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) return 1;
    int is_server = !strcmp(o.role, "tcp-server");
    if (o.elems < 1 || (!is_server && (o.workers < 1 || o.rank < 0 || o.rank >= o.workers ||
                                       o.warmup < 0 || o.iters < 1))) {
        fprintf(stderr, "psbench: bad arguments for --role %s\n", o.role);
        return 2;
    }
    if (!strcmp(o.role, "worker")) return ps_worker_main(&o);
    if (is_server) return tcp_server_main(&o);
    if (!strcmp(o.role, "tcp-worker")) return tcp_worker_main(&o);
    fprintf(stderr, "psbench: unknown --role %s\n", o.role);
    return 2;
}
