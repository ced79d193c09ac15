/* wk_ctrdata.h - a click-through data set in the Criteo format, as a run uses it.
 * SPDX-License-Identifier: MIT
 *
 * A directory holds train.txt and test.txt (each may be .gz instead), in
 * the Criteo display-advertising format (wk_criteo.h), and optionally the
 * generator's meta.json (scripts/make-ctr-data), whose Bayes optimum a run
 * reports next to its own AUC. Loading makes one validating pass over the
 * training files (so steps per epoch are known, and a file with too many
 * bad lines fails before training starts) and reads the test set into
 * memory as ids (39 x 8 bytes an example); training streams the training
 * files again in every epoch (wk_prefetch), never loading them.
 *
 * Order: the stream's own order, no shuffle (a generated data set is drawn
 * i.i.d.; real logs are in time order, which is how CTR models train).
 * Step s of epoch e = s / steps_per_epoch reads good lines
 * [(s mod spe) * B, + B) of the training stream; rank k of W takes its
 * wk_order_slice of them, so every mode sees the batch local mode sees.
 */
#ifndef WK_CTRDATA_H
#define WK_CTRDATA_H
#include <stddef.h>
#include <stdint.h>

#include "worker/input/wk_criteo.h"

typedef struct wk_ctrdata {
    char *train_path;     /* The training file (owned). */
    size_t n_train;       /* Good lines used per epoch (<= train_limit). */
    size_t n_test;
    uint64_t *test_ids;   /* n_test x WK_CRITEO_NFIELDS (owned). */
    int32_t *test_labels; /* n_test (owned). */
    uint64_t bad_train, bad_test; /* Bad lines skipped while loading. */
    wk_criteo_opts opts;
    /* From meta.json when there is one (has_meta), else NaN. */
    int has_meta;
    double bayes_auc, bayes_logloss;
} wk_ctrdata;

/* The directory used when none is given: $PS_CTR_DATA, else NULL (the
 * caller generates one with scripts/make-ctr-data). */
const char *wk_ctrdata_default_dir(void);

/* Load 'dir' (see above). train_limit / test_limit > 0 keep only the first
 * that many good lines. Returns CM_OK, CM_ENOTFOUND (missing directory or
 * file: the message says how to make one), CM_ECORRUPT (too many bad
 * lines, or an empty set), CM_EIO; err says which file. On error *out is
 * zeroed. Release with wk_ctrdata_free(). */
int wk_ctrdata_load(const char *dir, size_t train_limit, size_t test_limit,
                    const wk_criteo_opts *opts, wk_ctrdata *out, char *err, size_t errlen);
void wk_ctrdata_free(wk_ctrdata *d); /* Zeroed is fine. */

/* The test set alone (evaluation of an exported model): the training file
 * is not read (n_train 0). */
int wk_ctrdata_load_test(const char *dir, size_t test_limit, const wk_criteo_opts *opts,
                         wk_ctrdata *out, char *err, size_t errlen);

#endif /* WK_CTRDATA_H */
