/* ctrgen.c - writes click-through data in the Criteo format from a planted model (CLI).
 * SPDX-License-Identifier: MIT
 *
 * A thin command line over tools/ctr_planted.h, which holds the model, the
 * generation loop and the metadata. scripts/make-ctr-data runs it with
 * --reuse and a cache directory.
 */
#include <errno.h>
#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cm_status.h"
#include "tools/ctr_planted.h"

static void usage(FILE *f, const ctr_knobs *d) {
    fprintf(f,
            "usage: ctrgen --out DIR [options]\n"
            "Writes DIR/train.txt, DIR/test.txt (the Criteo format: label, 13 integer and 26\n"
            "categorical features, tab-separated) and DIR/meta.json from a planted\n"
            "factorization machine whose true click probability is known (meta.json: the\n"
            "Bayes AUC and logloss on the test set). Same options, same bytes.\n"
            "\n"
            "  --out DIR           where to write (created)\n"
            "  --reuse             nothing to do if DIR/meta.json has these knobs\n"
            "  --seed N            (%llu)\n"
            "  --train-rows N      (%llu)\n"
            "  --test-rows N       (%llu)\n"
            "Data:\n"
            "  --vocab-min X       C1's vocabulary, log-spaced up to C26's (%g)\n"
            "  --vocab-max X       (%g)\n"
            "  --zipf-min S        Zipf exponents of the C fields, spread over [min, max] (%g)\n"
            "  --zipf-max S        (%g)\n"
            "  --cat-missing P     the highest missing rate of a C field (%g)\n"
            "  --int-missing P     I fields miss at 0, 0.5, 1, 1.5 or 2 times this (%g)\n"
            "  --int-negative P    rate of -1/-2 in I2 and I10 (%g)\n"
            "Model: logit = b0 + sum_f w_f + sum_{f<g} <u_f, u_g>, per (field, id):\n"
            "  --k K               factors per feature (%d)\n"
            "  --sigma-w X         w ~ N(0, (sigma_w g)^2) (%g)\n"
            "  --sigma-v X         u ~ N(0, (sigma_v g)^2 I) (%g)\n"
            "  --rank-scale R      g = (1 + rank / R)^-D for C values, else 1 (%g)\n"
            "  --tail-decay D      (%g)\n"
            "  --pos-rate P        b0 is solved for this positive rate (%g)\n"
            "  --help\n",
            (unsigned long long)d->seed, (unsigned long long)d->train_rows,
            (unsigned long long)d->test_rows, d->vocab_min, d->vocab_max, d->zipf_min,
            d->zipf_max, d->cat_missing, d->int_missing, d->int_negative, d->k, d->sigma_w,
            d->sigma_v, d->rank_scale, d->tail_decay, d->pos_rate);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct progress_state {
    double t0;
} progress_state;

static void progress(void *ud, const char *split, uint64_t done, uint64_t total) {
    progress_state *p = ud;
    fprintf(stderr, "ctrgen: %s: %llu / %llu rows (%.0f%%), %.1f s\n", split,
            (unsigned long long)done, (unsigned long long)total,
            total ? 100.0 * (double)done / (double)total : 100.0, now_s() - p->t0);
}

static int parse_u64(const char *opt, const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') {
        fprintf(stderr, "ctrgen: %s: '%s' is not a non-negative integer\n", opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_double(const char *opt, const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end) {
        fprintf(stderr, "ctrgen: %s: '%s' is not a number\n", opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

int main(int argc, char **argv) {
    ctr_knobs k, defaults;
    ctr_knobs_default(&k);
    defaults = k;
    const char *out = NULL;
    int reuse = 0;
    enum { O_OUT = 256, O_REUSE, O_SEED, O_TRAIN, O_TEST, O_K };
    /* Options that set a double knob: their index in this table is their
     * code minus O_DOUBLE. */
    enum { O_DOUBLE = 512 };
    static const struct {
        const char *name;
        size_t offset;
    } dbl[] = {{"vocab-min", offsetof(ctr_knobs, vocab_min)},
               {"vocab-max", offsetof(ctr_knobs, vocab_max)},
               {"zipf-min", offsetof(ctr_knobs, zipf_min)},
               {"zipf-max", offsetof(ctr_knobs, zipf_max)},
               {"cat-missing", offsetof(ctr_knobs, cat_missing)},
               {"int-missing", offsetof(ctr_knobs, int_missing)},
               {"int-negative", offsetof(ctr_knobs, int_negative)},
               {"sigma-w", offsetof(ctr_knobs, sigma_w)},
               {"sigma-v", offsetof(ctr_knobs, sigma_v)},
               {"rank-scale", offsetof(ctr_knobs, rank_scale)},
               {"tail-decay", offsetof(ctr_knobs, tail_decay)},
               {"pos-rate", offsetof(ctr_knobs, pos_rate)}};
    enum { NDBL = sizeof dbl / sizeof dbl[0] };
    struct option opts[7 + NDBL + 1] = {{"out", required_argument, NULL, O_OUT},
                                        {"reuse", no_argument, NULL, O_REUSE},
                                        {"seed", required_argument, NULL, O_SEED},
                                        {"train-rows", required_argument, NULL, O_TRAIN},
                                        {"test-rows", required_argument, NULL, O_TEST},
                                        {"k", required_argument, NULL, O_K},
                                        {"help", no_argument, NULL, 'h'}};
    for (int i = 0; i < NDBL; i++)
        opts[7 + i] = (struct option){dbl[i].name, required_argument, NULL, O_DOUBLE + i};
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        uint64_t u;
        char name[40];
        switch (c) {
        case 'h':
            usage(stdout, &defaults);
            return 0;
        case O_OUT: out = optarg; break;
        case O_REUSE: reuse = 1; break;
        case O_SEED:
            if (parse_u64("--seed", optarg, &k.seed)) return 2;
            break;
        case O_TRAIN:
            if (parse_u64("--train-rows", optarg, &k.train_rows)) return 2;
            break;
        case O_TEST:
            if (parse_u64("--test-rows", optarg, &k.test_rows)) return 2;
            break;
        case O_K:
            if (parse_u64("--k", optarg, &u)) return 2;
            k.k = u > 1000 ? 1000 : (int)u; /* range-checked with the other knobs */
            break;
        default:
            if (c < O_DOUBLE || c >= O_DOUBLE + NDBL) {
                fprintf(stderr, "ctrgen: see --help\n");
                return 2;
            }
            snprintf(name, sizeof name, "--%s", dbl[c - O_DOUBLE].name);
            if (parse_double(name, optarg, (double *)((char *)&k + dbl[c - O_DOUBLE].offset)))
                return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "ctrgen: unexpected argument '%s' (see --help)\n", argv[optind]);
        return 2;
    }
    if (!out) {
        fprintf(stderr, "ctrgen: --out DIR is required (see --help)\n");
        return 2;
    }
    if (reuse && ctr_meta_matches(out, &k)) {
        fprintf(stderr, "ctrgen: %s already holds this data set (meta.json matches): reused\n",
                out);
        return 0;
    }

    char err[512];
    progress_state ps = {now_s()};
    ctr_planted *m = NULL;
    if (ctr_planted_create(&k, &m, err, sizeof err) != CM_OK) {
        fprintf(stderr, "ctrgen: %s\n", err);
        return 2;
    }
    fprintf(stderr, "ctrgen: writing %llu train + %llu test rows to %s (b0 = %.4f)\n",
            (unsigned long long)k.train_rows, (unsigned long long)k.test_rows, out,
            ctr_planted_b0(m));
    ctr_summary s;
    int rc = ctr_generate(m, out, progress, &ps, &s, err, sizeof err);
    ctr_planted_destroy(m);
    if (rc != CM_OK) {
        fprintf(stderr, "ctrgen: %s\n", err);
        return 1;
    }
    fprintf(stderr,
            "ctrgen: done in %.1f s: train %llu bytes, positive rate %.4f; test %llu bytes, "
            "positive rate %.4f; bayes_auc %.4f, bayes_logloss %.4f, first_order_auc %.4f\n",
            now_s() - ps.t0, (unsigned long long)s.train_bytes,
            k.train_rows ? (double)s.train_positives / (double)k.train_rows : 0.0,
            (unsigned long long)s.test_bytes,
            k.test_rows ? (double)s.test_positives / (double)k.test_rows : 0.0, s.bayes_auc,
            s.bayes_logloss, s.first_order_auc);
    return 0;
}
