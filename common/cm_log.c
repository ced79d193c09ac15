/* cm_log.c - leveled logging to stderr.
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static atomic_int log_level = -1;
static char log_tag[64];

static int level_from_env(void) {
    const char *s = getenv("PS_LOG_LEVEL");
    if (!s) return CM_LOG_INFO;
    if (!strcmp(s, "debug")) return CM_LOG_DEBUG;
    if (!strcmp(s, "warn")) return CM_LOG_WARN;
    if (!strcmp(s, "error")) return CM_LOG_ERROR;
    if (!strcmp(s, "off")) return CM_LOG_OFF;
    return CM_LOG_INFO;
}

void cm_log_set_level(int level) { atomic_store(&log_level, level); }

int cm_log_level(void) {
    int l = atomic_load(&log_level);
    if (l < 0) {
        l = level_from_env();
        atomic_store(&log_level, l);
    }
    return l;
}

void cm_log_set_tag(const char *tag) {
    snprintf(log_tag, sizeof log_tag, "%s", tag ? tag : "");
}

void cm_log_write(int level, const char *file, int line, const char *fmt, ...) {
    static const char *names[] = {"debug", "info", "warn", "error"};
    if (level < cm_log_level() || level >= CM_LOG_OFF) return;
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    const char *base = strrchr(file, '/');
    base = base ? base + 1 : file;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    if (level >= CM_LOG_WARN || level == CM_LOG_DEBUG)
        fprintf(stderr, "%02d:%02d:%02d.%03ld %s%s%s: %s (%s:%d)\n", tm.tm_hour, tm.tm_min,
                tm.tm_sec, ts.tv_nsec / 1000000L, log_tag[0] ? log_tag : "",
                log_tag[0] ? " " : "", names[level], msg, base, line);
    else
        fprintf(stderr, "%02d:%02d:%02d.%03ld %s%s%s: %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
                ts.tv_nsec / 1000000L, log_tag[0] ? log_tag : "", log_tag[0] ? " " : "",
                names[level], msg);
}
