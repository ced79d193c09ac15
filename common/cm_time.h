/* cm_time.h - monotonic clock.
 * SPDX-License-Identifier: MIT
 */
#ifndef CM_TIME_H
#define CM_TIME_H
#include <time.h>

/* Seconds on the monotonic clock; only differences are meaningful. */
static inline double cm_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif /* CM_TIME_H */
