/* ctr_planted.h - click-through data in the Criteo format from a planted factorization machine.
 * SPDX-License-Identifier: MIT
 *
 * No CTR data ships with Debian, so ctrgen writes files in exactly the
 * Criteo format (wk_criteo.h) from a model whose true click probability
 * is known, which gives the Bayes-optimal AUC and logloss to measure a
 * trained model against. This library is that model, the generation loop
 * and the metadata, so that tests can recount what ctrgen reports.
 *
 * The data. 13 integer fields I1..I13: floor(exp(N(mu_i, sigma_i^2))) - 1,
 * missing at a per-field rate (some never), and -1 or -2 at rate
 * int_negative in I2 and I10 (as Criteo's I2 has negatives). 26
 * categorical fields C1..C26: field j (0-based) has a vocabulary of V_j
 * ranks, log-spaced from vocab_min (j = 0) to vocab_max (j = 25), and
 * draws rank r ~ Zipf(s_j) on [0, V_j) (P(r) proportional to (r + 1)^-s_j,
 * by rejection-inversion), written as the 8 hex digits of perm_j(r): a
 * keyed bijection of 32-bit values (a Feistel network keyed by (seed, j)),
 * so distinct ranks never collide and the rank of any value can be
 * recovered. The exponents s_j spread over [zipf_min, zipf_max] in an
 * order unrelated to the vocabulary size; missing at per-field rates up to
 * cat_missing (some never). Every row is a pure function of (seed, split,
 * row index).
 *
 * The model is defined on the row ids the Criteo reader makes of the text
 * (wk_criteo_int_id / wk_criteo_cat_id), exactly what a model sees. For
 * every (field f, id): a first-order weight w = sigma_w * g * z_0 and
 * factors u = sigma_v * g * (z_1 .. z_k), z ~ N(0, 1) drawn from a counter
 * keyed by (seed, f, id): no tables, so vocabularies of millions cost
 * nothing. g is 1 for integer fields and missing values; for a
 * categorical id of rank r it is (1 + r / rank_scale)^-tail_decay, so the
 * long tail exists but carries little of the signal (rare ids could not
 * be learnt from the data anyway). A missing value is id 0 of its table
 * and has its own weights (g = 1), as a model learns a row for it. Then
 *   logit = b0 + sum_f w_f + sum_{f<g} <u_f, u_g>   (a factorization machine)
 *   label ~ Bernoulli(sigmoid(logit)),
 * with b0 solved (on 20,000 calibration rows of their own stream) for a
 * positive rate of pos_rate.
 *
 * The defaults (ctr_knobs_default, to be retuned once DeepFM trains) give
 * on seed 1's 200,000 test rows: Bayes AUC 0.801, logloss 0.442, the
 * first-order logit alone AUC 0.751, positive rate 0.248 (seeds 2-4: Bayes
 * 0.801-0.812, first-order 0.733-0.750). sigma_w sets the first-order
 * AUC, sigma_v the gap the interactions add. first_order_auc is only a
 * hint of what a linear model reaches: a linear model can also absorb the
 * part of the pairwise term that is additive on average.
 */
#ifndef CTR_PLANTED_H
#define CTR_PLANTED_H
#include <stddef.h>
#include <stdint.h>

#include "worker/input/wk_criteo.h"

/* Bumped whenever the data or the model a set of knobs gives changes, so
 * that make-ctr-data does not reuse data made by an older generator. */
#define CTR_MODEL_VERSION 1
#define CTR_K_MAX 16

typedef struct ctr_knobs {
    uint64_t seed;          /* 1 */
    uint64_t train_rows;    /* 2,000,000 */
    uint64_t test_rows;     /* 200,000 */
    double vocab_min;       /* 4: C1's vocabulary */
    double vocab_max;       /* 3,000,000: C26's (log-spaced between; < 2^32) */
    double zipf_min;        /* 1.05 */
    double zipf_max;        /* 1.3 */
    double cat_missing;     /* 0.04: the highest missing rate of a C field */
    double int_missing;     /* 0.1: I fields miss at 0, 0.5, 1, 1.5 or 2 times this */
    double int_negative;    /* 0.02: rate of -1/-2 in I2 and I10 */
    int k;                  /* 4: factors per feature (k_true, 1..CTR_K_MAX) */
    double sigma_w;         /* 0.23: first-order weights' scale */
    double sigma_v;         /* 0.14: factors' scale */
    double rank_scale;      /* 30: ranks below this keep most of their weight */
    double tail_decay;      /* 1.0: the exponent of g over the ranks above */
    double pos_rate;        /* 0.25: b0 is solved for this */
} ctr_knobs;

/* The documented defaults (what ctrgen uses without flags). */
void ctr_knobs_default(ctr_knobs *k);

typedef struct ctr_planted ctr_planted;

/* The model of these knobs (copied), b0 solved. CM_EINVAL naming the bad
 * knob. Release with ctr_planted_destroy() (NULL is a no-op). */
int ctr_planted_create(const ctr_knobs *k, ctr_planted **out, char *err, size_t errlen);
void ctr_planted_destroy(ctr_planted *m);

const ctr_knobs *ctr_planted_knobs(const ctr_planted *m);
double ctr_planted_b0(const ctr_planted *m);

/* Field layout. Categorical field j = 0..25 (C<j+1>): */
uint64_t ctr_planted_vocab(const ctr_planted *m, int j);
double ctr_planted_zipf_exponent(const ctr_planted *m, int j);
double ctr_planted_cat_missing(const ctr_planted *m, int j);
/* Integer field i = 0..12 (I<i+1>): */
double ctr_planted_int_mu(const ctr_planted *m, int i);
double ctr_planted_int_sigma(const ctr_planted *m, int i);
double ctr_planted_int_missing(const ctr_planted *m, int i);
int ctr_planted_int_has_negatives(int i);

/* The true logit of an example given its ids (WK_CRITEO_NFIELDS, as the
 * reader returns them); *first_order (may be NULL) gets the logit without
 * the pairwise term. A pure function of the knobs and the ids. */
double ctr_planted_logit(const ctr_planted *m, const uint64_t *ids, double *first_order);

/* The rank behind categorical field j's value x (perm_j^-1), and its
 * value: the text of rank r is the 8 hex digits of ctr_planted_value(). */
uint32_t ctr_planted_value(const ctr_planted *m, int j, uint32_t rank);
uint32_t ctr_planted_rank(const ctr_planted *m, int j, uint32_t value);

/* One generated example. */
typedef struct ctr_example {
    int32_t label;
    uint64_t missing;                  /* Bit f: field f is empty. */
    int64_t ints[WK_CRITEO_NINT];
    uint32_t cats[WK_CRITEO_NCAT];     /* Values (perm_j of the rank). */
    uint64_t ids[WK_CRITEO_NFIELDS];   /* What the reader will make of them. */
    double logit, first_order;
} ctr_example;

enum { CTR_SPLIT_TRAIN = 0, CTR_SPLIT_TEST = 1, CTR_SPLIT_CALIBRATION = 2 };

/* Row 'row' of a split: a pure function of (seed, split, row). */
void ctr_planted_example(const ctr_planted *m, int split, uint64_t row, ctr_example *ex);

/* The example's line in the Criteo format, with its '\n', into buf (at
 * least CTR_LINE_MAX bytes). Returns its length. */
#define CTR_LINE_MAX 1024
size_t ctr_format_line(const ctr_example *ex, char *buf);

/* A Zipf sampler on ranks [0, n): P(r) proportional to (r + 1)^-s, s > 0,
 * by rejection-inversion (Hoermann and Derflinger 1996, as Apache Commons
 * RNG): O(1) expected time, no tables. */
typedef struct ctr_zipf {
    uint64_t n;
    double s, h_x1, h_n, cut;
} ctr_zipf;
void ctr_zipf_init(ctr_zipf *z, uint64_t n, double s);
/* Draws from stream 'key' at counters *counter, *counter + 1, ...
 * (advanced by the uniforms used). */
uint64_t ctr_zipf_draw(const ctr_zipf *z, uint64_t key, uint64_t *counter);

/* What generation measured (also in meta.json). */
typedef struct ctr_summary {
    uint64_t train_positives, test_positives;
    double bayes_auc, bayes_logloss, first_order_auc;
    uint64_t train_bytes, test_bytes;
} ctr_summary;

/* Told every 100,000 rows and at the end of each split. */
typedef void (*ctr_progress_fn)(void *ud, const char *split, uint64_t done, uint64_t total);

/* Write dir/train.txt, dir/test.txt and dir/meta.json (dir and its parents
 * are created). Each file is written under a temporary name
 * (.NAME.PID.tmp), flushed to disk and renamed; an old meta.json goes
 * first and the new one comes last, so a directory with a meta.json holds
 * a complete data set of those knobs. Temporary files of generators that
 * died are removed first. progress may be NULL; sum may be NULL. CM_EIO
 * naming the file. */
int ctr_generate(const ctr_planted *m, const char *dir, ctr_progress_fn progress, void *ud,
                 ctr_summary *sum, char *err, size_t errlen);

/* 1 if dir/meta.json exists and was written for exactly these knobs (and
 * this CTR_MODEL_VERSION), else 0. */
int ctr_meta_matches(const char *dir, const ctr_knobs *k);

#endif /* CTR_PLANTED_H */
