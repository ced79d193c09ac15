/* cm_token.c - reading a shared secret from a file.
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_token.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "common/cm_log.h"
#include "common/cm_status.h"

int cm_token_read(const char *path, char *out, char *err, size_t errlen) {
    out[0] = 0;
    FILE *f = fopen(path, "r");
    if (!f) {
        cm_seterr(err, errlen, "cannot read token file %s: %s", path, strerror(errno));
        return CM_EIO;
    }
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && (st.st_mode & 077))
        cm_warn("token file %s may be read by others than its owner (mode %03o)", path,
                (unsigned)(st.st_mode & 0777));
    char line[CM_TOKEN_MAX + 64];
    if (!fgets(line, sizeof line, f)) line[0] = 0;
    fclose(f);
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ' ||
                 line[n - 1] == '\t'))
        line[--n] = 0;
    const char *p = line;
    while (*p == ' ' || *p == '\t') p++;
    n = strlen(p);
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] < 0x20 || p[i] == 0x7f) {
            cm_seterr(err, errlen, "token file %s: the token has a control character", path);
            return CM_EINVAL;
        }
    if (n < CM_TOKEN_MIN || n > CM_TOKEN_MAX) {
        cm_seterr(err, errlen, "token file %s: the token has %zu bytes (%d to %d)", path, n,
                  CM_TOKEN_MIN, CM_TOKEN_MAX);
        return CM_EINVAL;
    }
    memcpy(out, p, n + 1);
    return CM_OK;
}

int cm_security_load(cm_security *sec, const char *token_file, const char *admin_token_file,
                     char *err, size_t errlen) {
    sec->token[0] = sec->admin_token[0] = 0;
    int rc = CM_OK;
    if (token_file && (rc = cm_token_read(token_file, sec->token, err, errlen)) != CM_OK)
        return rc;
    if (admin_token_file &&
        (rc = cm_token_read(admin_token_file, sec->admin_token, err, errlen)) != CM_OK)
        return rc;
    return CM_OK;
}
