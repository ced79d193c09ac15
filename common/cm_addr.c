/* cm_addr.c - "host:port" addresses (cm_addr.h).
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_addr.h"

#include <string.h>

static int is_host_char(char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '-' || ch == '.' || ch == '_';
}

static int is_ipv6_char(char ch) {
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F') ||
           ch == ':' || ch == '.';
}

const char *cm_addr_split(const char *addr, int min_port, char *host, size_t hostlen,
                          int *port) {
    if (!addr || !*addr) return "empty address";
    const char *colon, *h = addr, *he;
    if (addr[0] == '[') {
        const char *close = strchr(addr, ']');
        if (!close) return "unterminated [IPv6] host";
        if (close == addr + 1) return "empty host";
        int has_colon = 0;
        for (const char *p = addr + 1; p < close; p++) {
            if (!is_ipv6_char(*p)) return "bad character in [IPv6] host";
            if (*p == ':') has_colon = 1;
        }
        if (!has_colon) return "bad [IPv6] host";
        if (close[1] != ':') return "missing port";
        colon = close + 1;
        h = addr + 1;
        he = close;
    } else {
        colon = strrchr(addr, ':');
        if (!colon) return "missing port";
        if (colon == addr) return "empty host";
        for (const char *p = addr; p < colon; p++)
            if (!is_host_char(*p)) return "bad character in host (IPv6 needs [brackets])";
        he = colon;
    }
    const char *digits = colon + 1;
    if (*digits == '\0') return "missing port";
    long value = 0;
    for (const char *p = digits; *p; p++) {
        if (*p < '0' || *p > '9') return "port is not a number";
        /* Stop accumulating once out of range so that long inputs cannot
         * overflow. */
        if (value <= 65535) value = value * 10 + (*p - '0');
    }
    if (value < min_port || value > 65535)
        return min_port > 0 ? "port out of range 1..65535" : "port out of range 0..65535";
    if (host) {
        if ((size_t)(he - h) >= hostlen) return "host too long";
        memcpy(host, h, (size_t)(he - h));
        host[he - h] = '\0';
    }
    if (port) *port = (int)value;
    return NULL;
}

