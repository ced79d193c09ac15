/* fuzz_rendezvous.c - the chief's rendezvous (worker/sync/wk_rendezvous.c):
 * JoinRequests decoded and answered on the stub transport.
 * SPDX-License-Identifier: MIT
 *
 * Byte 0: the job's number of ranks (1 + b % 8). Then a sequence of
 * records (fz_util.h): method 0 is a Join with the record's bytes, 1 asks
 * for the server's description, anything else calls a method the server
 * does not have. Checked: every call is finished exactly once (the stub),
 * and a Join answered OK holds every rank's address in rank order, its
 * ring's generation and job id, and a root among the members. (Joins may
 * carry state and form ring after ring; the start step is then a joiner's,
 * so it is not checked here: test_rendezvous checks it.)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_status.h"
#include "fuzz/fz_util.h"
#include "fuzz/rpc_stub.h"
#include "proto/ps.pb-c.h"
#include "worker/sync/wk_rendezvous.h"

#define FZ_RDV_FP 0x72656e64657a766fULL /* "rendezvo" */
#define FZ_RDV_JOB 0x6a6f626a6f626a6fULL
#define FZ_RDV_STEP 7
#define FZ_MAX_CALLS 64


FZ_INITIALIZE_LOGS_ONLY

static void check_reply(const rpc_call *c, int nranks) {
    if (rpc_stub_state(c) != RPC_STUB_REPLIED) return;
    size_t n;
    const uint8_t *b = rpc_stub_reply(c, &n);
    Psrpc__JoinReply *r = psrpc__join_reply__unpack(NULL, n, b);
    /* Whole rings only (no wk_rdv_server_set_elastic): every rank, in
     * order; the job id of the ring's generation; the root a member. */
    if (!r || (int)r->n_ring_addrs != nranks || (int)r->n_members != nranks ||
        r->generation < 1 || r->root >= r->n_members ||
        r->job_id != (FZ_RDV_JOB ^ (0x9e3779b97f4a7c15ull * (uint64_t)(r->generation - 1))) ||
        r->nccl_id.len != 4)
        abort();
    for (int i = 0; i < nranks; i++)
        if (!r->ring_addrs[i] || !r->ring_addrs[i][0] || r->members[i] != (uint32_t)i) abort();
    psrpc__join_reply__free_unpacked(r, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int nranks = 1 + data[0] % 8;
    wk_rdv_server *s;
    char err[256];
    static const uint8_t nccl[4] = {1, 2, 3, 4};
    if (wk_rdv_server_start("fuzz:0", nranks, FZ_RDV_FP, "fuzz job", FZ_RDV_JOB, FZ_RDV_STEP,
                            nccl, sizeof nccl, NULL, &s, err, sizeof err) != CM_OK)
        abort();
    rpc_server *rs = rpc_stub_server();
    rpc_call *calls[FZ_MAX_CALLS];
    int ncalls = 0, method;
    fz_reader rd = {data + 1, data + size};
    const uint8_t *req;
    size_t len;
    while (ncalls < FZ_MAX_CALLS && fz_next_record(&rd, &method, &req, &len)) {
        method %= 3;
        if (method == 1) {
            char d[512];
            int joined = wk_rdv_server_describe(s, d, sizeof d);
            if (joined < 0 || joined > nranks) abort();
            continue;
        }
        calls[ncalls++] = rpc_stub_invoke(rs, method == 0 ? "/psrpc.Rendezvous/Join"
                                                          : "/psrpc.Rendezvous/Leave",
                                          req, len);
    }
    for (int i = 0; i < ncalls; i++) check_reply(calls[i], nranks);
    wk_rdv_server_destroy(s); /* Fails the Joins still waiting. */
    return 0;
}
