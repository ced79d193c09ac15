/* wk_criteo.h - a streaming reader of the Criteo display-advertising format.
 * SPDX-License-Identifier: MIT
 *
 * The format of the public Criteo Kaggle and 1 TB click logs: one example a
 * line, tab-separated: the label (0 or 1), 13 integer features, 26
 * categorical features as hex strings; any feature may be empty (missing).
 * Files are read as a stream (plain or gzip, through zlib's gzread), never
 * loaded whole. Every field becomes one 64-bit row id of its own table
 * (field f reads table f), as a pure function of the text:
 *   - integer field f (0..12), value v:  missing -> 0;  v < 0 -> 1;
 *     0 <= v <= 2 -> 2 + v;  v > 2 -> 5 + floor(ln(v)^2)  (the log-square
 *     bucketing of the Kaggle winners: few thousand ids at most);
 *   - categorical field f (13..38), hex value x (1 to 16 hex digits):
 *     missing -> 0; else cm_mix64(x ^ cm_mix64(f + 1)), and 1 if that is 0
 *     (a hash of (table, value): 0 stays "missing").
 * A bad line (wrong number of fields, a label other than 0/1, an integer
 * that does not parse as a signed 64-bit decimal, a non-hex or over-long
 * categorical token, a line over WK_CRITEO_MAX_LINE bytes) is counted and
 * skipped with a warning naming the file and line number (the first
 * opts.warn_limit of them; then one line saying warnings stop); once more
 * than opts.max_bad_lines were seen the reader fails with CM_ECORRUPT and a
 * message naming the threshold, the file and the line.
 *
 * One reader is used by one thread (the prefetch thread).
 */
#ifndef WK_CRITEO_H
#define WK_CRITEO_H
#include <stddef.h>
#include <stdint.h>

#define WK_CRITEO_NINT 13
#define WK_CRITEO_NCAT 26
#define WK_CRITEO_NFIELDS 39
#define WK_CRITEO_MAX_LINE 65536

typedef struct wk_criteo_opts {
    uint64_t max_bad_lines; /* Fail past this many (default 0 = 1000). */
    int warn_limit;         /* Warnings printed (default 0 = 10; < 0: none). */
} wk_criteo_opts;

typedef struct wk_criteo wk_criteo;

/* Open paths[0..npaths) (read in that order, as one stream). The files are
 * opened here (a missing one is CM_ENOTFOUND naming it). o may be NULL
 * (defaults). Release with wk_criteo_close() (NULL is a no-op). */
int wk_criteo_open(const char *const *paths, int npaths, const wk_criteo_opts *o,
                   wk_criteo **out, char *err, size_t errlen);
void wk_criteo_close(wk_criteo *r);

/* The next good example: *label (0/1) and its ids (WK_CRITEO_NFIELDS, in
 * field order). Returns 1, 0 at the end of the last file, or a negative
 * CM_E* with a message: CM_ECORRUPT once bad lines pass the threshold,
 * CM_EIO on a read error. */
int wk_criteo_next(wk_criteo *r, int32_t *label, uint64_t *ids, char *err, size_t errlen);

/* Start again at the first line of the first file (a new epoch). The bad
 * line count goes on (it is over the reader's life). */
int wk_criteo_rewind(wk_criteo *r, char *err, size_t errlen);

/* Lines seen so far: good ones since the last rewind, bad ones in all. */
uint64_t wk_criteo_good_lines(const wk_criteo *r);
uint64_t wk_criteo_bad_lines(const wk_criteo *r);

/* Parse one line (len bytes, without its newline; a trailing '\r' is
 * allowed). Returns CM_OK with *label and ids set, or CM_ECORRUPT with the
 * reason in why (e.g. "38 fields, expected 40", "field C3: 'xyz' is not
 * hexadecimal"). Pure. */
int wk_criteo_parse_line(const char *line, size_t len, int32_t *label, uint64_t *ids, char *why,
                         size_t whylen);

/* The id of integer field f's value v (missing: v ignored) and of
 * categorical field f's (13..38) hex value x: the mapping above. */
uint64_t wk_criteo_int_id(int64_t v, int missing);
uint64_t wk_criteo_cat_id(int field, uint64_t x, int missing);

#endif /* WK_CRITEO_H */
