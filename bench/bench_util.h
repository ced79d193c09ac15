/* bench_util.h - what the benchmarks' drivers share: medians, child
 * processes, ports on 127.0.0.1, signals.
 * SPDX-License-Identifier: MIT
 */
#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H
#include <sys/types.h>

/* qsort comparator for doubles, ascending. */
int bu_cmp_double(const void *a, const void *b);

/* The median of v[0..n) (v is not changed); 0 when n <= 0. */
double bu_median(const double *v, int n);

/* Reap the child *pid if it has exited by 'until' (a cm_now() value),
 * polling every 1 ms: then *status is its waitpid() status, *pid is 0 and
 * it returns 1. A *pid <= 0 counts as reaped. */
int bu_reap_by(pid_t *pid, int *status, double until);

/* n distinct ports on 127.0.0.1 that were free a moment ago (bound
 * together, then released). CM_OK or CM_EIO. */
int bu_free_ports(int *ports, int n);

/* 1 if something accepts TCP connections on 127.0.0.1:port. */
int bu_port_accepts(int port);

/* SIGINT, SIGTERM and SIGHUP call fn; SIGPIPE is ignored. */
void bu_catch_signals(void (*fn)(int));

#endif /* BENCH_UTIL_H */
