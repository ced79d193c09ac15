/* ps_rowacc.c - row gradient lists and per-row sums.
 * SPDX-License-Identifier: MIT
 */
#include "ps/ps_rowacc.h"

#include <stdlib.h>
#include <string.h>

#include "common/cm_mem.h"
#include "common/cm_rng.h"
#include "ps/ps_wire.h"

void ps_rowlist_reserve(ps_rowlist *l, size_t more) {
    if (l->n + more <= l->cap) return;
    size_t cap = l->cap ? l->cap : 256;
    while (cap < l->n + more) cap *= 2;
    l->tab = cm_realloc(l->tab, cap * sizeof *l->tab);
    l->id = cm_realloc(l->id, cap * sizeof *l->id);
    l->g = cm_realloc(l->g, cap * (size_t)l->dim * sizeof *l->g);
    l->cap = cap;
}

void ps_rowlist_free(ps_rowlist *l) {
    free(l->tab);
    free(l->id);
    free(l->g);
    memset(l, 0, sizeof *l);
}

static size_t acc_hash(uint32_t tab, uint64_t id) {
    return (size_t)cm_mix64(id ^ ((uint64_t)tab << 48) ^ 0x726f77ULL);
}

static void acc_rehash(ps_rowacc *a, size_t mcap) {
    free(a->map);
    a->mcap = mcap;
    a->map = cm_calloc(mcap, sizeof *a->map);
    for (size_t i = 0; i < a->e.n; i++) {
        size_t h = acc_hash(a->e.tab[i], a->e.id[i]) & (mcap - 1);
        while (a->map[h]) h = (h + 1) & (mcap - 1);
        a->map[h] = (int32_t)i + 1;
    }
}

/* Add n values g (float32, or bfloat16 when bf16) to the entry of
 * (tab, id), creating it with them. */
void ps_rowacc_add(ps_rowacc *a, uint32_t tab, uint64_t id, const uint8_t *g, int n, int bf16) {
    if (2 * (a->e.n + 1) > a->mcap) acc_rehash(a, a->mcap ? 2 * a->mcap : 1024);
    size_t h = acc_hash(tab, id) & (a->mcap - 1);
    while (a->map[h]) {
        size_t i = (size_t)a->map[h] - 1;
        if (a->e.id[i] == id && a->e.tab[i] == tab) {
            float *dst = a->e.g + i * (size_t)a->e.dim;
            if (bf16)
                ps_wire_load_add_bf16(dst, g, (size_t)n);
            else
                ps_wire_load_add(dst, g, (size_t)n);
            return;
        }
        h = (h + 1) & (a->mcap - 1);
    }
    ps_rowlist_reserve(&a->e, 1);
    size_t i = a->e.n++;
    a->e.tab[i] = tab;
    a->e.id[i] = id;
    float *dst = a->e.g + i * (size_t)a->e.dim;
    if (bf16)
        ps_wire_load_bf16(dst, g, (size_t)n);
    else
        memcpy(dst, g, (size_t)n * sizeof(float));
    a->map[h] = (int32_t)i + 1;
}

/* Empty the accumulator (O(entries)). */
void ps_rowacc_reset(ps_rowacc *a) {
    for (size_t i = 0; i < a->e.n; i++) {
        size_t h = acc_hash(a->e.tab[i], a->e.id[i]) & (a->mcap - 1);
        while (a->map[h] != (int32_t)i + 1) h = (h + 1) & (a->mcap - 1);
        a->map[h] = 0;
    }
    /* Linear probing needs no tombstones once every slot is empty again. */
    a->e.n = 0;
}

void ps_rowacc_each_table(ps_rowacc *a, int ntables, const int *dims, ps_rowacc_table_fn fn,
                          void *ud) {
    const ps_rowlist *e = &a->e;
    if (e->n == 0) return;
    if (a->ncount < ntables) {
        free(a->count);
        free(a->goff);
        a->count = cm_calloc((size_t)ntables + 1, sizeof *a->count);
        a->goff = cm_calloc((size_t)ntables + 1, sizeof *a->goff);
        a->ncount = ntables;
    }
    memset(a->count, 0, (size_t)ntables * sizeof *a->count);
    for (size_t i = 0; i < e->n; i++) a->count[e->tab[i]]++;
    if (e->n > a->scap) {
        a->scap = e->n;
        a->ids = cm_realloc(a->ids, a->scap * sizeof *a->ids);
        a->g = cm_realloc(a->g, a->scap * (size_t)e->dim * sizeof *a->g);
    }
    /* A stable counting sort by table, packed at each table's dim: the
     * offsets first (count becomes each table's next slot), one pass. */
    size_t at = 0, goff = 0;
    for (int t = 0; t < ntables; t++) {
        size_t n = a->count[t];
        a->count[t] = at;
        at += n;
    }
    /* Gradient offsets follow the ids' order with each table's own dim. */
    size_t *goffs = a->goff;
    for (int t = 0; t < ntables; t++) {
        goffs[t] = goff;
        size_t next = t + 1 < ntables ? a->count[t + 1] : at;
        goff += (next - a->count[t]) * (size_t)dims[t];
    }
    for (size_t i = 0; i < e->n; i++) {
        uint32_t t = e->tab[i];
        size_t k = a->count[t]++, d = (size_t)dims[t];
        a->ids[k] = e->id[i];
        memcpy(a->g + goffs[t], e->g + i * (size_t)e->dim, d * sizeof(float));
        goffs[t] += d;
    }
    /* count[t] is now the end of table t's ids; goffs[t] the end of its
     * gradients. */
    size_t begin = 0, gbegin = 0;
    for (int t = 0; t < ntables; t++) {
        size_t end = a->count[t];
        if (end > begin) fn(ud, (uint32_t)t, a->ids + begin, end - begin, a->g + gbegin);
        gbegin = goffs[t];
        begin = end;
    }
}

void ps_rowacc_free(ps_rowacc *a) {
    free(a->count);
    free(a->goff);
    free(a->ids);
    free(a->g);
    ps_rowlist_free(&a->e);
    free(a->map);
    memset(a, 0, sizeof *a);
}

