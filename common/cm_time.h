/* cm_time.h - monotonic clock.
 * SPDX-License-Identifier: MIT
 */
#ifndef CM_TIME_H
#define CM_TIME_H
#include <errno.h>
#include <time.h>

/* Seconds on the monotonic clock; only differences are meaningful. */
static inline double cm_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The CLOCK_REALTIME instant 'ms' milliseconds from now: the deadline of a
 * pthread_cond_timedwait (whose condition variable uses that clock). */
static inline struct timespec cm_realtime_in_ms(long ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

/* The monotonic instant t (cm_now()'s clock) as a timespec: the deadline
 * of a pthread_cond_timedwait on a condition variable that uses
 * CLOCK_MONOTONIC (pthread_condattr_setclock). */
static inline struct timespec cm_monotonic_at(double t) {
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) ts.tv_nsec = 999999999L;
    if (ts.tv_nsec < 0) ts.tv_nsec = 0;
    return ts;
}

/* Sleep until the monotonic instant t (cm_now()'s clock); at once if it
 * has passed. Signals do not cut it short. */
static inline void cm_sleep_until(double t) {
    struct timespec ts = cm_monotonic_at(t);
    /* (clock_nanosleep returns the error; only a signal is worth a retry:
     * EINVAL, a time out of range, would spin.) */
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

#endif /* CM_TIME_H */
