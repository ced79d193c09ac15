/* test_rpc.c - unit tests for the gRPC layer (proto/rpc.c).
 * SPDX-License-Identifier: MIT
 *
 * Every test runs an in-process server on 127.0.0.1:0 and a client in the
 * same process. Zero-copy segments count their release() calls, which must
 * each run exactly once. Every wait is bounded.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/cm_status.h"
#include "proto/rpc.h"

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
    rpc_call *calls[16];
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
    pthread_mutex_lock(&held.mu);
    held.calls[held.n++] = call;
    pthread_cond_broadcast(&held.cv);
    pthread_mutex_unlock(&held.mu);
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

/* ===== Fixture ===== */

typedef struct fixture {
    rpc_server *srv;
    int port;
    rpc_client *cli;
    rpc_channel *ch;
} fixture;

static void fx_start(fixture *f, int srv_max, int cli_max, int threads) {
    memset(f, 0, sizeof *f);
    atomic_store(&srv_releases, 0);
    held.n = 0;
    rpc_server_opts so = {.threads = threads, .max_message = srv_max};
    assert_int_equal(rpc_server_create(&so, &f->srv), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Echo", h_echo, NULL), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Fail", h_fail,
                                           (void *)(intptr_t)RPC_INVALID_ARGUMENT),
                     CM_OK);
    assert_int_equal(
        rpc_server_add_method(f->srv, "/t.T/NotFound", h_fail, (void *)(intptr_t)RPC_NOT_FOUND),
        CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Hold", h_hold, NULL), CM_OK);
    assert_int_equal(rpc_server_add_method(f->srv, "/t.T/Big", h_big, NULL), CM_OK);
    assert_int_equal(rpc_server_start(f->srv, "127.0.0.1:0", &f->port), CM_OK);
    assert_true(f->port > 0);
    rpc_client_opts co = {.max_message = cli_max};
    assert_int_equal(rpc_client_create(&co, &f->cli), CM_OK);
    char target[64];
    snprintf(target, sizeof target, "127.0.0.1:%d", f->port);
    assert_int_equal(rpc_channel_open(f->cli, target, &f->ch), CM_OK);
    assert_string_equal(rpc_channel_target(f->ch), target);
}

static void fx_stop(fixture *f) {
    rpc_channel_close(f->ch);
    rpc_client_destroy(f->cli);
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
    /* A port nobody listens on: bind one, then stop. */
    rpc_server *s;
    int port = 0;
    assert_int_equal(rpc_server_create(NULL, &s), CM_OK);
    assert_int_equal(rpc_server_start(s, "127.0.0.1:0", &port), CM_OK);
    rpc_server_destroy(s);

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
    int port = 0;
    assert_int_equal(rpc_server_create(NULL, &s), CM_OK);
    assert_int_equal(rpc_server_start(s, "127.0.0.1:0", &port), CM_OK);
    rpc_server_destroy(s);

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

static void test_shutdown_with_held_call(void **state) {
    (void)state;
    fixture f;
    fx_start(&f, 0, 0, 0);
    result r;
    result_init(&r);
    rpc_seg x = {"x", 1, NULL, NULL};
    rpc_call_start(f.ch, "/t.T/Hold", &x, 1, 5000, 0, on_done, &r);
    rpc_call *call = wait_held(3000);
    assert_non_null(call);

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

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_table),
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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
