/* wk_ring.h - ring AllReduce over TCP or shared memory: the CPU data plane
 * of collective mode.
 * SPDX-License-Identifier: MIT
 *
 * N ranks form a ring: rank r sends to r+1 and receives from r-1 (mod N),
 * one TCP connection per direction. Between two ranks on the same host
 * (transport WK_RING_SHM or WK_RING_AUTO) the data goes through a shared-
 * memory ring of chunk slots instead (one copy in, the reduction reading
 * straight from the slot; futex wake-ups), the TCP connection staying as
 * the handshake and as the watch on the peer's life. Bringing a ring up takes two calls, so
 * that a rendezvous can hand out addresses in between:
 *
 *     wk_ring_listen("127.0.0.1", 0, &l, err, sizeof err);   // every rank
 *     ... publish host:wk_ring_listener_port(l), learn everyone's ...
 *     wk_ring_connect(l, rank, nranks, addrs, &opts, &ring, err, sizeof err);
 *     wk_ring_listener_destroy(l);
 *     wk_ring_allreduce(ring, grad, n, step, 1);            // every step
 *     wk_ring_destroy(ring);
 *
 * Conventions: functions return CM_OK or a negative CM_E*; objects come back
 * through an out-parameter that is NULL on failure; destroy(NULL) is a no-op.
 * Every wait is bounded (wk_ring_opts). A ring is used by one thread at a
 * time; different rings may be used from different threads.
 *
 * Errors are sticky: after a failed collective (a dead or misbehaving peer,
 * a timeout) the ring returns the same status from every later call, and
 * wk_ring_error() says what happened, naming the peer's rank and address.
 * The contents of the data buffer after a failure are unspecified.
 */
#ifndef WK_RING_H
#define WK_RING_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_status.h"

typedef struct wk_ring_listener wk_ring_listener;
typedef struct wk_ring wk_ring;

typedef struct wk_ring_opts {
    /* Identifies the job (and session): peers with another id are refused
     * in the handshake. Every rank must use the same value. */
    uint64_t job_id;
    /* Longest wait for a peer to make progress (bytes moved) during a
     * collective, and for a handshake reply; ms. */
    int timeout_ms;
    /* How long wk_ring_connect keeps retrying the connection to the next
     * rank and waiting for the previous one; ms. */
    int connect_timeout_ms;
    /* Pipelining unit: each segment of the buffer travels in chunks of at
     * most this many bytes (rounded down to whole floats, at least one).
     * 0 (the default): by transport, WK_RING_TCP_CHUNK over TCP only
     * (half of it for ring segments between half a chunk and two:
     * wk_ring_chunk_bytes), WK_RING_SHM_CHUNK with shared memory (auto,
     * shm). Every rank must use the same value (with 0, the same transport
     * does). */
    size_t chunk_bytes;
    /* SO_SNDBUF / SO_RCVBUF of the ring's sockets; 0 keeps the kernel's
     * autotuning. */
    int sock_buf_bytes;
    /* When nothing can move, keep retrying this long (µs), yielding the
     * core between tries (sched_yield), before sleeping in poll() or on a
     * futex: a sleeping rank's wake-up (an idle core's, in a VM a halted
     * vCPU's) costs more than a small message. 0: always sleep at once. */
    int spin_us;
    /* WK_RING_TCP: TCP only (the default). WK_RING_AUTO: shared memory with
     * a neighbour on the same host (same boot and the same /dev/shm), TCP
     * with the others. WK_RING_SHM: shared memory or fail. Every rank must
     * use TCP or not (the handshake says which, and refuses a mismatch). */
    int transport;
    /* Every peer listened before wk_ring_connect was called (a rendezvous
     * handed out the addresses of listeners that exist): a refused
     * connection then means the peer is gone and fails at once, as does
     * a neighbour that closes its connection while the ring forms, instead
     * of waiting connect_timeout_ms for a peer that will not come. */
    int peers_listening;
    /* How wk_ring_allreduce moves data. WK_RING_ALG_RING: the ring below,
     * 2(N-1) steps. WK_RING_ALG_HD: recursive halving then doubling
     * (Rabenseifner's algorithm: log2 N steps of reduce-scatter with rank
     * r^d for d = N/2 .. 1, then log2 N of all-gather back out), the same
     * bytes as the ring in 2 log2 N steps, over log2 N - 1 extra TCP
     * connections a rank; needs N a power of two >= 4 and transport TCP.
     * WK_RING_ALG_AUTO (the default): halving-doubling for messages of up
     * to WK_RING_HD_MAX bytes where it can run (N a power of two >= 4 and
     * no shared-memory link anywhere in the ring), else the ring. Broadcast always uses the ring. Ranks settle it
     * together in wk_ring_connect; a rank asking for another algorithm than
     * the others fails there, naming it. */
    int algorithm;
} wk_ring_opts;

enum { WK_RING_TCP = 0, WK_RING_AUTO = 1, WK_RING_SHM = 2 };
enum { WK_RING_ALG_RING = 0, WK_RING_ALG_AUTO = 1, WK_RING_ALG_HD = 2 };
/* Auto's limit for halving-doubling: fewer steps win on small and middle
 * messages; from about 16 MiB the ring's steps, each a quarter of the
 * buffer or less and pipelined chunk by chunk, were faster (4 ranks over
 * loopback TCP; docs/BENCHMARKS.md). */
#define WK_RING_HD_MAX ((size_t)4 << 20)

/* Default chunks (chunk_bytes 0). Over TCP a chunk costs a header, a
 * poll() and its wake-ups, so chunks are large: with one chunk a segment
 * the ring still moves every link at once, and what a chunk less of
 * pipelining loses is the reduction of one chunk a step. A shared-memory
 * slot holds one chunk, and smaller slots keep the copy in cache. */
#define WK_RING_TCP_CHUNK ((size_t)1 << 20)
#define WK_RING_SHM_CHUNK ((size_t)256 << 10)

/* Default spin before a sleep: 50 µs (2 ranks on loopback, 6 Dec 2026:
 * 4 KiB 3.5x, 64 KiB 2.5x, 1-4 MiB 0-25 % faster over TCP; 2-5x over
 * shared memory up to 1 MiB; docs/BENCHMARKS.md). */
#define WK_RING_SPIN_US 50

/* Defaults: job_id 0, timeout 30 s, connect timeout 30 s, chunk by
 * transport (0), kernel socket buffers, spin WK_RING_SPIN_US, TCP only,
 * algorithm auto. */
void wk_ring_opts_default(wk_ring_opts *o);

/* ===== Listener ===== */

/* Listen on host:port (port 0: a free port, see wk_ring_listener_port).
 * On error *out is NULL and err says why. Release with
 * wk_ring_listener_destroy. */
int wk_ring_listen(const char *host, int port, wk_ring_listener **out, char *err,
                   size_t errlen);
/* The port actually bound. */
int wk_ring_listener_port(const wk_ring_listener *l);
void wk_ring_listener_destroy(wk_ring_listener *l);

/* ===== Ring ===== */

/* Join the ring as 'rank' of 'nranks': connect to addrs[(rank+1) % nranks]
 * (retrying with backoff for opts->connect_timeout_ms) and accept the
 * connection of rank-1 on 'l'. addrs holds "host:port" of every rank in
 * ring order (addrs[rank] is this rank's own listener). Both connections
 * start with a handshake (magic, protocol version, job id, nranks, rank); a
 * connection from anything but rank-1 of the same job is refused (logged)
 * and the wait goes on; a next rank that is not rank+1 of the same job is
 * an error naming both sides. Then, with N a power of two >= 4, the ranks
 * settle the allreduce algorithm in a small allreduce over the ring, and for
 * halving-doubling each rank connects to its partners r^d (d = 2, 4, ...
 * N/2) above it and accepts those below it on 'l', with the same handshake.
 * With nranks == 1 no socket is used and l and
 * addrs may be NULL. l is borrowed (it may be destroyed afterwards); opts
 * may be NULL for the defaults. On success *out owns the ring; release
 * with wk_ring_destroy. */
int wk_ring_connect(wk_ring_listener *l, int rank, int nranks, const char *const *addrs,
                    const wk_ring_opts *opts, wk_ring **out, char *err, size_t errlen);

/* In place: data[0..n) becomes the element-wise sum over all ranks (the
 * mean when 'average' is non-zero). Every rank must call it with the same
 * n, step and average; 'step' (e.g. the training step) is carried in every
 * chunk and checked. The result is bit-identical on every rank. The
 * buffer is cut into nranks segments and each segment into chunks;
 * reduce-scatter, then all-gather, pipelined chunk by chunk over
 * non-blocking sockets (or halving-doubling: wk_ring_algorithm). n == 0
 * and nranks == 1 return at once. */
int wk_ring_allreduce(wk_ring *r, float *data, size_t n, int64_t step, int average);

/* In place: every rank ends with root's data[0..n), sent around the ring
 * in chunks (e.g. the chief's initial parameters). Same rules as
 * wk_ring_allreduce. */
int wk_ring_broadcast(wk_ring *r, float *data, size_t n, int64_t step, int root);

int wk_ring_rank(const wk_ring *r);
int wk_ring_size(const wk_ring *r);
/* How this rank's two links carry data: "tcp", "shm" (both shared memory)
 * or "tcp+shm"; "none" for a single rank. Owned by the library. */
const char *wk_ring_transport(const wk_ring *r);

/* How wk_ring_allreduce runs n floats on this ring: "ring" or
 * "halving-doubling". Owned by the library. */
const char *wk_ring_algorithm(const wk_ring *r, size_t n);

/* The chunk an allreduce of n floats travels in on this ring, in bytes:
 * chunk_bytes, or for 0 the transport's default (over TCP, half of it for
 * a ring whose segments are between half a chunk and two chunks long). */
size_t wk_ring_chunk_bytes(const wk_ring *r, size_t n);
/* CM_OK, or the sticky status of the first failure. */
int wk_ring_status(const wk_ring *r);
/* The message of the first failure ("" when none); owned by the ring. */
const char *wk_ring_error(const wk_ring *r);

/* Close the connections and free the ring; NULL is a no-op. */
void wk_ring_destroy(wk_ring *r);

#endif /* WK_RING_H */
