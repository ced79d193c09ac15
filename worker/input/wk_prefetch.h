/* wk_prefetch.h - a reader thread that prepares batches ahead of the step.
 * SPDX-License-Identifier: MIT
 *
 * The thread walks steps first_step .. first_step + nsteps - 1, gathers this
 * rank's slice of each global batch into buffers and hands them over
 * through a bounded queue of 'depth' buffers that are recycled: nothing is
 * allocated per batch. One consumer thread. Two sources:
 *  - images in memory (wk_dataset): the order of wk_order.h, pixels as
 *    floats in [0, 1];
 *  - click logs in the Criteo format (wk_ctrdata): streamed from the file
 *    in its own order (see wk_ctrdata.h), one row id per field; the thread
 *    also deduplicates each batch's rows (wk_rowset), so the step gets the
 *    unique rows to pull and the map back, ready.
 *
 *   wk_prefetch_start -> (wk_prefetch_next -> wk_prefetch_release)* -> wk_prefetch_stop
 *
 * The consumer may hold two batches at once (the current step's and the
 * next one's, whose rows PS mode asks for with the current push) when
 * depth >= 2; it releases them in order.
 */
#ifndef WK_PREFETCH_H
#define WK_PREFETCH_H
#include <stddef.h>
#include <stdint.h>

#include "worker/input/wk_ctrdata.h"
#include "worker/input/wk_dataset.h"
#include "worker/input/wk_rowset.h"

typedef struct wk_batch {
    int64_t step;  /* Global step this batch belongs to. */
    int64_t epoch; /* Epoch of that step. */
    size_t n;      /* Examples in this slice. */
    float *x;      /* Images: n * dim floats in [0, 1]; NULL for clicks. */
    int32_t *y;    /* n labels. */
    uint64_t *ids; /* Clicks: n * nfields row ids (example-major). */
    wk_rowset rows; /* Clicks: the unique rows of ids and the map back. */
} wk_batch;

typedef struct wk_prefetch_cfg {
    const wk_dataset *data; /* Images (borrowed; must outlive the prefetcher); or */
    const wk_ctrdata *ctr;  /* clicks (borrowed): its training file is
                             * opened again by the thread. */
    const int *field_table; /* Clicks: table of each field (the model's). */
    int ntables;            /* Clicks: the model's tables. */
    uint64_t seed;
    size_t global_batch;    /* B, summed over all ranks. */
    int rank, nranks;       /* This reader's slice of each batch. */
    int64_t first_step;     /* Resume point (0 for a fresh run). */
    int64_t nsteps;         /* How many steps to produce. */
    int depth;              /* Queue capacity in batches (>= 1; 0 means 4). */
    int on_demand;          /* 1: no reading ahead: each batch is gathered
                             * only once wk_prefetch_next asks for it (the
                             * step waits for its input; pstrain
                             * --no-prefetch). */
    double input_delay_s;   /* > 0: preparing a batch takes at least this
                             * long (a simulated input pipeline, pstrain
                             * --sim-input-ms). */
} wk_prefetch_cfg;

typedef struct wk_prefetch wk_prefetch;

/* Start the reader thread. Returns CM_EINVAL for an empty data set, a zero
 * batch, a batch larger than the data set, a bad rank, or a negative
 * first_step, nsteps or depth, CM_ENOMEM; *out is NULL on error. When the
 * batch is smaller than nranks, the last ranks get empty slices (n == 0). */
int wk_prefetch_start(const wk_prefetch_cfg *cfg, wk_prefetch **out);

/* Wait for the next batch. Returns CM_OK with *out set (valid until it is
 * released), CM_ESHUTDOWN after the last step (and on every call after
 * that), or the reader's error (e.g. CM_ECORRUPT: too many bad lines; the
 * message is in wk_prefetch_error()). Batches come in step order. At most
 * min(2, depth) batches may be held at a time: asking for more is a bug
 * (it asserts, and returns CM_EINVAL when assertions are off). */
int wk_prefetch_next(wk_prefetch *p, wk_batch **out);

/* Give back the oldest batch held, for reuse. */
void wk_prefetch_release(wk_prefetch *p, wk_batch *b);

/* The reader's error message ("" if none). */
const char *wk_prefetch_error(wk_prefetch *p);

/* Stop the thread (even mid-run), join it and free everything (NULL ok). */
void wk_prefetch_stop(wk_prefetch *p);

#endif /* WK_PREFETCH_H */
