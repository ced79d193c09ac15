/* ps_probe.c - one call to a running psserver, as an honest client or as
 * an attacker would make it; for the integration tests (tests/integration/
 * security_mode.py), which assert on the JSON line it prints.
 * SPDX-License-Identifier: MIT
 *
 *   ps_probe --addr H:P [credentials] COMMAND [ARGS]
 *
 * The model is a tiny MLP (4,3) on one shard. Every command prints one JSON
 * line {"cmd":..., "ok":0|1, "status":..., "msg":..., ...} and exits 0 once
 * it has an answer (a refusal is an answer); 2 on a usage error. push and
 * pull lines carry "ms", the call's own time (not the process's start).
 */
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "common/cm_token.h"
#include "proto/rpc.h"
#include "ps/ps_client.h"
#include "ps/ps_optim.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: ps_probe --addr H:P [--token-file F] [--admin-token-file F]\n"
            "                [--tls-ca F [--tls-cert F --tls-key F] [--tls-server-name N]]\n"
            "                [--deadline-ms N] [--layers A,B,...] COMMAND [ARGS]\n"
            "commands (model: mlp --layers, default 4,3, on one shard):\n"
            "  init [WORKERS]          initialise the shard (sgd, lr 0.1, seed 1)\n"
            "  stats                   the shard's counters\n"
            "  push STEP VALUE|nan|inf push a gradient of VALUE everywhere as rank 0\n"
            "  pull [MIN_VERSION]      the parameters (sum and first value)\n"
            "  checkpoints KEEP_FROM   list (and with KEEP_FROM >= 0 delete) generations\n"
            "  rollback VERSION EPOCH  roll the shard back\n"
            "  shutdown                ask the shard to stop\n"
            "  flood N AHEAD HOLD_S    N pulls of version now+AHEAD on one connection,\n"
            "                          then wait HOLD_S seconds and exit without closing\n"
            "  gzip                    a 1 MiB Stats request compressed with gzip\n"
            "  bomb METHOD FIELD N     a request of N empty occurrences of field FIELD\n"
            "                          (e.g. Push 3: empty tensors) to /psrpc.Ps/METHOD\n");
}

static void json_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') putchar('\\');
        if ((unsigned char)*s < 0x20)
            printf("\\u%04x", (unsigned char)*s);
        else
            putchar(*s);
    }
    putchar('"');
}

static void report(const char *cmd, int rc, const char *msg, const char *extra) {
    printf("{\"cmd\":\"%s\",\"ok\":%d,\"status\":", cmd, rc == CM_OK);
    json_str(cm_strerror(rc));
    printf(",\"msg\":");
    json_str(rc == CM_OK ? "" : msg);
    if (extra && *extra) printf(",%s", extra);
    printf("}\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    static const struct option opts[] = {{"addr", required_argument, 0, 'a'},
                                         {"token-file", required_argument, 0, 't'},
                                         {"admin-token-file", required_argument, 0, 'A'},
                                         {"tls-ca", required_argument, 0, 'c'},
                                         {"tls-cert", required_argument, 0, 'C'},
                                         {"tls-key", required_argument, 0, 'K'},
                                         {"tls-server-name", required_argument, 0, 'n'},
                                         {"deadline-ms", required_argument, 0, 'd'},
                                         {"layers", required_argument, 0, 'l'},
                                         {"help", no_argument, 0, 'h'},
                                         {0, 0, 0, 0}};
    const char *addr = NULL, *token_file = NULL, *admin_file = NULL;
    cm_security sec = {0};
    long deadline = 10000;
    int sizes[8] = {4, 3}, nsizes = 2;
    int c;
    while ((c = getopt_long(argc, argv, "+h", opts, NULL)) != -1) {
        switch (c) {
        case 'a': addr = optarg; break;
        case 't': token_file = optarg; break;
        case 'A': admin_file = optarg; break;
        case 'c': sec.tls_ca = optarg; break;
        case 'C': sec.tls_cert = optarg; break;
        case 'K': sec.tls_key = optarg; break;
        case 'n': sec.tls_server_name = optarg; break;
        case 'd': deadline = atol(optarg); break;
        case 'l': {
            nsizes = 0;
            for (char *tok = strtok(optarg, ","); tok && nsizes < 8; tok = strtok(NULL, ","))
                sizes[nsizes++] = atoi(tok);
            break;
        }
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!addr || optind >= argc || deadline < 1) {
        usage(stderr);
        return 2;
    }
    char err[1024] = "";
    if (cm_security_load(&sec, token_file, admin_file, err, sizeof err) != CM_OK) {
        fprintf(stderr, "ps_probe: %s\n", err);
        return 2;
    }
    const char *cmd = argv[optind];
    char **args = argv + optind + 1;
    int nargs = argc - optind - 1;

    if (!strcmp(cmd, "gzip") || (!strcmp(cmd, "bomb") && nargs == 3)) {
        /* Below the PS client: raw bytes (gzipped, or a decoder's bomb). */
        int gz = !strcmp(cmd, "gzip");
        rpc_client_opts o = {.token = cm_security_token(&sec),
                             .admin_token = cm_security_admin(&sec), .tls_ca = sec.tls_ca,
                             .tls_cert = sec.tls_cert, .tls_key = sec.tls_key,
                             .tls_server_name = sec.tls_server_name, .test_gzip = gz,
                             .max_message = 2047 << 20};
        rpc_client *cli = NULL;
        rpc_channel *ch = NULL;
        if (rpc_client_create(&o, &cli) != CM_OK || rpc_channel_open(cli, addr, &ch) != CM_OK) {
            fprintf(stderr, "ps_probe: cannot open a channel to %s\n", addr);
            return 2;
        }
        size_t n = 1 << 20;
        char method[128] = "/psrpc.Ps/Stats";
        if (!gz) {
            snprintf(method, sizeof method, "/psrpc.Ps/%s", args[0]);
            n = 2 * (size_t)atol(args[2]);
        }
        uint8_t *zeros = calloc(1, n ? n : 1);
        for (size_t i = 0; !gz && i < n; i += 2) /* Key (field, length-delimited), length 0. */
            zeros[i] = (uint8_t)((atoi(args[1]) << 3) | 2);
        uint8_t *reply = NULL;
        size_t rlen = 0;
        double t0 = cm_now();
        int admin = !strcmp(method, "/psrpc.Ps/Initialize") ? RPC_ADMIN : 0;
        int code = rpc_call_sync(ch, method, zeros, n, deadline, admin, &reply, &rlen, err,
                                 sizeof err);
        char extra[128];
        snprintf(extra, sizeof extra, "\"code\":%d,\"ms\":%.1f", code, (cm_now() - t0) * 1e3);
        report(cmd, code == RPC_OK ? CM_OK : rpc_status_to_cm(code), err, extra);
        free(reply);
        free(zeros);
        rpc_channel_close(ch);
        rpc_client_destroy(cli);
        return 0;
    }

    cm_model *model = NULL;
    cm_placement *pl = NULL;
    if (cm_model_create_mlp(sizes, nsizes, &model) != CM_OK ||
        cm_placement_create(model, 1, CM_PLACEMENT_MIN_PART_BYTES, &pl) != CM_OK) {
        fprintf(stderr, "ps_probe: cannot make the model\n");
        return 2;
    }
    const char *addrs[1] = {addr};
    ps_client_cfg cc = {.model = model, .placement = pl, .ps_addrs = addrs, .rank = 0,
                        .deadline_ms = deadline, .connect_timeout_ms = 3000,
                        .auth_token = cm_security_token(&sec),
                        .admin_token = cm_security_admin(&sec), .tls_ca = sec.tls_ca,
                        .tls_cert = sec.tls_cert, .tls_key = sec.tls_key,
                        .tls_server_name = sec.tls_server_name,
                        .call_bytes = -1}; /* One call: the shard counts what it gets. */
    ps_client *cl = NULL;
    int rc = ps_client_open(&cc, &cl, err, sizeof err);
    if (rc != CM_OK) {
        fprintf(stderr, "ps_probe: %s\n", err);
        return 2;
    }
    /* Adopt the shard's epoch, as a worker that joins does (a refusal here
     * is the answer for the commands that need it). */
    ps_shard_checkpoints ck;
    int have_ck = ps_client_checkpoints(cl, -1, &ck, err, sizeof err) == CM_OK;
    if (have_ck) ps_client_set_epoch(cl, ck.epoch);
    char extra[512] = "";
    size_t numel = model->numel;
    float *buf = calloc(numel, sizeof(float));
    int status = 0;
    if (!strcmp(cmd, "init") && nargs <= 1) {
        ps_init_cfg in = {.optim = ps_optim_defaults(PS_OPTIM_SGD, 0.1f), .seed = 1,
                          .num_workers = nargs ? atoi(args[0]) : 1};
        rc = ps_client_init(cl, &in, err, sizeof err);
        report(cmd, rc, err, NULL);
    } else if (!strcmp(cmd, "stats") && nargs == 0) {
        ps_client_stats st;
        rc = ps_client_stats_get(cl, &st, err, sizeof err);
        if (rc == CM_OK)
            snprintf(extra, sizeof extra,
                     "\"version\":%" PRId64 ",\"pushes\":%" PRIu64 ",\"pulls\":%" PRIu64
                     ",\"bad_requests\":%" PRIu64 ",\"parked_pulls\":%" PRIu64
                     ",\"cancelled_pulls\":%" PRIu64 ",\"refused_unauthenticated\":%" PRIu64
                     ",\"refused_denied\":%" PRIu64 ",\"refused_exhausted\":%" PRIu64
                     ",\"nonfinite_pushes\":%" PRIu64 ",\"mem_bytes\":%" PRIu64
                     ",\"mem_limit\":%" PRIu64,
                     st.min_version, st.pushes, st.pulls, st.bad_requests, st.parked_pulls,
                     st.cancelled_pulls, st.refused_unauthenticated, st.refused_denied,
                     st.refused_exhausted, st.nonfinite_pushes, st.mem_bytes, st.mem_limit);
        report(cmd, rc, err, extra);
    } else if (!strcmp(cmd, "push") && nargs == 2) {
        float v = !strcmp(args[1], "nan")   ? NAN
                  : !strcmp(args[1], "inf") ? INFINITY
                                            : strtof(args[1], NULL);
        for (size_t i = 0; i < numel; i++) buf[i] = v;
        ps_ticket *t = NULL;
        double t0 = cm_now();
        rc = ps_client_push(cl, atoll(args[0]), buf, &t);
        if (rc == CM_OK) rc = ps_ticket_wait(t, NULL, err, sizeof err);
        snprintf(extra, sizeof extra, "\"ms\":%.1f", (cm_now() - t0) * 1e3);
        report(cmd, rc, err, extra);
    } else if (!strcmp(cmd, "pull") && nargs <= 1) {
        ps_ticket *t = NULL;
        int64_t version = 0;
        double t0 = cm_now();
        rc = ps_client_pull(cl, nargs ? atoll(args[0]) : 0, buf, &t);
        if (rc == CM_OK) rc = ps_ticket_wait(t, &version, err, sizeof err);
        double ms = (cm_now() - t0) * 1e3, sum = 0;
        for (size_t i = 0; i < numel; i++) sum += buf[i];
        snprintf(extra, sizeof extra,
                 "\"version\":%" PRId64 ",\"sum\":%.9g,\"first\":%.9g,\"ms\":%.1f", version,
                 sum, (double)buf[0], ms);
        report(cmd, rc, err, extra);
    } else if (!strcmp(cmd, "checkpoints") && nargs == 1) {
        rc = have_ck ? ps_client_checkpoints(cl, atoll(args[0]), &ck, err, sizeof err)
                     : CM_EUNAVAIL;
        if (rc == CM_OK) {
            int n = snprintf(extra, sizeof extra, "\"version\":%" PRId64 ",\"committed\":[",
                             ck.version);
            for (int i = 0; i < ck.ncommitted && n < (int)sizeof extra - 32; i++)
                n += snprintf(extra + n, sizeof extra - (size_t)n, "%s%" PRId64, i ? "," : "",
                              ck.committed[i]);
            snprintf(extra + n, sizeof extra - (size_t)n, "]");
        }
        report(cmd, rc, err, extra);
    } else if (!strcmp(cmd, "rollback") && nargs == 2) {
        rc = ps_client_rollback(cl, atoll(args[0]), strtoull(args[1], NULL, 10), err,
                                sizeof err);
        report(cmd, rc, err, NULL);
    } else if (!strcmp(cmd, "shutdown") && nargs == 0) {
        rc = ps_client_shutdown_servers(cl, "ps_probe", 0, err, sizeof err);
        report(cmd, rc, err, NULL);
    } else if (!strcmp(cmd, "flood") && nargs == 3) {
        long n = atol(args[0]);
        int64_t ahead = atoll(args[1]);
        int64_t base = have_ck ? ck.version : 0;
        ps_ticket **t = calloc((size_t)(n > 0 ? n : 1), sizeof *t);
        long fired = 0;
        for (long i = 0; i < n; i++)
            if (ps_client_pull(cl, base + ahead, buf, &t[i]) == CM_OK) fired++;
        snprintf(extra, sizeof extra, "\"fired\":%ld", fired);
        report(cmd, CM_OK, "", extra);
        /* Leave without closing anything: the socket closes with the
         * process, as a client that crashes or is killed. */
        usleep((useconds_t)(atof(args[2]) * 1e6));
        _exit(0);
    } else {
        usage(stderr);
        status = 2;
    }
    free(buf);
    ps_client_close(cl);
    cm_placement_destroy(pl);
    cm_model_destroy(model);
    return status;
}
