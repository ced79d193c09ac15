/* cm_model.h - a model's variables: names, shapes, flat layout, initialisers.
 * SPDX-License-Identifier: MIT
 *
 * Every process (worker, PS, benchmark) describes the model the same way: an
 * ordered list of named variables laid out back to back in one flat float
 * vector. Placement, the wire protocol and the checkpoints refer to variables
 * by index and name. Initial values depend only on (seed, variable name,
 * element index), so a shard that owns rows [a, b) of a variable computes
 * exactly the values the whole variable would hold there.
 *
 * A cm_model is immutable after creation and may be shared across threads.
 */
#ifndef CM_MODEL_H
#define CM_MODEL_H
#include <stddef.h>
#include <stdint.h>

#define CM_VAR_MAX_DIMS 4
#define CM_VAR_NAME_MAX 64
#define CM_MLP_MAX_SIZES 16

enum cm_init_kind {
    CM_INIT_ZERO = 0,
    CM_INIT_GLOROT_UNIFORM = 1 /* U(-l, l), l = sqrt(6 / (fan_in + fan_out)) */
};

typedef struct cm_var {
    char name[CM_VAR_NAME_MAX];
    int ndims;
    int64_t dims[CM_VAR_MAX_DIMS];
    size_t numel;
    size_t offset; /* First element in the flat parameter vector. */
    int init;      /* enum cm_init_kind */
    int64_t fan_in, fan_out;
} cm_var;

typedef struct cm_model {
    char kind[16]; /* "mlp" or "vector" */
    int nsizes;    /* Layer widths, input first: 784,256,128,10. */
    int sizes[CM_MLP_MAX_SIZES];
    int nvars;
    cm_var *vars;
    size_t numel; /* Total number of parameters. */
} cm_model;

/* An MLP with widths sizes[0..nsizes-1] (input first, classes last): for each
 * layer i, "dense<i>/kernel" [in, out] (Glorot uniform) then "dense<i>/bias"
 * [out] (zeros). Returns CM_EINVAL for fewer than 2 sizes, more than
 * CM_MLP_MAX_SIZES or a width < 1. On success *out owns the model; release
 * with cm_model_destroy() (NULL is a no-op). */
int cm_model_create_mlp(const int *sizes, int nsizes, cm_model **out);
void cm_model_destroy(cm_model *m);

/* A model of one 1-D variable "bench/data" of n floats, zero-initialised
 * (kind "vector"): the workload of the push/pull benchmarks. */
int cm_model_create_vector(size_t n, cm_model **out);

/* Parse "784,256,128,10" into sizes; returns the count or CM_EINVAL. */
int cm_parse_sizes(const char *s, int *sizes, int max);

/* A stable 64-bit fingerprint of the kind, names and shapes. */
uint64_t cm_model_fingerprint(const cm_model *m);

/* Index of the variable called 'name', or -1. */
int cm_model_find(const cm_model *m, const char *name);

/* Initial values of elements [start, start + count) of 'v' (row-major) into
 * out[0 .. count). A pure function of (seed, v->name, element index). */
void cm_var_init(const cm_var *v, uint64_t seed, size_t start, size_t count, float *out);

/* All variables into params[0 .. m->numel). */
void cm_model_init(const cm_model *m, uint64_t seed, float *params);

#endif /* CM_MODEL_H */
