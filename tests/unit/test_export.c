/* test_export.c - the model export file: round trip and every refusal.
 * SPDX-License-Identifier: MIT
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/cm_model.h"
#include "common/cm_status.h"
#include "worker/wk_export.h"

typedef struct fixture {
    char dir[64];
    char path[128];
    cm_model *model;
    float *params;
} fixture;

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/test_export-XXXXXX");
    if (!mkdtemp(f->dir)) return -1;
    snprintf(f->path, sizeof f->path, "%s/m.pst", f->dir);
    int sizes[] = {20, 7, 3};
    if (cm_model_create_mlp(sizes, 3, &f->model) != CM_OK) return -1;
    f->params = malloc(f->model->numel * sizeof(float));
    /* Arbitrary bit patterns (NaNs, denormals, -0) must survive as bits. */
    uint32_t x = 12345;
    for (size_t i = 0; i < f->model->numel; i++) {
        x = x * 1664525u + 1013904223u;
        memcpy(&f->params[i], &x, 4);
    }
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    char tmp[160];
    unlink(f->path);
    snprintf(tmp, sizeof tmp, "%s.tmp", f->path);
    unlink(tmp);
    rmdir(f->dir);
    cm_model_destroy(f->model);
    free(f->params);
    free(f);
    return 0;
}

static void write_model(fixture *f) {
    wk_export_meta meta = {.steps = 42, .seed = 7, .test_accuracy = 0.875, .test_loss = 0.25};
    snprintf(meta.mode, sizeof meta.mode, "local");
    char err[512];
    assert_int_equal(wk_export_write(f->path, f->model, f->params, &meta, err, sizeof err), CM_OK);
}

static uint8_t *slurp(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    *len = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *b = malloc(*len + 1);
    assert_int_equal(fread(b, 1, *len, fp), *len);
    fclose(fp);
    return b;
}

static void spit(const char *path, const uint8_t *b, size_t len) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(b, 1, len, fp), len);
    fclose(fp);
}

/* Read f->path expecting 'code' and a message containing 'what'. */
static void expect_refused(fixture *f, int code, const char *what) {
    wk_export_info info;
    float *p = (float *)1;
    char err[512] = "";
    assert_int_equal(wk_export_read(f->path, &info, &p, err, sizeof err), code);
    assert_null(p);
    if (!strstr(err, what) || !strstr(err, f->path)) fail_msg("message '%s' lacks '%s'", err, what);
}

static void test_round_trip_is_bit_exact(void **state) {
    fixture *f = *state;
    write_model(f);
    char tmp[160];
    snprintf(tmp, sizeof tmp, "%s.tmp", f->path);
    assert_int_not_equal(access(tmp, F_OK), 0); /* Renamed away. */
    wk_export_info info;
    float *p = NULL;
    char err[512];
    assert_int_equal(wk_export_read(f->path, &info, &p, err, sizeof err), CM_OK);
    assert_int_equal(info.nsizes, 3);
    assert_int_equal(info.sizes[0], 20);
    assert_int_equal(info.sizes[2], 3);
    assert_int_equal(info.numel, f->model->numel);
    assert_true(info.fingerprint == cm_model_fingerprint(f->model));
    assert_int_equal(info.meta.steps, 42);
    assert_int_equal(info.meta.seed, 7);
    assert_true(info.meta.test_accuracy == 0.875 && info.meta.test_loss == 0.25);
    assert_string_equal(info.meta.mode, "local");
    assert_int_equal(strlen(info.meta.created), 20); /* 2026-01-02T03:04:05Z */
    assert_memory_equal(p, f->params, f->model->numel * sizeof(float));
    free(p);

    /* The layout: magic, version, header length, data at a 64-byte offset. */
    size_t len;
    uint8_t *b = slurp(f->path, &len);
    assert_memory_equal(b, "PSTMODEL", 8);
    assert_int_equal(b[8], 1);
    uint32_t hlen = (uint32_t)b[12] | (uint32_t)b[13] << 8 | (uint32_t)b[14] << 16;
    size_t off = (16 + hlen + 63) / 64 * 64;
    assert_int_equal(len, off + f->model->numel * 4 + 8);
    assert_memory_equal(b + off, f->params, f->model->numel * 4);
    free(b);
}

static void test_missing_file_refused(void **state) {
    fixture *f = *state;
    expect_refused(f, CM_EIO, "cannot read");
}

static void test_truncated_refused(void **state) {
    fixture *f = *state;
    write_model(f);
    size_t len;
    uint8_t *b = slurp(f->path, &len);
    size_t cuts[] = {len - 1, len - 100, 100, 12};
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts; i++) {
        spit(f->path, b, cuts[i]);
        expect_refused(f, CM_ECORRUPT, "truncated");
    }
    spit(f->path, b, 4);
    expect_refused(f, CM_ECORRUPT, "not a pstrain model file");
    free(b);
}

static void test_flipped_byte_fails_checksum(void **state) {
    fixture *f = *state;
    write_model(f);
    size_t len;
    uint8_t *b = slurp(f->path, &len);
    size_t at[] = {len - 300, len - 9, len - 1}; /* Data, last float, checksum. */
    for (size_t i = 0; i < sizeof at / sizeof *at; i++) {
        b[at[i]] ^= 0x10;
        spit(f->path, b, len);
        expect_refused(f, CM_ECORRUPT, "checksum mismatch");
        b[at[i]] ^= 0x10;
    }
    free(b);
}

static void test_wrong_magic_and_version_refused(void **state) {
    fixture *f = *state;
    write_model(f);
    size_t len;
    uint8_t *b = slurp(f->path, &len);
    b[0] = 'X';
    spit(f->path, b, len);
    expect_refused(f, CM_ECORRUPT, "not a pstrain model file");
    b[0] = 'P';
    b[8] = 3;
    spit(f->path, b, len);
    expect_refused(f, CM_EUNSUPPORTED, "format version 3");
    /* Version 2 is for models with tables: an mlp in it is refused. */
    b[8] = 2;
    spit(f->path, b, len);
    expect_refused(f, CM_ECORRUPT, "format version 2 does not fit");
    free(b);
}

/* A DeepFM's rows: table t holds rows id 1000 t + k (k < 3 + t) of values
 * id + j / 8 (a rows callback of wk_export_write_tables). */
static int fake_rows(void *ud, int table,
                     int (*emit)(void *, uint64_t, const float *, const float *, int64_t),
                     void *emit_ud) {
    const cm_model *m = ud;
    int dim = m->vars[m->table_var[table]].dim;
    float v[16];
    for (int k = 0; k < 3 + table; k++) {
        uint64_t id = 1000u * (uint64_t)table + (uint64_t)k;
        for (int j = 0; j < dim; j++) v[j] = (float)id + (float)j / 8.0f;
        int rc = emit(emit_ud, id, v, NULL, 0);
        if (rc != CM_OK) return rc;
    }
    return CM_OK;
}

static void test_tables_round_trip(void **state) {
    fixture *f = *state;
    cm_ctr_spec sp = {.nfields = 4, .emb_dim = 3, .nhidden = 1, .hidden = {5}};
    cm_model *m = NULL;
    assert_int_equal(cm_model_create_deepfm(&sp, &m), CM_OK);
    float *params = calloc(m->numel, sizeof(float));
    for (size_t i = 0; i < m->numel; i++) params[i] = (float)i / 3.0f;
    wk_export_meta meta = {.steps = 9, .seed = 3, .test_auc = 0.75};
    snprintf(meta.mode, sizeof meta.mode, "ps");
    char err[512];
    /* A model with tables needs its rows. */
    assert_int_equal(wk_export_write(f->path, m, params, &meta, err, sizeof err), CM_EINVAL);
    assert_int_equal(wk_export_write_tables(f->path, m, params, fake_rows, m, &meta, err,
                                            sizeof err),
                     CM_OK);
    wk_export_info info;
    float *p = NULL;
    wk_export_table *t = NULL;
    assert_int_equal(wk_export_read_tables(f->path, &info, &p, &t, err, sizeof err), CM_OK);
    assert_string_equal(info.kind, "deepfm");
    assert_int_equal(info.ntables, 4);
    assert_int_equal(info.ctr.emb_dim, 3);
    assert_int_equal(info.ctr.nhidden, 1);
    assert_true(info.fingerprint == cm_model_fingerprint(m));
    assert_true(info.meta.test_auc == 0.75);
    assert_memory_equal(p, params, m->numel * sizeof(float));
    for (int tb = 0; tb < 4; tb++) {
        assert_int_equal(t[tb].n, 3 + tb);
        assert_int_equal(t[tb].dim, 4);
        for (size_t k = 0; k < t[tb].n; k++) {
            assert_true(t[tb].ids[k] == 1000u * (uint64_t)tb + k);
            assert_true(t[tb].values[k * 4 + 2] == (float)t[tb].ids[k] + 0.25f);
        }
    }
    wk_export_tables_free(t, info.ntables);
    free(p);
    /* Damaged rows fail the checksum; a cut file is refused too. */
    size_t len;
    uint8_t *b = slurp(f->path, &len);
    b[len - 20] ^= 1;
    spit(f->path, b, len);
    expect_refused(f, CM_ECORRUPT, "checksum");
    b[len - 20] ^= 1;
    spit(f->path, b, len - 9);
    expect_refused(f, CM_ECORRUPT, "");
    free(b);
    free(params);
    cm_model_destroy(m);
}

/* A well-formed file (correct checksum) around any header text. */
static void write_with_header(fixture *f, const char *hdr, size_t numel) {
    size_t hlen = strlen(hdr), off = (16 + hlen + 63) / 64 * 64;
    size_t len = off + numel * 4 + 8;
    uint8_t *b = calloc(1, len);
    memcpy(b, "PSTMODEL", 8);
    b[8] = 1;
    for (int i = 0; i < 4; i++) b[12 + i] = (uint8_t)(hlen >> (8 * i));
    memcpy(b + 16, hdr, hlen);
    size_t have = numel < f->model->numel ? numel : f->model->numel; /* The rest stays 0. */
    memcpy(b + off, f->params, have * 4);
    uint64_t h = XXH64(b, len - 8, 0);
    for (int i = 0; i < 8; i++) b[len - 8 + i] = (uint8_t)(h >> (8 * i));
    spit(f->path, b, len);
    free(b);
}

static void test_bad_headers_refused(void **state) {
    fixture *f = *state;
    char fp[17], hdr[512];
    snprintf(fp, sizeof fp, "%016llx", (unsigned long long)cm_model_fingerprint(f->model));
    const size_t n = f->model->numel; /* 20*7+7 + 7*3+3 = 171 */
    const char *fmt = "{\"model\":\"mlp\",\"sizes\":%s,\"numel\":%zu,\"dtype\":\"%s\","
                      "\"fingerprint\":\"%s\",\"steps\":1,\"seed\":1}";
    snprintf(hdr, sizeof hdr, fmt, "[20,7,3]", n, "float32", fp);
    write_with_header(f, hdr, n);
    wk_export_info info;
    float *p = NULL;
    char err[512];
    assert_int_equal(wk_export_read(f->path, &info, &p, err, sizeof err), CM_OK); /* Control. */
    free(p);

    snprintf(hdr, sizeof hdr, fmt, "[20,7,3]", n + 1, "float32", fp);
    write_with_header(f, hdr, n + 1);
    expect_refused(f, CM_ECORRUPT, "numel 172");
    snprintf(hdr, sizeof hdr, fmt, "[20,8,3]", n, "float32", fp);
    write_with_header(f, hdr, n);
    expect_refused(f, CM_ECORRUPT, "numel 171");
    snprintf(hdr, sizeof hdr, fmt, "[20,7,3]", n, "float32", "0123456789abcdef");
    write_with_header(f, hdr, n);
    expect_refused(f, CM_ECORRUPT, "fingerprint");
    snprintf(hdr, sizeof hdr, fmt, "[20,7,3]", n, "float16", fp);
    write_with_header(f, hdr, n);
    expect_refused(f, CM_EUNSUPPORTED, "float16");
    snprintf(hdr, sizeof hdr, fmt, "[20]", n, "float32", fp);
    write_with_header(f, hdr, n);
    expect_refused(f, CM_ECORRUPT, "layer sizes");
    write_with_header(f, "{\"model\":\"mlp\",", n);
    expect_refused(f, CM_ECORRUPT, "not a JSON object");
    write_with_header(f, "{\"model\":\"mlp\"}", n);
    expect_refused(f, CM_ECORRUPT, "no valid");
}

static void test_write_to_missing_dir_fails_cleanly(void **state) {
    fixture *f = *state;
    char path[160], err[512] = "";
    snprintf(path, sizeof path, "%s/no/such/dir/m.pst", f->dir);
    wk_export_meta meta = {.steps = 1};
    assert_int_equal(wk_export_write(path, f->model, f->params, &meta, err, sizeof err), CM_EIO);
    assert_non_null(strstr(err, "no/such/dir/m.pst.tmp"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_round_trip_is_bit_exact, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_file_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncated_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_flipped_byte_fails_checksum, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_magic_and_version_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tables_round_trip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_headers_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_to_missing_dir_fails_cleanly, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
