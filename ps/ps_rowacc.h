/* ps_rowacc.h - summing row gradients per (table, id).
 * SPDX-License-Identifier: MIT
 *
 * A shard sums the row gradients of a sync step over its workers, and a
 * collective-mode worker over every rank, in a fixed order (rank order),
 * so the result does not depend on arrival order and every process that
 * sums the same inputs gets the same bits. ps_rowlist is a plain list of
 * (table, id, gradient) entries; ps_rowacc sums entries per (table, id)
 * in the order they are added (an open-addressing map over its entries,
 * which keep first-seen order). Gradients are stored with a stride of
 * 'dim' floats (set it before use: the model's widest row). Not
 * thread-safe; zero-initialised structs are empty.
 */
#ifndef PS_ROWACC_H
#define PS_ROWACC_H
#include <stddef.h>
#include <stdint.h>

typedef struct ps_rowlist {
    size_t n, cap;
    int dim;         /* Stride of g. */
    uint32_t *tab;
    uint64_t *id;
    float *g;
} ps_rowlist;

/* Room for 'more' entries past n. */
void ps_rowlist_reserve(ps_rowlist *l, size_t more);
void ps_rowlist_free(ps_rowlist *l); /* Keeps nothing; zeroes *l. */

typedef struct ps_rowacc {
    ps_rowlist e;    /* The sums, in first-seen order. */
    size_t mcap;     /* Map capacity (power of two, > 2 * entries). */
    int32_t *map;    /* Entry index + 1, or 0 for empty. */
    /* Scratch of ps_rowacc_each_table. */
    size_t *count;   /* Per table. */
    size_t *goff;    /* Per table. */
    int ncount;
    uint64_t *ids;
    float *g;
    size_t scap;
} ps_rowacc;

/* Add the n values at g (float32, or bfloat16 when bf16; maybe unaligned)
 * to the entry of (tab, id), creating it with them. */
void ps_rowacc_add(ps_rowacc *a, uint32_t tab, uint64_t id, const uint8_t *g, int n, int bf16);

/* The sums grouped by table, for row stores that work a table at a time:
 * for each table t < ntables with entries, in table order, fn(ud, t, ids,
 * n, g) with the table's ids (in first-seen order) and their gradients
 * packed at dims[t] floats each (scratch of the accumulator, valid during
 * the call). */
typedef void (*ps_rowacc_table_fn)(void *ud, uint32_t table, const uint64_t *ids, size_t n,
                                   const float *g);
void ps_rowacc_each_table(ps_rowacc *a, int ntables, const int *dims, ps_rowacc_table_fn fn,
                          void *ud);

/* Empty it (O(entries)); the memory stays for the next use. */
void ps_rowacc_reset(ps_rowacc *a);
void ps_rowacc_free(ps_rowacc *a);

#endif /* PS_ROWACC_H */
