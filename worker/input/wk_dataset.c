/* wk_dataset.c - load Fashion-MNIST (or any MNIST-shaped set) into memory.
 * SPDX-License-Identifier: MIT
 *
 * A split is a pair of IDX files read by wk_idx.c: 3-D images (n, rows,
 * cols) and 1-D labels (n). The pixels stay as bytes; wk_dataset_gather()
 * converts the examples of one batch to floats.
 */
#include "worker/input/wk_dataset.h"

#include <assert.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/cm_status.h"
#include "worker/input/wk_idx.h"

/* Where the Debian package dataset-fashion-mnist puts the files. */
#define DATASET_PACKAGE_DIR "/usr/share/datasets/fashion-mnist"


const char *wk_dataset_default_dir(void) {
    const char *env = getenv("PS_DATA_DIR");
    return env && env[0] ? env : DATASET_PACKAGE_DIR;
}

/* A missing directory is by far the most common failure on a fresh machine,
 * so it gets its own message that says how to fix it. */
static int check_dir(const char *dir, char *err, size_t errlen) {
    struct stat st;
    if (stat(dir, &st) != 0) {
        cm_seterr(err, errlen,
                "data directory %s: %s; install the files with `apt-get install "
                "dataset-fashion-mnist`, or point --data-dir or PS_DATA_DIR at a directory "
                "holding them",
                dir, strerror(errno));
        return CM_ENOTFOUND;
    }
    if (!S_ISDIR(st.st_mode)) {
        cm_seterr(err, errlen,
                "data directory %s is not a directory; install the files with `apt-get install "
                "dataset-fashion-mnist`, or point --data-dir or PS_DATA_DIR at a directory "
                "holding them",
                dir);
        return CM_ENOTFOUND;
    }
    return CM_OK;
}

int wk_dataset_load(const char *dir, const char *split, size_t limit, wk_dataset *out, char *err,
                    size_t errlen) {
    wk_idx images, labels;
    memset(&images, 0, sizeof images);
    memset(&labels, 0, sizeof labels);
    memset(out, 0, sizeof *out);
    if (err && errlen > 0) err[0] = '\0';
    char ipath[PATH_MAX], lpath[PATH_MAX];
    int rc = CM_EINVAL;

    if (!dir) dir = wk_dataset_default_dir();
    if (!split || (strcmp(split, "train") != 0 && strcmp(split, "t10k") != 0)) {
        cm_seterr(err, errlen, "unknown split '%s' (expected train or t10k)",
                split ? split : "(null)");
        goto fail;
    }
    int ni = snprintf(ipath, sizeof ipath, "%s/%s-images-idx3-ubyte.gz", dir, split);
    int nl = snprintf(lpath, sizeof lpath, "%s/%s-labels-idx1-ubyte.gz", dir, split);
    if (ni < 0 || (size_t)ni >= sizeof ipath || nl < 0 || (size_t)nl >= sizeof lpath) {
        cm_seterr(err, errlen, "data directory name too long: %s", dir);
        goto fail;
    }
    rc = check_dir(dir, err, errlen);
    if (rc != CM_OK) goto fail;

    rc = wk_idx_read(ipath, &images, err, errlen);
    if (rc != CM_OK) goto fail;
    rc = wk_idx_read(lpath, &labels, err, errlen);
    if (rc != CM_OK) goto fail;
    rc = CM_ECORRUPT;
    if (images.ndims != 3) {
        cm_seterr(err, errlen, "%s: images must have 3 dimensions (n, rows, cols), file has %d",
                ipath, images.ndims);
        goto fail;
    }
    if (labels.ndims != 1) {
        cm_seterr(err, errlen, "%s: labels must have 1 dimension, file has %d", lpath,
                labels.ndims);
        goto fail;
    }
    if (images.count != labels.count) {
        cm_seterr(err, errlen, "%s has %zu images but %s has %zu labels", ipath, images.count,
                lpath, labels.count);
        goto fail;
    }
    /* The examples are indexed with uint32_t (wk_order.h). */
    if (images.count > UINT32_MAX) {
        cm_seterr(err, errlen, "%s: %zu examples is more than this reader indexes", ipath,
                images.count);
        goto fail;
    }

    /* nclasses comes from the whole label file, not just the first 'limit'
     * examples, so that the model's output size does not depend on --limit.
     * Labels are bytes, so there are at most 256 classes. */
    int maxlabel = 0;
    for (size_t i = 0; i < labels.count; i++)
        if (labels.data[i] > maxlabel) maxlabel = labels.data[i];

    out->n = images.count;
    if (limit > 0 && limit < out->n) out->n = limit;
    out->dim = images.item_size;
    out->nclasses = maxlabel + 1;
    out->images = images.data;
    out->labels = labels.data;
    return CM_OK;

fail:
    wk_idx_free(&images);
    wk_idx_free(&labels);
    return rc;
}

void wk_dataset_free(wk_dataset *d) {
    if (!d) return;
    free(d->images);
    free(d->labels);
    memset(d, 0, sizeof *d);
}

void wk_dataset_gather(const wk_dataset *d, const uint32_t *idx, size_t n, float *x, int32_t *y) {
    /* A table gives exactly pixel / 255.0f without a division per pixel. */
    float scale[256];
    for (int v = 0; v < 256; v++) scale[v] = (float)v / 255.0f;
    const size_t dim = d->dim;
    for (size_t i = 0; i < n; i++) {
        assert(idx[i] < d->n);
        const uint8_t *src = d->images + (size_t)idx[i] * dim;
        float *dst = x + i * dim;
        for (size_t j = 0; j < dim; j++) dst[j] = scale[src[j]];
        y[i] = d->labels[idx[i]];
    }
}
