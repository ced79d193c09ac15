/* wk_rowset.h - the embedding rows a batch needs: unique keys and maps back.
 * SPDX-License-Identifier: MIT
 *
 * A batch of n examples of a sparse model has n x nfields ids; field f's id
 * is a row of table field_table[f]. Duplicates are the common case (Zipf),
 * so a worker pulls and pushes each (table, id) once: wk_rowset_build sorts
 * the batch's keys (by table, then id; an LSD radix sort of the 64-bit ids
 * within each table), keeps the unique ones, and remembers for every
 * position p = e * nfields + f the index inv[p] of its unique row. The row
 * gradient of a unique row is then the sum over the positions that map to
 * it (the model's scatter-add over inv).
 *
 * Unique rows are numbered in (table, id) order, so the rows of table t are
 * the contiguous range [tab_begin[t], tab_begin[t + 1]). Everything is
 * preallocated for up to max_n examples by wk_rowset_init; building never
 * allocates. Not thread-safe (one owner).
 */
#ifndef WK_ROWSET_H
#define WK_ROWSET_H
#include <stddef.h>
#include <stdint.h>

typedef struct wk_rowset {
    /* Shape (set by wk_rowset_init). */
    size_t max_n;   /* Room for this many examples. */
    int nfields;
    int ntables;
    /* The last build. */
    size_t n;       /* Examples. */
    size_t nuniq;   /* Unique (table, id) rows. */
    uint32_t *tables; /* nuniq: table of unique row u (ascending). */
    uint64_t *ids;    /* nuniq: its id (ascending within a table). */
    size_t *tab_begin; /* ntables + 1: rows of table t are [tab_begin[t], tab_begin[t+1]). */
    int32_t *inv;      /* n * nfields: unique row of position e * nfields + f. */
    /* Private scratch for the sort. */
    void *scratch;
} wk_rowset;

/* Room for batches of up to max_n examples of nfields fields over ntables
 * tables. Returns CM_EINVAL (a zero size, or max_n * nfields >= 2^31),
 * CM_ENOMEM; on error *r is zeroed. Release with wk_rowset_free(). */
int wk_rowset_init(wk_rowset *r, size_t max_n, int nfields, int ntables);
void wk_rowset_free(wk_rowset *r); /* Zeroed or NULL is fine. */

/* Build from ids (n x nfields, example-major: ids[e * nfields + f]) with
 * field f reading table field_table[f] (each in [0, ntables)). n <= max_n
 * (n == 0 gives an empty set). */
void wk_rowset_build(wk_rowset *r, const uint64_t *ids, size_t n, const int *field_table);

/* Copy src's last build into dst (initialised with at least src's shape). */
void wk_rowset_copy(wk_rowset *dst, const wk_rowset *src);

#endif /* WK_ROWSET_H */
