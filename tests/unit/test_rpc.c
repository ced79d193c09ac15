/* test_rpc.c - unit tests for the gRPC layer (proto/rpc.c).
 * SPDX-License-Identifier: MIT
 *
 * Every test runs an in-process server on 127.0.0.1:0 and a client in the
 * same process. Zero-copy segments count their release() calls, which must
 * each run exactly once. Every wait is bounded. test_cancel_on_disconnect
 * runs this program again as a client process (--hold-client PORT), and
 * test_stress_cancel_race runs 2 rounds, 5 with RPC_STRESS=1 in the environment.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <grpc/support/sync.h>

#include "common/cm_status.h"
#include "proto/rpc.h"
#include "tests/unit/tu_port.h"

extern char **environ;

/* The tests marked "stream" in main run twice: as unary calls, then with
 * RPC_STREAM on every call (the same contract, one long call a method). */
static int g_stream;
#define rpc_call_start(ch, m, segs, n, dl, fl, done, ud) \
    (rpc_call_start)(ch, m, segs, n, dl, (fl) | g_stream, done, ud)
#define rpc_call_sync(ch, m, req, len, dl, fl, ...) \
    (rpc_call_sync)(ch, m, req, len, dl, (fl) | g_stream, __VA_ARGS__)
static int stream_on(void **state) {
    (void)state;
    g_stream = RPC_STREAM;
    return 0;
}
static int stream_off(void **state) {
    (void)state;
    g_stream = 0;
    return 0;
}
/* The tests marked "no poll spin" run on streams with every completion-
 * queue thread sleeping at once (poll_spin_us -1), the other way to wait. */
static int g_poll_spin;
static int nospin_on(void **state) {
    g_poll_spin = -1;
    return stream_on(state);
}
static int nospin_off(void **state) {
    g_poll_spin = 0;
    return stream_off(state);
}

/* ===== Helpers ===== */

/* For handlers and callbacks: cmocka's asserts only work on the test thread. */
#define CHECK(x)                                                              \
    do {                                                                      \
        if (!(x)) {                                                           \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #x); \
            abort();                                                          \
        }                                                                     \
    } while (0)

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Wait until *v == want (up to ms); returns the last value seen. */
static int wait_count(atomic_int *v, int want, int ms) {
    int64_t end = now_ms() + ms;
    while (atomic_load(v) != want && now_ms() < end) sleep_ms(2);
    return atomic_load(v);
}

/* A counted release: ud is an atomic_int. */
static void count_release(void *ud) { atomic_fetch_add((atomic_int *)ud, 1); }

/* Server-side releases: the reply buffers the handlers malloc. */
static atomic_int srv_releases;
static void srv_release(void *ud) {
    free(ud);
    atomic_fetch_add(&srv_releases, 1);
}

/* Calls a handler kept instead of answering. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rpc_call *calls[4096]; /* test_stress_cancel_race holds hundreds at once. */
    int n;
} held = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, {0}, 0};

static rpc_call *wait_held(int ms) {
    int64_t end = now_ms() + ms;
    rpc_call *c = NULL;
    pthread_mutex_lock(&held.mu);
    while (held.n == 0 && now_ms() < end) {
        pthread_mutex_unlock(&held.mu);
        sleep_ms(2);
        pthread_mutex_lock(&held.mu);
    }
    if (held.n > 0) c = held.calls[--held.n];
    pthread_mutex_unlock(&held.mu);
    return c;
}

/* Remove 'call' from the held list; 1 if it was there (the arbitration
 * rpc_cancel_fn asks for: whoever takes it finishes it). */
static int held_take(rpc_call *call) {
    int found = 0;
    pthread_mutex_lock(&held.mu);
    for (int i = 0; i < held.n && !found; i++)
        if (held.calls[i] == call) {
            held.calls[i] = held.calls[--held.n];
            found = 1;
        }
    pthread_mutex_unlock(&held.mu);
    return found;
}

static int held_count(void) {
    pthread_mutex_lock(&held.mu);
    int n = held.n;
    pthread_mutex_unlock(&held.mu);
    return n;
}

/* Wait until held_count() == want (up to ms); returns the last count. */
static int wait_held_count(int want, int ms) {
    int64_t end = now_ms() + ms;
    while (held_count() != want && now_ms() < end) sleep_ms(2);
    return held_count();
}

/* rpc_call_app of every held call (h_hold sets it). */
static int hold_app;

static char last_peer[128];

/* ===== Handlers ===== */

/* Reply with the request: the first bytes copied, the rest zero-copy from a
 * malloc'd copy whose release counts in srv_releases. */
static void h_echo(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    (void)ctx;
    snprintf(last_peer, sizeof last_peer, "%s", rpc_call_peer(call));
    uint8_t *copy = malloc(len ? len : 1);
    CHECK(copy);
    memcpy(copy, req, len);
    size_t k = len < 5 ? len : 5;
    rpc_seg segs[2] = {{req, k, NULL, NULL}, {copy + k, len - k, srv_release, copy}};
    rpc_reply(call, segs, 2);
}

static void h_fail(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    (void)req;
    rpc_fail(call, (int)(intptr_t)ctx, "bad thing %d (%zu bytes)", 42, len);
}

static void h_hold(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    (void)ctx;
    (void)req;
    (void)len;
    rpc_call_set_app(call, &hold_app); /* Before another thread can see it. */
    pthread_mutex_lock(&held.mu);
    CHECK(held.n < (int)(sizeof held.calls / sizeof held.calls[0]));
    held.calls[held.n++] = call;
    pthread_cond_broadcast(&held.cv);
    pthread_mutex_unlock(&held.mu);
}

/* Calls kept with their one-byte request (test_stream_out_of_order). */
static struct {
    pthread_mutex_t mu;
    rpc_call *calls[8];
    uint8_t tags[8];
    int n;
} tagged = {PTHREAD_MUTEX_INITIALIZER, {0}, {0}, 0};

static void h_hold_tag(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    (void)ctx;
    CHECK(len == 1);
    pthread_mutex_lock(&tagged.mu);
    CHECK(tagged.n < 8);
    tagged.calls[tagged.n] = call;
    tagged.tags[tagged.n++] = req[0];
    pthread_mutex_unlock(&tagged.mu);
}

/* Reply with N zero bytes, N a uint32 in the request. */
static void h_big(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    (void)ctx;
    uint32_t n = 0;
    CHECK(len == sizeof n);
    memcpy(&n, req, sizeof n);
    uint8_t *buf = calloc(1, n);
    CHECK(buf);
    rpc_seg seg = {buf, n, srv_release, buf};
    rpc_reply(call, &seg, 1);
}

/* Handlers that ran: a refused call must leave it alone. */
static atomic_int level_runs;

/* Reply with one byte: rpc_call_level. */
static void h_level(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    (void)ctx;
    (void)req;
    (void)len;
    atomic_fetch_add(&level_runs, 1);
    snprintf(last_peer, sizeof last_peer, "%s", rpc_call_peer(call));
    uint8_t level = (uint8_t)rpc_call_level(call);
    rpc_seg seg = {&level, 1, NULL, NULL};
    rpc_reply(call, &seg, 1);
}

/* A request this caller may not make, whatever its token got it in for. */
static void h_deny(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    (void)ctx;
    (void)req;
    (void)len;
    atomic_fetch_add(&level_runs, 1);
    rpc_deny(call, "this request needs more");
}

/* on_cancel: counts its calls (ctx), and fails the call if the held list
 * still had it, as rpc_cancel_fn asks. */
static atomic_int cancel_hooks, cancel_fails;
static void on_cancel_hook(void *ctx, rpc_call *call) {
    CHECK(ctx == &cancel_hooks);
    CHECK(rpc_call_app(call) == &hold_app);
    atomic_fetch_add(&cancel_hooks, 1);
    if (held_take(call)) {
        rpc_fail(call, RPC_CANCELLED, "the client went away");
        atomic_fetch_add(&cancel_fails, 1);
    }
}

/* ===== Fixture ===== */

typedef struct fixture {
    rpc_server *srv;
    int port;
    rpc_client *cli;
    rpc_channel *ch;
} fixture;

/* A client of f's server (token/admin_token may be NULL). */
static void client_open(const fixture *f, const rpc_client_opts *co, rpc_client **cli,
                        rpc_channel **ch) {
    assert_int_equal(rpc_client_create(co, cli), CM_OK);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", f->port);
    assert_int_equal(rpc_channel_open(*cli, target, ch), CM_OK);
    assert_string_equal(rpc_channel_target(*ch), target);
}

static void client_close(rpc_client *cli, rpc_channel *ch) {
    rpc_channel_close(ch);
    rpc_client_destroy(cli);
}

static void fx_start_opts(fixture *f, const rpc_server_opts *so, const rpc_client_opts *co) {
    memset(f, 0, sizeof *f);
    atomic_store(&srv_releases, 0);
    atomic_store(&level_runs, 0);
    atomic_store(&cancel_hooks, 0);
    atomic_store(&cancel_fails, 0);
    held.n = 0;
    assert_int_equal(rpc_server_create(so, &f->srv), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Echo", h_echo, NULL), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Fail", h_fail,
                                           (void *)(intptr_t)RPC_INVALID_ARGUMENT),
                     CM_OK);
    assert_int_equal(
        rpc_server_add_method(f->srv, "/t.T/NotFound", h_fail, (void *)(intptr_t)RPC_NOT_FOUND),
        CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Hold", h_hold, NULL), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Big", h_big, NULL), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/HoldTag", h_hold_tag, NULL), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Level", h_level, NULL), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Deny", h_deny, NULL), CM_OK);
    assert_int_equal(
        rpc_server_add_method_level(f->srv, "/t.T/Admin", RPC_AUTH_ADMIN, h_level, NULL), CM_OK);
    assert_int_equal(rpc_server_start(f->srv, "127.0.0.1:0", &f->port), CM_OK);
    assert_true(f->port > 0);
    client_open(f, co, &f->cli, &f->ch);
}

static void fx_start(fixture *f, int srv_max, int cli_max, int threads) {
    rpc_server_opts so = {.threads = threads, .max_message = srv_max,
                          .poll_spin_us = g_poll_spin};
    rpc_client_opts co = {.max_message = cli_max, .poll_spin_us = g_poll_spin};
    fx_start_opts(f, &so, &co);
}

static void fx_stop(fixture *f) {
    client_close(f->cli, f->ch);
    int64_t t0 = now_ms();
    rpc_server_shutdown(f->srv, 100);
    assert_true(now_ms() - t0 < 3000);
    rpc_server_destroy(f->srv);
}

/* The outcome of one asynchronous call. */
typedef struct result {
    pthread_mutex_t mu;
    int finished;
    int code;
    char msg[256];
    uint8_t *reply;
    size_t len;
    pthread_t thread;
    int64_t at_ms;
} result;

static void result_init(result *r) {
    memset(r, 0, sizeof *r);
    pthread_mutex_init(&r->mu, NULL);
}

static void on_done(void *ud, int code, const char *message, const uint8_t *reply, size_t len) {
    result *r = ud;
    CHECK(message);
    pthread_mutex_lock(&r->mu);
    r->code = code;
    snprintf(r->msg, sizeof r->msg, "%s", message);
    if (code == RPC_OK) {
        r->reply = malloc(len ? len : 1);
        CHECK(r->reply);
        memcpy(r->reply, reply, len);
        r->len = len;
    }
    r->thread = pthread_self();
    r->at_ms = now_ms();
    r->finished++;
    pthread_mutex_unlock(&r->mu);
}

/* Wait for r to finish (up to ms); returns its code, or -1 on timeout. */
static int result_wait(result *r, int ms) {
    int64_t end = now_ms() + ms;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        int fin = r->finished;
        pthread_mutex_unlock(&r->mu);
        if (fin) break;
        if (now_ms() >= end) return -1;
        sleep_ms(1);
    }
    assert_int_equal(r->finished, 1);
    return r->code;
}

static void result_deinit(result *r) {
    free(r->reply);
    pthread_mutex_destroy(&r->mu);
}

/* ===== Tests ===== */

static void test_status_table(void **state) {
    (void)state;
    assert_string_equal(rpc_status_name(RPC_OK), "OK");
    assert_string_equal(rpc_status_name(RPC_INVALID_ARGUMENT), "INVALID_ARGUMENT");
    assert_string_equal(rpc_status_name(RPC_UNAUTHENTICATED), "UNAUTHENTICATED");
    assert_non_null(rpc_status_name(99));
    assert_non_null(rpc_status_name(-1));
    assert_int_equal(rpc_status_to_cm(RPC_OK), CM_OK);
    assert_int_equal(rpc_status_to_cm(RPC_INVALID_ARGUMENT), CM_EINVAL);
    assert_int_equal(rpc_status_to_cm(RPC_OUT_OF_RANGE), CM_EINVAL);
    assert_int_equal(rpc_status_to_cm(RPC_NOT_FOUND), CM_ENOTFOUND);
    assert_int_equal(rpc_status_to_cm(RPC_DEADLINE_EXCEEDED), CM_ETIMEDOUT);
    assert_int_equal(rpc_status_to_cm(RPC_UNAVAILABLE), CM_EUNAVAIL);
    assert_int_equal(rpc_status_to_cm(RPC_CANCELLED), CM_EUNAVAIL);
    assert_int_equal(rpc_status_to_cm(RPC_RESOURCE_EXHAUSTED), CM_ENOMEM);
    assert_int_equal(rpc_status_to_cm(RPC_ABORTED), CM_EABORTED);
    assert_int_equal(rpc_status_to_cm(RPC_UNIMPLEMENTED), CM_EUNSUPPORTED);
    assert_int_equal(rpc_status_to_cm(RPC_INTERNAL), CM_EIO);
    assert_int_equal(rpc_status_to_cm(77), CM_EIO);
}

/* Debian 12's Abseil has its mutex deadlock detector on; rpc_init turns it
 * off (found by its mangled name: a newer Abseil that moved it fails here,
 * not silently in every lock of every run). */
static void test_abseil_detector_off(void **state) {
    (void)state;
    rpc_init();
    assert_int_equal(rpc_abseil_detector_off(), 1);
    rpc_shutdown();
}

static void test_lifecycle_and_misuse(void **state) {
    (void)state;
    rpc_init();
    rpc_server *s;
    /* Never started: destroy alone is enough. */
    assert_int_equal(rpc_server_create(NULL, &s), CM_OK);
    rpc_server_destroy(s);
    rpc_server_destroy(NULL);

    assert_int_equal(rpc_server_create(NULL, &s), CM_OK);
    assert_int_equal(rpc_server_add_method(s, "/t.T/Echo", h_echo, NULL), CM_OK);
    assert_int_equal(rpc_server_add_method(s, "/t.T/Echo", h_echo, NULL), CM_EINVAL);
    int port = -1;
    assert_int_equal(rpc_server_start(s, "nonsense", &port), CM_EINVAL);
    assert_int_equal(rpc_server_start(s, "127.0.0.1:99999", &port), CM_EINVAL);
    assert_int_equal(rpc_server_start(s, "127.0.0.1:", &port), CM_EINVAL);
    assert_int_equal(rpc_server_start(s, "::1:80", &port), CM_EINVAL);
    /* A failed start leaves the server startable. */
    assert_int_equal(rpc_server_start(s, "127.0.0.1:0", &port), CM_OK);
    assert_true(port > 0);
    assert_int_equal(rpc_server_start(s, "127.0.0.1:0", &port), CM_EBUSY);
    assert_int_equal(rpc_server_add_method(s, "/t.T/Late", h_echo, NULL), CM_EBUSY);
    rpc_server_shutdown(s, 0);
    rpc_server_shutdown(s, 0); /* Idempotent. */
    rpc_server_destroy(s);

    rpc_server_opts bad = {.threads = -1};
    assert_int_equal(rpc_server_create(&bad, &s), CM_EINVAL);
    assert_null(s);

    rpc_client *c;
    assert_int_equal(rpc_client_create(NULL, &c), CM_OK);
    rpc_client_destroy(c);
    rpc_shutdown();
}

static void test_echo_small(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    const char *msg = "hello, parameter server";
    uint8_t *reply = NULL;
    size_t len = 0;
    char err[128];
    int code = rpc_call_sync(f.ch, "/t.T/Echo", msg, strlen(msg), 5000, 0, &reply, &len, err,
                             sizeof err);
    assert_int_equal(code, RPC_OK);
    assert_int_equal(len, strlen(msg));
    assert_memory_equal(reply, msg, len);
    free(reply);
    assert_true(strncmp(last_peer, "ipv4:127.0.0.1:", 15) == 0);

    /* An empty message is still a message. */
    code = rpc_call_sync(f.ch, "/t.T/Echo", NULL, 0, 5000, 0, &reply, &len, err, sizeof err);
    assert_int_equal(code, RPC_OK);
    assert_int_equal(len, 0);
    free(reply);
    assert_int_equal(wait_count(&srv_releases, 2, 2000), 2);

    /* Many segments, copied and zero-copy mixed, empty ones included. */
    static const char word[] = "0123456789";
    atomic_int rel;
    atomic_init(&rel, 0);
    rpc_seg segs[12];
    for (int i = 0; i < 12; i++)
        segs[i] = (rpc_seg){word + i % 10, i % 3 ? 1 : 0, i % 2 ? count_release : NULL, &rel};
    result r;
    result_init(&r);
    rpc_call_start(f.ch, "/t.T/Echo", segs, 12, 5000, 0, on_done, &r);
    assert_int_equal(result_wait(&r, 5000), RPC_OK);
    assert_int_equal(r.len, 8);
    assert_memory_equal(r.reply, "12457801", 8);
    assert_int_equal(wait_count(&rel, 6, 2000), 6);
    result_deinit(&r);
    fx_stop(&f);
}

static void check_16mib(void *ud, int code, const char *message, const uint8_t *reply,
                        size_t len) {
    result *r = ud;
    const uint8_t *expect = r->reply; /* Borrowed: the request. */
    int ok = code == RPC_OK && len == 3 + r->len && !memcmp(reply, "hdr", 3) &&
             !memcmp(reply + 3, expect, r->len);
    pthread_mutex_lock(&r->mu);
    r->code = ok ? RPC_OK : (code == RPC_OK ? RPC_DATA_LOSS : code);
    snprintf(r->msg, sizeof r->msg, "%s", message);
    r->finished++;
    pthread_mutex_unlock(&r->mu);
}

static void test_echo_16mib_zero_copy(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    size_t n = 16u << 20;
    uint8_t *buf = malloc(n);
    assert_non_null(buf);
    for (size_t i = 0; i < n; i++) buf[i] = (uint8_t)((i * 2654435761u) >> 13);
    atomic_int rel[2];
    atomic_init(&rel[0], 0);
    atomic_init(&rel[1], 0);
    rpc_seg segs[3] = {{"hdr", 3, NULL, NULL},
                       {buf, n / 2, count_release, &rel[0]},
                       {buf + n / 2, n - n / 2, count_release, &rel[1]}};
    result r;
    result_init(&r);
    r.reply = buf; /* What check_16mib compares against. */
    r.len = n;
    rpc_call_start(f.ch, "/t.T/Echo", segs, 3, 20000, 0, check_16mib, &r);
    int code = result_wait(&r, 20000);
    if (code != RPC_OK) fail_msg("16 MiB echo: %d %s", code, r.msg);
    assert_int_equal(wait_count(&rel[0], 1, 5000), 1);
    assert_int_equal(wait_count(&rel[1], 1, 5000), 1);
    assert_int_equal(wait_count(&srv_releases, 1, 5000), 1);
    fx_stop(&f);
    /* Still exactly once after teardown. */
    assert_int_equal(atomic_load(&rel[0]), 1);
    assert_int_equal(atomic_load(&rel[1]), 1);
    assert_int_equal(atomic_load(&srv_releases), 1);
    r.reply = NULL;
    result_deinit(&r);
    free(buf);
}

static void test_deferred_reply(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    result r;
    result_init(&r);
    rpc_call_start(f.ch, "/t.T/Hold", NULL, 0, 5000, 0, on_done, &r);
    rpc_call *call = wait_held(3000);
    assert_non_null(call);
    assert_true(strncmp(rpc_call_peer(call), "ipv4:", 5) == 0);
    sleep_ms(50);
    assert_int_equal(r.finished, 0);
    /* Finished from this thread, not a server thread. */
    atomic_int rel;
    atomic_init(&rel, 0);
    static const char later[] = "answered later";
    rpc_seg seg = {later, sizeof later, count_release, &rel};
    rpc_reply(call, &seg, 1);
    assert_int_equal(result_wait(&r, 3000), RPC_OK);
    assert_int_equal(r.len, sizeof later);
    assert_string_equal((const char *)r.reply, later);
    assert_false(pthread_equal(r.thread, pthread_self()));
    assert_int_equal(wait_count(&rel, 1, 2000), 1);
    result_deinit(&r);
    fx_stop(&f);
}

static void test_fail_codes(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    char err[128];
    uint8_t *reply = (uint8_t *)"x";
    size_t len = 7;
    int code = rpc_call_sync(f.ch, "/t.T/Fail", "abc", 3, 5000, 0, &reply, &len, err, sizeof err);
    assert_int_equal(code, RPC_INVALID_ARGUMENT);
    assert_string_equal(err, "bad thing 42 (3 bytes)");
    assert_null(reply);
    assert_int_equal(len, 0);
    assert_int_equal(rpc_status_to_cm(code), CM_EINVAL);
    code = rpc_call_sync(f.ch, "/t.T/NotFound", "", 0, 5000, 0, NULL, NULL, err, sizeof err);
    assert_int_equal(code, RPC_NOT_FOUND);
    assert_string_equal(err, "bad thing 42 (0 bytes)");
    fx_stop(&f);
}

static void test_unknown_method(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    char err[128];
    int64_t t0 = now_ms();
    int code = rpc_call_sync(f.ch, "/t.T/Nope", "abc", 3, 5000, 0, NULL, NULL, err, sizeof err);
    assert_int_equal(code, RPC_UNIMPLEMENTED);
    assert_true(now_ms() - t0 < 1000);
    assert_non_null(strstr(err, "/t.T/Nope"));
    fx_stop(&f);
}

static void test_oversized_request(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 64 << 10, 0, 0);
    size_t n = 128 << 10;
    uint8_t *big = calloc(1, n);
    char err[256];
    int code = rpc_call_sync(f.ch, "/t.T/Echo", big, n, 5000, 0, NULL, NULL, err, sizeof err);
    assert_int_equal(code, RPC_RESOURCE_EXHAUSTED);
    /* The server still serves the next call. */
    uint8_t *reply = NULL;
    size_t len = 0;
    code = rpc_call_sync(f.ch, "/t.T/Echo", "ok", 2, 5000, 0, &reply, &len, err, sizeof err);
    assert_int_equal(code, RPC_OK);
    assert_int_equal(len, 2);
    free(reply);
    free(big);
    fx_stop(&f);
}

static void test_oversized_reply(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 64 << 10, 0);
    uint32_t want = 128 << 10;
    char err[256];
    int code = rpc_call_sync(f.ch, "/t.T/Big", &want, sizeof want, 5000, 0, NULL, NULL, err,
                             sizeof err);
    assert_int_equal(code, RPC_RESOURCE_EXHAUSTED);
    assert_int_equal(wait_count(&srv_releases, 1, 2000), 1);

    /* Sending more than the client's own limit fails too, and still releases. */
    size_t n = 128 << 10;
    uint8_t *big = calloc(1, n);
    atomic_int rel;
    atomic_init(&rel, 0);
    rpc_seg seg = {big, n, count_release, &rel};
    result r;
    result_init(&r);
    rpc_call_start(f.ch, "/t.T/Echo", &seg, 1, 5000, 0, on_done, &r);
    assert_int_equal(result_wait(&r, 5000), RPC_RESOURCE_EXHAUSTED);
    assert_int_equal(wait_count(&rel, 1, 2000), 1);
    result_deinit(&r);
    free(big);

    want = 1000;
    uint8_t *reply = NULL;
    size_t len = 0;
    code = rpc_call_sync(f.ch, "/t.T/Big", &want, sizeof want, 5000, 0, &reply, &len, err,
                         sizeof err);
    assert_int_equal(code, RPC_OK);
    assert_int_equal(len, 1000);
    free(reply);
    fx_stop(&f);
}

static void test_deadline(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    result r;
    result_init(&r);
    int64_t t0 = now_ms();
    rpc_seg x = {"x", 1, NULL, NULL};
    rpc_call_start(f.ch, "/t.T/Hold", &x, 1, 300, 0, on_done, &r);
    assert_int_equal(result_wait(&r, 3000), RPC_DEADLINE_EXCEEDED);
    int64_t took = r.at_ms - t0;
    assert_true(took >= 250 && took < 1500);
    result_deinit(&r);
    /* The application finishes its call late; the server then stops. */
    rpc_call *call = wait_held(1000);
    assert_non_null(call);
    atomic_int rel;
    atomic_init(&rel, 0);
    rpc_seg seg = {"late", 4, count_release, &rel};
    rpc_reply(call, &seg, 1);
    assert_int_equal(wait_count(&rel, 1, 2000), 1);
    fx_stop(&f);
}

static void test_no_server(void **state) {
    (void)state;
    /* A port nobody listens on (tu_port.h). */
    int port = tu_free_port();
    assert_true(port > 0);

    rpc_client *c;
    rpc_channel *ch;
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", port);
    assert_int_equal(rpc_client_create(NULL, &c), CM_OK);
    assert_int_equal(rpc_channel_open(c, target, &ch), CM_OK);
    char err[256];
    int64_t t0 = now_ms();
    int code = rpc_call_sync(ch, "/t.T/Echo", "x", 1, 5000, 0, NULL, NULL, err, sizeof err);
    assert_int_equal(code, RPC_UNAVAILABLE);
    assert_true(now_ms() - t0 < 1000);
    t0 = now_ms();
    code = rpc_call_sync(ch, "/t.T/Echo", "x", 1, 300, RPC_WAIT_FOR_READY, NULL, NULL, err,
                         sizeof err);
    assert_int_equal(code, RPC_DEADLINE_EXCEEDED);
    int64_t took = now_ms() - t0;
    assert_true(took >= 250 && took < 1500);
    rpc_channel_close(ch);
    rpc_client_destroy(c);
}

/* A worker that starts before its PS: WAIT_FOR_READY rides out the gap. */
static void test_wait_for_ready_late_server(void **state) {
    (void)state;
    rpc_server *s;
    int port = tu_free_port(); /* Nothing listens there until the server starts. */
    assert_true(port > 0);

    rpc_client *c;
    rpc_channel *ch;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    assert_int_equal(rpc_client_create(NULL, &c), CM_OK);
    assert_int_equal(rpc_channel_open(c, addr, &ch), CM_OK);
    result r;
    result_init(&r);
    rpc_seg x = {"late", 4, NULL, NULL};
    int64_t t0 = now_ms();
    rpc_call_start(ch, "/t.T/Echo", &x, 1, 5000, RPC_WAIT_FOR_READY, on_done, &r);
    sleep_ms(300);
    assert_int_equal(r.finished, 0);
    assert_int_equal(rpc_server_create(NULL, &s), CM_OK);
    assert_int_equal(rpc_server_add_method(s, "/t.T/Echo", h_echo, NULL), CM_OK);
    int port2 = 0;
    assert_int_equal(rpc_server_start(s, addr, &port2), CM_OK);
    assert_int_equal(port2, port);
    int code = result_wait(&r, 5000);
    if (code != RPC_OK) fail_msg("late server: %d %s", code, r.msg);
    /* Reconnect backoff is 250 ms .. 2 s (rpc_channel_open). */
    print_message("late server: the call succeeded after %lld ms\n", (long long)(r.at_ms - t0));
    assert_true(r.at_ms - t0 < 3000);
    assert_int_equal(r.len, 4);
    result_deinit(&r);
    rpc_channel_close(ch);
    rpc_client_destroy(c);
    rpc_server_destroy(s);
}

static void test_port_taken(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    rpc_server *s2;
    assert_int_equal(rpc_server_create(NULL, &s2), CM_OK);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", f.port);
    int port = -1;
    assert_int_equal(rpc_server_start(s2, addr, &port), CM_EBUSY);
    assert_int_equal(port, 0);
    rpc_server_destroy(s2);
    /* The first server is unaffected. */
    char err[128];
    int code = rpc_call_sync(f.ch, "/t.T/Echo", "a", 1, 5000, 0, NULL, NULL, err, sizeof err);
    assert_int_equal(code, RPC_OK);
    fx_stop(&f);
}

typedef struct load {
    fixture *f;
    int id;
    atomic_int *ok;
    atomic_int *finished;
} load;

typedef struct load_call {
    uint64_t tag;
    atomic_int *ok;
    atomic_int *finished;
} load_call;

static void load_done(void *ud, int code, const char *message, const uint8_t *reply, size_t len) {
    (void)message;
    load_call *lc = ud;
    if (code == RPC_OK && len == sizeof lc->tag && !memcmp(reply, &lc->tag, len))
        atomic_fetch_add(lc->ok, 1);
    atomic_fetch_add(lc->finished, 1);
    free(lc);
}

static void *load_thread(void *arg) {
    load *l = arg;
    for (int i = 0; i < 50; i++) {
        uint64_t tag = ((uint64_t)l->id << 32) | (uint64_t)i;
        if (i % 2) {
            uint8_t *reply = NULL;
            size_t len = 0;
            int code = rpc_call_sync(l->f->ch, "/t.T/Echo", &tag, sizeof tag, 10000, 0, &reply,
                                     &len, NULL, 0);
            if (code == RPC_OK && len == sizeof tag && !memcmp(reply, &tag, len))
                atomic_fetch_add(l->ok, 1);
            atomic_fetch_add(l->finished, 1);
            free(reply);
        } else {
            load_call *lc = malloc(sizeof *lc);
            lc->tag = tag;
            lc->ok = l->ok;
            lc->finished = l->finished;
            rpc_seg seg = {&lc->tag, sizeof lc->tag, NULL, NULL};
            rpc_call_start(l->f->ch, "/t.T/Echo", &seg, 1, 10000, 0, load_done, lc);
        }
    }
    return NULL;
}

static void test_many_concurrent_calls(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 4);
    atomic_int ok, finished;
    atomic_init(&ok, 0);
    atomic_init(&finished, 0);
    pthread_t th[4];
    load l[4];
    for (int i = 0; i < 4; i++) {
        l[i] = (load){&f, i, &ok, &finished};
        assert_int_equal(pthread_create(&th[i], NULL, load_thread, &l[i]), 0);
    }
    for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
    assert_int_equal(wait_count(&finished, 200, 10000), 200);
    assert_int_equal(atomic_load(&ok), 200);
    assert_int_equal(wait_count(&srv_releases, 200, 5000), 200);
    fx_stop(&f);
}

typedef struct stopper {
    rpc_server *srv;
    atomic_int done;
} stopper;

static void *stop_thread(void *arg) {
    stopper *st = arg;
    rpc_server_shutdown(st->srv, 100);
    atomic_store(&st->done, 1);
    return NULL;
}

/* Start f's server and client and one call that the server holds. */
static rpc_call *start_held(fixture *f, result *r, int deadline_ms) {
    fx_start(f, 0, 0, 0);
    result_init(r);
    rpc_seg x = {"x", 1, NULL, NULL};
    rpc_call_start(f->ch, "/t.T/Hold", &x, 1, deadline_ms, 0, on_done, r);
    rpc_call *call = wait_held(3000);
    assert_non_null(call);
    return call;
}

static void test_shutdown_with_held_call(void **state) {
    (void)state;
    fixture f;
    result r;
    rpc_call *call = start_held(&f, &r, 5000);

    stopper st = {f.srv, 0};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, stop_thread, &st), 0);
    /* The client learns at once that its call is gone... */
    int code = result_wait(&r, 2000);
    assert_true(code == RPC_UNAVAILABLE || code == RPC_CANCELLED);
    /* ...but shutdown waits for the application's call. */
    sleep_ms(200);
    assert_int_equal(atomic_load(&st.done), 0);
    atomic_int rel;
    atomic_init(&rel, 0);
    rpc_seg seg = {"too late", 8, count_release, &rel};
    rpc_reply(call, &seg, 1);
    int64_t t0 = now_ms();
    while (!atomic_load(&st.done) && now_ms() - t0 < 3000) sleep_ms(2);
    assert_int_equal(atomic_load(&st.done), 1);
    pthread_join(th, NULL);
    assert_int_equal(wait_count(&rel, 1, 2000), 1);
    result_deinit(&r);
    fx_stop(&f); /* Shutdown again is a no-op. */
}

/* A reply given on a stream just before the shutdown reaches the client:
 * the grace waits until gRPC has sent it (as for a unary call being
 * answered) instead of cancelling the stream under it. Run on streams only
 * (the unary path did not change). What the grace can wait for is the
 * send's completion, not the client's receipt: a reply much larger than
 * the socket buffers may still lose its tail when the server closes its
 * connections after it (gRPC's own servers do the same), so the reply is
 * 2 MiB, more than HTTP/2's first window. Without the fix this fails in
 * about one run in four (the cancel races the send); a check that always
 * fails would need a hook in the send path. */
static void test_shutdown_delivers_given_reply(void **state) {
    (void)state;
    fixture f;
    result r;
    rpc_call *call = start_held(&f, &r, 10000);
    size_t n = (size_t)2 << 20;
    uint8_t *buf = calloc(1, n);
    assert_non_null(buf);
    buf[n - 1] = 7;
    atomic_int rel;
    atomic_init(&rel, 0);
    rpc_seg seg = {buf, n, count_release, &rel};
    rpc_reply(call, &seg, 1);
    int64_t t0 = now_ms();
    rpc_server_shutdown(f.srv, 5000);
    assert_true(now_ms() - t0 < 6000);
    assert_int_equal(result_wait(&r, 5000), RPC_OK);
    assert_int_equal(r.len, n);
    assert_int_equal(r.reply[n - 1], 7);
    assert_int_equal(wait_count(&rel, 1, 2000), 1);
    free(buf);
    result_deinit(&r);
    fx_stop(&f); /* Shutdown again is a no-op. */
}

static void test_call_that_cannot_start(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    atomic_int rel;
    atomic_init(&rel, 0);
    rpc_seg seg = {"x", 1, count_release, &rel};
    result r;
    result_init(&r);
    rpc_call_start(f.ch, "/t.T/Echo", &seg, 1, 0 /* bad deadline */, 0, on_done, &r);
    assert_int_equal(result_wait(&r, 2000), RPC_INTERNAL);
    assert_false(pthread_equal(r.thread, pthread_self()));
    assert_int_equal(atomic_load(&rel), 1);
    result_deinit(&r);
    fx_stop(&f);
}

/* ----- Authentication, bounds, cancellation ----- */

#define TOKEN "worker-token-0123456789"
#define ADMIN_TOKEN "admin-token-9876543210"

/* Call 'method' (flags) on ch: the status must be 'want', the reply on
 * RPC_OK the level 'want_level', and h_level/h_deny must have run for
 * exactly the calls that got through. err receives the message. */
static void expect_call(rpc_channel *ch, const char *method, int flags, int want, int want_level,
                        char *err, size_t errlen) {
    int runs = atomic_load(&level_runs);
    uint8_t *reply = NULL;
    size_t len = 0;
    int code = rpc_call_sync(ch, method, "x", 1, 5000, flags, &reply, &len, err, errlen);
    if (code != want)
        fail_msg("%s (flags %d): %s \"%s\", expected %s", method, flags, rpc_status_name(code),
                 err, rpc_status_name(want));
    if (code == RPC_OK) {
        assert_int_equal(len, 1);
        assert_int_equal(reply[0], want_level);
    }
    free(reply);
    /* h_deny's own PERMISSION_DENIED is the one /t.T/Deny can get. */
    int ran = code == RPC_OK || (code == RPC_PERMISSION_DENIED && !strcmp(method, "/t.T/Deny"));
    assert_int_equal(atomic_load(&level_runs), runs + ran);
}

static void expect_stats(rpc_server *s, uint64_t unauthenticated, uint64_t denied,
                         uint64_t exhausted, uint64_t cancelled_held, int held_now) {
    rpc_server_stats st;
    memset(&st, 0xff, sizeof st);
    rpc_server_stats_get(s, &st);
    assert_int_equal(st.unauthenticated, unauthenticated);
    assert_int_equal(st.denied, denied);
    assert_int_equal(st.exhausted, exhausted);
    assert_int_equal(st.cancelled_held, cancelled_held);
    assert_int_equal(st.held, held_now);
}

static void test_auth_levels(void **state) {
    (void)state;
    fixture f;
    rpc_server_opts so = {.token = TOKEN, .admin_token = ADMIN_TOKEN};
    fx_start_opts(&f, &so, NULL); /* The fixture's client sends no token. */
    char err[256];
    uint64_t unauth = 0, denied = 0;

    /* No token: refused before any handler, unknown methods alike (a
     * stranger learns nothing about which exist), in words that name
     * neither the method nor the service. */
    static const char *const methods[] = {"/t.T/Level", "/t.T/Admin", "/t.T/Deny", "/t.T/Hold",
                                          "/t.T/Nope"};
    for (int i = 0; i < 5; i++) {
        for (int flags = 0; flags <= RPC_ADMIN; flags += RPC_ADMIN) {
            expect_call(f.ch, methods[i], flags, RPC_UNAUTHENTICATED, 0, err, sizeof err);
            unauth++;
            assert_null(strstr(err, "t.T"));
            assert_null(strstr(err, methods[i] + 5));
        }
    }
    assert_int_equal(held_count(), 0);
    expect_stats(f.srv, unauth, 0, 0, 0, 0);

    /* Wrong tokens: the last byte changed (same length), one byte short,
     * one byte long, the first byte's case, empty; and a chief whose
     * admin token is wrong by a byte (its worker token is right). */
    static const rpc_client_opts wrong[] = {
        {.token = "worker-token-0123456788"},
        {.token = "worker-token-012345678"},
        {.token = "worker-token-01234567890"},
        {.token = "Worker-token-0123456789"},
        {.token = ""},
        {.token = TOKEN, .admin_token = "admin-token-9876543211"},
    };
    for (size_t i = 0; i < sizeof wrong / sizeof wrong[0]; i++) {
        rpc_client *c;
        rpc_channel *ch;
        client_open(&f, &wrong[i], &c, &ch);
        if (wrong[i].admin_token) {
            expect_call(ch, "/t.T/Level", 0, RPC_OK, RPC_AUTH_WORKER, err, sizeof err);
        } else {
            expect_call(ch, "/t.T/Level", 0, RPC_UNAUTHENTICATED, 0, err, sizeof err);
            unauth++;
            expect_call(ch, "/t.T/Nope", 0, RPC_UNAUTHENTICATED, 0, err, sizeof err);
            unauth++;
        }
        expect_call(ch, "/t.T/Admin", RPC_ADMIN, RPC_UNAUTHENTICATED, 0, err, sizeof err);
        unauth++;
        client_close(c, ch);
    }
    expect_stats(f.srv, unauth, 0, 0, 0, 0);

    /* The worker's token: worker methods, not the admin's. */
    rpc_client *wc;
    rpc_channel *wch;
    rpc_client_opts wo = {.token = TOKEN};
    client_open(&f, &wo, &wc, &wch);
    expect_call(wch, "/t.T/Level", 0, RPC_OK, RPC_AUTH_WORKER, err, sizeof err);
    expect_call(wch, "/t.T/Admin", 0, RPC_PERMISSION_DENIED, 0, err, sizeof err);
    denied++;
    assert_null(strstr(err, "t.T"));
    /* RPC_ADMIN without an admin token sends the worker's. */
    expect_call(wch, "/t.T/Admin", RPC_ADMIN, RPC_PERMISSION_DENIED, 0, err, sizeof err);
    denied++;
    expect_call(wch, "/t.T/Level", RPC_ADMIN, RPC_OK, RPC_AUTH_WORKER, err, sizeof err);
    /* Known to be a caller now: an unknown method is named as such. */
    expect_call(wch, "/t.T/Nope", 0, RPC_UNIMPLEMENTED, 0, err, sizeof err);
    assert_non_null(strstr(err, "/t.T/Nope"));
    /* A handler's own refusal counts with the layer's. */
    expect_call(wch, "/t.T/Deny", 0, RPC_PERMISSION_DENIED, 0, err, sizeof err);
    denied++;
    assert_string_equal(err, "this request needs more");
    expect_stats(f.srv, unauth, denied, 0, 0, 0);
    client_close(wc, wch);

    /* The chief: its admin token only on RPC_ADMIN calls. */
    rpc_client *ac;
    rpc_channel *ach;
    rpc_client_opts ao = {.token = TOKEN, .admin_token = ADMIN_TOKEN};
    client_open(&f, &ao, &ac, &ach);
    expect_call(ach, "/t.T/Level", 0, RPC_OK, RPC_AUTH_WORKER, err, sizeof err);
    expect_call(ach, "/t.T/Level", RPC_ADMIN, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    expect_call(ach, "/t.T/Admin", RPC_ADMIN, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    expect_call(ach, "/t.T/Admin", 0, RPC_PERMISSION_DENIED, 0, err, sizeof err);
    denied++;
    expect_call(ach, "/t.T/Nope", RPC_ADMIN, RPC_UNIMPLEMENTED, 0, err, sizeof err);
    client_close(ac, ach);

    /* The admin token as a client's only token: admin on every call. */
    rpc_client_opts ao2 = {.token = ADMIN_TOKEN};
    client_open(&f, &ao2, &ac, &ach);
    expect_call(ach, "/t.T/Admin", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    client_close(ac, ach);

    expect_stats(f.srv, unauth, denied, 0, 0, 0);
    fx_stop(&f);
}

/* A server without tokens: every call is the admin's, tokens sent or not. */
static void test_auth_none(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    char err[256];
    expect_call(f.ch, "/t.T/Level", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    expect_call(f.ch, "/t.T/Admin", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    expect_call(f.ch, "/t.T/Nope", 0, RPC_UNIMPLEMENTED, 0, err, sizeof err);
    rpc_client *c;
    rpc_channel *ch;
    rpc_client_opts co = {.token = "some-token-nobody-checks"};
    client_open(&f, &co, &c, &ch);
    expect_call(ch, "/t.T/Admin", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    client_close(c, ch);
    expect_stats(f.srv, 0, 0, 0, 0, 0);
    fx_stop(&f);
}

static void test_server_opts_checked(void **state) {
    (void)state;
    rpc_init();
    static const rpc_server_opts bad[] = {
        {.token = "fifteen-bytes!!"},
        {.token = ""},
        {.token = TOKEN, .admin_token = "fifteen-bytes!!"},
        {.admin_token = ADMIN_TOKEN}, /* An admin token needs a worker token. */
        {.max_held = -1},
        {.max_streams = -1},
        {.idle_ms = -1},
        {.tls_cert = "/nonexistent/cert.pem", .tls_key = "/nonexistent/key.pem"},
        {.tls_cert = "/nonexistent/cert.pem"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        rpc_server *s = (rpc_server *)&s;
        if (rpc_server_create(&bad[i], &s) != CM_EINVAL) fail_msg("server options #%zu taken", i);
        assert_null(s);
    }
    /* Exactly 16 bytes is enough. */
    rpc_server *s;
    rpc_server_opts ok = {.token = "sixteen-bytes!!!", .admin_token = "sixteen-bytes-2!"};
    assert_int_equal(rpc_server_create(&ok, &s), CM_OK);
    assert_int_equal(rpc_server_add_method_level(s, "/t.T/A", RPC_AUTH_ADMIN + 1, h_level, NULL),
                     CM_EINVAL);
    assert_int_equal(rpc_server_add_method_level(s, "/t.T/A", -1, h_level, NULL), CM_EINVAL);
    assert_int_equal(rpc_server_add_method_level(s, "/t.T/A", RPC_AUTH_ADMIN, h_level, NULL),
                     CM_OK);
    rpc_server_destroy(s);

    rpc_client *c = (rpc_client *)&c;
    rpc_client_opts co = {.tls_ca = "/nonexistent/ca.pem"};
    assert_int_equal(rpc_client_create(&co, &c), CM_EINVAL);
    assert_null(c);
    rpc_shutdown();
}

/* A gzip'd request (1 MiB of zeros: about 1 KiB on the wire) is refused
 * before it is inflated, and at once. */
static void test_compressed_request_refused(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    rpc_client *gz;
    rpc_channel *gch;
    rpc_client_opts co = {.test_gzip = 1};
    client_open(&f, &co, &gz, &gch);
    size_t n = 1 << 20;
    uint8_t *zeros = calloc(1, n);
    assert_non_null(zeros);
    char err[256];
    for (int i = 0; i < 2; i++) { /* A new connection, then the same one. */
        int64_t t0 = now_ms();
        int code = rpc_call_sync(gch, "/t.T/Level", zeros, n, 5000, 0, NULL, NULL, err, sizeof err);
        int64_t took = now_ms() - t0;
        print_message("gzip request: %s \"%s\" after %lld ms\n", rpc_status_name(code), err,
                      (long long)took);
        assert_int_not_equal(code, RPC_OK);
        assert_int_not_equal(code, RPC_DEADLINE_EXCEEDED);
        assert_true(took < 2000);
        assert_int_equal(atomic_load(&level_runs), 0);
    }
    /* The same request, not compressed, is served. */
    uint8_t *reply = NULL;
    size_t len = 0;
    assert_int_equal(
        rpc_call_sync(f.ch, "/t.T/Level", zeros, n, 5000, 0, &reply, &len, err, sizeof err),
        RPC_OK);
    assert_int_equal(atomic_load(&level_runs), 1);
    free(reply);
    free(zeros);
    client_close(gz, gch);
    fx_stop(&f);
}

static void fx_start_cancel(fixture *f, int max_held) {
    rpc_server_opts so = {.max_held = max_held, .on_cancel = on_cancel_hook,
                          .cancel_ctx = &cancel_hooks};
    fx_start_opts(f, &so, NULL);
}

/* Start n calls of /t.T/Hold on ch; their outcomes go to r[0..n). */
static void hold_start(rpc_channel *ch, result *r, int n, int64_t deadline_ms) {
    rpc_seg x = {"x", 1, NULL, NULL};
    for (int i = 0; i < n; i++) {
        result_init(&r[i]);
        rpc_call_start(ch, "/t.T/Hold", &x, 1, deadline_ms, 0, on_done, &r[i]);
    }
}

/* Answer n held calls, the one held last first. */
static void answer_held(int n) {
    for (int i = 0; i < n; i++) {
        rpc_call *call = wait_held(3000);
        assert_non_null(call);
        assert_ptr_equal(rpc_call_app(call), &hold_app);
        rpc_reply(call, NULL, 0);
    }
}

/* r[0..n) must end with 'want'. */
static void results_expect(result *r, int n, int want) {
    for (int i = 0; i < n; i++) {
        int code = result_wait(&r[i], 3000);
        if (code != want) fail_msg("call %d: %d %s, expected %s", i, code, r[i].msg,
                                   rpc_status_name(want));
        result_deinit(&r[i]);
    }
}

/* One call held for hold_ms, then answered (no other call held). */
static void hold_and_answer(rpc_channel *ch, int hold_ms) {
    result r;
    hold_start(ch, &r, 1, 5000);
    assert_int_equal(wait_held_count(1, 3000), 1);
    sleep_ms(hold_ms);
    answer_held(1);
    results_expect(&r, 1, RPC_OK);
}

/* The one call held was handed back by on_cancel, once, within 3 s. */
static void expect_handed_back(const fixture *f, int64_t t0, const char *what) {
    assert_int_equal(wait_count(&cancel_fails, 1, 3000), 1);
    print_message("%s: on_cancel done after %lld ms\n", what, (long long)(now_ms() - t0));
    assert_int_equal(held_count(), 0);
    sleep_ms(50);
    assert_int_equal(atomic_load(&cancel_hooks), 1);
    expect_stats(f->srv, 0, 0, 0, 1, 0);
}

/* A held call whose deadline passes is handed back through on_cancel; a
 * held call the application answers is not. */
static void test_cancel_on_deadline(void **state) {
    (void)state;
    fixture f;
    fx_start_cancel(&f, 0);
    hold_and_answer(f.ch, 0);
    result r;
    int64_t t0 = now_ms();
    hold_start(f.ch, &r, 1, 300);
    assert_int_equal(wait_held_count(1, 3000), 1);
    results_expect(&r, 1, RPC_DEADLINE_EXCEEDED);
    expect_handed_back(&f, t0, "deadline 300 ms");
    fx_stop(&f); /* Would wait forever for a call still held. */
}

/* A client that closes its channel with a call held (gRPC lets the call
 * run on to its deadline, here 500 ms): on_cancel, and nothing leaks. */
static void test_cancel_on_channel_close(void **state) {
    (void)state;
    fixture f;
    fx_start_cancel(&f, 0);
    rpc_client *c;
    rpc_channel *ch;
    client_open(&f, NULL, &c, &ch);
    result r;
    hold_start(ch, &r, 1, 500);
    assert_int_equal(wait_held_count(1, 3000), 1);
    int64_t t0 = now_ms();
    rpc_channel_close(ch);
    int code = result_wait(&r, 3000);
    print_message("channel closed: the call ended %s after %lld ms\n", rpc_status_name(code),
                  (long long)(now_ms() - t0));
    assert_int_not_equal(code, -1);
    assert_int_not_equal(code, RPC_OK);
    result_deinit(&r);
    rpc_client_destroy(c);
    expect_handed_back(&f, t0, "channel closed");
    fx_stop(&f);
}

/* The child process of test_cancel_on_disconnect (main's --hold-client):
 * one call to /t.T/Hold on 127.0.0.1:port, then wait to be killed. */
static void child_done(void *ud, int code, const char *message, const uint8_t *reply,
                       size_t len) {
    (void)ud;
    (void)reply;
    (void)len;
    fprintf(stderr, "hold client: the call ended: %s %s\n", rpc_status_name(code), message);
    _exit(3);
}

static int hold_client_main(const char *port, int stream) {
    g_stream = stream ? RPC_STREAM : 0;
    rpc_client *c;
    rpc_channel *ch;
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%s", port);
    if (rpc_client_create(NULL, &c) != CM_OK || rpc_channel_open(c, target, &ch) != CM_OK)
        return 2;
    rpc_seg x = {"x", 1, NULL, NULL};
    rpc_call_start(ch, "/t.T/Hold", &x, 1, 20000, 0, child_done, NULL);
    sleep_ms(20000);
    return 4;
}

/* A client process that dies with a call held: on_cancel once the
 * connection drops, long before the call's deadline (20 s). */
static void test_cancel_on_disconnect(void **state) {
    (void)state;
    fixture f;
    fx_start_cancel(&f, 0);
    char port[16];
    snprintf(port, sizeof port, "%d", f.port);
    char *argv[] = {"/proc/self/exe", "--hold-client", port, g_stream ? "stream" : NULL, NULL};
    pid_t pid;
    assert_int_equal(posix_spawn(&pid, "/proc/self/exe", NULL, NULL, argv, environ), 0);
    int held_n = wait_held_count(1, 10000);
    int64_t t0 = now_ms();
    kill(pid, SIGKILL);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_int_equal(held_n, 1);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL); /* Its call was open. */
    expect_handed_back(&f, t0, "client killed");
    fx_stop(&f);
}

/* max_held: the call over the cap is refused, counted, and the cap frees
 * up as held calls are answered. */
static void test_max_held(void **state) {
    (void)state;
    fixture f;
    fx_start_cancel(&f, 4);
    result r[4];
    hold_start(f.ch, r, 4, 5000);
    assert_int_equal(wait_held_count(4, 3000), 4);
    expect_stats(f.srv, 0, 0, 0, 0, 4);
    char err[256];
    int64_t t0 = now_ms();
    int code = rpc_call_sync(f.ch, "/t.T/Hold", "x", 1, 3000, 0, NULL, NULL, err, sizeof err);
    assert_int_equal(code, RPC_RESOURCE_EXHAUSTED);
    assert_true(now_ms() - t0 < 1000);
    assert_int_equal(held_count(), 4); /* Its handler did not run. */
    expect_stats(f.srv, 0, 0, 1, 0, 4);
    answer_held(4);
    results_expect(r, 4, RPC_OK);
    expect_stats(f.srv, 0, 0, 1, 0, 0);
    /* Room again. */
    hold_and_answer(f.ch, 0);
    expect_call(f.ch, "/t.T/Level", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    expect_stats(f.srv, 0, 0, 1, 0, 0);
    assert_int_equal(atomic_load(&cancel_hooks), 0);
    fx_stop(&f);
}

/* idle_ms: a connection without calls for that long is closed, and the
 * next call comes on a new one (from another client port); a call in
 * progress keeps it open. */
static void test_idle_connection_closed(void **state) {
    (void)state;
    fixture f;
    /* (500 ms: the gaps between calls must stay under it on a loaded
     * machine under ASan.) */
    rpc_server_opts so = {.idle_ms = 500};
    fx_start_opts(&f, &so, NULL);
    char err[256], first[sizeof last_peer];
    expect_call(f.ch, "/t.T/Level", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    snprintf(first, sizeof first, "%s", last_peer);
    hold_and_answer(f.ch, 1500);
    expect_call(f.ch, "/t.T/Level", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    assert_string_equal(last_peer, first);

    sleep_ms(1700);
    expect_call(f.ch, "/t.T/Level", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    print_message("idle: %s, then %s\n", first, last_peer);
    assert_string_not_equal(last_peer, first);
    fx_stop(&f);
}

/* max_streams: a connection carries that many calls at once; the next
 * waits on the client's side until one ends. Other connections are not
 * affected. */
static void test_max_streams(void **state) {
    (void)state;
    fixture f;
    rpc_server_opts so = {.max_streams = 2};
    fx_start_opts(&f, &so, NULL);
    char err[256];
    /* Connected, the server's settings known. */
    expect_call(f.ch, "/t.T/Level", 0, RPC_OK, RPC_AUTH_ADMIN, err, sizeof err);
    result r[4];
    hold_start(f.ch, r, 3, 5000);
    assert_int_equal(wait_held_count(2, 3000), 2);
    sleep_ms(300);
    assert_int_equal(held_count(), 2);
    /* Another connection gets its call through. (Other channel arguments:
     * gRPC shares one connection between channels with the same ones.) */
    rpc_client *c2;
    rpc_channel *ch2;
    rpc_client_opts co2 = {.max_message = 1 << 20};
    client_open(&f, &co2, &c2, &ch2);
    hold_start(ch2, &r[3], 1, 5000);
    assert_int_equal(wait_held_count(3, 3000), 3);
    answer_held(1); /* The last one held: c2's. */
    results_expect(&r[3], 1, RPC_OK);
    /* One answered on the first connection: the waiting one comes in. */
    answer_held(1);
    assert_int_equal(wait_held_count(2, 3000), 2);
    answer_held(2);
    results_expect(r, 3, RPC_OK);
    client_close(c2, ch2);
    fx_stop(&f);
}

/* Counts finished calls: ud is an atomic_int. */
static void count_done(void *ud, int code, const char *message, const uint8_t *reply,
                       size_t len) {
    (void)code;
    (void)message;
    (void)reply;
    (void)len;
    atomic_fetch_add((atomic_int *)ud, 1);
}

/* 2 rounds (5 with RPC_STRESS=1 in the environment; about 2 s a round): calls whose
 * deadlines (1 to 7 ms) pass about when they reach the server, on 4
 * server threads. Every held call whose client is gone must come back
 * through on_cancel: one whose closer completed before the handler held
 * it (on_close saw it RECEIVING) never did, even after its client
 * disconnected. Most come back within a second of their deadline; under
 * load (ASan, other tests on the same 2 cores) gRPC now and then reports
 * some of them (76, 93, 256 seen) only when the client disconnects: so the
 * check is that, once the client has closed its connection, none is left. */
static void test_stress_cancel_race(void **state) {
    (void)state;
    int rounds = getenv("RPC_STRESS") ? 5 : 2;
    fixture f;
    rpc_server_opts so = {.threads = 4, .on_cancel = on_cancel_hook, .cancel_ctx = &cancel_hooks};
    fx_start_opts(&f, &so, NULL);
    rpc_seg x = {"x", 1, NULL, NULL};
    int stuck = 0;
    for (int round = 0; round < rounds; round++) {
        atomic_int finished;
        atomic_init(&finished, 0);
        int n = 20000;
        for (int i = 0; i < n; i++) {
            rpc_call_start(f.ch, "/t.T/Hold", &x, 1, 1 + i % 7, 0, count_done, &finished);
            if (i % 50 == 49) sleep_ms(1);
        }
        assert_int_equal(wait_count(&finished, n, 30000), n);
        sleep_ms(1000);
        stuck = held_count();
        print_message("after round %d: %d calls handed back by on_cancel, %d never\n", round,
                      atomic_load(&cancel_hooks), stuck);
    }
    client_close(f.cli, f.ch); /* The client goes: its connection closes. */
    f.cli = NULL;
    f.ch = NULL;
    int left = wait_held_count(0, 10000);
    print_message("after the client closed: %d calls handed back by on_cancel, %d never\n",
                  atomic_load(&cancel_hooks), left);
    for (rpc_call *call; (call = wait_held(0));) rpc_fail(call, RPC_CANCELLED, "released");
    assert_int_equal(left, 0);
    fx_stop(&f);
}

/* Calls on one stream answered in the reverse order of their arrival: each
 * reply reaches its own call (replies go by id, not by order). */
static void test_stream_out_of_order(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    tagged.n = 0;
    static const uint8_t tags[] = "abcdef";
    result r[6];
    for (int i = 0; i < 6; i++) {
        result_init(&r[i]);
        rpc_seg seg = {&tags[i], 1, NULL, NULL};
        rpc_call_start(f.ch, "/t.T/HoldTag", &seg, 1, 5000, RPC_STREAM, on_done, &r[i]);
    }
    int64_t end = now_ms() + 3000;
    int n = 0;
    while (now_ms() < end) {
        pthread_mutex_lock(&tagged.mu);
        n = tagged.n;
        pthread_mutex_unlock(&tagged.mu);
        if (n == 6) break;
        sleep_ms(2);
    }
    assert_int_equal(n, 6);
    for (int i = 0; i < 6; i++) assert_int_equal(r[i].finished, 0);
    for (int k = 5; k >= 0; k--) {
        uint8_t reply[2] = {tagged.tags[k], (uint8_t)('0' + k)};
        rpc_seg seg = {reply, 2, NULL, NULL};
        rpc_reply(tagged.calls[k], &seg, 1);
    }
    for (int i = 0; i < 6; i++) {
        assert_int_equal(result_wait(&r[i], 3000), RPC_OK);
        assert_int_equal(r[i].len, 2);
        assert_int_equal(r[i].reply[0], tags[i]);
        result_deinit(&r[i]);
    }
    fx_stop(&f);
}

/* max_streams bounds a stream too: with that many calls in progress (or
 * replies unsent) the server reads no more of it, so the next call waits
 * (HTTP/2's flow control, as for a connection's streams) and comes in once
 * one is answered; nothing is refused. */
static void test_stream_cap(void **state) {
    (void)state;
    fixture f;
    rpc_server_opts so = {.max_streams = 2};
    fx_start_opts(&f, &so, NULL);
    result r[3];
    for (int i = 0; i < 3; i++) {
        result_init(&r[i]);
        rpc_seg x = {"x", 1, NULL, NULL};
        rpc_call_start(f.ch, "/t.T/Hold", &x, 1, 5000, RPC_STREAM, on_done, &r[i]);
    }
    assert_int_equal(wait_held_count(2, 3000), 2);
    sleep_ms(300);
    assert_int_equal(held_count(), 2);
    assert_int_equal(r[2].finished, 0);
    answer_held(1);
    assert_int_equal(wait_held_count(2, 3000), 2); /* The third came in. */
    answer_held(2);
    results_expect(r, 3, RPC_OK);
    expect_stats(f.srv, 0, 0, 0, 0, 0);
    fx_stop(&f);
}

/* Messages that fit the limit alone but not with their stream frame: a
 * request goes as a unary call instead (and succeeds), a reply fails its own
 * call only (RESOURCE_EXHAUSTED), not the stream. */
static void test_stream_frame_over_limit(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 64 << 10, 64 << 10, 0);
    char err[256];
    uint8_t *reply = NULL;
    size_t len = 0;
    size_t n = (64 << 10) - 4;
    uint8_t *big = calloc(1, n);
    assert_non_null(big);
    int code = (rpc_call_sync)(f.ch, "/t.T/Echo", big, n, 5000, RPC_STREAM, &reply, &len, err,
                               sizeof err);
    if (code != RPC_OK) fail_msg("request at the limit: %s %s", rpc_status_name(code), err);
    assert_int_equal(len, n);
    free(reply);
    uint32_t want = (uint32_t)n;
    code = (rpc_call_sync)(f.ch, "/t.T/Big", &want, sizeof want, 5000, RPC_STREAM, NULL, NULL,
                           err, sizeof err);
    assert_int_equal(code, RPC_RESOURCE_EXHAUSTED);
    assert_non_null(strstr(err, "over the message limit"));
    want = 1000; /* The same stream serves on. */
    code = (rpc_call_sync)(f.ch, "/t.T/Big", &want, sizeof want, 5000, RPC_STREAM, &reply, &len,
                           err, sizeof err);
    assert_int_equal(code, RPC_OK);
    assert_int_equal(len, 1000);
    free(reply);
    assert_int_equal(wait_count(&srv_releases, 3, 2000), 3);
    free(big);
    fx_stop(&f);
}

/* The server reads stream frames as untrusted input: a unary call of a
 * stream path is a stream of one message, so a message too short for its
 * id ends it with INVALID_ARGUMENT, and one with an id is answered with the
 * reply frame (the id, OK, the reply). The server serves on. */
static void test_stream_frames_checked(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    char err[256];
    uint8_t *reply = NULL;
    size_t len = 0;
    int code = (rpc_call_sync)(f.ch, "/t.T/Echo/stream", "abc", 3, 5000, 0, &reply, &len, err,
                               sizeof err);
    assert_int_equal(code, RPC_INVALID_ARGUMENT);
    assert_non_null(strstr(err, "8-byte id"));
    static const uint8_t req[11] = {1, 2, 3, 4, 5, 6, 7, 8, 'x', 'y', 'z'};
    code = (rpc_call_sync)(f.ch, "/t.T/Echo/stream", req, sizeof req, 5000, 0, &reply, &len, err,
                           sizeof err);
    if (code != RPC_OK) fail_msg("one-message stream: %s %s", rpc_status_name(code), err);
    assert_int_equal(len, 15);
    assert_memory_equal(reply, req, 8);
    assert_memory_equal(reply + 8, "\0\0\0\0xyz", 7);
    free(reply);
    /* Not a stream of a registered method: unknown. */
    code = (rpc_call_sync)(f.ch, "/t.T/Nope/stream", req, sizeof req, 5000, 0, NULL, NULL, err,
                           sizeof err);
    assert_int_equal(code, RPC_UNIMPLEMENTED);
    code = (rpc_call_sync)(f.ch, "/t.T/Echo", "ok", 2, 5000, RPC_STREAM, &reply, &len, err,
                           sizeof err);
    assert_int_equal(code, RPC_OK);
    assert_int_equal(len, 2);
    free(reply);
    fx_stop(&f);
}

/* After rpc_init, two of gRPC's mutexes (Abseil's, under gpr_mu) taken in
 * both orders: Debian's Abseil, built without NDEBUG, aborts the process
 * for a potential deadlock unless its detector is off (GRPC_LEVELDB_NOTES
 * G14). Run in a process of its own: the graph is global. */
static int lock_order_main(void) {
    rpc_init();
    gpr_mu a, b;
    gpr_mu_init(&a);
    gpr_mu_init(&b);
    gpr_mu_lock(&a);
    gpr_mu_lock(&b);
    gpr_mu_unlock(&b);
    gpr_mu_unlock(&a);
    gpr_mu_lock(&b);
    gpr_mu_lock(&a);
    gpr_mu_unlock(&a);
    gpr_mu_unlock(&b);
    gpr_mu_destroy(&a);
    gpr_mu_destroy(&b);
    return 0;
}

static void test_absl_deadlock_detector_off(void **state) {
    (void)state;
    char *argv[] = {"/proc/self/exe", "--lock-order", NULL};
    pid_t pid;
    int status = 0;
    /* Its report of the cycle is what a failure shows. */
    assert_int_equal(posix_spawn(&pid, "/proc/self/exe", NULL, NULL, argv, environ), 0);
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

int main(int argc, char **argv) {
    if ((argc == 3 || argc == 4) && !strcmp(argv[1], "--hold-client"))
        return hold_client_main(argv[2], argc == 4);
    if (argc == 2 && !strcmp(argv[1], "--lock-order")) return lock_order_main();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_table),
        cmocka_unit_test(test_abseil_detector_off),
        cmocka_unit_test(test_lifecycle_and_misuse),
        cmocka_unit_test(test_echo_small),
        cmocka_unit_test(test_echo_16mib_zero_copy),
        cmocka_unit_test(test_deferred_reply),
        cmocka_unit_test(test_fail_codes),
        cmocka_unit_test(test_unknown_method),
        cmocka_unit_test(test_oversized_request),
        cmocka_unit_test(test_oversized_reply),
        cmocka_unit_test(test_deadline),
        cmocka_unit_test(test_no_server),
        cmocka_unit_test(test_wait_for_ready_late_server),
        cmocka_unit_test(test_port_taken),
        cmocka_unit_test(test_many_concurrent_calls),
        cmocka_unit_test(test_shutdown_with_held_call),
        cmocka_unit_test(test_call_that_cannot_start),
        cmocka_unit_test(test_auth_levels),
        cmocka_unit_test(test_auth_none),
        cmocka_unit_test(test_server_opts_checked),
        cmocka_unit_test(test_compressed_request_refused),
        cmocka_unit_test(test_cancel_on_deadline),
        cmocka_unit_test(test_cancel_on_channel_close),
        cmocka_unit_test(test_cancel_on_disconnect),
        cmocka_unit_test(test_max_held),
        cmocka_unit_test(test_idle_connection_closed),
        cmocka_unit_test(test_max_streams),
        cmocka_unit_test(test_stress_cancel_race),
        cmocka_unit_test(test_absl_deadlock_detector_off),
        cmocka_unit_test(test_stream_out_of_order),
        cmocka_unit_test(test_stream_frames_checked),
        cmocka_unit_test(test_stream_cap),
        cmocka_unit_test(test_stream_frame_over_limit),
#define STREAM(t) {#t " (stream)", t, stream_on, stream_off, NULL}
#define NOSPIN(t) {#t " (stream, no poll spin)", t, nospin_on, nospin_off, NULL}
        NOSPIN(test_echo_small),
        NOSPIN(test_deadline),
        NOSPIN(test_many_concurrent_calls),
        NOSPIN(test_shutdown_with_held_call),
        STREAM(test_echo_small),
        STREAM(test_echo_16mib_zero_copy),
        STREAM(test_deferred_reply),
        STREAM(test_fail_codes),
        STREAM(test_unknown_method),
        STREAM(test_oversized_request),
        STREAM(test_oversized_reply),
        STREAM(test_deadline),
        STREAM(test_no_server),
        STREAM(test_wait_for_ready_late_server),
        STREAM(test_many_concurrent_calls),
        STREAM(test_shutdown_with_held_call),
        STREAM(test_shutdown_delivers_given_reply),
        NOSPIN(test_shutdown_delivers_given_reply),
        STREAM(test_call_that_cannot_start),
        STREAM(test_auth_levels),
        STREAM(test_auth_none),
        STREAM(test_cancel_on_deadline),
        STREAM(test_cancel_on_channel_close),
        STREAM(test_cancel_on_disconnect),
        STREAM(test_max_held),
        STREAM(test_stress_cancel_race),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
