/* fz_requests.h - real PS requests for the seed corpora (gen_seeds.c) and
 * for the store target's base store, built the way ps_client builds them
 * (protobuf-c for the small fields, ps_wire for tensors and rows).
 * SPDX-License-Identifier: MIT
 *
 * Every builder appends one request message to 'out' (not a record).
 * Gradients and values are small deterministic numbers; row ids are the
 * first ids of each table that live on 'shard'.
 */
#ifndef FUZZ_FZ_REQUESTS_H
#define FUZZ_FZ_REQUESTS_H
#include <stdint.h>

#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "fuzz/fz_util.h"

typedef struct fz_init {
    const char *optim;       /* "sgd", "adam", ... */
    const char *table_optim; /* Models with tables: "adagrad", ... */
    int async;
    uint32_t workers;
    int with_spec;           /* Carry the ModelSpec (a server without a model). */
    int with_values;         /* Initial values of the shard's partitions. */
    int zero_init;
} fz_init;

void fz_req_init(fz_buf *out, const cm_model *m, const cm_placement *pl, int shard,
                 uint32_t rank, const fz_init *o);

typedef struct fz_push {
    uint32_t rank;
    uint64_t epoch;
    int64_t step;
    int bf16;         /* Gradients as bfloat16. */
    int skip_parts;   /* Push no dense gradients. */
    int rows;         /* Row gradients per table (models with tables). */
    int rows_final;
    int want;         /* Row ids asked for per table (PushPull). */
    int train;
    int part_from, part_to; /* Only the shard's partitions from..to-1 (its
                             * own order); part_to 0: to the last. */
    uint32_t step_parts;    /* PushRequest.step_parts (a step in calls). */
} fz_push;

void fz_req_push(fz_buf *out, const cm_model *m, const cm_placement *pl, int shard,
                 const fz_push *o);

typedef struct fz_pull {
    uint32_t rank;
    uint64_t epoch;
    int64_t min_version;
    int want;
    int train, rows_only;
    int dump;
    uint32_t dump_table, dump_max;
    uint64_t dump_from;
} fz_pull;

void fz_req_pull(fz_buf *out, const cm_model *m, const cm_placement *pl, int shard,
                 const fz_pull *o);

/* Stats, Checkpoints (a = keep_from), Rollback (a = version, b = epoch),
 * Shutdown (a reason). */
void fz_req_small(fz_buf *out, int method, const cm_model *m, const cm_placement *pl,
                  uint32_t rank, int64_t a, uint64_t b);

/* The id of the k-th row (k >= 0) of table t that lives on 'shard'. */
uint64_t fz_row_id(int t, int k, int nshards, int shard);

#endif /* FUZZ_FZ_REQUESTS_H */
