/* cm_addr.h - "host:port" addresses: the one parser every module uses.
 * SPDX-License-Identifier: MIT
 */
#ifndef CM_ADDR_H
#define CM_ADDR_H
#include <stddef.h>

/* The one parser of "host:port" and "[v6]:port" addresses: the host a name
 * (letters, digits, '-', '.', '_'), an IPv4 address or a bracketed IPv6
 * address; the port decimal, min_port (0 or 1) to 65535. Callers that allow
 * other forms (rpc's "unix:path") check those first. Returns NULL and writes
 * the host (without brackets; skipped when host is NULL) and the port (when
 * port is not NULL), or a short reason ("missing port", "empty host", ...). */
const char *cm_addr_split(const char *addr, int min_port, char *host, size_t hostlen,
                          int *port);

#endif /* CM_ADDR_H */
