/* st_rowdb.c - embedding rows on disk, versioned (see st_rowdb.h).
 * SPDX-License-Identifier: MIT
 *
 * LevelDB's C API: every call's error string is written only on failure
 * (so it is reset before each call), iterator keys and values are borrowed
 * until it moves, and an iterator sees the database as it was when it was
 * created. A failed second open of a store open in this process drops the
 * process's lock on it: a store is opened once (st_rowdb_clear closes it
 * first).
 *
 * A read seeks to the row's 12-byte prefix and takes the first visible
 * entry: LevelDB's bloom filter only serves exact-key Gets, so it is not
 * set; a seek costs about what a Get of a present key does (measured:
 * docs/bench-log.md, rowbench).
 */
#include "storage/st_rowdb.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <leveldb/c.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"

#define PREFIX 12 /* table, id */
#define HEAD 16   /* count, last */
#define META_TABLE 0xffffffffu
static const char META_EPOCHS[] = "\xff\xff\xff\xff" "epochs";
static const char META_ID[] = "\xff\xff\xff\xff" "identity";
static const char META_CKPT[] = "\xff\xff\xff\xff" "checkpoint";

struct st_rowdb_batch {
    leveldb_writebatch_t *wb;
    size_t bytes;
    uint64_t puts;
    uint8_t *val; /* One value being written (grown). */
    size_t val_cap;
};

struct st_rowdb {
    char *path;
    int durable;
    uint64_t identity;
    leveldb_t *db;
    leveldb_options_t *opt;
    leveldb_cache_t *cache;
    leveldb_readoptions_t *ro;
    leveldb_writeoptions_t *wo, *wo_sync;
    st_rowdb_batch own;
    int written;              /* Something was written since the store was emptied. */
    leveldb_iterator_t *it;   /* The owner's reads (st_rowdb_get). */
    uint32_t epoch;
    int64_t *forks;           /* forks[k]: where epoch k (1..epoch) continued; [0] unused. */
    int64_t *limit;           /* limit[e]: the newest version of epoch e still visible. */
    _Atomic uint64_t puts, gets, found, bytes_written, compacted;
};

static void put_be32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (24 - 8 * i));
}

static void put_be64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (56 - 8 * i));
}

static uint32_t get_be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_be64(const uint8_t *p) {
    return (uint64_t)get_be32(p) << 32 | get_be32(p + 4);
}

/* Versions are >= -1 (-1: before anything); ~(v + 1) sorts the newest first. */
void st_rowdb_key(int table, uint64_t id, uint32_t epoch, int64_t version,
                  uint8_t key[ST_ROWDB_KEY]) {
    put_be32(key, (uint32_t)table);
    put_be64(key + 4, id);
    put_be32(key + 12, ~epoch);
    put_be64(key + 16, ~(uint64_t)(version + 1));
}

static uint32_t key_epoch(const uint8_t *k) { return ~get_be32(k + 12); }
static int64_t key_version(const uint8_t *k) { return (int64_t)~get_be64(k + 16) - 1; }

static int visible_in(uint32_t epoch, const int64_t *limit, uint32_t e, int64_t v) {
    return e <= epoch && v <= limit[e];
}

static int visible(const st_rowdb *r, uint32_t e, int64_t v) {
    return visible_in(r->epoch, r->limit, e, v);
}

/* LevelDB's error into err, freed. */
static int fail(char *lerr, char *err, size_t errlen, const char *what, const char *path) {
    cm_seterr(err, errlen, "%s %s: %s", what, path, lerr ? lerr : "unknown error");
    leveldb_free(lerr);
    return CM_EIO;
}

static void drop_reader(st_rowdb *r) {
    if (r->it) leveldb_iter_destroy(r->it);
    r->it = NULL;
}

/* forks[1..n] -> the epoch state. */
static void set_epochs(st_rowdb *r, const int64_t *forks, uint32_t n) {
    free(r->forks);
    free(r->limit);
    r->forks = cm_malloc(((size_t)n + 1) * sizeof *r->forks);
    r->limit = cm_malloc(((size_t)n + 1) * sizeof *r->limit);
    r->forks[0] = INT64_MAX;
    for (uint32_t k = 1; k <= n; k++) r->forks[k] = forks[k];
    r->epoch = n;
    int64_t lim = INT64_MAX;
    for (uint32_t e = n + 1; e-- > 0;) {
        r->limit[e] = lim;
        if (e > 0 && r->forks[e] < lim) lim = r->forks[e];
    }
}

static int put_meta(st_rowdb *r, const char *key, size_t klen, const void *val, size_t vlen,
                    char *err, size_t errlen) {
    char *lerr = NULL;
    leveldb_put(r->db, r->durable ? r->wo_sync : r->wo, key, klen, val, vlen, &lerr);
    if (lerr) return fail(lerr, err, errlen, "cannot write to the row store", r->path);
    r->written = 1;
    return CM_OK;
}

static int db_open(st_rowdb *r, char *err, size_t errlen) {
    char *lerr = NULL;
    r->db = leveldb_open(r->opt, r->path, &lerr);
    if (!r->db) return fail(lerr, err, errlen, "cannot open the row store", r->path);
    return CM_OK;
}

/* Destroy whatever store is in r->path (closed). */
static int db_destroy(st_rowdb *r, char *err, size_t errlen) {
    char *lerr = NULL;
    leveldb_destroy_db(r->opt, r->path, &lerr);
    if (lerr) return fail(lerr, err, errlen, "cannot empty the row store", r->path);
    return CM_OK;
}

/* A new, empty store at epoch 0 (with its identity, if durable). */
static int db_fresh(st_rowdb *r, char *err, size_t errlen) {
    drop_reader(r);
    if (r->db) leveldb_close(r->db);
    r->db = NULL;
    int rc = db_destroy(r, err, errlen);
    if (rc == CM_OK) rc = db_open(r, err, errlen);
    if (rc != CM_OK) return rc;
    r->written = 0;
    set_epochs(r, NULL, 0);
    if (r->durable) {
        uint8_t id[8];
        put_be64(id, r->identity);
        rc = put_meta(r, META_ID, sizeof META_ID - 1, id, sizeof id, err, errlen);
    }
    return rc;
}

/* A durable store's identity and epochs, or a fresh store if it has none. */
static int db_load(st_rowdb *r, char *err, size_t errlen) {
    char *lerr = NULL;
    size_t n = 0;
    char *v = leveldb_get(r->db, r->ro, META_ID, sizeof META_ID - 1, &n, &lerr);
    if (lerr) return fail(lerr, err, errlen, "cannot read the row store", r->path);
    if (!v) return db_fresh(r, err, errlen);
    uint64_t have = n == 8 ? get_be64((const uint8_t *)v) : 0;
    leveldb_free(v);
    if (n != 8 || have != r->identity) {
        cm_seterr(err, errlen,
                  "the row store %s holds the rows of another model or shard (identity "
                  "%016llx, not %016llx); give another --rows-dir or remove it",
                  r->path, (unsigned long long)have, (unsigned long long)r->identity);
        return CM_EINVAL;
    }
    v = leveldb_get(r->db, r->ro, META_EPOCHS, sizeof META_EPOCHS - 1, &n, &lerr);
    if (lerr) return fail(lerr, err, errlen, "cannot read the row store", r->path);
    if (v && (n % 8 || n / 8 >= UINT32_MAX)) {
        leveldb_free(v);
        cm_seterr(err, errlen, "the row store %s: its epoch record is %zu bytes", r->path, n);
        return CM_ECORRUPT;
    }
    uint32_t ne = v ? (uint32_t)(n / 8) : 0;
    int64_t *forks = cm_malloc(((size_t)ne + 1) * sizeof *forks);
    for (uint32_t k = 0; k < ne; k++) forks[k + 1] = (int64_t)get_be64((uint8_t *)v + 8 * k);
    leveldb_free(v);
    set_epochs(r, forks, ne);
    free(forks);
    r->written = 1;
    return CM_OK;
}

int st_rowdb_open(const char *dir, st_rowdb **out, char *err, size_t errlen) {
    return st_rowdb_open_with(dir, NULL, out, err, errlen);
}

int st_rowdb_open_with(const char *dir, const st_rowdb_opts *o, st_rowdb **out, char *err,
                       size_t errlen) {
    *out = NULL;
    const size_t wb = o && o->write_buffer ? o->write_buffer : ST_ROWDB_WRITE_BUFFER,
                 bc = o && o->block_cache ? o->block_cache : ST_ROWDB_BLOCK_CACHE,
                 mf = o && o->max_file ? o->max_file : ST_ROWDB_MAX_FILE;
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        cm_seterr(err, errlen, "cannot create the row store %s: %s", dir, strerror(errno));
        return CM_EIO;
    }
    st_rowdb *r = cm_calloc(1, sizeof *r);
    r->path = cm_strdup(dir);
    r->durable = o && o->durable;
    r->identity = o ? o->identity : 0;
    r->opt = leveldb_options_create();
    leveldb_options_set_create_if_missing(r->opt, 1);
    leveldb_options_set_write_buffer_size(r->opt, wb);
    leveldb_options_set_max_file_size(r->opt, mf);
    leveldb_options_set_compression(r->opt, leveldb_no_compression); /* Floats. */
    r->cache = leveldb_cache_create_lru(bc);
    leveldb_options_set_cache(r->opt, r->cache);
    r->ro = leveldb_readoptions_create();
    r->wo = leveldb_writeoptions_create();
    r->wo_sync = leveldb_writeoptions_create();
    leveldb_writeoptions_set_sync(r->wo, 0);
    leveldb_writeoptions_set_sync(r->wo_sync, 1);
    r->own.wb = leveldb_writebatch_create();
    set_epochs(r, NULL, 0);
    int rc;
    if (r->durable) {
        rc = db_open(r, err, errlen);
        if (rc == CM_OK) rc = db_load(r, err, errlen);
    } else {
        rc = db_fresh(r, err, errlen);
    }
    if (rc != CM_OK) {
        st_rowdb_close(r);
        return rc;
    }
    *out = r;
    return CM_OK;
}

void st_rowdb_close(st_rowdb *r) {
    if (!r) return;
    drop_reader(r);
    if (r->db) leveldb_close(r->db);
    leveldb_writebatch_destroy(r->own.wb);
    free(r->own.val);
    leveldb_writeoptions_destroy(r->wo);
    leveldb_writeoptions_destroy(r->wo_sync);
    leveldb_readoptions_destroy(r->ro);
    leveldb_options_destroy(r->opt);
    leveldb_cache_destroy(r->cache);
    free(r->forks);
    free(r->limit);
    free(r->path);
    free(r);
}

const char *st_rowdb_path(const st_rowdb *r) { return r->path; }

void st_rowdb_remove(const char *dir) {
    leveldb_options_t *o = leveldb_options_create();
    char *lerr = NULL;
    leveldb_destroy_db(o, dir, &lerr);
    leveldb_free(lerr);
    leveldb_options_destroy(o);
    rmdir(dir);
}

uint32_t st_rowdb_epoch(const st_rowdb *r) { return r->epoch; }

int st_rowdb_fork(st_rowdb *r, int64_t version, char *err, size_t errlen) {
    if (version < -1) version = -1;
    if (r->epoch == UINT32_MAX - 1) {
        cm_seterr(err, errlen, "the row store %s has no epoch left", r->path);
        return CM_EINVAL;
    }
    uint32_t n = r->epoch + 1;
    int64_t *forks = cm_malloc(((size_t)n + 1) * sizeof *forks);
    memcpy(forks, r->forks, ((size_t)n) * sizeof *forks);
    forks[n] = version;
    uint8_t *rec = cm_malloc((size_t)n * 8);
    for (uint32_t k = 1; k <= n; k++) put_be64(rec + 8 * (k - 1), (uint64_t)forks[k]);
    int rc = put_meta(r, META_EPOCHS, sizeof META_EPOCHS - 1, rec, (size_t)n * 8, err, errlen);
    free(rec);
    if (rc == CM_OK) {
        set_epochs(r, forks, n);
        drop_reader(r);
    }
    free(forks);
    return rc;
}

/* ------------------------------------------------------------ writes */

st_rowdb_batch *st_rowdb_batch_create(void) {
    st_rowdb_batch *b = cm_calloc(1, sizeof *b);
    b->wb = leveldb_writebatch_create();
    return b;
}

void st_rowdb_batch_destroy(st_rowdb_batch *b) {
    if (!b) return;
    leveldb_writebatch_destroy(b->wb);
    free(b->val);
    free(b);
}

size_t st_rowdb_batch_bytes(const st_rowdb_batch *b) { return b->bytes; }

void st_rowdb_batch_mark(st_rowdb *r, st_rowdb_batch *b, int64_t version) {
    (void)r;
    uint8_t v[8];
    put_be64(v, (uint64_t)version);
    leveldb_writebatch_put(b->wb, META_CKPT, sizeof META_CKPT - 1, (const char *)v, sizeof v);
    b->bytes += sizeof META_CKPT - 1 + sizeof v;
}

void st_rowdb_batch_put(st_rowdb *r, st_rowdb_batch *b, int table, uint64_t id,
                        int64_t version, int64_t count, int64_t last, const float *row,
                        size_t nfloats) {
    uint8_t key[ST_ROWDB_KEY];
    st_rowdb_key(table, id, r->epoch, version, key);
    size_t n = HEAD + nfloats * sizeof(float);
    if (n > b->val_cap) {
        free(b->val);
        b->val = cm_malloc(n);
        b->val_cap = n;
    }
    memcpy(b->val, &count, 8);
    memcpy(b->val + 8, &last, 8);
    memcpy(b->val + HEAD, row, nfloats * sizeof(float));
    leveldb_writebatch_put(b->wb, (const char *)key, sizeof key, (const char *)b->val, n);
    b->bytes += sizeof key + n;
    b->puts++;
}

void st_rowdb_batch_del(st_rowdb *r, st_rowdb_batch *b, int table, uint64_t id,
                        int64_t version) {
    uint8_t key[ST_ROWDB_KEY];
    st_rowdb_key(table, id, r->epoch, version, key);
    leveldb_writebatch_put(b->wb, (const char *)key, sizeof key, "", 0);
    b->bytes += sizeof key;
}

int st_rowdb_write(st_rowdb *r, st_rowdb_batch *b, int sync, char *err, size_t errlen) {
    if (!b->bytes) return CM_OK;
    char *lerr = NULL;
    leveldb_write(r->db, sync ? r->wo_sync : r->wo, b->wb, &lerr);
    if (lerr) return fail(lerr, err, errlen, "cannot write rows to", r->path);
    leveldb_writebatch_clear(b->wb);
    atomic_fetch_add_explicit(&r->bytes_written, b->bytes, memory_order_relaxed);
    atomic_fetch_add_explicit(&r->puts, b->puts, memory_order_relaxed);
    b->bytes = 0;
    b->puts = 0;
    return CM_OK;
}

int st_rowdb_sync(st_rowdb *r, char *err, size_t errlen) {
    DIR *d = opendir(r->path);
    if (!d) {
        cm_seterr(err, errlen, "cannot list the row store %s: %s", r->path, strerror(errno));
        return CM_EIO;
    }
    int rc = CM_OK;
    struct dirent *e;
    while (rc == CM_OK && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 4, ".log") != 0) continue;
        int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT) continue; /* Compacted meanwhile: in a synced table. */
        if (fd < 0 || fsync(fd) != 0) {
            cm_seterr(err, errlen, "cannot sync %s/%s: %s", r->path, e->d_name,
                      strerror(errno));
            rc = CM_EIO;
        }
        if (fd >= 0) close(fd);
    }
    closedir(d);
    return rc;
}

void st_rowdb_put(st_rowdb *r, int table, uint64_t id, int64_t version, int64_t count,
                  int64_t last, const float *row, size_t nfloats) {
    st_rowdb_batch_put(r, &r->own, table, id, version, count, last, row, nfloats);
}

void st_rowdb_del(st_rowdb *r, int table, uint64_t id, int64_t version) {
    st_rowdb_batch_del(r, &r->own, table, id, version);
}

int st_rowdb_flush(st_rowdb *r, char *err, size_t errlen) {
    if (!r->own.bytes) return CM_OK;
    drop_reader(r); /* It would not see these writes. */
    int rc = st_rowdb_write(r, &r->own, 0, err, errlen);
    if (rc == CM_OK) r->written = 1;
    return rc;
}

/* ------------------------------------------------------------ reads */

/* The value of the first entry visible in (epoch, limit) of the row the
 * iterator is at (positioned at or before its first entry), with its
 * length, or NULL when the row has none. */
static const char *first_visible(uint32_t epoch, const int64_t *limit, leveldb_iterator_t *it,
                                 const uint8_t prefix[PREFIX], size_t *vlen) {
    for (; leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t klen;
        const uint8_t *k = (const uint8_t *)leveldb_iter_key(it, &klen);
        if (klen != ST_ROWDB_KEY || memcmp(k, prefix, PREFIX) != 0) return NULL;
        if (visible_in(epoch, limit, key_epoch(k), key_version(k)))
            return leveldb_iter_value(it, vlen);
    }
    return NULL;
}

/* A read through iterator it (see st_rowdb_get). */
static int get_with(st_rowdb *r, leveldb_iterator_t *it, uint32_t epoch, const int64_t *limit,
                    int table, uint64_t id, int64_t *count, int64_t *last, float *row,
                    size_t nfloats, char *err, size_t errlen) {
    uint8_t prefix[PREFIX];
    put_be32(prefix, (uint32_t)table);
    put_be64(prefix + 4, id);
    atomic_fetch_add_explicit(&r->gets, 1, memory_order_relaxed);
    leveldb_iter_seek(it, (const char *)prefix, PREFIX);
    size_t n = 0;
    const char *v = first_visible(epoch, limit, it, prefix, &n);
    char *lerr = NULL;
    leveldb_iter_get_error(it, &lerr);
    if (lerr) return fail(lerr, err, errlen, "cannot read a row from", r->path);
    if (!v || n == 0) return 0;
    if (n != HEAD + nfloats * sizeof(float)) {
        cm_seterr(err, errlen, "the row store %s: row %llu of table %d is %zu bytes, not %zu",
                  r->path, (unsigned long long)id, table, n, HEAD + nfloats * sizeof(float));
        return CM_ECORRUPT;
    }
    memcpy(count, v, 8);
    memcpy(last, v + 8, 8);
    memcpy(row, v + HEAD, nfloats * sizeof(float));
    atomic_fetch_add_explicit(&r->found, 1, memory_order_relaxed);
    return 1;
}

int st_rowdb_get(st_rowdb *r, int table, uint64_t id, int64_t *count, int64_t *last,
                 float *row, size_t nfloats, char *err, size_t errlen) {
    if (!r->it) r->it = leveldb_create_iterator(r->db, r->ro);
    int rc = get_with(r, r->it, r->epoch, r->limit, table, id, count, last, row, nfloats, err,
                      errlen);
    if (rc == CM_EIO) drop_reader(r);
    return rc;
}

struct st_rowdb_reader {
    st_rowdb *db;
    leveldb_iterator_t *it;
    uint32_t epoch;
    int64_t *limit; /* A copy: a fork may replace the store's. */
};

st_rowdb_reader *st_rowdb_reader_open(st_rowdb *r) {
    st_rowdb_reader *rd = cm_calloc(1, sizeof *rd);
    rd->db = r;
    rd->it = leveldb_create_iterator(r->db, r->ro);
    rd->epoch = r->epoch;
    rd->limit = cm_malloc(((size_t)r->epoch + 1) * sizeof *rd->limit);
    memcpy(rd->limit, r->limit, ((size_t)r->epoch + 1) * sizeof *rd->limit);
    return rd;
}

int st_rowdb_reader_get(st_rowdb_reader *rd, int table, uint64_t id, int64_t *count,
                        int64_t *last, float *row, size_t nfloats, char *err, size_t errlen) {
    return get_with(rd->db, rd->it, rd->epoch, rd->limit, table, id, count, last, row, nfloats,
                    err, errlen);
}

void st_rowdb_reader_close(st_rowdb_reader *rd) {
    if (!rd) return;
    leveldb_iter_destroy(rd->it);
    free(rd->limit);
    free(rd);
}

void st_rowdb_read_done(st_rowdb *r) { drop_reader(r); }

int st_rowdb_visit(st_rowdb *r, int table, size_t nfloats, st_rowdb_visit_fn fn, void *ud,
                   char *err, size_t errlen) {
    uint8_t first[4];
    put_be32(first, (uint32_t)table);
    leveldb_iterator_t *it = leveldb_create_iterator(r->db, r->ro);
    float *row = cm_malloc((nfloats ? nfloats : 1) * sizeof(float));
    int rc = CM_OK;
    uint8_t done[PREFIX]; /* The row whose newest visible entry was seen. */
    int have_done = 0;
    for (leveldb_iter_seek(it, (const char *)first, sizeof first); leveldb_iter_valid(it);
         leveldb_iter_next(it)) {
        size_t klen, vlen;
        const uint8_t *k = (const uint8_t *)leveldb_iter_key(it, &klen);
        if (klen != ST_ROWDB_KEY || get_be32(k) != (uint32_t)table) break;
        if (have_done && memcmp(k, done, PREFIX) == 0) continue;
        if (!visible(r, key_epoch(k), key_version(k))) continue;
        memcpy(done, k, PREFIX);
        have_done = 1;
        const char *v = leveldb_iter_value(it, &vlen);
        if (vlen == 0) continue; /* Removed. */
        if (vlen != HEAD + nfloats * sizeof(float)) {
            cm_seterr(err, errlen, "the row store %s: a row of table %d is %zu bytes, not %zu",
                      r->path, table, vlen, HEAD + nfloats * sizeof(float));
            rc = CM_ECORRUPT;
            break;
        }
        int64_t count, last;
        memcpy(&count, v, 8);
        memcpy(&last, v + 8, 8);
        memcpy(row, v + HEAD, nfloats * sizeof(float)); /* Aligned for the callback. */
        if ((rc = fn(ud, get_be64(k + 4), count, last, row)) != CM_OK) break;
    }
    char *lerr = NULL;
    leveldb_iter_get_error(it, &lerr);
    if (lerr && rc == CM_OK)
        rc = fail(lerr, err, errlen, "cannot read the rows of", r->path);
    else
        leveldb_free(lerr);
    leveldb_iter_destroy(it);
    free(row);
    return rc;
}

/* ------------------------------------------------------------ upkeep */

int64_t st_rowdb_compact(st_rowdb *r, int64_t keep, char *err, size_t errlen) {
    leveldb_iterator_t *it = leveldb_create_iterator(r->db, r->ro);
    leveldb_writebatch_t *wb = leveldb_writebatch_create();
    size_t pending = 0;
    int64_t removed = 0;
    int rc = CM_OK;
    uint8_t row[PREFIX];
    int have_row = 0, kept_old = 0; /* The row's newest entry tagged <= keep was seen. */
    char *lerr = NULL;
    for (leveldb_iter_seek_to_first(it); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t klen, vlen;
        const uint8_t *k = (const uint8_t *)leveldb_iter_key(it, &klen);
        if (klen >= 4 && get_be32(k) == META_TABLE) break;
        if (klen != ST_ROWDB_KEY) continue;
        if (!have_row || memcmp(k, row, PREFIX) != 0) {
            memcpy(row, k, PREFIX);
            have_row = 1;
            kept_old = 0;
        }
        int64_t v = key_version(k);
        int drop;
        if (!visible(r, key_epoch(k), v)) {
            drop = 1;
        } else if (v > keep) {
            drop = 0;
        } else if (!kept_old) {
            kept_old = 1;
            leveldb_iter_value(it, &vlen);
            drop = vlen == 0; /* A removal with nothing older kept means the same. */
        } else {
            drop = 1;
        }
        if (!drop) continue;
        leveldb_writebatch_delete(wb, (const char *)k, klen);
        pending += klen;
        removed++;
        if (pending >= (1u << 20)) {
            leveldb_write(r->db, r->wo, wb, &lerr);
            if (lerr) break;
            leveldb_writebatch_clear(wb);
            pending = 0;
        }
    }
    if (!lerr) leveldb_iter_get_error(it, &lerr);
    if (!lerr && pending) leveldb_write(r->db, r->wo, wb, &lerr);
    if (lerr) rc = fail(lerr, err, errlen, "cannot compact the row store", r->path);
    leveldb_writebatch_destroy(wb);
    leveldb_iter_destroy(it);
    if (rc != CM_OK) return rc;
    atomic_fetch_add_explicit(&r->compacted, (uint64_t)removed, memory_order_relaxed);
    return removed;
}

int st_rowdb_clear(st_rowdb *r, char *err, size_t errlen) {
    leveldb_writebatch_clear(r->own.wb);
    r->own.bytes = 0;
    r->own.puts = 0;
    if (r->db && !r->written) return CM_OK; /* Empty already (opened or cleared so). */
    return db_fresh(r, err, errlen);
}

void st_rowdb_stats_get(const st_rowdb *r, st_rowdb_stats *out) {
    st_rowdb_stats s = {
        .puts = atomic_load_explicit(&r->puts, memory_order_relaxed),
        .gets = atomic_load_explicit(&r->gets, memory_order_relaxed),
        .found = atomic_load_explicit(&r->found, memory_order_relaxed),
        .bytes_written = atomic_load_explicit(&r->bytes_written, memory_order_relaxed),
        .compacted = atomic_load_explicit(&r->compacted, memory_order_relaxed),
    };
    *out = s;
}
