/* cm_prom.h - Prometheus text exposition: histograms and writers.
 * SPDX-License-Identifier: MIT
 *
 * A cm_hist is a fixed-bucket latency histogram in seconds that any thread
 * may add to without a lock (relaxed atomics: a scrape may see a count and
 * its buckets a few observations apart, which Prometheus tolerates). The
 * writers append the text format (version 0.0.4) to a FILE (an
 * open_memstream): HELP and TYPE once per family, then its samples.
 */
#ifndef CM_PROM_H
#define CM_PROM_H
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

#define CM_HIST_NBUCKETS 14
/* Upper bounds of the buckets (seconds), +Inf implied. */
extern const double cm_hist_bounds[CM_HIST_NBUCKETS];

typedef struct cm_hist {
    _Atomic uint64_t bucket[CM_HIST_NBUCKETS + 1]; /* Not cumulative; last: +Inf. */
    _Atomic uint64_t sum_ns;
} cm_hist;

/* Count one observation of 'seconds' (negative counts as 0). */
void cm_hist_add(cm_hist *h, double seconds);

/* A document being written: cm_prom_begin opens d->f (an open_memstream;
 * 0 without memory), cm_prom_end closes it and returns the text (malloc'd,
 * *len its length; NULL on failure). */
typedef struct cm_prom_doc {
    FILE *f;
    char *buf;
    size_t n;
} cm_prom_doc;
int cm_prom_begin(cm_prom_doc *d);
char *cm_prom_end(cm_prom_doc *d, size_t *len);

/* "# HELP name help\n# TYPE name type\n". */
void cm_prom_family(FILE *f, const char *name, const char *type, const char *help);

/* One sample: name{labels} value ('labels' without braces, may be ""). */
void cm_prom_sample(FILE *f, const char *name, const char *labels, double value);

/* A histogram's samples (name_bucket{labels,le=...}, name_sum, name_count);
 * the family line is the caller's. */
void cm_prom_hist(FILE *f, const char *name, const char *labels, const cm_hist *h);

#endif /* CM_PROM_H */
