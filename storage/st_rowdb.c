/* st_rowdb.c - embedding rows on disk (see st_rowdb.h).
 * SPDX-License-Identifier: MIT
 *
 * LevelDB's C API: every call's error string is written only on failure
 * (so it is reset before each call), leveldb_get returns a copy to free
 * with leveldb_free, iterator keys and values are borrowed until it moves.
 * A failed second open of a store open in this process drops the process's
 * lock on it: a store is opened once (st_rowdb_clear closes it first).
 */
#include "storage/st_rowdb.h"

#include <errno.h>
#include <leveldb/c.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"

/* The defaults (st_rowdb.h): memory LevelDB may hold beyond the shard's
 * row budget is one memtable being written and one being flushed, and the
 * block cache; chosen with bench/rowbench (docs/BENCHMARKS.md). */

struct st_rowdb {
    char *path;
    leveldb_t *db;
    leveldb_options_t *opt;
    leveldb_filterpolicy_t *filter;
    leveldb_cache_t *cache;
    leveldb_readoptions_t *ro;
    leveldb_writeoptions_t *wo;
    leveldb_writebatch_t *batch;
    size_t batch_bytes;
    int written; /* Something was flushed since the store was emptied. */
    uint8_t *val; /* One value being written (grown). */
    size_t val_cap;
    st_rowdb_stats stats;
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

void st_rowdb_key(int table, uint64_t id, uint8_t key[ST_ROWDB_KEY]) {
    put_be32(key, (uint32_t)table);
    put_be64(key + 4, id);
}

/* LevelDB's error into err, freed. */
static int fail(char *lerr, char *err, size_t errlen, const char *what, const char *path) {
    cm_seterr(err, errlen, "%s %s: %s", what, path, lerr ? lerr : "unknown error");
    leveldb_free(lerr);
    return CM_EIO;
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
    r->opt = leveldb_options_create();
    leveldb_options_set_create_if_missing(r->opt, 1);
    leveldb_options_set_write_buffer_size(r->opt, wb);
    leveldb_options_set_max_file_size(r->opt, mf);
    leveldb_options_set_compression(r->opt, leveldb_no_compression); /* Floats. */
    r->filter = leveldb_filterpolicy_create_bloom(10);
    leveldb_options_set_filter_policy(r->opt, r->filter);
    r->cache = leveldb_cache_create_lru(bc);
    leveldb_options_set_cache(r->opt, r->cache);
    r->ro = leveldb_readoptions_create();
    r->wo = leveldb_writeoptions_create();
    leveldb_writeoptions_set_sync(r->wo, 0); /* Scratch. */
    r->batch = leveldb_writebatch_create();
    int rc = db_destroy(r, err, errlen);
    if (rc == CM_OK) rc = db_open(r, err, errlen);
    if (rc != CM_OK) {
        st_rowdb_close(r);
        return rc;
    }
    *out = r;
    return CM_OK;
}

void st_rowdb_close(st_rowdb *r) {
    if (!r) return;
    if (r->db) leveldb_close(r->db);
    leveldb_writebatch_destroy(r->batch);
    leveldb_writeoptions_destroy(r->wo);
    leveldb_readoptions_destroy(r->ro);
    leveldb_options_destroy(r->opt);
    leveldb_cache_destroy(r->cache);
    leveldb_filterpolicy_destroy(r->filter);
    free(r->val);
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

#define HEAD 16 /* count, last */

void st_rowdb_put(st_rowdb *r, int table, uint64_t id, int64_t count, int64_t last,
                  const float *row, size_t nfloats) {
    uint8_t key[ST_ROWDB_KEY];
    st_rowdb_key(table, id, key);
    size_t n = HEAD + nfloats * sizeof(float);
    if (n > r->val_cap) {
        free(r->val);
        r->val = cm_malloc(n);
        r->val_cap = n;
    }
    memcpy(r->val, &count, 8);
    memcpy(r->val + 8, &last, 8);
    memcpy(r->val + HEAD, row, nfloats * sizeof(float));
    leveldb_writebatch_put(r->batch, (const char *)key, sizeof key, (const char *)r->val, n);
    r->batch_bytes += sizeof key + n;
    r->stats.puts++;
}

void st_rowdb_del(st_rowdb *r, int table, uint64_t id) {
    uint8_t key[ST_ROWDB_KEY];
    st_rowdb_key(table, id, key);
    leveldb_writebatch_delete(r->batch, (const char *)key, sizeof key);
    r->batch_bytes += sizeof key;
}

int st_rowdb_flush(st_rowdb *r, char *err, size_t errlen) {
    if (!r->batch_bytes) return CM_OK;
    char *lerr = NULL;
    leveldb_write(r->db, r->wo, r->batch, &lerr);
    if (lerr) return fail(lerr, err, errlen, "cannot write rows to", r->path);
    leveldb_writebatch_clear(r->batch);
    r->written = 1;
    r->stats.bytes_written += r->batch_bytes;
    r->batch_bytes = 0;
    return CM_OK;
}

int st_rowdb_get(st_rowdb *r, int table, uint64_t id, int64_t *count, int64_t *last,
                 float *row, size_t nfloats, char *err, size_t errlen) {
    uint8_t key[ST_ROWDB_KEY];
    st_rowdb_key(table, id, key);
    char *lerr = NULL;
    size_t n = 0;
    r->stats.gets++;
    char *v = leveldb_get(r->db, r->ro, (const char *)key, sizeof key, &n, &lerr);
    if (lerr) return fail(lerr, err, errlen, "cannot read a row from", r->path);
    if (!v) return 0;
    int rc = 1;
    if (n != HEAD + nfloats * sizeof(float)) {
        cm_seterr(err, errlen, "the row store %s: row %llu of table %d is %zu bytes, not %zu",
                  r->path, (unsigned long long)id, table, n, HEAD + nfloats * sizeof(float));
        rc = CM_ECORRUPT;
    } else {
        memcpy(count, v, 8);
        memcpy(last, v + 8, 8);
        memcpy(row, v + HEAD, nfloats * sizeof(float));
        r->stats.found++;
    }
    leveldb_free(v);
    return rc;
}

int st_rowdb_visit(st_rowdb *r, int table, size_t nfloats, st_rowdb_visit_fn fn, void *ud,
                   char *err, size_t errlen) {
    uint8_t first[ST_ROWDB_KEY];
    st_rowdb_key(table, 0, first);
    leveldb_iterator_t *it = leveldb_create_iterator(r->db, r->ro);
    float *row = cm_malloc((nfloats ? nfloats : 1) * sizeof(float));
    int rc = CM_OK;
    for (leveldb_iter_seek(it, (const char *)first, sizeof first); leveldb_iter_valid(it);
         leveldb_iter_next(it)) {
        size_t klen, vlen;
        const uint8_t *k = (const uint8_t *)leveldb_iter_key(it, &klen);
        if (klen != ST_ROWDB_KEY || get_be32(k) != (uint32_t)table) break;
        const char *v = leveldb_iter_value(it, &vlen);
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
    if (lerr && rc == CM_OK) rc = fail(lerr, err, errlen, "cannot read the rows of", r->path);
    else leveldb_free(lerr);
    leveldb_iter_destroy(it);
    free(row);
    return rc;
}

int st_rowdb_clear(st_rowdb *r, char *err, size_t errlen) {
    leveldb_writebatch_clear(r->batch);
    r->batch_bytes = 0;
    if (r->db && !r->written) return CM_OK; /* Empty already (opened or cleared so). */
    if (r->db) leveldb_close(r->db);
    r->db = NULL;
    int rc = db_destroy(r, err, errlen);
    if (rc == CM_OK) rc = db_open(r, err, errlen);
    if (rc == CM_OK) r->written = 0;
    return rc;
}

void st_rowdb_stats_get(const st_rowdb *r, st_rowdb_stats *out) { *out = r->stats; }
