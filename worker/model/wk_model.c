/* wk_model.c - the model kinds the trainer knows.
 * SPDX-License-Identifier: MIT
 */
#include "worker/model/wk_model.h"

#include <string.h>

#include "worker/model/wk_ctr.h"
#include "worker/model/wk_mlp.h"

const wk_model_ops *wk_model_ops_for(const cm_model *model) {
    if (!strcmp(model->kind, "mlp")) return &wk_mlp_ops;
    if (!strcmp(model->kind, "deepfm") || !strcmp(model->kind, "lr")) return &wk_ctr_ops;
    return NULL;
}
