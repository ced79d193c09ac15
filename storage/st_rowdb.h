/* st_rowdb.h - embedding rows on disk: the LevelDB tier under a shard's
 * in-memory row cache (ps_rows with a memory budget, ps_rows_set_spill).
 * SPDX-License-Identifier: MIT
 *
 * A key is (table, id), 12 bytes big-endian, so one table's rows sort
 * together, ids ascending (st_rowdb_key). A value is the row as ps_rows
 * keeps it: its update count and the step it was last used (8 bytes each,
 * host order), then its floats, raw. LevelDB's
 * bloom filter (10 bits a key) answers most lookups of ids that were never
 * written without reading a block.
 *
 * Scratch, not a checkpoint: st_rowdb_open empties the directory's store
 * and nothing is synced (a restarted shard restores from its checkpoint
 * store, storage/st_store.h). Writes go through a batch (st_rowdb_put, then
 * st_rowdb_flush); reads see flushed writes only.
 *
 * Not thread-safe: the owner serialises calls (a shard under its lock).
 */
#ifndef ST_ROWDB_H
#define ST_ROWDB_H
#include <stddef.h>
#include <stdint.h>

typedef struct st_rowdb st_rowdb;

#define ST_ROWDB_KEY 12

/* Open a store in dir (created if missing; a store there is emptied
 * first). CM_EIO with the path and LevelDB's message in err. Release with
 * st_rowdb_close (NULL is a no-op), which keeps the files. */
int st_rowdb_open(const char *dir, st_rowdb **out, char *err, size_t errlen);
/* The same with LevelDB's sizes (bytes; 0: the default of each): the
 * memtable (LevelDB holds up to two), the block cache, the table files. */
typedef struct st_rowdb_opts {
    size_t write_buffer, block_cache, max_file;
} st_rowdb_opts;
#define ST_ROWDB_WRITE_BUFFER ((size_t)4 << 20)
#define ST_ROWDB_BLOCK_CACHE ((size_t)8 << 20)
#define ST_ROWDB_MAX_FILE ((size_t)16 << 20)
int st_rowdb_open_with(const char *dir, const st_rowdb_opts *opts, st_rowdb **out, char *err,
                       size_t errlen);
void st_rowdb_close(st_rowdb *db);
const char *st_rowdb_path(const st_rowdb *db);
/* Remove a (closed) row store and its directory, if empty then. */
void st_rowdb_remove(const char *dir);

/* The key of (table, id). */
void st_rowdb_key(int table, uint64_t id, uint8_t key[ST_ROWDB_KEY]);

/* Queue a write of row (table, id): its count, last step and nfloats
 * floats; or its removal. */
void st_rowdb_put(st_rowdb *db, int table, uint64_t id, int64_t count, int64_t last,
                  const float *row, size_t nfloats);
void st_rowdb_del(st_rowdb *db, int table, uint64_t id);
/* Write what was queued. CM_EIO with LevelDB's message in err. */
int st_rowdb_flush(st_rowdb *db, char *err, size_t errlen);

/* Row (table, id) into count, last and row (nfloats floats): 1 if found,
 * 0 if not, CM_ECORRUPT for a value of another size, CM_EIO (err says). */
int st_rowdb_get(st_rowdb *db, int table, uint64_t id, int64_t *count, int64_t *last,
                 float *row, size_t nfloats, char *err, size_t errlen);

/* Every row of table t in id order; fn returns CM_OK to go on or a
 * negative CM_E* to stop, which is returned. Rows of another size than
 * nfloats give CM_ECORRUPT. */
typedef int (*st_rowdb_visit_fn)(void *ud, uint64_t id, int64_t count, int64_t last,
                                 const float *row);
int st_rowdb_visit(st_rowdb *db, int table, size_t nfloats, st_rowdb_visit_fn fn, void *ud,
                   char *err, size_t errlen);

/* Drop every row (the store is destroyed and opened again). */
int st_rowdb_clear(st_rowdb *db, char *err, size_t errlen);

typedef struct st_rowdb_stats {
    uint64_t puts, gets, found;
    uint64_t bytes_written; /* Keys and values flushed. */
} st_rowdb_stats;
void st_rowdb_stats_get(const st_rowdb *db, st_rowdb_stats *out);

#endif /* ST_ROWDB_H */
