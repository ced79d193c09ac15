/* wk_sync_allreduce.c - collective mode: a ring AllReduce, no PS.
 * SPDX-License-Identifier: MIT
 *
 * Every worker keeps a full replica. begin() runs the rendezvous (the chief
 * serves it at its task address), joins the TCP ring (wk_ring) and
 * broadcasts the chief's parameters, so every replica starts identical.
 * step() averages the workers' gradients with the ring (each worker's
 * gradient is already weighted by its share of the global batch, so the
 * average is the global batch's mean gradient) and applies the optimizer
 * locally, as local mode does: the replicas stay bit-identical, because the
 * ring's result is.
 *
 * GPU workers (cfg.gpu, a build with NCCL): the chief makes an NCCL unique
 * id before it serves the rendezvous, which hands it to every rank; after
 * the ring is up (it still carries the initial broadcast) each rank joins
 * one NCCL communicator (wk_nccl_world: rank = its rank, its first GPU),
 * and step() averages the gradient there instead of on the ring: the
 * gradient (already reduced over the worker's own GPUs to the host) is
 * uploaded to that GPU, allreduced (ncclAvg) under the watchdog and
 * downloaded. NCCL's result is the same on every rank, so the replicas
 * stay identical. GPU and CPU workers cannot mix: the rendezvous
 * fingerprint differs.
 *
 * Sparse models: every worker keeps the whole tables too (ps_rows, as local
 * mode does), like TensorFlow's MirroredStrategy, which all-gathers the
 * IndexedSlices of sparse gradients: step() first sums the counts of
 * every rank's unique rows (a W-float allreduce), then each rank's rows
 * (ids, tables and gradients, raw bytes) travel around the ring in one
 * broadcast per rank, and every rank sums them per row in rank order,
 * averages over the workers and applies the row-wise optimizer: the same
 * inputs in the same order on every rank, so the tables stay identical.
 * The hybrid (tables on PS processes, dense over the ring) needs PS
 * processes, which this mode exists to do without. Tables are not in this
 * mode's checkpoints (a run with tables refuses a checkpoint directory), and
 * NCCL is not used for them (GPU workers with tables need --no-nccl).
 *
 * Checkpoints (the chief, with a checkpoint directory): every K steps a copy
 * of the parameters and optimizer slots goes to a writer thread that stores
 * it as a generation of a durable store (storage/st_store) whose extra
 * record holds the step and the run's config. A run started again on the
 * directory resumes at the newest generation: the rendezvous hands out its
 * step and the ring broadcasts its parameters and slots.
 *
 * Elastic rings (CPU): a step whose ring failed is not applied; the rank
 * closes its sockets (the failure cascades) and recover joins the chief's
 * rendezvous again with the step its state is for. The next ring is every
 * rank (a restarted one joins without state) or, after --worker-timeout,
 * at least --min-workers; its root (the newest state) broadcasts
 * parameters, slots and tables, and each member takes its place's slice of
 * the global batch (docs/ARCHITECTURE.md, "Elastic rings").
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_rowacc.h"
#include "ps/ps_rows.h"
#include "storage/st_store.h"
#include "worker/device/wk_device_cuda.h"
#include "worker/device/wk_nccl_world.h"
#include "worker/sync/wk_rendezvous.h"
#include "worker/sync/wk_ring.h"
#include "worker/sync/wk_sync.h"

typedef struct arsync {
    wk_sync base;
    wk_sync_ar_cfg cfg;
    size_t n;
    int nslots;
    float *slots;
    uint64_t fingerprint;
    char description[256];
    wk_rdv_server *rdv;
    wk_ring *ring;
    int elastic;           /* A dead rank's ring forms again (CPU rings). */
    int64_t end_step;      /* The run's last step (end), and the parameters... */
    float *end_params;     /* ...the trainer holds until finish (borrowed). */
    int root_rank;         /* Whose state the current ring took. */
    int use_nccl;          /* GPU workers with NCCL: the gradient goes there. */
    wk_nccl_world *world;  /* Set up by begin() when use_nccl. */
    /* Checkpoints (chief). */
    st_store *store;
    pthread_t writer;
    int writer_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int busy, stop;  /* Protected by mu: a job is being written; shut down. */
    int64_t job_step;
    float *job;      /* Params then slots: (1 + nslots) * n floats. */
    /* Sparse models. */
    ps_rows *rows;   /* The whole tables. */
    int row_dim;
    float *counts;   /* nworkers: unique rows of each rank this step. */
    float **blocks;  /* nworkers: each rank's rows (see pack_rows). */
    size_t *block_cap;
    ps_rowacc acc;
    int *table_dims;
    float apply_scale;
} arsync;

/* A rank's rows as floats for the ring: per row two floats with the id's
 * raw bits, one with the table's, then row_dim gradient values. The ring
 * broadcast copies bytes, so the bits arrive unchanged. */
#define ROW_HDR 3

static size_t row_rec(const arsync *a) { return ROW_HDR + (size_t)a->row_dim; }

static float *block_for(arsync *a, int r, size_t nrows) {
    size_t need = (nrows ? nrows : 1) * row_rec(a);
    if (need > a->block_cap[r]) {
        free(a->blocks[r]);
        a->blocks[r] = cm_alloc_aligned(need * sizeof(float));
        if (!a->blocks[r]) abort();
        a->block_cap[r] = need;
    }
    return a->blocks[r];
}

static void pack_rows(arsync *a, const wk_rowset *keys, const float *grads, float *out) {
    size_t rec = row_rec(a);
    for (int t = 0; t < keys->ntables; t++)
        for (size_t u = keys->tab_begin[t]; u < keys->tab_begin[t + 1]; u++) {
            float *p = out + u * rec;
            uint32_t tab = (uint32_t)t;
            memcpy(p, &keys->ids[u], 8);
            memcpy(p + 2, &tab, 4);
            memcpy(p + ROW_HDR, grads + u * (size_t)a->row_dim, (size_t)a->row_dim * sizeof(float));
        }
}

static void apply_table(void *ud, uint32_t table, const uint64_t *ids, size_t n,
                        const float *g) {
    arsync *a = ud;
    ps_rows_apply(a->rows, (int)table, ids, n, g, a->apply_scale);
}

/* Every rank's row gradients to every rank, summed per row in rank order
 * and applied (averaged over the workers) to this replica's tables. */
static int exchange_rows(arsync *a, int64_t step, const wk_sparse_step *sp) {
    const int W = a->base.nmembers, me = a->base.member; /* The current ring. */
    int rc;
    memset(a->counts, 0, (size_t)W * sizeof(float));
    a->counts[me] = (float)sp->keys->nuniq; /* Exact: < 2^24 rows. */
    if ((rc = wk_ring_allreduce(a->ring, a->counts, (size_t)W, step, 0)) != CM_OK) goto fail;
    size_t rec = row_rec(a);
    for (int r = 0; r < W; r++) {
        size_t nr = (size_t)a->counts[r];
        float *b = block_for(a, r, nr);
        if (r == me) pack_rows(a, sp->keys, sp->row_grad, b);
        if (nr && W > 1 && (rc = wk_ring_broadcast(a->ring, b, nr * rec, step, r)) != CM_OK)
            goto fail;
    }
    for (int r = 0; r < W; r++) {
        const float *b = a->blocks[r];
        for (size_t i = 0; i < (size_t)a->counts[r]; i++) {
            const float *p = b + i * rec;
            uint64_t id;
            uint32_t tab;
            memcpy(&id, p, 8);
            memcpy(&tab, p + 2, 4);
            if (tab >= (uint32_t)a->cfg.model->ntables) {
                snprintf(a->base.err, sizeof a->base.err,
                         "rows of step %lld from rank %d name table %u of %d", (long long)step, r,
                         tab, a->cfg.model->ntables);
                return CM_EPROTO;
            }
            ps_rowacc_add(&a->acc, tab, id, (const uint8_t *)(p + ROW_HDR),
                          ps_rows_dim(a->rows, (int)tab), 0);
        }
    }
    a->apply_scale = 1.0f / (float)W;
    ps_rowacc_each_table(&a->acc, a->cfg.model->ntables, a->table_dims, apply_table, a);
    ps_rowacc_reset(&a->acc);
    return CM_OK;
fail:
    snprintf(a->base.err, sizeof a->base.err, "row exchange of step %lld: %s", (long long)step,
             wk_ring_error(a->ring));
    return rc;
}

static int ar_dump(wk_sync *s, int table, ps_rows_visit_fn fn, void *ud) {
    arsync *a = (arsync *)s;
    return a->rows ? ps_rows_visit(a->rows, table, fn, ud) : CM_EINVAL;
}

static int ar_rows(wk_sync *s, int64_t version, const wk_rowset *keys, float *values,
                   int train) {
    (void)version;
    arsync *a = (arsync *)s;
    if (!a->rows) return CM_EINVAL;
    wk_rows_read(a->rows, keys, a->row_dim, train, values);
    return CM_OK;
}

/* The extra record of a generation: what must match to resume. */
typedef struct ar_extra {
    char magic[8]; /* "arckpt1" */
    int64_t step;
    uint64_t seed;
    uint32_t global_batch, nworkers;
    int32_t optim_kind;
    float lr;
} ar_extra;

static void fill_extra(const arsync *a, int64_t step, ar_extra *e) {
    memset(e, 0, sizeof *e);
    memcpy(e->magic, "arckpt1", 8);
    e->step = step;
    e->seed = a->cfg.seed;
    e->global_batch = a->cfg.global_batch;
    e->nworkers = (uint32_t)a->cfg.nworkers;
    e->optim_kind = a->cfg.optim.kind;
    e->lr = a->cfg.optim.lr;
}

static int write_generation(arsync *a, int64_t step, const float *params, const float *slots) {
    st_blob b[3];
    int nb = 0;
    b[nb++] = (st_blob){.part = 0, .kind = ST_KIND_PARAMS, .data = params,
                        .len = a->n * sizeof(float)};
    for (int k = 0; k < a->nslots; k++)
        b[nb++] = (st_blob){.part = 0, .kind = (uint32_t)k + 1, .data = slots + (size_t)k * a->n,
                            .len = a->n * sizeof(float)};
    ar_extra e;
    fill_extra(a, step, &e);
    char err[512];
    double t0 = cm_now();
    int rc = st_store_checkpoint(a->store, step, b, nb, &e, sizeof e, err, sizeof err);
    if (rc != CM_OK) {
        cm_error("checkpoint of step %lld failed: %s", (long long)step, err);
        return rc;
    }
    int64_t keep[2];
    if (st_store_committed(a->store, keep, 2, err, sizeof err) >= 2)
        st_store_drop_older(a->store, keep[0], err, sizeof err); /* One store: no one to wait for. */
    cm_info("checkpoint of step %lld committed in %.0f ms", (long long)step,
            (cm_now() - t0) * 1e3);
    return CM_OK;
}

static void *writer_main(void *arg) {
    arsync *a = arg;
    pthread_mutex_lock(&a->mu);
    for (;;) {
        while (!a->busy && !a->stop) pthread_cond_wait(&a->cv, &a->mu);
        if (!a->busy) break;
        pthread_mutex_unlock(&a->mu);
        write_generation(a, a->job_step, a->job, a->job + a->n);
        pthread_mutex_lock(&a->mu);
        a->busy = 0;
        pthread_cond_broadcast(&a->cv);
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* Hand step's state to the writer; if it is still writing the last one,
 * wait for it first (the step stalls) rather than skip this one: a skipped
 * checkpoint would let a crash lose any number of intervals, a slow writer
 * (a loaded machine) behind. So at most two intervals are ever lost. */
static void checkpoint_async(arsync *a, int64_t step, const float *params) {
    pthread_mutex_lock(&a->mu);
    if (a->busy) {
        double t0 = cm_now();
        while (a->busy) pthread_cond_wait(&a->cv, &a->mu);
        cm_debug("checkpoint of step %lld waited %.0f ms for the last one to be written",
                 (long long)step, (cm_now() - t0) * 1e3);
    }
    memcpy(a->job, params, a->n * sizeof(float));
    if (a->nslots) memcpy(a->job + a->n, a->slots, (size_t)a->nslots * a->n * sizeof(float));
    a->job_step = step;
    a->busy = 1;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
}

static void checkpoint_wait(arsync *a) {
    pthread_mutex_lock(&a->mu);
    while (a->busy) pthread_cond_wait(&a->cv, &a->mu);
    pthread_mutex_unlock(&a->mu);
}

/* Load blobs into params / slots. */
typedef struct load_ctx {
    arsync *a;
    float *params;
} load_ctx;

static int on_blob(void *ud, uint32_t part, uint32_t kind, const void *data, size_t len) {
    load_ctx *c = ud;
    if (part != 0 || kind > (uint32_t)c->a->nslots || len != c->a->n * sizeof(float))
        return CM_ECORRUPT;
    memcpy(kind == 0 ? c->params : c->a->slots + (size_t)(kind - 1) * c->a->n, data, len);
    return CM_OK;
}

/* mkdir -p of the directories above path (LevelDB makes the last one). */
static void make_parents(const char *path) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        mkdir(buf, 0777); /* EEXIST is fine; other errors show at open. */
        *p = '/';
    }
}

/* The chief: open the store and load its newest generation, if any. */
static int open_store(arsync *a, float *params, int64_t *step) {
    char err[768];
    make_parents(a->cfg.checkpoint_dir);
    st_identity id = {.fingerprint = a->fingerprint, .description = a->description, .shard = 0};
    int rc = st_store_open(NULL, a->cfg.checkpoint_dir, &id, &a->store, err, sizeof err);
    if (rc != CM_OK) {
        cm_seterr(a->base.err, sizeof a->base.err, "checkpoint store %s: %s",
                 a->cfg.checkpoint_dir, err);
        return rc;
    }
    int64_t v;
    rc = st_store_latest(a->store, &v, err, sizeof err);
    if (rc == CM_ENOTFOUND) return CM_OK;
    void *extra = NULL;
    size_t elen = 0;
    load_ctx c = {.a = a, .params = params};
    if (rc == CM_OK) rc = st_store_load(a->store, v, on_blob, &c, &extra, &elen, err, sizeof err);
    if (rc == CM_OK) {
        ar_extra want, *e = extra;
        fill_extra(a, v, &want);
        if (elen != sizeof want || memcmp(e->magic, want.magic, 8) != 0) {
            snprintf(err, sizeof err, "its extra record is not one this program wrote");
            rc = CM_ECORRUPT;
        } else if (e->seed != want.seed || e->global_batch != want.global_batch ||
                   e->optim_kind != want.optim_kind || e->lr != want.lr) {
            snprintf(err, sizeof err,
                     "it was written by a run with seed %llu, global batch %u, optimizer %d, "
                     "lr %g; this run has seed %llu, global batch %u, optimizer %d, lr %g",
                     (unsigned long long)e->seed, e->global_batch, e->optim_kind, (double)e->lr,
                     (unsigned long long)want.seed, want.global_batch, want.optim_kind,
                     (double)want.lr);
            rc = CM_EINVAL;
        }
    }
    free(extra);
    if (rc != CM_OK) {
        cm_seterr(a->base.err, sizeof a->base.err, "cannot resume from %s: %s",
                 a->cfg.checkpoint_dir, err);
        return rc;
    }
    *step = v;
    cm_info("loaded the checkpoint of step %lld from %s", (long long)v, a->cfg.checkpoint_dir);
    return CM_OK;
}

/* host part of "host:port" (brackets of IPv6 kept). */
static void host_of(const char *addr, char *host, size_t len) {
    const char *colon = strrchr(addr, ':');
    size_t n = colon ? (size_t)(colon - addr) : strlen(addr);
    if (n >= len) n = len - 1;
    memcpy(host, addr, n);
    host[n] = 0;
}

/* A table row for the ring: id (2 floats of raw bits), update count (2),
 * values (dim), slots (nslots x dim). */
typedef struct table_pack {
    float *at;          /* The next record. */
    size_t dim, nslot;  /* Floats of values and of slots a row. */
} table_pack;

static int pack_table_row(void *ud, uint64_t id, const float *values, const float *slots,
                          int64_t count) {
    table_pack *p = ud;
    float *o = p->at;
    memcpy(o, &id, 8);
    memcpy(o + 2, &count, 8);
    memcpy(o + 4, values, p->dim * sizeof(float));
    if (slots) memcpy(o + 4 + p->dim, slots, p->nslot * sizeof(float));
    else memset(o + 4 + p->dim, 0, p->nslot * sizeof(float));
    p->at += 4 + p->dim + p->nslot;
    return CM_OK;
}

/* Elastic rings of a model with tables: every member takes the root's
 * whole tables (a newcomer has none; a survivor that failed in the step the
 * root finished is one step behind). Table by table: the row count (raw
 * bits), then the rows; the others' tables are replaced. */
static int broadcast_tables(arsync *a, int root) {
    int me = a->base.member, rc = CM_OK;
    ps_rows *fresh = me == root ? NULL : ps_rows_create(a->cfg.model, &a->cfg.table_optim,
                                                        a->cfg.seed);
    for (int t = 0; t < a->cfg.model->ntables && rc == CM_OK; t++) {
        size_t dim = (size_t)ps_rows_dim(a->rows, t);
        size_t nslot = dim * (size_t)ps_rows_nslots(a->rows), rec = 4 + dim + nslot;
        uint64_t nrows = me == root ? (uint64_t)ps_rows_count(a->rows, t) : 0;
        float hdr[2];
        memcpy(hdr, &nrows, 8);
        if ((rc = wk_ring_broadcast(a->ring, hdr, 2, -3, root)) != CM_OK) break;
        memcpy(&nrows, hdr, 8);
        float *buf = cm_alloc_aligned((nrows ? nrows : 1) * rec * sizeof(float));
        if (!buf) abort();
        if (me == root) {
            table_pack p = {.at = buf, .dim = dim, .nslot = nslot};
            ps_rows_visit(a->rows, t, pack_table_row, &p);
        }
        rc = wk_ring_broadcast(a->ring, buf, (size_t)nrows * rec, -4, root);
        for (uint64_t i = 0; rc == CM_OK && fresh && i < nrows; i++) {
            const float *o = buf + i * rec;
            uint64_t id;
            int64_t count;
            memcpy(&id, o, 8);
            memcpy(&count, o + 2, 8);
            ps_rows_put(fresh, t, id, o + 4, o + 4 + dim, count);
        }
        free(buf);
    }
    if (rc != CM_OK) {
        ps_rows_destroy(fresh);
        snprintf(a->base.err, sizeof a->base.err, "%s", wk_ring_error(a->ring));
        return rc;
    }
    if (fresh) {
        ps_rows_destroy(a->rows);
        a->rows = fresh;
    }
    return CM_OK;
}

static int form_ring(arsync *a, float *params, const wk_rdv_state *st, int64_t timeout_ms,
                     int64_t *start, uint8_t *nccl_id, size_t *nccl_id_len, int *joined);

/* form_ring until it succeeds, within timeout_ms in all: a member that dies
 * after the rendezvous answered (the ring did not connect, or its broadcast
 * failed) makes it join again when 'again' is set (elastic rings); a
 * failed rendezvous is returned at once (its error names who is missing). */
static int form_ring_retrying(arsync *a, float *params, const wk_rdv_state *st,
                              int64_t timeout_ms, int again, int64_t *start, uint8_t *nccl_id,
                              size_t *nccl_id_len) {
    double deadline = cm_now() + (double)timeout_ms / 1e3;
    for (int attempt = 1;; attempt++) {
        int64_t left = (int64_t)((deadline - cm_now()) * 1e3);
        int joined;
        int rc = form_ring(a, params, st, left > 1 ? left : 1, start, nccl_id, nccl_id_len,
                           &joined);
        if (rc == CM_OK || !joined || !again || cm_now() >= deadline) return rc;
        cm_warn("ring formation %d failed (%s); joining again", attempt, a->base.err);
        usleep(100 * 1000);
    }
}

/* Join the next ring at the chief's rendezvous (within timeout_ms), connect
 * it and take its root's state into params (and the optimizer slots when
 * the run is past step 0). *start: the step that state is for. *joined:
 * whether the rendezvous answered (a failure after it means a member died
 * while the ring formed). */
static int form_ring(arsync *a, float *params, const wk_rdv_state *st, int64_t timeout_ms,
                     int64_t *start, uint8_t *nccl_id, size_t *nccl_id_len, int *joined) {
    wk_sync *s = &a->base;
    const wk_sync_ar_cfg *c = &a->cfg;
    *joined = 0;
    wk_ring_destroy(a->ring);
    a->ring = NULL;
    char host[256], ring_addr[300];
    host_of(c->worker_addrs[c->rank], host, sizeof host);
    wk_ring_listener *l = NULL;
    int rc = wk_ring_listen(host, 0, &l, s->err, sizeof s->err);
    if (rc != CM_OK) return rc;
    snprintf(ring_addr, sizeof ring_addr, "%s:%d", host, wk_ring_listener_port(l));
    wk_rdv_result rr;
    int root = 0;
    rc = wk_rdv_join_state(c->worker_addrs[0], c->rank, c->nworkers, a->fingerprint,
                           a->description, ring_addr, st, timeout_ms, c->sec, &rr, s->err,
                           sizeof s->err);
    if (rc == CM_OK) {
        *joined = 1;
        wk_ring_opts o;
        wk_ring_opts_default(&o);
        o.job_id = rr.job_id;
        o.timeout_ms = (int)c->timeout_ms;
        o.connect_timeout_ms = (int)c->connect_timeout_ms;
        o.transport = c->ring_transport;
        o.algorithm = c->ring_algorithm;
        o.peers_listening = 1; /* Every rank listened before it joined. */
        rc = wk_ring_connect(l, rr.position, rr.nranks, (const char *const *)rr.ring_addrs, &o,
                             &a->ring, s->err, sizeof s->err);
        *start = rr.start_step;
        root = rr.root;
        a->root_rank = rr.members[root];
        s->member = rr.position;
        s->nmembers = rr.nranks;
        if (rr.nccl_id_len == WK_NCCL_ID_BYTES) memcpy(nccl_id, rr.nccl_id, rr.nccl_id_len);
        *nccl_id_len = rr.nccl_id_len;
        if (rr.generation > 1 || rr.nranks < c->nworkers) {
            char who[256] = "";
            for (int i = 0; i < rr.nranks && strlen(who) + 16 < sizeof who; i++)
                snprintf(who + strlen(who), sizeof who - strlen(who), "%s%d", i ? "," : "",
                         rr.members[i]);
            cm_info("ring %u: %d of %d workers (ranks %s), this one at place %d; state of rank "
                    "%d at step %lld",
                    rr.generation, rr.nranks, c->nworkers, who, rr.position, rr.members[root],
                    (long long)rr.start_step);
        }
        wk_rdv_result_free(&rr);
    } else if (a->rdv) {
        /* Who joined, while the rendezvous still holds Joins (none once
         * it gave up: its own message named them, and it forgot them). */
        char m[300];
        if (wk_rdv_server_describe(a->rdv, m, sizeof m) > 0) {
            size_t at = strlen(s->err);
            snprintf(s->err + at, sizeof s->err - at, ": %s", m);
        }
    }
    wk_ring_listener_destroy(l);
    if (rc != CM_OK) return rc;
    /* The root's replica (and, past step 0, its optimizer state and its
     * tables) for all. The broadcast writes into params and the slots as
     * it goes: a member that is not the root keeps a copy of its own, put
     * back if the broadcast fails (the root died in it), so that the next
     * attempt does not offer a mix of two steps as its state, which a new
     * root would hand to everyone. The tables are replaced only whole. */
    size_t nslot = *start > 0 ? (size_t)a->nslots * a->n : 0;
    float *keep = NULL;
    if (root != s->member) {
        keep = cm_malloc((a->n + nslot) * sizeof(float));
        memcpy(keep, params, a->n * sizeof(float));
        if (nslot) memcpy(keep + a->n, a->slots, nslot * sizeof(float));
    }
    rc = wk_ring_broadcast(a->ring, params, a->n, -1, root);
    if (rc == CM_OK && nslot)
        rc = wk_ring_broadcast(a->ring, a->slots, nslot, -2, root);
    if (rc == CM_OK && *start > 0 && a->rows) rc = broadcast_tables(a, root);
    if (rc != CM_OK && keep) {
        memcpy(params, keep, a->n * sizeof(float));
        if (nslot) memcpy(a->slots, keep + a->n, nslot * sizeof(float));
    }
    free(keep);
    if (rc != CM_OK) {
        snprintf(s->err, sizeof s->err, "%s", wk_ring_error(a->ring));
        return rc;
    }
    return CM_OK;
}

static int ar_begin(wk_sync *s, float *params, int64_t *first_step) {
    arsync *a = (arsync *)s;
    const wk_sync_ar_cfg *c = &a->cfg;
    int64_t start = 0;
    *first_step = 0;
    if (c->init_values)
        memcpy(params, c->init_values, a->n * sizeof(float));
    else
        cm_model_init(c->model, c->seed, params);
    int rc;
    if (c->is_chief && c->checkpoint_dir && (rc = open_store(a, params, &start)) != CM_OK)
        return rc;
    uint8_t nccl_id[WK_NCCL_ID_BYTES];
    size_t nccl_id_len = 0;
    if (c->is_chief) {
        if (a->use_nccl) {
            if ((rc = wk_nccl_world_id(nccl_id, s->err, sizeof s->err)) != CM_OK) return rc;
            nccl_id_len = sizeof nccl_id;
        }
        /* Random: the ring's handshakes check it, and only ranks that joined
         * (with the token, when there is one) learn it. */
        uint64_t job = 0;
        if (getrandom(&job, sizeof job, 0) != (ssize_t)sizeof job || !job)
            job = a->fingerprint ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(cm_now() * 1e6);
        rc = wk_rdv_server_start(c->worker_addrs[0], c->nworkers, a->fingerprint,
                                 a->description, job, start, nccl_id, nccl_id_len, c->sec, &a->rdv,
                                 s->err, sizeof s->err);
        if (rc != CM_OK) return rc;
        if (a->elastic) wk_rdv_server_set_elastic(a->rdv, c->min_workers, c->worker_timeout_ms);
    }
    /* The chief holds the run's state (its checkpoint, or the initial
     * parameters); a restarted worker holds none and takes the survivors'. */
    wk_rdv_state st = {.has_state = c->is_chief, .step = start};
    /* A member that dies while the first ring forms (the chief, say, to be
     * started again): an elastic ring forms again, as in ar_recover. */
    rc = form_ring_retrying(a, params, &st, c->connect_timeout_ms, a->elastic, &start, nccl_id,
                            &nccl_id_len);
    if (rc != CM_OK) return rc;
    if (a->use_nccl) {
        if (nccl_id_len != sizeof nccl_id) {
            snprintf(s->err, sizeof s->err, "rendezvous: the chief sent no NCCL id");
            return CM_EPROTO;
        }
        int gpu = wk_device_cuda_ordinal(c->gpu);
        double t0 = cm_now();
        rc = wk_nccl_world_create(nccl_id, c->nworkers, c->rank, gpu,
                                  (int)c->connect_timeout_ms, &a->world, s->err, sizeof s->err);
        if (rc != CM_OK) return rc;
        wk_nccl_world_set_timeout(a->world, (int)c->timeout_ms);
        cm_info("NCCL communicator of %d ranks up in %.0f ms (this rank on GPU %d)",
                c->nworkers, (cm_now() - t0) * 1e3, gpu);
    }
    cm_info("ring of %d workers up (%s, %s)%s", s->nmembers,
            a->ring ? wk_ring_transport(a->ring) : "-",
            a->ring ? wk_ring_algorithm(a->ring, a->n) : "-",
            start == 0                   ? ""
            : a->root_rank == c->rank    ? "; resuming from the chief's checkpoint"
                                         : "; resuming where the others stand");
    if (start > 0) cm_info("resuming at step %lld", (long long)start);
    *first_step = start;
    return CM_OK;
}

/* After a step failed with CM_EABORTED (a rank died, or one waits to join):
 * form the ring again with the ranks that join and take the newest state.
 * This rank's params are for failed_step (a step that failed here was not
 * applied); a rank that finished it holds failed_step + 1's, which wins. */
static int ar_recover(wk_sync *s, int64_t failed_step, int64_t *resume, float *params) {
    arsync *a = (arsync *)s;
    const wk_sync_ar_cfg *c = &a->cfg;
    wk_rdv_state st = {.has_state = 1, .step = failed_step, .rejoin = 1};
    uint8_t id[WK_NCCL_ID_BYTES];
    size_t idlen = 0;
    return form_ring_retrying(a, params, &st, c->worker_timeout_ms + c->connect_timeout_ms, 1,
                              resume, id, &idlen);
}

/* An elastic ring failed at 'step': close this rank's sockets at once (its
 * neighbours see it and fail too, so every survivor meets at the
 * rendezvous) and let the trainer recover (ar_recover). */
static int ring_lost(arsync *a, int64_t step) {
    snprintf(a->base.err, sizeof a->base.err, "allreduce of step %lld: %s", (long long)step,
             wk_ring_error(a->ring));
    wk_ring_destroy(a->ring);
    a->ring = NULL;
    return CM_EABORTED;
}

static int ar_step(wk_sync *s, int64_t step, float *grad, float *params, wk_sparse_step *sp,
                   wk_sync_times *t) {
    arsync *a = (arsync *)s;
    if (a->cfg.fault_zero_gradient) {
        memset(grad, 0, a->n * sizeof(float));
        if (sp) memset(sp->row_grad, 0, sp->keys->nuniq * (size_t)a->row_dim * sizeof(float));
    }
    double t0 = cm_now();
    int rc;
    if (a->elastic && s->nmembers < a->cfg.nworkers) {
        /* A smaller ring: does a rank wait to join (the chief knows)? */
        float back = a->rdv && wk_rdv_server_waiting(a->rdv) ? 1.0f : 0.0f;
        rc = wk_ring_allreduce(a->ring, &back, 1, step, 0);
        if (rc == CM_OK && back > 0.0f) {
            snprintf(s->err, sizeof s->err, "a worker waits to join: the ring forms again");
            return CM_EABORTED;
        }
        if (rc != CM_OK) return ring_lost(a, step);
    }
    if (a->world) {
        rc = wk_nccl_world_allreduce_host(a->world, grad, a->n, 1, step);
        if (rc != CM_OK) snprintf(s->err, sizeof s->err, "%s", wk_nccl_world_error(a->world));
    } else {
        rc = wk_ring_allreduce(a->ring, grad, a->n, step, 1);
        if (rc != CM_OK)
            snprintf(s->err, sizeof s->err, "allreduce of step %lld: %s", (long long)step,
                     wk_ring_error(a->ring));
    }
    if (rc == CM_OK && sp && a->rows) rc = exchange_rows(a, step, sp);
    double t1 = cm_now();
    if (rc != CM_OK) return a->elastic ? ring_lost(a, step) : rc;
    ps_optim_apply(&a->cfg.optim, step + 1, params, grad, a->slots, a->n);
    if (sp && sp->next && a->rows) {
        wk_rows_read(a->rows, sp->next, a->row_dim, 1, sp->next_values);
        sp->next_done = 1;
    }
    t->push = t1 - t0;
    t->apply = cm_now() - t1;
    if (a->writer_started && (step + 1) % a->cfg.checkpoint_every == 0)
        checkpoint_async(a, step + 1, params);
    return CM_OK;
}

static int ar_end(wk_sync *s, int64_t steps, float *params) {
    arsync *a = (arsync *)s;
    a->end_step = steps;
    a->end_params = params;
    if (a->store) { /* The final state, so a run started again loses nothing. */
        if (a->writer_started) checkpoint_wait(a);
        int64_t newest;
        char err[256];
        if (st_store_latest(a->store, &newest, err, sizeof err) != CM_OK || newest < steps)
            write_generation(a, steps, params, a->slots);
    }
    return CM_OK;
}

/* The communicator goes before the trainer destroys its devices: finalised
 * with the others after a good run, aborted after a failed one (its peers
 * may be gone). */
/* The last act of an elastic ring, once the chief wrote its outputs: a
 * one-float allreduce. Until it completes the other ranks keep the final
 * state, so a chief that dies before its outputs are written (and any rank
 * with it) is started again, joins, takes that state from a survivor (the
 * newest: the run's last step), has nothing to train, evaluates, writes the
 * outputs and comes here too. The chief's outputs exist once it gets here:
 * if the barrier fails for it (another rank died), the run is complete. A
 * rank whose barrier fails joins again: a new ring with the chief started
 * again, or "the run ended" from a chief that finished. */
static int end_barrier(arsync *a) {
    const wk_sync_ar_cfg *c = &a->cfg;
    for (int attempt = 1;; attempt++) {
        float one = 1.0f;
        if (a->ring && wk_ring_allreduce(a->ring, &one, 1, a->end_step + 1, 0) == CM_OK)
            return CM_OK;
        if (c->is_chief) {
            cm_warn("a worker left the ring after the last step (%s); the run is complete",
                    a->ring ? wk_ring_error(a->ring) : "no ring");
            return CM_OK;
        }
        cm_warn("the ring broke after the last step (%s): joining again, so that a chief "
                "started again can finish the run", a->ring ? wk_ring_error(a->ring) : "no ring");
        wk_ring_destroy(a->ring);
        a->ring = NULL;
        if (attempt > 3) {
            snprintf(a->base.err, sizeof a->base.err, "the ring broke after the last step %d "
                     "times", attempt);
            return CM_EUNAVAIL;
        }
        wk_rdv_state st = {.has_state = 1, .step = a->end_step, .rejoin = 1};
        uint8_t id[WK_NCCL_ID_BYTES];
        size_t idlen = 0;
        int64_t resume;
        int rc = form_ring_retrying(a, a->end_params, &st,
                                    c->worker_timeout_ms + c->connect_timeout_ms, 1, &resume, id,
                                    &idlen);
        if (rc == CM_ESHUTDOWN) return CM_OK; /* The chief finished: "the run ended". */
        if (rc != CM_OK) return rc;
    }
}

static int ar_finish(wk_sync *s, int ok) {
    arsync *a = (arsync *)s;
    if (!ok) wk_nccl_world_abort(a->world);
    wk_nccl_world_destroy(a->world);
    a->world = NULL;
    int rc = CM_OK;
    if (ok && a->elastic && a->end_params) rc = end_barrier(a);
    /* A replacement that comes now is told the run ended (and exits 0). */
    if (a->rdv && ok) wk_rdv_server_end(a->rdv, a->end_step);
    return rc;
}

static void ar_destroy(wk_sync *s) {
    arsync *a = (arsync *)s;
    if (a->writer_started) {
        pthread_mutex_lock(&a->mu);
        a->stop = 1;
        pthread_cond_broadcast(&a->cv);
        pthread_mutex_unlock(&a->mu);
        pthread_join(a->writer, NULL);
    }
    wk_nccl_world_destroy(a->world);
    wk_ring_destroy(a->ring);
    wk_rdv_server_destroy(a->rdv);
    st_store_close(a->store);
    pthread_cond_destroy(&a->cv);
    pthread_mutex_destroy(&a->mu);
    free(a->job);
    free(a->slots);
    ps_rows_destroy(a->rows);
    for (int r = 0; a->blocks && r < a->cfg.nworkers; r++) free(a->blocks[r]);
    free(a->blocks);
    free(a->block_cap);
    free(a->counts);
    ps_rowacc_free(&a->acc);
    free(a->table_dims);
    free(a);
}

static const wk_sync_ops ar_ops = {.name = "allreduce",
                                   .begin = ar_begin,
                                   .step = ar_step,
                                   .rows = ar_rows,
                                   .dump_rows = ar_dump,
                                   .end = ar_end,
                                   .finish = ar_finish,
                                   .destroy = ar_destroy,
                                   .recover = ar_recover};

int wk_sync_allreduce_create(const wk_sync_ar_cfg *cfg, wk_sync **out, char *err,
                             size_t errlen) {
    *out = NULL;
    if (cfg->nworkers < 1 || cfg->rank < 0 || cfg->rank >= cfg->nworkers || !cfg->worker_addrs) {
        cm_seterr(err, errlen, "allreduce: rank %d of %d workers", cfg->rank, cfg->nworkers);
        return CM_EINVAL;
    }
    arsync *a = cm_calloc(1, sizeof *a);
    a->base.ops = &ar_ops;
    a->cfg = *cfg;
    if (a->cfg.timeout_ms <= 0) a->cfg.timeout_ms = 60000;
    if (a->cfg.connect_timeout_ms <= 0) a->cfg.connect_timeout_ms = 60000;
    if (a->cfg.worker_timeout_ms <= 0) a->cfg.worker_timeout_ms = 60000;
    if (a->cfg.min_workers <= 0 || a->cfg.min_workers > cfg->nworkers)
        a->cfg.min_workers = cfg->nworkers;
    a->n = cfg->model->numel;
    a->nslots = ps_optim_nslots(cfg->optim.kind);
    if (a->nslots) a->slots = cm_calloc((size_t)a->nslots * a->n, sizeof(float));
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    a->use_nccl = cfg->gpu && wk_device_cuda_ordinal(cfg->gpu) >= 0 && wk_nccl_world_available();
    if (cfg->gpu && !a->use_nccl)
        cm_info("allreduce: this build has no NCCL; the GPUs' gradient goes over the TCP ring");
    a->fingerprint = cm_model_fingerprint(cfg->model) ^ (0x9e3779b97f4a7c15ull * (uint64_t)cfg->nworkers);
    if (a->use_nccl) a->fingerprint ^= 0x6e63636c00000000ull; /* "nccl": no CPU peers. */
    char layers[160] = "";
    for (int i = 0; i < cfg->model->nsizes; i++)
        snprintf(layers + strlen(layers), sizeof layers - strlen(layers), "%s%d", i ? "," : "",
                 cfg->model->sizes[i]);
    snprintf(a->description, sizeof a->description, "%s %s, allreduce over %d workers%s",
             cfg->model->kind, layers, cfg->nworkers, a->use_nccl ? " (NCCL on GPUs)" : "");
    if (cfg->model->ntables > 0) {
        if (a->use_nccl || cfg->checkpoint_dir) {
            cm_seterr(err, errlen, "allreduce mode with embedding tables (--model %s): %s",
                      cfg->model->kind,
                      a->use_nccl ? "the rows go over the TCP ring, not NCCL: add --no-nccl"
                                  : "checkpoints of tables are not written in this mode "
                                    "(run without --checkpoint-dir, or in PS mode)");
            ar_destroy(&a->base);
            return CM_EUNSUPPORTED;
        }
        a->rows = ps_rows_create(cfg->model, &cfg->table_optim, cfg->seed);
        a->row_dim = cm_model_max_dim(cfg->model);
        a->counts = cm_calloc((size_t)cfg->nworkers, sizeof *a->counts);
        a->blocks = cm_calloc((size_t)cfg->nworkers, sizeof *a->blocks);
        a->block_cap = cm_calloc((size_t)cfg->nworkers, sizeof *a->block_cap);
        a->acc.e.dim = a->row_dim;
        a->table_dims = cm_calloc((size_t)cfg->model->ntables, sizeof *a->table_dims);
        for (int t = 0; t < cfg->model->ntables; t++)
            a->table_dims[t] = cfg->model->vars[cfg->model->table_var[t]].dim;
    }
    if (cfg->is_chief && cfg->checkpoint_dir && cfg->checkpoint_every > 0) {
        a->job = cm_alloc_aligned((1 + (size_t)a->nslots) * a->n * sizeof(float));
        if (!a->job || pthread_create(&a->writer, NULL, writer_main, a) != 0) {
            cm_seterr(err, errlen, "cannot start the checkpoint writer");
            ar_destroy(&a->base);
            return CM_ENOMEM;
        }
        a->writer_started = 1;
    }
    if (!cfg->is_chief) a->cfg.checkpoint_dir = NULL;
    /* NCCL's communicator has a fixed size, and the tables are not copied
     * to a replacement: those runs fail on a lost rank, as before. */
    a->elastic = cfg->nworkers > 1 && !a->use_nccl;
    if (a->cfg.min_workers < cfg->nworkers && !a->elastic)
        cm_warn("allreduce: --min-workers has no effect with NCCL: a lost worker ends the run");
    *out = &a->base;
    return CM_OK;
}
