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
#include <sched.h>
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

#include "common/cm_addr.h"
#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"

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
 * Streams (RPC_STREAM): the frames are in docs/FORMATS.md, the design in
 * docs/INTERNALS.md ("Streams"). Server: a call of "<method>/stream" is an
 * rpc_call with is_stream; each message on it becomes an rpc_call with
 * 'parent' set, created HELD, whose finish queues a reply frame on the
 * stream (sub_finish); stream_step picks the stream's next move under mu:
 * send the first queued reply (one SEND_MESSAGE in flight, tag 'sender'),
 * or end with the status once the client closed its side and nothing is
 * left. A stream's refs: its receive chain (parked while the status is
 * pending), its closer, each of its messages' calls, the send in flight.
 * Client: cstream per channel, method and flags, its messages (cmsg)
 * matched to replies by id; tags are cstag (kind CTAG_S*); the client
 * thread sweeps deadlines every 20 ms while a stream is open.
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
 * (kIgnore = 0), looked up by its mangled name: in Debian's inline
 * namespace (debian3 in Debian 12; debian1 to debian9 are tried, so a
 * rebuilt Abseil with the next one still has it off), or in none. An
 * Abseil without that symbol (another build, another version) is left as
 * it is, and the log says so. */
static int absl_detector_off; /* Set once, by pin_grpc. */

int rpc_abseil_detector_off(void) { return absl_detector_off; }

static void absl_no_deadlock_detection(void) {
    char name[96];
    void (*set_mode)(int) = NULL;
    for (int v = 0; v <= 9 && !set_mode; v++) {
        if (v == 0)
            snprintf(name, sizeof name, "_ZN4absl29SetMutexDeadlockDetectionModeENS_15OnDeadlockCycleE");
        else
            snprintf(name, sizeof name,
                     "_ZN4absl7debian%d29SetMutexDeadlockDetectionModeENS0_15OnDeadlockCycleE", v);
        set_mode = (void (*)(int))dlsym(RTLD_DEFAULT, name);
    }
    if (set_mode) {
        set_mode(0);
        absl_detector_off = 1;
    } else
        cm_debug("rpc: Abseil's SetMutexDeadlockDetectionMode not found; its deadlock detector "
                 "stays as built");
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
static grpc_byte_buffer *segs_to_buffer_pre(const void *pre, size_t prelen, const rpc_seg *segs,
                                            int nsegs) {
    grpc_slice stack[9];
    grpc_slice *sl = nsegs < 9 ? stack : cm_malloc((size_t)(nsegs + 1) * sizeof *sl);
    size_t n = 0;
    if (prelen) sl[n++] = grpc_slice_from_copied_buffer(pre, prelen);
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

static grpc_byte_buffer *segs_to_buffer(const rpc_seg *segs, int nsegs) {
    return segs_to_buffer_pre(NULL, 0, segs, nsegs);
}

/* Little-endian integers of the stream frames. */
static void put_le(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint64_t get_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
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

/* Take the first n bytes of a view into out (a stream frame's header, which
 * may span pieces); 0 if the view is shorter. */
static int view_take(view *v, uint8_t *out, size_t n) {
    if (v->len < n) return 0;
    size_t got = 0;
    int k = 0;
    while (got < n) {
        size_t t = n - got < v->p[k].len ? n - got : v->p[k].len;
        memcpy(out + got, v->p[k].p, t);
        got += t;
        v->p[k].p += t;
        v->p[k].len -= t;
        if (v->p[k].len == 0) k++;
    }
    memmove(v->p, v->p + k, (size_t)(v->n - k) * sizeof *v->p);
    v->n -= k;
    v->len -= n;
    return 1;
}

/* Multi-slice messages read flat (view_flat) are copied into a buffer that
 * belongs to the receiving thread and is reused for every message it
 * receives: a fresh malloc per message would cost a page fault per 4 KiB
 * (about 13 ms for 16 MiB). A flat range is only alive on its own thread,
 * one at a time. */
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

/* The pieces of a view as one range in *p / *len: in place, or copied
 * into the thread's scratch buffer. */
static int view_flat(const view *v, const uint8_t **p, size_t *len) {
    static const uint8_t empty[1];
    *p = empty;
    *len = 0;
    if (v->n == 1) {
        *p = v->p[0].p;
        *len = v->p[0].len;
    } else if (v->n > 1) {
        uint8_t *buf = scratch_get(v->len);
        if (!buf) return RPC_RESOURCE_EXHAUSTED;
        size_t off = 0;
        for (int i = 0; i < v->n; i++) {
            memcpy(buf + off, v->p[i].p, v->p[i].len);
            off += v->p[i].len;
        }
        *p = buf;
        *len = off;
    }
    return RPC_OK;
}

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
enum { TAG_CALL = 1, TAG_CLOSER = 2, TAG_SHUTDOWN = 3, TAG_SSEND = 4 };

/* Thread-safety: the fields above 'mu' are written before the threads start
 * and only read afterwards, except server/cq/threads (shutdown's thread). */
struct rpc_server {
    int nthreads;
    int max_message;
    int poll_spin_us; /* 0: none. */
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
    int nstreams; /* Stream calls among ncalls (never held themselves). */
    int nheld_subs; /* Stream messages' calls among nheld (not in ncalls). */
    int nstream_out; /* Stream replies queued or in flight (the streams' nqueued). */
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
    char *peer;    /* gpr_malloc'd, lazily (a stream's: at accept). */
    /* Streams (see "Streams" above). A message's call has 'parent' (its
     * stream, which it holds a reference of) and the id to answer with;
     * 'sprev'/'snext' link the stream's HELD messages, under srv->mu. */
    struct rpc_call *parent;
    uint64_t sub_id;
    struct rpc_call *sprev, *snext;
    /* A stream call (is_stream): its method, and under srv->mu the HELD
     * messages, their count (nsubs: not yet finished), replies waiting for
     * the one SEND_MESSAGE in flight ('sending'), and how it ends. */
    int is_stream;
    const struct method_entry *m;
    struct rpc_call *held_subs;
    int nsubs, sending, eos, dead, status_code, status_sent;
    int parked; /* The chain's reference waits for the status batch. */
    /* Replies queued or in flight; the receive chain is paused (its
     * reference kept) while calls in progress and replies not yet sent
     * reach max_streams: the client then waits on HTTP/2's flow control,
     * as for a connection's streams, and nothing grows without bound. */
    int nqueued, recv_paused;
    char *status_text;
    struct sreply *q_head, *q_tail;
    grpc_byte_buffer *in_flight;
    closer sender; /* kind TAG_SSEND: the SEND_MESSAGE batch's tag. */
};

/* A stream's reply waiting for its turn on the wire. */
typedef struct sreply {
    grpc_byte_buffer *bb;
    struct sreply *next;
} sreply;

/* Stream frames: a request is its id (8 bytes) and the message; a reply its
 * id, its status code (4 bytes) and the reply, or the status text. */
#define STREAM_SUFFIX "/stream"
enum { SREQ_HDR = 8, SREPLY_HDR = 12 };

/* Drop a reference; the last one frees the call. */
static void call_free(rpc_call *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    if (c->parent) { /* A stream's message: its reference of the stream goes too. */
        rpc_call *p = c->parent;
        free(c);
        call_free(p);
        return;
    }
    rpc_server *s = c->srv;
    int was_request = c->state == CALL_REQUESTED, was_stream = c->is_stream;
    int out = c->nqueued; /* Replies never sent, freed here. */
    for (sreply *r = c->q_head; r;) {
        sreply *next = r->next;
        grpc_byte_buffer_destroy(r->bb);
        free(r);
        r = next;
    }
    if (c->in_flight) grpc_byte_buffer_destroy(c->in_flight);
    free(c->status_text);
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
    if (was_stream) s->nstreams--;
    s->nstream_out -= out;
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

static void sub_finish(rpc_call *c, grpc_byte_buffer *bb, int code, const char *text);

/* Start batch 2 on a HELD call. Takes ownership of bb (may be NULL). */
static void finish(rpc_call *c, grpc_byte_buffer *bb, int code, char *text) {
    rpc_server *s = c->srv;
    assert(c->state == CALL_HELD);
    if (c->parent) {
        sub_finish(c, bb, code, text);
        return;
    }
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

/* The call now belongs to the application; returns the calls held. The
 * receiving thread owns it until the handler returned (in_handler): a
 * closer meanwhile does not report a call refused before its handler. */
static int hold(rpc_call *c) {
    pthread_mutex_lock(&c->srv->mu);
    c->state = CALL_HELD;
    c->in_handler = 1;
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

/* Why a caller of 'level' may not call a method that needs 'need' (and
 * the code in *code), or NULL if it may. */
static const char *level_refusal(int level, int need, int *code) {
    if (level >= need) return NULL;
    *code = level == RPC_AUTH_NONE ? RPC_UNAUTHENTICATED : RPC_PERMISSION_DENIED;
    return *code == RPC_UNAUTHENTICATED ? "missing or wrong token"
                                        : "this call needs the admin's token";
}

/* Count a refusal and log it with the peer (the first 20, then every
 * 1000th: a flood must not flood the log too). */
static void count_refusal(rpc_server *s, rpc_call *c, int code, const char *why) {
    if (c->parent) c = c->parent; /* A stream's message: the stream's method. */
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
    uint8_t hdr[SREPLY_HDR];
    if (call->parent) {
        put_le(hdr, call->sub_id, 8);
        put_le(hdr + 8, RPC_OK, 4);
    }
    finish(call, segs_to_buffer_pre(hdr, call->parent ? sizeof hdr : 0, segs, nsegs), RPC_OK,
           NULL);
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
    if (call->parent) return call->parent->peer;
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


/* Run m's handler on c's request: its pieces in place (a _pieces method),
 * or one flat range. */
static void run_handler(const method_entry *m, rpc_call *c, view *v) {
    if (m->fn_pieces) {
        m->fn_pieces(m->ctx, c, v->p, v->n, v->len);
        return;
    }
    const uint8_t *p;
    size_t len;
    int rc = view_flat(v, &p, &len);
    if (rc == RPC_OK)
        m->fn(m->ctx, c, p, len);
    else
        rpc_fail(c, rc, "cannot read the request message");
}

/* The handler returned: a cancellation seen while it ran is reported now
 * (the application has put the call wherever it keeps it), and the
 * handler's reference goes. */
static void handler_done(rpc_call *c) {
    rpc_server *s = c->srv;
    pthread_mutex_lock(&s->mu);
    c->in_handler = 0;
    int report = c->cancel_pending && c->state == CALL_HELD;
    c->cancel_pending = 0;
    if (report) s->st.cancelled_held++;
    pthread_mutex_unlock(&s->mu);
    if (report && s->on_cancel) s->on_cancel(s->cancel_ctx, c);
    call_free(c);
}

/* ---- Streams, server side ----------------------------------------- */

/* Under srv->mu: the stream's next move once its SEND_MESSAGE is free:
 * the first queued reply to send (returned; 'sending' and a reference are
 * taken), or its status once nothing is left (*end). */
static grpc_byte_buffer *stream_step(rpc_call *p, int *end) {
    *end = 0;
    if (p->sending || p->status_sent || p->dead) return NULL;
    if (p->status_code == RPC_OK && p->q_head) {
        sreply *r = p->q_head;
        p->q_head = r->next;
        if (!p->q_head) p->q_tail = NULL;
        grpc_byte_buffer *bb = r->bb;
        free(r);
        p->in_flight = bb;
        p->sending = 1;
        atomic_fetch_add(&p->refs, 1); /* The send's. */
        return bb;
    }
    if (p->status_code != RPC_OK || (p->eos && p->nsubs == 0 && !p->q_head)) {
        p->status_sent = 1;
        p->parked = 0;
        p->state = CALL_FINISHING; /* The status batch's completion frees. */
        *end = 1;
    }
    return NULL;
}

/* Under srv->mu: one reply fewer queued or in flight on the stream. */
static void stream_out_done(rpc_call *p, int n) {
    p->nqueued -= n;
    p->srv->nstream_out -= n;
    if (n) pthread_cond_broadcast(&p->srv->cv); /* rpc_server_shutdown's grace. */
}

/* Under srv->mu: the queued replies, to be destroyed outside it (their
 * release callbacks may take the application's locks). */
static sreply *stream_take_queue(rpc_call *p) {
    sreply *q = p->q_head;
    int n = 0;
    for (sreply *r = q; r; r = r->next) n++;
    p->q_head = p->q_tail = NULL;
    stream_out_done(p, n);
    return q;
}

static void drop_replies(sreply *r) {
    while (r) {
        sreply *next = r->next;
        grpc_byte_buffer_destroy(r->bb);
        free(r);
        r = next;
    }
}

static void stream_send(rpc_call *p, grpc_byte_buffer *bb) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = bb;
    if (grpc_call_start_batch(p->call, &op, 1, &p->sender, NULL) != GRPC_CALL_OK) {
        cm_error("rpc: cannot send on a stream");
        pthread_mutex_lock(&p->srv->mu);
        p->in_flight = NULL;
        p->sending = 0;
        p->dead = 1;
        stream_out_done(p, 1);
        sreply *q = stream_take_queue(p);
        pthread_mutex_unlock(&p->srv->mu);
        grpc_byte_buffer_destroy(bb);
        drop_replies(q);
        grpc_call_cancel(p->call, NULL);
        call_free(p);
    }
}

/* The status batch; its completion drops the stream's chain reference. */
static void stream_end(rpc_call *p) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    op.data.send_status_from_server.status = (grpc_status_code)p->status_code;
    if (p->status_text) {
        p->status_details = grpc_slice_from_copied_string(p->status_text);
        p->has_details = 1;
        op.data.send_status_from_server.status_details = &p->status_details;
    }
    if (grpc_call_start_batch(p->call, &op, 1, p, NULL) != GRPC_CALL_OK) {
        cm_error("rpc: cannot end a stream");
        call_free(p);
    }
}

/* Act on stream_step's answer (outside srv->mu). */
static void stream_go(rpc_call *p, grpc_byte_buffer *bb, int end) {
    if (bb) stream_send(p, bb);
    else if (end) stream_end(p);
}

/* A message of the stream is answered: its reply frame joins the queue. */
static void sub_finish(rpc_call *c, grpc_byte_buffer *bb, int code, const char *text) {
    rpc_server *s = c->srv;
    rpc_call *p = c->parent;
    char why[96];
    if (bb && grpc_byte_buffer_length(bb) > (size_t)s->max_message) {
        /* Over the limit with its frame: this call fails, not the stream. */
        snprintf(why, sizeof why, "a reply of %zu bytes is over the message limit",
                 grpc_byte_buffer_length(bb) - SREPLY_HDR);
        grpc_byte_buffer_destroy(bb);
        bb = NULL;
        code = RPC_RESOURCE_EXHAUSTED;
        text = why;
    }
    if (!bb) {
        uint8_t hdr[SREPLY_HDR];
        put_le(hdr, c->sub_id, 8);
        put_le(hdr + 8, (uint64_t)code, 4);
        rpc_seg seg = {text ? text : "", text ? strlen(text) : 0, NULL, NULL};
        bb = segs_to_buffer_pre(hdr, sizeof hdr, &seg, 1);
    }
    sreply *r = cm_malloc(sizeof *r);
    r->bb = bb;
    r->next = NULL;
    pthread_mutex_lock(&s->mu);
    c->state = CALL_FINISHING;
    s->nheld--;
    s->nheld_subs--;
    pthread_cond_broadcast(&s->cv);
    if (c->sprev) c->sprev->snext = c->snext;
    else p->held_subs = c->snext;
    if (c->snext) c->snext->sprev = c->sprev;
    c->sprev = c->snext = NULL;
    p->nsubs--;
    sreply *drop = NULL;
    if (p->dead || p->status_code != RPC_OK) {
        drop = r;
    } else {
        if (p->q_tail) p->q_tail->next = r;
        else p->q_head = r;
        p->q_tail = r;
        p->nqueued++;
        s->nstream_out++;
    }
    int end;
    grpc_byte_buffer *next = stream_step(p, &end);
    pthread_mutex_unlock(&s->mu);
    drop_replies(drop);
    stream_go(p, next, end);
    call_free(c); /* The message's chain reference. */
}

static void stream_recv(rpc_call *p);

/* A stream's SEND_MESSAGE completed. */
static void on_stream_sent(rpc_call *p, int success) {
    pthread_mutex_lock(&p->srv->mu);
    grpc_byte_buffer *sent = p->in_flight;
    p->in_flight = NULL;
    p->sending = 0;
    stream_out_done(p, 1);
    if (!success) p->dead = 1; /* The stream broke; the closer tells the rest. */
    sreply *q = p->dead ? stream_take_queue(p) : NULL;
    int end;
    grpc_byte_buffer *next = stream_step(p, &end);
    int rearm = p->recv_paused && !p->dead && p->nsubs + p->nqueued < p->srv->max_streams;
    if (rearm) p->recv_paused = 0;
    pthread_mutex_unlock(&p->srv->mu);
    if (sent) grpc_byte_buffer_destroy(sent); /* May run release(). */
    drop_replies(q);
    stream_go(p, next, end);
    if (rearm) stream_recv(p); /* The chain's reference goes on with it. */
    call_free(p); /* The send's reference. */
}

/* End the stream with a non-OK status (a refused or malformed stream):
 * replies still to come are dropped. */
static void stream_fail(rpc_call *p, int code, const char *text) {
    pthread_mutex_lock(&p->srv->mu);
    p->status_code = code;
    free(p->status_text);
    p->status_text = cm_strdup(text);
    sreply *q = stream_take_queue(p);
    int gone = p->dead;
    if (!gone) p->parked = 1;
    int end;
    grpc_byte_buffer *next = stream_step(p, &end);
    pthread_mutex_unlock(&p->srv->mu);
    drop_replies(q);
    if (gone) call_free(p); /* No status for a stream that is over. */
    else stream_go(p, next, end);
}

/* The stream is over on the wire (its closer): it takes no more replies,
 * and the application hears of every message it still holds (on_cancel),
 * so that a parked Pull is not kept for a stream that is gone. */
static void stream_closed(rpc_call *p) {
    rpc_server *s = p->srv;
    pthread_mutex_lock(&s->mu);
    p->closed = 1;
    p->dead = 1;
    int parked = p->parked || p->recv_paused; /* Nothing will move the chain now. */
    p->parked = p->recv_paused = 0;
    sreply *q = stream_take_queue(p);
    int n = 0;
    for (rpc_call *c = p->held_subs; c; c = c->snext) n++;
    rpc_call **gone = n ? cm_malloc((size_t)n * sizeof *gone) : NULL;
    int k = 0;
    for (rpc_call *c = p->held_subs; c; c = c->snext) {
        if (c->in_handler) {
            c->cancel_pending = 1;
            continue;
        }
        atomic_fetch_add(&c->refs, 1); /* Readable through on_cancel. */
        gone[k++] = c;
        s->st.cancelled_held++;
    }
    pthread_mutex_unlock(&s->mu);
    drop_replies(q);
    for (int i = 0; i < k; i++) {
        if (s->on_cancel) s->on_cancel(s->cancel_ctx, gone[i]);
        call_free(gone[i]);
    }
    free(gone);
    if (parked) call_free(p); /* The chain's. */
    call_free(p);             /* The closer's. */
}

static void stream_recv(rpc_call *p) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &p->recv;
    p->state = CALL_RECEIVING;
    if (grpc_call_start_batch(p->call, &op, 1, p, NULL) != GRPC_CALL_OK) {
        cm_error("rpc: cannot read from a stream");
        grpc_call_cancel(p->call, NULL);
        call_free(p); /* The chain's reference. */
    }
}

/* A message arrived on a stream (or it ended): each message becomes a call
 * of its own for the method's handler, answered by id. */
static void on_stream_message(rpc_call *p, int success) {
    rpc_server *s = p->srv;
    if (!success) { /* Cancelled, disconnected, or an oversized message (G1). */
        pthread_mutex_lock(&s->mu);
        p->dead = 1;
        sreply *q = stream_take_queue(p);
        pthread_mutex_unlock(&s->mu);
        drop_replies(q);
        call_free(p);
        return;
    }
    grpc_byte_buffer *bb = p->recv;
    p->recv = NULL;
    if (!bb) { /* The client closed its side (or cancelled the stream, which
                * gRPC may report so too): answer what is left, then end. */
        pthread_mutex_lock(&s->mu);
        p->eos = 1;
        int gone = p->dead;
        if (!gone) p->parked = 1;
        int end;
        grpc_byte_buffer *next = stream_step(p, &end);
        pthread_mutex_unlock(&s->mu);
        if (gone) call_free(p);
        else stream_go(p, next, end);
        return;
    }
    const method_entry *m = p->m;
    int code;
    const char *why = level_refusal(p->level, m->level, &code);
    if (why) {
        count_refusal(s, p, code, why);
        grpc_byte_buffer_destroy(bb);
        stream_fail(p, code, why);
        return;
    }
    view v;
    uint8_t hdr[SREQ_HDR];
    int rc = view_init(&v, bb);
    if (rc != RPC_OK || !view_take(&v, hdr, sizeof hdr)) {
        view_deinit(&v);
        grpc_byte_buffer_destroy(bb);
        stream_fail(p, rc != RPC_OK ? rc : RPC_INVALID_ARGUMENT,
                    rc != RPC_OK ? "cannot read a stream message"
                                 : "a stream message without its 8-byte id");
        return;
    }
    rpc_call *c = cm_calloc(1, sizeof *c);
    c->kind = TAG_CALL;
    c->srv = s;
    c->parent = p;
    c->sub_id = get_le(hdr, 8);
    c->level = p->level;
    c->state = CALL_HELD;
    atomic_init(&c->refs, 2); /* The chain's (until finished) and the handler's. */
    atomic_fetch_add(&p->refs, 1);
    pthread_mutex_lock(&s->mu);
    int held = ++s->nheld;
    c->snext = p->held_subs;
    if (p->held_subs) p->held_subs->sprev = c;
    p->held_subs = c;
    p->nsubs++;
    s->nheld_subs++;
    const char *over = held > s->max_held ? "too many calls in progress on this server" : NULL;
    /* A stream has at most max_streams calls in progress or replies
     * unsent, as a connection has streams: beyond, it reads no more. */
    int arm = p->nsubs + p->nqueued < s->max_streams;
    int gone = p->dead, drop_chain = !arm && gone; /* Over: the closer ran already. */
    if (!arm && !gone) p->recv_paused = 1;
    /* This thread owns the call until its dispatch is done, refusals
     * included: a closer meanwhile leaves on_cancel to the end of it (the
     * application must not hear of a call it never saw). */
    c->in_handler = 1;
    pthread_mutex_unlock(&s->mu);
    if (arm) stream_recv(p); /* The next message may be handled on another thread. */
    if (drop_chain) call_free(p); /* The sub-call still holds one. */
    if (over) {
        count_refusal(s, c, RPC_RESOURCE_EXHAUSTED, over);
        rpc_fail(c, RPC_RESOURCE_EXHAUSTED, "%s", over);
    } else if (gone) {
        rpc_fail(c, RPC_CANCELLED, "the client went away");
    } else {
        run_handler(m, c, &v); /* May finish the call. */
    }
    view_deinit(&v);
    grpc_byte_buffer_destroy(bb);
    handler_done(c);
}

/* The closer's completion: the call is over on the wire. It may come on
 * another thread before the request's (then on_received fails the call
 * without running its handler) or while the handler runs (then the
 * cancellation is reported when the handler returns, once the application
 * has put the call wherever it keeps it). */
static void on_close(rpc_call *c) {
    if (c->is_stream) {
        stream_closed(c);
        return;
    }
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

static const method_entry *find_method(const rpc_server *s, grpc_slice name);

/* "<method>/stream" of a registered method: a stream of its calls. */
static const method_entry *find_stream_method(const rpc_server *s, grpc_slice name) {
    size_t n = GRPC_SLICE_LENGTH(name), k = strlen(STREAM_SUFFIX);
    const char *p = (const char *)GRPC_SLICE_START_PTR(name);
    if (n <= k || memcmp(p + n - k, STREAM_SUFFIX, k) != 0) return NULL;
    for (int i = 0; i < s->nmethods; i++)
        if (strlen(s->methods[i].name) == n - k && !memcmp(s->methods[i].name, p, n - k))
            return &s->methods[i];
    return NULL;
}

static void on_accept(rpc_call *c, int success) {
    rpc_server *s = c->srv;
    if (!success) { /* Shutdown failed the pending request. */
        call_free(c);
        return;
    }
    const method_entry *sm = find_stream_method(s, c->details.method);
    if (sm) {
        c->is_stream = 1;
        c->m = sm;
        c->level = call_level(s, &c->md);
        c->peer = grpc_call_get_peer(c->call);
        c->sender = (closer){.kind = TAG_SSEND, .call = c};
    }
    pthread_mutex_lock(&s->mu);
    s->nrequests--;
    s->ncalls++;
    if (sm) s->nstreams++;
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
    if (c->is_stream) {
        on_stream_message(c, success);
        return;
    }
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
    int code = RPC_OK;
    /* Unknown methods too: a stranger learns nothing, not even which exist. */
    const char *refused = level_refusal(c->level, m ? m->level : RPC_AUTH_WORKER, &code);
    if (!refused && m && held > s->max_held) {
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
    view v;
    int rc = view_init(&v, bb);
    if (rc == RPC_OK)
        run_handler(m, c, &v); /* The call may be finished from here on. */
    else
        rpc_fail(c, rc, "cannot read the request message");
    view_deinit(&v);
    grpc_byte_buffer_destroy(bb);
    handler_done(c);
}

/* The next event of cq: first polled without blocking for up to spin_us
 * (opts.poll_spin_us), yielding the core between polls, then waited for
 * until 'until'. A thread that sleeps in epoll pays a wake-up for the next
 * message (a halted vCPU's, in a VM); one that is still polling takes it at
 * once, and the yield gives the core to any other runnable thread. */
static grpc_event cq_next_spin(grpc_completion_queue *cq, gpr_timespec until, int spin_us) {
    if (spin_us > 0) {
        double end = cm_now() + spin_us * 1e-6;
        do {
            grpc_event ev = grpc_completion_queue_next(cq, gpr_time_0(GPR_CLOCK_MONOTONIC), NULL);
            if (ev.type != GRPC_QUEUE_TIMEOUT) return ev;
            sched_yield();
        } while (cm_now() < end);
    }
    return grpc_completion_queue_next(cq, until, NULL);
}

/* opts.poll_spin_us as the thread uses it: 0 the default, < 0 none. */
static int poll_spin_of(int opt) {
    return opt == 0 ? RPC_DEFAULT_POLL_SPIN_US : opt > 0 ? opt : 0;
}

static void *server_thread(void *arg) {
    rpc_server *s = arg;
    for (;;) {
        grpc_event ev = cq_next_spin(s->cq, gpr_inf_future(GPR_CLOCK_REALTIME), s->poll_spin_us);
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
        if (kind == TAG_SSEND) {
            on_stream_sent(((closer *)ev.tag)->call, ev.success);
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
    s->poll_spin_us = poll_spin_of(o.poll_spin_us);
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

/* "host:port", "[v6]:port" (cm_addr_split) or "unix:path"; port 0..65535. */
static int addr_ok(const char *a) {
    if (!a || !*a) return 0;
    if (!strncmp(a, "unix:", 5)) return a[5] != 0;
    return cm_addr_split(a, 0, NULL, 0, NULL) == NULL;
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

    /* Grace: calls being received or answered may finish normally, and
     * stream replies already given reach the wire (as a unary call's reply
     * does while it is answered). */
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
    while ((s->ncalls - s->nstreams > s->nheld - s->nheld_subs || s->nstream_out > 0) &&
           grace_ms > 0)
        if (pthread_cond_timedwait(&s->cv, &s->mu, &until) == ETIMEDOUT) break;
    pthread_mutex_unlock(&s->mu);

    /* The rest, held ones included, are cancelled on the wire; the
     * application still finishes its held calls. */
    grpc_server_cancel_all_calls(s->server);
    pthread_mutex_lock(&s->mu);
    double said = cm_now();
    while (!s->shutdown_seen || s->ncalls > 0 || s->nrequests > 0) {
        struct timespec at = cm_monotonic_at(cm_now() + 1.0);
        pthread_cond_timedwait(&s->cv, &s->mu, &at);
        if (cm_now() - said >= 5.0) { /* The application still holds calls. */
            cm_warn("rpc: server shutdown still waits for %d calls (%d held, %d streams)",
                    s->ncalls, s->nheld, s->nstreams);
            said = cm_now();
        }
    }
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
    int poll_spin_us; /* 0: none. */
    char *bearer, *admin_bearer; /* "Bearer <token>" (NULL: none). */
    grpc_channel_credentials *creds; /* TLS, or insecure. */
    char *server_name;               /* TLS target name override. */
    int test_gzip;                   /* rpc_client_opts.test_gzip. */
    grpc_completion_queue *cq;
    pthread_t thread;
    atomic_int ncalls;    /* Started, 'done' not yet returned. */
    atomic_int nchannels; /* Open. */
    /* Streams (RPC_STREAM): every live one, under mu; ids of messages. */
    pthread_mutex_t mu;
    struct cstream *streams;
    atomic_int nstreams;
    atomic_uint_fast64_t next_id;
};

struct rpc_channel {
    rpc_client *c;
    grpc_channel *ch;
    char *target;
};

/* What a client CQ tag is: every tag struct starts with one of these. */
enum { CTAG_CALL = 1, CTAG_SOPEN, CTAG_SSEND, CTAG_SRECV, CTAG_SSTATUS, CTAG_KICK };

/* A tag that only wakes the client thread (see stream_call). */
static const int kick_tag = CTAG_KICK;

/* One client call; owned by the client thread once started. */
typedef struct ccall {
    int kind; /* CTAG_CALL */
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

/* Hand an OK reply (a view of it) to whichever callback there is: its
 * pieces in place, or one flat range. */
static void report_reply(rpc_done done, rpc_done_pieces done_pieces, void *ud, const char *msg,
                         view *v) {
    if (done_pieces) {
        done_pieces(ud, RPC_OK, msg, v->p, v->n, v->len);
        return;
    }
    const uint8_t *p;
    size_t len;
    int rc = view_flat(v, &p, &len);
    if (rc == RPC_OK)
        done(ud, RPC_OK, msg, p, len);
    else
        done(ud, rc, "cannot read the reply message", NULL, 0);
}

/* The initial metadata op of a call or stream: the token for its flags
 * (the admin's with RPC_ADMIN, when the client has one), wait-for-ready.
 * 'auth' must live until the op completes. */
static void send_md_op(const rpc_client *c, int flags, grpc_metadata *auth, grpc_op *op) {
    op->op = GRPC_OP_SEND_INITIAL_METADATA;
    const char *bearer = (flags & RPC_ADMIN) && c->admin_bearer ? c->admin_bearer : c->bearer;
    if (bearer) {
        auth->key = grpc_slice_from_static_string("authorization");
        auth->value = grpc_slice_from_static_string(bearer);
        op->data.send_initial_metadata.count = 1;
        op->data.send_initial_metadata.metadata = auth;
    }
    if (flags & RPC_WAIT_FOR_READY)
        op->flags = GRPC_INITIAL_METADATA_WAIT_FOR_READY |
                    GRPC_INITIAL_METADATA_WAIT_FOR_READY_EXPLICITLY_SET;
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
    } else if (code == RPC_OK) {
        view v;
        int rc = view_init(&v, cc->recv);
        if (rc == RPC_OK)
            report_reply(cc->done, cc->done_pieces, cc->ud, msg, &v);
        else
            report_fail(cc->done, cc->done_pieces, cc->ud, rc, "cannot read the reply message");
        view_deinit(&v);
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


/* ---- Streams, client side ----------------------------------------- */

static void post_failure(rpc_channel *ch, ccall *cc, int code, const char *msg);

/* A call's context, counted in ncalls. */
static ccall *ccall_new(rpc_client *c, rpc_done done, rpc_done_pieces done_pieces, void *ud) {
    ccall *cc = cm_calloc(1, sizeof *cc);
    cc->kind = CTAG_CALL;
    cc->c = c;
    cc->done = done;
    cc->done_pieces = done_pieces;
    cc->ud = ud;
    cc->details = grpc_empty_slice();
    grpc_metadata_array_init(&cc->init_md);
    grpc_metadata_array_init(&cc->trail_md);
    atomic_fetch_add(&c->ncalls, 1);
    return cc;
}

/* A message on a stream, waiting for its reply (sent or not yet). */
typedef struct cmsg {
    uint64_t id;
    rpc_done done; /* One of the two. */
    rpc_done_pieces done_pieces;
    void *ud;
    double deadline;      /* cm_now()'s clock. */
    grpc_byte_buffer *bb; /* Until it goes on the wire. */
    int sent;
    struct cmsg *next;
} cmsg;

typedef struct cstag {
    int kind; /* CTAG_S* */
    struct cstream *st;
} cstag;

/* One stream: a long call of "<method>/stream" carrying the calls of one
 * method (and flags) on one channel. */
typedef struct cstream {
    rpc_client *c;
    const rpc_channel *ch; /* NULL once the channel is closed. */
    char *method;
    int flags;
    grpc_call *call;
    atomic_int refs; /* One per outstanding batch, and the list's. */
    cstag t_open, t_send, t_recv, t_status;
    grpc_metadata auth;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
    const char *error_string;
    grpc_byte_buffer *recv, *in_flight;
    /* Under c->mu. */
    cmsg *msgs; /* In the order started. */
    int started, sending, dead;
    struct cstream *next;
} cstream;

static void stream_unref(cstream *st) {
    if (atomic_fetch_sub(&st->refs, 1) != 1) return;
    if (st->call) grpc_call_unref(st->call);
    if (st->recv) grpc_byte_buffer_destroy(st->recv);
    grpc_metadata_array_destroy(&st->init_md);
    grpc_metadata_array_destroy(&st->trail_md);
    grpc_slice_unref(st->details);
    gpr_free((void *)st->error_string);
    free(st->method);
    free(st);
}

/* Report a message that got no reply, and free it. */
static void cmsg_fail(rpc_client *c, cmsg *m, int code, const char *msg) {
    atomic_fetch_sub(&c->ncalls, 1);
    report_fail(m->done, m->done_pieces, m->ud, code, msg);
    if (m->bb) grpc_byte_buffer_destroy(m->bb);
    free(m);
}

static void stream_over(cstream *st);

/* Put the first message not yet sent on the wire, unless one is. */
static void stream_pump(cstream *st) {
    rpc_client *c = st->c;
    pthread_mutex_lock(&c->mu);
    cmsg *m = st->msgs;
    while (m && m->sent) m = m->next;
    if (!m || st->sending || !st->started || st->dead) {
        pthread_mutex_unlock(&c->mu);
        return;
    }
    m->sent = 1;
    grpc_byte_buffer *bb = m->bb;
    m->bb = NULL;
    st->in_flight = bb;
    st->sending = 1;
    atomic_fetch_add(&st->refs, 1);
    pthread_mutex_unlock(&c->mu);
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_SEND_MESSAGE;
    op.data.send_message.send_message = bb;
    if (grpc_call_start_batch(st->call, &op, 1, &st->t_send, NULL) != GRPC_CALL_OK) {
        cm_error("rpc: cannot send on a stream");
        pthread_mutex_lock(&c->mu);
        st->in_flight = NULL;
        st->sending = 0;
        pthread_mutex_unlock(&c->mu);
        grpc_byte_buffer_destroy(bb);
        grpc_call_cancel(st->call, NULL); /* Its status fails the rest. */
        stream_unref(st);
    }
}

static int stream_post_recv(cstream *st) {
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &st->recv;
    return grpc_call_start_batch(st->call, &op, 1, &st->t_recv, NULL) == GRPC_CALL_OK;
}

/* Start a new stream's batches: its metadata, its status, its first read. */
static void stream_open(cstream *st) {
    rpc_client *c = st->c;
    grpc_op ops[2];
    memset(ops, 0, sizeof ops);
    send_md_op(c, st->flags, &st->auth, &ops[0]);
    ops[1].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[1].data.recv_initial_metadata.recv_initial_metadata = &st->init_md;
    atomic_fetch_add(&st->refs, 3);
    int failed = 0, ok = grpc_call_start_batch(st->call, ops, 2, &st->t_open, NULL) == GRPC_CALL_OK;
    if (!ok) failed++;
    grpc_op sop;
    memset(&sop, 0, sizeof sop);
    sop.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    sop.data.recv_status_on_client.trailing_metadata = &st->trail_md;
    sop.data.recv_status_on_client.status = &st->status;
    sop.data.recv_status_on_client.status_details = &st->details;
    sop.data.recv_status_on_client.error_string = &st->error_string;
    int status_ok =
        grpc_call_start_batch(st->call, &sop, 1, &st->t_status, NULL) == GRPC_CALL_OK;
    if (!status_ok) failed++;
    if (!stream_post_recv(st)) failed++;
    pthread_mutex_lock(&c->mu);
    st->started = 1;
    if (failed) st->dead = 1;
    pthread_mutex_unlock(&c->mu);
    if (failed) {
        /* Not expected (gRPC refuses a batch only for a bug in it). */
        cm_error("rpc: cannot start a stream of %s", st->method);
        grpc_call_cancel(st->call, NULL);
        if (!status_ok) { /* No status will come to end it. */
            st->status = GRPC_STATUS_INTERNAL;
            stream_over(st);
        }
    }
    stream_pump(st);
    while (failed-- > 0) stream_unref(st);
}

/* rpc_call_start with RPC_STREAM: the message goes on the channel's stream
 * of the method (opened when there is none). 0 when no stream can be
 * created (the caller then makes it a unary call). */
static cstream *stream_find(rpc_client *c, const rpc_channel *ch, const char *method, int flags) {
    cstream *st = c->streams;
    while (st && (st->ch != ch || st->dead || st->flags != flags || strcmp(st->method, method)))
        st = st->next;
    return st;
}

static grpc_call *stream_create_call(rpc_channel *ch, const char *method) {
    char *path = cm_malloc(strlen(method) + sizeof STREAM_SUFFIX);
    strcpy(path, method);
    strcat(path, STREAM_SUFFIX);
    grpc_slice mslice = grpc_slice_from_copied_string(path);
    free(path);
    grpc_call *gc = grpc_channel_create_call(ch->ch, NULL, GRPC_PROPAGATE_DEFAULTS, ch->c->cq,
                                             mslice, NULL, gpr_inf_future(GPR_CLOCK_MONOTONIC),
                                             NULL);
    grpc_slice_unref(mslice);
    return gc;
}

static int stream_call(rpc_channel *ch, const char *method, const rpc_seg *segs, int nsegs,
                       int64_t deadline_ms, int flags, rpc_done done,
                       rpc_done_pieces done_pieces, void *ud) {
    rpc_client *c = ch->c;
    /* A request over the limit with its frame goes as a unary call, which
     * fails (or fits) alone: on the stream it would end every call on it. */
    size_t total = SREQ_HDR;
    for (int i = 0; i < nsegs; i++) total += segs[i].len;
    if (total > (size_t)c->max_message) return 0;
    cmsg *m = cm_calloc(1, sizeof *m);
    m->id = atomic_fetch_add(&c->next_id, 1);
    m->done = done;
    m->done_pieces = done_pieces;
    m->ud = ud;
    m->deadline = cm_now() + (double)deadline_ms * 1e-3;
    /* Before the lock: an empty zero-copy segment is released at once. */
    uint8_t hdr[SREQ_HDR];
    put_le(hdr, m->id, 8);
    m->bb = segs_to_buffer_pre(hdr, sizeof hdr, segs, nsegs);
    pthread_mutex_lock(&c->mu);
    cstream *st = stream_find(c, ch, method, flags);
    grpc_call *gc = NULL, *spare = NULL;
    int created = 0, kick = 0;
    if (!st) {
        /* The call is made outside the lock (no gRPC call under it); another
         * thread may make the stream meanwhile, and then this one is spare. */
        pthread_mutex_unlock(&c->mu);
        gc = stream_create_call(ch, method);
        if (!gc) { /* Not expected; reported on the client thread, as a call. */
            grpc_byte_buffer_destroy(m->bb); /* Releases the segments. */
            post_failure(ch, ccall_new(c, done, done_pieces, ud), RPC_INTERNAL,
                         "cannot create a stream");
            free(m);
            return 1;
        }
        pthread_mutex_lock(&c->mu);
        st = stream_find(c, ch, method, flags);
        if (st) {
            spare = gc;
            gc = NULL;
        }
    }
    if (!st) {
        st = cm_calloc(1, sizeof *st);
        st->c = c;
        st->ch = ch;
        st->method = cm_strdup(method);
        st->flags = flags;
        st->call = gc;
        atomic_init(&st->refs, 1); /* The list's. */
        st->t_open = (cstag){CTAG_SOPEN, st};
        st->t_send = (cstag){CTAG_SSEND, st};
        st->t_recv = (cstag){CTAG_SRECV, st};
        st->t_status = (cstag){CTAG_SSTATUS, st};
        grpc_metadata_array_init(&st->init_md);
        grpc_metadata_array_init(&st->trail_md);
        st->details = grpc_empty_slice();
        st->next = c->streams;
        c->streams = st;
        /* The first stream: the client thread may sleep without a timeout,
         * and must now wake for deadlines (a call waiting for a server that
         * is not up has no other event). */
        kick = atomic_fetch_add(&c->nstreams, 1) == 0;
        created = 1;
    }
    atomic_fetch_add(&c->ncalls, 1);
    cmsg **tail = &st->msgs;
    while (*tail) tail = &(*tail)->next;
    *tail = m;
    atomic_fetch_add(&st->refs, 1); /* Kept past the unlock. */
    pthread_mutex_unlock(&c->mu);
    if (spare) grpc_call_unref(spare);
    if (kick) /* Outside the lock, as every gRPC call that may run callbacks. */
        grpc_channel_watch_connectivity_state(
            ch->ch, grpc_channel_check_connectivity_state(ch->ch, 0),
            gpr_inf_past(GPR_CLOCK_MONOTONIC), c->cq, (void *)&kick_tag);
    if (created)
        stream_open(st);
    else
        stream_pump(st);
    stream_unref(st);
    return 1;
}

/* Take the message with this id off the stream; NULL if it is gone (its
 * deadline passed). */
static cmsg *stream_take(cstream *st, uint64_t id) {
    pthread_mutex_lock(&st->c->mu);
    cmsg **pp = &st->msgs;
    while (*pp && (*pp)->id != id) pp = &(*pp)->next;
    cmsg *m = *pp;
    if (m) *pp = m->next;
    pthread_mutex_unlock(&st->c->mu);
    return m;
}

/* A reply frame: answer its message. */
static void stream_reply(cstream *st, grpc_byte_buffer *bb) {
    rpc_client *c = st->c;
    view v;
    uint8_t hdr[SREPLY_HDR];
    int rc = view_init(&v, bb);
    if (rc != RPC_OK || !view_take(&v, hdr, sizeof hdr)) {
        cm_error("rpc: a malformed reply on a stream of %s", st->method);
        grpc_call_cancel_with_status(st->call, GRPC_STATUS_INTERNAL,
                                     "a malformed reply on the stream", NULL);
        view_deinit(&v);
        return;
    }
    cmsg *m = stream_take(st, get_le(hdr, 8));
    int code = (int)get_le(hdr + 8, 4);
    if (m) {
        atomic_fetch_sub(&c->ncalls, 1);
        if (code != RPC_OK) {
            const uint8_t *p;
            size_t len;
            char *text = NULL;
            if (view_flat(&v, &p, &len) == RPC_OK) {
                text = cm_malloc(len + 1);
                memcpy(text, p, len);
                text[len] = 0;
            }
            if (code < 0 || code > RPC_UNAUTHENTICATED) code = RPC_UNKNOWN;
            report_fail(m->done, m->done_pieces, m->ud, code, text ? text : rpc_status_name(code));
            free(text);
        } else {
            report_reply(m->done, m->done_pieces, m->ud, "OK", &v);
        }
        free(m);
    }
    view_deinit(&v);
}

/* The stream is over: every message still on it fails with its status. */
static void stream_over(cstream *st) {
    rpc_client *c = st->c;
    pthread_mutex_lock(&c->mu);
    st->dead = 1;
    cstream **pp = &c->streams;
    while (*pp && *pp != st) pp = &(*pp)->next;
    int listed = *pp == st;
    if (listed) *pp = st->next;
    cmsg *m = st->msgs;
    st->msgs = NULL;
    pthread_mutex_unlock(&c->mu);
    if (listed) atomic_fetch_sub(&c->nstreams, 1);
    int code = (int)st->status;
    char *details = GRPC_SLICE_LENGTH(st->details) ? grpc_slice_to_c_string(st->details) : NULL;
    const char *msg = details ? details : rpc_status_name(code);
    if (code == RPC_OK) {
        code = RPC_UNAVAILABLE;
        msg = "the stream ended before the reply";
    }
    if (m && st->error_string) cm_debug("rpc: stream failed: %s", st->error_string);
    while (m) {
        cmsg *next = m->next;
        cmsg_fail(c, m, code, msg);
        m = next;
    }
    gpr_free(details);
    if (listed) stream_unref(st); /* The list's reference. */
}

static void stream_event(cstag *t, int success) {
    if (t->kind == CTAG_KICK) return;
    cstream *st = t->st;
    switch (t->kind) {
    case CTAG_SOPEN: break;
    case CTAG_SSEND: {
        pthread_mutex_lock(&st->c->mu);
        grpc_byte_buffer *bb = st->in_flight;
        st->in_flight = NULL;
        st->sending = 0;
        pthread_mutex_unlock(&st->c->mu);
        if (bb) grpc_byte_buffer_destroy(bb); /* May run release(). */
        if (success) stream_pump(st);
        break;
    }
    case CTAG_SRECV: {
        grpc_byte_buffer *bb = success ? st->recv : NULL;
        st->recv = NULL;
        if (!bb) break; /* The stream ends; its status follows. */
        if (stream_post_recv(st)) atomic_fetch_add(&st->refs, 1);
        else grpc_call_cancel(st->call, NULL);
        stream_reply(st, bb);
        grpc_byte_buffer_destroy(bb);
        break;
    }
    case CTAG_SSTATUS: stream_over(st); break;
    }
    stream_unref(st); /* The batch's reference. */
}

/* Fail the messages whose deadline passed, and reset their streams (the
 * server then lets go of them, as of a unary call past its deadline). */
static void stream_sweep(rpc_client *c) {
    double now = cm_now();
    cmsg *expired = NULL;
    cstream *reset_small[16], **reset = reset_small;
    int nreset = 0, cap = 16;
    pthread_mutex_lock(&c->mu);
    for (cstream *st = c->streams; st; st = st->next) {
        int any = 0;
        for (cmsg **pp = &st->msgs; *pp;) {
            cmsg *m = *pp;
            if (m->deadline > now) {
                pp = &m->next;
                continue;
            }
            *pp = m->next;
            m->next = expired;
            expired = m;
            any = 1;
        }
        if (any && !st->dead) {
            if (nreset == cap) {
                cstream **more = cm_malloc((size_t)cap * 2 * sizeof *more);
                memcpy(more, reset, (size_t)cap * sizeof *more);
                if (reset != reset_small) free(reset);
                reset = more;
                cap *= 2;
            }
            st->dead = 1; /* New calls open a new stream. */
            atomic_fetch_add(&st->refs, 1);
            reset[nreset++] = st;
        }
    }
    pthread_mutex_unlock(&c->mu);
    /* The expired calls failed DEADLINE_EXCEEDED here; the others then on
     * the stream fail as on a broken connection (retried by ps_client). */
    for (int i = 0; i < nreset; i++) {
        grpc_call_cancel_with_status(reset[i]->call, GRPC_STATUS_UNAVAILABLE,
                                     "the stream was reset: a call on it passed its deadline",
                                     NULL);
        stream_unref(reset[i]);
    }
    if (reset != reset_small) free(reset);
    while (expired) {
        cmsg *next = expired->next;
        cmsg_fail(c, expired, RPC_DEADLINE_EXCEEDED, "Deadline Exceeded");
        expired = next;
    }
}

static void *client_thread(void *arg) {
    rpc_client *c = arg;
    double next_sweep = 0, last_done = 0;
    for (;;) {
        /* While streams are open, wake at least every 20 ms for their
         * messages' deadlines. Poll first only while calls are in flight or
         * one ended in the last 5 ms (the caller's next call is then likely
         * on its way): an idle client's wake-ups do not spin. */
        int streams = atomic_load(&c->nstreams) > 0;
        gpr_timespec until = streams ? gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                                    gpr_time_from_millis(20, GPR_TIMESPAN))
                                     : gpr_inf_future(GPR_CLOCK_MONOTONIC);
        int warm = atomic_load(&c->ncalls) > 0 || cm_now() - last_done < 0.005;
        grpc_event ev = cq_next_spin(c->cq, until, warm ? c->poll_spin_us : 0);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) break;
        double now = cm_now();
        if (ev.type == GRPC_OP_COMPLETE) last_done = now;
        if (streams && now >= next_sweep) {
            stream_sweep(c);
            next_sweep = now + 0.02;
        }
        if (ev.type != GRPC_OP_COMPLETE) continue;
        if (*(const int *)ev.tag != CTAG_CALL) {
            stream_event(ev.tag, ev.success);
            continue;
        }
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
    pthread_mutex_destroy(&c->mu);
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
    c->poll_spin_us = poll_spin_of(o.poll_spin_us);
    c->creds = creds;
    c->bearer = o.token ? bearer_of(o.token) : NULL;
    c->admin_bearer = o.admin_token ? bearer_of(o.admin_token) : NULL;
    c->server_name = o.tls_server_name ? cm_strdup(o.tls_server_name) : NULL;
    c->test_gzip = o.test_gzip;
    atomic_init(&c->ncalls, 0);
    atomic_init(&c->nchannels, 0);
    atomic_init(&c->nstreams, 0);
    atomic_init(&c->next_id, 1);
    pthread_mutex_init(&c->mu, NULL);
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
    /* Its streams end (their messages fail CANCELLED, as calls in flight). */
    rpc_client *c = ch->c;
    for (;;) {
        pthread_mutex_lock(&c->mu);
        cstream *st = c->streams;
        while (st && st->ch != ch) st = st->next;
        if (st) {
            st->ch = NULL;
            st->dead = 1;
            atomic_fetch_add(&st->refs, 1);
        }
        pthread_mutex_unlock(&c->mu);
        if (!st) break;
        grpc_call_cancel(st->call, NULL);
        stream_unref(st);
    }
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
    if ((flags & RPC_STREAM) && method && *method && deadline_ms > 0 && nsegs >= 0 &&
        (nsegs == 0 || segs) &&
        stream_call(ch, method, segs, nsegs, deadline_ms, flags & ~RPC_STREAM, done,
                    done_pieces, ud))
        return;
    flags &= ~RPC_STREAM;
    ccall *cc = ccall_new(c, done, done_pieces, ud);
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
    send_md_op(c, flags, &cc->auth, &ops[0]);
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
