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

#include "common/cm_mem.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"

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
} chunk;

typedef struct rtable {
    const cm_var *var;
    int dim;
    size_t stride; /* Floats per row: dim values, then nslots x dim slots. */
    entry *map;
    size_t cap;    /* Map entries: a power of two >= MAP_MIN. */
    size_t nrows;  /* Rows 0 .. nrows-1 exist, in creation order. */
    chunk *chunks;
    size_t nchunks, chunks_cap;
} rtable;

struct ps_rows {
    ps_optim_cfg optim;
    uint64_t seed;
    int nslots;
    int ntables;
    rtable *tables;
    float *scaled; /* One gradient row times 'scale' (the largest dim). */
    int max_dim;
};

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
    return (size_t)PS_ROWS_CHUNK *
           (t->stride * sizeof(float) + sizeof(uint64_t) + sizeof(int64_t));
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
            entry *e = probe(t, ids[k]);
            e->id = ids[k];
            e->ref = first + k + 1;
        }
    }
}

/* A new row at the end (its values, slots and count not yet written). */
static size_t add_row(rtable *t, entry *e, uint64_t id) {
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
    }
    t->nrows = row + 1;
    e->id = id;
    e->ref = row + 1;
    chunk_of(t, row)->ids[row % PS_ROWS_CHUNK] = id;
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
    if ((t->nrows + 1) * 10 > t->cap * 7) {
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

static void table_free(rtable *t) {
    for (size_t c = 0; c < t->nchunks; c++) free(t->chunks[c].rows);
    free(t->chunks);
    free(t->map);
    t->chunks = NULL;
    t->nchunks = t->chunks_cap = t->nrows = 0;
    t->map = NULL;
    t->cap = 0;
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
    free(r);
}

/* Memory goes back too: a rollback is rare, and the rows that come back
 * (restored or retrained) may be far fewer. */
void ps_rows_clear(ps_rows *r) {
    for (int i = 0; i < r->ntables; i++) {
        table_free(&r->tables[i]);
        map_init(&r->tables[i], MAP_MIN);
    }
}

int ps_rows_dim(const ps_rows *r, int table) { return tab(r, table)->dim; }

int ps_rows_nslots(const ps_rows *r) { return r->nslots; }

size_t ps_rows_count(const ps_rows *r, int table) { return tab(r, table)->nrows; }

size_t ps_rows_total(const ps_rows *r) {
    size_t n = 0;
    for (int i = 0; i < r->ntables; i++) n += r->tables[i].nrows;
    return n;
}

size_t ps_rows_bytes(const ps_rows *r) {
    size_t b = sizeof *r + (size_t)r->ntables * sizeof *r->tables +
               (size_t)(r->max_dim > 0 ? r->max_dim : 1) * sizeof(float);
    for (int i = 0; i < r->ntables; i++) {
        const rtable *t = &r->tables[i];
        b += t->cap * sizeof *t->map + t->chunks_cap * sizeof *t->chunks +
             t->nchunks * chunk_bytes(t);
    }
    return b;
}

void ps_rows_read(ps_rows *r, int table, const uint64_t *ids, size_t n, int create, float *out) {
    rtable *t = tab(r, table);
    const size_t dim = (size_t)t->dim;
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
}

void ps_rows_apply(ps_rows *r, int table, const uint64_t *ids, size_t n, const float *g,
                   float scale) {
    rtable *t = tab(r, table);
    const size_t dim = (size_t)t->dim;
    batch b;
    batch_start(&b, t, ids, n, 1);
    for (size_t i = 0; i < n; i++) {
        size_t row = batch_next(&b, i);
        if (row == NONE) row = find_or_create(r, t, ids[i]);
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
}

float *ps_rows_find(ps_rows *r, int table, uint64_t id, int64_t *count) {
    const rtable *t = tab(r, table);
    const entry *e = probe(t, id);
    if (!e->ref) return NULL;
    if (count) *count = *count_at(t, e->ref - 1);
    return row_at(t, e->ref - 1);
}

int ps_rows_visit(const ps_rows *r, int table, ps_rows_visit_fn fn, void *ud) {
    const rtable *t = tab(r, table);
    const size_t dim = (size_t)t->dim;
    for (size_t row = 0; row < t->nrows; row++) {
        const chunk *c = chunk_of(t, row);
        const size_t k = row % PS_ROWS_CHUNK;
        const float *p = c->rows + k * t->stride;
        int rc = fn(ud, c->ids[k], p, p + dim, c->counts[k]);
        if (rc != CM_OK) return rc;
    }
    return CM_OK;
}

void ps_rows_put(ps_rows *r, int table, uint64_t id, const float *values, const float *slots,
                 int64_t count) {
    rtable *t = tab(r, table);
    const size_t dim = (size_t)t->dim, nslot_floats = t->stride - dim;
    int created;
    size_t row = find_or_add(t, id, &created);
    float *p = row_at(t, row);
    memcpy(p, values, dim * sizeof *p);
    if (slots)
        memcpy(p + dim, slots, nslot_floats * sizeof *p);
    else
        memset(p + dim, 0, nslot_floats * sizeof *p);
    *count_at(t, row) = count;
}
