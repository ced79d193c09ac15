/* fz_util.c - see fz_util.h.
 * SPDX-License-Identifier: MIT
 */
#include "fuzz/fz_util.h"

#include <ftw.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"

static pthread_once_t once = PTHREAD_ONCE_INIT;
static cm_model *models[4];
static cm_placement *placements[4][FZ_MAX_SHARDS + 1];

static void build(void) {
    static const int mlp[] = {4, 3, 2};
    cm_ctr_spec deepfm = {.nfields = 3, .emb_dim = 2, .nhidden = 1, .hidden = {4}};
    cm_ctr_spec lr = {.nfields = 3};
    if (cm_model_create_mlp(mlp, 3, &models[FZ_MODEL_MLP]) != CM_OK ||
        cm_model_create_deepfm(&deepfm, &models[FZ_MODEL_DEEPFM]) != CM_OK ||
        cm_model_create_lr(&lr, &models[FZ_MODEL_LR]) != CM_OK)
        abort();
    for (int k = 1; k < 4; k++)
        for (int n = 1; n <= FZ_MAX_SHARDS; n++)
            if (cm_placement_create(models[k], n, FZ_MIN_PART, &placements[k][n]) != CM_OK)
                abort();
}

const cm_model *fz_model(int kind) {
    pthread_once(&once, build);
    return kind > 0 && kind < 4 ? models[kind] : NULL;
}

const cm_placement *fz_placement(int kind, int nshards) {
    pthread_once(&once, build);
    if (kind < 1 || kind > 3 || nshards < 1 || nshards > FZ_MAX_SHARDS) return NULL;
    return placements[kind][nshards];
}

fz_ps_config fz_ps_config_decode(uint8_t b) {
    fz_ps_config c = {.model = b & 3, .nshards = 1 + ((b >> 2) & 3)};
    c.shard = ((b >> 4) & 3) % c.nshards;
    return c;
}

uint8_t fz_ps_config_encode(fz_ps_config c) {
    return (uint8_t)((c.model & 3) | ((c.nshards - 1) & 3) << 2 | (c.shard & 3) << 4);
}

const char *const fz_methods[FZ_NMETHODS] = {
    "/psrpc.Ps/Initialize", "/psrpc.Ps/Push",     "/psrpc.Ps/Pull",
    "/psrpc.Ps/PushPull",   "/psrpc.Ps/Stats",    "/psrpc.Ps/Checkpoints",
    "/psrpc.Ps/Rollback",   "/psrpc.Ps/Shutdown", "/psrpc.Ps/NoSuchMethod",
    "/grpc.health.v1.Health/Check"};

int fz_next_record(fz_reader *r, int *method, const uint8_t **data, size_t *len) {
    if (r->p >= r->end) return 0;
    *method = r->p[0];
    size_t left = (size_t)(r->end - r->p) - 1, n = 0;
    if (left >= 2) {
        n = (size_t)r->p[1] | (size_t)r->p[2] << 8;
        left -= 2;
        *data = r->p + 3;
    } else {
        *data = r->end;
        left = 0;
    }
    if (n > left) n = left;
    *len = n;
    r->p = *data + n;
    return 1;
}

void fz_buf_put(fz_buf *b, const void *data, size_t len) {
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + len) cap *= 2;
        b->p = cm_realloc(b->p, cap);
        b->cap = cap;
    }
    if (len) memcpy(b->p + b->len, data, len);
    b->len += len;
}

void fz_buf_record(fz_buf *b, int method, const void *data, size_t len) {
    if (len > 0xffff) abort();
    uint8_t h[3] = {(uint8_t)method, (uint8_t)len, (uint8_t)(len >> 8)};
    fz_buf_put(b, h, 3);
    fz_buf_put(b, data, len);
}

static char tmpdir[256];

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *f) {
    (void)st, (void)flag, (void)f;
    remove(path);
    return 0;
}

void fz_rmtree(const char *path) { nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS); }

static void rm_tmpdir(void) {
    if (tmpdir[0]) fz_rmtree(tmpdir);
}

const char *fz_tmpdir(void) {
    if (tmpdir[0]) return tmpdir;
    struct stat st;
    const char *base = getenv("FUZZ_TMPDIR") ? getenv("FUZZ_TMPDIR")
                       : stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) && access("/dev/shm", W_OK) == 0
                           ? "/dev/shm"
                           : getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp";
    snprintf(tmpdir, sizeof tmpdir, "%s/psfuzz.XXXXXX", base);
    if (!mkdtemp(tmpdir)) {
        perror("fz_tmpdir: mkdtemp");
        abort();
    }
    atexit(rm_tmpdir);
    return tmpdir;
}

void fz_write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f || (len && fwrite(data, 1, len, f) != len) || fclose(f) != 0) {
        perror(path);
        abort();
    }
}

void fz_write_input(const char *path, const void *data, size_t len, int gz) {
    if (!gz) {
        fz_write_file(path, data, len);
        return;
    }
    gzFile f = gzopen(path, "wb1");
    if (!f || (len && gzwrite(f, data, (unsigned)len) <= 0) || gzclose(f) != Z_OK) abort();
}

const char *fz_tmp_path(const char *name) {
    static char paths[4][512];
    static const char *names[4];
    for (int i = 0; i < 4; i++) {
        if (names[i] && !strcmp(names[i], name)) return paths[i];
        if (!names[i]) {
            snprintf(paths[i], sizeof paths[i], "%s/%s", fz_tmpdir(), name);
            names[i] = name;
            return paths[i];
        }
    }
    abort();
}

void fz_logs_init(void) {
    if (!getenv("PS_LOG_LEVEL")) cm_log_set_level(CM_LOG_DEBUG);
}
