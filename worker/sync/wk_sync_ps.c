/* wk_sync_ps.c - PS mode: push the gradient, pull the next version.
 * SPDX-License-Identifier: MIT
 *
 * Synchronous: step t pushes the gradient of step t to every shard, then
 * pulls version t + 1, which a shard publishes once all workers' step-t
 * gradients are in. Asynchronous: the pull takes whatever version is newest.
 * The chief initialises the shards at begin() and shuts them down at
 * finish(); in async mode it first waits for every worker's last push.
 *
 * Overlap (sync, one host replica): the backward pass announces each
 * variable's gradient as it becomes final, and the first layer's kernel in
 * row pieces that match its partitions. The hook scales each announced
 * range, gathers the partitions it completes, and once OVERLAP_FLUSH_BYTES
 * are gathered sends them in one ps_client_push_pull_parts; step() sends the
 * rest and waits for every ticket. Starting a call costs ~0.09 ms on the
 * computing thread; handing the calls to a sender thread instead measured
 * worse on 2 cores (the early calls then went out late). The shards apply each partition as soon
 * as all workers gave it and answer with its new values, so the push, the
 * apply and the reply of early partitions hide behind the remaining compute.
 *
 * Pipelined pull: the first layer's kernel is computed last in the backward
 * pass but read first in the next forward pass. So step() waits for every
 * ticket except those carrying its pieces and returns; the next step's
 * forward pass asks for each piece before it reads it (wk_grad_hook.need),
 * so the round trip of the last pieces overlaps the forward GEMM of the
 * first. Anything else that reads params first calls settle().
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_placement.h"
#include "proto/rpc.h"
#include "common/cm_status.h"
#include "common/cm_token.h"
#include "common/cm_time.h"
#include "ps/ps_client.h"
#include "storage/st_store.h"
#include "worker/sync/wk_sync.h"

/* Gathered partitions are sent once this many bytes are ready: fewer calls
 * for the small variables, one per piece of the large kernel. */
#define OVERLAP_FLUSH_BYTES ((size_t)64 << 10)

typedef struct psync {
    wk_sync base;
    int skipped; /* Backup sync: a step closed without this worker... */
    int64_t skipped_step; /* ...this one: the push the shards refused. */
    wk_sync_ps_cfg cfg;
    cm_placement *pl;
    ps_client *client;
    int initialised;
    /* Overlap: the placement per variable, and the current step's state. */
    int *var_part0, *var_nparts; /* Partition ids of var v: var_part0[v] + k. */
    size_t **splits;             /* Per var: row boundaries of its partitions. */
    int *nsplits;
    wk_grad_hook hook;
    int active;                  /* A step's overlap is in progress. */
    int64_t step;
    int64_t pend_step;           /* The step whose tickets are pend[]. */
    float *grad, *params, scale;
    uint8_t *announced;          /* Per partition: final (and scaled). */
    uint8_t *sent;               /* Per partition: in a ticket. */
    uint32_t *ready;             /* Announced, not yet sent. */
    int nready;
    size_t ready_bytes;
    ps_ticket **tickets;
    int ntickets;
    int *part_ticket;            /* Per partition: index into tickets. */
    /* Pipelined pull: tickets step() left in flight (they carry pieces of
     * the first kernel), and per partition the index of its ticket there
     * (-1: none pending). */
    ps_ticket **pend;
    int npend;
    int *part_pend;
    uint8_t *defer;              /* Per ticket index: left pending. */
    int pend_rc;                 /* A settle's error for the next step(). */
    double need_wait;            /* Seconds the forward pass waited for pieces. */
    int pipeline;                /* Pipelined pull on (see the top). */
    ps_shard_checkpoints *ck; /* Per shard: the last Checkpoints answer. */
    float *init_values;       /* The chief's copy of --init-from's values: a
                               * PS restarted without a checkpoint needs them
                               * again. */
    double last_gc;           /* Chief: when it last told the shards to GC. */
} psync;

/* ------------------------------------------------------------ overlap */

static void send_ready(psync *p) {
    if (p->nready == 0) return;
    ps_ticket *t = NULL;
    /* The ids are valid and distinct by construction: this cannot fail. */
    if (ps_client_push_pull_parts(p->client, p->step, p->grad, p->params, p->ready, p->nready,
                                  &t) != CM_OK)
        abort();
    for (int i = 0; i < p->nready; i++) {
        p->sent[p->ready[i]] = 1;
        p->part_ticket[p->ready[i]] = p->ntickets;
    }
    p->tickets[p->ntickets++] = t;
    p->nready = 0;
    p->ready_bytes = 0;
}

/* Scale partition id's range and queue it. */
static void mark_ready(psync *p, uint32_t id) {
    if (p->announced[id]) return;
    const cm_partition *part = &p->pl->parts[id];
    if (p->scale != 1.0f) {
        float *g = p->grad + part->offset;
        for (size_t i = 0; i < part->count; i++) g[i] *= p->scale;
    }
    p->announced[id] = 1;
    p->ready[p->nready++] = id;
    p->ready_bytes += part->count * sizeof(float);
}

static void on_ready(void *ud, int var, size_t row_begin, size_t row_end) {
    psync *p = ud;
    for (int k = 0; k < p->var_nparts[var]; k++) {
        uint32_t id = (uint32_t)(p->var_part0[var] + k);
        const cm_partition *part = &p->pl->parts[id];
        if (part->row_begin >= row_begin && part->row_end <= row_end) mark_ready(p, id);
    }
    if (p->ready_bytes >= OVERLAP_FLUSH_BYTES) send_ready(p);
}

static void pend_clear(psync *p) {
    p->npend = 0;
    for (int id = 0; id < p->pl->nparts; id++) p->part_pend[id] = -1;
}

/* After a failure: give the pending tickets up (their late replies are
 * dropped) rather than wait for them; a shard may hold them until its
 * deadline, waiting for workers that are recovering. */
static void abandon_pending(psync *p) {
    int n = 0;
    for (int i = 0; i < p->npend; i++)
        if (p->pend[i]) p->pend[n++] = p->pend[i];
    /* Without waiting for sends (ps_tickets_drop): recovery quiesces the
     * client before the buffers are reused, and closing it waits. */
    ps_tickets_drop(p->pend, n);
    pend_clear(p);
}

/* Backup sync: a push the shards refused because the step closed without
 * this worker (CM_ESKIPPED, from any wait of the step: the step's own, or
 * the next forward pass waiting for its pieces, or the end's) is a recovery
 * without a rollback: CM_EABORTED, and ps_recover skips ahead to the
 * shards' version after 'step', the step of the refused push (not the step
 * the trainer was in when the refusal showed: that may be the next one). */
static int skip_as_abort(psync *p, int rc, int64_t step) {
    if (rc != CM_ESKIPPED) return rc;
    if (!p->skipped || step < p->skipped_step) p->skipped_step = step;
    p->skipped = 1;
    return CM_EABORTED;
}

/* Wait for pending ticket i (if still pending); on an error the others
 * are abandoned and the error returned with its message. */
static int wait_pend(psync *p, int i) {
    if (!p->pend[i]) return CM_OK;
    int rc = skip_as_abort(p, ps_ticket_wait(p->pend[i], NULL, p->base.err, sizeof p->base.err),
                           p->pend_step);
    p->pend[i] = NULL;
    if (rc != CM_OK) abandon_pending(p);
    return rc;
}

/* Wait for every pending ticket (see wait_pend). */
static int settle_all(psync *p) {
    for (int i = 0; i < p->npend; i++) {
        int rc = wait_pend(p, i);
        if (rc != CM_OK) return rc;
    }
    pend_clear(p);
    return CM_OK;
}

static int ps_settle(wk_sync *s) { return settle_all((psync *)s); }

/* wk_grad_hook.need: wait for the pending tickets that carry rows
 * [row_begin, row_end) of var. */
static int on_need(void *ud, int var, size_t row_begin, size_t row_end) {
    psync *p = ud;
    if (p->npend == 0) return CM_OK;
    for (int k = 0; k < p->var_nparts[var]; k++) {
        uint32_t id = (uint32_t)(p->var_part0[var] + k);
        const cm_partition *part = &p->pl->parts[id];
        int i = p->part_pend[id];
        if (i < 0 || part->row_end <= row_begin || part->row_begin >= row_end) continue;
        double t0 = cm_now();
        int rc = wait_pend(p, i);
        p->need_wait += cm_now() - t0;
        if (rc != CM_OK) return rc;
    }
    return CM_OK;
}

static const wk_grad_hook *ps_overlap(wk_sync *s, int64_t step, float *grad, float *params,
                                      float scale) {
    psync *p = (psync *)s;
    if (!p->cfg.overlap || p->cfg.async || p->cfg.separate_pull || p->cfg.fault_zero_gradient)
        return NULL;
    /* The pending pieces of the last step land in the buffers of that step:
     * other buffers cannot wait for them piece by piece (cannot happen with
     * the trainer; an error shows in step()). */
    if (p->npend && (params != p->params || grad != p->grad)) p->pend_rc = settle_all(p);
    s->err[0] = '\0';
    p->active = 1;
    p->step = step;
    p->grad = grad;
    p->params = params;
    p->scale = scale;
    memset(p->announced, 0, (size_t)p->pl->nparts);
    memset(p->sent, 0, (size_t)p->pl->nparts);
    p->nready = 0;
    p->ready_bytes = 0;
    p->ntickets = 0;
    return &p->hook;
}

/* Wait for every ticket of the step together (a rollback seen on any of
 * them ends the wait for all); the first error wins. */
static int wait_tickets(psync *p) {
    int rc = skip_as_abort(
        p, ps_tickets_wait(p->tickets, p->ntickets, NULL, p->base.err, sizeof p->base.err),
        p->step);
    p->ntickets = 0;
    p->active = 0;
    return rc;
}

static int overlap_finish(psync *p, wk_sync_times *t) {
    double t0 = cm_now();
    /* The last step's pieces: the forward pass asked for all of them, so
     * this only waits if it could not. */
    int rc0 = settle_all(p);
    if (rc0 == CM_OK) rc0 = p->pend_rc;
    p->pend_rc = CM_OK;
    if (rc0 != CM_OK) { /* Recovery (or the client's close) waits for the sends. */
        ps_tickets_drop(p->tickets, p->ntickets);
        p->ntickets = 0;
        p->active = 0;
        return rc0;
    }
    for (int id = 0; id < p->pl->nparts; id++) mark_ready(p, (uint32_t)id);
    send_ready(p);
    if (p->pipeline) {
        /* Leave the tickets that carry the first kernel's pieces in flight
         * (see the top of this file); wait for the rest. */
        int keep = 0;
        p->pend_step = p->step;
        for (int i = 0; i < p->ntickets; i++) p->defer[i] = 0;
        for (int k = 0; k < p->var_nparts[0]; k++)
            p->defer[p->part_ticket[p->var_part0[0] + k]] = 1;
        for (int i = 0; i < p->ntickets; i++) {
            if (p->defer[i]) {
                p->pend[p->npend] = p->tickets[i];
                for (int id = 0; id < p->pl->nparts; id++)
                    if (p->part_ticket[id] == i) p->part_pend[id] = p->npend;
                p->npend++;
            } else {
                p->tickets[keep++] = p->tickets[i];
            }
        }
        p->ntickets = keep;
    }
    int rc = wait_tickets(p);
    if (rc != CM_OK) abandon_pending(p);
    t->push = cm_now() - t0; /* The part of the communication not hidden... */
    t->pull = t->pull_in_compute = p->need_wait; /* ...and the forward pass's wait. */
    p->need_wait = 0.0;
    return rc;
}

/* ------------------------------------------------------------ recovery */

static int64_t recovery_timeout_ms(const psync *p) {
    return p->cfg.recovery_timeout_ms > 0 ? p->cfg.recovery_timeout_ms : 120000;
}

static ps_init_cfg init_cfg(const psync *p) {
    return (ps_init_cfg){.optim = p->cfg.optim, .table_optim = p->cfg.table_optim,
                         .seed = p->cfg.seed,
                         .num_workers = p->cfg.nworkers, .async = p->cfg.async,
                         .backup_ms = p->cfg.async ? 0 : p->cfg.backup_ms,
                         .global_batch = p->cfg.global_batch,
                         .steps_per_epoch = p->cfg.steps_per_epoch,
                         .values = p->cfg.init_values};
}

/* The newest version every shard has committed (st_newest_common, the
 * rule the unit tests of storage check), or 0: the initial values, which
 * every shard can have again (from the seed, or the checkpoint of version
 * 0 written at an --init-from start). */
static int64_t newest_common(const psync *p) {
    const int64_t *lists[p->cfg.nps];
    int counts[p->cfg.nps];
    for (int i = 0; i < p->cfg.nps; i++) {
        lists[i] = p->ck[i].committed;
        counts[i] = p->ck[i].ncommitted;
    }
    int64_t v = st_newest_common(lists, counts, p->cfg.nps);
    return v > 0 ? v : 0;
}

/* 1 if every shard serves the same version in the same epoch. */
static int consistent(const psync *p, int64_t *version, uint64_t *epoch) {
    const ps_shard_checkpoints *ck = p->ck;
    for (int i = 0; i < p->cfg.nps; i++)
        if (!ck[i].initialised || ck[i].recovering || ck[i].epoch == 0 ||
            ck[i].epoch != ck[0].epoch || (!p->cfg.async && ck[i].version != ck[0].version))
            return 0;
    *version = ck[0].version;
    *epoch = ck[0].epoch;
    return 1;
}

static int pull_version(psync *p, int64_t version, float *params) {
    ps_ticket *t;
    /* Async shards move on their own: each one's newest (a version one
     * shard has may never come to another, e.g. at the end of a run). */
    ps_client_pull(p->client, p->cfg.async ? 0 : version, params, &t);
    return ps_ticket_wait(t, NULL, p->base.err, sizeof p->base.err);
}

/* The chief: find where the cluster stands and, unless every shard serves
 * the same version in one epoch, roll every shard back to the newest
 * version they all committed, in a new epoch. *version: where training
 * goes on (sync: that step). */
static int chief_sync(psync *p, int64_t *version) {
    int rc = ps_client_checkpoints(p->client, -1, p->ck, p->base.err, sizeof p->base.err);
    if (rc != CM_OK) return rc;
    int fresh = 0;
    for (int i = 0; i < p->cfg.nps; i++) fresh |= !p->ck[i].initialised;
    if (fresh) {
        /* A PS restarted without a checkpoint to load (no --data-dir, or
         * none written yet): initialise it; the rollback below then takes
         * every shard to a version it can have, the initial values at
         * worst. */
        ps_init_cfg init = init_cfg(p);
        uint64_t keep = ps_client_epoch(p->client);
        rc = ps_client_init(p->client, &init, p->base.err, sizeof p->base.err);
        ps_client_set_epoch(p->client, keep);
        if (rc == CM_OK)
            rc = ps_client_checkpoints(p->client, -1, p->ck, p->base.err, sizeof p->base.err);
        if (rc != CM_OK) return rc;
    }
    uint64_t epoch = 0;
    if (consistent(p, version, &epoch)) {
        ps_client_set_epoch(p->client, epoch);
        return CM_OK;
    }
    int64_t v = newest_common(p);
    for (int i = 0; i < p->cfg.nps; i++)
        if (p->ck[i].epoch > epoch) epoch = p->ck[i].epoch;
    if (ps_client_epoch(p->client) > epoch) epoch = ps_client_epoch(p->client);
    epoch++;
    for (int i = 0; i < p->cfg.nps; i++)
        cm_info("PS %d: %s version %lld, epoch %llu, newest checkpoint %lld", i,
                p->ck[i].recovering ? "restarted at" : "at", (long long)p->ck[i].version,
                (unsigned long long)p->ck[i].epoch,
                p->ck[i].ncommitted ? (long long)p->ck[i].committed[0] : -1LL);
    int64_t newest = v;
    for (int i = 0; i < p->cfg.nps; i++)
        if (p->ck[i].version > newest) newest = p->ck[i].version;
    if (!p->cfg.async) p->base.versions_lost += newest - v; /* Async: the shards count. */
    cm_warn("rolling the cluster back to version %lld (epoch %llu): %lld version%s taken back",
            (long long)v, (unsigned long long)epoch, (long long)(newest - v),
            newest - v == 1 ? "" : "s");
    rc = ps_client_rollback(p->client, v, epoch, p->base.err, sizeof p->base.err);
    if (rc != CM_OK) return rc;
    *version = v;
    return CM_OK;
}

/* A worker that is not the chief: wait until the chief has made the
 * cluster consistent (bounded), then adopt its epoch and version. */
/* Sync: the shards serve different versions of one epoch, none restarted:
 * a step that some shards finished and others wait for. */
static int half_step(const psync *p) {
    if (p->cfg.async) return 0;
    int mixed = 0;
    for (int i = 0; i < p->cfg.nps; i++) {
        const ps_shard_checkpoints *c = &p->ck[i];
        if (!c->initialised || c->recovering || c->epoch == 0 || c->epoch != p->ck[0].epoch)
            return 0;
        mixed |= c->version != p->ck[0].version;
    }
    return mixed;
}

static int worker_sync(psync *p, uint64_t old_epoch, int64_t *version) {
    double start = cm_now(), said = start;
    int half = 0, rec = 0, asked = 0;
    for (;;) {
        int rc = ps_client_checkpoints(p->client, -1, p->ck, p->base.err, sizeof p->base.err);
        if (rc != CM_OK) return rc;
        uint64_t epoch = 0;
        if (consistent(p, version, &epoch) && (epoch != old_epoch || old_epoch == 0)) {
            ps_client_set_epoch(p->client, epoch);
            return CM_OK;
        }
        /* Joining (this process started again after one died): a step half
         * pushed by the dead one never completes, and the version it needs
         * is gone where it did. Seen for a while (not a step finishing on
         * one shard before another), it asks the shards to abort the pulls
         * that wait for it; the chief then rolls the cluster back. */
        half = old_epoch == 0 && half_step(p) ? half + 1 : 0;
        /* A shard restarted and waits for the chief's rollback, which does
         * not come: the chief may not see the restart, its calls parked at
         * a live shard that waits for this worker's step (a joining worker
         * whose predecessor pushed it to the restarted shard only; or this
         * one, which dropped its step when the restarted shard refused it,
         * while the chief waits for a piece of the next version elsewhere).
         * Left so for a second, the same abort frees the chief. */
        int restarted = -1;
        for (int i = 0; i < p->cfg.nps; i++)
            if (p->ck[i].recovering) restarted = i;
        rec = restarted >= 0 ? rec + 1 : 0;
        if (rec >= 20 && !asked) {
            cm_warn("PS shard %d restarted and waits for the chief's rollback, which has not "
                    "come for a second (the chief may wait for this worker's step elsewhere): "
                    "asking the shards to abort their waiting pulls", restarted);
            rc = ps_client_abort_waiting(p->client, p->ck, p->base.err, sizeof p->base.err);
            if (rc != CM_OK) return rc;
            asked = 1;
        }
        if (half >= 4 && !asked) {
            int64_t lo = p->ck[0].version, hi = lo;
            for (int i = 1; i < p->cfg.nps; i++) {
                if (p->ck[i].version < lo) lo = p->ck[i].version;
                if (p->ck[i].version > hi) hi = p->ck[i].version;
            }
            cm_warn("the PS shards stand at versions %lld to %lld: a step half pushed before "
                    "this worker started again; asking them to abort it, for the chief to roll "
                    "back", (long long)lo, (long long)hi);
            rc = ps_client_abort_waiting(p->client, p->ck, p->base.err, sizeof p->base.err);
            if (rc != CM_OK) return rc;
            asked = 1;
        }
        double now = cm_now();
        if ((now - start) * 1e3 > (double)recovery_timeout_ms(p)) {
            snprintf(p->base.err, sizeof p->base.err,
                     "the PS shards did not agree on a version within %lld ms (is the chief "
                     "running?)",
                     (long long)recovery_timeout_ms(p));
            return CM_ETIMEDOUT;
        }
        if (now - said > 10.0) {
            cm_info("waiting for the chief to initialise or roll back the PS shards");
            said = now;
        }
        usleep(50000);
    }
}

static int ps_begin(wk_sync *s, float *params, int64_t *first_step) {
    psync *p = (psync *)s;
    int rc;
    int64_t v = 0;
    *first_step = 0;
    if (p->cfg.is_chief) {
        ps_init_cfg init = init_cfg(p);
        rc = ps_client_init(p->client, &init, s->err, sizeof s->err);
        if (rc != CM_OK) return rc;
        cm_info("initialised %d PS shard%s", p->cfg.nps, p->cfg.nps == 1 ? "" : "s");
        rc = chief_sync(p, &v);
        p->last_gc = cm_now();
    } else {
        rc = worker_sync(p, 0, &v);
    }
    if (rc == CM_OK) rc = pull_version(p, v, params);
    if (rc == CM_OK && v > 0 && !p->cfg.async) {
        cm_info("resuming at step %lld (epoch %lld of the data)", (long long)v,
                p->cfg.steps_per_epoch ? (long long)(v / (int64_t)p->cfg.steps_per_epoch) + 1
                                       : 0LL);
        if (!p->cfg.async) *first_step = v;
    }
    if (rc == CM_OK && p->cfg.async && p->cfg.rank < 64) {
        /* Async steps are each worker's own: a worker started again (its
         * process died) goes on after the last step every shard has from
         * it, not from the start of its data. */
        int64_t last[64];
        char err[256];
        int nw = ps_client_worker_steps(p->client, last, p->cfg.rank + 1, err, sizeof err);
        if (nw > p->cfg.rank && last[p->cfg.rank] >= 0) {
            *first_step = last[p->cfg.rank] + 1;
            cm_info("rejoining at step %lld (the shards have this worker's steps up to %lld)",
                    (long long)*first_step, (long long)last[p->cfg.rank]);
        }
    }
    p->initialised = rc == CM_OK;
    return rc;
}

/* After a recovery's pulls: the dropped tickets no longer send from the
 * gradient's buffers, so the next step may write them. */
static int quiesce(psync *p, const char *what) {
    if (ps_client_quiesce(p->client, p->cfg.deadline_ms) == CM_OK) return CM_OK;
    snprintf(p->base.err, sizeof p->base.err, "calls of the %s step still send its gradient "
             "after %lld ms", what, (long long)p->cfg.deadline_ms);
    return CM_ETIMEDOUT;
}

static int ps_recover(wk_sync *s, int64_t failed_step, int64_t *resume_step, float *params) {
    psync *p = (psync *)s;
    char why[sizeof s->err];
    memcpy(why, s->err, sizeof why);
    /* Drop what is in flight without waiting: a call parked at a shard
     * that waits for a worker being recovered ends only with the rollback
     * below; the gradient's buffers are reused only after the quiesce. */
    if (p->active) ps_tickets_drop(p->tickets, p->ntickets);
    p->ntickets = 0;
    p->active = 0;
    abandon_pending(p);
    memcpy(s->err, why, sizeof why);
    if (p->skipped) {
        /* Backup sync closed the step without this worker: no rollback, the
         * shards' newest version (each shard's: they may be a step apart)
         * and its step. */
        p->skipped = 0;
        int64_t closed = p->skipped_step < failed_step ? p->skipped_step : failed_step;
        ps_ticket *t;
        int64_t v = closed + 1;
        ps_client_pull(p->client, v, params, &t);
        int rc = ps_ticket_wait(t, &v, s->err, sizeof s->err);
        if (rc == CM_OK) rc = quiesce(p, "skipped");
        if (rc != CM_OK) return rc;
        snprintf(s->err, sizeof s->err, "the shards closed step %lld without this worker "
                 "(--sync backup): skipping to their version %lld", (long long)closed,
                 (long long)v);
        *resume_step = v;
        return CM_OK;
    }
    cm_warn("step %lld: %s", (long long)failed_step, s->err);
    uint64_t old = ps_client_epoch(p->client);
    int64_t v = 0;
    int rc = p->cfg.is_chief ? chief_sync(p, &v) : worker_sync(p, old, &v);
    if (rc == CM_OK) rc = pull_version(p, v, params);
    if (rc == CM_OK) rc = quiesce(p, "failed");
    if (rc != CM_OK) return rc;
    /* Async steps are each worker's own: carry on from the failed one. */
    *resume_step = p->cfg.async ? failed_step : v;
    return CM_OK;
}

/* The chief, now and then: tell the shards which generations every shard
 * had committed at the last look (a shard alone cannot know), so older
 * ones can go, and take the new lists for the next time: one round. */
static void maybe_gc(psync *p) {
    if (!p->cfg.is_chief || cm_now() - p->last_gc < 5.0) return;
    p->last_gc = cm_now();
    char err[256];
    int64_t v = newest_common(p);
    ps_client_checkpoints(p->client, v > 0 ? v : -1, p->ck, err, sizeof err);
}

static ps_row_keys row_keys(const wk_rowset *r) {
    return (ps_row_keys){.ntables = r->ntables, .tab_begin = r->tab_begin, .ids = r->ids};
}

/* A sparse model's step: one PushPull per shard carries the dense
 * gradient, the rows' gradients and the next batch's row ids, and brings
 * back the next version's parameters and those rows. */
static int sparse_step(psync *p, int64_t step, float *grad, float *params, wk_sparse_step *sp,
                       wk_sync_times *t) {
    if (p->cfg.fault_zero_gradient) {
        memset(grad, 0, p->cfg.model->numel * sizeof(float));
        memset(sp->row_grad, 0,
               sp->keys->nuniq * (size_t)cm_model_max_dim(p->cfg.model) * sizeof(float));
    }
    double t0 = cm_now();
    ps_row_keys keys = row_keys(sp->keys), next;
    if (sp->next) next = row_keys(sp->next);
    ps_ticket *tk;
    int rc = ps_client_push_pull_rows(p->client, step, grad, params, &keys, sp->row_grad,
                                      sp->next ? &next : NULL, sp->next_values, &tk);
    if (rc != CM_OK) {
        snprintf(p->base.err, sizeof p->base.err, "bad sparse step (model without tables?)");
        return rc;
    }
    rc = ps_ticket_wait(tk, NULL, p->base.err, sizeof p->base.err);
    t->push = cm_now() - t0;
    t->pull = 0.0;
    if (rc == CM_OK) {
        sp->next_done = sp->next != NULL;
        maybe_gc(p);
    }
    return rc;
}

static int ps_rows(wk_sync *s, int64_t version, const wk_rowset *keys, float *values,
                   int train) {
    psync *p = (psync *)s;
    if (keys->nuniq == 0) return CM_OK;
    ps_row_keys k = row_keys(keys);
    ps_ticket *tk;
    int rc = ps_client_pull_rows(p->client, p->cfg.async ? 0 : version, &k, values, train, &tk);
    if (rc != CM_OK) {
        snprintf(s->err, sizeof s->err, "bad row pull (model without tables?)");
        return rc;
    }
    return ps_ticket_wait(tk, NULL, s->err, sizeof s->err);
}

/* Every row of a table, page by page from every shard. */
static int ps_dump(wk_sync *s, int table,
                   int (*fn)(void *ud, uint64_t id, const float *values, const float *slots,
                             int64_t count),
                   void *ud) {
    psync *p = (psync *)s;
    int dim = p->cfg.model->vars[p->cfg.model->table_var[table]].dim;
    for (int sh = 0; sh < p->cfg.nps; sh++) {
        uint64_t from = 0, next;
        do {
            uint64_t *ids;
            float *vals;
            size_t n;
            int rc = ps_client_dump_rows(p->client, sh, table, from, 65536, &ids, &vals, &n,
                                         &next, s->err, sizeof s->err);
            for (size_t i = 0; rc == CM_OK && i < n; i++)
                rc = fn(ud, ids[i], vals + i * (size_t)dim, NULL, 0);
            free(ids);
            free(vals);
            if (rc != CM_OK) return rc;
            from = next;
        } while (next != 0);
    }
    return CM_OK;
}

static int step_inner(wk_sync *s, int64_t step, float *grad, float *params, wk_sparse_step *sp,
                      wk_sync_times *t);

/* A sync step that timed out waits for workers that do not push: name
 * them (rank, address, the last step every shard has from them) in the
 * error, instead of a bare DEADLINE_EXCEEDED. */
static void name_missing_workers(psync *p, int64_t step) {
    int64_t last[64];
    char err[256];
    int nw = ps_client_worker_steps(p->client, last, 64, err, sizeof err);
    if (nw <= 0) return;
    char who[700] = "";
    size_t at = 0;
    int nmiss = 0;
    for (int w = 0; w < nw && w < 64; w++) {
        if (w == p->cfg.rank || last[w] >= step) continue;
        const char *addr = p->cfg.worker_addrs ? p->cfg.worker_addrs[w] : NULL;
        char seen[48];
        if (last[w] < 0)
            snprintf(seen, sizeof seen, "no push yet");
        else
            snprintf(seen, sizeof seen, "last pushed step %lld", (long long)last[w]);
        int n = snprintf(who + at, sizeof who - at, "%srank %d%s%s%s (%s)", nmiss ? ", " : "",
                         w, addr ? " (" : "", addr ? addr : "", addr ? ")" : "", seen);
        if (n < 0 || (size_t)n >= sizeof who - at) break;
        at += (size_t)n;
        nmiss++;
    }
    if (!nmiss) return;
    size_t len = strlen(p->base.err);
    snprintf(p->base.err + len, sizeof p->base.err - len,
             "; the shards still wait for step %lld of %s: %s not running?", (long long)step,
             who, nmiss == 1 ? "is it" : "are they");
}

static int ps_step(wk_sync *s, int64_t step, float *grad, float *params, wk_sparse_step *sp,
                   wk_sync_times *t) {
    psync *p = (psync *)s;
    int rc = step_inner(s, step, grad, params, sp, t);
    if (rc == CM_ETIMEDOUT && !p->cfg.async) name_missing_workers(p, step);
    return rc;
}

/* Test hook, PSTRAIN_TEST_HALF_STEP=STEP:RANK:FILE: the worker of that
 * rank pushes step STEP to the first shard only, waits for its reply (the
 * step is then final there), and dies by SIGKILL, once (FILE marks it
 * done): a step half pushed, which its successor must get the cluster out
 * of (worker_sync). Dense steps without --overlap. */
static void test_half_step(psync *p, int64_t step, float *grad, float *params) {
    const char *e = getenv("PSTRAIN_TEST_HALF_STEP");
    long long at;
    int rank, n = 0;
    char file[512];
    if (!e || sscanf(e, "%lld:%d:%511s", &at, &rank, file) != 3 || at != step ||
        rank != p->cfg.rank || access(file, F_OK) == 0)
        return;
    int fd = open(file, O_CREAT | O_WRONLY, 0600);
    if (fd >= 0) close(fd);
    uint32_t *parts = cm_malloc((size_t)p->pl->nparts * sizeof *parts);
    for (int i = 0; i < p->pl->nparts; i++)
        if (p->pl->parts[i].shard == 0) parts[n++] = (uint32_t)i;
    ps_ticket *t;
    if (n && ps_client_push_pull_parts(p->client, step, grad, params, parts, n, &t) == CM_OK)
        ps_ticket_wait(t, NULL, p->base.err, sizeof p->base.err);
    cm_warn("test: step %lld pushed to PS 0 only; dying", (long long)step);
    raise(SIGKILL);
}

static int step_inner(wk_sync *s, int64_t step, float *grad, float *params, wk_sparse_step *sp,
                      wk_sync_times *t) {
    psync *p = (psync *)s;
    if (sp) return sparse_step(p, step, grad, params, sp, t);
    if (p->active && p->step == step && p->grad == grad && p->params == params) {
        int rc = overlap_finish(p, t);
        if (rc == CM_OK) maybe_gc(p);
        return rc;
    }
    if (p->active) wait_tickets(p); /* Cannot happen with the trainer. */
    int rc0 = settle_all(p);
    if (rc0 != CM_OK) return rc0;
    if (p->cfg.fault_zero_gradient) memset(grad, 0, p->cfg.model->numel * sizeof(float));
    if (!p->cfg.async) test_half_step(p, step, grad, params);
    double t0 = cm_now();
    ps_ticket *tk;
    if (p->cfg.separate_pull) {
        ps_client_push(p->client, step, grad, &tk);
        int rc = ps_ticket_wait(tk, NULL, s->err, sizeof s->err);
        double t1 = cm_now();
        if (rc != CM_OK) return rc;
        ps_client_pull(p->client, p->cfg.async ? 0 : step + 1, params, &tk);
        rc = ps_ticket_wait(tk, NULL, s->err, sizeof s->err);
        t->push = t1 - t0;
        t->pull = cm_now() - t1;
        return rc;
    }
    /* One call per shard: the reply is the next version's parameters. */
    ps_client_push_pull(p->client, step, grad, params, &tk);
    int rc = ps_ticket_wait(tk, NULL, s->err, sizeof s->err);
    t->push = cm_now() - t0;
    t->pull = 0.0;
    if (rc == CM_OK) maybe_gc(p);
    return rc;
}

/* The chief, its final parameters in: every shard commits its version as
 * the run's last (a checkpoint of it) before anything is written out. A
 * shard that restarted after the last step (it waits for a rollback)
 * commits nothing: CM_EABORTED, and the trainer recovers, rolls the cluster
 * back and trains the lost steps again, with the other workers (sync: they
 * wait for this commit, wait_run_end). */
static int commit_end(psync *p, int64_t steps) {
    wk_sync *s = &p->base;
    int rc = ps_client_commit_final(p->client, p->ck, s->err, sizeof s->err);
    if (rc != CM_OK) return rc;
    for (int i = 0; i < p->cfg.nps; i++) {
        const ps_shard_checkpoints *c = &p->ck[i];
        if (c->recovering) {
            snprintf(s->err, sizeof s->err, "PS shard %d restarted after the last step, from its "
                     "checkpoint of version %lld: rolling back to train the steps it lost again",
                     i, (long long)c->version);
            return CM_EABORTED;
        }
        if (!p->cfg.async && c->version != steps) {
            snprintf(s->err, sizeof s->err, "PS shard %d ends at version %lld, not %lld",
                     i, (long long)c->version, (long long)steps);
            return CM_EINVAL;
        }
    }
    return CM_OK;
}

/* A sync training worker other than the chief, its last step in: the
 * chief may still roll the cluster back (a PS restarted before the chief
 * ended the run) and need this worker to train the steps taken back. Wait
 * until every shard has committed the last version (the chief's
 * commit_end: from then on no restart can take it back) and return CM_OK;
 * CM_EABORTED when a shard restarted from an older checkpoint or the
 * cluster rolled back (the trainer recovers and trains on). A shard without
 * checkpoints (no --data-dir, or no --checkpoint-every) cannot take
 * anything back: nothing to wait for, and not asked (its last answer said
 * so; the chief may have shut it down already, and a shard gone would be
 * asked again until the limit). Bounded by the recovery timeout (then
 * CM_OK, with a warning: this worker's own steps are done). */
static int wait_run_end(psync *p, int64_t steps) {
    wk_sync *s = &p->base;
    if (steps <= 0) return CM_OK;
    int n = p->cfg.nps, left = n, rc = CM_OK;
    char *done = cm_calloc((size_t)n, 1);
    for (int i = 0; i < n; i++)
        if (!p->ck[i].durable) {
            done[i] = 1;
            left--;
        }
    uint64_t epoch = ps_client_epoch(p->client);
    int64_t limit = p->cfg.recovery_timeout_ms > 0 ? p->cfg.recovery_timeout_ms : 120000;
    double start = cm_now(), said = start;
    while (left > 0) {
        for (int i = 0; i < n && rc == CM_OK; i++) {
            if (done[i]) continue;
            ps_shard_checkpoints c;
            /* An unreachable shard (retried for the connect timeout, then
             * again here: one restarting may take longer) or a slow answer
             * is asked again until the limit. */
            int r = ps_client_checkpoints_shard(p->client, i, &c, s->err, sizeof s->err);
            if (r == CM_EUNAVAIL || r == CM_ETIMEDOUT) continue;
            if ((rc = r) != CM_OK) break;
            if (!c.durable || (c.ncommitted > 0 && c.committed[0] >= steps)) {
                done[i] = 1;
                left--;
            } else if (c.recovering) {
                snprintf(s->err, sizeof s->err, "PS shard %d restarted from its checkpoint of "
                         "version %lld before the chief ended the run: the steps after it are "
                         "trained again", i, (long long)c.version);
                rc = CM_EABORTED;
            } else if (epoch && c.epoch && c.epoch != epoch) {
                snprintf(s->err, sizeof s->err, "the cluster rolled back (PS shard %d is at "
                         "version %lld of epoch %llu) before the chief ended the run",
                         i, (long long)c.version, (unsigned long long)c.epoch);
                rc = CM_EABORTED;
            }
        }
        if (rc != CM_OK || left == 0) break;
        double now = cm_now();
        if ((now - start) * 1e3 > (double)limit) {
            /* This worker's steps are done; only a PS restart before the
             * chief's commit would need them again, and the chief is not
             * ending the run: exit, and say so. */
            cm_warn("the chief did not end the run within %lld ms of this worker's last step "
                    "(%d of %d PS shards have not committed version %lld; "
                    "--recovery-timeout-ms): exiting; a rollback now could not redo this "
                    "worker's last steps", (long long)limit, left, n, (long long)steps);
            break;
        }
        if (now - said >= 10.0) {
            said = now;
            cm_info("waiting for the chief to end the run (%d of %d PS shards have not committed "
                    "version %lld yet, %.0f s)", left, n, (long long)steps, now - start);
        }
        usleep(50000);
    }
    free(done);
    return rc;
}

static int ps_end(wk_sync *s, int64_t steps, float *params) {
    psync *p = (psync *)s;
    int rc0 = settle_all(p);
    if (rc0 != CM_OK) return rc0;
    if (!p->cfg.is_chief)
        return !p->cfg.async && p->cfg.rank < p->cfg.nworkers ? wait_run_end(p, steps) : CM_OK;
    if (!p->cfg.async) return commit_end(p, steps);
    /* Async: wait until every worker's last push (step steps - 1) is in on
     * every shard, then take the final parameters. (Per-worker steps, not
     * push counts: a restarted shard's counters start again at 0.) A worker
     * that finished before a rollback took its last steps never pushes them
     * again: while no worker behind moves on for end_wait_ms, the wait ends
     * without them, naming them. A shard that restarted meanwhile ends the
     * wait with CM_EABORTED: the trainer recovers (this chief rolls the
     * cluster back) and trains again from where the checkpoint has it. */
    int64_t limit = p->cfg.end_wait_ms > 0 ? p->cfg.end_wait_ms : 10000;
    double moved = cm_now();
    int64_t sum = -1;
    for (;;) {
        int64_t last[64];
        int nw = ps_client_worker_steps(p->client, last, 64, s->err, sizeof s->err);
        if (nw < 0) return nw;
        int64_t behind = 0;
        for (int w = 0; w < nw && w < 64; w++)
            if (last[w] < steps - 1) behind += last[w] + 2;
        if (!behind) break;
        if (behind != sum) {
            sum = behind;
            moved = cm_now();
        } else if ((cm_now() - moved) * 1e3 > (double)limit) {
            char who[512] = "";
            size_t at = 0;
            for (int w = 0; w < nw && w < 64; w++) {
                if (last[w] >= steps - 1) continue;
                p->base.versions_lost += steps - 1 - last[w]; /* Their pushes never came. */
                int n = snprintf(who + at, sizeof who - at, "%srank %d at step %lld",
                                 at ? ", " : "", w, (long long)last[w]);
                if (n < 0 || (size_t)n >= sizeof who - at) break;
                at += (size_t)n;
            }
            cm_warn("async: the shards have no step past %lld ms ago from %s (of %lld): "
                    "evaluating without their remaining steps (a rollback took the last "
                    "steps of a worker that had finished, or it stopped early or is gone)",
                    (long long)limit, who, (long long)(steps - 1));
            break;
        }
        usleep(20000);
    }
    /* The updates the rollbacks took for good, as the shards counted them
     * (a push in flight, applied on one shard and taken back, is pushed
     * again when its worker resumes at that step: not lost). */
    ps_client_stats st;
    if (ps_client_stats_get(p->client, &st, s->err, sizeof s->err) == CM_OK)
        p->base.versions_lost += (int64_t)st.updates_lost_max;
    ps_ticket *tk;
    ps_client_pull(p->client, 0, params, &tk);
    int rc = ps_ticket_wait(tk, NULL, s->err, sizeof s->err);
    return rc == CM_OK ? commit_end(p, steps) : rc;
}

static int ps_finish(wk_sync *s, int ok) {
    psync *p = (psync *)s;
    if (!p->cfg.is_chief) return CM_OK;
    int rc = ps_client_shutdown_servers(p->client, ok ? "training finished" : "training failed", !ok,
                                        s->err, sizeof s->err);
    if (rc == CM_OK) cm_info("asked %d PS shard%s to shut down", p->cfg.nps,
                             p->cfg.nps == 1 ? "" : "s");
    if (rc != CM_OK && ok) {
        /* The run is done and its results are written: a shard that could
         * not be told (gone, or not back in time) does not undo that. */
        cm_warn("training finished, but %s", s->err);
        rc = CM_OK;
    }
    return rc;
}

static void ps_destroy(wk_sync *s) {
    psync *p = (psync *)s;
    /* A step that failed between its first early push and step(): its
     * calls still reference the buffers and the client. */
    if (p->active) wait_tickets(p);
    if (p->pend) abandon_pending(p);
    if (p->client && p->cfg.spin_us > 0) {
        uint64_t spun, slept, vain;
        ps_client_wait_counts(p->client, &spun, &slept, &vain);
        cm_info("waits for the PS: %llu ended while spinning (--client-spin-us %d), %llu slept "
                "(%llu after a spin in vain)", (unsigned long long)spun, p->cfg.spin_us,
                (unsigned long long)slept, (unsigned long long)vain);
    }
    ps_client_close(p->client);
    if (p->splits)
        for (int v = 0; v < p->cfg.model->nvars; v++) free(p->splits[v]);
    free(p->splits);
    free(p->nsplits);
    free(p->var_part0);
    free(p->var_nparts);
    free(p->announced);
    free(p->sent);
    free(p->ready);
    free(p->tickets);
    free(p->part_ticket);
    free(p->pend);
    free(p->part_pend);
    free(p->defer);
    free(p->ck);
    free(p->init_values);
    cm_placement_destroy(p->pl);
    free(p);
}

int wk_sync_ps_pull(wk_sync *s, int64_t min_version, float *params, int64_t *version) {
    psync *p = (psync *)s;
    int rc = settle_all(p);
    if (rc != CM_OK) return rc;
    ps_ticket *tk;
    ps_client_pull_final(p->client, min_version, params, &tk);
    return ps_ticket_wait(tk, version, s->err, sizeof s->err);
}

static int ps_row_stats(wk_sync *s, ps_client_stats *out) {
    psync *p = (psync *)s;
    return ps_client_stats_get(p->client, out, s->err, sizeof s->err);
}

/* The step's waits that do not go through wait_pend or wait_tickets (see
 * skip_as_abort). */
static int ps_step_or_skip(wk_sync *s, int64_t step, float *grad, float *params,
                           wk_sparse_step *sp, wk_sync_times *t) {
    return skip_as_abort((psync *)s, ps_step(s, step, grad, params, sp, t), step);
}

static const wk_sync_ops ps_ops = {.name = "ps",
                                   .begin = ps_begin,
                                   .step = ps_step_or_skip,
                                   .rows = ps_rows,
                                   .dump_rows = ps_dump,
                                   .end = ps_end,
                                   .finish = ps_finish,
                                   .destroy = ps_destroy,
                                   .overlap = ps_overlap,
                                   .recover = ps_recover,
                                   .settle = ps_settle,
                                   .row_stats = ps_row_stats};

int wk_sync_ps_create(const wk_sync_ps_cfg *cfg, wk_sync **out, char *err, size_t errlen) {
    *out = NULL;
    psync *p = cm_calloc(1, sizeof *p);
    p->base.ops = &ps_ops;
    p->cfg = *cfg;
    int rc = cm_placement_create(cfg->model, cfg->nps, cfg->min_part_bytes, &p->pl);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "cannot place the model on %d PS", cfg->nps);
        free(p);
        return rc;
    }
    /* A shard's dense parameters travel in one message each way: refuse a
     * placement that cannot, rather than fail at the first pull with gRPC's
     * "larger than max". Per partition its tensor's framing; 4 KiB for the
     * rest of the message. */
    size_t limit = cfg->max_message > 0 ? (size_t)cfg->max_message : RPC_DEFAULT_MAX_MESSAGE;
    for (int s = 0; s < p->pl->nshards; s++) {
        size_t need = p->pl->shard_bytes[s] + (size_t)p->pl->shard_nparts[s] * 64 + 4096;
        if (need > limit) {
            cm_seterr(err, errlen,
                      "PS shard %d would hold %.1f MB of parameters, more than one message may "
                      "carry (%.0f MiB): use more PS processes, or raise the limit on both sides "
                      "(pstrain --max-message-mb and psserver --max-message-mb, %zu or more)",
                      s, (double)p->pl->shard_bytes[s] / 1e6, (double)limit / (1 << 20),
                      (need >> 20) + 1);
            cm_placement_destroy(p->pl);
            free(p);
            return CM_EINVAL;
        }
    }
    ps_client_cfg cc = {.model = cfg->model, .placement = p->pl, .ps_addrs = cfg->ps_addrs,
                        .rank = cfg->rank, .deadline_ms = cfg->deadline_ms,
                        .max_message = cfg->max_message,
                        .connect_timeout_ms = cfg->connect_timeout_ms,
                        .wire_bf16 = cfg->wire_bf16,
                        .async = cfg->async,
                        .call_bytes = cfg->call_bytes,
                        .call_window = cfg->call_window,
                        .spin_us = cfg->spin_us,
                        .unary = cfg->unary_calls,
                        .poll_spin_us = cfg->poll_spin_us,
                        .auth_token = cm_security_token(cfg->sec),
                        .admin_token = cfg->is_chief ? cm_security_admin(cfg->sec) : NULL,
                        .tls_ca = cfg->sec ? cfg->sec->tls_ca : NULL,
                        .tls_cert = cfg->sec ? cfg->sec->tls_cert : NULL,
                        .tls_key = cfg->sec ? cfg->sec->tls_key : NULL,
                        .tls_server_name = cfg->sec ? cfg->sec->tls_server_name : NULL};
    if ((rc = ps_client_open(&cc, &p->client, err, errlen)) != CM_OK) {
        ps_destroy(&p->base);
        return rc;
    }
    /* The overlap's tables: each variable's partitions (consecutive ids) and
     * their row boundaries, which the backward pass computes pieces at. */
    const cm_model *m = cfg->model;
    int np = p->pl->nparts;
    p->var_part0 = cm_calloc((size_t)m->nvars + 1, sizeof *p->var_part0);
    p->var_nparts = cm_calloc((size_t)m->nvars + 1, sizeof *p->var_nparts);
    p->splits = cm_calloc((size_t)m->nvars + 1, sizeof *p->splits);
    p->nsplits = cm_calloc((size_t)m->nvars + 1, sizeof *p->nsplits);
    for (int i = np - 1; i >= 0; i--) {
        p->var_part0[p->pl->parts[i].var] = i;
        p->var_nparts[p->pl->parts[i].var]++;
    }
    for (int v = 0; v < m->nvars; v++) {
        int k = p->var_nparts[v];
        p->splits[v] = cm_calloc((size_t)k + 1, sizeof **p->splits);
        for (int j = 0; j < k; j++) {
            p->splits[v][j] = p->pl->parts[p->var_part0[v] + j].row_begin;
            p->splits[v][j + 1] = p->pl->parts[p->var_part0[v] + j].row_end;
        }
        p->nsplits[v] = k + 1;
    }
    /* Pipelined pull where the forward pass reads the first kernel in
     * pieces (two or more partitions). */
    p->pipeline = cfg->overlap && !cfg->no_pipeline && p->var_nparts[0] >= 2;
    p->hook = (wk_grad_hook){.ready = on_ready, .ud = p,
                             .splits = (const size_t *const *)p->splits, .nsplits = p->nsplits,
                             .need = p->pipeline ? on_need : NULL};
    p->announced = cm_calloc((size_t)np, 1);
    p->sent = cm_calloc((size_t)np, 1);
    p->ready = cm_calloc((size_t)np, sizeof *p->ready);
    p->tickets = cm_calloc((size_t)np, sizeof *p->tickets);
    p->part_ticket = cm_calloc((size_t)np, sizeof *p->part_ticket);
    p->pend = cm_calloc((size_t)np, sizeof *p->pend);
    p->part_pend = cm_calloc((size_t)np, sizeof *p->part_pend);
    p->defer = cm_calloc((size_t)np, sizeof *p->defer);
    for (int id = 0; id < np; id++) p->part_pend[id] = -1;
    p->ck = cm_calloc((size_t)cfg->nps, sizeof *p->ck);
    if (cfg->init_values && cfg->is_chief) {
        p->init_values = cm_malloc(m->numel * sizeof(float));
        memcpy(p->init_values, cfg->init_values, m->numel * sizeof(float));
        p->cfg.init_values = p->init_values;
    } else {
        p->cfg.init_values = NULL;
    }
    *out = &p->base;
    return CM_OK;
}
