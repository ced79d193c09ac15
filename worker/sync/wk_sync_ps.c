/* wk_sync_ps.c - PS mode: push the gradient, pull the next version.
 * SPDX-License-Identifier: MIT
 *
 * Synchronous: step t pushes the gradient of step t to every shard, then
 * pulls version t + 1, which a shard publishes once all workers' step-t
 * gradients are in. Asynchronous: the pull takes whatever version is newest.
 * The chief initialises the shards at begin() and shuts them down at
 * finish(); in async mode it first waits for every worker's last push.
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

typedef struct psync {
    wk_sync base;
    wk_sync_ps_cfg cfg;
    cm_placement *pl;
    ps_client *client;
    int initialised;
} psync;

static int ps_begin(wk_sync *s, float *params) {
    psync *p = (psync *)s;
    int rc;
    if (p->cfg.is_chief) {
        ps_init_cfg init = {.optim = p->cfg.optim, .seed = p->cfg.seed,
                            .num_workers = p->cfg.nworkers, .async = p->cfg.async};
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
    ps_client_close(p->client);
    cm_placement_destroy(p->pl);
    free(p);
}

int wk_sync_ps_pull(wk_sync *s, int64_t min_version, float *params, int64_t *version) {
    psync *p = (psync *)s;
    ps_ticket *tk;
    ps_client_pull(p->client, min_version, params, &tk);
    return ps_ticket_wait(tk, version, s->err, sizeof s->err);
}

static const wk_sync_ops ps_ops = {"ps", ps_begin, ps_step, ps_end, ps_finish, ps_destroy};

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
        cm_placement_destroy(p->pl);
        free(p);
        return rc;
    }
    *out = &p->base;
    return CM_OK;
}
