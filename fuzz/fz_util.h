/* fz_util.h - what the fuzz targets and their seed generator share.
 * SPDX-License-Identifier: MIT
 *
 * The PS handler targets serve small fixed models (so that a request
 * built for one by fuzz/gen_seeds matches the fingerprint the harness's
 * server computes), and split their input into a sequence of calls:
 *
 *   byte 0: the server's configuration (fz_ps_config)
 *   then, repeated: u8 method, u16 length (little-endian), that many bytes
 *   (a record cut short by the end of the input takes what is left).
 */
#ifndef FUZZ_FZ_UTIL_H
#define FUZZ_FZ_UTIL_H
#include <stddef.h>
#include <stdint.h>

#include "common/cm_model.h"
#include "common/cm_placement.h"

/* libFuzzer's entry points, which every target defines. */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The LLVMFuzzerInitialize of a target that needs nothing but the logs set
 * up (fz_logs_init). */
#define FZ_INITIALIZE_LOGS_ONLY                                                                    \
    int LLVMFuzzerInitialize(int *argc, char ***argv) {                                            \
        (void)argc, (void)argv;                                                                    \
        fz_logs_init();                                                                            \
        return 0;                                                                                  \
    }

/* Models the PS targets serve: none (learnt from an Initialize), a small
 * MLP 4-3-2, a small DeepFM (3 fields, k = 2, hidden 4), a small logistic
 * regression (3 fields). */
enum { FZ_MODEL_NONE = 0, FZ_MODEL_MLP = 1, FZ_MODEL_DEEPFM = 2, FZ_MODEL_LR = 3 };
#define FZ_MIN_PART 16 /* Bytes: the small variables still split into partitions. */
#define FZ_MAX_SHARDS 4

/* Built once, kept for the process (NULL for FZ_MODEL_NONE). */
const cm_model *fz_model(int kind);
const cm_placement *fz_placement(int kind, int nshards);

/* Byte 0 of a PS target's input. */
typedef struct fz_ps_config {
    int model;   /* FZ_MODEL_* */
    int nshards; /* 1..FZ_MAX_SHARDS */
    int shard;   /* 0..nshards-1 */
} fz_ps_config;
fz_ps_config fz_ps_config_decode(uint8_t b);
uint8_t fz_ps_config_encode(fz_ps_config c);

/* The PS methods, by a record's method byte modulo FZ_NMETHODS (FZ_UNKNOWN
 * is a method the server does not have; FZ_HEALTH the gRPC health check). */
#define FZ_NMETHODS 10
enum { FZ_INIT, FZ_PUSH, FZ_PULL, FZ_PUSHPULL, FZ_STATS, FZ_CHECKPOINTS, FZ_ROLLBACK,
       FZ_SHUTDOWN, FZ_UNKNOWN, FZ_HEALTH };
extern const char *const fz_methods[FZ_NMETHODS];

/* Reading a record sequence. */
typedef struct fz_reader {
    const uint8_t *p, *end;
} fz_reader;
/* The next record: 1 with *method (the byte as it is), *data, *len set,
 * 0 at the end. */
int fz_next_record(fz_reader *r, int *method, const uint8_t **data, size_t *len);

/* Writing one (gen_seeds): append to a growing buffer. */
typedef struct fz_buf {
    uint8_t *p;
    size_t len, cap;
} fz_buf;
void fz_buf_put(fz_buf *b, const void *data, size_t len);
void fz_buf_record(fz_buf *b, int method, const void *data, size_t len);

/* A private, empty temporary directory (under $FUZZ_TMPDIR if set, else
 * /dev/shm when it exists, else $TMPDIR or /tmp), removed with everything
 * in it at a normal exit (a crash leaves it: scripts/fuzz.sh points
 * FUZZ_TMPDIR at a folder of its own and removes that). */
const char *fz_tmpdir(void);
/* Remove a directory tree (best effort). */
void fz_rmtree(const char *path);
/* Write data to path (truncating); aborts on failure. */
void fz_write_file(const char *path, const void *data, size_t len);
/* The same gzip-compressed (level 1) when gz, else as it is. */
void fz_write_input(const char *path, const void *data, size_t len, int gz);
/* fz_tmpdir()/name, in a buffer of the process's (one per name, made once). */
const char *fz_tmp_path(const char *name);

/* Logging of the code under test: every level, so that every message is
 * formatted and a bad format argument is found (unless PS_LOG_LEVEL says
 * otherwise). scripts/fuzz.sh runs the targets with -close_fd_mask=2, so
 * the messages go nowhere while libFuzzer's and the sanitizers' reports
 * still come out; a reproducer run by hand shows them. */
void fz_logs_init(void);

#endif /* FUZZ_FZ_UTIL_H */
