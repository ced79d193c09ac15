/* fuzz_ps_server.c - the PS's request handlers (ps/ps_server.c) on the stub
 * transport (rpc_stub.c): a server per input, then the input's sequence of
 * calls (fz_util.h), each handled in-process as gRPC would hand it over.
 * SPDX-License-Identifier: MIT
 *
 * Byte 0 picks the server: one of the small models of fz_util.c on 1 to 4
 * shards (the seeds' requests carry those fingerprints), or no model (the
 * server learns it from an Initialize). Checked beyond the sanitizers:
 * every call is finished exactly once, and before the server is gone (the
 * stub), a held call whose client goes away is finished by the server's
 * on_cancel, and every reply parses as its method's reply message. Calls
 * come with the admin's or the workers' token (admin-only requests are
 * then refused).
 *
 * Built a second time with FZ_DURABLE as fuzz_ps_durable: the server then
 * has a fresh data directory per input and checkpoints every version (a
 * writer thread, LevelDB), so Rollback loads generations, Checkpoints
 * collects old ones and the publish hook runs; slower, hence apart.
 *
 * One limit of the harness's own: an Initialize whose model has more than
 * FZ_MAX_NUMEL dense floats or rows wider than FZ_MAX_DIM is not sent (a
 * server's memory follows the model the chief sends it, on purpose; the
 * fuzzer would only measure the machine).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "common/cm_status.h"
#include "fuzz/fz_util.h"
#include "fuzz/rpc_stub.h"
#include "proto/health.pb-c.h"
#include "proto/ps.pb-c.h"
#include "ps/ps_server.h"
#include "ps/ps_wire.h"

#define FZ_MAX_CALLS 64
#define FZ_MAX_NUMEL 1024
#define FZ_MAX_DIM 64


/* FUZZ_TRACE=1: print every call's outcome (to see what a seed reaches). */
static int trace;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_logs_init();
    trace = getenv("FUZZ_TRACE") != NULL;
    fz_model(FZ_MODEL_MLP);
    return 0;
}

static int init_too_big(const uint8_t *d, size_t n) {
    Psrpc__InitRequest *r = psrpc__init_request__unpack(NULL, n, d);
    if (!r) return 0;
    int big = 0;
    cm_model *m = NULL;
    size_t min_part;
    char err[256];
    if (r->model && ps_wire_spec_model(r->model, &m, &min_part, err, sizeof err) == CM_OK)
        big = m->numel > FZ_MAX_NUMEL || cm_model_max_dim(m) > FZ_MAX_DIM;
    cm_model_destroy(m);
    psrpc__init_request__free_unpacked(r, NULL);
    return big;
}

static void bad_reply(int method) {
    fprintf(stderr, "fuzz_ps_server: the reply of %s does not parse\n", fz_methods[method]);
    abort();
}

/* A finished call's reply must be its method's reply message. */
static void check_reply(int method, const rpc_call *c) {
    if (rpc_stub_state(c) != RPC_STUB_REPLIED) return;
    size_t n;
    const uint8_t *b = rpc_stub_reply(c, &n);
    const ProtobufCMessageDescriptor *d = NULL;
    switch (method) {
    case FZ_INIT: d = &psrpc__init_reply__descriptor; break;
    case FZ_PUSH: d = &psrpc__push_reply__descriptor; break;
    case FZ_STATS: d = &psrpc__stats_reply__descriptor; break;
    case FZ_CHECKPOINTS: d = &psrpc__checkpoints_reply__descriptor; break;
    case FZ_ROLLBACK: d = &psrpc__rollback_reply__descriptor; break;
    case FZ_SHUTDOWN: d = &psrpc__shutdown_reply__descriptor; break;
    case FZ_HEALTH: d = &grpc__health__v1__health_check_response__descriptor; break;
    case FZ_PULL:
    case FZ_PUSHPULL: {
        ps_wire_msg m;
        char err[256];
        if (ps_wire_decode_rows(&psrpc__pull_reply__descriptor, 2, 3, b, n, &m, err,
                                sizeof err) != CM_OK)
            bad_reply(method);
        ps_wire_msg_free(&m);
        return;
    }
    default: bad_reply(method); /* Replied to a method it does not have. */
    }
    ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, n, b);
    if (!m) bad_reply(method);
    protobuf_c_message_free_unpacked(m, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    fz_ps_config c = fz_ps_config_decode(data[0]);
    ps_server_cfg cfg = {.model = fz_model(c.model),
                         .placement = fz_placement(c.model, c.nshards),
                         .nshards = c.nshards,
                         .shard = c.shard,
                         .threads = 1,
                         .max_message = 1 << 20};
#ifdef FZ_DURABLE
    static char dir[600], rows[620];
    if (!dir[0]) snprintf(dir, sizeof dir, "%s/ps", fz_tmpdir());
    if (!rows[0]) snprintf(rows, sizeof rows, "%s-rows", dir); /* The row store's default. */
    fz_rmtree(dir);
    fz_rmtree(rows);
    cfg.data_dir = dir;
    cfg.checkpoint_every = 1;
#endif
    ps_server *s;
    int port;
    if (ps_server_create(&cfg, &s) != CM_OK || ps_server_start(s, "fuzz:0", &port) != CM_OK)
        abort();
    rpc_server *rs = rpc_stub_server();
    rpc_call *calls[FZ_MAX_CALLS];
    int methods[FZ_MAX_CALLS], ncalls = 0;
    fz_reader rd = {data + 1, data + size};
    int method;
    const uint8_t *req;
    size_t len;
    while (ncalls < FZ_MAX_CALLS && fz_next_record(&rd, &method, &req, &len)) {
        /* Bit 6: the client of the open call number len % ncalls goes away
         * (a parked Pull's on_cancel); bit 7: call with the workers' token
         * (admin-only requests refused); the rest: the method. */
        if (method & 0x40) {
            if (!ncalls) continue;
            const size_t i = len % (size_t)ncalls;
            const int ran = rpc_stub_cancel(calls[i]);
            if (trace)
                fprintf(stderr, "fuzz_ps_server: the client of call %zu goes away: %s\n", i,
                        ran ? "cancelled" : "(finished already)");
            continue;
        }
        const int level = method & 0x80 ? RPC_AUTH_WORKER : RPC_AUTH_ADMIN;
        method = (method & 0x3f) % FZ_NMETHODS;
        if (method == FZ_INIT && init_too_big(req, len)) continue;
        calls[ncalls] = rpc_stub_invoke_as(rs, fz_methods[method], level, req, len);
        methods[ncalls] = method;
        check_reply(method, calls[ncalls]);
        if (trace)
            fprintf(stderr, "fuzz_ps_server: %s (%zu bytes): %s %s\n", fz_methods[method], len,
                    rpc_stub_state(calls[ncalls]) == RPC_STUB_OPEN ? "open" : "finished",
                    rpc_status_name(rpc_stub_code(calls[ncalls])));
        ncalls++;
    }
    /* Pulls answered by a later push. */
    for (int i = 0; i < ncalls; i++) check_reply(methods[i], calls[i]);
    /* Fails the pulls still waiting; the stub checks that none is left. */
    ps_server_destroy(s, 0);
    return 0;
}
