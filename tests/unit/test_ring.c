/* test_ring.c - unit tests for the ring AllReduce (worker/sync/wk_ring.c).
 * SPDX-License-Identifier: MIT
 *
 * Ranks are threads of this process on 127.0.0.1 with free ports. Integer
 * inputs must sum exactly, random ones match a double-precision reference,
 * and every rank must end bit-identical. Misbehaving peers are played with
 * raw sockets speaking the wire format of wk_ring_int.h. Every wait is
 * bounded by the ring's own timeouts. The same sums and broadcasts run again
 * over the shared-memory transport, whose peers are also forked processes
 * killed by SIGKILL (the survivor must fail, not hang), and with the
 * halving-doubling algorithm on 4 and 8 ranks.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <float.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "worker/sync/wk_ring.h"
#include "worker/sync/wk_ring_int.h"
#include "tests/unit/tu_port.h"

#define MAX_N 8
#define RING_MAX_N 5 /* The ring's sweeps: 1 .. 5 ranks. */
#define BIG (1048576 + 3) /* 4 MiB: several chunks per segment at 1 MiB and 256 KiB. */

/* ===== Running N ranks as threads ===== */

typedef struct rank_ctx rank_ctx;
typedef void (*ring_work)(rank_ctx *c, wk_ring *ring);

struct rank_ctx {
    int rank, nranks;
    wk_ring_listener *l;
    const char *const *addrs;
    const wk_ring_opts *opts;
    ring_work work;
    void *arg;
    int connect_rc, rc; /* wk_ring_connect's, the work's. */
    int bad;            /* Elements the work found wrong. */
    char err[512];
};

static void *rank_main(void *p) {
    rank_ctx *c = p;
    wk_ring *ring = NULL;
    c->connect_rc = wk_ring_connect(c->l, c->rank, c->nranks, c->addrs, c->opts, &ring, c->err,
                                    sizeof c->err);
    if (c->connect_rc == CM_OK) {
        c->rc = CM_OK;
        /* A ring asked for shared memory uses it on both links. */
        if (c->opts && c->opts->transport == WK_RING_SHM && c->nranks > 1 &&
            strcmp(wk_ring_transport(ring), "shm") != 0)
            c->bad++;
        c->work(c, ring);
        if (c->rc != CM_OK) snprintf(c->err, sizeof c->err, "%s", wk_ring_error(ring));
    }
    wk_ring_destroy(ring);
    return NULL;
}

/* Listen on 127.0.0.1:port (0: a free one) and write "127.0.0.1:P" to addr. */
static void listen_at(int port, wk_ring_listener **l, char addr[64]) {
    char err[256];
    assert_int_equal(wk_ring_listen("127.0.0.1", port, l, err, sizeof err), CM_OK);
    snprintf(addr, 64, "127.0.0.1:%d", wk_ring_listener_port(*l));
}

/* Listen for every rank, then run work on each in its own thread. */
static void run_ranks(int n, const wk_ring_opts *opts, ring_work work, void *arg,
                      rank_ctx *ctx) {
    wk_ring_listener *ls[MAX_N] = {0};
    char addr_buf[MAX_N][64];
    const char *addrs[MAX_N];
    pthread_t th[MAX_N];
    for (int i = 0; i < n; i++) {
        listen_at(0, &ls[i], addr_buf[i]);
        addrs[i] = addr_buf[i];
    }
    for (int i = 0; i < n; i++) {
        ctx[i] = (rank_ctx){.rank = i, .nranks = n, .l = ls[i], .addrs = addrs, .opts = opts,
                            .work = work, .arg = arg, .connect_rc = CM_EAGAIN};
        assert_int_equal(pthread_create(&th[i], NULL, rank_main, &ctx[i]), 0);
    }
    for (int i = 0; i < n; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < n; i++) wk_ring_listener_destroy(ls[i]);
}

static void expect_all_ok(const rank_ctx *ctx, int n) {
    for (int i = 0; i < n; i++) {
        if (ctx[i].connect_rc != CM_OK || ctx[i].rc != CM_OK || ctx[i].bad)
            fprintf(stderr, "rank %d of %d: connect %d, rc %d, bad %d: %s\n", i, n,
                    ctx[i].connect_rc, ctx[i].rc, ctx[i].bad, ctx[i].err);
        assert_int_equal(ctx[i].connect_rc, CM_OK);
        assert_int_equal(ctx[i].rc, CM_OK);
        assert_int_equal(ctx[i].bad, 0);
    }
}

/* The transport and algorithm the correctness tests use (the shm and
 * halving-doubling variants set them). */
static int g_transport = WK_RING_TCP;
static int g_algorithm = WK_RING_ALG_RING;

static void small_timeouts(wk_ring_opts *o) {
    wk_ring_opts_default(o);
    o->timeout_ms = 10000;
    o->connect_timeout_ms = 10000;
    o->transport = g_transport;
    o->algorithm = g_algorithm;
}

/* The rank counts a sweep covers: 1 .. 5 for the ring, 4 and 8 for
 * halving-doubling (which needs a power of two >= 4). */
static int sweep_has(int n, int from) {
    if (g_algorithm == WK_RING_ALG_HD) return n == 4 || n == 8;
    return n >= from && n <= RING_MAX_N;
}

/* ===== Exact sums of integer-valued inputs ===== */

typedef struct int_job {
    size_t n;
    int steps;
} int_job;

/* Small integers, so every partial sum is exact in float. */
static float int_input(int rank, size_t i, int step) {
    return (float)((int)((i * 7 + (size_t)rank * 13 + (size_t)step * 31) % 1001) - 500);
}

static void int_work(rank_ctx *c, wk_ring *ring) {
    const int_job *j = c->arg;
    float *x = malloc((j->n ? j->n : 1) * sizeof *x);
    for (int s = 0; s < j->steps && c->rc == CM_OK; s++) {
        for (size_t i = 0; i < j->n; i++) x[i] = int_input(c->rank, i, s);
        c->rc = wk_ring_allreduce(ring, x, j->n, s, 0);
        for (size_t i = 0; i < j->n && c->rc == CM_OK; i++) {
            float want = 0;
            for (int r = 0; r < c->nranks; r++) want += int_input(r, i, s);
            if (x[i] != want) c->bad++;
        }
    }
    free(x);
}

static void check_int_sums(size_t chunk_bytes, int with_big) {
    wk_ring_opts o;
    small_timeouts(&o);
    if (chunk_bytes) o.chunk_bytes = chunk_bytes;
    rank_ctx ctx[MAX_N];
    for (int n = 1; n <= MAX_N; n++) {
        if (!sweep_has(n, 1)) continue;
        size_t sizes[] = {0, 1, 7, (size_t)(n * 1000 + (n > 1 ? n - 1 : 0)), BIG};
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0] - !with_big; k++) {
            int_job j = {sizes[k], sizes[k] == BIG ? 2 : 3};
            run_ranks(n, &o, int_work, &j, ctx);
            expect_all_ok(ctx, n);
        }
    }
}

static void test_int_sums_exact(void **state) {
    (void)state;
    check_int_sums(0, 1);
}

/* Tiny chunks: many chunks per segment even for small buffers, so the
 * pipeline runs many chunks deep. */
static void test_int_sums_tiny_chunks(void **state) {
    (void)state;
    check_int_sums(12, 0);
}

/* ===== Random floats against a double reference; bit-identical ranks ===== */

#define RND_N 100003
#define RND_STEPS 3

typedef struct rnd_job {
    int average;
    float *out[MAX_N][RND_STEPS]; /* Each rank's result of each step. */
} rnd_job;

static float rnd_input(int rank, size_t i, int step) {
    uint64_t key = cm_mix64((uint64_t)rank * 1000 + (uint64_t)step + 1);
    return 2.0f * cm_randf(key, i) - 1.0f;
}

static void rnd_work(rank_ctx *c, wk_ring *ring) {
    rnd_job *j = c->arg;
    for (int s = 0; s < RND_STEPS && c->rc == CM_OK; s++) {
        float *x = j->out[c->rank][s];
        for (size_t i = 0; i < RND_N; i++) x[i] = rnd_input(c->rank, i, s);
        c->rc = wk_ring_allreduce(ring, x, RND_N, 100 + s, j->average);
    }
}

static void check_random(int average) {
    wk_ring_opts o;
    small_timeouts(&o);
    o.chunk_bytes = 16 << 10;
    o.spin_us = average ? 20 : 0; /* Both ways of waiting. */
    rank_ctx ctx[MAX_N];
    for (int n = 2; n <= MAX_N; n++) {
        if (!sweep_has(n, 2)) continue;
        rnd_job j = {.average = average};
        for (int r = 0; r < n; r++)
            for (int s = 0; s < RND_STEPS; s++) j.out[r][s] = malloc(RND_N * sizeof(float));
        run_ranks(n, &o, rnd_work, &j, ctx);
        expect_all_ok(ctx, n);
        /* |float sum - exact| <= (n-1) eps sum|x| for any order; then one
         * rounding more for the division. */
        for (int s = 0; s < RND_STEPS; s++) {
            for (int r = 1; r < n; r++)
                assert_memory_equal(j.out[0][s], j.out[r][s], RND_N * sizeof(float));
            for (size_t i = 0; i < RND_N; i++) {
                double ref = 0, mag = 0;
                for (int r = 0; r < n; r++) {
                    ref += rnd_input(r, i, s);
                    mag += fabs(rnd_input(r, i, s));
                }
                double scale = average ? n : 1;
                double tol = (n * (double)FLT_EPSILON * mag + (double)FLT_MIN) / scale;
                double e = fabs(j.out[0][s][i] - ref / scale);
                if (e > tol) fail_msg("n %d step %d [%zu]: %.9g vs %.9g", n, s, i,
                                      j.out[0][s][i], ref / scale);
            }
        }
        for (int r = 0; r < n; r++)
            for (int s = 0; s < RND_STEPS; s++) free(j.out[r][s]);
    }
}

static void test_random_sum_close_and_identical(void **state) {
    (void)state;
    check_random(0);
}

static void test_random_mean_close_and_identical(void **state) {
    (void)state;
    check_random(1);
}

/* ===== Broadcast ===== */

typedef struct bcast_job {
    size_t n;
    int root;
} bcast_job;

static void bcast_work(rank_ctx *c, wk_ring *ring) {
    const bcast_job *j = c->arg;
    float *x = malloc((j->n ? j->n : 1) * sizeof *x);
    for (size_t i = 0; i < j->n; i++) x[i] = c->rank == j->root ? (float)i : -1.0f;
    c->rc = wk_ring_broadcast(ring, x, j->n, 0, j->root);
    for (size_t i = 0; i < j->n && c->rc == CM_OK; i++) c->bad += x[i] != (float)i;
    free(x);
}

static void test_broadcast(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    o.chunk_bytes = 4096;
    rank_ctx ctx[MAX_N];
    for (int n = 1; n <= 4; n++) {
        for (int root = 0; root < n; root++) {
            bcast_job j = {10007, root};
            run_ranks(n, &o, bcast_work, &j, ctx);
            expect_all_ok(ctx, n);
        }
    }
}

/* ===== Arguments ===== */

static void test_single_rank_and_bad_args(void **state) {
    (void)state;
    wk_ring *ring = NULL;
    char err[256];
    assert_int_equal(wk_ring_connect(NULL, 0, 1, NULL, NULL, &ring, err, sizeof err), CM_OK);
    float x[3] = {1.5f, -2, 3};
    assert_int_equal(wk_ring_allreduce(ring, x, 3, 0, 1), CM_OK);
    assert_true(x[0] == 1.5f && x[1] == -2 && x[2] == 3);
    assert_int_equal(wk_ring_allreduce(ring, NULL, 0, 1, 0), CM_OK);
    assert_int_equal(wk_ring_broadcast(ring, x, 3, 2, 1), CM_EINVAL);
    assert_int_equal(wk_ring_size(ring), 1);
    assert_string_equal(wk_ring_error(ring), "");
    wk_ring_destroy(ring);
    wk_ring_destroy(NULL);
    wk_ring_listener_destroy(NULL);
    assert_int_equal(wk_ring_connect(NULL, 2, 2, NULL, NULL, &ring, err, sizeof err), CM_EINVAL);
    assert_null(ring);
    wk_ring_listener *l = NULL;
    assert_int_equal(wk_ring_listen("no-such-host.invalid", 0, &l, err, sizeof err), CM_EINVAL);
    assert_null(l);
}

/* Two jobs' ranks meet: both sides refuse, fast, naming the job. */
typedef struct job_ids {
    uint64_t id[2];
} job_ids;

static void *wrong_job_rank(void *p) {
    rank_ctx *c = p;
    wk_ring_opts o = *c->opts;
    o.job_id = ((job_ids *)c->arg)->id[c->rank];
    c->opts = &o;
    wk_ring *ring = NULL;
    c->connect_rc = wk_ring_connect(c->l, c->rank, c->nranks, c->addrs, &o, &ring, c->err,
                                    sizeof c->err);
    c->opts = NULL;
    wk_ring_destroy(ring);
    return NULL;
}

static void test_wrong_job_refused(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    o.connect_timeout_ms = 3000;
    job_ids ids = {{0x1111, 0x2222}};
    wk_ring_listener *ls[2];
    char a[2][64];
    const char *addrs[2] = {a[0], a[1]};
    rank_ctx ctx[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) listen_at(0, &ls[i], a[i]);
    double t0 = cm_now();
    for (int i = 0; i < 2; i++) {
        ctx[i] = (rank_ctx){.rank = i, .nranks = 2, .l = ls[i], .addrs = addrs, .opts = &o,
                            .arg = &ids};
        assert_int_equal(pthread_create(&th[i], NULL, wrong_job_rank, &ctx[i]), 0);
    }
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) wk_ring_listener_destroy(ls[i]);
    for (int i = 0; i < 2; i++) {
        assert_int_not_equal(ctx[i].connect_rc, CM_OK);
        assert_non_null(strstr(ctx[i].err, "job"));
    }
    assert_true(cm_now() - t0 < 2.5); /* Refused, not timed out. */
}

/* Ranks that disagree on 'average' fail instead of mixing sums and means. */
static void mixed_average_work(rank_ctx *c, wk_ring *ring) {
    float x[4] = {1, 2, 3, 4};
    c->rc = wk_ring_allreduce(ring, x, 4, 0, c->rank == 0);
}

static void test_mismatched_average_refused(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    rank_ctx ctx[2];
    run_ranks(2, &o, mixed_average_work, NULL, ctx);
    /* The first to read a chunk refuses it and hangs up; the other may see
     * either the chunk or the hang-up first. */
    int refused = 0;
    for (int i = 0; i < 2; i++) {
        assert_int_equal(ctx[i].connect_rc, CM_OK);
        assert_true(ctx[i].rc == CM_EPROTO || ctx[i].rc == CM_EUNAVAIL);
        refused += ctx[i].rc == CM_EPROTO && strstr(ctx[i].err, "(average 1)") != NULL;
    }
    assert_true(refused >= 1);
}

static void sum3_work(rank_ctx *c, wk_ring *ring) {
    float x[3] = {1, 2, 3};
    c->rc = wk_ring_allreduce(ring, x, 3, 0, 0);
    c->bad += x[0] != 2 || x[1] != 4 || x[2] != 6;
}

/* A port nothing listens on, below the ephemeral range (tu_port.h): rank 0
 * connects to it before anything listens there. */
static int free_port(void) {
    int port = tu_free_port();
    assert_true(port > 0);
    return port;
}

static void test_connect_gives_up_naming_the_peer(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    o.connect_timeout_ms = 500;
    char a[2][64];
    const char *addrs[2] = {a[0], a[1]};
    rank_ctx c = {.rank = 0, .nranks = 2, .addrs = addrs, .opts = &o, .work = sum3_work};
    listen_at(0, &c.l, a[0]);
    snprintf(a[1], sizeof a[1], "127.0.0.1:%d", free_port());
    double t0 = cm_now();
    rank_main(&c);
    double t = cm_now() - t0;
    wk_ring_listener_destroy(c.l);
    assert_int_equal(c.connect_rc, CM_EUNAVAIL);
    assert_non_null(strstr(c.err, "cannot connect to rank 1 at 127.0.0.1:"));
    assert_true(t >= 0.45 && t < 3.0);
}

/* Rank 1 starts listening 300 ms after rank 0 began to connect. */
static void test_connect_retries_until_peer_listens(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    o.connect_timeout_ms = 5000;
    char a[2][64];
    const char *addrs[2] = {a[0], a[1]};
    rank_ctx ctx[2];
    pthread_t th[2];
    int port1 = free_port();
    for (int i = 0; i < 2; i++)
        ctx[i] = (rank_ctx){.rank = i, .nranks = 2, .addrs = addrs, .opts = &o,
                            .work = sum3_work, .connect_rc = CM_EAGAIN};
    listen_at(0, &ctx[0].l, a[0]);
    snprintf(a[1], sizeof a[1], "127.0.0.1:%d", port1);
    assert_int_equal(pthread_create(&th[0], NULL, rank_main, &ctx[0]), 0);
    struct timespec pause = {0, 300 * 1000000L};
    nanosleep(&pause, NULL);
    listen_at(port1, &ctx[1].l, a[1]);
    assert_int_equal(pthread_create(&th[1], NULL, rank_main, &ctx[1]), 0);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) wk_ring_listener_destroy(ctx[i].l);
    expect_all_ok(ctx, 2);
}

/* ===== A fake rank 1 of 2, speaking raw bytes ===== */

typedef struct fake_peer {
    int listen_fd, port;
    int in_fd, out_fd; /* From rank 0, to rank 0. */
} fake_peer;

static void fake_listen(fake_peer *f) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof a;
    f->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(f->listen_fd >= 0);
    assert_int_equal(bind(f->listen_fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(f->listen_fd, 4), 0);
    assert_int_equal(getsockname(f->listen_fd, (struct sockaddr *)&a, &sl), 0);
    f->port = ntohs(a.sin_port);
    f->in_fd = f->out_fd = -1;
}

static void read_exact(int fd, void *buf, size_t len) {
    unsigned char *p = buf;
    while (len > 0) {
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        assert_int_equal(poll(&pf, 1, 5000), 1);
        ssize_t g = recv(fd, p, len, 0);
        assert_true(g > 0);
        p += g;
        len -= (size_t)g;
    }
}

static void write_exact(int fd, const void *buf, size_t len) {
    assert_int_equal(send(fd, buf, len, MSG_NOSIGNAL), (ssize_t)len);
}

/* Play rank 1's side of the handshake with rank 0 listening on port0. */
static void fake_handshake(fake_peer *f, int port0, uint64_t job) {
    unsigned char hello[WK_RING__HELLO_BYTES], got[WK_RING__HELLO_BYTES];
    wk_ring__hello me = {WK_RING__HELLO_MAGIC, WK_RING__VERSION, job, 2, 1}, h;
    wk_ring__hello_pack(&me, hello);
    struct pollfd pf = {.fd = f->listen_fd, .events = POLLIN};
    assert_int_equal(poll(&pf, 1, 5000), 1);
    f->in_fd = accept(f->listen_fd, NULL, NULL);
    assert_true(f->in_fd >= 0);
    read_exact(f->in_fd, got, sizeof got);
    wk_ring__hello_unpack(got, &h);
    assert_int_equal(h.rank, 0);
    assert_int_equal(h.nranks, 2);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port0),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    f->out_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_int_equal(connect(f->out_fd, (struct sockaddr *)&a, sizeof a), 0);
    write_exact(f->out_fd, hello, sizeof hello);
    read_exact(f->out_fd, got, sizeof got);
    write_exact(f->in_fd, hello, sizeof hello);
}

static void fake_close(fake_peer *f) {
    if (f->in_fd >= 0) close(f->in_fd);
    if (f->out_fd >= 0) close(f->out_fd);
    close(f->listen_fd);
    f->in_fd = f->out_fd = -1;
}

#define FAKE_N 8 /* Rank 0 receives segment 1 first: floats [4, 8). */

typedef struct solo {
    rank_ctx c;
    wk_ring_listener *l;
    const char *addrs[2];
    char a[2][64];
    int rc2;   /* A second call after the failure. */
    double t;  /* Seconds the failing call took. */
} solo;

static void solo_work(rank_ctx *c, wk_ring *ring) {
    solo *s = (solo *)c; /* c is the first member. */
    float x[FAKE_N] = {0};
    double t0 = cm_now();
    c->rc = wk_ring_allreduce(ring, x, FAKE_N, 5, 0);
    s->t = cm_now() - t0;
    s->rc2 = wk_ring_allreduce(ring, x, FAKE_N, 6, 0);
    if (wk_ring_status(ring) != c->rc) c->bad++;
}

/* Start the real rank 0 against fake rank 1 and do the handshake. */
static void solo_start(solo *s, fake_peer *f, const wk_ring_opts *o, pthread_t *th) {
    fake_listen(f);
    listen_at(0, &s->l, s->a[0]);
    snprintf(s->a[1], sizeof s->a[1], "127.0.0.1:%d", f->port);
    s->addrs[0] = s->a[0];
    s->addrs[1] = s->a[1];
    s->c = (rank_ctx){.rank = 0, .nranks = 2, .l = s->l, .addrs = s->addrs, .opts = o,
                      .work = solo_work, .arg = NULL, .connect_rc = CM_EAGAIN};
    assert_int_equal(pthread_create(th, NULL, rank_main, &s->c), 0);
    fake_handshake(f, wk_ring_listener_port(s->l), o->job_id);
}

static void solo_finish(solo *s, fake_peer *f, pthread_t th) {
    pthread_join(th, NULL);
    fake_close(f);
    wk_ring_listener_destroy(s->l);
    assert_int_equal(s->c.connect_rc, CM_OK);
    assert_int_equal(s->rc2, s->c.rc); /* Sticky. */
    assert_int_equal(s->c.bad, 0);
    assert_non_null(strstr(s->c.err, "rank 1 (127.0.0.1:"));
}

static void send_chunk(fake_peer *f, int64_t step, uint64_t offset, uint32_t len) {
    wk_ring__hdr h = {WK_RING__CHUNK_MAGIC, WK_RING__OP_ALLREDUCE, 0, step, FAKE_N, offset,
                      len, 0};
    unsigned char buf[WK_RING__HDR_BYTES + 16] = {0};
    wk_ring__hdr_pack(&h, buf);
    write_exact(f->out_fd, buf, sizeof buf);
}

typedef enum { FAKE_SILENT, FAKE_CLOSE, FAKE_CHUNK } fake_act;

/* Rank 0 against a fake rank 1 that, after the handshake, does 'act' (a
 * chunk header with step, offset and len, then 16 bytes). */
static void solo_case(const wk_ring_opts *o, fake_act act, int64_t step, uint64_t offset,
                      uint32_t len, solo *s) {
    fake_peer f;
    pthread_t th;
    solo_start(s, &f, o, &th);
    if (act == FAKE_CHUNK) send_chunk(&f, step, offset, len);
    if (act == FAKE_CLOSE) {
        close(f.in_fd);
        close(f.out_fd);
        f.in_fd = f.out_fd = -1;
    }
    solo_finish(s, &f, th); /* A silent fake waits until rank 0 gives up. */
}

static void bad_chunk_case(int64_t step, uint64_t offset, uint32_t len, const char *want) {
    wk_ring_opts o;
    small_timeouts(&o);
    o.job_id = 42;
    solo s;
    solo_case(&o, FAKE_CHUNK, step, offset, len, &s);
    assert_int_equal(s.c.rc, CM_EPROTO);
    if (!strstr(s.c.err, want)) fail_msg("'%s' does not say '%s'", s.c.err, want);
}

static void test_chunk_wrong_length(void **state) {
    (void)state;
    bad_chunk_case(5, 4, 12, "wrong length");
}

static void test_chunk_wrong_step(void **state) {
    (void)state;
    bad_chunk_case(9, 4, 16, "step 9 during step 5");
}

static void test_chunk_wrong_offset(void **state) {
    (void)state;
    bad_chunk_case(5, 0, 16, "offset");
}

static void test_peer_closes(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    solo s;
    solo_case(&o, FAKE_CLOSE, 0, 0, 0, &s);
    assert_int_equal(s.c.rc, CM_EUNAVAIL);
    assert_true(s.t < 5.0);
}

static void test_peer_silent_times_out(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    o.timeout_ms = 300;
    solo s;
    solo_case(&o, FAKE_SILENT, 0, 0, 0, &s);
    assert_int_equal(s.c.rc, CM_ETIMEDOUT);
    assert_non_null(strstr(s.c.err, "300 ms"));
    assert_true(s.t >= 0.25 && s.t < 3.0);
}

/* A rendezvous hands out the addresses of listeners that exist: with
 * peers_listening a refused connection means the peer is gone, and
 * wk_ring_connect fails at once instead of retrying for connect_timeout_ms. */
static void test_peers_listening_fail_fast(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    o.peers_listening = 1;
    wk_ring_listener *ls[2];
    char a[2][64];
    const char *addrs[2] = {a[0], a[1]};
    for (int i = 0; i < 2; i++) listen_at(0, &ls[i], a[i]);
    wk_ring_listener_destroy(ls[1]); /* Rank 1 died after it listened. */
    wk_ring *ring = NULL;
    char err[512];
    double t0 = cm_now();
    int rc = wk_ring_connect(ls[0], 0, 2, addrs, &o, &ring, err, sizeof err);
    assert_int_equal(rc, CM_EUNAVAIL);
    assert_null(ring);
    assert_non_null(strstr(err, "gone"));
    assert_true(cm_now() - t0 < 2.0);
    wk_ring_listener_destroy(ls[0]);
}

/* ===== Halving-doubling ===== */

static void test_hd_sums_and_means(void **state) {
    (void)state;
    g_algorithm = WK_RING_ALG_HD;
    check_int_sums(0, 1);
    check_int_sums(12, 0); /* Steps overlap chunk by chunk. */
    check_random(0);
    check_random(1);
    g_algorithm = WK_RING_ALG_RING;
}

/* What each rank ran, by size: auto takes halving-doubling up to
 * WK_RING_HD_MAX on 4 and 8 ranks over TCP, the ring otherwise; broadcast
 * still works on a halving-doubling ring. */
typedef struct alg_job {
    size_t n;
    const char *want;
} alg_job;

static void alg_work(rank_ctx *c, wk_ring *ring) {
    const alg_job *j = c->arg;
    c->bad += strcmp(wk_ring_algorithm(ring, j->n), j->want) != 0;
    float *x = malloc(j->n * sizeof *x);
    for (size_t i = 0; i < j->n; i++) x[i] = int_input(c->rank, i, 0);
    c->rc = wk_ring_allreduce(ring, x, j->n, 7, 0);
    for (size_t i = 0; i < j->n && c->rc == CM_OK; i++) {
        float want = 0;
        for (int r = 0; r < c->nranks; r++) want += int_input(r, i, 0);
        c->bad += x[i] != want;
    }
    if (c->rc == CM_OK) {
        for (size_t i = 0; i < j->n; i++) x[i] = c->rank == 1 ? (float)i : 0;
        c->rc = wk_ring_broadcast(ring, x, j->n, 8, 1);
        for (size_t i = 0; i < j->n && c->rc == CM_OK; i++) c->bad += x[i] != (float)i;
    }
    free(x);
}

static void test_hd_auto_choice(void **state) {
    (void)state;
    size_t limit = WK_RING_HD_MAX / sizeof(float);
    struct {
        int n, transport;
        size_t floats;
        const char *want;
    } cases[] = {{4, WK_RING_TCP, 1000, "halving-doubling"},
                 {4, WK_RING_TCP, limit, "halving-doubling"},
                 {4, WK_RING_TCP, limit + 1, "ring"},
                 {8, WK_RING_TCP, 5000, "halving-doubling"},
                 {3, WK_RING_TCP, 1000, "ring"},
                 {2, WK_RING_TCP, 1000, "ring"},
                 {4, WK_RING_SHM, 1000, "ring"}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        wk_ring_opts o;
        small_timeouts(&o);
        o.algorithm = WK_RING_ALG_AUTO;
        o.transport = cases[k].transport;
        alg_job j = {cases[k].floats, cases[k].want};
        rank_ctx ctx[MAX_N];
        run_ranks(cases[k].n, &o, alg_work, &j, ctx);
        expect_all_ok(ctx, cases[k].n);
    }
}

/* Asking for halving-doubling where it cannot run is an error at once;
 * ranks that disagree on it fail at connect, naming the algorithms. */
static void *alg_rank(void *p) {
    rank_ctx *c = p;
    wk_ring_opts o = *c->opts;
    o.algorithm = ((const int *)c->arg)[c->rank];
    wk_ring *ring = NULL;
    c->connect_rc = wk_ring_connect(c->l, c->rank, c->nranks, c->addrs, &o, &ring, c->err,
                                    sizeof c->err);
    wk_ring_destroy(ring);
    return NULL;
}

static void test_hd_refused_where_it_cannot_run(void **state) {
    (void)state;
    wk_ring_listener *ls[4];
    char a[4][64];
    const char *addrs[4] = {a[0], a[1], a[2], a[3]};
    char err[256];
    wk_ring *ring = NULL;
    for (int i = 0; i < 4; i++) listen_at(0, &ls[i], a[i]);
    wk_ring_opts o;
    small_timeouts(&o);
    o.algorithm = WK_RING_ALG_HD;
    assert_int_equal(wk_ring_connect(ls[0], 0, 3, addrs, &o, &ring, err, sizeof err),
                     CM_EINVAL);
    assert_non_null(strstr(err, "halving-doubling"));
    o.transport = WK_RING_AUTO;
    assert_int_equal(wk_ring_connect(ls[0], 0, 4, addrs, &o, &ring, err, sizeof err),
                     CM_EINVAL);
    assert_null(ring);
    /* Rank 2 asks for the ring, the others for halving-doubling. */
    small_timeouts(&o);
    o.connect_timeout_ms = 5000;
    int algs[4] = {WK_RING_ALG_HD, WK_RING_ALG_HD, WK_RING_ALG_RING, WK_RING_ALG_HD};
    rank_ctx ctx[4];
    pthread_t th[4];
    double t0 = cm_now();
    for (int i = 0; i < 4; i++) {
        ctx[i] = (rank_ctx){.rank = i, .nranks = 4, .l = ls[i], .addrs = addrs, .opts = &o,
                            .arg = algs};
        assert_int_equal(pthread_create(&th[i], NULL, alg_rank, &ctx[i]), 0);
    }
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(ctx[i].connect_rc, CM_EINVAL);
        assert_non_null(strstr(ctx[i].err, i == 2 ? "rank 2 asks for the ring" : "rank 2 for ring"));
    }
    assert_true(cm_now() - t0 < 4.0); /* Refused, not timed out. */
    for (int i = 0; i < 4; i++) wk_ring_listener_destroy(ls[i]);
}

/* A rank that leaves (closes every link) in the middle of halving-doubling:
 * the others fail naming a rank instead of waiting, well within their
 * timeout. */
static void hd_leave_work(rank_ctx *c, wk_ring *ring) {
    if (c->rank == 3) return; /* rank_main destroys its ring: every link closes. */
    size_t n = 1 << 20;
    float *x = calloc(n, sizeof *x);
    c->rc = wk_ring_allreduce(ring, x, n, 1, 0);
    free(x);
}

static void test_hd_rank_leaves(void **state) {
    (void)state;
    wk_ring_opts o;
    g_algorithm = WK_RING_ALG_HD;
    small_timeouts(&o);
    g_algorithm = WK_RING_ALG_RING;
    rank_ctx ctx[4];
    double t0 = cm_now();
    run_ranks(4, &o, hd_leave_work, NULL, ctx);
    assert_true(cm_now() - t0 < 5.0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(ctx[i].connect_rc, CM_OK);
        assert_int_equal(ctx[i].rc, CM_EUNAVAIL);
        assert_non_null(strstr(ctx[i].err, "rank "));
    }
}

/* ===== Shared memory ===== */

static void test_shm_sums_and_broadcast(void **state) {
    (void)state;
    g_transport = WK_RING_SHM;
    check_int_sums(0, 1);
    check_int_sums(12, 0);
    check_random(0);
    check_random(1); /* With spinning. */
    test_broadcast(state);
    g_transport = WK_RING_TCP;
}

/* chunk_bytes 0 takes the transport's default chunk; any other value is
 * kept. Over TCP by default (2 ranks), a ring allreduce whose segments are
 * longer than half a chunk and shorter than two goes in half chunks; one of
 * exactly half a chunk, or of two, in whole ones; an explicit chunk is
 * never halved. */
static void chunk_work(rank_ctx *c, wk_ring *ring) {
    size_t want = *(const size_t *)c->arg, f = sizeof(float);
    if (wk_ring_chunk_bytes(ring, 1) != want) c->bad++;
    int halves = c->opts->chunk_bytes == 0 && g_transport == WK_RING_TCP;
    size_t mid[] = {want / f + 2, 2 * want / f, 4 * want / f - 2}; /* Segments of n / 2. */
    for (size_t k = 0; k < sizeof mid / sizeof mid[0]; k++)
        if (wk_ring_chunk_bytes(ring, mid[k]) != (halves ? want / 2 : want)) c->bad++;
    size_t whole[] = {want / f, 4 * want / f, 16 * want / f};
    for (size_t k = 0; k < sizeof whole / sizeof whole[0]; k++)
        if (wk_ring_chunk_bytes(ring, whole[k]) != want) c->bad++;
}

static void test_default_chunk_by_transport(void **state) {
    (void)state;
    struct {
        int transport;
        size_t chunk, want;
    } cases[] = {{WK_RING_TCP, 0, WK_RING_TCP_CHUNK},
                 {WK_RING_SHM, 0, WK_RING_SHM_CHUNK},
                 {WK_RING_AUTO, 0, WK_RING_SHM_CHUNK},
                 {WK_RING_TCP, 4096, 4096},
                 {WK_RING_SHM, 8192, 8192}};
    assert_true(WK_RING_TCP_CHUNK != WK_RING_SHM_CHUNK);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        wk_ring_opts o;
        g_transport = cases[k].transport;
        small_timeouts(&o);
        o.chunk_bytes = cases[k].chunk;
        rank_ctx ctx[2];
        run_ranks(2, &o, chunk_work, &cases[k].want, ctx);
        expect_all_ok(ctx, 2);
    }
    g_transport = WK_RING_TCP;
}

static void no_work(rank_ctx *c, wk_ring *ring) {
    (void)c;
    (void)ring;
}

/* A rank of a build before the half chunks (protocol version 1, whose
 * chunks at 2-3 MiB differ) is refused at the handshake, naming both
 * versions, instead of failing a collective later. Fake rank 1 speaks
 * version 1 on both connections. */
static void test_old_build_refused(void **state) {
    (void)state;
    wk_ring_opts o;
    small_timeouts(&o);
    o.job_id = 0x01d;
    o.connect_timeout_ms = 2000;
    fake_peer f;
    fake_listen(&f);
    wk_ring_listener *l;
    char a[2][64];
    listen_at(0, &l, a[0]);
    snprintf(a[1], sizeof a[1], "127.0.0.1:%d", f.port);
    const char *addrs[2] = {a[0], a[1]};
    rank_ctx c = {.rank = 0, .nranks = 2, .l = l, .addrs = addrs, .opts = &o,
                  .work = no_work, .connect_rc = CM_EAGAIN};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, rank_main, &c), 0);
    unsigned char old[WK_RING__HELLO_BYTES], got[WK_RING__HELLO_BYTES];
    wk_ring__hello me = {WK_RING__HELLO_MAGIC, 1, o.job_id, 2, 1}, h;
    wk_ring__hello_pack(&me, old);
    struct pollfd pf = {.fd = f.listen_fd, .events = POLLIN};
    assert_int_equal(poll(&pf, 1, 5000), 1);
    f.in_fd = accept(f.listen_fd, NULL, NULL);
    assert_true(f.in_fd >= 0);
    read_exact(f.in_fd, got, sizeof got);
    wk_ring__hello_unpack(got, &h);
    assert_int_equal(h.version, WK_RING__VERSION);
    (void)send(f.in_fd, old, sizeof old, MSG_NOSIGNAL); /* It may have gone. */
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)wk_ring_listener_port(l)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    f.out_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (connect(f.out_fd, (struct sockaddr *)&sa, sizeof sa) == 0)
        (void)send(f.out_fd, old, sizeof old, MSG_NOSIGNAL);
    pthread_join(th, NULL);
    fake_close(&f);
    wk_ring_listener_destroy(l);
    assert_int_not_equal(c.connect_rc, CM_OK);
    if (!strstr(c.err, "protocol version 1, this rank speaks 3")) fail_msg("%s", c.err);
}

/* Auto on one host is shared memory; tcp against auto is refused at the
 * handshake, naming the versions, instead of misreading the negotiation. */
typedef struct transports {
    int t[2];
} transports;

static void *transport_rank(void *p) {
    rank_ctx *c = p;
    const transports *t = c->arg;
    wk_ring_opts o = *c->opts;
    o.transport = t->t[c->rank];
    wk_ring *ring = NULL;
    c->connect_rc = wk_ring_connect(c->l, c->rank, 2, c->addrs, &o, &ring, c->err,
                                    sizeof c->err);
    if (ring) snprintf(c->err, sizeof c->err, "%s", wk_ring_transport(ring));
    wk_ring_destroy(ring);
    return NULL;
}

static void two_ranks_with(int t0, int t1, rank_ctx ctx[2]) {
    wk_ring_opts o;
    small_timeouts(&o);
    o.connect_timeout_ms = 3000;
    transports t = {{t0, t1}};
    wk_ring_listener *ls[2];
    char a[2][64];
    const char *addrs[2] = {a[0], a[1]};
    pthread_t th[2];
    for (int i = 0; i < 2; i++) listen_at(0, &ls[i], a[i]);
    for (int i = 0; i < 2; i++) {
        ctx[i] = (rank_ctx){.rank = i, .nranks = 2, .l = ls[i], .addrs = addrs, .opts = &o,
                            .arg = &t};
        assert_int_equal(pthread_create(&th[i], NULL, transport_rank, &ctx[i]), 0);
    }
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) wk_ring_listener_destroy(ls[i]);
}

static void test_shm_auto_and_mismatch(void **state) {
    (void)state;
    rank_ctx ctx[2];
    two_ranks_with(WK_RING_AUTO, WK_RING_AUTO, ctx);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(ctx[i].connect_rc, CM_OK);
        assert_string_equal(ctx[i].err, "shm");
    }
    two_ranks_with(WK_RING_AUTO, WK_RING_SHM, ctx);
    for (int i = 0; i < 2; i++) assert_string_equal(ctx[i].err, "shm");
    double t0 = cm_now();
    two_ranks_with(WK_RING_TCP, WK_RING_AUTO, ctx);
    for (int i = 0; i < 2; i++) {
        assert_int_not_equal(ctx[i].connect_rc, CM_OK);
        assert_non_null(strstr(ctx[i].err, "version"));
    }
    assert_true(cm_now() - t0 < 2.5); /* Refused, not timed out. */
}

/* A rank of a shared-memory ring killed (SIGKILL: no clean-up at all) while
 * its neighbour waits on the bells, before its first chunk and in the middle
 * of a collective: the survivor's collective fails (EOF on the connection
 * that watches the peer) within a second, naming the peer, and the slots'
 * objects are gone from /dev/shm. */
static void shm_kill_case(int die_after_floats) {
    wk_ring_opts o;
    wk_ring_opts_default(&o);
    o.transport = WK_RING_SHM;
    o.timeout_ms = 20000; /* A hang would show as this timeout. */
    o.chunk_bytes = 4096;
    wk_ring_listener *ls[2];
    char a[2][64];
    const char *addrs[2] = {a[0], a[1]};
    for (int i = 0; i < 2; i++) listen_at(0, &ls[i], a[i]);
    size_t n = 1 << 20;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { /* Rank 1: join, reduce a part (or nothing), die. */
        wk_ring *ring = NULL;
        char err[256];
        if (wk_ring_connect(ls[1], 1, 2, addrs, &o, &ring, err, sizeof err) != CM_OK) _exit(3);
        if (die_after_floats > 0) {
            float *x = calloc((size_t)die_after_floats, sizeof *x);
            /* A smaller allreduce than rank 0's: rank 1 stops taking part
             * once it has reduced its own, mid-way through rank 0's. */
            (void)wk_ring_allreduce(ring, x, (size_t)die_after_floats, 0, 0);
        }
        raise(SIGKILL);
        _exit(4);
    }
    wk_ring *ring = NULL;
    char err[256];
    assert_int_equal(wk_ring_connect(ls[0], 0, 2, addrs, &o, &ring, err, sizeof err), CM_OK);
    assert_string_equal(wk_ring_transport(ring), "shm");
    float *x = calloc(n, sizeof *x);
    double t0 = cm_now();
    int rc = wk_ring_allreduce(ring, x, n, 0, 0);
    double took = cm_now() - t0;
    assert_int_not_equal(rc, CM_OK);
    if (took >= 1.0 || !strstr(wk_ring_error(ring), "rank 1"))
        fail_msg("rc %d after %.3f s: %s", rc, took, wk_ring_error(ring));
    /* Closed before the child is waited for: rank 0 may have failed first
     * (rank 1's smaller collective sends chunks rank 0 refuses), and rank 1
     * would then wait for it until its timeout before it dies. */
    wk_ring_destroy(ring);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    free(x);
    for (int i = 0; i < 2; i++) wk_ring_listener_destroy(ls[i]);
    /* Both names were unlinked once mapped: no object of this process or
     * the child is left. */
    char path[64];
    snprintf(path, sizeof path, "/dev/shm/pstrain-ring-%d-", (int)getpid());
    FILE *ls_ = popen("ls /dev/shm", "r");
    char line[256];
    while (ls_ && fgets(line, sizeof line, ls_)) {
        char mine[64], child[64];
        snprintf(mine, sizeof mine, "pstrain-ring-%d-", (int)getpid());
        snprintf(child, sizeof child, "pstrain-ring-%d-", (int)pid);
        assert_null(strstr(line, mine));
        assert_null(strstr(line, child));
    }
    if (ls_) pclose(ls_);
}

static void test_shm_peer_killed(void **state) {
    (void)state;
    shm_kill_case(0);        /* Dies before the first chunk. */
    shm_kill_case(1 << 16);  /* Dies in the middle of rank 0's collective. */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_rank_and_bad_args),
        cmocka_unit_test(test_int_sums_exact),
        cmocka_unit_test(test_int_sums_tiny_chunks),
        cmocka_unit_test(test_random_sum_close_and_identical),
        cmocka_unit_test(test_random_mean_close_and_identical),
        cmocka_unit_test(test_broadcast),
        cmocka_unit_test(test_hd_sums_and_means),
        cmocka_unit_test(test_hd_auto_choice),
        cmocka_unit_test(test_hd_refused_where_it_cannot_run),
        cmocka_unit_test(test_hd_rank_leaves),
        cmocka_unit_test(test_wrong_job_refused),
        cmocka_unit_test(test_mismatched_average_refused),
        cmocka_unit_test(test_connect_gives_up_naming_the_peer),
        cmocka_unit_test(test_connect_retries_until_peer_listens),
        cmocka_unit_test(test_chunk_wrong_length),
        cmocka_unit_test(test_chunk_wrong_step),
        cmocka_unit_test(test_chunk_wrong_offset),
        cmocka_unit_test(test_peer_closes),
        cmocka_unit_test(test_peer_silent_times_out),
        cmocka_unit_test(test_peers_listening_fail_fast),
        cmocka_unit_test(test_shm_sums_and_broadcast),
        cmocka_unit_test(test_shm_auto_and_mismatch),
        cmocka_unit_test(test_default_chunk_by_transport),
        cmocka_unit_test(test_old_build_refused),
        cmocka_unit_test(test_shm_peer_killed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
