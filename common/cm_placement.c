/* cm_placement.c - split variables into partitions and assign them to shards.
 * SPDX-License-Identifier: MIT
 *
 * Implements the two steps described in cm_placement.h: a min/max
 * partitioner along the first dimension, then a greedy largest-first
 * assignment to the least loaded shard. Everything is integer arithmetic and
 * a sort with a total order, so every process computes the same map.
 */
#include "common/cm_placement.h"

#include <stdlib.h>

#include "common/cm_mem.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"

/* Seed of the placement fingerprint ("placemnt" in ASCII). */
#define FINGERPRINT_SEED 0x706c6163656d6e74ULL

/* Rows of a variable along its first dimension, and elements per row. A 1-D
 * variable has numel rows of one element; a scalar is one row. */
static void var_rows(const cm_var *v, size_t *rows, size_t *row_size) {
    if (v->ndims < 1 || v->dims[0] < 1) {
        *rows = v->numel > 0 ? 1 : 0;
        *row_size = v->numel;
        return;
    }
    *rows = (size_t)v->dims[0];
    *row_size = v->numel / *rows;
}

/* Number of partitions of a variable: clamp(bytes / min_part_bytes, 1, rows).
 * Not capped by the shard count: a shard may own several partitions of one
 * variable, which lets a worker send a large variable's gradient in pieces
 * while the rest of it is still being computed. */
static size_t var_nparts(const cm_var *v, size_t min_part_bytes) {
    if (v->kind == CM_VAR_TABLE) return 0; /* Rows are placed by id. */
    size_t rows, row_size;
    var_rows(v, &rows, &row_size);
    size_t p = v->numel * sizeof(float) / min_part_bytes;
    if (p > rows) p = rows;
    if (p < 1) p = 1;
    return p;
}

/* Order for the greedy pass: more bytes first, then lower variable, then
 * lower partition index. No two partitions compare equal, so qsort's
 * instability cannot change the result. */
static int cmp_parts(const void *a, const void *b) {
    const cm_partition *x = *(const cm_partition *const *)a;
    const cm_partition *y = *(const cm_partition *const *)b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    if (x->var != y->var) return x->var < y->var ? -1 : 1;
    if (x->index != y->index) return x->index < y->index ? -1 : 1;
    return 0;
}

int cm_placement_create(const cm_model *m, int nshards, size_t min_part_bytes,
                        cm_placement **out) {
    cm_placement *p = NULL;
    *out = NULL;
    if (!m || nshards < 1 || min_part_bytes == 0 || m->nvars < 0) goto fail;

    /* Step 1: the partitioner. Count first so that parts is one array. */
    size_t total = 0;
    for (int v = 0; v < m->nvars; v++) total += var_nparts(&m->vars[v], min_part_bytes);
    /* Partition ids travel as int; a model this large is a caller bug. */
    if (total > (size_t)0x7fffffff) goto fail;

    p = cm_calloc(1, sizeof *p);
    p->nshards = nshards;
    p->min_part_bytes = min_part_bytes;
    p->nparts = (int)total;
    p->parts = cm_calloc(total, sizeof *p->parts);
    p->shard_bytes = cm_calloc((size_t)nshards, sizeof *p->shard_bytes);
    p->shard_nparts = cm_calloc((size_t)nshards, sizeof *p->shard_nparts);

    size_t k = 0;
    for (int v = 0; v < m->nvars; v++) {
        const cm_var *var = &m->vars[v];
        size_t rows, row_size;
        var_rows(var, &rows, &row_size);
        size_t np = var_nparts(var, min_part_bytes);
        if (np == 0) continue; /* A table: its rows are placed by id. */
        /* The first rows % np partitions get one extra row. */
        size_t base = rows / np, extra = rows % np, row = 0;
        for (size_t i = 0; i < np; i++) {
            cm_partition *part = &p->parts[k++];
            size_t nrows = base + (i < extra ? 1 : 0);
            part->var = v;
            part->index = (int)i;
            part->shard = -1;
            part->row_begin = row;
            part->row_end = row + nrows;
            part->begin = row * row_size;
            part->count = nrows * row_size;
            part->offset = var->offset + part->begin;
            row += nrows;
        }
    }

    /* Step 2: the greedy assignment, largest first, each to the shard with
     * the fewest bytes so far (the lowest index on a tie). Partition sizes
     * compare by element count, which orders bytes the same way. */
    cm_partition **order = cm_calloc(total, sizeof *order);
    for (size_t i = 0; i < total; i++) order[i] = &p->parts[i];
    if (total > 1) qsort(order, total, sizeof *order, cmp_parts);
    for (size_t i = 0; i < total; i++) {
        int best = 0;
        for (int s = 1; s < nshards; s++)
            if (p->shard_bytes[s] < p->shard_bytes[best]) best = s;
        order[i]->shard = best;
        p->shard_bytes[best] += order[i]->count * sizeof(float);
        p->shard_nparts[best]++;
    }
    free(order);

    /* The fingerprint covers the inputs and the whole map, so two processes
     * that agree on it agree on every partition. */
    uint64_t h = cm_model_fingerprint(m);
    h = cm_hash_bytes(&h, sizeof h, FINGERPRINT_SEED);
    uint64_t head[2] = {(uint64_t)nshards, (uint64_t)min_part_bytes};
    h = cm_hash_bytes(head, sizeof head, h);
    for (size_t i = 0; i < total; i++) {
        const cm_partition *part = &p->parts[i];
        uint64_t rec[5] = {(uint64_t)part->var, (uint64_t)part->index, (uint64_t)part->shard,
                           (uint64_t)part->begin, (uint64_t)part->count};
        h = cm_hash_bytes(rec, sizeof rec, h);
    }
    p->fingerprint = h;
    *out = p;
    return CM_OK;
fail:
    cm_placement_destroy(p);
    return CM_EINVAL;
}

int cm_row_shard(int table, uint64_t id, int nshards) {
    if (nshards <= 1) return 0;
    uint64_t h = cm_mix64(id ^ cm_mix64((uint64_t)table + 0x7461626c65ULL));
    /* Lemire's multiply-shift: unbiased enough, no division. */
    return (int)(((unsigned __int128)h * (uint64_t)nshards) >> 64);
}

void cm_placement_destroy(cm_placement *p) {
    if (!p) return;
    free(p->parts);
    free(p->shard_bytes);
    free(p->shard_nparts);
    free(p);
}
