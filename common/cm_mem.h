/* cm_mem.h - allocation helpers.
 * SPDX-License-Identifier: MIT
 *
 * Small objects use cm_malloc/cm_calloc, which abort with a message on out of
 * memory (as redis's zmalloc does). Tensor buffers use cm_alloc_aligned,
 * which returns NULL so the caller can report CM_ENOMEM. Free both with
 * free().
 */
#ifndef CM_MEM_H
#define CM_MEM_H
#include <stddef.h>

void *cm_malloc(size_t n);
void *cm_calloc(size_t count, size_t size);
char *cm_strdup(const char *s);

/* 64-byte aligned, uninitialised; NULL on failure. Release with free(). */
void *cm_alloc_aligned(size_t n);

#endif /* CM_MEM_H */
