/* gen_seeds.c - writes the seed corpora of the fuzz targets:
 *   gen_seeds DIR   ->  DIR/<target>/<name>, one file per seed.
 * SPDX-License-Identifier: MIT
 *
 * The seeds are real inputs: PS requests built as ps_client builds them
 * (fz_requests.c) for the fuzz targets' models and fingerprints, ring
 * streams framed as a neighbour rank frames them, valid IDX files, Criteo
 * lines, TF_CONFIG documents. fuzz/corpus/ holds what this wrote (plus the
 * regression inputs of bugs the fuzzers found); run it again after a
 * change of the formats: scripts/fuzz.sh --seeds.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <xxhash.h>
#include <zlib.h>

#include "fuzz/fz_requests.h"
#include "fuzz/fz_util.h"
#include "proto/ps.pb-c.h"
#include "ps/ps_wire.h"
#include "worker/sync/wk_ring_int.h"

static const char *outdir;

static void seed(const char *target, const char *name, const void *data, size_t len) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", outdir, target);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/%s", outdir, target, name);
    fz_write_file(path, data, len);
}

static void seed_buf(const char *target, const char *name, fz_buf *b) {
    seed(target, name, b->p, b->len);
    b->len = 0;
}

/* ------------------------------------------------------------ PS */

typedef struct ps_seq {
    fz_buf out, msg;
    fz_ps_config c;
    const cm_model *m;
    const cm_placement *pl;
} ps_seq;

static void seq_start(ps_seq *q, int model, int nshards, int shard, int learn) {
    q->out.len = q->msg.len = 0;
    q->c = (fz_ps_config){.model = learn ? FZ_MODEL_NONE : model, .nshards = nshards,
                          .shard = shard};
    q->m = fz_model(model);
    q->pl = fz_placement(model, nshards);
    uint8_t b = fz_ps_config_encode(q->c);
    fz_buf_put(&q->out, &b, 1);
}

static void rec(ps_seq *q, int method) {
    fz_buf_record(&q->out, method, q->msg.p, q->msg.len);
    q->msg.len = 0;
}

static void init(ps_seq *q, const fz_init *o) {
    fz_req_init(&q->msg, q->m, q->pl, q->c.shard, 0, o);
    rec(q, FZ_INIT);
}

static void push(ps_seq *q, int method, const fz_push *o) {
    fz_req_push(&q->msg, q->m, q->pl, q->c.shard, o);
    rec(q, method);
}

static void pull(ps_seq *q, const fz_pull *o) {
    fz_req_pull(&q->msg, q->m, q->pl, q->c.shard, o);
    rec(q, FZ_PULL);
}

static void small(ps_seq *q, int method, int64_t a, uint64_t b) {
    fz_req_small(&q->msg, method, q->m, q->pl, 0, a, b);
    rec(q, method);
}

/* The handler seeds serve both PS targets (fuzz_ps_durable: the same
 * harness with a data directory). */
static void ps_seed(const char *name, fz_buf *b) {
    seed("fuzz_ps_durable", name, b->p, b->len);
    seed_buf("fuzz_ps_server", name, b);
}

static void ps_seeds(void) {
    ps_seq q = {0};
    /* MLP, one shard, sync: the whole cycle. */
    seq_start(&q, FZ_MODEL_MLP, 1, 0, 0);
    init(&q, &(fz_init){.optim = "sgd", .workers = 1});
    push(&q, FZ_PUSH, &(fz_push){.step = 0});
    pull(&q, &(fz_pull){.min_version = 1});
    push(&q, FZ_PUSHPULL, &(fz_push){.step = 1});
    small(&q, FZ_STATS, 0, 0);
    small(&q, FZ_CHECKPOINTS, -1, 0);
    small(&q, FZ_SHUTDOWN, 0, 0);
    ps_seed("mlp_sync_cycle", &q.out);
    /* MLP on 2 shards (shard 1), async Adam, 2 workers, bf16, a pull that waits. */
    seq_start(&q, FZ_MODEL_MLP, 2, 1, 0);
    init(&q, &(fz_init){.optim = "adam", .async = 1, .workers = 2});
    push(&q, FZ_PUSH, &(fz_push){.rank = 1, .step = 0, .bf16 = 1});
    pull(&q, &(fz_pull){.min_version = 5});
    push(&q, FZ_PUSHPULL, &(fz_push){.rank = 0, .step = 0});
    push(&q, FZ_PUSH, &(fz_push){.rank = 1, .step = 1});
    small(&q, FZ_STATS, 0, 0);
    ps_seed("mlp_async_adam_bf16", &q.out);
    /* MLP async, a step in two calls (step_parts): the first partition,
     * a retry of it, the rest as a PushPull (the version comes), then a
     * step whose calls bring more than they said. */
    seq_start(&q, FZ_MODEL_MLP, 1, 0, 0);
    init(&q, &(fz_init){.optim = "sgd", .async = 1, .workers = 1});
    uint32_t np = (uint32_t)q.pl->shard_nparts[0];
    push(&q, FZ_PUSH, &(fz_push){.step = 0, .part_to = 1, .step_parts = np});
    push(&q, FZ_PUSH, &(fz_push){.step = 0, .part_to = 1, .step_parts = np});
    push(&q, FZ_PUSHPULL, &(fz_push){.step = 0, .part_from = 1, .step_parts = np});
    pull(&q, &(fz_pull){.min_version = 1});
    push(&q, FZ_PUSH, &(fz_push){.step = 1, .part_to = 1, .step_parts = 1});
    push(&q, FZ_PUSH, &(fz_push){.step = 1, .part_from = 1, .step_parts = 1});
    small(&q, FZ_STATS, 0, 0);
    ps_seed("mlp_async_step_parts", &q.out);
    /* MLP sync with 3 workers (staged sums), momentum. */
    seq_start(&q, FZ_MODEL_MLP, 1, 0, 0);
    init(&q, &(fz_init){.optim = "momentum", .workers = 3});
    for (uint32_t r = 0; r < 3; r++) push(&q, FZ_PUSH, &(fz_push){.rank = r, .step = 0});
    push(&q, FZ_PUSH, &(fz_push){.rank = 2, .step = 0}); /* duplicate */
    pull(&q, &(fz_pull){.min_version = 1});
    ps_seed("mlp_sync_3workers", &q.out);
    /* DeepFM on 2 shards (shard 0): rows, wants, dumps. */
    seq_start(&q, FZ_MODEL_DEEPFM, 2, 0, 0);
    init(&q, &(fz_init){.optim = "sgd", .table_optim = "adagrad", .workers = 1});
    push(&q, FZ_PUSHPULL,
         &(fz_push){.step = 0, .rows = 3, .rows_final = 1, .want = 2, .train = 1});
    pull(&q, &(fz_pull){.min_version = 1, .want = 2, .train = 1});
    pull(&q, &(fz_pull){.min_version = 1, .want = 3, .rows_only = 1});
    pull(&q, &(fz_pull){.dump = 1, .dump_table = 1, .dump_max = 2});
    push(&q, FZ_PUSH, &(fz_push){.step = 1, .rows = 2, .rows_final = 1, .bf16 = 1});
    small(&q, FZ_STATS, 0, 0);
    ps_seed("deepfm_rows", &q.out);
    /* Logistic regression, async, Adam rows. */
    seq_start(&q, FZ_MODEL_LR, 1, 0, 0);
    init(&q, &(fz_init){.optim = "adam", .table_optim = "adam", .async = 1, .workers = 2});
    push(&q, FZ_PUSHPULL, &(fz_push){.rank = 1, .step = 0, .rows = 4, .rows_final = 1, .want = 4});
    pull(&q, &(fz_pull){.dump = 1, .dump_table = 0});
    ps_seed("lr_async", &q.out);
    /* No model: learnt from the Initialize (MLP on 2 shards, DeepFM on 1). */
    seq_start(&q, FZ_MODEL_MLP, 2, 0, 1);
    init(&q, &(fz_init){.optim = "sgd", .workers = 1, .with_spec = 1});
    push(&q, FZ_PUSH, &(fz_push){.step = 0});
    pull(&q, &(fz_pull){.min_version = 1});
    small(&q, FZ_CHECKPOINTS, 0, 0);
    ps_seed("learn_mlp", &q.out);
    seq_start(&q, FZ_MODEL_DEEPFM, 1, 0, 1);
    small(&q, FZ_CHECKPOINTS, 0, 0); /* before the model */
    push(&q, FZ_PUSH, &(fz_push){.step = 0});
    init(&q, &(fz_init){.optim = "adagrad", .table_optim = "sgd", .workers = 1, .with_spec = 1});
    push(&q, FZ_PUSHPULL, &(fz_push){.step = 0, .rows = 2, .rows_final = 1, .want = 1});
    ps_seed("learn_deepfm", &q.out);
    /* Rollback and epochs. */
    seq_start(&q, FZ_MODEL_MLP, 1, 0, 0);
    init(&q, &(fz_init){.optim = "sgd", .workers = 1});
    push(&q, FZ_PUSH, &(fz_push){.step = 0});
    small(&q, FZ_ROLLBACK, 0, 2);
    small(&q, FZ_CHECKPOINTS, 0, 0);
    push(&q, FZ_PUSH, &(fz_push){.epoch = 2, .step = 0});
    push(&q, FZ_PUSH, &(fz_push){.epoch = 1, .step = 1});
    small(&q, FZ_ROLLBACK, 1, 3);
    ps_seed("rollback", &q.out);
    /* Initial values (--init-from), then a rollback to them. */
    seq_start(&q, FZ_MODEL_MLP, 2, 0, 0);
    init(&q, &(fz_init){.optim = "sgd", .workers = 1, .with_values = 1});
    pull(&q, &(fz_pull){.min_version = 0});
    small(&q, FZ_ROLLBACK, 0, 2);
    ps_seed("init_values", &q.out);
    /* Requests before any Initialize, an unknown method, an empty one. */
    seq_start(&q, FZ_MODEL_DEEPFM, 1, 0, 0);
    push(&q, FZ_PUSH, &(fz_push){.step = 0, .rows = 1});
    pull(&q, &(fz_pull){.want = 1});
    small(&q, FZ_ROLLBACK, 0, 1);
    rec(&q, FZ_UNKNOWN);
    rec(&q, FZ_STATS);
    ps_seed("uninitialised", &q.out);
    /* The gRPC health check: the service asked about, or none. */
    seq_start(&q, FZ_MODEL_MLP, 1, 0, 0);
    rec(&q, FZ_HEALTH);
    fz_buf_put(&q.msg, "\x0a\x08psrpc.Ps", 10); /* service = "psrpc.Ps" */
    rec(&q, FZ_HEALTH);
    fz_buf_put(&q.msg, "\x0a\x03" "foo", 5);
    rec(&q, FZ_HEALTH);
    ps_seed("health", &q.out);
    /* Parked pulls whose clients go away (on_cancel), and the admin's
     * requests with the workers' token (refused). */
    seq_start(&q, FZ_MODEL_MLP, 1, 0, 0);
    init(&q, &(fz_init){.optim = "sgd", .workers = 1});
    pull(&q, &(fz_pull){.min_version = 3});
    pull(&q, &(fz_pull){.min_version = 5});
    fz_buf_put(&q.msg, "\x01", 1); /* cancels call 1 % 3: the first pull */
    rec(&q, 0x40);
    fz_req_small(&q.msg, FZ_CHECKPOINTS, q.m, q.pl, 0, -1, 0);
    rec(&q, 0x80 | FZ_CHECKPOINTS);
    fz_req_small(&q.msg, FZ_SHUTDOWN, q.m, q.pl, 0, 0, 0);
    rec(&q, 0x80 | FZ_SHUTDOWN);
    push(&q, FZ_PUSH, &(fz_push){.step = 0});
    ps_seed("cancel_and_worker_token", &q.out);
    /* With checkpoints (fuzz_ps_durable): a rollback that loads one, and a
     * DeepFM shard's rows restored, then old generations collected. */
    seq_start(&q, FZ_MODEL_MLP, 1, 0, 0);
    init(&q, &(fz_init){.optim = "adam", .workers = 1});
    push(&q, FZ_PUSH, &(fz_push){.step = 0});
    push(&q, FZ_PUSH, &(fz_push){.step = 1});
    small(&q, FZ_CHECKPOINTS, -1, 0);
    small(&q, FZ_ROLLBACK, 1, 2);
    push(&q, FZ_PUSH, &(fz_push){.epoch = 2, .step = 1});
    small(&q, FZ_CHECKPOINTS, 2, 0);
    seed_buf("fuzz_ps_durable", "rollback_load", &q.out);
    seq_start(&q, FZ_MODEL_DEEPFM, 1, 0, 0);
    init(&q, &(fz_init){.optim = "sgd", .table_optim = "adam", .async = 1, .workers = 1});
    push(&q, FZ_PUSHPULL, &(fz_push){.step = 0, .rows = 3, .rows_final = 1, .want = 2, .train = 1});
    push(&q, FZ_PUSHPULL, &(fz_push){.step = 1, .rows = 2, .rows_final = 1, .want = 3, .train = 1});
    small(&q, FZ_ROLLBACK, 1, 2);
    pull(&q, &(fz_pull){.dump = 1, .dump_table = 2});
    small(&q, FZ_CHECKPOINTS, 1, 0);
    seed_buf("fuzz_ps_durable", "rollback_rows", &q.out);
    free(q.out.p);
    free(q.msg.p);
}

/* ------------------------------------------------------------ wire */

static void wire_seeds(void) {
    const char *T = "fuzz_wire";
    fz_buf b = {0};
    uint8_t mode;
    const cm_model *m = fz_model(FZ_MODEL_DEEPFM), *mlp = fz_model(FZ_MODEL_MLP);
    mode = 0;
    fz_buf_put(&b, &mode, 1);
    fz_req_push(&b, m, fz_placement(FZ_MODEL_DEEPFM, 2), 1,
                &(fz_push){.step = 3, .rows = 3, .rows_final = 1, .want = 2});
    seed_buf(T, "push_deepfm", &b);
    fz_buf_put(&b, &mode, 1);
    fz_req_push(&b, mlp, fz_placement(FZ_MODEL_MLP, 1), 0, &(fz_push){.step = 1, .bf16 = 1});
    seed_buf(T, "push_mlp_bf16", &b);
    /* A pull reply as answer_pull writes it: the version (0: an empty
     * message), the partitions, rows. */
    for (int v = 0; v < 2; v++) {
        mode = 1;
        fz_buf_put(&b, &mode, 1);
        const cm_placement *pl = fz_placement(FZ_MODEL_DEEPFM, 1);
        ps_wire_writer w;
        ps_wire_writer_init(&w);
        Psrpc__PullReply rep = PSRPC__PULL_REPLY__INIT;
        rep.version = v;
        ps_wire_put_message(&w, &rep.base);
        float vals[64];
        for (int i = 0; i < 64; i++) vals[i] = (float)i;
        for (int p = 0; p < pl->nparts; p++)
            ps_wire_put_part(&w, 2, m, pl, (uint32_t)p, vals, NULL, NULL);
        uint64_t ids[2] = {5, 9};
        ps_wire_put_rows(&w, 3, 0, ids, 2, PSRPC__DTYPE__DTYPE_FLOAT32, vals, 24, NULL, NULL);
        int n;
        const rpc_seg *segs = ps_wire_segs(&w, &n);
        for (int i = 0; i < n; i++) fz_buf_put(&b, segs[i].data, segs[i].len);
        ps_wire_writer_free(&w, 0);
        seed_buf(T, v ? "pull_reply" : "pull_reply_version0", &b);
    }
    for (int k = 1; k < 4; k++) {
        mode = (uint8_t)(2 + 3 * (k - 1));
        fz_buf_put(&b, &mode, 1);
        ps_wire_spec sp;
        ps_wire_spec_init(&sp, fz_model(k), FZ_MIN_PART);
        size_t n = protobuf_c_message_get_packed_size(&sp.spec.base);
        uint8_t *p = malloc(n);
        protobuf_c_message_pack(&sp.spec.base, p);
        fz_buf_put(&b, p, n);
        free(p);
        ps_wire_spec_free(&sp);
        char name[64];
        snprintf(name, sizeof name, "spec_%s", fz_model(k)->kind);
        seed_buf(T, name, &b);
    }
    free(b.p);
}

/* ------------------------------------------------------------ store */

#define ST_HASH_SEED 0x73745f73746f7265ULL /* st_store.c's */

static void be32(fz_buf *b, uint32_t v) {
    uint8_t x[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    fz_buf_put(b, x, 4);
}
static void be64(fz_buf *b, uint64_t v) {
    be32(b, (uint32_t)(v >> 32));
    be32(b, (uint32_t)v);
}

static void store_seeds(void) {
    const char *T = "fuzz_store";
    fz_buf b = {0}, r = {0};
    seed(T, "empty", "", 0);
    /* A hand-made generation 1: one 10-byte blob in chunks of 4. */
    const uint8_t blob[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    uint8_t v = 1;
    fz_buf_put(&r, &v, 1);
    be32(&r, 4);  /* chunk */
    be32(&r, 1);  /* nblobs */
    be32(&r, 3);  /* extra_len */
    be32(&r, 0);  /* part */
    be32(&r, 0);  /* kind */
    be64(&r, 10); /* len */
    be64(&r, XXH64(blob, 10, ST_HASH_SEED));
    fz_buf_put(&r, "xyz", 3);
    fz_buf_record(&b, 0, r.p, r.len);
    for (uint8_t c = 0; c < 3; c++) {
        uint8_t ch[4 + 4] = {1, 0, 0, c};
        size_t n = c < 2 ? 4 : 2;
        memcpy(ch + 4, blob + 4 * c, n);
        fz_buf_record(&b, 2, ch, 4 + n);
    }
    seed_buf(T, "handmade_generation", &b);
    /* The PS restores from the set-up's store, with and without the model. */
    uint8_t zero = 0, one = 1;
    fz_buf_record(&b, 9, &zero, 1);
    seed_buf(T, "ps_restore", &b);
    fz_buf_record(&b, 9, &one, 1);
    seed_buf(T, "ps_restore_learn", &b);
    /* Another model record (an MLP's spec), then the PS restores. */
    ps_wire_spec sp;
    ps_wire_spec_init(&sp, fz_model(FZ_MODEL_MLP), FZ_MIN_PART);
    size_t n = protobuf_c_message_get_packed_size(&sp.spec.base);
    uint8_t *p = malloc(n);
    protobuf_c_message_pack(&sp.spec.base, p);
    fz_buf_record(&b, 3, p, n);
    fz_buf_record(&b, 9, &one, 1);
    seed_buf(T, "other_model_record", &b);
    free(p);
    ps_wire_spec_free(&sp);
    /* Drops, a damaged commit record, a deleted chunk, an identity. */
    uint8_t one_v = 1, two_v = 2;
    fz_buf_record(&b, 6, &two_v, 1);
    fz_buf_record(&b, 7, &one_v, 1);
    seed_buf(T, "drops", &b);
    uint8_t junk[8] = {2, 0x50, 0x53, 0x43, 0x31, 0, 0, 0};
    fz_buf_record(&b, 1, junk, sizeof junk);
    uint8_t key[21] = {'g', 0, 0, 0, 0, 0, 0, 0, 1};
    fz_buf_record(&b, 5, key, sizeof key);
    fz_buf_record(&b, 8, "PSI1", 4);
    seed_buf(T, "damage", &b);
    /* Regression (cm_alloc_aligned's rounding wrapped): generation 9 whose
     * one blob claims 2^64 - 63 bytes in chunks of 128, and its chunk 0 of
     * 128 bytes, which went into a 64-byte buffer. */
    r.len = 0;
    v = 9;
    fz_buf_put(&r, &v, 1);
    be32(&r, 128);
    be32(&r, 1);
    be32(&r, 0);
    be32(&r, 0);
    be32(&r, 0);
    be64(&r, 0xffffffffffffffc1ULL);
    be64(&r, 0);
    fz_buf_record(&b, 0, r.p, r.len);
    uint8_t big[4 + 128] = {9, 0, 0, 0};
    memset(big + 4, 0xab, 128);
    fz_buf_record(&b, 2, big, sizeof big);
    seed_buf(T, "regress_alloc_wrap", &b);
    /* Regression (blobs out of order in a commit record whose hash holds):
     * generation 9 lists part 1 before part 0, and then part 0 again;
     * st_store_load handed them over as listed, so a PS restoring it could
     * count a duplicate for a missing partition. */
    r.len = 0;
    fz_buf_put(&r, &v, 1);
    be32(&r, 4);
    be32(&r, 3);
    be32(&r, 0);
    const uint32_t order[3] = {1, 0, 0};
    for (int i = 0; i < 3; i++) {
        be32(&r, order[i]);
        be32(&r, 0);
        be64(&r, 0);
        be64(&r, XXH64("", 0, ST_HASH_SEED));
    }
    fz_buf_record(&b, 0, r.p, r.len);
    for (uint8_t part = 0; part < 2; part++) {
        uint8_t ch[4] = {9, part, 0, 0};
        fz_buf_record(&b, 2, ch, sizeof ch);
    }
    seed_buf(T, "regress_blob_order", &b);
    free(b.p);
    free(r.p);
}

/* ------------------------------------------------------------ rendezvous */

static void rdv_seeds(void) {
    const char *T = "fuzz_rendezvous";
    fz_buf b = {0};
    uint8_t n = 2; /* 3 ranks */
    fz_buf_put(&b, &n, 1);
    for (uint32_t r = 0; r < 4; r++) {
        Psrpc__JoinRequest j = PSRPC__JOIN_REQUEST__INIT;
        j.fingerprint = 0x72656e64657a766fULL;
        j.description = (char *)"fuzz job";
        j.rank = r == 3 ? 1 : r;
        j.nranks = 3;
        char addr[32];
        snprintf(addr, sizeof addr, "127.0.0.1:%u", 5000 + r);
        j.ring_addr = addr;
        uint8_t buf[256];
        size_t len = psrpc__join_request__pack(&j, buf);
        fz_buf_record(&b, 0, buf, len);
        if (r == 1) fz_buf_record(&b, 1, NULL, 0);
    }
    seed_buf(T, "three_ranks", &b);
    free(b.p);
}

/* ------------------------------------------------------------ ring */

static void segment(size_t n, int nranks, int s, size_t *off, size_t *len) {
    size_t base = n / (size_t)nranks, rem = n % (size_t)nranks, us = (size_t)s;
    *off = us * base + (us < rem ? us : rem);
    *len = base + (us < rem ? 1 : 0);
}

static void ring_chunks(fz_buf *b, int op, int k, size_t off, size_t len, size_t chunk,
                        int64_t step, size_t n, uint32_t arg) {
    for (size_t pos = 0; pos < len; pos += chunk) {
        size_t c = len - pos < chunk ? len - pos : chunk;
        wk_ring__hdr h = {WK_RING__CHUNK_MAGIC, (uint16_t)op, (uint16_t)k, step, n, off + pos,
                          (uint32_t)(c * 4), arg};
        unsigned char hb[WK_RING__HDR_BYTES];
        wk_ring__hdr_pack(&h, hb);
        fz_buf_put(b, hb, sizeof hb);
        for (size_t i = 0; i < c; i++) {
            float f = (float)(off + pos + i);
            fz_buf_put(b, &f, 4);
        }
    }
}

static void ring_header(fz_buf *b, int mode, int nranks, int rank, size_t chunk, size_t n,
                        int64_t step, int arg) {
    uint8_t h[15] = {(uint8_t)mode, (uint8_t)(nranks - 2), (uint8_t)rank, (uint8_t)(chunk - 1),
                     (uint8_t)n, (uint8_t)(n >> 8)};
    memcpy(h + 6, &step, 8);
    h[14] = (uint8_t)arg;
    fz_buf_put(b, h, sizeof h);
}

/* Halving-doubling: what rank r's partner r ^ d sends it in step k,
 * segments [a, z) of n, onto that partner's link part (as partner_link:
 * d = 1 the next (0) or previous (1) rank, else extra link 2 + log2(d) - 1). */
static void hd_recv(fz_buf *part, int r, int d, int k, int a, int z, int N, size_t chunk,
                    size_t n, int avg) {
    size_t off, len, end, last;
    segment(n, N, a, &off, &len);
    segment(n, N, z - 1, &end, &last);
    int l = d == 1 ? (r & 1 ? 1 : 0) : 2 + __builtin_ctz((unsigned)d) - 1;
    ring_chunks(&part[l], WK_RING__OP_ALLREDUCE, k, off, end + last - off, chunk, 12, n,
                (uint32_t)avg);
}

static void ring_seeds(void) {
    const char *T = "fuzz_ring";
    fz_buf b = {0};
    /* The handshake: the previous rank's hello, the next rank's answer. */
    ring_header(&b, 0, 3, 1, 4, 0, 0, 0);
    for (uint32_t r = 0; r < 3; r += 2) {
        wk_ring__hello h = {WK_RING__HELLO_MAGIC, WK_RING__VERSION, 0x66757a7a72696e67ULL, 3, r};
        unsigned char hb[WK_RING__HELLO_BYTES];
        wk_ring__hello_pack(&h, hb);
        fz_buf_put(&b, hb, sizeof hb);
    }
    seed_buf(T, "handshake", &b);
    /* Allreduce as rank r of N receives it from rank r-1. */
    static const struct { int N, r; size_t chunk, n; int avg; } ar[] = {
        {2, 0, 4, 10, 1}, {3, 1, 2, 7, 0}, {4, 3, 16, 50, 1}, {5, 2, 1, 3, 0}};
    for (size_t i = 0; i < sizeof ar / sizeof ar[0]; i++) {
        int N = ar[i].N, r = ar[i].r;
        ring_header(&b, 1, N, r, ar[i].chunk, ar[i].n, 12, ar[i].avg);
        for (int k = 0; k < 2 * (N - 1); k++) {
            size_t off, len;
            segment(ar[i].n, N, ((r - 1 - k) % N + N) % N, &off, &len);
            ring_chunks(&b, WK_RING__OP_ALLREDUCE, k, off, len, ar[i].chunk, 12, ar[i].n,
                        (uint32_t)ar[i].avg);
        }
        char name[64];
        snprintf(name, sizeof name, "allreduce_%d_of_%d", r, N);
        seed_buf(T, name, &b);
    }
    /* The same allreduce received through shared-memory slots (8 of them). */
    ring_header(&b, 4, 3, 1, 2, 7, 12, 0);
    for (int k = 0; k < 4; k++) {
        size_t off, len;
        segment(7, 3, ((1 - 1 - k) % 3 + 3) % 3, &off, &len);
        ring_chunks(&b, WK_RING__OP_ALLREDUCE, k, off, len, 2, 12, 7, 0);
    }
    seed_buf(T, "allreduce_shm_1_of_3", &b);
    /* The transport negotiation: an offer from another host, an answer. */
    ring_header(&b, 3, 3, 1, 4, 0, 0, 0);
    {
        wk_ring__offer of = {.magic = WK_RING__OFFER_MAGIC, .want = 1, .host = 0x1234,
                             .cookie = 99, .slot_bytes = 128, .nslots = 8,
                             .name = "/pstrain-ring-1-00000000"};
        unsigned char o[WK_RING__OFFER_BYTES], a[WK_RING__ANSWER_BYTES];
        uint32_t am = WK_RING__ANSWER_MAGIC, use = 1;
        wk_ring__offer_pack(&of, o);
        memcpy(a, &am, 4);
        memcpy(a + 4, &use, 4);
        fz_buf_put(&b, o, sizeof o);
        fz_buf_put(&b, a, sizeof a);
    }
    seed_buf(T, "negotiate", &b);
    /* Broadcast from root 0 as rank 1 of 3 receives it. */
    ring_header(&b, 2, 3, 1, 8, 20, 5, 0);
    ring_chunks(&b, WK_RING__OP_BROADCAST, 0, 0, 20, 8, 5, 20, 0);
    seed_buf(T, "broadcast", &b);
    /* Halving-doubling as rank r of N: what each partner sends, on its link
     * (as plan_hd in wk_ring.c), each link's part after the u16 lengths. */
    static const struct { int N, r; size_t chunk, n; int avg; } hd[] = {
        {4, 1, 3, 22, 1}, {8, 6, 2, 19, 0}};
    for (size_t i = 0; i < sizeof hd / sizeof hd[0]; i++) {
        int N = hd[i].N, r = hd[i].r, lo = 0, hi = N, k = 0, nl = N == 8 ? 4 : 3;
        fz_buf part[4] = {{0}};
        for (int d = N / 2; d >= 1; d /= 2, k++) {
            int mid = (lo + hi) / 2, low = (r & d) == 0;
            if (low)
                hi = mid;
            else
                lo = mid;
            hd_recv(part, r, d, k, lo, hi, N, hd[i].chunk, hd[i].n, hd[i].avg);
        }
        for (int d = 1; d < N; d *= 2, k++) {
            int w = hi - lo, low = (r & d) == 0, a, z;
            if (low) {
                hi += w;
                a = hi - w;
                z = hi;
            } else {
                lo -= w;
                a = lo;
                z = lo + w;
            }
            hd_recv(part, r, d, k, a, z, N, hd[i].chunk, hd[i].n, hd[i].avg);
        }
        ring_header(&b, 5, N == 8 ? 3 : 2, r, hd[i].chunk, hd[i].n, 12, hd[i].avg);
        for (int l = 0; l < nl; l++) {
            uint8_t len[2] = {(uint8_t)part[l].len, (uint8_t)(part[l].len >> 8)};
            fz_buf_put(&b, len, 2);
        }
        for (int l = 0; l < nl; l++) {
            fz_buf_put(&b, part[l].p, part[l].len);
            free(part[l].p);
        }
        char name[64];
        snprintf(name, sizeof name, "allreduce_hd_%d_of_%d", r, N);
        seed_buf(T, name, &b);
    }
    free(b.p);
}

/* ------------------------------------------------------------ inputs */

static void idx_seed(const char *name, int gz, const uint8_t *dims, int ndims) {
    fz_buf b = {0};
    uint8_t mode = (uint8_t)gz;
    fz_buf_put(&b, &mode, 1);
    uint8_t magic[4] = {0, 0, 8, (uint8_t)ndims};
    fz_buf_put(&b, magic, 4);
    size_t n = 1;
    for (int d = 0; d < ndims; d++) {
        be32(&b, dims[d]);
        n *= dims[d];
    }
    for (size_t i = 0; i < n; i++) {
        uint8_t x = (uint8_t)(i * 37);
        fz_buf_put(&b, &x, 1);
    }
    seed_buf("fuzz_idx", name, &b);
    free(b.p);
}

static void input_seeds(void) {
    idx_seed("labels", 0, (const uint8_t[]){10}, 1);
    idx_seed("images_gz", 1, (const uint8_t[]){3, 4, 5}, 3);
    idx_seed("images4d", 0, (const uint8_t[]){2, 2, 2, 2}, 4);
    /* A real gzip file written by zlib, read as it is. */
    {
        uint8_t raw[4 + 4 + 6] = {0, 0, 8, 1, 0, 0, 0, 6, 1, 2, 3, 4, 5, 6};
        uint8_t z[128];
        uLongf zl = sizeof z;
        z_stream s = {0};
        deflateInit2(&s, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);
        s.next_in = raw;
        s.avail_in = sizeof raw;
        s.next_out = z + 1;
        s.avail_out = (uInt)(zl - 1);
        deflate(&s, Z_FINISH);
        zl = s.total_out;
        deflateEnd(&s);
        z[0] = 0;
        seed("fuzz_idx", "gzip_file", z, zl + 1);
    }
    const char *line =
        "1\t5\t110\t\t16\t\t1\t0\t14\t7\t1\t\t306\t\t62770d79\te21f5d58\tafea442f\t945c7fcf\t"
        "38b02748\t6fcd6dcb\t3580aa21\t28808903\t46dedfa6\t2e027dc1\t0c7c4231\t95981d1f\t"
        "00c5ffb7\tbe4ee537\t8a0b74cc\t4cdc3efa\td20856aa\tb8170bba\t9512c20b\t\t\t"
        "e6fe1b54\tb1bf8ee6\t9bea9f3d";
    fz_buf b = {0};
    uint8_t mode = 0;
    fz_buf_put(&b, &mode, 1);
    fz_buf_put(&b, line, strlen(line));
    seed_buf("fuzz_criteo", "line", &b);
    for (mode = 1; mode < 3; mode++) {
        fz_buf_put(&b, &mode, 1);
        fz_buf_put(&b, line, strlen(line));
        fz_buf_put(&b, "\n0\t\t\t\t\t\t\t\t\t\t\t\t\t", 14);
        for (int i = 0; i < 25; i++) fz_buf_put(&b, "\t", 1);
        fz_buf_put(&b, "\nbad line\r\n", 11);
        fz_buf_put(&b, line, strlen(line));
        seed_buf("fuzz_criteo", mode == 1 ? "file" : "file_gz", &b);
    }
    mode = 3;
    fz_buf_put(&b, &mode, 1);
    const char *meta = "{\"bayes_auc\": 0.81, \"bayes_logloss\": 0.45, \"seed\": 1}";
    fz_buf_put(&b, meta, strlen(meta) + 1);
    fz_buf_put(&b, line, strlen(line));
    fz_buf_put(&b, "\n", 1);
    fz_buf_put(&b, line, strlen(line));
    seed_buf("fuzz_criteo", "data_dir", &b);
    free(b.p);
    static const char *tf[] = {
        "{\"cluster\": {\"chief\": [\"host0:2222\"], \"worker\": [\"host1:2222\", \"host2:2222\"], "
        "\"ps\": [\"ps0:2222\", \"ps1:2222\"]}, \"task\": {\"type\": \"worker\", \"index\": 1}, "
        "\"environment\": \"cloud\"}",
        "{\"cluster\": {\"worker\": [\"localhost:1\"], \"ps\": [\"localhost:2\"], \"evaluator\": "
        "[\"localhost:3\"]}, \"task\": {\"type\": \"evaluator\", \"index\": 0}}",
        "{\"cluster\": {\"master\": [\"[::1]:5000\"], \"ps\": [\"127.0.0.1:5001\"]}, "
        "\"task\": {\"type\": \"ps\", \"index\": 0}}",
        "{\"cluster\": {\"worker\": [\"a:1\", \"a:1\"]}, \"task\": {\"type\": \"worker\", \"index\": 3}}",
    };
    for (int i = 0; i < 4; i++) {
        char name[32];
        snprintf(name, sizeof name, "tf_config_%d", i);
        seed("fuzz_tf_config", name, tf[i], strlen(tf[i]));
    }
    char withflags[512];
    int n = snprintf(withflags, sizeof withflags, "%s", tf[1]);
    withflags[n] = 0;
    withflags[n + 1] = 2;
    memcpy(withflags + n + 2, "ps0:1,ps1:2", 11);
    seed("fuzz_tf_config", "flags", withflags, (size_t)n + 13);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    outdir = argv[1];
    mkdir(outdir, 0755);
    ps_seeds();
    wire_seeds();
    store_seeds();
    rdv_seeds();
    ring_seeds();
    input_seeds();
    return 0;
}
