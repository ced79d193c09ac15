/* wk_criteo.c - streaming reader of Criteo-format click logs (plain or gzip).
 * SPDX-License-Identifier: MIT
 *
 * Lines are cut out of one buffer that gzread() refills: a complete line
 * is parsed where it lies (no copy), a partial one at the end of the
 * buffer is moved to the front before the next read. The buffer holds a
 * longest allowed line plus a read, so a line that still has no newline
 * once more than WK_CRITEO_MAX_LINE bytes of it are buffered is too long:
 * its bytes are dropped as they come until its newline, and it counts as
 * one bad line. A line's length excludes its '\n' (a '\r' before it
 * counts). Parsing is one pass over the line with table lookups, no
 * strtol (which would need a terminated copy of every field).
 */
#include "worker/input/wk_criteo.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"

#define CR_READ_SIZE (256 * 1024)
#define CR_BUF_SIZE (WK_CRITEO_MAX_LINE + 1 + CR_READ_SIZE)
#define CR_DEFAULT_MAX_BAD 1000
#define CR_DEFAULT_WARN 10
#define CR_NCOLS (1 + WK_CRITEO_NFIELDS) /* label + features */

struct wk_criteo {
    int npaths;
    char **paths;
    gzFile *files;  /* All opened by wk_criteo_open. */
    int cur;        /* The file being read (npaths: all done). */
    uint64_t lineno; /* Lines of the current file consumed so far. */
    char *buf;
    size_t beg, end; /* Unconsumed bytes: buf[beg, end). */
    int eof;         /* The current file has nothing more to read. */
    size_t skipped;  /* > 0: inside an over-long line, this many bytes dropped. */
    uint64_t good, bad;
    uint64_t max_bad;
    int warn_limit;
    int failed;      /* Sticky status after a fatal error (0: none). */
    char failmsg[512];
};

/* ===== Parsing ===== */

/* Hex digit values plus one; 0 for any other byte, which becomes 0xff
 * (high bits set: not a digit) once one is subtracted. A constant table:
 * readers in several threads share it without any initialisation. */
static const unsigned char hexval1[256] = {
    ['0'] = 1,  ['1'] = 2,  ['2'] = 3,  ['3'] = 4,  ['4'] = 5,  ['5'] = 6,  ['6'] = 7,
    ['7'] = 8,  ['8'] = 9,  ['9'] = 10, ['a'] = 11, ['b'] = 12, ['c'] = 13, ['d'] = 14,
    ['e'] = 15, ['f'] = 16, ['A'] = 11, ['B'] = 12, ['C'] = 13, ['D'] = 14, ['E'] = 15,
    ['F'] = 16};

uint64_t wk_criteo_int_id(int64_t v, int missing) {
    if (missing) return 0;
    if (v < 0) return 1;
    if (v <= 2) return 2 + (uint64_t)v;
    double l = log((double)v);
    return 5 + (uint64_t)floor(l * l);
}

uint64_t wk_criteo_cat_id(int field, uint64_t x, int missing) {
    if (missing) return 0;
    uint64_t h = cm_mix64(x ^ cm_mix64((uint64_t)field + 1));
    return h ? h : 1;
}

/* The Criteo name of feature f: I1..I13, C1..C26. */
static void field_name(int f, char *out, size_t n) {
    if (f < WK_CRITEO_NINT)
        snprintf(out, n, "I%d", f + 1);
    else
        snprintf(out, n, "C%d", f - WK_CRITEO_NINT + 1);
}

/* Columns of a line: tabs + 1. */
static size_t count_columns(const char *p, const char *end) {
    size_t n = 1;
    while ((p = memchr(p, '\t', (size_t)(end - p))) != NULL) {
        n++;
        p++;
    }
    return n;
}

/* A token for a message: at most 24 bytes of it. */
#define TOKEN_FMT "'%.*s%s'"
#define TOKEN_ARGS(s, n) (int)((n) > 24 ? 24 : (n)), (s), (n) > 24 ? "..." : ""

/* Parse a signed decimal [s, e) into *v. Returns 0, or 1 for a token that
 * is not a decimal integer, 2 for one out of the int64 range. */
static int parse_int(const char *s, const char *e, int64_t *v) {
    int neg = 0;
    if (s < e && (*s == '-' || *s == '+')) neg = *s++ == '-';
    if (s == e) return 1;
    /* The magnitude may reach 2^63 for a negative value. */
    const uint64_t limit = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    uint64_t m = 0;
    int overflow = 0;
    for (; s < e; s++) {
        unsigned d = (unsigned char)*s - '0';
        if (d > 9) return 1;
        if (m > (limit - d) / 10) overflow = 1; /* keep scanning: a later 'x' is the reason */
        else m = m * 10 + d;
    }
    if (overflow) return 2;
    *v = neg ? (int64_t)(0 - m) : (int64_t)m;
    return 0;
}

int wk_criteo_parse_line(const char *line, size_t len, int32_t *label, uint64_t *ids, char *why,
                         size_t whylen) {
    if (len > WK_CRITEO_MAX_LINE) {
        cm_seterr(why, whylen, "line of %zu bytes, longer than the limit of %d", len,
                  WK_CRITEO_MAX_LINE);
        return CM_ECORRUPT;
    }
    const char *end = line + len;
    if (len > 0 && end[-1] == '\r') end--;
    const char *p = line;
    char name[8];
    /* Label: exactly "0" or "1". */
    const char *q = p;
    while (q < end && *q != '\t') q++;
    if (q - p != 1 || (*p != '0' && *p != '1')) {
        size_t cols = count_columns(line, end);
        if (cols != CR_NCOLS) goto bad_count;
        cm_seterr(why, whylen, "label " TOKEN_FMT " is not 0 or 1", TOKEN_ARGS(p, (size_t)(q - p)));
        return CM_ECORRUPT;
    }
    *label = *p - '0';
    p = q;
    for (int f = 0; f < WK_CRITEO_NFIELDS; f++) {
        if (p == end) goto bad_count; /* fewer columns */
        p++; /* the tab */
        q = p;
        if (f < WK_CRITEO_NINT) {
            while (q < end && *q != '\t') q++;
            int64_t v = 0;
            int rc = q == p ? 0 : parse_int(p, q, &v);
            if (rc != 0) {
                if (count_columns(line, end) != CR_NCOLS) goto bad_count;
                field_name(f, name, sizeof name);
                cm_seterr(why, whylen,
                          rc == 1 ? "field %s: " TOKEN_FMT " is not a decimal integer"
                                  : "field %s: " TOKEN_FMT " is out of the signed 64-bit range",
                          name, TOKEN_ARGS(p, (size_t)(q - p)));
                return CM_ECORRUPT;
            }
            ids[f] = wk_criteo_int_id(v, q == p);
        } else {
            uint64_t x = 0;
            unsigned char bad = 0;
            while (q < end && *q != '\t') {
                unsigned char d = (unsigned char)(hexval1[(unsigned char)*q++] - 1);
                bad |= d;
                x = x << 4 | (d & 0xf);
            }
            size_t n = (size_t)(q - p);
            if ((bad & 0xf0) || n > 16) {
                if (count_columns(line, end) != CR_NCOLS) goto bad_count;
                field_name(f, name, sizeof name);
                if (bad & 0xf0)
                    cm_seterr(why, whylen, "field %s: " TOKEN_FMT " is not hexadecimal", name,
                              TOKEN_ARGS(p, n));
                else
                    cm_seterr(why, whylen, "field %s: %zu hex digits, at most 16", name, n);
                return CM_ECORRUPT;
            }
            ids[f] = wk_criteo_cat_id(f, x, n == 0);
        }
        p = q;
    }
    if (p == end) return CM_OK;
bad_count:
    cm_seterr(why, whylen, "%zu fields, expected %d", count_columns(line, end), CR_NCOLS);
    return CM_ECORRUPT;
}

/* ===== Files ===== */

/* Open 'path' for reading: open() + fstat() first, so that a missing file
 * or a directory is reported as such rather than as a read error later. */
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
    /* zlib's default 8 KiB buffer costs a read() call per 8 KiB. */
    gzbuffer(f, CR_READ_SIZE);
    *out = f;
    return CM_OK;
}

void wk_criteo_close(wk_criteo *r) {
    if (!r) return;
    for (int i = 0; i < r->npaths; i++) {
        if (r->files && r->files[i]) gzclose(r->files[i]);
        if (r->paths) free(r->paths[i]);
    }
    free(r->files);
    free(r->paths);
    free(r->buf);
    free(r);
}

int wk_criteo_open(const char *const *paths, int npaths, const wk_criteo_opts *o,
                   wk_criteo **out, char *err, size_t errlen) {
    *out = NULL;
    if (!paths || npaths <= 0) {
        cm_seterr(err, errlen, "no input files");
        return CM_EINVAL;
    }
    wk_criteo *r = cm_calloc(1, sizeof *r);
    r->npaths = npaths;
    r->paths = cm_calloc((size_t)npaths, sizeof *r->paths);
    r->files = cm_calloc((size_t)npaths, sizeof *r->files);
    r->buf = cm_malloc(CR_BUF_SIZE);
    r->max_bad = o && o->max_bad_lines ? o->max_bad_lines : CR_DEFAULT_MAX_BAD;
    r->warn_limit = o && o->warn_limit ? o->warn_limit : CR_DEFAULT_WARN;
    for (int i = 0; i < npaths; i++) {
        r->paths[i] = cm_strdup(paths[i]);
        int rc = open_gz(paths[i], &r->files[i], err, errlen);
        if (rc != CM_OK) {
            wk_criteo_close(r);
            return rc;
        }
    }
    *out = r;
    return CM_OK;
}

/* A fatal error: kept, so every later call reports it again. */
static int fail(wk_criteo *r, int status, char *err, size_t errlen) {
    r->failed = status;
    cm_seterr(err, errlen, "%s", r->failmsg);
    return status;
}

/* After gzread() returned <= 0: the end of the file, or an error. */
static int check_stream(wk_criteo *r, int n, char *err, size_t errlen) {
    int zerr = Z_OK;
    const char *msg = gzerror(r->files[r->cur], &zerr);
    const char *path = r->paths[r->cur];
    if (n == 0 && (zerr == Z_OK || zerr == Z_STREAM_END)) return CM_OK;
    /* A cut gzip member is not a read error: zlib hands out what it could
     * decode, then reports Z_BUF_ERROR at the end. */
    if (zerr == Z_BUF_ERROR) {
        snprintf(r->failmsg, sizeof r->failmsg, "%s: truncated gzip stream after line %llu",
                 path, (unsigned long long)r->lineno);
        return fail(r, CM_ECORRUPT, err, errlen);
    }
    if (zerr == Z_DATA_ERROR) {
        snprintf(r->failmsg, sizeof r->failmsg, "%s: broken gzip stream after line %llu (%s)",
                 path, (unsigned long long)r->lineno, msg);
        return fail(r, CM_ECORRUPT, err, errlen);
    }
    snprintf(r->failmsg, sizeof r->failmsg, "%s: read error after line %llu: %s", path,
             (unsigned long long)r->lineno, zerr == Z_ERRNO ? strerror(errno) : msg);
    return fail(r, CM_EIO, err, errlen);
}

/* The next line of the stream: 1 with [*line, + *len) (or with *toolong
 * set and *len its length, for a line over the limit, whose bytes are
 * gone), 0 at the end of the last file, or a negative status. */
static int next_line(wk_criteo *r, const char **line, size_t *len, int *toolong, char *err,
                     size_t errlen) {
    while (r->cur < r->npaths) {
        char *p = r->buf + r->beg;
        size_t avail = r->end - r->beg;
        char *nl = memchr(p, '\n', avail);
        if (nl || (r->eof && (avail > 0 || r->skipped > 0))) {
            /* A line; at the end of a file, one without its newline. */
            size_t l = nl ? (size_t)(nl - p) : avail;
            r->beg += nl ? l + 1 : l;
            r->lineno++;
            *line = p;
            *len = r->skipped + l;
            *toolong = *len > WK_CRITEO_MAX_LINE;
            r->skipped = 0;
            return 1;
        }
        if (r->eof) {
            r->cur++;
            r->beg = r->end = 0;
            r->eof = 0;
            r->lineno = 0;
            continue;
        }
        if (avail > WK_CRITEO_MAX_LINE) {
            /* Too long already: drop what we have of it. */
            r->skipped += avail;
            avail = 0;
        } else if (r->beg > 0) {
            memmove(r->buf, p, avail);
        }
        r->beg = 0;
        r->end = avail;
        int n = gzread(r->files[r->cur], r->buf + r->end, (unsigned)(CR_BUF_SIZE - r->end));
        if (n > 0) {
            r->end += (size_t)n;
        } else {
            int rc = check_stream(r, n, err, errlen);
            if (rc != CM_OK) return rc;
            r->eof = 1;
        }
    }
    return 0;
}

int wk_criteo_next(wk_criteo *r, int32_t *label, uint64_t *ids, char *err, size_t errlen) {
    if (r->failed) {
        cm_seterr(err, errlen, "%s", r->failmsg);
        return r->failed;
    }
    for (;;) {
        const char *line = NULL;
        size_t len = 0;
        int toolong = 0;
        int rc = next_line(r, &line, &len, &toolong, err, errlen);
        if (rc <= 0) return rc;
        char why[256];
        if (toolong)
            snprintf(why, sizeof why, "line of %zu bytes, longer than the limit of %d", len,
                     WK_CRITEO_MAX_LINE);
        else if (wk_criteo_parse_line(line, len, label, ids, why, sizeof why) == CM_OK) {
            r->good++;
            return 1;
        }
        r->bad++;
        const char *path = r->paths[r->cur];
        unsigned long long ln = (unsigned long long)r->lineno;
        if (r->warn_limit > 0 && r->bad <= (uint64_t)r->warn_limit)
            cm_warn("%s:%llu: bad line skipped: %s", path, ln, why);
        else if (r->warn_limit > 0 && r->bad == (uint64_t)r->warn_limit + 1)
            cm_warn("%s:%llu: bad line skipped; further bad lines are counted, not reported "
                    "(%d reported)", path, ln, r->warn_limit);
        if (r->bad > r->max_bad) {
            snprintf(r->failmsg, sizeof r->failmsg,
                     "%s:%llu: more than %llu bad lines (the threshold, max_bad_lines): giving "
                     "up; this one: %s", path, ln, (unsigned long long)r->max_bad, why);
            return fail(r, CM_ECORRUPT, err, errlen);
        }
    }
}

int wk_criteo_rewind(wk_criteo *r, char *err, size_t errlen) {
    if (r->failed) {
        cm_seterr(err, errlen, "%s", r->failmsg);
        return r->failed;
    }
    int last = r->cur < r->npaths ? r->cur : r->npaths - 1;
    for (int i = 0; i <= last; i++) {
        if (gzrewind(r->files[i]) != 0) {
            snprintf(r->failmsg, sizeof r->failmsg, "%s: cannot rewind: %s", r->paths[i],
                     strerror(errno));
            return fail(r, CM_EIO, err, errlen);
        }
    }
    r->cur = 0;
    r->lineno = 0;
    r->beg = r->end = 0;
    r->eof = 0;
    r->skipped = 0;
    r->good = 0;
    return CM_OK;
}

uint64_t wk_criteo_good_lines(const wk_criteo *r) { return r->good; }
uint64_t wk_criteo_bad_lines(const wk_criteo *r) { return r->bad; }
