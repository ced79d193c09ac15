/* psctl.c - look at a running PS shard: health, counters, checkpoints.
 * SPDX-License-Identifier: MIT
 *
 *   psctl health ADDR       grpc.health.v1 Check (no token needed): SERVING
 *                           or NOT_SERVING (waiting for the chief's rollback
 *                           after a restart, or stopping)
 *   psctl stats ADDR        the shard's counters (psrpc.Ps/Stats), one
 *                           "name:value" line each, as Redis's INFO does
 *   psctl checkpoints ADDR  its version, recovery epoch and committed
 *                           checkpoints (psrpc.Ps/Checkpoints, read only)
 *
 * Every field of the replies is printed by walking its protobuf-c
 * descriptor, so new counters show without a change here; --json prints one
 * JSON object instead. Exit status: 0 done (health: SERVING), 1 NOT_SERVING
 * or the call was refused, 2 bad usage, 3 the shard could not be reached in
 * --timeout-ms.
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_status.h"
#include "common/cm_token.h"
#include "proto/health.pb-c.h"
#include "proto/ps.pb-c.h"
#include "proto/rpc.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: psctl health|stats|checkpoints HOST:PORT [options]\n"
            "  health       is the shard serving? (grpc.health.v1; no token needed)\n"
            "  stats        its counters, one name:value line each\n"
            "  checkpoints  its version, recovery epoch and committed checkpoints\n"
            "options:\n"
            "  --json                   one JSON object instead of lines\n"
            "  --timeout-ms N           give up after N ms (default 5000)\n"
            "  --service NAME           health: the service asked about (default \"\")\n"
            "  --auth-token-file F      the workers' (or the admin's) token\n"
            "  --tls-ca F, --tls-cert F, --tls-key F, --tls-name NAME   TLS, as pstrain\n"
            "exit status: 0 done (health: SERVING), 1 NOT_SERVING or refused, 2 usage,\n"
            "3 unreachable\n");
}

/* One field of a message as JSON (scalars, strings, repeated integers). */
static json_t *field_json(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f) {
    const char *base = (const char *)m;
    if (f->label == PROTOBUF_C_LABEL_REPEATED) {
        size_t n = *(const size_t *)(base + f->quantifier_offset);
        json_t *a = json_array();
        for (size_t i = 0; i < n; i++) {
            const void *arr = *(void *const *)(base + f->offset);
            switch (f->type) {
            case PROTOBUF_C_TYPE_INT64:
            case PROTOBUF_C_TYPE_SINT64:
            case PROTOBUF_C_TYPE_SFIXED64:
                json_array_append_new(a, json_integer(((const int64_t *)arr)[i]));
                break;
            case PROTOBUF_C_TYPE_UINT64:
            case PROTOBUF_C_TYPE_FIXED64:
                json_array_append_new(a, json_integer((json_int_t)((const uint64_t *)arr)[i]));
                break;
            default: json_array_append_new(a, json_null());
            }
        }
        return a;
    }
    const void *p = base + f->offset;
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32: return json_integer(*(const int32_t *)p);
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32: return json_integer(*(const uint32_t *)p);
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64: return json_integer(*(const int64_t *)p);
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64: return json_integer((json_int_t) * (const uint64_t *)p);
    case PROTOBUF_C_TYPE_BOOL: return json_boolean(*(const protobuf_c_boolean *)p);
    case PROTOBUF_C_TYPE_DOUBLE: return json_real(*(const double *)p);
    case PROTOBUF_C_TYPE_FLOAT: return json_real(*(const float *)p);
    case PROTOBUF_C_TYPE_STRING: {
        const char *str = *(const char *const *)p;
        return json_string(str ? str : "");
    }
    case PROTOBUF_C_TYPE_ENUM: {
        const ProtobufCEnumValue *v =
            protobuf_c_enum_descriptor_get_value(f->descriptor, *(const int *)p);
        return v ? json_string(v->name) : json_integer(*(const int *)p);
    }
    default: return json_null();
    }
}

/* Every field of m, in the descriptor's order, as lines or one object. */
static void print_message(const ProtobufCMessage *m, int as_json) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    json_t *o = json_object();
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type == PROTOBUF_C_TYPE_MESSAGE || f->type == PROTOBUF_C_TYPE_BYTES) continue;
        json_t *v = field_json(m, f);
        if (!as_json) {
            if (json_is_string(v)) {
                printf("%s:%s\n", f->name, json_string_value(v));
            } else {
                char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
                printf("%s:%s\n", f->name, s ? s : "?");
                free(s);
            }
        }
        json_object_set_new(o, f->name, v);
    }
    if (as_json) {
        char *s = json_dumps(o, JSON_COMPACT);
        printf("%s\n", s ? s : "{}");
        free(s);
    }
    json_decref(o);
}

/* 3 when the shard could not be reached, else 1, with the reason. */
static int call_failed(const char *what, const char *addr, int code, const char *msg) {
    fprintf(stderr, "psctl: %s %s: %s\n", what, addr, msg);
    return code == RPC_UNAVAILABLE || code == RPC_DEADLINE_EXCEEDED ? 3 : 1;
}

int main(int argc, char **argv) {
    static const struct option lo[] = {
        {"json", no_argument, 0, 'j'},           {"timeout-ms", required_argument, 0, 't'},
        {"service", required_argument, 0, 's'},  {"auth-token-file", required_argument, 0, 'A'},
        {"tls-ca", required_argument, 0, 'R'},   {"tls-cert", required_argument, 0, 'C'},
        {"tls-key", required_argument, 0, 'K'},  {"tls-name", required_argument, 0, 'N'},
        {"help", no_argument, 0, 'h'},           {0, 0, 0, 0}};
    int as_json = 0, c;
    long timeout_ms = 5000;
    const char *service = "", *token_file = NULL;
    cm_security sec = {0};
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'j': as_json = 1; break;
        case 't': timeout_ms = atol(optarg); break;
        case 's': service = optarg; break;
        case 'A': token_file = optarg; break;
        case 'R': sec.tls_ca = optarg; break;
        case 'C': sec.tls_cert = optarg; break;
        case 'K': sec.tls_key = optarg; break;
        case 'N': sec.tls_server_name = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (argc - optind != 2 || timeout_ms <= 0) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[optind], *addr = argv[optind + 1];
    int health = !strcmp(cmd, "health"), stats = !strcmp(cmd, "stats"),
        ckpts = !strcmp(cmd, "checkpoints");
    if (!health && !stats && !ckpts) {
        fprintf(stderr, "psctl: unknown command '%s'\n", cmd);
        usage(stderr);
        return 2;
    }
    char err[512];
    if (cm_security_load(&sec, token_file, NULL, err, sizeof err) != CM_OK) {
        fprintf(stderr, "psctl: %s\n", err);
        return 2;
    }
    rpc_client_opts co = {.token = cm_security_token(&sec), .tls_ca = sec.tls_ca,
                          .tls_cert = sec.tls_cert, .tls_key = sec.tls_key,
                          .tls_server_name = sec.tls_server_name};
    rpc_client *cl = NULL;
    rpc_channel *ch = NULL;
    if (rpc_client_create(&co, &cl) != CM_OK || rpc_channel_open(cl, addr, &ch) != CM_OK) {
        fprintf(stderr, "psctl: cannot set up a channel to %s (a TLS file?)\n", addr);
        rpc_client_destroy(cl);
        return 2;
    }
    uint8_t req[256], *rep = NULL;
    size_t rlen = 0, len;
    const char *method;
    if (health) {
        Grpc__Health__V1__HealthCheckRequest q = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
        q.service = (char *)service;
        if (grpc__health__v1__health_check_request__get_packed_size(&q) > sizeof req) {
            fprintf(stderr, "psctl: --service too long\n");
            return 2;
        }
        len = grpc__health__v1__health_check_request__pack(&q, req);
        method = "/grpc.health.v1.Health/Check";
    } else if (stats) {
        Psrpc__StatsRequest q = PSRPC__STATS_REQUEST__INIT; /* No cluster: a tool's look. */
        len = psrpc__stats_request__pack(&q, req);
        method = "/psrpc.Ps/Stats";
    } else {
        Psrpc__CheckpointsRequest q = PSRPC__CHECKPOINTS_REQUEST__INIT;
        q.keep_from = -1; /* Drop nothing. */
        len = psrpc__checkpoints_request__pack(&q, req);
        method = "/psrpc.Ps/Checkpoints";
    }
    int code = rpc_call_sync(ch, method, req, len, timeout_ms, RPC_WAIT_FOR_READY, &rep, &rlen,
                             err, sizeof err);
    int status = 0;
    if (code != RPC_OK) {
        status = call_failed(cmd, addr, code, err);
    } else if (health) {
        Grpc__Health__V1__HealthCheckResponse *r =
            grpc__health__v1__health_check_response__unpack(NULL, rlen, rep);
        if (!r) {
            status = call_failed(cmd, addr, RPC_INTERNAL, "malformed reply");
        } else {
            print_message(&r->base, as_json);
            status = r->status == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING
                         ? 0
                         : 1;
            grpc__health__v1__health_check_response__free_unpacked(r, NULL);
        }
    } else {
        const ProtobufCMessageDescriptor *d =
            stats ? &psrpc__stats_reply__descriptor : &psrpc__checkpoints_reply__descriptor;
        ProtobufCMessage *r = protobuf_c_message_unpack(d, NULL, rlen, rep);
        if (!r) {
            status = call_failed(cmd, addr, RPC_INTERNAL, "malformed reply");
        } else {
            print_message(r, as_json);
            protobuf_c_message_free_unpacked(r, NULL);
        }
    }
    free(rep);
    rpc_channel_close(ch);
    rpc_client_destroy(cl);
    return status;
}
