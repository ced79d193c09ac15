/* wk_ctr.c - placeholder: being written. */
#include "worker/model/wk_ctr.h"

#include "common/cm_status.h"

static int ctr_create(const cm_model *model, wk_device *dev, int max_batch, wk_model **out) {
    (void)model;
    (void)dev;
    (void)max_batch;
    *out = NULL;
    return CM_EUNSUPPORTED;
}

const wk_model_ops wk_ctr_ops = {.name = "ctr", .create = ctr_create};
