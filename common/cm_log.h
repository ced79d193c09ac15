/* cm_log.h - leveled logging to stderr with file:line.
 * SPDX-License-Identifier: MIT
 *
 * Log once, where the context is, then return the status code; callers do
 * not log the same failure again. Thread-safe (one fprintf per message).
 */
#ifndef CM_LOG_H
#define CM_LOG_H

enum { CM_LOG_DEBUG = 0, CM_LOG_INFO = 1, CM_LOG_WARN = 2, CM_LOG_ERROR = 3, CM_LOG_OFF = 4 };

/* Messages below 'level' are dropped. Default CM_LOG_INFO, or the value of
 * the environment variable PS_LOG_LEVEL (debug|info|warn|error|off). */
void cm_log_set_level(int level);
int cm_log_level(void);

/* Prefix every message with 'tag' (e.g. "worker 1"); copied. */
void cm_log_set_tag(const char *tag);

void cm_log_write(int level, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#define CM_LOG(level, ...) cm_log_write((level), __FILE__, __LINE__, __VA_ARGS__)
#define cm_debug(...) CM_LOG(CM_LOG_DEBUG, __VA_ARGS__)
#define cm_info(...) CM_LOG(CM_LOG_INFO, __VA_ARGS__)
#define cm_warn(...) CM_LOG(CM_LOG_WARN, __VA_ARGS__)
#define cm_error(...) CM_LOG(CM_LOG_ERROR, __VA_ARGS__)

#endif /* CM_LOG_H */
