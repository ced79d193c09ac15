/* fuzz_idx.c - the IDX reader (worker/input/wk_idx.c) on a file holding
 * the input, plain or gzip-compressed by the harness.
 * SPDX-License-Identifier: MIT
 *
 * Byte 0, bit 0: write the rest gzip-compressed (so that the fuzzer's
 * mutations reach the IDX parser behind zlib too); otherwise as is (a gzip
 * stream the fuzzer makes, or a damaged one, goes through zlib's own
 * checks). A file that reads must hold exactly what its header says.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_status.h"
#include "fuzz/fz_util.h"
#include "worker/input/wk_idx.h"


FZ_INITIALIZE_LOGS_ONLY

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *path = fz_tmp_path("input.idx");
    fz_write_input(path, data + 1, size - 1, data[0] & 1);
    wk_idx idx;
    char err[512];
    int rc = wk_idx_read(path, &idx, err, sizeof err);
    if (rc == CM_OK) {
        size_t items = 1;
        for (int d = 1; d < idx.ndims; d++) items *= idx.dims[d];
        if (idx.ndims < 1 || idx.ndims > WK_IDX_MAX_DIMS || idx.count != idx.dims[0] ||
            idx.item_size != items)
            abort();
        /* Every byte the reader claims is there (ASan checks the bounds). */
        unsigned sum = 0;
        for (size_t i = 0; i < idx.count * idx.item_size; i++) sum += idx.data[i];
        (void)sum;
    } else if (!err[0] || idx.data || idx.count) {
        abort(); /* An error says what, and leaves *out zeroed. */
    }
    wk_idx_free(&idx);
    return 0;
}
