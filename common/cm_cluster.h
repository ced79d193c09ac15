/* cm_cluster.h - the cluster spec: TF_CONFIG as TensorFlow and Kubeflow's
 * TFJob write it, plus command-line overrides.
 * SPDX-License-Identifier: MIT
 *
 *   {"cluster": {"chief": ["h:p"], "worker": ["h:p", ...], "ps": ["h:p", ...],
 *                "evaluator": ["h:p"]},
 *    "task": {"type": "worker", "index": 0},
 *    "environment": "cloud"}
 *
 * Task types: chief (alias "master", TF1 / TFJob), worker, ps, evaluator.
 * The evaluator may be absent from "cluster" (TensorFlow leaves it out).
 * Training ranks: the chief, if there is one, is rank 0 and worker i is rank
 * i + 1; without a chief, worker i is rank i and worker 0 is the chief. A
 * cm_cluster is immutable once validated and may be shared across threads.
 */
#ifndef CM_CLUSTER_H
#define CM_CLUSTER_H
#include <stddef.h>

enum cm_task_type {
    CM_TASK_CHIEF = 0,
    CM_TASK_WORKER = 1,
    CM_TASK_PS = 2,
    CM_TASK_EVALUATOR = 3,
    CM_TASK_NTYPES = 4
};

typedef struct cm_cluster {
    int n[CM_TASK_NTYPES];       /* Addresses per task type. */
    char **addrs[CM_TASK_NTYPES]; /* "host:port" strings, owned. */
    int task_type;                /* enum cm_task_type, or -1 if unset. */
    int task_index;               /* -1 if unset. */
    char environment[32];         /* "" if absent. */
} cm_cluster;

/* An empty cluster (no addresses, task unset). Never fails. */
cm_cluster *cm_cluster_create(void);
void cm_cluster_destroy(cm_cluster *c);

/* Parse a TF_CONFIG JSON document into a new cluster and validate it.
 * Returns CM_OK, or CM_EINVAL with a one-line message in err (malformed
 * JSON with line/column, a missing "task", a task type not in the cluster,
 * an index out of range, an address that is not host:port, the same address
 * twice, more than one chief). *out is NULL on error. */
int cm_cluster_parse(const char *json, cm_cluster **out, char *err, size_t errlen);

/* Like cm_cluster_parse on the environment variable TF_CONFIG. Returns
 * CM_ENOTFOUND (and an empty cluster in *out) when TF_CONFIG is unset or
 * empty, so flags can fill it in. */
int cm_cluster_from_env(cm_cluster **out, char *err, size_t errlen);

/* Overrides from flags. set_list replaces the list of 'type' with the
 * comma-separated "h:p,h:p" (an empty string empties it); set_task sets the
 * task. Both return CM_EINVAL (with err) on bad input. Call
 * cm_cluster_validate afterwards. */
int cm_cluster_set_list(cm_cluster *c, int type, const char *csv, char *err, size_t errlen);
void cm_cluster_set_task(cm_cluster *c, int type, int index);

/* Check everything cm_cluster_parse checks. */
int cm_cluster_validate(const cm_cluster *c, char *err, size_t errlen);

/* "chief", "worker", "ps", "evaluator" <-> enum; -1 if unknown ("master"
 * maps to CM_TASK_CHIEF). */
int cm_task_type_parse(const char *name);
const char *cm_task_type_name(int type);

/* Number of training processes: chiefs + workers. */
int cm_cluster_num_trainers(const cm_cluster *c);

/* This task's training rank (see above), or -1 for ps and evaluator. */
int cm_cluster_rank(const cm_cluster *c);

/* 1 if this task is the chief (the chief task, or worker 0 without one). */
int cm_cluster_is_chief(const cm_cluster *c);

/* This task's own address, or NULL if it has none (an evaluator absent from
 * the cluster). */
const char *cm_cluster_self(const cm_cluster *c);

/* The address of training rank r (0 <= r < num_trainers). */
const char *cm_cluster_trainer_addr(const cm_cluster *c, int r);

#endif /* CM_CLUSTER_H */
