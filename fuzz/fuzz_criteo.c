/* fuzz_criteo.c - the Criteo click-log reader (worker/input/wk_criteo.c):
 * its line parser, and the streaming reader on a file holding the input.
 * SPDX-License-Identifier: MIT
 *
 * Byte 0 (mod 4): 0 parses the rest as one line (wk_criteo_parse_line);
 * 1 writes it to a file and reads it with wk_criteo_open/next, then
 * rewinds and reads it again; 2 does the same gzip-compressed; 3 makes a
 * data directory (wk_ctrdata_load): what comes before the first NUL byte
 * is its meta.json (none without a NUL), what follows is both train.txt
 * and test.txt. Checked:
 * a line that parses has a label 0/1 and the ids the header documents for
 * missing fields; both passes over a file yield the same examples; a reader
 * that failed reports the same failure when rewound.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/cm_status.h"
#include "fuzz/fz_util.h"
#include "worker/input/wk_criteo.h"
#include "worker/input/wk_ctrdata.h"


FZ_INITIALIZE_LOGS_ONLY

#define MAX_EXAMPLES 4096

/* One pass: the number of good examples (their ids hashed into *h), or a
 * negative CM_E* where the reader gave up. */
static long pass(wk_criteo *r, uint64_t *h) {
    int32_t label;
    uint64_t ids[WK_CRITEO_NFIELDS];
    char err[512];
    long n = 0;
    int rc;
    *h = 0;
    while ((rc = wk_criteo_next(r, &label, ids, err, sizeof err)) == 1) {
        if (label != 0 && label != 1) abort();
        *h = *h * 31 + (uint64_t)label;
        for (int f = 0; f < WK_CRITEO_NFIELDS; f++) *h = *h * 1000003u ^ ids[f];
        if (++n == MAX_EXAMPLES) break;
    }
    if (rc < 0 && !err[0]) abort();
    return rc < 0 ? rc : n;
}

/* A data directory: meta.json, then the lines of both sets. */
static void ctrdata(const uint8_t *d, size_t n) {
    static char dir[600], meta[700], train[700], test[700];
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/ctr", fz_tmpdir());
        snprintf(meta, sizeof meta, "%s/meta.json", dir);
        snprintf(train, sizeof train, "%s/train.txt", dir);
        snprintf(test, sizeof test, "%s/test.txt", dir);
        if (mkdir(dir, 0700) != 0) abort();
    }
    const uint8_t *nul = memchr(d, 0, n);
    remove(meta);
    if (nul) fz_write_file(meta, d, (size_t)(nul - d));
    const uint8_t *lines = nul ? nul + 1 : d;
    size_t nl = n - (size_t)(lines - d);
    fz_write_file(train, lines, nl);
    fz_write_file(test, lines, nl);
    wk_criteo_opts o = {.max_bad_lines = 1000000, .warn_limit = 3};
    wk_ctrdata c;
    char err[512];
    int rc = wk_ctrdata_load(dir, 0, 0, &o, &c, err, sizeof err);
    if (rc == CM_OK) {
        /* Both sets are the same lines. */
        if (c.n_test != c.n_train || !c.n_test) abort();
        for (size_t i = 0; i < c.n_test; i++)
            if (c.test_labels[i] != 0 && c.test_labels[i] != 1) abort();
        (void)c.test_ids[c.n_test * WK_CRITEO_NFIELDS - 1];
    } else if (!err[0] || c.test_ids || c.n_test) {
        abort();
    }
    wk_ctrdata_free(&c);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int mode = data[0] % 4;
    if (mode == 3) {
        ctrdata(data + 1, size - 1);
        return 0;
    }
    if (mode == 0) {
        /* Exactly the line's bytes, so that ASan sees a read past them. */
        char *line = malloc(size - 1 ? size - 1 : 1);
        memcpy(line, data + 1, size - 1);
        int32_t label = -1;
        uint64_t ids[WK_CRITEO_NFIELDS];
        char why[256];
        int rc = wk_criteo_parse_line(line, size - 1, &label, ids, why, sizeof why);
        if (rc == CM_OK && label != 0 && label != 1) abort();
        if (rc != CM_OK && (rc != CM_ECORRUPT || !why[0])) abort();
        free(line);
        return 0;
    }
    const char *path = fz_tmp_path("input.txt");
    fz_write_input(path, data + 1, size - 1, mode == 2);
    const char *paths[1] = {path};
    wk_criteo_opts o = {.max_bad_lines = 1000000, .warn_limit = 3};
    wk_criteo *r;
    char err[512];
    if (wk_criteo_open(paths, 1, &o, &r, err, sizeof err) != CM_OK) abort();
    uint64_t h1, h2;
    long n1 = pass(r, &h1);
    int rw = wk_criteo_rewind(r, err, sizeof err);
    if (n1 < 0) {
        /* A fatal error (e.g. a "plain" file that starts with gzip's magic
         * and is no gzip) stays: the rewind reports it again. */
        if (rw != n1 || !err[0]) abort();
        wk_criteo_close(r);
        return 0;
    }
    if (rw != CM_OK) abort();
    long n2 = pass(r, &h2);
    if (n1 != n2 || (n1 >= 0 && h1 != h2)) abort(); /* The same stream twice. */
    wk_criteo_close(r);
    return 0;
}
