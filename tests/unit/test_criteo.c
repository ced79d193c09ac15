/* test_criteo.c - unit tests for the Criteo reader and the AUC / logloss metrics.
 * SPDX-License-Identifier: MIT
 *
 * Lines are checked through wk_criteo_parse_line (every kind of good and
 * bad line, with the reason given); files (plain and gzip, written into a
 * temporary directory the group teardown removes) through the streaming
 * reader: counts, warnings naming file and line, the bad-line threshold,
 * two files as one stream, rewind, buffer boundaries and missing files.
 * cm_auc and cm_logloss are checked on hand cases with ties and against an
 * O(n^2) pairwise count.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "tests/unit/tu_tmpdir.h"

#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "common/cm_auc.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "worker/input/wk_criteo.h"


/* ===== Helpers ===== */

static int group_setup(void **state) {
    (void)state;
    return tu_tmpdir_create("test_criteo");
}

static int group_teardown(void **state) {
    (void)state;
    return tu_tmpdir_remove();
}

/* 'name' inside the temporary directory (one of two rotating buffers, so
 * two paths can be live at once). */
static const char *tmp_path(const char *name) {
    static char buf[2][256];
    static int k;
    k ^= 1;
    snprintf(buf[k], sizeof buf[k], "%s/%s", tmpdir, name);
    return buf[k];
}

static void write_file(const char *path, int gz, const char *text, size_t len) {
    if (gz) {
        gzFile f = gzopen(path, "wb");
        assert_non_null(f);
        if (len > 0) assert_int_equal(gzwrite(f, text, (unsigned)len), (int)len);
        assert_int_equal(gzclose(f), Z_OK);
    } else {
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        assert_int_equal(fwrite(text, 1, len, f), len);
        assert_int_equal(fclose(f), 0);
    }
}

/* A line from a label token and 39 feature tokens (NULL = empty), no
 * newline. Returns its length. */
static size_t make_line(char *out, size_t cap, const char *label, const char *const *feat) {
    size_t n = (size_t)snprintf(out, cap, "%s", label);
    for (int f = 0; f < WK_CRITEO_NFIELDS; f++)
        n += (size_t)snprintf(out + n, cap - n, "\t%s", feat[f] ? feat[f] : "");
    assert_true(n < cap);
    return n;
}

/* A good line, different for each k: label k % 2, I1 = k, C1 = hex k,
 * the other features a fixed mix of values and empties. */
static size_t good_line(char *out, size_t cap, int k) {
    char i1[24], c1[24];
    snprintf(i1, sizeof i1, "%d", k);
    snprintf(c1, sizeof c1, "%x", k + 1);
    const char *feat[WK_CRITEO_NFIELDS] = {i1, "5", NULL, "-1", "120", "0", "1", "2", "3", "44",
                                           NULL, "7", "1000000"};
    feat[13] = c1;
    static const char *cats[] = {"68fd1e64", "80e26c9b", NULL, "fb936136", "7b4723c4",
                                 "25c83c98", "7e0ccccf", "de7995b8", "1f89b562", "a73ee510"};
    for (int j = 1; j < WK_CRITEO_NCAT; j++) feat[13 + j] = cats[j % 10];
    return make_line(out, cap, k % 2 ? "1" : "0", feat);
}

/* The ids good_line(k) must map to, through the parser. */
static void good_ids(int k, int32_t *label, uint64_t *ids) {
    char line[1024];
    size_t n = good_line(line, sizeof line, k);
    char why[256];
    assert_int_equal(wk_criteo_parse_line(line, n, label, ids, why, sizeof why), CM_OK);
}

/* Parse the line of these tokens, which must be good. */
static void parse_good(const char *label_tok, const char *const *feat, int32_t *label,
                       uint64_t *ids) {
    char line[2048], why[256];
    size_t n = make_line(line, sizeof line, label_tok, feat);
    *label = -1;
    assert_int_equal(wk_criteo_parse_line(line, n, label, ids, why, sizeof why), CM_OK);
    /* CRLF: the same. */
    uint64_t ids2[WK_CRITEO_NFIELDS];
    int32_t label2;
    line[n] = '\r';
    assert_int_equal(wk_criteo_parse_line(line, n + 1, &label2, ids2, why, sizeof why), CM_OK);
    assert_int_equal(label2, *label);
    assert_memory_equal(ids, ids2, sizeof ids2);
}

/* Expect parse_line to reject 'line' with a reason containing 'want'. */
static void expect_bad(const char *line, const char *want) {
    int32_t label;
    uint64_t ids[WK_CRITEO_NFIELDS];
    char why[256] = "";
    assert_int_equal(wk_criteo_parse_line(line, strlen(line), &label, ids, why, sizeof why),
                     CM_ECORRUPT);
    if (!strstr(why, want)) fail_msg("line '%.60s': reason '%s' lacks '%s'", line, why, want);
}

/* Read the whole stream; returns the count of good examples and fills
 * labels / the first id field of each (up to max). The status of the last
 * call goes to *rc. */
static int read_all(wk_criteo *r, int32_t *labels, uint64_t *id0, int max, int *rc, char *err,
                    size_t errlen) {
    int n = 0;
    int32_t label;
    uint64_t ids[WK_CRITEO_NFIELDS];
    while ((*rc = wk_criteo_next(r, &label, ids, err, errlen)) == 1) {
        if (n < max) {
            if (labels) labels[n] = label;
            if (id0) id0[n] = ids[0];
        }
        n++;
    }
    return n;
}

/* Run fn with stderr going to a file; returns what it wrote (malloc'ed). */
static char *capture_stderr(void (*fn)(void *), void *arg) {
    const char *path = tmp_path("stderr.txt");
    fflush(stderr);
    int saved = dup(2);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    assert_true(saved >= 0 && fd >= 0);
    dup2(fd, 2);
    close(fd);
    fn(arg);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char *text = calloc(1, 1 << 16);
    assert_non_null(text);
    size_t got = fread(text, 1, (1 << 16) - 1, f);
    text[got] = 0;
    fclose(f);
    return text;
}

static int count_substr(const char *s, const char *sub) {
    int n = 0;
    for (const char *p = s; (p = strstr(p, sub)) != NULL; p++) n++;
    return n;
}

/* ===== The id mapping ===== */

static void test_id_mapping(void **state) {
    (void)state;
    assert_int_equal(wk_criteo_int_id(12345, 1), 0);
    assert_int_equal(wk_criteo_int_id(-1, 0), 1);
    assert_int_equal(wk_criteo_int_id(INT64_MIN, 0), 1);
    assert_int_equal(wk_criteo_int_id(0, 0), 2);
    assert_int_equal(wk_criteo_int_id(1, 0), 3);
    assert_int_equal(wk_criteo_int_id(2, 0), 4);
    assert_int_equal(wk_criteo_int_id(3, 0), 6);       /* ln(3)^2 = 1.21 */
    assert_int_equal(wk_criteo_int_id(100, 0), 26);    /* ln(100)^2 = 21.2 */
    assert_int_equal(wk_criteo_int_id(INT64_MAX, 0), 1911); /* ln^2 = 1906.9 */
    assert_int_equal(wk_criteo_cat_id(13, 0xabc, 1), 0);
    for (int f = 13; f < 39; f++) {
        uint64_t x = 0x68fd1e64;
        assert_true(wk_criteo_cat_id(f, x, 0) == cm_mix64(x ^ cm_mix64((uint64_t)f + 1)));
    }
    /* The same value in two fields: two ids. */
    assert_true(wk_criteo_cat_id(13, 5, 0) != wk_criteo_cat_id(14, 5, 0));
}

/* ===== Parsing good lines ===== */

static void test_parse_good(void **state) {
    (void)state;
    const char *feat[WK_CRITEO_NFIELDS] = {"1", "-2", "0", "3", "100", "-9223372036854775808",
                                           "9223372036854775807", "+4", "0007", "2", "1", "1", "1"};
    const char *cats[WK_CRITEO_NCAT] = {"68fd1e64", "ffffffffffffffff", "0", "ABCDEF01",
                                        "aBcD", "1", "0000000000000001"};
    for (int j = 0; j < WK_CRITEO_NCAT; j++) feat[13 + j] = cats[j] ? cats[j] : "12";
    int32_t label;
    uint64_t ids[WK_CRITEO_NFIELDS];
    parse_good("1", feat, &label, ids);
    assert_int_equal(label, 1);
    const int64_t ints[] = {1, -2, 0, 3, 100, INT64_MIN, INT64_MAX, 4, 7, 2, 1, 1, 1};
    for (int f = 0; f < WK_CRITEO_NINT; f++) assert_true(ids[f] == wk_criteo_int_id(ints[f], 0));
    const uint64_t hex[] = {0x68fd1e64, UINT64_MAX, 0, 0xabcdef01, 0xabcd, 1, 1};
    for (int j = 0; j < WK_CRITEO_NCAT; j++)
        assert_true(ids[13 + j] == wk_criteo_cat_id(13 + j, j < 7 ? hex[j] : 0x12, 0));
}

/* All features missing, then every other one: missing is id 0. */
static void test_parse_missing(void **state) {
    (void)state;
    const char *none[WK_CRITEO_NFIELDS] = {0};
    int32_t label;
    uint64_t ids[WK_CRITEO_NFIELDS];
    parse_good("0", none, &label, ids);
    assert_int_equal(label, 0);
    for (int f = 0; f < WK_CRITEO_NFIELDS; f++) assert_int_equal(ids[f], 0);
    const char *some[WK_CRITEO_NFIELDS] = {0};
    for (int f = 0; f < WK_CRITEO_NFIELDS; f += 2) some[f] = "1";
    parse_good("1", some, &label, ids);
    for (int f = 0; f < WK_CRITEO_NFIELDS; f++) {
        uint64_t want = f % 2 ? 0
                        : f < WK_CRITEO_NINT ? wk_criteo_int_id(1, 0)
                                             : wk_criteo_cat_id(f, 1, 0);
        assert_true(ids[f] == want);
    }
}

/* ===== Parsing bad lines ===== */

static void test_parse_bad(void **state) {
    (void)state;
    const char *feat[WK_CRITEO_NFIELDS] = {"1", "2"};
    char line[1100], base[1024];
    make_line(base, sizeof base, "1", feat);

    /* Field count: 39 and 41 columns, an empty line. */
    make_line(line, sizeof line, "1", feat);
    *strrchr(line, '\t') = 0;
    expect_bad(line, "39 fields, expected 40");
    snprintf(line, sizeof line, "%s\t", base);
    expect_bad(line, "41 fields, expected 40");
    expect_bad("", "1 fields, expected 40");
    /* A wrong count wins over a bad token in the same line. */
    snprintf(line, sizeof line, "x%s\t", base + 1);
    expect_bad(line, "41 fields");

    /* Labels. */
    for (int k = 0; k < 4; k++) {
        static const char *labels[] = {"2", "x", "", "01"};
        make_line(line, sizeof line, labels[k], feat);
        char want[64];
        snprintf(want, sizeof want, "label '%s' is not 0 or 1", labels[k]);
        expect_bad(line, want);
    }

    /* Integers. */
    static const struct {
        const char *tok, *why;
    } ints[] = {{"12a", "field I3: '12a' is not a decimal integer"},
                {"-", "'-' is not a decimal integer"},
                {" 1", "is not a decimal integer"},
                {"1.5", "is not a decimal integer"},
                {"9223372036854775808", "field I3: '9223372036854775808' is out of the signed"},
                {"-9223372036854775809", "is out of the signed 64-bit range"},
                {"99999999999999999999999", "is out of the signed 64-bit range"}};
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++) {
        const char *f2[WK_CRITEO_NFIELDS] = {"1", "2", ints[k].tok};
        make_line(line, sizeof line, "0", f2);
        expect_bad(line, ints[k].why);
    }

    /* Categorical values. */
    static const struct {
        int j;
        const char *tok, *why;
    } cats[] = {{2, "zz", "field C3: 'zz' is not hexadecimal"},
                {0, "0x1f", "field C1: '0x1f' is not hexadecimal"},
                {25, "12345678901234567", "field C26: 17 hex digits, at most 16"},
                {4, "abc-", "is not hexadecimal"}};
    for (size_t k = 0; k < sizeof cats / sizeof cats[0]; k++) {
        const char *f2[WK_CRITEO_NFIELDS] = {0};
        f2[13 + cats[k].j] = cats[k].tok;
        make_line(line, sizeof line, "0", f2);
        expect_bad(line, cats[k].why);
    }

    /* Over-long: the limit counts the '\r' but not the newline. */
    size_t big = WK_CRITEO_MAX_LINE + 1;
    char *longl = malloc(big + 1);
    assert_non_null(longl);
    memset(longl, '1', big);
    longl[big] = 0;
    expect_bad(longl, "line of 65537 bytes, longer than the limit of 65536");
    free(longl);
}

/* ===== The reader ===== */

typedef struct read_case {
    const char *path;
    wk_criteo_opts opts;
    int good, rc;
    uint64_t bad;
    char err[512];
} read_case;

static void run_read(void *arg) {
    read_case *c = arg;
    wk_criteo *r = NULL;
    assert_int_equal(wk_criteo_open(&c->path, 1, &c->opts, &r, c->err, sizeof c->err), CM_OK);
    c->good = read_all(r, NULL, NULL, 0, &c->rc, c->err, sizeof c->err);
    c->bad = wk_criteo_bad_lines(r);
    assert_true(wk_criteo_good_lines(r) == (uint64_t)c->good);
    wk_criteo_close(r);
}

/* A file of good lines with one bad line of each kind among them, the last
 * line without its newline, CRLF endings on some lines: each bad line is
 * counted, skipped and reported with file:line; the good ones come out in
 * order. */
static void test_read_mixed(void **state) {
    (void)state;
    char *text = malloc(1 << 20);
    assert_non_null(text);
    size_t len = 0;
    char line[1024];
    int k = 0, lineno = 0, bad_lines[16], nbad = 0;
    for (int i = 0; i < 20; i++) {
        lineno++;
        if (i % 3 == 2) {
            /* A bad line: a different kind each time. */
            char *p = text + len;
            size_t n = good_line(line, sizeof line, 1000 + i);
            switch (nbad) {
            case 0: n = (size_t)snprintf(line, sizeof line, "1\t2\t3"); break;
            case 1: line[0] = '2'; break;
            case 2: line[0] = 'x'; break;
            case 3: memcpy(strchr(line, '\t') + 1, "12a", 3); break;
            case 4: memcpy(strstr(line, "68fd1e64"), "zz", 2); break;
            default: {
                /* 17 hex digits in C1. */
                char *c1 = line;
                for (int t = 0; t < 14; t++) c1 = strchr(c1, '\t') + 1;
                size_t rest = strlen(strchr(c1, '\t'));
                memmove(c1 + 17, strchr(c1, '\t'), rest + 1);
                memset(c1, 'a', 17);
                n = strlen(line);
            }
            }
            memcpy(p, line, n);
            len += n;
            bad_lines[nbad++] = lineno;
        } else {
            size_t n = good_line(line, sizeof line, k++);
            memcpy(text + len, line, n);
            len += n;
            if (i % 4 == 1) text[len++] = '\r';
        }
        if (i < 19) text[len++] = '\n';
    }
    read_case c = {.path = tmp_path("mixed.txt")};
    write_file(c.path, 0, text, len);
    char *log = capture_stderr(run_read, &c);
    assert_int_equal(c.rc, 0);
    assert_int_equal(c.good, k);
    assert_int_equal(c.bad, (uint64_t)nbad);
    for (int b = 0; b < nbad; b++) {
        char want[300];
        snprintf(want, sizeof want, "%s:%d: bad line skipped", c.path, bad_lines[b]);
        if (!strstr(log, want)) fail_msg("no warning '%s' in:\n%s", want, log);
    }
    assert_non_null(strstr(log, "3 fields, expected 40"));
    assert_non_null(strstr(log, "17 hex digits"));

    /* The good lines, in order, with their labels and ids. */
    wk_criteo *r = NULL;
    char err[256];
    wk_criteo_opts quiet = {.warn_limit = -1};
    assert_int_equal(wk_criteo_open(&c.path, 1, &quiet, &r, err, sizeof err), CM_OK);
    for (int i = 0; i < k; i++) {
        int32_t label, want_label;
        uint64_t ids[WK_CRITEO_NFIELDS], want[WK_CRITEO_NFIELDS];
        assert_int_equal(wk_criteo_next(r, &label, ids, err, sizeof err), 1);
        good_ids(i, &want_label, want);
        assert_int_equal(label, want_label);
        assert_memory_equal(ids, want, sizeof ids);
    }
    int32_t label;
    uint64_t ids[WK_CRITEO_NFIELDS];
    assert_int_equal(wk_criteo_next(r, &label, ids, err, sizeof err), 0);
    assert_int_equal(wk_criteo_next(r, &label, ids, err, sizeof err), 0); /* stays at the end */
    wk_criteo_close(r);
    free(log);
    free(text);
}

/* Warnings stop after warn_limit (one line says so); past max_bad_lines
 * the reader fails with a message naming the threshold, file and line,
 * and keeps failing. */
static void test_threshold(void **state) {
    (void)state;
    char text[4096];
    size_t len = 0;
    char line[1024];
    for (int i = 0; i < 8; i++) {
        size_t n = i % 2 ? (size_t)snprintf(line, sizeof line, "bad line %d", i)
                         : good_line(line, sizeof line, i);
        memcpy(text + len, line, n);
        len += n;
        text[len++] = '\n';
    }
    /* Bad lines at 2, 4, 6, 8. */
    read_case c = {.path = tmp_path("bad.txt"), .opts = {.max_bad_lines = 3, .warn_limit = 2}};
    write_file(c.path, 0, text, len);
    char *log = capture_stderr(run_read, &c);
    assert_int_equal(c.rc, CM_ECORRUPT);
    assert_int_equal(c.good, 4);
    assert_int_equal(c.bad, 4);
    char want[300];
    snprintf(want, sizeof want, "%s:8: more than 3 bad lines (the threshold", c.path);
    if (!strstr(c.err, want)) fail_msg("error '%s' lacks '%s'", c.err, want);
    assert_non_null(strstr(c.err, "1 fields, expected 40"));
    assert_int_equal(count_substr(log, ": bad line skipped: "), 2);
    assert_int_equal(count_substr(log, "further bad lines are counted, not reported"), 1);
    snprintf(want, sizeof want, "%s:6: bad line skipped; further", c.path);
    assert_non_null(strstr(log, want));
    free(log);

    /* Sticky: the next call and a rewind fail the same way. */
    wk_criteo *r = NULL;
    char err[512];
    wk_criteo_opts o = {.max_bad_lines = 1, .warn_limit = -1};
    assert_int_equal(wk_criteo_open(&c.path, 1, &o, &r, err, sizeof err), CM_OK);
    int rc;
    assert_int_equal(read_all(r, NULL, NULL, 0, &rc, err, sizeof err), 2);
    assert_int_equal(rc, CM_ECORRUPT);
    int32_t label;
    uint64_t ids[WK_CRITEO_NFIELDS];
    err[0] = 0;
    assert_int_equal(wk_criteo_next(r, &label, ids, err, sizeof err), CM_ECORRUPT);
    assert_non_null(strstr(err, "more than 1 bad lines"));
    assert_int_equal(wk_criteo_rewind(r, err, sizeof err), CM_ECORRUPT);
    wk_criteo_close(r);

    /* The default threshold is 1000: 4 bad lines pass. */
    read_case d = {.path = c.path, .opts = {.warn_limit = -1}};
    run_read(&d);
    assert_int_equal(d.rc, 0);
    assert_int_equal(d.good, 4);
}

/* A plain file and a gzip file read as one stream; rewind starts again at
 * the first line of the first file; the bad line count goes on. */
static void test_two_files_and_rewind(void **state) {
    (void)state;
    char a[8192], b[8192], line[1024];
    size_t la = 0, lb = 0;
    for (int i = 0; i < 5; i++) {
        la += good_line(line, sizeof line, i);
        memcpy(a + la - strlen(line), line, strlen(line));
        a[la++] = '\n';
    }
    la += (size_t)snprintf(a + la, sizeof a - la, "junk\n");
    for (int i = 5; i < 8; i++) {
        size_t n = good_line(line, sizeof line, i);
        memcpy(b + lb, line, n);
        lb += n;
        if (i < 7) b[lb++] = '\n';
    }
    const char *paths[2];
    char pa[256], pb[256];
    snprintf(pa, sizeof pa, "%s", tmp_path("part0.txt"));
    snprintf(pb, sizeof pb, "%s", tmp_path("part1.txt.gz"));
    paths[0] = pa;
    paths[1] = pb;
    write_file(pa, 0, a, la);
    write_file(pb, 1, b, lb);
    wk_criteo *r = NULL;
    char err[256];
    wk_criteo_opts quiet = {.warn_limit = -1};
    assert_int_equal(wk_criteo_open(paths, 2, &quiet, &r, err, sizeof err), CM_OK);
    for (int pass = 0; pass < 3; pass++) {
        int32_t labels[16];
        uint64_t id0[16];
        int rc;
        assert_int_equal(read_all(r, labels, id0, 16, &rc, err, sizeof err), 8);
        assert_int_equal(rc, 0);
        for (int i = 0; i < 8; i++) {
            assert_int_equal(labels[i], i % 2);
            assert_true(id0[i] == wk_criteo_int_id(i, 0));
        }
        assert_int_equal(wk_criteo_good_lines(r), 8);
        assert_int_equal(wk_criteo_bad_lines(r), (uint64_t)pass + 1);
        if (pass == 1) {
            /* Rewind from the middle of the first file, too. */
            assert_int_equal(wk_criteo_rewind(r, err, sizeof err), CM_OK);
            int32_t label;
            uint64_t ids[WK_CRITEO_NFIELDS];
            assert_int_equal(wk_criteo_next(r, &label, ids, err, sizeof err), 1);
            assert_int_equal(wk_criteo_good_lines(r), 1);
        }
        assert_int_equal(wk_criteo_rewind(r, err, sizeof err), CM_OK);
        assert_int_equal(wk_criteo_good_lines(r), 0);
    }
    wk_criteo_close(r);
    wk_criteo_close(NULL);
}

/* Lines around the limit, each between good lines so that a mistake in
 * resynchronising shows: exactly WK_CRITEO_MAX_LINE bytes is good (a
 * decimal with leading zeros), one more is bad, and a line of 300 KB
 * (longer than the reader's buffer) is one bad line. Also through gzip,
 * whose reads end at other places. */
static void test_long_lines(void **state) {
    (void)state;
    const size_t sizes[] = {WK_CRITEO_MAX_LINE, WK_CRITEO_MAX_LINE + 1, 300000,
                            WK_CRITEO_MAX_LINE - 1};
    char *text = malloc(1 << 21);
    assert_non_null(text);
    size_t len = 0;
    char line[1024];
    int k = 0;
    for (size_t s = 0; s < 4; s++) {
        len += good_line(text + len, 1024, k++);
        text[len++] = '\n';
        /* good_line(k) with I1 padded by zeros to the wanted length. */
        size_t n = good_line(line, sizeof line, k++);
        size_t pad = sizes[s] - n;
        text[len++] = line[0];
        text[len++] = '\t';
        memset(text + len, '0', pad);
        len += pad;
        memcpy(text + len, line + 2, n - 2);
        len += n - 2;
        text[len++] = '\n';
    }
    for (int gz = 0; gz < 2; gz++) {
        read_case c = {.path = tmp_path(gz ? "long.txt.gz" : "long.txt"),
                       .opts = {.warn_limit = -1}};
        write_file(c.path, gz, text, len);
        wk_criteo *r = NULL;
        assert_int_equal(wk_criteo_open(&c.path, 1, &c.opts, &r, c.err, sizeof c.err), CM_OK);
        int32_t labels[16];
        uint64_t id0[16];
        int rc;
        int n = read_all(r, labels, id0, 16, &rc, c.err, sizeof c.err);
        assert_int_equal(rc, 0);
        assert_int_equal(n, 6);
        assert_int_equal(wk_criteo_bad_lines(r), 2);
        const int want[] = {0, 1, 2, 4, 6, 7}; /* lines 3 and 5 are too long */
        for (int i = 0; i < 6; i++) {
            assert_int_equal(labels[i], want[i] % 2);
            assert_true(id0[i] == wk_criteo_int_id(want[i], 0));
        }
        wk_criteo_close(r);
    }
    free(text);
}

static void test_gzip_and_errors(void **state) {
    (void)state;
    char text[65536], line[1024];
    size_t len = 0;
    for (int i = 0; i < 40; i++) {
        size_t n = good_line(line, sizeof line, i);
        memcpy(text + len, line, n);
        len += n;
        text[len++] = '\n';
    }
    read_case c = {.path = tmp_path("data.gz")};
    write_file(c.path, 1, text, len);
    run_read(&c);
    assert_int_equal(c.rc, 0);
    assert_int_equal(c.good, 40);
    assert_int_equal(c.bad, 0);

    /* An empty file: no examples, no error. */
    c = (read_case){.path = tmp_path("empty.txt")};
    write_file(c.path, 0, "", 0);
    run_read(&c);
    assert_int_equal(c.rc, 0);
    assert_int_equal(c.good, 0);

    /* A gzip file cut short. */
    const char *gzpath = tmp_path("data.gz");
    FILE *f = fopen(gzpath, "rb");
    assert_non_null(f);
    char gzbuf[65536];
    size_t gzlen = fread(gzbuf, 1, sizeof gzbuf, f);
    fclose(f);
    c = (read_case){.path = tmp_path("cut.gz"), .opts = {.warn_limit = -1}};
    write_file(c.path, 0, gzbuf, gzlen * 2 / 3);
    run_read(&c);
    assert_int_equal(c.rc, CM_ECORRUPT);
    assert_non_null(strstr(c.err, "cut.gz: truncated gzip stream"));

    /* Missing file (the second of two), a directory, no files. */
    wk_criteo *r = (wk_criteo *)1;
    char err[512];
    const char *paths[2] = {gzpath, tmp_path("nope.txt")};
    assert_int_equal(wk_criteo_open(paths, 2, NULL, &r, err, sizeof err), CM_ENOTFOUND);
    assert_null(r);
    assert_non_null(strstr(err, "nope.txt: cannot open"));
    const char *dir = tmpdir;
    assert_int_equal(wk_criteo_open(&dir, 1, NULL, &r, err, sizeof err), CM_ENOTFOUND);
    assert_non_null(strstr(err, "not a regular file"));
    assert_int_equal(wk_criteo_open(paths, 0, NULL, &r, err, sizeof err), CM_EINVAL);
}

/* ===== AUC and logloss ===== */

/* The pairwise definition: over all (positive, negative) pairs, 1 when the
 * positive scores higher, 1/2 on a tie. */
static double auc_pairs(const float *s, const int32_t *y, size_t n) {
    double wins = 0, pairs = 0;
    for (size_t i = 0; i < n; i++) {
        if (!y[i]) continue;
        for (size_t j = 0; j < n; j++) {
            if (y[j]) continue;
            pairs++;
            wins += s[i] > s[j] ? 1.0 : s[i] == s[j] ? 0.5 : 0.0;
        }
    }
    return pairs ? wins / pairs : NAN;
}

static void test_auc_hand(void **state) {
    (void)state;
    const int32_t y[] = {0, 0, 1, 1};
    const float perfect[] = {0.1f, 0.2f, 0.8f, 0.9f};
    const float reversed[] = {0.9f, 0.8f, 0.2f, 0.1f};
    const float tied[] = {0.5f, 0.5f, 0.5f, 0.5f};
    const float mixed[] = {0.1f, 0.4f, 0.35f, 0.8f}; /* 3 of 4 pairs */
    const float halftie[] = {0.1f, 0.5f, 0.5f, 0.9f}; /* 3 wins + 1 tie: 3.5 / 4 */
    assert_true(cm_auc(perfect, y, 4) == 1.0);
    assert_true(cm_auc(reversed, y, 4) == 0.0);
    assert_true(cm_auc(tied, y, 4) == 0.5);
    assert_true(cm_auc(mixed, y, 4) == 0.75);
    assert_true(cm_auc(halftie, y, 4) == 0.875);
    /* Labels other than 0 count as positive; -0 ties +0. */
    const int32_t y2[] = {0, 7, 0, 1};
    const float zeros[] = {0.0f, -0.0f, -1.0f, 2.0f}; /* (tie, win) + (win, win) = 3.5 / 4 */
    assert_true(cm_auc(zeros, y2, 4) == 0.875);
    /* All labels equal, or nothing: NaN. */
    const int32_t ones[] = {1, 1, 1, 1};
    assert_true(isnan(cm_auc(perfect, ones, 4)));
    assert_true(isnan(cm_auc(perfect, y, 0)));
    assert_true(isnan(cm_auc(perfect, y, 1)));
}

/* Random scores with many ties (a few distinct values) and without,
 * against the pairwise count. */
static void test_auc_random(void **state) {
    (void)state;
    enum { N = 2000 };
    float *s = malloc(N * sizeof *s);
    int32_t *y = malloc(N * sizeof *y);
    assert_non_null(s);
    assert_non_null(y);
    cm_rng g;
    cm_rng_init(&g, 9);
    for (int round = 0; round < 6; round++) {
        size_t n = round < 3 ? N : 37;
        for (size_t i = 0; i < n; i++) {
            y[i] = cm_rng_uniform(&g) < 0.3f;
            float u = cm_rng_uniform(&g) - 0.5f + (y[i] ? 0.3f : 0.0f);
            s[i] = round % 2 ? u : (float)(int)(u * 8.0f) / 8.0f; /* coarse: ties */
        }
        double want = auc_pairs(s, y, n), got = cm_auc(s, y, n);
        assert_true(fabs(want - got) < 1e-12);
        assert_true(got > 0.55 && got < 1.0);
    }
    free(s);
    free(y);
}

static void test_logloss(void **state) {
    (void)state;
    const int32_t y[] = {1, 0, 1, 0};
    const float p[] = {0.8f, 0.3f, 0.5f, 0.0f}; /* the last is clipped to 1e-7 */
    double want = -(log(0.8f) + log1p(-0.3f) + log(0.5) + log1p(-1e-7)) / 4.0;
    assert_true(fabs(cm_logloss(p, y, 4) - want) < 1e-12);
    const float sure[] = {1.0f, 0.0f};
    const int32_t wrong[] = {0, 1};
    assert_true(fabs(cm_logloss(sure, wrong, 2) - (-log(1e-7))) < 1e-9);
    assert_true(isnan(cm_logloss(p, y, 0)));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_id_mapping),
        cmocka_unit_test(test_parse_good),
        cmocka_unit_test(test_parse_missing),
        cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_read_mixed),
        cmocka_unit_test(test_threshold),
        cmocka_unit_test(test_two_files_and_rewind),
        cmocka_unit_test(test_long_lines),
        cmocka_unit_test(test_gzip_and_errors),
        cmocka_unit_test(test_auc_hand),
        cmocka_unit_test(test_auc_random),
        cmocka_unit_test(test_logloss),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
