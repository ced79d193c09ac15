/* test_ps_server.c - unit tests for the PS gRPC service (ps/ps_server.c).
 * SPDX-License-Identifier: MIT
 *
 * Each test starts the two shards of an MLP 784,64,10 placed on 2 PS (64 KiB
 * minimum partition, so the first kernel is split) as two in-process
 * servers on 127.0.0.1:0. The happy path goes through ps_client; bad input
 * is hand-built with protobuf-c and sent with rpc_call_sync to shard 0.
 * After every refused request the server must still answer and hold the
 * values it held before, compared bit for bit. Every wait is bounded.
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "proto/ps.pb-c.h"
#include "proto/rpc.h"
#include "ps/ps_client.h"
#include "ps/ps_optim.h"
#include "ps/ps_rows.h"
#include "ps/ps_server.h"
#include "ps/ps_wire.h"
#include "tests/unit/tu_port.h"
#include "storage/st_store.h"

#include "bf16_grads.h"

/* ===== Helpers ===== */

#define CHECK(x)                                                                  \
    do {                                                                          \
        if (!(x)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #x); \
            abort();                                                              \
        }                                                                         \
    } while (0)

#define SEED 7
#define LR 0.5f
#define MIN_PART (64u << 10)
#define DEADLINE 5000

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Turns a hang into a failure: abort() with a message if not disarmed in
 * time (a stuck destroy would otherwise wait for ctest's timeout). */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int armed;
    const char *what;
} dog = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, NULL};

static void *dog_main(void *arg) {
    int64_t ms = (int64_t)(intptr_t)arg;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&dog.mu);
    while (dog.armed)
        if (pthread_cond_timedwait(&dog.cv, &dog.mu, &until) != 0 && dog.armed) {
            fprintf(stderr, "watchdog: %s did not return within %lld ms\n", dog.what,
                    (long long)ms);
            abort();
        }
    pthread_mutex_unlock(&dog.mu);
    return NULL;
}

static pthread_t dog_arm(const char *what, int ms) {
    pthread_t t;
    pthread_mutex_lock(&dog.mu);
    dog.armed = 1;
    dog.what = what;
    pthread_mutex_unlock(&dog.mu);
    CHECK(pthread_create(&t, NULL, dog_main, (void *)(intptr_t)ms) == 0);
    return t;
}

static void dog_disarm(pthread_t t) {
    pthread_mutex_lock(&dog.mu);
    dog.armed = 0;
    pthread_cond_broadcast(&dog.cv);
    pthread_mutex_unlock(&dog.mu);
    pthread_join(t, NULL);
}

/* Destroy a server, which must return promptly. */
static void destroy_promptly(ps_server *s) {
    int64_t t0 = now_ms();
    pthread_t dt = dog_arm("ps_server_destroy", 10000);
    ps_server_destroy(s, 100);
    dog_disarm(dt);
    assert_true(now_ms() - t0 < 5000); /* Generous: CI machines are slow. */
}

typedef struct fixture {
    cm_model *m;
    cm_placement *pl;
    ps_server *srv[2];
    char addr[2][32];
    const char *addrs[2];
    ps_client *cli[2]; /* Ranks 0 and 1. */
    rpc_client *raw;
    rpc_channel *ch; /* Raw calls to shard 0. */
    uint64_t fp;
    char desc[256];
    float *init; /* The initial values of the whole model. */
} fixture;

static fixture F;
/* Checkpoints for fx_start's servers: DIR/shard-<i> (NULL: none). */
static const char *fx_data_dir;
static int64_t fx_every;

/* Start shard i's server with sc (F's model and placement, or none). */
static void fx_serve(int i, ps_server_cfg *sc) {
    fixture *f = &F;
    char dir[512];
    if (fx_data_dir) snprintf(dir, sizeof dir, "%s/shard-%d", fx_data_dir, i);
    sc->shard = i;
    sc->data_dir = fx_data_dir ? dir : NULL;
    sc->checkpoint_every = fx_every;
    assert_int_equal(ps_server_create(sc, &f->srv[i]), CM_OK);
    /* Below the ephemeral range (tu_port.h): tests restart shards on it. */
    int port = 0, rc = CM_EBUSY;
    for (int k = 0; k < 20 && rc == CM_EBUSY; k++) {
        snprintf(f->addr[i], sizeof f->addr[i], "127.0.0.1:%d", k < 19 ? tu_free_port() : 0);
        rc = ps_server_start(f->srv[i], f->addr[i], &port);
    }
    assert_int_equal(rc, CM_OK);
    assert_true(port > 0);
    snprintf(f->addr[i], sizeof f->addr[i], "127.0.0.1:%d", port);
    f->addrs[i] = f->addr[i];
}

/* Clients of F's model for ranks 0 and 1 (retrying unavailable shards for
 * connect_ms), the raw channel to shard 0 and the initial values. */
static void fx_connect(int64_t connect_ms) {
    fixture *f = &F;
    f->fp = ps_wire_identity(f->m, f->pl, f->desc, sizeof f->desc);
    for (int r = 0; r < 2; r++) {
        ps_client_cfg cc = {.model = f->m, .placement = f->pl, .ps_addrs = f->addrs, .rank = r,
                            .deadline_ms = DEADLINE, .connect_timeout_ms = connect_ms};
        char err[256] = "";
        if (ps_client_open(&cc, &f->cli[r], err, sizeof err) != CM_OK) fail_msg("%s", err);
    }
    rpc_client_opts ro = {.max_message = 8 << 20};
    assert_int_equal(rpc_client_create(&ro, &f->raw), CM_OK);
    assert_int_equal(rpc_channel_open(f->raw, f->addr[0], &f->ch), CM_OK);
    f->init = malloc(f->m->numel * sizeof(float));
    assert_non_null(f->init);
    cm_model_init(f->m, SEED, f->init);
}

/* F with the small MLP on 2 shards; their servers configured with the
 * model (with_model) or, as psserver starts, learning it from the Init. */
static void fx_start_mlp(int with_model, int max_message, int64_t connect_ms) {
    static const int sizes[] = {784, 64, 10};
    fixture *f = &F;
    memset(f, 0, sizeof *f);
    assert_int_equal(cm_model_create_mlp(sizes, 3, &f->m), CM_OK);
    assert_int_equal(cm_placement_create(f->m, 2, MIN_PART, &f->pl), CM_OK);
    for (int i = 0; i < 2; i++) {
        ps_server_cfg sc = {.max_message = max_message, .nshards = 2};
        if (with_model) {
            sc.model = f->m;
            sc.placement = f->pl;
        }
        fx_serve(i, &sc);
    }
    fx_connect(connect_ms);
}

static void fx_start(int max_message) {
    fx_start_mlp(1, max_message, 2000);
}

/* Shard i started again, empty (no data directory), with F's model, on its
 * address (the one before is gone or destroyed). */
static void fx_serve_again(int i) {
    ps_server_cfg sc = {.nshards = 2, .model = F.m, .placement = F.pl, .shard = i};
    assert_int_equal(ps_server_create(&sc, &F.srv[i]), CM_OK);
    int port = 0;
    assert_int_equal(ps_server_start(F.srv[i], F.addr[i], &port), CM_OK);
}

/* Stop everything; the servers must go away promptly. */
static void fx_stop(void) {
    fixture *f = &F;
    rpc_channel_close(f->ch);
    rpc_client_destroy(f->raw);
    ps_client_close(f->cli[0]);
    ps_client_close(f->cli[1]);
    for (int i = 0; i < 2; i++) destroy_promptly(f->srv[i]);
    free(f->init);
    cm_placement_destroy(f->pl);
    cm_model_destroy(f->m);
    memset(f, 0, sizeof *f);
}

static ps_init_cfg init_cfg(void) {
    ps_init_cfg c = {.optim = ps_optim_defaults(PS_OPTIM_SGD, LR), .seed = SEED,
                     .num_workers = 2};
    return c;
}

static void init_ok(void) {
    ps_init_cfg c = init_cfg();
    char err[512] = "";
    if (ps_client_init(F.cli[0], &c, err, sizeof err) != CM_OK) fail_msg("%s", err);
}

/* Multiples of 1/32 in [-0.5, 0.5]: means and LR * mean are exact. */
static void grad_fill(float *g, size_t n, int worker, int64_t step) {
    for (size_t i = 0; i < n; i++)
        g[i] = (float)((int)((i * 7 + (size_t)worker * 13 + (size_t)step * 5) % 33) - 16) /
               32.0f;
}

/* ref -= LR * mean over both workers' gradients of 'step'. */
static void ref_step(float *ref, int64_t step) {
    size_t n = F.m->numel;
    float *g0 = malloc(n * sizeof *g0), *g1 = malloc(n * sizeof *g1);
    assert_true(g0 && g1);
    grad_fill(g0, n, 0, step);
    grad_fill(g1, n, 1, step);
    for (size_t i = 0; i < n; i++) ref[i] = ref[i] - LR * ((g0[i] + g1[i]) / 2.0f);
    free(g0);
    free(g1);
}

static void expect_same(const float *want, const float *got, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (memcmp(&want[i], &got[i], sizeof(float)) != 0) {
            fprintf(stderr, "element %zu: want %.9g got %.9g\n", i, (double)want[i],
                    (double)got[i]);
            fail();
        }
    }
}

/* Push rank r's deterministic gradient for 'step' through ps_client. */
static int client_push(int r, int64_t step, int64_t *version, char *err, size_t errlen) {
    float *g = malloc(F.m->numel * sizeof *g);
    assert_non_null(g);
    grad_fill(g, F.m->numel, r, step);
    ps_ticket *t = NULL;
    assert_int_equal(ps_client_push(F.cli[r], step, g, &t), CM_OK);
    int rc = ps_ticket_wait(t, version, err, errlen);
    /* Aborted, the wait does not wait for the other shard's call: g is ours
     * again only after ps_client_quiesce (ps_client.h). */
    if (rc == CM_EABORTED || rc == CM_ESKIPPED)
        assert_int_equal(ps_client_quiesce(F.cli[r], 10000), CM_OK);
    free(g);
    return rc;
}

static void client_push_ok(int r, int64_t step, int64_t want_version) {
    char err[512] = "";
    int64_t v = -1;
    if (client_push(r, step, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(v, want_version);
}

/* Pull everything at version >= min_version and compare with want. */
static void expect_values(int64_t min_version, int64_t want_version, const float *want) {
    float *got = malloc(F.m->numel * sizeof *got);
    assert_non_null(got);
    memset(got, 0xff, F.m->numel * sizeof *got);
    ps_ticket *t = NULL;
    assert_int_equal(ps_client_pull(F.cli[0], min_version, got, &t), CM_OK);
    char err[512] = "";
    int64_t v = -1;
    if (ps_ticket_wait(t, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(v, want_version);
    expect_same(want, got, F.m->numel);
    free(got);
}

static ps_client_stats stats(void) {
    ps_client_stats st;
    char err[512] = "";
    if (ps_client_stats_get(F.cli[0], &st, err, sizeof err) != CM_OK) fail_msg("%s", err);
    return st;
}

/* A raw call to shard 0; returns the gRPC code, the message in msg. */
static int raw_bytes(const char *method, const void *req, size_t len, int64_t deadline_ms,
                     char *msg, size_t msglen, uint8_t **reply, size_t *rlen) {
    uint8_t *r = NULL;
    size_t n = 0;
    int code = rpc_call_sync(F.ch, method, req, len, deadline_ms, 0, &r, &n, msg, msglen);
    if (reply) {
        *reply = r;
        *rlen = n;
    } else {
        free(r);
    }
    return code;
}

static int raw_msg(const char *method, const ProtobufCMessage *m, int64_t deadline_ms,
                   char *msg, size_t msglen, uint8_t **reply, size_t *rlen) {
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    assert_non_null(buf);
    protobuf_c_message_pack(m, buf);
    int code = raw_bytes(method, buf, n, deadline_ms, msg, msglen, reply, rlen);
    free(buf);
    return code;
}

/* Expect 'code' and every one of the NULL-terminated substrings. */
static void expect_fail(int got, const char *msg, int want, ...) {
    if (got != want) fail_msg("got %s '%s', want %s", rpc_status_name(got), msg,
                              rpc_status_name(want));
    va_list ap;
    va_start(ap, want);
    for (const char *s = va_arg(ap, const char *); s; s = va_arg(ap, const char *))
        if (!strstr(msg, s)) {
            va_end(ap);
            fail_msg("message '%s' lacks '%s'", msg, s);
        }
    va_end(ap);
}

/* A PushRequest for shard 0 built by protobuf-c (not ps_wire), from a
 * whole-model gradient. Mutate the fields, then send with raw_msg. */
typedef struct raw_push {
    Psrpc__Cluster cl;
    Psrpc__PushRequest req;
    Psrpc__Tensor t[8];
    Psrpc__Tensor *tp[8];
    uint64_t shape[8][CM_VAR_MAX_DIMS];
    int kern; /* Index of a 2-D partition in t. */
} raw_push;

static void raw_push_make(raw_push *rp, uint32_t rank, int64_t step, const float *full) {
    memset(rp, 0, sizeof *rp);
    psrpc__cluster__init(&rp->cl);
    rp->cl.fingerprint = F.fp;
    rp->cl.description = F.desc;
    rp->cl.rank = rank;
    psrpc__push_request__init(&rp->req);
    rp->req.cluster = &rp->cl;
    rp->req.step = step;
    rp->req.grads = rp->tp;
    rp->kern = -1;
    for (int i = 0; i < F.pl->nparts; i++) {
        const cm_partition *p = &F.pl->parts[i];
        if (p->shard != 0) continue;
        const cm_var *v = &F.m->vars[p->var];
        size_t k = rp->req.n_grads++;
        CHECK(k < 8);
        Psrpc__Tensor *t = &rp->t[k];
        psrpc__tensor__init(t);
        t->part = (uint32_t)i;
        t->dtype = PSRPC__DTYPE__DTYPE_FLOAT32;
        rp->shape[k][0] = p->row_end - p->row_begin;
        for (int d = 1; d < v->ndims; d++) rp->shape[k][d] = (uint64_t)v->dims[d];
        t->n_shape = (size_t)v->ndims;
        t->shape = rp->shape[k];
        t->data.len = p->count * sizeof(float);
        t->data.data = (uint8_t *)(full + p->offset);
        rp->tp[k] = t;
        if (v->ndims == 2 && rp->kern < 0) rp->kern = (int)k;
    }
    CHECK(rp->kern >= 0 && rp->req.n_grads >= 2);
}

static Psrpc__Cluster good_cluster(void) {
    Psrpc__Cluster c = PSRPC__CLUSTER__INIT;
    c.fingerprint = F.fp;
    c.description = F.desc;
    return c;
}

/* Stats of shard 0 alone, over a raw call. */
static Psrpc__StatsReply *raw_stats(void) {
    Psrpc__Cluster cl = good_cluster();
    Psrpc__StatsRequest req = PSRPC__STATS_REQUEST__INIT;
    req.cluster = &cl;
    char msg[512];
    uint8_t *reply = NULL;
    size_t len = 0;
    int code = raw_msg("/psrpc.Ps/Stats", &req.base, DEADLINE, msg, sizeof msg, &reply, &len);
    if (code != RPC_OK) fail_msg("Stats: %s %s", rpc_status_name(code), msg);
    Psrpc__StatsReply *r = psrpc__stats_reply__unpack(NULL, len, reply);
    free(reply);
    assert_non_null(r);
    return r;
}

/* The server answers and holds version 'v' with values 'want'. */
static void expect_unchanged(int64_t v, const float *want) {
    Psrpc__StatsReply *st = raw_stats();
    assert_int_equal(st->version, v);
    psrpc__stats_reply__free_unpacked(st, NULL);
    expect_values(0, v, want);
}

/* ===== Lifecycle ===== */

static void test_create_and_start_errors(void **state) {
    (void)state;
    static const int sizes[] = {784, 64, 10};
    cm_model *m = NULL;
    cm_placement *pl = NULL;
    assert_int_equal(cm_model_create_mlp(sizes, 3, &m), CM_OK);
    assert_int_equal(cm_placement_create(m, 2, MIN_PART, &pl), CM_OK);
    ps_server_cfg sc = {.model = m, .placement = pl, .shard = 2};
    ps_server *s = (ps_server *)1;
    assert_int_equal(ps_server_create(&sc, &s), CM_EINVAL);
    assert_null(s);
    /* A model without its placement, and a row store that cannot be made:
     * refused with an error, not a crash. */
    ps_server_cfg half = {.model = m, .shard = 0};
    assert_int_equal(ps_server_create(&half, &s), CM_EINVAL);
    assert_null(s);
    ps_server_cfg norows = {.model = m, .placement = pl, .rows_dir = "/proc/no/such/dir"};
    assert_int_equal(ps_server_create(&norows, &s), CM_EIO);
    assert_null(s);

    sc.shard = 0;
    assert_int_equal(ps_server_create(&sc, &s), CM_OK);
    int port = 0;
    assert_int_equal(ps_server_start(s, "127.0.0.1:0", &port), CM_OK);
    ps_server *s2 = NULL;
    assert_int_equal(ps_server_create(&sc, &s2), CM_OK);
    char addr[32];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    int port2 = 0;
    assert_int_equal(ps_server_start(s2, addr, &port2), CM_EBUSY);
    ps_server_destroy(s2, 0);

    /* Not stopping: wait times out; request_stop wakes it with the reason. */
    assert_int_equal(ps_server_wait(s, 0), 0);
    int64_t t0 = now_ms();
    assert_int_equal(ps_server_wait(s, 50), 0);
    assert_true(now_ms() - t0 >= 40);
    assert_string_equal(ps_server_stop_reason(s), "");
    ps_server_request_stop(s, "signal 15");
    assert_int_equal(ps_server_wait(s, 2000), 1);
    assert_int_equal(ps_server_wait(s, -1), 1);
    ps_server_request_stop(s, "later"); /* The first reason stays. */
    assert_string_equal(ps_server_stop_reason(s), "signal 15");
    ps_server_destroy(s, 0);
    ps_server_destroy(NULL, 0);
    cm_placement_destroy(pl);
    cm_model_destroy(m);
}

/* ===== Happy path through ps_client ===== */

/* A raw Pull of shard 0 (of the partitions 'parts', or all with n 0)
 * that must succeed; the reply, to free_unpacked. */
static Psrpc__PullReply *raw_pull_ok(int64_t min_version, uint32_t *parts, size_t n) {
    Psrpc__Cluster cl = good_cluster();
    Psrpc__PullRequest pr = PSRPC__PULL_REQUEST__INIT;
    pr.cluster = &cl;
    pr.min_version = min_version;
    pr.n_parts = n;
    pr.parts = parts;
    uint8_t *reply = NULL;
    size_t len = 0;
    char msg[512];
    int code = raw_msg("/psrpc.Ps/Pull", &pr.base, DEADLINE, msg, sizeof msg, &reply, &len);
    if (code != RPC_OK) fail_msg("raw pull: %s %s", rpc_status_name(code), msg);
    Psrpc__PullReply *rep = psrpc__pull_reply__unpack(NULL, len, reply);
    free(reply);
    assert_non_null(rep);
    return rep;
}

static void test_client_happy_path(void **state) {
    (void)state;
    fx_start(0);
    size_t n = F.m->numel;
    float *ref = malloc(n * sizeof *ref);
    assert_non_null(ref);
    memcpy(ref, F.init, n * sizeof *ref);

    init_ok();
    /* The other worker's init with the same config is a no-op. */
    ps_init_cfg c = init_cfg();
    char err[512] = "";
    if (ps_client_init(F.cli[1], &c, err, sizeof err) != CM_OK) fail_msg("%s", err);
    expect_values(0, 0, ref);

    /* A pull for version 1 waits on both shards until step 0 applies. */
    float *pulled = malloc(n * sizeof *pulled);
    assert_non_null(pulled);
    ps_ticket *pt = NULL;
    assert_int_equal(ps_client_pull(F.cli[1], 1, pulled, &pt), CM_OK);

    client_push_ok(0, 0, 0);
    client_push_ok(1, 0, 1);
    ref_step(ref, 0);
    int64_t v = -1;
    if (ps_ticket_wait(pt, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(v, 1);
    expect_same(ref, pulled, n);
    expect_values(1, 1, ref);

    /* A retried push (a lost reply) is OK and not counted again. */
    client_push_ok(0, 0, 1);
    expect_values(0, 1, ref);

    client_push_ok(1, 1, 1);
    client_push_ok(0, 1, 2);
    ref_step(ref, 1);
    expect_values(2, 2, ref);

    ps_client_stats st = stats();
    assert_int_equal(st.min_version, 2);
    assert_int_equal(st.pushes, 8);           /* 4 pushes x 2 shards. */
    assert_int_equal(st.duplicate_pushes, 2); /* 1 retry x 2 shards. */
    assert_int_equal(st.stale_pushes, 0);
    assert_int_equal(st.early_pushes, 0);
    assert_int_equal(st.bad_requests, 0);
    assert_int_equal(st.pulls, 2 * 5); /* 5 pulls x 2 shards. */

    /* Init with another config: FAILED_PRECONDITION naming both. */
    c.optim.lr = 0.25f;
    assert_int_equal(ps_client_init(F.cli[0], &c, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "FAILED_PRECONDITION"));
    assert_non_null(strstr(err, "already initialised"));
    assert_non_null(strstr(err, "sgd lr=0.5 seed=7 workers=2 sync mean"));
    assert_non_null(strstr(err, "sgd lr=0.25 seed=7 workers=2 sync mean"));
    expect_values(0, 2, ref);

    /* The raw pull reply is plain protobuf: protobuf-c reads ps_wire's
     * zero-copy framing. */
    Psrpc__PullReply *rep = raw_pull_ok(2, NULL, 0);
    assert_int_equal(rep->version, 2);
    assert_int_equal(rep->n_params, (size_t)F.pl->shard_nparts[0]);
    for (size_t i = 0; i < rep->n_params; i++) {
        const Psrpc__Tensor *t = rep->params[i];
        assert_true(t->part < (uint32_t)F.pl->nparts);
        const cm_partition *p = &F.pl->parts[t->part];
        const cm_var *var = &F.m->vars[p->var];
        assert_int_equal(p->shard, 0);
        assert_int_equal(t->dtype, PSRPC__DTYPE__DTYPE_FLOAT32);
        assert_int_equal(t->n_shape, (size_t)var->ndims);
        assert_int_equal(t->shape[0], p->row_end - p->row_begin);
        assert_int_equal(t->data.len, p->count * sizeof(float));
        assert_memory_equal(t->data.data, ref + p->offset, t->data.len);
    }
    psrpc__pull_reply__free_unpacked(rep, NULL);
    free(pulled);
    free(ref);
    fx_stop();
}

/* ===== Large pushes and pulls as several calls ===== */

/* A client whose calls carry at most one partition (call_bytes 1), with
 * this deadline and call window (0: the default), for sync or async shards. */
static ps_client *open_split_client(int rank, int64_t deadline_ms, int window, int async) {
    ps_client_cfg cc = {.model = F.m, .placement = F.pl, .ps_addrs = F.addrs, .rank = rank,
                        .deadline_ms = deadline_ms, .connect_timeout_ms = 2000,
                        .call_bytes = 1, .call_window = window, .async = async};
    ps_client *c = NULL;
    char err[256] = "";
    if (ps_client_open(&cc, &c, err, sizeof err) != CM_OK) fail_msg("%s", err);
    return c;
}

/* Async, a client whose pushes to a shard go as several calls (call_bytes
 * 1, PushRequest.step_parts): a step is one version of each shard, not one
 * a call, through push then pull and push-pull, and each step is one
 * update of the values, exactly. */
static void test_client_async_split_one_version(void **state) {
    (void)state;
    fx_start(0);
    size_t n = F.m->numel;
    float *ref = malloc(n * sizeof *ref), *got = malloc(n * sizeof *got),
          *g = malloc(n * sizeof *g);
    assert_true(ref && got && g);
    memcpy(ref, F.init, n * sizeof *ref);
    char err[512] = "";
    ps_init_cfg ic = init_cfg();
    ic.async = 1;
    if (ps_client_init(F.cli[0], &ic, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_true(F.pl->shard_nparts[0] >= 2 && F.pl->shard_nparts[1] >= 2);
    ps_client *c = open_split_client(0, DEADLINE, 0, 1);
    for (int64_t step = 0; step < 4; step++) {
        ps_ticket *t;
        int64_t v = -1;
        grad_fill(g, n, 0, step);
        for (size_t i = 0; i < n; i++) ref[i] = ref[i] - LR * g[i];
        memset(got, 0xff, n * sizeof *got);
        if (step < 2) {
            assert_int_equal(ps_client_push(c, step, g, &t), CM_OK);
            if (ps_ticket_wait(t, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
            assert_int_equal(ps_client_pull(c, 0, got, &t), CM_OK);
        } else {
            assert_int_equal(ps_client_push_pull(c, step, g, got, &t), CM_OK);
        }
        if (ps_ticket_wait(t, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
        assert_int_equal(v, step + 1);
        expect_same(ref, got, n);
    }
    ps_client_stats st = stats();
    assert_true(st.pushes > 4 * 2); /* Split: more calls than shards. */
    assert_int_equal(st.bad_requests, 0);
    ps_client_close(c);
    free(ref);
    free(got);
    free(g);
    fx_stop();
}

/* The calls a client with call_bytes max makes to shard sh: its partitions
 * in order, cut before one that would take a call past the limit, which is
 * max or a sixteenth of the shard's bytes, whichever is more, raised by
 * quarters until there are at most PS_CLIENT_MAX_CALLS calls. */
static int cut_calls(const cm_placement *pl, int sh, size_t lim) {
    int n = 0, open = 0;
    size_t bytes = 0;
    for (int i = 0; i < pl->nparts; i++) {
        if (pl->parts[i].shard != sh) continue;
        size_t b = pl->parts[i].count * sizeof(float);
        if (!open || bytes + b > lim) {
            n++;
            open = 1;
            bytes = 0;
        }
        bytes += b;
    }
    return n;
}

static int shard_calls(const cm_placement *pl, int sh, size_t max) {
    size_t total = 0;
    for (int i = 0; i < pl->nparts; i++)
        if (pl->parts[i].shard == sh) total += pl->parts[i].count * sizeof(float);
    size_t lim = (total + PS_CLIENT_MAX_CALLS - 1) / PS_CLIENT_MAX_CALLS;
    if (lim < max) lim = max;
    while (cut_calls(pl, sh, lim) > PS_CLIENT_MAX_CALLS) lim += lim / 4 + 1;
    return cut_calls(pl, sh, lim);
}

/* Clients whose calls carry at most one partition (call_bytes 1: a shard's
 * pushes and pulls go as one call a partition, all at once) train exactly
 * as whole calls do, through push then pull and through push-pull; the
 * shards see one push per partition. A Pull naming some partitions
 * (PullRequest.parts) gets exactly those, in that order; one naming
 * another shard's, one twice, one that does not exist, or with or_final
 * is refused with INVALID_ARGUMENT. */
static void test_client_calls_split(void **state) {
    (void)state;
    fx_start(0);
    size_t n = F.m->numel;
    float *ref = malloc(n * sizeof *ref), *got = malloc(n * sizeof *got),
          *g = malloc(n * sizeof *g);
    assert_true(ref && got && g);
    memcpy(ref, F.init, n * sizeof *ref);
    init_ok();
    assert_true(F.pl->shard_nparts[0] >= 2);
    ps_client *cl[2];
    for (int r = 0; r < 2; r++) cl[r] = open_split_client(r, DEADLINE, 0, 0);
    char err[512] = "";
    int64_t v = -1;
    float *g1 = malloc(n * sizeof *g1), *got1 = malloc(n * sizeof *got1);
    assert_true(g1 && got1);
    float *grad[2] = {g, g1}, *out[2] = {got, got1};
    for (int64_t step = 0; step < 4; step++) {
        ps_ticket *t[2];
        for (int r = 0; r < 2; r++) grad_fill(grad[r], n, r, step);
        ref_step(ref, step);
        if (step < 2) { /* Push, then pull. */
            for (int r = 0; r < 2; r++) {
                assert_int_equal(ps_client_push(cl[r], step, grad[r], &t[r]), CM_OK);
                if (ps_ticket_wait(t[r], &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
            }
            memset(got, 0xff, n * sizeof *got);
            assert_int_equal(ps_client_pull(cl[step & 1], step + 1, got, &t[0]), CM_OK);
            if (ps_ticket_wait(t[0], &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
            assert_int_equal(v, step + 1);
            expect_same(ref, got, n);
        } else { /* Push-pull: each reply waits for the other worker's push. */
            for (int r = 0; r < 2; r++) {
                memset(out[r], 0xff, n * sizeof *out[r]);
                assert_int_equal(ps_client_push_pull(cl[r], step, grad[r], out[r], &t[r]), CM_OK);
            }
            for (int r = 0; r < 2; r++) {
                if (ps_ticket_wait(t[r], &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
                assert_int_equal(v, step + 1);
                expect_same(ref, out[r], n);
            }
        }
    }
    free(g1);
    free(got1);
    /* One push a call: 4 steps x 2 workers x each shard's calls, which are
     * its partitions in order, cut where a call would pass 1 byte or a
     * sixteenth of the shard's bytes (PS_CLIENT_MAX_CALLS), whichever is
     * more: here the small partitions (biases) share a call. */
    int calls = shard_calls(F.pl, 0, 1) + shard_calls(F.pl, 1, 1);
    assert_true(calls > 2); /* Split: more calls than shards. */
    ps_client_stats st = stats();
    assert_int_equal(st.pushes, (uint64_t)(4 * 2 * calls));
    assert_int_equal(st.bad_requests, 0);

    /* A raw Pull of some partitions of shard 0, the last first. */
    int np0 = F.pl->shard_nparts[0];
    uint32_t mine[2] = {0, 0};
    int k = 0;
    for (int i = F.pl->nparts - 1; i >= 0 && k < 2; i--)
        if (F.pl->parts[i].shard == 0) mine[k++] = (uint32_t)i;
    assert_int_equal(k, 2);
    Psrpc__PullReply *rep = raw_pull_ok(4, mine, 2);
    assert_int_equal(rep->n_params, 2);
    for (int i = 0; i < 2; i++) {
        const cm_partition *p = &F.pl->parts[mine[i]];
        assert_int_equal(rep->params[i]->part, mine[i]);
        assert_int_equal(rep->params[i]->data.len, p->count * sizeof(float));
        assert_memory_equal(rep->params[i]->data.data, ref + p->offset, p->count * sizeof(float));
    }
    psrpc__pull_reply__free_unpacked(rep, NULL);
    assert_true(np0 < F.pl->nparts);
    Psrpc__Cluster c0 = good_cluster();
    Psrpc__PullRequest pr = PSRPC__PULL_REQUEST__INIT;
    pr.cluster = &c0;
    pr.min_version = 4;
    char msg[512];
    uint32_t other = 0;
    for (int i = 0; i < F.pl->nparts; i++)
        if (F.pl->parts[i].shard == 1) other = (uint32_t)i;
    struct { uint32_t parts[2]; size_t n; int or_final; const char *says; } bad[] = {
        {{mine[0], other}, 2, 0, "belongs to another shard"},
        {{mine[0], mine[0]}, 2, 0, "asked for twice"},
        {{(uint32_t)F.pl->nparts, 0}, 1, 0, "no such partition"},
        {{mine[0], 0}, 1, 1, "cannot be or_final"},
    };
    for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
        pr.parts = bad[b].parts;
        pr.n_parts = bad[b].n;
        pr.or_final = bad[b].or_final;
        int code = raw_msg("/psrpc.Ps/Pull", &pr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
        expect_fail(code, msg, RPC_INVALID_ARGUMENT, bad[b].says, NULL);
    }
    expect_values(4, 4, ref); /* Nothing changed. */
    /* Every shard gone: all the split calls of a pull and of a push fail
     * UNAVAILABLE and are retried together until connect_timeout_ms (more
     * of them than shards: the retry list holds every one), then the
     * error names a PS. */
    for (int i = 0; i < 2; i++) {
        destroy_promptly(F.srv[i]);
        F.srv[i] = NULL;
    }
    ps_ticket *t = NULL;
    assert_int_equal(ps_client_pull(cl[0], 0, got, &t), CM_OK);
    assert_int_not_equal(ps_ticket_wait(t, &v, err, sizeof err), CM_OK);
    if (!strstr(err, "UNAVAILABLE") || !strstr(err, "pull to PS"))
        fail_msg("unexpected error: %s", err);
    assert_int_equal(ps_client_push(cl[1], 4, g, &t), CM_OK);
    assert_int_not_equal(ps_ticket_wait(t, &v, err, sizeof err), CM_OK);
    if (!strstr(err, "push to PS")) fail_msg("unexpected error: %s", err);
    ps_client_close(cl[0]);
    ps_client_close(cl[1]);
    free(ref);
    free(got);
    free(g);
    fx_stop();
}

/* The call window: with call_window 1 a worker's push-pull sends each
 * shard's first call only, the next when that one ends, and a call ends
 * once every worker pushed it: so the shards see one push a shard from
 * worker 0 until worker 1 pushes too. All at once (-1), every call is in
 * at the shards before worker 1 pushes anything. Either way both workers
 * get exactly the step's parameters, and the shards see each call once.
 * Then a ticket abandoned with calls queued, and a failure. */
static void test_client_call_window(void **state) {
    (void)state;
    fx_start(0);
    size_t n = F.m->numel;
    float *ref = malloc(n * sizeof *ref), *g[2], *out[2];
    assert_non_null(ref);
    for (int r = 0; r < 2; r++) {
        g[r] = malloc(n * sizeof *g[r]);
        out[r] = malloc(n * sizeof *out[r]);
        assert_true(g[r] && out[r]);
    }
    memcpy(ref, F.init, n * sizeof *ref);
    init_ok();
    int windows[2] = {1, -1};
    ps_client *cl[2][2];
    for (int k = 0; k < 2; k++)
        for (int r = 0; r < 2; r++) cl[k][r] = open_split_client(r, DEADLINE, windows[k], 0);
    /* Calls a push-pull makes: one a partition (biases may share one). */
    uint64_t before = stats().pushes;
    ps_ticket *t[2];
    char err[512] = "";
    int64_t v = -1;
    for (int r = 0; r < 2; r++) grad_fill(g[r], n, r, 0);
    ref_step(ref, 0);
    for (int r = 0; r < 2; r++)
        assert_int_equal(ps_client_push_pull(cl[1][r], 0, g[r], out[r], &t[r]), CM_OK);
    for (int r = 0; r < 2; r++) {
        if (ps_ticket_wait(t[r], &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
        expect_same(ref, out[r], n);
    }
    uint64_t calls = (stats().pushes - before) / 2;
    assert_true(calls > 2); /* More calls than shards, else nothing is queued. */
    for (int64_t step = 1; step < 3; step++) {
        int k = step == 1 ? 0 : 1; /* Window 1, then all at once. */
        for (int r = 0; r < 2; r++) grad_fill(g[r], n, r, step);
        ref_step(ref, step);
        before = stats().pushes;
        assert_int_equal(ps_client_push_pull(cl[k][0], step, g[0], out[0], &t[0]), CM_OK);
        uint64_t want = k == 0 ? 2 : calls; /* In flight alone: a call a shard, or all. */
        for (int i = 0; i < 500 && stats().pushes - before < want; i++) sleep_ms(10);
        sleep_ms(200); /* Room for any call the window should have held. */
        assert_int_equal(stats().pushes - before, want);
        assert_int_equal(ps_client_push_pull(cl[k][1], step, g[1], out[1], &t[1]), CM_OK);
        for (int r = 0; r < 2; r++) {
            if (ps_ticket_wait(t[r], &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
            assert_int_equal(v, step + 1);
            expect_same(ref, out[r], n);
        }
        assert_int_equal(stats().pushes - before, 2 * calls);
    }
    /* Abandoned with calls queued: none of them starts, not even when the
     * calls in flight end (worker 1's first calls complete them), so
     * worker 1's next calls wait for pushes that never come and fail at
     * their deadline; that failure sends none of worker 1's queued calls
     * either: each shard saw at most worker 0's first and worker 1's first
     * two. */
    ps_client *ab[2];
    for (int r = 0; r < 2; r++) {
        ab[r] = open_split_client(r, 1000, 1, 0);
        grad_fill(g[r], n, r, 3);
    }
    before = stats().pushes;
    assert_int_equal(ps_client_push_pull(ab[0], 3, g[0], out[0], &t[0]), CM_OK);
    for (int i = 0; i < 500 && stats().pushes - before < 2; i++) sleep_ms(10);
    ps_tickets_abandon(&t[0], 1);
    assert_int_equal(ps_client_push_pull(ab[1], 3, g[1], out[1], &t[1]), CM_OK);
    assert_int_not_equal(ps_ticket_wait(t[1], &v, err, sizeof err), CM_OK);
    if (!strstr(err, "DEADLINE_EXCEEDED")) fail_msg("unexpected error: %s", err);
    sleep_ms(200);
    uint64_t sent = stats().pushes - before;
    assert_true(sent >= 5 && sent <= 6);
    for (int r = 0; r < 2; r++) ps_client_close(ab[r]);
    for (int k = 0; k < 2; k++)
        for (int r = 0; r < 2; r++) ps_client_close(cl[k][r]);
    for (int r = 0; r < 2; r++) {
        free(g[r]);
        free(out[r]);
    }
    free(ref);
    fx_stop();
}

typedef struct late_push {
    ps_client *c;
    int64_t step;
    const float *g;
    float *out;
    int rc;
    char err[512];
} late_push;

/* Worker 1's push-pull of lp->step, 150 ms late. */
static void *push_pull_late(void *ud) {
    late_push *lp = ud;
    sleep_ms(150);
    ps_ticket *t;
    int64_t v;
    lp->rc = ps_client_push_pull(lp->c, lp->step, lp->g, lp->out, &t);
    if (lp->rc == CM_OK) lp->rc = ps_ticket_wait(t, &v, lp->err, sizeof lp->err);
    return NULL;
}

/* A ticket wakes its waiter once, not once a call or a segment: worker 0's
 * push-pull (one call a partition, all at once) sleeps until worker 1
 * pushes, 150 ms later; its segments are sent meanwhile and its calls end
 * after, and the wait is never woken to find the ticket still busy. Both
 * train exactly. */
static void test_client_wakes_once(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    size_t n = F.m->numel;
    float *ref = malloc(n * sizeof *ref), *g[2], *out[2];
    assert_non_null(ref);
    for (int r = 0; r < 2; r++) {
        assert_non_null(g[r] = malloc(n * sizeof *g[r]));
        assert_non_null(out[r] = malloc(n * sizeof *out[r]));
    }
    memcpy(ref, F.init, n * sizeof *ref);
    ps_client *cl[2];
    for (int r = 0; r < 2; r++) cl[r] = open_split_client(r, DEADLINE, -1, 0);
    char err[512] = "";
    for (int64_t step = 0; step < 3; step++) {
        ref_step(ref, step);
        for (int r = 0; r < 2; r++) {
            grad_fill(g[r], n, r, step);
            memset(out[r], 0xff, n * sizeof *out[r]);
        }
        late_push lp = {.c = cl[1], .step = step, .g = g[1], .out = out[1], .rc = -1};
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, push_pull_late, &lp), 0);
        ps_ticket *t;
        int64_t v = -1;
        assert_int_equal(ps_client_push_pull(cl[0], step, g[0], out[0], &t), CM_OK);
        if (ps_ticket_wait(t, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
        assert_int_equal(pthread_join(th, NULL), 0);
        if (lp.rc != CM_OK) fail_msg("worker 1: %s", lp.err);
        assert_int_equal(v, step + 1);
        for (int r = 0; r < 2; r++) expect_same(ref, out[r], n);
    }
    uint64_t spun = 0, slept = 0, vain = 0;
    ps_client_wait_counts(cl[0], &spun, &slept, &vain);
    assert_int_equal(slept, 3); /* Each wait slept, 150 ms... */
    assert_int_equal(ps_client_wakeups_in_vain(cl[0]), 0); /* ...woken once. */
    assert_true(stats().pushes >= 3 * 2 * 3); /* More calls than shards. */
    for (int r = 0; r < 2; r++) {
        ps_client_close(cl[r]);
        free(g[r]);
        free(out[r]);
    }
    free(ref);
    fx_stop();
}

/* A client closed as soon as its wait returns, 40 times over: the last
 * reply's broadcast comes after the client's lock is released (on_done),
 * and close must still not free the client under it (it joins the thread
 * that broadcasts; ASan would see a use after free). Every pull, one call a
 * partition, gets the initial values. */
static void test_client_close_right_after_wait(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    size_t n = F.m->numel;
    float *got = malloc(n * sizeof *got);
    assert_non_null(got);
    char err[512] = "";
    for (int k = 0; k < 40; k++) {
        ps_client *c = open_split_client(k & 1, DEADLINE, -1, 0);
        ps_ticket *t;
        int64_t v = -1;
        memset(got, 0xff, n * sizeof *got);
        assert_int_equal(ps_client_pull(c, 0, got, &t), CM_OK);
        if (ps_ticket_wait(t, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
        ps_client_close(c);
        assert_int_equal(v, 0);
        expect_same(F.init, got, n);
    }
    free(got);
    fx_stop();
}

/* cfg.spin_us: a waiter that spins longer than any reply takes never
 * sleeps, one that does not spin sleeps (unless the reply's round trip
 * beat it to its wait, which with streams can be every time), and all
 * train exactly. ps_client_wait_counts
 * counts every wait once. A spin of 1 µs is mostly in vain (a reply takes
 * a round trip, unless its one sched_yield lets the reply in): after the
 * first in vain the next 16 waits do not spin, so of 10 waits at most one
 * spins in vain, and a wait sleeps only after it. */
static void test_client_spin(void **state) {
    (void)state;
    fx_start(0);
    size_t n = F.m->numel;
    float *ref = malloc(n * sizeof *ref), *got = malloc(n * sizeof *got), *g[2];
    assert_true(ref && got);
    for (int r = 0; r < 2; r++) assert_non_null(g[r] = malloc(n * sizeof *g[r]));
    memcpy(ref, F.init, n * sizeof *ref);
    init_ok();
    char err[512] = "";
    int64_t v = -1, step = 0;
    const int spins[3] = {0, 1000000, 1}, steps = 5;
    for (int k = 0; k < 3; k++) {
        ps_client *cl[2];
        for (int r = 0; r < 2; r++) {
            ps_client_cfg cc = {.model = F.m, .placement = F.pl, .ps_addrs = F.addrs,
                                .rank = r, .deadline_ms = DEADLINE,
                                .connect_timeout_ms = 2000, .spin_us = spins[k]};
            if (ps_client_open(&cc, &cl[r], err, sizeof err) != CM_OK) fail_msg("%s", err);
        }
        for (int i = 0; i < steps; i++, step++) {
            ps_ticket *t;
            ref_step(ref, step);
            for (int r = 0; r < 2; r++) {
                grad_fill(g[r], n, r, step);
                assert_int_equal(ps_client_push(cl[r], step, g[r], &t), CM_OK);
                if (ps_ticket_wait(t, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
            }
            memset(got, 0xff, n * sizeof *got);
            assert_int_equal(ps_client_pull(cl[0], step + 1, got, &t), CM_OK);
            if (ps_ticket_wait(t, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
            assert_int_equal(v, step + 1);
            expect_same(ref, got, n);
        }
        for (int r = 0; r < 2; r++) {
            uint64_t spun = 99, slept = 99, vain = 99;
            ps_client_wait_counts(cl[r], &spun, &slept, &vain);
            uint64_t waits = (uint64_t)steps * (r == 0 ? 2 : 1);
            assert_int_equal(spun + slept, waits);
            if (spins[k] == 1000000) {
                assert_int_equal(slept, 0);
                assert_int_equal(vain, 0);
            } else if (spins[k] == 0) { /* How many sleep is timing: on
                                        * streams under ASan every reply of a
                                        * run has beaten its caller to the
                                        * wait. None spins, so none in vain. */
                assert_int_equal(vain, 0);
            } else { /* Its yield may let the reply in: spins succeed until
                      * the first in vain, after which none is tried. */
                assert_true(vain <= 1);
                assert_int_equal(slept > 0, vain == 1);
            }
            ps_client_close(cl[r]);
        }
    }
    for (int r = 0; r < 2; r++) free(g[r]);
    free(ref);
    free(got);
    fx_stop();
}

/* A call that fails and is not retried (here its deadline: worker 1 never
 * pushes) fails its shard's queued calls with it, unsent: the shards saw
 * one push a shard, not one per deadline. */
static void test_client_call_window_failure(void **state) {
    (void)state;
    fx_start(0);
    size_t n = F.m->numel;
    float *g = malloc(n * sizeof *g), *out = malloc(n * sizeof *out);
    assert_true(g && out);
    init_ok();
    ps_client *cl = open_split_client(0, 600, 1, 0);
    char err[512] = "";
    grad_fill(g, n, 0, 0);
    uint64_t before = stats().pushes;
    ps_ticket *t;
    int64_t v = -1;
    assert_int_equal(ps_client_push_pull(cl, 0, g, out, &t), CM_OK);
    assert_int_not_equal(ps_ticket_wait(t, &v, err, sizeof err), CM_OK);
    if (!strstr(err, "DEADLINE_EXCEEDED")) fail_msg("unexpected error: %s", err);
    sleep_ms(200);
    assert_int_equal(stats().pushes - before, 2); /* One call a shard (2 shards). */
    ps_client_close(cl);
    free(g);
    free(out);
    fx_stop();
}

/* ===== Partial push-pull (overlap) ===== */

/* Worker 0 sends each step in two partial push-pulls (the first partition,
 * then the rest, spanning both shards), worker 1 one whole push-pull: both
 * get exactly the parameters of the whole step, and worker 0's first
 * reply writes only its partition. */
static void test_client_push_pull_parts(void **state) {
    (void)state;
    fx_start(0);
    size_t n = F.m->numel;
    float *ref = malloc(n * sizeof *ref), *g0 = malloc(n * sizeof *g0),
          *g1 = malloc(n * sizeof *g1), *p0 = malloc(n * sizeof *p0),
          *p1 = malloc(n * sizeof *p1);
    assert_true(ref && g0 && g1 && p0 && p1);
    memcpy(ref, F.init, n * sizeof *ref);
    init_ok();
    int np = F.pl->nparts;
    uint32_t *rest = malloc((size_t)np * sizeof *rest);
    assert_non_null(rest);
    for (int i = 1; i < np; i++) rest[np - 1 - i] = (uint32_t)i; /* Any order. */
    uint32_t first = 0;
    char err[512] = "";
    for (int64_t step = 0; step < 3; step++) {
        grad_fill(g0, n, 0, step);
        grad_fill(g1, n, 1, step);
        memset(p0, 0xff, n * sizeof *p0);
        ps_ticket *a = NULL, *b = NULL, *w1 = NULL;
        assert_int_equal(ps_client_push_pull_parts(F.cli[0], step, g0, p0, &first, 1, &a), CM_OK);
        assert_int_equal(ps_client_push_pull_parts(F.cli[0], step, g0, p0, rest, np - 1, &b),
                         CM_OK);
        assert_int_equal(ps_client_push_pull(F.cli[1], step, g1, p1, &w1), CM_OK);
        int64_t va = -1, vb = -1, v1 = -1;
        if (ps_ticket_wait(a, &va, err, sizeof err) != CM_OK) fail_msg("%s", err);
        if (ps_ticket_wait(b, &vb, err, sizeof err) != CM_OK) fail_msg("%s", err);
        if (ps_ticket_wait(w1, &v1, err, sizeof err) != CM_OK) fail_msg("%s", err);
        ref_step(ref, step);
        assert_int_equal(va, step + 1);
        assert_int_equal(vb, step + 1);
        assert_int_equal(v1, step + 1);
        expect_same(ref, p0, n);
        expect_same(ref, p1, n);
        expect_values(step + 1, step + 1, ref);
    }
    /* A partial reply writes its partitions and nothing else. */
    memset(p0, 0xff, n * sizeof *p0);
    ps_ticket *t = NULL;
    grad_fill(g0, n, 0, 3);
    grad_fill(g1, n, 1, 3);
    assert_int_equal(ps_client_push_pull_parts(F.cli[0], 3, g0, p0, &first, 1, &t), CM_OK);
    ps_ticket *w1 = NULL;
    assert_int_equal(ps_client_push_pull(F.cli[1], 3, g1, p1, &w1), CM_OK);
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ref_step(ref, 3);
    const cm_partition *fp = &F.pl->parts[0];
    for (size_t i = 0; i < n; i++) {
        int inside = i >= fp->offset && i < fp->offset + fp->count;
        uint32_t bits;
        memcpy(&bits, &p0[i], sizeof bits);
        if (inside)
            expect_same(&ref[i], &p0[i], 1);
        else if (bits != 0xffffffffu)
            fail_msg("element %zu outside the partition was written", i);
    }
    assert_int_equal(ps_client_push_pull_parts(F.cli[0], 3, g0, p0, rest, np - 1, &t), CM_OK);
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    if (ps_ticket_wait(w1, NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    expect_same(ref, p0, n);
    /* Bad lists: no ticket. */
    uint32_t twice[2] = {0, 0}, unknown = (uint32_t)np;
    t = (ps_ticket *)1;
    assert_int_equal(ps_client_push_pull_parts(F.cli[0], 4, g0, p0, twice, 2, &t), CM_EINVAL);
    assert_null(t);
    assert_int_equal(ps_client_push_pull_parts(F.cli[0], 4, g0, p0, &unknown, 1, &t), CM_EINVAL);
    assert_int_equal(ps_client_push_pull_parts(F.cli[0], 4, g0, p0, rest, 0, &t), CM_EINVAL);
    free(rest);
    free(ref);
    free(g0);
    free(g1);
    free(p0);
    free(p1);
    fx_stop();
}

/* ===== bfloat16 pushes ===== */

static ps_client *open_bf16_client(int rank) {
    ps_client_cfg cc = {.model = F.m, .placement = F.pl, .ps_addrs = F.addrs, .rank = rank,
                        .deadline_ms = DEADLINE, .connect_timeout_ms = 2000, .wire_bf16 = 1};
    ps_client *c = NULL;
    char err[256] = "";
    if (ps_client_open(&cc, &c, err, sizeof err) != CM_OK) fail_msg("%s", err);
    return c;
}

/* ref -= LR * (a + b) / 2, as the shard computes it. */
static void ref_apply(float *ref, const float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) ref[i] = ref[i] - LR * ((a[i] + b[i]) / 2.0f);
}

/* Clients with wire_bf16 through every push path: Push and PushPull of the
 * whole gradient, the partial push-pulls of the overlap (one partition,
 * then the rest over both shards), mixed with a float32 worker in one
 * step, and a push-pull abandoned while its call waits (the ticket's bf16
 * buffer must outlive it; ASan checks). Each step's values are, bit for
 * bit, those of the float32 gradients rounded to bfloat16. */
static void test_client_bf16_pushes(void **state) {
    (void)state;
    fx_start(0);
    size_t n = F.m->numel;
    float *ref = malloc(n * sizeof *ref), *g0 = malloc(n * sizeof *g0),
          *g1 = malloc(n * sizeof *g1), *r0 = malloc(n * sizeof *r0),
          *r1 = malloc(n * sizeof *r1), *p0 = malloc(n * sizeof *p0),
          *p1 = malloc(n * sizeof *p1), *plain = malloc(n * sizeof *plain);
    assert_true(ref && g0 && g1 && r0 && r1 && p0 && p1 && plain);
    memcpy(ref, F.init, n * sizeof *ref);
    init_ok();
    ps_client *b0 = open_bf16_client(0), *b1 = open_bf16_client(1);
    char err[512] = "";
    int64_t v = -1;
    int np = F.pl->nparts;
    uint32_t first = 0, *rest = malloc((size_t)np * sizeof *rest);
    assert_non_null(rest);
    for (int i = 1; i < np; i++) rest[i - 1] = (uint32_t)i;

    /* Step 0, mixed: rank 0 pushes float32, rank 1 push-pulls bfloat16. */
    grad_fine(g0, n, 0, 0);
    grad_fine(g1, n, 1, 0);
    memcpy(r1, g1, n * sizeof *r1);
    bf16_round(r1, n);
    size_t rounded = 0;
    for (size_t i = 0; i < n; i++) rounded += r1[i] != g1[i];
    assert_true(rounded > n / 2);
    ps_ticket *t0 = NULL, *t1 = NULL;
    assert_int_equal(ps_client_push(F.cli[0], 0, g0, &t0), CM_OK);
    assert_int_equal(ps_client_push_pull(b1, 0, g1, p1, &t1), CM_OK);
    if (ps_ticket_wait(t0, NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    if (ps_ticket_wait(t1, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(v, 1);
    memcpy(plain, ref, n * sizeof *plain);
    ref_apply(plain, g0, g1, n);
    ref_apply(ref, g0, r1, n);
    expect_same(ref, p1, n);
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += plain[i] != p1[i];
    assert_true(differ > n / 2); /* Rounding was not lost on the way. */

    /* Step 1, both bfloat16: rank 0 in two partial push-pulls, rank 1 a Push. */
    grad_fine(g0, n, 0, 1);
    grad_fine(g1, n, 1, 1);
    memcpy(r0, g0, n * sizeof *r0);
    memcpy(r1, g1, n * sizeof *r1);
    bf16_round(r0, n);
    bf16_round(r1, n);
    ps_ticket *a = NULL, *b = NULL;
    memset(p0, 0xff, n * sizeof *p0);
    assert_int_equal(ps_client_push_pull_parts(b0, 1, g0, p0, &first, 1, &a), CM_OK);
    assert_int_equal(ps_client_push_pull_parts(b0, 1, g0, p0, rest, np - 1, &b), CM_OK);
    assert_int_equal(ps_client_push(b1, 1, g1, &t1), CM_OK);
    ps_ticket *all[3] = {a, b, t1};
    if (ps_tickets_wait(all, 3, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ref_apply(ref, r0, r1, n);
    expect_same(ref, p0, n);
    expect_values(2, 2, ref);

    /* Step 2: rank 1's bfloat16 push-pull waits for rank 0 and is abandoned;
     * its push was sent, so rank 0's float32 push completes the step. */
    grad_fine(g0, n, 0, 2);
    grad_fine(g1, n, 1, 2);
    memcpy(r1, g1, n * sizeof *r1);
    bf16_round(r1, n);
    assert_int_equal(ps_client_push_pull(b1, 2, g1, p1, &t1), CM_OK);
    ps_tickets_abandon(&t1, 1);
    memset(g1, 0xff, n * sizeof *g1); /* The caller's buffer is free again. */
    assert_int_equal(ps_client_push(F.cli[0], 2, g0, &t0), CM_OK);
    if (ps_ticket_wait(t0, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ref_apply(ref, g0, r1, n);
    expect_values(3, 3, ref);

    ps_client_stats st = stats();
    assert_int_equal(st.bad_requests, 0);
    assert_int_equal(st.pushes, 4 + (1 + 2 + 2) + 4); /* Sub-calls, step by step. */
    ps_client_close(b0); /* Waits for the orphan's reply. */
    ps_client_close(b1);
    free(rest);
    free(ref);
    free(g0);
    free(g1);
    free(r0);
    free(r1);
    free(p0);
    free(p1);
    free(plain);
    fx_stop();
}

/* ===== Bad input over raw gRPC ===== */

static void test_malformed_bytes(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    static const uint8_t junk[][6] = {
        {0x0a, 0x05, 0x01},             /* Field 1, 5 bytes announced, 1 sent. */
        {0xff, 0xff, 0xff, 0xff, 0xff}, /* A key that never ends. */
        {0x1a, 0x09, 0x08, 0x01},       /* Field 3, 9 bytes announced, 2 sent. */
    };
    static const size_t junk_len[] = {3, 5, 4};
    static const char *const methods[] = {"/psrpc.Ps/Initialize", "/psrpc.Ps/Push",
                                          "/psrpc.Ps/Pull", "/psrpc.Ps/Stats",
                                          "/psrpc.Ps/Shutdown"};
    static const char *const names[] = {"InitRequest", "PushRequest", "PullRequest",
                                        "StatsRequest", "ShutdownRequest"};
    for (size_t j = 0; j < 3; j++) {
        for (int k = 0; k < 5; k++) {
            char msg[512] = "";
            int code = raw_bytes(methods[k], junk[j], junk_len[j], DEADLINE, msg, sizeof msg,
                                 NULL, NULL);
            expect_fail(code, msg, RPC_INVALID_ARGUMENT, "malformed", names[k], NULL);
        }
        expect_unchanged(0, F.init);
    }
    assert_int_equal(ps_server_wait(F.srv[0], 0), 0);

    /* Push only: a well-framed Tensor whose data field is cut short, and a
     * Tensor field with the wrong wire type. */
    static const uint8_t bad_tensor[] = {0x1a, 0x02, 0x7a, 0x05};
    static const uint8_t bad_wiretype[] = {0x18, 0x01};
    char msg[512] = "";
    int code = raw_bytes("/psrpc.Ps/Push", bad_tensor, sizeof bad_tensor, DEADLINE, msg,
                         sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "malformed PushRequest", "tensor", NULL);
    code = raw_bytes("/psrpc.Ps/Push", bad_wiretype, sizeof bad_wiretype, DEADLINE, msg,
                     sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "malformed PushRequest", "wire type", NULL);
    expect_unchanged(0, F.init);

    /* An empty message parses (every field at its default) but has no
     * cluster. */
    code = raw_bytes("/psrpc.Ps/Push", NULL, 0, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "no cluster fingerprint", F.desc, NULL);
    expect_unchanged(0, F.init);
    fx_stop();
}

static void test_bad_push_contents(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    size_t n = F.m->numel;
    float *g = malloc(n * sizeof *g);
    assert_non_null(g);
    grad_fill(g, n, 1, 0);
    /* Rank 0 has pushed step 0 (to both shards): every bad push from rank 1
     * must leave that pending contribution and the values alone. */
    client_push_ok(0, 0, 0);

    raw_push rp;
    char msg[512];
    int code;
    uint32_t other = 0;
    for (int i = 0; i < F.pl->nparts; i++)
        if (F.pl->parts[i].shard == 1) other = (uint32_t)i;

    raw_push_make(&rp, 1, 0, g);
    const cm_partition *kp = &F.pl->parts[rp.t[rp.kern].part];
    const char *kname = F.m->vars[kp->var].name;
    char want[128];

    /* Wrong shape. */
    rp.shape[rp.kern][0]++;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    snprintf(want, sizeof want, "shape must be [%zu,64]", kp->row_end - kp->row_begin);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, kname, want, NULL);
    expect_unchanged(0, F.init);

    /* dtype DTYPE_INVALID. */
    raw_push_make(&rp, 1, 0, g);
    rp.t[rp.kern].dtype = PSRPC__DTYPE__DTYPE_INVALID;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, kname, "DTYPE_FLOAT32", NULL);
    expect_unchanged(0, F.init);

    /* An unknown dtype; bfloat16 with float32's length, and with an odd one. */
    raw_push_make(&rp, 1, 0, g);
    rp.t[rp.kern].dtype = 7;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    snprintf(want, sizeof want, "partition %u (%s part %d): dtype 7", rp.t[rp.kern].part, kname,
             kp->index);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, want, "DTYPE_BFLOAT16", NULL);
    raw_push_make(&rp, 1, 0, g);
    rp.t[rp.kern].dtype = PSRPC__DTYPE__DTYPE_BFLOAT16;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    snprintf(want, sizeof want, "%zu data bytes, expected %zu (%zu bfloat16)", kp->count * 4,
             kp->count * 2, kp->count);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, kname, want, NULL);
    rp.t[rp.kern].data.len = kp->count * 2 + 1;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    snprintf(want, sizeof want, "%zu data bytes, expected %zu", kp->count * 2 + 1, kp->count * 2);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, kname, want, NULL);
    expect_unchanged(0, F.init);

    /* Unknown partition id. */
    raw_push_make(&rp, 1, 0, g);
    rp.t[0].part = 1000;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "unknown partition 1000", NULL);
    expect_unchanged(0, F.init);

    /* A partition of the other shard. */
    raw_push_make(&rp, 1, 0, g);
    rp.t[0].part = other;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    snprintf(want, sizeof want, "partition %u (", other);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, want, "belongs to shard 1", NULL);
    expect_unchanged(0, F.init);

    /* Data of the wrong length, and no data at all. */
    raw_push_make(&rp, 1, 0, g);
    rp.t[rp.kern].data.len -= 4;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, kname, "data bytes, expected", NULL);
    raw_push_make(&rp, 1, 0, g);
    rp.t[rp.kern].data.len = 0;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, kname, "0 data bytes", NULL);
    expect_unchanged(0, F.init);

    /* No partition at all, and the same one twice. */
    raw_push_make(&rp, 1, 0, g);
    rp.req.n_grads = 0;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "partitions, got 0", NULL);
    raw_push_make(&rp, 1, 0, g);
    rp.tp[1] = rp.tp[0];
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "appears twice", NULL);
    expect_unchanged(0, F.init);

    /* A rank the shard was not told about. */
    raw_push_make(&rp, 7, 0, g);
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "worker rank 7 out of range", NULL);
    raw_push_make(&rp, 0x80000000u, 0, g);
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "out of range", NULL);
    expect_unchanged(0, F.init);

    /* Unknown method. */
    raw_push_make(&rp, 1, 0, g);
    code = raw_msg("/psrpc.Ps/Nope", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_UNIMPLEMENTED, "/psrpc.Ps/Nope", NULL);
    expect_unchanged(0, F.init);

    Psrpc__StatsReply *st = raw_stats();
    assert_int_equal(st->bad_requests, 13);
    assert_int_equal(st->pushes, 1);
    psrpc__stats_reply__free_unpacked(st, NULL);

    /* Rank 1 was never counted: its good push completes step 0 with
     * exactly the mean of the two good gradients. */
    raw_push_make(&rp, 1, 0, g);
    uint8_t *reply = NULL;
    size_t len = 0;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, &reply, &len);
    assert_int_equal(code, RPC_OK);
    Psrpc__PushReply *pr = psrpc__push_reply__unpack(NULL, len, reply);
    free(reply);
    assert_non_null(pr);
    assert_int_equal(pr->version, 1);
    assert_false(pr->duplicate);
    psrpc__push_reply__free_unpacked(pr, NULL);
    /* Retried by hand: a duplicate, said so in the reply. */
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, &reply, &len);
    assert_int_equal(code, RPC_OK);
    pr = psrpc__push_reply__unpack(NULL, len, reply);
    free(reply);
    assert_non_null(pr);
    assert_int_equal(pr->version, 1);
    assert_true(pr->duplicate);
    psrpc__push_reply__free_unpacked(pr, NULL);
    client_push_ok(1, 0, 1); /* Shard 1 gets rank 1 too (shard 0: duplicate). */

    float *ref = malloc(n * sizeof *ref);
    assert_non_null(ref);
    memcpy(ref, F.init, n * sizeof *ref);
    ref_step(ref, 0);
    expect_values(1, 1, ref);
    free(ref);
    free(g);
    fx_stop();
}

static void test_wrong_cluster(void **state) {
    (void)state;
    fx_start(0);
    char msg[1024];
    int code;

    /* Init without a cluster, or another one: nothing initialised. */
    Psrpc__OptimizerConfig oc = PSRPC__OPTIMIZER_CONFIG__INIT;
    oc.kind = "sgd";
    oc.lr = LR;
    Psrpc__InitRequest ir = PSRPC__INIT_REQUEST__INIT;
    ir.optimizer = &oc;
    ir.seed = SEED;
    ir.num_workers = 2;
    ir.sync = PSRPC__SYNC_MODE__SYNC_SYNC;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "no cluster fingerprint", F.desc, NULL);
    Psrpc__Cluster other = good_cluster();
    other.fingerprint ^= 1;
    other.description = "mlp 784,64,10 on 3 PS (somebody else's)";
    other.rank = 1;
    ir.cluster = &other;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "cluster mismatch", F.desc,
                "mlp 784,64,10 on 3 PS (somebody else's)", "rank 1", NULL);

    /* Bad init configs with the right cluster. */
    Psrpc__Cluster good = good_cluster();
    ir.cluster = &good;
    oc.kind = "rmsprop";
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "rmsprop", NULL);
    oc.kind = "sgd";
    ir.sync = PSRPC__SYNC_MODE__SYNC_INVALID;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "invalid init config", NULL);
    ir.sync = PSRPC__SYNC_MODE__SYNC_SYNC;
    ir.num_workers = 0;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "invalid init config", NULL);

    /* Before init a push is refused, and a pull waits (up to its deadline). */
    size_t n = F.m->numel;
    float *g = malloc(n * sizeof *g);
    assert_non_null(g);
    grad_fill(g, n, 0, 0);
    raw_push rp;
    raw_push_make(&rp, 0, 0, g);
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "not initialised", NULL);
    Psrpc__PullRequest pr = PSRPC__PULL_REQUEST__INIT;
    pr.cluster = &good;
    code = raw_msg("/psrpc.Ps/Pull", &pr.base, 200, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_DEADLINE_EXCEEDED, NULL);

    init_ok();
    /* Every method checks the cluster. */
    rp.req.cluster = NULL;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "no cluster fingerprint", F.desc, NULL);
    rp.req.cluster = &other;
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "cluster mismatch", F.desc,
                "somebody else's", NULL);
    other.description = "";
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, F.desc, "(no description)", NULL);
    other.description = "theirs";

    pr.cluster = &other;
    code = raw_msg("/psrpc.Ps/Pull", &pr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, F.desc, "theirs", NULL);
    pr.cluster = NULL;
    code = raw_msg("/psrpc.Ps/Pull", &pr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, F.desc, NULL);
    Psrpc__StatsRequest sr = PSRPC__STATS_REQUEST__INIT;
    sr.cluster = &other;
    code = raw_msg("/psrpc.Ps/Stats", &sr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, F.desc, "theirs", NULL);
    Psrpc__ShutdownRequest shr = PSRPC__SHUTDOWN_REQUEST__INIT;
    shr.cluster = &other;
    shr.reason = "not yours to stop";
    code = raw_msg("/psrpc.Ps/Shutdown", &shr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, F.desc, "theirs", NULL);
    assert_int_equal(ps_server_wait(F.srv[0], 0), 0);

    expect_unchanged(0, F.init);
    Psrpc__StatsReply *st = raw_stats();
    assert_int_equal(st->pushes, 0);
    assert_int_equal(st->bad_requests, 12);
    psrpc__stats_reply__free_unpacked(st, NULL);
    free(g);
    fx_stop();
}

static void test_oversized_push(void **state) {
    (void)state;
    fx_start(1 << 20);
    init_ok();
    /* A 2 MiB tensor: over the server's 1 MiB, under the raw client's 8. */
    size_t nbig = (2u << 20) / sizeof(float);
    float *big = calloc(nbig, sizeof *big);
    assert_non_null(big);
    raw_push rp;
    raw_push_make(&rp, 0, 0, big); /* Only the first partition's bytes matter. */
    rp.t[0].data.len = nbig * sizeof(float);
    char msg[512];
    int code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_RESOURCE_EXHAUSTED, NULL);
    expect_unchanged(0, F.init);

    /* Normal traffic (a few hundred KiB per shard) still fits. */
    client_push_ok(0, 0, 0);
    client_push_ok(1, 0, 1);
    float *ref = malloc(F.m->numel * sizeof *ref);
    assert_non_null(ref);
    memcpy(ref, F.init, F.m->numel * sizeof *ref);
    ref_step(ref, 0);
    expect_values(1, 1, ref);
    free(ref);
    free(big);
    fx_stop();
}

static void test_out_of_step_pushes(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    size_t n = F.m->numel;
    float *g = malloc(n * sizeof *g), *ref = malloc(n * sizeof *ref);
    assert_true(g && ref);
    memcpy(ref, F.init, n * sizeof *ref);
    raw_push rp;
    char msg[512];

    /* Early: step 3 at version 0. */
    grad_fill(g, n, 0, 3);
    raw_push_make(&rp, 0, 3, g);
    int code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "early push: step 3 from worker 0",
                "version 0", NULL);
    expect_unchanged(0, ref);

    for (int64_t t = 0; t < 2; t++) {
        client_push_ok(0, t, t);
        client_push_ok(1, t, t + 1);
        ref_step(ref, t);
    }
    /* Stale: rank 0's step 0 at version 2 (its last push was step 1). */
    grad_fill(g, n, 0, 0);
    raw_push_make(&rp, 0, 0, g);
    code = raw_msg("/psrpc.Ps/Push", &rp.req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "stale push: step 0 from worker 0",
                "version 2", NULL);
    expect_unchanged(2, ref);

    /* Through ps_client, out-of-step pushes are errors with the reason. */
    char err[512] = "";
    int64_t v = -1;
    assert_int_equal(client_push(1, 5, &v, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "FAILED_PRECONDITION"));
    assert_non_null(strstr(err, "early push"));
    expect_unchanged(2, ref);

    ps_client_stats st = stats();
    assert_int_equal(st.stale_pushes, 1);
    assert_int_equal(st.early_pushes, 1 + 2);
    assert_int_equal(st.pushes, 8);
    free(g);
    free(ref);
    fx_stop();
}

/* ===== Deadlines, shutdown, destroy ===== */

static void test_pull_deadline_then_clean_shutdown(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    Psrpc__Cluster cl = good_cluster();
    Psrpc__PullRequest pr = PSRPC__PULL_REQUEST__INIT;
    pr.cluster = &cl;
    pr.min_version = 1;
    char msg[512];
    int64_t t0 = now_ms();
    int code = raw_msg("/psrpc.Ps/Pull", &pr.base, 300, msg, sizeof msg, NULL, NULL);
    int64_t took = now_ms() - t0;
    expect_fail(code, msg, RPC_DEADLINE_EXCEEDED, NULL);
    if (took < 250 || took >= 5000) fail_msg("DEADLINE_EXCEEDED after %lld ms", (long long)took);

    /* The server still answers, and when version 1 appears the abandoned
     * pull is answered into a dead call without harm. */
    expect_unchanged(0, F.init);
    pr.min_version = 2;
    code = raw_msg("/psrpc.Ps/Pull", &pr.base, 300, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_DEADLINE_EXCEEDED, NULL);
    client_push_ok(0, 0, 0);
    client_push_ok(1, 0, 1);
    float *ref = malloc(F.m->numel * sizeof *ref);
    assert_non_null(ref);
    memcpy(ref, F.init, F.m->numel * sizeof *ref);
    ref_step(ref, 0);
    expect_unchanged(1, ref);
    free(ref);
    /* The pull for version 2 is still registered; fx_stop must still
     * return promptly. */
    fx_stop();
}

typedef struct waiter {
    ps_server *s;
    int rc;
    int64_t returned_ms;
} waiter;

static void *wait_main(void *p) {
    waiter *w = p;
    w->rc = ps_server_wait(w->s, 5000);
    w->returned_ms = now_ms();
    return NULL;
}

static void test_shutdown_request(void **state) {
    (void)state;
    fx_start(0);
    assert_int_equal(ps_server_wait(F.srv[0], 0), 0);
    assert_int_equal(ps_server_wait(F.srv[1], 0), 0);
    /* A thread blocked in ps_server_wait (as ps_main is) wakes up. */
    waiter w = {.s = F.srv[0], .rc = -1};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, wait_main, &w), 0);
    sleep_ms(50);
    char err[512] = "";
    int64_t t0 = now_ms();
    if (ps_client_shutdown_servers(F.cli[0], "training done", 0, err, sizeof err) != CM_OK)
        fail_msg("%s", err);
    pthread_join(th, NULL);
    assert_int_equal(w.rc, 1);
    assert_true(w.returned_ms - t0 < 5000);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(ps_server_wait(F.srv[i], 2000), 1);
        const char *why = ps_server_stop_reason(F.srv[i]);
        assert_non_null(strstr(why, "shutdown requested by rank 0"));
        assert_non_null(strstr(why, "training done"));
        assert_int_equal(ps_server_stop_failed(F.srv[i]), 0);
    }
    /* Stopping does not stop serving until destroy. */
    Psrpc__StatsReply *st = raw_stats();
    psrpc__stats_reply__free_unpacked(st, NULL);
    fx_stop();
    /* A run that failed says so: psserver then exits 1. */
    fx_start(0);
    if (ps_client_shutdown_servers(F.cli[0], "training failed", 1, err, sizeof err) != CM_OK)
        fail_msg("%s", err);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(ps_server_wait(F.srv[i], 2000), 1);
        assert_int_equal(ps_server_stop_failed(F.srv[i]), 1);
    }
    fx_stop();
}

/* An evaluator's pull (or_final, of version 1) of the given epoch to shard
 * 0: the gRPC code, the message in msg, the reply in *rep when rep. */
static int evaluator_pull(uint64_t epoch, char *msg, size_t msglen, uint8_t **rep,
                          size_t *rlen) {
    Psrpc__Cluster c0 = good_cluster();
    c0.epoch = epoch;
    Psrpc__PullRequest pr = PSRPC__PULL_REQUEST__INIT;
    pr.cluster = &c0;
    pr.or_final = 1;
    pr.min_version = 1;
    return raw_msg("/psrpc.Ps/Pull", &pr.base, DEADLINE, msg, msglen, rep, rlen);
}

/* The chief's Shutdown; then shard 1, which never heard of the evaluator,
 * stops at once, and shard 0, which did, keeps serving for its final pull. */
static void shutdown_waits_for_evaluator_at_shard0(void) {
    char err[512] = "";
    if (ps_client_shutdown_servers(F.cli[0], "training finished", 0, err, sizeof err) != CM_OK)
        fail_msg("%s", err);
    assert_int_equal(ps_server_wait(F.srv[1], 2000), 1);
    assert_int_equal(ps_server_wait(F.srv[0], 300), 0);
}

/* An evaluator whose first pull came before the chief's Initialize (refused
 * UNAVAILABLE; it retries with a backoff up to 1.6 s) is waited for at the
 * Shutdown like one seen later: a run shorter than the backoff used to stop
 * the shards first, and the evaluator, which had evaluated nothing, failed
 * (seen in a fresh-clone run of ps_learns). */
static void test_evaluator_before_init_waited_for(void **state) {
    (void)state;
    fx_start_mlp(0, 0, 2000); /* As psserver starts: the model comes with the Init. */
    char msg[512];
    int code = evaluator_pull(0, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_UNAVAILABLE, "not initialised", NULL);
    init_ok();
    shutdown_waits_for_evaluator_at_shard0();
    uint8_t *rep = NULL;
    size_t rlen = 0;
    code = evaluator_pull(0, msg, sizeof msg, &rep, &rlen);
    if (code != RPC_OK) fail_msg("the evaluator's pull: %s %s", rpc_status_name(code), msg);
    Psrpc__PullReply *r = psrpc__pull_reply__unpack(NULL, rlen, rep);
    free(rep);
    assert_non_null(r);
    assert_int_equal(r->version, 0); /* The final version, below min_version. */
    psrpc__pull_reply__free_unpacked(r, NULL);
    /* Answered: shard 0 stops now, not at the end of its 3 s grace. */
    int64_t t0 = now_ms();
    assert_int_equal(ps_server_wait(F.srv[0], 2000), 1);
    assert_true(now_ms() - t0 < 1500);
    assert_non_null(strstr(ps_server_stop_reason(F.srv[0]), "training finished"));
    fx_stop();
}

/* The same for an evaluator's pull refused ABORTED (an epoch that is over,
 * as during a recovery): it retries, so it counts. */
static void test_evaluator_refused_aborted_waited_for(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    char msg[512];
    int code = evaluator_pull(7, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_ABORTED, "epoch 7 is over", NULL);
    shutdown_waits_for_evaluator_at_shard0();
    fx_stop();
}

/* D3 (issue 14): a shard being restarted when the chief shuts the cluster
 * down still gets the Shutdown (retried while unavailable). */
static void *restart_shard1(void *arg) {
    (void)arg;
    sleep_ms(400);
    fx_serve_again(1);
    return NULL;
}

static void test_shutdown_reaches_restarted_shard(void **state) {
    (void)state;
    fx_start(0);
    destroy_promptly(F.srv[1]);
    F.srv[1] = NULL;
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, restart_shard1, NULL), 0);
    char err[512] = "";
    int rc = ps_client_shutdown_servers(F.cli[0], "training finished", 0, err, sizeof err);
    pthread_join(th, NULL);
    if (rc != CM_OK) fail_msg("%s", err);
    assert_int_equal(ps_server_wait(F.srv[1], 2000), 1);
    assert_non_null(strstr(ps_server_stop_reason(F.srv[1]), "training finished"));
    fx_stop();
}

/* A call that waited at its shard longer than connect_timeout_ms (a sync
 * push-pull parked until the other worker pushes) and then gets UNAVAILABLE
 * because the shard restarts is still retried: the retry window counts from
 * the failure, not from the call's start (found by a review; the call used
 * to fail at once, "failed after 1 attempt", and the other worker then
 * waited for it until its deadline). */
static void test_long_parked_call_retried_after_restart(void **state) {
    (void)state;
    fx_start_mlp(1, 0, 500);
    init_ok();
    size_t n = F.m->numel;
    float *g = calloc(n, sizeof *g), *p0 = calloc(n, sizeof *p0), *p1 = calloc(n, sizeof *p1);
    assert_true(g && p0 && p1);
    ps_ticket *w0 = NULL, *w1 = NULL;
    assert_int_equal(ps_client_push_pull(F.cli[0], 0, g, p0, &w0), CM_OK);
    sleep_ms(800); /* Parked past connect_timeout_ms: rank 1 has not pushed. */
    destroy_promptly(F.srv[1]);
    fx_serve_again(1);
    ps_init_cfg c = init_cfg();
    char err[512] = "";
    if (ps_client_init(F.cli[1], &c, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(ps_client_push_pull(F.cli[1], 0, g, p1, &w1), CM_OK);
    int64_t v0 = -1, v1 = -1;
    if (ps_ticket_wait(w0, &v0, err, sizeof err) != CM_OK) fail_msg("rank 0: %s", err);
    if (ps_ticket_wait(w1, &v1, err, sizeof err) != CM_OK) fail_msg("rank 1: %s", err);
    assert_int_equal(v0, 1);
    assert_int_equal(v1, 1);
    free(g);
    free(p0);
    free(p1);
    fx_stop();
}

/* Step 0 of both workers with zero gradients, push-pull each; the values
 * each pulled into p[0] and p[1] (n floats, the caller frees them). */
static void both_step0(float *p[2]) {
    size_t n = F.m->numel;
    float *g = calloc(n, sizeof *g);
    assert_non_null(g);
    ps_ticket *w[2] = {NULL, NULL};
    char err[512] = "";
    for (int r = 0; r < 2; r++) {
        p[r] = calloc(n, sizeof *p[r]);
        assert_non_null(p[r]);
        assert_int_equal(ps_client_push_pull(F.cli[r], 0, g, p[r], &w[r]), CM_OK);
    }
    for (int r = 0; r < 2; r++)
        if (ps_ticket_wait(w[r], NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    free(g);
}

/* A deep model whose kernels are each just under a call (15 layers of 362
 * units: 524,176 bytes, one 256 KiB-minimum partition each, and a bias),
 * on one shard, would be cut into 30 calls by greedy cuts at 512 KiB (a
 * kernel and its bias are over it): the client raises its limit until a
 * shard's calls are at most PS_CLIENT_MAX_CALLS (found by a review). */
static void test_calls_capped_per_shard(void **state) {
    (void)state;
    int sizes[CM_MLP_MAX_SIZES];
    for (int i = 0; i < CM_MLP_MAX_SIZES; i++) sizes[i] = 362;
    memset(&F, 0, sizeof F);
    assert_int_equal(cm_model_create_mlp(sizes, CM_MLP_MAX_SIZES, &F.m), CM_OK);
    assert_int_equal(cm_placement_create(F.m, 1, CM_PLACEMENT_MIN_PART_BYTES, &F.pl), CM_OK);
    ps_server_cfg sc = {.model = F.m, .placement = F.pl};
    fx_serve(0, &sc);
    fx_connect(2000);
    init_ok();
    int calls = 0;
    for (int sh = 0; sh < 1; sh++) {
        int k = shard_calls(F.pl, sh, PS_CLIENT_CALL_BYTES);
        assert_true(k >= 1 && k <= PS_CLIENT_MAX_CALLS);
        /* The case the cap is for: greedy cuts alone make more. */
        assert_true(cut_calls(F.pl, sh, PS_CLIENT_CALL_BYTES) > PS_CLIENT_MAX_CALLS);
        calls += k;
    }
    float *p[2];
    both_step0(p);
    ps_client_stats st = stats();
    assert_int_equal(st.pushes, (uint64_t)(2 * calls));
    expect_same(p[0], p[1], F.m->numel);
    free(p[0]);
    free(p[1]);
    fx_stop();
}

/* Each worker's last step as every shard has it: a shard restarted empty
 * (no checkpoint) lists no workers, so the answer is -1 for each, whatever
 * the caller's array held before (found by a review: the function compared
 * against the caller's uninitialised values). */
static void test_worker_steps_with_empty_shard(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    float *p[2];
    both_step0(p);
    char err[512] = "";
    int64_t out[4] = {123456789, 123456789, 123456789, 123456789};
    assert_int_equal(ps_client_worker_steps(F.cli[0], out, 4, err, sizeof err), 2);
    assert_int_equal(out[0], 0);
    assert_int_equal(out[1], 0);
    destroy_promptly(F.srv[0]);
    fx_serve_again(0);
    static const int64_t junk[2] = {123456789, -999999};
    for (int k = 0; k < 2; k++) {
        for (int w = 0; w < 4; w++) out[w] = junk[k];
        assert_int_equal(ps_client_worker_steps(F.cli[0], out, 4, err, sizeof err), 2);
        assert_int_equal(out[0], -1);
        assert_int_equal(out[1], -1);
    }
    free(p[0]);
    free(p[1]);
    fx_stop();
}

/* Issue 14: worker 1 dies with step 0 pushed to shard 0 only, so shard 0
 * reaches version 1 and shard 1 waits for it forever (worker 0's pull
 * there). Its successor sees the versions differ and asks the shards to
 * abort their waiting pulls: worker 0's step fails ABORTED (the chief then
 * rolls back), and the shards stay up. */
static void test_abort_waiting_after_half_step(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    size_t n = F.m->numel;
    float *g = calloc(n, sizeof *g), *p0 = calloc(n, sizeof *p0), *p1 = calloc(n, sizeof *p1);
    assert_true(g && p0 && p1);
    uint32_t on0[64];
    int n0 = 0;
    for (int i = 0; i < F.pl->nparts && n0 < 64; i++)
        if (F.pl->parts[i].shard == 0) on0[n0++] = (uint32_t)i;
    assert_true(n0 > 0 && n0 < F.pl->nparts);
    char err[512] = "";
    ps_ticket *w0 = NULL, *w1 = NULL;
    assert_int_equal(ps_client_push_pull(F.cli[0], 0, g, p0, &w0), CM_OK);
    assert_int_equal(ps_client_push_pull_parts(F.cli[1], 0, g, p1, on0, n0, &w1), CM_OK);
    if (ps_ticket_wait(w1, NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ps_shard_checkpoints ck[2];
    if (ps_client_checkpoints(F.cli[1], -1, ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(ck[0].version, 1);
    assert_int_equal(ck[1].version, 0);
    if (ps_client_abort_waiting(F.cli[1], ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(ps_ticket_wait(w0, NULL, err, sizeof err), CM_EABORTED);
    assert_non_null(strstr(err, "abandoned the step"));
    assert_int_equal(ps_server_wait(F.srv[0], 0), 0);
    assert_int_equal(ps_server_wait(F.srv[1], 0), 0);
    free(g);
    free(p0);
    free(p1);
    fx_stop();
}

typedef struct result {
    pthread_mutex_t mu;
    int finished;
    int code;
    char msg[256];
} result;

static void on_done(void *ud, int code, const char *message, const uint8_t *reply, size_t len) {
    (void)reply;
    (void)len;
    result *r = ud;
    pthread_mutex_lock(&r->mu);
    r->code = code;
    snprintf(r->msg, sizeof r->msg, "%s", message);
    r->finished++;
    pthread_mutex_unlock(&r->mu);
}

static int result_wait(result *r, int ms) {
    int64_t end = now_ms() + ms;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        int fin = r->finished, code = r->code;
        pthread_mutex_unlock(&r->mu);
        if (fin) return code;
        if (now_ms() >= end) return -1;
        sleep_ms(2);
    }
}

static void test_destroy_with_waiting_pull(void **state) {
    (void)state;
    fx_start(0);
    init_ok();
    Psrpc__Cluster cl = good_cluster();
    Psrpc__PullRequest pr = PSRPC__PULL_REQUEST__INIT;
    pr.cluster = &cl;
    pr.min_version = 5;
    uint8_t buf[512];
    size_t len = protobuf_c_message_get_packed_size(&pr.base);
    assert_true(len <= sizeof buf);
    protobuf_c_message_pack(&pr.base, buf);
    result r;
    memset(&r, 0, sizeof r);
    pthread_mutex_init(&r.mu, NULL);
    rpc_seg seg = {buf, len, NULL, NULL};
    rpc_call_start(F.ch, "/psrpc.Ps/Pull", &seg, 1, 20000, 0, on_done, &r);

    /* Wait until the shard has registered it. */
    int64_t end = now_ms() + 3000;
    uint64_t pulls = 0;
    while (now_ms() < end) {
        Psrpc__StatsReply *st = raw_stats();
        pulls = st->pulls;
        psrpc__stats_reply__free_unpacked(st, NULL);
        if (pulls >= 1) break;
        sleep_ms(5);
    }
    assert_int_equal(pulls, 1);
    assert_int_equal(result_wait(&r, 0), -1);

    destroy_promptly(F.srv[0]);
    F.srv[0] = NULL;
    int code = result_wait(&r, 3000);
    if (code != RPC_UNAVAILABLE && code != RPC_CANCELLED)
        fail_msg("pull finished with %s '%s'", rpc_status_name(code), r.msg);
    pthread_mutex_destroy(&r.mu);

    /* Shard 0 is gone for good. */
    Psrpc__StatsRequest sr = PSRPC__STATS_REQUEST__INIT;
    sr.cluster = &cl;
    char msg[256];
    code = raw_msg("/psrpc.Ps/Stats", &sr.base, 1000, msg, sizeof msg, NULL, NULL);
    assert_true(code == RPC_UNAVAILABLE || code == RPC_DEADLINE_EXCEEDED);
    fx_stop();
}


/* ===== Checkpoints ===== */

/* Momentum (one slot) on both shards, checkpointed every version: after
 * 4 steps the servers are restarted on the same directories and must come
 * back at version 4 with the parameters bit for bit, and with the slots too
 * (step 4 then gives the reference's version 5 bit for bit). Only the two
 * newest generations are kept. A directory of another model or shard is
 * refused. */
static void test_checkpoint_restore(void **state) {
    (void)state;
    char dir[] = "/tmp/test_ps_server_ckpt.XXXXXX";
    assert_non_null(mkdtemp(dir));
    fx_data_dir = dir;
    fx_every = 1;
    fx_start(0);
    size_t n = F.m->numel;
    ps_init_cfg ic = init_cfg();
    ic.optim = ps_optim_defaults(PS_OPTIM_MOMENTUM, LR);
    char err[512] = "";
    if (ps_client_init(F.cli[0], &ic, err, sizeof err) != CM_OK) fail_msg("%s", err);
    float *ref[6], *a = calloc(n, sizeof(float)), *g0 = malloc(n * 4), *g1 = malloc(n * 4);
    assert_true(a && g0 && g1);
    for (int v = 0; v < 6; v++) assert_non_null(ref[v] = malloc(n * sizeof(float)));
    memcpy(ref[0], F.init, n * sizeof(float));
    for (int64_t t = 0; t < 5; t++) {
        memcpy(ref[t + 1], ref[t], n * sizeof(float));
        grad_fill(g0, n, 0, t);
        grad_fill(g1, n, 1, t);
        for (size_t i = 0; i < n; i++) g0[i] = (g0[i] + g1[i]) * 0.5f;
        ps_optim_apply(&ic.optim, t + 1, ref[t + 1], g0, a, n);
        if (t == 4) break; /* Version 5 is computed again after the restart. */
        client_push_ok(0, t, t);
        client_push_ok(1, t, t + 1);
        ps_server_checkpoint_wait(F.srv[0]);
        ps_server_checkpoint_wait(F.srv[1]);
    }
    expect_values(4, 4, ref[4]);
    fx_stop();

    fx_start(0);
    /* Restored, but serving nothing until the chief's rollback. */
    float *got = malloc(n * sizeof *got);
    assert_non_null(got);
    ps_ticket *t = NULL;
    ps_client_pull(F.cli[0], 0, got, &t);
    assert_int_equal(ps_ticket_wait(t, NULL, err, sizeof err), CM_EABORTED);
    assert_non_null(strstr(err, "waits for the chief to roll the cluster back"));
    /* Initialised by the restore: the same config is OK, another is not. */
    if (ps_client_init(F.cli[0], &ic, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(ps_client_epoch(F.cli[0]), 0); /* Restored shards have none yet. */
    ps_init_cfg other = init_cfg();
    assert_int_not_equal(ps_client_init(F.cli[0], &other, err, sizeof err), CM_OK);
    assert_non_null(strstr(err, "already initialised"));
    ps_shard_checkpoints ck[2];
    if (ps_client_checkpoints(F.cli[0], -1, ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    for (int i = 0; i < 2; i++) {
        assert_true(ck[i].recovering && ck[i].initialised && ck[i].durable);
        assert_int_equal(ck[i].version, 4);
        assert_int_equal(ck[i].ncommitted, 4); /* 4, 3, 2, 1: nobody said to drop any. */
        assert_int_equal(ck[i].committed[0], 4);
        assert_int_equal(ck[i].committed[1], 3);
    }
    /* Roll back to 3, an older generation (momentum slots included), in
     * epoch 2; version 4 is then computed again and must match. */
    if (ps_client_rollback(F.cli[0], 3, 2, err, sizeof err) != CM_OK) fail_msg("%s", err);
    if (ps_client_rollback(F.cli[0], 3, 2, err, sizeof err) != CM_OK) /* Idempotent. */
        fail_msg("%s", err);
    assert_int_equal(ps_client_rollback(F.cli[0], 2, 2, err, sizeof err), CM_EINVAL);
    assert_non_null(strstr(err, "already rolled back to version 3"));
    if (ps_client_checkpoints(F.cli[0], 3, ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_false(ck[0].recovering);
    assert_int_equal(ck[0].epoch, 2);
    assert_int_equal(ck[0].committed[0], 3); /* 4 belonged to the abandoned history. */
    /* Rank 1 still in the old epoch (0 = untracked is accepted); a stale
     * epoch is refused. */
    ps_client_set_epoch(F.cli[1], 1);
    assert_int_equal(client_push(1, 3, NULL, err, sizeof err), CM_EABORTED);
    assert_non_null(strstr(err, "epoch 1 is over"));
    ps_client_set_epoch(F.cli[1], 2);
    expect_values(0, 3, ref[3]);
    client_push_ok(0, 3, 3);
    client_push_ok(1, 3, 4);
    expect_values(4, 4, ref[4]);
    /* A pull waiting for a version the rollback abandons fails ABORTED. */
    ps_client_pull(F.cli[0], 5, got, &t);
    for (int k = 0; k < 500 && stats().parked_pulls < 2; k++) /* Parked at both shards. */
        sleep_ms(10);
    assert_int_equal(stats().parked_pulls, 2);
    if (ps_client_rollback(F.cli[1], 3, 3, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(ps_ticket_wait(t, NULL, err, sizeof err), CM_EABORTED);
    assert_non_null(strstr(err, "rolled back"));
    ps_client_set_epoch(F.cli[0], 3);
    client_push_ok(0, 3, 3);
    client_push_ok(1, 3, 4);
    ps_server_checkpoint_wait(F.srv[0]); /* Else 5's would be skipped. */
    ps_server_checkpoint_wait(F.srv[1]);
    client_push_ok(0, 4, 4);
    client_push_ok(1, 4, 5);
    expect_values(5, 5, ref[5]);
    /* The chief says 5 is everywhere: older generations go at the next
     * checkpoint. */
    ps_server_checkpoint_wait(F.srv[0]);
    if (ps_client_checkpoints(F.cli[0], 5, ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ps_server_checkpoint_wait(F.srv[0]);
    free(got);
    fx_stop();
    fx_data_dir = NULL;
    fx_every = 0;

    /* Another model, or another shard, on these directories is refused. */
    static const int sizes[] = {784, 32, 10};
    cm_model *m = NULL;
    cm_placement *pl = NULL;
    assert_int_equal(cm_model_create_mlp(sizes, 3, &m), CM_OK);
    assert_int_equal(cm_placement_create(m, 2, MIN_PART, &pl), CM_OK);
    char sdir[512];
    snprintf(sdir, sizeof sdir, "%s/shard-0", dir);
    ps_server_cfg sc = {.model = m, .placement = pl, .shard = 0, .data_dir = sdir};
    ps_server *s = (ps_server *)1;
    assert_int_equal(ps_server_create(&sc, &s), CM_EINVAL);
    assert_null(s);
    cm_placement_destroy(pl);
    cm_model_destroy(m);
    static const int same[] = {784, 64, 10};
    assert_int_equal(cm_model_create_mlp(same, 3, &m), CM_OK);
    assert_int_equal(cm_placement_create(m, 2, MIN_PART, &pl), CM_OK);
    sc = (ps_server_cfg){.model = m, .placement = pl, .shard = 1, .data_dir = sdir};
    assert_int_equal(ps_server_create(&sc, &s), CM_EINVAL);
    /* Versions 1 to 5 were checkpointed; 4 was rolled back and written
     * again; with 5 everywhere, only 5 is kept. */
    st_identity id = {.fingerprint = PS_SERVER_STORE_FINGERPRINT,
                      .description = PS_SERVER_STORE_DESC, .shard = 0};
    st_store *st = NULL;
    if (st_store_open(NULL, sdir, &id, &st, err, sizeof err) != CM_OK) fail_msg("%s", err);
    int64_t kept[4] = {0};
    assert_int_equal(st_store_committed(st, kept, 4, err, sizeof err), 1);
    assert_int_equal(kept[0], 5);
    st_store_close(st);
    cm_placement_destroy(pl);
    cm_model_destroy(m);

    for (int v = 0; v < 6; v++) free(ref[v]);
    free(a);
    free(g0);
    free(g1);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* --init-from: an Init with values starts every shard from them at version
 * 0; it is idempotent, a seeded Init or other values are refused, also after
 * a restart from a checkpoint; malformed values are INVALID_ARGUMENT. */
static void test_init_from_values(void **state) {
    (void)state;
    char dir[] = "/tmp/test_ps_server_initv.XXXXXX";
    assert_non_null(mkdtemp(dir));
    fx_data_dir = dir;
    fx_every = 1;
    fx_start(0);
    size_t n = F.m->numel;
    float *vals = malloc(n * sizeof *vals), *other = malloc(n * sizeof *other);
    assert_true(vals && other);
    for (size_t i = 0; i < n; i++) vals[i] = (float)((int)(i % 61) - 30) / 64.0f;
    memcpy(other, vals, n * sizeof *other);
    other[n - 1] += 1.0f;
    char msg[1024], err[512] = "";

    /* Malformed values, sent raw to shard 0: nothing initialised. */
    raw_push rp;
    raw_push_make(&rp, 0, 0, vals);
    Psrpc__OptimizerConfig oc = PSRPC__OPTIMIZER_CONFIG__INIT;
    oc.kind = "sgd";
    oc.lr = LR;
    Psrpc__InitRequest ir = PSRPC__INIT_REQUEST__INIT;
    Psrpc__Cluster cl = good_cluster();
    ir.cluster = &cl;
    ir.optimizer = &oc;
    ir.seed = SEED;
    ir.num_workers = 2;
    ir.sync = PSRPC__SYNC_MODE__SYNC_SYNC;
    ir.values = rp.tp;
    ir.n_values = rp.req.n_grads - 1;
    int code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "lack", NULL);
    ir.n_values = rp.req.n_grads;
    Psrpc__Tensor *keep = rp.tp[1];
    rp.tp[1] = rp.tp[0];
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "given twice", NULL);
    rp.tp[1] = keep;
    rp.tp[0]->data.len -= 4;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "wrong size", NULL);
    rp.tp[0]->data.len += 4;

    ps_init_cfg ic = init_cfg();
    ic.values = vals;
    if (ps_client_init(F.cli[0], &ic, err, sizeof err) != CM_OK) fail_msg("%s", err);
    expect_values(0, 0, vals);
    if (ps_client_init(F.cli[0], &ic, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ps_init_cfg seeded = init_cfg();
    assert_int_not_equal(ps_client_init(F.cli[0], &seeded, err, sizeof err), CM_OK);
    assert_non_null(strstr(err, "from-values="));
    ps_init_cfg changed = ic;
    changed.values = other;
    assert_int_not_equal(ps_client_init(F.cli[0], &changed, err, sizeof err), CM_OK);
    client_push_ok(0, 0, 0);
    client_push_ok(1, 0, 1);
    ps_server_checkpoint_wait(F.srv[0]);
    ps_server_checkpoint_wait(F.srv[1]);
    fx_stop();

    /* Restored from the checkpoint: the config still has the values' hash. */
    fx_start(0);
    if (ps_client_init(F.cli[0], &ic, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_not_equal(ps_client_init(F.cli[0], &seeded, err, sizeof err), CM_OK);
    assert_non_null(strstr(err, "from-values="));
    fx_stop();
    fx_data_dir = NULL;
    fx_every = 0;
    free(vals);
    free(other);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* ===== Sparse models: a server that learns the model =====
 *
 * fx_start_sparse starts both shards WITHOUT a model (cfg.model NULL,
 * nshards 2): they learn a DeepFM (3 fields, k 3: rows of 4; one hidden
 * layer of 8) from the chief's Initialize. Workers' batches touch rows of
 * both shards; the reference is a local replay: dense SGD of the mean, and
 * a ps_rows store of the same model with per-row sums over ranks, times
 * 1/2, through the same row-wise optimizer (Adagrad).
 */

#define SP_MIN_PART 64u /* Bytes: the kernels are split. */
#define SP_NT 3         /* Tables. */
#define SP_DIM 4        /* Their rows. */
#define SP_NB 6         /* Rows per table in a batch. */

static ps_init_cfg sparse_init_cfg(void) {
    ps_init_cfg c = init_cfg();
    c.table_optim = ps_optim_defaults(PS_OPTIM_ADAGRAD, LR);
    return c;
}

static cm_model *sparse_model(void) {
    cm_ctr_spec sp = {.nfields = SP_NT, .emb_dim = SP_DIM - 1, .nhidden = 1, .hidden = {8}};
    cm_model *m = NULL;
    assert_int_equal(cm_model_create_deepfm(&sp, &m), CM_OK);
    return m;
}

/* Both shards without a model (checkpointed as fx_data_dir and fx_every
 * say), clients of the DeepFM for ranks 0 and 1 retrying unavailable
 * shards for connect_ms. */
static void fx_start_sparse(int64_t connect_ms) {
    fixture *f = &F;
    memset(f, 0, sizeof *f);
    f->m = sparse_model();
    assert_int_equal(cm_placement_create(f->m, 2, SP_MIN_PART, &f->pl), CM_OK);
    for (int i = 0; i < 2; i++) {
        ps_server_cfg sc = {.nshards = 2};
        fx_serve(i, &sc);
    }
    fx_connect(connect_ms);
}

static void sparse_init_ok(void) {
    ps_init_cfg c = sparse_init_cfg();
    char err[512] = "";
    if (ps_client_init(F.cli[0], &c, err, sizeof err) != CM_OK) fail_msg("%s", err);
}

/* The local replay of a sparse run: its own model (it outlives the
 * servers' restarts), the rows and the dense values (initially F.init). */
typedef struct sparse_ref {
    cm_model *m;
    ps_rows *rows;
    float *dense;
} sparse_ref;

static sparse_ref sparse_ref_new(void) {
    ps_init_cfg ic = sparse_init_cfg();
    sparse_ref r = {.m = sparse_model()};
    r.rows = ps_rows_create(r.m, &ic.table_optim, SEED);
    r.dense = malloc(r.m->numel * sizeof *r.dense);
    assert_non_null(r.dense);
    memcpy(r.dense, F.init, r.m->numel * sizeof *r.dense);
    return r;
}

static void sparse_ref_free(sparse_ref *r) {
    ps_rows_destroy(r->rows);
    cm_model_destroy(r->m);
    free(r->dense);
}

/* One worker's batch: SP_NB distinct ids per table (both shards' rows),
 * grouped by table as ps_row_keys wants, and their gradients (multiples of
 * 1/16, SP_DIM a row). */
typedef struct batch {
    size_t tab_begin[SP_NT + 1];
    uint64_t ids[SP_NT * SP_NB];
    float g[SP_NT * SP_NB * SP_DIM];
    ps_row_keys keys;
} batch;

static void batch_fill(batch *b, int worker, int64_t step) {
    size_t u = 0;
    for (int t = 0; t < SP_NT; t++) {
        b->tab_begin[t] = u;
        for (int i = 0; i < SP_NB; i++, u++) {
            uint64_t id = (uint64_t)((worker * 5 + step * 3 + i * 2) % 30) + (uint64_t)t * 1000;
            b->ids[u] = id;
            for (int j = 0; j < SP_DIM; j++)
                b->g[u * SP_DIM + (size_t)j] =
                    (float)((int)((id * 3 + (uint64_t)j * 5 + (uint64_t)worker * 7 +
                                   (uint64_t)step * 11 + (uint64_t)t * 13) %
                                  17) -
                            8) /
                    16.0f;
        }
    }
    b->tab_begin[SP_NT] = u;
    b->keys = (ps_row_keys){.ntables = SP_NT, .tab_begin = b->tab_begin, .ids = b->ids};
}

/* The reference rows after one sync step of both workers' batches. */
static void replay_step(ps_rows *ref, const batch *b0, const batch *b1) {
    for (int t = 0; t < SP_NT; t++) {
        for (size_t u = b0->tab_begin[t]; u < b0->tab_begin[t + 1]; u++) {
            float sum[SP_DIM];
            memcpy(sum, &b0->g[u * SP_DIM], sizeof sum);
            for (size_t k = b1->tab_begin[t]; k < b1->tab_begin[t + 1]; k++)
                if (b1->ids[k] == b0->ids[u])
                    for (int j = 0; j < SP_DIM; j++) sum[j] += b1->g[k * SP_DIM + (size_t)j];
            ps_rows_apply(ref, t, &b0->ids[u], 1, sum, 0.5f);
        }
        for (size_t k = b1->tab_begin[t]; k < b1->tab_begin[t + 1]; k++) {
            int in0 = 0;
            for (size_t u = b0->tab_begin[t]; u < b0->tab_begin[t + 1]; u++)
                in0 |= b0->ids[u] == b1->ids[k];
            if (!in0) ps_rows_apply(ref, t, &b1->ids[k], 1, &b1->g[k * SP_DIM], 0.5f);
        }
    }
}

/* The rows of 'keys' in ref (create: as a training read) into out. */
static void ref_read(ps_rows *ref, const ps_row_keys *keys, int create, float *out) {
    for (int t = 0; t < SP_NT; t++)
        ps_rows_read(ref, t, keys->ids + keys->tab_begin[t],
                     keys->tab_begin[t + 1] - keys->tab_begin[t], create,
                     out + keys->tab_begin[t] * SP_DIM);
}

/* Sync step 'step' of both ranks through push_pull_rows: each pushes its
 * batch and asks for its next batch's rows; dense params, wanted rows and
 * versions must equal the replay, which this advances (dense in dref). */
static void sparse_step_as(int64_t step, int with_want, ps_rows *ref, float *dref) {
    size_t n = F.m->numel;
    static batch b[2], want[2];
    float *g[2], *params[2], vals[2][SP_NT * SP_NB * SP_DIM];
    ps_ticket *t[2];
    for (int r = 0; r < 2; r++) {
        batch_fill(&b[r], r, step);
        batch_fill(&want[r], r, step + 1);
        g[r] = malloc(n * sizeof(float));
        params[r] = malloc(n * sizeof(float));
        assert_true(g[r] && params[r]);
        grad_fill(g[r], n, r, step);
        int rc = ps_client_push_pull_rows(F.cli[r], step, g[r], params[r], &b[r].keys, b[r].g,
                                          with_want ? &want[r].keys : NULL,
                                          with_want ? vals[r] : NULL, &t[r]);
        assert_int_equal(rc, CM_OK);
    }
    for (int r = 0; r < 2; r++) {
        char err[512] = "";
        int64_t v = -1;
        if (ps_ticket_wait(t[r], &v, err, sizeof err) != CM_OK) fail_msg("rank %d: %s", r, err);
        assert_int_equal(v, step + 1);
    }
    ref_step(dref, step);
    replay_step(ref, &b[0], &b[1]);
    for (int r = 0; r < 2; r++) {
        expect_same(dref, params[r], n);
        if (with_want) {
            float w[SP_NT * SP_NB * SP_DIM];
            ref_read(ref, &want[r].keys, 1, w);
            expect_same(w, vals[r], SP_NT * SP_NB * SP_DIM);
        }
        free(g[r]);
        free(params[r]);
    }
}

static void sparse_step(int64_t step, ps_rows *ref, float *dref) {
    sparse_step_as(step, 1, ref, dref);
}

/* Every row of every table, by client dumps of both shards in pages of
 * 'page', equals ref's: the same set, each row once, on its shard. */
static void expect_dumps(ps_rows *ref, size_t page) {
    for (int t = 0; t < SP_NT; t++) {
        size_t total = 0;
        for (int sh = 0; sh < 2; sh++) {
            uint64_t from = 0, next = 0;
            do {
                uint64_t *ids = NULL;
                float *vals = NULL;
                size_t k = 0;
                char err[512] = "";
                if (ps_client_dump_rows(F.cli[1], sh, t, from, page, &ids, &vals, &k, &next, err,
                                        sizeof err) != CM_OK)
                    fail_msg("dump: %s", err);
                assert_true(k <= page);
                for (size_t i = 0; i < k; i++) {
                    assert_int_equal(cm_row_shard(t, ids[i], 2), sh);
                    const float *want = ps_rows_find(ref, t, ids[i], NULL);
                    if (!want) fail_msg("table %d: row %llu should not exist", t,
                                        (unsigned long long)ids[i]);
                    expect_same(want, vals + i * SP_DIM, SP_DIM);
                }
                total += k;
                from = next;
                free(ids);
                free(vals);
            } while (next != 0);
        }
        /* Each row once: as many as the reference holds, all found there. */
        if (total != ps_rows_count(ref, t))
            fail_msg("table %d: %zu rows dumped, the reference holds %zu", t, total,
                     ps_rows_count(ref, t));
    }
}

/* Before the chief's Initialize a model-less server serves nothing: pushes
 * and pulls fail UNAVAILABLE (quickly with a short connect timeout),
 * Checkpoints says not initialised; an Initialize without a model, with a
 * bad one, or whose cluster fingerprint does not match its model on this
 * cluster is refused and changes nothing; a good one makes the shards
 * serve; a second chief with another model is then refused, naming both. */
static void test_sparse_learns_model_from_init(void **state) {
    (void)state;
    fx_start_sparse(300);
    size_t n = F.m->numel;
    float *buf = calloc(n, sizeof(float));
    float vals[SP_NT * SP_NB * SP_DIM];
    assert_non_null(buf);
    char err[1024] = "";
    ps_ticket *t = NULL;
    batch b;
    batch_fill(&b, 0, 0);
    for (int op = 0; op < 3; op++) {
        int64_t t0 = now_ms();
        if (op == 0) assert_int_equal(ps_client_pull(F.cli[0], 0, buf, &t), CM_OK);
        if (op == 1) assert_int_equal(ps_client_push(F.cli[0], 0, buf, &t), CM_OK);
        if (op == 2)
            assert_int_equal(ps_client_pull_rows(F.cli[0], 0, &b.keys, vals, 0, &t), CM_OK);
        assert_int_equal(ps_ticket_wait(t, NULL, err, sizeof err), CM_EUNAVAIL);
        if (!strstr(err, "UNAVAILABLE") || !strstr(err, "not initialised yet"))
            fail_msg("op %d: %s", op, err);
        assert_true(now_ms() - t0 < 4000);
    }
    ps_shard_checkpoints ck[2];
    if (ps_client_checkpoints(F.cli[0], -1, ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    for (int i = 0; i < 2; i++) {
        assert_false(ck[i].initialised);
        assert_false(ck[i].durable);
        assert_false(ck[i].recovering);
    }
    char msg[1024] = "";
    Psrpc__Cluster cl = good_cluster();
    Psrpc__StatsRequest sr = PSRPC__STATS_REQUEST__INIT;
    sr.cluster = &cl;
    int code = raw_msg("/psrpc.Ps/Stats", &sr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_UNAVAILABLE, "not initialised yet", NULL);

    /* Bad Initializes. */
    Psrpc__OptimizerConfig oc = PSRPC__OPTIMIZER_CONFIG__INIT, toc = PSRPC__OPTIMIZER_CONFIG__INIT;
    oc.kind = "sgd";
    oc.lr = LR;
    toc.kind = "adagrad";
    toc.lr = LR;
    Psrpc__InitRequest ir = PSRPC__INIT_REQUEST__INIT;
    ir.cluster = &cl;
    ir.optimizer = &oc;
    ir.table_optimizer = &toc;
    ir.seed = SEED;
    ir.num_workers = 2;
    ir.sync = PSRPC__SYNC_MODE__SYNC_SYNC;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "carries none", NULL);
    ps_wire_spec spec;
    ps_wire_spec_init(&spec, F.m, SP_MIN_PART);
    ir.model = &spec.spec;
    spec.spec.n_vars = 0;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "bad model", "0 variables", NULL);
    spec.spec.n_vars = (size_t)F.m->nvars;
    /* The caller thinks of 3 PS: its fingerprint is not this cluster's. */
    cm_placement *p3 = NULL;
    assert_int_equal(cm_placement_create(F.m, 3, SP_MIN_PART, &p3), CM_OK);
    char desc3[256];
    Psrpc__Cluster cl3 = PSRPC__CLUSTER__INIT;
    cl3.fingerprint = ps_wire_identity(F.m, p3, desc3, sizeof desc3);
    cl3.description = desc3;
    ir.cluster = &cl3;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "cluster mismatch", F.desc, desc3,
                "deepfm 3 tables of 4", "on 2 PS", "on 3 PS", NULL);
    cm_placement_destroy(p3);
    /* The right fingerprint for another model than the one sent. */
    ir.cluster = &cl;
    spec.vars[0].dim = 5;
    code = raw_msg("/psrpc.Ps/Initialize", &ir.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_FAILED_PRECONDITION, "cluster mismatch", "tables of 5", F.desc,
                NULL);
    spec.vars[0].dim = SP_DIM;
    if (ps_client_checkpoints(F.cli[0], -1, ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_false(ck[0].initialised);
    code = raw_msg("/psrpc.Ps/Stats", &sr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_UNAVAILABLE, "not initialised yet", NULL);

    ps_wire_spec_free(&spec);
    /* A good one: both shards serve, in epoch 1. */
    sparse_init_ok();
    assert_int_equal(ps_client_epoch(F.cli[0]), 1);
    if (ps_client_checkpoints(F.cli[0], -1, ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_true(ck[0].initialised && ck[1].initialised);
    expect_values(0, 0, F.init);
    assert_int_equal(ps_client_pull_rows(F.cli[1], 0, &b.keys, vals, 0, &t), CM_OK);
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    for (int tb = 0; tb < SP_NT; tb++)
        for (size_t u = b.tab_begin[tb]; u < b.tab_begin[tb + 1]; u++) {
            float want[SP_DIM];
            cm_row_init(&F.m->vars[F.m->table_var[tb]], SEED, b.ids[u], want);
            expect_same(want, vals + u * SP_DIM, SP_DIM);
        }

    /* A second chief with another model (LR on the same inputs). */
    cm_ctr_spec lsp = {.nfields = SP_NT};
    cm_model *lr = NULL;
    cm_placement *lpl = NULL;
    assert_int_equal(cm_model_create_lr(&lsp, &lr), CM_OK);
    assert_int_equal(cm_placement_create(lr, 2, SP_MIN_PART, &lpl), CM_OK);
    ps_client_cfg cc = {.model = lr, .placement = lpl, .ps_addrs = F.addrs, .rank = 0,
                        .deadline_ms = DEADLINE, .connect_timeout_ms = 300};
    ps_client *other = NULL;
    if (ps_client_open(&cc, &other, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ps_init_cfg ic = sparse_init_cfg();
    assert_int_equal(ps_client_init(other, &ic, err, sizeof err), CM_EINVAL);
    if (!strstr(err, "FAILED_PRECONDITION") || !strstr(err, "cluster mismatch") ||
        !strstr(err, "deepfm 3 tables of 4") || !strstr(err, "lr 3 tables of 1"))
        fail_msg("%s", err);
    ps_client_close(other);
    cm_placement_destroy(lpl);
    cm_model_destroy(lr);
    expect_values(0, 0, F.init);
    free(buf);
    fx_stop();
}

/* push_pull_rows and pull_rows over 2 shards equal the local replay, step
 * after step; an evaluation pull creates nothing, a training pull does;
 * the dumps through the client hold every row once. */
static void test_sparse_round_trip(void **state) {
    (void)state;
    fx_start_sparse(2000);
    sparse_init_ok();
    sparse_ref R = sparse_ref_new();
    ps_rows *ref = R.rows;
    float *dref = R.dense;
    for (int64_t step = 0; step < 3; step++) sparse_step(step, ref, dref);
    expect_values(3, 3, dref);
    ps_client_stats st;
    char err[512] = "";
    if (ps_client_stats_get(F.cli[0], &st, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(st.rows, ps_rows_total(ref));
    assert_int_equal(st.min_version, 3);

    /* Evaluation reads of rows seen and never seen: values, nothing made. */
    batch e;
    batch_fill(&e, 3, 9);
    for (int i = 0; i < SP_NB; i++) e.ids[i] += 500; /* Table 0: rows nobody trained. */
    float got[SP_NT * SP_NB * SP_DIM], want[SP_NT * SP_NB * SP_DIM];
    ps_ticket *t = NULL;
    assert_int_equal(ps_client_pull_rows(F.cli[1], 3, &e.keys, got, 0, &t), CM_OK);
    int64_t v = -1;
    if (ps_ticket_wait(t, &v, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(v, 3);
    ref_read(ref, &e.keys, 0, want);
    expect_same(want, got, SP_NT * SP_NB * SP_DIM);
    ps_client_stats st2;
    if (ps_client_stats_get(F.cli[0], &st2, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(st2.rows, st.rows);
    assert_true(st2.rows_pulled > st.rows_pulled);
    /* A training read creates them, with the same values. */
    assert_int_equal(ps_client_pull_rows(F.cli[1], 0, &e.keys, got, 1, &t), CM_OK);
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ref_read(ref, &e.keys, 1, want);
    expect_same(want, got, SP_NT * SP_NB * SP_DIM);
    if (ps_client_stats_get(F.cli[0], &st2, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(st2.rows, ps_rows_total(ref));
    assert_true(st2.rows > st.rows);
    /* A pull of rows of one table only calls the shards that hold them. */
    size_t one_begin[SP_NT + 1] = {0, 1, 1, 1};
    uint64_t one_id = e.ids[0];
    ps_row_keys one = {.ntables = SP_NT, .tab_begin = one_begin, .ids = &one_id};
    assert_int_equal(ps_client_pull_rows(F.cli[1], 0, &one, got, 0, &t), CM_OK);
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) fail_msg("%s", err);
    expect_same(want, got, SP_DIM);

    expect_dumps(ref, 5);
    expect_dumps(ref, 1000);
    /* Bad client arguments: no ticket. */
    assert_int_equal(ps_client_pull_rows(F.cli[1], 0, NULL, got, 0, &t), CM_EINVAL);
    assert_null(t);
    batch bad = e;
    bad.keys.ntables = 2;
    assert_int_equal(ps_client_pull_rows(F.cli[1], 0, &bad.keys, got, 0, &t), CM_EINVAL);
    assert_int_equal(ps_client_push_pull_rows(F.cli[1], 3, dref, dref, &bad.keys, bad.g, NULL,
                                              NULL, &t),
                     CM_EINVAL);
    uint64_t *ids = NULL;
    float *vals = NULL;
    size_t k = 0;
    uint64_t next = 0;
    assert_int_equal(ps_client_dump_rows(F.cli[1], 2, 0, 0, 10, &ids, &vals, &k, &next, err,
                                         sizeof err),
                     CM_EINVAL);
    assert_int_equal(ps_client_dump_rows(F.cli[1], 0, SP_NT, 0, 10, &ids, &vals, &k, &next, err,
                                         sizeof err),
                     CM_EINVAL);
    sparse_ref_free(&R);
    fx_stop();
}

/* Rows messages for raw requests: ids as bytes, values float32. */
typedef struct raw_rows {
    Psrpc__Rows r[4];
    Psrpc__Rows *rp[4];
    uint64_t ids[4][4];
    float vals[4][4 * SP_DIM];
} raw_rows;

static void raw_rows_add(raw_rows *rr, size_t *n, uint32_t table, const uint64_t *ids, size_t k,
                         int with_values) {
    size_t i = (*n)++;
    CHECK(i < 4 && k <= 4);
    psrpc__rows__init(&rr->r[i]);
    rr->r[i].table = table;
    memcpy(rr->ids[i], ids, k * sizeof *ids);
    rr->r[i].ids.data = (uint8_t *)rr->ids[i];
    rr->r[i].ids.len = k * sizeof *ids;
    rr->r[i].dtype = PSRPC__DTYPE__DTYPE_FLOAT32;
    if (with_values) {
        for (size_t j = 0; j < k * SP_DIM; j++) rr->vals[i][j] = 0.25f;
        rr->r[i].data.data = (uint8_t *)rr->vals[i];
        rr->r[i].data.len = k * SP_DIM * sizeof(float);
    }
    rr->rp[i] = &rr->r[i];
}

/* A Pull whose wanted rows would make a reply over the message limit (a
 * few bytes of one id repeated, each asking for a row's values) is refused
 * before the shard builds it, and the shard stays up: such a reply could
 * not be sent, and building it cost the PS memory in proportion (found by
 * a review: a 4 MB request made a 132 MB reply). */
static void test_sparse_want_over_limit(void **state) {
    (void)state;
    memset(&F, 0, sizeof F);
    F.m = sparse_model();
    assert_int_equal(cm_placement_create(F.m, 2, SP_MIN_PART, &F.pl), CM_OK);
    for (int i = 0; i < 2; i++) {
        ps_server_cfg sc = {.nshards = 2, .max_message = 1 << 20};
        fx_serve(i, &sc);
    }
    fx_connect(2000);
    sparse_init_ok();
    uint64_t mine = 0;
    while (cm_row_shard(0, mine, 2) != 0) mine++;
    enum { NIDS = 120000 }; /* 960,000 bytes asked; the reply 12 bytes an id at least. */
    uint64_t *ids = malloc(NIDS * sizeof *ids);
    assert_non_null(ids);
    for (int i = 0; i < NIDS; i++) ids[i] = mine;
    Psrpc__Rows want = PSRPC__ROWS__INIT, *wp = &want;
    want.table = 0;
    want.ids.data = (uint8_t *)ids;
    want.ids.len = NIDS * sizeof *ids;
    Psrpc__Cluster cl = good_cluster();
    Psrpc__PullRequest pr = PSRPC__PULL_REQUEST__INIT;
    pr.cluster = &cl;
    pr.rows_only = 1;
    pr.n_want = 1;
    pr.want = &wp;
    char msg[1024];
    int code = raw_msg("/psrpc.Ps/Pull", &pr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "over the message limit", NULL);
    /* The same few rows asked once are answered. */
    want.ids.len = 2 * sizeof *ids;
    code = raw_msg("/psrpc.Ps/Pull", &pr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    assert_int_equal(code, RPC_OK);
    free(ids);
    fx_stop();
}

/* Malformed sparse requests are INVALID_ARGUMENT, and the server stays up
 * with its version, rows and values as they were. */
static void test_sparse_malformed_requests(void **state) {
    (void)state;
    fx_start_sparse(2000);
    sparse_init_ok();
    sparse_ref R = sparse_ref_new();
    ps_rows *ref = R.rows;
    float *dref = R.dense;
    sparse_step(0, ref, dref);
    Psrpc__StatsReply *st0 = raw_stats();
    assert_int_equal(st0->version, 1);
    /* Ids of each shard. */
    uint64_t mine[4], theirs[4];
    for (uint64_t id = 0, a = 0, o = 0; a < 4 || o < 4; id++) {
        if (cm_row_shard(0, id, 2) == 0 && a < 4) mine[a++] = id;
        if (cm_row_shard(0, id, 2) == 1 && o < 4) theirs[o++] = id;
    }
    Psrpc__Cluster cl = good_cluster();
    cl.rank = 1;
    char msg[1024];
    int code, nbad = 0;
    enum { IDS_BYTES, TABLE, OTHER_SHARD, NOT_FINAL, SHORT_DATA, NPUSH };
    for (int k = 0; k < NPUSH; k++) {
        raw_rows rr;
        size_t nr = 0;
        Psrpc__PushRequest req = PSRPC__PUSH_REQUEST__INIT;
        req.cluster = &cl;
        req.step = 1;
        req.rows_final = 1;
        raw_rows_add(&rr, &nr, 0, mine, 2, 1);
        const char *want = NULL;
        switch (k) {
        case IDS_BYTES: rr.r[0].ids.len = 12; want = "12 id bytes, not a multiple of 8"; break;
        case TABLE: rr.r[0].table = 7; want = "rows of table 7: the model has 3 tables"; break;
        case OTHER_SHARD:
            rr.ids[0][1] = theirs[0];
            want = "belongs to shard 1, not 0";
            break;
        case NOT_FINAL: req.rows_final = 0; want = "rows_final"; break;
        case SHORT_DATA: rr.r[0].data.len -= 2; want = "data bytes, expected"; break;
        }
        req.n_rows = nr;
        req.rows = rr.rp;
        for (int pp = 0; pp < 2; pp++) {
            code = raw_msg(pp ? "/psrpc.Ps/PushPull" : "/psrpc.Ps/Push", &req.base, DEADLINE,
                           msg, sizeof msg, NULL, NULL);
            expect_fail(code, msg, RPC_INVALID_ARGUMENT, want, NULL);
            nbad++;
        }
    }
    /* Wants: a Pull's and a (good) PushPull's, refused before the push. */
    enum { W_IDS_BYTES, W_TABLE, W_OTHER_SHARD, NWANT };
    for (int k = 0; k < NWANT; k++) {
        raw_rows rr;
        size_t nr = 0;
        raw_rows_add(&rr, &nr, 0, mine, 3, 0);
        const char *want = NULL;
        switch (k) {
        case W_IDS_BYTES: rr.r[0].ids.len = 7; want = "not a multiple of 8"; break;
        case W_TABLE: rr.r[0].table = 9; want = "rows asked of table 9: the model has 3"; break;
        case W_OTHER_SHARD:
            rr.ids[0][2] = theirs[1];
            want = "lives on shard 1, not 0";
            break;
        }
        Psrpc__PullRequest pr = PSRPC__PULL_REQUEST__INIT;
        pr.cluster = &cl;
        pr.min_version = 1;
        pr.rows_only = 1;
        pr.n_want = nr;
        pr.want = rr.rp;
        code = raw_msg("/psrpc.Ps/Pull", &pr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
        expect_fail(code, msg, RPC_INVALID_ARGUMENT, want, NULL);
        nbad++;
        raw_rows good;
        size_t ng = 0;
        raw_rows_add(&good, &ng, 0, mine, 2, 1);
        Psrpc__PushRequest req = PSRPC__PUSH_REQUEST__INIT;
        req.cluster = &cl;
        req.step = 1;
        req.rows_final = 1;
        req.n_rows = ng;
        req.rows = good.rp;
        req.n_want = nr;
        req.want = rr.rp;
        code = raw_msg("/psrpc.Ps/PushPull", &req.base, DEADLINE, msg, sizeof msg, NULL, NULL);
        expect_fail(code, msg, RPC_INVALID_ARGUMENT, want, NULL);
        nbad++;
    }
    /* A dump of a table that does not exist. */
    Psrpc__PullRequest dr = PSRPC__PULL_REQUEST__INIT;
    dr.cluster = &cl;
    dr.dump = 1;
    dr.dump_table = 5;
    code = raw_msg("/psrpc.Ps/Pull", &dr.base, DEADLINE, msg, sizeof msg, NULL, NULL);
    expect_fail(code, msg, RPC_INVALID_ARGUMENT, "dump of table 5: the model has 3 tables", NULL);
    nbad++;

    /* Up and unchanged. */
    Psrpc__StatsReply *st1 = raw_stats();
    assert_int_equal(st1->version, st0->version);
    assert_int_equal(st1->rows, st0->rows);
    assert_int_equal(st1->rows_pushed, st0->rows_pushed);
    assert_int_equal(st1->pushes, st0->pushes);
    assert_int_equal(st1->bad_requests, st0->bad_requests + (uint64_t)nbad);
    psrpc__stats_reply__free_unpacked(st0, NULL);
    psrpc__stats_reply__free_unpacked(st1, NULL);
    assert_int_equal(ps_server_wait(F.srv[0], 0), 0);
    expect_values(1, 1, dref);
    expect_dumps(ref, 100);
    /* And the step goes on: rank 1's malformed pushes were not counted. */
    sparse_step(1, ref, dref);
    expect_dumps(ref, 100);
    sparse_ref_free(&R);
    fx_stop();
}

/* With a data directory the model is kept as the store's record: servers
 * restarted without a model serve the same one, restore the rows of their
 * last checkpoint (dumped as they were), and after the chief's rollback go
 * on exactly as the replay. */
static void test_sparse_restart_from_data_dir(void **state) {
    (void)state;
    char dir[] = "/tmp/test_ps_server_sparse.XXXXXX";
    assert_non_null(mkdtemp(dir));
    fx_data_dir = dir;
    fx_every = 1;
    fx_start_sparse(2000);
    sparse_init_ok();
    sparse_ref R = sparse_ref_new();
    ps_rows *ref = R.rows;
    float *dref = R.dense;
    for (int64_t step = 0; step < 2; step++) {
        /* The last step reads rows for the next too: created after the last
         * checkpoint of the version, they are written at shutdown (the
         * version is checkpointed again). */
        sparse_step_as(step, 1, ref, dref);
        ps_server_checkpoint_wait(F.srv[0]);
        ps_server_checkpoint_wait(F.srv[1]);
    }
    expect_dumps(ref, 7);
    fx_stop();

    fx_start_sparse(2000);
    ps_shard_checkpoints ck[2];
    char err[512] = "";
    /* The cluster fingerprint of the DeepFM is accepted: the same model. */
    if (ps_client_checkpoints(F.cli[0], -1, ck, err, sizeof err) != CM_OK) fail_msg("%s", err);
    for (int i = 0; i < 2; i++) {
        assert_true(ck[i].initialised && ck[i].recovering && ck[i].durable);
        assert_int_equal(ck[i].version, 2);
    }
    expect_dumps(ref, 7);
    ps_client_stats st;
    if (ps_client_stats_get(F.cli[0], &st, err, sizeof err) != CM_OK) fail_msg("%s", err);
    assert_int_equal(st.rows, ps_rows_total(ref));
    /* The same Init is accepted (restored config), then the rollback. */
    sparse_init_ok();
    if (ps_client_rollback(F.cli[0], 2, 2, err, sizeof err) != CM_OK) fail_msg("%s", err);
    ps_client_set_epoch(F.cli[1], 2);
    expect_values(2, 2, dref);
    sparse_step(2, ref, dref);
    expect_dumps(ref, 7);
    fx_stop();
    fx_data_dir = NULL;
    fx_every = 0;

    /* A server given another model on that directory is refused. */
    cm_ctr_spec lsp = {.nfields = SP_NT};
    cm_model *lr = NULL;
    cm_placement *lpl = NULL;
    assert_int_equal(cm_model_create_lr(&lsp, &lr), CM_OK);
    assert_int_equal(cm_placement_create(lr, 2, SP_MIN_PART, &lpl), CM_OK);
    char sdir[512];
    snprintf(sdir, sizeof sdir, "%s/shard-0", dir);
    ps_server_cfg sc = {.model = lr, .placement = lpl, .shard = 0, .data_dir = sdir};
    ps_server *s = (ps_server *)1;
    assert_int_equal(ps_server_create(&sc, &s), CM_EINVAL);
    assert_null(s);
    cm_placement_destroy(lpl);
    cm_model_destroy(lr);
    sparse_ref_free(&R);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    assert_int_equal(system(cmd), 0);
}

/* ===== ps_wire: the model spec ===== */

/* spec_init -> pack -> unpack -> spec_model gives the same model: the same
 * fingerprint, description, variables and minimum partition. */
static void spec_round_trip(const cm_model *m, size_t min_part) {
    ps_wire_spec sp;
    ps_wire_spec_init(&sp, m, min_part);
    size_t len = protobuf_c_message_get_packed_size(&sp.spec.base);
    uint8_t *buf = malloc(len ? len : 1);
    assert_non_null(buf);
    protobuf_c_message_pack(&sp.spec.base, buf);
    ps_wire_spec_free(&sp);
    Psrpc__ModelSpec *spec = psrpc__model_spec__unpack(NULL, len, buf);
    free(buf);
    assert_non_null(spec);
    cm_model *got = NULL;
    size_t got_min = 0;
    char err[256] = "";
    if (ps_wire_spec_model(spec, &got, &got_min, err, sizeof err) != CM_OK)
        fail_msg("%s: %s", m->kind, err);
    psrpc__model_spec__free_unpacked(spec, NULL);
    assert_int_equal(got_min, min_part);
    assert_true(cm_model_fingerprint(got) == cm_model_fingerprint(m));
    char a[256], b[256];
    ps_wire_describe(m, a, sizeof a);
    ps_wire_describe(got, b, sizeof b);
    assert_string_equal(a, b);
    assert_int_equal(got->nvars, m->nvars);
    assert_int_equal(got->numel, m->numel);
    assert_int_equal(got->ntables, m->ntables);
    for (int i = 0; i < m->nvars; i++) {
        const cm_var *x = &m->vars[i], *y = &got->vars[i];
        assert_string_equal(x->name, y->name);
        assert_int_equal(x->kind, y->kind);
        assert_int_equal(x->dim, y->dim);
        assert_int_equal(x->offset, y->offset);
        assert_int_equal(x->init, y->init);
        assert_int_equal(x->fan_in, y->fan_in);
        assert_int_equal(x->fan_out, y->fan_out);
        assert_true(x->init_scale == y->init_scale);
    }
    /* Equal placements too, so every process agrees on the cluster. */
    cm_placement *p1 = NULL, *p2 = NULL;
    assert_int_equal(cm_placement_create(m, 3, min_part, &p1), CM_OK);
    assert_int_equal(cm_placement_create(got, 3, min_part, &p2), CM_OK);
    char d1[256], d2[256];
    assert_true(ps_wire_identity(m, p1, d1, sizeof d1) == ps_wire_identity(got, p2, d2, sizeof d2));
    assert_string_equal(d1, d2);
    cm_placement_destroy(p1);
    cm_placement_destroy(p2);
    cm_model_destroy(got);
}

static void test_wire_spec_round_trip(void **state) {
    (void)state;
    static const int sizes[] = {784, 64, 10};
    cm_model *m = NULL;
    assert_int_equal(cm_model_create_mlp(sizes, 3, &m), CM_OK);
    spec_round_trip(m, MIN_PART);
    char d[256];
    ps_wire_describe(m, d, sizeof d);
    assert_string_equal(d, "mlp 784,64,10");
    cm_model_destroy(m);
    m = sparse_model();
    spec_round_trip(m, SP_MIN_PART);
    ps_wire_describe(m, d, sizeof d);
    assert_string_equal(d, "deepfm 3 tables of 4, 90 dense 8");
    cm_model_destroy(m);
    cm_ctr_spec sp = {.nfields = 5, .emb_init_scale = 0.03f};
    assert_int_equal(cm_model_create_lr(&sp, &m), CM_OK);
    spec_round_trip(m, 1024);
    ps_wire_describe(m, d, sizeof d);
    assert_string_equal(d, "lr 5 tables of 1, 1 dense");
    cm_model_destroy(m);
    assert_int_equal(cm_model_create_vector(1000, &m), CM_OK);
    spec_round_trip(m, 4096);
    cm_model_destroy(m);
}

/* Malformed specs are refused with a message, nothing created. */
static void test_wire_spec_malformed(void **state) {
    (void)state;
    cm_model *dm = sparse_model();
    enum { NO_VARS, HUGE_DIM, HUGE_NUMEL, TOO_MANY_DIMS, TABLE_DIM0, TABLE_DIM_HUGE, NAME_LONG,
           NAME_NULL, DUP_NAME, BAD_KIND, BAD_INIT, GLOROT_NO_FAN, HUGE_FAN, MIN_PART_0,
           MIN_PART_HUGE, NO_KIND, NCASES };
    static const char *const wants[NCASES] = {
        "0 variables", "dimension 0 is -1", "too large", "5 dimensions", "dim 0 out of range",
        "out of range", "longer than 63 bytes", "name missing", "appears twice",
        "unknown kind", "unknown initialiser", "Glorot needs", "Glorot needs",
        "minimum partition of 0 bytes", "minimum partition", "bad model kind"};
    for (int k = 0; k < NCASES; k++) {
        ps_wire_spec sp;
        ps_wire_spec_init(&sp, dm, SP_MIN_PART);
        Psrpc__Variable *tv = &sp.vars[0];              /* field0 */
        Psrpc__Variable *kv = &sp.vars[SP_NT + 1];      /* dnn0/kernel */
        assert_int_equal(kv->n_shape, 2);
        uint64_t shape5[5] = {1, 2, 3, 4, 5};
        char longname[80];
        memset(longname, 'x', 64);
        longname[64] = 0;
        switch (k) {
        case NO_VARS: sp.spec.n_vars = 0; break;
        case HUGE_DIM: kv->shape[0] = (uint64_t)1 << 41; break;
        case HUGE_NUMEL: kv->shape[0] = kv->shape[1] = (uint64_t)1 << 20; break;
        case TOO_MANY_DIMS: kv->n_shape = 5; kv->shape = shape5; break;
        case TABLE_DIM0: tv->dim = 0; break;
        case TABLE_DIM_HUGE: tv->dim = 1u << 20; break;
        case NAME_LONG: tv->name = longname; break;
        case NAME_NULL: tv->name = NULL; break;
        case DUP_NAME: tv->name = kv->name; break;
        case BAD_KIND: kv->kind = (Psrpc__VarKind)5; break;
        case BAD_INIT: kv->init = 7; break;
        case GLOROT_NO_FAN: kv->fan_in = 0; break;
        case HUGE_FAN: kv->fan_out = (uint64_t)1 << 50; break;
        case MIN_PART_0: sp.spec.min_part_bytes = 0; break;
        case MIN_PART_HUGE: sp.spec.min_part_bytes = (uint64_t)1 << 41; break;
        case NO_KIND: sp.spec.kind = ""; break;
        }
        cm_model *m = (cm_model *)1;
        size_t mp = 0;
        char err[256] = "";
        int rc = ps_wire_spec_model(&sp.spec, &m, &mp, err, sizeof err);
        if (rc != CM_EINVAL || m != NULL || !strstr(err, wants[k]))
            fail_msg("case %d: rc %d, '%s', want '%s'", k, rc, err, wants[k]);
        ps_wire_spec_free(&sp);
    }
    cm_model *m = (cm_model *)1;
    size_t mp = 0;
    char err[256] = "";
    assert_int_equal(ps_wire_spec_model(NULL, &m, &mp, err, sizeof err), CM_EINVAL);
    assert_null(m);
    cm_model_destroy(dm);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_and_start_errors),
        cmocka_unit_test(test_client_happy_path),
        cmocka_unit_test(test_client_push_pull_parts),
        cmocka_unit_test(test_client_calls_split),
        cmocka_unit_test(test_client_async_split_one_version),
        cmocka_unit_test(test_client_wakes_once),
        cmocka_unit_test(test_client_close_right_after_wait),
        cmocka_unit_test(test_client_call_window),
        cmocka_unit_test(test_client_call_window_failure),
        cmocka_unit_test(test_client_spin),
        cmocka_unit_test(test_client_bf16_pushes),
        cmocka_unit_test(test_malformed_bytes),
        cmocka_unit_test(test_bad_push_contents),
        cmocka_unit_test(test_wrong_cluster),
        cmocka_unit_test(test_oversized_push),
        cmocka_unit_test(test_out_of_step_pushes),
        cmocka_unit_test(test_pull_deadline_then_clean_shutdown),
        cmocka_unit_test(test_shutdown_request),
        cmocka_unit_test(test_evaluator_before_init_waited_for),
        cmocka_unit_test(test_evaluator_refused_aborted_waited_for),
        cmocka_unit_test(test_shutdown_reaches_restarted_shard),
        cmocka_unit_test(test_long_parked_call_retried_after_restart),
        cmocka_unit_test(test_worker_steps_with_empty_shard),
        cmocka_unit_test(test_calls_capped_per_shard),
        cmocka_unit_test(test_sparse_want_over_limit),
        cmocka_unit_test(test_abort_waiting_after_half_step),
        cmocka_unit_test(test_checkpoint_restore),
        cmocka_unit_test(test_init_from_values),
        cmocka_unit_test(test_destroy_with_waiting_pull),
        cmocka_unit_test(test_sparse_learns_model_from_init),
        cmocka_unit_test(test_sparse_round_trip),
        cmocka_unit_test(test_sparse_malformed_requests),
        cmocka_unit_test(test_sparse_restart_from_data_dir),
        cmocka_unit_test(test_wire_spec_round_trip),
        cmocka_unit_test(test_wire_spec_malformed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
