/* cm_http.c - the metrics endpoint over libmicrohttpd (see cm_http.h).
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_http.h"

#include <arpa/inet.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_addr.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"

struct cm_http {
    struct MHD_Daemon *d;
    cm_http_render_fn render;
    void *ud;
};

static enum MHD_Result reply(struct MHD_Connection *c, unsigned code, const char *type,
                             char *body, size_t len, int owned) {
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (!r) {
        if (owned) free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", type);
    enum MHD_Result rc = MHD_queue_response(c, code, r);
    MHD_destroy_response(r);
    return rc;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_len, void **state) {
    (void)version, (void)upload, (void)state;
    cm_http *h = cls;
    static char not_get[] = "only GET\n", not_found[] = "not found: see /metrics\n",
                root[] = "pstrain metrics: /metrics\n", failed[] = "cannot render metrics\n";
    if (*upload_len) { /* A body nobody asked for: drop it. */
        *upload_len = 0;
        return MHD_YES;
    }
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", not_get, strlen(not_get), 0);
    if (!strcmp(url, "/"))
        return reply(c, MHD_HTTP_OK, "text/plain", root, strlen(root), 0);
    if (strcmp(url, "/metrics") != 0)
        return reply(c, MHD_HTTP_NOT_FOUND, "text/plain", not_found, strlen(not_found), 0);
    size_t len = 0;
    char *body = h->render(h->ud, &len);
    if (!body)
        return reply(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "text/plain", failed, strlen(failed), 0);
    return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, len, 1);
}

int cm_http_start(const char *addr, cm_http_render_fn render, void *ud, cm_http **out, int *port,
                  char *err, size_t errlen) {
    *out = NULL;
    char host[64];
    int p = 0;
    const char *why = cm_addr_split(addr, 0, host, sizeof host, &p);
    if (why) {
        cm_seterr(err, errlen, "metrics address '%s': want HOST:PORT (%s)", addr ? addr : "", why);
        return CM_EINVAL;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p)};
    if (!strcmp(host, "localhost")) strcpy(host, "127.0.0.1");
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        cm_seterr(err, errlen, "metrics address '%s': the host must be an IPv4 address", addr);
        return CM_EINVAL;
    }
    cm_http *h = cm_calloc(1, sizeof *h);
    h->render = render;
    h->ud = ud;
    h->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD, (uint16_t)p, NULL, NULL, handle, h,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)64, MHD_OPTION_END);
    if (!h->d) {
        cm_seterr(err, errlen, "cannot serve metrics on %s (address in use, or not this host's)",
                  addr);
        free(h);
        return CM_EBUSY;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    if (port) *port = info ? (int)info->port : (int)p;
    *out = h;
    return CM_OK;
}

void cm_http_stop(cm_http *h) {
    if (!h) return;
    MHD_stop_daemon(h->d);
    free(h);
}
