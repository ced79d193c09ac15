/* wk_rendezvous.c - Join at the chief, answered once every rank is in.
 * SPDX-License-Identifier: MIT
 */
#include "worker/sync/wk_rendezvous.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_token.h"
#include "common/cm_time.h"
#include "proto/ps.pb-c.h"
#include "proto/rpc.h"

#define JOIN_METHOD "/psrpc.Rendezvous/Join"

struct wk_rdv_server {
    rpc_server *rpc;
    int nranks;
    uint64_t fingerprint, job_id;
    int64_t start_step;
    char description[256];
    uint8_t nccl_id[WK_RDV_NCCL_ID_MAX];
    size_t nccl_id_len;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t ticker;   /* Elastic: forms a smaller ring when the wait runs out. */
    int ticker_started;
    /* Protected by mu: the Joins of the next ring. */
    char **addrs;     /* Per rank: joined address, or NULL. */
    rpc_call **calls; /* Per rank: the Join waiting for the others. */
    int *has_state;
    int64_t *step;
    int joined;
    double survivor_since; /* When the first survivor joined (0: none yet). */
    int min_ranks;         /* Elastic: smallest ring (nranks: whole rings only). */
    int64_t wait_ms;       /* ...after a survivor waited this long. */
    uint32_t generation;   /* Rings formed so far. */
    int closing;      /* Destroy has begun: refuse new Joins. */
    int64_t ended;    /* The run ended at this step (-1: it goes on). */
};

/* Forget the Joins collected (their calls answered or failed by the
 * caller): the next ring starts empty (mu held). */
static void clear_pending(wk_rdv_server *s) {
    for (int r = 0; r < s->nranks; r++) {
        s->calls[r] = NULL;
        free(s->addrs[r]);
        s->addrs[r] = NULL;
        s->has_state[r] = 0;
    }
    s->joined = 0;
    s->survivor_since = 0;
}

/* Reply to every waiting Join with the ring of the ranks that joined, and
 * start collecting the next one (mu held). */
static void answer_all(wk_rdv_server *s) {
    Psrpc__JoinReply rep = PSRPC__JOIN_REPLY__INIT;
    char **addrs = cm_calloc((size_t)s->nranks, sizeof *addrs);
    uint32_t *members = cm_calloc((size_t)s->nranks, sizeof *members);
    size_t m = 0;
    int root = -1;
    int64_t start = s->start_step;
    for (int r = 0; r < s->nranks; r++) {
        if (!s->addrs[r]) continue;
        if (s->has_state[r] && (root < 0 || s->step[r] > start)) {
            root = (int)m;
            start = s->step[r];
        }
        addrs[m] = s->addrs[r];
        members[m++] = (uint32_t)r;
    }
    s->generation++;
    rep.n_ring_addrs = m;
    rep.ring_addrs = addrs;
    rep.n_members = m;
    rep.members = members;
    rep.root = root < 0 ? 0 : (uint32_t)root;
    rep.generation = s->generation;
    /* A new id per ring: a rank of an earlier ring is refused by the
     * handshakes of this one. */
    rep.job_id = s->job_id ^ (0x9e3779b97f4a7c15ull * (uint64_t)(s->generation - 1));
    rep.start_step = start;
    rep.nccl_id.data = s->nccl_id;
    rep.nccl_id.len = s->nccl_id_len;
    size_t n = protobuf_c_message_get_packed_size(&rep.base);
    uint8_t *buf = cm_malloc(n ? n : 1);
    protobuf_c_message_pack(&rep.base, buf);
    if (s->generation > 1 || m < (size_t)s->nranks)
        cm_info("rendezvous: ring %u formed: %zu of %d workers, at step %lld", s->generation,
                m, s->nranks, (long long)start);
    for (int r = 0; r < s->nranks; r++) {
        if (!s->calls[r]) continue;
        rpc_seg seg = {.data = buf, .len = n};
        rpc_reply(s->calls[r], &seg, 1);
    }
    clear_pending(s);
    free(buf);
    free(addrs);
    free(members);
}

static void missing(const wk_rdv_server *s, char *buf, size_t len);

/* Form the ring if it may form now; fail the waiting Joins when a survivor
 * waited wait_ms and the ring may not form without the missing ranks (mu
 * held). */
static void maybe_answer(wk_rdv_server *s) {
    if (s->joined == s->nranks) {
        answer_all(s);
        return;
    }
    if (s->survivor_since == 0 || (cm_now() - s->survivor_since) * 1e3 < (double)s->wait_ms)
        return;
    if (s->joined >= s->min_ranks && s->addrs[0] && s->min_ranks < s->nranks) {
        answer_all(s);
        return;
    }
    char m[256];
    missing(s, m, sizeof m);
    cm_warn("rendezvous: gave up after %lld ms waiting for ranks %s to join again (%d of %d "
            "joined; the ring may not be smaller than %d%s)",
            (long long)s->wait_ms, m, s->joined, s->nranks, s->min_ranks,
            s->addrs[0] ? "" : " and needs the chief");
    for (int r = 0; r < s->nranks; r++)
        if (s->calls[r])
            rpc_fail(s->calls[r], RPC_UNAVAILABLE,
                     "rendezvous: gave up after %lld ms waiting for ranks %s to join again "
                     "(%d of %d joined; --min-workers %d)",
                     (long long)s->wait_ms, m, s->joined, s->nranks, s->min_ranks);
    clear_pending(s);
}

static void *ticker_main(void *arg) {
    wk_rdv_server *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->closing) {
        struct timespec ts = cm_realtime_in_ms(50);
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
        if (!s->closing && s->joined) maybe_answer(s);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

void wk_rdv_server_set_elastic(wk_rdv_server *s, int min_ranks, int64_t wait_ms) {
    pthread_mutex_lock(&s->mu);
    s->min_ranks = min_ranks < 1 ? 1 : min_ranks > s->nranks ? s->nranks : min_ranks;
    s->wait_ms = wait_ms < 0 ? 0 : wait_ms;
    if (!s->ticker_started)
        s->ticker_started = pthread_create(&s->ticker, NULL, ticker_main, s) == 0;
    pthread_mutex_unlock(&s->mu);
}

void wk_rdv_server_end(wk_rdv_server *s, int64_t step) {
    pthread_mutex_lock(&s->mu);
    s->ended = step < 0 ? 0 : step;
    for (int r = 0; r < s->nranks; r++)
        if (s->calls[r])
            rpc_fail(s->calls[r], RPC_OUT_OF_RANGE, "rendezvous: the run ended at step %lld",
                     (long long)s->ended);
    clear_pending(s);
    pthread_mutex_unlock(&s->mu);
}

int wk_rdv_server_waiting(wk_rdv_server *s) {
    pthread_mutex_lock(&s->mu);
    int w = s->joined > 0;
    pthread_mutex_unlock(&s->mu);
    return w;
}

static void on_join(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    wk_rdv_server *s = ctx;
    Psrpc__JoinRequest *r = psrpc__join_request__unpack(NULL, len, req);
    if (!r) {
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed JoinRequest");
        return;
    }
    if (r->fingerprint != s->fingerprint || (int)r->nranks != s->nranks) {
        rpc_fail(call, RPC_FAILED_PRECONDITION,
                 "rendezvous: the chief runs %s [%016llx]; rank %u joined for %s of %u "
                 "workers [%016llx]",
                 s->description, (unsigned long long)s->fingerprint, r->rank,
                 r->description && r->description[0] ? r->description : "(no description)",
                 r->nranks, (unsigned long long)r->fingerprint);
    } else if (r->rank >= (uint32_t)s->nranks || !r->ring_addr || !r->ring_addr[0]) {
        /* Unsigned: a rank of 2^31 or more must not become a negative
         * index (found by fuzz/fuzz_rendezvous). */
        rpc_fail(call, RPC_INVALID_ARGUMENT, "rendezvous: rank %u of %d, address '%s'",
                 r->rank, s->nranks, r->ring_addr ? r->ring_addr : "");
    } else {
        pthread_mutex_lock(&s->mu);
        int k = (int)r->rank;
        if (s->ended >= 0) {
            pthread_mutex_unlock(&s->mu);
            rpc_fail(call, RPC_OUT_OF_RANGE, "rendezvous: the run ended at step %lld",
                     (long long)s->ended);
            psrpc__join_request__free_unpacked(r, NULL);
            return;
        }
        if (s->closing) {
            pthread_mutex_unlock(&s->mu);
            rpc_fail(call, RPC_UNAVAILABLE, "rendezvous: the chief is stopping");
            psrpc__join_request__free_unpacked(r, NULL);
            return;
        }
        if (!s->addrs[k]) {
            s->joined++;
            if (r->rejoin && s->survivor_since == 0) s->survivor_since = cm_now();
        } else if (s->calls[k]) {
            /* A retry of a Join still waiting: the new call replaces it. */
            rpc_fail(s->calls[k], RPC_ABORTED, "rendezvous: rank %d joined again", k);
            s->calls[k] = NULL;
        }
        free(s->addrs[k]);
        s->addrs[k] = cm_strdup(r->ring_addr);
        s->calls[k] = call;
        s->has_state[k] = r->has_state;
        s->step[k] = r->step;
        cm_debug("rendezvous: rank %d joined from %s (%d of %d)", k, r->ring_addr, s->joined,
                 s->nranks);
        maybe_answer(s);
        pthread_mutex_unlock(&s->mu);
    }
    psrpc__join_request__free_unpacked(r, NULL);
}

/* A waiting Join's caller went away (its deadline passed, its process
 * died): it no longer counts toward the next ring, which would otherwise
 * form with a member that is gone (or make the chief wait for it). */
static void on_join_cancel(void *ctx, rpc_call *call) {
    wk_rdv_server *s = ctx;
    pthread_mutex_lock(&s->mu);
    for (int r = 0; r < s->nranks; r++) {
        if (s->calls[r] != call) continue;
        rpc_fail(call, RPC_CANCELLED, "rendezvous: rank %d's Join was cancelled", r);
        s->calls[r] = NULL;
        free(s->addrs[r]);
        s->addrs[r] = NULL;
        s->has_state[r] = 0;
        if (--s->joined == 0) s->survivor_since = 0;
        cm_debug("rendezvous: rank %d left before the ring formed", r);
        break;
    }
    pthread_mutex_unlock(&s->mu);
}

int wk_rdv_server_start(const char *listen_addr, int nranks, uint64_t fingerprint,
                        const char *description, uint64_t job_id, int64_t start_step,
                        const uint8_t *nccl_id, size_t nccl_id_len,
                        const cm_security *sec, wk_rdv_server **out, char *err,
                        size_t errlen) {
    *out = NULL;
    if (nranks < 1 || nccl_id_len > WK_RDV_NCCL_ID_MAX || (nccl_id_len && !nccl_id)) {
        cm_seterr(err, errlen, "rendezvous of %d ranks, NCCL id of %zu bytes", nranks,
                  nccl_id_len);
        return CM_EINVAL;
    }
    wk_rdv_server *s = cm_calloc(1, sizeof *s);
    s->nranks = nranks;
    s->fingerprint = fingerprint;
    s->job_id = job_id;
    s->start_step = start_step;
    if (nccl_id_len) memcpy(s->nccl_id, nccl_id, nccl_id_len);
    s->nccl_id_len = nccl_id_len;
    snprintf(s->description, sizeof s->description, "%s", description ? description : "");
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->min_ranks = nranks;
    s->ended = -1;
    s->wait_ms = INT64_MAX; /* Survivors wait for every rank (set_elastic). */
    s->addrs = cm_calloc((size_t)nranks, sizeof *s->addrs);
    s->calls = cm_calloc((size_t)nranks, sizeof *s->calls);
    s->has_state = cm_calloc((size_t)nranks, sizeof *s->has_state);
    s->step = cm_calloc((size_t)nranks, sizeof *s->step);
    rpc_server_opts o = {.threads = 1,
                         .token = cm_security_token(sec),
                         .tls_cert = sec ? sec->tls_cert : NULL,
                         .tls_key = sec ? sec->tls_key : NULL,
                         .tls_ca = sec && sec->tls_cert ? sec->tls_ca : NULL,
                         .on_cancel = on_join_cancel,
                         .cancel_ctx = s};
    int rc = rpc_server_create(&o, &s->rpc);
    if (rc == CM_OK) rc = rpc_server_add_method(s->rpc, JOIN_METHOD, on_join, s);
    int port = 0;
    if (rc == CM_OK) rc = rpc_server_start(s->rpc, listen_addr, &port);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "rendezvous: cannot listen on %s (%s)", listen_addr,
                  rc == CM_EBUSY ? "address in use or not local" : cm_strerror(rc));
        wk_rdv_server_destroy(s);
        return rc;
    }
    *out = s;
    return CM_OK;
}

/* "ranks 2, 5" not yet joined (mu held). */
static void missing(const wk_rdv_server *s, char *buf, size_t len) {
    size_t at = 0;
    buf[0] = 0;
    for (int r = 0; r < s->nranks && at + 16 < len; r++)
        if (!s->addrs[r]) at += (size_t)snprintf(buf + at, len - at, "%s%d", at ? ", " : "", r);
}

int wk_rdv_server_describe(wk_rdv_server *s, char *buf, size_t len) {
    pthread_mutex_lock(&s->mu);
    char m[256];
    missing(s, m, sizeof m);
    int joined = s->joined;
    snprintf(buf, len, "%d of %d workers joined%s%s", joined, s->nranks,
             joined < s->nranks ? "; missing ranks " : "", joined < s->nranks ? m : "");
    pthread_mutex_unlock(&s->mu);
    return joined;
}

void wk_rdv_server_destroy(wk_rdv_server *s) {
    if (!s) return;
    char m[256];
    wk_rdv_server_describe(s, m, sizeof m);
    pthread_mutex_lock(&s->mu);
    s->closing = 1;
    for (int r = 0; r < s->nranks; r++)
        if (s->calls[r]) {
            rpc_fail(s->calls[r], RPC_UNAVAILABLE,
                     "rendezvous: the chief gave up: %s (not every worker joined in time)", m);
            s->calls[r] = NULL;
        }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->ticker_started) pthread_join(s->ticker, NULL);
    if (s->rpc) {
        rpc_server_shutdown(s->rpc, 500);
        rpc_server_destroy(s->rpc);
    }
    for (int r = 0; r < s->nranks; r++) free(s->addrs[r]);
    free(s->addrs);
    free(s->calls);
    free(s->has_state);
    free(s->step);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

int wk_rdv_join(const char *chief_addr, int rank, int nranks, uint64_t fingerprint,
                const char *description, const char *ring_addr, int64_t timeout_ms,
                const cm_security *sec, wk_rdv_result *out, char *err, size_t errlen) {
    return wk_rdv_join_state(chief_addr, rank, nranks, fingerprint, description, ring_addr, NULL,
                             timeout_ms, sec, out, err, errlen);
}

/* The members of a reply, checked: ascending ranks < nranks, this rank
 * among them (empty: every rank). */
static int take_members(const Psrpc__JoinReply *r, int rank, int nranks, wk_rdv_result *out) {
    size_t m = r->n_members ? r->n_members : (size_t)nranks;
    if (m < 1 || m > (size_t)nranks || r->n_ring_addrs != m || r->root >= m) return CM_EPROTO;
    out->members = cm_calloc(m, sizeof *out->members);
    out->position = -1;
    for (size_t i = 0; i < m; i++) {
        uint32_t k = r->n_members ? r->members[i] : (uint32_t)i;
        if (k >= (uint32_t)nranks || (i && k <= (uint32_t)out->members[i - 1])) return CM_EPROTO;
        out->members[i] = (int)k;
        if ((int)k == rank) out->position = (int)i;
    }
    if (out->position < 0) return CM_EPROTO;
    out->nranks = (int)m;
    out->root = (int)r->root;
    out->generation = r->generation;
    return CM_OK;
}

int wk_rdv_join_state(const char *chief_addr, int rank, int nranks, uint64_t fingerprint,
                      const char *description, const char *ring_addr,
                      const wk_rdv_state *st, int64_t timeout_ms, const cm_security *sec,
                      wk_rdv_result *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    Psrpc__JoinRequest req = PSRPC__JOIN_REQUEST__INIT;
    req.fingerprint = fingerprint;
    req.description = (char *)(description ? description : "");
    req.rank = (uint32_t)rank;
    req.nranks = (uint32_t)nranks;
    req.ring_addr = (char *)ring_addr;
    if (st) {
        req.has_state = st->has_state != 0;
        req.step = st->step;
        req.rejoin = st->rejoin != 0;
    }
    size_t n = protobuf_c_message_get_packed_size(&req.base);
    uint8_t *buf = cm_malloc(n ? n : 1);
    protobuf_c_message_pack(&req.base, buf);
    rpc_client *cli = NULL;
    rpc_channel *ch = NULL;
    rpc_client_opts co = {.token = cm_security_token(sec),
                          .tls_ca = sec ? sec->tls_ca : NULL,
                          .tls_cert = sec ? sec->tls_cert : NULL,
                          .tls_key = sec ? sec->tls_key : NULL,
                          .tls_server_name = sec ? sec->tls_server_name : NULL};
    int rc = rpc_client_create(&co, &cli);
    if (rc == CM_OK) rc = rpc_channel_open(cli, chief_addr, &ch);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "rendezvous: bad chief address '%s'", chief_addr);
        goto out;
    }
    uint8_t *reply = NULL;
    size_t rlen = 0;
    char msg[512];
    /* Wait for the chief to come up, then for everyone, within one deadline.
     * A chief that dies while the call waits (UNAVAILABLE: the connection
     * closed) may be started again by its supervisor: join it then. */
    double t0 = cm_now(), deadline = t0 + (double)timeout_ms / 1e3;
    int code;
    for (;;) {
        int64_t left = (int64_t)((deadline - cm_now()) * 1e3);
        code = rpc_call_sync(ch, JOIN_METHOD, buf, n, left > 1 ? left : 1, RPC_WAIT_FOR_READY,
                             &reply, &rlen, msg, sizeof msg);
        if (code != RPC_UNAVAILABLE || cm_now() + 0.1 >= deadline ||
            strstr(msg, "gave up") || strstr(msg, "is stopping"))
            break;
        cm_debug("rendezvous: the chief %s went away (%s); joining again", chief_addr, msg);
        usleep(100 * 1000);
    }
    if (code == RPC_OUT_OF_RANGE) {
        cm_seterr(err, errlen, "%s (the chief %s)", msg, chief_addr);
        rc = CM_ESHUTDOWN;
        goto out;
    }
    if (code != RPC_OK) {
        cm_seterr(err, errlen, "rendezvous at the chief %s failed after %lld ms: %s: %s%s",
                  chief_addr, (long long)((cm_now() - t0) * 1e3), rpc_status_name(code), msg,
                  code == RPC_DEADLINE_EXCEEDED ? " (not every worker joined in time)" : "");
        rc = rpc_status_to_cm(code);
        goto out;
    }
    Psrpc__JoinReply *r = psrpc__join_reply__unpack(NULL, rlen, reply);
    free(reply);
    if (!r || r->nccl_id.len > WK_RDV_NCCL_ID_MAX || take_members(r, rank, nranks, out) != CM_OK) {
        cm_seterr(err, errlen, "rendezvous: malformed JoinReply from %s", chief_addr);
        if (r) psrpc__join_reply__free_unpacked(r, NULL);
        free(out->members);
        memset(out, 0, sizeof *out);
        rc = CM_EPROTO;
        goto out;
    }
    out->ring_addrs = cm_calloc((size_t)out->nranks, sizeof *out->ring_addrs);
    for (int i = 0; i < out->nranks; i++) out->ring_addrs[i] = cm_strdup(r->ring_addrs[i]);
    out->job_id = r->job_id;
    out->start_step = r->start_step;
    if (r->nccl_id.len) memcpy(out->nccl_id, r->nccl_id.data, r->nccl_id.len);
    out->nccl_id_len = r->nccl_id.len;
    psrpc__join_reply__free_unpacked(r, NULL);
out:
    if (ch) rpc_channel_close(ch);
    rpc_client_destroy(cli);
    free(buf);
    return rc;
}

void wk_rdv_result_free(wk_rdv_result *r) {
    free(r->members);
    r->members = NULL;
    if (!r->ring_addrs) return;
    for (int i = 0; i < r->nranks; i++) free(r->ring_addrs[i]);
    free(r->ring_addrs);
    r->ring_addrs = NULL;
}
