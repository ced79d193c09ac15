/* cm_cluster.c - TF_CONFIG parsing, flag overrides and cluster validation.
 * SPDX-License-Identifier: MIT
 *
 * The JSON is read with jansson and converted once into a plain cm_cluster;
 * nothing else in the project sees jansson types. Every check lives in
 * cm_cluster_validate() so that a cluster built from flags is held to the
 * same rules as one read from TF_CONFIG. All messages start with
 * "TF_CONFIG: " so that an operator can tell where the problem came from.
 */
#include "common/cm_cluster.h"

#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_addr.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"

#define PREFIX "TF_CONFIG: "

/* The JSON keys of the cluster lists, indexed by enum cm_task_type. The
 * alias "master" is handled separately. */
static const char *const type_names[CM_TASK_NTYPES] = {"chief", "worker", "ps", "evaluator"};

/* ===== Task types ===== */

int cm_task_type_parse(const char *name) {
    if (!name) return -1;
    for (int t = 0; t < CM_TASK_NTYPES; t++)
        if (!strcmp(name, type_names[t])) return t;
    /* TF1 and Kubeflow's TFJob call the chief "master". */
    if (!strcmp(name, "master")) return CM_TASK_CHIEF;
    return -1;
}

const char *cm_task_type_name(int type) {
    if (type < 0 || type >= CM_TASK_NTYPES) return "unknown";
    return type_names[type];
}

/* ===== Construction ===== */

cm_cluster *cm_cluster_create(void) {
    cm_cluster *c = cm_calloc(1, sizeof *c);
    c->task_type = -1;
    c->task_index = -1;
    return c;
}

static void free_list(char **addrs, int n) {
    if (!addrs) return;
    for (int i = 0; i < n; i++) free(addrs[i]);
    free(addrs);
}

void cm_cluster_destroy(cm_cluster *c) {
    if (!c) return;
    for (int t = 0; t < CM_TASK_NTYPES; t++) free_list(c->addrs[t], c->n[t]);
    free(c);
}

/* ===== Address syntax ===== */

/* Checks that 'addr' is host:port as cm_addr_split takes it, with a port in
 * 1..65535. Returns NULL if it is, otherwise a short reason for the message. */
static const char *address_problem(const char *addr) {
    return cm_addr_split(addr, 1, NULL, 0, NULL);
}

/* ===== Flag overrides ===== */

int cm_cluster_set_list(cm_cluster *c, int type, const char *csv, char *err, size_t errlen) {
    char **addrs = NULL;
    int n = 0;
    if (!c || type < 0 || type >= CM_TASK_NTYPES || !csv) {
        cm_seterr(err, errlen, PREFIX "bad arguments to cm_cluster_set_list");
        goto fail;
    }
    /* Count the entries first: one more than the number of commas, or none
     * for the empty string. */
    int cap = 0;
    if (*csv) {
        cap = 1;
        for (const char *p = csv; *p; p++)
            if (*p == ',') cap++;
    }
    addrs = cap ? cm_calloc((size_t)cap, sizeof *addrs) : NULL;
    for (const char *p = csv; cap > 0;) {
        const char *end = strchr(p, ',');
        if (!end) end = p + strlen(p);
        /* Spaces around an entry ("a:1, b:2") are forgiven. */
        const char *b = p, *e = end;
        while (b < e && *b == ' ') b++;
        while (e > b && e[-1] == ' ') e--;
        if (b == e) {
            cm_seterr(err, errlen, PREFIX "empty address in the %s list \"%s\"",
                      type_names[type], csv);
            goto fail;
        }
        char *a = cm_malloc((size_t)(e - b) + 1);
        memcpy(a, b, (size_t)(e - b));
        a[e - b] = '\0';
        addrs[n++] = a;
        const char *why = address_problem(a);
        if (why) {
            cm_seterr(err, errlen, PREFIX "%s address \"%s\" is not host:port: %s",
                      type_names[type], a, why);
            goto fail;
        }
        if (*end == '\0') break;
        p = end + 1;
    }
    free_list(c->addrs[type], c->n[type]);
    c->addrs[type] = addrs;
    c->n[type] = n;
    return CM_OK;
fail:
    /* The cluster is unchanged on error. */
    free_list(addrs, n);
    return CM_EINVAL;
}

void cm_cluster_set_task(cm_cluster *c, int type, int index) {
    c->task_type = type;
    c->task_index = index;
}

/* ===== Validation ===== */

int cm_cluster_validate(const cm_cluster *c, char *err, size_t errlen) {
    if (!c) {
        cm_seterr(err, errlen, PREFIX "no cluster");
        goto fail;
    }
    if (c->n[CM_TASK_CHIEF] > 1) {
        cm_seterr(err, errlen,
                  PREFIX "the cluster has %d chief tasks (chief and master together); at most "
                         "one is allowed",
                  c->n[CM_TASK_CHIEF]);
        goto fail;
    }
    for (int t = 0; t < CM_TASK_NTYPES; t++) {
        for (int i = 0; i < c->n[t]; i++) {
            const char *why = address_problem(c->addrs[t][i]);
            if (why) {
                cm_seterr(err, errlen, PREFIX "%s:%d address \"%s\" is not host:port: %s",
                          type_names[t], i, c->addrs[t][i], why);
                goto fail;
            }
        }
    }
    /* Every address once across the whole cluster. Clusters are small, so a
     * quadratic scan is simpler than a hash set and fast enough. */
    for (int t = 0; t < CM_TASK_NTYPES; t++) {
        for (int i = 0; i < c->n[t]; i++) {
            for (int u = t; u < CM_TASK_NTYPES; u++) {
                for (int j = (u == t ? i + 1 : 0); j < c->n[u]; j++) {
                    if (strcmp(c->addrs[t][i], c->addrs[u][j]) != 0) continue;
                    cm_seterr(err, errlen, PREFIX "address \"%s\" is used by both %s:%d and %s:%d",
                              c->addrs[t][i], type_names[t], i, type_names[u], j);
                    goto fail;
                }
            }
        }
    }
    int type = c->task_type, index = c->task_index;
    if (type < 0 || type >= CM_TASK_NTYPES) {
        if (type == -1)
            cm_seterr(err, errlen, PREFIX "the task type is not set");
        else
            cm_seterr(err, errlen, PREFIX "unknown task type %d", type);
        goto fail;
    }
    if (index < 0) {
        cm_seterr(err, errlen, PREFIX "task %s:%d has a negative index", type_names[type], index);
        goto fail;
    }
    /* TensorFlow leaves the evaluator out of the cluster it trains with, so
     * an evaluator only has to be in range when evaluators are listed. */
    if (type == CM_TASK_EVALUATOR && c->n[type] == 0) return CM_OK;
    if (c->n[type] == 0) {
        cm_seterr(err, errlen, PREFIX "task %s:%d is not in the cluster: it has no %s tasks",
                  type_names[type], index, type_names[type]);
        goto fail;
    }
    if (index >= c->n[type]) {
        cm_seterr(err, errlen, PREFIX "task %s:%d is out of range: the cluster has %d %s tasks",
                  type_names[type], index, c->n[type], type_names[type]);
        goto fail;
    }
    return CM_OK;
fail:
    return CM_EINVAL;
}

/* ===== TF_CONFIG ===== */

/* Appends the JSON list 'list' (named 'key' in messages) to c's list of
 * 'type'. Returns CM_OK or CM_EINVAL with err set. */
static int append_list(cm_cluster *c, int type, const char *key, json_t *list, char *err,
                       size_t errlen);

/* The dynamic form, {"0": "host:port", "1": ...}: taken as the list when
 * its keys are exactly 0 .. n-1. TensorFlow also allows a sparse one
 * (only the tasks this one talks to), which cannot do here: the number of
 * workers sets the data split and every sync step. */
static int append_dict(cm_cluster *c, int type, const char *key, json_t *dict, char *err,
                       size_t errlen) {
    size_t n = json_object_size(dict);
    json_t *list = json_array();
    int rc = CM_OK;
    for (size_t i = 0; i < n && rc == CM_OK; i++) {
        char idx[24];
        snprintf(idx, sizeof idx, "%zu", i);
        json_t *v = json_object_get(dict, idx);
        if (!v) {
            cm_seterr(err, errlen,
                      PREFIX "cluster \"%s\" lists %zu task%s but not task %zu (a sparse "
                      "cluster): every task of the job must be listed, indices 0 to %zu, since "
                      "their number sets the data split and the sync steps",
                      key, n, n == 1 ? "" : "s", i, n ? n - 1 : 0);
            rc = CM_EINVAL;
        } else {
            json_array_append(list, v);
        }
    }
    if (rc == CM_OK) rc = append_list(c, type, key, list, err, errlen);
    json_decref(list);
    return rc;
}

static int append_list(cm_cluster *c, int type, const char *key, json_t *list, char *err,
                       size_t errlen) {
    if (json_is_object(list)) return append_dict(c, type, key, list, err, errlen);
    if (!json_is_array(list)) {
        cm_seterr(err, errlen, PREFIX "cluster \"%s\" is not a list of \"host:port\" strings",
                  key);
        goto fail;
    }
    size_t extra = json_array_size(list);
    if (extra > (size_t)(INT_MAX / 2) - (size_t)c->n[type]) {
        cm_seterr(err, errlen, PREFIX "cluster \"%s\" has too many entries", key);
        goto fail;
    }
    for (size_t i = 0; i < extra; i++) {
        if (!json_is_string(json_array_get(list, i))) {
            cm_seterr(err, errlen, PREFIX "cluster \"%s\" entry %zu is not a string", key, i);
            goto fail;
        }
    }
    if (extra == 0) return CM_OK;
    size_t total = (size_t)c->n[type] + extra;
    char **addrs = cm_calloc(total, sizeof *addrs);
    if (c->n[type] > 0) memcpy(addrs, c->addrs[type], (size_t)c->n[type] * sizeof *addrs);
    for (size_t i = 0; i < extra; i++)
        addrs[(size_t)c->n[type] + i] = cm_strdup(json_string_value(json_array_get(list, i)));
    free(c->addrs[type]);
    c->addrs[type] = addrs;
    c->n[type] = (int)total;
    return CM_OK;
fail:
    return CM_EINVAL;
}

/* Fills c's lists from the "cluster" object. Keys other than the task types
 * (and "master") are ignored, as TensorFlow ignores jobs it does not use. */
static int read_cluster(cm_cluster *c, json_t *cluster, char *err, size_t errlen) {
    if (!json_is_object(cluster)) {
        cm_seterr(err, errlen, PREFIX "\"cluster\" is %s", cluster ? "not an object" : "missing");
        goto fail;
    }
    /* Chief first, then master: both name the one chief, and validation
     * rejects a cluster that lists more than one. */
    static const char *const keys[] = {"chief", "master", "worker", "ps", "evaluator"};
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        json_t *list = json_object_get(cluster, keys[k]);
        if (!list) continue;
        if (append_list(c, cm_task_type_parse(keys[k]), keys[k], list, err, errlen) != CM_OK)
            goto fail;
    }
    return CM_OK;
fail:
    return CM_EINVAL;
}

/* Sets c's task from the "task" object. */
static int read_task(cm_cluster *c, json_t *task, char *err, size_t errlen) {
    if (!json_is_object(task)) {
        cm_seterr(err, errlen, PREFIX "\"task\" is %s", task ? "not an object" : "missing");
        goto fail;
    }
    json_t *type = json_object_get(task, "type");
    if (!json_is_string(type)) {
        cm_seterr(err, errlen, PREFIX "task \"type\" is %s", type ? "not a string" : "missing");
        goto fail;
    }
    int t = cm_task_type_parse(json_string_value(type));
    if (t < 0) {
        cm_seterr(err, errlen,
                  PREFIX "unknown task type \"%s\" (expected chief, master, worker, ps or "
                         "evaluator)",
                  json_string_value(type));
        goto fail;
    }
    /* TensorFlow always writes the index; a missing one is read as 0. */
    json_int_t index = 0;
    json_t *jindex = json_object_get(task, "index");
    if (jindex) {
        if (!json_is_integer(jindex)) {
            cm_seterr(err, errlen, PREFIX "task \"index\" is not an integer");
            goto fail;
        }
        index = json_integer_value(jindex);
    }
    if (index < INT_MIN || index > INT_MAX) {
        cm_seterr(err, errlen, PREFIX "task index %lld does not fit an int", (long long)index);
        goto fail;
    }
    cm_cluster_set_task(c, t, (int)index);
    return CM_OK;
fail:
    return CM_EINVAL;
}

int cm_cluster_parse(const char *json, cm_cluster **out, char *err, size_t errlen) {
    cm_cluster *c = NULL;
    json_t *root = NULL;
    json_error_t jerr;
    *out = NULL;
    if (!json) {
        cm_seterr(err, errlen, PREFIX "no document");
        goto fail;
    }
    root = json_loads(json, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        cm_seterr(err, errlen, PREFIX "malformed JSON at line %d, column %d: %s", jerr.line,
                  jerr.column, jerr.text);
        goto fail;
    }
    if (!json_is_object(root)) {
        cm_seterr(err, errlen, PREFIX "the document is not a JSON object");
        goto fail;
    }
    c = cm_cluster_create();
    if (read_cluster(c, json_object_get(root, "cluster"), err, errlen) != CM_OK) goto fail;
    if (read_task(c, json_object_get(root, "task"), err, errlen) != CM_OK) goto fail;
    json_t *env = json_object_get(root, "environment");
    if (env) {
        if (!json_is_string(env)) {
            cm_seterr(err, errlen, PREFIX "\"environment\" is not a string");
            goto fail;
        }
        const char *s = json_string_value(env);
        if (strlen(s) >= sizeof c->environment) {
            cm_seterr(err, errlen, PREFIX "\"environment\" is longer than %zu characters",
                      sizeof c->environment - 1);
            goto fail;
        }
        strcpy(c->environment, s);
    }
    if (cm_cluster_validate(c, err, errlen) != CM_OK) goto fail;
    json_decref(root);
    *out = c;
    return CM_OK;
fail:
    json_decref(root);
    cm_cluster_destroy(c);
    return CM_EINVAL;
}

int cm_cluster_from_env(cm_cluster **out, char *err, size_t errlen) {
    const char *s = getenv("TF_CONFIG");
    if (!s || !*s) {
        *out = cm_cluster_create();
        cm_seterr(err, errlen, PREFIX "not set");
        return CM_ENOTFOUND;
    }
    return cm_cluster_parse(s, out, err, errlen);
}

/* ===== Ranks and addresses ===== */

int cm_cluster_num_trainers(const cm_cluster *c) {
    return c->n[CM_TASK_CHIEF] + c->n[CM_TASK_WORKER];
}

int cm_cluster_rank(const cm_cluster *c) {
    if (c->task_index < 0) return -1;
    if (c->task_type == CM_TASK_CHIEF) return 0;
    if (c->task_type == CM_TASK_WORKER)
        return c->task_index + (c->n[CM_TASK_CHIEF] > 0 ? 1 : 0);
    return -1;
}

int cm_cluster_is_chief(const cm_cluster *c) {
    if (c->task_type == CM_TASK_CHIEF) return 1;
    return c->task_type == CM_TASK_WORKER && c->task_index == 0 && c->n[CM_TASK_CHIEF] == 0;
}

const char *cm_cluster_self(const cm_cluster *c) {
    int t = c->task_type, i = c->task_index;
    if (t < 0 || t >= CM_TASK_NTYPES || i < 0 || i >= c->n[t]) return NULL;
    return c->addrs[t][i];
}

const char *cm_cluster_trainer_addr(const cm_cluster *c, int r) {
    if (r < 0 || r >= cm_cluster_num_trainers(c)) return NULL;
    if (c->n[CM_TASK_CHIEF] > 0) {
        if (r == 0) return c->addrs[CM_TASK_CHIEF][0];
        return c->addrs[CM_TASK_WORKER][r - 1];
    }
    return c->addrs[CM_TASK_WORKER][r];
}
