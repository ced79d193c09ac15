/* cm_model.h - a model's variables: names, kinds, shapes, flat layout, initialisers.
 * SPDX-License-Identifier: MIT
 *
 * Every process (worker, PS, benchmark) describes the model the same way: an
 * ordered list of named variables of two kinds.
 *  - Dense variables are laid out back to back in one flat float vector
 *    (model->numel floats). Initial values depend only on (seed, variable
 *    name, element index), so a shard that owns rows [a, b) of a variable
 *    computes exactly the values the whole variable would hold there.
 *  - Embedding tables hold rows of 'dim' floats addressed by a 64-bit id,
 *    with no fixed vocabulary: a row exists once it is first trained. They
 *    are not in the flat vector (numel 0). A row's initial values are a pure
 *    function of (seed, table name, id) (cm_row_init), so any process can
 *    compute the value of a row that was never trained.
 * Placement, the wire protocol and the checkpoints refer to variables by
 * index and name. A sparse model also says which table each of its
 * per-example inputs ("fields") reads: field f of an example is a row id of
 * table field_table[f].
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

#define CM_MAX_TABLES 1024

enum cm_var_kind {
    CM_VAR_DENSE = 0, /* In the flat vector. */
    CM_VAR_TABLE = 1  /* An embedding table: rows by 64-bit id. */
};

enum cm_init_kind {
    CM_INIT_ZERO = 0,
    CM_INIT_GLOROT_UNIFORM = 1, /* U(-l, l), l = sqrt(6 / (fan_in + fan_out)) */
    CM_INIT_UNIFORM = 2         /* U(-init_scale, init_scale) */
};

typedef struct cm_var {
    char name[CM_VAR_NAME_MAX];
    int kind;      /* enum cm_var_kind */
    int ndims;     /* A table: 1, dims[0] = dim. */
    int64_t dims[CM_VAR_MAX_DIMS];
    size_t numel;  /* Dense: elements. A table: 0 (not in the flat vector). */
    size_t offset; /* Dense: first element in the flat parameter vector. */
    int init;      /* enum cm_init_kind */
    int64_t fan_in, fan_out;
    float init_scale; /* CM_INIT_UNIFORM's bound. */
    int dim;          /* A table: floats per row. Dense: 0. */
    int table;        /* A table: its index among the model's tables. */
} cm_var;

typedef struct cm_model {
    char kind[16]; /* "mlp", "vector", "deepfm", "lr", or what a PS was sent */
    int nsizes;    /* mlp: layer widths, input first: 784,256,128,10.
                    * deepfm: the hidden layers' widths (may be 0). */
    int sizes[CM_MLP_MAX_SIZES];
    int nvars;
    cm_var *vars;
    size_t numel;  /* Dense parameters (the flat vector's length). */
    int ntables;
    int *table_var;   /* ntables: table t is vars[table_var[t]]. */
    int nfields;      /* Sparse inputs per example (0: none). */
    int *field_table; /* nfields: the table field f reads. */
    int emb_dim;      /* deepfm: the embedding width k (rows hold k + 1:
                       * the first-order weight, then the k factors). */
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

/* Click-through-rate models over 'nfields' categorical inputs, one table
 * per field ("field<f>", read by field f). */
typedef struct cm_ctr_spec {
    int nfields;          /* >= 1 */
    int emb_dim;          /* deepfm: k >= 1 (rows hold k + 1 floats). */
    int nhidden;          /* deepfm: hidden layers of the DNN part (>= 0). */
    int hidden[CM_MLP_MAX_SIZES];
    float emb_init_scale; /* Rows start U(-s, s) (0 = 0.01). */
} cm_ctr_spec;

/* DeepFM (Guo et al. 2017): tables "field<f>" of dim k + 1 (column 0 the
 * first-order weight, columns 1..k the factors), then dense "fm/bias" [1],
 * "dnn<i>/kernel" [in, out] and "dnn<i>/bias" [out] for the hidden layers
 * (in = nfields * k for the first) and the output layer (out 1). */
int cm_model_create_deepfm(const cm_ctr_spec *spec, cm_model **out);

/* Logistic regression on the same inputs: tables "field<f>" of dim 1
 * (U(-s, s)), dense "lr/bias" [1]. */
int cm_model_create_lr(const cm_ctr_spec *spec, cm_model **out);

/* A model from a variable list (what a PS learns from the chief's
 * Initialize): names must be distinct and non-empty, dense shapes positive,
 * tables of dim >= 1; offsets, numel, table indices and the table list are
 * computed here (fields are the worker's business and stay empty). Returns
 * CM_EINVAL naming the fault in err. */
int cm_model_create_from_vars(const char *kind, const cm_var *vars, int nvars, cm_model **out,
                              char *err, size_t errlen);

/* Parse "784,256,128,10" into sizes; returns the count or CM_EINVAL. */
int cm_parse_sizes(const char *s, int *sizes, int max);

/* A stable 64-bit fingerprint of the kind, names, kinds, shapes, table dims
 * and initialisers. */
uint64_t cm_model_fingerprint(const cm_model *m);

/* Index of the variable called 'name', or -1. */
int cm_model_find(const cm_model *m, const char *name);

/* Initial values of elements [start, start + count) of 'v' (row-major) into
 * out[0 .. count). A pure function of (seed, v->name, element index). */
void cm_var_init(const cm_var *v, uint64_t seed, size_t start, size_t count, float *out);

/* All dense variables into params[0 .. m->numel). */
void cm_model_init(const cm_model *m, uint64_t seed, float *params);

/* The initial values of row 'id' of table variable 'v' into out[0 ..
 * v->dim): a pure function of (seed, v->name, id). */
void cm_row_init(const cm_var *v, uint64_t seed, uint64_t id, float *out);

/* The largest row dim of the model's tables (0 without tables). */
int cm_model_max_dim(const cm_model *m);

#endif /* CM_MODEL_H */
