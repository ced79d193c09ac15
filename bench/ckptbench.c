/* ckptbench.c - the durable-shard benchmarks of issue 4, against raw LevelDB.
 * SPDX-License-Identifier: MIT
 *
 * Three measurements, one JSON line each, then a summary line with the
 * verdict on each target of issue 4:
 *  1. write: st_store_checkpoint of W MiB of parameters (64 blobs, kind 0)
 *     against raw LevelDB durable batch writes of the same bytes (the same
 *     options, keys and batch size as st_store, every batch synced), in
 *     fresh directories, alternating which goes first; target: checkpoint
 *     rate >= 0.8x the raw rate (median of the repeats' own ratios).
 *  2. step: a psserver of S MiB (a vector model) and a client here doing sync
 *     push-pull steps back to back (1 worker): the median step with no
 *     checkpointing (a server without --data-dir) against the median of
 *     the steps that overlap a checkpoint being written (a server with
 *     --checkpoint-every K; when each checkpoint ran comes from its log
 *     line); target: a rise of <= 5 %.
 *  3. recovery: a psserver of R MB (a vector model) writes one checkpoint and is
 *     shut down; then the time from starting psserver on that directory to
 *     the first Stats answered (which must report the restored version);
 *     the server's own open / load / restore split comes from its log.
 *     Target: < 0.5 s. The pulled parameters are checked once.
 * Everything lives in a mkdtemp directory removed at the end; psserver runs
 * on free 127.0.0.1 ports, is stopped by its PID and dies with this process
 * (PR_SET_PDEATHSIG); the whole run has a deadline (--timeout).
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <getopt.h>
#include <leveldb/c.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_client.h"
#include "ps/ps_optim.h"
#include "storage/st_store.h"

#define MIB ((size_t)1 << 20)
#define MAX_REPEATS 15
#define MAX_EVENTS 256
#define WRITE_BLOBS 64 /* The checkpoint's partitions: 64 x (W / 64) MiB. */
#define PORT_TAKEN 3   /* psserver's exit status when it cannot bind. */
#define PSSERVER_NICE 10 /* psserver's default --checkpoint-nice. */
#define MAX_MESSAGE_MB "1024" /* A whole model per message, both sides. */

static volatile sig_atomic_t got_signal;
static void on_signal(int sig) { got_signal = sig; }

typedef struct opts {
    int repeats, step_repeats, steps, warmup, ckpt_every, ckpt_nice;
    size_t write_mib, step_mib, recovery_mb;
    double timeout_s;
    const char *only, *bin_dir;
} opts;

/* The run's shared state: its temp directory, the psserver binary, the
 * deadline, the one server child that may be running. */
typedef struct bench {
    char tmp[1024];
    char psserver[PATH_MAX];
    double deadline;
    /* The medians the summary states (< 0: not measured). */
    double write_ratio, step_rise_pct, recovery_ms;
} bench;

static int out_of_time(const bench *b) { return got_signal || cm_now() > b->deadline; }

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path) && errno != ENOENT ? -1 : 0;
}

/* Remove 'path' and everything under it (a missing path is fine). */
static void rm_tree(const char *path) { nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* ================================================== 1. write */

/* W MiB of float32 that do not compress. */
static float *random_floats(size_t bytes, uint64_t seed) {
    float *p = cm_alloc_aligned(bytes);
    if (!p) return NULL;
    for (size_t i = 0; i < bytes / sizeof(float); i++) p[i] = cm_randf(seed, i) - 0.5f;
    return p;
}

/* st_store's key of a chunk: 'g' ver64 part32 kind32 chunk32, big-endian. */
static void chunk_key(uint8_t k[21], uint32_t part, uint32_t chunk) {
    memset(k, 0, 21);
    k[0] = 'g';
    k[8] = 1; /* version 1 */
    for (int i = 0; i < 4; i++) {
        k[9 + i] = (uint8_t)(part >> (24 - 8 * i));
        k[17 + i] = (uint8_t)(chunk >> (24 - 8 * i));
    }
}

/* Raw LevelDB: the same options as st_store (64 MiB memtable and files, no
 * compression), 1 MiB values under st_store's keys, one synced WriteBatch
 * per 1 MiB chunk (st_store's batch). Returns seconds, or < 0. */
static double write_raw(const char *dir, const uint8_t *data, size_t bytes, char *err,
                        size_t errlen) {
    double secs = -1.0;
    char *e = NULL;
    leveldb_options_t *o = leveldb_options_create();
    leveldb_options_set_create_if_missing(o, 1);
    leveldb_options_set_write_buffer_size(o, 64 * MIB);
    leveldb_options_set_max_file_size(o, 64 * MIB);
    leveldb_options_set_compression(o, leveldb_no_compression);
    leveldb_writeoptions_t *wo = leveldb_writeoptions_create();
    leveldb_writeoptions_set_sync(wo, 1);
    leveldb_writebatch_t *wb = leveldb_writebatch_create();
    leveldb_t *db = leveldb_open(o, dir, &e);
    if (e) goto fail;
    size_t per_blob = bytes / WRITE_BLOBS;
    double t0 = cm_now();
    for (uint32_t p = 0; p < WRITE_BLOBS; p++) {
        for (uint32_t c = 0; (size_t)c * MIB < per_blob; c++) {
            uint8_t k[21];
            size_t off = (size_t)c * MIB, n = per_blob - off < MIB ? per_blob - off : MIB;
            chunk_key(k, p, c);
            leveldb_writebatch_clear(wb);
            leveldb_writebatch_put(wb, (const char *)k, sizeof k,
                                   (const char *)data + (size_t)p * per_blob + off, n);
            leveldb_write(db, wo, wb, &e);
            if (e) goto fail;
        }
    }
    secs = cm_now() - t0;
fail:
    if (e) {
        cm_seterr(err, errlen, "raw LevelDB in %s: %s", dir, e);
        leveldb_free(e);
    }
    if (db) leveldb_close(db);
    leveldb_writebatch_destroy(wb);
    leveldb_writeoptions_destroy(wo);
    leveldb_options_destroy(o);
    return secs;
}

/* st_store_checkpoint of the same bytes as WRITE_BLOBS partitions of kind
 * 0 into a new store. Returns seconds, or < 0. */
static double write_store(const char *dir, const uint8_t *data, size_t bytes, char *err,
                          size_t errlen) {
    st_identity id = {.fingerprint = 42, .description = "ckptbench", .shard = 0};
    st_store *s = NULL;
    st_blob blobs[WRITE_BLOBS];
    size_t per_blob = bytes / WRITE_BLOBS;
    for (int i = 0; i < WRITE_BLOBS; i++)
        blobs[i] = (st_blob){.part = (uint32_t)i, .kind = ST_KIND_PARAMS,
                             .data = data + (size_t)i * per_blob, .len = per_blob};
    if (st_store_open(NULL, dir, &id, &s, err, errlen) != CM_OK) return -1.0;
    double t0 = cm_now();
    int rc = st_store_checkpoint(s, 1, blobs, WRITE_BLOBS, NULL, 0, err, errlen);
    double secs = cm_now() - t0;
    st_store_close(s);
    return rc == CM_OK ? secs : -1.0;
}

static int bench_write(bench *b, const opts *o) {
    size_t bytes = o->write_mib * MIB;
    char err[512] = "", dir[PATH_MAX];
    double raw[MAX_REPEATS], st[MAX_REPEATS], ratio[MAX_REPEATS];
    int n = 0, rc = CM_EIO;
    uint8_t *data = (uint8_t *)random_floats(bytes, 7);
    if (!data) {
        fprintf(stderr, "ckptbench: no memory for %zu MiB\n", o->write_mib);
        return CM_ENOMEM;
    }
    for (; n < o->repeats && !out_of_time(b); n++) {
        for (int k = 0; k < 2; k++) {
            int store_turn = (k + n) % 2; /* Alternate which goes first. */
            snprintf(dir, sizeof dir, "%s/write-%s-%d", b->tmp, store_turn ? "store" : "raw", n);
            double s = store_turn ? write_store(dir, data, bytes, err, sizeof err)
                                  : write_raw(dir, data, bytes, err, sizeof err);
            rm_tree(dir);
            if (s < 0) {
                fprintf(stderr, "ckptbench: write: %s\n", err);
                goto out;
            }
            *(store_turn ? &st[n] : &raw[n]) = bytes / s / 1e6;
        }
        ratio[n] = st[n] / raw[n];
        printf("{\"bench\":\"write\",\"repeat\":%d,\"mib\":%zu,\"raw_mbps\":%.1f,"
               "\"checkpoint_mbps\":%.1f,\"ratio\":%.3f}\n", n, o->write_mib, raw[n], st[n],
               ratio[n]);
        fflush(stdout);
    }
    rc = n == o->repeats ? CM_OK : CM_ETIMEDOUT;
out:
    free(data);
    if (n > 0) {
        double r = bu_median(ratio, n);
        b->write_ratio = r;
        printf("{\"bench\":\"write\",\"median_of\":%d,\"mib\":%zu,\"raw_mbps\":%.1f,"
               "\"checkpoint_mbps\":%.1f,\"ratio\":%.3f,\"target\":0.8,\"pass\":%s}\n", n,
               o->write_mib, bu_median(raw, n), bu_median(st, n), r, r >= 0.8 ? "true" : "false");
        fflush(stdout);
    }
    return rc;
}

/* ================================================== psserver children */

/* A psserver child: its stderr is read by a thread that timestamps the log
 * lines this benchmark needs. */
typedef struct server {
    pid_t pid; /* 0 once reaped. */
    int status;
    int port;
    int err_fd;
    pthread_t reader;
    int reader_started;
    pthread_mutex_t mu;
    /* Protected by mu. */
    double ck_end[MAX_EVENTS], ck_ms[MAX_EVENTS]; /* Checkpoints committed. */
    long long ck_version[MAX_EVENTS];
    int nck;
    double restore_ms[4]; /* total, open, load, restore; [0] < 0: not seen. */
    long long restored_version;
    char last_error[512];
} server;

static void *server_reader(void *arg) {
    server *s = arg;
    FILE *f = fdopen(s->err_fd, "r");
    char line[2048];
    if (!f) return NULL;
    while (fgets(line, sizeof line, f)) {
        double now = cm_now();
        const char *p;
        long long v;
        double ms[4];
        pthread_mutex_lock(&s->mu);
        if ((p = strstr(line, "checkpoint of version ")) &&
            sscanf(p, "checkpoint of version %lld committed in %lf ms", &v, &ms[0]) == 2) {
            if (s->nck < MAX_EVENTS) {
                s->ck_end[s->nck] = now;
                s->ck_ms[s->nck] = ms[0];
                s->ck_version[s->nck++] = v;
            }
        } else if ((p = strstr(line, "restored version ")) &&
                   (p = strstr(p, " in ")) &&
                   sscanf(p, " in %lf ms (open %lf ms, load %lf ms, restore %lf ms)", &ms[0],
                          &ms[1], &ms[2], &ms[3]) == 4) {
            sscanf(strstr(line, "restored version "), "restored version %lld", &v);
            s->restored_version = v;
            memcpy(s->restore_ms, ms, sizeof ms);
        } else if (strstr(line, " error: ") || strstr(line, " warn: ")) {
            snprintf(s->last_error, sizeof s->last_error, "%.500s", line);
            fprintf(stderr, "ckptbench: psserver: %s", line);
        }
        pthread_mutex_unlock(&s->mu);
    }
    fclose(f);
    return NULL;
}

static int server_reap_by(server *s, double until) { return bu_reap_by(&s->pid, &s->status, until); }

/* Start psserver on a free port (the model comes with the client's Init),
 * with the extra arguments 'more' (NULL-terminated). fork + exec, not posix_spawn,
 * so that the child can ask to die with this process; no gRPC channel is
 * open in this process when it forks (docs/GRPC_LEVELDB_NOTES.md G8). */
static int server_start(bench *b, server *s, char *const *more, char *err, size_t errlen) {
    char ps_hosts[64], worker_hosts[64];
    char *argv[32];
    int n = 0, fds[2];
    memset(s, 0, sizeof *s);
    s->restore_ms[0] = -1.0;
    s->err_fd = -1;
    pthread_mutex_init(&s->mu, NULL);
    int ports[2];
    if (bu_free_ports(ports, 2) != CM_OK) {
        cm_seterr(err, errlen, "cannot find free ports");
        return CM_EIO;
    }
    s->port = ports[0];
    snprintf(ps_hosts, sizeof ps_hosts, "127.0.0.1:%d", s->port);
    snprintf(worker_hosts, sizeof worker_hosts, "127.0.0.1:%d", ports[1]);
    argv[n++] = b->psserver;
    argv[n++] = "--ps-hosts";
    argv[n++] = ps_hosts;
    argv[n++] = "--worker-hosts";
    argv[n++] = worker_hosts;
    argv[n++] = "--task-index";
    argv[n++] = "0";
    argv[n++] = "--max-message-mb";
    argv[n++] = MAX_MESSAGE_MB;
    for (int i = 0; more && more[i] && n < 31; i++) argv[n++] = more[i];
    argv[n] = NULL;
    if (pipe2(fds, O_CLOEXEC)) {
        cm_seterr(err, errlen, "pipe: %s", strerror(errno));
        return CM_EIO;
    }
    pid_t parent = getpid();
    s->pid = fork();
    if (s->pid < 0) {
        cm_seterr(err, errlen, "fork: %s", strerror(errno));
        s->pid = 0;
        close(fds[0]);
        close(fds[1]);
        return CM_EIO;
    }
    if (s->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(1);
        dup2(fds[1], 2);
        execv(argv[0], argv);
        _exit(127);
    }
    close(fds[1]);
    s->err_fd = fds[0];
    if (pthread_create(&s->reader, NULL, server_reader, s) == 0) s->reader_started = 1;
    else close(s->err_fd);
    return CM_OK;
}

/* Wait until the server accepts connections (polling every 0.5 ms).
 * CM_EBUSY if it could not bind its port. */
static int server_wait_listening(bench *b, server *s, double timeout_s, char *err,
                                 size_t errlen) {
    double until = cm_now() + timeout_s;
    for (;;) {
        if (bu_port_accepts(s->port)) return CM_OK;
        if (server_reap_by(s, 0.0)) {
            if (WIFEXITED(s->status) && WEXITSTATUS(s->status) == PORT_TAKEN) {
                cm_seterr(err, errlen, "psserver could not bind port %d", s->port);
                return CM_EBUSY;
            }
            cm_seterr(err, errlen, "psserver exited during start (status %#x)", s->status);
            return CM_EIO;
        }
        if (out_of_time(b) || cm_now() > until) {
            cm_seterr(err, errlen, "psserver did not start listening");
            return CM_ETIMEDOUT;
        }
        usleep(500);
    }
}

/* Wait up to timeout_s for the server to exit by itself, then SIGTERM,
 * then SIGKILL; join the reader. CM_OK if it exited 0 by itself. */
static int server_stop(server *s, double timeout_s) {
    int rc = CM_OK;
    if (s->pid > 0 && !server_reap_by(s, cm_now() + timeout_s)) {
        rc = CM_ETIMEDOUT;
        kill(s->pid, SIGTERM);
        if (!server_reap_by(s, cm_now() + 3.0)) {
            kill(s->pid, SIGKILL);
            server_reap_by(s, cm_now() + 10.0);
        }
    }
    if (rc == CM_OK && (!WIFEXITED(s->status) || WEXITSTATUS(s->status) != 0)) rc = CM_EIO;
    if (s->reader_started) pthread_join(s->reader, NULL);
    s->reader_started = 0;
    pthread_mutex_destroy(&s->mu);
    return rc;
}

/* A client of a one-shard vector model of 'elems' floats, with the default
 * minimum partition (psserver learns the model from the client's Init). */
typedef struct client {
    cm_model *model;
    cm_placement *pl;
    ps_client *c;
} client;

static void client_close(client *c) {
    ps_client_close(c->c);
    cm_placement_destroy(c->pl);
    cm_model_destroy(c->model);
    memset(c, 0, sizeof *c);
}

static int client_open(client *c, size_t elems, int port, int64_t timeout_ms, char *err,
                       size_t errlen) {
    char addr[64];
    const char *addrs[1] = {addr};
    memset(c, 0, sizeof *c);
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    if (cm_model_create_vector(elems, &c->model) != CM_OK ||
        cm_placement_create(c->model, 1, CM_PLACEMENT_MIN_PART_BYTES, &c->pl) != CM_OK) {
        cm_seterr(err, errlen, "cannot build the model of %zu floats", elems);
        client_close(c);
        return CM_ENOMEM;
    }
    ps_client_cfg cfg = {.model = c->model, .placement = c->pl, .ps_addrs = addrs, .rank = 0,
                         .deadline_ms = timeout_ms, .connect_timeout_ms = timeout_ms,
                         .max_message = atoi(MAX_MESSAGE_MB) << 20};
    int rc = ps_client_open(&cfg, &c->c, err, errlen);
    if (rc != CM_OK) client_close(c);
    return rc;
}

/* Sync, 1 worker, params += grad (the benchmark's "add" optimizer). */
static int client_init(client *c, char *err, size_t errlen) {
    ps_init_cfg init = {.optim = ps_optim_defaults(PS_OPTIM_ADD, 0.0f), .seed = 1,
                        .num_workers = 1, .async = 0, .sum = 1, .zero_init = 1};
    return ps_client_init(c->c, &init, err, errlen);
}

static int push_pull(client *c, int64_t step, const float *grad, float *params, char *err,
                     size_t errlen) {
    ps_ticket *t = NULL;
    int rc = ps_client_push_pull(c->c, step, grad, params, &t);
    if (rc != CM_OK) {
        cm_seterr(err, errlen, "push-pull of step %lld could not start", (long long)step);
        return rc;
    }
    return ps_ticket_wait(t, NULL, err, errlen);
}

/* Start psserver (extra arguments 'more') and a client of it that has
 * initialised the shard. On failure the caller still calls phase_end. */
static int phase_begin(bench *b, server *s, client *c, size_t elems, char *const *more,
                       char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    int rc;
    for (int attempt = 1;; attempt++) { /* New ports while the chosen one was taken. */
        rc = server_start(b, s, more, err, errlen);
        if (rc == CM_OK) rc = server_wait_listening(b, s, 30.0, err, errlen);
        if (rc != CM_EBUSY || attempt == 5) break;
        server_stop(s, 0.0);
    }
    if (rc == CM_EBUSY) cm_seterr(err, errlen, "psserver found its port taken 5 times");
    if (rc == CM_OK) rc = client_open(c, elems, s->port, 60000, err, errlen);
    if (rc == CM_OK) rc = client_init(c, err, errlen);
    return rc;
}

/* After a phase that ended with 'rc': if it went well, ask the server to
 * shut down and expect it to exit 0 within timeout_s; else stop it at once.
 * Closes the client. Returns rc or the first error of the shutdown. */
static int phase_end(server *s, client *c, int rc, double timeout_s, char *err, size_t errlen) {
    if (rc == CM_OK) rc = ps_client_shutdown_servers(c->c, "ckptbench: phase done", 0, err, errlen);
    client_close(c);
    int stop = server_stop(s, rc == CM_OK ? timeout_s : 0.0);
    if (rc == CM_OK && stop != CM_OK) {
        cm_seterr(err, errlen, "psserver did not exit cleanly (status %#x)", s->status);
        rc = CM_EIO;
    }
    return rc;
}

/* ================================================== 2. step time */

typedef struct step_run {
    double *t0, *t1; /* Each timed step's start and end. */
    int n;
    double ck_start[MAX_EVENTS], ck_end[MAX_EVENTS];
    int nck;
} step_run;

/* One server (checkpointing into 'dir' every ckpt_every versions, or not
 * at all with dir NULL) and o->warmup + o->steps timed push-pull steps. */
static int step_phase(bench *b, const opts *o, const char *dir, float *grad, float *params,
                      step_run *r, char *err, size_t errlen) {
    size_t elems = o->step_mib * MIB / sizeof(float);
    server s;
    client c = {0};
    char every[24], nice[24];
    snprintf(every, sizeof every, "%d", o->ckpt_every);
    snprintf(nice, sizeof nice, "%d", o->ckpt_nice);
    char *more[] = {"--data-dir", (char *)dir, "--checkpoint-every", every,
                    o->ckpt_nice >= 0 ? "--checkpoint-nice" : NULL, nice, NULL};
    int total = o->warmup + o->steps;
    int rc = phase_begin(b, &s, &c, elems, dir ? more : NULL, err, errlen);
    if (rc != CM_OK) goto out;
    r->n = 0;
    for (int64_t st = 0; st < total; st++) {
        if (out_of_time(b)) {
            cm_seterr(err, errlen, "out of time (--timeout) or interrupted");
            rc = CM_ETIMEDOUT;
            goto out;
        }
        double t0 = cm_now();
        if ((rc = push_pull(&c, st, grad, params, err, errlen)) != CM_OK) goto out;
        if (st >= o->warmup) {
            r->t0[r->n] = t0;
            r->t1[r->n++] = cm_now();
        }
    }
    /* params += 1 per step from zero: every element must be 'total'. */
    for (size_t i = 0; i < elems; i++) {
        if (params[i] != (float)total) {
            cm_seterr(err, errlen, "check failed: element %zu is %g after %d steps, not %d", i,
                      (double)params[i], total, total);
            rc = CM_ECORRUPT;
            goto out;
        }
    }
out:
    rc = phase_end(&s, &c, rc, 30.0, err, errlen);
    r->nck = s.nck;
    for (int i = 0; i < s.nck; i++) {
        r->ck_end[i] = s.ck_end[i];
        r->ck_start[i] = s.ck_end[i] - s.ck_ms[i] / 1e3;
    }
    if (rc == CM_OK && dir && s.nck == 0) {
        cm_seterr(err, errlen, "no checkpoint was committed during %d steps", total);
        rc = CM_EIO;
    }
    return rc;
}

static int overlaps_checkpoint(const step_run *r, int i) {
    for (int k = 0; k < r->nck; k++)
        if (r->t0[i] < r->ck_end[k] && r->t1[i] > r->ck_start[k]) return 1;
    return 0;
}

static int bench_step(bench *b, const opts *o) {
    size_t elems = o->step_mib * MIB / sizeof(float);
    char err[512] = "", dir[PATH_MAX];
    int rc = CM_ENOMEM, n = 0;
    double base[MAX_REPEATS], during[MAX_REPEATS], between[MAX_REPEATS], rise[MAX_REPEATS];
    double ck_ms[MAX_REPEATS], all[MAX_REPEATS], rise_all[MAX_REPEATS];
    step_run r = {0};
    float *grad = cm_alloc_aligned(elems * sizeof(float));
    float *params = cm_alloc_aligned(elems * sizeof(float));
    r.t0 = cm_calloc((size_t)o->steps, sizeof(double));
    r.t1 = cm_calloc((size_t)o->steps, sizeof(double));
    double *a = cm_calloc((size_t)o->steps, sizeof(double));
    double *d = cm_calloc((size_t)o->steps, sizeof(double));
    double *e = cm_calloc((size_t)o->steps, sizeof(double));
    if (!grad || !params) goto out;
    for (size_t i = 0; i < elems; i++) grad[i] = 1.0f;
    memset(params, 0, elems * sizeof(float));
    for (; n < o->step_repeats && !out_of_time(b); n++) {
        double med[2] = {0, 0};
        int nd = 0, nb = 0;
        for (int k = 0; k < 2; k++) {
            int ck = (k + n) % 2; /* Alternate which goes first. */
            snprintf(dir, sizeof dir, "%s/step-%d", b->tmp, n);
            rc = step_phase(b, o, ck ? dir : NULL, grad, params, &r, err, sizeof err);
            rm_tree(dir);
            if (rc != CM_OK) {
                fprintf(stderr, "ckptbench: step (%s checkpoints): %s\n", ck ? "with" : "without",
                        err);
                goto out;
            }
            if (!ck) {
                for (int i = 0; i < r.n; i++) a[i] = r.t1[i] - r.t0[i];
                med[0] = bu_median(a, r.n);
                continue;
            }
            double *bt = a; /* Reused: the steps between checkpoints. */
            for (int i = 0; i < r.n; i++) {
                e[i] = r.t1[i] - r.t0[i];
                if (overlaps_checkpoint(&r, i))
                    d[nd++] = r.t1[i] - r.t0[i];
                else
                    bt[nb++] = r.t1[i] - r.t0[i];
            }
            double cms[MAX_EVENTS];
            for (int i = 0; i < r.nck; i++) cms[i] = (r.ck_end[i] - r.ck_start[i]) * 1e3;
            ck_ms[n] = bu_median(cms, r.nck);
            med[1] = bu_median(d, nd);
            between[n] = bu_median(bt, nb);
            all[n] = bu_median(e, r.n) * 1e3;
        }
        base[n] = med[0] * 1e3;
        during[n] = med[1] * 1e3;
        between[n] *= 1e3;
        rise[n] = (during[n] / base[n] - 1.0) * 100.0;
        rise_all[n] = (all[n] / base[n] - 1.0) * 100.0;
        printf("{\"bench\":\"step\",\"repeat\":%d,\"mib\":%zu,\"checkpoint_every\":%d,"
               "\"steps\":%d,\"base_ms\":%.2f,\"during_checkpoint_ms\":%.2f,"
               "\"steps_during\":%d,\"between_checkpoints_ms\":%.2f,\"all_steps_ms\":%.2f,"
               "\"checkpoint_ms\":%.0f,\"rise_pct\":%.1f,\"rise_all_pct\":%.1f}\n", n,
               o->step_mib, o->ckpt_every, o->steps, base[n], during[n], nd, between[n],
               all[n], ck_ms[n], rise[n], rise_all[n]);
        fflush(stdout);
        if (nd == 0) {
            fprintf(stderr, "ckptbench: step: no step overlapped a checkpoint\n");
            rc = CM_EIO;
            goto out;
        }
    }
    rc = n == o->step_repeats ? CM_OK : CM_ETIMEDOUT;
out:
    if (n > 0 && rc == CM_OK) {
        double rs = bu_median(rise, n);
        b->step_rise_pct = rs;
        printf("{\"bench\":\"step\",\"median_of\":%d,\"mib\":%zu,\"checkpoint_nice\":%d,"
               "\"base_ms\":%.2f,"
               "\"during_checkpoint_ms\":%.2f,\"between_checkpoints_ms\":%.2f,"
               "\"all_steps_ms\":%.2f,\"checkpoint_ms\":%.0f,\"rise_pct\":%.1f,"
               "\"rise_all_pct\":%.1f,\"target_pct\":5,\"pass\":%s}\n", n, o->step_mib,
               o->ckpt_nice >= 0 ? o->ckpt_nice : PSSERVER_NICE, bu_median(base, n),
               bu_median(during, n), bu_median(between, n), bu_median(all, n),
               bu_median(ck_ms, n), rs, bu_median(rise_all, n), rs <= 5.0 ? "true" : "false");
        fflush(stdout);
    }
    free(a);
    free(d);
    free(e);
    free(r.t0);
    free(r.t1);
    free(grad);
    free(params);
    return rc;
}

/* ================================================== 3. recovery */

static float pattern(size_t i) { return (float)(i & 1023) * 0.25f; }

/* Write one checkpoint (version 1) of a vector of 'elems' floats into dir
 * with a psserver that is then shut down. */
static int recovery_prepare(bench *b, const char *dir, size_t elems, float *buf, char *err,
                            size_t errlen) {
    server s;
    client c = {0};
    char *more[] = {"--data-dir", (char *)dir, "--checkpoint-every", "1", NULL};
    int rc = phase_begin(b, &s, &c, elems, more, err, errlen);
    if (rc != CM_OK) goto out;
    for (size_t i = 0; i < elems; i++) buf[i] = pattern(i);
    float *params = cm_alloc_aligned(elems * sizeof(float));
    if (!params) {
        rc = CM_ENOMEM;
        goto out;
    }
    rc = push_pull(&c, 0, buf, params, err, errlen);
    free(params);
out:
    rc = phase_end(&s, &c, rc, 60.0, err, errlen);
    if (rc == CM_OK && (s.nck != 1 || s.ck_version[0] != 1)) {
        cm_seterr(err, errlen, "expected one checkpoint of version 1, saw %d", s.nck);
        rc = CM_EIO;
    }
    return rc;
}

typedef struct recovery_times {
    double total_ms, listening_ms; /* total: until it serves (Rollback done) */
    double rollback_ms;
    double server_ms[4]; /* restore total, open, load, restore */
} recovery_times;

/* Start psserver on dir and time it until it serves again: the first
 * Stats answered (which must say version 1), then the Rollback the chief
 * sends a restored shard; with 'check', pull and compare. */
static int recovery_measure(bench *b, const char *dir, size_t elems, const float *want,
                            int check, recovery_times *t, char *err, size_t errlen) {
    server s;
    client c = {0};
    char *more[] = {"--data-dir", (char *)dir, NULL};
    double t0 = cm_now();
    int rc = server_start(b, &s, more, err, errlen);
    if (rc != CM_OK) return rc;
    if ((rc = server_wait_listening(b, &s, 30.0, err, errlen)) != CM_OK) goto out;
    t->listening_ms = (cm_now() - t0) * 1e3;
    /* A short deadline per try; a failed try is repeated for up to 10 s. */
    ps_client_stats st = {0};
    double until = cm_now() + 10.0;
    for (;;) {
        rc = client_open(&c, elems, s.port, 500, err, errlen);
        if (rc == CM_OK) rc = ps_client_stats_get(c.c, &st, err, errlen);
        if (rc == CM_OK || cm_now() > until || out_of_time(b)) break;
        client_close(&c);
    }
    if (rc != CM_OK) goto out;
    /* Serving again means after the chief's Rollback (a restored shard
     * refuses pushes and pulls until then): do what the chief does. */
    double tr = cm_now();
    rc = ps_client_rollback(c.c, 1, 1, err, errlen);
    t->rollback_ms = (cm_now() - tr) * 1e3;
    t->total_ms = (cm_now() - t0) * 1e3;
    if (rc != CM_OK) goto out;
    if (st.min_version != 1) {
        cm_seterr(err, errlen, "the restarted server is at version %lld, not 1",
                  (long long)st.min_version);
        rc = CM_ECORRUPT;
        goto out;
    }
    if (check) {
        float *params = cm_alloc_aligned(elems * sizeof(float));
        ps_ticket *tk = NULL;
        rc = params ? ps_client_pull(c.c, 1, params, &tk) : CM_ENOMEM;
        if (rc == CM_OK) rc = ps_ticket_wait(tk, NULL, err, errlen);
        if (rc == CM_OK && memcmp(params, want, elems * sizeof(float)) != 0) {
            cm_seterr(err, errlen, "the restored parameters differ from those checkpointed");
            rc = CM_ECORRUPT;
        }
        free(params);
        if (rc != CM_OK) goto out;
    }
out:
    rc = phase_end(&s, &c, rc, 30.0, err, errlen);
    if (rc == CM_OK && (s.restore_ms[0] < 0 || s.restored_version != 1)) {
        cm_seterr(err, errlen, "psserver did not log \"restored version 1 ... in ... ms\"");
        rc = CM_EIO;
    }
    memcpy(t->server_ms, s.restore_ms, sizeof t->server_ms);
    return rc;
}

static int bench_recovery(bench *b, const opts *o) {
    size_t elems = o->recovery_mb * 1000000 / sizeof(float);
    char err[512] = "", dir[PATH_MAX];
    double tot[MAX_REPEATS], lis[MAX_REPEATS], srv[4][MAX_REPEATS];
    int n = 0, rc = CM_ENOMEM;
    float *want = cm_alloc_aligned(elems * sizeof(float));
    if (!want) goto out;
    for (; n < o->repeats && !out_of_time(b); n++) {
        recovery_times t = {0};
        /* Every repeat restarts from the state a stopped server leaves
         * (its last memtable still in LevelDB's log), not from a directory
         * an earlier restart already tidied. */
        snprintf(dir, sizeof dir, "%s/recovery-%d", b->tmp, n);
        rc = recovery_prepare(b, dir, elems, want, err, sizeof err);
        if (rc == CM_OK)
            rc = recovery_measure(b, dir, elems, want, n == 0, &t, err, sizeof err);
        rm_tree(dir);
        if (rc != CM_OK) {
            fprintf(stderr, "ckptbench: recovery: %s\n", err);
            goto out;
        }
        tot[n] = t.total_ms;
        lis[n] = t.listening_ms;
        for (int i = 0; i < 4; i++) srv[i][n] = t.server_ms[i];
        printf("{\"bench\":\"recovery\",\"repeat\":%d,\"mb\":%zu,\"start_to_serving_ms\":%.1f,"
               "\"rollback_ms\":%.1f,\"start_to_listening_ms\":%.1f,\"server_restore_ms\":%.1f,\"open_ms\":%.1f,"
               "\"load_ms\":%.1f,\"shard_restore_ms\":%.1f%s}\n", n, o->recovery_mb,
               t.total_ms, t.rollback_ms, t.listening_ms, t.server_ms[0], t.server_ms[1], t.server_ms[2],
               t.server_ms[3], n == 0 ? ",\"check\":\"ok\"" : "");
        fflush(stdout);
    }
    rc = n == o->repeats ? CM_OK : CM_ETIMEDOUT;
out:
    if (n > 0) {
        double m = bu_median(tot, n);
        b->recovery_ms = m;
        printf("{\"bench\":\"recovery\",\"median_of\":%d,\"mb\":%zu,\"start_to_serving_ms\":%.1f,"
               "\"start_to_listening_ms\":%.1f,\"server_restore_ms\":%.1f,\"open_ms\":%.1f,"
               "\"load_ms\":%.1f,\"shard_restore_ms\":%.1f,\"target_ms\":500,\"pass\":%s}\n",
               n, o->recovery_mb, m, bu_median(lis, n), bu_median(srv[0], n), bu_median(srv[1], n),
               bu_median(srv[2], n), bu_median(srv[3], n), m < 500.0 ? "true" : "false");
        fflush(stdout);
    }
    free(want);
    return rc;
}

/* ================================================== driver */

static void usage(FILE *f) {
    fprintf(f,
            "usage: ckptbench [options]\n"
            "Issue 4's durable-shard benchmarks; one JSON line per measurement.\n\n"
            "  --only LIST          write,step,recovery (default: all three)\n"
            "  --repeats N          write and recovery repeats (default 5)\n"
            "  --step-repeats N     step-time repeats (default 5)\n"
            "  --write-mib N        checkpoint size for 'write' (default 256)\n"
            "  --step-mib N         model size for 'step' (default 64)\n"
            "  --steps N            timed steps per phase (default 60)\n"
            "  --warmup N           untimed steps first (default: K + 5, so that the first\n"
            "                       checkpoint, which allocates a snapshot buffer, is in it)\n"
            "  --checkpoint-every K versions, for 'step' (default 15)\n"
            "  --checkpoint-nice N  psserver's --checkpoint-nice (default: psserver's)\n"
            "  --recovery-mb N      shard state for 'recovery' (default 100)\n"
            "  --quick              1 repeat of each, smaller sizes: a smoke run\n"
            "  --bin-dir DIR        where psserver is (default: ../bin beside this binary)\n"
            "  --timeout S          bound on the whole run (default 900)\n");
}

static int wants(const opts *o, const char *what) {
    if (!o->only) return 1;
    const char *p = strstr(o->only, what);
    return p != NULL;
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {
        {"only", required_argument, 0, 'o'},         {"repeats", required_argument, 0, 'R'},
        {"step-repeats", required_argument, 0, 'S'}, {"write-mib", required_argument, 0, 'w'},
        {"step-mib", required_argument, 0, 's'},     {"steps", required_argument, 0, 'n'},
        {"warmup", required_argument, 0, 'W'},       {"checkpoint-every", required_argument, 0, 'k'},
        {"recovery-mb", required_argument, 0, 'r'},  {"quick", no_argument, 0, 'q'},
        {"bin-dir", required_argument, 0, 'b'},      {"timeout", required_argument, 0, 'T'},
        {"checkpoint-nice", required_argument, 0, 'N'},
        {"help", no_argument, 0, 'h'},               {0, 0, 0, 0}};
    opts o = {.repeats = 5, .step_repeats = 5, .steps = 60, .warmup = -1, .ckpt_every = 15,
              .ckpt_nice = -1,
              .write_mib = 256, .step_mib = 64, .recovery_mb = 100, .timeout_s = 900.0};
    int c;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'o': o.only = optarg; break;
        case 'R': o.repeats = atoi(optarg); break;
        case 'S': o.step_repeats = atoi(optarg); break;
        case 'w': o.write_mib = (size_t)atol(optarg); break;
        case 's': o.step_mib = (size_t)atol(optarg); break;
        case 'n': o.steps = atoi(optarg); break;
        case 'W': o.warmup = atoi(optarg); break;
        case 'k': o.ckpt_every = atoi(optarg); break;
        case 'N': o.ckpt_nice = atoi(optarg); break;
        case 'r': o.recovery_mb = (size_t)atol(optarg); break;
        case 'q':
            o.repeats = o.step_repeats = 1;
            o.write_mib = 64;
            o.step_mib = 16;
            o.steps = 30;
            o.recovery_mb = 20;
            break;
        case 'b': o.bin_dir = optarg; break;
        case 'T': o.timeout_s = atof(optarg); break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (o.warmup < 0) o.warmup = o.ckpt_every + 5;
    if (optind < argc || o.repeats < 1 || o.repeats > MAX_REPEATS || o.step_repeats < 1 ||
        o.step_repeats > MAX_REPEATS || o.write_mib < WRITE_BLOBS / 4 || o.step_mib < 1 ||
        o.steps < 4 || o.ckpt_every < 1 || o.ckpt_nice > 19 || o.recovery_mb < 1 ||
        o.timeout_s <= 0) {
        usage(stderr);
        return 2;
    }
    cm_mem_keep_freed(); /* As psserver does. */
    bench *b = cm_calloc(1, sizeof *b);
    int status = 1;
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) {
        perror("ckptbench: /proc/self/exe");
        free(b);
        return 1;
    }
    exe[len] = 0;
    if (o.bin_dir)
        snprintf(b->psserver, sizeof b->psserver, "%s/psserver", o.bin_dir);
    else /* The build puts bench/ckptbench beside bin/psserver. */
        snprintf(b->psserver, sizeof b->psserver, "%.*s/../bin/psserver",
                 (int)(strrchr(exe, '/') - exe) > PATH_MAX - 32 ? PATH_MAX - 32
                                                                 : (int)(strrchr(exe, '/') - exe),
                 exe);
    if ((wants(&o, "step") || wants(&o, "recovery")) && access(b->psserver, X_OK)) {
        fprintf(stderr, "ckptbench: %s: %s (see --bin-dir)\n", b->psserver, strerror(errno));
        free(b);
        return 1;
    }
    const char *tmpdir = getenv("TMPDIR");
    snprintf(b->tmp, sizeof b->tmp, "%s/ckptbench.XXXXXX", tmpdir && *tmpdir ? tmpdir : "/tmp");
    if (!mkdtemp(b->tmp)) {
        fprintf(stderr, "ckptbench: mkdtemp %s: %s\n", b->tmp, strerror(errno));
        free(b);
        return 1;
    }
    /* psserver logs its checkpoints and restores at info level. */
    unsetenv("PS_LOG_LEVEL");
    bu_catch_signals(on_signal);
    b->deadline = cm_now() + o.timeout_s;
    double load0 = bu_load_average();
    b->write_ratio = b->recovery_ms = -1.0;
    b->step_rise_pct = -1e9;
    int rcw = CM_OK, rcs = CM_OK, rcr = CM_OK;
    if (wants(&o, "write")) rcw = bench_write(b, &o);
    if (wants(&o, "step") && !out_of_time(b)) rcs = bench_step(b, &o);
    if (wants(&o, "recovery") && !out_of_time(b)) rcr = bench_recovery(b, &o);
    status = rcw || rcs || rcr || out_of_time(b) ? 1 : 0;
    char v[3][96];
    snprintf(v[0], sizeof v[0], b->write_ratio < 0 ? "null" : "{\"ratio\":%.3f,\"pass\":%s}",
             b->write_ratio, b->write_ratio >= 0.8 ? "true" : "false");
    snprintf(v[1], sizeof v[1], b->step_rise_pct < -100 ? "null"
             : "{\"rise_pct\":%.1f,\"pass\":%s}", b->step_rise_pct,
             b->step_rise_pct <= 5.0 ? "true" : "false");
    snprintf(v[2], sizeof v[2], b->recovery_ms < 0 ? "null" : "{\"ms\":%.1f,\"pass\":%s}",
             b->recovery_ms, b->recovery_ms < 500.0 ? "true" : "false");
    printf("{\"summary\":\"ckptbench\",\"write_ge_0.8x_raw\":%s,\"step_rise_le_5pct\":%s,"
           "\"recovery_lt_500ms\":%s,\"load_average\":[%.2f,%.2f],\"status\":\"%s\"}\n",
           v[0], v[1], v[2], load0, bu_load_average(), status ? "failed" : "ok");
    rm_tree(b->tmp);
    free(b);
    return status;
}
