/* sparsebench.c - rows/s of sparse push and pull through the PS, against plain TCP.
 * SPDX-License-Identifier: MIT
 *
 * The embedding-table workload: a model of T tables of dim D (and one tiny
 * dense variable) on S psserver processes, W worker processes on
 * 127.0.0.1, sync mode, a row-wise optimizer (adagrad, or "add"). Each
 * worker, per step, pushes the summed gradients of U unique rows (ids drawn
 * Zipf(s) over a large id space per table and deduplicated, as a worker
 * deduplicates its batch) and pulls the U rows of its next step in the
 * same call (ps_client_push_pull_rows: one call per shard); then, on its
 * own, pulls rows with ps_client_pull_rows. The same shapes then move the
 * same bytes per step over plain TCP (ids and values each way, split over
 * the servers by cm_row_shard as the client splits them), in the same
 * run, interleaved with the PS runs round by round; the result is stated
 * as the ratio of the two per round and its median. The TCP servers add
 * pushed rows into a hashed table and answer pulls from it, with no step
 * barrier between workers (as psbench's TCP reference); the PS's 64-byte
 * dense variable is not mirrored. Bytes per second count the payload: ids
 * (8 bytes) and values (4 x D bytes) each way.
 *
 * Every row's ids and gradients are pure functions of (seed, rank, step,
 * table), so at the end worker 0 replays every worker's pushes into a local
 * ps_rows (the shard's own code) and checks that rows pulled from the PS
 * hold bit for bit those values; the TCP phase is checked the same way
 * against its servers' sums.
 *
 * The driver samples the load average and the CPU time of the whole machine
 * and of its own process tree around each timed window: what others used
 * meanwhile is reported, and windows where they used more than BUSY_CORES
 * are flagged.
 *
 * One binary, four roles, re-executed with posix_spawn as psbench is:
 * driver, worker, tcp-server, tcp-worker.
 */
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_client.h"
#include "ps/ps_optim.h"
#include "ps/ps_rows.h"
#include "tools/ctr_planted.h"

#define MAX_LIST 16     /* Entries of --dims, --shapes. */
#define MAX_ROUNDS 15
#define DENSE_N 16      /* Floats of the tiny dense variable. */
#define NGRAD 4         /* Gradient buffers, cycled over (step, rank). */
#define SEED 20260101u  /* Of the row ids, gradients and initial values. */
#define TABLE_LR 0.05f  /* adagrad's learning rate. */
#define TCP_SLOTS 16384 /* Rows of a TCP server's hashed table. */
#define BUSY_CORES 0.2  /* Others' CPU that flags a window. */

/* The two timed operations of a phase. */
enum { OP_PUSH_PULL = 0, OP_PULL = 1, NOPS = 2 };
static const char *const op_name[NOPS] = {"push_pull", "pull"};

/* Options of every role; the driver passes the workload ones to its
 * children. */
typedef struct opts {
    const char *role; /* NULL for the driver. */
    /* Driver. */
    const char *dims, *shapes, *bin_dir;
    int quick, rounds;
    int unary; /* --calls unary: ps_client_cfg.unary */
    double timeout_s;
    /* The workload (every role) and the worker's place. */
    int tables, rows, dim, warmup, iters, optim, rank, workers;
    long long ids;
    double zipf;
    const char *ps_addrs, *tcp_ports;
} opts;

/* ================================================== the workload */

/* Rows of table t among the o->rows unique rows of a step. */
static size_t table_quota(const opts *o, int t) {
    return (size_t)(o->rows / o->tables + (t < o->rows % o->tables));
}

/* Steps per operation (warm-up and timed). Key sets: the push-pull steps
 * 0..N-1 (step i pulls the keys of step i + 1), then N + 1 .. 2N for the
 * pulls alone. */
static int op_steps(const opts *o) { return o->warmup + o->iters; }

/* A set of 64-bit ids, each with an index (insertion order); cleared in
 * O(1) by a new stamp. */
typedef struct idmap {
    uint64_t *key;
    uint32_t *val, *stamp;
    uint32_t cur;
    size_t mask;
} idmap;

static void idmap_init(idmap *m, size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    m->key = cm_malloc(cap * sizeof *m->key);
    m->val = cm_malloc(cap * sizeof *m->val);
    m->stamp = cm_calloc(cap, sizeof *m->stamp);
    m->cur = 1;
    m->mask = cap - 1;
}

static void idmap_free(idmap *m) {
    free(m->key);
    free(m->val);
    free(m->stamp);
}

static void idmap_clear(idmap *m) {
    if (++m->cur == 0) {
        memset(m->stamp, 0, (m->mask + 1) * sizeof *m->stamp);
        m->cur = 1;
    }
}

/* The index of 'key'; a new key gets *n (then ++*n) and sets *fresh. The
 * caller keeps the count under the capacity it was made for. */
static uint32_t idmap_put(idmap *m, uint64_t key, uint32_t *n, int *fresh) {
    for (size_t h = cm_mix64(key) & m->mask;; h = (h + 1) & m->mask) {
        if (m->stamp[h] != m->cur) {
            m->stamp[h] = m->cur;
            m->key[h] = key;
            m->val[h] = (*n)++;
            *fresh = 1;
            return m->val[h];
        }
        if (m->key[h] == key) {
            *fresh = 0;
            return m->val[h];
        }
    }
}

/* The unique rows of worker 'rank' at 'step': table t's quota of distinct
 * ids drawn Zipf, in the order first drawn, into ids (o->rows) grouped by
 * table (tab_begin, o->tables + 1). Returns the draws it took, or -1 if a
 * table's quota could not be met (an id space too small for it). */
static long gen_keys(const opts *o, const ctr_zipf *z, idmap *seen, int rank, int step,
                     size_t *tab_begin, uint64_t *ids) {
    long draws = 0;
    size_t at = 0;
    for (int t = 0; t < o->tables; t++) {
        size_t want = table_quota(o, t);
        uint64_t key = cm_rand64(SEED, ((uint64_t)rank << 48) | ((uint64_t)step << 12) |
                                           (uint64_t)t);
        uint32_t n = 0;
        idmap_clear(seen);
        tab_begin[t] = at;
        for (uint64_t c = 0; n < want;) {
            if (c > 1000 * (uint64_t)want + 1000) return -1;
            uint64_t id = ctr_zipf_draw(z, key, &c);
            int fresh;
            idmap_put(seen, id, &n, &fresh);
            if (fresh) ids[at++] = id;
            draws++;
        }
    }
    tab_begin[o->tables] = at;
    return draws;
}

/* Gradient buffer g (o->rows x o->dim): multiples of 1/8 in [-1/2, 1/2],
 * so that any sum of a run's pushes is exact in float32. */
static void fill_grad(const opts *o, int g, float *out) {
    size_t n = (size_t)o->rows * (size_t)o->dim;
    for (size_t i = 0; i < n; i++) out[i] = (float)((int)((g * 131 + i * 7) % 9) - 4) * 0.125f;
}

/* The gradient buffer worker 'rank' pushes at 'step'. */
static int grad_of(const opts *o, int step, int rank) {
    return (int)(((int64_t)step * o->workers + rank) % NGRAD);
}

/* A worker's whole run, generated before it is timed. */
typedef struct workload {
    ctr_zipf z;
    idmap seen;
    int nsets;         /* 2 * op_steps + 1 key sets. */
    size_t *tab_begin; /* nsets x (tables + 1). */
    uint64_t *ids;     /* nsets x rows. */
    float *grads[NGRAD];
    double draws;      /* Zipf draws per key set (before deduplication). */
} workload;

static int workload_init(workload *w, const opts *o, char *err, size_t errlen) {
    memset(w, 0, sizeof *w);
    w->nsets = 2 * op_steps(o) + 1;
    ctr_zipf_init(&w->z, (uint64_t)o->ids, o->zipf);
    idmap_init(&w->seen, table_quota(o, 0));
    w->tab_begin = cm_malloc((size_t)w->nsets * (size_t)(o->tables + 1) * sizeof *w->tab_begin);
    w->ids = cm_malloc((size_t)w->nsets * (size_t)o->rows * sizeof *w->ids);
    long total = 0;
    for (int s = 0; s < w->nsets; s++) {
        long d = gen_keys(o, &w->z, &w->seen, o->rank, s,
                          w->tab_begin + (size_t)s * (size_t)(o->tables + 1),
                          w->ids + (size_t)s * (size_t)o->rows);
        if (d < 0) {
            cm_seterr(err, errlen, "cannot draw %zu distinct ids of %lld with Zipf %g",
                      table_quota(o, 0), o->ids, o->zipf);
            return CM_EINVAL;
        }
        total += d;
    }
    w->draws = (double)total / w->nsets;
    for (int g = 0; g < NGRAD; g++) {
        w->grads[g] = cm_alloc_aligned((size_t)o->rows * (size_t)o->dim * sizeof(float));
        if (!w->grads[g]) {
            cm_seterr(err, errlen, "out of memory for the gradients");
            return CM_ENOMEM;
        }
        fill_grad(o, g, w->grads[g]);
    }
    return CM_OK;
}

static void workload_free(workload *w) {
    idmap_free(&w->seen);
    free(w->tab_begin);
    free(w->ids);
    for (int g = 0; g < NGRAD; g++) free(w->grads[g]);
}

/* Key set s of this worker. */
static ps_row_keys keys_of(const workload *w, const opts *o, int s) {
    return (ps_row_keys){.ntables = o->tables,
                         .tab_begin = w->tab_begin + (size_t)s * (size_t)(o->tables + 1),
                         .ids = w->ids + (size_t)s * (size_t)o->rows};
}

/* Every row gradient every worker pushed in steps 0..nsteps-1, step by
 * step, rank by rank: row(ctx, table, id, g) for each (g: dim floats),
 * then step_end(ctx) (may be NULL) after each step. */
typedef struct replay_fn {
    void (*row)(void *ctx, int table, uint64_t id, const float *g);
    void (*step_end)(void *ctx);
    void *ctx;
} replay_fn;

static void replay(const opts *o, workload *w, int nsteps, const replay_fn *f) {
    size_t *tb = cm_malloc((size_t)(o->tables + 1) * sizeof *tb);
    uint64_t *ids = cm_malloc((size_t)o->rows * sizeof *ids);
    for (int s = 0; s < nsteps; s++) {
        for (int r = 0; r < o->workers; r++) {
            gen_keys(o, &w->z, &w->seen, r, s, tb, ids);
            const float *g = w->grads[grad_of(o, s, r)];
            for (int t = 0; t < o->tables; t++)
                for (size_t u = tb[t]; u < tb[t + 1]; u++)
                    f->row(f->ctx, t, ids[u], g + u * (size_t)o->dim);
        }
        if (f->step_end) f->step_end(f->ctx);
    }
    free(tb);
    free(ids);
}

/* ================================================== the timed loop */

/* One worker role: its step (op, iteration) and its context. */
typedef struct runner {
    const opts *o;
    workload *wl;
    int (*step)(void *ctx, int op, int it, char *err, size_t errlen);
    void *ctx;
    char err[512];
} runner;

/* Wait for "go", run the op's warm-up and timed steps, print its line:
 * {"rank":R,"op":"...","window_s":...,"p50_ms":...,"p90_ms":...}. */
static int run_op(runner *r, int op) {
    const opts *o = r->o;
    int total = op_steps(o);
    double *lat = cm_malloc((size_t)o->iters * sizeof *lat);
    int rc = CM_EIO;
    if (bu_read_command("go")) {
        snprintf(r->err, sizeof r->err, "no \"go\" from the driver");
        goto out;
    }
    double tprev = cm_now(), tstart = tprev;
    for (int it = 0; it < total; it++) {
        if (it == o->warmup) tstart = tprev;
        if ((rc = r->step(r->ctx, op, it, r->err, sizeof r->err)) != CM_OK) goto out;
        double t = cm_now();
        if (it >= o->warmup) lat[it - o->warmup] = t - tprev;
        tprev = t;
    }
    printf("{\"rank\":%d,\"op\":\"%s\",\"window_s\":%.9f,\"p50_ms\":%.6f,\"p90_ms\":%.6f}\n",
           o->rank, op_name[op], tprev - tstart, bu_median(lat, o->iters) * 1e3,
           bu_quantile(lat, o->iters, 0.9) * 1e3);
    fflush(stdout);
    rc = CM_OK;
out:
    free(lat);
    return rc;
}

/* A worker's life: the workload, "ready", both ops, then (worker 0) the
 * driver's "check" and check(ctx). */
static int run_worker(runner *r, int (*check)(void *ctx, char *err, size_t errlen)) {
    printf("{\"ready\":%d,\"draws_per_step\":%.1f}\n", r->o->rank, r->wl->draws);
    fflush(stdout);
    for (int op = 0; op < NOPS; op++)
        if (run_op(r, op) != CM_OK) return CM_EIO;
    if (r->o->rank != 0) return CM_OK;
    if (bu_read_command("check")) {
        snprintf(r->err, sizeof r->err, "no \"check\" from the driver");
        return CM_EIO;
    }
    return check(r->ctx, r->err, sizeof r->err);
}

/* The rows of 'keys' as pulled (got) against the expected (want), bit
 * for bit, dim floats a row: 0 if they are equal, else 1 after printing the
 * check line that names the first difference. */
static int rows_differ(const ps_row_keys *keys, const float *got, const float *want, int dim) {
    size_t n = keys->tab_begin[keys->ntables] * (size_t)dim, i = 0;
    while (i < n && !memcmp(&got[i], &want[i], sizeof *got)) i++;
    if (i == n) return 0;
    size_t u = i / (size_t)dim;
    int t = 0;
    while (keys->tab_begin[t + 1] <= u) t++;
    printf("{\"check\":\"bad\",\"what\":\"row\",\"table\":%d,\"id\":%llu,\"element\":%zu,"
           "\"value\":%.9g,\"expected\":%.9g}\n",
           t, (unsigned long long)keys->ids[u], i % (size_t)dim, (double)got[i], (double)want[i]);
    return 1;
}

/* ================================================== role: PS worker */

typedef struct ps_worker {
    const opts *o;
    workload *wl;
    cm_model *model;
    cm_placement *pl;
    ps_client *c;
    ps_optim_cfg table_optim;
    float dense_grad[DENSE_N], dense[DENSE_N];
    float *values; /* rows x dim. */
} ps_worker;

/* T tables "table<t>" of dim D (U(-0.01, 0.01)) and "dense/bias" [16]. */
static int make_model(const opts *o, cm_model **out, char *err, size_t errlen) {
    cm_var *vars = cm_calloc((size_t)o->tables + 1, sizeof *vars);
    for (int t = 0; t < o->tables; t++) {
        cm_var *v = &vars[t];
        snprintf(v->name, sizeof v->name, "table%d", t);
        v->kind = CM_VAR_TABLE;
        v->ndims = 1;
        v->dims[0] = o->dim;
        v->dim = o->dim;
        v->init = CM_INIT_UNIFORM;
        v->init_scale = 0.01f;
    }
    cm_var *b = &vars[o->tables];
    snprintf(b->name, sizeof b->name, "dense/bias");
    b->kind = CM_VAR_DENSE;
    b->ndims = 1;
    b->dims[0] = DENSE_N;
    b->init = CM_INIT_ZERO;
    int rc = cm_model_create_from_vars("sparsebench", vars, o->tables + 1, out, err, errlen);
    free(vars);
    return rc;
}

static int ps_step(void *ctx, int op, int it, char *err, size_t errlen) {
    ps_worker *p = ctx;
    const opts *o = p->o;
    int n = op_steps(o), rc;
    ps_ticket *t;
    ps_row_keys keys = keys_of(p->wl, o, it), want;
    if (op == OP_PUSH_PULL) {
        want = keys_of(p->wl, o, it + 1);
        rc = ps_client_push_pull_rows(p->c, it, p->dense_grad, p->dense, &keys,
                                      p->wl->grads[grad_of(o, it, o->rank)], &want, p->values, &t);
    } else {
        want = keys_of(p->wl, o, n + 1 + it);
        rc = ps_client_pull_rows(p->c, n, &want, p->values, 1, &t);
    }
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "ps_client refused the %s call", op_name[op]);
        return rc;
    }
    if ((rc = ps_ticket_wait(t, NULL, err, errlen)) != CM_OK) return rc;
    /* Every push-pull ends a sync step: the dense sums are known. */
    float dense_want = (float)o->workers * (float)(it + 1);
    if (op == OP_PUSH_PULL && (p->dense[0] != dense_want || p->dense[DENSE_N - 1] != dense_want)) {
        cm_seterr(err, errlen, "step %d: dense values %g .. %g, expected %g", it,
                  (double)p->dense[0], (double)p->dense[DENSE_N - 1], (double)dense_want);
        return CM_ECORRUPT;
    }
    return CM_OK;
}

/* The replay of the shard: each step, every worker's rows summed per row
 * in rank order, then one optimizer step per row (ps_shard's sync rule). */
typedef struct shard_replay {
    const opts *o;
    ps_rows *rows;
    idmap *map;      /* Per table: id -> index in ids / sums. */
    uint32_t *n;     /* Per table: rows this step. */
    uint64_t **ids;  /* Per table. */
    float **sums;    /* Per table: n x dim. */
} shard_replay;

static void shard_row(void *ctx, int t, uint64_t id, const float *g) {
    shard_replay *r = ctx;
    int fresh, dim = r->o->dim;
    uint32_t i = idmap_put(&r->map[t], id, &r->n[t], &fresh);
    float *s = r->sums[t] + (size_t)i * (size_t)dim;
    if (fresh) {
        r->ids[t][i] = id;
        memcpy(s, g, (size_t)dim * sizeof *s);
    } else {
        for (int j = 0; j < dim; j++) s[j] += g[j];
    }
}

static void shard_step_end(void *ctx) {
    shard_replay *r = ctx;
    for (int t = 0; t < r->o->tables; t++) {
        ps_rows_apply(r->rows, t, r->ids[t], r->n[t], r->sums[t], 1.0f);
        idmap_clear(&r->map[t]);
        r->n[t] = 0;
    }
}

/* Worker 0 at the end: the rows of the last push-pull's keys (the most
 * trained: every hot row) pulled from the PS must equal bit for bit the
 * replay of every worker's pushes; the dense sums, the version and the
 * rows the shards counted must match too. Then the PS are stopped. */
static int ps_check(void *ctx, char *err, size_t errlen) {
    ps_worker *p = ctx;
    const opts *o = p->o;
    int n = op_steps(o), rc, T = o->tables;
    int64_t version = -1;
    ps_ticket *t;
    ps_row_keys keys = keys_of(p->wl, o, n);
    size_t nrows = keys.tab_begin[T];
    float *want = cm_malloc(nrows * (size_t)o->dim * sizeof *want);
    ps_client_stats st;
    shard_replay r = {.o = o, .rows = ps_rows_create(p->model, &p->table_optim, SEED),
                      .map = cm_calloc((size_t)T, sizeof *r.map),
                      .n = cm_calloc((size_t)T, sizeof *r.n),
                      .ids = cm_calloc((size_t)T, sizeof *r.ids),
                      .sums = cm_calloc((size_t)T, sizeof *r.sums)};
    memset(p->values, 0, nrows * (size_t)o->dim * sizeof *p->values);
    if ((rc = ps_client_pull_rows(p->c, n, &keys, p->values, 0, &t)) != CM_OK ||
        (rc = ps_ticket_wait(t, &version, err, errlen)) != CM_OK)
        goto out;
    if ((rc = ps_client_pull(p->c, n, p->dense, &t)) != CM_OK ||
        (rc = ps_ticket_wait(t, NULL, err, errlen)) != CM_OK ||
        (rc = ps_client_stats_get(p->c, &st, err, errlen)) != CM_OK)
        goto out;
    for (int tb = 0; tb < T; tb++) {
        size_t cap = (size_t)o->workers * table_quota(o, tb);
        idmap_init(&r.map[tb], cap);
        r.ids[tb] = cm_malloc(cap * sizeof *r.ids[tb]);
        r.sums[tb] = cm_malloc(cap * (size_t)o->dim * sizeof *r.sums[tb]);
    }
    replay(o, p->wl, n, &(replay_fn){.row = shard_row, .step_end = shard_step_end, .ctx = &r});
    for (int tb = 0; tb < T; tb++)
        ps_rows_read(r.rows, tb, keys.ids + keys.tab_begin[tb],
                     keys.tab_begin[tb + 1] - keys.tab_begin[tb], 0,
                     want + keys.tab_begin[tb] * (size_t)o->dim);
    /* The PS stop first: a failed check must not leave them to the driver. */
    rc = ps_client_shutdown_servers(p->c, "sparsebench done", 0, err, errlen);
    float dense_want = (float)o->workers * (float)n;
    uint64_t pushed_want = (uint64_t)o->workers * (uint64_t)n * (uint64_t)o->rows;
    if (rows_differ(&keys, p->values, want, o->dim)) {
        /* Said. */
    } else if (p->dense[0] != dense_want || p->dense[DENSE_N - 1] != dense_want ||
               version != n || st.rows_pushed != pushed_want) {
        printf("{\"check\":\"bad\",\"what\":\"dense, version or rows pushed\",\"dense\":%g,"
               "\"expected\":%g,\"version\":%lld,\"expected_version\":%d,\"rows_pushed\":%llu,"
               "\"expected_rows_pushed\":%llu}\n",
               (double)p->dense[0], (double)dense_want, (long long)version, n,
               (unsigned long long)st.rows_pushed, (unsigned long long)pushed_want);
    } else {
        printf("{\"check\":\"ok\",\"rows_checked\":%zu,\"version\":%lld,\"rows_held\":%llu,"
               "\"rows_pushed\":%llu,\"rows_pulled\":%llu}\n",
               nrows, (long long)version, (unsigned long long)st.rows,
               (unsigned long long)st.rows_pushed, (unsigned long long)st.rows_pulled);
    }
    fflush(stdout);
out:
    for (int tb = 0; tb < T; tb++) {
        if (r.map[tb].key) idmap_free(&r.map[tb]);
        free(r.ids[tb]);
        free(r.sums[tb]);
    }
    free(r.map);
    free(r.n);
    free(r.ids);
    free(r.sums);
    ps_rows_destroy(r.rows);
    free(want);
    return rc;
}

static int ps_worker_main(const opts *o) {
    int status = 1, nps;
    char err[512] = "", *copy = NULL, *addrs[BU_MAX_PROCS];
    workload wl;
    ps_worker p = {.o = o, .wl = &wl};
    runner r = {.o = o, .wl = &wl, .step = ps_step, .ctx = &p};
    ps_ticket *t;
    int wl_up = 0;
    if ((nps = bu_split_list(o->ps_addrs ? o->ps_addrs : "", &copy, addrs, BU_MAX_PROCS)) < 1) {
        snprintf(err, sizeof err, "bad --ps-addrs");
        goto fail;
    }
    if (make_model(o, &p.model, err, sizeof err) != CM_OK ||
        cm_placement_create(p.model, nps, CM_PLACEMENT_MIN_PART_BYTES, &p.pl) != CM_OK)
        goto fail;
    p.table_optim = ps_optim_defaults(o->optim, TABLE_LR);
    ps_client_cfg cfg = {.model = p.model, .placement = p.pl,
                         .ps_addrs = (const char *const *)addrs, .rank = o->rank,
                         .deadline_ms = 60000, .connect_timeout_ms = 30000,
                         .unary = o->unary};
    if (ps_client_open(&cfg, &p.c, err, sizeof err) != CM_OK) goto fail;
    if (o->rank == 0) {
        ps_init_cfg init = {.optim = ps_optim_defaults(PS_OPTIM_ADD, 0.0f),
                            .table_optim = p.table_optim, .seed = SEED,
                            .num_workers = o->workers, .async = 0, .sum = 1, .zero_init = 1};
        if (ps_client_init(p.c, &init, err, sizeof err) != CM_OK) goto fail;
    }
    if (workload_init(&wl, o, err, sizeof err) != CM_OK) goto fail;
    wl_up = 1;
    for (int i = 0; i < DENSE_N; i++) p.dense_grad[i] = 1.0f;
    p.values = cm_alloc_aligned((size_t)o->rows * (size_t)o->dim * sizeof(float));
    if (!p.values) {
        snprintf(err, sizeof err, "out of memory for the pulled rows");
        goto fail;
    }
    memset(p.values, 0, (size_t)o->rows * (size_t)o->dim * sizeof(float));
    /* A pull at version 0 waits until the chief's Init reached every shard. */
    ps_client_pull(p.c, 0, p.dense, &t);
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) goto fail;
    if (run_worker(&r, ps_check) != CM_OK) {
        snprintf(err, sizeof err, "%s", r.err);
        goto fail;
    }
    status = 0;
fail:
    if (status) fprintf(stderr, "sparsebench worker %d: %s\n", o->rank, err);
    ps_client_close(p.c);
    free(p.values);
    if (wl_up) workload_free(&wl);
    cm_placement_destroy(p.pl);
    cm_model_destroy(p.model);
    free(copy);
    return status;
}

/* ================================================== TCP: the wire */

/* A request: this header, then npush keys (table << 40 | id, 8 bytes each
 * as the PS's ids), npush x dim float gradients, nwant keys; the answer is
 * nwant x dim floats. op 'S' (push and pull), 'R' (pull), 'Q' (stop: the
 * answer is one byte 'A'). */
typedef struct tcp_hdr {
    uint32_t op, npush, nwant, dim;
} tcp_hdr;

#define KEY_TABLE_SHIFT 40

static uint64_t row_key(int table, uint64_t id) {
    return ((uint64_t)table << KEY_TABLE_SHIFT) | id;
}

/* A key's row in a TCP server's table of TCP_SLOTS rows. */
static size_t slot_of(uint64_t key) { return (size_t)(cm_mix64(key) % TCP_SLOTS); }

/* ================================================== role: TCP server */

/* The server's table: pushed rows are added into their slot under the
 * write lock, pulled rows read under the read lock. */
typedef struct tcp_store {
    float *v; /* TCP_SLOTS x dim */
    int dim;
    pthread_rwlock_t lock;
} tcp_store;

#define MAX_REQ_ROWS (1u << 22)

/* Grow *p to hold n elements of size sz (kept across requests). */
static int reserve(void **p, size_t *cap, size_t n, size_t sz) {
    if (n <= *cap) return 0;
    void *q = realloc(*p, n * sz);
    if (!q) return -1;
    *p = q;
    *cap = n;
    return 0;
}

static void tcp_serve(void *ctx, int fd, int listen_fd) {
    tcp_store *st = ctx;
    size_t dim = (size_t)st->dim, kcap = 0, gcap = 0, wcap = 0, ocap = 0;
    uint64_t *keys = NULL, *wkeys = NULL;
    float *grads = NULL, *out = NULL;
    tcp_hdr h;
    while (bu_recv_all(fd, &h, sizeof h) == 0) {
        if (h.op == 'Q') {
            const char ack = 'A';
            bu_send_all(fd, &ack, 1, 0);
            shutdown(listen_fd, SHUT_RDWR); /* Ends the accept loop. */
            break;
        }
        if ((h.op != 'S' && h.op != 'R') || h.dim != dim || h.npush > MAX_REQ_ROWS ||
            h.nwant > MAX_REQ_ROWS || (h.op == 'R' && h.npush) ||
            reserve((void **)&keys, &kcap, h.npush, sizeof *keys) ||
            reserve((void **)&grads, &gcap, h.npush * dim, sizeof *grads) ||
            reserve((void **)&wkeys, &wcap, h.nwant, sizeof *wkeys) ||
            reserve((void **)&out, &ocap, h.nwant * dim, sizeof *out))
            break;
        if (bu_recv_all(fd, keys, h.npush * sizeof *keys) ||
            bu_recv_all(fd, grads, h.npush * dim * sizeof *grads) ||
            bu_recv_all(fd, wkeys, h.nwant * sizeof *wkeys))
            break;
        if (h.npush) {
            pthread_rwlock_wrlock(&st->lock);
            for (size_t i = 0; i < h.npush; i++) {
                float *row = st->v + slot_of(keys[i]) * dim;
                const float *g = grads + i * dim;
                for (size_t j = 0; j < dim; j++) row[j] += g[j];
            }
            pthread_rwlock_unlock(&st->lock);
        }
        pthread_rwlock_rdlock(&st->lock);
        for (size_t i = 0; i < h.nwant; i++)
            memcpy(out + i * dim, st->v + slot_of(wkeys[i]) * dim, dim * sizeof *out);
        pthread_rwlock_unlock(&st->lock);
        if (bu_send_all(fd, out, h.nwant * dim * sizeof *out, 0)) break;
    }
    free(keys);
    free(grads);
    free(wkeys);
    free(out);
}

static int tcp_server_main(const opts *o) {
    tcp_store st = {.dim = o->dim};
    pthread_rwlock_init(&st.lock, NULL);
    st.v = cm_calloc((size_t)TCP_SLOTS * (size_t)o->dim, sizeof *st.v);
    int status = bu_tcp_serve("sparsebench tcp-server", tcp_serve, &st);
    pthread_rwlock_destroy(&st.lock);
    free(st.v);
    return status;
}

/* ================================================== role: TCP worker */

/* The worker's link to one server: the step's rows for it (gathered by
 * the caller), sent and answered by the link's own thread when S > 1. */
typedef struct tcp_link {
    int fd;
    tcp_hdr h;
    uint64_t *keys, *wkeys; /* rows each */
    float *grads, *reply;   /* rows x dim each */
    uint32_t *wpos;         /* Where each wanted row goes in the caller's values. */
    int failed, stop;
    pthread_barrier_t *bar;
    pthread_t th;
} tcp_link;

static int link_io(tcp_link *l) {
    size_t dim = l->h.dim;
    if (bu_send_all(l->fd, &l->h, sizeof l->h, MSG_MORE) ||
        bu_send_all(l->fd, l->keys, l->h.npush * sizeof *l->keys, MSG_MORE) ||
        bu_send_all(l->fd, l->grads, l->h.npush * dim * sizeof *l->grads, MSG_MORE) ||
        bu_send_all(l->fd, l->wkeys, l->h.nwant * sizeof *l->wkeys, 0) ||
        bu_recv_all(l->fd, l->reply, l->h.nwant * dim * sizeof *l->reply))
        return -1;
    return 0;
}

/* S > 1: barrier, exchange, barrier, until told to stop; the caller is
 * the barrier's last party. */
static void *link_run(void *arg) {
    tcp_link *l = arg;
    for (;;) {
        pthread_barrier_wait(l->bar);
        if (l->stop) break;
        if (!l->failed && link_io(l)) l->failed = 1;
        pthread_barrier_wait(l->bar);
    }
    return NULL;
}

typedef struct tcp_worker {
    const opts *o;
    workload *wl;
    int ns, nthreads, barrier_up;
    tcp_link links[BU_MAX_PROCS];
    pthread_barrier_t bar;
    float *values; /* rows x dim */
    char *copy, *ports[BU_MAX_PROCS];
} tcp_worker;

/* One exchange with every server: push (keys with grads; NULL: none) and
 * want (into values at u * dim), split by cm_row_shard as ps_client
 * splits them. */
static int tcp_exchange(tcp_worker *tw, const ps_row_keys *push, const float *grads,
                        const ps_row_keys *want) {
    size_t dim = (size_t)tw->o->dim;
    for (int s = 0; s < tw->ns; s++)
        tw->links[s].h = (tcp_hdr){.op = push ? 'S' : 'R', .dim = (uint32_t)dim};
    for (int t = 0; push && t < push->ntables; t++)
        for (size_t u = push->tab_begin[t]; u < push->tab_begin[t + 1]; u++) {
            tcp_link *l = &tw->links[cm_row_shard(t, push->ids[u], tw->ns)];
            l->keys[l->h.npush] = row_key(t, push->ids[u]);
            memcpy(l->grads + l->h.npush++ * dim, grads + u * dim, dim * sizeof *grads);
        }
    for (int t = 0; t < want->ntables; t++)
        for (size_t u = want->tab_begin[t]; u < want->tab_begin[t + 1]; u++) {
            tcp_link *l = &tw->links[cm_row_shard(t, want->ids[u], tw->ns)];
            l->wpos[l->h.nwant] = (uint32_t)u;
            l->wkeys[l->h.nwant++] = row_key(t, want->ids[u]);
        }
    if (tw->ns == 1) {
        if (link_io(&tw->links[0])) tw->links[0].failed = 1;
    } else {
        pthread_barrier_wait(&tw->bar);
        pthread_barrier_wait(&tw->bar);
    }
    for (int s = 0; s < tw->ns; s++) {
        tcp_link *l = &tw->links[s];
        if (l->failed) return CM_EIO;
        for (size_t i = 0; i < l->h.nwant; i++)
            memcpy(tw->values + l->wpos[i] * dim, l->reply + i * dim, dim * sizeof *l->reply);
    }
    return CM_OK;
}

static int tcp_step(void *ctx, int op, int it, char *err, size_t errlen) {
    tcp_worker *tw = ctx;
    const opts *o = tw->o;
    ps_row_keys keys = keys_of(tw->wl, o, it), want;
    int rc;
    if (op == OP_PUSH_PULL) {
        want = keys_of(tw->wl, o, it + 1);
        rc = tcp_exchange(tw, &keys, tw->wl->grads[grad_of(o, it, o->rank)], &want);
    } else {
        want = keys_of(tw->wl, o, op_steps(o) + 1 + it);
        rc = tcp_exchange(tw, NULL, NULL, &want);
    }
    if (rc != CM_OK) cm_seterr(err, errlen, "I/O error with a TCP server");
    return rc;
}

/* The expected TCP tables: every server's slots summed. */
typedef struct slot_replay {
    const opts *o;
    int ns;
    float **v; /* ns x TCP_SLOTS x dim */
} slot_replay;

static void slot_row(void *ctx, int t, uint64_t id, const float *g) {
    slot_replay *r = ctx;
    int dim = r->o->dim;
    float *row = r->v[cm_row_shard(t, id, r->ns)] + slot_of(row_key(t, id)) * (size_t)dim;
    for (int j = 0; j < dim; j++) row[j] += g[j];
}

/* Worker 0 at the end: the rows of the last push-pull's keys, pulled from
 * the TCP servers, must equal the replayed sums; then the servers stop. */
static int tcp_check(void *ctx, char *err, size_t errlen) {
    tcp_worker *tw = ctx;
    const opts *o = tw->o;
    int n = op_steps(o), rc = CM_OK;
    size_t dim = (size_t)o->dim;
    ps_row_keys keys = keys_of(tw->wl, o, n);
    size_t nrows = keys.tab_begin[o->tables];
    float *want = cm_malloc(nrows * dim * sizeof *want);
    slot_replay r = {.o = o, .ns = tw->ns, .v = cm_calloc((size_t)tw->ns, sizeof *r.v)};
    for (int s = 0; s < tw->ns; s++) r.v[s] = cm_calloc((size_t)TCP_SLOTS * dim, sizeof *r.v[s]);
    memset(tw->values, 0, nrows * dim * sizeof *tw->values);
    if (tcp_exchange(tw, NULL, NULL, &keys) != CM_OK) {
        cm_seterr(err, errlen, "the check's pull failed");
        rc = CM_EIO;
        goto out;
    }
    replay(o, tw->wl, n, &(replay_fn){.row = slot_row, .ctx = &r});
    for (int t = 0; t < o->tables; t++)
        for (size_t u = keys.tab_begin[t]; u < keys.tab_begin[t + 1]; u++)
            memcpy(want + u * dim,
                   r.v[cm_row_shard(t, keys.ids[u], tw->ns)] + slot_of(row_key(t, keys.ids[u])) * dim,
                   dim * sizeof *want);
    /* The servers stop first: a failed check must not leave them to the
     * driver. */
    for (int s = 0; s < tw->ns; s++) {
        tcp_hdr q = {.op = 'Q', .dim = (uint32_t)dim};
        char ack = 0;
        if (bu_send_all(tw->links[s].fd, &q, sizeof q, 0) ||
            bu_recv_all(tw->links[s].fd, &ack, 1)) {
            cm_seterr(err, errlen, "cannot stop the server on port %s", tw->ports[s]);
            rc = CM_EIO;
        }
    }
    if (!rows_differ(&keys, tw->values, want, o->dim))
        printf("{\"check\":\"ok\",\"rows_checked\":%zu}\n", nrows);
    fflush(stdout);
out:
    for (int s = 0; s < tw->ns; s++) free(r.v[s]);
    free(r.v);
    free(want);
    return rc;
}

static int tcp_worker_main(const opts *o) {
    int status = 1;
    char err[512] = "";
    workload wl;
    int wl_up = 0;
    tcp_worker tw = {.o = o, .wl = &wl};
    runner r = {.o = o, .wl = &wl, .step = tcp_step, .ctx = &tw};
    size_t rows = (size_t)o->rows, dim = (size_t)o->dim;
    for (int i = 0; i < BU_MAX_PROCS; i++) tw.links[i].fd = -1;
    if ((tw.ns = bu_split_list(o->tcp_ports ? o->tcp_ports : "", &tw.copy, tw.ports,
                               BU_MAX_PROCS)) < 1) {
        snprintf(err, sizeof err, "bad --tcp-ports");
        goto fail;
    }
    for (int s = 0; s < tw.ns; s++) {
        tcp_link *l = &tw.links[s];
        l->bar = &tw.bar;
        l->keys = cm_malloc(rows * sizeof *l->keys);
        l->wkeys = cm_malloc(rows * sizeof *l->wkeys);
        l->wpos = cm_malloc(rows * sizeof *l->wpos);
        l->grads = cm_alloc_aligned(rows * dim * sizeof *l->grads);
        l->reply = cm_alloc_aligned(rows * dim * sizeof *l->reply);
        if (!l->grads || !l->reply) {
            snprintf(err, sizeof err, "out of memory for the link buffers");
            goto fail;
        }
        /* Touch the pages before timing. */
        memset(l->grads, 0, rows * dim * sizeof *l->grads);
        memset(l->reply, 0, rows * dim * sizeof *l->reply);
        if ((l->fd = bu_tcp_connect(atoi(tw.ports[s]))) < 0) {
            snprintf(err, sizeof err, "cannot connect to 127.0.0.1:%s", tw.ports[s]);
            goto fail;
        }
    }
    tw.values = cm_alloc_aligned(rows * dim * sizeof *tw.values);
    if (!tw.values) {
        snprintf(err, sizeof err, "out of memory for the pulled rows");
        goto fail;
    }
    memset(tw.values, 0, rows * dim * sizeof *tw.values);
    if (workload_init(&wl, o, err, sizeof err) != CM_OK) goto fail;
    wl_up = 1;
    if (tw.ns > 1) {
        pthread_barrier_init(&tw.bar, NULL, (unsigned)tw.ns + 1);
        tw.barrier_up = 1;
        for (; tw.nthreads < tw.ns; tw.nthreads++)
            if (pthread_create(&tw.links[tw.nthreads].th, NULL, link_run,
                               &tw.links[tw.nthreads])) {
                /* The threads already started would wait at the barrier
                 * for ever: end the process, the driver reports it. */
                fprintf(stderr, "sparsebench tcp-worker %d: cannot start a thread\n", o->rank);
                exit(1);
            }
    }
    if (run_worker(&r, tcp_check) != CM_OK) {
        snprintf(err, sizeof err, "%s", r.err);
        goto fail;
    }
    status = 0;
fail:
    if (status) fprintf(stderr, "sparsebench tcp-worker %d: %s\n", o->rank, err);
    /* Wake the link threads to stop (closing the sockets ends their I/O). */
    for (int s = 0; s < tw.ns; s++) {
        tw.links[s].stop = 1;
        if (tw.links[s].fd >= 0) shutdown(tw.links[s].fd, SHUT_RDWR);
    }
    if (tw.nthreads > 0) pthread_barrier_wait(&tw.bar);
    for (; tw.nthreads > 0; tw.nthreads--) pthread_join(tw.links[tw.nthreads - 1].th, NULL);
    if (tw.barrier_up) pthread_barrier_destroy(&tw.bar);
    for (int s = 0; s < BU_MAX_PROCS; s++) {
        tcp_link *l = &tw.links[s];
        if (l->fd >= 0) close(l->fd);
        free(l->keys);
        free(l->wkeys);
        free(l->wpos);
        free(l->grads);
        free(l->reply);
    }
    free(tw.values);
    if (wl_up) workload_free(&wl);
    free(tw.copy);
    return status;
}

/* ================================================== driver: phases */

typedef struct bench_cfg {
    int servers, workers, dim;
} bench_cfg;

/* One timed op of one phase, over all workers, and the machine meanwhile
 * (from the driver's "go" to the last worker's line). */
typedef struct op_result {
    double window_s;       /* The slowest worker's timed window. */
    double p50_ms, p90_ms; /* Mean over workers of each one's per-step median, p90. */
    double load1_start, load1_end;
    double wall_s, others_s; /* The driver's window and others' CPU in it, */
    double res_s;            /* give or take this. */
} op_result;

typedef struct phase_result {
    op_result op[NOPS];
    double draws; /* Zipf draws per step (worker 0). */
    int nw, cur;  /* Workers; the op being read. */
} phase_result;

static int read_ready(void *ctx, int i, const char *line) {
    phase_result *res = ctx;
    int rank;
    double draws;
    if (sscanf(line, "{\"ready\":%d,\"draws_per_step\":%lf}", &rank, &draws) != 2) return -1;
    if (i == 0) res->draws = draws;
    return 0;
}

static int read_timings(void *ctx, int i, const char *line) {
    phase_result *res = ctx;
    op_result *r = &res->op[res->cur];
    char op[16];
    int rank;
    double win, p50, p90;
    (void)i;
    if (sscanf(line,
               "{\"rank\":%d,\"op\":\"%15[a-z_]\",\"window_s\":%lf,\"p50_ms\":%lf,"
               "\"p90_ms\":%lf}",
               &rank, op, &win, &p50, &p90) != 5 ||
        strcmp(op, op_name[res->cur]))
        return -1;
    if (win > r->window_s) r->window_s = win;
    r->p50_ms += p50 / res->nw;
    r->p90_ms += p90 / res->nw;
    return 0;
}

/* The worker protocol: W "ready" lines, then for each op "go" to all and W
 * timing lines (the machine sampled around it), then the check. */
static int run_workers(bu_driver *d, bu_child **w, int nw, phase_result *res, char *err,
                       size_t errlen) {
    int rc;
    *res = (phase_result){.nw = nw};
    if ((rc = bu_workers_ready(d, w, nw, read_ready, res, err, errlen)) != CM_OK) return rc;
    for (res->cur = 0; res->cur < NOPS; res->cur++) {
        bu_cpu_sample a, b;
        op_result *r = &res->op[res->cur];
        bu_cpu_sample_take(d, &a);
        if ((rc = bu_workers_round(d, w, nw, read_timings, res, err, errlen)) != CM_OK)
            return rc;
        bu_cpu_sample_take(d, &b);
        r->load1_start = a.load1;
        r->load1_end = b.load1;
        r->wall_s = b.wall - a.wall;
        r->others_s = bu_cpu_others_s(&a, &b);
        r->res_s = b.res_s;
    }
    return bu_workers_finish(d, w, nw, err, errlen);
}

/* Start the W workers of a phase ('role'), told the servers by addr_opt. */
static int spawn_workers(bu_driver *d, const opts *o, const bench_cfg *b, const char *role,
                         const char *addr_opt, const char *addrs, bu_child **w, char *err,
                         size_t errlen) {
    for (int r = 0; r < b->workers; r++) {
        char nums[9][32], name[32];
        snprintf(nums[0], 32, "%d", r);
        snprintf(nums[1], 32, "%d", b->workers);
        snprintf(nums[2], 32, "%d", b->dim);
        snprintf(nums[3], 32, "%d", o->tables);
        snprintf(nums[4], 32, "%d", o->rows);
        snprintf(nums[5], 32, "%lld", o->ids);
        snprintf(nums[6], 32, "%.17g", o->zipf);
        snprintf(nums[7], 32, "%d", o->warmup);
        snprintf(nums[8], 32, "%d", o->iters);
        char *argv[] = {d->exe, "--role", (char *)role, "--rank", nums[0], "--workers", nums[1],
                        "--dims", nums[2], "--tables", nums[3], "--rows", nums[4], "--ids",
                        nums[5], "--zipf", nums[6], "--warmup", nums[7], "--iters", nums[8],
                        "--optim", (char *)ps_optim_name(o->optim), "--calls",
                        o->unary ? "unary" : "stream", (char *)addr_opt, (char *)addrs, NULL};
        snprintf(name, sizeof name, "%s %d", role, r);
        if (!(w[r] = bu_spawn(d, name, argv, 1, 1, err, errlen))) return CM_EIO;
    }
    return CM_OK;
}

/* A phase's workers (bu_ps_phase's and bu_tcp_phase's callback): this
 * binary as 'role', told the servers by addr_opt. */
typedef struct phase_run {
    const opts *o;
    const bench_cfg *b;
    const char *role, *addr_opt;
    phase_result *res;
} phase_run;

static int phase_workers(void *ctx, bu_driver *d, const char *addrs, char *err, size_t errlen) {
    phase_run *pr = ctx;
    bu_child *w[BU_MAX_PROCS];
    int rc = spawn_workers(d, pr->o, pr->b, pr->role, pr->addr_opt, addrs, w, err, errlen);
    return rc != CM_OK ? rc : run_workers(d, w, pr->b->workers, pr->res, err, errlen);
}

/* The PS phase: S psserver processes, W workers over ps_client. */
static int run_ps(bu_driver *d, const opts *o, const bench_cfg *b, phase_result *res, char *err,
                  size_t errlen) {
    phase_run pr = {.o = o, .b = b, .role = "worker", .addr_opt = "--ps-addrs", .res = res};
    return bu_ps_phase(d, b->servers, b->workers, phase_workers, &pr, err, errlen);
}

/* The plain-TCP phase: S tcp-server processes, W tcp-worker processes. */
static int run_tcp(bu_driver *d, const opts *o, const bench_cfg *b, phase_result *res,
                   char *err, size_t errlen) {
    char dim[16];
    snprintf(dim, sizeof dim, "%d", b->dim);
    char *argv[] = {d->exe, "--role", "tcp-server", "--dims", dim, NULL};
    char *const *argvs[BU_MAX_PROCS];
    for (int i = 0; i < b->servers; i++) argvs[i] = argv;
    phase_run pr = {.o = o, .b = b, .role = "tcp-worker", .addr_opt = "--tcp-ports", .res = res};
    return bu_tcp_phase(d, b->servers, argvs, phase_workers, &pr, err, errlen);
}

/* ================================================== driver: report */

/* Payload bytes one worker moves per step of op: push-pull sends ids and
 * gradients of its rows and the ids of the next step's, and gets their
 * values back; a pull sends ids and gets values. */
static double step_bytes(const opts *o, const bench_cfg *b, int op) {
    double row = 4.0 * b->dim;
    return op == OP_PUSH_PULL ? o->rows * (8.0 + row + 8.0 + row) : o->rows * (8.0 + row);
}

/* Rows per second over all workers (pushed, or pulled: U of each per
 * step either way). */
static double rows_per_s(const opts *o, const bench_cfg *b, const op_result *r) {
    return (double)b->workers * o->rows * o->iters / r->window_s;
}

/* Others used more than BUSY_CORES beyond what the counters' ticks blur. */
static int busy(const op_result *r) { return r->others_s - r->res_s > BUSY_CORES * r->wall_s; }

static void print_op(const opts *o, const bench_cfg *b, int op, const op_result *r) {
    double rps = rows_per_s(o, b, r);
    printf("{\"rows_per_s\":%.1f,\"mb_per_s\":%.2f,\"step_ms_p50\":%.4f,\"step_ms_p90\":%.4f,"
           "\"window_s\":%.4f,\"load1_start\":%.2f,\"load1_end\":%.2f,\"others_cpu_s\":%.3f,"
           "\"others_cores\":%.3f,\"others_cpu_res_s\":%.2f,\"busy\":%s}",
           rps, rps / o->rows * step_bytes(o, b, op) * 1e-6, r->p50_ms, r->p90_ms, r->window_s,
           r->load1_start, r->load1_end, r->others_s, r->others_s / r->wall_s, r->res_s,
           busy(r) ? "true" : "false");
}

/* One round's line: both phases' figures and the ratios PS / TCP. */
static void report_round(const opts *o, const bench_cfg *b, int round, int tcp_first,
                         const phase_result *ps, const phase_result *tcp) {
    printf("{\"bench\":\"sparsebench\",\"record\":\"round\",\"dim\":%d,\"servers\":%d,"
           "\"workers\":%d,\"round\":%d,\"first\":\"%s\"",
           b->dim, b->servers, b->workers, round + 1, tcp_first ? "tcp" : "ps");
    for (int op = 0; op < NOPS; op++) {
        printf(",\"ps_%s\":", op_name[op]);
        print_op(o, b, op, &ps->op[op]);
        printf(",\"tcp_%s\":", op_name[op]);
        print_op(o, b, op, &tcp->op[op]);
        printf(",\"ratio_%s\":%.4f", op_name[op], tcp->op[op].window_s / ps->op[op].window_s);
    }
    printf("}\n");
    fflush(stdout);
}

/* A configuration's medians over its rounds. */
typedef struct summary {
    double rps[2][NOPS], p50[2][NOPS], p90[2][NOPS]; /* [ps, tcp][op] */
    double ratio[NOPS], load_start, load_end, draws;
    int busy, windows, nrounds;
} summary;

static void summarise(const opts *o, const bench_cfg *b, const phase_result (*res)[2],
                      int nrounds, summary *s) {
    double v[MAX_ROUNDS];
    memset(s, 0, sizeof *s);
    s->nrounds = nrounds;
    if (!nrounds) return;
    for (int k = 0; k < 2; k++)
        for (int op = 0; op < NOPS; op++) {
            for (int i = 0; i < nrounds; i++) v[i] = rows_per_s(o, b, &res[i][k].op[op]);
            s->rps[k][op] = bu_median(v, nrounds);
            for (int i = 0; i < nrounds; i++) v[i] = res[i][k].op[op].p50_ms;
            s->p50[k][op] = bu_median(v, nrounds);
            for (int i = 0; i < nrounds; i++) v[i] = res[i][k].op[op].p90_ms;
            s->p90[k][op] = bu_median(v, nrounds);
            for (int i = 0; i < nrounds; i++) {
                s->busy += busy(&res[i][k].op[op]);
                s->windows++;
            }
        }
    for (int op = 0; op < NOPS; op++) {
        for (int i = 0; i < nrounds; i++)
            v[i] = res[i][1].op[op].window_s / res[i][0].op[op].window_s;
        s->ratio[op] = bu_median(v, nrounds);
    }
    s->load_start = res[0][0].op[0].load1_start;
    s->load_end = res[nrounds - 1][1].op[NOPS - 1].load1_end;
    s->draws = res[0][0].draws;
}

/* The configuration's line: medians over rounds and each round's ratio. */
static void report_config(const opts *o, const bench_cfg *b, const phase_result (*res)[2],
                          const summary *s, const char *check) {
    printf("{\"bench\":\"sparsebench\",\"record\":\"config\",\"dim\":%d,\"servers\":%d,"
           "\"workers\":%d,\"mode\":\"sync\",\"tables\":%d,\"unique_rows_per_step\":%d,"
           "\"ids_per_table\":%lld,\"zipf\":%g,\"table_optim\":\"%s\",\"warmup\":%d,\"iters\":%d,"
           "\"rounds\":%d,\"calls\":\"%s\"",
           b->dim, b->servers, b->workers, o->tables, o->rows, o->ids, o->zipf,
           ps_optim_name(o->optim), o->warmup, o->iters, s->nrounds,
           o->unary ? "unary" : "stream");
    if (s->nrounds > 0) {
        printf(",\"draws_per_step\":%.1f,\"push_rows_per_s\":%.1f,\"pull_rows_per_s\":%.1f,"
               "\"push_pull_mb_per_s\":%.2f,\"push_pull_ms_p50\":%.4f,\"push_pull_ms_p90\":%.4f,"
               "\"pull_only_rows_per_s\":%.1f,\"pull_only_mb_per_s\":%.2f,"
               "\"pull_only_ms_p50\":%.4f,\"pull_only_ms_p90\":%.4f,"
               "\"tcp_push_pull_rows_per_s\":%.1f,\"tcp_push_pull_ms_p50\":%.4f,"
               "\"tcp_pull_only_rows_per_s\":%.1f,\"tcp_pull_only_ms_p50\":%.4f,"
               "\"tcp_semantics\":\"no step barrier; rows summed into a hashed table of %d "
               "rows per server\",\"ratio_to_tcp\":%.4f,\"pull_only_ratio_to_tcp\":%.4f",
               s->draws, s->rps[0][OP_PUSH_PULL], s->rps[0][OP_PUSH_PULL],
               s->rps[0][OP_PUSH_PULL] / o->rows * step_bytes(o, b, OP_PUSH_PULL) * 1e-6,
               s->p50[0][OP_PUSH_PULL], s->p90[0][OP_PUSH_PULL], s->rps[0][OP_PULL],
               s->rps[0][OP_PULL] / o->rows * step_bytes(o, b, OP_PULL) * 1e-6,
               s->p50[0][OP_PULL], s->p90[0][OP_PULL], s->rps[1][OP_PUSH_PULL],
               s->p50[1][OP_PUSH_PULL], s->rps[1][OP_PULL], s->p50[1][OP_PULL], TCP_SLOTS,
               s->ratio[OP_PUSH_PULL], s->ratio[OP_PULL]);
        for (int op = 0; op < NOPS; op++) {
            printf(",\"%s\":[", op == OP_PUSH_PULL ? "ratio_rounds" : "pull_only_ratio_rounds");
            for (int i = 0; i < s->nrounds; i++)
                printf("%s%.4f", i ? "," : "", res[i][1].op[op].window_s / res[i][0].op[op].window_s);
            printf("]");
        }
        printf(",\"load1_start\":%.2f,\"load1_end\":%.2f,\"busy_windows\":%d,\"windows\":%d",
               s->load_start, s->load_end, s->busy, s->windows);
    }
    /* The verdict is "ok" or an error message. */
    printf(",\"check\":");
    bu_print_json_string(check);
    printf("}\n");
    fflush(stdout);
}

/* ================================================== driver: main */

static void usage(FILE *f) {
    fprintf(f,
            "usage: sparsebench [options]\n"
            "Sparse embedding rows through psserver + ps_client (sync, S PS x W workers on\n"
            "127.0.0.1): per step each worker pushes U unique rows' gradients and pulls its\n"
            "next step's U rows in one call (push_pull), then pulls rows alone (pull); the\n"
            "same bytes over plain TCP in the same run, interleaved round by round. Rows\n"
            "pulled are checked against a replay of every push. Prints JSON lines (one per\n"
            "round, one per configuration, one for the run) and a table on stderr; exits 1\n"
            "if a run or a check failed.\n\n"
            "  --dims D,...         row dims (default 16,64)\n"
            "  --shapes SxW,...     servers x workers (default 1x1,2x2)\n"
            "  --tables T           tables (default 8)\n"
            "  --rows U             unique rows per worker per step, over all tables\n"
            "                       (default 4096)\n"
            "  --ids N              id space of each table (default 1000000)\n"
            "  --zipf S             Zipf exponent of the ids (default 1.1)\n"
            "  --optim NAME         the tables' optimizer: adagrad or add (default adagrad)\n"
            "  --rounds N           PS and TCP runs per configuration, alternating which\n"
            "                       goes first; medians are reported (default 5)\n"
            "  --warmup N, --iters N  steps per op, untimed and timed (default 50, 1000)\n"
            "  --quick              a smoke run: 1024 rows, 3 + 30 steps, 1 round\n"
            "  --timeout S          bound on the whole run, seconds (default 1800)\n"
            "  --calls C            stream (default): the client's calls go on its gRPC\n"
            "                       streams; unary: a gRPC call each (ps_client_cfg.unary)\n"
            "  --bin-dir DIR        where psserver is (default <this binary's dir>/../bin)\n"
            "  -h, --help           this text\n");
}

/* Run one configuration o->rounds times and print its lines. 0, or -1 if
 * a run or its check failed. */
static int run_config(bu_driver *d, const opts *o, const bench_cfg *b, summary *s) {
    phase_result (*res)[2] = cm_calloc((size_t)o->rounds, sizeof *res);
    char err[512] = "ok";
    int n = 0;
    for (; n < o->rounds; n++) {
        /* Odd rounds start with TCP. res[n][0] is the PS phase, [1] TCP. */
        int tcp_first = n % 2, rc = CM_OK;
        for (int k = 0; k < 2 && rc == CM_OK; k++) {
            int tcp = k != tcp_first;
            rc = (tcp ? run_tcp : run_ps)(d, o, b, &res[n][tcp], err, sizeof err);
        }
        if (rc != CM_OK) break;
        report_round(o, b, n, tcp_first, &res[n][0], &res[n][1]);
        fprintf(stderr,
                "sparsebench: dim %d %dx%d round %d/%d: push_pull PS %.0f rows/s, TCP %.0f "
                "(x%.3f); pull PS %.0f rows/s, TCP %.0f (x%.3f)%s\n",
                b->dim, b->servers, b->workers, n + 1, o->rounds,
                rows_per_s(o, b, &res[n][0].op[0]), rows_per_s(o, b, &res[n][1].op[0]),
                res[n][1].op[0].window_s / res[n][0].op[0].window_s,
                rows_per_s(o, b, &res[n][0].op[1]), rows_per_s(o, b, &res[n][1].op[1]),
                res[n][1].op[1].window_s / res[n][0].op[1].window_s,
                busy(&res[n][0].op[0]) || busy(&res[n][0].op[1]) || busy(&res[n][1].op[0]) ||
                        busy(&res[n][1].op[1])
                    ? " [others used the cores]"
                    : "");
    }
    int failed = n < o->rounds;
    if (failed)
        fprintf(stderr, "sparsebench: dim %d %dx%d round %d: %s\n", b->dim, b->servers,
                b->workers, n + 1, err);
    summarise(o, b, (const phase_result(*)[2])res, failed ? 0 : n, s);
    report_config(o, b, (const phase_result(*)[2])res, s, err);
    free(res);
    return failed ? -1 : 0;
}

/* The human table of every configuration, on stderr. */
static void print_table(const opts *o, const bench_cfg *cfgs, const summary *s, int n,
                        double load_start, double load_end) {
    fprintf(stderr,
            "\nsparsebench: sync, %d tables, %d unique rows/worker/step (Zipf %g over %lld "
            "ids/table), %s, %d+%d steps, %d rounds; load %.2f -> %.2f\n",
            o->tables, o->rows, o->zipf, o->ids, ps_optim_name(o->optim), o->warmup, o->iters,
            o->rounds, load_start, load_end);
    fprintf(stderr, "%4s %4s | %12s %9s %8s %8s | %12s %7s | %12s %8s | %12s %7s | %5s\n",
            "dim", "SxW", "push rows/s", "MB/s", "p50 ms", "p90 ms", "TCP rows/s", "PS/TCP",
            "pull rows/s", "p50 ms", "TCP rows/s", "PS/TCP", "busy");
    for (int i = 0; i < n; i++) {
        const summary *x = &s[i];
        const bench_cfg *b = &cfgs[i];
        if (!x->nrounds) {
            fprintf(stderr, "%4d %2dx%-2d | failed\n", b->dim, b->servers, b->workers);
            continue;
        }
        fprintf(stderr,
                "%4d %2dx%-2d | %12.0f %9.1f %8.3f %8.3f | %12.0f %7.3f | %12.0f %8.3f | "
                "%12.0f %7.3f | %2d/%-2d\n",
                b->dim, b->servers, b->workers, x->rps[0][0],
                x->rps[0][0] / o->rows * step_bytes(o, b, OP_PUSH_PULL) * 1e-6, x->p50[0][0],
                x->p90[0][0], x->rps[1][0], x->ratio[0], x->rps[0][1], x->p50[0][1],
                x->rps[1][1], x->ratio[1], x->busy, x->windows);
    }
    fprintf(stderr, "(push_pull: each step pushes U rows and pulls U; pull rows/s is the same "
                    "as push rows/s there. PS/TCP: median of the rounds' ratios. busy: timed "
                    "windows where other processes used > %.1f cores.)\n",
            BUSY_CORES);
}

static int driver_main(const opts *o) {
    bu_driver *d = cm_calloc(1, sizeof *d);
    char *copies[2] = {NULL, NULL}, *dims[MAX_LIST], *shapes[MAX_LIST];
    bench_cfg *cfgs = NULL;
    summary *sums = NULL;
    int status = 1, ncfgs = 0, failures = 0, nrun = 0;
    if (bu_driver_init(d, "sparsebench", o->bin_dir)) goto fail;
    int ndims = bu_split_list(o->dims ? o->dims : "16,64", &copies[0], dims, MAX_LIST);
    int nshapes = bu_split_list(o->shapes ? o->shapes : "1x1,2x2", &copies[1], shapes, MAX_LIST);
    if (ndims < 1 || nshapes < 1) {
        fprintf(stderr, "sparsebench: empty or too long --dims or --shapes\n");
        goto fail;
    }
    /* Every configuration is checked before the first one runs. */
    cfgs = cm_calloc((size_t)(ndims * nshapes), sizeof *cfgs);
    sums = cm_calloc((size_t)(ndims * nshapes), sizeof *sums);
    for (int di = 0; di < ndims; di++)
        for (int si = 0; si < nshapes; si++) {
            bench_cfg *b = &cfgs[ncfgs++];
            char *end;
            long dim = strtol(dims[di], &end, 10);
            if (*end || dim < 1 || dim > 4096 ||
                sscanf(shapes[si], "%dx%d", &b->servers, &b->workers) != 2 || b->servers < 1 ||
                b->workers < 1 || b->servers > BU_MAX_PROCS || b->workers > BU_MAX_PROCS) {
                fprintf(stderr, "sparsebench: bad configuration dim %s shape %s\n", dims[di],
                        shapes[si]);
                goto fail;
            }
            b->dim = (int)dim;
        }
    /* Children log only warnings unless the caller asked otherwise. */
    setenv("PS_LOG_LEVEL", "warn", 0);
    bu_catch_signals(bu_on_signal);
    d->deadline = cm_now() + o->timeout_s;
    double load_start = bu_load_average();
    fprintf(stderr, "sparsebench: load average %.2f at the start\n", load_start);
    for (; nrun < ncfgs && !bu_got_signal && cm_now() < d->deadline; nrun++)
        if (run_config(d, o, &cfgs[nrun], &sums[nrun])) failures++;
    double load_end = bu_load_average();
    print_table(o, cfgs, sums, nrun, load_start, load_end);
    int cut = nrun < ncfgs || bu_got_signal || cm_now() >= d->deadline;
    printf("{\"bench\":\"sparsebench\",\"record\":\"run\",\"configs\":%d,\"failed\":%d,"
           "\"load1_start\":%.2f,\"load1_end\":%.2f,\"cpus\":%ld,\"check\":\"%s\"}\n",
           nrun, failures, load_start, load_end, sysconf(_SC_NPROCESSORS_ONLN),
           failures ? "failed" : cut ? "cut short" : "ok");
    fflush(stdout);
    if (failures || cut)
        fprintf(stderr, "sparsebench: FAILED (%d of %d configurations failed%s)\n", failures,
                ncfgs, cut ? ", run cut short" : "");
    status = failures || cut ? 1 : 0;
fail:
    bu_stop_all(d);
    for (int i = 0; i < 2; i++) free(copies[i]);
    free(cfgs);
    free(sums);
    free(d);
    return status;
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {
        {"role", required_argument, 0, 'r'},     {"dims", required_argument, 0, 'd'},
        {"shapes", required_argument, 0, 's'},   {"tables", required_argument, 0, 'T'},
        {"rows", required_argument, 0, 'U'},     {"ids", required_argument, 0, 'N'},
        {"zipf", required_argument, 0, 'z'},     {"optim", required_argument, 0, 'o'},
        {"rounds", required_argument, 0, 'R'},   {"warmup", required_argument, 0, 'W'},
        {"iters", required_argument, 0, 'I'},    {"quick", no_argument, 0, 'q'},
        {"timeout", required_argument, 0, 't'},  {"bin-dir", required_argument, 0, 'b'},
        {"rank", required_argument, 0, 'k'},     {"workers", required_argument, 0, 'w'},
        {"ps-addrs", required_argument, 0, 'p'}, {"tcp-ports", required_argument, 0, 'P'},
        {"calls", required_argument, 0, 'L'},    {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    opts o = {.rounds = -1, .tables = 8, .rows = -1, .ids = 1000000, .zipf = 1.1, .warmup = -1,
              .iters = -1, .optim = PS_OPTIM_ADAGRAD, .timeout_s = 1800.0, .workers = 1};
    cm_mem_keep_freed(); /* As psserver and pstrain do. */
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'r': o.role = optarg; break;
        case 'd': o.dims = optarg; break;
        case 's': o.shapes = optarg; break;
        case 'T': o.tables = atoi(optarg); break;
        case 'U': o.rows = atoi(optarg); break;
        case 'N': o.ids = atoll(optarg); break;
        case 'z': o.zipf = atof(optarg); break;
        case 'o': o.optim = ps_optim_parse(optarg); break;
        case 'R': o.rounds = atoi(optarg); break;
        case 'W': o.warmup = atoi(optarg); break;
        case 'I': o.iters = atoi(optarg); break;
        case 'q': o.quick = 1; break;
        case 't': o.timeout_s = atof(optarg); break;
        case 'b': o.bin_dir = optarg; break;
        case 'k': o.rank = atoi(optarg); break;
        case 'w': o.workers = atoi(optarg); break;
        case 'p': o.ps_addrs = optarg; break;
        case 'P': o.tcp_ports = optarg; break;
        case 'L':
            if (bu_parse_calls("sparsebench", optarg, &o.unary)) return 2;
            break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    /* Defaults, the smoke run's or the full run's. */
    if (o.rows < 0) o.rows = o.quick ? 1024 : 4096;
    if (o.warmup < 0) o.warmup = o.quick ? 3 : 50;
    if (o.iters < 0) o.iters = o.quick ? 30 : 1000;
    if (o.rounds < 0) o.rounds = o.quick ? 1 : 5;
    if (o.role && o.dims) o.dim = atoi(o.dims);
    const char *bad = optind < argc                                   ? "stray arguments"
                      : o.rounds < 1 || o.rounds > MAX_ROUNDS         ? "--rounds: 1 to 15"
                      : o.timeout_s <= 0                              ? "--timeout: > 0"
                      : o.tables < 1 || o.tables > CM_MAX_TABLES      ? "--tables: 1 to 1024"
                      : o.rows < o.tables || o.rows > (1 << 20)       ? "--rows: tables to 2^20"
                      : o.ids < 2 * (o.rows / o.tables + 1) || o.ids > (1LL << 32)
                          ? "--ids: at least twice the rows of a table, at most 2^32"
                      : !(o.zipf > 0.0 && o.zipf < 10.0)              ? "--zipf: in (0, 10)"
                      : o.optim != PS_OPTIM_ADAGRAD && o.optim != PS_OPTIM_ADD
                          ? "--optim: adagrad or add"
                      : o.warmup < 0 || o.iters < 1                   ? "--warmup >= 0, --iters >= 1"
                                                                      : NULL;
    if (bad) {
        fprintf(stderr, "sparsebench: %s\n", bad);
        usage(stderr);
        return 2;
    }
    if (!o.role) return driver_main(&o);
    /* A role process dies with the driver, so nothing outlives a killed run. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() == 1) return 1;
    int is_server = !strcmp(o.role, "tcp-server");
    if (o.dim < 1 || (!is_server && (o.workers < 1 || o.rank < 0 || o.rank >= o.workers))) {
        fprintf(stderr, "sparsebench: bad arguments for --role %s\n", o.role);
        return 2;
    }
    if (!strcmp(o.role, "worker")) return ps_worker_main(&o);
    if (is_server) return tcp_server_main(&o);
    if (!strcmp(o.role, "tcp-worker")) return tcp_worker_main(&o);
    fprintf(stderr, "sparsebench: unknown --role %s\n", o.role);
    return 2;
}
