/* rpc.h - the project's one thin layer over the gRPC C core API.
 * SPDX-License-Identifier: MIT
 *
 * Unary calls, which a client may also send as messages on one long gRPC
 * stream per channel and method (RPC_STREAM; the server answers them with
 * the method's handler, as unary calls). Messages are opaque bytes here
 * (the PS packs them with protobuf-c, proto/ps.proto); this layer moves
 * them, with these rules:
 *
 *  - Payloads are sent as a list of segments (rpc_seg). A segment with a
 *    'release' callback is sent zero-copy, straight from the caller's memory
 *    (grpc_slice_new_with_user_data); release(ud) runs once gRPC no longer
 *    needs the memory, on any thread. A segment without one is copied.
 *  - Every client call has a deadline. Received messages are handed over as
 *    one contiguous buffer that is valid only during the callback.
 *  - Status codes are gRPC's own numbers (RPC_OK, RPC_INVALID_ARGUMENT, ...),
 *    so this header does not pull in <grpc/grpc.h>.
 *  - The message size limit is set on both the server and the channels
 *    (send and receive); an oversized message fails with
 *    RPC_RESOURCE_EXHAUSTED on the side that sees it.
 *  - Servers refuse to share a port (SO_REUSEPORT off): binding a port that
 *    is taken fails with CM_EBUSY instead of silently splitting traffic.
 *  - Authentication: a server given tokens refuses, before any handler
 *    runs, every call whose "authorization: Bearer <token>" metadata is
 *    missing or matches neither token (RPC_UNAUTHENTICATED, a message that
 *    says nothing about the service), and a call with the worker token to a
 *    method registered for the admin (RPC_PERMISSION_DENIED). Tokens are
 *    compared in constant time; refusals are counted and logged with the
 *    peer's address. TLS (gRPC's own SSL credentials) is optional, mutual
 *    when the server is given a CA.
 *  - Bounds: compressed requests are refused (only the identity encoding is
 *    enabled, so a small request cannot inflate); calls held by the
 *    application (a Pull waiting for a version) are capped per server
 *    (RPC_RESOURCE_EXHAUSTED beyond) and, through HTTP/2's concurrent
 *    streams, per connection (and max_streams per stream of RPC_STREAM
 *    calls); a held call whose client cancels, disconnects or passes its
 *    deadline is reported to the application (on_cancel) so it can let go
 *    of it; idle connections are closed (a connection with a stream open
 *    is not idle).
 *
 * Threads: a server runs 'threads' completion-queue threads that call the
 * handlers; a client runs one completion-queue thread that calls the 'done'
 * callbacks. Handlers and callbacks must not block for long, and must not
 * call rpc_call_sync, rpc_server_shutdown/destroy or rpc_client_destroy
 * (each waits for the thread it would be running on).
 *
 * Lifecycle:
 *   rpc_server_create -> rpc_server_add_method* -> rpc_server_start
 *     -> rpc_server_shutdown -> rpc_server_destroy
 *   rpc_client_create -> rpc_channel_open* -> rpc_call_start*
 *     -> rpc_channel_close* -> rpc_client_destroy
 * rpc_init()/rpc_shutdown() wrap grpc_init/grpc_shutdown (refcounted);
 * create/destroy call them, so users rarely need to. gRPC stays
 * initialised from the first rpc_init() until exit.
 */
#ifndef RPC_H
#define RPC_H
#include <stddef.h>
#include <stdint.h>

/* gRPC status codes (same numbers as grpc_status_code). */
enum {
    RPC_OK = 0,
    RPC_CANCELLED = 1,
    RPC_UNKNOWN = 2,
    RPC_INVALID_ARGUMENT = 3,
    RPC_DEADLINE_EXCEEDED = 4,
    RPC_NOT_FOUND = 5,
    RPC_ALREADY_EXISTS = 6,
    RPC_PERMISSION_DENIED = 7,
    RPC_RESOURCE_EXHAUSTED = 8,
    RPC_FAILED_PRECONDITION = 9,
    RPC_ABORTED = 10,
    RPC_OUT_OF_RANGE = 11,
    RPC_UNIMPLEMENTED = 12,
    RPC_INTERNAL = 13,
    RPC_UNAVAILABLE = 14,
    RPC_DATA_LOSS = 15,
    RPC_UNAUTHENTICATED = 16
};

/* "OK", "INVALID_ARGUMENT", ...; never NULL. */
const char *rpc_status_name(int code);

/* The CM_* code that best describes a gRPC status (CM_OK for RPC_OK); the
 * table is in rpc.c. */
int rpc_status_to_cm(int code);

/* grpc_init()/grpc_shutdown(): refcounted, any thread; create/destroy call
 * them. The first rpc_init() also pins gRPC until the process exits (the
 * final grpc_shutdown can block for 10 s, see rpc.c), so rpc_shutdown()
 * never tears the library down. */
void rpc_init(void);
void rpc_shutdown(void);

/* 1 once rpc_init has turned off Abseil's mutex deadlock detector (Debian
 * builds Abseil with it on, and every lock gRPC takes then pays for it; see
 * rpc.c), 0 if that Abseil has no switch to find (or before rpc_init). */
int rpc_abseil_detector_off(void);

/* One piece of a message to send. */
typedef struct rpc_seg {
    const void *data;
    size_t len;
    /* NULL: the bytes are copied before rpc_call_start/rpc_reply returns.
     * Otherwise they are sent in place and release(ud) is called exactly
     * once when gRPC is done with them (also on every error path). */
    void (*release)(void *ud);
    void *ud;
} rpc_seg;

/* Default message size limit (both directions, both sides): 64 MiB. */
#define RPC_DEFAULT_MAX_MESSAGE (64 << 20)
/* How long a completion-queue thread (the server's, the client's) keeps
 * polling without blocking, yielding its core between polls, before it
 * sleeps (opts.poll_spin_us 0). Measured on 2 cores (docs/bench-log.md,
 * "Completion-queue threads that poll before they sleep"): 4 KiB push
 * then pull, 1 PS and 1 worker 1.6-2.0x the operations a second, 2 PS and
 * 2 workers 1.2-1.6x. */
#define RPC_DEFAULT_POLL_SPIN_US 50

/* ------------------------------------------------------------------ */
/* Server                                                             */
/* ------------------------------------------------------------------ */

typedef struct rpc_server rpc_server;
typedef struct rpc_call rpc_call; /* One incoming call. */

/* Called on a server thread for each call of a registered method. 'req'
 * (len bytes) is valid only until the handler returns. The handler, or any
 * thread later, must finish the call exactly once with rpc_reply() or
 * rpc_fail(); until then the call stays open (a Pull may wait for a version
 * this way without holding a thread). */
typedef void (*rpc_handler)(void *ctx, rpc_call *call, const uint8_t *req, size_t len);

/* A received message in place: the bytes of pieces[0], pieces[1], ... in
 * order (gRPC's slices, no copy), 'len' in all; a piece may end inside any
 * field or value. */
typedef struct rpc_piece {
    const uint8_t *p;
    size_t len;
} rpc_piece;

/* A handler that takes the request as pieces (rpc_server_add_method_pieces):
 * the same rules as rpc_handler; pieces and their bytes are valid only
 * until it returns. */
typedef void (*rpc_handler_pieces)(void *ctx, rpc_call *call, const rpc_piece *pieces,
                                   int npieces, size_t len);

/* Who a call comes from, by its token (rpc_call_level). A server without
 * tokens treats every call as RPC_AUTH_ADMIN. */
enum { RPC_AUTH_NONE = 0, RPC_AUTH_WORKER = 1, RPC_AUTH_ADMIN = 2 };

/* A held call's client went away (cancelled, disconnected, deadline
 * passed), called on a server thread while the application still holds
 * it: the application should finish it (rpc_fail) if it can find it,
 * promptly; it may already be finishing it on another thread, so it must
 * arbitrate (e.g. remove it from its own waiting list under a lock, and
 * finish it only if it was there). */
typedef void (*rpc_cancel_fn)(void *ctx, rpc_call *call);

typedef struct rpc_server_opts {
    int threads;         /* Completion-queue threads (default 2). */
    int max_message;     /* Bytes; 0 = RPC_DEFAULT_MAX_MESSAGE. */
    /* Authentication (NULL: none): the tokens (at least 16 bytes). */
    const char *token;       /* Workers' calls. */
    const char *admin_token; /* The admin's (the chief's); may be NULL. */
    /* TLS (NULL cert: plaintext): PEM file paths. With ca, clients must
     * present a certificate it signed (mutual TLS). */
    const char *tls_cert, *tls_key, *tls_ca;
    int max_held;        /* Calls held at once (0 = 20000). */
    int max_streams;     /* Concurrent calls per connection (0 = 256), and
                          * per stream (RPC_STREAM: with that many in
                          * progress or unsent, the server reads no more
                          * of the stream until one is sent). */
    int idle_ms;         /* Close connections idle this long (0 = 600000). */
    int poll_spin_us;    /* Each thread's poll before it sleeps, µs (0 =
                          * RPC_DEFAULT_POLL_SPIN_US, < 0 = none). */
    rpc_cancel_fn on_cancel; /* May be NULL. */
    void *cancel_ctx;
} rpc_server_opts;

/* What the server refused before any handler ran. */
typedef struct rpc_server_stats {
    uint64_t unauthenticated; /* No or a wrong token. */
    uint64_t denied;          /* The worker token on an admin method. */
    uint64_t exhausted;       /* Over max_held. */
    uint64_t cancelled_held;  /* Held calls whose client went away. */
    int held;                 /* Calls held now. */
} rpc_server_stats;
void rpc_server_stats_get(rpc_server *s, rpc_server_stats *out);

/* Create a server (not yet listening). opts may be NULL. *out NULL on
 * error: CM_EINVAL (logged) for a token under 16 bytes or a TLS file that
 * cannot be read. */
int rpc_server_create(const rpc_server_opts *opts, rpc_server **out);

/* Register 'method' (full name, e.g. "/psrpc.Ps/Push"; copied) for callers
 * of at least 'level' (RPC_AUTH_WORKER or _ADMIN). Calls to any other
 * method are answered RPC_UNIMPLEMENTED. Before start only.
 * rpc_server_add_method registers for RPC_AUTH_WORKER. */
int rpc_server_add_method_level(rpc_server *s, const char *method, int level, rpc_handler fn,
                                void *ctx);
int rpc_server_add_method(rpc_server *s, const char *method, rpc_handler fn, void *ctx);
/* The same for a handler of pieces (large requests read without a copy). */
int rpc_server_add_method_pieces(rpc_server *s, const char *method, int level,
                                 rpc_handler_pieces fn, void *ctx);

/* The level a call's token gives (RPC_AUTH_*), for handlers whose
 * requests differ in what they need (e.g. a Checkpoints that deletes). */
int rpc_call_level(const rpc_call *call);

/* Finish a call that needs more than rpc_call_level gives with
 * PERMISSION_DENIED, counted and logged as the layer's own refusals. */
void rpc_deny(rpc_call *call, const char *why);

/* A pointer of the application's own, kept with a held call (e.g. its
 * waiting Pull), for on_cancel. */
void rpc_call_set_app(rpc_call *call, void *app);
void *rpc_call_app(const rpc_call *call);

/* Listen on 'addr' ("127.0.0.1:0" picks a free port) and start the threads.
 * *port receives the bound port. Returns CM_EBUSY if the address cannot be
 * bound (e.g. the port is taken), CM_EINVAL for a bad address. */
int rpc_server_start(rpc_server *s, const char *addr, int *port);

/* Stop accepting calls, let calls that are being answered finish for up to
 * grace_ms (replies already given on streams likewise reach the client),
 * then cancel the rest. Calls the application still holds (not
 * yet finished with rpc_reply/rpc_fail) must be finished by the
 * application; rpc_server_shutdown waits until they are, so another thread
 * must finish them (their clients already got RPC_UNAVAILABLE "Cancelling
 * all calls"; rpc_reply still releases its segments). Handlers may still
 * run during the grace period. Idempotent; concurrent callers all wait. */
void rpc_server_shutdown(rpc_server *s, int grace_ms);

/* Free the server (shuts it down first if needed). NULL is a no-op. */
void rpc_server_destroy(rpc_server *s);

/* Finish 'call' with RPC_OK and the concatenation of segs as the reply.
 * Takes ownership of zero-copy segments (their release runs even if the
 * call was cancelled). After this, 'call' must not be used. Thread-safe. */
void rpc_reply(rpc_call *call, const rpc_seg *segs, int nsegs);

/* Finish 'call' with a non-OK status and a message (copied). */
void rpc_fail(rpc_call *call, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The peer's address ("ipv4:127.0.0.1:53412"); valid until the call is
 * finished. */
const char *rpc_call_peer(rpc_call *call);

/* ------------------------------------------------------------------ */
/* Client                                                             */
/* ------------------------------------------------------------------ */

typedef struct rpc_client rpc_client;
typedef struct rpc_channel rpc_channel;

/* Called once per call on the client thread. On RPC_OK, reply holds the
 * reply message (len bytes, valid only during the callback); otherwise
 * 'message' says why (never NULL). */
typedef void (*rpc_done)(void *ud, int code, const char *message, const uint8_t *reply,
                         size_t len);

/* The same with the reply as pieces (rpc_call_start_pieces): valid only
 * during the callback; npieces 0 and len 0 unless code is RPC_OK. */
typedef void (*rpc_done_pieces)(void *ud, int code, const char *message,
                                const rpc_piece *pieces, int npieces, size_t len);

typedef struct rpc_client_opts {
    int max_message; /* Bytes; 0 = RPC_DEFAULT_MAX_MESSAGE. */
    /* Sent with every call as "authorization: Bearer <token>" (NULL: none);
     * calls started with RPC_ADMIN send admin_token instead (when set). */
    const char *token, *admin_token;
    /* TLS (NULL ca: plaintext): the CA that signed the servers' certificates
     * (PEM file) and, for mutual TLS, this client's certificate and key. */
    const char *tls_ca, *tls_cert, *tls_key;
    /* The name the servers' certificates carry (NULL: the target's host). */
    const char *tls_server_name;
    int test_gzip; /* Test hook: gzip every request (our servers refuse it). */
    /* The completion-queue thread's poll before it sleeps, µs (0 =
     * RPC_DEFAULT_POLL_SPIN_US, < 0 = none). */
    int poll_spin_us;
} rpc_client_opts;

/* CM_EINVAL (a message logged) for a TLS file that cannot be read. */
int rpc_client_create(const rpc_client_opts *opts, rpc_client **out);

/* Destroy the client: every channel must be closed and every call done
 * (calls still in flight are waited for, and logged as a bug). */
void rpc_client_destroy(rpc_client *c);

/* A channel to 'target' ("host:port"). Connecting is lazy. */
int rpc_channel_open(rpc_client *c, const char *target, rpc_channel **out);
void rpc_channel_close(rpc_channel *ch);
const char *rpc_channel_target(const rpc_channel *ch);

/* Flags for rpc_call_start. */
enum {
    /* Wait (up to the deadline) for the server to come up instead of
     * failing at once with RPC_UNAVAILABLE. */
    RPC_WAIT_FOR_READY = 1,
    /* An administrative call: send the client's admin token. */
    RPC_ADMIN = 2,
    /* Carry the call on the channel's stream of this method (one long gRPC
     * call of "<method>/stream", opened at the first such call and again
     * after it ends), which the server answers like unary calls of the
     * method: the same handler, authentication, limits, held calls and
     * on_cancel. It saves gRPC's per-call work (a call object, headers and
     * trailers each way), which is most of a small call's cost. Messages
     * are answered by id, in any order. A call past its deadline fails
     * with RPC_DEADLINE_EXCEEDED and resets its stream, so the calls then
     * on the same stream fail RPC_UNAVAILABLE (as on a broken connection).
     * A request over the message limit with its 8-byte frame goes as a
     * unary call instead. */
    RPC_STREAM = 4
};

/* Start a unary call of 'method' with the concatenation of segs as the
 * request; 'done' runs exactly once, on the client thread, even when the
 * call cannot start (then with RPC_INTERNAL, e.g. for deadline_ms <= 0; a
 * NULL channel, which has no thread, runs it at once on the caller's).
 * Takes ownership of zero-copy segments. deadline_ms > 0. Thread-safe. */
void rpc_call_start(rpc_channel *ch, const char *method, const rpc_seg *segs, int nsegs,
                    int64_t deadline_ms, int flags, rpc_done done, void *ud);

/* rpc_call_start with a 'done' that takes the reply as pieces in place
 * (large replies read without a copy); otherwise the same. */
void rpc_call_start_pieces(rpc_channel *ch, const char *method, const rpc_seg *segs, int nsegs,
                           int64_t deadline_ms, int flags, rpc_done_pieces done, void *ud);

/* A blocking unary call, for tools and tests: returns the gRPC status and
 * fills *reply (malloc'd, free() it) and *len on RPC_OK, or msg (errlen
 * bytes, may be NULL) otherwise. */
int rpc_call_sync(rpc_channel *ch, const char *method, const void *req, size_t req_len,
                  int64_t deadline_ms, int flags, uint8_t **reply, size_t *len, char *msg,
                  size_t msglen);

#endif /* RPC_H */
