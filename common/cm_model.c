/* cm_model.c - variable lists, fingerprints and deterministic initialisers.
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"

static void add_var(cm_model *m, const char *name, int ndims, const int64_t *dims, int init,
                    int64_t fan_in, int64_t fan_out) {
    cm_var *v = &m->vars[m->nvars++];
    snprintf(v->name, sizeof v->name, "%s", name);
    v->ndims = ndims;
    v->numel = 1;
    for (int d = 0; d < ndims; d++) {
        v->dims[d] = dims[d];
        v->numel *= (size_t)dims[d];
    }
    v->offset = m->numel;
    v->init = init;
    v->fan_in = fan_in;
    v->fan_out = fan_out;
    m->numel += v->numel;
}

static void add_table(cm_model *m, const char *name, int dim, float scale) {
    cm_var *v = &m->vars[m->nvars++];
    snprintf(v->name, sizeof v->name, "%s", name);
    v->kind = CM_VAR_TABLE;
    v->ndims = 1;
    v->dims[0] = dim;
    v->dim = dim;
    v->init = CM_INIT_UNIFORM;
    v->init_scale = scale;
    v->table = m->ntables;
    m->table_var[m->ntables++] = m->nvars - 1;
}

/* Room for nvars variables of which up to ntables are tables. */
static cm_model *alloc_model(const char *kind, int nvars, int ntables) {
    cm_model *m = cm_calloc(1, sizeof *m);
    snprintf(m->kind, sizeof m->kind, "%s", kind);
    m->vars = cm_calloc((size_t)nvars, sizeof *m->vars);
    if (ntables > 0) m->table_var = cm_calloc((size_t)ntables, sizeof *m->table_var);
    return m;
}

static int check_ctr(const cm_ctr_spec *sp) {
    if (!sp || sp->nfields < 1 || sp->nfields > CM_MAX_TABLES || sp->nhidden < 0 ||
        sp->nhidden > CM_MLP_MAX_SIZES - 2 || sp->emb_init_scale < 0.0f)
        return CM_EINVAL;
    for (int i = 0; i < sp->nhidden; i++)
        if (sp->hidden[i] < 1) return CM_EINVAL;
    return CM_OK;
}

/* One table per field, "field<f>" of 'dim', read by field f. */
static void add_field_tables(cm_model *m, const cm_ctr_spec *sp, int dim) {
    float scale = sp->emb_init_scale > 0.0f ? sp->emb_init_scale : 0.01f;
    m->nfields = sp->nfields;
    m->field_table = cm_calloc((size_t)sp->nfields, sizeof *m->field_table);
    for (int f = 0; f < sp->nfields; f++) {
        char name[CM_VAR_NAME_MAX];
        snprintf(name, sizeof name, "field%d", f);
        m->field_table[f] = m->ntables;
        add_table(m, name, dim, scale);
    }
}

int cm_model_create_deepfm(const cm_ctr_spec *sp, cm_model **out) {
    *out = NULL;
    if (check_ctr(sp) != CM_OK || sp->emb_dim < 1 || sp->emb_dim > 4096) return CM_EINVAL;
    int nlayers = sp->nhidden + 1;
    cm_model *m = alloc_model("deepfm", sp->nfields + 1 + 2 * nlayers, sp->nfields);
    m->emb_dim = sp->emb_dim;
    m->nsizes = sp->nhidden;
    memcpy(m->sizes, sp->hidden, (size_t)sp->nhidden * sizeof *sp->hidden);
    add_field_tables(m, sp, sp->emb_dim + 1);
    int64_t one[1] = {1};
    add_var(m, "fm/bias", 1, one, CM_INIT_ZERO, 1, 1);
    int64_t in = (int64_t)sp->nfields * sp->emb_dim;
    for (int i = 0; i < nlayers; i++) {
        int64_t outw = i < sp->nhidden ? sp->hidden[i] : 1;
        char name[CM_VAR_NAME_MAX];
        int64_t kd[2] = {in, outw}, bd[1] = {outw};
        snprintf(name, sizeof name, "dnn%d/kernel", i);
        add_var(m, name, 2, kd, CM_INIT_GLOROT_UNIFORM, in, outw);
        snprintf(name, sizeof name, "dnn%d/bias", i);
        add_var(m, name, 1, bd, CM_INIT_ZERO, in, outw);
        in = outw;
    }
    *out = m;
    return CM_OK;
}

int cm_model_create_lr(const cm_ctr_spec *sp, cm_model **out) {
    *out = NULL;
    if (check_ctr(sp) != CM_OK) return CM_EINVAL;
    cm_model *m = alloc_model("lr", sp->nfields + 1, sp->nfields);
    add_field_tables(m, sp, 1);
    int64_t one[1] = {1};
    add_var(m, "lr/bias", 1, one, CM_INIT_ZERO, 1, 1);
    *out = m;
    return CM_OK;
}

int cm_model_create_from_vars(const char *kind, const cm_var *vars, int nvars, cm_model **out,
                              char *err, size_t errlen) {
    *out = NULL;
    if (!kind || !*kind || strlen(kind) >= sizeof(((cm_model *)0)->kind)) {
        cm_seterr(err, errlen, "bad model kind");
        return CM_EINVAL;
    }
    if (nvars < 1 || nvars > 1 << 16) {
        cm_seterr(err, errlen, "a model has 1 to 65536 variables, not %d", nvars);
        return CM_EINVAL;
    }
    int ntables = 0;
    for (int i = 0; i < nvars; i++) {
        const cm_var *v = &vars[i];
        if (!v->name[0] || memchr(v->name, '\0', sizeof v->name) == NULL) {
            cm_seterr(err, errlen, "variable %d has no name", i);
            return CM_EINVAL;
        }
        for (int j = 0; j < i; j++)
            if (!strcmp(vars[j].name, v->name)) {
                cm_seterr(err, errlen, "variable name %s appears twice", v->name);
                return CM_EINVAL;
            }
        if (v->init < CM_INIT_ZERO || v->init > CM_INIT_UNIFORM ||
            !(v->init_scale >= 0.0f && v->init_scale < 1e6f)) {
            cm_seterr(err, errlen, "variable %s: unknown initialiser", v->name);
            return CM_EINVAL;
        }
        if (v->kind == CM_VAR_TABLE) {
            if (v->init == CM_INIT_GLOROT_UNIFORM) {
                cm_seterr(err, errlen, "table %s: rows start at zeros or uniform, not Glorot",
                          v->name);
                return CM_EINVAL;
            }
            if (v->dim < 1 || v->dim > 65536) {
                cm_seterr(err, errlen, "table %s: dim %d out of range 1..65536", v->name, v->dim);
                return CM_EINVAL;
            }
            ntables++;
        } else if (v->kind == CM_VAR_DENSE) {
            if (v->ndims < 0 || v->ndims > CM_VAR_MAX_DIMS) {
                cm_seterr(err, errlen, "variable %s: %d dimensions", v->name, v->ndims);
                return CM_EINVAL;
            }
            double numel = 1.0;
            for (int d = 0; d < v->ndims; d++) {
                if (v->dims[d] < 1) {
                    cm_seterr(err, errlen, "variable %s: dimension %d is %lld", v->name, d,
                              (long long)v->dims[d]);
                    return CM_EINVAL;
                }
                numel *= (double)v->dims[d];
            }
            if (numel > (double)(1ULL << 34)) {
                cm_seterr(err, errlen, "variable %s: %.0f elements is too large", v->name, numel);
                return CM_EINVAL;
            }
            if (v->init == CM_INIT_GLOROT_UNIFORM && (v->fan_in < 1 || v->fan_out < 1)) {
                cm_seterr(err, errlen, "variable %s: Glorot needs fan_in and fan_out >= 1",
                          v->name);
                return CM_EINVAL;
            }
        } else {
            cm_seterr(err, errlen, "variable %s: unknown kind %d", v->name, v->kind);
            return CM_EINVAL;
        }
    }
    if (ntables > CM_MAX_TABLES) {
        cm_seterr(err, errlen, "%d tables: at most %d", ntables, CM_MAX_TABLES);
        return CM_EINVAL;
    }
    cm_model *m = alloc_model(kind, nvars, ntables);
    for (int i = 0; i < nvars; i++) {
        const cm_var *v = &vars[i];
        if (v->kind == CM_VAR_TABLE) {
            add_table(m, v->name, v->dim, v->init_scale);
            m->vars[m->nvars - 1].init = v->init;
        } else {
            add_var(m, v->name, v->ndims, v->dims, v->init, v->fan_in, v->fan_out);
            m->vars[m->nvars - 1].init_scale = v->init_scale;
        }
    }
    *out = m;
    return CM_OK;
}

int cm_model_create_mlp(const int *sizes, int nsizes, cm_model **out) {
    *out = NULL;
    if (nsizes < 2 || nsizes > CM_MLP_MAX_SIZES) return CM_EINVAL;
    for (int i = 0; i < nsizes; i++)
        if (sizes[i] < 1) return CM_EINVAL;
    cm_model *m = cm_calloc(1, sizeof *m);
    snprintf(m->kind, sizeof m->kind, "mlp");
    m->nsizes = nsizes;
    memcpy(m->sizes, sizes, (size_t)nsizes * sizeof *sizes);
    m->vars = cm_calloc((size_t)(nsizes - 1) * 2, sizeof *m->vars);
    for (int i = 0; i + 1 < nsizes; i++) {
        char name[CM_VAR_NAME_MAX];
        int64_t kd[2] = {sizes[i], sizes[i + 1]};
        snprintf(name, sizeof name, "dense%d/kernel", i);
        add_var(m, name, 2, kd, CM_INIT_GLOROT_UNIFORM, sizes[i], sizes[i + 1]);
        int64_t bd[1] = {sizes[i + 1]};
        snprintf(name, sizeof name, "dense%d/bias", i);
        add_var(m, name, 1, bd, CM_INIT_ZERO, sizes[i], sizes[i + 1]);
    }
    *out = m;
    return CM_OK;
}

int cm_model_create_vector(size_t n, cm_model **out) {
    *out = NULL;
    if (n < 1) return CM_EINVAL;
    cm_model *m = cm_calloc(1, sizeof *m);
    snprintf(m->kind, sizeof m->kind, "vector");
    m->nsizes = 1;
    m->sizes[0] = n > 0x7fffffff ? 0x7fffffff : (int)n;
    m->vars = cm_calloc(1, sizeof *m->vars);
    int64_t dims[1] = {(int64_t)n};
    add_var(m, "bench/data", 1, dims, CM_INIT_ZERO, 1, 1);
    *out = m;
    return CM_OK;
}

void cm_model_destroy(cm_model *m) {
    if (!m) return;
    free(m->table_var);
    free(m->field_table);
    free(m->vars);
    free(m);
}

int cm_parse_sizes(const char *s, int *sizes, int max) {
    int n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 1 || v > 1 << 24 || n >= max) return CM_EINVAL;
        sizes[n++] = (int)v;
        if (*end == ',')
            p = end + 1;
        else if (*end == '\0')
            p = end;
        else
            return CM_EINVAL;
    }
    return n >= 2 ? n : CM_EINVAL;
}

uint64_t cm_model_fingerprint(const cm_model *m) {
    uint64_t h = cm_hash_str(m->kind, 0x6d6f64656cULL);
    for (int i = 0; i < m->nvars; i++) {
        const cm_var *v = &m->vars[i];
        h = cm_hash_str(v->name, h);
        h = cm_hash_bytes(&v->ndims, sizeof v->ndims, h);
        h = cm_hash_bytes(v->dims, sizeof(int64_t) * (size_t)v->ndims, h);
        h = cm_hash_bytes(&v->init, sizeof v->init, h);
        /* Glorot fans other than the kernel's (in, out) shape change the
         * initial values; the usual ones keep the fingerprints they had. */
        if (v->init == CM_INIT_GLOROT_UNIFORM && v->ndims >= 1 &&
            (v->fan_in != v->dims[0] || v->fan_out != v->dims[v->ndims - 1])) {
            int64_t fans[2] = {v->fan_in, v->fan_out};
            h = cm_hash_bytes(fans, sizeof fans, h);
        }
        if (v->kind == CM_VAR_TABLE || v->init == CM_INIT_UNIFORM) {
            /* Dense-only models keep the fingerprints they always had. */
            int32_t k[2] = {v->kind, v->dim};
            h = cm_hash_bytes(k, sizeof k, h);
            h = cm_hash_bytes(&v->init_scale, sizeof v->init_scale, h);
        }
    }
    return h;
}

int cm_model_find(const cm_model *m, const char *name) {
    for (int i = 0; i < m->nvars; i++)
        if (!strcmp(m->vars[i].name, name)) return i;
    return -1;
}

void cm_var_init(const cm_var *v, uint64_t seed, size_t start, size_t count, float *out) {
    if (v->init == CM_INIT_ZERO) {
        memset(out, 0, count * sizeof *out);
        return;
    }
    uint64_t key = cm_hash_str(v->name, seed);
    float limit = v->init == CM_INIT_UNIFORM ? v->init_scale
                                             : sqrtf(6.0f / (float)(v->fan_in + v->fan_out));
    for (size_t i = 0; i < count; i++)
        out[i] = (2.0f * cm_randf(key, start + i) - 1.0f) * limit;
}

void cm_model_init(const cm_model *m, uint64_t seed, float *params) {
    for (int i = 0; i < m->nvars; i++)
        if (m->vars[i].kind == CM_VAR_DENSE)
            cm_var_init(&m->vars[i], seed, 0, m->vars[i].numel, params + m->vars[i].offset);
}

void cm_row_init(const cm_var *v, uint64_t seed, uint64_t id, float *out) {
    int dim = v->dim;
    if (v->init == CM_INIT_ZERO) {
        memset(out, 0, (size_t)dim * sizeof *out);
        return;
    }
    uint64_t key = cm_hash_bytes(&id, sizeof id, cm_hash_str(v->name, seed));
    float limit = v->init_scale;
    for (int j = 0; j < dim; j++) out[j] = (2.0f * cm_randf(key, (uint64_t)j) - 1.0f) * limit;
}

int cm_model_max_dim(const cm_model *m) {
    int d = 0;
    for (int t = 0; t < m->ntables; t++)
        if (m->vars[m->table_var[t]].dim > d) d = m->vars[m->table_var[t]].dim;
    return d;
}
