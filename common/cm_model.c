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
    float limit = sqrtf(6.0f / (float)(v->fan_in + v->fan_out));
    for (size_t i = 0; i < count; i++)
        out[i] = (2.0f * cm_randf(key, start + i) - 1.0f) * limit;
}

void cm_model_init(const cm_model *m, uint64_t seed, float *params) {
    for (int i = 0; i < m->nvars; i++)
        cm_var_init(&m->vars[i], seed, 0, m->vars[i].numel, params + m->vars[i].offset);
}
