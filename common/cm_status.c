/* cm_status.c - names of the CM_* status codes.
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_status.h"

#include <stdarg.h>
#include <stdio.h>

const char *cm_strerror(int status) {
    switch (status) {
#define XX(name, code, text) \
    case code:               \
        return text;
        CM_STATUS_MAP(XX)
#undef XX
    }
    return "unknown status";
}

void cm_seterr(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}
