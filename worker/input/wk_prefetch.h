/* wk_prefetch.h - a reader thread that prepares batches ahead of the step.
 * SPDX-License-Identifier: MIT
 *
 * The thread walks steps first_step .. first_step + nsteps - 1, gathers this
 * rank's slice of each global batch (wk_order.h) into float buffers and
 * hands them over through a bounded queue of 'depth' buffers that are
 * recycled: nothing is allocated per batch. One consumer thread.
 *
 *   wk_prefetch_start -> (wk_prefetch_next -> wk_prefetch_release)* -> wk_prefetch_stop
 */
#ifndef WK_PREFETCH_H
#define WK_PREFETCH_H
#include <stddef.h>
#include <stdint.h>

#include "worker/input/wk_dataset.h"

typedef struct wk_batch {
    int64_t step;  /* Global step this batch belongs to. */
    int64_t epoch; /* Epoch of that step. */
    size_t n;      /* Examples in this slice. */
    float *x;      /* n * dim floats in [0, 1]. */
    int32_t *y;    /* n labels. */
} wk_batch;

typedef struct wk_prefetch_cfg {
    const wk_dataset *data; /* Borrowed; must outlive the prefetcher. */
    uint64_t seed;
    size_t global_batch;    /* B, summed over all ranks. */
    int rank, nranks;       /* This reader's slice of each batch. */
    int64_t first_step;     /* Resume point (0 for a fresh run). */
    int64_t nsteps;         /* How many steps to produce. */
    int depth;              /* Queue capacity in batches (>= 1; 0 means 4). */
} wk_prefetch_cfg;

typedef struct wk_prefetch wk_prefetch;

/* Start the reader thread. Returns CM_EINVAL for an empty data set, a zero
 * batch, a batch larger than the data set, a bad rank, or a negative
 * first_step, nsteps or depth, CM_ENOMEM; *out is NULL on error. When the
 * batch is smaller than nranks, the last ranks get empty slices (n == 0). */
int wk_prefetch_start(const wk_prefetch_cfg *cfg, wk_prefetch **out);

/* Wait for the next batch. Returns CM_OK with *out set (valid until it is
 * released), or CM_ESHUTDOWN after the last step (and on every call after
 * that). Batches come in step order. At most one batch may be held at a
 * time: calling this while holding one is a bug (it asserts, and returns
 * CM_EBUSY when assertions are off). */
int wk_prefetch_next(wk_prefetch *p, wk_batch **out);

/* Give a batch back for reuse. */
void wk_prefetch_release(wk_prefetch *p, wk_batch *b);

/* Stop the thread (even mid-run), join it and free everything (NULL ok). */
void wk_prefetch_stop(wk_prefetch *p);

#endif /* WK_PREFETCH_H */
