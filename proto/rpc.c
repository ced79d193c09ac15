/* rpc.c - unary calls over the gRPC C core API (1.51): server, client, codes.
 * SPDX-License-Identifier: MIT
 *
 * The only file that includes <grpc/...>. The contract is in rpc.h; the
 * behaviour of gRPC 1.51 referred to as G1..G13 is described in
 * docs/GRPC_LEVELDB_NOTES.md.
 */
#include "proto/rpc.h"

#include <assert.h>
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <grpc/byte_buffer.h>
#include <grpc/byte_buffer_reader.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"

/* Design
 *
 * Server. One completion queue (CQ), drained by 'threads' threads. Every
 * tag on it is either &server->shutdown_tag or an rpc_call, whose 'state'
 * says which operation completed, because a call has at most one operation
 * outstanding at a time:
 *
 *   REQUESTED  grpc_server_request_call is pending (request_one).
 *     success=1 -> RECEIVING: batch 1 = SEND_INITIAL_METADATA +
 *                 RECV_MESSAGE (on_accept), and a new request is armed.
 *     success=0 -> freed (shutdown fails pending requests).
 *   RECEIVING  batch 1 is pending.
 *     success=1 -> HELD: the handler runs (on_received). A missing message
 *                 or an unknown method is answered at once with rpc_fail.
 *     success=0 -> freed (the call died before the request arrived).
 *   HELD       the application owns the call.
 *     rpc_reply / rpc_fail -> FINISHING: batch 2 = [SEND_MESSAGE] +
 *                 SEND_STATUS_FROM_SERVER (finish).
 *   FINISHING  batch 2 is pending; its completion drops its reference.
 *   Besides, from on_accept on, a batch of its own, RECV_CLOSE_ON_SERVER
 *   (tag: the call's 'closer'), completes once the call is over on the wire:
 *   answered, or its client cancelled, disconnected or passed its deadline.
 *   If the call is still HELD then, the application hears of it
 *   (on_cancel), so that a parked Pull is not kept for a client that is
 *   gone. A call has two references while both are outstanding (the state
 *   chain and the closer), and is freed when the last one is dropped.
 *
 *   Server: CREATED --rpc_server_start--> RUNNING --rpc_server_shutdown-->
 *   STOPPING --(drained, threads joined)--> STOPPED. Shutdown steps:
 *   grpc_server_shutdown_and_notify; wait up to grace_ms while some call
 *   is not HELD (ncalls > nheld); grpc_server_cancel_all_calls; wait for
 *   the tag and for ncalls == nrequests == 0 (the application finishes its
 *   HELD calls); grpc_completion_queue_shutdown; join; destroy.
 *
 * Invariants:
 *  - The state is set, and every per-call field is written, before
 *    grpc_call_start_batch / grpc_server_request_call; nothing touches the
 *    context after that (G3): another CQ thread may complete and free it
 *    before the start function returns.
 *  - nrequests counts REQUESTED contexts, ncalls accepted contexts not yet
 *    freed (RECEIVING, HELD, FINISHING, or waiting for the closer), nheld
 *    the HELD ones. A call's state moves HELD -> FINISHING under mu, where
 *    the closer reads it.
 *  - The CQ is shut down only after the shutdown tag was seen and
 *    nrequests == ncalls == 0 (G4), so no grpc_call_start_batch can meet a
 *    shut-down queue: rpc_reply works until the very end of shutdown.
 *  - Requests are re-armed only while RUNNING.
 *
 * Client. One CQ and one thread that runs the 'done' callbacks. Each call is
 * one batch of six operations on a ccall context; a call that cannot start
 * reports through the same thread by posting its context with
 * grpc_channel_watch_connectivity_state(deadline in the past), the only
 * public way of putting a tag on a CQ. ncalls/nchannels only check
 * rpc_client_destroy's precondition.
 *
 * Received messages are flattened: a single-slice message is used in place,
 * anything else is copied once into the receiving thread's reusable buffer;
 * handlers and callbacks of the _pieces kind get gRPC's slices in place
 * instead (no copy).
 */

/* ------------------------------------------------------------------ */
/* Status codes                                                       */
/* ------------------------------------------------------------------ */

static const char *const status_names[] = {
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
};

const char *rpc_status_name(int code) {
    if (code < 0 || code >= (int)(sizeof status_names / sizeof status_names[0]))
        return "UNKNOWN";
    return status_names[code];
}

/* gRPC status -> CM code:
 *   OK                                      CM_OK
 *   INVALID_ARGUMENT, OUT_OF_RANGE,
 *   FAILED_PRECONDITION                     CM_EINVAL
 *   NOT_FOUND                               CM_ENOTFOUND
 *   DEADLINE_EXCEEDED                       CM_ETIMEDOUT
 *   UNAVAILABLE, CANCELLED                  CM_EUNAVAIL
 *   RESOURCE_EXHAUSTED                      CM_ENOMEM
 *   ABORTED                                 CM_EABORTED
 *   UNIMPLEMENTED                           CM_EUNSUPPORTED
 *   DATA_LOSS                               CM_ECORRUPT
 *   anything else (UNKNOWN, INTERNAL, ...)  CM_EIO */
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

/* ------------------------------------------------------------------ */
/* Shared helpers                                                     */
/* ------------------------------------------------------------------ */

/* The first rpc_init takes one grpc_init() reference that is never given
 * back, so the library is never torn down before exit. The final
 * grpc_shutdown() joins gRPC's executor threads; after a large transfer one
 * of them can sit in the TCP write backup poller (tcp_posix.cc run_poller,
 * a pollset_work with a 10 s deadline), and the teardown then blocked for
 * 10.1 s (measured, 1 run in 5 under CPU load). Nothing is lost: a process
 * uses gRPC until it exits. */
static pthread_once_t pin_once = PTHREAD_ONCE_INIT;

/* Debian 12's Abseil is built without NDEBUG, so every absl::Mutex lock in
 * gRPC also runs its deadlock detector: a global graph of lock ids under a
 * global lock (docs/GRPC_LEVELDB_NOTES.md G14). Release builds of Abseil
 * have it off; so does this, through absl::SetMutexDeadlockDetectionMode
 * (kIgnore = 0), looked up by its mangled name in Debian's inline
 * namespace. An Abseil without that symbol (another build, another
 * version) is left as it is. */
static void absl_no_deadlock_detection(void) {
    void (*set_mode)(int) = (void (*)(int))dlsym(
        RTLD_DEFAULT, "_ZN4absl7debian329SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE");
    if (set_mode) set_mode(0);
}

static void pin_grpc(void) {
    absl_no_deadlock_detection();
    grpc_init();
}

void rpc_init(void) {
    pthread_once(&pin_once, pin_grpc);
    grpc_init();
}

void rpc_shutdown(void) { grpc_shutdown(); }

static void release_segs(const rpc_seg *segs, int nsegs) {
    for (int i = 0; segs && i < nsegs; i++)
        if (segs[i].release) segs[i].release(segs[i].ud);
}

/* A raw byte buffer holding the concatenation of segs. Takes ownership of
 * the zero-copy segments: each becomes a refcounted slice whose last unref
 * (by gRPC, or by grpc_byte_buffer_destroy) calls release(ud). Empty
 * zero-copy segments are released at once. */
static grpc_byte_buffer *segs_to_buffer(const rpc_seg *segs, int nsegs) {
    grpc_slice stack[8];
    grpc_slice *sl = nsegs <= 8 ? stack : cm_malloc((size_t)nsegs * sizeof *sl);
    size_t n = 0;
    for (int i = 0; i < nsegs; i++) {
        const rpc_seg *g = &segs[i];
        if (g->len == 0) {
            if (g->release) g->release(g->ud);
        } else if (g->release) {
            sl[n++] = grpc_slice_new_with_user_data((void *)g->data, g->len, g->release, g->ud);
        } else {
            sl[n++] = grpc_slice_from_copied_buffer(g->data, g->len);
        }
    }
    grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(sl, n); /* Takes its own refs. */
    for (size_t i = 0; i < n; i++) grpc_slice_unref(sl[i]);
    if (sl != stack) free(sl);
    return bb;
}

/* A received message as pieces in place: gRPC's slices, no copy. */
typedef struct view {
    rpc_piece small[16];
    rpc_piece *p; /* small, or malloc'd for more slices. */
    int n;
    size_t len;
    grpc_byte_buffer_reader r;
    int has_reader;
} view;

/* Returns RPC_OK, RPC_INTERNAL (undecodable) or RPC_RESOURCE_EXHAUSTED (no
 * memory). view_deinit() in every case. */
static int view_init(view *v, grpc_byte_buffer *bb) {
    memset(v, 0, sizeof *v);
    v->p = v->small;
    if (!grpc_byte_buffer_reader_init(&v->r, bb)) return RPC_INTERNAL;
    v->has_reader = 1;
    /* buffer_out is the decompressed buffer, or bb itself. */
    grpc_slice_buffer *sb = &v->r.buffer_out->data.raw.slice_buffer;
    if (sb->count > sizeof v->small / sizeof v->small[0]) {
        v->p = malloc(sb->count * sizeof *v->p);
        if (!v->p) {
            v->p = v->small;
            return RPC_RESOURCE_EXHAUSTED;
        }
    }
    for (size_t i = 0; i < sb->count; i++) {
        size_t n = GRPC_SLICE_LENGTH(sb->slices[i]);
        if (!n) continue;
        v->p[v->n++] = (rpc_piece){GRPC_SLICE_START_PTR(sb->slices[i]), n};
        v->len += n;
    }
    return RPC_OK;
}

static void view_deinit(view *v) {
    if (v->p != v->small) free(v->p);
    v->p = v->small;
    if (v->has_reader) grpc_byte_buffer_reader_destroy(&v->r);
    v->has_reader = 0;
}

/* A received message as one contiguous range [p, p + len): its only piece
 * in place, or its pieces copied into the thread's scratch buffer. */
typedef struct flat {
    view v;
    const uint8_t *p;
    size_t len;
} flat;

/* Multi-slice messages are copied into a buffer that belongs to the
 * receiving thread and is reused for every message it receives: a fresh
 * malloc per message would cost a page fault per 4 KiB (about 13 ms for
 * 16 MiB). A flat is only alive on its own thread, one at a time. */
typedef struct scratch {
    uint8_t *p;
    size_t cap;
} scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *v) {
    scratch *sc = v;
    free(sc->p);
    free(sc);
}

static void scratch_key_init(void) { pthread_key_create(&scratch_key, scratch_free); }

static uint8_t *scratch_get(size_t n) {
    pthread_once(&scratch_once, scratch_key_init);
    scratch *sc = pthread_getspecific(scratch_key);
    if (!sc) {
        sc = calloc(1, sizeof *sc);
        if (!sc) return NULL;
        pthread_setspecific(scratch_key, sc);
    }
    if (n > sc->cap) {
        uint8_t *q = realloc(sc->p, n);
        if (!q) return NULL;
        sc->p = q;
        sc->cap = n;
    }
    return sc->p;
}

/* As view_init; flat_deinit() in every case. */
static int flat_init(flat *f, grpc_byte_buffer *bb) {
    static const uint8_t empty[1];
    f->p = empty;
    f->len = 0;
    int rc = view_init(&f->v, bb);
    if (rc != RPC_OK) return rc;
    if (f->v.n == 1) {
        f->p = f->v.p[0].p;
        f->len = f->v.p[0].len;
    } else if (f->v.n > 1) {
        uint8_t *buf = scratch_get(f->v.len);
        if (!buf) return RPC_RESOURCE_EXHAUSTED;
        size_t off = 0;
        for (int i = 0; i < f->v.n; i++) {
            memcpy(buf + off, f->v.p[i].p, f->v.p[i].len);
            off += f->v.p[i].len;
        }
        f->p = buf;
        f->len = off;
    }
    return RPC_OK;
}

static void flat_deinit(flat *f) { view_deinit(&f->v); }

/* printf into a malloc'd string. */
static char *vformat(const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) return cm_strdup("(bad format)");
    char *s = cm_malloc((size_t)n + 1);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    return s;
}

static void arg_int(grpc_arg *a, const char *key, int value) {
    a->type = GRPC_ARG_INTEGER;
    a->key = (char *)key;
    a->value.integer = value;
}

/* ------------------------------------------------------------------ */
/* Server                                                             */
/* ------------------------------------------------------------------ */

enum { SRV_CREATED, SRV_RUNNING, SRV_STOPPING, SRV_STOPPED };
enum { CALL_REQUESTED, CALL_RECEIVING, CALL_HELD, CALL_FINISHING };

typedef struct method_entry {
    char *name;
    rpc_handler fn;           /* One of the two. */
    rpc_handler_pieces fn_pieces;
    void *ctx;
    int level; /* RPC_AUTH_* a caller needs. */
} method_entry;

/* What a completion-queue tag is: every tag struct starts with this. */
enum { TAG_CALL = 1, TAG_CLOSER = 2, TAG_SHUTDOWN = 3 };

/* Thread-safety: the fields above 'mu' are written before the threads start
 * and only read afterwards, except server/cq/threads (shutdown's thread). */
struct rpc_server {
    int nthreads;
    int max_message;
    method_entry *methods;
    int nmethods;
    grpc_server *server;       /* NULL until started. */
    grpc_completion_queue *cq; /* NULL until started. */
    pthread_t *threads;
    int shutdown_tag; /* TAG_SHUTDOWN; its address is the shutdown_and_notify tag. */
    /* Authentication: "Bearer <token>" as sent (NULL: no authentication). */
    char *bearer, *admin_bearer;
    grpc_server_credentials *creds; /* TLS, or insecure. */
    int max_held, max_streams, idle_ms;
    rpc_cancel_fn on_cancel;
    void *cancel_ctx;

    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC; broadcast on any change below. */
    /* Protected by mu. */
    int state;
    int nrequests;
    int ncalls;
    int nheld;
    int shutdown_seen;
    rpc_server_stats st;
    uint64_t refusals_logged;
};

/* One call, from grpc_server_request_call to its last batch. The fields
 * belong to whichever thread moves the call to its next state. */
typedef struct closer {
    int kind; /* TAG_CLOSER */
    struct rpc_call *call;
} closer;

struct rpc_call {
    int kind; /* TAG_CALL */
    rpc_server *srv;
    int state;
    atomic_int refs; /* The state chain's and the closer's. */
    closer close;
    int level;       /* RPC_AUTH_* of its token. */
    void *app;
    grpc_call *call;
    grpc_call_details details;
    grpc_metadata_array md;
    grpc_byte_buffer *recv;    /* Batch 1. */
    grpc_byte_buffer *send;    /* Batch 2; destroyed when it completes. */
    grpc_slice status_details; /* Batch 2. */
    int has_details;
    int cancelled; /* RECV_CLOSE_ON_SERVER. */
    /* Under srv->mu: the closer completed (the call is over on the wire),
     * the handler is running, and a cancellation seen while it ran is
     * still to be reported when it returns. */
    int closed, in_handler, cancel_pending;
    char *peer;    /* gpr_malloc'd, lazily. */
};

/* Drop a reference; the last one frees the call. */
static void call_free(rpc_call *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    rpc_server *s = c->srv;
    int was_request = c->state == CALL_REQUESTED;
    if (c->call) grpc_call_unref(c->call);
    grpc_call_details_destroy(&c->details);
    grpc_metadata_array_destroy(&c->md);
    if (c->recv) grpc_byte_buffer_destroy(c->recv);
    if (c->send) grpc_byte_buffer_destroy(c->send); /* May run release(). */
    if (c->has_details) grpc_slice_unref(c->status_details);
    gpr_free(c->peer);
    free(c);
    pthread_mutex_lock(&s->mu);
    if (was_request)
        s->nrequests--;
    else
        s->ncalls--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    /* 's' may be gone now: rpc_server_shutdown waits for these counts. */
}

/* Arm one grpc_server_request_call, unless the server is stopping. */
static void request_one(rpc_server *s) {
    pthread_mutex_lock(&s->mu);
    if (s->state != SRV_RUNNING) {
        pthread_mutex_unlock(&s->mu);
        return;
    }
    s->nrequests++;
    pthread_mutex_unlock(&s->mu);

    rpc_call *c = cm_calloc(1, sizeof *c);
    c->kind = TAG_CALL;
    c->srv = s;
    c->state = CALL_REQUESTED;
    atomic_init(&c->refs, 1);
    c->close = (closer){.kind = TAG_CLOSER, .call = c};
    grpc_call_details_init(&c->details);
    grpc_metadata_array_init(&c->md);
    grpc_call_error e =
        grpc_server_request_call(s->server, &c->call, &c->details, &c->md, s->cq, s->cq, c);
    if (e != GRPC_CALL_OK) {
        cm_error("rpc: grpc_server_request_call failed (%d)", (int)e);
        call_free(c);
    }
}

/* Start batch 2 on a HELD call. Takes ownership of bb (may be NULL). */
static void finish(rpc_call *c, grpc_byte_buffer *bb, int code, char *text) {
    rpc_server *s = c->srv;
    assert(c->state == CALL_HELD);
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    c->send = bb;
    if (bb) {
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = bb;
    }
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = (grpc_status_code)code;
    if (text) {
        c->status_details = grpc_slice_from_copied_string(text);
        c->has_details = 1;
        ops[n].data.send_status_from_server.status_details = &c->status_details;
    }
    n++;

    pthread_mutex_lock(&s->mu);
    c->state = CALL_FINISHING;
    s->nheld--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);

    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, c, NULL);
    if (e != GRPC_CALL_OK) {
        /* Nothing was queued, so the context is still ours. */
        cm_error("rpc: server grpc_call_start_batch failed (%d)", (int)e);
        call_free(c);
    }
}

/* The call now belongs to the application; returns the calls held. */
static int hold(rpc_call *c) {
    pthread_mutex_lock(&c->srv->mu);
    c->state = CALL_HELD;
    int n = ++c->srv->nheld;
    pthread_mutex_unlock(&c->srv->mu);
    return n;
}

/* Bytes a and b equal, in time that depends on their lengths only. */
static int same_secret(const char *a, size_t alen, const char *b, size_t blen) {
    unsigned char diff = alen != blen;
    size_t n = alen < blen ? alen : blen;
    for (size_t i = 0; i < n; i++) diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

/* The level the call's "authorization" metadata gives. */
static int call_level(const rpc_server *s, const grpc_metadata_array *md) {
    if (!s->bearer) return RPC_AUTH_ADMIN;
    int level = RPC_AUTH_NONE;
    for (size_t i = 0; i < md->count; i++) {
        if (grpc_slice_str_cmp(md->metadata[i].key, "authorization") != 0) continue;
        const char *v = (const char *)GRPC_SLICE_START_PTR(md->metadata[i].value);
        size_t n = GRPC_SLICE_LENGTH(md->metadata[i].value);
        /* Both compared, whatever the first says. */
        int admin = s->admin_bearer &&
                    same_secret(v, n, s->admin_bearer, strlen(s->admin_bearer));
        int worker = same_secret(v, n, s->bearer, strlen(s->bearer));
        if (admin) level = RPC_AUTH_ADMIN;
        else if (worker && level < RPC_AUTH_WORKER) level = RPC_AUTH_WORKER;
    }
    return level;
}

/* Count a refusal and log it with the peer (the first 20, then every
 * 1000th: a flood must not flood the log too). */
static void count_refusal(rpc_server *s, rpc_call *c, int code, const char *why) {
    pthread_mutex_lock(&s->mu);
    if (code == RPC_UNAUTHENTICATED) s->st.unauthenticated++;
    else if (code == RPC_PERMISSION_DENIED) s->st.denied++;
    else s->st.exhausted++;
    uint64_t k = ++s->refusals_logged;
    pthread_mutex_unlock(&s->mu);
    if (k <= 20 || k % 1000 == 0) {
        char *method = grpc_slice_to_c_string(c->details.method);
        cm_warn("refused %s from %s: %s (%s; %llu refusals so far)", method, rpc_call_peer(c),
                rpc_status_name(code), why, (unsigned long long)k);
        gpr_free(method);
    }
}

void rpc_server_stats_get(rpc_server *s, rpc_server_stats *out) {
    pthread_mutex_lock(&s->mu);
    *out = s->st;
    out->held = s->nheld;
    pthread_mutex_unlock(&s->mu);
}

void rpc_reply(rpc_call *call, const rpc_seg *segs, int nsegs) {
    if (!call) {
        release_segs(segs, nsegs);
        return;
    }
    if (nsegs < 0 || (nsegs > 0 && !segs)) {
        release_segs(segs, nsegs);
        finish(call, NULL, RPC_INTERNAL, "rpc_reply: bad segment list");
        return;
    }
    finish(call, segs_to_buffer(segs, nsegs), RPC_OK, NULL);
}

void rpc_fail(rpc_call *call, int code, const char *fmt, ...) {
    if (!call) return;
    if (code <= RPC_OK || code > RPC_UNAUTHENTICATED) {
        cm_warn("rpc_fail with code %d; sending UNKNOWN", code);
        code = RPC_UNKNOWN;
    }
    va_list ap;
    va_start(ap, fmt);
    char *text = vformat(fmt ? fmt : "", ap);
    va_end(ap);
    finish(call, NULL, code, text);
    free(text);
}

const char *rpc_call_peer(rpc_call *call) {
    if (!call->peer) call->peer = grpc_call_get_peer(call->call);
    return call->peer;
}

int rpc_call_level(const rpc_call *call) { return call->level; }

void rpc_deny(rpc_call *call, const char *why) {
    if (!call) return;
    count_refusal(call->srv, call, RPC_PERMISSION_DENIED, why);
    rpc_fail(call, RPC_PERMISSION_DENIED, "%s", why);
}
void rpc_call_set_app(rpc_call *call, void *app) { call->app = app; }
void *rpc_call_app(const rpc_call *call) { return call->app; }

/* The closer's completion: the call is over on the wire. It may come on
 * another thread before the request's (then on_received fails the call
 * without running its handler) or while the handler runs (then the
 * cancellation is reported when the handler returns, once the application
 * has put the call wherever it keeps it). */
static void on_close(rpc_call *c) {
    rpc_server *s = c->srv;
    pthread_mutex_lock(&s->mu);
    c->closed = 1;
    int held = c->state == CALL_HELD && !c->in_handler;
    if (c->state == CALL_HELD && c->in_handler && c->cancelled) c->cancel_pending = 1;
    if (held && c->cancelled) s->st.cancelled_held++;
    pthread_mutex_unlock(&s->mu);
    /* Our reference keeps the call's memory; the application decides
     * whether it still owns the call (it may be finishing it elsewhere). */
    if (held && c->cancelled && s->on_cancel) s->on_cancel(s->cancel_ctx, c);
    call_free(c);
}

static void on_accept(rpc_call *c, int success) {
    rpc_server *s = c->srv;
    if (!success) { /* Shutdown failed the pending request. */
        call_free(c);
        return;
    }
    pthread_mutex_lock(&s->mu);
    s->nrequests--;
    s->ncalls++;
    pthread_mutex_unlock(&s->mu);
    request_one(s);

    /* The closer first (a reference of its own): it completes when the
     * call is over on the wire, whatever happens to the rest. */
    atomic_fetch_add(&c->refs, 1);
    grpc_op cop;
    memset(&cop, 0, sizeof cop);
    cop.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    cop.data.recv_close_on_server.cancelled = &c->cancelled;
    if (grpc_call_start_batch(c->call, &cop, 1, &c->close, NULL) != GRPC_CALL_OK) {
        cm_error("rpc: cannot watch the call's close");
        atomic_fetch_sub(&c->refs, 1);
    }

    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA; /* Status needs it (G2). */
    ops[1].op = GRPC_OP_RECV_MESSAGE;
    ops[1].data.recv_message.recv_message = &c->recv;
    c->state = CALL_RECEIVING;
    grpc_call_error e = grpc_call_start_batch(c->call, ops, 2, c, NULL);
    if (e != GRPC_CALL_OK) {
        cm_error("rpc: server grpc_call_start_batch failed (%d)", (int)e);
        call_free(c);
    }
}

static const method_entry *find_method(const rpc_server *s, grpc_slice name) {
    for (int i = 0; i < s->nmethods; i++)
        if (grpc_slice_str_cmp(name, s->methods[i].name) == 0) return &s->methods[i];
    return NULL;
}

static void on_received(rpc_call *c, int success) {
    if (!success) { /* Cancelled, deadline, or an oversized request (G1). */
        call_free(c);
        return;
    }
    grpc_byte_buffer *bb = c->recv;
    c->recv = NULL;
    rpc_server *s = c->srv;
    const method_entry *m = find_method(s, c->details.method);
    c->level = call_level(s, &c->md);
    int held = hold(c);
    const char *refused = NULL;
    int code = RPC_OK;
    /* Unknown methods too: a stranger learns nothing, not even which exist. */
    if (c->level < (m ? m->level : RPC_AUTH_WORKER)) {
        code = c->level == RPC_AUTH_NONE ? RPC_UNAUTHENTICATED : RPC_PERMISSION_DENIED;
        refused = code == RPC_UNAUTHENTICATED ? "missing or wrong token"
                                              : "this call needs the admin's token";
    } else if (m && held > s->max_held) {
        code = RPC_RESOURCE_EXHAUSTED;
        refused = "too many calls in progress on this server";
    }
    if (refused) {
        count_refusal(s, c, code, refused);
        m = NULL;
        if (bb) grpc_byte_buffer_destroy(bb);
        rpc_fail(c, code, "%s", refused);
        return;
    }
    if (!m) {
        char *name = grpc_slice_to_c_string(c->details.method);
        if (bb) grpc_byte_buffer_destroy(bb);
        rpc_fail(c, RPC_UNIMPLEMENTED, "unknown method %s", name);
        gpr_free(name);
        return;
    }
    if (!bb) {
        rpc_fail(c, RPC_INVALID_ARGUMENT, "no request message");
        return;
    }
    /* A client gone before its call reached us: no handler. */
    pthread_mutex_lock(&s->mu);
    int gone = c->closed && c->cancelled;
    if (gone) s->st.cancelled_held++;
    c->in_handler = !gone;
    pthread_mutex_unlock(&s->mu);
    if (gone) {
        grpc_byte_buffer_destroy(bb);
        rpc_fail(c, RPC_CANCELLED, "the client went away");
        return;
    }
    atomic_fetch_add(&c->refs, 1); /* 'c' stays readable through the handler. */
    if (m->fn_pieces) {
        view v;
        int rc = view_init(&v, bb);
        if (rc == RPC_OK)
            m->fn_pieces(m->ctx, c, v.p, v.n, v.len); /* May finish the call. */
        else
            rpc_fail(c, rc, "cannot read the request message");
        view_deinit(&v);
    } else {
        flat f;
        int rc = flat_init(&f, bb);
        if (rc == RPC_OK)
            m->fn(m->ctx, c, f.p, f.len); /* The call may be finished from here on. */
        else
            rpc_fail(c, rc, "cannot read the request message");
        flat_deinit(&f);
    }
    grpc_byte_buffer_destroy(bb);
    pthread_mutex_lock(&s->mu);
    c->in_handler = 0;
    int report = c->cancel_pending && c->state == CALL_HELD;
    c->cancel_pending = 0;
    if (report) s->st.cancelled_held++;
    pthread_mutex_unlock(&s->mu);
    if (report && s->on_cancel) s->on_cancel(s->cancel_ctx, c);
    call_free(c); /* The handler's reference. */
}

static void *server_thread(void *arg) {
    rpc_server *s = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        int kind = *(const int *)ev.tag;
        if (kind == TAG_SHUTDOWN) {
            pthread_mutex_lock(&s->mu);
            s->shutdown_seen = 1;
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
            continue;
        }
        if (kind == TAG_CLOSER) {
            on_close(((closer *)ev.tag)->call);
            continue;
        }
        rpc_call *c = ev.tag;
        switch (c->state) {
        case CALL_REQUESTED: on_accept(c, ev.success); break;
        case CALL_RECEIVING: on_received(c, ev.success); break;
        case CALL_FINISHING: call_free(c); break; /* ev.success=0: peer gone. */
        default: assert(!"rpc: completion for a held call");
        }
    }
    return NULL;
}

/* A whole (small) file as a string (malloc'd), or NULL after logging. */
static char *read_pem(const char *what, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        cm_error("rpc: cannot read the %s %s: %s", what, path, strerror(errno));
        return NULL;
    }
    char *buf = cm_malloc(1 << 20);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    int bad = ferror(f) || n == 0 || !feof(f);
    fclose(f);
    if (bad) {
        cm_error("rpc: the %s %s is empty, unreadable or over 1 MiB", what, path);
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    return buf;
}

static char *bearer_of(const char *token) {
    size_t n = strlen(token) + 8;
    char *b = cm_malloc(n);
    snprintf(b, n, "Bearer %s", token);
    return b;
}

/* TLS server credentials from PEM files (mutual with a CA), or NULL after
 * logging. */
static grpc_server_credentials *server_tls(const rpc_server_opts *o) {
    char *cert = read_pem("TLS certificate", o->tls_cert);
    char *key = o->tls_key ? read_pem("TLS key", o->tls_key) : NULL;
    char *ca = o->tls_ca ? read_pem("TLS CA", o->tls_ca) : NULL;
    grpc_server_credentials *cr = NULL;
    if (!o->tls_key) cm_error("rpc: a TLS certificate needs its key");
    if (cert && key && (!o->tls_ca || ca)) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
        cr = grpc_ssl_server_credentials_create_ex(
            ca, &pair, 1,
            ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
               : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
        if (!cr) cm_error("rpc: gRPC refused the TLS certificate, key or CA");
    }
    free(cert);
    free(key);
    free(ca);
    return cr;
}

int rpc_server_create(const rpc_server_opts *opts, rpc_server **out) {
    rpc_server_opts o = {0};
    if (opts) o = *opts;
    *out = NULL;
    if (o.threads < 0 || o.max_message < 0 || o.max_held < 0 || o.max_streams < 0 ||
        o.idle_ms < 0)
        return CM_EINVAL;
    if ((o.token && strlen(o.token) < 16) || (o.admin_token && strlen(o.admin_token) < 16) ||
        (o.admin_token && !o.token)) {
        cm_error("rpc: tokens must be at least 16 bytes, and an admin token needs a worker "
                 "token");
        return CM_EINVAL;
    }
    rpc_init();
    grpc_server_credentials *creds = o.tls_cert ? server_tls(&o)
                                                : grpc_insecure_server_credentials_create();
    if (!creds) {
        rpc_shutdown();
        return CM_EINVAL;
    }
    rpc_server *s = cm_calloc(1, sizeof *s);
    s->nthreads = o.threads ? o.threads : 2;
    s->max_message = o.max_message ? o.max_message : RPC_DEFAULT_MAX_MESSAGE;
    s->state = SRV_CREATED;
    s->shutdown_tag = TAG_SHUTDOWN;
    s->creds = creds;
    s->bearer = o.token ? bearer_of(o.token) : NULL;
    s->admin_bearer = o.admin_token ? bearer_of(o.admin_token) : NULL;
    s->max_held = o.max_held ? o.max_held : 20000;
    s->max_streams = o.max_streams ? o.max_streams : 256;
    s->idle_ms = o.idle_ms ? o.idle_ms : 600000;
    s->on_cancel = o.on_cancel;
    s->cancel_ctx = o.cancel_ctx;
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    *out = s;
    return CM_OK;
}

int rpc_server_add_method(rpc_server *s, const char *name, rpc_handler fn, void *ctx) {
    return rpc_server_add_method_level(s, name, RPC_AUTH_WORKER, fn, ctx);
}

static int add_method(rpc_server *s, const char *name, int level, rpc_handler fn,
                      rpc_handler_pieces fn_pieces, void *ctx) {
    if (!s || !name || (!fn && !fn_pieces) || level < RPC_AUTH_NONE || level > RPC_AUTH_ADMIN)
        return CM_EINVAL;
    if (s->state != SRV_CREATED) return CM_EBUSY;
    for (int i = 0; i < s->nmethods; i++)
        if (!strcmp(s->methods[i].name, name)) return CM_EINVAL;
    method_entry *m = realloc(s->methods, (size_t)(s->nmethods + 1) * sizeof *m);
    if (!m) return CM_ENOMEM;
    s->methods = m;
    s->methods[s->nmethods++] = (method_entry){cm_strdup(name), fn, fn_pieces, ctx, level};
    return CM_OK;
}

int rpc_server_add_method_level(rpc_server *s, const char *name, int level, rpc_handler fn,
                                void *ctx) {
    return fn ? add_method(s, name, level, fn, NULL, ctx) : CM_EINVAL;
}

int rpc_server_add_method_pieces(rpc_server *s, const char *name, int level,
                                 rpc_handler_pieces fn, void *ctx) {
    return fn ? add_method(s, name, level, NULL, fn, ctx) : CM_EINVAL;
}

/* "host:port", "[v6]:port" or "unix:path"; port 0..65535. */
static int addr_ok(const char *a) {
    if (!a || !*a) return 0;
    if (!strncmp(a, "unix:", 5)) return a[5] != 0;
    const char *colon = strrchr(a, ':');
    if (!colon || !colon[1] || strlen(colon + 1) > 5) return 0;
    if (a[0] == '[') {
        const char *rb = strchr(a, ']');
        if (!rb || rb + 1 != colon) return 0;
    } else if (memchr(a, ':', (size_t)(colon - a))) {
        return 0; /* A bare IPv6 address needs brackets. */
    }
    long port = 0;
    for (const char *p = colon + 1; *p; p++) {
        if (*p < '0' || *p > '9') return 0;
        port = port * 10 + (*p - '0');
    }
    return port <= 65535;
}

int rpc_server_start(rpc_server *s, const char *addr, int *port) {
    if (port) *port = 0;
    if (!s) return CM_EINVAL;
    if (s->state != SRV_CREATED) return CM_EBUSY;
    if (!addr_ok(addr)) {
        cm_error("rpc: bad server address '%s'", addr ? addr : "(null)");
        return CM_EINVAL;
    }
    grpc_arg a[10];
    arg_int(&a[0], GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, s->max_message);
    arg_int(&a[1], GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, s->max_message);
    arg_int(&a[2], GRPC_ARG_ALLOW_REUSEPORT, 0); /* G11 */
    /* Accept the clients' keepalive pings (G7). */
    arg_int(&a[3], GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
    arg_int(&a[4], GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    /* Only the identity encoding: a compressed request is refused before it
     * is inflated (1 MiB of gzip could become 1 GiB). */
    arg_int(&a[5], GRPC_COMPRESSION_CHANNEL_ENABLED_ALGORITHMS_BITSET, 1);
    arg_int(&a[6], GRPC_ARG_MAX_CONCURRENT_STREAMS, s->max_streams);
    arg_int(&a[7], GRPC_ARG_MAX_CONNECTION_IDLE_MS, s->idle_ms);
    /* Half-open connections (a client machine gone without a FIN): ping
     * every minute, close after 20 s without an answer. */
    arg_int(&a[8], GRPC_ARG_KEEPALIVE_TIME_MS, 60000);
    arg_int(&a[9], GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
    grpc_channel_args args = {sizeof a / sizeof a[0], a};

    grpc_server *gs = grpc_server_create(&args, NULL);
    int bound = grpc_server_add_http2_port(gs, addr, s->creds);
    if (bound == 0) {
        /* gRPC does not say why; usually the port is taken. */
        cm_error("rpc: cannot listen on '%s' (port in use, or not a local address)", addr);
        grpc_server_destroy(gs); /* Never started, no listener. */
        return CM_EBUSY;
    }
    s->server = gs;
    s->cq = grpc_completion_queue_create_for_next(NULL);
    grpc_server_register_completion_queue(gs, s->cq, NULL);
    grpc_server_start(gs);
    s->state = SRV_RUNNING; /* Before request_one; no thread runs yet. */
    for (int i = 0; i <= s->nthreads; i++) request_one(s);
    s->threads = cm_calloc((size_t)s->nthreads, sizeof *s->threads);
    for (int i = 0; i < s->nthreads; i++) {
        int rc = pthread_create(&s->threads[i], NULL, server_thread, s);
        if (rc != 0) {
            /* Too late to undo cleanly; a server without threads is useless. */
            cm_error("rpc: pthread_create: %s", strerror(rc));
            abort();
        }
    }
    if (port) *port = bound;
    return CM_OK;
}

void rpc_server_shutdown(rpc_server *s, int grace_ms) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    if (s->state == SRV_CREATED) s->state = SRV_STOPPED;
    if (s->state != SRV_RUNNING) { /* Done, or another thread is at it. */
        while (s->state != SRV_STOPPED) pthread_cond_wait(&s->cv, &s->mu);
        pthread_mutex_unlock(&s->mu);
        return;
    }
    s->state = SRV_STOPPING;
    pthread_mutex_unlock(&s->mu);

    /* Stop listening; pending requests complete with success=0. */
    grpc_server_shutdown_and_notify(s->server, s->cq, &s->shutdown_tag);

    /* Grace: calls being received or answered may finish normally. */
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    if (grace_ms > 0) {
        until.tv_sec += grace_ms / 1000;
        until.tv_nsec += (long)(grace_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&s->mu);
    while (s->ncalls > s->nheld && grace_ms > 0)
        if (pthread_cond_timedwait(&s->cv, &s->mu, &until) == ETIMEDOUT) break;
    pthread_mutex_unlock(&s->mu);

    /* The rest, held ones included, are cancelled on the wire; the
     * application still finishes its held calls. */
    grpc_server_cancel_all_calls(s->server);
    pthread_mutex_lock(&s->mu);
    while (!s->shutdown_seen || s->ncalls > 0 || s->nrequests > 0)
        pthread_cond_wait(&s->cv, &s->mu);
    pthread_mutex_unlock(&s->mu);

    grpc_completion_queue_shutdown(s->cq);
    for (int i = 0; i < s->nthreads; i++) pthread_join(s->threads[i], NULL);
    grpc_server_destroy(s->server);
    grpc_completion_queue_destroy(s->cq);
    s->server = NULL;
    s->cq = NULL;

    pthread_mutex_lock(&s->mu);
    s->state = SRV_STOPPED;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void rpc_server_destroy(rpc_server *s) {
    if (!s) return;
    rpc_server_shutdown(s, 0);
    for (int i = 0; i < s->nmethods; i++) free(s->methods[i].name);
    free(s->methods);
    free(s->threads);
    free(s->bearer);
    free(s->admin_bearer);
    if (s->creds) grpc_server_credentials_release(s->creds);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
    rpc_shutdown();
}

/* ------------------------------------------------------------------ */
/* Client                                                             */
/* ------------------------------------------------------------------ */

struct rpc_client {
    int max_message;
    char *bearer, *admin_bearer; /* "Bearer <token>" (NULL: none). */
    grpc_channel_credentials *creds; /* TLS, or insecure. */
    char *server_name;               /* TLS target name override. */
    int test_gzip;                   /* rpc_client_opts.test_gzip. */
    grpc_completion_queue *cq;
    pthread_t thread;
    atomic_int ncalls;    /* Started, 'done' not yet returned. */
    atomic_int nchannels; /* Open. */
};

struct rpc_channel {
    rpc_client *c;
    grpc_channel *ch;
    char *target;
};

/* One client call; owned by the client thread once started. */
typedef struct ccall {
    rpc_client *c;
    rpc_done done;               /* One of the two. */
    rpc_done_pieces done_pieces;
    void *ud;
    grpc_call *call;
    grpc_byte_buffer *send;
    grpc_byte_buffer *recv;
    grpc_metadata_array init_md;
    grpc_metadata_array trail_md;
    grpc_metadata auth; /* Sent: the token (valid until completion). */
    grpc_status_code status;
    grpc_slice details;
    const char *error_string;
    /* A call that could not start: reported with this code and text. */
    int posted;
    int post_code;
    char *post_msg;
} ccall;

/* Report a call that has no reply message to whichever callback it has. */
static void report_fail(rpc_done done, rpc_done_pieces done_pieces, void *ud, int code,
                        const char *msg) {
    if (done_pieces)
        done_pieces(ud, code, msg, NULL, 0, 0);
    else
        done(ud, code, msg, NULL, 0);
}

static void ccall_report(ccall *cc) {
    if (cc->posted) {
        report_fail(cc->done, cc->done_pieces, cc->ud, cc->post_code, cc->post_msg);
        return;
    }
    char *details = NULL;
    int code = (int)cc->status;
    const char *msg = rpc_status_name(code);
    if (GRPC_SLICE_LENGTH(cc->details) > 0) {
        details = grpc_slice_to_c_string(cc->details);
        msg = details;
    }
    if (code != RPC_OK && cc->error_string)
        cm_debug("rpc: call failed: %s", cc->error_string);
    if (code == RPC_OK && !cc->recv) {
        report_fail(cc->done, cc->done_pieces, cc->ud, RPC_INTERNAL,
                    "no reply message for a unary call");
    } else if (code == RPC_OK && cc->done_pieces) {
        view v;
        int rc = view_init(&v, cc->recv);
        if (rc == RPC_OK)
            cc->done_pieces(cc->ud, RPC_OK, msg, v.p, v.n, v.len);
        else
            cc->done_pieces(cc->ud, rc, "cannot read the reply message", NULL, 0, 0);
        view_deinit(&v);
    } else if (code == RPC_OK) {
        flat f;
        int rc = flat_init(&f, cc->recv);
        if (rc == RPC_OK)
            cc->done(cc->ud, RPC_OK, msg, f.p, f.len);
        else
            cc->done(cc->ud, rc, "cannot read the reply message", NULL, 0);
        flat_deinit(&f);
    } else {
        report_fail(cc->done, cc->done_pieces, cc->ud, code, msg);
    }
    gpr_free(details);
}

static void ccall_free(ccall *cc) {
    if (cc->call) grpc_call_unref(cc->call);
    if (cc->send) grpc_byte_buffer_destroy(cc->send);
    if (cc->recv) grpc_byte_buffer_destroy(cc->recv);
    grpc_metadata_array_destroy(&cc->init_md);
    grpc_metadata_array_destroy(&cc->trail_md);
    grpc_slice_unref(cc->details);
    gpr_free((void *)cc->error_string);
    free(cc->post_msg);
    free(cc);
}

static void *client_thread(void *arg) {
    rpc_client *c = arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        if (ev.type != GRPC_OP_COMPLETE) continue;
        ccall *cc = ev.tag;
        if (!cc->posted && !ev.success) {
            /* Not expected: RECV_STATUS_ON_CLIENT reports failures. */
            cc->posted = 1;
            cc->post_code = RPC_INTERNAL;
            cc->post_msg = cm_strdup("call batch failed");
        }
        /* Count the call as done before its callback: a caller that
         * learns from 'done' that all calls are over may destroy the client
         * at once; the join in rpc_client_destroy covers the cleanup. */
        atomic_fetch_sub(&c->ncalls, 1);
        ccall_report(cc);
        ccall_free(cc);
    }
    return NULL;
}

static void client_free(rpc_client *c) {
    grpc_channel_credentials_release(c->creds);
    free(c->bearer);
    free(c->admin_bearer);
    free(c->server_name);
    free(c);
    rpc_shutdown();
}

/* TLS channel credentials from PEM files, or NULL after logging. */
static grpc_channel_credentials *client_tls(const rpc_client_opts *o) {
    char *ca = read_pem("TLS CA", o->tls_ca);
    char *cert = o->tls_cert ? read_pem("TLS certificate", o->tls_cert) : NULL;
    char *key = o->tls_key ? read_pem("TLS key", o->tls_key) : NULL;
    grpc_channel_credentials *cr = NULL;
    if (!o->tls_cert != !o->tls_key)
        cm_error("rpc: a client certificate and its key go together");
    else if (ca && (!o->tls_cert || (cert && key))) {
        grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
        cr = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
        if (!cr) cm_error("rpc: gRPC refused the TLS CA, certificate or key");
    }
    free(ca);
    free(cert);
    free(key);
    return cr;
}

int rpc_client_create(const rpc_client_opts *opts, rpc_client **out) {
    rpc_client_opts o = {0};
    if (opts) o = *opts;
    *out = NULL;
    if (o.max_message < 0) return CM_EINVAL;
    rpc_init();
    grpc_channel_credentials *creds = o.tls_ca ? client_tls(&o) : grpc_insecure_credentials_create();
    if (!creds) {
        rpc_shutdown();
        return CM_EINVAL;
    }
    rpc_client *c = cm_calloc(1, sizeof *c);
    c->max_message = o.max_message ? o.max_message : RPC_DEFAULT_MAX_MESSAGE;
    c->creds = creds;
    c->bearer = o.token ? bearer_of(o.token) : NULL;
    c->admin_bearer = o.admin_token ? bearer_of(o.admin_token) : NULL;
    c->server_name = o.tls_server_name ? cm_strdup(o.tls_server_name) : NULL;
    c->test_gzip = o.test_gzip;
    atomic_init(&c->ncalls, 0);
    atomic_init(&c->nchannels, 0);
    c->cq = grpc_completion_queue_create_for_next(NULL);
    int rc = pthread_create(&c->thread, NULL, client_thread, c);
    if (rc != 0) {
        cm_error("rpc: pthread_create: %s", strerror(rc));
        goto fail;
    }
    *out = c;
    return CM_OK;
fail:
    grpc_completion_queue_shutdown(c->cq);
    while (grpc_completion_queue_next(c->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN) {
    }
    grpc_completion_queue_destroy(c->cq);
    client_free(c);
    return CM_ENOMEM;
}

void rpc_client_destroy(rpc_client *c) {
    if (!c) return;
    int nch = atomic_load(&c->nchannels), ncalls = atomic_load(&c->ncalls);
    if (nch != 0 || ncalls != 0)
        cm_error("rpc_client_destroy: %d channels open, %d calls in flight", nch, ncalls);
    assert(nch == 0);
    /* Calls still in flight complete (and run 'done') before the queue
     * reports shutdown. */
    grpc_completion_queue_shutdown(c->cq);
    pthread_join(c->thread, NULL);
    grpc_completion_queue_destroy(c->cq);
    client_free(c);
}

int rpc_channel_open(rpc_client *c, const char *target, rpc_channel **out) {
    *out = NULL;
    if (!c || !target || !*target) return CM_EINVAL;
    grpc_arg a[10];
    arg_int(&a[0], GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, c->max_message);
    arg_int(&a[1], GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, c->max_message);
    /* Keepalive (G7): ping an idle connection every 20 s, give it 20 s to
     * answer (the backup poller reads the socket only every 5 s), and keep
     * pinging without calls; our servers allow pings every 5 s. */
    arg_int(&a[2], GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
    arg_int(&a[3], GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20000);
    arg_int(&a[4], GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    arg_int(&a[5], GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
    /* Reconnect quickly to a restarted server (defaults: 1 s, up to 120 s). */
    arg_int(&a[6], GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 250);
    arg_int(&a[7], GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
    size_t na = 8;
    if (c->server_name) {
        a[8].type = GRPC_ARG_STRING;
        a[8].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
        a[8].value.string = c->server_name;
        na = 9;
    }
    if (c->test_gzip)
        arg_int(&a[na++], GRPC_COMPRESSION_CHANNEL_DEFAULT_ALGORITHM, GRPC_COMPRESS_GZIP);
    grpc_channel_args args = {na, a};
    grpc_channel *gch = grpc_channel_create(target, c->creds, &args);
    if (!gch) {
        cm_error("rpc: cannot create a channel to '%s'", target);
        return CM_EINVAL;
    }
    rpc_channel *ch = cm_calloc(1, sizeof *ch);
    ch->c = c;
    ch->ch = gch;
    ch->target = cm_strdup(target);
    atomic_fetch_add(&c->nchannels, 1);
    *out = ch;
    return CM_OK;
}

void rpc_channel_close(rpc_channel *ch) {
    if (!ch) return;
    grpc_channel_destroy(ch->ch);
    atomic_fetch_sub(&ch->c->nchannels, 1);
    free(ch->target);
    free(ch);
}

const char *rpc_channel_target(const rpc_channel *ch) { return ch->target; }

/* Report a call that could not start through the client thread. */
static void post_failure(rpc_channel *ch, ccall *cc, int code, const char *msg) {
    cc->posted = 1;
    cc->post_code = code;
    cc->post_msg = cm_strdup(msg);
    grpc_connectivity_state st = grpc_channel_check_connectivity_state(ch->ch, 0);
    grpc_channel_watch_connectivity_state(ch->ch, st, gpr_inf_past(GPR_CLOCK_MONOTONIC),
                                          ch->c->cq, cc);
}

static void call_start(rpc_channel *ch, const char *method, const rpc_seg *segs, int nsegs,
                       int64_t deadline_ms, int flags, rpc_done done, rpc_done_pieces done_pieces,
                       void *ud) {
    if (!ch || (!done && !done_pieces)) { /* Nowhere to report: a bug in the caller. */
        cm_error("rpc_call_start: %s is NULL", ch ? "done" : "channel");
        release_segs(segs, nsegs);
        if (done || done_pieces)
            report_fail(done, done_pieces, ud, RPC_INTERNAL, "rpc_call_start: no channel");
        return;
    }
    rpc_client *c = ch->c;
    ccall *cc = cm_calloc(1, sizeof *cc);
    cc->c = c;
    cc->done = done;
    cc->done_pieces = done_pieces;
    cc->ud = ud;
    cc->details = grpc_empty_slice();
    grpc_metadata_array_init(&cc->init_md);
    grpc_metadata_array_init(&cc->trail_md);
    atomic_fetch_add(&c->ncalls, 1);
    if (!method || !*method || deadline_ms <= 0 || nsegs < 0 || (nsegs > 0 && !segs)) {
        cm_error("rpc_call_start: bad arguments (method %s, deadline %lld ms, %d segments)",
                 method ? method : "(null)", (long long)deadline_ms, nsegs);
        if (nsegs > 0) release_segs(segs, nsegs);
        post_failure(ch, cc, RPC_INTERNAL, "rpc_call_start: bad arguments");
        return;
    }
    cc->send = segs_to_buffer(segs, nsegs);

    gpr_timespec deadline = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                         gpr_time_from_millis(deadline_ms, GPR_TIMESPAN));
    grpc_slice mslice = grpc_slice_from_copied_string(method);
    cc->call = grpc_channel_create_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, mslice,
                                        NULL, deadline, NULL);
    grpc_slice_unref(mslice);

    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    const char *bearer = (flags & RPC_ADMIN) && c->admin_bearer ? c->admin_bearer : c->bearer;
    if (bearer) {
        cc->auth.key = grpc_slice_from_static_string("authorization");
        cc->auth.value = grpc_slice_from_static_string(bearer);
        ops[0].data.send_initial_metadata.count = 1;
        ops[0].data.send_initial_metadata.metadata = &cc->auth;
    }
    if (flags & RPC_WAIT_FOR_READY)
        ops[0].flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY |
                       GRPC_INITIAL_METADATA_WAIT_FOR_READY_EXPLICITLY_SET;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = cc->send;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &cc->init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &cc->recv;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &cc->trail_md;
    ops[5].data.recv_status_on_client.status = &cc->status;
    ops[5].data.recv_status_on_client.status_details = &cc->details;
    ops[5].data.recv_status_on_client.error_string = &cc->error_string;
    grpc_call *gc = cc->call;
    grpc_call_error e = cc->call ? grpc_call_start_batch(gc, ops, 6, cc, NULL)
                                 : GRPC_CALL_ERROR;
    if (e != GRPC_CALL_OK) {
        /* Nothing was queued: cc is still ours. */
        cm_error("rpc: client grpc_call_start_batch failed (%d)", (int)e);
        if (cc->call) grpc_call_unref(cc->call);
        cc->call = NULL;
        grpc_byte_buffer_destroy(cc->send); /* Runs the releases. */
        cc->send = NULL;
        post_failure(ch, cc, RPC_INTERNAL, "cannot start the call");
    }
}

void rpc_call_start(rpc_channel *ch, const char *method, const rpc_seg *segs, int nsegs,
                    int64_t deadline_ms, int flags, rpc_done done, void *ud) {
    call_start(ch, method, segs, nsegs, deadline_ms, flags, done, NULL, ud);
}

void rpc_call_start_pieces(rpc_channel *ch, const char *method, const rpc_seg *segs, int nsegs,
                           int64_t deadline_ms, int flags, rpc_done_pieces done, void *ud) {
    call_start(ch, method, segs, nsegs, deadline_ms, flags, NULL, done, ud);
}

/* rpc_call_sync's rendezvous with the client thread. */
typedef struct sync_wait {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int finished;
    int code;
    uint8_t *reply;
    size_t len;
    char *msg;
} sync_wait;

static void sync_done(void *ud, int code, const char *message, const uint8_t *reply, size_t len) {
    sync_wait *w = ud;
    uint8_t *copy = NULL;
    char *msg = NULL;
    if (code == RPC_OK) {
        copy = malloc(len ? len : 1);
        if (copy) {
            if (len) memcpy(copy, reply, len);
        } else {
            code = RPC_RESOURCE_EXHAUSTED;
            msg = cm_strdup("out of memory copying the reply");
        }
    } else {
        msg = cm_strdup(message);
    }
    pthread_mutex_lock(&w->mu);
    w->code = code;
    w->reply = copy;
    w->len = len;
    w->msg = msg;
    w->finished = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

int rpc_call_sync(rpc_channel *ch, const char *method, const void *req, size_t req_len,
                  int64_t deadline_ms, int flags, uint8_t **reply, size_t *len, char *msg,
                  size_t msglen) {
    sync_wait w;
    memset(&w, 0, sizeof w);
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    if (reply) *reply = NULL;
    if (len) *len = 0;
    if (msg && msglen) msg[0] = 0;
    rpc_seg seg = {req, req_len, NULL, NULL};
    rpc_call_start(ch, method, &seg, req_len ? 1 : 0, deadline_ms, flags, sync_done, &w);
    pthread_mutex_lock(&w.mu);
    while (!w.finished) pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    if (w.code == RPC_OK && reply && len) {
        *reply = w.reply;
        *len = w.len;
    } else {
        free(w.reply);
    }
    if (w.msg && msg && msglen) snprintf(msg, msglen, "%s", w.msg);
    free(w.msg);
    pthread_cond_destroy(&w.cv);
    pthread_mutex_destroy(&w.mu);
    return w.code;
}
