/* fuzz_ring.c - the ring AllReduce's framing (worker/sync/wk_ring.c): the
 * handshake hellos and the chunk stream a neighbour sends.
 * SPDX-License-Identifier: MIT
 *
 * wk_ring.c is included here, so that the harness can build a ring whose
 * connections are socketpairs and play its neighbours: the previous rank's
 * bytes are the input (then end of file), and what the ring sends to the
 * next rank is read and dropped by a thread. The collective runs exactly
 * as in a real ring (pump_recv, check_hdr, run_plan).
 *
 * Input: a 15-byte header, then the stream.
 *   [0] mode: 0 the handshake, 1 allreduce, 2 broadcast, 3 the transport
 *       negotiation, 4 allreduce receiving through shared memory,
 *       5 allreduce by halving-doubling (mod 6)
 *   [1] nranks 2..8 (halving-doubling: 4 or 8 by bit 0)    [2] rank (mod
 *       nranks)    [3] chunk: 1..256 floats
 *   [4..6) n floats (u16, mod 2048)    [6..14) step (i64)
 *   [14] allreduce: average (bit 0); broadcast: the root (mod nranks)
 * The handshake mode reads the stream's first 24 bytes as the hello of a
 * connection to this rank's listener (accept_one, over loopback TCP) and
 * the next 24 as the next rank's answer (check_next). The negotiation mode
 * reads the first 72 bytes as the previous rank's offer and the next 8 as
 * the next rank's answer (negotiate). The shared-memory mode puts the stream
 * into the slots of a receive link (each slot: a 40-byte header from the
 * stream, then as much payload as the header says and the slot holds), up
 * to its 8 slots, publishes them, and closes the connection that watches
 * the previous rank: the collective takes what is there, then fails. In
 * the halving-doubling mode the stream starts with a u16 length for each
 * link (0 to the next rank, 1 from the previous one, then the extra links
 * to rank ^ 2, rank ^ 4), and those parts follow in that order (cut short
 * where the stream ends): each link brings its part from its peer, each
 * step reading the link of its partner (partner_link), and what the rank
 * sends on any link is drained.
 */
#include "worker/sync/wk_ring.c"

#include <pthread.h>
#include <sys/socket.h>

#include "fuzz/fz_util.h"

#define FZ_JOB 0x66757a7a72696e67ULL /* "fuzzring" */
#define HDR 15
#define MAX_STREAM (64 << 10) /* Fits a socketpair's buffer: written at once. */


static wk_ring_listener *listener;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_logs_init();
    char err[256];
    if (wk_ring_listen("127.0.0.1", 0, &listener, err, sizeof err) != CM_OK) {
        fprintf(stderr, "fuzz_ring: %s\n", err);
        abort();
    }
    return 0;
}

static void *drain(void *arg) {
    int fd = *(int *)arg;
    char buf[16384];
    while (read(fd, buf, sizeof buf) > 0) {
    }
    return NULL;
}

static void sockpair(int sv[2]) {
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) abort();
}

static void feed(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0) abort();
        p += w;
        n -= (size_t)w;
    }
    shutdown(fd, SHUT_WR);
}

static void handshake_mode(wk_ring *r, const uint8_t *s, size_t n) {
    char err[512], refused[256] = "";
    /* A connection to the listener that sends the first 24 bytes. */
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)listener->port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof a) != 0) {
        /* The machine's trouble (ports, descriptors), not the ring's. */
        perror("fuzz_ring: connect to the listener");
        if (c >= 0) close(c);
        return;
    }
    size_t first = n < WK_RING__HELLO_BYTES ? n : WK_RING__HELLO_BYTES;
    feed(c, s, first);
    double deadline = cm_now() + 1.0;
    int rc = accept_one(r, listener, deadline, refused, sizeof refused);
    if (rc == CM_OK) {
        if (r->recv_fd < 0) abort();
        close(r->recv_fd);
        r->recv_fd = -1;
    }
    close(c);
    /* The next rank's answer: the next 24 bytes. */
    int sv[2];
    sockpair(sv);
    r->send_fd = sv[0];
    feed(sv[1], s + first, n - first < WK_RING__HELLO_BYTES ? n - first : WK_RING__HELLO_BYTES);
    (void)check_next(r, deadline, err, sizeof err);
    close(sv[1]);
}

static void negotiate_mode(wk_ring *r, const uint8_t *s, size_t n) {
    int to_next[2], from_prev[2];
    sockpair(to_next);
    sockpair(from_prev);
    r->send_fd = to_next[0];
    r->recv_fd = from_prev[0];
    r->opts.transport = WK_RING_AUTO;
    size_t first = n < WK_RING__OFFER_BYTES ? n : WK_RING__OFFER_BYTES;
    feed(from_prev[1], s, first);
    feed(to_next[1], s + first,
         n - first < WK_RING__ANSWER_BYTES ? n - first : WK_RING__ANSWER_BYTES);
    char err[512];
    int rc = negotiate(r, cm_now() + 1.0, err, sizeof err);
    /* No offer names an object this harness can map (its host is this
     * machine's hash only by chance, its name one of ours never). */
    if (rc == CM_OK && r->rx) abort();
    close(to_next[1]);
    close(from_prev[1]);
}

/* The receive link in shared memory, its slots filled from the stream. */
static void fill_slots(wk_ring *r, const uint8_t *s, size_t n) {
    char why[256];
    shm_link *L;
    if (shm_create(r, &L, why, sizeof why) != CM_OK) {
        fprintf(stderr, "fuzz_ring: %s\n", why); /* The machine's trouble. */
        return;
    }
    shm_unlink(L->name);
    L->named = 0;
    size_t at = 0, k = 0, cap = L->stride - WK_RING__SLOT_PAYLOAD;
    while (k < L->nslots && at + WK_RING__HDR_BYTES <= n) {
        unsigned char *slot = L->slots + k * L->stride;
        memcpy(slot, s + at, WK_RING__HDR_BYTES);
        at += WK_RING__HDR_BYTES;
        wk_ring__hdr h;
        wk_ring__hdr_unpack(slot, &h);
        size_t take = h.len < cap ? h.len : cap;
        if (take > n - at) take = n - at;
        memcpy(slot + WK_RING__SLOT_PAYLOAD, s + at, take);
        at += take;
        k++;
    }
    atomic_store(&L->c->head, (uint64_t)k);
    r->rx = L;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < HDR) return 0;
    int mode = data[0] % 6, nranks = 2 + data[1] % 7;
    int hd = mode == 5;
    if (hd) {
        nranks = data[1] & 1 ? 8 : 4;
        mode = 1;
    }
    int rank = data[2] % nranks;
    size_t chunk = 1 + (size_t)data[3], n = ((size_t)data[4] | (size_t)data[5] << 8) % 2048;
    int64_t step;
    memcpy(&step, data + 6, 8);
    int arg = mode == 2 ? data[14] % nranks : data[14] & 1;
    int shm = mode == 4;
    if (shm) mode = 1;
    const uint8_t *s = data + HDR;
    size_t slen = size - HDR < MAX_STREAM ? size - HDR : MAX_STREAM;

    wk_ring *r = cm_calloc(1, sizeof *r);
    r->rank = rank;
    r->nranks = nranks;
    wk_ring_opts_default(&r->opts);
    r->opts.job_id = FZ_JOB;
    r->opts.timeout_ms = 2000; /* Never reached: the stream ends in EOF. */
    r->chunk_elems = chunk;
    r->send_fd = r->recv_fd = -1;
    snprintf(r->next_addr, sizeof r->next_addr, "next.fuzz:2");
    snprintf(r->prev_addr, sizeof r->prev_addr, "prev.fuzz:1");
    r->sends = cm_calloc(2 * (size_t)nranks, sizeof *r->sends);
    r->recvs = cm_calloc(2 * (size_t)nranks, sizeof *r->recvs);
    r->scratch = cm_alloc_aligned(chunk * sizeof(float));
    if (mode == 0 || mode == 3) {
        if (mode == 0)
            handshake_mode(r, s, slen);
        else
            negotiate_mode(r, s, slen);
        wk_ring_destroy(r);
        return 0;
    }
    if (hd) {
        r->hd = 1;
        r->hd_max = SIZE_MAX;
        while ((2 << r->nx) < nranks) r->nx++;
        r->xfd = cm_malloc((size_t)r->nx * sizeof *r->xfd);
        r->xaddr = cm_calloc((size_t)r->nx, sizeof *r->xaddr);
        for (int j = 0; j < r->nx; j++) snprintf(r->xaddr[j], ADDR_LEN, "x%d.fuzz:%d", j, 3 + j);
    }
    /* Links: 0 to the next rank, 1 from the previous one, 2.. the extra
     * ones; peer[l][1] is the other rank's end. */
    int nl = 2 + r->nx, peer[4][2];
    pthread_t t[4];
    for (int l = 0; l < nl; l++) {
        sockpair(peer[l]);
        if (l == 0)
            r->send_fd = peer[l][0];
        else if (l == 1)
            r->recv_fd = peer[l][0];
        else
            r->xfd[l - 2] = peer[l][0];
        /* The ring reads only from the previous rank, and sends only to the
         * next: the other ends need no drain. */
        if ((hd || l != 1) && pthread_create(&t[l], NULL, drain, &peer[l][1]) != 0) abort();
    }
    if (shm)
        fill_slots(r, s, slen);
    if (hd) {
        size_t at = 2 * (size_t)nl < slen ? 2 * (size_t)nl : slen;
        for (int l = 0; l < nl; l++) {
            size_t len = 2 * (size_t)l + 1 < at ? (size_t)s[2 * l] | (size_t)s[2 * l + 1] << 8 : 0;
            if (len > slen - at) len = slen - at;
            feed(peer[l][1], s + at, len);
            at += len;
        }
    } else {
        feed(peer[1][1], s, shm ? 0 : slen); /* Shared memory: the end only. */
    }
    float *buf = cm_malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) buf[i] = (float)i * 0.5f - (float)rank;
    int rc = mode == 1 ? wk_ring_allreduce(r, buf, n, step, arg)
                       : wk_ring_broadcast(r, buf, n, step, arg);
    if (getenv("FUZZ_TRACE"))
        fprintf(stderr, "fuzz_ring: %s of %zu floats as rank %d of %d: %s %s\n",
                mode == 1 ? wk_ring_algorithm(r, n) : "broadcast", n, rank, nranks,
                cm_strerror(rc), wk_ring_error(r));
    /* Errors are sticky, and say something. */
    if (rc != CM_OK && (wk_ring_status(r) != rc || !wk_ring_error(r)[0] ||
                        wk_ring_allreduce(r, buf, n, step, arg) != rc))
        abort();
    free(buf);
    wk_ring_destroy(r); /* Closes our ends: the drains see the end. */
    for (int l = 0; l < nl; l++) {
        if (hd || l != 1) pthread_join(t[l], NULL);
        close(peer[l][1]);
    }
    return 0;
}
