/* test_cluster.c - TF_CONFIG parsing, validation, flag overrides and ranks.
 * SPDX-License-Identifier: MIT
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_addr.h"
#include "common/cm_cluster.h"
#include "common/cm_status.h"

/* Parses 'json' and expects CM_EINVAL, a NULL cluster and a message that
 * starts with "TF_CONFIG: " and contains every non-NULL fragment. */
static void expect_invalid(const char *json, const char *frag1, const char *frag2) {
    char err[256] = "";
    cm_cluster *c = (cm_cluster *)1;
    assert_int_equal(cm_cluster_parse(json, &c, err, sizeof err), CM_EINVAL);
    assert_null(c);
    if (strncmp(err, "TF_CONFIG: ", 11) != 0) fail_msg("message without prefix: %s", err);
    if (frag1 && !strstr(err, frag1)) fail_msg("\"%s\" not in: %s", frag1, err);
    if (frag2 && !strstr(err, frag2)) fail_msg("\"%s\" not in: %s", frag2, err);
}

static cm_cluster *parse_ok(const char *json) {
    char err[256] = "";
    cm_cluster *c = NULL;
    int rc = cm_cluster_parse(json, &c, err, sizeof err);
    if (rc != CM_OK) fail_msg("parse failed (%d): %s", rc, err);
    assert_non_null(c);
    return c;
}

/* ===== Valid forms ===== */

/* The dynamic form {"0": ..., "1": ...} is the list in index order; a sparse
 * one (indices missing) is refused, naming the first missing index. */
static void test_dict_form(void **state) {
    (void)state;
    cm_cluster *c = parse_ok("{\"cluster\": {\"worker\": {\"1\": \"b:2\", \"0\": \"a:1\"}, "
                             "\"ps\": {\"0\": \"p:3\"}}, \"task\": {\"type\": \"worker\", "
                             "\"index\": 1}}");
    assert_int_equal(c->n[CM_TASK_WORKER], 2);
    assert_string_equal(c->addrs[CM_TASK_WORKER][0], "a:1");
    assert_string_equal(c->addrs[CM_TASK_WORKER][1], "b:2");
    assert_int_equal(c->n[CM_TASK_PS], 1);
    assert_int_equal(cm_cluster_rank(c), 1);
    cm_cluster_destroy(c);
    expect_invalid("{\"cluster\": {\"worker\": {\"1\": \"b:2\"}, \"ps\": [\"p:3\"]}, "
                   "\"task\": {\"type\": \"worker\", \"index\": 1}}",
                   "not task 0", "sparse");
}

static void test_tf_chief_workers_ps(void **state) {
    (void)state;
    cm_cluster *c = parse_ok("{\"cluster\": {\"chief\": [\"host0:2222\"],"
                             " \"worker\": [\"host1:2222\", \"host2:2222\"],"
                             " \"ps\": [\"host3:2222\", \"host4:2222\"]},"
                             " \"task\": {\"type\": \"worker\", \"index\": 1}}");
    assert_int_equal(c->n[CM_TASK_CHIEF], 1);
    assert_int_equal(c->n[CM_TASK_WORKER], 2);
    assert_int_equal(c->n[CM_TASK_PS], 2);
    assert_int_equal(c->n[CM_TASK_EVALUATOR], 0);
    assert_string_equal(c->addrs[CM_TASK_CHIEF][0], "host0:2222");
    assert_string_equal(c->addrs[CM_TASK_PS][1], "host4:2222");
    assert_int_equal(c->task_type, CM_TASK_WORKER);
    assert_int_equal(c->task_index, 1);
    assert_string_equal(c->environment, "");
    assert_int_equal(cm_cluster_num_trainers(c), 3);
    assert_int_equal(cm_cluster_rank(c), 2);
    assert_int_equal(cm_cluster_is_chief(c), 0);
    assert_string_equal(cm_cluster_self(c), "host2:2222");
    assert_string_equal(cm_cluster_trainer_addr(c, 0), "host0:2222");
    assert_string_equal(cm_cluster_trainer_addr(c, 1), "host1:2222");
    assert_string_equal(cm_cluster_trainer_addr(c, 2), "host2:2222");
    assert_null(cm_cluster_trainer_addr(c, 3));
    assert_null(cm_cluster_trainer_addr(c, -1));
    cm_cluster_destroy(c);

    c = parse_ok("{\"cluster\": {\"chief\": [\"host0:2222\"], \"worker\": [\"host1:2222\"]},"
                 " \"task\": {\"type\": \"chief\", \"index\": 0}}");
    assert_int_equal(cm_cluster_rank(c), 0);
    assert_int_equal(cm_cluster_is_chief(c), 1);
    assert_string_equal(cm_cluster_self(c), "host0:2222");
    cm_cluster_destroy(c);
}

static void test_without_chief_worker0_is_chief(void **state) {
    (void)state;
    const char *fmt = "{\"cluster\": {\"worker\": [\"10.0.0.1:5000\", \"10.0.0.2:5000\","
                      " \"10.0.0.3:5000\"], \"ps\": [\"10.0.0.9:5000\"]},"
                      " \"task\": {\"type\": \"worker\", \"index\": %d}}";
    char json[512];
    for (int i = 0; i < 3; i++) {
        snprintf(json, sizeof json, fmt, i);
        cm_cluster *c = parse_ok(json);
        assert_int_equal(cm_cluster_num_trainers(c), 3);
        assert_int_equal(cm_cluster_rank(c), i);
        assert_int_equal(cm_cluster_is_chief(c), i == 0);
        assert_string_equal(cm_cluster_self(c), c->addrs[CM_TASK_WORKER][i]);
        assert_string_equal(cm_cluster_trainer_addr(c, i), c->addrs[CM_TASK_WORKER][i]);
        cm_cluster_destroy(c);
    }
}

static void test_kubeflow_master_and_environment(void **state) {
    (void)state;
    cm_cluster *c = parse_ok(
        "{\"cluster\":{\"master\":[\"mnist-master-0.kubeflow.svc:2222\"],"
        "\"ps\":[\"mnist-ps-0.kubeflow.svc:2222\"],"
        "\"worker\":[\"mnist-worker-0.kubeflow.svc:2222\",\"mnist-worker-1.kubeflow.svc:2222\"]},"
        "\"task\":{\"type\":\"master\",\"index\":0},\"environment\":\"cloud\"}");
    assert_int_equal(c->n[CM_TASK_CHIEF], 1);
    assert_string_equal(c->addrs[CM_TASK_CHIEF][0], "mnist-master-0.kubeflow.svc:2222");
    assert_int_equal(c->task_type, CM_TASK_CHIEF);
    assert_int_equal(c->task_index, 0);
    assert_string_equal(c->environment, "cloud");
    assert_int_equal(cm_cluster_rank(c), 0);
    assert_int_equal(cm_cluster_is_chief(c), 1);
    assert_int_equal(cm_cluster_num_trainers(c), 3);
    assert_string_equal(cm_cluster_trainer_addr(c, 2), "mnist-worker-1.kubeflow.svc:2222");
    cm_cluster_destroy(c);

    /* A worker of the same job: rank 1 behind the master. */
    c = parse_ok("{\"cluster\":{\"master\":[\"m:1\"],\"worker\":[\"w0:1\",\"w1:1\"]},"
                 "\"task\":{\"type\":\"worker\",\"index\":0},\"environment\":\"cloud\","
                 "\"rpc_layer\":\"grpc\",\"unknown\":{\"x\":[1,2]}}");
    assert_int_equal(cm_cluster_rank(c), 1);
    assert_int_equal(cm_cluster_is_chief(c), 0);
    cm_cluster_destroy(c);
}

static void test_evaluator_not_in_cluster(void **state) {
    (void)state;
    cm_cluster *c = parse_ok("{\"cluster\": {\"chief\": [\"c:1\"], \"worker\": [\"w:1\"],"
                             " \"ps\": [\"p:1\"]},"
                             " \"task\": {\"type\": \"evaluator\", \"index\": 0}}");
    assert_int_equal(c->task_type, CM_TASK_EVALUATOR);
    assert_int_equal(c->n[CM_TASK_EVALUATOR], 0);
    assert_int_equal(cm_cluster_rank(c), -1);
    assert_int_equal(cm_cluster_is_chief(c), 0);
    assert_null(cm_cluster_self(c));
    assert_int_equal(cm_cluster_num_trainers(c), 2);
    cm_cluster_destroy(c);

    /* Listed evaluators are held to the index range. */
    c = parse_ok("{\"cluster\": {\"worker\": [\"w:1\"], \"evaluator\": [\"e:1\"]},"
                 " \"task\": {\"type\": \"evaluator\", \"index\": 0}}");
    assert_string_equal(cm_cluster_self(c), "e:1");
    cm_cluster_destroy(c);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"], \"evaluator\": [\"e:1\"]},"
                   " \"task\": {\"type\": \"evaluator\", \"index\": 1}}",
                   "task evaluator:1 is out of range", "1 evaluator tasks");
}

static void test_ps_task(void **state) {
    (void)state;
    cm_cluster *c = parse_ok("{\"cluster\": {\"worker\": [\"w:1\", \"w:2\"],"
                             " \"ps\": [\"[::1]:7000\", \"[fe80::1]:7000\", \"127.0.0.1:7000\"]},"
                             " \"task\": {\"type\": \"ps\", \"index\": 2}}");
    assert_int_equal(c->task_type, CM_TASK_PS);
    assert_int_equal(c->task_index, 2);
    assert_int_equal(c->n[CM_TASK_PS], 3);
    assert_int_equal(cm_cluster_rank(c), -1);
    assert_int_equal(cm_cluster_is_chief(c), 0);
    assert_string_equal(cm_cluster_self(c), "127.0.0.1:7000");
    assert_string_equal(c->addrs[CM_TASK_PS][0], "[::1]:7000");
    cm_cluster_destroy(c);
}

static void test_missing_index_is_zero(void **state) {
    (void)state;
    cm_cluster *c =
        parse_ok("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"worker\"}}");
    assert_int_equal(c->task_index, 0);
    assert_int_equal(cm_cluster_rank(c), 0);
    cm_cluster_destroy(c);
}

static void test_task_type_names(void **state) {
    (void)state;
    assert_int_equal(cm_task_type_parse("chief"), CM_TASK_CHIEF);
    assert_int_equal(cm_task_type_parse("master"), CM_TASK_CHIEF);
    assert_int_equal(cm_task_type_parse("worker"), CM_TASK_WORKER);
    assert_int_equal(cm_task_type_parse("ps"), CM_TASK_PS);
    assert_int_equal(cm_task_type_parse("evaluator"), CM_TASK_EVALUATOR);
    assert_int_equal(cm_task_type_parse("Worker"), -1);
    assert_int_equal(cm_task_type_parse(""), -1);
    assert_int_equal(cm_task_type_parse(NULL), -1);
    assert_string_equal(cm_task_type_name(CM_TASK_CHIEF), "chief");
    assert_string_equal(cm_task_type_name(CM_TASK_EVALUATOR), "evaluator");
    assert_string_equal(cm_task_type_name(7), "unknown");
}

/* ===== Malformed documents ===== */

static void test_malformed_json_has_line_and_column(void **state) {
    (void)state;
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]},\n"
                   " \"task\": {\"type\": \"worker\" \"index\": 0}}",
                   "malformed JSON at line 2, column ", NULL);
    expect_invalid("", "malformed JSON at line", "column");
    expect_invalid("[1, 2]", "not a JSON object", NULL);
    expect_invalid("\"worker\"", "malformed JSON", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"worker\"},"
                   " \"task\": {\"type\": \"worker\"}}",
                   "malformed JSON", "duplicate");
}

static void test_missing_cluster_or_task(void **state) {
    (void)state;
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}}", "\"task\" is missing", NULL);
    expect_invalid("{\"task\": {\"type\": \"worker\", \"index\": 0}}", "\"cluster\" is missing",
                   NULL);
    expect_invalid("{\"cluster\": [\"w:1\"], \"task\": {\"type\": \"worker\"}}",
                   "\"cluster\" is not an object", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": \"worker\"}",
                   "\"task\" is not an object", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"index\": 0}}",
                   "task \"type\" is missing", NULL);
    expect_invalid("{\"cluster\": {\"worker\": \"w:1\"}, \"task\": {\"type\": \"worker\"}}",
                   "cluster \"worker\" is not a list", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\", 7]}, \"task\": {\"type\": \"worker\"}}",
                   "cluster \"worker\" entry 1 is not a string", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"worker\","
                   " \"index\": \"0\"}}",
                   "\"index\" is not an integer", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"worker\"},"
                   " \"environment\": 3}",
                   "\"environment\" is not a string", NULL);
}

static void test_unknown_task_type(void **state) {
    (void)state;
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"trainer\","
                   " \"index\": 0}}",
                   "unknown task type \"trainer\"", NULL);
    /* Only lowercase names, as TFJob writes them. */
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"Worker\","
                   " \"index\": 0}}",
                   "unknown task type \"Worker\"", NULL);
}

static void test_index_out_of_range(void **state) {
    (void)state;
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\", \"w:2\"]},"
                   " \"task\": {\"type\": \"worker\", \"index\": 5}}",
                   "TF_CONFIG: task worker:5 is out of range: the cluster has 2 worker tasks",
                   NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]},"
                   " \"task\": {\"type\": \"ps\", \"index\": 0}}",
                   "task ps:0 is not in the cluster", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"chief\"}}",
                   "task chief:0 is not in the cluster", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"worker\","
                   " \"index\": 4294967296}}",
                   "does not fit an int", NULL);
}

static void test_negative_index(void **state) {
    (void)state;
    expect_invalid("{\"cluster\": {\"worker\": [\"w:1\"]}, \"task\": {\"type\": \"worker\","
                   " \"index\": -1}}",
                   "task worker:-1 has a negative index", NULL);
}

static void test_duplicate_addresses(void **state) {
    (void)state;
    expect_invalid("{\"cluster\": {\"worker\": [\"h:1\", \"h:2\"], \"ps\": [\"h:2\"]},"
                   " \"task\": {\"type\": \"worker\", \"index\": 0}}",
                   "address \"h:2\" is used by both worker:1 and ps:0", NULL);
    expect_invalid("{\"cluster\": {\"worker\": [\"h:1\", \"h:1\"]},"
                   " \"task\": {\"type\": \"worker\", \"index\": 0}}",
                   "address \"h:1\" is used by both worker:0 and worker:1", NULL);
    expect_invalid("{\"cluster\": {\"chief\": [\"c:1\"], \"worker\": [\"w:1\"],"
                   " \"evaluator\": [\"c:1\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}",
                   "address \"c:1\" is used by both chief:0 and evaluator:0", NULL);
}

static void test_bad_host_port(void **state) {
    (void)state;
    static const struct {
        const char *addr;
        const char *why;
    } cases[] = {
        {"host", "missing port"},
        {"host:", "missing port"},
        {"host:0", "port out of range"},
        {"host:70000", "port out of range"},
        {"host:99999999999999999999", "port out of range"},
        {":2222", "empty host"},
        {"host:22a", "port is not a number"},
        {"host:-1", "port is not a number"},
        {"ho st:1", "bad character in host"},
        {"::1:2222", "bad character in host"},
        {"[::1]", "missing port"},
        {"[::1:2222", "unterminated"},
        {"[]:2222", "empty host"},
        {"[host]:2222", "bad character in [IPv6] host"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char json[256];
        snprintf(json, sizeof json,
                 "{\"cluster\": {\"worker\": [\"w:1\", \"%s\"]},"
                 " \"task\": {\"type\": \"worker\", \"index\": 0}}",
                 cases[i].addr);
        char frag[128];
        snprintf(frag, sizeof frag, "worker:1 address \"%s\" is not host:port", cases[i].addr);
        expect_invalid(json, frag, cases[i].why);
    }
    /* The edges of the valid range. */
    cm_cluster *c = parse_ok("{\"cluster\": {\"worker\": [\"a:1\", \"b:65535\", \"1.2.3.4:80\","
                             " \"my_host-2.svc.cluster.local:2222\", \"[2001:db8::7]:443\"]},"
                             " \"task\": {\"type\": \"worker\", \"index\": 4}}");
    assert_int_equal(c->n[CM_TASK_WORKER], 5);
    assert_string_equal(cm_cluster_self(c), "[2001:db8::7]:443");
    cm_cluster_destroy(c);
}

/* cm_addr_split, which every module's address parsing goes through: the
 * host without its brackets, the port, port 0 only where min_port allows
 * it, a host too long for the buffer refused, "unix:" not an address. */
static void test_addr_split(void **state) {
    (void)state;
    char host[16];
    int port = -1;
    assert_null(cm_addr_split("127.0.0.1:5000", 1, host, sizeof host, &port));
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 5000);
    assert_null(cm_addr_split("[::1]:0", 0, host, sizeof host, &port));
    assert_string_equal(host, "::1");
    assert_int_equal(port, 0);
    assert_string_equal(cm_addr_split("[::1]:0", 1, host, sizeof host, &port),
                        "port out of range 1..65535");
    assert_string_equal(cm_addr_split("h:65536", 0, NULL, 0, NULL), "port out of range 0..65535");
    assert_null(cm_addr_split("my-host_1.local:65535", 1, NULL, 0, &port));
    assert_int_equal(port, 65535);
    assert_string_equal(cm_addr_split("a-very-long-host-name:1", 1, host, sizeof host, NULL),
                        "host too long");
    assert_non_null(cm_addr_split("unix:/tmp/x", 0, NULL, 0, NULL));
    assert_string_equal(cm_addr_split("", 0, NULL, 0, NULL), "empty address");
    assert_string_equal(cm_addr_split(NULL, 0, NULL, 0, NULL), "empty address");
}

static void test_two_chiefs(void **state) {
    (void)state;
    expect_invalid("{\"cluster\": {\"chief\": [\"c:1\", \"c:2\"], \"worker\": [\"w:1\"]},"
                   " \"task\": {\"type\": \"worker\", \"index\": 0}}",
                   "2 chief tasks", "at most one");
    /* chief and master name the same task type. */
    expect_invalid("{\"cluster\": {\"chief\": [\"c:1\"], \"master\": [\"m:1\"],"
                   " \"worker\": [\"w:1\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}",
                   "2 chief tasks", NULL);
}

/* ===== Flag overrides ===== */

static void test_flag_overrides(void **state) {
    (void)state;
    char err[256] = "";
    cm_cluster *c = cm_cluster_create();
    assert_int_equal(c->task_type, -1);
    assert_int_equal(c->task_index, -1);
    assert_int_equal(cm_cluster_num_trainers(c), 0);
    assert_int_equal(cm_cluster_rank(c), -1);
    assert_null(cm_cluster_self(c));
    /* An empty cluster has no task yet. */
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_EINVAL);
    assert_string_equal(err, "TF_CONFIG: the task type is not set");

    assert_int_equal(cm_cluster_set_list(c, CM_TASK_WORKER, "w0:1,w1:1, w2:1", err, sizeof err),
                     CM_OK);
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_PS, "p0:1", err, sizeof err), CM_OK);
    assert_int_equal(c->n[CM_TASK_WORKER], 3);
    assert_string_equal(c->addrs[CM_TASK_WORKER][2], "w2:1");
    cm_cluster_set_task(c, CM_TASK_WORKER, 2);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_OK);
    assert_int_equal(cm_cluster_rank(c), 2);
    assert_int_equal(cm_cluster_is_chief(c), 0);
    assert_string_equal(cm_cluster_self(c), "w2:1");

    /* Adding a chief shifts the worker ranks by one. */
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_CHIEF, "c:1", err, sizeof err), CM_OK);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_OK);
    assert_int_equal(cm_cluster_rank(c), 3);
    assert_int_equal(cm_cluster_num_trainers(c), 4);

    /* Bad input leaves the list unchanged. */
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_WORKER, "w0:1,,w2:1", err, sizeof err),
                     CM_EINVAL);
    assert_non_null(strstr(err, "empty address in the worker list"));
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_WORKER, "w0:1,w1:0", err, sizeof err),
                     CM_EINVAL);
    assert_non_null(strstr(err, "worker address \"w1:0\" is not host:port"));
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_WORKER, "w0:1,", err, sizeof err), CM_EINVAL);
    assert_int_equal(cm_cluster_set_list(c, 9, "w0:1", err, sizeof err), CM_EINVAL);
    assert_int_equal(c->n[CM_TASK_WORKER], 3);
    assert_string_equal(c->addrs[CM_TASK_WORKER][0], "w0:1");

    /* Overrides are validated like TF_CONFIG: out of range, then a clash. */
    cm_cluster_set_task(c, CM_TASK_WORKER, 3);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_EINVAL);
    assert_string_equal(err,
                        "TF_CONFIG: task worker:3 is out of range: the cluster has 3 worker tasks");
    cm_cluster_set_task(c, CM_TASK_PS, 0);
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_PS, "w1:1", err, sizeof err), CM_OK);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_EINVAL);
    assert_string_equal(err, "TF_CONFIG: address \"w1:1\" is used by both worker:1 and ps:0");

    /* An empty string empties a list. */
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_PS, "", err, sizeof err), CM_OK);
    assert_int_equal(c->n[CM_TASK_PS], 0);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "task ps:0 is not in the cluster"));
    cm_cluster_set_task(c, CM_TASK_CHIEF, 0);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_OK);
    assert_int_equal(cm_cluster_is_chief(c), 1);
    assert_int_equal(cm_cluster_rank(c), 0);

    /* Two chiefs through flags. */
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_CHIEF, "c:1,c:2", err, sizeof err), CM_OK);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "2 chief tasks"));
    cm_cluster_destroy(c);
    cm_cluster_destroy(NULL);
}

/* Flags override a parsed TF_CONFIG. */
static void test_flags_over_tf_config(void **state) {
    (void)state;
    char err[256] = "";
    cm_cluster *c = parse_ok("{\"cluster\": {\"worker\": [\"w0:1\", \"w1:1\"]},"
                             " \"task\": {\"type\": \"worker\", \"index\": 1}}");
    assert_int_equal(cm_cluster_set_list(c, CM_TASK_WORKER, "x0:1", err, sizeof err), CM_OK);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_EINVAL);
    assert_string_equal(err,
                        "TF_CONFIG: task worker:1 is out of range: the cluster has 1 worker tasks");
    cm_cluster_set_task(c, CM_TASK_WORKER, 0);
    assert_int_equal(cm_cluster_validate(c, err, sizeof err), CM_OK);
    assert_string_equal(cm_cluster_self(c), "x0:1");
    assert_int_equal(cm_cluster_is_chief(c), 1);
    cm_cluster_destroy(c);
}

/* ===== The environment ===== */

static void test_from_env(void **state) {
    (void)state;
    char err[256] = "";
    cm_cluster *c = (cm_cluster *)1;

    assert_int_equal(unsetenv("TF_CONFIG"), 0);
    assert_int_equal(cm_cluster_from_env(&c, err, sizeof err), CM_ENOTFOUND);
    assert_non_null(c);
    assert_int_equal(c->task_type, -1);
    assert_int_equal(cm_cluster_num_trainers(c), 0);
    cm_cluster_destroy(c);

    assert_int_equal(setenv("TF_CONFIG", "", 1), 0);
    c = (cm_cluster *)1;
    assert_int_equal(cm_cluster_from_env(&c, err, sizeof err), CM_ENOTFOUND);
    assert_non_null(c);
    assert_int_equal(c->n[CM_TASK_WORKER], 0);
    cm_cluster_destroy(c);

    assert_int_equal(setenv("TF_CONFIG",
                            "{\"cluster\": {\"chief\": [\"c:1\"], \"worker\": [\"w:1\"]},"
                            " \"task\": {\"type\": \"worker\", \"index\": 0}}",
                            1),
                     0);
    c = NULL;
    assert_int_equal(cm_cluster_from_env(&c, err, sizeof err), CM_OK);
    assert_non_null(c);
    assert_int_equal(cm_cluster_rank(c), 1);
    assert_string_equal(cm_cluster_trainer_addr(c, 0), "c:1");
    cm_cluster_destroy(c);

    assert_int_equal(setenv("TF_CONFIG", "{\"cluster\": ", 1), 0);
    c = (cm_cluster *)1;
    assert_int_equal(cm_cluster_from_env(&c, err, sizeof err), CM_EINVAL);
    assert_null(c);
    assert_non_null(strstr(err, "TF_CONFIG: malformed JSON at line 1"));
    assert_int_equal(unsetenv("TF_CONFIG"), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tf_chief_workers_ps),
        cmocka_unit_test(test_dict_form),
        cmocka_unit_test(test_without_chief_worker0_is_chief),
        cmocka_unit_test(test_kubeflow_master_and_environment),
        cmocka_unit_test(test_evaluator_not_in_cluster),
        cmocka_unit_test(test_ps_task),
        cmocka_unit_test(test_missing_index_is_zero),
        cmocka_unit_test(test_task_type_names),
        cmocka_unit_test(test_malformed_json_has_line_and_column),
        cmocka_unit_test(test_missing_cluster_or_task),
        cmocka_unit_test(test_unknown_task_type),
        cmocka_unit_test(test_index_out_of_range),
        cmocka_unit_test(test_negative_index),
        cmocka_unit_test(test_duplicate_addresses),
        cmocka_unit_test(test_bad_host_port),
        cmocka_unit_test(test_two_chiefs),
        cmocka_unit_test(test_flag_overrides),
        cmocka_unit_test(test_flags_over_tf_config),
        cmocka_unit_test(test_from_env),
        cmocka_unit_test(test_addr_split),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
