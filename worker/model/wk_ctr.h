/* wk_ctr.h - click-through-rate models: DeepFM and logistic regression.
 * SPDX-License-Identifier: MIT
 *
 * Both read one embedding row per field of an example (cm_model's tables,
 * "field<f>"), through the batch's rows and row map (wk_dev_batch.inv).
 *
 * DeepFM (Guo et al. 2017), rows of k + 1 floats: w = column 0 (first
 * order), v = columns 1..k (factors), shared by the FM and the DNN:
 *   logit = fm/bias + sum_f w_f + FM(v) + DNN(v_1 .. v_F)
 *   FM(v) = 0.5 * sum_j [ (sum_f v_fj)^2 - sum_f v_fj^2 ]
 *   DNN   = the hidden layers dnn<i> (ReLU) on the concatenated factors
 *           (n x F*k), then dnn<L> to one output (no activation).
 * Logistic regression, rows of 1 float: logit = lr/bias + sum_f w_f.
 * Loss: logloss of sigmoid(logit) against the 0/1 label, averaged over the
 * batch; the row gradients are summed over the positions that read a row.
 * The gradient hook is honoured by whole dense variables (splits are
 * ignored): need() for every one before the forward pass reads any,
 * ready() for every one once the gradient is complete; NULL is fine.
 * Runs on any wk_device (CPU, staged, CUDA); create() returns CM_EINVAL
 * for a model whose kind is not "deepfm" or "lr" or whose variables are
 * not laid out as cm_model_create_deepfm/lr lay them out.
 */
#ifndef WK_CTR_H
#define WK_CTR_H

#include "worker/model/wk_model.h"

extern const wk_model_ops wk_ctr_ops;

#endif /* WK_CTR_H */
