/* cm_status.h - status codes shared by every module.
 * SPDX-License-Identifier: MIT
 *
 * Fallible functions return CM_OK (0) or a negative CM_E* code from the one
 * table below; cm_strerror() names a code. CM_EAGAIN means "not yet", not a
 * failure.
 */
#ifndef CM_STATUS_H
#define CM_STATUS_H
#include <stddef.h>

#define CM_STATUS_MAP(XX)                                         \
    XX(OK, 0, "ok")                                               \
    XX(EINVAL, -1, "invalid argument")                            \
    XX(ENOMEM, -2, "out of memory")                               \
    XX(EIO, -3, "input/output error")                             \
    XX(ECORRUPT, -4, "corrupt or truncated data")                 \
    XX(ENOTFOUND, -5, "not found")                                \
    XX(EAGAIN, -6, "not ready yet")                               \
    XX(ETIMEDOUT, -7, "timed out")                                \
    XX(EUNAVAIL, -8, "peer unavailable")                          \
    XX(EBUSY, -9, "busy")                                         \
    XX(ESHUTDOWN, -10, "shut down")                               \
    XX(EUNSUPPORTED, -11, "not supported")                        \
    XX(EABORTED, -12, "aborted: the cluster rolled back")         \
    XX(EPROTO, -13, "protocol error")                             \
    XX(ESKIPPED, -14, "skipped: the step closed without this worker")

enum {
#define XX(name, code, text) CM_##name = (code),
    CM_STATUS_MAP(XX)
#undef XX
};

/* A static string naming 'status'; never NULL. */
const char *cm_strerror(int status);

/* Format a message into a caller's error buffer: the convention of
 * functions that take (char *err, size_t errlen). err may be NULL. */
void cm_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Process exit statuses of psserver and pstrain (docs/ARCHITECTURE.md, "Exit
 * statuses"), in the convention supervisors read (Kubeflow's TFJob
 * ExitCode policy: 1-127 permanent, 128-255 retryable): a restart as is
 * fails again for 1-127, may succeed for 128 and up (signals are 128 + N). */
enum {
    CM_EXIT_OK = 0,
    CM_EXIT_FAILED = 1, /* The run failed (a corrupt store, another model, ...). */
    CM_EXIT_CONFIG = 2, /* Bad arguments or configuration (flags, TF_CONFIG, files). */
    CM_EXIT_PORT = 3,   /* An address could not be bound (psserver's, the chief's). */
    CM_EXIT_RETRY = 138 /* An I/O failure while running (a full disk, say): retry. */
};

#endif /* CM_STATUS_H */
