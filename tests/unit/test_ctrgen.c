/* test_ctrgen.c - unit tests for the planted CTR data generator (tools/ctr_planted).
 * SPDX-License-Identifier: MIT
 *
 * The main test generates a small data set into a temporary directory,
 * reads it back with the Criteo reader and recounts what meta.json says:
 * rows, positives, positive rates, and the Bayes AUC / logloss and
 * first-order AUC recomputed from the planted model on the ids the reader
 * returns. The others: determinism by seed, reuse detection, atomic
 * replacement, the Zipf sampler's frequencies, the rank bijection, knob
 * validation.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "tests/unit/tu_tmpdir.h"

#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cm_auc.h"
#include "common/cm_status.h"
#include "tools/ctr_planted.h"
#include "worker/input/wk_criteo.h"


/* ===== Helpers ===== */

static int group_setup(void **state) {
    (void)state;
    return tu_tmpdir_create("test_ctrgen");
}

static int group_teardown(void **state) {
    (void)state;
    return tu_tmpdir_remove();
}

static void path_of(char *out, size_t n, const char *dir, const char *name) {
    snprintf(out, n, "%s/%s", dir, name);
}

/* The default knobs with another seed and fewer rows. */
static void small_knobs(ctr_knobs *k, uint64_t seed, uint64_t train_rows, uint64_t test_rows) {
    ctr_knobs_default(k);
    k->seed = seed;
    k->train_rows = train_rows;
    k->test_rows = test_rows;
}

/* Generate a data set of these knobs into tmpdir/name; returns its path
 * (static buffer) and the summary. */
static const char *generate(const ctr_knobs *k, const char *name, ctr_summary *s) {
    static char dir[256];
    path_of(dir, sizeof dir, tmpdir, name);
    ctr_planted *m = NULL;
    char err[512];
    assert_int_equal(ctr_planted_create(k, &m, err, sizeof err), CM_OK);
    int rc = ctr_generate(m, dir, NULL, NULL, s, err, sizeof err);
    if (rc != CM_OK) fail_msg("ctr_generate: %s", err);
    ctr_planted_destroy(m);
    return dir;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *p = malloc((size_t)n + 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return p;
}

static int same_file(const char *a, const char *b) {
    size_t la, lb;
    char *x = slurp(a, &la), *y = slurp(b, &lb);
    assert_non_null(x);
    assert_non_null(y);
    int same = la == lb && memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return same;
}

static double meta_real(json_t *meta, const char *key) {
    json_t *v = json_object_get(meta, key);
    if (!json_is_number(v)) fail_msg("meta.json: no number '%s'", key);
    return json_number_value(v);
}

static void touch(const char *path) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fclose(f);
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* ===== Tests ===== */

/* The generator's metadata matches a recount: the files read back through
 * wk_criteo give meta.json's counts and positive rates, every row's ids
 * and label are those of the generated example, and the AUC and logloss
 * of the planted probabilities of the ids read back are meta.json's
 * (bayes_auc to 1e-9). */
static void test_meta_matches_recount(void **state) {
    (void)state;
    ctr_knobs k;
    small_knobs(&k, 7, 20000, 5000);
    ctr_summary s;
    const char *dir = generate(&k, "a", &s);
    char path[512];
    path_of(path, sizeof path, dir, "meta.json");
    json_error_t jerr;
    json_t *meta = json_load_file(path, 0, &jerr);
    if (!meta) fail_msg("meta.json: %s", jerr.text);
    assert_string_equal(json_string_value(json_object_get(meta, "format")), "criteo");
    assert_int_equal(meta_real(meta, "seed"), 7);
    assert_int_equal(json_array_size(json_object_get(meta, "cat_vocab")), WK_CRITEO_NCAT);
    assert_int_equal(json_array_size(json_object_get(meta, "zipf_exponents")), WK_CRITEO_NCAT);

    ctr_planted *m = NULL;
    char err[512];
    assert_int_equal(ctr_planted_create(&k, &m, err, sizeof err), CM_OK);
    for (int split = CTR_SPLIT_TRAIN; split <= CTR_SPLIT_TEST; split++) {
        const char *name = split == CTR_SPLIT_TRAIN ? "train" : "test";
        char file[512], key[64];
        snprintf(key, sizeof key, "%s.txt", name);
        path_of(file, sizeof file, dir, key);
        const char *paths[1] = {file};
        wk_criteo *r = NULL;
        assert_int_equal(wk_criteo_open(paths, 1, NULL, &r, err, sizeof err), CM_OK);
        size_t cap = (size_t)k.train_rows;
        float *probs = malloc(cap * sizeof *probs), *fo = malloc(cap * sizeof *fo);
        int32_t *labels = malloc(cap * sizeof *labels);
        assert_true(probs && fo && labels);
        uint64_t n = 0, pos = 0;
        int32_t label;
        uint64_t ids[WK_CRITEO_NFIELDS];
        int rc;
        ctr_example ex;
        while ((rc = wk_criteo_next(r, &label, ids, err, sizeof err)) == 1) {
            assert_true(n < cap);
            ctr_planted_example(m, split, n, &ex);
            assert_int_equal(label, ex.label);
            assert_memory_equal(ids, ex.ids, sizeof ids);
            double first;
            double logit = ctr_planted_logit(m, ids, &first);
            probs[n] = (float)(1.0 / (1.0 + exp(-logit)));
            fo[n] = (float)first;
            labels[n] = label;
            pos += (uint64_t)label;
            n++;
        }
        assert_int_equal(rc, 0);
        assert_int_equal(wk_criteo_bad_lines(r), 0);
        wk_criteo_close(r);

        snprintf(key, sizeof key, "%s_rows", name);
        assert_int_equal(n, (uint64_t)meta_real(meta, key));
        assert_int_equal(n, split == CTR_SPLIT_TRAIN ? k.train_rows : k.test_rows);
        snprintf(key, sizeof key, "%s_positives", name);
        assert_int_equal(pos, (uint64_t)meta_real(meta, key));
        snprintf(key, sizeof key, "%s_positive_rate", name);
        double rate = meta_real(meta, key);
        assert_true(fabs(rate - (double)pos / (double)n) < 1e-12);
        /* b0 is solved for 0.25 on its own rows: these are other rows. */
        assert_true(rate > 0.22 && rate < 0.28);
        if (split == CTR_SPLIT_TEST) {
            double auc = cm_auc(probs, labels, n), ll = cm_logloss(probs, labels, n);
            double fauc = cm_auc(fo, labels, n);
            assert_true(fabs(auc - meta_real(meta, "bayes_auc")) < 1e-9);
            assert_true(fabs(ll - meta_real(meta, "bayes_logloss")) < 1e-9);
            assert_true(fabs(fauc - meta_real(meta, "first_order_auc")) < 1e-9);
            assert_true(fabs(auc - s.bayes_auc) < 1e-12);
            /* The interactions matter, and the defaults are near their
             * documented aims (0.80 and 0.75 on 200,000 rows). */
            assert_true(auc > fauc + 0.02);
            assert_true(auc > 0.76 && auc < 0.84);
            assert_true(fauc > 0.70 && fauc < 0.80);
        }
        free(probs);
        free(fo);
        free(labels);
    }
    ctr_planted_destroy(m);
    json_decref(meta);
}

/* Same seed: byte-identical files; another seed: other data. */
static void test_determinism(void **state) {
    (void)state;
    ctr_knobs k;
    small_knobs(&k, 7, 3000, 1000);
    ctr_summary s1, s2, s3;
    char a[256], b[256], c[256];
    snprintf(a, sizeof a, "%s", generate(&k, "d1", &s1));
    snprintf(b, sizeof b, "%s", generate(&k, "nested/d2", &s2));
    k.seed = 8;
    snprintf(c, sizeof c, "%s", generate(&k, "d3", &s3));
    static const char *names[] = {"train.txt", "test.txt", "meta.json"};
    for (int i = 0; i < 3; i++) {
        char pa[512], pb[512], pc[512];
        path_of(pa, sizeof pa, a, names[i]);
        path_of(pb, sizeof pb, b, names[i]);
        path_of(pc, sizeof pc, c, names[i]);
        assert_true(same_file(pa, pb));
        assert_false(same_file(pa, pc));
    }
    assert_true(s1.bayes_auc == s2.bayes_auc);
    assert_true(s1.bayes_auc != s3.bayes_auc);
}

/* meta.json tells whether a directory holds the data of given knobs. */
static void test_reuse_check(void **state) {
    (void)state;
    ctr_knobs k;
    small_knobs(&k, 11, 500, 200);
    ctr_summary s;
    const char *dir = generate(&k, "reuse", &s);
    assert_int_equal(ctr_meta_matches(dir, &k), 1);
    ctr_knobs other = k;
    other.seed = 12;
    assert_int_equal(ctr_meta_matches(dir, &other), 0);
    other = k;
    other.sigma_v = k.sigma_v * 1.0000001;
    assert_int_equal(ctr_meta_matches(dir, &other), 0);
    char none[512];
    path_of(none, sizeof none, tmpdir, "no-such-dir");
    assert_int_equal(ctr_meta_matches(none, &k), 0);
    /* Regenerated with other knobs: the new meta.json replaces the old. */
    generate(&other, "reuse", &s);
    assert_int_equal(ctr_meta_matches(dir, &other), 1);
    assert_int_equal(ctr_meta_matches(dir, &k), 0);
}

/* A generation that fails half-way through replacing a data set leaves no
 * meta.json (the old one goes first), so the directory does not look
 * complete; nor does it leave its temporary files. Those of a generator
 * that was killed are removed by the next one. */
static void test_failed_replace(void **state) {
    (void)state;
    ctr_knobs k;
    small_knobs(&k, 21, 300, 100);
    ctr_summary s;
    char dir[256], p[512];
    snprintf(dir, sizeof dir, "%s", generate(&k, "replace", &s));
    /* test.txt cannot be replaced once it is a non-empty directory. */
    path_of(p, sizeof p, dir, "test.txt");
    assert_int_equal(unlink(p), 0);
    assert_int_equal(mkdir(p, 0700), 0);
    char inner[600];
    snprintf(inner, sizeof inner, "%s/x", p);
    touch(inner);
    k.seed = 22;
    ctr_planted *m = NULL;
    char err[512];
    assert_int_equal(ctr_planted_create(&k, &m, err, sizeof err), CM_OK);
    assert_int_equal(ctr_generate(m, dir, NULL, NULL, NULL, err, sizeof err), CM_EIO);
    assert_non_null(strstr(err, "test.txt"));
    ctr_planted_destroy(m);
    path_of(p, sizeof p, dir, "meta.json");
    assert_false(file_exists(p));
    assert_int_equal(ctr_meta_matches(dir, &k), 0);
    /* Only train.txt (renamed before the failure) and the test.txt
     * directory are left: no temporary files. */
    int entries = 0;
    char cmd[600];
    snprintf(cmd, sizeof cmd, "ls -A '%s' | wc -l", dir);
    FILE *ls = popen(cmd, "r");
    assert_non_null(ls);
    assert_int_equal(fscanf(ls, "%d", &entries), 1);
    pclose(ls);
    assert_int_equal(entries, 2);

    /* A dead generator's temporary file is removed by the next run; a live
     * one's (pid 1 never exits) stays. */
    char dead[600], live[600];
    snprintf(dead, sizeof dead, "%s/.train.txt.999999999.tmp", dir);
    snprintf(live, sizeof live, "%s/.test.txt.1.tmp", dir);
    touch(dead);
    touch(live);
    k.seed = 23;
    path_of(p, sizeof p, dir, "test.txt/x");
    assert_int_equal(unlink(p), 0);
    path_of(p, sizeof p, dir, "test.txt");
    assert_int_equal(rmdir(p), 0);
    assert_int_equal(ctr_planted_create(&k, &m, err, sizeof err), CM_OK);
    assert_int_equal(ctr_generate(m, dir, NULL, NULL, NULL, err, sizeof err), CM_OK);
    ctr_planted_destroy(m);
    assert_false(file_exists(dead));
    assert_true(file_exists(live));
    assert_int_equal(ctr_meta_matches(dir, &k), 1);

    /* A directory that cannot be created. */
    path_of(p, sizeof p, dir, "train.txt/sub");
    assert_int_equal(ctr_planted_create(&k, &m, err, sizeof err), CM_OK);
    assert_int_equal(ctr_generate(m, p, NULL, NULL, NULL, err, sizeof err), CM_EIO);
    assert_non_null(strstr(err, "cannot create directory"));
    ctr_planted_destroy(m);
}

/* Zipf frequencies against P(r) = (r + 1)^-s / H, within 5 standard
 * errors, for a small vocabulary; draws of a large one stay in range and
 * put rank 0 at its probability. */
static void test_zipf(void **state) {
    (void)state;
    enum { N = 200000 };
    ctr_zipf z;
    ctr_zipf_init(&z, 10, 1.2);
    long cnt[10] = {0};
    uint64_t c = 0;
    for (int i = 0; i < N; i++) {
        uint64_t r = ctr_zipf_draw(&z, 99, &c);
        assert_true(r < 10);
        cnt[r]++;
    }
    double h = 0;
    for (int r = 0; r < 10; r++) h += pow(r + 1, -1.2);
    for (int r = 0; r < 10; r++) {
        double p = pow(r + 1, -1.2) / h, se = sqrt(p * (1 - p) / N);
        if (fabs((double)cnt[r] / N - p) > 5 * se)
            fail_msg("rank %d: frequency %g, P %g", r, (double)cnt[r] / N, p);
    }
    ctr_zipf_init(&z, 1, 1.1);
    assert_int_equal(ctr_zipf_draw(&z, 1, &c), 0);
    ctr_zipf_init(&z, 3000000, 1.05);
    long zeros = 0;
    for (int i = 0; i < N; i++) {
        uint64_t r = ctr_zipf_draw(&z, 5, &c);
        assert_true(r < 3000000);
        zeros += r == 0;
    }
    h = 0;
    for (int r = 0; r < 3000000; r++) h += pow(r + 1, -1.05);
    double p0 = 1.0 / h;
    assert_true(fabs((double)zeros / N - p0) < 5 * sqrt(p0 * (1 - p0) / N));
}

/* Values are a bijection of ranks per field, and the model recovers ranks
 * from the ids the reader makes of them. */
static void test_values_and_ranks(void **state) {
    (void)state;
    ctr_knobs k;
    small_knobs(&k, 3, 0, 0);
    ctr_planted *m = NULL;
    char err[256];
    assert_int_equal(ctr_planted_create(&k, &m, err, sizeof err), CM_OK);
    enum { R = 4096 };
    uint32_t *v = malloc(R * sizeof *v);
    assert_non_null(v);
    for (int j = 0; j < WK_CRITEO_NCAT; j += 5) {
        for (uint32_t r = 0; r < R; r++) {
            uint32_t rank = r * 1048573u; /* spread over 32 bits */
            v[r] = ctr_planted_value(m, j, rank);
            assert_int_equal(ctr_planted_rank(m, j, v[r]), rank);
        }
        for (uint32_t r = 1; r < R; r++) assert_true(v[r] != v[r - 1]);
    }
    /* Field layout: log-spaced vocabularies from 4 to 3,000,000. */
    assert_int_equal(ctr_planted_vocab(m, 0), 4);
    assert_int_equal(ctr_planted_vocab(m, WK_CRITEO_NCAT - 1), 3000000);
    for (int j = 1; j < WK_CRITEO_NCAT; j++)
        assert_true(ctr_planted_vocab(m, j) > ctr_planted_vocab(m, j - 1));
    free(v);
    ctr_planted_destroy(m);
}

static void test_bad_knobs(void **state) {
    (void)state;
    ctr_knobs k;
    ctr_planted *m = (ctr_planted *)1;
    char err[256];
    small_knobs(&k, 1, 0, 0);
    k.k = 0;
    assert_int_equal(ctr_planted_create(&k, &m, err, sizeof err), CM_EINVAL);
    assert_null(m);
    assert_non_null(strstr(err, "k 0"));
    small_knobs(&k, 1, 0, 0);
    k.vocab_max = 2;
    assert_int_equal(ctr_planted_create(&k, &m, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "vocab"));
    small_knobs(&k, 1, 0, 0);
    k.pos_rate = 1.0;
    assert_int_equal(ctr_planted_create(&k, &m, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "pos_rate"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_meta_matches_recount),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_reuse_check),
        cmocka_unit_test(test_failed_replace),
        cmocka_unit_test(test_zipf),
        cmocka_unit_test(test_values_and_ranks),
        cmocka_unit_test(test_bad_knobs),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
