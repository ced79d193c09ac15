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
/* realloc that aborts on out of memory (n 0 keeps one byte). */
void *cm_realloc(void *p, size_t n);

/* 64-byte aligned, uninitialised; NULL on failure. Release with free(). */
void *cm_alloc_aligned(size_t n);

/* Keep freed memory in the process instead of handing it back to the
 * kernel: large buffers come from the heap (not a fresh mmap each time) and
 * the heap is not trimmed after every message. gRPC frees its receive
 * slices after each message; without this glibc returns them with
 * madvise() and every message faults its pages back in (measured: a third
 * of a PS's CPU at 16 MiB). Call once, early in main(). */
void cm_mem_keep_freed(void);

#endif /* CM_MEM_H */
