/* test_store.c - unit tests for the checkpoint store (storage/st_store.c).
 * SPDX-License-Identifier: MIT
 *
 * Every test gets a fresh directory under /tmp (mkdtemp) and removes it.
 * Crashes are real: a forked child writes a checkpoint and SIGKILLs itself
 * through the store's before_commit hook. Damage is done through LevelDB's
 * own C API with the store closed, since one process must never open a
 * database twice (LevelDB pitfall L1), or to the files themselves: a lost
 * CURRENT, a CURRENT naming a lost MANIFEST, a bit flipped in a table file.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <dirent.h>
#include <ftw.h>
#include <leveldb/c.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "storage/st_store.h"

/* ===== Helpers ===== */

#define MIB ((size_t)1 << 20)
#define MAXB 8 /* Blobs per checkpoint, at most, in these tests. */

static const st_identity ID = {0x5eed5eed12345678ULL,
                               "mlp 784,256,128,10 on 2 PS (min partition 262144 B), shard 1", 1};

typedef struct fixture {
    char tmp[64]; /* The mkdtemp directory. */
    char db[96];  /* The store's directory inside it. */
} fixture;

static int fx_setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    if (!f) return -1;
    snprintf(f->tmp, sizeof f->tmp, "/tmp/test_store.XXXXXX");
    if (!mkdtemp(f->tmp)) {
        free(f);
        return -1;
    }
    snprintf(f->db, sizeof f->db, "%s/db", f->tmp);
    *state = f;
    return 0;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int fx_teardown(void **state) {
    fixture *f = *state;
    int rc = nftw(f->tmp, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return rc;
}

/* A buffer of n pseudo-random bytes from 'seed'; free(). */
static uint8_t *random_bytes(size_t n, uint64_t seed) {
    uint8_t *p = malloc(n ? n : 1);
    cm_rng r;
    cm_rng_init(&r, seed);
    for (size_t i = 0; i < n; i += 8) {
        uint64_t w = cm_rng_next(&r);
        memcpy(p + i, &w, n - i < 8 ? n - i : 8);
    }
    return p;
}

/* A set of blobs with owned data. */
typedef struct blobset {
    st_blob b[MAXB];
    int n;
} blobset;

static void set_add(blobset *s, uint32_t part, uint32_t kind, size_t len, uint64_t seed) {
    assert_true(s->n < MAXB);
    s->b[s->n++] = (st_blob){part, kind, random_bytes(len, seed), len};
}

static void set_free(blobset *s) {
    for (int i = 0; i < s->n; i++) free((void *)s->b[i].data);
    s->n = 0;
}

/* What st_store_load handed over. */
typedef struct got {
    int n;
    uint32_t part[MAXB], kind[MAXB];
    size_t len[MAXB];
    uint8_t *data[MAXB];
    int fail_at; /* Return CM_EINVAL for this blob (-1: never). */
} got;

static int collect(void *ud, uint32_t part, uint32_t kind, const void *data, size_t len) {
    got *g = ud;
    assert_int_equal((uintptr_t)data % 64, 0);
    if (g->n == g->fail_at) return CM_EINVAL;
    assert_true(g->n < MAXB);
    g->part[g->n] = part;
    g->kind[g->n] = kind;
    g->len[g->n] = len;
    g->data[g->n] = malloc(len ? len : 1);
    memcpy(g->data[g->n], data, len);
    g->n++;
    return CM_OK;
}

static void got_free(got *g) {
    for (int i = 0; i < g->n; i++) free(g->data[i]);
    g->n = 0;
}

static int cmp_blob(const void *a, const void *b) {
    const st_blob *x = a, *y = b;
    if (x->part != y->part) return x->part < y->part ? -1 : 1;
    return x->kind < y->kind ? -1 : x->kind > y->kind;
}

/* Load 'version' and check it holds exactly 'want' (in any order) and
 * 'extra'. */
static void expect_load(st_store *s, int64_t version, const blobset *want, const char *extra) {
    got g = {.fail_at = -1};
    void *x = NULL;
    size_t xlen = 99;
    char err[256] = "";
    int rc = st_store_load(s, version, collect, &g, &x, &xlen, err, sizeof err);
    if (rc != CM_OK) fprintf(stderr, "load: %s\n", err);
    assert_int_equal(rc, CM_OK);
    blobset sorted = *want;
    qsort(sorted.b, (size_t)sorted.n, sizeof sorted.b[0], cmp_blob);
    assert_int_equal(g.n, sorted.n);
    for (int i = 0; i < g.n; i++) {
        assert_int_equal(g.part[i], sorted.b[i].part);
        assert_int_equal(g.kind[i], sorted.b[i].kind);
        assert_int_equal(g.len[i], sorted.b[i].len);
        assert_memory_equal(g.data[i], sorted.b[i].data, g.len[i] ? g.len[i] : 0);
    }
    if (extra && *extra) {
        assert_int_equal(xlen, strlen(extra));
        assert_non_null(x);
        assert_memory_equal(x, extra, xlen);
    } else {
        assert_int_equal(xlen, 0);
        assert_null(x);
    }
    free(x);
    got_free(&g);
}

static st_store *open_ok(const char *dir, const st_options *o) {
    st_store *s = NULL;
    char err[256] = "";
    int rc = st_store_open(o, dir, &ID, &s, err, sizeof err);
    if (rc != CM_OK) fprintf(stderr, "open: %s\n", err);
    assert_int_equal(rc, CM_OK);
    assert_non_null(s);
    return s;
}

static void checkpoint_ok(st_store *s, int64_t version, const blobset *b, const char *extra) {
    char err[256] = "";
    int rc = st_store_checkpoint(s, version, b->b, b->n, extra, extra ? strlen(extra) : 0, err,
                                 sizeof err);
    if (rc != CM_OK) fprintf(stderr, "checkpoint: %s\n", err);
    assert_int_equal(rc, CM_OK);
}

/* Check that the committed versions are exactly 'want' (newest first). */
static void expect_committed(st_store *s, const int64_t *want, int n) {
    int64_t v[16];
    int got_n = st_store_committed(s, v, 16, NULL, 0);
    assert_int_equal(got_n, n);
    for (int i = 0; i < n; i++) assert_int_equal(v[i], want[i]);
}

/* ----- Raw LevelDB access (the store must be closed) ----- */

static leveldb_t *raw_open(const char *dir) {
    leveldb_options_t *o = leveldb_options_create();
    char *e = NULL;
    leveldb_t *db = leveldb_open(o, dir, &e);
    leveldb_options_destroy(o);
    if (e) fprintf(stderr, "raw open: %s\n", e);
    assert_null(e);
    return db;
}

static void be(uint8_t *p, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

/* The key of a blob chunk, as st_store.h documents it. */
static void chunk_key(uint8_t k[21], int64_t version, uint32_t part, uint32_t kind, uint32_t c) {
    k[0] = 'g';
    be(k + 1, (uint64_t)version, 8);
    be(k + 9, part, 4);
    be(k + 13, kind, 4);
    be(k + 17, c, 4);
}

/* Keys of generation 'version' in the database at 'dir'. */
static int raw_count_generation(const char *dir, int64_t version) {
    leveldb_t *db = raw_open(dir);
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    leveldb_iterator_t *it = leveldb_create_iterator(db, ro);
    uint8_t prefix[9] = {'g'};
    be(prefix + 1, (uint64_t)version, 8);
    int n = 0;
    for (leveldb_iter_seek(it, (const char *)prefix, 9); leveldb_iter_valid(it);
         leveldb_iter_next(it)) {
        size_t klen;
        const char *k = leveldb_iter_key(it, &klen);
        if (klen < 9 || memcmp(k, prefix, 9) != 0) break;
        n++;
    }
    leveldb_iter_destroy(it);
    leveldb_readoptions_destroy(ro);
    leveldb_close(db);
    return n;
}

/* ===== Round trip ===== */

static void test_round_trip(void **state) {
    fixture *f = *state;
    blobset b = {0};
    /* Unsorted on purpose; a 4 MiB blob (4 chunks), one just over a chunk,
     * an empty one. */
    set_add(&b, 3, ST_KIND_PARAMS, 4 * MIB, 1);
    set_add(&b, 0, 1, 1000 * sizeof(float), 2);
    set_add(&b, 0, ST_KIND_PARAMS, 4000, 3);
    set_add(&b, 1, 2, 0, 4);
    set_add(&b, 3, 1, MIB + 3, 5);
    const char *extra = "step=42 epoch=3 seed=7";

    st_store *s = open_ok(f->db, NULL);
    int64_t latest = -7;
    assert_int_equal(st_store_latest(s, &latest, NULL, 0), CM_ENOTFOUND);
    assert_int_equal(st_store_committed(s, NULL, 0, NULL, 0), 0);

    checkpoint_ok(s, 1, &b, extra);
    expect_committed(s, (const int64_t[]){1}, 1);
    assert_int_equal(st_store_latest(s, &latest, NULL, 0), CM_OK);
    assert_int_equal(latest, 1);
    expect_load(s, 1, &b, extra);

    /* Not committed: not found. */
    char err[256] = "";
    got g = {.fail_at = -1};
    assert_int_equal(st_store_load(s, 2, collect, &g, NULL, NULL, err, sizeof err), CM_ENOTFOUND);
    assert_non_null(strstr(err, "not committed"));

    /* A callback's error stops the load and comes back. */
    g.fail_at = 1;
    void *x = (void *)&g;
    assert_int_equal(st_store_load(s, 1, collect, &g, &x, NULL, err, sizeof err), CM_EINVAL);
    assert_null(x);
    assert_int_equal(g.n, 1);
    got_free(&g);

    /* No extra at all. */
    checkpoint_ok(s, 2, &b, NULL);
    expect_load(s, 2, &b, NULL);
    expect_committed(s, (const int64_t[]){2, 1}, 2);

    st_store_close(s);
    set_free(&b);
}

static void test_reopen_sees_committed(void **state) {
    fixture *f = *state;
    blobset b7 = {0}, b9 = {0};
    set_add(&b7, 0, 0, 3 * MIB, 70);
    set_add(&b7, 0, 1, 3 * MIB, 71);
    set_add(&b9, 0, 0, 3 * MIB, 90);
    set_add(&b9, 0, 1, 3 * MIB, 91);

    st_store *s = open_ok(f->db, NULL);
    checkpoint_ok(s, 7, &b7, "seven");
    checkpoint_ok(s, 9, &b9, "nine");
    st_store_close(s);

    s = open_ok(f->db, NULL);
    expect_committed(s, (const int64_t[]){9, 7}, 2);
    expect_load(s, 7, &b7, "seven");
    expect_load(s, 9, &b9, "nine");
    /* max smaller than the count: the newest, and the full count. */
    int64_t v = 0;
    assert_int_equal(st_store_committed(s, &v, 1, NULL, 0), 2);
    assert_int_equal(v, 9);
    st_store_close(s);
    set_free(&b7);
    set_free(&b9);
}

/* ===== Identity ===== */

static void test_refuses_other_model_or_shard(void **state) {
    fixture *f = *state;
    st_store *s = open_ok(f->db, NULL);
    st_store_close(s);

    char err[512] = "";
    const st_identity other_model = {0x0123456789abcdefULL,
                                     "mlp 784,512,10 on 2 PS (min partition 262144 B), shard 1", 1};
    s = (st_store *)&err; /* Must come back NULL. */
    assert_int_equal(st_store_open(NULL, f->db, &other_model, &s, err, sizeof err), CM_EINVAL);
    assert_null(s);
    assert_non_null(strstr(err, "784,256,128,10"));     /* What the directory holds. */
    assert_non_null(strstr(err, "784,512,10"));         /* What was asked for. */
    assert_non_null(strstr(err, "the model or cluster shape differs"));

    const st_identity other_shard = {
        ID.fingerprint, "mlp 784,256,128,10 on 2 PS (min partition 262144 B), shard 0", 0};
    assert_int_equal(st_store_open(NULL, f->db, &other_shard, &s, err, sizeof err), CM_EINVAL);
    assert_null(s);
    assert_non_null(strstr(err, "shard 1"));
    assert_non_null(strstr(err, "shard 0"));
    assert_non_null(strstr(err, "the shard differs"));

    /* The refusals changed nothing: the right identity still opens. */
    s = open_ok(f->db, NULL);
    st_store_close(s);

    /* A LevelDB database that is not a store is refused too. */
    char other[128];
    snprintf(other, sizeof other, "%s/other", f->tmp);
    leveldb_options_t *o = leveldb_options_create();
    leveldb_options_set_create_if_missing(o, 1);
    char *e = NULL;
    leveldb_t *db = leveldb_open(o, other, &e);
    assert_null(e);
    leveldb_writeoptions_t *wo = leveldb_writeoptions_create();
    leveldb_put(db, wo, "k", 1, "v", 1, &e);
    assert_null(e);
    leveldb_writeoptions_destroy(wo);
    leveldb_close(db);
    leveldb_options_destroy(o);
    assert_int_equal(st_store_open(NULL, other, &ID, &s, err, sizeof err), CM_ECORRUPT);
    assert_null(s);
    assert_non_null(strstr(err, "not a checkpoint store"));
}

/* ===== Garbage collection and rollback ===== */

static void test_drop_older_keeps_newer(void **state) {
    fixture *f = *state;
    blobset b1 = {0}, b2 = {0};
    set_add(&b1, 0, 0, 2 * MIB, 11);
    set_add(&b1, 1, 0, 100, 12);
    set_add(&b2, 0, 0, 2 * MIB, 21);
    set_add(&b2, 1, 0, 100, 22);

    st_store *s = open_ok(f->db, NULL);
    checkpoint_ok(s, 1, &b1, "one");
    checkpoint_ok(s, 2, &b2, "two");

    /* Dropping everything committed is refused, and drops nothing. */
    char err[256] = "";
    assert_int_equal(st_store_drop_older(s, 3, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "newest committed one is 2"));
    expect_committed(s, (const int64_t[]){2, 1}, 2);

    assert_int_equal(st_store_drop_older(s, 2, err, sizeof err), CM_OK);
    expect_committed(s, (const int64_t[]){2}, 1);
    got g = {.fail_at = -1};
    assert_int_equal(st_store_load(s, 1, collect, &g, NULL, NULL, NULL, 0), CM_ENOTFOUND);
    expect_load(s, 2, &b2, "two");
    st_store_close(s);

    /* The old generation's data is gone too, not just its commit record. */
    assert_int_equal(raw_count_generation(f->db, 1), 0);
    assert_int_equal(raw_count_generation(f->db, 2), 3);
    set_free(&b1);
    set_free(&b2);
}

static void test_drop_newer_and_replace(void **state) {
    fixture *f = *state;
    blobset a = {0}, b = {0};
    set_add(&a, 0, 0, 5000, 1);
    set_add(&a, 2, 1, 5000, 2);
    set_add(&b, 0, 0, 300, 3);

    st_store *s = open_ok(f->db, NULL);
    checkpoint_ok(s, 1, &a, "x");
    checkpoint_ok(s, 3, &a, "x");
    checkpoint_ok(s, 5, &a, "x");
    assert_int_equal(st_store_drop_newer(s, 3, NULL, 0), CM_OK);
    expect_committed(s, (const int64_t[]){3, 1}, 2);

    /* Version 5 again, from the new history; then 3 replaced in place. */
    checkpoint_ok(s, 5, &b, "new five");
    expect_load(s, 5, &b, "new five");
    checkpoint_ok(s, 3, &b, "new three");
    expect_load(s, 3, &b, "new three");
    expect_load(s, 1, &a, "x");
    expect_committed(s, (const int64_t[]){5, 3, 1}, 3);
    st_store_close(s);
    /* The replaced generation kept none of its old chunks. */
    assert_int_equal(raw_count_generation(f->db, 3), 1);
    set_free(&a);
    set_free(&b);
}

static void test_checkpoint_rejects_bad_args(void **state) {
    fixture *f = *state;
    blobset b = {0};
    set_add(&b, 4, 0, 64, 1);
    set_add(&b, 4, 0, 64, 2); /* The same (part, kind) twice. */
    st_store *s = open_ok(f->db, NULL);
    char err[256] = "";
    assert_int_equal(st_store_checkpoint(s, 1, b.b, 2, NULL, 0, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "part 4 kind 0 given twice"));
    assert_int_equal(st_store_checkpoint(s, -1, b.b, 1, NULL, 0, err, sizeof err), CM_EINVAL);
    assert_int_equal(st_store_checkpoint(s, 1, b.b, 1, NULL, ST_EXTRA_MAX + 1, err, sizeof err),
                     CM_EINVAL);
    assert_int_equal(st_store_committed(s, NULL, 0, NULL, 0), 0);
    /* An empty checkpoint (a shard that owns nothing) is fine. */
    assert_int_equal(st_store_checkpoint(s, 1, NULL, 0, NULL, 0, err, sizeof err), CM_OK);
    blobset none = {0};
    expect_load(s, 1, &none, NULL);
    st_store_close(s);
    set_free(&b);
}

/* ===== Crash between the blobs and the commit record ===== */

static void die_now(void *ud) {
    (void)ud;
    raise(SIGKILL);
}

static void test_crash_before_commit_keeps_previous(void **state) {
    fixture *f = *state;
    blobset b1 = {0}, b2 = {0}, b2again = {0};
    set_add(&b1, 0, 0, 4 * MIB, 101);
    set_add(&b1, 0, 1, 4 * MIB, 102);
    set_add(&b1, 1, 0, 1000, 103);
    set_add(&b2, 0, 0, 4 * MIB, 201);
    set_add(&b2, 0, 1, 4 * MIB, 202);
    set_add(&b2, 1, 0, 1000, 203);
    set_add(&b2again, 1, 0, 1000, 204);

    st_store *s = open_ok(f->db, NULL);
    checkpoint_ok(s, 1, &b1, "v1");
    st_store_close(s); /* The child opens the database: never twice at once. */

    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        st_options o = {.before_commit = die_now};
        st_store *c = NULL;
        if (st_store_open(&o, f->db, &ID, &c, NULL, 0) != CM_OK) _exit(2);
        st_store_checkpoint(c, 2, b2.b, b2.n, "v2", 2, NULL, 0);
        _exit(3); /* Not reached: the hook kills the child. */
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status));
    assert_int_equal(WTERMSIG(status), SIGKILL);

    /* The child got as far as the blobs: 4 + 4 chunks and one small. */
    assert_int_equal(raw_count_generation(f->db, 2), 9);

    s = open_ok(f->db, NULL);
    expect_committed(s, (const int64_t[]){1}, 1);
    expect_load(s, 1, &b1, "v1");
    got g = {.fail_at = -1};
    assert_int_equal(st_store_load(s, 2, collect, &g, NULL, NULL, NULL, 0), CM_ENOTFOUND);

    /* Redoing version 2 (with other blobs) replaces the leftovers. */
    checkpoint_ok(s, 2, &b2again, "v2 again");
    expect_load(s, 2, &b2again, "v2 again");
    assert_int_equal(st_store_drop_older(s, 2, NULL, 0), CM_OK);
    expect_committed(s, (const int64_t[]){2}, 1);
    st_store_close(s);
    assert_int_equal(raw_count_generation(f->db, 1), 0);
    assert_int_equal(raw_count_generation(f->db, 2), 1);
    set_free(&b1);
    set_free(&b2);
    set_free(&b2again);
}

static void test_drop_older_removes_crash_leftovers(void **state) {
    fixture *f = *state;
    blobset b = {0};
    set_add(&b, 0, 0, 2 * MIB, 1);
    st_store *s = open_ok(f->db, NULL);
    checkpoint_ok(s, 1, &b, NULL);
    st_store_close(s);

    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        st_options o = {.before_commit = die_now};
        st_store *c = NULL;
        if (st_store_open(&o, f->db, &ID, &c, NULL, 0) != CM_OK) _exit(2);
        st_store_checkpoint(c, 2, b.b, b.n, NULL, 0, NULL, 0);
        _exit(3);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    assert_int_equal(raw_count_generation(f->db, 2), 2);

    /* Version 3 commits; version 2 stays an uncommitted leftover below it
     * until garbage collection, even one that keeps version 1. */
    s = open_ok(f->db, NULL);
    checkpoint_ok(s, 3, &b, NULL);
    assert_int_equal(st_store_drop_older(s, 1, NULL, 0), CM_OK);
    expect_committed(s, (const int64_t[]){3, 1}, 2);
    st_store_close(s);
    assert_int_equal(raw_count_generation(f->db, 2), 0);
    assert_int_equal(raw_count_generation(f->db, 1), 2);
    set_free(&b);
}

/* ===== Corruption ===== */

static void test_corrupt_blob_is_detected(void **state) {
    fixture *f = *state;
    blobset b = {0};
    set_add(&b, 2, 0, 4 * MIB, 7);
    set_add(&b, 0, 0, 100, 8);
    st_store *s = open_ok(f->db, NULL);
    checkpoint_ok(s, 1, &b, NULL);
    st_store_close(s);

    /* Overwrite chunk 2 of (part 2, kind 0) with garbage of the same size. */
    leveldb_t *db = raw_open(f->db);
    leveldb_writeoptions_t *wo = leveldb_writeoptions_create();
    uint8_t k[21];
    chunk_key(k, 1, 2, 0, 2);
    uint8_t *junk = random_bytes(MIB, 999);
    char *e = NULL;
    leveldb_put(db, wo, (const char *)k, sizeof k, (const char *)junk, MIB, &e);
    assert_null(e);
    leveldb_close(db);

    char err[256] = "";
    got g = {.fail_at = -1};
    s = open_ok(f->db, NULL);
    assert_int_equal(st_store_load(s, 1, collect, &g, NULL, NULL, err, sizeof err), CM_ECORRUPT);
    assert_non_null(strstr(err, "part 2 kind 0"));
    assert_non_null(strstr(err, "checksum"));
    got_free(&g);
    /* Found damaged by the load: no longer offered as committed. */
    st_damage d;
    assert_int_equal(st_store_damaged(s, &d, 1), 1);
    assert_int_equal(d.version, 1);
    assert_string_equal(d.why, err);
    expect_committed(s, NULL, 0);
    st_store_close(s);

    /* A missing chunk. */
    db = raw_open(f->db);
    leveldb_delete(db, wo, (const char *)k, sizeof k, &e);
    assert_null(e);
    leveldb_close(db);
    s = open_ok(f->db, NULL);
    assert_int_equal(st_store_load(s, 1, collect, &g, NULL, NULL, err, sizeof err), CM_ECORRUPT);
    assert_non_null(strstr(err, "chunk 2 is missing"));
    got_free(&g);
    st_store_close(s);

    /* A truncated chunk. */
    db = raw_open(f->db);
    leveldb_put(db, wo, (const char *)k, sizeof k, (const char *)junk, 10, &e);
    assert_null(e);
    leveldb_close(db);
    s = open_ok(f->db, NULL);
    assert_int_equal(st_store_load(s, 1, collect, &g, NULL, NULL, err, sizeof err), CM_ECORRUPT);
    assert_non_null(strstr(err, "has 10 bytes"));
    got_free(&g);
    st_store_close(s);

    leveldb_writeoptions_destroy(wo);
    free(junk);
    set_free(&b);
}

/* A commit record as st_store.h lays it out, hash and all, put in place
 * of version 'version''s (the store closed). */
typedef struct rec_entry {
    uint32_t part, kind;
    uint64_t len, hash;
} rec_entry;

static void put_commit(const char *dir, int64_t version, const rec_entry *e, int n) {
    size_t len = 24 + (size_t)n * 24 + 8;
    uint8_t *r = calloc(1, len);
    be(r, 0x50534331u, 4);
    be(r + 4, (uint64_t)version, 8);
    be(r + 12, MIB, 4);
    be(r + 16, (uint64_t)n, 4);
    be(r + 20, 0, 4);
    for (int i = 0; i < n; i++) {
        uint8_t *p = r + 24 + 24 * i;
        be(p, e[i].part, 4);
        be(p + 4, e[i].kind, 4);
        be(p + 8, e[i].len, 8);
        be(p + 16, e[i].hash, 8);
    }
    be(r + len - 8, XXH64(r, len - 8, 0x73745f73746f7265ULL), 8);
    uint8_t k[9] = {'c'};
    be(k + 1, (uint64_t)version, 8);
    leveldb_t *db = raw_open(dir);
    leveldb_writeoptions_t *wo = leveldb_writeoptions_create();
    char *err = NULL;
    leveldb_put(db, wo, (const char *)k, sizeof k, (const char *)r, len, &err);
    assert_null(err);
    leveldb_writeoptions_destroy(wo);
    leveldb_close(db);
    free(r);
}

static uint64_t blob_hash(const st_blob *b, size_t len) {
    return (uint64_t)XXH64(b->data, len, 0x73745f73746f7265ULL);
}

/* Open, expect version 1 refused by load with 'msg', close. */
static void expect_load_refused(const char *dir, const char *msg) {
    st_store *s = open_ok(dir, NULL);
    char err[512] = "";
    got g = {.fail_at = -1};
    assert_int_equal(st_store_load(s, 1, collect, &g, NULL, NULL, err, sizeof err), CM_ECORRUPT);
    if (!strstr(err, msg)) fprintf(stderr, "load: %s (expected \"%s\")\n", err, msg);
    assert_non_null(strstr(err, msg));
    got_free(&g);
    st_store_close(s);
}

static void test_commit_record_is_checked(void **state) {
    fixture *f = *state;
    blobset b = {0};
    set_add(&b, 0, 0, 2 * MIB, 51);
    set_add(&b, 0, 1, 2 * MIB, 52);
    st_store *s = open_ok(f->db, NULL);
    checkpoint_ok(s, 1, &b, NULL);
    st_store_close(s);
    const rec_entry p0 = {0, 0, 2 * MIB, blob_hash(&b.b[0], 2 * MIB)};
    const rec_entry p1 = {0, 1, 2 * MIB, blob_hash(&b.b[1], 2 * MIB)};

    /* Written by hand (blobs listed out of order): it loads, in order. */
    put_commit(f->db, 1, (const rec_entry[]){p1, p0}, 2);
    s = open_ok(f->db, NULL);
    expect_load(s, 1, &b, NULL);
    st_store_close(s);

    /* The parameters twice, the slot not at all: a sound hash, but refused,
     * and not offered as committed. */
    put_commit(f->db, 1, (const rec_entry[]){p0, p0}, 2);
    expect_load_refused(f->db, "the commit record of version 1 lists part 0 kind 0 twice");
    s = open_ok(f->db, NULL);
    expect_committed(s, NULL, 0);
    char err[512] = "";
    int64_t v = -1;
    assert_int_equal(st_store_newest_intact(s, &v, err, sizeof err), CM_ECORRUPT);
    assert_non_null(strstr(err, "none of its 1 committed generations is intact"));
    assert_non_null(strstr(err, "twice"));
    st_store_close(s);

    /* A blob listed that was never written. */
    put_commit(f->db, 1, (const rec_entry[]){p0, p1, {5, 0, 100, 1}}, 3);
    expect_load_refused(f->db, "version 1, part 5 kind 0: chunk 0 is missing");
    /* A length one byte short of the blob's: its last chunk is too long. */
    put_commit(f->db, 1, (const rec_entry[]){p0, {0, 1, 2 * MIB - 1, p1.hash}}, 2);
    expect_load_refused(f->db, "part 0 kind 1: chunk 1 has 1048576 bytes, expected 1048575");
    /* A length a chunk short, with the hash of what it covers: every byte
     * listed checks out, but a chunk follows. */
    put_commit(f->db, 1, (const rec_entry[]){p0, {0, 1, MIB, blob_hash(&b.b[1], MIB)}}, 2);
    expect_load_refused(f->db, "part 0 kind 1: a chunk follows the 1 that its 1048576 bytes take");
    set_free(&b);
}

/* ===== Damaged directories and repair ===== */

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The sorted names in 'dir' (without "." and ".."): *n of them, each and
 * the array to free(). */
static char **dir_names(const char *dir, int *n) {
    DIR *d = opendir(dir);
    assert_non_null(d);
    char **names = NULL;
    int cap = 0;
    *n = 0;
    const struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 16;
            names = realloc(names, (size_t)cap * sizeof *names);
            assert_non_null(names);
        }
        names[(*n)++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, (size_t)*n, sizeof *names, cmp_str);
    return names;
}

static void names_free(char **names, int n) {
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
}

/* The bytes of a file; *len of them; free(). */
static uint8_t *slurp(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    assert_int_equal(fseek(fp, 0, SEEK_END), 0);
    long n = ftell(fp);
    assert_true(n >= 0);
    rewind(fp);
    uint8_t *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return b;
}

/* LevelDB's bookkeeping files, which a refused open may touch. */
static int bookkeeping(const char *name) {
    return strcmp(name, "LOCK") == 0 || strncmp(name, "LOG", 3) == 0;
}

/* Every file of 'dir' (but the bookkeeping ones, with 'data_only'; only
 * those named with 'suffix', unless it is NULL), name and bytes, in one
 * buffer: two snapshots are equal iff the listing and every file's
 * contents are. free(). */
static uint8_t *dir_snapshot(const char *dir, int data_only, const char *suffix, size_t *len) {
    int n;
    char **names = dir_names(dir, &n);
    size_t cap = 1 << 16, at = 0;
    uint8_t *snap = malloc(cap);
    assert_non_null(snap);
    for (int i = 0; i < n; i++) {
        size_t nl = strlen(names[i]);
        if (data_only && bookkeeping(names[i])) continue;
        if (suffix && (nl < strlen(suffix) || strcmp(names[i] + nl - strlen(suffix), suffix)))
            continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        struct stat st;
        assert_int_equal(stat(path, &st), 0);
        size_t flen = 0;
        uint8_t *bytes = S_ISREG(st.st_mode) ? slurp(path, &flen) : NULL; /* lost/: a name. */
        size_t need = strlen(names[i]) + 1 + sizeof flen + flen;
        while (at + need > cap) {
            cap *= 2;
            snap = realloc(snap, cap);
            assert_non_null(snap);
        }
        memcpy(snap + at, names[i], strlen(names[i]) + 1);
        at += strlen(names[i]) + 1;
        memcpy(snap + at, &flen, sizeof flen);
        at += sizeof flen;
        if (flen) memcpy(snap + at, bytes, flen);
        at += flen;
        free(bytes);
    }
    names_free(names, n);
    *len = at;
    return snap;
}

static void expect_same_snapshot(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen) {
    assert_int_equal(alen, blen);
    assert_memory_equal(a, b, alen);
}

/* Whether 'dir' holds a file named with this suffix. */
static int has_file_ending(const char *dir, const char *suffix) {
    int n, found = 0;
    char **names = dir_names(dir, &n);
    for (int i = 0; i < n && !found; i++) {
        size_t l = strlen(names[i]), sl = strlen(suffix);
        found = l >= sl && strcmp(names[i] + l - sl, suffix) == 0;
    }
    names_free(names, n);
    return found;
}

static void path_in(char *buf, size_t cap, const char *dir, const char *name) {
    snprintf(buf, cap, "%s/%s", dir, name);
}

/* Two generations, partly in table files (a 1 MiB write buffer makes
 * LevelDB flush while they are written), partly in the log; 'current'
 * gets the path of the CURRENT file. */
static void two_generations(const char *dir, blobset *b1, blobset *b2, char current[160]) {
    set_add(b1, 0, 0, 3 * MIB, 31);
    set_add(b1, 0, 1, 3 * MIB, 32);
    set_add(b1, 1, 0, 200, 33);
    set_add(b2, 0, 0, 3 * MIB, 41);
    set_add(b2, 0, 1, 3 * MIB, 42);
    set_add(b2, 1, 0, 200, 43);
    st_options o = {.write_buffer_size = MIB};
    st_store *s = open_ok(dir, &o);
    checkpoint_ok(s, 1, b1, "one");
    checkpoint_ok(s, 2, b2, "two");
    st_store_close(s);
    assert_true(has_file_ending(dir, ".ldb"));
    path_in(current, 160, dir, "CURRENT");
}

static void test_lost_current_is_refused_untouched(void **state) {
    fixture *f = *state;
    blobset b1 = {0}, b2 = {0};
    char current[160];
    two_generations(f->db, &b1, &b2, current);
    assert_int_equal(unlink(current), 0);

    size_t before_len, after_len;
    uint8_t *before = dir_snapshot(f->db, 0, NULL, &before_len);
    char err[1024] = "";
    st_store *s = (st_store *)&err; /* Must come back NULL. */
    assert_int_equal(st_store_open(NULL, f->db, &ID, &s, err, sizeof err), CM_ECORRUPT);
    assert_null(s);
    assert_non_null(strstr(err, f->db));
    assert_non_null(strstr(err, "no LevelDB CURRENT file"));
    assert_non_null(strstr(err, "psserver --repair"));
    /* Not a byte changed, not a file added or removed (LOCK and LOG too). */
    uint8_t *after = dir_snapshot(f->db, 0, NULL, &after_len);
    expect_same_snapshot(before, before_len, after, after_len);
    free(after);
    /* Again: a refusal is not a one-off. */
    assert_int_equal(st_store_open(NULL, f->db, &ID, &s, err, sizeof err), CM_ECORRUPT);
    after = dir_snapshot(f->db, 0, NULL, &after_len);
    expect_same_snapshot(before, before_len, after, after_len);
    free(after);
    free(before);

    /* The repair rebuilds it: both generations come back, whole. */
    err[0] = '\0';
    int n = st_store_repair(f->db, err, sizeof err);
    if (n < 0) fprintf(stderr, "repair: %s\n", err);
    assert_int_equal(n, 2);
    s = open_ok(f->db, NULL);
    expect_committed(s, (const int64_t[]){2, 1}, 2);
    expect_load(s, 1, &b1, "one");
    expect_load(s, 2, &b2, "two");
    int64_t v = -1;
    assert_int_equal(st_store_newest_intact(s, &v, err, sizeof err), CM_OK);
    assert_int_equal(v, 2);
    /* And it goes on as a store. */
    checkpoint_ok(s, 3, &b1, "three");
    st_store_close(s);
    s = open_ok(f->db, NULL);
    expect_committed(s, (const int64_t[]){3, 2, 1}, 3);
    st_store_close(s);
    set_free(&b1);
    set_free(&b2);
}

static void test_missing_or_empty_dir_is_new_store(void **state) {
    fixture *f = *state;
    /* An empty directory (made by someone else) becomes a store... */
    assert_int_equal(mkdir(f->db, 0700), 0);
    st_store *s = open_ok(f->db, NULL);
    expect_committed(s, NULL, 0);
    st_store_close(s);
    /* ...as does one holding only LevelDB's LOCK and LOG (a crash in the
     * very first open), and a missing one (the fixtures' usual case). */
    char other[128], lock[160];
    snprintf(other, sizeof other, "%s/other", f->tmp);
    assert_int_equal(mkdir(other, 0700), 0);
    path_in(lock, sizeof lock, other, "LOCK");
    FILE *fp = fopen(lock, "w");
    assert_non_null(fp);
    fclose(fp);
    s = open_ok(other, NULL);
    st_store_close(s);
    /* Any other file, though, is refused, untouched. */
    snprintf(other, sizeof other, "%s/notes", f->tmp);
    assert_int_equal(mkdir(other, 0700), 0);
    path_in(lock, sizeof lock, other, "README");
    fp = fopen(lock, "w");
    assert_non_null(fp);
    fputs("mine\n", fp);
    fclose(fp);
    char err[1024] = "";
    assert_int_equal(st_store_open(NULL, other, &ID, &s, err, sizeof err), CM_ECORRUPT);
    assert_non_null(strstr(err, "1 file (README)"));
    int n;
    char **names = dir_names(other, &n);
    assert_int_equal(n, 1);
    names_free(names, n);
    /* Nothing to repair there, nor in a directory of stores, nor in none. */
    assert_int_equal(st_store_repair(other, err, sizeof err), CM_ENOTFOUND);
    assert_non_null(strstr(err, "no LevelDB file"));
    assert_int_equal(st_store_repair(f->tmp, err, sizeof err), CM_ENOTFOUND);
    assert_non_null(strstr(err, "shard-<i>"));
    snprintf(other, sizeof other, "%s/nowhere", f->tmp);
    assert_int_equal(st_store_repair(other, err, sizeof err), CM_ENOTFOUND);
    assert_non_null(strstr(err, "no such directory"));
    assert_int_equal(access(other, F_OK), -1); /* Not created either. */
}

static void test_refused_by_leveldb_then_repaired(void **state) {
    fixture *f = *state;
    blobset b1 = {0}, b2 = {0};
    char current[160];
    two_generations(f->db, &b1, &b2, current);
    /* CURRENT names a MANIFEST that is gone. */
    FILE *fp = fopen(current, "w");
    assert_non_null(fp);
    fputs("MANIFEST-999999\n", fp);
    fclose(fp);

    size_t before_len, after_len;
    uint8_t *before = dir_snapshot(f->db, 1, NULL, &before_len);
    char err[1024] = "";
    st_store *s = NULL;
    assert_int_equal(st_store_open(NULL, f->db, &ID, &s, err, sizeof err), CM_ECORRUPT);
    assert_null(s);
    assert_non_null(strstr(err, "MANIFEST-999999"));
    assert_non_null(strstr(err, "psserver --repair"));
    /* LevelDB itself rotated its LOG; every data file is as it was. */
    uint8_t *after = dir_snapshot(f->db, 1, NULL, &after_len);
    expect_same_snapshot(before, before_len, after, after_len);
    free(before);
    free(after);

    assert_int_equal(st_store_repair(f->db, err, sizeof err), 2);
    s = open_ok(f->db, NULL);
    expect_committed(s, (const int64_t[]){2, 1}, 2);
    expect_load(s, 1, &b1, "one");
    expect_load(s, 2, &b2, "two");
    st_store_close(s);
    /* A store open in another process is not repaired under its feet
     * (LevelDB's repair takes no lock of its own). */
    s = open_ok(f->db, NULL);
    checkpoint_ok(s, 3, &b1, "three"); /* In the log, which a repair would rewrite. */
    /* Its log: what a repair would turn into a table file (compactions,
     * which may run now, leave it alone). */
    before = dir_snapshot(f->db, 1, ".log", &before_len);
    assert_true(before_len > 3 * MIB);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char e2[512] = "";
        int rc = st_store_repair(f->db, e2, sizeof e2);
        _exit(rc == CM_EIO && strstr(e2, "in use by another process") ? 0 : 1);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    after = dir_snapshot(f->db, 1, ".log", &after_len);
    expect_same_snapshot(before, before_len, after, after_len);
    free(before);
    free(after);
    expect_load(s, 3, &b1, "three");
    st_store_close(s);
    set_free(&b1);
    set_free(&b2);
}

/* ===== Damaged generations and the fallback ===== */

/* Flip one bit of the only copy of blob bytes 'at' in the table files of
 * 'dir' (the store closed): the bytes are found by their contents, so the
 * flip lands in a value, where only the store's hash can notice it. */
static void flip_bit_in_tables(const char *dir, const uint8_t *at, size_t n) {
    int nn, hits = 0;
    char **names = dir_names(dir, &nn);
    for (int i = 0; i < nn; i++) {
        size_t l = strlen(names[i]);
        if (l < 4 || strcmp(names[i] + l - 4, ".ldb") != 0) continue;
        char path[512];
        path_in(path, sizeof path, dir, names[i]);
        size_t flen;
        uint8_t *bytes = slurp(path, &flen);
        for (size_t off = 0; off + n <= flen; off++) {
            if (memcmp(bytes + off, at, n) != 0) continue;
            hits++;
            FILE *fp = fopen(path, "r+b");
            assert_non_null(fp);
            uint8_t b = bytes[off + n / 2] ^ 0x08;
            assert_int_equal(fseek(fp, (long)(off + n / 2), SEEK_SET), 0);
            assert_int_equal(fwrite(&b, 1, 1, fp), 1);
            fclose(fp);
        }
        free(bytes);
    }
    names_free(names, nn);
    assert_int_equal(hits, 1);
}

static void test_flipped_bit_falls_back(void **state) {
    fixture *f = *state;
    blobset b[3];
    memset(b, 0, sizeof b);
    st_store *s = open_ok(f->db, NULL);
    for (int g = 0; g < 3; g++) {
        set_add(&b[g], 0, 0, 2 * MIB, 100 + 10 * (uint64_t)g);
        set_add(&b[g], 0, 1, 2 * MIB, 101 + 10 * (uint64_t)g);
        set_add(&b[g], 1, 0, 100, 102 + 10 * (uint64_t)g);
        checkpoint_ok(s, g + 1, &b[g], NULL);
    }
    st_store_close(s);
    /* Opened once more, LevelDB writes its log out as a table file. */
    s = open_ok(f->db, NULL);
    st_store_close(s);
    const uint8_t *newest = b[2].b[1].data; /* Version 3, part 0 kind 1. */
    flip_bit_in_tables(f->db, newest + MIB + 4321, 64);

    s = open_ok(f->db, NULL);
    int64_t v = -1;
    assert_int_equal(st_store_latest(s, &v, NULL, 0), CM_OK);
    assert_int_equal(v, 3); /* Its commit record is fine... */
    char err[512] = "";
    assert_int_equal(st_store_newest_intact(s, &v, err, sizeof err), CM_OK);
    assert_int_equal(v, 2); /* ...but not its blob: the one before it is. */
    st_damage d[4];
    assert_int_equal(st_store_damaged(s, d, 4), 1);
    assert_int_equal(d[0].version, 3);
    assert_non_null(strstr(d[0].why, "version 3, part 0 kind 1"));
    assert_non_null(strstr(d[0].why, "checksum"));
    /* A damaged generation is not offered, nor loadable; the others are. */
    expect_committed(s, (const int64_t[]){2, 1}, 2);
    assert_int_equal(st_store_latest(s, &v, NULL, 0), CM_OK);
    assert_int_equal(v, 2);
    got g = {.fail_at = -1};
    assert_int_equal(st_store_load(s, 3, collect, &g, NULL, NULL, err, sizeof err), CM_ECORRUPT);
    got_free(&g);
    assert_int_equal(st_store_verify(s, 3, err, sizeof err), CM_ECORRUPT);
    assert_non_null(strstr(err, "part 0 kind 1"));
    assert_int_equal(st_store_verify(s, 2, err, sizeof err), CM_OK);
    expect_load(s, 2, &b[1], NULL);
    assert_int_equal(st_store_newest_intact(s, &v, err, sizeof err), CM_OK);
    assert_int_equal(v, 2);
    /* Never deleted by the fallback, nor by a collection that would leave
     * only it; one that keeps the intact version 2 drops version 1 only. */
    assert_int_equal(st_store_drop_older(s, 3, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "newer ones are damaged"));
    assert_int_equal(st_store_drop_older(s, 2, err, sizeof err), CM_OK);
    expect_committed(s, (const int64_t[]){2}, 1);
    st_store_close(s);
    assert_int_equal(raw_count_generation(f->db, 3), 5);
    assert_int_equal(raw_count_generation(f->db, 1), 0);

    /* Written again, version 3 is whole and offered again. */
    s = open_ok(f->db, NULL);
    assert_int_equal(st_store_newest_intact(s, &v, err, sizeof err), CM_OK);
    assert_int_equal(v, 2);
    checkpoint_ok(s, 3, &b[2], NULL);
    assert_int_equal(st_store_damaged(s, NULL, 0), 0);
    expect_committed(s, (const int64_t[]){3, 2}, 2);
    assert_int_equal(st_store_newest_intact(s, &v, err, sizeof err), CM_OK);
    assert_int_equal(v, 3);
    st_store_close(s);
    for (int i = 0; i < 3; i++) set_free(&b[i]);
}

/* ===== The rollback rule ===== */

static void test_newest_common(void **state) {
    (void)state;
    const int64_t a[] = {5, 3, 1}, b[] = {3, 1}, c[] = {5, 3};
    const int64_t *const v[] = {a, b, c};
    const int n[] = {3, 2, 2};
    assert_int_equal(st_newest_common(v, n, 3), 3);
    assert_int_equal(st_newest_common(v, n, 1), 5);

    const int64_t d[] = {4, 2}, e[] = {5, 3};
    const int64_t *const w[] = {d, e};
    const int m[] = {2, 2};
    assert_int_equal(st_newest_common(w, m, 2), -1);

    /* Order does not matter; a shard with nothing means no common one. */
    const int64_t x[] = {1, 9, 4}, y[] = {4, 9};
    const int64_t *const u[] = {x, y};
    const int k[] = {3, 2};
    assert_int_equal(st_newest_common(u, k, 2), 9);
    const int k0[] = {3, 0};
    assert_int_equal(st_newest_common(u, k0, 2), -1);
    assert_int_equal(st_newest_common(u, k, 0), -1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
#define T(fn) cmocka_unit_test_setup_teardown(fn, fx_setup, fx_teardown)
        T(test_round_trip),
        T(test_reopen_sees_committed),
        T(test_refuses_other_model_or_shard),
        T(test_drop_older_keeps_newer),
        T(test_drop_newer_and_replace),
        T(test_checkpoint_rejects_bad_args),
        T(test_crash_before_commit_keeps_previous),
        T(test_drop_older_removes_crash_leftovers),
        T(test_corrupt_blob_is_detected),
        T(test_commit_record_is_checked),
        T(test_lost_current_is_refused_untouched),
        T(test_missing_or_empty_dir_is_new_store),
        T(test_refused_by_leveldb_then_repaired),
        T(test_flipped_bit_falls_back),
        cmocka_unit_test(test_newest_common),
#undef T
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
