/* wk_export.c - the model export file (format in wk_export.h) and the
 * trainer's three uses of it: --export, --init-from, --eval-only.
 * SPDX-License-Identifier: MIT
 *
 * A file is small (1 MB for the default MLP), so it is built and checked
 * whole in memory: one buffer, one XXH64, one write.
 */
#include "worker/wk_export.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "worker/device/wk_device.h"
#include "worker/input/wk_dataset.h"
#include "worker/wk_replicas.h"

/* The parameters are copied as they lie in memory. */
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the export format is little-endian");
_Static_assert(sizeof(float) == 4, "float32");

#define PREFIX 16 /* magic + version + header length */

static void put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static uint64_t get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static size_t data_offset(size_t hlen) {
    return (PREFIX + hlen + WK_EXPORT_ALIGN - 1) / WK_EXPORT_ALIGN * WK_EXPORT_ALIGN;
}

/* ------------------------------------------------------------ writing */

/* Rows of one table gathered for writing: records of u64 id + dim floats. */
typedef struct table_buf {
    int dim;
    size_t n, len, cap;
    uint8_t *p;
} table_buf;

static int gather_row(void *ud, uint64_t id, const float *values, const float *slots,
                      int64_t count) {
    (void)slots;
    (void)count;
    table_buf *b = ud;
    size_t rec = 8 + (size_t)b->dim * sizeof(float);
    if (b->len + rec > b->cap) {
        b->cap = b->cap ? 2 * b->cap : 1 << 16;
        while (b->cap < b->len + rec) b->cap *= 2;
        b->p = cm_realloc(b->p, b->cap);
    }
    put_u64(b->p + b->len, id);
    memcpy(b->p + b->len + 8, values, (size_t)b->dim * sizeof(float));
    b->len += rec;
    b->n++;
    return CM_OK;
}

static char *header_json(const cm_model *m, const wk_export_meta *meta, const char *created,
                         const table_buf *tb) {
    json_t *sizes = json_array();
    for (int i = 0; i < m->nsizes; i++) json_array_append_new(sizes, json_integer(m->sizes[i]));
    char fp[17];
    snprintf(fp, sizeof fp, "%016" PRIx64, cm_model_fingerprint(m));
    json_t *o = json_pack("{s:s, s:o, s:I, s:s, s:s, s:I, s:I, s:f, s:f, s:s, s:s}", "model",
                          m->kind, "sizes", sizes, "numel", (json_int_t)m->numel, "dtype",
                          "float32", "fingerprint", fp, "steps", (json_int_t)meta->steps, "seed",
                          (json_int_t)meta->seed, "test_accuracy", meta->test_accuracy,
                          "test_loss", meta->test_loss, "mode", meta->mode, "created", created);
    if (!o) return NULL;
    if (m->ntables > 0) {
        json_t *tabs = json_array();
        for (int t = 0; t < m->ntables; t++) {
            const cm_var *v = &m->vars[m->table_var[t]];
            json_array_append_new(tabs, json_pack("{s:s, s:i, s:I}", "name", v->name, "dim",
                                                  v->dim, "rows", (json_int_t)tb[t].n));
        }
        json_object_set_new(o, "tables", tabs);
        json_object_set_new(o, "nfields", json_integer(m->nfields));
        json_object_set_new(o, "emb_dim", json_integer(m->emb_dim));
        if (!isnan(meta->test_auc)) json_object_set_new(o, "test_auc", json_real(meta->test_auc));
    }
    char *s = json_dumps(o, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(o);
    return s;
}

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* fsync the directory holding path, so the rename itself is durable. */
static void sync_dir(const char *path) {
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash) {
        snprintf(dir, sizeof dir, ".");
    } else {
        size_t n = (size_t)(slash - path);
        if (n == 0) n = 1;
        if (n >= sizeof dir) return;
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

int wk_export_write(const char *path, const cm_model *model, const float *params,
                    const wk_export_meta *meta, char *err, size_t errlen) {
    return wk_export_write_tables(path, model, params, NULL, NULL, meta, err, errlen);
}

int wk_export_write_tables(const char *path, const cm_model *model, const float *params,
                           wk_export_rows_fn rows, void *ud, const wk_export_meta *meta,
                           char *err, size_t errlen) {
    char created[32];
    time_t now = time(NULL);
    struct tm tm;
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&now, &tm));
    int nt = rows ? model->ntables : 0;
    table_buf *tb = cm_calloc((size_t)nt + 1, sizeof *tb);
    char *hdr = NULL;
    char *tmp = NULL;
    uint8_t *buf = NULL;
    int fd = -1, rc = CM_EINVAL;
    if (model->ntables > 0 && !rows) {
        cm_seterr(err, errlen, "cannot write model %s: its tables' rows were not given", path);
        goto fail;
    }
    size_t tables_len = 0;
    for (int t = 0; t < nt; t++) {
        tb[t].dim = model->vars[model->table_var[t]].dim;
        if ((rc = rows(ud, t, gather_row, &tb[t])) != CM_OK) {
            cm_seterr(err, errlen, "cannot write model %s: reading the rows of table %d: %s",
                      path, t, cm_strerror(rc));
            goto fail;
        }
        tables_len += tb[t].len;
    }
    rc = CM_ENOMEM;
    if (!(hdr = header_json(model, meta, created, tb))) {
        cm_seterr(err, errlen, "cannot write model %s: header: out of memory", path);
        goto fail;
    }
    size_t hlen = strlen(hdr), off = data_offset(hlen);
    size_t total = off + model->numel * sizeof(float) + tables_len + 8;
    if (!(buf = cm_alloc_aligned(total))) {
        cm_seterr(err, errlen, "cannot write model %s: out of memory for %zu bytes", path, total);
        goto fail;
    }
    memset(buf, 0, off);
    memcpy(buf, WK_EXPORT_MAGIC, 8);
    put_u32(buf + 8, nt ? WK_EXPORT_VERSION_TABLES : WK_EXPORT_VERSION);
    put_u32(buf + 12, (uint32_t)hlen);
    memcpy(buf + PREFIX, hdr, hlen);
    memcpy(buf + off, params, model->numel * sizeof(float));
    size_t at = off + model->numel * sizeof(float);
    for (int t = 0; t < nt; t++) {
        if (tb[t].len) memcpy(buf + at, tb[t].p, tb[t].len);
        at += tb[t].len;
    }
    put_u64(buf + total - 8, XXH64(buf, total - 8, 0));

    size_t plen = strlen(path) + 5;
    tmp = cm_malloc(plen);
    snprintf(tmp, plen, "%s.tmp", path);
    rc = CM_EIO;
    if ((fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0) {
        cm_seterr(err, errlen, "cannot write model %s: %s", tmp, strerror(errno));
        goto fail;
    }
    if (write_all(fd, buf, total) != 0 || fsync(fd) != 0) {
        cm_seterr(err, errlen, "cannot write model %s: %s", tmp, strerror(errno));
        goto fail;
    }
    int closed = close(fd);
    fd = -1;
    if (closed != 0 || rename(tmp, path) != 0) {
        cm_seterr(err, errlen, "cannot write model %s: %s", path, strerror(errno));
        goto fail;
    }
    sync_dir(path);
    rc = CM_OK;
fail:
    if (fd >= 0) close(fd);
    if (rc != CM_OK && tmp) unlink(tmp);
    for (int t = 0; t < nt; t++) free(tb[t].p);
    free(tb);
    free(tmp);
    free(buf);
    free(hdr);
    return rc;
}

/* ------------------------------------------------------------ reading */

static int read_file(const char *path, uint8_t **out, size_t *len, char *err, size_t errlen) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f || fstat(fileno(f), &st) != 0) {
        cm_seterr(err, errlen, "cannot read model %s: %s", path, strerror(errno));
        if (f) fclose(f);
        return CM_EIO;
    }
    size_t n = (size_t)st.st_size;
    uint8_t *buf = cm_alloc_aligned(n ? n : 1);
    if (!buf) {
        fclose(f);
        cm_seterr(err, errlen, "cannot read model %s: out of memory for %zu bytes", path, n);
        return CM_ENOMEM;
    }
    size_t got = fread(buf, 1, n, f);
    int bad = ferror(f);
    fclose(f);
    if (bad || got != n) {
        free(buf);
        cm_seterr(err, errlen, "cannot read model %s: read error", path);
        return CM_EIO;
    }
    *out = buf;
    *len = n;
    return CM_OK;
}

/* Fill info from the parsed header; CM_ECORRUPT with a message otherwise. */
static int parse_header(const char *path, json_t *h, wk_export_info *info, char *err,
                        size_t errlen) {
    const char *model = json_string_value(json_object_get(h, "model"));
    const char *dtype = json_string_value(json_object_get(h, "dtype"));
    const char *fp = json_string_value(json_object_get(h, "fingerprint"));
    const char *mode = json_string_value(json_object_get(h, "mode"));
    const char *created = json_string_value(json_object_get(h, "created"));
    json_t *sizes = json_object_get(h, "sizes"), *numel = json_object_get(h, "numel");
    json_t *steps = json_object_get(h, "steps"), *seed = json_object_get(h, "seed");
    const char *missing = !model                 ? "model"
                          : !dtype               ? "dtype"
                          : !fp                  ? "fingerprint"
                          : !json_is_array(sizes) ? "sizes"
                          : !json_is_integer(numel) ? "numel"
                          : !json_is_integer(steps) ? "steps"
                          : !json_is_integer(seed)  ? "seed"
                                                    : NULL;
    if (missing) {
        cm_seterr(err, errlen, "model %s: the header has no valid \"%s\"", path, missing);
        return CM_ECORRUPT;
    }
    if (strcmp(model, "mlp") != 0 && strcmp(model, "deepfm") != 0 && strcmp(model, "lr") != 0) {
        cm_seterr(err, errlen,
                  "model %s holds a \"%s\" model; pstrain reads mlp, deepfm and lr", path,
                  model);
        return CM_EUNSUPPORTED;
    }
    snprintf(info->kind, sizeof info->kind, "%s", model);
    if (strcmp(dtype, "float32") != 0) {
        cm_seterr(err, errlen, "model %s has dtype \"%s\"; pstrain reads float32", path, dtype);
        return CM_EUNSUPPORTED;
    }
    size_t n = json_array_size(sizes);
    int sparse = strcmp(model, "mlp") != 0;
    if (sparse ? n > CM_MLP_MAX_SIZES - 2 : n < 2 || n > CM_MLP_MAX_SIZES) {
        cm_seterr(err, errlen, "model %s: the header has %zu layer sizes (%s..%d)", path, n,
                  sparse ? "0" : "2", sparse ? CM_MLP_MAX_SIZES - 2 : CM_MLP_MAX_SIZES);
        return CM_ECORRUPT;
    }
    info->nsizes = (int)n;
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(sizes, i);
        if (!json_is_integer(v) || json_integer_value(v) < 1 ||
            json_integer_value(v) > (1 << 24)) {
            cm_seterr(err, errlen, "model %s: layer size %zu in the header is not a width", path,
                      i);
            return CM_ECORRUPT;
        }
        info->sizes[i] = (int)json_integer_value(v);
    }
    if (sparse) {
        json_t *nf = json_object_get(h, "nfields"), *ed = json_object_get(h, "emb_dim");
        if (!json_is_integer(nf) || !json_is_integer(ed) || json_integer_value(nf) < 1 ||
            json_integer_value(nf) > CM_MAX_TABLES || json_integer_value(ed) < 0 ||
            json_integer_value(ed) > 4096) {
            cm_seterr(err, errlen, "model %s: the header has no valid \"nfields\" and \"emb_dim\"",
                      path);
            return CM_ECORRUPT;
        }
        info->ctr = (cm_ctr_spec){.nfields = (int)json_integer_value(nf),
                                  .emb_dim = (int)json_integer_value(ed),
                                  .nhidden = info->nsizes};
        memcpy(info->ctr.hidden, info->sizes, sizeof info->ctr.hidden);
        json_t *auc = json_object_get(h, "test_auc");
        info->meta.test_auc = json_is_number(auc) ? json_number_value(auc) : NAN;
    } else {
        info->meta.test_auc = NAN;
    }
    cm_model *m = NULL;
    if (wk_export_model(info, &m) != CM_OK) {
        cm_seterr(err, errlen, "model %s: the header's sizes do not make a %s model", path,
                  model);
        return CM_ECORRUPT;
    }
    info->numel = m->numel;
    info->ntables = m->ntables;
    info->fingerprint = cm_model_fingerprint(m);
    cm_model_destroy(m);
    if (json_integer_value(numel) != (json_int_t)info->numel) {
        cm_seterr(err, errlen,
                  "model %s: the header says numel %" JSON_INTEGER_FORMAT
                  " but its layer sizes have %zu parameters",
                  path, json_integer_value(numel), info->numel);
        return CM_ECORRUPT;
    }
    char want[17];
    snprintf(want, sizeof want, "%016" PRIx64, info->fingerprint);
    if (strcmp(fp, want) != 0) {
        cm_seterr(err, errlen,
                  "model %s: the header's fingerprint %s is not that of its layer sizes (%s)",
                  path, fp, want);
        return CM_ECORRUPT;
    }
    info->meta.steps = json_integer_value(steps);
    info->meta.seed = (uint64_t)json_integer_value(seed);
    info->meta.test_accuracy = json_number_value(json_object_get(h, "test_accuracy"));
    info->meta.test_loss = json_number_value(json_object_get(h, "test_loss"));
    snprintf(info->meta.mode, sizeof info->meta.mode, "%s", mode ? mode : "");
    snprintf(info->meta.created, sizeof info->meta.created, "%s", created ? created : "");
    return CM_OK;
}

int wk_export_model(const wk_export_info *info, cm_model **out) {
    cm_ctr_spec sp = info->ctr;
    if (!strcmp(info->kind, "deepfm")) return cm_model_create_deepfm(&sp, out);
    if (!strcmp(info->kind, "lr")) return cm_model_create_lr(&sp, out);
    return cm_model_create_mlp(info->sizes, info->nsizes, out);
}

void wk_export_tables_free(wk_export_table *t, int n) {
    for (int i = 0; t && i < n; i++) {
        free(t[i].ids);
        free(t[i].values);
    }
    free(t);
}

/* The tables of a version-2 file: the header's "tables" (each table's dim
 * and row count, checked against the model) and their rows at *at, which
 * moves past them. NULL tables: only check and skip. */
static int read_tables(const char *path, json_t *h, const wk_export_info *info,
                       const uint8_t *buf, size_t end, size_t *at, wk_export_table **out,
                       char *err, size_t errlen) {
    json_t *tabs = json_object_get(h, "tables");
    if (!json_is_array(tabs) || json_array_size(tabs) != (size_t)info->ntables) {
        cm_seterr(err, errlen, "model %s: the header lists %zu tables; the model has %d", path,
                  json_is_array(tabs) ? json_array_size(tabs) : (size_t)0, info->ntables);
        return CM_ECORRUPT;
    }
    cm_model *m = NULL;
    if (wk_export_model(info, &m) != CM_OK) return CM_ECORRUPT;
    wk_export_table *t = cm_calloc((size_t)info->ntables + 1, sizeof *t);
    int rc = CM_OK;
    for (int i = 0; i < info->ntables && rc == CM_OK; i++) {
        json_t *e = json_array_get(tabs, (size_t)i);
        json_t *dim = json_object_get(e, "dim"), *rows = json_object_get(e, "rows");
        int want = m->vars[m->table_var[i]].dim;
        if (!json_is_integer(dim) || json_integer_value(dim) != want || !json_is_integer(rows) ||
            json_integer_value(rows) < 0) {
            cm_seterr(err, errlen, "model %s: table %d's entry in the header is not dim %d with "
                      "a row count", path, i, want);
            rc = CM_ECORRUPT;
            break;
        }
        size_t n = (size_t)json_integer_value(rows), rec = 8 + (size_t)want * sizeof(float);
        if (n > (end - *at) / rec) {
            cm_seterr(err, errlen, "model %s is truncated: table %d's %zu rows end past the "
                      "data", path, i, n);
            rc = CM_ECORRUPT;
            break;
        }
        t[i].dim = want;
        t[i].n = n;
        if (out) {
            t[i].ids = cm_malloc((n ? n : 1) * sizeof *t[i].ids);
            t[i].values = cm_malloc((n ? n : 1) * (size_t)want * sizeof(float));
            for (size_t k = 0; k < n; k++) {
                const uint8_t *p = buf + *at + k * rec;
                t[i].ids[k] = get_u64(p);
                memcpy(t[i].values + k * (size_t)want, p + 8, (size_t)want * sizeof(float));
            }
        }
        *at += n * rec;
    }
    cm_model_destroy(m);
    if (rc == CM_OK && out)
        *out = t;
    else
        wk_export_tables_free(t, info->ntables);
    return rc;
}

int wk_export_read(const char *path, wk_export_info *info, float **params, char *err,
                   size_t errlen) {
    return wk_export_read_tables(path, info, params, NULL, err, errlen);
}

int wk_export_read_tables(const char *path, wk_export_info *info, float **params,
                          wk_export_table **tables, char *err, size_t errlen) {
    *params = NULL;
    if (tables) *tables = NULL;
    memset(info, 0, sizeof *info);
    uint8_t *buf = NULL;
    size_t len = 0;
    json_t *h = NULL;
    int rc = read_file(path, &buf, &len, err, errlen);
    if (rc != CM_OK) return rc;
    rc = CM_ECORRUPT;
    if (len < 8 || memcmp(buf, WK_EXPORT_MAGIC, 8) != 0) {
        cm_seterr(err, errlen, "%s is not a pstrain model file (no \"%s\" magic)", path,
                  WK_EXPORT_MAGIC);
        goto fail;
    }
    if (len < PREFIX) {
        cm_seterr(err, errlen, "model %s is truncated (%zu bytes)", path, len);
        goto fail;
    }
    uint32_t version = get_u32(buf + 8), hlen = get_u32(buf + 12);
    if (version != WK_EXPORT_VERSION && version != WK_EXPORT_VERSION_TABLES) {
        cm_seterr(err, errlen, "model %s has format version %u; this pstrain reads versions %u "
                  "and %u", path, version, WK_EXPORT_VERSION, WK_EXPORT_VERSION_TABLES);
        rc = CM_EUNSUPPORTED;
        goto fail;
    }
    if ((size_t)hlen > len - PREFIX) {
        cm_seterr(err, errlen,
                  "model %s is truncated: its %u-byte header ends past the end of the file "
                  "(%zu bytes)",
                  path, hlen, len);
        goto fail;
    }
    json_error_t je;
    if (!(h = json_loadb((const char *)buf + PREFIX, hlen, 0, &je)) || !json_is_object(h)) {
        cm_seterr(err, errlen, "model %s: the header is not a JSON object: %s", path,
                  h ? "another JSON value" : je.text);
        goto fail;
    }
    if ((rc = parse_header(path, h, info, err, errlen)) != CM_OK) goto fail;
    rc = CM_ECORRUPT;
    if ((version == WK_EXPORT_VERSION_TABLES) != (info->ntables > 0)) {
        cm_seterr(err, errlen, "model %s: format version %u does not fit a %s model", path,
                  version, info->kind);
        goto fail;
    }
    size_t off = data_offset(hlen), want = off + info->numel * sizeof(float) + 8;
    if (info->ntables > 0 && len >= want) {
        /* The row counts come from the header: check the bytes first. */
        if (get_u64(buf + len - 8) != XXH64(buf, len - 8, 0)) {
            cm_seterr(err, errlen, "model %s is corrupt: checksum mismatch", path);
            goto fail;
        }
        size_t at = want - 8;
        if ((rc = read_tables(path, h, info, buf, len - 8, &at, tables, err, errlen)) != CM_OK)
            goto fail;
        rc = CM_ECORRUPT;
        want = at + 8;
    }
    if (len != want) {
        cm_seterr(err, errlen, "model %s is %s: %zu bytes, %zu expected for %zu parameters", path,
                  len < want ? "truncated" : "too long", len, want, info->numel);
        goto fail;
    }
    uint64_t stored = get_u64(buf + len - 8), computed = XXH64(buf, len - 8, 0);
    if (stored != computed) {
        cm_seterr(err, errlen,
                  "model %s is corrupt: checksum mismatch (stored %016" PRIx64
                  ", computed %016" PRIx64 ")",
                  path, stored, computed);
        goto fail;
    }
    rc = CM_ENOMEM;
    if (!(*params = cm_alloc_aligned(info->numel * sizeof(float)))) {
        cm_seterr(err, errlen, "cannot read model %s: out of memory", path);
        goto fail;
    }
    memcpy(*params, buf + off, info->numel * sizeof(float));
    rc = CM_OK;
fail:
    if (rc != CM_OK && tables && *tables) {
        wk_export_tables_free(*tables, info->ntables);
        *tables = NULL;
    }
    json_decref(h);
    free(buf);
    return rc;
}

/* ------------------------------------------------------------ pstrain */

static void sizes_str(const int *sizes, int n, char *buf, size_t len) {
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < n && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%s%d", i ? "," : "", sizes[i]);
}

int wk_export_load_init(const char *path, const cm_model *model, float *params) {
    char err[512];
    wk_export_info info;
    float *p = NULL;
    int rc = wk_export_read(path, &info, &p, err, sizeof err);
    if (rc != CM_OK) {
        cm_error("--init-from: %s", err);
        return rc;
    }
    if (info.ntables > 0 || model->ntables > 0) {
        cm_error("--init-from: model %s is a %s model; starting a run from a model with "
                 "embedding tables is not supported yet (--eval-only evaluates it)",
                 path, info.ntables > 0 ? info.kind : model->kind);
        free(p);
        return CM_EUNSUPPORTED;
    }
    if (info.fingerprint != cm_model_fingerprint(model) || info.numel != model->numel) {
        char have[128], want[128];
        sizes_str(info.sizes, info.nsizes, have, sizeof have);
        sizes_str(model->sizes, model->nsizes, want, sizeof want);
        cm_error("--init-from: model %s holds mlp %s (%zu parameters) but this run trains mlp "
                 "%s (%zu parameters, --layers)",
                 path, have, info.numel, want, model->numel);
        free(p);
        return CM_EINVAL;
    }
    memcpy(params, p, model->numel * sizeof(float));
    free(p);
    cm_info("initial parameters from %s (%lld steps of a %s run, test accuracy %.4f)", path,
            (long long)info.meta.steps, info.meta.mode, info.meta.test_accuracy);
    return CM_OK;
}

int wk_export_save_run(const char *path, const wk_train_cfg *cfg, const cm_model *model,
                       const float *params, wk_export_rows_fn rows, void *ud,
                       const wk_train_result *result) {
    wk_export_meta meta = {.steps = result->steps,
                           .seed = cfg->seed,
                           .test_accuracy = result->test_accuracy,
                           .test_loss = result->test_loss,
                           .test_auc = result->test_auc};
    snprintf(meta.mode, sizeof meta.mode, "%s", cfg->mode);
    char err[512];
    int rc = wk_export_write_tables(path, model, params, model->ntables ? rows : NULL, ud, &meta,
                                    err, sizeof err);
    if (rc != CM_OK)
        cm_error("--export: %s", err);
    else
        cm_info("exported the model (%zu dense parameters%s) to %s", model->numel,
                model->ntables ? " and every row of its tables" : "", path);
    return rc;
}

static int write_eval_summary(const char *path, const char *model_path,
                              const wk_train_result *r) {
    json_t *o = json_pack("{s:s, s:s, s:f, s:f, s:I, s:I}", "mode", "eval", "model",
                          model_path, "test_accuracy", r->test_accuracy, "test_loss",
                          r->test_loss, "test_examples", (json_int_t)r->test_examples, "steps",
                          (json_int_t)r->steps);
    if (!o) return CM_ENOMEM;
    if (!isnan(r->test_auc)) {
        json_object_set_new(o, "auc", json_real(r->test_auc));
        json_object_set_new(o, "logloss", json_real(r->test_loss));
        json_object_set_new(o, "bayes_auc",
                            isnan(r->bayes_auc) ? json_null() : json_real(r->bayes_auc));
    }
    int rc = json_dump_file(o, path, JSON_INDENT(2)) == 0 ? CM_OK : CM_EIO;
    json_decref(o);
    if (rc != CM_OK) cm_error("cannot write summary %s: %s", path, strerror(errno));
    return rc;
}

int wk_export_eval_run(const wk_train_cfg *cfg, wk_train_result *result) {
    memset(result, 0, sizeof *result);
    result->test_auc = result->bayes_auc = NAN;
    result->is_chief = 1;
    result->workers = 1;
    if (!cfg->init_from) {
        cm_error("--eval-only needs --init-from FILE");
        return CM_EINVAL;
    }
    wk_dataset test = {0};
    wk_export_info info;
    cm_model *model = NULL;
    wk_device *dev = NULL;
    wk_replicas *reps = NULL;
    float *params = NULL;
    wk_export_table *tables = NULL;
    char err[512];
    int rc = wk_export_read_tables(cfg->init_from, &info, &params, &tables, err, sizeof err);
    if (rc != CM_OK) {
        cm_error("--init-from: %s", err);
        goto out;
    }
    if (info.ntables > 0) { /* A click model: the trainer evaluates it. */
        if ((rc = wk_export_model(&info, &model)) == CM_OK)
            rc = wk_train_eval_tables(cfg, model, params, tables, info.meta.seed, result);
        result->steps = info.meta.steps;
        if (rc == CM_OK)
            cm_info("evaluated %s (%s, %zu dense parameters, %d tables, %lld steps): test auc "
                    "%.4f logloss %.4f", cfg->init_from, info.kind, info.numel, info.ntables,
                    (long long)info.meta.steps, result->test_auc, result->test_loss);
        if (rc == CM_OK && cfg->summary_path)
            rc = write_eval_summary(cfg->summary_path, cfg->init_from, result);
        goto out;
    }
    if ((rc = wk_dataset_load(cfg->data_dir, "t10k", cfg->test_limit, &test, err, sizeof err)) !=
        CM_OK) {
        cm_error("%s", err);
        goto out;
    }
    if ((rc = cm_model_create_mlp(info.sizes, info.nsizes, &model)) != CM_OK) goto out;
    if (test.dim != (size_t)model->sizes[0] || test.nclasses > model->sizes[model->nsizes - 1]) {
        cm_error("data (%zu inputs, %d classes) does not fit the model in %s (%d inputs, %d "
                 "classes)",
                 test.dim, test.nclasses, cfg->init_from, model->sizes[0],
                 model->sizes[model->nsizes - 1]);
        rc = CM_EINVAL;
        goto out;
    }
    wk_device_cpu_set_threads(cfg->threads > 0 ? cfg->threads : 1);
    dev = wk_device_cpu_create(0);
    if ((rc = wk_replicas_create(model, &dev, 1, cfg->batch_size, &reps)) != CM_OK ||
        (rc = wk_replicas_set_params(reps, params)) != CM_OK ||
        (rc = wk_replicas_evaluate(reps, &test, &result->test_accuracy, &result->test_loss)) !=
            CM_OK)
        goto out;
    result->steps = info.meta.steps;
    result->test_examples = test.n;
    cm_info("evaluated %s (mlp, %zu parameters, %lld steps): test loss %.4f acc %.4f",
            cfg->init_from, info.numel, (long long)info.meta.steps, result->test_loss,
            result->test_accuracy);
    if (cfg->summary_path) rc = write_eval_summary(cfg->summary_path, cfg->init_from, result);
out:
    wk_replicas_destroy(reps);
    wk_device_destroy(dev);
    free(params);
    wk_export_tables_free(tables, info.ntables);
    cm_model_destroy(model);
    wk_dataset_free(&test);
    return rc;
}
