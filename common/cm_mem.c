/* cm_mem.c - allocation helpers (abort on OOM for small objects).
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_mem.h"

#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void oom(size_t n) {
    fprintf(stderr, "fatal: out of memory allocating %zu bytes\n", n);
    abort();
}

void *cm_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) oom(n);
    return p;
}

void *cm_calloc(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) oom(count * size);
    return p;
}

void *cm_realloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) oom(n);
    return q;
}

char *cm_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = cm_malloc(n);
    memcpy(p, s, n);
    return p;
}

void *cm_alloc_aligned(size_t n) {
    void *p = NULL;
    /* Rounding must not wrap: n near SIZE_MAX (a length read from a damaged
     * file) would get a 64-byte buffer (seen writing fuzz/fuzz_store). */
    if (n > SIZE_MAX - 63) return NULL;
    size_t rounded = (n + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, rounded ? rounded : 64) != 0) return NULL;
    return p;
}

void cm_mem_keep_freed(void) {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
}
