/* wk_dataset.h - an image classification data set in memory (Fashion-MNIST).
 * SPDX-License-Identifier: MIT
 *
 * Images stay as bytes (47 MB for the training set); batches are converted to
 * floats in [0, 1] by the prefetch thread, off the step path.
 * A loaded wk_dataset is read-only and may be shared across threads.
 */
#ifndef WK_DATASET_H
#define WK_DATASET_H
#include <stddef.h>
#include <stdint.h>

typedef struct wk_dataset {
    size_t n;         /* Number of examples. */
    size_t dim;       /* Bytes (pixels) per example: rows * cols. */
    int nclasses;     /* 1 + the largest label (10 for Fashion-MNIST). */
    uint8_t *images;  /* n * dim bytes, owned. */
    uint8_t *labels;  /* n bytes, owned. */
} wk_dataset;

/* The directory the Debian package dataset-fashion-mnist installs to, or the
 * value of the environment variable PS_DATA_DIR when set. */
const char *wk_dataset_default_dir(void);

/* Load split "train" or "t10k" from 'dir': <split>-images-idx3-ubyte.gz and
 * <split>-labels-idx1-ubyte.gz ('dir' NULL means wk_dataset_default_dir()).
 * Checks that the counts agree, images are 3-D and labels 1-D. 'limit' > 0
 * keeps only the first 'limit' examples; nclasses still comes from every
 * label in the file, so it does not depend on 'limit'. Returns CM_OK,
 * CM_EINVAL (bad split), CM_ENOTFOUND (missing directory or file),
 * CM_ECORRUPT (shapes or counts disagree) or the reader's error, with a
 * message in err (which names the file and suggests the package when the
 * directory is missing). On error *out is zeroed. */
int wk_dataset_load(const char *dir, const char *split, size_t limit, wk_dataset *out, char *err,
                    size_t errlen);

/* Release (NULL or zeroed is fine). */
void wk_dataset_free(wk_dataset *d);

/* Copy examples idx[0..n) into x (n * d->dim floats, pixel / 255) and y
 * (n labels). */
void wk_dataset_gather(const wk_dataset *d, const uint32_t *idx, size_t n, float *x, int32_t *y);

#endif /* WK_DATASET_H */
