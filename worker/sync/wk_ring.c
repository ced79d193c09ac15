/* wk_ring.c - ring AllReduce and broadcast over plain TCP (wk_ring.h).
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
 * Broadcast from root: one step over the whole buffer; the root sends, the
 * others copy and forward (dep 0), except the root's left neighbour.
 *
 * Buffer safety: a chunk is overwritten by a later recv step only after it
 * went once around the ring, i.e. after this rank's send of it completed.
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
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_time.h"
#include "worker/sync/wk_ring_int.h"

#define MAX_RANKS 4096 /* Ring steps travel as u16. */
#define ADDR_LEN 128

struct wk_ring_listener {
    int fd, port;
};

enum { MODE_ADD, MODE_ADD_DIV, MODE_COPY };

typedef struct ring_step {
    size_t off, len; /* Floats of the buffer. */
    int dep;         /* Send: the recv step it waits for, or -1. */
    int mode;        /* Recv: MODE_*. */
} ring_step;

struct wk_ring {
    int rank, nranks;
    wk_ring_opts opts;
    size_t chunk_elems;
    int send_fd, recv_fd;           /* To rank+1, from rank-1; -1 if none. */
    char next_addr[ADDR_LEN];       /* Listening addresses of those peers. */
    char prev_addr[ADDR_LEN];
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
                        .chunk_bytes = 256 << 10,
                        .sock_buf_bytes = 0,
                        .spin_us = 0};
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

/* Split "host:port" or "[v6]:port"; resolve it. */
static int resolve(const char *addr, struct addrinfo **res, char *err, size_t errlen) {
    char host[ADDR_LEN];
    const char *colon = strrchr(addr, ':');
    size_t hl = colon ? (size_t)(colon - addr) : 0;
    if (!colon || hl == 0 || hl >= sizeof host || !colon[1]) {
        cm_seterr(err, errlen, "bad address '%s' (want host:port)", addr);
        return CM_EINVAL;
    }
    memcpy(host, addr, hl);
    host[hl] = 0;
    if (host[0] == '[' && hl >= 2 && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int rc = getaddrinfo(host, colon + 1, &hints, res);
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
    snprintf(addr, sizeof addr, "%s:%d", host, port);
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

static void my_hello(const wk_ring *r, unsigned char out[WK_RING__HELLO_BYTES]) {
    wk_ring__hello h = {WK_RING__HELLO_MAGIC, WK_RING__VERSION, r->opts.job_id,
                        (uint32_t)r->nranks, (uint32_t)r->rank};
    wk_ring__hello_pack(&h, out);
}

/* NULL if h is rank 'want' of this ring's job, else why not (in buf). */
static const char *hello_mismatch(const wk_ring *r, const wk_ring__hello *h, int want,
                                  char *buf, size_t len) {
    if (h->magic != WK_RING__HELLO_MAGIC) {
        snprintf(buf, len, "not a wk_ring peer (magic 0x%08x)", h->magic);
    } else if (h->version != WK_RING__VERSION) {
        snprintf(buf, len, "protocol version %u, this rank speaks %u", h->version,
                 WK_RING__VERSION);
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

/* Connect to the next rank (retrying with backoff) and send our hello. */
static int connect_next(wk_ring *r, double deadline, char *err, size_t errlen) {
    struct addrinfo *ai = NULL;
    int rc = resolve(r->next_addr, &ai, err, errlen);
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
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        if (errno == EINPROGRESS) {
            int w = wait_fd(fd, POLLOUT, deadline), soerr = 0;
            socklen_t sl = sizeof soerr;
            if (w > 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) == 0 && soerr == 0)
                break;
            last = w == 0 ? "timed out" : strerror(soerr ? soerr : errno);
        } else {
            last = strerror(errno);
        }
        close(fd);
        fd = -1;
        int left = ms_left(deadline);
        if (left <= 0) break;
        sleep_ms(backoff < left ? backoff : left);
        backoff = backoff * 2 > 500 ? 500 : backoff * 2;
    }
    freeaddrinfo(ai);
    if (fd < 0) {
        cm_seterr(err, errlen, "rank %d: cannot connect to rank %d at %s within %d ms: %s",
                  r->rank, (r->rank + 1) % r->nranks, r->next_addr,
                  r->opts.connect_timeout_ms, last);
        return CM_EUNAVAIL;
    }
    r->send_fd = fd;
    unsigned char hello[WK_RING__HELLO_BYTES];
    my_hello(r, hello);
    if ((rc = io_full(fd, 1, hello, sizeof hello, deadline, &last)) != CM_OK) {
        cm_seterr(err, errlen, "rank %d: sending the handshake to rank %d at %s: %s",
                  r->rank, (r->rank + 1) % r->nranks, r->next_addr,
                  rc == CM_ETIMEDOUT ? "timed out" : last);
        return rc;
    }
    return CM_OK;
}

/* Accept one connection on l and read its hello: CM_OK with r->recv_fd set
 * if it is the previous rank of this job; CM_EAGAIN if it was refused (why
 * in refused). Every hello is answered with ours, so that a refused peer can
 * say whom it met. */
static int accept_one(wk_ring *r, wk_ring_listener *l, double deadline, char *refused,
                      size_t rlen) {
    int prev = (r->rank + r->nranks - 1) % r->nranks;
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
        const char *bad = hello_mismatch(r, &h, prev, msg, sizeof msg);
        if (!bad) {
            r->recv_fd = fd;
            return CM_OK;
        }
        snprintf(refused, rlen, "refused a connection: %s", bad);
    }
    cm_warn("rank %d: %s", r->rank, refused);
    close(fd);
    return CM_EAGAIN;
}

/* Read the next rank's answer to our hello. */
static int check_next(wk_ring *r, double deadline, char *err, size_t errlen) {
    int next = (r->rank + 1) % r->nranks;
    unsigned char buf[WK_RING__HELLO_BYTES];
    const char *why;
    int rc = io_full(r->send_fd, 0, buf, sizeof buf, deadline, &why);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "rank %d: no handshake from rank %d at %s: %s", r->rank, next,
                  r->next_addr, rc == CM_ETIMEDOUT ? "timed out" : why);
        return rc;
    }
    wk_ring__hello h;
    char msg[200];
    wk_ring__hello_unpack(buf, &h);
    const char *bad = hello_mismatch(r, &h, next, msg, sizeof msg);
    if (bad) {
        cm_seterr(err, errlen, "rank %d: wrong peer at %s: %s", r->rank, r->next_addr, bad);
        return CM_EPROTO;
    }
    return CM_OK;
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
        if (!have_next) pf[np++] = (struct pollfd){.fd = r->send_fd, .events = POLLIN};
        int p = poll(pf, (nfds_t)np, ms_left(deadline));
        if (p < 0 && errno == EINTR) continue;
        if (p <= 0) break;
        for (int i = 0; i < np; i++) {
            if (!pf[i].revents) continue;
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
        o.chunk_bytes > (1u << 30) || o.sock_buf_bytes < 0 || o.spin_us < 0) {
        cm_seterr(err, errlen, "wk_ring_connect: bad arguments (rank %d of %d)", rank, nranks);
        return CM_EINVAL;
    }
    int rc = CM_OK;
    wk_ring *r = cm_calloc(1, sizeof *r);
    r->rank = rank;
    r->nranks = nranks;
    r->opts = o;
    r->send_fd = r->recv_fd = -1;
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

static size_t chunk_len(const run *x, const ring_step *s, size_t pos) {
    size_t left = s->len - pos;
    return left < x->r->chunk_elems ? left : x->r->chunk_elems;
}

/* Vectorisable at -O3 (restrict, no aliasing). */
static void add_into(float *restrict dst, const float *restrict src, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] += src[i];
}

static void add_div_into(float *restrict dst, const float *restrict src, size_t n, float d) {
    for (size_t i = 0; i < n; i++) dst[i] = (dst[i] + src[i]) / d;
}

static void skip_empty(const ring_step *steps, int nsteps, int *k, size_t *pos) {
    while (*k < nsteps && *pos == steps[*k].len) {
        (*k)++;
        *pos = 0;
    }
}

/* May chunk (sk, spos) go? Its data must have been received. */
static int send_ready(const run *x, size_t clen) {
    int dep = x->r->sends[x->sk].dep;
    return dep < 0 || x->rk > dep || (x->rk == dep && x->rpos >= x->spos + clen);
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

static int pump_send(run *x, int *progress) {
    wk_ring *r = x->r;
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
        ssize_t w = sendmsg(r->send_fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return CM_OK;
            if (errno == EINTR) continue;
            return fail(r, CM_EUNAVAIL, "sending to rank %d (%s): %s", next_rank(r),
                        r->next_addr, strerror(errno));
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
    wk_ring__hdr h;
    wk_ring__hdr_unpack(x->rhdr, &h);
    const char *what = NULL;
    if (h.magic != WK_RING__CHUNK_MAGIC) {
        what = "not a chunk header";
    } else if (h.op != x->op || h.arg != x->arg) {
        return fail(r, CM_EPROTO, "rank %d (%s) sent a chunk of %s (%s %u) during %s (%s %u)",
                    prev_rank(r), r->prev_addr, op_name(h.op), arg_name(h.op), h.arg,
                    op_name(x->op), arg_name(x->op), x->arg);
    } else if (h.step != x->step) {
        return fail(r, CM_EPROTO, "rank %d (%s) sent a chunk of step %lld during step %lld",
                    prev_rank(r), r->prev_addr, (long long)h.step, (long long)x->step);
    } else if (h.count != x->n) {
        return fail(r, CM_EPROTO, "rank %d (%s) reduces %llu floats, this rank %zu",
                    prev_rank(r), r->prev_addr, (unsigned long long)h.count, x->n);
    } else if (h.k != x->rk || h.offset != s->off + x->rpos) {
        what = "unexpected ring step or offset";
    } else if (h.len != clen * sizeof(float)) {
        what = "wrong length";
    }
    if (!what) return CM_OK;
    return fail(r, CM_EPROTO,
                "bad chunk from rank %d (%s) in %s step %lld: %s (magic 0x%08x, ring step %u, "
                "offset %llu, length %u; expected ring step %d, offset %zu, length %zu)",
                prev_rank(r), r->prev_addr, op_name(x->op), (long long)x->step, what, h.magic,
                h.k, (unsigned long long)h.offset, h.len, x->rk, s->off + x->rpos,
                clen * sizeof(float));
}

static int pump_recv(run *x, int *progress) {
    wk_ring *r = x->r;
    for (;;) {
        skip_empty(r->recvs, x->nrecv, &x->rk, &x->rpos);
        if (x->rk == x->nrecv) return CM_OK;
        const ring_step *s = &r->recvs[x->rk];
        size_t clen = chunk_len(x, s, x->rpos), plen = clen * sizeof(float);
        float *dst = x->data + s->off + x->rpos;
        struct iovec iov[2];
        struct msghdr mh;
        chunk_msg(&mh, iov, x->rhdr, x->rbytes, s->mode == MODE_COPY ? dst : r->scratch, plen);
        ssize_t g = recvmsg(r->recv_fd, &mh, MSG_DONTWAIT);
        if (g == 0)
            return fail(r, CM_EUNAVAIL, "rank %d (%s) closed the connection during %s step %lld",
                        prev_rank(r), r->prev_addr, op_name(x->op), (long long)x->step);
        if (g < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return CM_OK;
            if (errno == EINTR) continue;
            return fail(r, CM_EUNAVAIL, "receiving from rank %d (%s): %s", prev_rank(r),
                        r->prev_addr, strerror(errno));
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

/* Run the plan in r->sends / r->recvs until both sides are done. */
static int run_plan(run *x) {
    wk_ring *r = x->r;
    double spin = r->opts.spin_us * 1e-6, last = spin > 0 ? cm_now() : 0;
    for (;;) {
        int progress = 0, rc;
        if ((rc = pump_recv(x, &progress)) != CM_OK || (rc = pump_send(x, &progress)) != CM_OK)
            return rc;
        int recv_done = x->rk == x->nrecv, send_done = x->sk == x->nsend;
        if (recv_done && send_done) return CM_OK;
        if (progress) {
            if (spin > 0) last = cm_now();
            continue;
        }
        if (spin > 0 && cm_now() - last < spin) continue;
        struct pollfd pf[2];
        int np = 0;
        if (!recv_done) pf[np++] = (struct pollfd){.fd = r->recv_fd, .events = POLLIN};
        /* Sends waiting for data (not for the socket) need no POLLOUT. */
        int want_out = !send_done &&
                       (x->sbytes > 0 ||
                        send_ready(x, chunk_len(x, &r->sends[x->sk], x->spos)));
        if (want_out) pf[np++] = (struct pollfd){.fd = r->send_fd, .events = POLLOUT};
        int p = poll(pf, (nfds_t)np, r->opts.timeout_ms);
        if (p < 0 && errno != EINTR)
            return fail(r, CM_EIO, "poll: %s", strerror(errno));
        if (p == 0 && !recv_done)
            return fail(r, CM_ETIMEDOUT, "no data from rank %d (%s) for %d ms in %s step %lld",
                        prev_rank(r), r->prev_addr, r->opts.timeout_ms, op_name(x->op),
                        (long long)x->step);
        if (p == 0)
            return fail(r, CM_ETIMEDOUT, "rank %d (%s) took no data for %d ms in %s step %lld",
                        next_rank(r), r->next_addr, r->opts.timeout_ms, op_name(x->op),
                        (long long)x->step);
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
    if (r->status != CM_OK) return r->status;
    if (n > 0 && !data) return CM_EINVAL;
    return CM_OK;
}

int wk_ring_allreduce(wk_ring *r, float *data, size_t n, int64_t step, int average) {
    run x;
    int rc = start(r, &x, data, n, step, WK_RING__OP_ALLREDUCE, average != 0);
    if (rc != CM_OK || r->nranks == 1 || n == 0) return rc;
    int N = r->nranks;
    x.nsend = x.nrecv = 2 * (N - 1);
    for (int k = 0; k < x.nsend; k++) {
        ring_step *s = &r->sends[k], *v = &r->recvs[k];
        segment(n, N, ((r->rank - k) % N + N) % N, &s->off, &s->len);
        s->dep = k - 1;
        segment(n, N, ((r->rank - 1 - k) % N + N) % N, &v->off, &v->len);
        v->mode = k < N - 2 ? MODE_ADD : k == N - 2 ? (average ? MODE_ADD_DIV : MODE_ADD)
                                                    : MODE_COPY;
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
        r->recvs[0] = (ring_step){.off = 0, .len = n, .mode = MODE_COPY};
        x.nrecv = 1;
    }
    if (next_rank(r) != root) {
        r->sends[0] = (ring_step){.off = 0, .len = n, .dep = r->rank == root ? -1 : 0};
        x.nsend = 1;
    }
    return run_plan(&x);
}

/* ===================================================== accessors */

int wk_ring_rank(const wk_ring *r) { return r->rank; }
int wk_ring_size(const wk_ring *r) { return r->nranks; }
int wk_ring_status(const wk_ring *r) { return r->status; }
const char *wk_ring_error(const wk_ring *r) { return r->err; }

void wk_ring_destroy(wk_ring *r) {
    if (!r) return;
    if (r->send_fd >= 0) close(r->send_fd);
    if (r->recv_fd >= 0) close(r->recv_fd);
    free(r->scratch);
    free(r->sends);
    free(r->recvs);
    free(r);
}
