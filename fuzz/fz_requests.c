/* fz_requests.c - see fz_requests.h.
 * SPDX-License-Identifier: MIT
 */
#include "fuzz/fz_requests.h"

#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "proto/ps.pb-c.h"
#include "ps/ps_wire.h"

static char desc[256];

static Psrpc__Cluster cluster(const cm_model *m, const cm_placement *pl, uint32_t rank,
                              uint64_t epoch) {
    Psrpc__Cluster c = PSRPC__CLUSTER__INIT;
    c.fingerprint = ps_wire_identity(m, pl, desc, sizeof desc);
    c.description = desc;
    c.rank = rank;
    c.epoch = epoch;
    return c;
}

static void put_packed(fz_buf *out, const ProtobufCMessage *msg) {
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *b = cm_malloc(n ? n : 1);
    protobuf_c_message_pack(msg, b);
    fz_buf_put(out, b, n);
    free(b);
}

static void put_writer(fz_buf *out, ps_wire_writer *w) {
    int n;
    const rpc_seg *segs = ps_wire_segs(w, &n);
    for (int i = 0; i < n; i++) fz_buf_put(out, segs[i].data, segs[i].len);
    ps_wire_writer_free(w, 1);
}

uint64_t fz_row_id(int t, int k, int nshards, int shard) {
    for (uint64_t id = 1;; id++)
        if (cm_row_shard(t, id, nshards) == shard && k-- == 0) return id;
}

static float *values(size_t n, float scale) {
    float *v = cm_malloc((n ? n : 1) * sizeof *v);
    for (size_t i = 0; i < n; i++) v[i] = scale * (float)((int)(i % 7) - 3);
    return v;
}

void fz_req_init(fz_buf *out, const cm_model *m, const cm_placement *pl, int shard,
                 uint32_t rank, const fz_init *o) {
    Psrpc__InitRequest r = PSRPC__INIT_REQUEST__INIT;
    Psrpc__Cluster c = cluster(m, pl, rank, 0);
    Psrpc__OptimizerConfig opt = PSRPC__OPTIMIZER_CONFIG__INIT, topt = PSRPC__OPTIMIZER_CONFIG__INIT;
    opt.kind = (char *)o->optim;
    opt.lr = 0.1f;
    opt.momentum = 0.9f;
    opt.beta1 = 0.9f;
    opt.beta2 = 0.999f;
    opt.epsilon = 1e-7f;
    opt.initial_accumulator = 0.1f;
    topt = opt;
    topt.kind = (char *)(o->table_optim ? o->table_optim : "adagrad");
    r.cluster = &c;
    r.optimizer = &opt;
    if (m->ntables) r.table_optimizer = &topt;
    r.seed = 42;
    r.num_workers = o->workers;
    r.sync = o->async ? PSRPC__SYNC_MODE__SYNC_ASYNC : PSRPC__SYNC_MODE__SYNC_SYNC;
    r.zero_init = o->zero_init;
    r.global_batch = 32;
    r.steps_per_epoch = 10;
    ps_wire_spec sp;
    if (o->with_spec) {
        ps_wire_spec_init(&sp, m, pl->min_part_bytes);
        r.model = &sp.spec;
    }
    Psrpc__Tensor ts[64], *tp[64];
    uint64_t shapes[64][CM_VAR_MAX_DIMS];
    float *vals[64];
    size_t nt = 0;
    if (o->with_values)
        for (int p = 0; p < pl->nparts && nt < 64; p++) {
            if (pl->parts[p].shard != shard) continue;
            ps_wire_part_meta(m, pl, (uint32_t)p, shapes[nt], &ts[nt]);
            vals[nt] = values(pl->parts[p].count, 0.25f);
            ts[nt].data.data = (uint8_t *)vals[nt];
            ts[nt].data.len = pl->parts[p].count * sizeof(float);
            tp[nt] = &ts[nt];
            nt++;
        }
    r.n_values = nt;
    r.values = tp;
    put_packed(out, &r.base);
    for (size_t i = 0; i < nt; i++) free(vals[i]);
    if (o->with_spec) ps_wire_spec_free(&sp);
}

/* The first k ids of every table on 'shard', as Rows of field 'field'. */
static void put_ids(ps_wire_writer *w, uint32_t field, const cm_model *m, const cm_placement *pl,
                    int shard, int k, uint64_t *ids) {
    for (int t = 0; t < m->ntables; t++) {
        for (int i = 0; i < k; i++) ids[(size_t)t * 64 + (size_t)i] = fz_row_id(t, i, pl->nshards, shard);
        ps_wire_put_rows(w, field, (uint32_t)t, ids + (size_t)t * 64, (size_t)k,
                         PSRPC__DTYPE__DTYPE_FLOAT32, NULL, 0, NULL, NULL);
    }
}

void fz_req_push(fz_buf *out, const cm_model *m, const cm_placement *pl, int shard,
                 const fz_push *o) {
    ps_wire_writer w;
    ps_wire_writer_init(&w);
    Psrpc__PushRequest r = PSRPC__PUSH_REQUEST__INIT;
    Psrpc__Cluster c = cluster(m, pl, o->rank, o->epoch);
    r.cluster = &c;
    r.step = o->step;
    r.rows_final = o->rows_final;
    r.train = o->train;
    r.step_parts = o->step_parts;
    ps_wire_put_message(&w, &r.base);
    int k = o->want > 64 ? 64 : o->want, kr = o->rows > 64 ? 64 : o->rows;
    uint64_t *want = cm_calloc((size_t)(m->ntables ? m->ntables : 1) * 64, sizeof *want);
    uint64_t *rid = cm_calloc((size_t)(m->ntables ? m->ntables : 1) * 64, sizeof *rid);
    if (k) put_ids(&w, 6, m, pl, shard, k, want);
    float *g = values(m->numel + 64 * 64, 0.01f);
    uint16_t *h = cm_malloc((m->numel + 64 * 64) * sizeof *h);
    ps_wire_bf16_from_f32(h, g, m->numel + 64 * 64);
    int local = -1;
    if (!o->skip_parts)
        for (int p = 0; p < pl->nparts; p++) {
            if (pl->parts[p].shard != shard) continue;
            local++;
            if (local < o->part_from || (o->part_to > 0 && local >= o->part_to)) continue;
            if (o->bf16)
                ps_wire_put_part_bf16(&w, 3, m, pl, (uint32_t)p, h + pl->parts[p].offset, NULL,
                                      NULL);
            else
                ps_wire_put_part(&w, 3, m, pl, (uint32_t)p, g + pl->parts[p].offset, NULL, NULL);
        }
    for (int t = 0; kr && t < m->ntables; t++) {
        int dim = m->vars[m->table_var[t]].dim;
        for (int i = 0; i < kr; i++) rid[(size_t)t * 64 + (size_t)i] = fz_row_id(t, i, pl->nshards, shard);
        ps_wire_put_rows(&w, 4, (uint32_t)t, rid + (size_t)t * 64, (size_t)kr,
                         o->bf16 ? PSRPC__DTYPE__DTYPE_BFLOAT16 : PSRPC__DTYPE__DTYPE_FLOAT32,
                         o->bf16 ? (const void *)h : (const void *)g,
                         (size_t)kr * (size_t)dim * (o->bf16 ? 2 : 4), NULL, NULL);
    }
    put_writer(out, &w);
    free(g);
    free(h);
    free(want);
    free(rid);
}

void fz_req_pull(fz_buf *out, const cm_model *m, const cm_placement *pl, int shard,
                 const fz_pull *o) {
    ps_wire_writer w;
    ps_wire_writer_init(&w);
    Psrpc__PullRequest r = PSRPC__PULL_REQUEST__INIT;
    Psrpc__Cluster c = cluster(m, pl, o->rank, o->epoch);
    r.cluster = &c;
    r.min_version = o->min_version;
    r.train = o->train;
    r.rows_only = o->rows_only;
    r.dump = o->dump;
    r.dump_table = o->dump_table;
    r.dump_from = o->dump_from;
    r.dump_max = o->dump_max;
    ps_wire_put_message(&w, &r.base);
    int k = o->want > 64 ? 64 : o->want;
    uint64_t *want = cm_calloc((size_t)(m->ntables ? m->ntables : 1) * 64, sizeof *want);
    if (k) put_ids(&w, 3, m, pl, shard, k, want);
    put_writer(out, &w);
    free(want);
}

void fz_req_small(fz_buf *out, int method, const cm_model *m, const cm_placement *pl,
                  uint32_t rank, int64_t a, uint64_t b) {
    Psrpc__Cluster c = cluster(m, pl, rank, 0);
    switch (method) {
    case FZ_STATS: {
        Psrpc__StatsRequest r = PSRPC__STATS_REQUEST__INIT;
        r.cluster = &c;
        put_packed(out, &r.base);
        break;
    }
    case FZ_CHECKPOINTS: {
        Psrpc__CheckpointsRequest r = PSRPC__CHECKPOINTS_REQUEST__INIT;
        r.cluster = &c;
        r.keep_from = a;
        put_packed(out, &r.base);
        break;
    }
    case FZ_ROLLBACK: {
        Psrpc__RollbackRequest r = PSRPC__ROLLBACK_REQUEST__INIT;
        r.cluster = &c;
        r.version = a;
        r.epoch = b;
        put_packed(out, &r.base);
        break;
    }
    case FZ_SHUTDOWN: {
        Psrpc__ShutdownRequest r = PSRPC__SHUTDOWN_REQUEST__INIT;
        r.cluster = &c;
        r.reason = (char *)"the run is over";
        put_packed(out, &r.base);
        break;
    }
    default: abort();
    }
}
