/* ps_rows.h - embedding rows in memory: a hash map per table from id to a row slot.
 * SPDX-License-Identifier: MIT
 *
 * The row store of a PS shard, and of a worker that keeps whole tables
 * (local and collective modes), so every mode runs the same code on rows.
 * For every table of the model (cm_model's tables), an open-addressing hash
 * map (linear probing, power-of-two capacity, grown at 70 % load) maps a
 * 64-bit id to a slot in a slab of fixed-size rows: the row's dim values,
 * then its optimizer slots (nslots x dim floats) side by side, so one row's
 * update touches one contiguous run of memory. Slabs grow in chunks of
 * PS_ROWS_CHUNK rows that never move, and no row is allocated on its own.
 * Each row also keeps its update count (for lazy Adam's bias correction).
 *
 * A row exists once it is first trained (created by a training read or an
 * update) with its initial values cm_row_init(seed, table, id) and zeroed
 * slots; an evaluation read of a missing row gives those initial values
 * without creating it.
 *
 * Row-wise optimizers (ps_optim): a row's update is ps_optim_apply over its
 * dim values with t = the row's own update count + 1 (lazy: rows not in a
 * step are not touched, and Adam corrects each row's bias with its own
 * count). Adagrad, Adam and SGD; momentum works too.
 *
 * A row budget (ps_rows_set_spill): rows in memory are a cache of at most
 * budget bytes; the rest live in a row store on disk (storage/st_rowdb.h).
 * A batch first brings the rows it names that are stored into memory (one
 * lookup each), then runs as without a budget, then evicts rows not used
 * lately (CLOCK) down to 90 % of the budget, writing those changed since
 * they were last stored in one batch. A failure of the row store stops the
 * process with a message naming it (rows would be lost otherwise).
 *
 * Not thread-safe: the owner serialises calls (a shard under its lock).
 */
#ifndef PS_ROWS_H
#define PS_ROWS_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "ps/ps_optim.h"

#define PS_ROWS_CHUNK 4096

typedef struct ps_rows ps_rows;

/* A store for the tables of 'model' (borrowed; must outlive the store),
 * updated with 'optim' (copied), initial values from 'seed'. A model
 * without tables gives an empty store (every call with a table index is
 * then a caller bug). Never fails (aborts on OOM). Release with
 * ps_rows_destroy() (NULL is a no-op). */
ps_rows *ps_rows_create(const cm_model *model, const ps_optim_cfg *optim, uint64_t seed);
void ps_rows_destroy(ps_rows *r);

/* Keep at most budget_bytes of rows (values, slots, counts and their map
 * entries; 0: no limit) in memory, the others in db (borrowed: it must
 * outlive r). Evicted rows are written tagged with the version being
 * computed (the step + 1). Before the first row; then ps_rows_reset says
 * what db holds (ps_rows_clear: nothing). */
struct st_rowdb;
void ps_rows_set_spill(ps_rows *r, struct st_rowdb *db, size_t budget_bytes);

/* Admission: with k > 1, a row is created only once a training read has
 * found it missing k times (counted in a count-min sketch of 4 x 2^20
 * one-byte counters, 4 MiB, so an id may be admitted early when it
 * collides with frequent ones; never late); until then reads give its
 * initial values and its gradients are dropped. The counts start again at
 * ps_rows_clear (a rollback). k 0 or 1: every row is created at once.
 * Before the first row. */
void ps_rows_set_admission(ps_rows *r, int k);

/* Expiry: with steps > 0, a row not used (read or updated) for that many
 * steps of ps_rows_set_step is dropped, from memory and from the row
 * store, at the next sweep (every steps / 4): it comes back with its
 * initial values if used again. Rows restored by ps_rows_put count as used
 * then. Costs 8 bytes a row. Before the first row. */
void ps_rows_set_expiry(ps_rows *r, int64_t steps);

/* The step (a PS shard: its version) for expiry; may sweep. */
void ps_rows_set_step(ps_rows *r, int64_t step);

/* The store's counters (a row budget, admission, expiry; zero where not
 * set, but resident rows). */
typedef struct ps_rows_spill_stats {
    uint64_t resident, on_disk;      /* Rows in memory; rows the store holds. */
    uint64_t hits, misses;           /* Batch rows found in memory, or not. */
    uint64_t loads, evictions;       /* Rows read from the store; evicted. */
    uint64_t bytes_written;          /* To the store. */
    size_t resident_bytes, budget;
    uint64_t not_admitted;           /* Training reads of rows not admitted yet. */
    uint64_t dropped_updates;        /* Row gradients of rows not admitted. */
    uint64_t expired;                /* Rows dropped by expiry. */
} ps_rows_spill_stats;
void ps_rows_spill_stats_get(const ps_rows *r, ps_rows_spill_stats *out);

/* Drop every row in memory (nothing is written) and, with a row store,
 * make its state that of 'version': it forks there (st_rowdb_fork), and
 * stored[t] (counts of a checkpoint of 'version', one per table) rows of
 * table t are then there, none in memory. stored NULL: no row at all (a
 * rollback to the initial values; the store forks at -1). */
void ps_rows_reset(ps_rows *r, int64_t version, const uint64_t *stored);
/* ps_rows_reset(r, -1, NULL). */
void ps_rows_clear(ps_rows *r);

/* An incremental checkpoint, with a row store, when 'version' was
 * published (the step): fn gets every row in memory changed since the last
 * call (or never stored): its table, id, count, last step and row (dim
 * values, then nslots x dim slots). The caller writes them to the store
 * tagged 'version' (and synced) before the checkpoint commits, and before
 * the next call: rows copied here and evicted before that are written again
 * by the eviction. Rows only in the store are there already (tagged <=
 * the version). Returns the rows given to fn. */
typedef void (*ps_rows_ckpt_fn)(void *ud, int table, uint64_t id, int64_t count, int64_t last,
                                const float *row);
size_t ps_rows_checkpoint(ps_rows *r, ps_rows_ckpt_fn fn, void *ud);

/* Floats per row of table t (its dim), and optimizer slots per value. */
int ps_rows_dim(const ps_rows *r, int table);
int ps_rows_nslots(const ps_rows *r);

/* Rows that exist in table t, and in all tables (in memory or stored). */
size_t ps_rows_count(const ps_rows *r, int table);
size_t ps_rows_total(const ps_rows *r);

/* Bytes held in memory (slabs, maps and update counts). */
size_t ps_rows_bytes(const ps_rows *r);

/* The values of rows ids[0..n) of table t into out (n x dim floats, row i
 * at out + i * dim). create = 1 (a read for training): a missing row is
 * created with its initial values. create = 0 (evaluation): a missing row
 * reads as its initial values and is not created. Ids may repeat. */
void ps_rows_read(ps_rows *r, int table, const uint64_t *ids, size_t n, int create, float *out);

/* One optimizer step on rows ids[0..n) of table t (distinct ids; a repeated
 * id is a caller bug) with gradients g (n x dim, row i at g + i * dim),
 * each multiplied by 'scale' first (1.0f: as given). A missing row is
 * created first. Each row's update count goes up by one. */
void ps_rows_apply(ps_rows *r, int table, const uint64_t *ids, size_t n, const float *g,
                   float scale);

/* The row of 'id' in table t, or NULL if it does not exist: its dim values
 * followed by its nslots x dim slot values, and *count (may be NULL) its
 * update count. Valid until the next call that may create rows (or, with
 * a budget, evict them). */
float *ps_rows_find(ps_rows *r, int table, uint64_t id, int64_t *count);

/* Checkpoints and export. Visit every row of table t (those in memory in
 * slot order, then, with a budget, those only stored, by id), calling fn with its id, its dim values, its
 * slots (nslots x dim) and its update count; fn returns CM_OK to go on or
 * a negative CM_E* to stop, which is returned. */
typedef int (*ps_rows_visit_fn)(void *ud, uint64_t id, const float *values, const float *slots,
                                int64_t count);
int ps_rows_visit(const ps_rows *r, int table, ps_rows_visit_fn fn, void *ud);

/* Restore: insert or overwrite row 'id' of table t with these values,
 * slots (nslots x dim; NULL: zeros) and update count. */
void ps_rows_put(ps_rows *r, int table, uint64_t id, const float *values, const float *slots,
                 int64_t count);

/* Reads of stored rows off the owner's lock, in three calls: under the
 * lock, ps_rows_fetch_begin notes which of ids[0..n) of table t are not in
 * memory and opens a reader on the row store (NULL: none to read, or no
 * store); without the lock, ps_rows_fetch_read reads them (touching
 * nothing of r); under the lock again, ps_rows_fetch_end puts into memory
 * those the store had that are still missing and were not written to the
 * store since (else a later read under the lock gets them), frees f (NULL
 * is a no-op) and returns how many it put. A row so loaded counts as a
 * miss at its first use, as it would have been. A store error stops the
 * process, as other row store errors do. */
typedef struct ps_rows_fetch ps_rows_fetch;
ps_rows_fetch *ps_rows_fetch_begin(ps_rows *r, int table, const uint64_t *ids, size_t n);
void ps_rows_fetch_read(ps_rows_fetch *f);
size_t ps_rows_fetch_end(ps_rows *r, ps_rows_fetch *f);

#endif /* PS_ROWS_H */
