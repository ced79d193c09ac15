/* cm_auc.h - ranking and probability metrics of binary classifiers: ROC AUC, logloss.
 * SPDX-License-Identifier: MIT
 *
 * What click models are evaluated by (and what the CTR data generator
 * reports as the Bayes optimum), so one implementation serves both.
 */
#ifndef CM_AUC_H
#define CM_AUC_H
#include <stddef.h>
#include <stdint.h>

/* Area under the ROC curve of scores against labels (0 = negative, any
 * other value = positive): the probability that a random positive scores
 * above a random negative, ties counted half (the Mann-Whitney U statistic
 * over P * N). O(n log n); allocates its scratch (aborts on out of memory,
 * as cm_malloc). NaN when n == 0 or all labels are equal. Scores compare
 * as numbers (-0 ties +0); NaN scores sort above +inf, tied with each
 * other. */
double cm_auc(const float *scores, const int32_t *labels, size_t n);

/* Mean logloss -[y log p + (1 - y) log(1 - p)] of probabilities of label 1,
 * each clipped to [1e-7, 1 - 1e-7] first (a NaN counts as 0.5). NaN when
 * n == 0. */
double cm_logloss(const float *probs, const int32_t *labels, size_t n);

#endif /* CM_AUC_H */
