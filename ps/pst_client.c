/* pst_client.c - the public client API (include/pstrain/pstrain.h) over
 * the internal one (ps_client.h): a model of named dense variables, its
 * placement, the tokens, and one blocking call per operation.
 * SPDX-License-Identifier: MIT
 */
#include "pstrain/pstrain.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_addr.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "common/cm_token.h"
#include "ps/ps_client.h"
#include "ps/ps_optim.h"

#define PST_EXPORT __attribute__((visibility("default")))

/* The placement's minimum partition: psserver's and pstrain's default, so
 * that a cluster started for pstrain and one for this API split alike. */
#define MIN_PART_BYTES 262144

struct pst_client {
    cm_model *model;
    cm_placement *pl;
    char **addrs;
    int nps;
    cm_security sec;
    ps_client *client;
    pst_options o;
    char optimizer[16], table_optimizer[16];
    char tls_ca[4096];
};

PST_EXPORT void pst_options_default(pst_options *o) {
    memset(o, 0, sizeof *o);
    o->optimizer = "sgd";
    o->lr = 0.1f;
    o->seed = 1;
    o->init_scale = 0.05f;
    o->deadline_ms = 60000;
    o->connect_timeout_ms = 30000;
    o->table_optimizer = "adagrad";
}

/* "host:port" with a port of 1-65535. */
static int host_port(const char *s) { return cm_addr_split(s, 1, NULL, 0, NULL) == NULL; }

/* "host:port,host:port,..." into a new array of strings. */
static int split_hosts(const char *list, char ***out, int *n) {
    *out = NULL;
    *n = 0;
    if (!list) return CM_EINVAL;
    char **v = NULL;
    int cnt = 0, rc = CM_OK;
    for (const char *p = list;;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        v = cm_realloc(v, (size_t)(cnt + 1) * sizeof *v);
        v[cnt] = cm_malloc(len + 1);
        memcpy(v[cnt], p, len);
        v[cnt][len] = 0;
        cnt++;
        if (len == 0 || len > 255 || !host_port(v[cnt - 1])) rc = CM_EINVAL;
        if (!e || rc != CM_OK) break;
        p = e + 1;
    }
    if (rc != CM_OK) {
        for (int i = 0; i < cnt; i++) free(v[i]);
        free(v);
        return rc;
    }
    *out = v;
    *n = cnt;
    return CM_OK;
}

PST_EXPORT void pst_client_destroy(pst_client *c) {
    if (!c) return;
    ps_client_close(c->client);
    cm_placement_destroy(c->pl);
    cm_model_destroy(c->model);
    for (int i = 0; i < c->nps; i++) free(c->addrs[i]);
    free(c->addrs);
    free(c);
}

PST_EXPORT int pst_client_create(const pst_options *o, pst_client **out, char *err,
                                 size_t errlen) {
    *out = NULL;
    if (!o || o->num_workers < 1 || o->rank < 0 || o->rank >= o->num_workers || !o->vars ||
        o->nvars < 1 || o->nvars > 4096 || !(o->lr > 0.0f) || o->deadline_ms <= 0 ||
        o->connect_timeout_ms <= 0 || o->ntables < 0 || o->ntables > 1024 ||
        (o->ntables > 0 && !o->tables) || o->table_lr < 0.0f) {
        cm_seterr(err, errlen, "pst_client_create: bad options (rank %d of %d workers, %d "
                  "variables, %d tables, lr %g)", o ? o->rank : -1, o ? o->num_workers : 0,
                  o ? o->nvars : 0, o ? o->ntables : 0, o ? (double)o->lr : 0.0);
        return CM_EINVAL;
    }
    int tkind = ps_optim_parse(o->table_optimizer ? o->table_optimizer : "adagrad");
    if (tkind < 0 || tkind == PS_OPTIM_ADD) {
        cm_seterr(err, errlen, "pst_client_create: unknown table optimizer '%s' (sgd, momentum, "
                  "adam, adagrad)", o->table_optimizer);
        return CM_EINVAL;
    }
    int kind = ps_optim_parse(o->optimizer ? o->optimizer : "sgd");
    if (kind < 0 || kind == PS_OPTIM_ADD) {
        cm_seterr(err, errlen, "pst_client_create: unknown optimizer '%s' (sgd, momentum, "
                  "adam, adagrad)", o->optimizer);
        return CM_EINVAL;
    }
    pst_client *c = cm_calloc(1, sizeof *c);
    c->o = *o;
    snprintf(c->optimizer, sizeof c->optimizer, "%s", o->optimizer ? o->optimizer : "sgd");
    c->o.optimizer = c->optimizer;
    snprintf(c->table_optimizer, sizeof c->table_optimizer, "%s",
             o->table_optimizer ? o->table_optimizer : "adagrad");
    c->o.table_optimizer = c->table_optimizer;
    c->o.vars = NULL; /* Not kept: the model holds the names. */
    c->o.tables = NULL;
    int rc = split_hosts(o->ps_hosts, &c->addrs, &c->nps);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "pst_client_create: ps_hosts must be \"host:port,...\", not "
                  "'%s'", o->ps_hosts ? o->ps_hosts : "(null)");
        goto fail;
    }
    cm_var *vars = cm_calloc((size_t)(o->nvars + o->ntables), sizeof *vars);
    for (int i = 0; i < o->nvars; i++) {
        const pst_var *u = &o->vars[i];
        if (!u->name || strlen(u->name) >= CM_VAR_NAME_MAX || u->numel == 0 ||
            u->numel > ((size_t)1 << 40)) {
            cm_seterr(err, errlen, "pst_client_create: variable %d needs a name of 1-%d bytes "
                      "and a positive size", i, CM_VAR_NAME_MAX - 1);
            free(vars);
            rc = CM_EINVAL;
            goto fail;
        }
        snprintf(vars[i].name, sizeof vars[i].name, "%s", u->name);
        vars[i].kind = CM_VAR_DENSE;
        vars[i].ndims = 1;
        vars[i].dims[0] = (int64_t)u->numel;
        vars[i].init = CM_INIT_UNIFORM;
        vars[i].init_scale = o->init_scale > 0.0f ? o->init_scale : 0.05f;
    }
    for (int t = 0; t < o->ntables; t++) {
        const pst_table *u = &o->tables[t];
        cm_var *v = &vars[o->nvars + t];
        if (!u->name || strlen(u->name) >= CM_VAR_NAME_MAX || u->dim < 1 || u->dim > 65536) {
            cm_seterr(err, errlen, "pst_client_create: table %d needs a name of 1-%d bytes and "
                      "a dim of 1-65536", t, CM_VAR_NAME_MAX - 1);
            free(vars);
            rc = CM_EINVAL;
            goto fail;
        }
        snprintf(v->name, sizeof v->name, "%s", u->name);
        v->kind = CM_VAR_TABLE;
        v->ndims = 1;
        v->dims[0] = u->dim;
        v->dim = u->dim;
        v->init = CM_INIT_UNIFORM;
        v->init_scale = o->init_scale > 0.0f ? o->init_scale : 0.05f;
    }
    rc = cm_model_create_from_vars("custom", vars, o->nvars + o->ntables, &c->model, err,
                                   errlen);
    free(vars);
    if (rc != CM_OK) goto fail;
    if ((rc = cm_placement_create(c->model, c->nps, MIN_PART_BYTES, &c->pl)) != CM_OK) {
        cm_seterr(err, errlen, "pst_client_create: cannot place %zu floats on %d PS",
                  c->model->numel, c->nps);
        goto fail;
    }
    if ((rc = cm_security_load(&c->sec, o->auth_token_file, o->admin_token_file, err,
                               errlen)) != CM_OK)
        goto fail;
    if (o->tls_ca) snprintf(c->tls_ca, sizeof c->tls_ca, "%s", o->tls_ca);
    ps_client_cfg cfg = {.model = c->model,
                         .placement = c->pl,
                         .ps_addrs = (const char *const *)c->addrs,
                         .rank = o->rank,
                         .deadline_ms = o->deadline_ms,
                         .connect_timeout_ms = o->connect_timeout_ms,
                         .async = o->async != 0,
                         .auth_token = cm_security_token(&c->sec),
                         .admin_token = cm_security_admin(&c->sec),
                         .tls_ca = o->tls_ca ? c->tls_ca : NULL};
    if ((rc = ps_client_open(&cfg, &c->client, err, errlen)) != CM_OK) goto fail;
    *out = c;
    return CM_OK;
fail:
    pst_client_destroy(c);
    return rc;
}

PST_EXPORT size_t pst_numel(const pst_client *c) { return c ? c->model->numel : 0; }

PST_EXPORT int pst_init(pst_client *c, const float *values, char *err, size_t errlen) {
    if (!c) return CM_EINVAL;
    ps_init_cfg init = {.optim = ps_optim_defaults(ps_optim_parse(c->optimizer), c->o.lr),
                        .seed = c->o.seed,
                        .num_workers = c->o.num_workers,
                        .async = c->o.async != 0,
                        .values = values};
    if (c->model->ntables)
        init.table_optim = ps_optim_defaults(ps_optim_parse(c->table_optimizer),
                                             c->o.table_lr > 0.0f ? c->o.table_lr : c->o.lr);
    return ps_client_init(c->client, &init, err, errlen);
}

PST_EXPORT size_t pst_row_width(const pst_client *c) {
    return c && c->model->ntables ? (size_t)cm_model_max_dim(c->model) : 0;
}

/* rows as the internal keys; 0 after a message if they are malformed. */
static int row_keys(const pst_client *c, const char *fn, const pst_rows *r, ps_row_keys *k,
                    char *err, size_t errlen) {
    int nt = c->model->ntables;
    if (!r->begin || r->begin[0] != 0 || (r->begin[nt] > 0 && !r->ids)) {
        cm_seterr(err, errlen, "%s: rows need begin[0] = 0 and ids", fn);
        return 0;
    }
    for (int t = 0; t < nt; t++)
        if (r->begin[t + 1] < r->begin[t]) {
            cm_seterr(err, errlen, "%s: rows' begin must not decrease (table %d)", fn, t);
            return 0;
        }
    *k = (ps_row_keys){.ntables = nt, .tab_begin = r->begin, .ids = r->ids};
    return 1;
}

PST_EXPORT int pst_step_rows(pst_client *c, int64_t step, const float *grad, float *params,
                             const pst_rows *rows, const float *row_grad, const pst_rows *next,
                             float *next_values, char *err, size_t errlen) {
    if (!c || !grad || !params || step < 0 || (rows && !row_grad) || (next && !next_values)) {
        cm_seterr(err, errlen, "pst_step_rows: bad arguments");
        return CM_EINVAL;
    }
    if (!c->model->ntables) {
        cm_seterr(err, errlen, "pst_step_rows: the model has no tables (use pst_step)");
        return CM_EINVAL;
    }
    ps_row_keys k, n;
    if ((rows && !row_keys(c, "pst_step_rows", rows, &k, err, errlen)) ||
        (next && !row_keys(c, "pst_step_rows", next, &n, err, errlen)))
        return CM_EINVAL;
    ps_ticket *t;
    int rc = ps_client_push_pull_rows(c->client, step, grad, params, rows ? &k : NULL, row_grad,
                                      next ? &n : NULL, next_values, &t);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "pst_step_rows %lld: cannot start the calls", (long long)step);
        return rc;
    }
    return ps_ticket_wait(t, NULL, err, errlen);
}

PST_EXPORT int pst_pull_rows(pst_client *c, int64_t min_version, const pst_rows *rows,
                             float *values, int train, char *err, size_t errlen) {
    if (!c || !rows || !values || min_version < 0) {
        cm_seterr(err, errlen, "pst_pull_rows: bad arguments");
        return CM_EINVAL;
    }
    if (!c->model->ntables) {
        cm_seterr(err, errlen, "pst_pull_rows: the model has no tables");
        return CM_EINVAL;
    }
    ps_row_keys k;
    if (!row_keys(c, "pst_pull_rows", rows, &k, err, errlen)) return CM_EINVAL;
    if (k.tab_begin[k.ntables] == 0) return CM_OK;
    ps_ticket *t;
    int rc = ps_client_pull_rows(c->client, min_version, &k, values, train != 0, &t);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "pst_pull_rows: cannot start the calls");
        return rc;
    }
    return ps_ticket_wait(t, NULL, err, errlen);
}

PST_EXPORT int pst_step(pst_client *c, int64_t step, const float *grad, float *params,
                        char *err, size_t errlen) {
    if (!c || !grad || !params || step < 0) {
        cm_seterr(err, errlen, "pst_step: bad arguments");
        return CM_EINVAL;
    }
    ps_ticket *t;
    int rc = ps_client_push_pull(c->client, step, grad, params, &t);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "pst_step %lld: cannot start the calls", (long long)step);
        return rc;
    }
    return ps_ticket_wait(t, NULL, err, errlen);
}

PST_EXPORT int pst_pull(pst_client *c, int64_t min_version, float *params, int64_t *version,
                        char *err, size_t errlen) {
    if (!c || !params || min_version < 0) {
        cm_seterr(err, errlen, "pst_pull: bad arguments");
        return CM_EINVAL;
    }
    ps_ticket *t;
    int rc = ps_client_pull(c->client, min_version, params, &t);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "pst_pull: cannot start the calls");
        return rc;
    }
    return ps_ticket_wait(t, version, err, errlen);
}

PST_EXPORT int pst_shutdown(pst_client *c, int failed, char *err, size_t errlen) {
    if (!c) return CM_EINVAL;
    return ps_client_shutdown_servers(c->client,
                                      failed ? "training failed" : "training finished", failed,
                                      err, errlen);
}
