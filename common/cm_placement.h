/* cm_placement.h - which PS shard owns which part of which variable.
 * SPDX-License-Identifier: MIT
 *
 * A pure function of (model, number of shards, minimum partition size):
 * every process computes the same map, so nothing needs coordinating.
 *
 *  1. Each variable is split along its first dimension into
 *     p = clamp(bytes / min_part_bytes, 1, rows) partitions of near-equal
 *     row counts (the first rows % p partitions get one more row), as
 *     TensorFlow's min_max_variable_partitioner does, but not capped by the
 *     shard count: a shard may own several partitions of one variable, so a
 *     worker can send a large gradient in pieces as they are computed. A 1-D
 *     variable has numel rows of one element.
 *  2. Partitions are assigned greedily by bytes: largest first (ties by
 *     variable then partition index), each to the shard holding the fewest
 *     bytes so far (ties to the lowest shard index).
 *
 * Partitions are numbered in (variable, partition) order; that number is the
 * partition id used on the wire. A cm_placement is immutable.
 *
 * Embedding tables have no partitions: row 'id' of table t lives on shard
 * cm_row_shard(t, id, nshards), a 64-bit mix of (t, id) reduced to
 * [0, nshards) by a multiply-shift. Never id mod n: bucketized integers and
 * hashed categorical values are correlated with their low bits.
 */
#ifndef CM_PLACEMENT_H
#define CM_PLACEMENT_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"

/* Default minimum partition size: 256 KiB. */
#define CM_PLACEMENT_MIN_PART_BYTES ((size_t)256 << 10)

typedef struct cm_partition {
    int var;           /* Variable index in the model. */
    int index;         /* Partition index within the variable. */
    int shard;         /* Owning PS shard. */
    size_t row_begin;  /* Rows [row_begin, row_end) of the variable. */
    size_t row_end;
    size_t begin;      /* Elements [begin, begin + count) of the variable. */
    size_t count;
    size_t offset;     /* = vars[var].offset + begin: position in the flat
                        * parameter vector. */
} cm_partition;

typedef struct cm_placement {
    int nshards;
    size_t min_part_bytes;
    int nparts;
    cm_partition *parts;   /* nparts, in (var, index) order. */
    size_t *shard_bytes;   /* nshards: bytes each shard owns. */
    int *shard_nparts;     /* nshards: partitions each shard owns. */
    uint64_t fingerprint;  /* Hash of the model fingerprint, nshards,
                            * min_part_bytes and the whole map. */
} cm_placement;

/* Compute the placement. Returns CM_EINVAL for nshards < 1 or
 * min_part_bytes == 0; *out NULL on error. Release with
 * cm_placement_destroy() (NULL is a no-op). */
int cm_placement_create(const cm_model *m, int nshards, size_t min_part_bytes,
                        cm_placement **out);
void cm_placement_destroy(cm_placement *p);

/* The shard of row 'id' of table 't' (the table's index among the model's
 * tables, cm_var.table). Pure; 0 when nshards <= 1. */
int cm_row_shard(int table, uint64_t id, int nshards);

#endif /* CM_PLACEMENT_H */
