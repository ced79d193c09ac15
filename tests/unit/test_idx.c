/* test_idx.c - unit tests for the IDX reader and the data set loader.
 * SPDX-License-Identifier: MIT
 *
 * Every test writes small IDX files, gzipped and plain, into a temporary
 * directory that the group teardown removes.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "tests/unit/tu_tmpdir.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "worker/input/wk_dataset.h"
#include "worker/input/wk_idx.h"


/* ===== Helpers ===== */

static int group_setup(void **state) {
    (void)state;
    return tu_tmpdir_create("test_idx");
}

static int group_teardown(void **state) {
    (void)state;
    return tu_tmpdir_remove();
}

/* 'name' inside the temporary directory. */
static const char *tmp_path(const char *name) {
    static char buf[256];
    snprintf(buf, sizeof buf, "%s/%s", tmpdir, name);
    return buf;
}

/* An IDX header: 0x00 0x00 type ndims, then big-endian dims. Returns its
 * length. */
static size_t idx_header(uint8_t *h, uint8_t type, int ndims, const uint32_t *dims) {
    h[0] = 0;
    h[1] = 0;
    h[2] = type;
    h[3] = (uint8_t)ndims;
    for (int d = 0; d < ndims; d++) {
        h[4 + 4 * d] = (uint8_t)(dims[d] >> 24);
        h[5 + 4 * d] = (uint8_t)(dims[d] >> 16);
        h[6 + 4 * d] = (uint8_t)(dims[d] >> 8);
        h[7 + 4 * d] = (uint8_t)dims[d];
    }
    return 4 + 4 * (size_t)ndims;
}

/* Write 'len' bytes to 'path', through gzip when 'gz'. */
static void write_bytes(const char *path, int gz, const void *p, size_t len) {
    if (gz) {
        gzFile f = gzopen(path, "wb");
        assert_non_null(f);
        if (len > 0) assert_int_equal(gzwrite(f, p, (unsigned)len), (int)len);
        assert_int_equal(gzclose(f), Z_OK);
    } else {
        FILE *f = fopen(path, "wb");
        assert_non_null(f);
        if (len > 0) assert_int_equal(fwrite(p, 1, len, f), len);
        assert_int_equal(fclose(f), 0);
    }
}

/* Write an IDX file of type 0x08 whose header describes 'dims' and whose
 * data part is 'ndata' bytes of 'data' (more or fewer than the header says
 * when a test wants that). */
static void write_idx(const char *path, int gz, int ndims, const uint32_t *dims,
                      const uint8_t *data, size_t ndata) {
    uint8_t *buf = malloc(4 + 4 * WK_IDX_MAX_DIMS + ndata);
    assert_non_null(buf);
    size_t h = idx_header(buf, 0x08, ndims, dims);
    if (ndata > 0) memcpy(buf + h, data, ndata);
    write_bytes(path, gz, buf, h + ndata);
    free(buf);
}

/* Bytes that gzip cannot shrink much, so a cut lands inside the data. */
static uint8_t *random_bytes(size_t n, uint64_t seed) {
    uint8_t *p = malloc(n);
    assert_non_null(p);
    cm_rng r;
    cm_rng_init(&r, seed);
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)cm_rng_next(&r);
    return p;
}

static long file_size(const char *path) {
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (long)st.st_size;
}

/* Read 'path' expecting 'want'; on error the output must be zeroed and the
 * message must name the file. */
static void expect_read(const char *path, int want, const char *needle) {
    wk_idx idx;
    char err[512];
    memset(&idx, 0x5a, sizeof idx);
    int rc = wk_idx_read(path, &idx, err, sizeof err);
    if (rc != want) fail_msg("%s: got %d (%s), want %d", path, rc, err, want);
    if (want != CM_OK) {
        assert_null(idx.data);
        assert_int_equal(idx.ndims, 0);
        assert_int_equal(idx.count, 0);
        assert_non_null(strstr(err, path));
        if (needle && !strstr(err, needle)) fail_msg("'%s' not in '%s'", needle, err);
    }
    wk_idx_free(&idx);
}

/* ===== IDX reader ===== */

static void test_idx_roundtrip(void **state) {
    (void)state;
    uint32_t dims[3] = {5, 4, 3};
    uint8_t *data = random_bytes(60, 1);
    for (int gz = 0; gz < 2; gz++) {
        const char *path = tmp_path(gz ? "good.gz" : "good");
        write_idx(path, gz, 3, dims, data, 60);
        wk_idx idx;
        char err[256] = "";
        assert_int_equal(wk_idx_read(path, &idx, err, sizeof err), CM_OK);
        assert_int_equal(idx.ndims, 3);
        assert_int_equal(idx.dims[0], 5);
        assert_int_equal(idx.dims[1], 4);
        assert_int_equal(idx.dims[2], 3);
        assert_int_equal(idx.count, 5);
        assert_int_equal(idx.item_size, 12);
        assert_memory_equal(idx.data, data, 60);
        wk_idx_free(&idx);
        assert_null(idx.data);
        wk_idx_free(&idx); /* Freeing a zeroed wk_idx is fine. */
    }
    wk_idx_free(NULL);
    free(data);
}

static void test_idx_roundtrip_1d_and_4d(void **state) {
    (void)state;
    uint8_t data[24];
    for (int i = 0; i < 24; i++) data[i] = (uint8_t)(i * 11);
    uint32_t d1[1] = {24}, d4[4] = {2, 3, 2, 2};
    for (int gz = 0; gz < 2; gz++) {
        wk_idx idx;
        const char *p1 = tmp_path(gz ? "one.gz" : "one");
        write_idx(p1, gz, 1, d1, data, 24);
        assert_int_equal(wk_idx_read(p1, &idx, NULL, 0), CM_OK);
        assert_int_equal(idx.count, 24);
        assert_int_equal(idx.item_size, 1);
        assert_memory_equal(idx.data, data, 24);
        wk_idx_free(&idx);
        const char *p4 = tmp_path(gz ? "four.gz" : "four");
        write_idx(p4, gz, 4, d4, data, 24);
        assert_int_equal(wk_idx_read(p4, &idx, NULL, 0), CM_OK);
        assert_int_equal(idx.count, 2);
        assert_int_equal(idx.item_size, 12);
        assert_memory_equal(idx.data, data, 24);
        wk_idx_free(&idx);
    }
}

static void test_idx_truncated_data(void **state) {
    (void)state;
    uint32_t dims[3] = {10, 28, 28};
    uint8_t *data = random_bytes(7840, 2);
    for (int gz = 0; gz < 2; gz++) {
        const char *path = tmp_path(gz ? "trunc.gz" : "trunc");
        write_idx(path, gz, 3, dims, data, 1000);
        expect_read(path, CM_ECORRUPT, "truncated");
        char err[256];
        wk_idx idx;
        wk_idx_read(path, &idx, err, sizeof err);
        assert_non_null(strstr(err, "header says 7840 data bytes, file has 1000"));
    }
    free(data);
}

static void test_idx_truncated_header(void **state) {
    (void)state;
    uint8_t short_magic[2] = {0, 0};
    uint8_t short_dims[6] = {0, 0, 8, 3, 0, 0};
    for (int gz = 0; gz < 2; gz++) {
        const char *path = tmp_path(gz ? "hdr.gz" : "hdr");
        write_bytes(path, gz, short_magic, 0);
        expect_read(path, CM_ECORRUPT, "truncated");
        write_bytes(path, gz, short_magic, sizeof short_magic);
        expect_read(path, CM_ECORRUPT, "truncated");
        write_bytes(path, gz, short_dims, sizeof short_dims);
        expect_read(path, CM_ECORRUPT, "truncated");
    }
}

static void test_idx_bad_magic(void **state) {
    (void)state;
    uint8_t data[6] = {1, 2, 3, 4, 5, 6};
    uint32_t dims[2] = {2, 3};
    uint8_t buf[64];
    for (int gz = 0; gz < 2; gz++) {
        const char *path = tmp_path(gz ? "magic.gz" : "magic");
        /* 0x00000903: type 0x09 (signed byte) is not supported. */
        size_t h = idx_header(buf, 0x09, 2, dims);
        memcpy(buf + h, data, 6);
        write_bytes(path, gz, buf, h + 6);
        expect_read(path, CM_ECORRUPT, "type");
        /* 0x00000d02: float data. */
        h = idx_header(buf, 0x0d, 2, dims);
        write_bytes(path, gz, buf, h + 6);
        expect_read(path, CM_ECORRUPT, NULL);
        /* Nonzero leading bytes: not an IDX file at all. */
        h = idx_header(buf, 0x08, 2, dims);
        buf[0] = 0x01;
        write_bytes(path, gz, buf, h + 6);
        expect_read(path, CM_ECORRUPT, "magic");
        buf[0] = 0;
        buf[1] = 0x08;
        write_bytes(path, gz, buf, h + 6);
        expect_read(path, CM_ECORRUPT, "magic");
    }
}

static void test_idx_bad_dims(void **state) {
    (void)state;
    uint8_t buf[64];
    memset(buf, 0, sizeof buf);
    uint32_t zero[2] = {3, 0};
    uint32_t huge[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu};
    uint32_t big[2] = {65536, 65537}; /* Just over 4 GiB. */
    uint32_t five[5] = {1, 1, 1, 1, 1};
    for (int gz = 0; gz < 2; gz++) {
        const char *path = tmp_path(gz ? "dims.gz" : "dims");
        size_t h = idx_header(buf, 0x08, 0, NULL);
        write_bytes(path, gz, buf, h + 4);
        expect_read(path, CM_ECORRUPT, "dimensions");
        h = idx_header(buf, 0x08, 5, five);
        write_bytes(path, gz, buf, h + 1);
        expect_read(path, CM_ECORRUPT, "dimensions");
        h = idx_header(buf, 0x08, 2, zero);
        write_bytes(path, gz, buf, h);
        expect_read(path, CM_ECORRUPT, "is 0");
        /* These must be refused before any allocation is tried. */
        h = idx_header(buf, 0x08, 4, huge);
        write_bytes(path, gz, buf, h + 16);
        expect_read(path, CM_ECORRUPT, NULL);
        h = idx_header(buf, 0x08, 2, big);
        write_bytes(path, gz, buf, h + 16);
        expect_read(path, CM_ECORRUPT, NULL);
    }
}

static void test_idx_trailing_bytes(void **state) {
    (void)state;
    uint32_t dims[2] = {4, 4};
    uint8_t *data = random_bytes(16 + 5000, 3);
    for (int gz = 0; gz < 2; gz++) {
        const char *path = tmp_path(gz ? "trail.gz" : "trail");
        /* One byte too many, and more than one read buffer too many. */
        write_idx(path, gz, 2, dims, data, 17);
        expect_read(path, CM_ECORRUPT, "trailing");
        write_idx(path, gz, 2, dims, data, 16 + 5000);
        expect_read(path, CM_ECORRUPT, "5000 more");
    }
    free(data);
}

static void test_idx_gzip_cut_in_stream(void **state) {
    (void)state;
    uint32_t dims[3] = {50, 28, 28};
    size_t n = 50 * 28 * 28;
    uint8_t *data = random_bytes(n, 4);
    const char *path = tmp_path("cut.gz");
    write_idx(path, 1, 3, dims, data, n);
    long full = file_size(path);
    assert_true(full > 1000);
    /* Cut in the middle, and also just before the 8-byte gzip trailer
     * (CRC32 and length), where all the data decodes but the member does
     * not end. */
    long cuts[3] = {full / 2, full - 4, 20};
    for (int i = 0; i < 3; i++) {
        write_idx(path, 1, 3, dims, data, n);
        assert_int_equal(truncate(path, cuts[i]), 0);
        expect_read(path, CM_ECORRUPT, "truncated");
    }
    free(data);
}

static void test_idx_gzip_damaged(void **state) {
    (void)state;
    uint32_t dims[3] = {50, 28, 28};
    size_t n = 50 * 28 * 28;
    uint8_t *data = calloc(n, 1);
    assert_non_null(data);
    for (size_t i = 0; i < n; i++) data[i] = (uint8_t)(i % 251 < 100 ? 0 : i);
    const char *path = tmp_path("damaged.gz");
    write_idx(path, 1, 3, dims, data, n);
    long full = file_size(path);
    /* Flip bytes in the middle of the compressed stream, then in the CRC
     * of the trailer: either the inflater or the check must notice. */
    long where[2] = {full / 2, full - 6};
    for (int i = 0; i < 2; i++) {
        write_idx(path, 1, 3, dims, data, n);
        FILE *f = fopen(path, "r+b");
        assert_non_null(f);
        assert_int_equal(fseek(f, where[i], SEEK_SET), 0);
        int c = fgetc(f);
        assert_int_equal(fseek(f, where[i], SEEK_SET), 0);
        fputc(c ^ 0x55, f);
        fclose(f);
        expect_read(path, CM_ECORRUPT, NULL);
    }
    free(data);
}

static void test_idx_missing_file(void **state) {
    (void)state;
    expect_read(tmp_path("no-such-file.gz"), CM_ENOTFOUND, NULL);
    expect_read(tmpdir, CM_ENOTFOUND, NULL); /* A directory is not a file. */
}

/* ===== Data set ===== */

/* Write <dir>/<split>-images-idx3-ubyte.gz with n images of rows x cols
 * (pixel j of image i is (i * 16 + j) % 256) and labels[i]. */
static void write_split(const char *dir, const char *split, uint32_t n, uint32_t rows,
                        uint32_t cols, uint32_t nlabels, const uint8_t *labels) {
    char path[256];
    size_t dim = (size_t)rows * cols;
    uint8_t *img = malloc(n * dim + 1);
    assert_non_null(img);
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < dim; j++) img[i * dim + j] = (uint8_t)((i * 16 + j) % 256);
    uint32_t idims[3] = {n, rows, cols};
    snprintf(path, sizeof path, "%s/%s-images-idx3-ubyte.gz", dir, split);
    write_idx(path, 1, 3, idims, img, n * dim);
    uint32_t ldims[1] = {nlabels};
    snprintf(path, sizeof path, "%s/%s-labels-idx1-ubyte.gz", dir, split);
    write_idx(path, 1, 1, ldims, labels, nlabels);
    free(img);
}

static void make_dir(const char *path) { assert_int_equal(mkdir(path, 0700), 0); }

static void test_dataset_load(void **state) {
    (void)state;
    char dir[128];
    snprintf(dir, sizeof dir, "%s/ds-good", tmpdir);
    make_dir(dir);
    uint8_t labels[6] = {0, 3, 1, 2, 3, 1};
    write_split(dir, "train", 6, 2, 3, 6, labels);

    wk_dataset d;
    char err[512] = "";
    assert_int_equal(wk_dataset_load(dir, "train", 0, &d, err, sizeof err), CM_OK);
    assert_int_equal(d.n, 6);
    assert_int_equal(d.dim, 6);
    assert_int_equal(d.nclasses, 4);
    assert_memory_equal(d.labels, labels, 6);
    assert_int_equal(d.images[2 * 6 + 1], 33);

    /* gather: pixel / 255 and the labels, in the order asked for. */
    uint32_t idx[3] = {5, 0, 2};
    float x[18];
    int32_t y[3];
    wk_dataset_gather(&d, idx, 3, x, y);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(y[i], labels[idx[i]]);
        for (int j = 0; j < 6; j++) {
            float want = (float)((idx[i] * 16 + (uint32_t)j) % 256) / 255.0f;
            assert_true(x[i * 6 + j] == want);
        }
    }
    wk_dataset_free(&d);
    assert_null(d.images);
    wk_dataset_free(&d);
    wk_dataset_free(NULL);

    /* limit keeps the first examples; nclasses still counts every label. */
    assert_int_equal(wk_dataset_load(dir, "train", 2, &d, err, sizeof err), CM_OK);
    assert_int_equal(d.n, 2);
    assert_int_equal(d.nclasses, 4);
    assert_int_equal(d.images[1 * 6 + 0], 16);
    wk_dataset_free(&d);
    assert_int_equal(wk_dataset_load(dir, "train", 100, &d, err, sizeof err), CM_OK);
    assert_int_equal(d.n, 6);
    wk_dataset_free(&d);
}

static void expect_load(const char *dir, const char *split, int want, const char *needle) {
    wk_dataset d;
    char err[512] = "";
    memset(&d, 0x5a, sizeof d);
    int rc = wk_dataset_load(dir, split, 0, &d, err, sizeof err);
    if (rc != want) fail_msg("%s/%s: got %d (%s), want %d", dir, split, rc, err, want);
    assert_null(d.images);
    assert_null(d.labels);
    assert_int_equal(d.n, 0);
    if (needle && !strstr(err, needle)) fail_msg("'%s' not in '%s'", needle, err);
}

static void test_dataset_refuses_bad_sets(void **state) {
    (void)state;
    char dir[128], path[256];
    uint8_t labels[6] = {0, 1, 2, 3, 4, 5};
    snprintf(dir, sizeof dir, "%s/ds-bad", tmpdir);
    make_dir(dir);

    /* 5 images, 6 labels. */
    write_split(dir, "train", 5, 2, 2, 6, labels);
    expect_load(dir, "train", CM_ECORRUPT, "labels");

    /* Images that are 2-D. */
    write_split(dir, "t10k", 4, 2, 2, 4, labels);
    uint32_t d2[2] = {4, 4};
    uint8_t pix[16] = {0};
    snprintf(path, sizeof path, "%s/t10k-images-idx3-ubyte.gz", dir);
    write_idx(path, 1, 2, d2, pix, 16);
    expect_load(dir, "t10k", CM_ECORRUPT, "3 dimensions");

    /* Labels that are 2-D. */
    write_split(dir, "t10k", 4, 2, 2, 4, labels);
    snprintf(path, sizeof path, "%s/t10k-labels-idx1-ubyte.gz", dir);
    uint32_t l2[2] = {4, 1};
    write_idx(path, 1, 2, l2, labels, 4);
    expect_load(dir, "t10k", CM_ECORRUPT, "1 dimension");

    /* A missing labels file, a bad split name. */
    assert_int_equal(remove(path), 0);
    expect_load(dir, "t10k", CM_ENOTFOUND, "t10k-labels-idx1-ubyte.gz");
    expect_load(dir, "valid", CM_EINVAL, "valid");
}

static void test_dataset_missing_dir(void **state) {
    (void)state;
    char dir[128];
    snprintf(dir, sizeof dir, "%s/no-such-dir", tmpdir);
    expect_load(dir, "train", CM_ENOTFOUND, "dataset-fashion-mnist");
    wk_dataset d;
    char err[512];
    wk_dataset_load(dir, "train", 0, &d, err, sizeof err);
    assert_non_null(strstr(err, dir));
    assert_non_null(strstr(err, "PS_DATA_DIR"));
}

static void test_dataset_default_dir(void **state) {
    (void)state;
    const char *old = getenv("PS_DATA_DIR");
    char *saved = old ? strdup(old) : NULL;
    unsetenv("PS_DATA_DIR");
    assert_string_equal(wk_dataset_default_dir(), "/usr/share/datasets/fashion-mnist");
    setenv("PS_DATA_DIR", "/srv/data", 1);
    assert_string_equal(wk_dataset_default_dir(), "/srv/data");
    if (saved) {
        setenv("PS_DATA_DIR", saved, 1);
        free(saved);
    } else {
        unsetenv("PS_DATA_DIR");
    }
}

/* The real test split, when the Debian package is installed. */
static void test_dataset_real_fashion_mnist(void **state) {
    (void)state;
    const char *dir = "/usr/share/datasets/fashion-mnist";
    struct stat st;
    if (stat(dir, &st) != 0) skip();
    wk_dataset d;
    char err[512] = "";
    int rc = wk_dataset_load(dir, "t10k", 0, &d, err, sizeof err);
    if (rc != CM_OK) fail_msg("%s", err);
    assert_int_equal(d.n, 10000);
    assert_int_equal(d.dim, 784);
    assert_int_equal(d.nclasses, 10);
    wk_dataset_free(&d);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_idx_roundtrip),
        cmocka_unit_test(test_idx_roundtrip_1d_and_4d),
        cmocka_unit_test(test_idx_truncated_data),
        cmocka_unit_test(test_idx_truncated_header),
        cmocka_unit_test(test_idx_bad_magic),
        cmocka_unit_test(test_idx_bad_dims),
        cmocka_unit_test(test_idx_trailing_bytes),
        cmocka_unit_test(test_idx_gzip_cut_in_stream),
        cmocka_unit_test(test_idx_gzip_damaged),
        cmocka_unit_test(test_idx_missing_file),
        cmocka_unit_test(test_dataset_load),
        cmocka_unit_test(test_dataset_refuses_bad_sets),
        cmocka_unit_test(test_dataset_missing_dir),
        cmocka_unit_test(test_dataset_default_dir),
        cmocka_unit_test(test_dataset_real_fashion_mnist),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
