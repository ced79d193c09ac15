/* ps_rows.c - embedding rows in memory: per table, an open-addressing map
 * from a 64-bit id to a row index, and the rows in chunks that never move.
 * SPDX-License-Identifier: MIT
 *
 * A table's map is an array of (id, row + 1) entries, 0 marking an empty
 * entry, so a zeroed map is empty and every id value (0 and UINT64_MAX
 * included) is a valid key. Ids are mixed with cm_mix64 before masking:
 * real ids are often sequential or share low bits, and linear probing needs
 * them spread. The map is rebuilt at twice the size before it passes 70 %
 * load, from the rows' own ids (read in order, no scan of the old map).
 *
 * Row r lives in chunk r / PS_ROWS_CHUNK. A chunk is one allocation: the
 * rows (stride = dim * (1 + nslots) floats each: values then slots), then
 * the rows' ids, then their update counts. Rows never move, so growth
 * costs a new chunk and, now and then, a rehash of the small map entries;
 * a row's update touches its map entry, its row and its count, and a batch
 * fetches those of later ids while it works on the current one.
 */
#include "ps/ps_rows.h"

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_mem.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "storage/st_rowdb.h"

_Static_assert((PS_ROWS_CHUNK & (PS_ROWS_CHUNK - 1)) == 0, "PS_ROWS_CHUNK: a power of two");

/* A map starts with this many entries (a power of two). */
#define MAP_MIN 16

/* A batch looks rows up AHEAD ids before it uses them, prefetching each
 * row found, and prefetches map entries 2 x AHEAD ids ahead: with a million
 * rows the map and the rows are far out of cache, and a miss on each, one
 * after the other, would cost more than the update itself. A power of two. */
#define AHEAD 16
#define NONE SIZE_MAX
#define CACHE_LINE 64

typedef struct entry {
    uint64_t id;
    uint64_t ref; /* Row index + 1; 0: an empty entry. */
} entry;

typedef struct chunk {
    float *rows;     /* PS_ROWS_CHUNK x stride floats; also the allocation. */
    uint64_t *ids;   /* Each row's id (visits and rehashes). */
    int64_t *counts; /* Each row's update count. */
    uint8_t *flags;  /* Each slot's F_* bits. */
    int64_t *last;   /* With expiry: the step each row was last used. */
} chunk;

/* A slot's flags. F_FREE: no row (evicted; on the table's free list). The
 * others matter with a row store only: F_REF, used since the clock hand
 * last passed (CLOCK eviction); F_DIRTY, changed since it was last
 * written to the row store or copied for a checkpoint; F_DISK, the row
 * store has a copy (or will have: F_PEND); F_PEND, copied for the
 * checkpoint being written, which may not have written it yet, so an
 * eviction writes it all the same (until the next checkpoint's copy). */
enum { F_REF = 1, F_DIRTY = 2, F_DISK = 4, F_FREE = 8, F_PEND = 16, F_FETCHED = 32 };
/* F_FETCHED: loaded by ps_rows_fetch_end, not used since: its first use
 * counts as a miss (it was one; only the read moved off the lock). */

typedef struct rtable {
    const cm_var *var;
    int dim;
    size_t stride; /* Floats per row: dim values, then nslots x dim slots. */
    entry *map;
    size_t cap;    /* Map entries: a power of two >= MAP_MIN. */
    size_t nrows;  /* Slots 0 .. nrows-1 are in use or free (F_FREE). */
    chunk *chunks;
    size_t nchunks, chunks_cap;
    size_t *free_rows; /* Free slots, reused first. */
    size_t nfree, free_cap;
    /* With a row budget: the clock hand, rows in the row store, and rows
     * both there and here. */
    size_t hand, ndisk, nboth;
    size_t row_cost; /* Bytes a resident row counts against the budget. */
    int track;       /* Rows keep the step they were last used (expiry). */
    int64_t now;     /* The step (ps_rows_set_step). */
} rtable;

struct ps_rows {
    ps_optim_cfg optim;
    uint64_t seed;
    int nslots;
    int ntables;
    rtable *tables;
    float *scaled; /* One gradient row times 'scale' (the largest dim). */
    int max_dim;
    /* A row budget (ps_rows_set_spill): rows beyond it live in db. */
    st_rowdb *db;
    size_t budget;
    int trim_next;            /* The table the next eviction looks at first. */
    ps_rows_spill_stats stats;
    /* Admission (ps_rows_set_admission): a count-min sketch of training
     * reads of missing rows, SKETCH_ROWS rows of sketch_mask + 1 counters. */
    int admit_after;
    uint8_t *sketch;
    size_t sketch_mask;
    /* Expiry (ps_rows_set_expiry). */
    int64_t expire_after, step, swept;
    /* The rows this owner wrote to (or removed from) the row store, the last
     * WRING of them at wring[k % WRING] for write k, and the resets: what a
     * read off the lock (ps_rows_fetch) checks its snapshot against. */
    struct wrec {
        uint64_t id;
        int table;
    } *wring;
    uint64_t written, resets;
};

#define WRING ((uint64_t)1 << 16)

#define SKETCH_ROWS 4
#define SKETCH_WIDTH ((size_t)1 << 20)

/* Chunks are cache-line aligned (cm_alloc_aligned) so a row whose size is a
 * multiple of a line (dim 16: 64, 128 or 192 bytes) spans no more lines
 * than it must. */
static void *alloc_chunk(size_t n) {
    void *p = cm_alloc_aligned(n);
    if (!p) {
        fprintf(stderr, "fatal: out of memory allocating %zu bytes for embedding rows\n", n);
        abort();
    }
    return p;
}

static size_t chunk_bytes(const rtable *t) {
    return (size_t)PS_ROWS_CHUNK * (t->stride * sizeof(float) + sizeof(uint64_t) +
                                    sizeof(int64_t) + 1 + (t->track ? sizeof(int64_t) : 0));
}

static inline rtable *tab(const ps_rows *r, int t) {
    assert(t >= 0 && t < r->ntables);
    return &r->tables[t];
}

static inline chunk *chunk_of(const rtable *t, size_t row) {
    return &t->chunks[row / PS_ROWS_CHUNK];
}

static inline float *row_at(const rtable *t, size_t row) {
    return chunk_of(t, row)->rows + (row % PS_ROWS_CHUNK) * t->stride;
}

static inline int64_t *count_at(const rtable *t, size_t row) {
    return &chunk_of(t, row)->counts[row % PS_ROWS_CHUNK];
}

static inline uint8_t *flags_at(const rtable *t, size_t row) {
    return &chunk_of(t, row)->flags[row % PS_ROWS_CHUNK];
}

static inline int64_t *last_at(const rtable *t, size_t row) {
    return &chunk_of(t, row)->last[row % PS_ROWS_CHUNK];
}

static inline uint64_t id_at(const rtable *t, size_t row) {
    return chunk_of(t, row)->ids[row % PS_ROWS_CHUNK];
}

/* Rows in memory. */
static inline size_t live(const rtable *t) { return t->nrows - t->nfree; }

static inline size_t home(const rtable *t, uint64_t id) {
    return (size_t)cm_mix64(id) & (t->cap - 1);
}

/* The entry holding id, or the empty entry where it would go (the map is
 * never full, so the probe ends). */
static inline entry *probe(const rtable *t, uint64_t id) {
    const size_t mask = t->cap - 1;
    size_t i = home(t, id);
    while (t->map[i].ref && t->map[i].id != id) i = (i + 1) & mask;
    return &t->map[i];
}

static inline void prefetch_entry(const rtable *t, uint64_t id) {
    __builtin_prefetch(&t->map[home(t, id)]);
}

/* A batch of ids in flight: ring[i % AHEAD] is the row of ids[i] as looked
 * up AHEAD ids earlier (NONE: missing then). Row indices stay valid across
 * a rehash, so a lookup done ahead is good when the row is used; a row
 * missing then may have been created since (a repeated id in a read). */
typedef struct batch {
    const rtable *t;
    const uint64_t *ids;
    size_t n;
    size_t lines; /* Cache lines of each row to prefetch. */
    int update;   /* Rows will be written, counts too (an apply). */
    size_t ring[AHEAD];
} batch;

static inline void batch_look(batch *b, size_t i) {
    const entry *e = probe(b->t, b->ids[i]);
    size_t row = NONE;
    if (e->ref) {
        row = e->ref - 1;
        const char *p = (const char *)row_at(b->t, row);
        if (b->update) {
            for (size_t l = 0; l < b->lines; l++) __builtin_prefetch(p + CACHE_LINE * l, 1);
            __builtin_prefetch(count_at(b->t, row), 1);
        } else {
            for (size_t l = 0; l < b->lines; l++) __builtin_prefetch(p + CACHE_LINE * l, 0);
        }
    }
    b->ring[i % AHEAD] = row;
}

/* A read uses a row's values, an update the whole row and its count. At
 * most 8 lines of a row are prefetched: the hardware prefetcher follows a
 * wide row once it is being read. */
static void batch_start(batch *b, const rtable *t, const uint64_t *ids, size_t n, int update) {
    b->t = t;
    b->ids = ids;
    b->n = n;
    b->update = update;
    size_t floats = update ? t->stride : (size_t)t->dim;
    b->lines = (floats * sizeof(float) + CACHE_LINE - 1) / CACHE_LINE;
    if (b->lines > 8) b->lines = 8;
    for (size_t i = 0; i < n && i < 2 * AHEAD; i++) prefetch_entry(t, ids[i]);
    for (size_t i = 0; i < n && i < AHEAD; i++) batch_look(b, i);
}

/* The row of ids[i] (i in order from 0) as looked up ahead, or NONE; and
 * the lookups further on. */
static inline size_t batch_next(batch *b, size_t i) {
    size_t row = b->ring[i % AHEAD];
    if (i + 2 * AHEAD < b->n) prefetch_entry(b->t, b->ids[i + 2 * AHEAD]);
    if (i + AHEAD < b->n) batch_look(b, i + AHEAD);
    return row;
}

static void map_init(rtable *t, size_t cap) {
    t->map = cm_calloc(cap, sizeof *t->map);
    t->cap = cap;
}

/* Twice the entries, filled from the rows' ids (each is known distinct). */
static void map_grow(rtable *t) {
    free(t->map);
    map_init(t, t->cap * 2);
    for (size_t c = 0; c < t->nchunks; c++) {
        const uint64_t *ids = t->chunks[c].ids;
        size_t first = c * PS_ROWS_CHUNK, end = t->nrows - first;
        if (end > PS_ROWS_CHUNK) end = PS_ROWS_CHUNK;
        for (size_t k = 0; k < end; k++) {
            if (t->chunks[c].flags[k] & F_FREE) continue;
            entry *e = probe(t, ids[k]);
            e->id = ids[k];
            e->ref = first + k + 1;
        }
    }
}

/* A new row in a free slot or at the end (its values, slots and count not
 * yet written; flags: new, so not in the row store). */
static size_t add_row(rtable *t, entry *e, uint64_t id) {
    if (t->nfree) {
        size_t row = t->free_rows[--t->nfree];
        e->id = id;
        e->ref = row + 1;
        chunk_of(t, row)->ids[row % PS_ROWS_CHUNK] = id;
        *flags_at(t, row) = F_REF | F_DIRTY;
        if (t->track) chunk_of(t, row)->last[row % PS_ROWS_CHUNK] = t->now;
        return row;
    }
    size_t row = t->nrows;
    if (row % PS_ROWS_CHUNK == 0 && row / PS_ROWS_CHUNK == t->nchunks) {
        if (t->nchunks == t->chunks_cap) {
            t->chunks_cap = t->chunks_cap ? 2 * t->chunks_cap : 4;
            chunk *grown = cm_malloc(t->chunks_cap * sizeof *grown);
            if (t->nchunks) memcpy(grown, t->chunks, t->nchunks * sizeof *grown);
            free(t->chunks);
            t->chunks = grown;
        }
        chunk *c = &t->chunks[t->nchunks++];
        c->rows = alloc_chunk(chunk_bytes(t));
        c->ids = (uint64_t *)(c->rows + (size_t)PS_ROWS_CHUNK * t->stride);
        c->counts = (int64_t *)(c->ids + PS_ROWS_CHUNK);
        c->flags = (uint8_t *)(c->counts + PS_ROWS_CHUNK);
        /* PS_ROWS_CHUNK flag bytes keep the next array 8-byte aligned. */
        c->last = t->track ? (int64_t *)(c->flags + PS_ROWS_CHUNK) : NULL;
    }
    t->nrows = row + 1;
    e->id = id;
    e->ref = row + 1;
    chunk_of(t, row)->ids[row % PS_ROWS_CHUNK] = id;
    *flags_at(t, row) = F_REF | F_DIRTY;
    if (t->track) chunk_of(t, row)->last[row % PS_ROWS_CHUNK] = t->now;
    return row;
}

/* The row of id, or a new uninitialised one (*created = 1). */
static size_t find_or_add(rtable *t, uint64_t id, int *created) {
    entry *e = probe(t, id);
    if (e->ref) {
        *created = 0;
        return e->ref - 1;
    }
    /* Grow before the insert that would pass 70 % load. */
    if ((live(t) + 1) * 10 > t->cap * 7) {
        map_grow(t);
        e = probe(t, id);
    }
    *created = 1;
    return add_row(t, e, id);
}

/* The row of id, created with its initial values and zeroed slots. */
static size_t find_or_create(const ps_rows *r, rtable *t, uint64_t id) {
    int created;
    size_t row = find_or_add(t, id, &created);
    if (created) {
        float *p = row_at(t, row);
        cm_row_init(t->var, r->seed, id, p);
        memset(p + t->dim, 0, (t->stride - (size_t)t->dim) * sizeof *p);
        *count_at(t, row) = 0;
    }
    return row;
}

/* ------------------------------------------------------------ row budget */

/* A failure of the row store (a full disk, an unwritable directory):
 * rows would be lost, so the process stops, naming the store and the
 * error; its supervisor restarts it and the cluster rolls back to the
 * newest checkpoint. */
static void spill_fatal(const ps_rows *r, const char *what, const char *err) {
    fprintf(stderr, "fatal: the row store %s: %s: %s; stopping (rows beyond --memory-mb "
            "would be lost)\n", st_rowdb_path(r->db), what, err);
    fflush(stderr);
    _exit(CM_EXIT_RETRY);
}

/* Row (ti, id) was written to the row store or removed from it. */
static inline void log_write(ps_rows *r, int ti, uint64_t id) {
    struct wrec *w = &r->wring[r->written++ % WRING];
    w->id = id;
    w->table = ti;
}

/* Remove map entry e (linear probing: the entries after it that would no
 * longer be found move back). */
static void map_delete(rtable *t, entry *e) {
    const size_t mask = t->cap - 1;
    size_t i = (size_t)(e - t->map), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!t->map[j].ref) break;
        size_t k = home(t, t->map[j].id);
        /* Entry j may fill hole i unless its home lies cyclically in (i, j]. */
        int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            t->map[i] = t->map[j];
            i = j;
        }
    }
    t->map[i].ref = 0;
    t->map[i].id = 0;
}

/* Row slot 'row' (in memory) is removed: its map entry goes, the slot
 * becomes free. */
static void drop_slot(rtable *t, size_t row) {
    map_delete(t, probe(t, id_at(t, row)));
    *flags_at(t, row) = F_FREE;
    if (t->nfree == t->free_cap) {
        t->free_cap = t->free_cap ? 2 * t->free_cap : 256;
        t->free_rows = cm_realloc(t->free_rows, t->free_cap * sizeof *t->free_rows);
    }
    t->free_rows[t->nfree++] = row;
}

static size_t resident_bytes(const ps_rows *r) {
    size_t b = 0;
    for (int i = 0; i < r->ntables; i++) b += live(&r->tables[i]) * r->tables[i].row_cost;
    return b;
}

/* Evict one row of table ti by CLOCK: the first the hand finds not used
 * since it last passed. Returns 0 if the table has no row. */
static int evict_one(ps_rows *r, int ti) {
    rtable *t = &r->tables[ti];
    if (!live(t)) return 0;
    for (;;) {
        size_t row = t->hand;
        t->hand = t->hand + 1 < t->nrows ? t->hand + 1 : 0;
        uint8_t *f = flags_at(t, row);
        if (*f & F_FREE) continue;
        if (*f & F_REF) {
            *f &= (uint8_t)~F_REF;
            continue;
        }
        const uint64_t id = id_at(t, row);
        /* Tagged with the version being computed: a checkpoint of an
         * earlier one must not see it. */
        if ((*f & (F_DIRTY | F_PEND)) || !(*f & F_DISK)) {
            st_rowdb_put(r->db, ti, id, r->step + 1, *count_at(t, row),
                         t->track ? *last_at(t, row) : 0, row_at(t, row), t->stride);
            log_write(r, ti, id);
        }
        if (*f & F_DISK)
            t->nboth--;
        else
            t->ndisk++;
        drop_slot(t, row);
        r->stats.evictions++;
        return 1;
    }
}

/* Back under the budget: evict (tables in turn) down to 90 % of it, so
 * that evictions come in batches, and write them. */
static void trim(ps_rows *r) {
    if (!r->db || resident_bytes(r) <= r->budget) return;
    const size_t target = r->budget / 10 * 9;
    int idle = 0;
    while (resident_bytes(r) > target && idle < r->ntables) {
        int ti = r->trim_next;
        r->trim_next = (r->trim_next + 1) % r->ntables;
        idle = evict_one(r, ti) ? 0 : idle + 1;
    }
    char err[512];
    if (st_rowdb_flush(r->db, err, sizeof err) != CM_OK) spill_fatal(r, "evicting rows", err);
}

/* Row id of table ti from the row store into memory: its slot, or NONE if
 * the store does not have it. */
static size_t load(ps_rows *r, int ti, uint64_t id) {
    rtable *t = &r->tables[ti];
    if (t->ndisk == t->nboth) return NONE; /* Every stored row is here. */
    int created;
    size_t row = find_or_add(t, id, &created);
    assert(created);
    char err[512];
    int64_t count, last;
    int rc = st_rowdb_get(r->db, ti, id, &count, &last, row_at(t, row), t->stride, err,
                          sizeof err);
    if (rc < 0) spill_fatal(r, "reading a row", err);
    if (rc == 0) { /* Not there after all: the slot goes back. */
        drop_slot(t, row);
        return NONE;
    }
    *count_at(t, row) = count;
    if (t->track) *last_at(t, row) = last;
    *flags_at(t, row) = F_REF | F_DISK;
    t->nboth++;
    r->stats.loads++;
    return row;
}

/* Admission: the count-min sketch's estimate of how often (table, id) was
 * read for training while missing, after adding one if 'add'
 * (conservative update: only the smallest counters go up). */
static int sketch_count(ps_rows *r, int ti, uint64_t id, int add) {
    size_t at[SKETCH_ROWS];
    int est = 255;
    for (int k = 0; k < SKETCH_ROWS; k++) {
        uint64_t h = cm_mix64(id ^ cm_mix64(((uint64_t)ti << 8 | (uint64_t)k) + r->seed));
        at[k] = (size_t)k * (r->sketch_mask + 1) + (size_t)(h & r->sketch_mask);
        if (r->sketch[at[k]] < est) est = r->sketch[at[k]];
    }
    if (add && est < 255) {
        est++;
        for (int k = 0; k < SKETCH_ROWS; k++)
            if (r->sketch[at[k]] < est) r->sketch[at[k]] = (uint8_t)est;
    }
    return est;
}

/* What a batch does, for prepare(). */
enum { B_EVAL = 0, B_TRAIN_READ = 1, B_APPLY = 2 };

/* Whether a batch needs prepare(): a row budget, admission or expiry. */
static inline int needs_prepare(const ps_rows *r) {
    return r->db || r->admit_after > 1 || r->expire_after > 0;
}

/* Before a batch on table ti: every id's row that is in the row store is
 * brought into memory, and every row of the batch is marked used (and
 * changed, for an update; with expiry, used at this step), so the batch
 * itself runs as without a budget and the eviction after it spares the
 * rows it just used last. With admission, a training read counts each
 * missing id and creates the rows seen often enough here (the batch then
 * reads without creating). */
static void prepare(ps_rows *r, int ti, const uint64_t *ids, size_t n, int what) {
    rtable *t = &r->tables[ti];
    /* With expiry a use changes the row's last step, which the row store
     * must get too when the row is evicted: it is then changed. */
    const uint8_t mark = (uint8_t)(F_REF | (what == B_APPLY || t->track ? F_DIRTY : 0));
    const int admit = r->admit_after > 1 && what == B_TRAIN_READ;
    for (size_t i = 0; i < n; i++) {
        const entry *e = probe(t, ids[i]);
        size_t row = e->ref ? e->ref - 1 : NONE;
        if (row != NONE) {
            uint8_t *f = flags_at(t, row);
            if (*f & F_FETCHED) {
                *f &= (uint8_t)~F_FETCHED;
                r->stats.misses++;
            } else {
                r->stats.hits++;
            }
        } else {
            r->stats.misses++;
            if (r->db) row = load(r, ti, ids[i]);
            if (row == NONE && admit) {
                if (sketch_count(r, ti, ids[i], 1) >= r->admit_after)
                    row = find_or_create(r, t, ids[i]);
                else
                    r->stats.not_admitted++;
            }
        }
        if (row != NONE) {
            *flags_at(t, row) |= mark;
            if (t->track) *last_at(t, row) = t->now;
        }
    }
    if (r->db) st_rowdb_read_done(r->db);
}

/* Expiry: rows not used for expire_after steps go, from memory and from
 * the row store. */
typedef struct stale_ctx {
    const rtable *t;
    int64_t cutoff;
    uint64_t *ids;
    size_t n, cap;
} stale_ctx;

static int find_stale(void *ud, uint64_t id, int64_t count, int64_t last, const float *row) {
    (void)count, (void)row;
    stale_ctx *c = ud;
    if (last >= c->cutoff || probe(c->t, id)->ref) return CM_OK; /* In memory: seen there. */
    if (c->n == c->cap) {
        c->cap = c->cap ? 2 * c->cap : 1024;
        c->ids = cm_realloc(c->ids, c->cap * sizeof *c->ids);
    }
    c->ids[c->n++] = id;
    return CM_OK;
}

static void expire(ps_rows *r) {
    const int64_t cutoff = r->step - r->expire_after;
    char err[512];
    for (int ti = 0; ti < r->ntables; ti++) {
        rtable *t = &r->tables[ti];
        for (size_t row = 0; row < t->nrows; row++) {
            uint8_t f = *flags_at(t, row);
            if ((f & F_FREE) || *last_at(t, row) >= cutoff) continue;
            if (f & F_DISK) {
                st_rowdb_del(r->db, ti, id_at(t, row), r->step);
                log_write(r, ti, id_at(t, row));
                t->nboth--;
                t->ndisk--;
            }
            drop_slot(t, row);
            r->stats.expired++;
        }
        if (r->db && t->ndisk > t->nboth) {
            /* The removals above first, so the visit does not see them. */
            if (st_rowdb_flush(r->db, err, sizeof err) != CM_OK)
                spill_fatal(r, "removing expired rows", err);
            stale_ctx c = {.t = t, .cutoff = cutoff};
            int rc = st_rowdb_visit(r->db, ti, t->stride, find_stale, &c, err, sizeof err);
            if (rc != CM_OK) spill_fatal(r, "reading the rows", err);
            for (size_t i = 0; i < c.n; i++) {
                st_rowdb_del(r->db, ti, c.ids[i], r->step);
                log_write(r, ti, c.ids[i]);
            }
            t->ndisk -= c.n;
            r->stats.expired += c.n;
            free(c.ids);
        }
    }
    if (r->db && st_rowdb_flush(r->db, err, sizeof err) != CM_OK)
        spill_fatal(r, "removing expired rows", err);
}

void ps_rows_set_admission(ps_rows *r, int k) {
    assert(ps_rows_total(r) == 0 && k >= 0 && k <= 255);
    r->admit_after = k;
    free(r->sketch);
    r->sketch = NULL;
    if (k > 1) {
        r->sketch_mask = SKETCH_WIDTH - 1;
        r->sketch = cm_calloc(SKETCH_ROWS * SKETCH_WIDTH, 1);
    }
}

void ps_rows_set_expiry(ps_rows *r, int64_t steps) {
    assert(ps_rows_total(r) == 0 && steps >= 0);
    r->expire_after = steps;
    for (int i = 0; i < r->ntables; i++) {
        rtable *t = &r->tables[i];
        if (t->track != (steps > 0)) /* The last step counts against a budget. */
            t->row_cost += steps > 0 ? sizeof(int64_t) : (size_t)0 - sizeof(int64_t);
        t->track = steps > 0;
    }
}

void ps_rows_set_step(ps_rows *r, int64_t step) {
    r->step = step;
    if (step < r->swept) r->swept = step; /* A rollback. */
    for (int i = 0; i < r->ntables; i++) r->tables[i].now = step;
    if (r->expire_after <= 0) return;
    /* A sweep every quarter of the expiry period: a row goes between
     * expire_after and 1.25 x expire_after steps after its last use. */
    int64_t every = r->expire_after / 4 > 0 ? r->expire_after / 4 : 1;
    if (step - r->swept >= every) {
        r->swept = step;
        expire(r);
    }
}

void ps_rows_set_spill(ps_rows *r, struct st_rowdb *db, size_t budget_bytes) {
    assert(ps_rows_total(r) == 0);
    r->db = db;
    r->budget = budget_bytes ? budget_bytes : SIZE_MAX;
    if (!r->wring) r->wring = cm_malloc(WRING * sizeof *r->wring);
}

void ps_rows_spill_stats_get(const ps_rows *r, ps_rows_spill_stats *out) {
    *out = r->stats;
    out->resident = out->on_disk = 0;
    for (int i = 0; i < r->ntables; i++) {
        out->resident += live(&r->tables[i]);
        out->on_disk += r->tables[i].ndisk;
    }
    out->resident_bytes = resident_bytes(r);
    out->budget = r->budget == SIZE_MAX ? 0 : r->budget;
    if (r->db) {
        st_rowdb_stats ds;
        st_rowdb_stats_get(r->db, &ds);
        out->bytes_written = ds.bytes_written;
    }
}

static void table_free(rtable *t) {
    for (size_t c = 0; c < t->nchunks; c++) free(t->chunks[c].rows);
    free(t->chunks);
    free(t->map);
    free(t->free_rows);
    t->chunks = NULL;
    t->nchunks = t->chunks_cap = t->nrows = 0;
    t->map = NULL;
    t->cap = 0;
    t->free_rows = NULL;
    t->nfree = t->free_cap = 0;
    t->hand = t->ndisk = t->nboth = 0;
}

ps_rows *ps_rows_create(const cm_model *model, const ps_optim_cfg *optim, uint64_t seed) {
    ps_rows *r = cm_calloc(1, sizeof *r);
    r->optim = *optim;
    r->seed = seed;
    r->nslots = ps_optim_nslots(optim->kind);
    r->ntables = model->ntables;
    r->tables = cm_calloc((size_t)(model->ntables > 0 ? model->ntables : 1), sizeof *r->tables);
    for (int i = 0; i < model->ntables; i++) {
        rtable *t = &r->tables[i];
        t->var = &model->vars[model->table_var[i]];
        t->dim = t->var->dim;
        t->stride = (size_t)t->dim * (size_t)(1 + r->nslots);
        /* Its floats, id, count and flags, and two map entries (the map
         * stays under 70 % load and doubles). */
        t->row_cost = t->stride * sizeof(float) + 17 + 2 * sizeof(entry);
        map_init(t, MAP_MIN);
    }
    r->max_dim = cm_model_max_dim(model);
    r->scaled = cm_malloc((size_t)(r->max_dim > 0 ? r->max_dim : 1) * sizeof(float));
    return r;
}

void ps_rows_destroy(ps_rows *r) {
    if (!r) return;
    for (int i = 0; i < r->ntables; i++) table_free(&r->tables[i]);
    free(r->tables);
    free(r->scaled);
    free(r->sketch);
    free(r->wring);
    free(r);
}

/* Memory goes back too: a rollback is rare, and the rows that come back
 * (restored or retrained) may be far fewer. */
void ps_rows_reset(ps_rows *r, int64_t version, const uint64_t *stored) {
    r->resets++;
    for (int i = 0; i < r->ntables; i++) {
        table_free(&r->tables[i]);
        map_init(&r->tables[i], MAP_MIN);
    }
    char err[512];
    if (r->db) {
        if (st_rowdb_fork(r->db, stored ? version : -1, err, sizeof err) != CM_OK)
            spill_fatal(r, "rolling back", err);
        for (int i = 0; stored && i < r->ntables; i++) r->tables[i].ndisk = stored[i];
    }
    if (r->sketch) memset(r->sketch, 0, SKETCH_ROWS * (r->sketch_mask + 1));
}

void ps_rows_clear(ps_rows *r) { ps_rows_reset(r, -1, NULL); }

size_t ps_rows_checkpoint(ps_rows *r, ps_rows_ckpt_fn fn, void *ud) {
    size_t n = 0;
    for (int ti = 0; ti < r->ntables; ti++) {
        rtable *t = &r->tables[ti];
        for (size_t row = 0; row < t->nrows; row++) {
            uint8_t *f = flags_at(t, row);
            if (*f & F_FREE) continue;
            *f &= (uint8_t)~F_PEND; /* The last checkpoint was written. */
            if (!(*f & F_DIRTY) && (*f & F_DISK)) continue;
            fn(ud, ti, id_at(t, row), *count_at(t, row), t->track ? *last_at(t, row) : 0,
               row_at(t, row));
            if (!(*f & F_DISK)) {
                t->ndisk++;
                t->nboth++;
            }
            *f = (uint8_t)((*f & ~F_DIRTY) | F_PEND | F_DISK);
            n++;
        }
    }
    return n;
}

int ps_rows_dim(const ps_rows *r, int table) { return tab(r, table)->dim; }

int ps_rows_nslots(const ps_rows *r) { return r->nslots; }

size_t ps_rows_count(const ps_rows *r, int table) {
    const rtable *t = tab(r, table);
    return live(t) + t->ndisk - t->nboth;
}

size_t ps_rows_total(const ps_rows *r) {
    size_t n = 0;
    for (int i = 0; i < r->ntables; i++) n += ps_rows_count(r, i);
    return n;
}

size_t ps_rows_bytes(const ps_rows *r) {
    size_t b = sizeof *r + (size_t)r->ntables * sizeof *r->tables +
               (size_t)(r->max_dim > 0 ? r->max_dim : 1) * sizeof(float);
    for (int i = 0; i < r->ntables; i++) {
        const rtable *t = &r->tables[i];
        b += t->cap * sizeof *t->map + t->chunks_cap * sizeof *t->chunks +
             t->nchunks * chunk_bytes(t) + t->free_cap * sizeof *t->free_rows;
    }
    if (r->sketch) b += SKETCH_ROWS * (r->sketch_mask + 1);
    return b;
}

void ps_rows_read(ps_rows *r, int table, const uint64_t *ids, size_t n, int create, float *out) {
    rtable *t = tab(r, table);
    const size_t dim = (size_t)t->dim;
    if (needs_prepare(r)) {
        prepare(r, table, ids, n, create ? B_TRAIN_READ : B_EVAL);
        if (r->admit_after > 1) create = 0; /* prepare created what is admitted. */
    }
    batch b;
    batch_start(&b, t, ids, n, 0);
    for (size_t i = 0; i < n; i++) {
        size_t row = batch_next(&b, i);
        float *o = out + i * dim;
        /* Missing when looked up: a training read creates it (or finds it
         * created by a repeat of its id since); an evaluation read creates
         * nothing, so it is still missing. */
        if (row == NONE && create) row = find_or_create(r, t, ids[i]);
        if (row != NONE)
            memcpy(o, row_at(t, row), dim * sizeof *o);
        else
            cm_row_init(t->var, r->seed, ids[i], o);
    }
    trim(r);
}

void ps_rows_apply(ps_rows *r, int table, const uint64_t *ids, size_t n, const float *g,
                   float scale) {
    rtable *t = tab(r, table);
    const size_t dim = (size_t)t->dim;
    if (needs_prepare(r)) prepare(r, table, ids, n, B_APPLY);
    batch b;
    batch_start(&b, t, ids, n, 1);
    for (size_t i = 0; i < n; i++) {
        size_t row = batch_next(&b, i);
        if (row == NONE) {
            /* Not admitted yet: its gradient is dropped. */
            if (r->admit_after > 1 && sketch_count(r, table, ids[i], 0) < r->admit_after) {
                r->stats.dropped_updates++;
                continue;
            }
            row = find_or_create(r, t, ids[i]);
        }
        float *p = row_at(t, row);
        int64_t *count = count_at(t, row);
        const float *gi = g + i * dim;
        if (scale != 1.0f) {
            for (size_t j = 0; j < dim; j++) r->scaled[j] = gi[j] * scale;
            gi = r->scaled;
        }
        /* Lazy: the step number is this row's own update count + 1. */
        ps_optim_apply(&r->optim, *count + 1, p, gi, p + dim, dim);
        *count += 1;
    }
    trim(r);
}

float *ps_rows_find(ps_rows *r, int table, uint64_t id, int64_t *count) {
    const rtable *t = tab(r, table);
    const entry *e = probe(t, id);
    size_t row = e->ref ? e->ref - 1 : NONE;
    if (row == NONE && r->db) row = load(r, table, id);
    if (row == NONE) return NULL;
    *flags_at(t, row) |= F_REF | F_DIRTY; /* The caller may write it. */
    if (t->track) *last_at(t, row) = t->now;
    if (count) *count = *count_at(t, row);
    return row_at(t, row);
}

/* The rows only the row store has (a ps_rows_visit). */
typedef struct disk_visit {
    const rtable *t;
    ps_rows_visit_fn fn;
    void *ud;
} disk_visit;

static int visit_stored(void *ud, uint64_t id, int64_t count, int64_t last, const float *row) {
    (void)last;
    const disk_visit *v = ud;
    if (probe(v->t, id)->ref) return CM_OK; /* Seen in memory (newer there). */
    return v->fn(v->ud, id, row, row + v->t->dim, count);
}

int ps_rows_visit(const ps_rows *r, int table, ps_rows_visit_fn fn, void *ud) {
    const rtable *t = tab(r, table);
    const size_t dim = (size_t)t->dim;
    for (size_t row = 0; row < t->nrows; row++) {
        const chunk *c = chunk_of(t, row);
        const size_t k = row % PS_ROWS_CHUNK;
        if (c->flags[k] & F_FREE) continue;
        const float *p = c->rows + k * t->stride;
        int rc = fn(ud, c->ids[k], p, p + dim, c->counts[k]);
        if (rc != CM_OK) return rc;
    }
    if (!r->db || t->ndisk == t->nboth) return CM_OK;
    disk_visit v = {t, fn, ud};
    char err[512] = "a callback failed";
    int rc = st_rowdb_visit(r->db, table, t->stride, visit_stored, &v, err, sizeof err);
    if (rc == CM_EIO || rc == CM_ECORRUPT) spill_fatal(r, "reading the rows", err);
    return rc;
}

void ps_rows_put(ps_rows *r, int table, uint64_t id, const float *values, const float *slots,
                 int64_t count) {
    rtable *t = tab(r, table);
    const size_t dim = (size_t)t->dim, nslot_floats = t->stride - dim;
    /* With a row budget, a stored copy is loaded first so that the row is
     * counted once (it is overwritten below). */
    size_t row = NONE;
    if (r->db && !probe(t, id)->ref) row = load(r, table, id);
    int created;
    if (row == NONE) row = find_or_add(t, id, &created);
    *flags_at(t, row) |= F_REF | F_DIRTY;
    if (t->track) *last_at(t, row) = t->now; /* Restored: used now. */
    float *p = row_at(t, row);
    memcpy(p, values, dim * sizeof *p);
    if (slots)
        memcpy(p + dim, slots, nslot_floats * sizeof *p);
    else
        memset(p + dim, 0, nslot_floats * sizeof *p);
    *count_at(t, row) = count;
    trim(r);
}

/* ------------------------------------------------------------ reads off the lock */

struct ps_rows_fetch {
    int table;
    size_t stride, n;
    uint64_t *ids;
    float *vals;
    int64_t *counts;
    uint8_t *found;
    uint64_t written, resets;
    st_rowdb_reader *rd;
    int rc;
    char err[256];
};

ps_rows_fetch *ps_rows_fetch_begin(ps_rows *r, int table, const uint64_t *ids, size_t n) {
    if (!r->db || n == 0) return NULL;
    rtable *t = tab(r, table);
    if (t->ndisk == t->nboth) return NULL; /* Every stored row is here. */
    size_t m = 0;
    for (size_t i = 0; i < n; i++) m += !probe(t, ids[i])->ref;
    if (!m) return NULL;
    ps_rows_fetch *f = cm_calloc(1, sizeof *f);
    f->table = table;
    f->stride = t->stride;
    f->ids = cm_malloc(m * sizeof *f->ids);
    for (size_t i = 0; i < n; i++)
        if (!probe(t, ids[i])->ref) f->ids[f->n++] = ids[i];
    f->vals = cm_malloc(m * t->stride * sizeof *f->vals);
    f->counts = cm_malloc(m * sizeof *f->counts);
    f->found = cm_calloc(m, 1);
    f->written = r->written;
    f->resets = r->resets;
    f->rd = st_rowdb_reader_open(r->db);
    return f;
}

void ps_rows_fetch_read(ps_rows_fetch *f) {
    if (!f || !f->rd) return;
    int64_t last; /* Not kept: a row put now counts as used now. */
    for (size_t i = 0; i < f->n; i++) {
        int rc = st_rowdb_reader_get(f->rd, f->table, f->ids[i], &f->counts[i], &last,
                                     f->vals + i * f->stride, f->stride, f->err, sizeof f->err);
        if (rc < 0) {
            f->rc = rc;
            break;
        }
        f->found[i] = (uint8_t)rc;
    }
    st_rowdb_reader_close(f->rd);
    f->rd = NULL;
}

/* The rows written since write 'from': a set of (table, id), open
 * addressing over mixed keys. */
typedef struct wset {
    struct wrec *e;
    uint8_t *used;
    size_t mask;
} wset;

static uint64_t wkey(int table, uint64_t id) { return cm_mix64(id ^ ((uint64_t)table << 40)); }

static void wset_build(wset *w, const ps_rows *r, uint64_t from) {
    size_t k = (size_t)(r->written - from), cap = 16;
    while (cap < 2 * k) cap *= 2;
    w->e = cm_malloc(cap * sizeof *w->e);
    w->used = cm_calloc(cap, 1);
    w->mask = cap - 1;
    for (uint64_t x = from; x < r->written; x++) {
        const struct wrec *src = &r->wring[x % WRING];
        size_t i = (size_t)wkey(src->table, src->id) & w->mask;
        while (w->used[i] && !(w->e[i].id == src->id && w->e[i].table == src->table))
            i = (i + 1) & w->mask;
        w->used[i] = 1;
        w->e[i] = *src;
    }
}

static int wset_has(const wset *w, int table, uint64_t id) {
    size_t i = (size_t)wkey(table, id) & w->mask;
    for (; w->used[i]; i = (i + 1) & w->mask)
        if (w->e[i].id == id && w->e[i].table == table) return 1;
    return 0;
}

size_t ps_rows_fetch_end(ps_rows *r, ps_rows_fetch *f) {
    if (!f) return 0;
    if (f->rd) ps_rows_fetch_read(f); /* Not read off the lock: now then. */
    if (f->rc < 0) spill_fatal(r, "reading rows", f->err);
    size_t got = 0;
    /* Put only if nothing could have made the copy stale: no reset since,
     * and the row not written since (an eviction after a load and an
     * update, say); beyond WRING writes, none (prepare reads them). */
    if (f->resets == r->resets && r->written - f->written <= WRING) {
        rtable *t = tab(r, f->table);
        wset w;
        wset_build(&w, r, f->written);
        for (size_t i = 0; i < f->n; i++) {
            if (!f->found[i] || probe(t, f->ids[i])->ref || wset_has(&w, f->table, f->ids[i]))
                continue;
            int created;
            size_t row = find_or_add(t, f->ids[i], &created);
            assert(created);
            memcpy(row_at(t, row), f->vals + i * f->stride, f->stride * sizeof(float));
            *count_at(t, row) = f->counts[i];
            if (t->track) *last_at(t, row) = t->now; /* Used now: its request's. */
            *flags_at(t, row) = (uint8_t)(F_REF | F_DISK | F_FETCHED | (t->track ? F_DIRTY : 0));
            t->nboth++;
            r->stats.loads++;
            got++;
        }
        free(w.e);
        free(w.used);
    }
    free(f->ids);
    free(f->vals);
    free(f->counts);
    free(f->found);
    free(f);
    trim(r);
    return got;
}
