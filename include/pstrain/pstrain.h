/* pstrain.h - the parameter-server client for your own training loop.
 * SPDX-License-Identifier: MIT
 *
 * Link with `pkg-config --cflags --libs pstrain`. Your model is a list of
 * named dense variables laid out back to back in one float vector of
 * pst_numel() floats; the PS shards (psserver processes) hold it split by
 * bytes, apply the optimizer, and checkpoint it. Each training step of each
 * worker pushes its gradient and gets the parameters that result:
 *
 *     pst_options o;
 *     pst_options_default(&o);
 *     o.ps_hosts = "ps0:5000,ps1:5000";
 *     o.rank = 0;  o.num_workers = 2;            // rank 0 is the chief
 *     o.vars = vars;  o.nvars = 2;               // e.g. {"w", 784*10}, {"b", 10}
 *     o.auth_token_file = "worker.token";
 *     o.admin_token_file = "admin.token";        // the chief's
 *     pst_client *c;
 *     char err[512];
 *     if (pst_client_create(&o, &c, err, sizeof err)) die(err);
 *     float *w = malloc(pst_numel(c) * sizeof *w), *g = ...;
 *     if (o.rank == 0) pst_init(c, NULL, err, sizeof err);   // initial values
 *     pst_pull(c, 0, w, NULL, err, sizeof err);
 *     for (int64_t t = 0; t < steps; t++) {
 *         compute_gradient(w, g);                  // any framework, any model
 *         if (pst_step(c, t, g, w, err, sizeof err)) die(err);  // w: version t+1
 *     }
 *     if (o.rank == 0) pst_shutdown(c, 0, err, sizeof err);  // the PS exit
 *     pst_client_destroy(c);
 *
 * In sync mode (the default) a step's parameters come back once every
 * worker pushed that step, averaged; in async mode (o.async) every push is
 * applied at once. Every call has a deadline; an unreachable PS is retried
 * for o.connect_timeout_ms and then named in the error.
 *
 * A model may also hold embedding tables (o.tables): rows by 64-bit id,
 * pushed and pulled by id with pst_step_rows and pst_pull_rows.
 *
 * Conventions: functions return 0 or a negative error code (CM_E* of the
 * project) and write a message into err (errlen bytes; may be NULL when
 * errlen is 0). A client is used by one thread at a time. Ownership: the
 * caller owns every buffer it passes; pst_client_create copies the options
 * and the variables' names it needs; pst_client_destroy frees the client.
 */
#ifndef PSTRAIN_PSTRAIN_H
#define PSTRAIN_PSTRAIN_H
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct pst_client pst_client;

/* A dense variable: a name (unique, < 64 bytes) and its element count. */
typedef struct pst_var {
    const char *name;
    size_t numel;
} pst_var;

/* An embedding table: rows of 'dim' floats keyed by any 64-bit id, created
 * on first use (uniform in +-init_scale, drawn from the seed and the id),
 * spread over the shards by a hash of the id, and updated row by row with
 * the table optimizer. A name (unique among variables and tables, < 64
 * bytes) and dim 1-65536. */
typedef struct pst_table {
    const char *name;
    int dim;
} pst_table;

/* Rows of the model's tables, grouped by table: ids[begin[t] .. begin[t+1])
 * are table t's (begin has ntables + 1 entries, begin[0] = 0). The values
 * or gradients of the i-th id (counting
 * over all tables) are floats i * pst_row_width() .. + dim of the caller's
 * array (a narrower table leaves the rest of its slot unused). An id given
 * twice in one table gets both gradients (they add up). */
typedef struct pst_rows {
    const size_t *begin;
    const uint64_t *ids;
} pst_rows;

typedef struct pst_options {
    const char *ps_hosts;       /* "host:port,host:port": every PS, in shard order. */
    int rank;                   /* This worker's rank, 0 .. num_workers-1 (0: chief). */
    int num_workers;            /* Workers of the cluster. */
    const pst_var *vars;        /* The model: nvars dense variables, in order. */
    int nvars;
    const char *optimizer;      /* "sgd" (default), "momentum", "adam", "adagrad". */
    float lr;                   /* Learning rate (default 0.1). */
    int async;                  /* 0: synchronous steps (default); 1: asynchronous. */
    uint64_t seed;              /* Initial values (pst_init without values): uniform
                                 * in +-init_scale from this seed (default 1). */
    float init_scale;           /* Default 0.05. */
    const char *auth_token_file;  /* The workers' token (NULL: none). */
    const char *admin_token_file; /* The chief's (Initialize, Shutdown); NULL: none. */
    const char *tls_ca;           /* TLS: the CA's PEM file (NULL: plaintext). */
    int64_t deadline_ms;          /* Per call (default 60000). */
    int64_t connect_timeout_ms;   /* Retrying an unreachable PS (default 30000). */
    const pst_table *tables;      /* Embedding tables (NULL: none), after the
                                   * dense variables; steps with rows use
                                   * pst_step_rows. */
    int ntables;
    const char *table_optimizer;  /* The tables' row-wise optimizer (default
                                   * "adagrad"; sgd, momentum, adam too). */
    float table_lr;               /* Its learning rate (default: lr). */
} pst_options;

/* The defaults above, everything else zero or NULL. */
void pst_options_default(pst_options *o);

/* Connect to the shards (lazily: nothing is sent yet). On error *out is
 * NULL and err says why (a bad option, an unreadable token file). */
int pst_client_create(const pst_options *o, pst_client **out, char *err, size_t errlen);

/* Free the client (closing its connections); NULL is a no-op. */
void pst_client_destroy(pst_client *c);

/* Floats in the flat parameter (and gradient) vector. */
size_t pst_numel(const pst_client *c);

/* The chief: initialise every shard with the model, the optimizer and
 * 'values' (pst_numel floats, copied), or with values drawn from the seed
 * when values is NULL. Idempotent for the same configuration; a shard that
 * already holds another model or cluster shape refuses, naming both. */
int pst_init(pst_client *c, const float *values, char *err, size_t errlen);

/* Push this worker's gradient of step 'step' (pst_numel floats) and receive
 * the parameters that result into params (sync: version step + 1, once
 * every worker pushed step; async: the newest). Steps start at 0 and go up
 * by one. grad and params must not overlap. */
int pst_step(pst_client *c, int64_t step, const float *grad, float *params, char *err,
             size_t errlen);

/* The parameters at version >= min_version (waiting for it, within the
 * deadline) into params; *version (may be NULL) gets the version read. */
int pst_pull(pst_client *c, int64_t min_version, float *params, int64_t *version, char *err,
             size_t errlen);

/* Floats per row slot in pst_rows arrays: the widest table's dim (0 when
 * the model has no table). */
size_t pst_row_width(const pst_client *c);

/* A step of a model with tables: push this worker's dense gradient and the
 * gradients row_grad of the rows 'rows' it used (NULL: none), receive the
 * dense parameters that result into params (as pst_step) and, when 'next'
 * is not NULL, the values of the rows 'next' (the next batch's; created if
 * missing) at that version into next_values. Every worker calls it once per
 * step, rows or not. */
int pst_step_rows(pst_client *c, int64_t step, const float *grad, float *params,
                  const pst_rows *rows, const float *row_grad, const pst_rows *next,
                  float *next_values, char *err, size_t errlen);

/* The values of 'rows' at version >= min_version into values. train = 1
 * creates missing rows (a read for training); 0 reads them as their initial
 * values without creating them (evaluation). */
int pst_pull_rows(pst_client *c, int64_t min_version, const pst_rows *rows, float *values,
                  int train, char *err, size_t errlen);

/* The chief, at the end: tell every shard to checkpoint and exit
 * ('failed' != 0: the run failed). */
int pst_shutdown(pst_client *c, int failed, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif /* PSTRAIN_PSTRAIN_H */
