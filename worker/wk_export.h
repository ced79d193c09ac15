/* wk_export.h - the trained model as one self-describing, checksummed file.
 * SPDX-License-Identifier: MIT
 *
 * The chief writes it at the end of a run (pstrain --export FILE); a run can
 * start from it (--init-from FILE) and evaluation can run from it alone
 * (--eval-only --init-from FILE). The byte layout (docs/FORMATS.md,
 * "Model export file"), all integers little-endian:
 *
 *   0         8 bytes   magic "PSTMODEL"
 *   8         u32       format version (WK_EXPORT_VERSION)
 *   12        u32       H, length of the JSON header in bytes
 *   16        H bytes   JSON header: model, sizes, numel, dtype, fingerprint,
 *                       steps, seed, test_accuracy, test_loss, mode, created
 *   16 + H    zeros     padding up to D, the next multiple of 64
 *   D         numel x float32 in the flat layout of cm_model
 *   ...       version 2 (models with embedding tables) only: for each table
 *             in the model's order, its rows as u64 id then dim x float32
 *             (the header's "tables" gives each table's dim and row count)
 *   end - 8   u64       XXH64 (seed 0) of every byte before it
 *
 * Functions return CM_OK or a negative CM_E* and, on error, put a message
 * that names the file and what is wrong in err. Not thread-hostile: no
 * state outside the arguments.
 */
#ifndef WK_EXPORT_H
#define WK_EXPORT_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "worker/wk_trainer.h"

typedef struct wk_export_table wk_export_table;

#define WK_EXPORT_MAGIC "PSTMODEL"
#define WK_EXPORT_VERSION 1u        /* Dense models. */
#define WK_EXPORT_VERSION_TABLES 2u /* Models with embedding tables. */
#define WK_EXPORT_ALIGN 64

/* What the header says about the run that produced the parameters. */
typedef struct wk_export_meta {
    int64_t steps;        /* Steps trained in that run. */
    uint64_t seed;
    double test_accuracy; /* The chief's final evaluation. */
    double test_loss;
    double test_auc;      /* Click models (NaN otherwise). */
    char mode[16];        /* "local", "ps", ... */
    char created[32];     /* ISO 8601 UTC; filled by wk_export_write. */
} wk_export_meta;

/* A file's description, as wk_export_read found it. */
typedef struct wk_export_info {
    char kind[16];        /* "mlp", "deepfm" or "lr". */
    int nsizes;           /* mlp: layer widths. */
    int sizes[CM_MLP_MAX_SIZES];
    cm_ctr_spec ctr;      /* deepfm, lr: fields, embedding width, hidden. */
    size_t numel;         /* Dense parameters. */
    int ntables;
    uint64_t fingerprint; /* cm_model_fingerprint of the model described. */
    wk_export_meta meta;
} wk_export_info;

/* One table's rows as a file holds them (ids[i], values i * dim). */
struct wk_export_table {
    int dim;
    size_t n;
    uint64_t *ids;
    float *values;
};

/* The model a file describes (wk_export_read's info). */
int wk_export_model(const wk_export_info *info, cm_model **out);

/* Where the rows of a model's tables come from when writing: calls
 * emit(emit_ud, id, values, ...) once for each row of table t. */
typedef int (*wk_export_rows_fn)(void *ud, int table,
                                 int (*emit)(void *emit_ud, uint64_t id, const float *values,
                                             const float *slots, int64_t count),
                                 void *emit_ud);

/* Write model's params (model->numel floats) and meta (created is ignored
 * and set to now) to path: written to "<path>.tmp", fsynced, then renamed,
 * so path holds either its old content or the complete new file. CM_EIO on
 * a failed write (the temporary file is removed). */
int wk_export_write(const char *path, const cm_model *model, const float *params,
                    const wk_export_meta *meta, char *err, size_t errlen);

/* The same for a model with tables (version 2): their rows from rows(ud,
 * ...) (NULL: a dense model, version 1). */
int wk_export_write_tables(const char *path, const cm_model *model, const float *params,
                           wk_export_rows_fn rows, void *ud, const wk_export_meta *meta,
                           char *err, size_t errlen);

/* Read and verify path. On success fills *info and *params gets a new
 * array of info->numel floats (release with free()); on error *params is
 * NULL. CM_EIO: the file cannot be read; CM_ECORRUPT: bad magic, truncated,
 * trailing bytes, checksum mismatch, a header that does not parse or whose
 * numel/fingerprint disagree with its sizes; CM_EUNSUPPORTED: another
 * format version or dtype. */
int wk_export_read(const char *path, wk_export_info *info, float **params, char *err,
                   size_t errlen);

/* The same, and a file's tables: *tables gets info->ntables of them (free
 * with wk_export_tables_free; NULL for a dense model). */
int wk_export_read_tables(const char *path, wk_export_info *info, float **params,
                          wk_export_table **tables, char *err, size_t errlen);
void wk_export_tables_free(wk_export_table *t, int n);

/* ------------------------------------------------------------ pstrain
 * The trainer's uses of the file. Each logs its own error. */

/* --init-from: read path into params (model->numel floats); CM_EINVAL if
 * the file holds another model than 'model' (the message names both). */
int wk_export_load_init(const char *path, const cm_model *model, float *params);

/* --export: write the chief's final params (and a sparse model's rows,
 * from rows(ud, ...)) with the run's metadata. */
int wk_export_save_run(const char *path, const wk_train_cfg *cfg, const cm_model *model,
                       const float *params, wk_export_rows_fn rows, void *ud,
                       const wk_train_result *result);

/* --eval-only: evaluate the model in cfg->init_from on the test set (the
 * file's layer sizes define the model), write cfg->summary_path if set.
 * No training, no PS. result->steps is the file's step count. */
int wk_export_eval_run(const wk_train_cfg *cfg, wk_train_result *result);

#endif /* WK_EXPORT_H */
