/* cm_token.h - shared secrets read from files (--auth-token-file).
 * SPDX-License-Identifier: MIT
 */
#ifndef CM_TOKEN_H
#define CM_TOKEN_H
#include <stddef.h>

#define CM_TOKEN_MIN 16  /* Bytes a token has at least. */
#define CM_TOKEN_MAX 512

/* The token in 'path': its first line, surrounding whitespace removed,
 * into out (CM_TOKEN_MAX + 1 bytes). CM_EIO (unreadable), CM_EINVAL (shorter
 * than CM_TOKEN_MIN, longer than CM_TOKEN_MAX, or with control
 * characters), with a message naming the file. A file that others than its
 * owner may read is accepted with a warning (logged). */
int cm_token_read(const char *path, char *out, char *err, size_t errlen);

/* A process's credentials for the project's gRPC services (proto/rpc.h):
 * token contents ("" : none) and TLS PEM file paths (NULL: plaintext).
 * Filled by cm_security_load from the command line's files. */
typedef struct cm_security {
    char token[CM_TOKEN_MAX + 1];       /* Every call's (the workers'). */
    char admin_token[CM_TOKEN_MAX + 1]; /* The chief's administrative calls. */
    const char *tls_ca;                 /* Verify servers (and clients) with it. */
    const char *tls_cert, *tls_key;     /* This process's certificate and key. */
    const char *tls_server_name;        /* The name on servers' certificates. */
} cm_security;

/* Read the token files (either may be NULL) into sec, keeping the TLS
 * paths it has. CM_OK, or cm_token_read's errors with a message. */
int cm_security_load(cm_security *sec, const char *token_file, const char *admin_token_file,
                     char *err, size_t errlen);

/* The token or NULL when there is none, for the rpc options. */
static inline const char *cm_security_token(const cm_security *sec) {
    return sec && sec->token[0] ? sec->token : NULL;
}
static inline const char *cm_security_admin(const cm_security *sec) {
    return sec && sec->admin_token[0] ? sec->admin_token : NULL;
}

#endif /* CM_TOKEN_H */
