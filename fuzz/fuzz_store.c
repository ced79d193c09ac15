/* fuzz_store.c - the checkpoint loader over damaged stores: st_store's
 * decoding of what a LevelDB directory holds (storage/st_store.c), and a PS
 * shard restoring itself from it (ps/ps_server.c's open_store).
 * SPDX-License-Identifier: MIT
 *
 * Set-up, once: a real PS (DeepFM, one shard, on the stub transport) is
 * initialised, trained two steps and checkpointed into a store in a
 * temporary directory, which then stays open (st_store.c is included
 * here, so the harness reaches its database handle and its decoders).
 * Every input is a sequence of records (fz_util.h) whose method byte picks
 * a damage (mod 10):
 *   0 a commit record of version data[0] with the rest as its body and a
 *     valid hash appended (so the checks behind the hash are reached)
 *   1 the same, the bytes as they are
 *   2 a blob chunk: version, part (bit 7: a rows part), kind, chunk index,
 *     then its bytes
 *   3 the "model" record (the PS's ModelSpec) with a valid hash
 *   4 any key: length byte, key, value      5 delete a key
 *   6 drop generations older than data[0]   7 drop those newer
 *   8 the identity record checked (identity_check), raw and hashed
 *   9 close the store and start a PS shard on the directory (with the
 *     model, or without one when data[0] is odd: it learns it from the
 *     store), which restores the newest generation; then reopen
 * then the store is read as a PS would: the committed versions, every one
 * of them loaded (blobs checked: 64-byte aligned, lengths as told), the
 * model record decoded; a checkpoint written then must load back exactly.
 * At the end the database is put back as the set-up left it.
 */
#include "storage/st_store.c"

#include <stdio.h>

#include "fuzz/fz_requests.h"
#include "fuzz/fz_util.h"
#include "fuzz/rpc_stub.h"
#include "proto/ps.pb-c.h"
#include "ps/ps_server.h"
#include "ps/ps_wire.h"

const char *__asan_default_options(void);

/* A damaged record may claim a blob of any length: st_store_load's
 * allocation of it fails with CM_ENOMEM here past 64 MiB (in production
 * past what the machine has), instead of ASan or libFuzzer reporting the
 * size, and without paying for the shadow memory of large claims. */
const char *__asan_default_options(void) {
    return "allocator_may_return_null=1:max_allocation_size_mb=64";
}

#define MAX_OPS 32

static char dir[512];
static st_store *st;
static const st_identity ident = {.fingerprint = PS_SERVER_STORE_FINGERPRINT,
                                  .description = PS_SERVER_STORE_DESC,
                                  .shard = 0};

typedef struct kv {
    char *k, *v;
    size_t kl, vl;
} kv;
static kv *base;
static int nbase;

static void die(const char *what, const char *err) {
    fprintf(stderr, "fuzz_store: %s%s%s\n", what, err ? ": " : "", err ? err : "");
    abort();
}

static void reopen(void) {
    char err[512];
    /* Small memtables: the tombstones of earlier inputs are compacted away
     * instead of slowing every later scan. */
    st_options o = {.write_buffer_size = 64 << 10, .max_file_size = 1 << 20};
    if (st_store_open(&o, dir, &ident, &st, err, sizeof err) != CM_OK) die("reopen", err);
}

static void call(rpc_server *rs, int method, fz_buf *b) {
    rpc_stub_invoke(rs, fz_methods[method], b->p, b->len);
    b->len = 0;
}

/* A PS of the DeepFM model on the directory (with or without the model). */
static void run_ps(int with_model, int train) {
    const cm_model *m = fz_model(FZ_MODEL_DEEPFM);
    const cm_placement *pl = fz_placement(FZ_MODEL_DEEPFM, 1);
    ps_server_cfg cfg = {.model = with_model ? m : NULL,
                         .placement = with_model ? pl : NULL,
                         .nshards = 1,
                         .threads = 1,
                         .data_dir = dir,
                         .checkpoint_every = train ? 1 : 0};
    ps_server *s;
    int port;
    if (ps_server_create(&cfg, &s) != CM_OK) {
        if (train) die("cannot create the PS", NULL);
        return; /* A store it refuses: fine. */
    }
    if (ps_server_start(s, "fuzz:0", &port) != CM_OK) die("ps_server_start", NULL);
    if (train) {
        rpc_server *rs = rpc_stub_server();
        fz_buf b = {0};
        fz_init io = {.optim = "adam", .table_optim = "adagrad", .async = 1, .workers = 1};
        fz_req_init(&b, m, pl, 0, 0, &io);
        call(rs, FZ_INIT, &b);
        for (int step = 0; step < 2; step++) {
            fz_push po = {.step = step, .rows = 3, .rows_final = 1, .want = 2, .train = 1};
            fz_req_push(&b, m, pl, 0, &po);
            call(rs, FZ_PUSHPULL, &b);
            ps_server_checkpoint_wait(s);
        }
        free(b.p);
    }
    ps_server_destroy(s, 0);
}

/* Every key and value of the database, in order. */
static kv *snapshot(int *n) {
    kv *a = NULL;
    int cap = 0;
    *n = 0;
    leveldb_iterator_t *it = leveldb_create_iterator(st->db, st->rscan);
    for (leveldb_iter_seek_to_first(it); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        if (*n == cap) {
            cap = cap ? 2 * cap : 64;
            a = cm_realloc(a, (size_t)cap * sizeof *a);
        }
        kv *e = &a[(*n)++];
        const char *k = leveldb_iter_key(it, &e->kl), *v = leveldb_iter_value(it, &e->vl);
        e->k = cm_malloc(e->kl + 1);
        memcpy(e->k, k, e->kl);
        e->v = cm_malloc(e->vl + 1);
        memcpy(e->v, v, e->vl);
    }
    leveldb_iter_destroy(it);
    return a;
}

static void put(const void *k, size_t kl, const void *v, size_t vl) {
    char *e = NULL;
    leveldb_put(st->db, st->wlazy, k, kl, v, vl, &e);
    if (e) die("put", e);
}

static void del(const void *k, size_t kl) {
    char *e = NULL;
    leveldb_delete(st->db, st->wlazy, k, kl, &e);
    if (e) die("delete", e);
}

/* Put the database back as the set-up left it. */
static void restore_base(void) {
    int n;
    kv *now = snapshot(&n);
    for (int i = 0; i < n; i++) {
        int found = 0;
        for (int j = 0; j < nbase && !found; j++)
            found = base[j].kl == now[i].kl && !memcmp(base[j].k, now[i].k, now[i].kl) &&
                    base[j].vl == now[i].vl && !memcmp(base[j].v, now[i].v, now[i].vl);
        if (!found) del(now[i].k, now[i].kl);
    }
    for (int j = 0; j < nbase; j++) {
        int found = 0;
        for (int i = 0; i < n && !found; i++)
            found = base[j].kl == now[i].kl && !memcmp(base[j].k, now[i].k, now[i].kl) &&
                    base[j].vl == now[i].vl && !memcmp(base[j].v, now[i].v, now[i].vl);
        if (!found) put(base[j].k, base[j].kl, base[j].v, base[j].vl);
    }
    for (int i = 0; i < n; i++) {
        free(now[i].k);
        free(now[i].v);
    }
    free(now);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_logs_init();
    snprintf(dir, sizeof dir, "%s/store", fz_tmpdir());
    run_ps(1, 1);
    reopen();
    int64_t v;
    char err[512];
    if (st_store_latest(st, &v, err, sizeof err) != CM_OK) die("the set-up wrote nothing", err);
    base = snapshot(&nbase);
    return 0;
}

/* value = body, then the XXH64 the store checks. */
static void put_hashed(const uint8_t *k, size_t kl, const uint8_t *body, size_t n) {
    uint8_t *v = cm_malloc(n + 8);
    if (n) memcpy(v, body, n);
    put_be64(v + n, xxh64(body, n, HASH_SEED));
    put(k, kl, v, n + 8);
    free(v);
}

static void damage(int op, const uint8_t *d, size_t n) {
    uint8_t k[GEN_KEY_LEN + 256];
    char err[512];
    int64_t ver = n ? d[0] : 0;
    switch (op) {
    case 0:
    case 1:
        ver_key(k, 'c', ver);
        if (op == 0 && n) {
            /* A header naming the right version, so that more is reached. */
            uint8_t *b = cm_malloc(n + 12);
            put_be32(b, COMMIT_MAGIC);
            put_be64(b + 4, (uint64_t)ver);
            memcpy(b + 12, d + 1, n - 1);
            put_hashed(k, VER_KEY_LEN, b, n + 11);
            free(b);
        } else {
            put(k, VER_KEY_LEN, n ? d + 1 : d, n ? n - 1 : 0);
        }
        break;
    case 2:
        if (n < 4) return;
        gen_key(k, ver, d[1] & 0x80 ? 0x80000000u | (d[1] & 0x7f) : d[1], d[2], d[3]);
        put(k, GEN_KEY_LEN, d + 4, n - 4);
        break;
    case 3: {
        size_t kl = record_key(k, 72, "model");
        put_hashed(k, kl, d, n);
        break;
    }
    case 4: {
        size_t kl = n ? d[0] : 0;
        if (kl + 1 > n) return;
        put(d + 1, kl, d + 1 + kl, n - 1 - kl);
        break;
    }
    case 5: del(d, n); break;
    case 6: (void)st_store_drop_older(st, ver, err, sizeof err); break;
    case 7: (void)st_store_drop_newer(st, ver, err, sizeof err); break;
    case 8: {
        (void)identity_check(st, d, n, &ident, err, sizeof err);
        uint8_t *b = cm_malloc(n + 8);
        if (n) memcpy(b, d, n);
        put_be64(b + n, xxh64(d, n, HASH_SEED));
        (void)identity_check(st, b, n + 8, &ident, err, sizeof err);
        free(b);
        break;
    }
    case 9:
        st_store_close(st);
        st = NULL;
        run_ps(!(n && (d[0] & 1)), 0);
        reopen();
        break;
    }
}

typedef struct load_ctx {
    int nblobs;
    size_t bytes;
    int64_t last_part, last_kind;
} load_ctx;

static int on_blob(void *ud, uint32_t part, uint32_t kind, const void *data, size_t len) {
    load_ctx *c = ud;
    if ((uintptr_t)data % 64) die("a blob that is not 64-byte aligned", NULL);
    /* In (part, kind) order. */
    if ((int64_t)part < c->last_part || ((int64_t)part == c->last_part && (int64_t)kind <= c->last_kind))
        die("blobs out of (part, kind) order", NULL);
    c->last_part = part;
    c->last_kind = kind;
    const volatile uint8_t *p = data;
    if (len) (void)p[0], (void)p[len - 1]; /* As long as it says (ASan). */
    c->nblobs++;
    c->bytes += len;
    return CM_OK;
}

static void read_all(void) {
    char err[512];
    int64_t v[16], latest;
    int n = st_store_committed(st, v, 16, err, sizeof err);
    if (n < 0) die("st_store_committed", err);
    int rc = st_store_latest(st, &latest, err, sizeof err);
    if ((n == 0) != (rc == CM_ENOTFOUND) || (n > 0 && (rc != CM_OK || latest != v[0])))
        die("st_store_latest disagrees with st_store_committed", NULL);
    for (int i = 0; i < n && i < 16; i++) {
        if (i && v[i] >= v[i - 1]) die("committed versions not newest first", NULL);
        load_ctx c = {.last_part = -1, .last_kind = -1};
        void *extra = NULL;
        size_t elen = 99;
        rc = st_store_load(st, v[i], on_blob, &c, &extra, &elen, err, sizeof err);
        if (rc != CM_OK && (extra || elen)) die("a failed load left an extra record", NULL);
        if (rc != CM_OK && !err[0]) die("a failed load without a message", NULL);
        free(extra);
    }
    void *rec = NULL;
    size_t len = 0;
    if (st_store_get_record(st, "model", &rec, &len, err, sizeof err) == CM_OK) {
        Psrpc__ModelSpec *sp = psrpc__model_spec__unpack(NULL, len, rec);
        cm_model *m = NULL;
        size_t mp;
        if (sp) (void)ps_wire_spec_model(sp, &m, &mp, err, sizeof err);
        cm_model_destroy(m);
        if (sp) psrpc__model_spec__free_unpacked(sp, NULL);
        free(rec);
    }
}

static int copy_blob(void *ud, uint32_t part, uint32_t kind, const void *data, size_t len) {
    uint8_t *out = ud;
    if (part > 2 || kind != 0 || len != 10 + part) return CM_ECORRUPT;
    memcpy(out + part * 16, data, len);
    return CM_OK;
}

/* Whatever is in the database: a checkpoint written now loads back. */
static void write_and_load(uint8_t tag) {
    uint8_t in[48], out[48] = {0}, extra[5] = {1, 2, 3, 4, tag};
    for (int i = 0; i < 48; i++) in[i] = (uint8_t)(i * 7 + tag);
    st_blob b[3];
    for (uint32_t p = 0; p < 3; p++) b[p] = (st_blob){p, 0, in + p * 16, 10 + p};
    char err[512];
    if (st_store_checkpoint(st, 77, b, 3, extra, sizeof extra, err, sizeof err) != CM_OK)
        die("st_store_checkpoint", err);
    void *x = NULL;
    size_t xl = 0;
    if (st_store_load(st, 77, copy_blob, out, &x, &xl, err, sizeof err) != CM_OK)
        die("a checkpoint just written does not load", err);
    for (uint32_t p = 0; p < 3; p++)
        if (memcmp(in + p * 16, out + p * 16, 10 + p)) die("a blob came back changed", NULL);
    if (xl != sizeof extra || memcmp(x, extra, xl)) die("the extra record came back changed", NULL);
    free(x);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_reader rd = {data, data + size};
    int op, nops = 0;
    const uint8_t *d;
    size_t n;
    while (nops++ < MAX_OPS && fz_next_record(&rd, &op, &d, &n)) damage(op % 10, d, n);
    read_all();
    write_and_load(size ? data[0] : 0);
    read_all();
    restore_base();
    return 0;
}
