/* wk_ctrdata.c - locating, validating and loading a click data set.
 * SPDX-License-Identifier: MIT
 */
#include "worker/input/wk_ctrdata.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"

const char *wk_ctrdata_default_dir(void) {
    const char *e = getenv("PS_CTR_DATA");
    return e && *e ? e : NULL;
}

/* dir/name.txt, else dir/name.txt.gz; NULL if neither exists. */
static char *find_file(const char *dir, const char *name) {
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s.txt", dir, name);
    if (stat(path, &st) == 0) return cm_strdup(path);
    snprintf(path, sizeof path, "%s/%s.txt.gz", dir, name);
    if (stat(path, &st) == 0) return cm_strdup(path);
    return NULL;
}

static void read_meta(const char *dir, wk_ctrdata *d) {
    char path[4096];
    snprintf(path, sizeof path, "%s/meta.json", dir);
    d->bayes_auc = d->bayes_logloss = NAN;
    json_t *j = json_load_file(path, 0, NULL);
    if (!j) return;
    json_t *auc = json_object_get(j, "bayes_auc"), *ll = json_object_get(j, "bayes_logloss");
    if (json_is_number(auc)) {
        d->has_meta = 1;
        d->bayes_auc = json_number_value(auc);
        if (json_is_number(ll)) d->bayes_logloss = json_number_value(ll);
    }
    json_decref(j);
}

/* Read up to 'limit' (0: all) good examples of 'path'; with ids/labels
 * NULL only count them. */
static int scan(const char *path, size_t limit, const wk_criteo_opts *opts, uint64_t **ids,
                int32_t **labels, size_t *n, uint64_t *bad, char *err, size_t errlen) {
    wk_criteo *r = NULL;
    int rc = wk_criteo_open(&path, 1, opts, &r, err, errlen);
    if (rc != CM_OK) return rc;
    size_t cap = 0, k = 0;
    uint64_t row[WK_CRITEO_NFIELDS];
    int32_t label;
    for (;;) {
        if (limit && k >= limit) break;
        rc = wk_criteo_next(r, &label, row, err, errlen);
        if (rc <= 0) break;
        if (ids) {
            if (k == cap) {
                cap = cap ? cap * 2 : 65536;
                *ids = cm_realloc(*ids, cap * WK_CRITEO_NFIELDS * sizeof **ids);
                *labels = cm_realloc(*labels, cap * sizeof **labels);
            }
            memcpy(*ids + k * WK_CRITEO_NFIELDS, row, sizeof row);
            (*labels)[k] = label;
        }
        k++;
    }
    *bad = wk_criteo_bad_lines(r);
    wk_criteo_close(r);
    if (rc < 0) return rc;
    if (k == 0) {
        cm_seterr(err, errlen, "%s holds no good example", path);
        return CM_ECORRUPT;
    }
    *n = k;
    return CM_OK;
}

static int load(const char *dir, int with_train, size_t train_limit, size_t test_limit,
                const wk_criteo_opts *opts, wk_ctrdata *out, char *err, size_t errlen);

int wk_ctrdata_load(const char *dir, size_t train_limit, size_t test_limit,
                    const wk_criteo_opts *opts, wk_ctrdata *out, char *err, size_t errlen) {
    return load(dir, 1, train_limit, test_limit, opts, out, err, errlen);
}

int wk_ctrdata_load_test(const char *dir, size_t test_limit, const wk_criteo_opts *opts,
                         wk_ctrdata *out, char *err, size_t errlen) {
    return load(dir, 0, 0, test_limit, opts, out, err, errlen);
}

static int load(const char *dir, int with_train, size_t train_limit, size_t test_limit,
                const wk_criteo_opts *opts, wk_ctrdata *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    if (!dir) {
        cm_seterr(err, errlen, "no click data directory given (--data-dir, or $PS_CTR_DATA); "
                               "make one with scripts/make-ctr-data");
        return CM_ENOTFOUND;
    }
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        cm_seterr(err, errlen, "click data directory %s does not exist; make one with "
                               "scripts/make-ctr-data --out %s", dir, dir);
        return CM_ENOTFOUND;
    }
    char *test_path = NULL;
    if (!(out->train_path = find_file(dir, "train")) || !(test_path = find_file(dir, "test"))) {
        cm_seterr(err, errlen, "%s has no %s.txt (or .txt.gz) in the Criteo format", dir,
                  out->train_path ? "test" : "train");
        free(test_path);
        wk_ctrdata_free(out);
        return CM_ENOTFOUND;
    }
    if (opts) out->opts = *opts;
    int rc = with_train ? scan(out->train_path, train_limit, &out->opts, NULL, NULL,
                               &out->n_train, &out->bad_train, err, errlen)
                        : CM_OK;
    if (rc == CM_OK)
        rc = scan(test_path, test_limit, &out->opts, &out->test_ids, &out->test_labels,
                  &out->n_test, &out->bad_test, err, errlen);
    free(test_path);
    if (rc != CM_OK) {
        wk_ctrdata_free(out);
        return rc;
    }
    read_meta(dir, out);
    return CM_OK;
}

void wk_ctrdata_free(wk_ctrdata *d) {
    if (!d) return;
    free(d->train_path);
    free(d->test_ids);
    free(d->test_labels);
    memset(d, 0, sizeof *d);
}
