/* tu_tmpdir.h - a temporary directory for a unit test program: created by
 * its cmocka group setup, removed with everything in it by the teardown.
 * SPDX-License-Identifier: MIT
 *
 * Header-only (each test program has its own 'tmpdir'):
 *     static int group_setup(void **s) { (void)s; return tu_tmpdir_create("test_x"); }
 *     static int group_teardown(void **s) { (void)s; return tu_tmpdir_remove(); }
 */
#ifndef TU_TMPDIR_H
#define TU_TMPDIR_H
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>

static char tmpdir[64];

static int tu_rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* /tmp/<prog>.XXXXXX into tmpdir: 0, or -1 (cmocka's setup failure). */
static inline int tu_tmpdir_create(const char *prog) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/%s.XXXXXX", prog);
    return mkdtemp(tmpdir) ? 0 : -1;
}

static inline int tu_tmpdir_remove(void) {
    return nftw(tmpdir, tu_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

#endif /* TU_TMPDIR_H */
