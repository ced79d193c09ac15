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
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_client.h"
#include "worker/sync/wk_sync.h"

/* Gathered partitions are sent once this many bytes are ready: fewer calls
 * for the small variables, one per piece of the large kernel. */
#define OVERLAP_FLUSH_BYTES ((size_t)64 << 10)

typedef struct psync {
    wk_sync base;
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
    float *grad, *params, scale;
    uint8_t *announced;          /* Per partition: final (and scaled). */
    uint8_t *sent;               /* Per partition: in a ticket. */
    uint32_t *ready;             /* Announced, not yet sent. */
    int nready;
    size_t ready_bytes;
    ps_ticket **tickets;
    int ntickets;
} psync;

/* ------------------------------------------------------------ overlap */

static void send_ready(psync *p) {
    if (p->nready == 0) return;
    ps_ticket *t = NULL;
    /* The ids are valid and distinct by construction: this cannot fail. */
    if (ps_client_push_pull_parts(p->client, p->step, p->grad, p->params, p->ready, p->nready,
                                  &t) != CM_OK)
        abort();
    p->tickets[p->ntickets++] = t;
    for (int i = 0; i < p->nready; i++) p->sent[p->ready[i]] = 1;
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

static const wk_grad_hook *ps_overlap(wk_sync *s, int64_t step, float *grad, float *params,
                                      float scale) {
    psync *p = (psync *)s;
    if (!p->cfg.overlap || p->cfg.async || p->cfg.separate_pull || p->cfg.fault_zero_gradient)
        return NULL;
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

/* Wait for every ticket of the step; the first error wins. */
static int wait_tickets(psync *p) {
    int rc = CM_OK;
    for (int i = 0; i < p->ntickets; i++) {
        char err[sizeof p->base.err];
        int r = ps_ticket_wait(p->tickets[i], NULL, err, sizeof err);
        if (r != CM_OK && rc == CM_OK) {
            rc = r;
            memcpy(p->base.err, err, sizeof err);
        }
    }
    p->ntickets = 0;
    p->active = 0;
    return rc;
}

static int overlap_finish(psync *p, wk_sync_times *t) {
    double t0 = cm_now();
    for (int id = 0; id < p->pl->nparts; id++) mark_ready(p, (uint32_t)id);
    send_ready(p);
    int rc = wait_tickets(p);
    t->push = cm_now() - t0; /* The part of the communication not hidden. */
    t->pull = 0.0;
    return rc;
}

static int ps_begin(wk_sync *s, float *params) {
    psync *p = (psync *)s;
    int rc;
    if (p->cfg.is_chief) {
        ps_init_cfg init = {.optim = p->cfg.optim, .seed = p->cfg.seed,
                            .num_workers = p->cfg.nworkers, .async = p->cfg.async,
                            .values = p->cfg.init_values};
        rc = ps_client_init(p->client, &init, s->err, sizeof s->err);
        if (rc != CM_OK) return rc;
        cm_info("initialised %d PS shard%s", p->cfg.nps, p->cfg.nps == 1 ? "" : "s");
    }
    ps_ticket *t;
    ps_client_pull(p->client, 0, params, &t);
    rc = ps_ticket_wait(t, NULL, s->err, sizeof s->err);
    p->initialised = rc == CM_OK;
    return rc;
}

static int ps_step(wk_sync *s, int64_t step, float *grad, float *params, wk_sync_times *t) {
    psync *p = (psync *)s;
    if (p->active && p->step == step && p->grad == grad && p->params == params)
        return overlap_finish(p, t);
    if (p->active) wait_tickets(p); /* Cannot happen with the trainer. */
    if (p->cfg.fault_zero_gradient) memset(grad, 0, p->cfg.model->numel * sizeof(float));
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
    return rc;
}

static int ps_end(wk_sync *s, int64_t steps, float *params) {
    psync *p = (psync *)s;
    if (!p->cfg.is_chief || !p->cfg.async) return CM_OK;
    /* Async: wait until every worker's last push is in, then take the
     * final parameters. Bounded by the call deadline. */
    uint64_t want = (uint64_t)p->cfg.nps * (uint64_t)p->cfg.nworkers * (uint64_t)steps;
    double start = cm_now();
    for (;;) {
        ps_client_stats st;
        int rc = ps_client_stats_get(p->client, &st, s->err, sizeof s->err);
        if (rc != CM_OK) return rc;
        if (st.pushes + st.duplicate_pushes >= want) break;
        if ((cm_now() - start) * 1e3 > (double)p->cfg.deadline_ms) {
            snprintf(s->err, sizeof s->err,
                     "async: only %llu of %llu pushes arrived within %lld ms",
                     (unsigned long long)st.pushes, (unsigned long long)want,
                     (long long)p->cfg.deadline_ms);
            return CM_ETIMEDOUT;
        }
        usleep(20000);
    }
    ps_ticket *tk;
    ps_client_pull(p->client, 0, params, &tk);
    return ps_ticket_wait(tk, NULL, s->err, sizeof s->err);
}

static int ps_finish(wk_sync *s, int ok) {
    psync *p = (psync *)s;
    if (!p->cfg.is_chief) return CM_OK;
    int rc = ps_client_shutdown_servers(p->client, ok ? "training finished" : "training failed",
                                        s->err, sizeof s->err);
    if (rc == CM_OK) cm_info("asked %d PS shard%s to shut down", p->cfg.nps,
                             p->cfg.nps == 1 ? "" : "s");
    return rc;
}

static void ps_destroy(wk_sync *s) {
    psync *p = (psync *)s;
    /* A step that failed between its first early push and step(): its
     * calls still reference the buffers and the client. */
    if (p->active) wait_tickets(p);
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
    cm_placement_destroy(p->pl);
    free(p);
}

int wk_sync_ps_pull(wk_sync *s, int64_t min_version, float *params, int64_t *version) {
    psync *p = (psync *)s;
    ps_ticket *tk;
    ps_client_pull(p->client, min_version, params, &tk);
    return ps_ticket_wait(tk, version, s->err, sizeof s->err);
}

static const wk_sync_ops ps_ops = {"ps", ps_begin, ps_step, ps_end, ps_finish, ps_destroy,
                                   ps_overlap};

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
    ps_client_cfg cc = {.model = cfg->model, .placement = p->pl, .ps_addrs = cfg->ps_addrs,
                        .rank = cfg->rank, .deadline_ms = cfg->deadline_ms,
                        .connect_timeout_ms = cfg->connect_timeout_ms};
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
    p->hook = (wk_grad_hook){.ready = on_ready, .ud = p,
                             .splits = (const size_t *const *)p->splits, .nsplits = p->nsplits};
    p->announced = cm_calloc((size_t)np, 1);
    p->sent = cm_calloc((size_t)np, 1);
    p->ready = cm_calloc((size_t)np, sizeof *p->ready);
    p->tickets = cm_calloc((size_t)np, sizeof *p->tickets);
    *out = &p->base;
    return CM_OK;
}
