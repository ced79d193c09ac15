/* wk_ring.c - ring AllReduce and broadcast over TCP or shared memory
 * (wk_ring.h).
 * SPDX-License-Identifier: MIT
 *
 * Design. A collective is a plan of "ring steps" run by one thread over two
 * non-blocking sockets, poll() waiting whenever neither can move:
 *
 *   send step k  a range of the user buffer, cut into chunks, each sent as a
 *                40-byte header + payload straight from the buffer (no copy);
 *                chunk j of step k may go only once chunk j of recv step
 *                dep(k) is complete (the data it carries was reduced there).
 *   recv step k  a range of the buffer, cut the same way; each chunk's header
 *                is checked, its payload read into the scratch chunk and
 *                added into the buffer (ADD; ADD_DIV also divides by nranks
 *                on the segment's last reduction), or read straight into the
 *                buffer (COPY).
 *
 * AllReduce on N ranks, rank r, buffer cut into N near-equal segments:
 * send step k (0 <= k < 2N-2) carries segment (r-k) mod N, recv step k
 * fills segment (r-1-k) mod N; recv steps 0..N-2 add (reduce-scatter, after
 * which rank r holds the final segment r+1), steps N-1..2N-3 copy
 * (all-gather); dep(k) = k-1, because what a rank sends at step k is what it
 * received at step k-1. Sending chunk j of step k overlaps receiving chunk
 * j+1 of step k-1, so the pipeline is one chunk deep per hop plus whatever
 * the socket buffers hold. Every rank's final segment is a copy of its
 * owner's bytes, so all ranks end bit-identical.
 *
 * Halving-doubling (N a power of two >= 4, TCP): the same plan machinery
 * with 2 log2 N steps, each on the link to one partner (plan_hd). Links
 * other than the ring's (rank ^ d, d >= 2) are set up after the ring, once
 * every rank agreed on the algorithm (settle_algorithm).
 *
 * Broadcast from root: one step over the whole buffer; the root sends, the
 * others copy and forward (dep 0), except the root's left neighbour.
 *
 * Buffer safety: a chunk is overwritten by a later recv step only after it
 * went once around the ring, i.e. after this rank's send of it completed.
 *
 * Shared memory (a link whose two ends share a host): the sender's object
 * holds a control block and SHM_SLOTS slots of one chunk each. The sender
 * writes a chunk's header and payload into slot head % SHM_SLOTS and
 * publishes head + 1 (release); the receiver checks the header, reduces or
 * copies straight from the slot into its buffer, and publishes tail + 1.
 * A side with nothing to do sleeps on the other's bell (futex_waitv on
 * both links at once) after saying so in a waiting flag, and a side that
 * moves a counter rings the bell (a futex wake only when the flag is set):
 * the flag is set before the bell is read, the bell is bumped before the
 * flag is read, so no wake-up is lost. The TCP connection stays open:
 * every sleep is at most 20 ms, after which the connections are looked at,
 * and EOF on one (the peer died, or dropped the ring) fails the collective
 * as on TCP.
 *
 * States: CONNECTED -> (collective ok) CONNECTED, -> (any failure) FAILED,
 * which is sticky (r->status, r->err).
 */
#include "worker/sync/wk_ring.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/cm_addr.h"
#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_simd.h"
#include "common/cm_time.h"
#include "worker/sync/wk_ring_int.h"

#define MAX_RANKS 4096 /* Ring steps travel as u16. */
#define ADDR_LEN 128

struct wk_ring_listener {
    int fd, port;
};

enum { MODE_ADD, MODE_ADD_DIV, MODE_COPY };

/* A step's connection: to rank+1, from rank-1, or the halving-doubling
 * link LINK_X + j to rank ^ (2 << j). */
enum { LINK_NEXT = 0, LINK_PREV = 1, LINK_X = 2 };

typedef struct ring_step {
    size_t off, len; /* Floats of the buffer. */
    int link;        /* LINK_*. */
    int dep;         /* Send: the recv step whose range holds it, or -1. */
    int mode;        /* Recv: MODE_*. */
} ring_step;

/* A shared-memory link's control block, at the start of its object. The
 * counters and bells of each side sit on their own cache lines. */
typedef struct shm_ctl {
    uint32_t magic, nslots;
    uint64_t cookie, slot_bytes; /* Slot stride: payload at WK_RING__SLOT_PAYLOAD. */
    char pad0[64 - 24];
    _Atomic uint64_t head;         /* Slots published by the sender. */
    _Atomic uint32_t data_bell;    /* Bumped with head; the receiver sleeps on it... */
    _Atomic uint32_t rx_waiting;   /* ...after setting this. */
    char pad1[64 - 16];
    _Atomic uint64_t tail;         /* Slots released by the receiver. */
    _Atomic uint32_t space_bell;   /* Bumped with tail; the sender sleeps on it... */
    _Atomic uint32_t tx_waiting;   /* ...after setting this. */
    char pad2[64 - 16];
} shm_ctl;
#define SHM_CTL_BYTES 4096
#define SHM_SLOTS 8
#define SHM_MAGIC 0x4d485352u /* "RSHM" */

typedef struct shm_link {
    shm_ctl *c;
    unsigned char *slots;
    size_t stride, nslots, map_len;
    uint64_t pos; /* This side's counter: head (sender) or tail (receiver). */
    char name[WK_RING__SHM_NAME];
    int named; /* The sender still has to unlink the name. */
} shm_link;

struct wk_ring {
    int rank, nranks;
    wk_ring_opts opts;
    size_t chunk_elems;
    int halve_mid;                  /* The default TCP chunk: ring_chunk. */
    int send_fd, recv_fd;           /* To rank+1, from rank-1; -1 if none. */
    shm_link *tx, *rx;              /* Shared-memory links (NULL: TCP). */
    char next_addr[ADDR_LEN];       /* Listening addresses of those peers. */
    char prev_addr[ADDR_LEN];
    int hd;                         /* Halving-doubling links are up... */
    size_t hd_max;                  /* ...and used up to this many bytes. */
    int nx;                         /* Its extra links: xfd[j] to rank ^ (2 << j), */
    int *xfd;                       /* -1 if none, */
    char (*xaddr)[ADDR_LEN];        /* listening at xaddr[j]. */
    float *scratch;                 /* chunk_elems floats. */
    ring_step *sends, *recvs;       /* 2 * nranks each. */
    int status;                     /* CM_OK, or the first failure. */
    char err[512];
};

/* One collective in progress. */
typedef struct run {
    wk_ring *r;
    float *data;
    size_t n;
    int64_t step;
    int op, nsend, nrecv;
    uint32_t arg; /* Carried in every header: average (allreduce), root (broadcast). */
    size_t chunk; /* Floats a chunk: ring_chunk, or the ring's. */
    /* Send side: step, position in it, bytes of the current chunk sent. */
    int sk;
    size_t spos, sbytes;
    unsigned char shdr[WK_RING__HDR_BYTES];
    /* Recv side, likewise. */
    int rk;
    size_t rpos, rbytes;
    unsigned char rhdr[WK_RING__HDR_BYTES];
} run;

void wk_ring_opts_default(wk_ring_opts *o) {
    *o = (wk_ring_opts){.job_id = 0,
                        .timeout_ms = 30000,
                        .connect_timeout_ms = 30000,
                        .chunk_bytes = 0,
                        .sock_buf_bytes = 0,
                        .spin_us = WK_RING_SPIN_US,
                        .transport = WK_RING_TCP,
                        .algorithm = WK_RING_ALG_AUTO};
}

/* ===================================================== wire format */

static void put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const unsigned char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static uint64_t get64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

void wk_ring__hello_pack(const wk_ring__hello *h, unsigned char out[WK_RING__HELLO_BYTES]) {
    put32(out, h->magic);
    put32(out + 4, h->version);
    put64(out + 8, h->job_id);
    put32(out + 16, h->nranks);
    put32(out + 20, h->rank);
}

void wk_ring__hello_unpack(const unsigned char in[WK_RING__HELLO_BYTES], wk_ring__hello *h) {
    h->magic = get32(in);
    h->version = get32(in + 4);
    h->job_id = get64(in + 8);
    h->nranks = get32(in + 16);
    h->rank = get32(in + 20);
}

void wk_ring__offer_pack(const wk_ring__offer *o, unsigned char out[WK_RING__OFFER_BYTES]) {
    memset(out, 0, WK_RING__OFFER_BYTES);
    put32(out, o->magic);
    put32(out + 4, o->want);
    put64(out + 8, o->host);
    put64(out + 16, o->cookie);
    put64(out + 24, o->slot_bytes);
    put32(out + 32, o->nslots);
    memcpy(out + 40, o->name, strnlen(o->name, WK_RING__SHM_NAME - 1));
}

void wk_ring__offer_unpack(const unsigned char in[WK_RING__OFFER_BYTES], wk_ring__offer *o) {
    o->magic = get32(in);
    o->want = get32(in + 4);
    o->host = get64(in + 8);
    o->cookie = get64(in + 16);
    o->slot_bytes = get64(in + 24);
    o->nslots = get32(in + 32);
    memcpy(o->name, in + 40, WK_RING__SHM_NAME);
    o->name[WK_RING__SHM_NAME - 1] = 0;
}

void wk_ring__hdr_pack(const wk_ring__hdr *h, unsigned char out[WK_RING__HDR_BYTES]) {
    put32(out, h->magic);
    put32(out + 4, (uint32_t)h->op | (uint32_t)h->k << 16);
    put64(out + 8, (uint64_t)h->step);
    put64(out + 16, h->count);
    put64(out + 24, h->offset);
    put32(out + 32, h->len);
    put32(out + 36, h->arg);
}

void wk_ring__hdr_unpack(const unsigned char in[WK_RING__HDR_BYTES], wk_ring__hdr *h) {
    uint32_t opk = get32(in + 4);
    h->magic = get32(in);
    h->op = (uint16_t)(opk & 0xffff);
    h->k = (uint16_t)(opk >> 16);
    h->step = (int64_t)get64(in + 8);
    h->count = get64(in + 16);
    h->offset = get64(in + 24);
    h->len = get32(in + 32);
    h->arg = get32(in + 36);
}

/* ===================================================== sockets */

static int ms_left(double deadline) {
    double left = (deadline - cm_now()) * 1e3;
    return left <= 0 ? 0 : left > 1e9 ? 1000000000 : (int)left + 1;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void set_sockopts(int fd, int buf_bytes) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (buf_bytes > 0) {
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf_bytes, sizeof buf_bytes);
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf_bytes, sizeof buf_bytes);
    }
}

/* Split "host:port" or "[v6]:port" (cm_addr_split); resolve it. */
static int resolve(const char *addr, struct addrinfo **res, char *err, size_t errlen) {
    char host[ADDR_LEN], port[8];
    int p = 0;
    const char *why = cm_addr_split(addr, 0, host, sizeof host, &p);
    if (why) {
        cm_seterr(err, errlen, "bad address '%s' (want host:port): %s", addr, why);
        return CM_EINVAL;
    }
    snprintf(port, sizeof port, "%d", p);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int rc = getaddrinfo(host, port, &hints, res);
    if (rc != 0) {
        cm_seterr(err, errlen, "cannot resolve '%s': %s", addr, gai_strerror(rc));
        return CM_EINVAL;
    }
    return CM_OK;
}

int wk_ring_listen(const char *host, int port, wk_ring_listener **out, char *err,
                   size_t errlen) {
    *out = NULL;
    char addr[ADDR_LEN];
    struct addrinfo *ai = NULL;
    int fd = -1, rc;
    if (!host || port < 0 || port > 65535) {
        cm_seterr(err, errlen, "bad listen address");
        return CM_EINVAL;
    }
    /* A bare IPv6 host gets its brackets. */
    int bare6 = strchr(host, ':') && host[0] != '[';
    snprintf(addr, sizeof addr, bare6 ? "[%s]:%d" : "%s:%d", host, port);
    if ((rc = resolve(addr, &ai, err, errlen)) != CM_OK) return rc;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&ss, &sl) != 0) {
        cm_seterr(err, errlen, "cannot listen on %s: %s", addr, strerror(errno));
        rc = CM_EIO;
        goto fail;
    }
    freeaddrinfo(ai);
    wk_ring_listener *l = cm_malloc(sizeof *l);
    l->fd = fd;
    l->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
    *out = l;
    return CM_OK;
fail:
    if (fd >= 0) close(fd);
    freeaddrinfo(ai);
    return rc;
}

int wk_ring_listener_port(const wk_ring_listener *l) { return l->port; }

void wk_ring_listener_destroy(wk_ring_listener *l) {
    if (!l) return;
    close(l->fd);
    free(l);
}

/* Wait for 'events' on fd until the deadline: 1 ready, 0 timed out, <0 error. */
static int wait_fd(int fd, short events, double deadline) {
    for (;;) {
        struct pollfd pf = {.fd = fd, .events = events};
        int p = poll(&pf, 1, ms_left(deadline));
        if (p > 0) return 1;
        if (p == 0) return 0;
        if (errno != EINTR) return -1;
    }
}

/* Blocking-style I/O of exactly len bytes on a non-blocking socket. Returns
 * CM_OK, CM_ETIMEDOUT, or CM_EUNAVAIL (EOF or a socket error; *why says). */
static int io_full(int fd, int writing, void *buf, size_t len, double deadline,
                   const char **why) {
    unsigned char *p = buf;
    *why = "";
    while (len > 0) {
        ssize_t g = writing ? send(fd, p, len, MSG_NOSIGNAL) : recv(fd, p, len, 0);
        if (g > 0) {
            p += g;
            len -= (size_t)g;
        } else if (g == 0) {
            *why = "connection closed";
            return CM_EUNAVAIL;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = wait_fd(fd, writing ? POLLOUT : POLLIN, deadline);
            if (w == 0) return CM_ETIMEDOUT;
            if (w < 0) {
                *why = strerror(errno);
                return CM_EUNAVAIL;
            }
        } else if (errno != EINTR) {
            *why = strerror(errno);
            return CM_EUNAVAIL;
        }
    }
    return CM_OK;
}

/* ===================================================== handshake */

/* Version 4 says a transport negotiation follows the hellos. */
static uint32_t my_version(const wk_ring *r) {
    return r->opts.transport == WK_RING_TCP ? WK_RING__VERSION : WK_RING__VERSION_NEGOTIATE;
}

static void my_hello(const wk_ring *r, unsigned char out[WK_RING__HELLO_BYTES]) {
    wk_ring__hello h = {WK_RING__HELLO_MAGIC, my_version(r), r->opts.job_id,
                        (uint32_t)r->nranks, (uint32_t)r->rank};
    wk_ring__hello_pack(&h, out);
}

/* NULL if h is rank 'want' of this ring's job, else why not (in buf). */
static const char *hello_mismatch(const wk_ring *r, const wk_ring__hello *h, int want,
                                  char *buf, size_t len) {
    if (h->magic != WK_RING__HELLO_MAGIC) {
        snprintf(buf, len, "not a wk_ring peer (magic 0x%08x)", h->magic);
    } else if (h->version != my_version(r)) {
        snprintf(buf, len, "protocol version %u, this rank speaks %u (2, 4: a transport "
                 "other than tcp; 1, 2: a build before 6 Dec 2026; ranks need the same)",
                 h->version, my_version(r));
    } else if (h->job_id != r->opts.job_id || h->nranks != (uint32_t)r->nranks ||
               h->rank != (uint32_t)want) {
        snprintf(buf, len,
                 "peer is rank %u of %u of job %016llx, expected rank %d of %d of job %016llx",
                 h->rank, h->nranks, (unsigned long long)h->job_id, want, r->nranks,
                 (unsigned long long)r->opts.job_id);
    } else {
        return NULL;
    }
    return buf;
}

/* Connect to rank 'peer' at addr (retrying with backoff) and send our
 * hello; *fdp holds the socket as soon as there is one (the caller closes
 * it on failure too). */
static int dial(wk_ring *r, const char *addr, int peer, int *fdp, double deadline, char *err,
                size_t errlen) {
    struct addrinfo *ai = NULL;
    int rc = resolve(addr, &ai, err, errlen);
    if (rc != CM_OK) return rc;
    int backoff = 10, fd = -1;
    const char *last = "no attempt";
    for (;;) {
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            last = strerror(errno);
            break;
        }
        set_sockopts(fd, r->opts.sock_buf_bytes);
        int refused = 0;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        if (errno == EINPROGRESS) {
            int w = wait_fd(fd, POLLOUT, deadline), soerr = 0;
            socklen_t sl = sizeof soerr;
            if (w > 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0)
                break;
            last = w == 0 ? "timed out" : strerror(soerr ? soerr : errno);
            refused = soerr == ECONNREFUSED;
        } else {
            last = strerror(errno);
            refused = errno == ECONNREFUSED;
        }
        close(fd);
        fd = -1;
        if (refused && r->opts.peers_listening) {
            last = "connection refused: its listener is gone (the process died?)";
            break;
        }
        int left = ms_left(deadline);
        if (left <= 0) break;
        sleep_ms(backoff < left ? backoff : left);
        backoff = backoff * 2 > 500 ? 500 : backoff * 2;
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        cm_seterr(err, errlen, "rank %d: cannot connect to rank %d at %s within %d ms: %s",
                  r->rank, peer, addr, r->opts.connect_timeout_ms, last);
        return CM_EUNAVAIL;
    }
    *fdp = fd;
    unsigned char hello[WK_RING__HELLO_BYTES];
    my_hello(r, hello);
    if ((rc = io_full(fd, 1, hello, sizeof hello, deadline, &last)) != CM_OK) {
        cm_seterr(err, errlen, "rank %d: sending the handshake to rank %d at %s: %s", r->rank,
                  peer, addr, rc == CM_ETIMEDOUT ? "timed out" : last);
        return rc;
    }
    return CM_OK;
}

static int connect_next(wk_ring *r, double deadline, char *err, size_t errlen) {
    return dial(r, r->next_addr, (r->rank + 1) % r->nranks, &r->send_fd, deadline, err,
                errlen);
}

/* Accept one connection on l and read its hello: CM_OK with *fdp and
 * *which set if it is rank want[*which] of this job (want[i] < 0: no
 * longer wanted); CM_EAGAIN if it was refused (why in refused). Every hello
 * is answered with ours, so that a refused peer can say whom it met. */
static int accept_from(wk_ring *r, wk_ring_listener *l, const int *want, int nwant,
                       double deadline, int *which, int *fdp, char *refused, size_t rlen) {
    int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return CM_EAGAIN; /* EAGAIN, ECONNABORTED: wait again. */
    set_sockopts(fd, r->opts.sock_buf_bytes);
    unsigned char buf[WK_RING__HELLO_BYTES], mine[WK_RING__HELLO_BYTES];
    const char *why;
    double until = cm_now() + r->opts.timeout_ms * 1e-3;
    int rc = io_full(fd, 0, buf, sizeof buf, until < deadline ? until : deadline, &why);
    if (rc != CM_OK) {
        snprintf(refused, rlen, "a connection sent no handshake (%s)",
                 rc == CM_ETIMEDOUT ? "timed out" : why);
    } else {
        wk_ring__hello h;
        char msg[200];
        wk_ring__hello_unpack(buf, &h);
        my_hello(r, mine);
        (void)io_full(fd, 1, mine, sizeof mine, cm_now() + 1.0, &why);
        int w = -1;
        for (int i = 0; i < nwant; i++)
            if (want[i] >= 0 && (w < 0 || (uint32_t)want[i] == h.rank)) w = i;
        const char *bad = w < 0 ? "no connection is expected"
                                : hello_mismatch(r, &h, want[w], msg, sizeof msg);
        if (!bad) {
            *which = w;
            *fdp = fd;
            return CM_OK;
        }
        snprintf(refused, rlen, "refused a connection: %s", bad);
    }
    cm_warn("rank %d: %s", r->rank, refused);
    close(fd);
    return CM_EAGAIN;
}

/* The previous rank's connection: CM_OK with r->recv_fd set. */
static int accept_one(wk_ring *r, wk_ring_listener *l, double deadline, char *refused,
                      size_t rlen) {
    int prev = (r->rank + r->nranks - 1) % r->nranks, which;
    return accept_from(r, l, &prev, 1, deadline, &which, &r->recv_fd, refused, rlen);
}

/* Read the answer of rank 'peer' (at addr) to the hello we sent on fd. */
static int check_answer(wk_ring *r, int fd, int peer, const char *addr, double deadline,
                        char *err, size_t errlen) {
    unsigned char buf[WK_RING__HELLO_BYTES];
    const char *why;
    int rc = io_full(fd, 0, buf, sizeof buf, deadline, &why);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "rank %d: no handshake from rank %d at %s: %s", r->rank, peer,
                  addr, rc == CM_ETIMEDOUT ? "timed out" : why);
        return rc;
    }
    wk_ring__hello h;
    char msg[200];
    wk_ring__hello_unpack(buf, &h);
    const char *bad = hello_mismatch(r, &h, peer, msg, sizeof msg);
    if (bad) {
        cm_seterr(err, errlen, "rank %d: wrong peer at %s: %s", r->rank, addr, bad);
        return CM_EPROTO;
    }
    return CM_OK;
}

static int check_next(wk_ring *r, double deadline, char *err, size_t errlen) {
    return check_answer(r, r->send_fd, (r->rank + 1) % r->nranks, r->next_addr, deadline, err,
                        errlen);
}

/* After our hello went out: accept the previous rank and read the next
 * rank's answer, whichever comes first, so a wrong peer on either side is
 * reported as soon as it shows. */
static int handshake(wk_ring *r, wk_ring_listener *l, double deadline, char *err,
                     size_t errlen) {
    char refused[256] = "";
    int have_prev = 0, have_next = 0, rc;
    while (!have_prev || !have_next) {
        struct pollfd pf[2];
        int np = 0;
        if (!have_prev) pf[np++] = (struct pollfd){.fd = l->fd, .events = POLLIN};
        /* After its answer, the next rank says nothing more: its connection
         * becoming readable means it closed (it failed, or died). */
        if (!have_next || r->opts.peers_listening)
            pf[np++] = (struct pollfd){.fd = r->send_fd, .events = POLLIN | POLLRDHUP};
        int p = poll(pf, (nfds_t)np, ms_left(deadline));
        if (p < 0 && errno == EINTR) continue;
        if (p <= 0) break;
        for (int i = 0; i < np; i++) {
            if (!pf[i].revents) continue;
            if (pf[i].fd == r->send_fd && have_next) {
                cm_seterr(err, errlen, "rank %d: rank %d (%s) closed its connection while the "
                          "ring formed", r->rank, (r->rank + 1) % r->nranks, r->next_addr);
                return CM_EUNAVAIL;
            }
            if (pf[i].fd == r->send_fd) {
                if ((rc = check_next(r, deadline, err, errlen)) != CM_OK) return rc;
                have_next = 1;
            } else if (accept_one(r, l, deadline, refused, sizeof refused) == CM_OK) {
                have_prev = 1;
            }
        }
    }
    if (have_prev && have_next) return CM_OK;
    if (!have_prev) {
        cm_seterr(err, errlen, "rank %d: rank %d (%s) did not connect within %d ms%s%s",
                  r->rank, (r->rank + r->nranks - 1) % r->nranks, r->prev_addr,
                  r->opts.connect_timeout_ms, refused[0] ? "; last: " : "", refused);
    } else {
        cm_seterr(err, errlen, "rank %d: no handshake from rank %d at %s within %d ms",
                  r->rank, (r->rank + 1) % r->nranks, r->next_addr, r->opts.connect_timeout_ms);
    }
    return CM_ETIMEDOUT;
}

/* ===================================================== shared memory */

static void shm_destroy(shm_link *L) {
    if (!L) return;
    if (L->c) munmap(L->c, L->map_len);
    if (L->named) shm_unlink(L->name);
    free(L);
}

static size_t shm_stride(size_t chunk_elems) {
    size_t b = WK_RING__SLOT_PAYLOAD + chunk_elems * sizeof(float);
    return (b + 63) & ~(size_t)63;
}

/* Which host and shared-memory mount this process sees: ranks with the same
 * value can open each other's POSIX shared-memory objects. 0: unknown. */
static uint64_t host_id(void) {
    char boot[64] = "";
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(boot, sizeof boot, f)) boot[0] = 0;
        fclose(f);
    }
    struct stat st;
    if (!boot[0] || stat("/dev/shm", &st) != 0) return 0;
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (const char *p = boot; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ull;
    uint64_t ids[2] = {(uint64_t)st.st_dev, (uint64_t)st.st_ino};
    const unsigned char *b = (const unsigned char *)ids;
    for (size_t i = 0; i < sizeof ids; i++) h = (h ^ b[i]) * 1099511628211ull;
    return h ? h : 1;
}

/* The sender's end: a new object of SHM_SLOTS chunk slots, mapped, named. */
static int shm_create(const wk_ring *r, shm_link **out, char *why, size_t wlen) {
    *out = NULL;
    shm_link *L = cm_calloc(1, sizeof *L);
    L->nslots = SHM_SLOTS;
    L->stride = shm_stride(r->chunk_elems);
    L->map_len = SHM_CTL_BYTES + L->nslots * L->stride;
    uint64_t cookie = 0;
    if (getrandom(&cookie, sizeof cookie, 0) != (ssize_t)sizeof cookie)
        cookie = (uint64_t)cm_now() * 1000003u ^ (uint64_t)getpid();
    snprintf(L->name, sizeof L->name, "/pstrain-ring-%d-%08x", (int)getpid(),
             (unsigned)(cookie >> 32));
    int fd = shm_open(L->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(why, wlen, "shm_open %s: %s", L->name, strerror(errno));
        free(L);
        return CM_EIO;
    }
    L->named = 1;
    void *m = MAP_FAILED;
    if (ftruncate(fd, (off_t)L->map_len) == 0)
        m = mmap(NULL, L->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) snprintf(why, wlen, "%zu bytes of %s: %s", L->map_len, L->name,
                                  strerror(errno));
    close(fd);
    if (m == MAP_FAILED) {
        shm_destroy(L);
        return CM_EIO;
    }
    L->c = m;
    L->slots = (unsigned char *)m + SHM_CTL_BYTES;
    L->c->nslots = (uint32_t)L->nslots;
    L->c->cookie = cookie;
    L->c->slot_bytes = L->stride;
    L->c->magic = SHM_MAGIC;
    *out = L;
    return CM_OK;
}

/* The receiver's end: map the object the sender offered, if it is that one
 * and its slots hold this rank's chunks. */
static int shm_open_offer(const wk_ring *r, const char *name, uint64_t cookie, uint64_t stride,
                          uint32_t nslots, shm_link **out, char *why, size_t wlen) {
    *out = NULL;
    if (stride != shm_stride(r->chunk_elems) || nslots == 0 || nslots > 1024) {
        snprintf(why, wlen, "slots of %llu bytes, this rank's chunks need %zu",
                 (unsigned long long)stride, shm_stride(r->chunk_elems));
        return CM_EINVAL;
    }
    size_t len = SHM_CTL_BYTES + (size_t)nslots * stride;
    int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, wlen, "shm_open %s: %s", name, strerror(errno));
        return CM_EIO;
    }
    struct stat st;
    void *m = MAP_FAILED;
    if (fstat(fd, &st) == 0 && (size_t)st.st_size == len)
        m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    shm_ctl *c = m;
    if (m == MAP_FAILED || c->magic != SHM_MAGIC || c->cookie != cookie ||
        c->slot_bytes != stride || c->nslots != nslots) {
        snprintf(why, wlen, "%s is not the object offered", name);
        if (m != MAP_FAILED) munmap(m, len);
        return CM_EPROTO;
    }
    shm_link *L = cm_calloc(1, sizeof *L);
    L->c = c;
    L->slots = (unsigned char *)m + SHM_CTL_BYTES;
    L->nslots = nslots;
    L->stride = stride;
    L->map_len = len;
    *out = L;
    return CM_OK;
}

/* Version 2, after the hellos: offer the next rank a shared-memory link
 * and answer the previous rank's offer (see wk_ring_int.h). Every rank
 * writes its offer before it reads, so the ring cannot deadlock. */
static int negotiate(wk_ring *r, double deadline, char *err, size_t errlen) {
    int next = (r->rank + 1) % r->nranks, prev = (r->rank + r->nranks - 1) % r->nranks;
    uint64_t host = host_id();
    char why_tx[256] = "", why_rx[256] = "";
    shm_link *mine = NULL;
    if (!host)
        snprintf(why_tx, sizeof why_tx, "no boot id or /dev/shm here");
    else
        (void)shm_create(r, &mine, why_tx, sizeof why_tx);
    wk_ring__offer mo = {.magic = WK_RING__OFFER_MAGIC, .want = mine != NULL, .host = host};
    if (mine) {
        mo.cookie = mine->c->cookie;
        mo.slot_bytes = mine->stride;
        mo.nslots = (uint32_t)mine->nslots;
        memcpy(mo.name, mine->name, sizeof mo.name);
    }
    unsigned char o[WK_RING__OFFER_BYTES];
    wk_ring__offer_pack(&mo, o);
    const char *io_why = "";
    int rc = io_full(r->send_fd, 1, o, sizeof o, deadline, &io_why);
    unsigned char in[WK_RING__OFFER_BYTES];
    if (rc == CM_OK) rc = io_full(r->recv_fd, 0, in, sizeof in, deadline, &io_why);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "rank %d: transport negotiation with its neighbours: %s",
                  r->rank, rc == CM_ETIMEDOUT ? "timed out" : io_why);
        shm_destroy(mine);
        return rc;
    }
    wk_ring__offer po;
    wk_ring__offer_unpack(in, &po);
    if (po.magic != WK_RING__OFFER_MAGIC) {
        cm_seterr(err, errlen, "rank %d: rank %d (%s) sent no transport offer (magic 0x%08x)",
                  r->rank, prev, r->prev_addr, po.magic);
        shm_destroy(mine);
        return CM_EPROTO;
    }
    if (!po.want)
        snprintf(why_rx, sizeof why_rx, "it offered none");
    else if (!host || po.host != host)
        snprintf(why_rx, sizeof why_rx, "another host or /dev/shm");
    else
        (void)shm_open_offer(r, po.name, po.cookie, po.slot_bytes, po.nslots, &r->rx, why_rx,
                             sizeof why_rx);
    unsigned char a[WK_RING__ANSWER_BYTES], b[WK_RING__ANSWER_BYTES];
    uint32_t amagic = WK_RING__ANSWER_MAGIC, use = r->rx != NULL;
    memcpy(a, &amagic, 4);
    memcpy(a + 4, &use, 4);
    rc = io_full(r->recv_fd, 1, a, sizeof a, deadline, &io_why);
    if (rc == CM_OK) rc = io_full(r->send_fd, 0, b, sizeof b, deadline, &io_why);
    if (mine) { /* Both ends have it mapped now, or never will. */
        shm_unlink(mine->name);
        mine->named = 0;
    }
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "rank %d: transport negotiation with its neighbours: %s",
                  r->rank, rc == CM_ETIMEDOUT ? "timed out" : io_why);
        shm_destroy(mine);
        return rc;
    }
    uint32_t bmagic, buse;
    memcpy(&bmagic, b, 4);
    memcpy(&buse, b + 4, 4);
    if (bmagic != WK_RING__ANSWER_MAGIC) {
        cm_seterr(err, errlen, "rank %d: rank %d (%s) sent no transport answer (magic 0x%08x)",
                  r->rank, next, r->next_addr, bmagic);
        shm_destroy(mine);
        return CM_EPROTO;
    }
    if (buse && mine)
        r->tx = mine;
    else {
        if (mine) snprintf(why_tx, sizeof why_tx, "rank %d could not map it", next);
        shm_destroy(mine);
    }
    if (r->opts.transport == WK_RING_SHM && (!r->tx || !r->rx)) {
        cm_seterr(err, errlen, "rank %d: shared memory with rank %d (%s) is not possible: %s",
                  r->rank, r->tx ? prev : next, r->tx ? r->prev_addr : r->next_addr,
                  r->tx ? why_rx : why_tx);
        return CM_EUNSUPPORTED;
    }
    if (!r->tx && mo.want)
        cm_debug("rank %d: TCP to rank %d: %s", r->rank, next, why_tx);
    return CM_OK;
}

/* ===================================================== halving-doubling links */

static const char *alg_name(int alg) {
    return alg == WK_RING_ALG_HD ? "halving-doubling" : alg == WK_RING_ALG_AUTO ? "auto" : "ring";
}

static int is_pow2(int n) { return n > 0 && (n & (n - 1)) == 0; }

/* Settle the algorithm with every rank: a small allreduce over the ring in
 * which rank i fills slot i with 1 + its algorithm * 2 + 8 if it has a
 * shared-memory link. Every rank then sees the same slots and makes the
 * same choice; having every rank's slot also says that every rank is done
 * forming the ring (its listener takes no ring connection any more). */
static int settle_algorithm(wk_ring *r, double deadline, char *err, size_t errlen) {
    int N = r->nranks;
    float *slot = cm_calloc((size_t)N, sizeof *slot);
    slot[r->rank] = (float)(1 + r->opts.algorithm * 2 + (r->tx || r->rx ? 8 : 0));
    int saved = r->opts.timeout_ms, left = ms_left(deadline);
    r->opts.timeout_ms = left > 0 ? left : 1;
    int rc = wk_ring_allreduce(r, slot, (size_t)N, -1, 0);
    r->opts.timeout_ms = saved;
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "agreeing on the allreduce algorithm: %s", r->err);
        free(slot);
        return rc;
    }
    int all_auto = 1, all_hd = 1, shm = 0;
    for (int i = 0; i < N; i++) {
        int v = (int)slot[i], alg = (v >> 1) & 3;
        if (v < 1 || v > 15 || alg > WK_RING_ALG_HD) {
            cm_seterr(err, errlen, "rank %d: agreeing on the allreduce algorithm: rank %d sent "
                      "%g", r->rank, i, (double)slot[i]);
            free(slot);
            return r->status = CM_EPROTO;
        }
        if (alg != r->opts.algorithm &&
            (alg == WK_RING_ALG_HD || r->opts.algorithm == WK_RING_ALG_HD)) {
            cm_seterr(err, errlen, "rank %d asks for the %s algorithm, rank %d for %s: every "
                      "rank must ask for halving-doubling, or none", r->rank,
                      alg_name(r->opts.algorithm), i, alg_name(alg));
            free(slot);
            return r->status = CM_EINVAL;
        }
        all_auto &= alg == WK_RING_ALG_AUTO;
        all_hd &= alg == WK_RING_ALG_HD;
        shm |= (v & 8) != 0;
    }
    free(slot);
    r->hd = all_hd || (all_auto && !shm);
    r->hd_max = all_hd ? SIZE_MAX : WK_RING_HD_MAX;
    return CM_OK;
}

/* Connect to the halving-doubling partners r^d above this rank and accept
 * those below it (d = 2, 4, ... N/2; d = 1 is a ring neighbour). Dials
 * first: a connection waits in the partner's listen queue, and the hello
 * in its socket buffer, until the partner accepts, so no rank waits on
 * another's order. */
static int connect_partners(wk_ring *r, wk_ring_listener *l, const char *const *addrs,
                            double deadline, char *err, size_t errlen) {
    int N = r->nranks, nx = 0;
    while ((2 << nx) < N) nx++;
    r->nx = nx;
    r->xfd = cm_malloc((size_t)nx * sizeof *r->xfd);
    for (int j = 0; j < nx; j++) r->xfd[j] = -1; /* Before any exit: destroy closes them. */
    r->xaddr = cm_calloc((size_t)nx, sizeof *r->xaddr);
    int *want = cm_malloc((size_t)nx * sizeof *want), pending = 0, rc = CM_OK;
    for (int j = 0; j < nx; j++) {
        int p = r->rank ^ (2 << j);
        want[j] = p < r->rank ? p : -1;
        pending += p < r->rank;
        if (!addrs[p] || strlen(addrs[p]) >= ADDR_LEN) {
            cm_seterr(err, errlen, "wk_ring_connect: missing or overlong address of rank %d", p);
            rc = CM_EINVAL;
            goto out;
        }
        strcpy(r->xaddr[j], addrs[p]);
    }
    for (int j = 0; j < nx; j++)
        if (want[j] < 0 &&
            (rc = dial(r, r->xaddr[j], r->rank ^ (2 << j), &r->xfd[j], deadline, err,
                       errlen)) != CM_OK)
            goto out;
    char refused[256] = "";
    while (pending > 0) {
        int w = wait_fd(l->fd, POLLIN, deadline), which, fd;
        if (w <= 0) {
            int missing = 0;
            for (int j = 0; j < nx; j++)
                if (want[j] >= 0) missing = want[j];
            cm_seterr(err, errlen, "rank %d: rank %d (%s) did not connect its halving-doubling "
                      "link within %d ms%s%s", r->rank, missing,
                      addrs[missing], r->opts.connect_timeout_ms, refused[0] ? "; last: " : "",
                      refused);
            rc = CM_ETIMEDOUT;
            goto out;
        }
        if (accept_from(r, l, want, nx, deadline, &which, &fd, refused, sizeof refused) ==
            CM_OK) {
            r->xfd[which] = fd;
            want[which] = -1;
            pending--;
        }
    }
    for (int j = 0; j < nx; j++)
        if ((r->rank ^ (2 << j)) > r->rank &&
            (rc = check_answer(r, r->xfd[j], r->rank ^ (2 << j), r->xaddr[j], deadline, err,
                               errlen)) != CM_OK)
            goto out;
out:
    free(want);
    return rc;
}

int wk_ring_connect(wk_ring_listener *l, int rank, int nranks, const char *const *addrs,
                    const wk_ring_opts *opts, wk_ring **out, char *err, size_t errlen) {
    *out = NULL;
    wk_ring_opts o;
    if (opts) {
        o = *opts;
    } else {
        wk_ring_opts_default(&o);
    }
    if (nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks ||
        (nranks > 1 && (!l || !addrs)) || o.timeout_ms <= 0 || o.connect_timeout_ms <= 0 ||
        o.chunk_bytes > (1u << 30) || o.sock_buf_bytes < 0 || o.spin_us < 0 ||
        o.transport < WK_RING_TCP || o.transport > WK_RING_SHM ||
        o.algorithm < WK_RING_ALG_RING || o.algorithm > WK_RING_ALG_HD) {
        cm_seterr(err, errlen, "wk_ring_connect: bad arguments (rank %d of %d)", rank, nranks);
        return CM_EINVAL;
    }
    if (o.algorithm == WK_RING_ALG_HD && nranks > 1 &&
        (!is_pow2(nranks) || nranks < 4 || o.transport != WK_RING_TCP)) {
        cm_seterr(err, errlen, "wk_ring_connect: the halving-doubling algorithm needs 4, 8, 16 "
                  "... ranks (not %d) over TCP (transport tcp)", nranks);
        return CM_EINVAL;
    }
    int rc = CM_OK;
    wk_ring *r = cm_calloc(1, sizeof *r);
    r->rank = rank;
    r->nranks = nranks;
    r->opts = o;
    r->send_fd = r->recv_fd = -1;
    r->halve_mid = o.chunk_bytes == 0 && o.transport == WK_RING_TCP;
    if (o.chunk_bytes == 0)
        o.chunk_bytes = o.transport == WK_RING_TCP ? WK_RING_TCP_CHUNK : WK_RING_SHM_CHUNK;
    r->opts.chunk_bytes = o.chunk_bytes;
    r->chunk_elems = o.chunk_bytes / sizeof(float) ? o.chunk_bytes / sizeof(float) : 1;
    r->sends = cm_calloc(2 * (size_t)nranks, sizeof *r->sends);
    r->recvs = cm_calloc(2 * (size_t)nranks, sizeof *r->recvs);
    if (nranks > 1) {
        int next = (rank + 1) % nranks, prev = (rank + nranks - 1) % nranks;
        if (!addrs[next] || !addrs[prev] || strlen(addrs[next]) >= ADDR_LEN ||
            strlen(addrs[prev]) >= ADDR_LEN) {
            cm_seterr(err, errlen, "wk_ring_connect: missing or overlong address");
            rc = CM_EINVAL;
            goto fail;
        }
        strcpy(r->next_addr, addrs[next]);
        strcpy(r->prev_addr, addrs[prev]);
        r->scratch = cm_alloc_aligned(r->chunk_elems * sizeof(float));
        if (!r->scratch) {
            cm_seterr(err, errlen, "wk_ring_connect: no memory for a %zu-byte chunk",
                      r->chunk_elems * sizeof(float));
            rc = CM_ENOMEM;
            goto fail;
        }
        /* Sending our hello never waits for the peer, so every rank gets to
         * accept its previous rank and the ring cannot deadlock here. */
        double deadline = cm_now() + o.connect_timeout_ms * 1e-3;
        if ((rc = connect_next(r, deadline, err, errlen)) != CM_OK ||
            (rc = handshake(r, l, deadline, err, errlen)) != CM_OK)
            goto fail;
        if (o.transport != WK_RING_TCP && (rc = negotiate(r, deadline, err, errlen)) != CM_OK)
            goto fail;
        if (nranks >= 4 && is_pow2(nranks)) {
            if ((rc = settle_algorithm(r, deadline, err, errlen)) != CM_OK) goto fail;
            if (r->hd && (rc = connect_partners(r, l, addrs, deadline, err, errlen)) != CM_OK)
                goto fail;
        }
    }
    *out = r;
    return CM_OK;
fail:
    wk_ring_destroy(r);
    return rc;
}

/* ===================================================== collectives */

static int fail(wk_ring *r, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(wk_ring *r, int status, const char *fmt, ...) {
    va_list ap;
    int n = snprintf(r->err, sizeof r->err, "rank %d: ", r->rank);
    va_start(ap, fmt);
    vsnprintf(r->err + n, sizeof r->err - (size_t)n, fmt, ap);
    va_end(ap);
    r->status = status;
    return status;
}

static const char *op_name(int op) {
    return op == WK_RING__OP_ALLREDUCE ? "allreduce" : op == WK_RING__OP_BROADCAST ? "broadcast"
                                                                                : "unknown op";
}

static const char *arg_name(int op) { return op == WK_RING__OP_BROADCAST ? "root" : "average"; }

static int prev_rank(const wk_ring *r) { return (r->rank + r->nranks - 1) % r->nranks; }
static int next_rank(const wk_ring *r) { return (r->rank + 1) % r->nranks; }

static int link_fd(const wk_ring *r, int link) {
    return link == LINK_NEXT ? r->send_fd : link == LINK_PREV ? r->recv_fd : r->xfd[link - LINK_X];
}

static int link_rank(const wk_ring *r, int link) {
    return link == LINK_NEXT ? next_rank(r) : link == LINK_PREV ? prev_rank(r)
                                                                : r->rank ^ (2 << (link - LINK_X));
}

static const char *link_addr(const wk_ring *r, int link) {
    return link == LINK_NEXT ? r->next_addr : link == LINK_PREV ? r->prev_addr
                                                                : r->xaddr[link - LINK_X];
}

static size_t chunk_len(const run *x, const ring_step *s, size_t pos) {
    size_t left = s->len - pos;
    return left < x->chunk ? left : x->chunk;
}

/* Vectorisable at -O3 (restrict, no aliasing); AVX2 where the CPU has it. */
CM_SIMD_CLONES static void add_into(float *restrict dst, const float *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

CM_SIMD_CLONES static void add_div_into(float *restrict dst, const float *restrict src, size_t n, float d) {
    for (size_t i = 0; i < n; i++) dst[i] = (dst[i] + src[i]) / d;
}

static void skip_empty(const ring_step *steps, int nsteps, int *k, size_t *pos) {
    while (*k < nsteps && *pos == steps[*k].len) {
        (*k)++;
        *pos = 0;
    }
}

/* May chunk (sk, spos) go? Its data must have been received: a recv step
 * fills its range in order, and a send step's range lies inside that of
 * the recv step it depends on. */
static int send_ready(const run *x, size_t clen) {
    const ring_step *s = &x->r->sends[x->sk];
    int dep = s->dep;
    return dep < 0 || x->rk > dep ||
           (x->rk == dep && x->r->recvs[dep].off + x->rpos >= s->off + x->spos + clen);
}

/* The rest of a chunk (header, then payload) after 'done' bytes of it. */
static void chunk_msg(struct msghdr *mh, struct iovec iov[2], unsigned char *hdr, size_t done,
                      void *payload, size_t plen) {
    int niov = 0;
    if (done < WK_RING__HDR_BYTES) {
        iov[niov++] = (struct iovec){hdr + done, WK_RING__HDR_BYTES - done};
        iov[niov++] = (struct iovec){payload, plen};
    } else {
        iov[niov++] = (struct iovec){(char *)payload + (done - WK_RING__HDR_BYTES),
                                     plen - (done - WK_RING__HDR_BYTES)};
    }
    *mh = (struct msghdr){.msg_iov = iov, .msg_iovlen = (size_t)niov};
}

/* Wake the other side if it said it sleeps (see the design note). */
static void ring_bell(_Atomic uint32_t *bell, _Atomic uint32_t *waiting) {
    atomic_fetch_add(bell, 1);
    if (atomic_load(waiting))
        syscall(SYS_futex, (uint32_t *)bell, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* Shared memory: every ready chunk that has a free slot goes in. */
static int pump_send_shm(run *x, int *progress) {
    wk_ring *r = x->r;
    shm_link *L = r->tx;
    for (;;) {
        skip_empty(r->sends, x->nsend, &x->sk, &x->spos);
        if (x->sk == x->nsend) return CM_OK;
        const ring_step *s = &r->sends[x->sk];
        size_t clen = chunk_len(x, s, x->spos), plen = clen * sizeof(float);
        if (!send_ready(x, clen)) return CM_OK;
        if (L->pos - atomic_load_explicit(&L->c->tail, memory_order_acquire) >= L->nslots)
            return CM_OK;
        unsigned char *slot = L->slots + (L->pos % L->nslots) * L->stride;
        wk_ring__hdr h = {WK_RING__CHUNK_MAGIC, (uint16_t)x->op, (uint16_t)x->sk,
                          x->step, x->n, s->off + x->spos, (uint32_t)plen, x->arg};
        wk_ring__hdr_pack(&h, slot);
        memcpy(slot + WK_RING__SLOT_PAYLOAD, x->data + s->off + x->spos, plen);
        atomic_store_explicit(&L->c->head, ++L->pos, memory_order_release);
        ring_bell(&L->c->data_bell, &L->c->rx_waiting);
        *progress = 1;
        x->spos += clen;
    }
}

static int pump_send(run *x, int *progress) {
    wk_ring *r = x->r;
    if (r->tx) return pump_send_shm(x, progress);
    for (;;) {
        skip_empty(r->sends, x->nsend, &x->sk, &x->spos);
        if (x->sk == x->nsend) return CM_OK;
        const ring_step *s = &r->sends[x->sk];
        size_t clen = chunk_len(x, s, x->spos), plen = clen * sizeof(float);
        if (x->sbytes == 0) {
            if (!send_ready(x, clen)) return CM_OK;
            wk_ring__hdr h = {WK_RING__CHUNK_MAGIC, (uint16_t)x->op, (uint16_t)x->sk,
                              x->step, x->n, s->off + x->spos, (uint32_t)plen, x->arg};
            wk_ring__hdr_pack(&h, x->shdr);
        }
        struct iovec iov[2];
        struct msghdr mh;
        chunk_msg(&mh, iov, x->shdr, x->sbytes, x->data + s->off + x->spos, plen);
        ssize_t w = sendmsg(link_fd(r, s->link), &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return CM_OK;
            if (errno == EINTR) continue;
            return fail(r, CM_EUNAVAIL, "sending to rank %d (%s): %s", link_rank(r, s->link),
                        link_addr(r, s->link), strerror(errno));
        }
        *progress = 1;
        x->sbytes += (size_t)w;
        if (x->sbytes == WK_RING__HDR_BYTES + plen) {
            x->sbytes = 0;
            x->spos += clen;
        }
    }
}

static int check_hdr(run *x, const ring_step *s, size_t clen) {
    wk_ring *r = x->r;
    int from = link_rank(r, s->link);
    const char *from_addr = link_addr(r, s->link);
    wk_ring__hdr h;
    wk_ring__hdr_unpack(x->rhdr, &h);
    const char *what = NULL;
    if (h.magic != WK_RING__CHUNK_MAGIC) {
        what = "not a chunk header";
    } else if (h.op != x->op || h.arg != x->arg) {
        return fail(r, CM_EPROTO, "rank %d (%s) sent a chunk of %s (%s %u) during %s (%s %u)",
                    from, from_addr, op_name(h.op), arg_name(h.op), h.arg,
                    op_name(x->op), arg_name(x->op), x->arg);
    } else if (h.step != x->step) {
        return fail(r, CM_EPROTO, "rank %d (%s) sent a chunk of step %lld during step %lld",
                    from, from_addr, (long long)h.step, (long long)x->step);
    } else if (h.count != x->n) {
        return fail(r, CM_EPROTO, "rank %d (%s) reduces %llu floats, this rank %zu",
                    from, from_addr, (unsigned long long)h.count, x->n);
    } else if (h.k != x->rk || h.offset != s->off + x->rpos) {
        what = "unexpected ring step or offset";
    } else if (h.len != clen * sizeof(float)) {
        what = "wrong length";
    }
    if (!what) return CM_OK;
    return fail(r, CM_EPROTO,
                "bad chunk from rank %d (%s) in %s step %lld: %s (magic 0x%08x, ring step %u, "
                "offset %llu, length %u; expected ring step %d, offset %zu, length %zu)",
                from, from_addr, op_name(x->op), (long long)x->step, what, h.magic,
                h.k, (unsigned long long)h.offset, h.len, x->rk, s->off + x->rpos,
                clen * sizeof(float));
}

/* Shared memory: every published chunk is checked and reduced (or copied)
 * straight from its slot, which is then released. */
static int pump_recv_shm(run *x, int *progress) {
    wk_ring *r = x->r;
    shm_link *L = r->rx;
    for (;;) {
        skip_empty(r->recvs, x->nrecv, &x->rk, &x->rpos);
        if (x->rk == x->nrecv) return CM_OK;
        if (atomic_load_explicit(&L->c->head, memory_order_acquire) == L->pos) return CM_OK;
        const ring_step *s = &r->recvs[x->rk];
        size_t clen = chunk_len(x, s, x->rpos);
        const unsigned char *slot = L->slots + (L->pos % L->nslots) * L->stride;
        memcpy(x->rhdr, slot, WK_RING__HDR_BYTES);
        int rc = check_hdr(x, s, clen);
        if (rc != CM_OK) return rc;
        float *dst = x->data + s->off + x->rpos;
        const float *src = (const float *)(const void *)(slot + WK_RING__SLOT_PAYLOAD);
        if (s->mode == MODE_ADD) add_into(dst, src, clen);
        if (s->mode == MODE_ADD_DIV) add_div_into(dst, src, clen, (float)r->nranks);
        if (s->mode == MODE_COPY) memcpy(dst, src, clen * sizeof(float));
        atomic_store_explicit(&L->c->tail, ++L->pos, memory_order_release);
        ring_bell(&L->c->space_bell, &L->c->tx_waiting);
        *progress = 1;
        x->rpos += clen;
    }
}

static int pump_recv(run *x, int *progress) {
    wk_ring *r = x->r;
    if (r->rx) return pump_recv_shm(x, progress);
    for (;;) {
        skip_empty(r->recvs, x->nrecv, &x->rk, &x->rpos);
        if (x->rk == x->nrecv) return CM_OK;
        const ring_step *s = &r->recvs[x->rk];
        size_t clen = chunk_len(x, s, x->rpos), plen = clen * sizeof(float);
        float *dst = x->data + s->off + x->rpos;
        struct iovec iov[2];
        struct msghdr mh;
        chunk_msg(&mh, iov, x->rhdr, x->rbytes, s->mode == MODE_COPY ? dst : r->scratch, plen);
        ssize_t g = recvmsg(link_fd(r, s->link), &mh, MSG_DONTWAIT);
        if (g == 0)
            return fail(r, CM_EUNAVAIL, "rank %d (%s) closed the connection during %s step %lld",
                        link_rank(r, s->link), link_addr(r, s->link), op_name(x->op),
                        (long long)x->step);
        if (g < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return CM_OK;
            if (errno == EINTR) continue;
            return fail(r, CM_EUNAVAIL, "receiving from rank %d (%s): %s",
                        link_rank(r, s->link), link_addr(r, s->link), strerror(errno));
        }
        *progress = 1;
        size_t before = x->rbytes;
        x->rbytes += (size_t)g;
        if (before < WK_RING__HDR_BYTES && x->rbytes >= WK_RING__HDR_BYTES) {
            int rc = check_hdr(x, s, clen);
            if (rc != CM_OK) return rc;
        }
        if (x->rbytes == WK_RING__HDR_BYTES + plen) {
            if (s->mode == MODE_ADD) add_into(dst, r->scratch, clen);
            if (s->mode == MODE_ADD_DIV) add_div_into(dst, r->scratch, clen, (float)r->nranks);
            x->rbytes = 0;
            x->rpos += clen;
        }
    }
}

/* Nothing moved for opts.timeout_ms: name the neighbour waited for. */
static int stalled(run *x, int recv_done) {
    wk_ring *r = x->r;
    if (!recv_done) {
        int k = r->recvs[x->rk].link;
        return fail(r, CM_ETIMEDOUT, "no data from rank %d (%s) for %d ms in %s step %lld",
                    link_rank(r, k), link_addr(r, k), r->opts.timeout_ms, op_name(x->op),
                    (long long)x->step);
    }
    int k = r->sends[x->sk].link;
    return fail(r, CM_ETIMEDOUT, "rank %d (%s) took no data for %d ms in %s step %lld",
                link_rank(r, k), link_addr(r, k), r->opts.timeout_ms, op_name(x->op),
                (long long)x->step);
}

/* Nothing moved and a link is shared memory: sleep on the bells of the
 * links that can unblock this rank (data in, a free slot out) for at most
 * 20 ms (1 ms while a TCP link also waits), then look at the connections:
 * data or room on a TCP link, and EOF (or any byte) on a shared-memory
 * link's connection, whose peer then died or dropped the ring. */
static int shm_wait(run *x, int recv_done, int send_done, int want_out) {
    wk_ring *r = x->r;
    struct futex_waitv w[2];
    int n = 0, ready = 0;
    int tcp_waits = (!recv_done && !r->rx) || (want_out && !r->tx);
    if (!recv_done && r->rx) {
        shm_ctl *c = r->rx->c;
        uint32_t b = atomic_load(&c->data_bell);
        atomic_store(&c->rx_waiting, 1);
        if (atomic_load(&c->head) != r->rx->pos) ready = 1;
        w[n++] = (struct futex_waitv){.val = b, .uaddr = (uintptr_t)&c->data_bell,
                                      .flags = FUTEX_32};
    }
    if (want_out && r->tx) {
        shm_ctl *c = r->tx->c;
        uint32_t b = atomic_load(&c->space_bell);
        atomic_store(&c->tx_waiting, 1);
        if (r->tx->pos - atomic_load(&c->tail) < r->tx->nslots) ready = 1;
        w[n++] = (struct futex_waitv){.val = b, .uaddr = (uintptr_t)&c->space_bell,
                                      .flags = FUTEX_32};
    }
    int wait_ms = tcp_waits ? 1 : 20;
    if (n && !ready) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += (long)wait_ms * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        if (syscall(SYS_futex_waitv, w, n, 0, &ts, CLOCK_MONOTONIC) < 0 && errno == ENOSYS)
            usleep(100); /* A kernel before 5.16: look again soon. */
    }
    if (r->rx) atomic_store(&r->rx->c->rx_waiting, 0);
    if (r->tx) atomic_store(&r->tx->c->tx_waiting, 0);
    /* A neighbour that finished its part may close its end: the previous
     * rank once it sent everything (its last chunks may still be in the
     * slots: they are taken first), the next one only once it took all this
     * rank sends. So an EOF counts while this side still waits for data
     * that is not there, or still has chunks to send. */
    struct pollfd pf[2];
    int np = 0;
    if (!recv_done)
        pf[np++] = (struct pollfd){.fd = r->recv_fd,
                                   .events = r->rx ? POLLIN | POLLRDHUP : POLLIN};
    if ((r->tx && !send_done) || (!r->tx && want_out))
        pf[np++] = (struct pollfd){.fd = r->send_fd,
                                   .events = r->tx ? POLLIN | POLLRDHUP : POLLOUT};
    int p = poll(pf, (nfds_t)np, n ? 0 : wait_ms);
    if (p < 0 && errno != EINTR) return fail(r, CM_EIO, "poll: %s", strerror(errno));
    for (int i = 0; p > 0 && i < np; i++) {
        int rx = pf[i].fd == r->recv_fd;
        if (!pf[i].revents || !(rx ? r->rx : r->tx)) continue;
        if (rx && atomic_load(&r->rx->c->head) != r->rx->pos) continue; /* Take those first. */
        return fail(r, CM_EUNAVAIL, "rank %d (%s) closed the connection during %s step %lld",
                    rx ? prev_rank(r) : next_rank(r), rx ? r->prev_addr : r->next_addr,
                    op_name(x->op), (long long)x->step);
    }
    return CM_OK;
}

/* Run the plan in r->sends / r->recvs until both sides are done. */
static int run_plan(run *x) {
    wk_ring *r = x->r;
    double spin = r->opts.spin_us * 1e-6, last = spin > 0 ? cm_now() : 0;
    double moved = (r->tx || r->rx) ? cm_now() : 0;
    for (;;) {
        int progress = 0, rc;
        if ((rc = pump_recv(x, &progress)) != CM_OK || (rc = pump_send(x, &progress)) != CM_OK)
            return rc;
        int recv_done = x->rk == x->nrecv, send_done = x->sk == x->nsend;
        if (recv_done && send_done) return CM_OK;
        if (progress) {
            if (spin > 0) last = cm_now();
            if (moved > 0) moved = cm_now();
            continue;
        }
        if (spin > 0 && cm_now() - last < spin) {
            sched_yield(); /* A rank sharing this core runs now, not at our wake-up. */
            continue;
        }
        if (r->tx || r->rx) {
            int want_out = !send_done && send_ready(x, chunk_len(x, &r->sends[x->sk], x->spos));
            if ((rc = shm_wait(x, recv_done, send_done, want_out)) != CM_OK) return rc;
            if ((cm_now() - moved) * 1e3 <= r->opts.timeout_ms) continue;
            return stalled(x, recv_done);
        }
        struct pollfd pf[2];
        int np = 0;
        if (!recv_done)
            pf[np++] = (struct pollfd){.fd = link_fd(r, r->recvs[x->rk].link), .events = POLLIN};
        /* Sends waiting for data (not for the socket) need no POLLOUT. */
        int want_out = !send_done &&
                       (x->sbytes > 0 ||
                        send_ready(x, chunk_len(x, &r->sends[x->sk], x->spos)));
        if (want_out)
            pf[np++] = (struct pollfd){.fd = link_fd(r, r->sends[x->sk].link), .events = POLLOUT};
        int p = poll(pf, (nfds_t)np, r->opts.timeout_ms);
        if (p < 0 && errno != EINTR)
            return fail(r, CM_EIO, "poll: %s", strerror(errno));
        if (p == 0) return stalled(x, recv_done);
    }
}

/* Segment s of n floats cut into N near-equal parts. */
static void segment(size_t n, int nranks, int s, size_t *off, size_t *len) {
    size_t base = n / (size_t)nranks, rem = n % (size_t)nranks, us = (size_t)s;
    *off = us * base + (us < rem ? us : rem);
    *len = base + (us < rem ? 1 : 0);
}

static int start(wk_ring *r, run *x, float *data, size_t n, int64_t step, int op, int arg) {
    *x = (run){.r = r, .data = data, .n = n, .step = step, .op = op, .arg = (uint32_t)arg};
    if (!r) return CM_EINVAL;
    x->chunk = r->chunk_elems;
    if (r->status != CM_OK) return r->status;
    if (n > 0 && !data) return CM_EINVAL;
    return CM_OK;
}

/* Segments [a, b) as one range of floats. */
static void segments(size_t n, int nranks, int a, int b, size_t *off, size_t *len) {
    size_t end, last;
    segment(n, nranks, a, off, len);
    segment(n, nranks, b - 1, &end, &last);
    *len = end + last - *off;
}

/* The halving-doubling link to rank ^ d: d = 1 is a ring neighbour, d =
 * 2 << j the extra link j. */
static int partner_link(const wk_ring *r, int d) {
    if (d == 1) return r->rank & 1 ? LINK_PREV : LINK_NEXT;
    return LINK_X + __builtin_ctz((unsigned)d) - 1;
}

/* Does an allreduce of n floats go by halving-doubling? */
static int hd_for(const wk_ring *r, size_t n) { return r->hd && n * sizeof(float) <= r->hd_max; }

/* Rabenseifner's allreduce on N = 2^m ranks, in segments of the buffer.
 * Reduce-scatter: for d = N/2 .. 1, this rank and rank^d each keep one
 * half of their window [lo, hi) of segments (the lower half for the one
 * whose bit d is clear), send the other half and add what comes into the
 * kept half; the window ends as segment 'rank', summed over all ranks.
 * All-gather: for d = 1 .. N/2, each sends its window and copies the
 * partner's, of the same size, next to it. Every step is one contiguous
 * range inside the range of the recv step before it, and each of its
 * chunks waits for the part of that step that it carries (as in the ring,
 * so steps overlap chunk by chunk). Every segment's final value is made by
 * its owner and copied to the others, so all ranks end bit-identical.
 * Buffer safety: a recv step writes only into this rank's window (reduce)
 * or outside it (gather), which no earlier send step still reads: a region
 * comes back in the gather only once its owner had this rank's part of it. */
static void plan_hd(wk_ring *r, run *x, int average) {
    int N = r->nranks, lo = 0, hi = N, k = 0;
    for (int d = N / 2; d >= 1; d /= 2, k++) {
        int mid = (lo + hi) / 2, low = (r->rank & d) == 0, link = partner_link(r, d);
        ring_step *s = &r->sends[k], *v = &r->recvs[k];
        *s = (ring_step){.link = link, .dep = k - 1};
        *v = (ring_step){.link = link, .mode = d == 1 && average ? MODE_ADD_DIV : MODE_ADD};
        segments(x->n, N, low ? mid : lo, low ? hi : mid, &s->off, &s->len);
        if (low)
            hi = mid;
        else
            lo = mid;
        segments(x->n, N, lo, hi, &v->off, &v->len);
    }
    for (int d = 1; d < N; d *= 2, k++) {
        int w = hi - lo, low = (r->rank & d) == 0, link = partner_link(r, d);
        ring_step *s = &r->sends[k], *v = &r->recvs[k];
        *s = (ring_step){.link = link, .dep = k - 1};
        *v = (ring_step){.link = link, .mode = MODE_COPY};
        segments(x->n, N, lo, hi, &s->off, &s->len);
        if (low)
            hi += w;
        else
            lo -= w;
        segments(x->n, N, low ? hi - w : lo, low ? hi : lo + w, &v->off, &v->len);
    }
    x->nsend = x->nrecv = k;
}

/* The chunk of a ring allreduce of n floats: the ring's, except that with
 * the default TCP chunk a segment longer than half a chunk and shorter
 * than two goes in half chunks, so that the all-gather's first chunk
 * leaves while the reduce-scatter's second still arrives (2 ranks, 2 and
 * 3 MiB: 5-10 % faster, level at 1 and 4-16 MiB; docs/bench-log.md).
 * Every rank computes the same. */
static size_t ring_chunk(const wk_ring *r, size_t n) {
    size_t c = r->chunk_elems, seg = (n + (size_t)r->nranks - 1) / (size_t)r->nranks;
    return r->halve_mid && seg > c / 2 && seg < 2 * c ? c / 2 : c;
}

int wk_ring_allreduce(wk_ring *r, float *data, size_t n, int64_t step, int average) {
    run x;
    int rc = start(r, &x, data, n, step, WK_RING__OP_ALLREDUCE, average != 0);
    if (rc != CM_OK || r->nranks == 1 || n == 0) return rc;
    if (hd_for(r, n)) {
        plan_hd(r, &x, average);
        return run_plan(&x);
    }
    int N = r->nranks;
    x.chunk = ring_chunk(r, n);
    x.nsend = x.nrecv = 2 * (N - 1);
    for (int k = 0; k < x.nsend; k++) {
        ring_step *s = &r->sends[k], *v = &r->recvs[k];
        *s = (ring_step){.link = LINK_NEXT, .dep = k - 1};
        *v = (ring_step){.link = LINK_PREV,
                         .mode = k < N - 2    ? MODE_ADD
                                 : k == N - 2 ? (average ? MODE_ADD_DIV : MODE_ADD)
                                              : MODE_COPY};
        segment(n, N, ((r->rank - k) % N + N) % N, &s->off, &s->len);
        segment(n, N, ((r->rank - 1 - k) % N + N) % N, &v->off, &v->len);
    }
    return run_plan(&x);
}

int wk_ring_broadcast(wk_ring *r, float *data, size_t n, int64_t step, int root) {
    run x;
    int rc = start(r, &x, data, n, step, WK_RING__OP_BROADCAST, root);
    if (rc != CM_OK) return rc;
    if (root < 0 || root >= r->nranks) return CM_EINVAL;
    if (r->nranks == 1 || n == 0) return CM_OK;
    if (r->rank != root) {
        r->recvs[0] = (ring_step){.off = 0, .len = n, .link = LINK_PREV, .mode = MODE_COPY};
        x.nrecv = 1;
    }
    if (next_rank(r) != root) {
        r->sends[0] = (ring_step){.off = 0, .len = n, .link = LINK_NEXT,
                                  .dep = r->rank == root ? -1 : 0};
        x.nsend = 1;
    }
    return run_plan(&x);
}

/* ===================================================== accessors */

int wk_ring_rank(const wk_ring *r) { return r->rank; }
int wk_ring_size(const wk_ring *r) { return r->nranks; }
const char *wk_ring_transport(const wk_ring *r) {
    if (r->nranks == 1) return "none";
    return r->tx && r->rx ? "shm" : r->tx || r->rx ? "tcp+shm" : "tcp";
}
const char *wk_ring_algorithm(const wk_ring *r, size_t n) {
    return hd_for(r, n) ? "halving-doubling" : "ring";
}
size_t wk_ring_chunk_bytes(const wk_ring *r, size_t n) {
    return (r->nranks > 1 && !hd_for(r, n) ? ring_chunk(r, n) : r->chunk_elems) * sizeof(float);
}
int wk_ring_status(const wk_ring *r) { return r->status; }
const char *wk_ring_error(const wk_ring *r) { return r->err; }

void wk_ring_destroy(wk_ring *r) {
    if (!r) return;
    if (r->send_fd >= 0) close(r->send_fd);
    if (r->recv_fd >= 0) close(r->recv_fd);
    for (int j = 0; j < r->nx; j++)
        if (r->xfd[j] >= 0) close(r->xfd[j]);
    free(r->xfd);
    free(r->xaddr);
    shm_destroy(r->tx);
    shm_destroy(r->rx);
    free(r->scratch);
    free(r->sends);
    free(r->recvs);
    free(r);
}
