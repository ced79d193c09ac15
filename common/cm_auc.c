/* cm_auc.c - ROC AUC (Mann-Whitney U with ties counted half) and logloss.
 * SPDX-License-Identifier: MIT
 *
 * AUC: sort (score, label) pairs by score, then walk the groups of equal
 * scores. A positive beats every negative of a lower group and ties with
 * the negatives of its own group, so 2U = sum over groups of
 * pos_g * (2 * neg_below + neg_g): an exact integer (uint64 holds it for
 * any n < 2^32), divided once at the end; no float sums of ranks whose
 * rounding would depend on n.
 */
#include "common/cm_auc.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"

typedef struct auc_item {
    uint32_t key; /* Orders as the score does (see score_key). */
    uint32_t pos; /* 1 for a positive. */
} auc_item;

/* An unsigned key that sorts as the float does: negative floats have
 * their bits flipped, the others their sign bit set. -0 becomes +0 first
 * (so they tie) and every NaN one key above +inf (so NaNs tie). */
static uint32_t score_key(float s) {
    if (isnan(s)) return 0xff800001u;
    if (s == 0.0f) s = 0.0f;
    uint32_t b;
    memcpy(&b, &s, sizeof b);
    return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}

static int cmp_item(const void *a, const void *b) {
    uint32_t x = ((const auc_item *)a)->key, y = ((const auc_item *)b)->key;
    return (x > y) - (x < y);
}

double cm_auc(const float *scores, const int32_t *labels, size_t n) {
    if (n == 0) return NAN;
    auc_item *it = cm_malloc(n * sizeof *it);
    uint64_t npos = 0;
    for (size_t i = 0; i < n; i++) {
        it[i].key = score_key(scores[i]);
        it[i].pos = labels[i] != 0;
        npos += it[i].pos;
    }
    uint64_t nneg = n - npos;
    if (npos == 0 || nneg == 0) {
        free(it);
        return NAN;
    }
    qsort(it, n, sizeof *it, cmp_item);
    uint64_t twice_u = 0, neg_below = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        uint64_t pos_g = 0;
        while (j < n && it[j].key == it[i].key) pos_g += it[j++].pos;
        uint64_t neg_g = (j - i) - pos_g;
        twice_u += pos_g * (2 * neg_below + neg_g);
        neg_below += neg_g;
        i = j;
    }
    free(it);
    return (double)twice_u / (2.0 * (double)npos * (double)nneg);
}

double cm_logloss(const float *probs, const int32_t *labels, size_t n) {
    if (n == 0) return NAN;
    const double lo = 1e-7, hi = 1.0 - 1e-7;
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        double p = isnan(probs[i]) ? 0.5 : probs[i];
        p = p < lo ? lo : p > hi ? hi : p;
        sum -= labels[i] != 0 ? log(p) : log1p(-p);
    }
    return sum / (double)n;
}
