/* cm_prom.c - Prometheus text exposition (see cm_prom.h).
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_prom.h"

#include <math.h>
#include <stdlib.h>

const double cm_hist_bounds[CM_HIST_NBUCKETS] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                 0.1,    0.25,  0.5,    1,     2.5,   5,    10};

void cm_hist_add(cm_hist *h, double seconds) {
    if (!(seconds > 0)) seconds = 0;
    int i = 0;
    while (i < CM_HIST_NBUCKETS && seconds > cm_hist_bounds[i]) i++;
    atomic_fetch_add_explicit(&h->bucket[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_ns, (uint64_t)(seconds * 1e9), memory_order_relaxed);
}

int cm_prom_begin(cm_prom_doc *d) {
    d->buf = NULL;
    d->n = 0;
    d->f = open_memstream(&d->buf, &d->n);
    return d->f != NULL;
}

char *cm_prom_end(cm_prom_doc *d, size_t *len) {
    if (fclose(d->f) != 0) {
        free(d->buf);
        return NULL;
    }
    *len = d->n;
    return d->buf;
}

void cm_prom_family(FILE *f, const char *name, const char *type, const char *help) {
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void value(FILE *f, double v) {
    if (isnan(v))
        fputs("NaN", f);
    else if (isinf(v))
        fputs(v > 0 ? "+Inf" : "-Inf", f);
    else if (v == floor(v) && fabs(v) < 1e15)
        fprintf(f, "%.0f", v);
    else
        fprintf(f, "%.9g", v);
}

void cm_prom_sample(FILE *f, const char *name, const char *labels, double v) {
    if (labels && labels[0])
        fprintf(f, "%s{%s} ", name, labels);
    else
        fprintf(f, "%s ", name);
    value(f, v);
    fputc('\n', f);
}

void cm_prom_hist(FILE *f, const char *name, const char *labels, const cm_hist *h) {
    const char *sep = labels && labels[0] ? "," : "";
    uint64_t cum = 0;
    for (int i = 0; i <= CM_HIST_NBUCKETS; i++) {
        cum += atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
        if (i < CM_HIST_NBUCKETS)
            fprintf(f, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels ? labels : "", sep,
                    cm_hist_bounds[i], (unsigned long long)cum);
        else
            fprintf(f, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels ? labels : "", sep,
                    (unsigned long long)cum);
    }
    double sum = (double)atomic_load_explicit(&h->sum_ns, memory_order_relaxed) * 1e-9;
    char n[160];
    snprintf(n, sizeof n, "%s_sum", name);
    cm_prom_sample(f, n, labels, sum);
    snprintf(n, sizeof n, "%s_count", name);
    cm_prom_sample(f, n, labels, (double)cum);
}
