/* cm_http.h - the metrics endpoint: GET /metrics over HTTP (libmicrohttpd).
 * SPDX-License-Identifier: MIT
 *
 * One internal thread serves GET /metrics with the text the render
 * callback returns (Prometheus's text format, version 0.0.4), GET / with a
 * line pointing there, 404 for other paths and 405 for other methods.
 * Plain HTTP, no authentication: bind it to an address only the scraper
 * reaches (it reveals counters, never parameters or tokens).
 *
 *   cm_http_start -> ... -> cm_http_stop
 */
#ifndef CM_HTTP_H
#define CM_HTTP_H
#include <stddef.h>

/* The body of one scrape (malloc'd; the server frees it), *len its length;
 * NULL: 500. Called on the server's thread. */
typedef char *(*cm_http_render_fn)(void *ud, size_t *len);

typedef struct cm_http cm_http;

/* Listen on addr ("host:port", an IPv4 address or "localhost"; port 0
 * picks one, returned in *port). CM_EINVAL for a bad address, CM_EBUSY if
 * it cannot be bound; err says why. */
int cm_http_start(const char *addr, cm_http_render_fn render, void *ud, cm_http **out, int *port,
                  char *err, size_t errlen);

/* Stop serving and free (NULL is a no-op). No render call runs after it. */
void cm_http_stop(cm_http *h);

#endif /* CM_HTTP_H */
