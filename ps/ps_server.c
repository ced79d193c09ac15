/* ps_server.c - the gRPC handlers of a PS shard.
 * SPDX-License-Identifier: MIT
 *
 * Handlers run on the rpc layer's threads. Push is answered before the
 * handler returns; Pull registers with the shard and is answered from
 * whichever thread publishes the version it waits for, so no thread blocks
 * while a pull waits. PushPull answers with the pushed partitions only, as
 * soon as they are final (ps_shard_pull_parts). Pull replies point into the snapshot (zero-copy); each
 * tensor segment holds a snapshot reference that gRPC releases once sent.
 */
#include "ps/ps_server.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "proto/rpc.h"
#include "ps/ps_shard.h"
#include "ps/ps_wire.h"

struct ps_server {
    ps_server_cfg cfg;
    ps_shard *shard;
    rpc_server *rpc;
    uint64_t fingerprint;
    char identity[256];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* Protected by mu. */
    int stopping;
    char reason[256];
};

static int check_cluster(ps_server *s, rpc_call *call, const Psrpc__Cluster *c) {
    if (c && c->fingerprint == s->fingerprint) return 1;
    ps_shard_count_bad(s->shard);
    if (!c)
        rpc_fail(call, RPC_FAILED_PRECONDITION,
                 "request carries no cluster fingerprint; this PS shard %d serves %s",
                 s->cfg.shard, s->identity);
    else
        rpc_fail(call, RPC_FAILED_PRECONDITION,
                 "cluster mismatch: this PS shard %d serves %s [%016llx]; the caller (rank %u) "
                 "has %s [%016llx]",
                 s->cfg.shard, s->identity, (unsigned long long)s->fingerprint, c->rank,
                 c->description && c->description[0] ? c->description : "(no description)",
                 (unsigned long long)c->fingerprint);
    return 0;
}

static void reply_packed(rpc_call *call, const ProtobufCMessage *m) {
    uint8_t small[256];
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *p = n <= sizeof small ? small : cm_malloc(n);
    protobuf_c_message_pack(m, p);
    rpc_seg seg = {.data = p, .len = n};
    rpc_reply(call, &seg, 1);
    if (p != small) free(p);
}

/* ------------------------------------------------------------ Init */

static void on_init(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    Psrpc__InitRequest *r = psrpc__init_request__unpack(NULL, len, req);
    if (!r) {
        ps_shard_count_bad(s->shard);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed InitRequest");
        return;
    }
    if (!check_cluster(s, call, r->cluster)) goto out;
    int kind = r->optimizer ? ps_optim_parse(r->optimizer->kind) : -1;
    if (kind < 0) {
        ps_shard_count_bad(s->shard);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "unknown optimizer '%s'",
                 r->optimizer ? r->optimizer->kind : "(none)");
        goto out;
    }
    ps_shard_config cfg = {
        .optim = {.kind = kind, .lr = r->optimizer->lr, .momentum = r->optimizer->momentum,
                  .beta1 = r->optimizer->beta1, .beta2 = r->optimizer->beta2,
                  .epsilon = r->optimizer->epsilon},
        .seed = r->seed,
        .num_workers = (int)r->num_workers,
        .sync = r->sync == PSRPC__SYNC_MODE__SYNC_ASYNC ? PS_ASYNC
                : r->sync == PSRPC__SYNC_MODE__SYNC_SYNC ? PS_SYNC
                                                          : 0,
        .aggregate = r->aggregate == PSRPC__AGGREGATE__AGGREGATE_SUM ? PS_AGG_SUM : PS_AGG_MEAN,
        .zero_init = r->zero_init,
    };
    char err[512];
    int64_t version = 0;
    int rc = ps_shard_init(s->shard, &cfg, &version, err, sizeof err);
    if (rc == CM_EBUSY) {
        rpc_fail(call, RPC_FAILED_PRECONDITION, "%s", err);
    } else if (rc != CM_OK) {
        ps_shard_count_bad(s->shard);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "%s", err);
    } else {
        cm_debug("shard %d initialised by rank %u", s->cfg.shard, r->cluster->rank);
        Psrpc__InitReply rep = PSRPC__INIT_REPLY__INIT;
        rep.version = version;
        reply_packed(call, &rep.base);
    }
out:
    psrpc__init_request__free_unpacked(r, NULL);
}

/* ------------------------------------------------------------ Push */

/* Decode and apply a push. Returns 1 with *step and *version set when it
 * was accepted (or a duplicate); otherwise the call has been failed. */
static int do_push(ps_server *s, rpc_call *call, const uint8_t *req, size_t len, int64_t *step,
                   int64_t *version, int *duplicate, uint32_t **parts, int *nparts) {
    ps_wire_msg m;
    char err[512];
    if (ps_wire_decode(&psrpc__push_request__descriptor, 3, req, len, &m, err, sizeof err)) {
        ps_shard_count_bad(s->shard);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "%s", err);
        return 0;
    }
    Psrpc__PushRequest *r = (Psrpc__PushRequest *)m.msg;
    int ok = 0;
    if (!check_cluster(s, call, r->cluster)) goto out;
    ps_grad small[16];
    ps_grad *g = m.ntensors <= 16 ? small : cm_malloc((size_t)m.ntensors * sizeof *g);
    for (int i = 0; i < m.ntensors; i++) {
        const ps_wire_tensor *t = &m.tensors[i];
        g[i] = (ps_grad){.part = t->meta->part,
                         .dtype_ok = t->meta->dtype == PSRPC__DTYPE__DTYPE_FLOAT32,
                         .nshape = (int)t->meta->n_shape,
                         .shape = t->meta->shape,
                         .data = t->data,
                         .len = t->len};
    }
    *step = r->step;
    if (parts) {
        *nparts = m.ntensors;
        *parts = cm_malloc(((size_t)m.ntensors + 1) * sizeof **parts);
        for (int i = 0; i < m.ntensors; i++) (*parts)[i] = g[i].part;
    }
    int rc = ps_shard_push(s->shard, (int)r->cluster->rank, r->step, g, m.ntensors, version, err,
                           sizeof err);
    if (g != small) free(g);
    if (rc == PS_PUSH_OK || rc == PS_PUSH_DUPLICATE) {
        *duplicate = rc == PS_PUSH_DUPLICATE;
        ok = 1;
    } else {
        rpc_fail(call, rc == PS_PUSH_INVALID ? RPC_INVALID_ARGUMENT : RPC_FAILED_PRECONDITION,
                 "%s", err);
        if (parts) {
            free(*parts);
            *parts = NULL;
        }
    }
out:
    ps_wire_msg_free(&m);
    return ok;
}

static void on_push(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    int64_t step = 0, version = 0;
    int duplicate = 0;
    if (!do_push(s, call, req, len, &step, &version, &duplicate, NULL, NULL)) return;
    Psrpc__PushReply rep = PSRPC__PUSH_REPLY__INIT;
    rep.version = version;
    rep.duplicate = duplicate;
    reply_packed(call, &rep.base);
}

/* ------------------------------------------------------------ Pull */

static void release_snapshot(void *ud) { ps_snapshot_unref(ud); }

typedef struct pull_ctx {
    ps_server *s;
    rpc_call *call;
    int nparts;      /* 0: every partition of the shard. */
    uint32_t *parts; /* Placement ids to answer with (PushPull), owned. */
} pull_ctx;

static void answer_pull(void *ud, ps_snapshot *snap) {
    pull_ctx *pc = ud;
    ps_server *s = pc->s;
    rpc_call *call = pc->call;
    if (!snap) {
        free(pc->parts);
        free(pc);
        rpc_fail(call, RPC_UNAVAILABLE, "PS shard %d is shutting down", s->cfg.shard);
        return;
    }
    int nparts = pc->nparts;
    const uint32_t *parts = pc->parts;
    if (!nparts) parts = ps_shard_parts(s->shard, &nparts);
    ps_wire_writer w;
    ps_wire_writer_init(&w);
    Psrpc__PullReply rep = PSRPC__PULL_REPLY__INIT;
    rep.version = ps_snapshot_version(snap);
    ps_wire_put_message(&w, &rep.base);
    for (int i = 0; i < nparts; i++) {
        const cm_partition *p = &s->cfg.placement->parts[parts[i]];
        const cm_var *v = &s->cfg.model->vars[p->var];
        uint64_t shape[CM_VAR_MAX_DIMS];
        shape[0] = p->row_end - p->row_begin;
        for (int d = 1; d < v->ndims; d++) shape[d] = (uint64_t)v->dims[d];
        Psrpc__Tensor t = PSRPC__TENSOR__INIT;
        t.part = parts[i];
        t.dtype = PSRPC__DTYPE__DTYPE_FLOAT32;
        t.n_shape = (size_t)v->ndims;
        t.shape = shape;
        ps_snapshot_ref(snap);
        ps_wire_put_tensor(&w, 2, &t,
                           ps_snapshot_part(snap, ps_shard_local_index(s->shard, parts[i])),
                           p->count * sizeof(float), release_snapshot, snap);
    }
    int nsegs;
    const rpc_seg *segs = ps_wire_segs(&w, &nsegs);
    rpc_reply(call, segs, nsegs);
    ps_wire_writer_free(&w, 0);
    ps_snapshot_unref(snap);
    free(pc->parts);
    free(pc);
}

static void on_pull(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    Psrpc__PullRequest *r = psrpc__pull_request__unpack(NULL, len, req);
    if (!r) {
        ps_shard_count_bad(s->shard);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed PullRequest");
        return;
    }
    if (check_cluster(s, call, r->cluster)) {
        pull_ctx *pc = cm_calloc(1, sizeof *pc);
        pc->s = s;
        pc->call = call;
        ps_shard_pull(s->shard, r->min_version, answer_pull, pc);
    }
    psrpc__pull_request__free_unpacked(r, NULL);
}

static void on_push_pull(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    int64_t step = 0, version = 0;
    int duplicate = 0, nparts = 0;
    uint32_t *parts = NULL;
    if (!do_push(s, call, req, len, &step, &version, &duplicate, &parts, &nparts)) return;
    /* The reply carries the pushed partitions: in sync mode as soon as they
     * are final for step + 1 (maybe before the rest of the shard), in async
     * mode at once, from the newest version. */
    pull_ctx *pc = cm_calloc(1, sizeof *pc);
    pc->s = s;
    pc->call = call;
    pc->nparts = nparts;
    pc->parts = parts;
    if (ps_shard_is_async(s->shard))
        ps_shard_pull(s->shard, 0, answer_pull, pc);
    else if (nparts == 0) /* A shard that owns nothing. */
        ps_shard_pull(s->shard, step + 1, answer_pull, pc);
    else if (ps_shard_pull_parts(s->shard, step, parts, nparts, answer_pull, pc) != CM_OK)
        answer_pull(pc, NULL); /* Cannot happen: the push validated them. */
}

/* ------------------------------------------------------------ Stats, Shutdown */

static void on_stats(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    Psrpc__StatsRequest *r = psrpc__stats_request__unpack(NULL, len, req);
    if (!r) {
        ps_shard_count_bad(s->shard);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed StatsRequest");
        return;
    }
    if (check_cluster(s, call, r->cluster)) {
        ps_shard_stats st;
        ps_shard_stats_get(s->shard, &st);
        Psrpc__StatsReply rep = PSRPC__STATS_REPLY__INIT;
        rep.version = st.version;
        rep.pushes = st.pushes;
        rep.duplicate_pushes = st.duplicate_pushes;
        rep.stale_pushes = st.stale_pushes;
        rep.early_pushes = st.early_pushes;
        rep.pulls = st.pulls;
        rep.bad_requests = st.bad_requests;
        rep.num_parts = (uint32_t)st.nparts;
        rep.bytes = st.bytes;
        reply_packed(call, &rep.base);
    }
    psrpc__stats_request__free_unpacked(r, NULL);
}

static void on_shutdown(void *ctx, rpc_call *call, const uint8_t *req, size_t len) {
    ps_server *s = ctx;
    Psrpc__ShutdownRequest *r = psrpc__shutdown_request__unpack(NULL, len, req);
    if (!r) {
        ps_shard_count_bad(s->shard);
        rpc_fail(call, RPC_INVALID_ARGUMENT, "malformed ShutdownRequest");
        return;
    }
    if (check_cluster(s, call, r->cluster)) {
        char why[256];
        snprintf(why, sizeof why, "shutdown requested by rank %u: %s", r->cluster->rank,
                 r->reason && r->reason[0] ? r->reason : "(no reason)");
        Psrpc__ShutdownReply rep = PSRPC__SHUTDOWN_REPLY__INIT;
        reply_packed(call, &rep.base);
        ps_server_request_stop(s, why);
    }
    psrpc__shutdown_request__free_unpacked(r, NULL);
}

/* ------------------------------------------------------------ lifecycle */

int ps_server_create(const ps_server_cfg *cfg, ps_server **out) {
    *out = NULL;
    ps_server *s = cm_calloc(1, sizeof *s);
    s->cfg = *cfg;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->fingerprint = ps_wire_identity(cfg->model, cfg->placement, s->identity, sizeof s->identity);
    int rc = ps_shard_create(cfg->model, cfg->placement, cfg->shard, &s->shard);
    if (rc != CM_OK) goto fail;
    rpc_server_opts o = {.threads = cfg->threads > 0 ? cfg->threads : 2,
                         .max_message = cfg->max_message};
    if ((rc = rpc_server_create(&o, &s->rpc)) != CM_OK) goto fail;
    rpc_server_add_method(s->rpc, "/psrpc.Ps/Initialize", on_init, s);
    rpc_server_add_method(s->rpc, "/psrpc.Ps/Push", on_push, s);
    rpc_server_add_method(s->rpc, "/psrpc.Ps/Pull", on_pull, s);
    rpc_server_add_method(s->rpc, "/psrpc.Ps/PushPull", on_push_pull, s);
    rpc_server_add_method(s->rpc, "/psrpc.Ps/Stats", on_stats, s);
    rpc_server_add_method(s->rpc, "/psrpc.Ps/Shutdown", on_shutdown, s);
    *out = s;
    return CM_OK;
fail:
    ps_server_destroy(s, 0);
    return rc;
}

int ps_server_start(ps_server *s, const char *addr, int *port) {
    return rpc_server_start(s->rpc, addr, port);
}

int ps_server_wait(ps_server *s, int timeout_ms) {
    pthread_mutex_lock(&s->mu);
    if (timeout_ms < 0) {
        while (!s->stopping) pthread_cond_wait(&s->cv, &s->mu);
    } else if (!s->stopping) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += timeout_ms / 1000;
        ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        while (!s->stopping && pthread_cond_timedwait(&s->cv, &s->mu, &ts) != ETIMEDOUT) {
        }
    }
    int stopping = s->stopping;
    pthread_mutex_unlock(&s->mu);
    return stopping;
}

void ps_server_request_stop(ps_server *s, const char *reason) {
    pthread_mutex_lock(&s->mu);
    if (!s->stopping) {
        s->stopping = 1;
        snprintf(s->reason, sizeof s->reason, "%s", reason ? reason : "stop requested");
    }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

const char *ps_server_stop_reason(ps_server *s) { return s->reason; }

void ps_server_destroy(ps_server *s, int grace_ms) {
    if (!s) return;
    if (s->shard) ps_shard_abort_waiters(s->shard);
    if (s->rpc) {
        rpc_server_shutdown(s->rpc, grace_ms);
        rpc_server_destroy(s->rpc);
    }
    ps_shard_destroy(s->shard);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
