/* wk_rendezvous.c - Join at the chief, answered once every rank is in.
 * SPDX-License-Identifier: MIT
 */
#include "worker/sync/wk_rendezvous.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    /* Protected by mu. */
    char **addrs;     /* Per rank: joined address, or NULL. */
    rpc_call **calls; /* Per rank: the Join waiting for the others. */
    int joined;
    int closing;      /* Destroy has begun: refuse new Joins. */
};

/* Reply to every waiting Join with the table (mu held). */
static void answer_all(wk_rdv_server *s) {
    Psrpc__JoinReply rep = PSRPC__JOIN_REPLY__INIT;
    rep.n_ring_addrs = (size_t)s->nranks;
    rep.ring_addrs = s->addrs;
    rep.job_id = s->job_id;
    rep.start_step = s->start_step;
    rep.nccl_id.data = s->nccl_id;
    rep.nccl_id.len = s->nccl_id_len;
    size_t n = protobuf_c_message_get_packed_size(&rep.base);
    uint8_t *buf = cm_malloc(n ? n : 1);
    protobuf_c_message_pack(&rep.base, buf);
    for (int r = 0; r < s->nranks; r++) {
        if (!s->calls[r]) continue;
        rpc_seg seg = {.data = buf, .len = n};
        rpc_reply(s->calls[r], &seg, 1);
        s->calls[r] = NULL;
    }
    free(buf);
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
        if (s->closing) {
            pthread_mutex_unlock(&s->mu);
            rpc_fail(call, RPC_UNAVAILABLE, "rendezvous: the chief is stopping");
            psrpc__join_request__free_unpacked(r, NULL);
            return;
        }
        if (!s->addrs[k]) {
            s->joined++;
        } else if (s->calls[k]) {
            /* A retry of a Join still waiting: the new call replaces it. */
            rpc_fail(s->calls[k], RPC_ABORTED, "rendezvous: rank %d joined again", k);
            s->calls[k] = NULL;
        }
        free(s->addrs[k]);
        s->addrs[k] = cm_strdup(r->ring_addr);
        s->calls[k] = call;
        cm_debug("rendezvous: rank %d joined from %s (%d of %d)", k, r->ring_addr, s->joined,
                 s->nranks);
        if (s->joined == s->nranks) answer_all(s);
        pthread_mutex_unlock(&s->mu);
    }
    psrpc__join_request__free_unpacked(r, NULL);
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
    s->addrs = cm_calloc((size_t)nranks, sizeof *s->addrs);
    s->calls = cm_calloc((size_t)nranks, sizeof *s->calls);
    rpc_server_opts o = {.threads = 1,
                         .token = cm_security_token(sec),
                         .tls_cert = sec ? sec->tls_cert : NULL,
                         .tls_key = sec ? sec->tls_key : NULL,
                         .tls_ca = sec && sec->tls_cert ? sec->tls_ca : NULL};
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
    pthread_mutex_unlock(&s->mu);
    if (s->rpc) {
        rpc_server_shutdown(s->rpc, 500);
        rpc_server_destroy(s->rpc);
    }
    for (int r = 0; r < s->nranks; r++) free(s->addrs[r]);
    free(s->addrs);
    free(s->calls);
    pthread_mutex_destroy(&s->mu);
    free(s);
}

int wk_rdv_join(const char *chief_addr, int rank, int nranks, uint64_t fingerprint,
                const char *description, const char *ring_addr, int64_t timeout_ms,
                const cm_security *sec, wk_rdv_result *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    Psrpc__JoinRequest req = PSRPC__JOIN_REQUEST__INIT;
    req.fingerprint = fingerprint;
    req.description = (char *)(description ? description : "");
    req.rank = (uint32_t)rank;
    req.nranks = (uint32_t)nranks;
    req.ring_addr = (char *)ring_addr;
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
    /* Wait for the chief to come up, then for everyone, within one deadline. */
    int code = rpc_call_sync(ch, JOIN_METHOD, buf, n, timeout_ms, RPC_WAIT_FOR_READY, &reply,
                             &rlen, msg, sizeof msg);
    if (code != RPC_OK) {
        cm_seterr(err, errlen, "rendezvous at the chief %s failed after %lld ms: %s: %s%s",
                  chief_addr, (long long)timeout_ms, rpc_status_name(code), msg,
                  code == RPC_DEADLINE_EXCEEDED ? " (not every worker joined in time)" : "");
        rc = rpc_status_to_cm(code);
        goto out;
    }
    Psrpc__JoinReply *r = psrpc__join_reply__unpack(NULL, rlen, reply);
    free(reply);
    if (!r || (int)r->n_ring_addrs != nranks || r->nccl_id.len > WK_RDV_NCCL_ID_MAX) {
        cm_seterr(err, errlen, "rendezvous: malformed JoinReply from %s", chief_addr);
        if (r) psrpc__join_reply__free_unpacked(r, NULL);
        rc = CM_EPROTO;
        goto out;
    }
    out->nranks = nranks;
    out->ring_addrs = cm_calloc((size_t)nranks, sizeof *out->ring_addrs);
    for (int i = 0; i < nranks; i++) out->ring_addrs[i] = cm_strdup(r->ring_addrs[i]);
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
    if (!r->ring_addrs) return;
    for (int i = 0; i < r->nranks; i++) free(r->ring_addrs[i]);
    free(r->ring_addrs);
    r->ring_addrs = NULL;
}
