/* wk_idx.h - reader for IDX files (the MNIST format), gzip or plain.
 * SPDX-License-Identifier: MIT
 *
 * Only unsigned-byte IDX files (type code 0x08) with 1 to 4 dimensions are
 * accepted. The whole file is validated: magic, dimensions, that the data is
 * exactly as long as the header says (no truncation, no trailing bytes) and
 * that the gzip stream is intact. Errors come back as a code plus a message
 * that names the file and what is wrong.
 */
#ifndef WK_IDX_H
#define WK_IDX_H
#include <stddef.h>
#include <stdint.h>

#define WK_IDX_MAX_DIMS 4

typedef struct wk_idx {
    int ndims;
    uint32_t dims[WK_IDX_MAX_DIMS];
    size_t count;     /* dims[0]: number of items. */
    size_t item_size; /* Product of dims[1..]: bytes per item (1 for labels). */
    uint8_t *data;    /* count * item_size bytes; owned, release with wk_idx_free(). */
} wk_idx;

/* Read 'path' (gzip-compressed or not) into *out. Returns CM_OK, or
 * CM_ENOTFOUND (cannot open, or not a regular file), CM_ECORRUPT (bad
 * magic, bad dims, more than 4 GiB of data, truncated, trailing data, broken
 * gzip), CM_EIO (the underlying read failed), CM_ENOMEM; on error *out is
 * zeroed and, if err is not NULL, err holds a one-line message naming the
 * file. Bytes after the end of the last gzip member are ignored, as zlib
 * does. */
int wk_idx_read(const char *path, wk_idx *out, char *err, size_t errlen);

/* Release the data of 'idx' (NULL or a zeroed wk_idx are fine). */
void wk_idx_free(wk_idx *idx);

#endif /* WK_IDX_H */
