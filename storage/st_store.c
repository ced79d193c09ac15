/* st_store.c - a shard's versioned checkpoints on LevelDB's C API.
 * SPDX-License-Identifier: MIT
 *
 * Implements st_store.h; the key layout and the commit protocol are
 * described there. This is the only file that includes <leveldb/c.h> (the
 * unit test opens a store's database directly to damage it). LevelDB's
 * errptr strings are turned into CM_EIO here, once, and freed at once.
 */
#include "storage/st_store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <leveldb/c.h>
#include <xxhash.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"

/* ===== Constants ===== */

#define MIB ((size_t)1 << 20)
#define DEFAULT_BUFFER (64 * MIB) /* Tuned options, docs/GRPC_LEVELDB_NOTES.md L5. */
#define DEFAULT_BATCH MIB         /* Synced batch size, docs/GRPC_LEVELDB_NOTES.md L4. */
#define CHUNK ((uint32_t)MIB)     /* Largest value: one blob chunk. */

#define IDENTITY_MAGIC 0x50534931u /* "PSI1" */
#define COMMIT_MAGIC 0x50534331u   /* "PSC1" */
#define HASH_SEED 0x73745f73746f7265ULL /* "st_store" */

#define GEN_KEY_LEN 21    /* 'g' ver64 part32 kind32 chunk32 */
#define VER_KEY_LEN 9     /* 'g' ver64 or 'c' ver64 */
#define DESC_MAX 1024     /* Identity descriptions are cut to this. */
#define DELETE_BATCH 4096 /* Keys per batch when deleting a generation. */

/* The identity record's key. */
static const char IDENTITY_KEY[] = "midentity";

/* Commit record: header, one entry per blob, extra, then a hash of all
 * that. The header is magic32 ver64 chunk32 nblobs32 extra_len32 and every
 * entry part32 kind32 len64 hash64. */
#define COMMIT_HEADER 24
#define COMMIT_ENTRY 24

/* ===== The store ===== */

struct st_store {
    /* Set at open, read-only afterwards. */
    leveldb_t *db;
    leveldb_options_t *opts;
    leveldb_writeoptions_t *wsync;   /* sync=true: everything that must last. */
    leveldb_writeoptions_t *wlazy;   /* sync=false: deleting garbage. */
    leveldb_readoptions_t *rscan;    /* fill_cache=false for bulk reads. */
    leveldb_readoptions_t *rpoint;
    char *dir;
    size_t batch_bytes;
    void (*before_commit)(void *ud);
    void *hook_ud;
    int mu_init;
    /* Serialises every public call, so that a checkpoint, a load and a
     * garbage collection never interleave. */
    pthread_mutex_t mu;
    /* Under mu: the generations found damaged, newest first. */
    st_damage *damaged;
    int ndamaged, damaged_cap;
};

/* ===== Encoding ===== */

static void put_be32(uint8_t *p, uint32_t v) {
    for (int i = 3; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

static void put_be64(uint8_t *p, uint64_t v) {
    for (int i = 7; i >= 0; i--, v >>= 8) p[i] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v = (v << 8) | p[i];
    return v;
}

static uint64_t get_be64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

static void gen_key(uint8_t *k, int64_t version, uint32_t part, uint32_t kind, uint32_t chunk) {
    k[0] = 'g';
    put_be64(k + 1, (uint64_t)version);
    put_be32(k + 9, part);
    put_be32(k + 13, kind);
    put_be32(k + 17, chunk);
}

/* 'g' ver64 (the prefix of a generation's chunks) or 'c' ver64. */
static void ver_key(uint8_t *k, char type, int64_t version) {
    k[0] = (uint8_t)type;
    put_be64(k + 1, (uint64_t)version);
}

/* Blob and record hashes: XXH64 from Debian's libxxhash. */
static uint64_t xxh64(const void *data, size_t len, uint64_t seed) {
    return (uint64_t)XXH64(data, len, seed);
}

/* ===== Commit records ===== */

typedef struct blob_meta {
    uint32_t part, kind;
    uint64_t len, hash;
} blob_meta;

typedef struct commit_rec {
    int64_t version;
    uint32_t chunk;
    uint32_t nblobs;
    blob_meta *blobs; /* Owned; free(). */
    const uint8_t *extra; /* Borrowed from the encoded record. */
    size_t extra_len;
} commit_rec;

/* Encode into a new buffer (free()) of *len bytes. */
static uint8_t *commit_encode(const commit_rec *c, size_t *len) {
    size_t n = COMMIT_HEADER + (size_t)c->nblobs * COMMIT_ENTRY + c->extra_len + 8;
    uint8_t *b = cm_malloc(n);
    put_be32(b, COMMIT_MAGIC);
    put_be64(b + 4, (uint64_t)c->version);
    put_be32(b + 12, c->chunk);
    put_be32(b + 16, c->nblobs);
    put_be32(b + 20, (uint32_t)c->extra_len);
    uint8_t *p = b + COMMIT_HEADER;
    for (uint32_t i = 0; i < c->nblobs; i++, p += COMMIT_ENTRY) {
        put_be32(p, c->blobs[i].part);
        put_be32(p + 4, c->blobs[i].kind);
        put_be64(p + 8, c->blobs[i].len);
        put_be64(p + 16, c->blobs[i].hash);
    }
    if (c->extra_len) memcpy(p, c->extra, c->extra_len);
    p += c->extra_len;
    put_be64(p, xxh64(b, n - 8, HASH_SEED));
    *len = n;
    return b;
}

static int cmp_blob_meta(const void *a, const void *b) {
    const blob_meta *x = a, *y = b;
    if (x->part != y->part) return x->part < y->part ? -1 : 1;
    if (x->kind != y->kind) return x->kind < y->kind ? -1 : 1;
    return 0;
}

/* Decode and verify 'b' (the record of 'version'). Returns CM_OK, with
 * c->blobs sorted by (part, kind) to free(), or CM_ECORRUPT with c->blobs
 * NULL and what is wrong in 'why' (which may be NULL): a record that lists
 * a blob twice is refused, even with a hash that matches, since a load
 * would then never hand over some other blob the caller expects. */
static int commit_decode(const uint8_t *b, size_t n, int64_t version, commit_rec *c, char *why,
                         size_t whylen) {
    memset(c, 0, sizeof *c);
    if (n < COMMIT_HEADER + 8) {
        cm_seterr(why, whylen, "is truncated (%zu bytes)", n);
        goto fail;
    }
    if (get_be64(b + n - 8) != xxh64(b, n - 8, HASH_SEED)) {
        cm_seterr(why, whylen, "fails its checksum");
        goto fail;
    }
    if (get_be32(b) != COMMIT_MAGIC || get_be64(b + 4) != (uint64_t)version) {
        cm_seterr(why, whylen, "is not a commit record of this version");
        goto fail;
    }
    c->version = version;
    c->chunk = get_be32(b + 12);
    c->nblobs = get_be32(b + 16);
    c->extra_len = get_be32(b + 20);
    if (c->chunk == 0) {
        cm_seterr(why, whylen, "has a chunk size of 0");
        goto fail;
    }
    /* nblobs < 2^32 and extra_len < 2^32, so this cannot overflow. */
    uint64_t want = (uint64_t)COMMIT_HEADER + (uint64_t)c->nblobs * COMMIT_ENTRY + c->extra_len + 8;
    if (want != n) {
        cm_seterr(why, whylen, "is %zu bytes, not the %llu its header implies", n,
                  (unsigned long long)want);
        goto fail;
    }
    c->blobs = cm_calloc(c->nblobs, sizeof *c->blobs);
    const uint8_t *p = b + COMMIT_HEADER;
    for (uint32_t i = 0; i < c->nblobs; i++, p += COMMIT_ENTRY) {
        c->blobs[i].part = get_be32(p);
        c->blobs[i].kind = get_be32(p + 4);
        c->blobs[i].len = get_be64(p + 8);
        c->blobs[i].hash = get_be64(p + 16);
    }
    c->extra = p;
    /* st_store_checkpoint writes them sorted; a record written otherwise
     * is read in that order all the same, and one listing a (part, kind)
     * twice is corrupt (fuzz/corpus/fuzz_store/regress_blob_order). */
    qsort(c->blobs, c->nblobs, sizeof *c->blobs, cmp_blob_meta);
    for (uint32_t i = 1; i < c->nblobs; i++) {
        if (cmp_blob_meta(&c->blobs[i - 1], &c->blobs[i]) == 0) {
            cm_seterr(why, whylen, "lists part %u kind %u twice", c->blobs[i].part,
                      c->blobs[i].kind);
            free(c->blobs);
            goto fail;
        }
    }
    return CM_OK;
fail:
    memset(c, 0, sizeof *c);
    return CM_ECORRUPT;
}

/* ===== Damaged generations ===== */

/* The list is short (a store keeps a few generations) and kept newest
 * first; s->mu is held by every caller. */
static int damage_find(const st_store *s, int64_t v) {
    for (int i = 0; i < s->ndamaged; i++)
        if (s->damaged[i].version == v) return i;
    return -1;
}

static int damage_has(const st_store *s, int64_t v) { return damage_find(s, v) >= 0; }

static void damage_mark(st_store *s, int64_t v, const char *why) {
    int i = damage_find(s, v);
    if (i < 0) {
        if (s->ndamaged == s->damaged_cap) {
            s->damaged_cap = s->damaged_cap ? 2 * s->damaged_cap : 4;
            s->damaged = cm_realloc(s->damaged, (size_t)s->damaged_cap * sizeof *s->damaged);
        }
        for (i = s->ndamaged; i > 0 && s->damaged[i - 1].version < v; i--)
            s->damaged[i] = s->damaged[i - 1];
        s->ndamaged++;
        s->damaged[i].version = v;
    }
    snprintf(s->damaged[i].why, sizeof s->damaged[i].why, "%s", why);
}

static void damage_forget(st_store *s, int64_t v) {
    int i = damage_find(s, v);
    if (i < 0) return;
    memmove(&s->damaged[i], &s->damaged[i + 1], (size_t)(s->ndamaged - i - 1) * sizeof *s->damaged);
    s->ndamaged--;
}

/* ===== LevelDB helpers ===== */

/* LevelDB reports what it found damaged as "Corruption: ...": CM_ECORRUPT;
 * its other errors are CM_EIO. */
static int ldb_code(const char *e) {
    return strncmp(e, "Corruption:", 11) == 0 ? CM_ECORRUPT : CM_EIO;
}

/* Write 'b' (sync or not); CM_EIO with a message naming 'what'. */
static int db_write(st_store *s, leveldb_writebatch_t *b, int sync, const char *what, char *err,
                    size_t errlen) {
    char *e = NULL;
    leveldb_write(s->db, sync ? s->wsync : s->wlazy, b, &e);
    if (e) {
        cm_seterr(err, errlen, "store %s: %s: %s", s->dir, what, e);
        leveldb_free(e);
        return CM_EIO;
    }
    return CM_OK;
}

/* Get 'key' into *val (leveldb_free) or NULL if absent. */
static int db_get(st_store *s, const uint8_t *key, size_t klen, char **val, size_t *vlen,
                  char *err, size_t errlen) {
    char *e = NULL;
    *val = leveldb_get(s->db, s->rpoint, (const char *)key, klen, vlen, &e);
    if (e) {
        int rc = ldb_code(e);
        cm_seterr(err, errlen, "store %s: read failed: %s", s->dir, e);
        leveldb_free(e);
        *val = NULL;
        return rc;
    }
    return CM_OK;
}

/* CM_ECORRUPT or CM_EIO if the iterator hit an error. */
static int iter_status(st_store *s, leveldb_iterator_t *it, char *err, size_t errlen) {
    char *e = NULL;
    leveldb_iter_get_error(it, &e);
    if (e) {
        int rc = ldb_code(e);
        cm_seterr(err, errlen, "store %s: read failed: %s", s->dir, e);
        leveldb_free(e);
        return rc;
    }
    return CM_OK;
}

/* A growing array of versions. */
typedef struct ver_list {
    int64_t *v;
    int n, cap;
} ver_list;

static void ver_push(ver_list *l, int64_t v) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 16;
        int64_t *nv = cm_malloc((size_t)cap * sizeof *nv);
        if (l->n) memcpy(nv, l->v, (size_t)l->n * sizeof *nv);
        free(l->v);
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}

static int ver_has(const ver_list *l, int64_t v) {
    for (int i = 0; i < l->n; i++)
        if (l->v[i] == v) return 1;
    return 0;
}

/* The distinct versions under prefix 'type' ('g' or 'c'), ascending. With
 * 'verify' (for 'c' only) only records that decode are listed. Skips from
 * one version to the next with a seek, so a generation's chunks are not
 * read one by one. */
static int list_versions(st_store *s, char type, int verify, ver_list *out, char *err,
                         size_t errlen) {
    int rc = CM_OK;
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, s->rscan);
    uint8_t k[VER_KEY_LEN];
    memset(out, 0, sizeof *out);
    ver_key(k, type, 0);
    leveldb_iter_seek(it, (const char *)k, sizeof k);
    while (leveldb_iter_valid(it)) {
        size_t klen;
        const uint8_t *key = (const uint8_t *)leveldb_iter_key(it, &klen);
        if (klen < VER_KEY_LEN || key[0] != (uint8_t)type) break;
        uint64_t v = get_be64(key + 1);
        if (v > (uint64_t)INT64_MAX) break; /* Not ours: versions are >= 0. */
        int ok = 1;
        if (verify) {
            size_t vlen;
            const uint8_t *val = (const uint8_t *)leveldb_iter_value(it, &vlen);
            commit_rec c = {0};
            char why[128] = "has a key of the wrong length";
            ok = klen == VER_KEY_LEN &&
                 commit_decode(val, vlen, (int64_t)v, &c, why, sizeof why) == CM_OK;
            free(c.blobs);
            if (!ok) cm_warn("store %s: the commit record of version %lld %s; ignored", s->dir,
                             (long long)v, why);
        }
        if (ok) ver_push(out, (int64_t)v);
        if (v == (uint64_t)INT64_MAX) break;
        ver_key(k, type, (int64_t)(v + 1));
        leveldb_iter_seek(it, (const char *)k, sizeof k);
    }
    rc = iter_status(s, it, err, errlen);
    leveldb_iter_destroy(it);
    if (rc != CM_OK) {
        free(out->v);
        memset(out, 0, sizeof *out);
    }
    return rc;
}

/* Delete every key that starts with 'prefix', in unsynced batches: what is
 * deleted here is garbage either way, and a delete lost in a crash only
 * leaves garbage for the next collection. */
static int delete_prefix(st_store *s, const uint8_t *prefix, size_t plen, char *err,
                         size_t errlen) {
    int rc = CM_OK;
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, s->rscan);
    leveldb_writebatch_t *b = leveldb_writebatch_create();
    int pending = 0;
    leveldb_iter_seek(it, (const char *)prefix, plen);
    for (; leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t klen;
        const char *key = leveldb_iter_key(it, &klen);
        if (klen < plen || memcmp(key, prefix, plen) != 0) break;
        leveldb_writebatch_delete(b, key, klen);
        if (++pending == DELETE_BATCH) {
            rc = db_write(s, b, 0, "delete failed", err, errlen);
            if (rc != CM_OK) goto fail;
            leveldb_writebatch_clear(b);
            pending = 0;
        }
    }
    rc = iter_status(s, it, err, errlen);
    if (rc != CM_OK) goto fail;
    if (pending) rc = db_write(s, b, 0, "delete failed", err, errlen);
fail:
    leveldb_writebatch_destroy(b);
    leveldb_iter_destroy(it);
    return rc;
}

/* Remove the commit records of 'versions' in one synced batch, then their
 * generations' chunks. Records go first so that a crash in between leaves
 * uncommitted garbage, never a commit without its data. A dropped
 * generation is no longer listed as damaged. */
static int drop_versions(st_store *s, const ver_list *commits, const ver_list *gens, char *err,
                         size_t errlen) {
    int rc = CM_OK;
    uint8_t k[VER_KEY_LEN];
    if (commits->n > 0) {
        leveldb_writebatch_t *b = leveldb_writebatch_create();
        for (int i = 0; i < commits->n; i++) {
            ver_key(k, 'c', commits->v[i]);
            leveldb_writebatch_delete(b, (const char *)k, sizeof k);
        }
        rc = db_write(s, b, 1, "deleting commit records failed", err, errlen);
        leveldb_writebatch_destroy(b);
        if (rc != CM_OK) goto fail;
    }
    for (int i = 0; i < commits->n; i++) damage_forget(s, commits->v[i]);
    for (int i = 0; i < gens->n; i++) {
        ver_key(k, 'g', gens->v[i]);
        rc = delete_prefix(s, k, sizeof k, err, errlen);
        if (rc != CM_OK) goto fail;
    }
fail:
    return rc;
}

/* ===== Identity ===== */

/* magic32 fingerprint64 shard32 desc_len32 desc hash64 */
static uint8_t *identity_encode(const st_identity *id, size_t *len) {
    const char *d = id->description ? id->description : "";
    size_t dl = strnlen(d, DESC_MAX);
    size_t n = 20 + dl + 8;
    uint8_t *b = cm_malloc(n);
    put_be32(b, IDENTITY_MAGIC);
    put_be64(b + 4, id->fingerprint);
    put_be32(b + 12, (uint32_t)id->shard);
    put_be32(b + 16, (uint32_t)dl);
    memcpy(b + 20, d, dl);
    put_be64(b + 20 + dl, xxh64(b, 20 + dl, HASH_SEED));
    *len = n;
    return b;
}

/* Check the stored identity 'b' against 'id'. */
static int identity_check(st_store *s, const uint8_t *b, size_t n, const st_identity *id,
                          char *err, size_t errlen) {
    if (n < 28 || get_be32(b) != IDENTITY_MAGIC ||
        get_be64(b + n - 8) != xxh64(b, n - 8, HASH_SEED) || (size_t)get_be32(b + 16) != n - 28) {
        cm_seterr(err, errlen, "store %s: the identity record is corrupt", s->dir);
        return CM_ECORRUPT;
    }
    uint64_t fp = get_be64(b + 4);
    int shard = (int)get_be32(b + 12);
    int dl = (int)(n - 28);
    int fp_differs = fp != id->fingerprint, shard_differs = shard != id->shard;
    if (!fp_differs && !shard_differs) return CM_OK;
    const char *what = fp_differs && shard_differs ? "the model or cluster shape, and the shard"
                       : fp_differs               ? "the model or cluster shape"
                                                  : "the shard";
    cm_seterr(err, errlen,
              "store %s was written for \"%.*s\" (fingerprint %016llx, shard %d), not for \"%s\" "
              "(fingerprint %016llx, shard %d): %s differ%s",
              s->dir, dl, (const char *)b + 20, (unsigned long long)fp, shard,
              id->description ? id->description : "", (unsigned long long)id->fingerprint,
              id->shard, what, fp_differs && shard_differs ? "" : "s");
    return CM_EINVAL;
}

/* Record 'id' in a new store, or check it in an existing one. */
static int identity_open(st_store *s, const st_identity *id, char *err, size_t errlen) {
    char *val = NULL;
    size_t vlen = 0;
    uint8_t *enc = NULL;
    int rc = db_get(s, (const uint8_t *)IDENTITY_KEY, sizeof IDENTITY_KEY - 1, &val, &vlen, err,
                    errlen);
    if (rc != CM_OK) goto fail;
    if (val) {
        rc = identity_check(s, (const uint8_t *)val, vlen, id, err, errlen);
        goto fail;
    }
    /* No identity: only an empty database may become a store. */
    leveldb_iterator_t *it = leveldb_create_iterator(s->db, s->rpoint);
    leveldb_iter_seek_to_first(it);
    int empty = !leveldb_iter_valid(it);
    rc = iter_status(s, it, err, errlen);
    leveldb_iter_destroy(it);
    if (rc != CM_OK) goto fail;
    if (!empty) {
        cm_seterr(err, errlen, "store %s: a LevelDB database without an identity record: "
                  "not a checkpoint store", s->dir);
        rc = CM_ECORRUPT;
        goto fail;
    }
    size_t n;
    enc = identity_encode(id, &n);
    char *e = NULL;
    leveldb_put(s->db, s->wsync, IDENTITY_KEY, sizeof IDENTITY_KEY - 1, (const char *)enc, n, &e);
    if (e) {
        cm_seterr(err, errlen, "store %s: writing the identity failed: %s", s->dir, e);
        leveldb_free(e);
        rc = CM_EIO;
    }
fail:
    free(enc);
    if (val) leveldb_free(val);
    return rc;
}

/* ===== Records ===== */

/* A record's key: "r" then its name, apart from the generations' keys. The
 * value is the bytes followed by their XXH64, so a damaged record is
 * refused rather than read. */
static size_t record_key(uint8_t *k, size_t cap, const char *name) {
    size_t n = strnlen(name, cap - 1);
    k[0] = 'r';
    memcpy(k + 1, name, n);
    return n + 1;
}

int st_store_put_record(st_store *s, const char *name, const void *data, size_t len, char *err,
                        size_t errlen) {
    uint8_t k[72];
    size_t kl = record_key(k, sizeof k, name);
    uint8_t *v = cm_malloc(len + 8);
    if (len) memcpy(v, data, len);
    put_be64(v + len, xxh64(data, len, HASH_SEED));
    pthread_mutex_lock(&s->mu);
    char *e = NULL;
    leveldb_put(s->db, s->wsync, (const char *)k, kl, (const char *)v, len + 8, &e);
    pthread_mutex_unlock(&s->mu);
    free(v);
    if (e) {
        cm_seterr(err, errlen, "store %s: writing record %s failed: %s", s->dir, name, e);
        leveldb_free(e);
        return CM_EIO;
    }
    return CM_OK;
}

int st_store_get_record(st_store *s, const char *name, void **data, size_t *len, char *err,
                        size_t errlen) {
    uint8_t k[72];
    size_t kl = record_key(k, sizeof k, name);
    char *val = NULL;
    size_t vlen = 0;
    *data = NULL;
    *len = 0;
    pthread_mutex_lock(&s->mu);
    int rc = db_get(s, k, kl, &val, &vlen, err, errlen);
    pthread_mutex_unlock(&s->mu);
    if (rc != CM_OK) return rc;
    if (!val) return CM_ENOTFOUND;
    if (vlen < 8 || get_be64((const uint8_t *)val + vlen - 8) != xxh64(val, vlen - 8, HASH_SEED)) {
        leveldb_free(val);
        cm_seterr(err, errlen, "store %s: record %s is corrupt", s->dir, name);
        return CM_ECORRUPT;
    }
    *data = cm_malloc(vlen - 8 + 1);
    memcpy(*data, val, vlen - 8);
    *len = vlen - 8;
    leveldb_free(val);
    return CM_OK;
}

/* ===== Open and close ===== */

/* LevelDB's files that hold no data: a directory with nothing else in it
 * is empty, so a crash in a store's very first open does not make its
 * directory look like a lost database. */
static int bookkeeping_file(const char *name) {
    return strcmp(name, "LOCK") == 0 || strcmp(name, "LOG") == 0 || strcmp(name, "LOG.old") == 0;
}

/* The names LevelDB gives the files of a database. */
static int leveldb_file(const char *name) {
    size_t n = strlen(name);
    if (strcmp(name, "CURRENT") == 0 || strncmp(name, "MANIFEST-", 9) == 0) return 1;
    return n > 4 && (strcmp(name + n - 4, ".ldb") == 0 || strcmp(name + n - 4, ".sst") == 0 ||
                     strcmp(name + n - 4, ".log") == 0);
}

/* What 'dir' holds, looked at before LevelDB touches it. */
typedef struct dir_info {
    int exists;
    int files;     /* Entries other than ".", ".." and bookkeeping files. */
    int ldb_files; /* Of which LevelDB's (leveldb_file). */
    int current;   /* Whether CURRENT is one of them. */
    char first[256]; /* The name of one of them, for messages. */
} dir_info;

static int dir_probe(const char *dir, dir_info *d, char *err, size_t errlen) {
    memset(d, 0, sizeof *d);
    DIR *dh = opendir(dir);
    if (!dh) {
        if (errno == ENOENT) return CM_OK;
        cm_seterr(err, errlen, "store %s: cannot read the directory: %s", dir, strerror(errno));
        return CM_EIO;
    }
    d->exists = 1;
    const struct dirent *e;
    while ((e = readdir(dh)) != NULL) {
        const char *name = e->d_name;
        if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0 || bookkeeping_file(name)) continue;
        d->files++;
        d->ldb_files += leveldb_file(name);
        d->current |= strcmp(name, "CURRENT") == 0;
        if (!d->first[0]) snprintf(d->first, sizeof d->first, "%s", name);
    }
    closedir(dh);
    return CM_OK;
}

/* A store for 'dir' with LevelDB's options set; not open yet. */
static st_store *store_new(const st_options *o, const char *dir) {
    static const st_options defaults;
    if (!o) o = &defaults;
    st_store *s = cm_calloc(1, sizeof *s);
    s->dir = cm_strdup(dir);
    s->batch_bytes = o->batch_bytes ? o->batch_bytes : DEFAULT_BATCH;
    s->before_commit = o->before_commit;
    s->hook_ud = o->hook_ud;
    pthread_mutex_init(&s->mu, NULL);
    s->mu_init = 1;

    s->opts = leveldb_options_create();
    size_t wbuf = o->write_buffer_size ? o->write_buffer_size : DEFAULT_BUFFER;
    size_t fsize = o->max_file_size ? o->max_file_size : DEFAULT_BUFFER;
    leveldb_options_set_write_buffer_size(s->opts, wbuf);
    leveldb_options_set_max_file_size(s->opts, fsize);
    leveldb_options_set_compression(s->opts, leveldb_no_compression);
    s->wsync = leveldb_writeoptions_create();
    leveldb_writeoptions_set_sync(s->wsync, 1);
    s->wlazy = leveldb_writeoptions_create();
    s->rscan = leveldb_readoptions_create();
    leveldb_readoptions_set_fill_cache(s->rscan, 0);
    s->rpoint = leveldb_readoptions_create();
    return s;
}

/* Open the database of s, creating it only when 'create'. A database that
 * LevelDB refuses to open as damaged or missing ("Corruption: ...", e.g. a
 * CURRENT naming a lost MANIFEST or missing table files; "Invalid argument:
 * ...", e.g. no CURRENT) is CM_ECORRUPT, with the remedy; the rest CM_EIO. */
static int store_open_db(st_store *s, int create, char *err, size_t errlen) {
    char *e = NULL;
    leveldb_options_set_create_if_missing(s->opts, create);
    s->db = leveldb_open(s->opts, s->dir, &e);
    if (!e) return CM_OK;
    int rc = ldb_code(e) == CM_ECORRUPT || strncmp(e, "Invalid argument:", 17) == 0 ? CM_ECORRUPT
                                                                                     : CM_EIO;
    if (rc == CM_ECORRUPT)
        cm_seterr(err, errlen, "cannot open store %s: %s; to rebuild its database from the "
                  "files that can still be read, run: psserver --repair %s", s->dir, e, s->dir);
    else
        cm_seterr(err, errlen, "cannot open store %s: %s", s->dir, e);
    leveldb_free(e);
    s->db = NULL;
    return rc;
}

int st_store_open(const st_options *o, const char *dir, const st_identity *id, st_store **out,
                  char *err, size_t errlen) {
    st_store *s = NULL;
    int rc = CM_EINVAL;
    *out = NULL;
    if (!dir || !*dir || !id || id->shard < 0) {
        cm_seterr(err, errlen, "st_store_open: invalid argument");
        goto fail;
    }
    /* LevelDB's create_if_missing takes a directory without CURRENT for a
     * new database, and then deletes every table file it finds there as
     * obsolete: a lost CURRENT would cost every generation, silently. So
     * only a directory without files may become a new store, and one with
     * files is left as it is, before LevelDB sees it (its open rotates the
     * LOG file even when it then refuses). */
    dir_info d;
    rc = dir_probe(dir, &d, err, errlen);
    if (rc != CM_OK) goto fail;
    if (d.files > 0 && !d.current) {
        cm_seterr(err, errlen, "store %s holds %d file%s (%s%s) but no LevelDB CURRENT file, so "
                  "no database that LevelDB can open; refusing to create a new store over them "
                  "(that would delete them). To rebuild the database from its table and log "
                  "files, run: psserver --repair %s", dir, d.files, d.files == 1 ? "" : "s",
                  d.first, d.files > 1 ? ", ..." : "", dir);
        rc = CM_ECORRUPT;
        goto fail;
    }
    s = store_new(o, dir);
    rc = store_open_db(s, d.files == 0, err, errlen);
    if (rc != CM_OK) goto fail;
    rc = identity_open(s, id, err, errlen);
    if (rc != CM_OK) goto fail;
    *out = s;
    return CM_OK;
fail:
    st_store_close(s);
    return rc;
}

/* LevelDB's repair does not take the database's lock: take it as LevelDB
 * does (an fcntl lock on 'dir'/LOCK), so that a store open in another
 * process is not rebuilt under its feet. Closing *fd releases it (and any
 * other lock of this process on the file, hence no store of 'dir' may be
 * open in this process). */
static int lock_dir(const char *dir, int *fd, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/LOCK", dir);
    *fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (*fd < 0) {
        cm_seterr(err, errlen, "store %s: cannot open %s: %s", dir, path, strerror(errno));
        return CM_EIO;
    }
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    if (fcntl(*fd, F_SETLK, &fl) != 0) {
        cm_seterr(err, errlen, "store %s is in use by another process (%s: %s)", dir, path,
                  strerror(errno));
        close(*fd);
        *fd = -1;
        return CM_EIO;
    }
    return CM_OK;
}

int st_store_repair(const char *dir, char *err, size_t errlen) {
    if (!dir || !*dir) {
        cm_seterr(err, errlen, "st_store_repair: invalid argument");
        return CM_EINVAL;
    }
    dir_info d;
    int rc = dir_probe(dir, &d, err, errlen);
    if (rc != CM_OK) return rc;
    if (!d.exists) {
        cm_seterr(err, errlen, "store %s: no such directory", dir);
        return CM_ENOTFOUND;
    }
    if (d.ldb_files == 0) {
        cm_seterr(err, errlen, "%s holds no LevelDB file, so nothing to repair (a data directory "
                  "holds one store per shard: repair %s/shard-<i>)", dir, dir);
        return CM_ENOTFOUND;
    }
    int fd;
    rc = lock_dir(dir, &fd, err, errlen);
    if (rc != CM_OK) return rc;
    st_store *s = store_new(NULL, dir);
    char *e = NULL;
    leveldb_repair_db(s->opts, dir, &e);
    close(fd); /* Before LevelDB takes the lock again for the open. */
    if (e) {
        rc = ldb_code(e);
        cm_seterr(err, errlen, "cannot repair store %s: %s", dir, e);
        leveldb_free(e);
        goto out;
    }
    rc = store_open_db(s, 0, err, errlen);
    if (rc != CM_OK) goto out;
    char *val = NULL;
    size_t vlen = 0;
    rc = db_get(s, (const uint8_t *)IDENTITY_KEY, sizeof IDENTITY_KEY - 1, &val, &vlen, err,
                errlen);
    if (rc != CM_OK) goto out;
    if (!val) {
        cm_seterr(err, errlen, "store %s was repaired, but its identity record did not survive "
                  "(or it never was a checkpoint store): it cannot be opened as a store", dir);
        rc = CM_ECORRUPT;
        goto out;
    }
    leveldb_free(val);
    ver_list l;
    rc = list_versions(s, 'c', 1, &l, err, errlen);
    if (rc == CM_OK) rc = l.n;
    free(l.v);
out:
    st_store_close(s);
    return rc;
}

void st_store_close(st_store *s) {
    if (!s) return;
    if (s->db) leveldb_close(s->db);
    if (s->opts) leveldb_options_destroy(s->opts);
    if (s->wsync) leveldb_writeoptions_destroy(s->wsync);
    if (s->wlazy) leveldb_writeoptions_destroy(s->wlazy);
    if (s->rscan) leveldb_readoptions_destroy(s->rscan);
    if (s->rpoint) leveldb_readoptions_destroy(s->rpoint);
    if (s->mu_init) pthread_mutex_destroy(&s->mu);
    free(s->damaged);
    free(s->dir);
    free(s);
}

/* ===== Checkpoint ===== */

/* Check the arguments and return the blob list sorted by (part, kind),
 * with 'hash' holding each blob's index in 'blobs' for now. */
static int checkpoint_plan(int64_t version, const st_blob *blobs, int nblobs, const void *extra,
                           size_t extra_len, blob_meta **plan, char *err, size_t errlen) {
    blob_meta *m = NULL;
    *plan = NULL;
    if (version < 0 || nblobs < 0 || (nblobs > 0 && !blobs) || extra_len > ST_EXTRA_MAX ||
        (extra_len > 0 && !extra)) {
        cm_seterr(err, errlen, "st_store_checkpoint: invalid argument (version %lld, %d blobs, "
                  "%zu bytes of extra)", (long long)version, nblobs, extra_len);
        goto fail;
    }
    m = cm_calloc((size_t)nblobs, sizeof *m);
    for (int i = 0; i < nblobs; i++) {
        if (blobs[i].len > 0 && !blobs[i].data) {
            cm_seterr(err, errlen, "st_store_checkpoint: blob of part %u kind %u has no data",
                      blobs[i].part, blobs[i].kind);
            goto fail;
        }
        m[i] = (blob_meta){blobs[i].part, blobs[i].kind, blobs[i].len, (uint64_t)i};
    }
    qsort(m, (size_t)nblobs, sizeof *m, cmp_blob_meta);
    for (int i = 1; i < nblobs; i++) {
        if (cmp_blob_meta(&m[i - 1], &m[i]) == 0) {
            cm_seterr(err, errlen, "st_store_checkpoint: part %u kind %u given twice", m[i].part,
                      m[i].kind);
            goto fail;
        }
    }
    *plan = m;
    return CM_OK;
fail:
    free(m);
    return CM_EINVAL;
}

/* Make room for generation 'version': unless it is new, remove its commit
 * record (synced) and then any chunks left from before. */
static int checkpoint_clear(st_store *s, int64_t version, char *err, size_t errlen) {
    uint8_t k[VER_KEY_LEN];
    char *val = NULL;
    size_t vlen;
    ver_key(k, 'c', version);
    int rc = db_get(s, k, sizeof k, &val, &vlen, err, errlen);
    if (rc != CM_OK) goto fail;
    if (val) {
        leveldb_free(val);
        leveldb_writebatch_t *b = leveldb_writebatch_create();
        leveldb_writebatch_delete(b, (const char *)k, sizeof k);
        rc = db_write(s, b, 1, "removing an old commit record failed", err, errlen);
        leveldb_writebatch_destroy(b);
        if (rc != CM_OK) goto fail;
    }
    ver_key(k, 'g', version);
    rc = delete_prefix(s, k, sizeof k, err, errlen);
fail:
    return rc;
}

/* Write every chunk of the planned blobs in synced batches of about
 * s->batch_bytes, and replace each plan entry's index with the blob's
 * hash. The hash is computed chunk by chunk just before the chunk is
 * copied into the batch (streaming XXH64 gives the same value as one
 * pass), so the copy reads the chunk from the cache, not from memory
 * again. */
static int checkpoint_blobs(st_store *s, int64_t version, const st_blob *blobs, blob_meta *plan,
                            int nblobs, char *err, size_t errlen) {
    int rc = CM_OK;
    XXH64_state_t *h = XXH64_createState();
    if (!h) {
        cm_seterr(err, errlen, "store %s: no memory for a hash state", s->dir);
        return CM_ENOMEM;
    }
    leveldb_writebatch_t *b = leveldb_writebatch_create();
    size_t pending = 0;
    int dirty = 0;
    uint8_t k[GEN_KEY_LEN];
    for (int i = 0; i < nblobs; i++) {
        const st_blob *blob = &blobs[plan[i].hash];
        const uint8_t *data = blob->data;
        XXH64_reset(h, HASH_SEED);
        /* An empty blob is one empty chunk, so that it exists on disk. */
        size_t off = 0;
        uint32_t c = 0;
        do {
            size_t n = blob->len - off < CHUNK ? blob->len - off : CHUNK;
            gen_key(k, version, blob->part, blob->kind, c);
            const char *v = n ? (const char *)data + off : "";
            XXH64_update(h, v, n);
            if (off + n == blob->len) plan[i].hash = (uint64_t)XXH64_digest(h);
            leveldb_writebatch_put(b, (const char *)k, sizeof k, v, n);
            dirty = 1;
            pending += n + sizeof k;
            off += n;
            c++;
            if (pending >= s->batch_bytes) {
                rc = db_write(s, b, 1, "checkpoint write failed", err, errlen);
                if (rc != CM_OK) goto fail;
                leveldb_writebatch_clear(b);
                pending = 0;
                dirty = 0;
            }
        } while (off < blob->len);
    }
    if (dirty) rc = db_write(s, b, 1, "checkpoint write failed", err, errlen);
fail:
    leveldb_writebatch_destroy(b);
    XXH64_freeState(h);
    return rc;
}

int st_store_checkpoint(st_store *s, int64_t version, const st_blob *blobs, int nblobs,
                        const void *extra, size_t extra_len, char *err, size_t errlen) {
    blob_meta *plan = NULL;
    uint8_t *rec = NULL;
    int rc = checkpoint_plan(version, blobs, nblobs, extra, extra_len, &plan, err, errlen);
    if (rc != CM_OK) return rc;
    pthread_mutex_lock(&s->mu);
    rc = checkpoint_clear(s, version, err, errlen);
    if (rc != CM_OK) goto fail;
    damage_forget(s, version); /* Whatever was damaged is gone. */
    rc = checkpoint_blobs(s, version, blobs, plan, nblobs, err, errlen);
    if (rc != CM_OK) goto fail;
    if (s->before_commit) s->before_commit(s->hook_ud);

    commit_rec c = {version, CHUNK, (uint32_t)nblobs, plan, extra, extra_len};
    size_t n;
    rec = commit_encode(&c, &n);
    uint8_t k[VER_KEY_LEN];
    ver_key(k, 'c', version);
    char *e = NULL;
    leveldb_put(s->db, s->wsync, (const char *)k, sizeof k, (const char *)rec, n, &e);
    if (e) {
        cm_seterr(err, errlen, "store %s: writing the commit record of version %lld failed: %s",
                  s->dir, (long long)version, e);
        leveldb_free(e);
        rc = CM_EIO;
    }
fail:
    pthread_mutex_unlock(&s->mu);
    free(rec);
    free(plan);
    return rc;
}

/* ===== Queries ===== */

int st_store_committed(st_store *s, int64_t *versions, int max, char *err, size_t errlen) {
    ver_list l;
    pthread_mutex_lock(&s->mu);
    int rc = list_versions(s, 'c', 1, &l, err, errlen);
    int n = 0;
    for (int i = l.n - 1; rc == CM_OK && i >= 0; i--) {
        if (damage_has(s, l.v[i])) continue;
        if (n < max) versions[n] = l.v[i];
        n++;
    }
    pthread_mutex_unlock(&s->mu);
    free(l.v);
    return rc != CM_OK ? rc : n;
}

int st_store_latest(st_store *s, int64_t *version, char *err, size_t errlen) {
    int64_t v = -1;
    int n = st_store_committed(s, &v, 1, err, errlen);
    if (n < 0) return n;
    if (n == 0) {
        cm_seterr(err, errlen, "store %s has no committed checkpoint", s->dir);
        return CM_ENOTFOUND;
    }
    *version = v;
    return CM_OK;
}

/* ===== Load ===== */

/* Read and decode the commit record of 'version' into *c (c->blobs to
 * free(), and *val, into which c->extra points, to leveldb_free()). */
static int commit_read(st_store *s, int64_t version, commit_rec *c, char **val, char *err,
                       size_t errlen) {
    uint8_t k[VER_KEY_LEN];
    size_t vlen = 0;
    memset(c, 0, sizeof *c);
    ver_key(k, 'c', version);
    int rc = db_get(s, k, sizeof k, val, &vlen, err, errlen);
    if (rc != CM_OK) return rc;
    if (!*val) {
        cm_seterr(err, errlen, "store %s: version %lld is not committed", s->dir,
                  (long long)version);
        return CM_ENOTFOUND;
    }
    char why[128];
    rc = commit_decode((const uint8_t *)*val, vlen, version, c, why, sizeof why);
    if (rc != CM_OK)
        cm_seterr(err, errlen, "store %s: the commit record of version %lld %s", s->dir,
                  (long long)version, why);
    return rc;
}

/* Read blob 'm' of 'version' (chunk size 'chunk'): its chunks must follow
 * each other exactly, with the lengths its length implies, and no further
 * chunk of it may follow. They are hashed as they come and, unless 'buf'
 * is NULL, copied into it. The iterator is positioned by a seek on the
 * first chunk, then steps through the others. */
static int scan_blob(st_store *s, leveldb_iterator_t *it, XXH64_state_t *h, int64_t version,
                     uint32_t chunk, const blob_meta *m, uint8_t *buf, char *err, size_t errlen) {
    uint8_t k[GEN_KEY_LEN];
    uint64_t off = 0;
    uint32_t c = 0;
    XXH64_reset(h, HASH_SEED);
    do {
        gen_key(k, version, m->part, m->kind, c);
        if (c == 0)
            leveldb_iter_seek(it, (const char *)k, sizeof k);
        else
            leveldb_iter_next(it);
        size_t klen = 0, vlen = 0;
        const char *key = leveldb_iter_valid(it) ? leveldb_iter_key(it, &klen) : NULL;
        if (!key || klen != sizeof k || memcmp(key, k, sizeof k) != 0) {
            int rc = iter_status(s, it, err, errlen);
            if (rc != CM_OK) return rc;
            cm_seterr(err, errlen, "store %s: version %lld, part %u kind %u: chunk %u is missing",
                      s->dir, (long long)version, m->part, m->kind, c);
            return CM_ECORRUPT;
        }
        const char *val = leveldb_iter_value(it, &vlen);
        uint64_t want = m->len - off < chunk ? m->len - off : chunk;
        if (vlen != want) {
            cm_seterr(err, errlen, "store %s: version %lld, part %u kind %u: chunk %u has %zu "
                      "bytes, expected %llu", s->dir, (long long)version, m->part, m->kind, c,
                      vlen, (unsigned long long)want);
            return CM_ECORRUPT;
        }
        XXH64_update(h, val, vlen);
        if (buf && vlen) memcpy(buf + off, val, vlen);
        off += vlen;
        c++;
    } while (off < m->len);
    /* A chunk more: the blob on disk is longer than its record says. */
    leveldb_iter_next(it);
    size_t klen = 0;
    const char *key = leveldb_iter_valid(it) ? leveldb_iter_key(it, &klen) : NULL;
    if (!key) {
        int rc = iter_status(s, it, err, errlen);
        if (rc != CM_OK) return rc;
    } else if (klen >= GEN_KEY_LEN - 4 && memcmp(key, k, GEN_KEY_LEN - 4) == 0) {
        cm_seterr(err, errlen, "store %s: version %lld, part %u kind %u: a chunk follows the %u "
                  "that its %llu bytes take", s->dir, (long long)version, m->part, m->kind, c,
                  (unsigned long long)m->len);
        return CM_ECORRUPT;
    }
    if ((uint64_t)XXH64_digest(h) != m->hash) {
        cm_seterr(err, errlen, "store %s: version %lld, part %u kind %u (%llu bytes) fails its "
                  "checksum", s->dir, (long long)version, m->part, m->kind,
                  (unsigned long long)m->len);
        return CM_ECORRUPT;
    }
    return CM_OK;
}

/* Read committed generation 'version' (s->mu held) and check its commit
 * record and every blob. With 'fn', hand each blob over, in a buffer the
 * size of the largest, and copy the extra record out (st_store_load);
 * without, only check (st_store_verify). The verdict is remembered
 * (damage_mark, damage_forget); a refusal by 'fn' is the caller's and is
 * not a verdict. */
static int read_generation(st_store *s, int64_t version, st_blob_fn fn, void *ud, void **extra,
                           size_t *extra_len, char *err, size_t errlen) {
    char msg[sizeof ((st_damage *)0)->why] = "";
    char *val = NULL;
    commit_rec c = {0};
    uint8_t *buf = NULL;
    leveldb_iterator_t *it = NULL;
    XXH64_state_t *h = NULL;
    int by_caller = 0;
    int rc = commit_read(s, version, &c, &val, msg, sizeof msg);
    if (rc != CM_OK) goto fail;
    if (fn) {
        uint64_t max = 0;
        for (uint32_t i = 0; i < c.nblobs; i++)
            if (c.blobs[i].len > max) max = c.blobs[i].len;
        buf = max <= SIZE_MAX ? cm_alloc_aligned((size_t)max) : NULL;
        if (!buf) {
            cm_seterr(msg, sizeof msg, "store %s: no memory for a %llu-byte blob", s->dir,
                      (unsigned long long)max);
            rc = CM_ENOMEM;
            goto fail;
        }
    }
    h = XXH64_createState();
    if (!h) {
        cm_seterr(msg, sizeof msg, "store %s: no memory for a hash state", s->dir);
        rc = CM_ENOMEM;
        goto fail;
    }
    it = leveldb_create_iterator(s->db, s->rscan);
    for (uint32_t i = 0; i < c.nblobs; i++) {
        const blob_meta *m = &c.blobs[i];
        rc = scan_blob(s, it, h, version, c.chunk, m, buf, msg, sizeof msg);
        if (rc != CM_OK) goto fail;
        if (!fn) continue;
        rc = fn(ud, m->part, m->kind, buf, (size_t)m->len);
        if (rc != CM_OK) {
            by_caller = 1;
            cm_seterr(msg, sizeof msg, "store %s: version %lld, part %u kind %u refused by the "
                      "caller: %s", s->dir, (long long)version, m->part, m->kind,
                      cm_strerror(rc));
            goto fail;
        }
    }
    if (extra && c.extra_len) {
        *extra = cm_malloc(c.extra_len);
        memcpy(*extra, c.extra, c.extra_len);
    }
    if (extra_len) *extra_len = c.extra_len;
fail:
    if (rc == CM_ECORRUPT && !by_caller) damage_mark(s, version, msg);
    if (rc == CM_OK) damage_forget(s, version);
    if (rc != CM_OK) cm_seterr(err, errlen, "%s", msg);
    if (it) leveldb_iter_destroy(it);
    if (h) XXH64_freeState(h);
    free(buf);
    free(c.blobs);
    if (val) leveldb_free(val);
    return rc;
}

int st_store_load(st_store *s, int64_t version, st_blob_fn fn, void *ud, void **extra,
                  size_t *extra_len, char *err, size_t errlen) {
    if (extra) *extra = NULL;
    if (extra_len) *extra_len = 0;
    if (version < 0 || !fn) {
        cm_seterr(err, errlen, "st_store_load: invalid argument");
        return CM_EINVAL;
    }
    pthread_mutex_lock(&s->mu);
    int rc = read_generation(s, version, fn, ud, extra, extra_len, err, errlen);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int st_store_verify(st_store *s, int64_t version, char *err, size_t errlen) {
    if (version < 0) {
        cm_seterr(err, errlen, "st_store_verify: invalid argument");
        return CM_EINVAL;
    }
    pthread_mutex_lock(&s->mu);
    int rc = read_generation(s, version, NULL, NULL, NULL, NULL, err, errlen);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int st_store_newest_intact(st_store *s, int64_t *version, char *err, size_t errlen) {
    ver_list raw;
    int ncommitted = 0;
    pthread_mutex_lock(&s->mu);
    /* Every commit record, those that do not decode too: they are damage
     * to report, and st_store_committed leaves them out anyway. */
    int rc = list_versions(s, 'c', 0, &raw, err, errlen);
    for (int i = raw.n - 1; rc == CM_OK && i >= 0; i--) {
        int64_t v = raw.v[i];
        ncommitted++;
        if (damage_has(s, v)) continue; /* Reported when it was found. */
        char why[sizeof ((st_damage *)0)->why];
        int r = read_generation(s, v, NULL, NULL, NULL, NULL, why, sizeof why);
        if (r == CM_OK) {
            *version = v;
            goto out;
        }
        if (r == CM_ENOTFOUND) { /* Not a commit record's key after all. */
            ncommitted--;
            continue;
        }
        if (r != CM_ECORRUPT) {
            cm_seterr(err, errlen, "%s", why);
            rc = r;
            goto out;
        }
        cm_warn("%s: generation %lld skipped (left on disk), trying older ones", why,
                (long long)v);
    }
    if (rc != CM_OK) goto out;
    if (ncommitted == 0) {
        cm_seterr(err, errlen, "store %s has no committed checkpoint", s->dir);
        rc = CM_ENOTFOUND;
    } else {
        cm_seterr(err, errlen, "store %s: none of its %d committed generations is intact; the "
                  "newest: %s", s->dir, ncommitted, s->ndamaged ? s->damaged[0].why : "?");
        rc = CM_ECORRUPT;
    }
out:
    pthread_mutex_unlock(&s->mu);
    free(raw.v);
    return rc;
}

int st_store_damaged(st_store *s, st_damage *out, int max) {
    pthread_mutex_lock(&s->mu);
    int n = s->ndamaged;
    for (int i = 0; i < n && i < max; i++) out[i] = s->damaged[i];
    pthread_mutex_unlock(&s->mu);
    return n;
}

/* ===== Garbage collection and rollback ===== */

int st_store_drop_older(st_store *s, int64_t keep_from, char *err, size_t errlen) {
    ver_list ok = {0}, raw = {0}, gens = {0}, dc = {0}, dg = {0};
    pthread_mutex_lock(&s->mu);
    int rc = list_versions(s, 'c', 1, &ok, err, errlen);
    if (rc != CM_OK) goto fail;
    /* The newest committed generation not known to be damaged: what must
     * stay. A damaged one is not a leftover to collect, only old. */
    int64_t newest = -1;
    for (int i = ok.n - 1; i >= 0 && newest < 0; i--)
        if (!damage_has(s, ok.v[i])) newest = ok.v[i];
    if (newest < 0) goto fail; /* Nothing intact committed: nothing to keep or drop. */
    if (keep_from > newest) {
        cm_seterr(err, errlen, "store %s: cannot drop generations older than %lld: the newest "
                  "committed one is %lld%s", s->dir, (long long)keep_from, (long long)newest,
                  newest < ok.v[ok.n - 1] ? " (newer ones are damaged)" : "");
        rc = CM_EINVAL;
        goto fail;
    }
    rc = list_versions(s, 'c', 0, &raw, err, errlen);
    if (rc != CM_OK) goto fail;
    rc = list_versions(s, 'g', 0, &gens, err, errlen);
    if (rc != CM_OK) goto fail;
    for (int i = 0; i < raw.n; i++)
        if (raw.v[i] < keep_from ||
            (raw.v[i] < newest && !ver_has(&ok, raw.v[i]) && !damage_has(s, raw.v[i])))
            ver_push(&dc, raw.v[i]);
    for (int i = 0; i < gens.n; i++)
        if (gens.v[i] < keep_from ||
            (gens.v[i] < newest && !ver_has(&ok, gens.v[i]) && !damage_has(s, gens.v[i])))
            ver_push(&dg, gens.v[i]);
    rc = drop_versions(s, &dc, &dg, err, errlen);
fail:
    pthread_mutex_unlock(&s->mu);
    free(ok.v);
    free(raw.v);
    free(gens.v);
    free(dc.v);
    free(dg.v);
    return rc;
}

int st_store_drop_newer(st_store *s, int64_t version, char *err, size_t errlen) {
    ver_list raw = {0}, gens = {0}, dc = {0}, dg = {0};
    pthread_mutex_lock(&s->mu);
    int rc = list_versions(s, 'c', 0, &raw, err, errlen);
    if (rc != CM_OK) goto fail;
    rc = list_versions(s, 'g', 0, &gens, err, errlen);
    if (rc != CM_OK) goto fail;
    for (int i = 0; i < raw.n; i++)
        if (raw.v[i] > version) ver_push(&dc, raw.v[i]);
    for (int i = 0; i < gens.n; i++)
        if (gens.v[i] > version) ver_push(&dg, gens.v[i]);
    rc = drop_versions(s, &dc, &dg, err, errlen);
fail:
    pthread_mutex_unlock(&s->mu);
    free(raw.v);
    free(gens.v);
    free(dc.v);
    free(dg.v);
    return rc;
}

/* ===== The rollback rule ===== */

int64_t st_newest_common(const int64_t *const *versions, const int *counts, int nshards) {
    int64_t best = -1;
    if (nshards < 1 || !versions || !counts) return -1;
    for (int i = 0; i < counts[0]; i++) {
        int64_t v = versions[0][i];
        if (v <= best) continue;
        int everywhere = 1;
        for (int sh = 1; sh < nshards && everywhere; sh++) {
            int found = 0;
            for (int j = 0; j < counts[sh] && !found; j++) found = versions[sh][j] == v;
            everywhere = found;
        }
        if (everywhere) best = v;
    }
    return best;
}
