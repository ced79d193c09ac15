/* st_rowdb.h - embedding rows on disk: the LevelDB tier under a shard's
 * in-memory row cache (ps_rows_set_spill), and the rows of its checkpoints.
 * SPDX-License-Identifier: MIT
 *
 * Versioned entries. Every write of a row is an entry tagged with the
 * version it belongs to and the store's current epoch; a row's value is its
 * newest entry that is visible (below). A key is (table, id, ~epoch,
 * ~version), 24 bytes big-endian (st_rowdb_key): one table's rows sort
 * together, ids ascending, and a row's newest entry comes first, so a read
 * is one seek. A value is the row as ps_rows keeps it: its update count and
 * the step it was last used (8 bytes each, host order), then its floats; an
 * empty value is a removal (a tombstone).
 *
 * Epochs and rollback. A store's history is a chain of epochs: epoch 0,
 * then one more at every st_rowdb_fork(v), which continues the current
 * history as it was at version v. An entry (e, u) is visible iff u <=
 * min(fork(k)) over the epochs k > e of the chain: what a rollback
 * abandoned stays invisible for good, at no cost when it happens (no entry
 * is rewritten or deleted then). A checkpoint of version v is a synced
 * write of the rows changed since the previous one, tagged v; a row's value
 * at v is then its newest visible entry tagged <= v. A shard restarted on
 * its directory forks at the version it restored and reads rows on demand:
 * nothing is loaded. st_rowdb_compact drops what no kept generation needs.
 *
 * Meta records (epoch list, identity) live under table 0xffffffff.
 *
 * Threads: one owner (a shard under its lock) makes every call but these,
 * which other threads may make at the same time: st_rowdb_batch_* and
 * st_rowdb_write on their own batch, st_rowdb_sync, st_rowdb_compact (the
 * checkpoint writer), st_rowdb_reader_get and _close (reads off the
 * owner's lock), st_rowdb_stats_get. st_rowdb_fork and st_rowdb_clear must not run while
 * that thread is inside st_rowdb_compact or st_rowdb_write.
 */
#ifndef ST_ROWDB_H
#define ST_ROWDB_H
#include <stddef.h>
#include <stdint.h>

typedef struct st_rowdb st_rowdb;

#define ST_ROWDB_KEY 24

/* LevelDB's sizes (bytes; 0: the default of each): the memtable (LevelDB
 * holds up to two), the block cache, the table files. durable: keep what
 * the directory holds (a store there must have been created with the same
 * identity, else CM_EINVAL naming both) and sync st_rowdb_fork; 0: a
 * scratch store, emptied when opened. */
typedef struct st_rowdb_opts {
    size_t write_buffer, block_cache, max_file;
    int durable;
    uint64_t identity; /* durable: who the rows belong to (model, shard). */
} st_rowdb_opts;
#define ST_ROWDB_WRITE_BUFFER ((size_t)4 << 20)
#define ST_ROWDB_BLOCK_CACHE ((size_t)8 << 20)
#define ST_ROWDB_MAX_FILE ((size_t)16 << 20)

/* Open a scratch store in dir (created if missing; a store there is
 * emptied first). CM_EIO with the path and LevelDB's message in err.
 * Release with st_rowdb_close (NULL is a no-op), which keeps the files. */
int st_rowdb_open(const char *dir, st_rowdb **out, char *err, size_t errlen);
int st_rowdb_open_with(const char *dir, const st_rowdb_opts *opts, st_rowdb **out, char *err,
                       size_t errlen);
void st_rowdb_close(st_rowdb *db);
const char *st_rowdb_path(const st_rowdb *db);
/* Remove a (closed) row store and its directory, if empty then. */
void st_rowdb_remove(const char *dir);

/* The key of entry (table, id) at (epoch, version). */
void st_rowdb_key(int table, uint64_t id, uint32_t epoch, int64_t version,
                  uint8_t key[ST_ROWDB_KEY]);

/* The current epoch (0 for a new store). */
uint32_t st_rowdb_epoch(const st_rowdb *db);
/* Start a new epoch continuing the current history at 'version' (-1: at
 * nothing, every row gone): entries of versions > 'version' written so far
 * are invisible from now on. Durable stores write this synced. CM_EIO. */
int st_rowdb_fork(st_rowdb *db, int64_t version, char *err, size_t errlen);

/* Writes. A batch collects entries of the current epoch; st_rowdb_write
 * applies it atomically (synced if 'sync'), then empties it. */
typedef struct st_rowdb_batch st_rowdb_batch;
st_rowdb_batch *st_rowdb_batch_create(void);
void st_rowdb_batch_destroy(st_rowdb_batch *b);
/* Row (table, id) at 'version': its count, last step and nfloats floats. */
void st_rowdb_batch_put(st_rowdb *db, st_rowdb_batch *b, int table, uint64_t id,
                        int64_t version, int64_t count, int64_t last, const float *row,
                        size_t nfloats);
/* Row (table, id) removed at 'version'. */
void st_rowdb_batch_del(st_rowdb *db, st_rowdb_batch *b, int table, uint64_t id,
                        int64_t version);
size_t st_rowdb_batch_bytes(const st_rowdb_batch *b);
/* Record 'version' as the newest checkpoint whose rows were written (a
 * meta record; it also makes the batch one to write, e.g. synced after
 * unsynced ones). */
void st_rowdb_batch_mark(st_rowdb *db, st_rowdb_batch *b, int64_t version);
int st_rowdb_write(st_rowdb *db, st_rowdb_batch *b, int sync, char *err, size_t errlen);

/* Make every write so far durable: fsync LevelDB's log files (a synced
 * write alone does not make earlier unsynced ones durable when LevelDB
 * switched its log in between; its table files it syncs itself). Any
 * thread. CM_EIO naming the file. */
int st_rowdb_sync(st_rowdb *db, char *err, size_t errlen);

/* The owner's own batch: st_rowdb_put / st_rowdb_del queue, st_rowdb_flush
 * writes (not synced). */
void st_rowdb_put(st_rowdb *db, int table, uint64_t id, int64_t version, int64_t count,
                  int64_t last, const float *row, size_t nfloats);
void st_rowdb_del(st_rowdb *db, int table, uint64_t id, int64_t version);
int st_rowdb_flush(st_rowdb *db, char *err, size_t errlen);

/* Row (table, id): its newest visible entry into count, last and row
 * (nfloats floats): 1 if found, 0 if there is none or it is a removal,
 * CM_ECORRUPT for a value of another size, CM_EIO (err says). Reads see
 * what the owner flushed; they go through one LevelDB iterator kept until
 * the next st_rowdb_flush or st_rowdb_read_done (which lets LevelDB drop
 * files it pins: call it after a run of reads). */
int st_rowdb_get(st_rowdb *db, int table, uint64_t id, int64_t *count, int64_t *last,
                 float *row, size_t nfloats, char *err, size_t errlen);
void st_rowdb_read_done(st_rowdb *db);

/* Reads off the owner's thread: a reader sees the store as it was when the
 * owner opened it (a LevelDB iterator, and a copy of the epochs), whatever
 * is written or forked since; st_rowdb_reader_get and _close may then run
 * on any one thread at a time. The store must outlive the reader. */
typedef struct st_rowdb_reader st_rowdb_reader;
st_rowdb_reader *st_rowdb_reader_open(st_rowdb *db);
int st_rowdb_reader_get(st_rowdb_reader *rd, int table, uint64_t id, int64_t *count,
                        int64_t *last, float *row, size_t nfloats, char *err, size_t errlen);
void st_rowdb_reader_close(st_rowdb_reader *rd);

/* Every row of table t (newest visible entries, removals left out) in id
 * order; fn returns CM_OK to go on or a negative CM_E* to stop, which is
 * returned. Rows of another size than nfloats give CM_ECORRUPT. */
typedef int (*st_rowdb_visit_fn)(void *ud, uint64_t id, int64_t count, int64_t last,
                                 const float *row);
int st_rowdb_visit(st_rowdb *db, int table, size_t nfloats, st_rowdb_visit_fn fn, void *ud,
                   char *err, size_t errlen);

/* Garbage collection once no generation older than 'keep' can be restored
 * (every shard committed 'keep' or newer): of each row, the entries a
 * restore of 'keep' or newer may read stay (those tagged > keep, and the
 * newest tagged <= keep unless it is a removal); older ones and invisible
 * ones go. Returns the entries removed (>= 0) or CM_EIO. */
int64_t st_rowdb_compact(st_rowdb *db, int64_t keep, char *err, size_t errlen);

/* Drop every row and epoch (the store is destroyed and opened again). */
int st_rowdb_clear(st_rowdb *db, char *err, size_t errlen);

typedef struct st_rowdb_stats {
    uint64_t puts, gets, found;
    uint64_t bytes_written; /* Keys and values written. */
    uint64_t compacted;     /* Entries removed by st_rowdb_compact. */
} st_rowdb_stats;
void st_rowdb_stats_get(const st_rowdb *db, st_rowdb_stats *out);

#endif /* ST_ROWDB_H */
