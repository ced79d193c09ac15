/* test_rendezvous.c - unit tests for the rendezvous (worker/sync/wk_rendezvous.c).
 * SPDX-License-Identifier: MIT
 *
 * The chief's server on 127.0.0.1 and two ranks as threads: both get the
 * table, the job id, the start step and the NCCL id the chief passed
 * (byte for byte), or no id when it passed none. Every wait is bounded by
 * the Join deadline.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_status.h"
#include "common/cm_token.h"
#include "worker/sync/wk_rendezvous.h"
#include "tests/unit/tu_port.h"

#define FP 0x1234567890abcdefull

typedef struct joiner {
    pthread_t t;
    const char *chief;
    const cm_security *sec;
    int rank;
    const wk_rdv_state *st; /* NULL: a plain Join. */
    int deadline_ms;        /* 0: 10 s. */
    int rc;
    wk_rdv_result r;
    char err[512];
} joiner;

static void *join_main(void *arg) {
    joiner *j = arg;
    char me[64];
    snprintf(me, sizeof me, "127.0.0.1:%d", 40000 + j->rank);
    j->rc = wk_rdv_join_state(j->chief, j->rank, 2, FP, "test", me, j->st,
                              j->deadline_ms ? j->deadline_ms : 10000, j->sec, &j->r, j->err,
                              sizeof j->err);
    return NULL;
}

static void start_joiner(joiner *j, const char *chief, int rank, const wk_rdv_state *st) {
    memset(j, 0, sizeof *j);
    j->chief = chief;
    j->rank = rank;
    j->st = st;
    assert_int_equal(pthread_create(&j->t, NULL, join_main, j), 0);
}

/* A local address nothing listens on, for a chief (tu_port.h). */
static void free_addr(char *addr, size_t len) {
    int port = tu_free_port();
    assert_true(port > 0);
    snprintf(addr, len, "127.0.0.1:%d", port);
}

/* Rank 0 rejoins with st and, after the wait, gets a ring of itself alone
 * (j->r is the caller's to free). */
static void expect_chief_alone(joiner *j, const char *chief, const wk_rdv_state *st) {
    start_joiner(j, chief, 0, st);
    pthread_join(j->t, NULL);
    assert_int_equal(j->rc, CM_OK);
    assert_int_equal(j->r.nranks, 1);
    assert_int_equal(j->r.members[0], 0);
}

/* Two ranks join a chief that passes id (len bytes, may be 0). */
static void run(const uint8_t *id, size_t len) {
    char chief[64], err[512];
    free_addr(chief, sizeof chief);
    wk_rdv_server *s = NULL;
    assert_int_equal(wk_rdv_server_start(chief, 2, FP, "test", 77, 5, id, len, NULL, &s, err,
                                         sizeof err),
                     CM_OK);
    joiner j[2];
    memset(j, 0, sizeof j);
    for (int r = 0; r < 2; r++) {
        j[r].chief = chief;
        j[r].rank = r;
        assert_int_equal(pthread_create(&j[r].t, NULL, join_main, &j[r]), 0);
    }
    for (int r = 0; r < 2; r++) pthread_join(j[r].t, NULL);
    for (int r = 0; r < 2; r++) {
        assert_int_equal(j[r].rc, CM_OK);
        assert_int_equal(j[r].r.nranks, 2);
        assert_string_equal(j[r].r.ring_addrs[1], "127.0.0.1:40001");
        assert_int_equal(j[r].r.job_id, 77);
        assert_int_equal(j[r].r.start_step, 5);
        assert_int_equal(j[r].r.nccl_id_len, len);
        if (len) assert_memory_equal(j[r].r.nccl_id, id, len);
        wk_rdv_result_free(&j[r].r);
    }
    wk_rdv_server_destroy(s);
}

static void test_nccl_id_reaches_every_rank(void **state) {
    (void)state;
    uint8_t id[WK_RDV_NCCL_ID_MAX];
    for (size_t i = 0; i < sizeof id; i++) id[i] = (uint8_t)(i * 7 + 1);
    id[3] = 0; /* Bytes, not a string. */
    run(id, sizeof id);
}

static void test_no_nccl_id(void **state) {
    (void)state;
    run(NULL, 0);
}

/* A chief's server of 2 ranks on a free address (into chief), elastic
 * with (min_ranks, wait_ms). */
static wk_rdv_server *elastic_server(char *chief, size_t len, int min_ranks, int64_t wait_ms) {
    char err[512];
    free_addr(chief, len);
    wk_rdv_server *s = NULL;
    assert_int_equal(wk_rdv_server_start(chief, 2, FP, "test", 77, 0, NULL, 0, NULL, &s, err,
                                         sizeof err),
                     CM_OK);
    wk_rdv_server_set_elastic(s, min_ranks, wait_ms);
    return s;
}

/* Elastic rings: generations, the newest state as root, a smaller ring
 * after the wait, the waiting flag, the end of the run. */
static void test_elastic_generations(void **state) {
    (void)state;
    char chief[64];
    wk_rdv_server *s = elastic_server(chief, sizeof chief, 1, 300);
    joiner j[2];
    /* Ring 1: the chief holds the state of step 0, rank 1 none. */
    wk_rdv_state chief_st = {.has_state = 1, .step = 0};
    start_joiner(&j[0], chief, 0, &chief_st);
    start_joiner(&j[1], chief, 1, NULL);
    for (int r = 0; r < 2; r++) pthread_join(j[r].t, NULL);
    uint64_t job1 = j[0].r.job_id;
    for (int r = 0; r < 2; r++) {
        assert_int_equal(j[r].rc, CM_OK);
        assert_int_equal(j[r].r.nranks, 2);
        assert_int_equal(j[r].r.position, r);
        assert_int_equal(j[r].r.root, 0);
        assert_int_equal(j[r].r.generation, 1);
        wk_rdv_result_free(&j[r].r);
    }
    /* Rank 1 is gone: the chief's rejoin forms a ring of 1 after the wait. */
    wk_rdv_state st7 = {.has_state = 1, .step = 7, .rejoin = 1};
    expect_chief_alone(&j[0], chief, &st7);
    assert_int_equal(j[0].r.start_step, 7);
    assert_int_equal(j[0].r.generation, 2);
    assert_true(j[0].r.job_id != job1); /* Ranks of ring 1 are refused by ring 2. */
    wk_rdv_result_free(&j[0].r);
    /* Rank 1 comes back without state: the chief sees it waiting and joins
     * with the state of step 9, which every member takes. */
    assert_int_equal(wk_rdv_server_waiting(s), 0);
    start_joiner(&j[1], chief, 1, NULL);
    for (int i = 0; i < 200 && !wk_rdv_server_waiting(s); i++) usleep(10000);
    assert_int_equal(wk_rdv_server_waiting(s), 1);
    wk_rdv_state st9 = {.has_state = 1, .step = 9, .rejoin = 1};
    start_joiner(&j[0], chief, 0, &st9);
    for (int r = 0; r < 2; r++) pthread_join(j[r].t, NULL);
    for (int r = 0; r < 2; r++) {
        assert_int_equal(j[r].rc, CM_OK);
        assert_int_equal(j[r].r.nranks, 2);
        assert_int_equal(j[r].r.root, 0);
        assert_int_equal(j[r].r.start_step, 9);
        assert_int_equal(j[r].r.generation, 3);
        wk_rdv_result_free(&j[r].r);
    }
    /* Both survive with different steps (one finished step 11, one failed
     * in it): the newest state wins, whoever holds it. */
    wk_rdv_state st11 = {.has_state = 1, .step = 11, .rejoin = 1};
    wk_rdv_state st12 = {.has_state = 1, .step = 12, .rejoin = 1};
    start_joiner(&j[0], chief, 0, &st11);
    start_joiner(&j[1], chief, 1, &st12);
    for (int r = 0; r < 2; r++) pthread_join(j[r].t, NULL);
    for (int r = 0; r < 2; r++) {
        assert_int_equal(j[r].rc, CM_OK);
        assert_int_equal(j[r].r.root, 1);
        assert_int_equal(j[r].r.start_step, 12);
        wk_rdv_result_free(&j[r].r);
    }
    /* The run ended: a late replacement is told so at once. */
    wk_rdv_server_end(s, 20);
    start_joiner(&j[1], chief, 1, NULL);
    pthread_join(j[1].t, NULL);
    assert_int_equal(j[1].rc, CM_ESHUTDOWN);
    assert_non_null(strstr(j[1].err, "the run ended at step 20"));
    wk_rdv_server_destroy(s);
}

/* A Join whose caller gave up (its deadline passed, as when its process
 * dies) stops counting: the next ring forms without that rank instead of
 * naming an address nobody listens on. */
static void test_gone_join_not_counted(void **state) {
    (void)state;
    char chief[64];
    wk_rdv_server *s = elastic_server(chief, sizeof chief, 1, 300);
    joiner j[2];
    memset(&j[1], 0, sizeof j[1]);
    j[1].chief = chief;
    j[1].rank = 1;
    j[1].deadline_ms = 300;
    assert_int_equal(pthread_create(&j[1].t, NULL, join_main, &j[1]), 0);
    pthread_join(j[1].t, NULL);
    assert_int_equal(j[1].rc, CM_ETIMEDOUT);
    for (int i = 0; i < 200 && wk_rdv_server_waiting(s); i++) usleep(10000);
    assert_int_equal(wk_rdv_server_waiting(s), 0);
    /* The survivor alone: a ring of 1 after the wait, not rank 1's address. */
    wk_rdv_state st = {.has_state = 1, .step = 4, .rejoin = 1};
    expect_chief_alone(&j[0], chief, &st);
    wk_rdv_result_free(&j[0].r);
    wk_rdv_server_destroy(s);
}

/* Whole rings only (the default): a survivor that waited in vain is told
 * which rank is missing. */
static void test_rejoin_names_missing_rank(void **state) {
    (void)state;
    char chief[64];
    wk_rdv_server *s = elastic_server(chief, sizeof chief, 2, 200);
    joiner j;
    wk_rdv_state st = {.has_state = 1, .step = 3, .rejoin = 1};
    start_joiner(&j, chief, 0, &st);
    pthread_join(j.t, NULL);
    assert_int_equal(j.rc, CM_EUNAVAIL);
    assert_non_null(strstr(j.err, "ranks 1 to join again"));
    wk_rdv_server_destroy(s);
}

static void test_oversized_nccl_id_refused(void **state) {
    (void)state;
    uint8_t id[WK_RDV_NCCL_ID_MAX + 1] = {0};
    char chief[64], err[512] = "";
    free_addr(chief, sizeof chief);
    wk_rdv_server *s = NULL;
    assert_int_equal(wk_rdv_server_start(chief, 2, FP, "test", 1, 0, id, sizeof id, NULL, &s, err,
                                         sizeof err),
                     CM_EINVAL);
    assert_null(s);
    assert_non_null(strstr(err, "NCCL id of 129 bytes"));
}

/* With a token: a Join without it (or with another) is refused at once,
 * and the ranks that have it rendezvous as before. */
static void test_token_required(void **state) {
    (void)state;
    char chief[64], err[512] = "";
    free_addr(chief, sizeof chief);
    cm_security good = {.token = "the-workers-token-0123456789"};
    cm_security bad = {.token = "the-workers-token-0123456780"};
    wk_rdv_server *s = NULL;
    assert_int_equal(wk_rdv_server_start(chief, 2, FP, "test", 9, 0, NULL, 0, &good, &s, err,
                                         sizeof err),
                     CM_OK);
    const cm_security *strangers[] = {NULL, &bad};
    for (int k = 0; k < 2; k++) {
        wk_rdv_result r;
        err[0] = 0;
        int rc = wk_rdv_join(chief, 0, 2, FP, "test", "127.0.0.1:1", 10000, strangers[k], &r, err,
                             sizeof err);
        assert_int_not_equal(rc, CM_OK);
        assert_non_null(strstr(err, "UNAUTHENTICATED"));
        assert_null(strstr(err, "DEADLINE")); /* Refused, not left waiting. */
    }
    joiner j[2];
    memset(j, 0, sizeof j);
    for (int r = 0; r < 2; r++) {
        j[r].chief = chief;
        j[r].rank = r;
        j[r].sec = &good;
        assert_int_equal(pthread_create(&j[r].t, NULL, join_main, &j[r]), 0);
    }
    for (int r = 0; r < 2; r++) pthread_join(j[r].t, NULL);
    for (int r = 0; r < 2; r++) {
        assert_int_equal(j[r].rc, CM_OK);
        assert_int_equal(j[r].r.job_id, 9);
        wk_rdv_result_free(&j[r].r);
    }
    wk_rdv_server_destroy(s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nccl_id_reaches_every_rank),
        cmocka_unit_test(test_no_nccl_id),
        cmocka_unit_test(test_oversized_nccl_id_refused),
        cmocka_unit_test(test_elastic_generations),
        cmocka_unit_test(test_rejoin_names_missing_rank),
        cmocka_unit_test(test_gone_join_not_counted),
        cmocka_unit_test(test_token_required),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
