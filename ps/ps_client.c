/* ps_client.c - push and pull to all shards in parallel, with retries.
 * SPDX-License-Identifier: MIT
 *
 * A ticket has one sub-call per shard. It counts its calls in flight and
 * its zero-copy segments not yet released (the caller's buffer is free
 * once both are 0). With cfg.wire_bf16 a push sends, zero-copy, the
 * ticket's own bfloat16 copy of the pushed partitions ('wire', converted
 * once when the ticket is made, so retries resend it), which goes with the
 * ticket: only after its segments are released and its calls are done,
 * whether it is waited for, abandoned or orphaned. Completions run on the rpc client thread; retries are
 * issued by the waiting thread, after a backoff, so the client thread never
 * sleeps. Every ticket of a client shares the client's lock and condition,
 * so one thread can wait for several tickets at once (ps_tickets_wait) and
 * retry each sub-call on its own schedule.
 *
 * Rollback: when a shard answers ABORTED (the cluster is rolling back, or
 * rolled back), waiting for the other calls could take until their
 * deadlines (a shard waits for the pushes of workers that are recovering
 * too), so the waiter abandons them: it waits until their segments are
 * released, marks the ticket an orphan, whose late replies are dropped
 * without touching the caller's buffers, and the last completion frees it.
 */
#include "ps/ps_client.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
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

enum { OP_PUSH = 1, OP_PULL = 2, OP_PUSH_PULL = 3, OP_PULL_ROWS = 4 };

/* One shard's share of some rows of a call, grouped by table: entry k is
 * table tab[k], ids[off[k] .. off[k] + cnt[k]), and pos[] says which row of
 * the caller's arrays each id is. Pushed gradients are gathered into g
 * (or g16 for bfloat16) in the same order and sent from there. */
typedef struct sub_rows {
    int n;
    uint32_t *tab;
    size_t *off, *cnt;
    uint64_t *ids;
    uint32_t *pos;
    size_t total;
    float *g;
    uint16_t *g16;
} sub_rows;

static void sub_rows_free(sub_rows *r) {
    free(r->tab);
    free(r->off);
    free(r->cnt);
    free(r->ids);
    free(r->pos);
    free(r->g);
    free(r->g16);
    memset(r, 0, sizeof *r);
}

struct ps_client {
    ps_client_cfg cfg;
    int nshards;
    int row_dim; /* The model's widest table row (0 without tables). */
    char **addrs;
    rpc_client *rpc;
    rpc_channel **ch;
    uint64_t fingerprint;
    char identity[256];
    int *nparts;      /* Per shard. */
    uint32_t **parts; /* Per shard: placement ids. */
    int ngroups;      /* Dense calls: each shard's partitions in runs of at
                       * most cfg.call_bytes, one call each. */
    struct group {
        int shard, nparts;
        const uint32_t *parts; /* Into parts[shard]. */
    } *groups;
    uint64_t epoch;   /* Sent with every request (0 = not tracked). */
    pthread_mutex_t mu; /* Every ticket's state. */
    pthread_cond_t cv;  /* Broadcast on every completion and release. */
    int orphans;        /* Abandoned tickets with calls in flight. */
    int orphan_segs;    /* Their zero-copy segments not yet released. */
    atomic_uint settles;      /* Bumped (under mu) with every broadcast of cv,
                               * read by a spinning waiter without mu. */
    uint64_t waits_spun, waits_slept, spins_in_vain; /* ps_client_wait_counts
                                                      * (under mu). */
    uint64_t wakeups_in_vain; /* ps_client_wakeups_in_vain (under mu). */
    int spin_skip, spin_backoff; /* cfg.spin_us: waits left that do not
                                  * spin, and how many the next spin in
                                  * vain skips (under mu). */
};

typedef struct sub {
    struct ps_ticket *t;
    int shard;
    int nparts;            /* Partitions this sub-call pushes / expects. */
    const uint32_t *parts; /* Placement ids: the client's list for the
                            * whole shard, or the ticket's 'own'. */
    size_t wire_at; /* bf16: where this sub-call's partitions start in
                     * the ticket's 'wire', in the order of 'parts'. */
    int attempts;
    double retry_at; /* When to retry an UNAVAILABLE attempt (0: not yet set). */
    int code; /* gRPC status of the last attempt; -1 while in flight. */
    int cm;   /* CM status after decoding. */
    int64_t version;
    char msg[384];
    sub_rows push; /* Sparse: row gradients sent to this shard... */
    sub_rows want; /* ...and rows its reply carries. */
    int sparse;    /* A sparse step: rows_final is sent. */
    int some;      /* A pull of some of the shard's partitions (parts). */
    int slot;      /* Grouped: its shard's groups before it in the ticket. */
    int queued;    /* Not started: waits for an earlier call of its shard to
                    * finish (slot >= the call window); code is -1 meanwhile. */
    double unavailable_since; /* When it first failed UNAVAILABLE (0: never):
                               * retries count from then, not from its start,
                               * since a call may wait long at a shard (sync
                               * steps, parked pulls) before the shard goes. */
} sub;

struct ps_ticket {
    ps_client *c;
    int op;
    int grouped; /* Sub-calls are the client's groups (a whole dense push or
                  * pull, a shard's share maybe in several calls), not one
                  * a shard. */
    int64_t step;
    const float *grad;
    float *params;
    /* Protected by the client's mu. */
    int calls;  /* Sub-calls in flight. */
    int segs;   /* Zero-copy segments not yet released. */
    int orphan; /* Abandoned: drop replies, free on the last completion. */
    int held;   /* Being abandoned: start no queued call (abandon_locked). */
    int nsubs;
    sub *subs;
    uint32_t *own; /* Partition lists of a partial push-pull. */
    uint16_t *wire; /* bf16 pushes: the pushed partitions, sub by sub. */
    float *row_values; /* Sparse: where the reply's rows go (row u at
                        * u * row_dim). */
    int train;
    int or_final; /* A pull also answered at shutdown (ps_client_pull_final). */
};

static void ticket_free(ps_ticket *t) {
    for (int i = 0; i < t->nsubs; i++) {
        sub_rows_free(&t->subs[i].push);
        sub_rows_free(&t->subs[i].want);
    }
    free(t->subs);
    free(t->own);
    free(t->wire);
    free(t);
}

/* After a completion or release (mu held): wake the waiter if 'wake' (an
 * event it waits for: the ticket's last call or segment, a failure) or the
 * ticket is being abandoned (abandon_locked waits for its segments).
 * A large push is dozens of calls and segments: waking the waiter for each
 * only to find the ticket still busy cost a futex wake and two context
 * switches apiece. With 'later' (on_done, on the client's thread) the
 * broadcast of a ticket that is neither orphaned nor held is left to the
 * caller, after it unlocks (*later = 1): woken under mu, the waiter would
 * only block on it again. Safe there only: ps_client_close joins that
 * thread before c goes. Returns 1 if the caller must free the orphan t
 * (after unlocking). */
static int ticket_settle(ps_ticket *t, int wake, int *later) {
    ps_client *c = t->c;
    if (wake || t->orphan || t->held) {
        atomic_fetch_add_explicit(&c->settles, 1, memory_order_release);
        if (later && !t->orphan && !t->held)
            *later = 1;
        else
            pthread_cond_broadcast(&c->cv);
    }
    if (!t->orphan || t->calls || t->segs) return 0;
    c->orphans--;
    return 1;
}

static void release_seg(void *ud) {
    ps_ticket *t = ud;
    ps_client *c = t->c;
    pthread_mutex_lock(&c->mu);
    t->segs--;
    if (t->orphan) c->orphan_segs--;
    int done = ticket_settle(t, t->segs == 0 && t->calls == 0, NULL);
    pthread_mutex_unlock(&c->mu);
    if (done) ticket_free(t);
}

static void fill_cluster(ps_client *c, Psrpc__Cluster *cl) {
    psrpc__cluster__init(cl);
    cl->fingerprint = c->fingerprint;
    cl->description = c->identity;
    cl->rank = (uint32_t)c->cfg.rank;
    cl->epoch = c->epoch;
}

/* The rows of a reply into the caller's array, by the sub's 'want'. */
static int take_rows(ps_client *c, const sub_rows *want, const ps_wire_msg *m, float *values,
                     char *err, size_t errlen) {
    if (m->nrows != want->n) {
        cm_seterr(err, errlen, "reply has rows of %d tables, expected %d", m->nrows, want->n);
        return CM_EINVAL;
    }
    for (int k = 0; k < want->n; k++) {
        const ps_wire_rows *r = &m->rows[k];
        int dim = c->cfg.model->vars[c->cfg.model->table_var[want->tab[k]]].dim;
        size_t row_bytes = (size_t)dim * sizeof(float);
        if (r->meta->table != want->tab[k] || r->meta->dtype != PSRPC__DTYPE__DTYPE_FLOAT32 ||
            r->len != want->cnt[k] * row_bytes) {
            cm_seterr(err, errlen, "reply rows %d: table %u, %zu bytes; expected table %u, %zu",
                      k, r->meta->table, r->len, want->tab[k], want->cnt[k] * row_bytes);
            return CM_EINVAL;
        }
        const uint32_t *pos = want->pos + want->off[k];
        for (size_t i = 0; i < want->cnt[k]; i++)
            memcpy(values + (size_t)pos[i] * (size_t)c->row_dim, r->data + i * row_bytes,
                   row_bytes);
    }
    return CM_OK;
}

/* Copy a pull reply from shard sh into params (and its rows, by 'want',
 * into values); CM_OK or CM_EINVAL. */
static int take_pull_reply(ps_client *c, int sh, int nexpect, const rpc_piece *reply,
                           int npieces, float *params, const sub_rows *want, float *values,
                           int64_t *version, char *err, size_t errlen) {
    ps_wire_msg m;
    if (ps_wire_decode_pieces(&psrpc__pull_reply__descriptor, 2, 3, reply, npieces, 0, &m, err,
                              errlen))
        return CM_EINVAL;
    int rc = CM_OK;
    if (want && values) rc = take_rows(c, want, &m, values, err, errlen);
    if (rc == CM_OK && m.ntensors != nexpect) {
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
        ps_wire_tensor_copy(params + c->cfg.placement->parts[id].offset, t);
    }
    *version = ((Psrpc__PullReply *)m.msg)->version;
    ps_wire_msg_free(&m);
    return rc;
}

static void issue(ps_ticket *t, sub *s, int reserved);

/* A reply, as gRPC's slices in place: a pull's parameters are copied from
 * them straight into the caller's array. */
static void on_done(void *ud, int code, const char *message, const rpc_piece *pieces,
                    int npieces, size_t len) {
    (void)len;
    sub *s = ud;
    ps_ticket *t = s->t;
    ps_client *c = t->c;
    pthread_mutex_lock(&c->mu);
    /* OUT_OF_RANGE on a push: backup sync closed the step without us. */
    s->cm = code == RPC_OUT_OF_RANGE && (t->op == OP_PUSH || t->op == OP_PUSH_PULL)
                ? CM_ESKIPPED
                : rpc_status_to_cm(code);
    if (t->orphan) {
        /* Nobody waits: the caller's buffers are not ours any more. */
    } else if (code != RPC_OK) {
        snprintf(s->msg, sizeof s->msg, "%s: %s", rpc_status_name(code), message);
    } else if (t->op == OP_PULL || t->op == OP_PUSH_PULL || t->op == OP_PULL_ROWS) {
        int nexpect = t->op == OP_PULL_ROWS ? 0 : s->nparts;
        s->cm = take_pull_reply(t->c, s->shard, nexpect, pieces, npieces, t->params, &s->want,
                                t->row_values, &s->version, s->msg, sizeof s->msg);
    } else {
        ps_wire_msg m; /* A PushReply: no tensors (field 0 is never one). */
        if (ps_wire_decode_pieces(&psrpc__push_reply__descriptor, 0, 0, pieces, npieces, 0, &m,
                                  s->msg, sizeof s->msg) == CM_OK) {
            s->version = ((Psrpc__PushReply *)m.msg)->version;
            ps_wire_msg_free(&m);
        } else {
            s->cm = CM_EINVAL;
        }
    }
    s->code = code;
    /* The call window: this call's end starts its shard's next queued one
     * (counted now, so that the ticket cannot settle in between); after a
     * failure that is not retried, the queued ones fail with it unsent. */
    sub *next = NULL;
    int go_on = code == RPC_OK || code == RPC_UNAVAILABLE;
    for (int i = (int)(s - t->subs) + 1;
         !t->orphan && !t->held && i < t->nsubs && t->subs[i].shard == s->shard; i++) {
        sub *q = &t->subs[i];
        if (!q->queued) continue;
        q->queued = 0;
        if (go_on) {
            next = q;
            t->calls++;
            break;
        }
        q->code = code;
        q->cm = s->cm != CM_OK ? s->cm : rpc_status_to_cm(code);
        snprintf(q->msg, sizeof q->msg, "not sent: an earlier call to this shard failed (%s)",
                 rpc_status_name(code));
    }
    t->calls--;
    int later = 0;
    int done = ticket_settle(t, (t->calls == 0 && t->segs == 0) || code != RPC_OK || s->cm != CM_OK,
                             &later);
    pthread_mutex_unlock(&c->mu);
    if (later) pthread_cond_broadcast(&c->cv);
    if (next) issue(t, next, 1);
    if (done) ticket_free(t);
}

/* The ids of 'want' as Rows messages of field 'field' (no values). */
static void put_want(ps_wire_writer *w, uint32_t field, const sub_rows *want) {
    for (int k = 0; k < want->n; k++)
        ps_wire_put_rows(w, field, want->tab[k], want->ids + want->off[k], want->cnt[k],
                         PSRPC__DTYPE__DTYPE_FLOAT32, NULL, 0, NULL, NULL);
}

/* Start sub-call s. reserved: t->calls counts it already (on_done, which
 * starts a queued call from the client's thread, unlocked in between). */
static void issue(ps_ticket *t, sub *s, int reserved) {
    ps_client *c = t->c;
    int sh = s->shard;
    pthread_mutex_lock(&c->mu);
    if (t->orphan || t->held) {
        /* Abandoned while it waited in the window: the caller's buffers
         * are not ours any more, so it never starts. */
        if (reserved) t->calls--;
        s->code = RPC_CANCELLED;
        s->cm = CM_EABORTED;
        int done = ticket_settle(t, 1, NULL);
        pthread_mutex_unlock(&c->mu);
        if (done) ticket_free(t);
        return;
    }
    s->attempts++;
    s->retry_at = 0.0;
    s->code = -1;
    s->cm = CM_OK;
    s->msg[0] = 0;
    if (!reserved) t->calls++;
    if (t->op == OP_PUSH || t->op == OP_PUSH_PULL) t->segs += s->nparts + s->push.n;
    pthread_mutex_unlock(&c->mu);
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
        req.rows_final = s->sparse;
        req.train = t->train;
        /* A step in several calls to this shard: async shards then bump
         * their version once a step, not once a call. */
        if (c->cfg.async && t->grouped && !s->sparse && s->nparts < c->nparts[sh])
            req.step_parts = (uint32_t)c->nparts[sh];
        ps_wire_put_message(&w, &req.base);
        put_want(&w, 6, &s->want);
        size_t gat = 0;
        for (int k = 0; k < s->push.n; k++) {
            int dim = c->cfg.model->vars[c->cfg.model->table_var[s->push.tab[k]]].dim;
            size_t nv = s->push.cnt[k] * (size_t)dim;
            const uint64_t *ids = s->push.ids + s->push.off[k];
            if (s->push.g16)
                ps_wire_put_rows(&w, 4, s->push.tab[k], ids, s->push.cnt[k],
                                 PSRPC__DTYPE__DTYPE_BFLOAT16, s->push.g16 + gat,
                                 nv * sizeof(uint16_t), release_seg, t);
            else
                ps_wire_put_rows(&w, 4, s->push.tab[k], ids, s->push.cnt[k],
                                 PSRPC__DTYPE__DTYPE_FLOAT32, s->push.g + gat,
                                 nv * sizeof(float), release_seg, t);
            gat += nv;
        }
        size_t at = s->wire_at;
        for (int i = 0; i < s->nparts; i++) {
            const cm_partition *p = &c->cfg.placement->parts[s->parts[i]];
            if (t->wire) {
                ps_wire_put_part_bf16(&w, 3, c->cfg.model, c->cfg.placement, s->parts[i],
                                      t->wire + at, release_seg, t);
                at += p->count;
            } else {
                ps_wire_put_part(&w, 3, c->cfg.model, c->cfg.placement, s->parts[i],
                                 t->grad + p->offset, release_seg, t);
            }
        }
    } else {
        method = "/psrpc.Ps/Pull";
        Psrpc__PullRequest req = PSRPC__PULL_REQUEST__INIT;
        req.cluster = &cl;
        req.min_version = t->step;
        req.rows_only = t->op == OP_PULL_ROWS;
        req.train = t->train;
        req.or_final = t->or_final;
        if (s->some) {
            req.n_parts = (size_t)s->nparts;
            req.parts = (uint32_t *)s->parts;
        }
        ps_wire_put_message(&w, &req.base);
        put_want(&w, 3, &s->want);
    }
    int nsegs;
    const rpc_seg *segs = ps_wire_segs(&w, &nsegs);
    rpc_call_start_pieces(c->ch[sh], method, segs, nsegs, c->cfg.deadline_ms,
                          c->cfg.unary ? 0 : RPC_STREAM, on_done, s);
    ps_wire_writer_free(&w, 0);
}

/* The call window: a shard's first W groups go at once, each end starts
 * the next, so a call's bytes are not spread thin over all of them (a
 * call's pull waits for every worker's push of it). <= 0: all at once. */
static int call_window(const ps_client *c) {
    return c->cfg.call_window ? c->cfg.call_window : PS_CLIENT_CALL_WINDOW;
}

/* A ticket with one sub-call per shard, or with 'grouped' (dense calls)
 * one per group: runs of a shard's partitions of at most cfg.call_bytes,
 * all issued at once. */
static ps_ticket *ticket_new(ps_client *c, int op, int64_t step, int grouped) {
    ps_ticket *t = cm_calloc(1, sizeof *t);
    t->c = c;
    t->op = op;
    t->step = step;
    t->grouped = grouped;
    t->nsubs = grouped ? c->ngroups : c->nshards;
    t->subs = cm_calloc((size_t)t->nsubs, sizeof *t->subs);
    int w = call_window(c);
    for (int i = 0; i < t->nsubs; i++) {
        const struct group *g = grouped ? &c->groups[i] : NULL;
        sub *s = &t->subs[i];
        s->t = t;
        s->shard = g ? g->shard : i;
        s->nparts = g ? g->nparts : c->nparts[i];
        s->parts = g ? g->parts : c->parts[i];
        s->some = g && op == OP_PULL && g->nparts < c->nparts[g->shard];
        s->slot = i > 0 && s[-1].shard == s->shard ? s[-1].slot + 1 : 0;
        if (g && w > 0 && s->slot >= w) {
            s->queued = 1;
            s->code = -1;
        }
    }
    return t;
}

/* bf16 pushes: convert the partitions every sub-call pushes into the
 * ticket's 'wire' (once: retries resend it) and set each sub's wire_at.
 * fp32 pushes send t->grad in place and need nothing here. */
static void ticket_convert(ps_ticket *t) {
    ps_client *c = t->c;
    if (!c->cfg.wire_bf16) return;
    const cm_partition *parts = c->cfg.placement->parts;
    size_t total = 0;
    for (int i = 0; i < t->nsubs; i++)
        for (int k = 0; k < t->subs[i].nparts; k++) total += parts[t->subs[i].parts[k]].count;
    t->wire = cm_malloc((total ? total : 1) * sizeof *t->wire);
    size_t at = 0;
    for (int i = 0; i < t->nsubs; i++) {
        sub *s = &t->subs[i];
        s->wire_at = at;
        for (int k = 0; k < s->nparts; k++) {
            const cm_partition *p = &parts[s->parts[k]];
            ps_wire_bf16_from_f32(t->wire + at, t->grad + p->offset, p->count);
            at += p->count;
        }
    }
}

/* Every sub-call not queued behind the call window: the first W of each
 * shard (by slot, not by 'queued': once one has started, its end may
 * unqueue and start the next on the client's thread). */
static void issue_all(ps_ticket *t) {
    int w = call_window(t->c);
    for (int i = 0; i < t->nsubs; i++)
        if (w <= 0 || t->subs[i].slot < w) issue(t, &t->subs[i], 0);
}

int ps_client_push(ps_client *c, int64_t step, const float *grad, ps_ticket **out) {
    ps_ticket *t = ticket_new(c, OP_PUSH, step, 1);
    t->grad = grad;
    ticket_convert(t);
    issue_all(t);
    *out = t;
    return CM_OK;
}

int ps_client_push_pull(ps_client *c, int64_t step, const float *grad, float *params,
                        ps_ticket **out) {
    ps_ticket *t = ticket_new(c, OP_PUSH_PULL, step, 1);
    t->grad = grad;
    t->params = params;
    ticket_convert(t);
    issue_all(t);
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
    ps_ticket *t = ticket_new(c, OP_PUSH_PULL, step, 0);
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
    ticket_convert(t);
    issue_all(t);
    *out = t;
    return CM_OK;
}

/* Split 'keys' by shard into each sub's 'r' (push: 0 for want, 1 for
 * gradients, gathered from 'grad' as float32 or bfloat16). */
static void split_rows(ps_ticket *t, const ps_row_keys *keys, int push, const float *grad) {
    ps_client *c = t->c;
    int S = c->nshards, T = keys->ntables;
    /* Count per (shard, table), then place. */
    size_t *cnt = cm_calloc((size_t)S * (size_t)T, sizeof *cnt);
    int *shard_of = NULL;
    size_t total = keys->tab_begin[T];
    shard_of = cm_malloc((total ? total : 1) * sizeof *shard_of);
    for (int tb = 0; tb < T; tb++)
        for (size_t u = keys->tab_begin[tb]; u < keys->tab_begin[tb + 1]; u++) {
            int sh = cm_row_shard(tb, keys->ids[u], S);
            shard_of[u] = sh;
            cnt[(size_t)sh * (size_t)T + (size_t)tb]++;
        }
    for (int sh = 0; sh < S; sh++) {
        sub_rows *r = push ? &t->subs[sh].push : &t->subs[sh].want;
        size_t n = 0;
        int ntab = 0;
        for (int tb = 0; tb < T; tb++)
            if (cnt[(size_t)sh * (size_t)T + (size_t)tb]) {
                n += cnt[(size_t)sh * (size_t)T + (size_t)tb];
                ntab++;
            }
        r->n = ntab;
        r->total = n;
        r->tab = cm_calloc((size_t)ntab + 1, sizeof *r->tab);
        r->off = cm_calloc((size_t)ntab + 1, sizeof *r->off);
        r->cnt = cm_calloc((size_t)ntab + 1, sizeof *r->cnt);
        r->ids = cm_malloc((n ? n : 1) * sizeof *r->ids);
        r->pos = cm_malloc((n ? n : 1) * sizeof *r->pos);
        size_t at = 0;
        int k = 0;
        for (int tb = 0; tb < T; tb++) {
            size_t m = cnt[(size_t)sh * (size_t)T + (size_t)tb];
            if (!m) continue;
            r->tab[k] = (uint32_t)tb;
            r->off[k] = at;
            for (size_t u = keys->tab_begin[tb]; u < keys->tab_begin[tb + 1]; u++)
                if (shard_of[u] == sh) {
                    r->ids[at] = keys->ids[u];
                    r->pos[at++] = (uint32_t)u;
                }
            r->cnt[k] = at - r->off[k];
            k++;
        }
        if (!push) continue;
        /* The gradients in the order they are sent. */
        size_t nv = 0;
        for (int e = 0; e < r->n; e++)
            nv += r->cnt[e] * (size_t)c->cfg.model->vars[c->cfg.model->table_var[r->tab[e]]].dim;
        float *g = cm_malloc((nv ? nv : 1) * sizeof *g);
        size_t gat = 0;
        for (int e = 0; e < r->n; e++) {
            int dim = c->cfg.model->vars[c->cfg.model->table_var[r->tab[e]]].dim;
            for (size_t i = 0; i < r->cnt[e]; i++) {
                memcpy(g + gat, grad + (size_t)r->pos[r->off[e] + i] * (size_t)c->row_dim,
                       (size_t)dim * sizeof *g);
                gat += (size_t)dim;
            }
        }
        if (c->cfg.wire_bf16) {
            r->g16 = cm_malloc((nv ? nv : 1) * sizeof *r->g16);
            ps_wire_bf16_from_f32(r->g16, g, nv);
            free(g);
        } else {
            r->g = g;
        }
    }
    free(cnt);
    free(shard_of);
}

int ps_client_push_pull_rows(ps_client *c, int64_t step, const float *grad, float *params,
                             const ps_row_keys *keys, const float *row_grad,
                             const ps_row_keys *want, float *want_values, ps_ticket **out) {
    *out = NULL;
    if (c->cfg.model->ntables == 0 || (keys && keys->ntables != c->cfg.model->ntables) ||
        (want && want->ntables != c->cfg.model->ntables) || (keys && !row_grad) ||
        (want && !want_values))
        return CM_EINVAL;
    ps_ticket *t = ticket_new(c, OP_PUSH_PULL, step, 0);
    t->grad = grad;
    t->params = params;
    t->row_values = want_values;
    t->train = 1;
    ticket_convert(t);
    for (int i = 0; i < t->nsubs; i++) t->subs[i].sparse = 1;
    if (keys) split_rows(t, keys, 1, row_grad);
    if (want) split_rows(t, want, 0, NULL);
    for (int i = 0; i < c->nshards; i++) issue(t, &t->subs[i], 0);
    *out = t;
    return CM_OK;
}

int ps_client_pull_rows(ps_client *c, int64_t min_version, const ps_row_keys *want,
                        float *values, int train, ps_ticket **out) {
    *out = NULL;
    if (c->cfg.model->ntables == 0 || !want || want->ntables != c->cfg.model->ntables || !values)
        return CM_EINVAL;
    ps_ticket *t = ticket_new(c, OP_PULL_ROWS, min_version, 0);
    t->row_values = values;
    t->train = train;
    split_rows(t, want, 0, NULL);
    /* Only the shards that hold some of the rows. */
    int k = 0;
    for (int i = 0; i < t->nsubs; i++) {
        if (!t->subs[i].want.n) {
            sub_rows_free(&t->subs[i].want);
            continue;
        }
        if (k != i) {
            t->subs[k] = t->subs[i];
            memset(&t->subs[i].want, 0, sizeof t->subs[i].want);
        }
        k++;
    }
    t->nsubs = k;
    issue_all(t);
    *out = t;
    return CM_OK;
}

static int pull(ps_client *c, int64_t min_version, float *params, int or_final,
                ps_ticket **out) {
    /* An evaluator's final pull goes whole: the shard answers it once. */
    ps_ticket *t = ticket_new(c, OP_PULL, min_version, !or_final);
    t->params = params;
    t->or_final = or_final;
    issue_all(t);
    *out = t;
    return CM_OK;
}

int ps_client_pull_final(ps_client *c, int64_t min_version, float *params, ps_ticket **out) {
    return pull(c, min_version, params, 1, out);
}

int ps_client_pull(ps_client *c, int64_t min_version, float *params, ps_ticket **out) {
    return pull(c, min_version, params, 0, out);
}

static const char *op_name(int op) {
    return op == OP_PUSH        ? "push"
           : op == OP_PULL      ? "pull"
           : op == OP_PULL_ROWS ? "row pull"
                                : "push-pull";
}

static void sub_error(const ps_ticket *t, const sub *s, char *err, size_t errlen) {
    cm_seterr(err, errlen, "%s to PS %d (%s) failed after %d attempt%s: %s", op_name(t->op),
              s->shard, t->c->addrs[s->shard], s->attempts, s->attempts == 1 ? "" : "s",
              s->msg);
}

/* With c->mu held (released on return): wait until no segment of the
 * tickets is in use, so the buffers are the caller's again; tickets with
 * calls still in flight become orphans (freed by their last completion),
 * the others are freed here. */
static void abandon_locked(ps_client *c, ps_ticket **tickets, int n, int wait_segs) {
    /* Waiting below releases mu: no call of these may start meanwhile. */
    for (int k = 0; k < n; k++) tickets[k]->held = 1;
    for (int k = 0; k < n && wait_segs; k++)
        while (tickets[k]->segs) pthread_cond_wait(&c->cv, &c->mu);
    for (int k = 0; k < n; k++) {
        if (tickets[k]->calls || tickets[k]->segs) {
            tickets[k]->orphan = 1;
            c->orphans++;
            c->orphan_segs += tickets[k]->segs;
            tickets[k] = NULL;
        }
    }
    pthread_mutex_unlock(&c->mu);
    for (int k = 0; k < n; k++)
        if (tickets[k]) ticket_free(tickets[k]);
}

/* cfg.spin_us: until c->settles moves on from gen or 'until' passes,
 * yielding the core at every turn (mu not held). */
static void spin_until_settle(ps_client *c, unsigned gen, double until) {
    while (atomic_load_explicit(&c->settles, memory_order_acquire) == gen && cm_now() < until)
        sched_yield();
}

int ps_tickets_wait(ps_ticket **tickets, int n, int64_t *version, char *err, size_t errlen) {
    if (n <= 0) return CM_OK;
    ps_client *c = tickets[0]->c;
    const double spin_s = c->cfg.spin_us * 1e-6;
    /* The spin is timed from the first look that finds the tickets busy,
     * not from the call: a waiter that took longer than the spin to get mu
     * (a busy machine) still spins once before it sleeps, so a sleep
     * always follows a spin in vain or a skipped one. */
    double spin_end = 0;
    int want_spin = 0, slept = 0, spun = 0, woke = 0;
    const sub *aborted = NULL;
    const ps_ticket *aborted_t = NULL;
    size_t nsubs = 0; /* A ticket has a sub-call per shard, or per group. */
    for (int k = 0; k < n; k++) nsubs += (size_t)tickets[k]->nsubs;
    sub **again = cm_malloc((nsubs ? nsubs : 1) * sizeof *again);
    pthread_mutex_lock(&c->mu);
    /* A spin in vain (the wait outlasted it: large messages, a slow peer,
     * cores all busy) took a core for nothing: the next ones are skipped,
     * 16, then 32, ... up to 256 waits while spins keep failing. */
    if (spin_s > 0 && c->spin_skip > 0)
        c->spin_skip--;
    else if (spin_s > 0)
        want_spin = 1;
    for (;;) {
        double now = cm_now(), wake = now + 1.0;
        int busy = 0, nagain = 0;
        for (int k = 0; k < n && !aborted; k++) {
            ps_ticket *t = tickets[k];
            if (t->segs) busy = 1;
            for (int i = 0; i < t->nsubs; i++) {
                sub *s = &t->subs[i];
                if (s->code == RPC_UNAVAILABLE && s->unavailable_since == 0.0)
                    s->unavailable_since = now;
                int may_retry = (now - s->unavailable_since) * 1e3 <
                                (double)c->cfg.connect_timeout_ms;
                if (s->code == -1) {
                    busy = 1;
                } else if (s->code == RPC_ABORTED || s->cm == CM_ESKIPPED) {
                    aborted = s;
                    aborted_t = t;
                    break;
                } else if (s->code == RPC_UNAVAILABLE && may_retry) {
                    busy = 1;
                    if (s->retry_at == 0.0) {
                        int a = s->attempts - 1;
                        s->retry_at = now + 1e-3 * (double)(100 << (a < 4 ? a : 4)); /* 0.1..1.6 s */
                    }
                    if (now >= s->retry_at)
                        again[nagain++] = s;
                    else if (s->retry_at < wake)
                        wake = s->retry_at;
                }
            }
        }
        if (aborted || !busy) break;
        if (woke && !nagain) c->wakeups_in_vain++;
        woke = 0;
        if (nagain) {
            pthread_mutex_unlock(&c->mu);
            for (int i = 0; i < nagain; i++) issue(again[i]->t, again[i], 0);
            pthread_mutex_lock(&c->mu);
            continue;
        }
        if (want_spin) {
            want_spin = 0;
            spin_end = now + spin_s;
        }
        if (now < spin_end) {
            /* Read under mu, where every settle bumps it. */
            unsigned gen = atomic_load_explicit(&c->settles, memory_order_relaxed);
            pthread_mutex_unlock(&c->mu);
            spin_until_settle(c, gen, spin_end < wake ? spin_end : wake);
            pthread_mutex_lock(&c->mu);
            spun = 1;
            continue;
        }
        slept = 1;
        /* c->cv waits on the monotonic clock, as cm_now. */
        struct timespec ts = cm_monotonic_at(wake);
        woke = pthread_cond_timedwait(&c->cv, &c->mu, &ts) == 0; /* Not a timeout. */
    }
    free(again);
    if (slept)
        c->waits_slept++;
    else
        c->waits_spun++;
    /* Only a wait that spun says whether spinning pays: one whose tickets
     * were settled before it began neither grows nor resets the backoff. */
    if (spun && slept) {
        c->spins_in_vain++;
        c->spin_backoff = c->spin_backoff ? (c->spin_backoff < 256 ? 2 * c->spin_backoff : 256)
                                          : 16;
        c->spin_skip = c->spin_backoff;
    } else if (spun) {
        c->spin_backoff = 0;
    }
    int rc = CM_OK;
    if (aborted) {
        /* Not waiting for the other calls' segments: a call parked at a
         * shard that waits for a worker being recovered is answered only
         * once the cluster rolled back (ps_client_quiesce after that). */
        sub_error(aborted_t, aborted, err, errlen);
        int skipped = aborted->cm == CM_ESKIPPED; /* Read before the tickets go. */
        abandon_locked(c, tickets, n, 0);
        return skipped ? CM_ESKIPPED : CM_EABORTED;
    }
    pthread_mutex_unlock(&c->mu);
    int64_t vmin = INT64_MAX;
    for (int k = 0; k < n; k++) {
        ps_ticket *t = tickets[k];
        /* An async push in several calls to a shard: the call that ended
         * the step says the version after it, the others the one before
         * (PushRequest.step_parts), so a shard's calls count by their
         * highest. Subs are in shard order. */
        int by_max = t->c->cfg.async && (t->op == OP_PUSH || t->op == OP_PUSH_PULL);
        for (int i = 0; i < t->nsubs; i++) {
            sub *s = &t->subs[i];
            if (s->cm != CM_OK && rc == CM_OK) {
                rc = s->cm;
                sub_error(t, s, err, errlen);
            }
            sub *next = i + 1 < t->nsubs ? &t->subs[i + 1] : NULL;
            if (by_max && next && next->shard == s->shard) {
                /* Carried to the shard's next call; its last one counts. */
                if (s->version > next->version) next->version = s->version;
                continue;
            }
            if (s->version < vmin) vmin = s->version;
        }
        ticket_free(t);
    }
    if (version) *version = vmin;
    return rc;
}

void ps_client_wait_counts(ps_client *c, uint64_t *spun, uint64_t *slept, uint64_t *in_vain) {
    pthread_mutex_lock(&c->mu);
    *spun = c->waits_spun;
    *slept = c->waits_slept;
    *in_vain = c->spins_in_vain;
    pthread_mutex_unlock(&c->mu);
}

uint64_t ps_client_wakeups_in_vain(ps_client *c) {
    pthread_mutex_lock(&c->mu);
    uint64_t n = c->wakeups_in_vain;
    pthread_mutex_unlock(&c->mu);
    return n;
}

void ps_tickets_abandon(ps_ticket **tickets, int n) {
    if (n <= 0) return;
    ps_client *c = tickets[0]->c;
    pthread_mutex_lock(&c->mu);
    abandon_locked(c, tickets, n, 1);
}

void ps_tickets_drop(ps_ticket **tickets, int n) {
    if (n <= 0) return;
    ps_client *c = tickets[0]->c;
    pthread_mutex_lock(&c->mu);
    abandon_locked(c, tickets, n, 0);
}

int ps_client_quiesce(ps_client *c, int64_t timeout_ms) {
    double deadline = cm_now() + (double)timeout_ms / 1e3;
    pthread_mutex_lock(&c->mu);
    while (c->orphan_segs > 0 && cm_now() < deadline) {
        /* c->cv waits on the monotonic clock: a CLOCK_REALTIME deadline
         * would lie decades ahead and the timeout would never come. */
        struct timespec ts = cm_monotonic_at(cm_now() + 0.05);
        pthread_cond_timedwait(&c->cv, &c->mu, &ts);
    }
    int left = c->orphan_segs;
    pthread_mutex_unlock(&c->mu);
    return left > 0 ? CM_ETIMEDOUT : CM_OK;
}

int ps_ticket_wait(ps_ticket *t, int64_t *version, char *err, size_t errlen) {
    return ps_tickets_wait(&t, 1, version, err, errlen);
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
    const Psrpc__CheckpointsRequest *ck =
        !strcmp(method, "/psrpc.Ps/Checkpoints") ? (const void *)req : NULL;
    /* The administrative calls carry the admin's token (when this client
     * has one). A Checkpoints that deletes or commits is one too. */
    int admin = !strcmp(method, "/psrpc.Ps/Initialize") || !strcmp(method, "/psrpc.Ps/Rollback") ||
                !strcmp(method, "/psrpc.Ps/Shutdown") || (ck && (ck->keep_from >= 0 || ck->commit));
    /* The chief's final commit writes a checkpoint before it answers: a large
     * shard's may take longer than a call's deadline (a second commit would
     * find it written, but the first must not fail the run's end). */
    int64_t deadline = c->cfg.deadline_ms;
    if (ck && ck->commit && deadline < 600000) deadline = 600000;
    for (int attempt = 0;; attempt++) {
        code = rpc_call_sync(c->ch[sh], method, buf, n, deadline, admin ? RPC_ADMIN : 0, reply,
                             len, msg, msglen);
        if (!retry || code != RPC_UNAVAILABLE ||
            (cm_now() - start) * 1e3 >= (double)c->cfg.connect_timeout_ms)
            break;
        usleep((useconds_t)(50 << (attempt < 5 ? attempt + 1 : 5)) * 1000);
    }
    free(buf);
    return code;
}

/* call_shard (retrying) and unpack the reply as 'desc'. Returns the reply
 * (free with protobuf_c_message_free_unpacked) or NULL with *rc set and a
 * message naming the PS and 'what' in err. */
static ProtobufCMessage *call_unpack(ps_client *c, int sh, const char *method,
                                     const ProtobufCMessage *req,
                                     const ProtobufCMessageDescriptor *desc, const char *what,
                                     int *rc, char *err, size_t errlen) {
    uint8_t *reply = NULL;
    size_t len = 0;
    char msg[768];
    int code = call_shard(c, sh, method, req, 1, &reply, &len, msg, sizeof msg);
    if (code != RPC_OK) {
        free(reply);
        cm_seterr(err, errlen, "%s of PS %d (%s) failed: %s: %s", what, sh, c->addrs[sh],
                  rpc_status_name(code), msg);
        *rc = rpc_status_to_cm(code);
        return NULL;
    }
    ProtobufCMessage *r = protobuf_c_message_unpack(desc, NULL, len, reply);
    free(reply);
    if (!r) {
        cm_seterr(err, errlen, "malformed %s reply from PS %d (%s)", what, sh, c->addrs[sh]);
        *rc = CM_EINVAL;
    }
    return r;
}

static Psrpc__OptimizerConfig optim_msg(const ps_optim_cfg *o) {
    Psrpc__OptimizerConfig m = PSRPC__OPTIMIZER_CONFIG__INIT;
    m.kind = (char *)ps_optim_name(o->kind);
    m.lr = o->lr;
    m.momentum = o->momentum;
    m.beta1 = o->beta1;
    m.beta2 = o->beta2;
    m.epsilon = o->epsilon;
    m.initial_accumulator = o->initial_accumulator;
    return m;
}

int ps_client_init(ps_client *c, const ps_init_cfg *init, char *err, size_t errlen) {
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__OptimizerConfig oc = optim_msg(&init->optim), toc = optim_msg(&init->table_optim);
    ps_wire_spec spec;
    ps_wire_spec_init(&spec, c->cfg.model, c->cfg.placement->min_part_bytes);
    Psrpc__InitRequest req = PSRPC__INIT_REQUEST__INIT;
    req.cluster = &cl;
    req.optimizer = &oc;
    req.model = &spec.spec;
    if (c->cfg.model->ntables) req.table_optimizer = &toc;
    req.seed = init->seed;
    req.num_workers = (uint32_t)init->num_workers;
    req.sync = init->async ? PSRPC__SYNC_MODE__SYNC_ASYNC : PSRPC__SYNC_MODE__SYNC_SYNC;
    req.backup_ms = init->backup_ms > 0 && init->backup_ms < UINT32_MAX ? (uint32_t)init->backup_ms
                    : init->backup_ms > 0                              ? UINT32_MAX
                                                                      : 0;
    req.aggregate = init->sum ? PSRPC__AGGREGATE__AGGREGATE_SUM : PSRPC__AGGREGATE__AGGREGATE_MEAN;
    req.zero_init = init->zero_init;
    req.global_batch = init->global_batch;
    req.steps_per_epoch = init->steps_per_epoch;
    for (int i = 0; i < c->nshards; i++) {
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
        int rc;
        Psrpc__InitReply *r = (Psrpc__InitReply *)call_unpack(
            c, i, "/psrpc.Ps/Initialize", &req.base, &psrpc__init_reply__descriptor, "init", &rc,
            err, errlen);
        free(vals);
        free(vptrs);
        free(shapes);
        if (!r) {
            ps_wire_spec_free(&spec);
            return rc;
        }
        /* Fresh shards all start in epoch 1; restored ones report 0. */
        if (r->epoch > c->epoch && !r->recovering) c->epoch = r->epoch;
        psrpc__init_reply__free_unpacked(r, NULL);
    }
    ps_wire_spec_free(&spec);
    return CM_OK;
}

int ps_client_dump_rows(ps_client *c, int shard, int table, uint64_t from, size_t max,
                        uint64_t **ids, float **vals, size_t *n, uint64_t *next, char *err,
                        size_t errlen) {
    *ids = NULL;
    *vals = NULL;
    *n = 0;
    *next = 0;
    if (shard < 0 || shard >= c->nshards || table < 0 || table >= c->cfg.model->ntables) {
        cm_seterr(err, errlen, "dump of table %d from PS %d: no such table or PS", table, shard);
        return CM_EINVAL;
    }
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__PullRequest req = PSRPC__PULL_REQUEST__INIT;
    req.cluster = &cl;
    req.dump = 1;
    req.dump_table = (uint32_t)table;
    req.dump_from = from;
    req.dump_max = max > 0xffffffffu ? 0xffffffffu : (uint32_t)max;
    uint8_t *reply = NULL;
    size_t len = 0;
    char msg[768];
    int code = call_shard(c, shard, "/psrpc.Ps/Pull", &req.base, 1, &reply, &len, msg,
                          sizeof msg);
    if (code != RPC_OK) {
        free(reply);
        cm_seterr(err, errlen, "dump of table %d from PS %d (%s) failed: %s: %s", table, shard,
                  c->addrs[shard], rpc_status_name(code), msg);
        return rpc_status_to_cm(code);
    }
    ps_wire_msg m;
    int rc = ps_wire_decode_rows(&psrpc__pull_reply__descriptor, 2, 3, reply, len, &m, err,
                                 errlen);
    int dim = c->cfg.model->vars[c->cfg.model->table_var[table]].dim;
    if (rc == CM_OK) {
        size_t k = 0;
        if (m.nrows != 1 || m.rows[0].meta->table != (uint32_t)table ||
            ps_wire_ids(m.rows[0].meta, ids, &k, err, errlen) != CM_OK ||
            m.rows[0].len != k * (size_t)dim * sizeof(float)) {
            cm_seterr(err, errlen, "malformed dump reply from PS %d", shard);
            free(*ids);
            *ids = NULL;
            rc = CM_EINVAL;
        } else {
            *vals = cm_malloc((k ? k : 1) * (size_t)dim * sizeof(float));
            memcpy(*vals, m.rows[0].data, m.rows[0].len);
            *n = k;
            *next = ((Psrpc__PullReply *)m.msg)->dump_next;
        }
        ps_wire_msg_free(&m);
    }
    free(reply);
    return rc;
}

int ps_client_shutdown_servers(ps_client *c, const char *reason, int failed, char *err,
                               size_t errlen) {
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__ShutdownRequest req = PSRPC__SHUTDOWN_REQUEST__INIT;
    req.cluster = &cl;
    req.reason = (char *)(reason ? reason : "");
    req.failed = failed != 0;
    int rc = CM_OK;
    for (int i = 0; i < c->nshards; i++) {
        uint8_t *reply = NULL;
        size_t len = 0;
        char msg[512];
        /* Retried while unavailable (for the connect timeout): a PS being
         * restarted (killed after the last step) must still be told, or it
         * waits for a rollback that never comes. */
        int code = call_shard(c, i, "/psrpc.Ps/Shutdown", &req.base, 1, &reply, &len, msg,
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

/* Shard i's StatsReply (free with psrpc__stats_reply__free_unpacked), or
 * NULL with *rc and err (call_unpack). */
static Psrpc__StatsReply *shard_stats(ps_client *c, int i, int *rc, char *err, size_t errlen) {
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__StatsRequest req = PSRPC__STATS_REQUEST__INIT;
    req.cluster = &cl;
    return (Psrpc__StatsReply *)call_unpack(c, i, "/psrpc.Ps/Stats", &req.base,
                                            &psrpc__stats_reply__descriptor, "stats", rc, err,
                                            errlen);
}

int ps_client_worker_steps(ps_client *c, int64_t *out, int max, char *err, size_t errlen) {
    int nw = 0;
    for (int w = 0; w < max; w++) out[w] = INT64_MAX;
    for (int i = 0; i < c->nshards; i++) {
        int rc;
        Psrpc__StatsReply *r = shard_stats(c, i, &rc, err, errlen);
        if (!r) return rc;
        if (r->recovering) {
            cm_seterr(err, errlen, "PS shard %d restarted from its checkpoint of version %lld and "
                      "waits for the chief to roll the cluster back", i, (long long)r->version);
            psrpc__stats_reply__free_unpacked(r, NULL);
            return CM_EABORTED;
        }
        int n = (int)r->n_worker_steps;
        if (n > nw) nw = n;
        /* A shard that lists fewer workers (one restarted empty) has none
         * from the others: -1 for them, whatever other shards say. */
        for (int w = 0; w < max; w++) {
            int64_t v = w < n ? r->worker_steps[w] : -1;
            if (v < out[w]) out[w] = v;
        }
        psrpc__stats_reply__free_unpacked(r, NULL);
    }
    return nw;
}

int ps_client_stats_get(ps_client *c, ps_client_stats *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    out->min_version = INT64_MAX;
    for (int i = 0; i < c->nshards; i++) {
        int rc;
        Psrpc__StatsReply *r = shard_stats(c, i, &rc, err, errlen);
        if (!r) return rc;
        if (r->version < out->min_version) out->min_version = r->version;
        if (i == 0 || r->min_worker_step < out->min_worker_step)
            out->min_worker_step = r->min_worker_step;
        out->pushes += r->pushes;
        out->duplicate_pushes += r->duplicate_pushes;
        out->stale_pushes += r->stale_pushes;
        out->early_pushes += r->early_pushes;
        out->pulls += r->pulls;
        out->bad_requests += r->bad_requests;
        out->rows += r->rows;
        out->rows_pulled += r->rows_pulled;
        out->rows_pushed += r->rows_pushed;
        out->parked_pulls += r->parked_pulls;
        out->cancelled_pulls += r->cancelled_pulls;
        out->refused_unauthenticated += r->refused_unauthenticated;
        out->refused_denied += r->refused_denied;
        out->refused_exhausted += r->refused_exhausted;
        out->nonfinite_pushes += r->nonfinite_pushes;
        out->mem_bytes += r->mem_bytes;
        out->mem_limit += r->mem_limit;
        out->rows_resident += r->rows_resident;
        out->rows_on_disk += r->rows_on_disk;
        out->row_hits += r->row_hits;
        out->row_misses += r->row_misses;
        out->row_evictions += r->row_evictions;
        out->row_bytes_written += r->row_bytes_written;
        out->rows_budget += r->rows_budget;
        out->rows_not_admitted += r->rows_not_admitted;
        out->row_updates_dropped += r->row_updates_dropped;
        out->rows_expired += r->rows_expired;
        if (r->updates_lost > out->updates_lost_max) out->updates_lost_max = r->updates_lost;
        out->ckpt_rows += r->ckpt_rows;
        out->ckpt_row_bytes += r->ckpt_row_bytes;
        psrpc__stats_reply__free_unpacked(r, NULL);
    }
    return CM_OK;
}

int ps_client_open(const ps_client_cfg *cfg, ps_client **out, char *err, size_t errlen) {
    *out = NULL;
    const cm_placement *pl = cfg->placement;
    ps_client *c = cm_calloc(1, sizeof *c);
    c->cfg = *cfg;
    pthread_mutex_init(&c->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (!c->cfg.deadline_ms) c->cfg.deadline_ms = 60000;
    if (!c->cfg.connect_timeout_ms) c->cfg.connect_timeout_ms = 30000;
    c->nshards = pl->nshards;
    c->row_dim = cm_model_max_dim(cfg->model);
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
    /* Groups: each shard's partitions, in order, cut before a partition
     * that would take a call past call_bytes, or past 1/PS_CLIENT_MAX_CALLS
     * of the shard's bytes where that is more (a pull's calls may all wait
     * at the shard, and a shard parks at most --max-parked-pulls); a shard
     * with none: one empty group, so that every shard is still asked. */
    long max = cfg->call_bytes ? cfg->call_bytes : PS_CLIENT_CALL_BYTES;
    c->groups = cm_calloc((size_t)pl->nparts + (size_t)c->nshards, sizeof *c->groups);
    for (int s = 0; s < c->nshards; s++) {
        int g0 = c->ngroups;
        size_t lim = 0;
        if (max > 0) {
            lim = (pl->shard_bytes[s] + PS_CLIENT_MAX_CALLS - 1) / PS_CLIENT_MAX_CALLS;
            if (lim < (size_t)max) lim = (size_t)max;
        }
        /* Greedy cuts can make up to twice PS_CLIENT_MAX_CALLS groups
         * (partitions just over half the limit each): then the limit is
         * raised by a quarter and the shard cut again. */
        for (;;) {
            size_t bytes = 0;
            c->ngroups = g0;
            for (int k = 0; k < c->nparts[s] || k == 0; k++) {
                size_t b = k < c->nparts[s] ? pl->parts[c->parts[s][k]].count * sizeof(float) : 0;
                if (c->ngroups == g0 || (lim > 0 && c->groups[c->ngroups - 1].nparts > 0 &&
                                         bytes + b > lim)) {
                    c->groups[c->ngroups++] =
                        (struct group){.shard = s, .parts = c->parts[s] + k};
                    bytes = 0;
                }
                if (k < c->nparts[s]) c->groups[c->ngroups - 1].nparts++;
                bytes += b;
            }
            if (lim == 0 || c->ngroups - g0 <= PS_CLIENT_MAX_CALLS) break;
            lim += lim / 4 + 1;
        }
    }
    rpc_client_opts o = {.max_message = cfg->max_message,
                         .token = cfg->auth_token,
                         .admin_token = cfg->admin_token,
                         .tls_ca = cfg->tls_ca,
                         .tls_cert = cfg->tls_cert,
                         .tls_key = cfg->tls_key,
                         .tls_server_name = cfg->tls_server_name,
                         .poll_spin_us = cfg->poll_spin_us};
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
    /* Abandoned calls end by their deadline at the latest. */
    pthread_mutex_lock(&c->mu);
    while (c->orphans) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    for (int s = 0; s < c->nshards; s++) {
        if (c->ch[s]) rpc_channel_close(c->ch[s]);
        free(c->addrs[s]);
        free(c->parts[s]);
    }
    rpc_client_destroy(c->rpc);
    free(c->ch);
    free(c->addrs);
    free(c->parts);
    free(c->groups);
    free(c->nparts);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

void ps_client_set_epoch(ps_client *c, uint64_t epoch) { c->epoch = epoch; }
uint64_t ps_client_epoch(const ps_client *c) { return c->epoch; }

/* Shard i's checkpoints into *o (call_unpack: retries an unreachable one). */
static int checkpoints_one(ps_client *c, int i, int64_t keep_from, int abort_waiting, int commit,
                           ps_shard_checkpoints *o, char *err, size_t errlen) {
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__CheckpointsRequest req = PSRPC__CHECKPOINTS_REQUEST__INIT;
    req.cluster = &cl;
    req.keep_from = keep_from;
    req.abort_waiting = abort_waiting != 0;
    req.commit = commit != 0;
    int rc;
    Psrpc__CheckpointsReply *r = (Psrpc__CheckpointsReply *)call_unpack(
        c, i, "/psrpc.Ps/Checkpoints", &req.base, &psrpc__checkpoints_reply__descriptor,
        commit ? "the final commit" : "checkpoints", &rc, err, errlen);
    if (!r) return rc;
    memset(o, 0, sizeof *o);
    o->version = r->version;
    o->epoch = r->epoch;
    o->recovering = r->recovering;
    o->initialised = r->initialised;
    o->durable = r->durable;
    o->ncommitted = r->n_committed < PS_MAX_COMMITTED ? (int)r->n_committed : PS_MAX_COMMITTED;
    for (int k = 0; k < o->ncommitted; k++) o->committed[k] = r->committed[k];
    psrpc__checkpoints_reply__free_unpacked(r, NULL);
    return CM_OK;
}

static int checkpoints(ps_client *c, int64_t keep_from, int abort_waiting, int commit,
                       ps_shard_checkpoints *out, char *err, size_t errlen) {
    for (int i = 0; i < c->nshards; i++) {
        int rc = checkpoints_one(c, i, keep_from, abort_waiting, commit, &out[i], err, errlen);
        if (rc != CM_OK) return rc;
    }
    return CM_OK;
}

int ps_client_checkpoints(ps_client *c, int64_t keep_from, ps_shard_checkpoints *out,
                          char *err, size_t errlen) {
    return checkpoints(c, keep_from, 0, 0, out, err, errlen);
}

int ps_client_checkpoints_shard(ps_client *c, int shard, ps_shard_checkpoints *out, char *err,
                                size_t errlen) {
    if (shard < 0 || shard >= c->nshards) {
        cm_seterr(err, errlen, "no PS shard %d (of %d)", shard, c->nshards);
        return CM_EINVAL;
    }
    return checkpoints_one(c, shard, -1, 0, 0, out, err, errlen);
}

int ps_client_commit_final(ps_client *c, ps_shard_checkpoints *out, char *err, size_t errlen) {
    return checkpoints(c, -1, 0, 1, out, err, errlen);
}

int ps_client_abort_waiting(ps_client *c, ps_shard_checkpoints *out, char *err, size_t errlen) {
    return checkpoints(c, -1, 1, 0, out, err, errlen);
}

int ps_client_rollback(ps_client *c, int64_t version, uint64_t epoch, char *err,
                       size_t errlen) {
    Psrpc__Cluster cl;
    fill_cluster(c, &cl);
    Psrpc__RollbackRequest req = PSRPC__ROLLBACK_REQUEST__INIT;
    req.cluster = &cl;
    req.version = version;
    req.epoch = epoch;
    for (int i = 0; i < c->nshards; i++) {
        int rc;
        ProtobufCMessage *r = call_unpack(c, i, "/psrpc.Ps/Rollback", &req.base,
                                          &psrpc__rollback_reply__descriptor, "rollback", &rc,
                                          err, errlen);
        if (!r) return rc;
        protobuf_c_message_free_unpacked(r, NULL);
    }
    c->epoch = epoch;
    return CM_OK;
}
