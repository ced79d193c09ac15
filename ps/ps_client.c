/* ps_client.c - push and pull to all shards in parallel, with retries.
 * SPDX-License-Identifier: MIT
 *
 * A ticket has one sub-call per shard. 'pending' counts what the ticket
 * still waits for: each sub-call's completion and each zero-copy segment's
 * release (so the caller's buffer is free when the ticket is). Completions
 * run on the rpc client thread; retries are issued by the waiting thread,
 * after a backoff, so the client thread never sleeps.
 */
#include "ps/ps_client.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "proto/rpc.h"
#include "ps/ps_wire.h"

enum { OP_PUSH = 1, OP_PULL = 2, OP_PUSH_PULL = 3 };

struct ps_client {
    ps_client_cfg cfg;
    int nshards;
    char **addrs;
    rpc_client *rpc;
    rpc_channel **ch;
    uint64_t fingerprint;
    char identity[256];
    int *nparts;      /* Per shard. */
    uint32_t **parts; /* Per shard: placement ids. */
};

typedef struct sub {
    struct ps_ticket *t;
    int shard;
    int nparts;            /* Partitions this sub-call pushes / expects. */
    const uint32_t *parts; /* Placement ids: the client's list for the
                            * whole shard, or the ticket's 'own'. */
    int attempts;
    int code; /* gRPC status of the last attempt. */
    int cm;   /* CM status after decoding. */
    int64_t version;
    char msg[384];
} sub;

struct ps_ticket {
    ps_client *c;
    int op;
    int64_t step;
    const float *grad;
    float *params;
    double start;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int pending; /* Protected by mu. */
    int nsubs;
    sub *subs;
    uint32_t *own; /* Partition lists of a partial push-pull. */
};

static void ticket_dec(ps_ticket *t) {
    pthread_mutex_lock(&t->mu);
    if (--t->pending == 0) pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

static void release_seg(void *ud) { ticket_dec(ud); }

static void fill_cluster(ps_client *c, Psrpc__Cluster *cl) {
    psrpc__cluster__init(cl);
    cl->fingerprint = c->fingerprint;
    cl->description = c->identity;
    cl->rank = (uint32_t)c->cfg.rank;
}

/* Copy a pull reply from shard sh into params; CM_OK or CM_EINVAL. */
static int take_pull_reply(ps_client *c, int sh, int nexpect, const uint8_t *buf, size_t len,
                           float *params, int64_t *version, char *err, size_t errlen) {
    ps_wire_msg m;
    if (ps_wire_decode(&psrpc__pull_reply__descriptor, 2, buf, len, &m, err, errlen))
        return CM_EINVAL;
    int rc = CM_OK;
    if (m.ntensors != nexpect) {
        cm_seterr(err, errlen, "pull reply has %d partitions, expected %d", m.ntensors,
                  nexpect);
        rc = CM_EINVAL;
    }
    for (int i = 0; i < m.ntensors && rc == CM_OK; i++) {
        const ps_wire_tensor *t = &m.tensors[i];
        uint32_t id = t->meta->part;
        if (id >= (uint32_t)c->cfg.placement->nparts ||
            c->cfg.placement->parts[id].shard != sh ||
            t->len != c->cfg.placement->parts[id].count * sizeof(float)) {
            cm_seterr(err, errlen, "pull reply: bad partition %u (%zu bytes)", id, t->len);
            rc = CM_EINVAL;
            break;
        }
        memcpy(params + c->cfg.placement->parts[id].offset, t->data, t->len);
    }
    *version = ((Psrpc__PullReply *)m.msg)->version;
    ps_wire_msg_free(&m);
    return rc;
}

static void on_done(void *ud, int code, const char *message, const uint8_t *reply, size_t len) {
    sub *s = ud;
    ps_ticket *t = s->t;
    s->code = code;
    s->cm = rpc_status_to_cm(code);
    if (code != RPC_OK) {
        snprintf(s->msg, sizeof s->msg, "%s: %s", rpc_status_name(code), message);
    } else if (t->op == OP_PULL || t->op == OP_PUSH_PULL) {
        int nexpect = t->op == OP_PULL ? t->c->nparts[s->shard] : s->nparts;
        s->cm = take_pull_reply(t->c, s->shard, nexpect, reply, len, t->params, &s->version,
                                s->msg, sizeof s->msg);
    } else {
        Psrpc__PushReply *r = psrpc__push_reply__unpack(NULL, len, reply);
        if (r) {
            s->version = r->version;
            psrpc__push_reply__free_unpacked(r, NULL);
        } else {
            s->cm = CM_EINVAL;
            snprintf(s->msg, sizeof s->msg, "malformed PushReply");
        }
    }
    ticket_dec(t);
}

static void issue(ps_ticket *t, sub *s) {
    ps_client *c = t->c;
    int sh = s->shard;
    s->attempts++;
    s->code = -1;
    s->cm = CM_OK;
    s->msg[0] = 0;
    ps_wire_writer w;
    ps_wire_writer_init(&w);
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    const char *method;
    if (t->op == OP_PUSH || t->op == OP_PUSH_PULL) {
        method = t->op == OP_PUSH ? "/psrpc.Ps/Push" : "/psrpc.Ps/PushPull";
        Psrpc__PushRequest req = PSRPC__PUSH_REQUEST__INIT;
        req.cluster = &cl;
        req.step = t->step;
        ps_wire_put_message(&w, &req.base);
        pthread_mutex_lock(&t->mu);
        t->pending += 1 + s->nparts;
        pthread_mutex_unlock(&t->mu);
        for (int i = 0; i < s->nparts; i++) {
            const cm_partition *p = &c->cfg.placement->parts[s->parts[i]];
            ps_wire_put_part(&w, 3, c->cfg.model, c->cfg.placement, s->parts[i],
                             t->grad + p->offset, release_seg, t);
        }
    } else {
        method = "/psrpc.Ps/Pull";
        Psrpc__PullRequest req = PSRPC__PULL_REQUEST__INIT;
        req.cluster = &cl;
        req.min_version = t->step;
        ps_wire_put_message(&w, &req.base);
        pthread_mutex_lock(&t->mu);
        t->pending += 1;
        pthread_mutex_unlock(&t->mu);
    }
    int nsegs;
    const rpc_seg *segs = ps_wire_segs(&w, &nsegs);
    rpc_call_start(c->ch[sh], method, segs, nsegs, c->cfg.deadline_ms, 0, on_done, s);
    ps_wire_writer_free(&w, 0);
}

static ps_ticket *ticket_new(ps_client *c, int op, int64_t step) {
    ps_ticket *t = cm_calloc(1, sizeof *t);
    t->c = c;
    t->op = op;
    t->step = step;
    t->start = cm_now();
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    t->nsubs = c->nshards;
    t->subs = cm_calloc((size_t)c->nshards, sizeof *t->subs);
    for (int i = 0; i < c->nshards; i++) {
        t->subs[i].t = t;
        t->subs[i].shard = i;
        t->subs[i].nparts = c->nparts[i];
        t->subs[i].parts = c->parts[i];
    }
    return t;
}

int ps_client_push(ps_client *c, int64_t step, const float *grad, ps_ticket **out) {
    ps_ticket *t = ticket_new(c, OP_PUSH, step);
    t->grad = grad;
    for (int i = 0; i < c->nshards; i++) issue(t, &t->subs[i]);
    *out = t;
    return CM_OK;
}

int ps_client_push_pull(ps_client *c, int64_t step, const float *grad, float *params,
                        ps_ticket **out) {
    ps_ticket *t = ticket_new(c, OP_PUSH_PULL, step);
    t->grad = grad;
    t->params = params;
    for (int i = 0; i < c->nshards; i++) issue(t, &t->subs[i]);
    *out = t;
    return CM_OK;
}

int ps_client_push_pull_parts(ps_client *c, int64_t step, const float *grad, float *params,
                              const uint32_t *parts, int nparts, ps_ticket **out) {
    *out = NULL;
    const cm_placement *pl = c->cfg.placement;
    if (nparts < 1 || nparts > pl->nparts) return CM_EINVAL;
    /* Group the partitions by shard, in each shard's (ascending) order;
     * the same id twice is refused. */
    uint8_t *seen = cm_calloc((size_t)pl->nparts, 1);
    for (int i = 0; i < nparts; i++) {
        if (parts[i] >= (uint32_t)pl->nparts || seen[parts[i]]) {
            free(seen);
            return CM_EINVAL;
        }
        seen[parts[i]] = 1;
    }
    ps_ticket *t = ticket_new(c, OP_PUSH_PULL, step);
    t->grad = grad;
    t->params = params;
    t->own = cm_malloc((size_t)nparts * sizeof *t->own);
    int k = 0, at = 0;
    for (int sh = 0; sh < c->nshards; sh++) {
        sub *s = NULL;
        for (int i = 0; i < c->nparts[sh]; i++) {
            if (!seen[c->parts[sh][i]]) continue;
            if (!s) {
                s = &t->subs[k++];
                s->shard = sh;
                s->nparts = 0;
                s->parts = t->own + at;
            }
            t->own[at++] = c->parts[sh][i];
            s->nparts++;
        }
    }
    t->nsubs = k;
    free(seen);
    for (int i = 0; i < t->nsubs; i++) issue(t, &t->subs[i]);
    *out = t;
    return CM_OK;
}

int ps_client_pull(ps_client *c, int64_t min_version, float *params, ps_ticket **out) {
    ps_ticket *t = ticket_new(c, OP_PULL, min_version);
    t->params = params;
    for (int i = 0; i < c->nshards; i++) issue(t, &t->subs[i]);
    *out = t;
    return CM_OK;
}

static void ticket_free(ps_ticket *t) {
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    free(t->subs);
    free(t->own);
    free(t);
}

int ps_ticket_wait(ps_ticket *t, int64_t *version, char *err, size_t errlen) {
    ps_client *c = t->c;
    int rc = CM_OK;
    for (;;) {
        pthread_mutex_lock(&t->mu);
        while (t->pending > 0) pthread_cond_wait(&t->cv, &t->mu);
        pthread_mutex_unlock(&t->mu);
        int retry = 0, attempts = 0;
        for (int i = 0; i < t->nsubs; i++)
            if (t->subs[i].code == RPC_UNAVAILABLE) {
                retry = 1;
                if (t->subs[i].attempts > attempts) attempts = t->subs[i].attempts;
            }
        double elapsed_ms = (cm_now() - t->start) * 1e3;
        if (!retry || elapsed_ms >= (double)c->cfg.connect_timeout_ms) break;
        int backoff = 50 << (attempts < 5 ? attempts : 5); /* 100 ms .. 1.6 s */
        usleep((useconds_t)backoff * 1000);
        for (int i = 0; i < t->nsubs; i++)
            if (t->subs[i].code == RPC_UNAVAILABLE) issue(t, &t->subs[i]);
    }
    int64_t vmin = INT64_MAX;
    for (int i = 0; i < t->nsubs; i++) {
        sub *s = &t->subs[i];
        if (s->cm != CM_OK && rc == CM_OK) {
            rc = s->cm;
            cm_seterr(err, errlen, "%s to PS %d (%s) failed after %d attempt%s: %s",
                      t->op == OP_PUSH ? "push" : t->op == OP_PULL ? "pull" : "push-pull",
                      s->shard, c->addrs[s->shard], s->attempts,
                      s->attempts == 1 ? "" : "s", s->msg);
        }
        if (s->version < vmin) vmin = s->version;
    }
    if (version) *version = vmin;
    ticket_free(t);
    return rc;
}

/* A blocking call to one shard, retrying UNAVAILABLE until the connect
 * timeout if 'retry' is set. Returns the gRPC code; reply/len as rpc_call_sync. */
static int call_shard(ps_client *c, int sh, const char *method, const ProtobufCMessage *req,
                      int retry, uint8_t **reply, size_t *len, char *msg, size_t msglen) {
    size_t n = protobuf_c_message_get_packed_size(req);
    uint8_t *buf = cm_malloc(n);
    protobuf_c_message_pack(req, buf);
    double start = cm_now();
    int code;
    for (int attempt = 0;; attempt++) {
        code = rpc_call_sync(c->ch[sh], method, buf, n, c->cfg.deadline_ms, 0, reply, len, msg,
                             msglen);
        if (!retry || code != RPC_UNAVAILABLE ||
            (cm_now() - start) * 1e3 >= (double)c->cfg.connect_timeout_ms)
            break;
        usleep((useconds_t)(50 << (attempt < 5 ? attempt + 1 : 5)) * 1000);
    }
    free(buf);
    return code;
}

int ps_client_init(ps_client *c, const ps_init_cfg *init, char *err, size_t errlen) {
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__OptimizerConfig oc = PSRPC__OPTIMIZER_CONFIG__INIT;
    oc.kind = (char *)ps_optim_name(init->optim.kind);
    oc.lr = init->optim.lr;
    oc.momentum = init->optim.momentum;
    oc.beta1 = init->optim.beta1;
    oc.beta2 = init->optim.beta2;
    oc.epsilon = init->optim.epsilon;
    Psrpc__InitRequest req = PSRPC__INIT_REQUEST__INIT;
    req.cluster = &cl;
    req.optimizer = &oc;
    req.seed = init->seed;
    req.num_workers = (uint32_t)init->num_workers;
    req.sync = init->async ? PSRPC__SYNC_MODE__SYNC_ASYNC : PSRPC__SYNC_MODE__SYNC_SYNC;
    req.aggregate = init->sum ? PSRPC__AGGREGATE__AGGREGATE_SUM : PSRPC__AGGREGATE__AGGREGATE_MEAN;
    req.zero_init = init->zero_init;
    for (int i = 0; i < c->nshards; i++) {
        uint8_t *reply = NULL;
        size_t len = 0;
        char msg[512];
        /* --init-from: the shard's partitions of init->values. */
        int nv = init->values ? c->nparts[i] : 0;
        Psrpc__Tensor *vals = nv ? cm_calloc((size_t)nv, sizeof *vals) : NULL;
        Psrpc__Tensor **vptrs = nv ? cm_calloc((size_t)nv, sizeof *vptrs) : NULL;
        uint64_t(*shapes)[CM_VAR_MAX_DIMS] = nv ? cm_calloc((size_t)nv, sizeof *shapes) : NULL;
        for (int k = 0; k < nv; k++) {
            const cm_partition *p = &c->cfg.placement->parts[c->parts[i][k]];
            ps_wire_part_meta(c->cfg.model, c->cfg.placement, c->parts[i][k], shapes[k], &vals[k]);
            vals[k].data.data = (uint8_t *)(init->values + p->offset);
            vals[k].data.len = p->count * sizeof(float);
            vptrs[k] = &vals[k];
        }
        req.n_values = (size_t)nv;
        req.values = vptrs;
        int code = call_shard(c, i, "/psrpc.Ps/Initialize", &req.base, 1, &reply, &len, msg, sizeof msg);
        free(reply);
        free(vals);
        free(vptrs);
        free(shapes);
        if (code != RPC_OK) {
            cm_seterr(err, errlen, "init of PS %d (%s) failed: %s: %s", i, c->addrs[i],
                      rpc_status_name(code), msg);
            return rpc_status_to_cm(code);
        }
    }
    return CM_OK;
}

int ps_client_shutdown_servers(ps_client *c, const char *reason, char *err, size_t errlen) {
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__ShutdownRequest req = PSRPC__SHUTDOWN_REQUEST__INIT;
    req.cluster = &cl;
    req.reason = (char *)(reason ? reason : "");
    int rc = CM_OK;
    for (int i = 0; i < c->nshards; i++) {
        uint8_t *reply = NULL;
        size_t len = 0;
        char msg[512];
        /* No retries: a PS that is already gone needs no shutdown. */
        int code = call_shard(c, i, "/psrpc.Ps/Shutdown", &req.base, 0, &reply, &len, msg,
                              sizeof msg);
        free(reply);
        if (code != RPC_OK && rc == CM_OK) {
            rc = rpc_status_to_cm(code);
            cm_seterr(err, errlen, "shutdown of PS %d (%s) failed: %s: %s", i, c->addrs[i],
                      rpc_status_name(code), msg);
        }
    }
    return rc;
}

int ps_client_stats_get(ps_client *c, ps_client_stats *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->min_version = INT64_MAX;
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__StatsRequest req = PSRPC__STATS_REQUEST__INIT;
    req.cluster = &cl;
    for (int i = 0; i < c->nshards; i++) {
        uint8_t *reply = NULL;
        size_t len = 0;
        char msg[512];
        int code = call_shard(c, i, "/psrpc.Ps/Stats", &req.base, 1, &reply, &len, msg, sizeof msg);
        if (code != RPC_OK) {
            free(reply);
            cm_seterr(err, errlen, "stats of PS %d (%s) failed: %s: %s", i, c->addrs[i],
                      rpc_status_name(code), msg);
            return rpc_status_to_cm(code);
        }
        Psrpc__StatsReply *r = psrpc__stats_reply__unpack(NULL, len, reply);
        free(reply);
        if (!r) {
            cm_seterr(err, errlen, "malformed StatsReply from PS %d", i);
            return CM_EINVAL;
        }
        if (r->version < out->min_version) out->min_version = r->version;
        out->pushes += r->pushes;
        out->duplicate_pushes += r->duplicate_pushes;
        out->stale_pushes += r->stale_pushes;
        out->early_pushes += r->early_pushes;
        out->pulls += r->pulls;
        out->bad_requests += r->bad_requests;
        psrpc__stats_reply__free_unpacked(r, NULL);
    }
    return CM_OK;
}

int ps_client_open(const ps_client_cfg *cfg, ps_client **out, char *err, size_t errlen) {
    *out = NULL;
    const cm_placement *pl = cfg->placement;
    ps_client *c = cm_calloc(1, sizeof *c);
    c->cfg = *cfg;
    if (!c->cfg.deadline_ms) c->cfg.deadline_ms = 60000;
    if (!c->cfg.connect_timeout_ms) c->cfg.connect_timeout_ms = 30000;
    c->nshards = pl->nshards;
    c->fingerprint = ps_wire_identity(cfg->model, pl, c->identity, sizeof c->identity);
    c->addrs = cm_calloc((size_t)c->nshards, sizeof *c->addrs);
    c->ch = cm_calloc((size_t)c->nshards, sizeof *c->ch);
    c->nparts = cm_calloc((size_t)c->nshards, sizeof *c->nparts);
    c->parts = cm_calloc((size_t)c->nshards, sizeof *c->parts);
    for (int i = 0; i < pl->nparts; i++) c->nparts[pl->parts[i].shard]++;
    for (int s = 0; s < c->nshards; s++) {
        c->parts[s] = cm_calloc((size_t)c->nparts[s] + 1, sizeof **c->parts);
        c->nparts[s] = 0;
    }
    for (int i = 0; i < pl->nparts; i++) {
        int s = pl->parts[i].shard;
        c->parts[s][c->nparts[s]++] = (uint32_t)i;
    }
    rpc_client_opts o = {.max_message = cfg->max_message};
    int rc = rpc_client_create(&o, &c->rpc);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "cannot create the gRPC client");
        goto fail;
    }
    for (int s = 0; s < c->nshards; s++) {
        c->addrs[s] = cm_strdup(cfg->ps_addrs[s]);
        if ((rc = rpc_channel_open(c->rpc, c->addrs[s], &c->ch[s])) != CM_OK) {
            cm_seterr(err, errlen, "bad PS address '%s'", c->addrs[s]);
            goto fail;
        }
    }
    *out = c;
    return CM_OK;
fail:
    ps_client_close(c);
    return rc;
}

void ps_client_close(ps_client *c) {
    if (!c) return;
    for (int s = 0; s < c->nshards; s++) {
        if (c->ch[s]) rpc_channel_close(c->ch[s]);
        free(c->addrs[s]);
        free(c->parts[s]);
    }
    rpc_client_destroy(c->rpc);
    free(c->ch);
    free(c->addrs);
    free(c->parts);
    free(c->nparts);
    free(c);
}
