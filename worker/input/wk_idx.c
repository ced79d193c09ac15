/* wk_idx.c - reader for IDX files (MNIST format), gzip-compressed or plain.
 * SPDX-License-Identifier: MIT
 *
 * zlib's gz* functions read plain files transparently, so one code path
 * serves both. The file is checked end to end: a short header, a data part
 * shorter or longer than the header says, and a gzip stream that is cut or
 * damaged are all reported as CM_ECORRUPT with a message naming the file.
 */
#include "worker/input/wk_idx.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "common/cm_mem.h"
#include "common/cm_status.h"

/* The type code of unsigned-byte data, the only one the project needs. */
#define IDX_TYPE_UBYTE 0x08

/* The largest data part we accept. The real files are at most 47 MB; the
 * cap keeps a damaged header from asking for an absurd allocation. */
#define IDX_MAX_BYTES ((uint64_t)4 << 30)

/* gzread() takes an unsigned and returns an int, so large reads go in
 * pieces of this size. */
#define IDX_READ_CHUNK ((size_t)1 << 30)

/* The data buffer's first size; it doubles while more data comes. */
#define IDX_FIRST_BUFFER ((size_t)1 << 20)


/* Read up to n bytes. *got is what was read; fewer than n means end of file
 * or an error, which the caller tells apart with check_stream(). */
static void read_some(gzFile f, void *buf, size_t n, size_t *got) {
    uint8_t *p = buf;
    *got = 0;
    while (*got < n) {
        size_t want = n - *got < IDX_READ_CHUNK ? n - *got : IDX_READ_CHUNK;
        int r = gzread(f, p + *got, (unsigned)want);
        if (r <= 0) break;
        *got += (size_t)r;
        if ((size_t)r < want) break;
    }
}

/* Convert the state of the gzip stream into a status code and message.
 * A cut gzip member does not fail gzread(): it returns the bytes it could
 * decode and leaves Z_BUF_ERROR ("unexpected end of file") behind, which is
 * why every read is followed by this check. zlib decompresses ahead of what
 * was asked for, so an error may show up before the bytes around it are
 * requested; the message therefore does not say where in the file it is. */
static int check_stream(gzFile f, const char *path, char *err, size_t errlen) {
    int zerr = Z_OK;
    const char *msg = gzerror(f, &zerr);
    /* zlib prefixes its message with the name it was opened under, which
     * for gzdopen() is "<fd:N>"; the path says it better. */
    const char *sep = strstr(msg, ": ");
    if (msg[0] == '<' && sep) msg = sep + 2;
    switch (zerr) {
    case Z_OK:
    case Z_STREAM_END:
        return CM_OK;
    case Z_BUF_ERROR:
        cm_seterr(err, errlen, "%s: truncated gzip stream (%s)", path, msg);
        return CM_ECORRUPT;
    case Z_ERRNO:
        /* For Z_ERRNO zlib's message is strerror() of the failed read. */
        cm_seterr(err, errlen, "%s: read error: %s", path, msg);
        return CM_EIO;
    case Z_MEM_ERROR:
        cm_seterr(err, errlen, "%s: out of memory while decompressing", path);
        return CM_ENOMEM;
    default:
        cm_seterr(err, errlen, "%s: broken gzip stream (%s)", path, msg);
        return CM_ECORRUPT;
    }
}

/* Open 'path' for reading. open() + fstat() first, so that a directory or a
 * missing file is reported as such rather than as a read error later. */
static int open_gz(const char *path, gzFile *out, char *err, size_t errlen) {
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        cm_seterr(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return CM_ENOTFOUND;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        cm_seterr(err, errlen, "%s: cannot open: not a regular file", path);
        close(fd);
        return CM_ENOTFOUND;
    }
    gzFile f = gzdopen(fd, "rb");
    if (!f) {
        cm_seterr(err, errlen, "%s: cannot open: out of memory", path);
        close(fd);
        return CM_ENOMEM;
    }
    /* The default 8 KiB buffer makes reading the 26 MB training images
     * needlessly slow. */
    gzbuffer(f, 128 * 1024);
    *out = f;
    return CM_OK;
}

/* Parse the magic number and dimensions; on success idx->ndims, dims,
 * count and item_size are set and *nbytes is the size of the data part. */
static int read_header(gzFile f, const char *path, wk_idx *idx, uint64_t *nbytes, char *err,
                       size_t errlen) {
    uint8_t magic[4];
    size_t got;
    read_some(f, magic, sizeof magic, &got);
    int rc = check_stream(f, path, err, errlen);
    if (rc != CM_OK) return rc;
    if (got < sizeof magic) {
        cm_seterr(err, errlen, "%s: truncated: file has %zu bytes, an IDX header needs at least 4",
                path, got);
        return CM_ECORRUPT;
    }
    if (magic[0] != 0 || magic[1] != 0) {
        cm_seterr(err, errlen, "%s: bad magic 0x%02x%02x%02x%02x: not an IDX file", path, magic[0],
                magic[1], magic[2], magic[3]);
        return CM_ECORRUPT;
    }
    if (magic[2] != IDX_TYPE_UBYTE) {
        cm_seterr(err, errlen, "%s: unsupported IDX type 0x%02x (only 0x08, unsigned byte)", path,
                magic[2]);
        return CM_ECORRUPT;
    }
    int ndims = magic[3];
    if (ndims < 1 || ndims > WK_IDX_MAX_DIMS) {
        cm_seterr(err, errlen, "%s: unsupported number of dimensions %d (expected 1 to %d)", path,
                ndims, WK_IDX_MAX_DIMS);
        return CM_ECORRUPT;
    }

    uint8_t raw[4 * WK_IDX_MAX_DIMS];
    size_t need = 4 * (size_t)ndims;
    read_some(f, raw, need, &got);
    rc = check_stream(f, path, err, errlen);
    if (rc != CM_OK) return rc;
    if (got < need) {
        cm_seterr(err, errlen, "%s: truncated: header has %d dimensions but ends after %zu of %zu "
                "size bytes", path, ndims, got, need);
        return CM_ECORRUPT;
    }

    /* Every partial product stays below IDX_MAX_BYTES * 2^32 < 2^64, so
     * the multiplication cannot wrap before the cap check catches it. */
    uint64_t total = 1;
    for (int d = 0; d < ndims; d++) {
        const uint8_t *b = raw + 4 * d;
        uint32_t v = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
        if (v == 0) {
            cm_seterr(err, errlen, "%s: dimension %d is 0", path, d);
            return CM_ECORRUPT;
        }
        idx->dims[d] = v;
        total *= v;
        if (total > IDX_MAX_BYTES || total > SIZE_MAX) {
            cm_seterr(err, errlen, "%s: dimensions describe more than %llu bytes of data", path,
                    (unsigned long long)IDX_MAX_BYTES);
            return CM_ECORRUPT;
        }
    }
    idx->ndims = ndims;
    idx->count = idx->dims[0];
    idx->item_size = (size_t)(total / idx->dims[0]);
    *nbytes = total;
    return CM_OK;
}

/* Count what follows the data part. Reading on until the end (rather than
 * stopping at the first extra byte) lets the message say how much. */
static int check_trailing(gzFile f, const char *path, uint64_t nbytes, char *err,
                          size_t errlen) {
    uint8_t buf[4096];
    uint64_t extra = 0;
    size_t got;
    do {
        read_some(f, buf, sizeof buf, &got);
        extra += got;
    } while (got == sizeof buf);
    int rc = check_stream(f, path, err, errlen);
    if (rc != CM_OK) return rc;
    if (extra > 0) {
        cm_seterr(err, errlen, "%s: trailing data: header says %llu data bytes, file has %llu more",
                path, (unsigned long long)nbytes, (unsigned long long)extra);
        return CM_ECORRUPT;
    }
    return CM_OK;
}

int wk_idx_read(const char *path, wk_idx *out, char *err, size_t errlen) {
    gzFile f = NULL;
    wk_idx idx;
    memset(&idx, 0, sizeof idx);
    memset(out, 0, sizeof *out);
    if (err && errlen > 0) err[0] = '\0';

    int rc = open_gz(path, &f, err, errlen);
    if (rc != CM_OK) goto fail;
    uint64_t nbytes = 0;
    rc = read_header(f, path, &idx, &nbytes, err, errlen);
    if (rc != CM_OK) goto fail;

    /* The buffer grows as the data arrives (doubling from 1 MiB), so that a
     * damaged header in a short file costs what the file holds, not the
     * 4 GiB it may claim (found by fuzz/fuzz_idx). */
    size_t cap = nbytes < IDX_FIRST_BUFFER ? (size_t)nbytes : IDX_FIRST_BUFFER, got = 0;
    for (;;) {
        uint8_t *p = cm_alloc_aligned(cap);
        if (!p) {
            cm_seterr(err, errlen, "%s: out of memory for %llu data bytes", path,
                    (unsigned long long)nbytes);
            rc = CM_ENOMEM;
            goto fail;
        }
        if (got) memcpy(p, idx.data, got);
        free(idx.data);
        idx.data = p;
        size_t n;
        read_some(f, idx.data + got, cap - got, &n);
        got += n;
        if (got < cap || cap == nbytes) break;
        cap = nbytes / 2 < cap ? (size_t)nbytes : 2 * cap;
    }
    rc = check_stream(f, path, err, errlen);
    if (rc != CM_OK) goto fail;
    if (got < nbytes) {
        cm_seterr(err, errlen, "%s: truncated: header says %llu data bytes, file has %zu", path,
                (unsigned long long)nbytes, got);
        rc = CM_ECORRUPT;
        goto fail;
    }
    rc = check_trailing(f, path, nbytes, err, errlen);
    if (rc != CM_OK) goto fail;

    gzclose_r(f);
    *out = idx;
    return CM_OK;

fail:
    if (f) gzclose_r(f);
    wk_idx_free(&idx);
    return rc;
}

void wk_idx_free(wk_idx *idx) {
    if (!idx) return;
    free(idx->data);
    memset(idx, 0, sizeof *idx);
}
