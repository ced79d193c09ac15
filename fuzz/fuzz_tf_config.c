/* fuzz_tf_config.c - TF_CONFIG (common/cm_cluster.c): the JSON parser and
 * validation, then the flag overrides on what it gave.
 * SPDX-License-Identifier: MIT
 *
 * The input up to its first NUL byte is the JSON document. After a NUL,
 * the next byte picks a task type (mod 4) and the rest is a --ps/--worker
 * style "h:p,h:p" list for cm_cluster_set_list, applied to the parsed
 * cluster (or to an empty one when the JSON was refused). Checked: a
 * cluster that parsed validates, and its ranks and addresses agree.
 */
#include <stdlib.h>
#include <string.h>

#include "common/cm_cluster.h"
#include "common/cm_status.h"
#include "fuzz/fz_util.h"


FZ_INITIALIZE_LOGS_ONLY

static void check(const cm_cluster *c) {
    char err[512];
    if (cm_cluster_validate(c, err, sizeof err) != CM_OK) return;
    int n = cm_cluster_num_trainers(c), rank = cm_cluster_rank(c);
    if (rank >= n) abort();
    for (int r = 0; r < n; r++)
        if (!cm_cluster_trainer_addr(c, r)) abort();
    if (cm_cluster_trainer_addr(c, n) || cm_cluster_trainer_addr(c, -1)) abort();
    const char *self = cm_cluster_self(c);
    if (rank >= 0 && (!self || strcmp(self, cm_cluster_trainer_addr(c, rank)) != 0)) abort();
    (void)cm_cluster_is_chief(c);
    (void)cm_task_type_name(c->task_type);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const uint8_t *nul = memchr(data, 0, size);
    size_t jlen = nul ? (size_t)(nul - data) : size;
    char *json = malloc(jlen + 1);
    memcpy(json, data, jlen);
    json[jlen] = 0;
    cm_cluster *c = NULL;
    char err[512];
    int rc = cm_cluster_parse(json, &c, err, sizeof err);
    free(json);
    if (rc == CM_OK) {
        if (!c || cm_cluster_validate(c, err, sizeof err) != CM_OK) abort();
        check(c);
    } else if (c || !err[0]) {
        abort();
    }
    if (nul && size - jlen >= 2) {
        if (!c) c = cm_cluster_create();
        size_t clen = size - jlen - 2;
        char *csv = malloc(clen + 1);
        memcpy(csv, nul + 2, clen);
        csv[clen] = 0;
        if (cm_cluster_set_list(c, nul[1] % 4, csv, err, sizeof err) == CM_OK) check(c);
        free(csv);
    }
    cm_cluster_destroy(c);
    return 0;
}
