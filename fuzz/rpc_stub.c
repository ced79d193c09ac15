/* rpc_stub.c - proto/rpc.h in-process, without gRPC (see rpc_stub.h).
 * SPDX-License-Identifier: MIT
 */
#include "fuzz/rpc_stub.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"

#define MAX_METHODS 16

struct rpc_call {
    rpc_server *server;
    const char *method; /* The server's copy of the name. */
    int level;          /* RPC_AUTH_* of the caller. */
    void *app;          /* rpc_call_set_app. */
    int state;          /* RPC_STUB_*. */
    int code;
    uint8_t *reply;
    size_t reply_len;
    char msg[512];
    rpc_call *next;
};

typedef struct method {
    char *name;
    int level;
    rpc_handler fn;
    void *ctx;
    rpc_handler_pieces fn_pieces;
} method;

struct rpc_server {
    method methods[MAX_METHODS];
    int nmethods;
    int started, shut;
    rpc_cancel_fn on_cancel;
    void *cancel_ctx;
    rpc_server_stats stats;
    rpc_call *calls; /* Every call, newest first; freed at destroy. */
    int ncalls;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static rpc_server *last_server;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "rpc_stub: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    abort();
}

/* rpc_status_name and rpc_status_to_cm are proto/rpc.c's, repeated here:
 * rpc.c (and with it gRPC) is what this file replaces. */
static const char *const names[] = {
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED"};

const char *rpc_status_name(int code) {
    if (code < 0 || code >= (int)(sizeof names / sizeof names[0])) return "UNKNOWN";
    return names[code];
}

int rpc_status_to_cm(int code) {
    switch (code) {
    case RPC_OK: return CM_OK;
    case RPC_INVALID_ARGUMENT:
    case RPC_OUT_OF_RANGE:
    case RPC_FAILED_PRECONDITION: return CM_EINVAL;
    case RPC_NOT_FOUND: return CM_ENOTFOUND;
    case RPC_DEADLINE_EXCEEDED: return CM_ETIMEDOUT;
    case RPC_UNAVAILABLE:
    case RPC_CANCELLED: return CM_EUNAVAIL;
    case RPC_RESOURCE_EXHAUSTED: return CM_ENOMEM;
    case RPC_ABORTED: return CM_EABORTED;
    case RPC_UNIMPLEMENTED: return CM_EUNSUPPORTED;
    case RPC_DATA_LOSS: return CM_ECORRUPT;
    default: return CM_EIO;
    }
}

void rpc_init(void) {}
void rpc_shutdown(void) {}

/* ------------------------------------------------------------ server */

int rpc_server_create(const rpc_server_opts *opts, rpc_server **out) {
    rpc_server *s = cm_calloc(1, sizeof *s);
    if (opts) {
        s->on_cancel = opts->on_cancel;
        s->cancel_ctx = opts->cancel_ctx;
    }
    pthread_mutex_lock(&mu);
    last_server = s;
    pthread_mutex_unlock(&mu);
    *out = s;
    return CM_OK;
}

int rpc_server_add_method_level(rpc_server *s, const char *name, int level, rpc_handler fn,
                                void *ctx) {
    if (s->started) die("rpc_server_add_method(%s) after start", name);
    if (s->nmethods == MAX_METHODS) die("more than %d methods", MAX_METHODS);
    s->methods[s->nmethods++] = (method){cm_strdup(name), level, fn, ctx, NULL};
    return CM_OK;
}

int rpc_server_add_method_pieces(rpc_server *s, const char *name, int level,
                                 rpc_handler_pieces fn, void *ctx) {
    if (s->started) die("rpc_server_add_method_pieces(%s) after start", name);
    if (s->nmethods == MAX_METHODS) die("more than %d methods", MAX_METHODS);
    s->methods[s->nmethods++] = (method){cm_strdup(name), level, NULL, ctx, fn};
    return CM_OK;
}

int rpc_server_add_method(rpc_server *s, const char *name, rpc_handler fn, void *ctx) {
    return rpc_server_add_method_level(s, name, RPC_AUTH_WORKER, fn, ctx);
}

void rpc_server_stats_get(rpc_server *s, rpc_server_stats *out) {
    pthread_mutex_lock(&mu);
    *out = s->stats;
    out->held = 0;
    for (rpc_call *c = s->calls; c; c = c->next) out->held += c->state == RPC_STUB_OPEN;
    pthread_mutex_unlock(&mu);
}

int rpc_call_level(const rpc_call *c) { return c->level; }

void rpc_call_set_app(rpc_call *c, void *app) { c->app = app; }
void *rpc_call_app(const rpc_call *c) { return c->app; }

void rpc_deny(rpc_call *c, const char *why) {
    pthread_mutex_lock(&mu);
    c->server->stats.denied++;
    pthread_mutex_unlock(&mu);
    rpc_fail(c, RPC_PERMISSION_DENIED, "%s", why);
}

int rpc_server_start(rpc_server *s, const char *addr, int *port) {
    (void)addr;
    s->started = 1;
    if (port) *port = 1;
    return CM_OK;
}

void rpc_server_shutdown(rpc_server *s, int grace_ms) {
    (void)grace_ms;
    pthread_mutex_lock(&mu);
    s->shut = 1;
    for (rpc_call *c = s->calls; c; c = c->next)
        if (c->state == RPC_STUB_OPEN)
            die("rpc_server_shutdown: a call of %s was never finished (the real server would "
                "wait for it forever)", c->method);
    pthread_mutex_unlock(&mu);
}

void rpc_server_destroy(rpc_server *s) {
    if (!s) return;
    if (!s->shut) rpc_server_shutdown(s, 0);
    pthread_mutex_lock(&mu);
    if (last_server == s) last_server = NULL;
    pthread_mutex_unlock(&mu);
    for (rpc_call *c = s->calls, *n; c; c = n) {
        n = c->next;
        free(c->reply);
        free(c);
    }
    for (int i = 0; i < s->nmethods; i++) free(s->methods[i].name);
    free(s);
}

rpc_server *rpc_stub_server(void) {
    pthread_mutex_lock(&mu);
    rpc_server *s = last_server;
    pthread_mutex_unlock(&mu);
    return s;
}

/* A handler of pieces gets the request cut where gRPC could cut it, i.e.
 * anywhere: pieces of 1 to 97 bytes, their sizes drawn from the request's
 * bytes (the same request, the same cut), each its own heap block of
 * exactly its size, so that reading across a piece's end, or keeping a
 * piece after the handler returns, is an ASan report. */
static void invoke_pieces(const method *m, rpc_call *c, const uint8_t *req, size_t len) {
    size_t cap = len ? len : 1, n = 0;
    rpc_piece *pieces = cm_malloc(cap * sizeof *pieces);
    uint64_t x = 0x9e3779b97f4a7c15ull ^ len;
    for (size_t i = 0; i < len && i < 16; i++) x = x * 31 + req[i];
    for (size_t at = 0; at < len;) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t k = 1 + (size_t)(x % 97);
        if (k > len - at) k = len - at;
        uint8_t *p = cm_malloc(k);
        memcpy(p, req + at, k);
        pieces[n++] = (rpc_piece){p, k};
        at += k;
    }
    m->fn_pieces(m->ctx, c, pieces, (int)n, len);
    for (size_t i = 0; i < n; i++) free((void *)pieces[i].p);
    free(pieces);
}

rpc_call *rpc_stub_invoke(rpc_server *s, const char *name, const uint8_t *req, size_t len) {
    return rpc_stub_invoke_as(s, name, RPC_AUTH_ADMIN, req, len);
}

rpc_call *rpc_stub_invoke_as(rpc_server *s, const char *name, int level, const uint8_t *req,
                             size_t len) {
    if (!s->started || s->shut) die("call of %s on a server that is not serving", name);
    rpc_call *c = cm_calloc(1, sizeof *c);
    c->server = s;
    c->method = name;
    c->level = level;
    method *m = NULL;
    for (int i = 0; i < s->nmethods; i++)
        if (!strcmp(s->methods[i].name, name)) m = &s->methods[i];
    pthread_mutex_lock(&mu);
    c->next = s->calls;
    s->calls = c;
    s->ncalls++;
    pthread_mutex_unlock(&mu);
    if (m) c->method = m->name;
    if (!m) {
        rpc_fail(c, RPC_UNIMPLEMENTED, "no method %s", name);
        return c;
    }
    if (level < m->level) { /* As rpc.c: refused before the handler. */
        rpc_deny(c, "this method needs the admin token");
        return c;
    }
    if (m->fn_pieces) {
        invoke_pieces(m, c, req, len);
        return c;
    }
    /* The handler's own copy, exactly len bytes (an empty request points
     * just past a 1-byte block): reading past it or keeping it after the
     * handler returns is an ASan report. */
    uint8_t *copy = cm_malloc(len ? len : 1);
    if (len) memcpy(copy, req, len);
    m->fn(m->ctx, c, len ? copy : copy + 1, len);
    free(copy);
    return c;
}

/* Mark c finished (mu held); dies if it already was. */
static void finish(rpc_call *c, int state, int code) {
    if (c->state != RPC_STUB_OPEN)
        die("a call of %s finished twice (first %s %s, then %s %s)", c->method,
            c->state == RPC_STUB_REPLIED ? "replied" : "failed", rpc_status_name(c->code),
            state == RPC_STUB_REPLIED ? "replied" : "failed", rpc_status_name(code));
    c->state = state;
    c->code = code;
}

void rpc_reply(rpc_call *c, const rpc_seg *segs, int nsegs) {
    size_t n = 0;
    for (int i = 0; i < nsegs; i++) n += segs[i].len;
    uint8_t *r = cm_malloc(n ? n : 1), *p = r;
    for (int i = 0; i < nsegs; i++) {
        if (segs[i].len) memcpy(p, segs[i].data, segs[i].len);
        p += segs[i].len;
    }
    pthread_mutex_lock(&mu);
    finish(c, RPC_STUB_REPLIED, RPC_OK);
    c->reply = r;
    c->reply_len = n;
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < nsegs; i++)
        if (segs[i].release) segs[i].release(segs[i].ud);
}

void rpc_fail(rpc_call *c, int code, const char *fmt, ...) {
    if (code == RPC_OK) die("rpc_fail(%s) with RPC_OK", c->method);
    char msg[sizeof c->msg];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&mu);
    finish(c, RPC_STUB_FAILED, code);
    memcpy(c->msg, msg, sizeof msg);
    pthread_mutex_unlock(&mu);
}

const char *rpc_call_peer(rpc_call *c) {
    if (c->state != RPC_STUB_OPEN) die("rpc_call_peer on a finished call of %s", c->method);
    return "fuzz:0";
}

int rpc_stub_cancel(rpc_call *c) {
    rpc_server *s = c->server;
    if (rpc_stub_state(c) != RPC_STUB_OPEN || !s->on_cancel) return 0;
    pthread_mutex_lock(&mu);
    s->stats.cancelled_held++;
    pthread_mutex_unlock(&mu);
    s->on_cancel(s->cancel_ctx, c);
    /* No other thread here could be finishing it: on_cancel must have. */
    if (rpc_stub_state(c) == RPC_STUB_OPEN)
        die("on_cancel left a held call of %s open (its client is gone)", c->method);
    return 1;
}

int rpc_stub_state(const rpc_call *c) {
    pthread_mutex_lock(&mu);
    int st = c->state;
    pthread_mutex_unlock(&mu);
    return st;
}

int rpc_stub_code(const rpc_call *c) { return c->code; }

const uint8_t *rpc_stub_reply(const rpc_call *c, size_t *len) {
    *len = c->reply_len;
    return c->reply;
}

int rpc_stub_open_calls(rpc_server *s) {
    int n = 0;
    pthread_mutex_lock(&mu);
    for (rpc_call *c = s->calls; c; c = c->next) n += c->state == RPC_STUB_OPEN;
    pthread_mutex_unlock(&mu);
    return n;
}

/* ------------------------------------------------------------ client:
 * nothing to talk to. */

struct rpc_client {
    int unused;
};
struct rpc_channel {
    char *target;
};

int rpc_client_create(const rpc_client_opts *opts, rpc_client **out) {
    (void)opts;
    *out = cm_calloc(1, sizeof **out);
    return CM_OK;
}

void rpc_client_destroy(rpc_client *c) { free(c); }

int rpc_channel_open(rpc_client *c, const char *target, rpc_channel **out) {
    (void)c;
    *out = cm_calloc(1, sizeof **out);
    (*out)->target = cm_strdup(target);
    return CM_OK;
}

void rpc_channel_close(rpc_channel *ch) {
    if (!ch) return;
    free(ch->target);
    free(ch);
}

const char *rpc_channel_target(const rpc_channel *ch) { return ch->target; }

void rpc_call_start(rpc_channel *ch, const char *method, const rpc_seg *segs, int nsegs,
                    int64_t deadline_ms, int flags, rpc_done done, void *ud) {
    (void)ch, (void)method, (void)deadline_ms, (void)flags;
    for (int i = 0; i < nsegs; i++)
        if (segs[i].release) segs[i].release(segs[i].ud);
    done(ud, RPC_UNAVAILABLE, "rpc_stub: no network in the fuzz build", NULL, 0);
}

void rpc_call_start_pieces(rpc_channel *ch, const char *method, const rpc_seg *segs, int nsegs,
                           int64_t deadline_ms, int flags, rpc_done_pieces done, void *ud) {
    (void)ch, (void)method, (void)deadline_ms, (void)flags;
    for (int i = 0; i < nsegs; i++)
        if (segs[i].release) segs[i].release(segs[i].ud);
    done(ud, RPC_UNAVAILABLE, "rpc_stub: no network in the fuzz build", NULL, 0, 0);
}

int rpc_call_sync(rpc_channel *ch, const char *method, const void *req, size_t req_len,
                  int64_t deadline_ms, int flags, uint8_t **reply, size_t *len, char *msg,
                  size_t msglen) {
    (void)ch, (void)method, (void)req, (void)req_len, (void)deadline_ms, (void)flags;
    *reply = NULL;
    *len = 0;
    if (msg && msglen) snprintf(msg, msglen, "rpc_stub: no network in the fuzz build");
    return RPC_UNAVAILABLE;
}
