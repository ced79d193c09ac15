/* rowckpt.c - a PS shard's embedding table on disk: bytes written per
 * incremental checkpoint against the rows changed, and the time a shard
 * restarted on a table of about 1 GB takes to serve again.
 * SPDX-License-Identifier: MIT
 *
 * 1. Build: one PS shard in this process (ps_server, a DeepFM-shaped model
 *    of one table of --dim floats, Adagrad, sync, one worker) with a data
 *    directory and a row budget of --memory-mb; steps push gradients of
 *    --batch new rows each until the table holds --rows rows (evicted to
 *    the row store beyond the budget), checkpointing every --every steps.
 * 2. Checkpoints: --every steps that change 1 % of the rows (random ones,
 *    spread over the steps), a checkpoint; then 10 %. For each: rows
 *    changed, the rows and bytes that checkpoint wrote, everything written
 *    to the row store in that interval (evictions included), and what a
 *    checkpoint of the whole table (the scheme before) writes: the table's
 *    rows times an entry's bytes, measured in the same run as the bytes of
 *    the build's writes per row.
 * 3. Restart: the shard stops (a final checkpoint), and the real psserver
 *    binary is started on the directory; reported: until its port accepts,
 *    until it answers Checkpoints (restored), until a Rollback to that
 *    version is done, and until a pull of --probe random stored rows is
 *    answered (read from disk); and the row store's size on disk. The
 *    reference, in the same run: the time the same process would take to
 *    read every row back (a sequential read of the row store), which is
 *    what a restart that loads the table costs at least (the row store's
 *    LevelDB read raw, in key order, through the page cache).
 *
 * Output: JSON lines, with the load average (figures mean something only
 * on a quiet machine).
 */
#include <dirent.h>
#include <leveldb/c.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_placement.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_client.h"
#include "ps/ps_server.h"
#include "storage/st_rowdb.h"

typedef struct opts {
    long long rows;
    int dim, batch, every, probe;
    double memory_mb;
    const char *dir, *bin_dir;
} opts;

/* Row i's id: spread over 64 bits. */
static uint64_t row_id(long long i) { return cm_mix64((uint64_t)i + 1); }

/* Bytes of the files under dir (not recursive: a LevelDB directory). */
static double dir_bytes(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    double n = 0;
    struct dirent *e;
    char p[4400];
    struct stat st;
    while ((e = readdir(d))) {
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (stat(p, &st) == 0 && S_ISREG(st.st_mode)) n += (double)st.st_size;
    }
    closedir(d);
    return n;
}

static void die(const char *what, const char *err) {
    fprintf(stderr, "rowckpt: %s: %s\n", what, err);
    exit(1);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* The reference: every entry of the LevelDB directory read once, in key
 * order (what loading the whole table at a restart reads at least).
 * Returns the entries; *seconds the time. */
static long long scan_all(const char *dir, double *seconds) {
    leveldb_options_t *opt = leveldb_options_create();
    char *lerr = NULL;
    leveldb_t *db = leveldb_open(opt, dir, &lerr);
    if (!db) die(dir, lerr ? lerr : "cannot open");
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    leveldb_readoptions_set_fill_cache(ro, 0);
    double t0 = cm_now();
    leveldb_iterator_t *it = leveldb_create_iterator(db, ro);
    long long n = 0;
    volatile unsigned char sink = 0;
    for (leveldb_iter_seek_to_first(it); leveldb_iter_valid(it); leveldb_iter_next(it)) {
        size_t vl;
        const char *v = leveldb_iter_value(it, &vl);
        if (vl) sink ^= (unsigned char)v[vl - 1];
        n++;
    }
    *seconds = cm_now() - t0;
    (void)sink;
    leveldb_iter_destroy(it);
    leveldb_readoptions_destroy(ro);
    leveldb_close(db);
    leveldb_options_destroy(opt);
    return n;
}

typedef struct bench {
    opts o;
    cm_model *m;
    cm_placement *pl;
    ps_server *srv;
    ps_client *cli;
    char addr[64];
    float *grad, *params, *rgrad;
    uint64_t *ids;
    int64_t step;
} bench;

/* One sync step pushing gradients of ids[0..n) (one table). */
static void step(bench *b, size_t n) {
    size_t begin[2] = {0, n};
    ps_row_keys keys = {.ntables = 1, .tab_begin = begin, .ids = b->ids};
    ps_ticket *t;
    char err[512];
    if (ps_client_push_pull_rows(b->cli, b->step, b->grad, b->params, &keys, b->rgrad, NULL,
                                 NULL, &t) != CM_OK)
        die("push", "refused");
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) die("push", err);
    b->step++;
}

static void stats(bench *b, ps_client_stats *st) {
    char err[512];
    if (ps_client_stats_get(b->cli, st, err, sizeof err) != CM_OK) die("stats", err);
}

static void open_client(bench *b, const char *addr) {
    const char *addrs[1] = {addr};
    ps_client_cfg cc = {.model = b->m, .placement = b->pl, .ps_addrs = addrs,
                        .deadline_ms = 600000, .connect_timeout_ms = 60000};
    char err[512];
    if (ps_client_open(&cc, &b->cli, err, sizeof err) != CM_OK) die("client", err);
}

static void usage(FILE *f) {
    fprintf(f, "usage: rowckpt [options]\n"
               "  --rows N         rows in the table (default 6500000: about 1 GB on disk)\n"
               "  --dim D          floats per row (default 16; Adagrad adds D)\n"
               "  --batch U        rows per build step (default 65536)\n"
               "  --every K        steps between checkpoints (default 10)\n"
               "  --memory-mb X    the shard's row budget (default 64)\n"
               "  --probe P        rows pulled after the restart (default 4096)\n"
               "  --dir DIR        the data directory (default: one under $TMPDIR, removed)\n"
               "  --bin-dir DIR    where psserver is (default: ../bin beside this binary)\n"
               "  --quick          200000 rows (a smoke test)\n");
}

int main(int argc, char **argv) {
    bench B = {.o = {.rows = 6500000, .dim = 16, .batch = 65536, .every = 10, .probe = 4096,
                     .memory_mb = 64}};
    opts *o = &B.o;
    static const struct option lo[] = {
        {"rows", required_argument, 0, 'n'},      {"dim", required_argument, 0, 'd'},
        {"batch", required_argument, 0, 'u'},     {"every", required_argument, 0, 'k'},
        {"memory-mb", required_argument, 0, 'm'}, {"probe", required_argument, 0, 'p'},
        {"dir", required_argument, 0, 'D'},       {"bin-dir", required_argument, 0, 'b'},
        {"quick", no_argument, 0, 'q'},           {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'n': o->rows = atoll(optarg); break;
        case 'd': o->dim = atoi(optarg); break;
        case 'u': o->batch = atoi(optarg); break;
        case 'k': o->every = atoi(optarg); break;
        case 'm': o->memory_mb = atof(optarg); break;
        case 'p': o->probe = atoi(optarg); break;
        case 'D': o->dir = optarg; break;
        case 'b': o->bin_dir = optarg; break;
        case 'q': o->rows = 200000; o->batch = 20000; o->memory_mb = 4; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (o->rows < o->batch || o->dim < 2 || o->batch < 1 || o->every < 1 || o->probe < 1 ||
        !(o->memory_mb > 0)) {
        usage(stderr);
        return 2;
    }
    bu_driver d = {0};
    if (bu_driver_init(&d, "rowckpt", o->bin_dir) != 0) return 1;
    bu_catch_signals(bu_on_signal);
    char tmp[512];
    if (o->dir) {
        snprintf(tmp, sizeof tmp, "%s", o->dir);
        mkdir(tmp, 0700);
    } else {
        const char *t = getenv("TMPDIR");
        snprintf(tmp, sizeof tmp, "%s/rowckpt.XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(tmp)) die("mkdtemp", tmp);
    }
    char shard_dir[600], rows_dir[600];
    snprintf(shard_dir, sizeof shard_dir, "%s/shard-0", tmp);
    snprintf(rows_dir, sizeof rows_dir, "%s/rows-0", tmp);

    cm_ctr_spec sp = {.nfields = 1, .emb_dim = o->dim - 1, .nhidden = 1, .hidden = {8}};
    char err[512];
    if (cm_model_create_deepfm(&sp, &B.m) != CM_OK) die("model", "deepfm");
    if (cm_placement_create(B.m, 1, CM_PLACEMENT_MIN_PART_BYTES, &B.pl) != CM_OK) die("placement", "1 PS");
    ps_server_cfg sc = {.nshards = 1, .model = B.m, .placement = B.pl, .data_dir = shard_dir,
                        .checkpoint_every = o->every, .rows_dir = rows_dir,
                        .rows_memory = (size_t)(o->memory_mb * (1 << 20))};
    if (ps_server_create(&sc, &B.srv) != CM_OK) die("server", shard_dir);
    int port = 0;
    if (ps_server_start(B.srv, "127.0.0.1:0", &port) != CM_OK) die("server", "listen");
    snprintf(B.addr, sizeof B.addr, "127.0.0.1:%d", port);
    open_client(&B, B.addr);
    ps_init_cfg ic = {.optim = ps_optim_defaults(PS_OPTIM_SGD, 0.01f),
                      .table_optim = ps_optim_defaults(PS_OPTIM_ADAGRAD, 0.05f), .seed = 1,
                      .num_workers = 1};
    if (ps_client_init(B.cli, &ic, err, sizeof err) != CM_OK) die("init", err);
    B.grad = cm_calloc(B.m->numel ? B.m->numel : 1, sizeof(float));
    B.params = cm_calloc(B.m->numel ? B.m->numel : 1, sizeof(float));
    size_t maxn = (size_t)o->batch;
    long long change10 = o->rows / 10 / o->every + 1;
    if ((size_t)change10 > maxn) maxn = (size_t)change10;
    B.ids = cm_malloc(maxn * sizeof *B.ids);
    B.rgrad = cm_malloc(maxn * (size_t)o->dim * sizeof(float));
    for (size_t i = 0; i < maxn * (size_t)o->dim; i++) B.rgrad[i] = 0.01f;

    /* 1. Build, in whole checkpoint intervals. */
    double load0 = bu_load_average(), t0 = cm_now();
    long long made = 0;
    while (made < o->rows || B.step % o->every) {
        size_t n = 0;
        while (n < (size_t)o->batch && made < o->rows) B.ids[n++] = row_id(made++);
        step(&B, n);
        if (bu_got_signal) die("build", "interrupted");
    }
    ps_server_checkpoint_wait(B.srv);
    ps_client_stats st0;
    stats(&B, &st0);
    const double per_row = (double)st0.row_bytes_written / (double)o->rows;
    printf("{\"bench\":\"rowckpt\",\"phase\":\"build\",\"rows\":%llu,\"dim\":%d,"
           "\"memory_mb\":%g,\"steps\":%lld,\"seconds\":%.1f,\"rows_in_memory\":%llu,"
           "\"row_store_mb_written\":%.1f,\"bytes_per_row_written\":%.1f,"
           "\"load1_start\":%.2f,\"load1_end\":%.2f}\n",
           (unsigned long long)st0.rows, o->dim, o->memory_mb, (long long)B.step,
           cm_now() - t0, (unsigned long long)st0.rows_resident,
           (double)st0.row_bytes_written / (1 << 20), per_row, load0, bu_load_average());
    fflush(stdout);

    /* 2. Checkpoints after 1 % and 10 % of the rows changed. */
    const double pct[2] = {1, 10};
    uint8_t *seen = cm_calloc((size_t)o->rows / 8 + 1, 1);
    cm_rng rng;
    cm_rng_init(&rng, 7);
    for (int k = 0; k < 2; k++) {
        memset(seen, 0, (size_t)o->rows / 8 + 1);
        const long long per_step = (long long)((double)o->rows * pct[k] / 100.0 / o->every) + 1;
        long long changed = 0;
        ps_client_stats a, z;
        stats(&B, &a);
        double l0 = bu_load_average();
        for (int s = 0; s < o->every; s++) {
            size_t n = 0;
            while ((long long)n < per_step) {
                long long i = (long long)(cm_rng_next(&rng) % (uint64_t)o->rows);
                if (seen[i / 8] & (1u << (i % 8))) continue;
                seen[i / 8] |= (uint8_t)(1u << (i % 8));
                B.ids[n++] = row_id(i);
                changed++;
            }
            step(&B, n);
        }
        ps_server_checkpoint_wait(B.srv);
        stats(&B, &z);
        printf("{\"bench\":\"rowckpt\",\"phase\":\"checkpoint\",\"changed_pct\":%g,"
               "\"rows\":%llu,\"rows_changed\":%lld,\"checkpoint_rows\":%llu,"
               "\"checkpoint_mb\":%.2f,\"interval_mb_written\":%.2f,"
               "\"interval_bytes_per_changed_row\":%.1f,\"full_table_mb\":%.1f,"
               "\"load1_start\":%.2f,\"load1_end\":%.2f}\n",
               pct[k], (unsigned long long)z.rows, changed, (unsigned long long)z.ckpt_rows,
               (double)z.ckpt_row_bytes / (1 << 20),
               (double)(z.row_bytes_written - a.row_bytes_written) / (1 << 20),
               (double)(z.row_bytes_written - a.row_bytes_written) / (double)changed,
               per_row * (double)z.rows / (1 << 20), l0, bu_load_average());
        fflush(stdout);
    }
    free(seen);
    const int64_t final_version = B.step;
    ps_client_close(B.cli);
    B.cli = NULL;
    ps_server_destroy(B.srv, 1000); /* A last checkpoint of the final version. */
    B.srv = NULL;

    /* 3. Restart: the real psserver on the directory. */
    int ports[2];
    if (bu_free_ports(ports, 2) != CM_OK) die("ports", "none free");
    char ps_hosts[64], wk_hosts[64], budget[32], every[32];
    snprintf(ps_hosts, sizeof ps_hosts, "127.0.0.1:%d", ports[0]);
    snprintf(wk_hosts, sizeof wk_hosts, "127.0.0.1:%d", ports[1]);
    snprintf(budget, sizeof budget, "%g", o->memory_mb);
    snprintf(every, sizeof every, "%d", o->every);
    char *argv_ps[] = {d.psserver, "--ps-hosts", ps_hosts, "--worker-hosts", wk_hosts,
                       "--task-index", "0", "--data-dir", tmp, "--checkpoint-every", every,
                       "--memory-mb", budget, NULL};
    /* Whatever the previous phases left in the page cache stays: the
     * table's files were just written, as on a shard restarted at once. */
    double l0 = bu_load_average();
    double s0 = cm_now();
    bu_child *ps = bu_spawn(&d, "psserver", argv_ps, 0, 0, err, sizeof err);
    if (!ps) die("psserver", err);
    while (!bu_port_accepts(ports[0])) {
        if (cm_now() - s0 > 60 || bu_got_signal) die("psserver", "not listening after 60 s");
        int status;
        if (bu_reap_by(&ps->pid, &status, cm_now())) die("psserver", "exited at start");
        usleep(500);
    }
    double s_listen = cm_now();
    open_client(&B, ps_hosts);
    ps_shard_checkpoints ck[1];
    if (ps_client_checkpoints(B.cli, -1, ck, err, sizeof err) != CM_OK) die("checkpoints", err);
    double s_ck = cm_now();
    if (ck[0].version != final_version) die("restart", "restored another version");
    if (ps_client_rollback(B.cli, ck[0].version, ck[0].epoch + 1, err, sizeof err) != CM_OK)
        die("rollback", err);
    double s_rb = cm_now();
    size_t np = (size_t)o->probe;
    uint64_t *pid = cm_malloc(np * sizeof *pid);
    for (size_t i = 0; i < np; i++) pid[i] = row_id((long long)(cm_rng_next(&rng) % (uint64_t)o->rows));
    /* Sorted, distinct: as a worker's batch asks. */
    qsort(pid, np, sizeof *pid, cmp_u64);
    size_t u = 0;
    for (size_t i = 0; i < np; i++)
        if (!u || pid[i] != pid[u - 1]) pid[u++] = pid[i];
    size_t begin[2] = {0, u};
    ps_row_keys want = {.ntables = 1, .tab_begin = begin, .ids = pid};
    float *vals = cm_malloc(u * (size_t)o->dim * sizeof(float));
    ps_ticket *t;
    if (ps_client_pull_rows(B.cli, ck[0].version, &want, vals, 0, &t) != CM_OK)
        die("pull", "refused");
    if (ps_ticket_wait(t, NULL, err, sizeof err) != CM_OK) die("pull", err);
    double s_rows = cm_now();
    ps_client_stats rs;
    stats(&B, &rs);
    const double disk = dir_bytes(rows_dir);
    ps_client_close(B.cli);
    B.cli = NULL;
    bu_stop_all(&d);
    double scan_s = 0;
    long long scanned = scan_all(rows_dir, &scan_s);
    printf("{\"bench\":\"rowckpt\",\"phase\":\"restart\",\"rows\":%llu,\"rows_on_disk_mb\":%.0f,"
           "\"version\":%lld,\"to_listening_ms\":%.1f,\"to_checkpoints_answered_ms\":%.1f,"
           "\"to_rolled_back_ms\":%.1f,\"to_first_rows_ms\":%.1f,\"rows_pulled\":%zu,"
           "\"rows_in_memory_after\":%llu,\"reference_full_scan_ms\":%.0f,"
           "\"reference_entries\":%lld,\"load1_start\":%.2f,\"load1_end\":%.2f}\n",
           (unsigned long long)rs.rows, disk / (1 << 20), (long long)ck[0].version,
           (s_listen - s0) * 1e3, (s_ck - s0) * 1e3, (s_rb - s0) * 1e3, (s_rows - s0) * 1e3, u,
           (unsigned long long)rs.rows_resident, scan_s * 1e3, scanned, l0, bu_load_average());
    fflush(stdout);
    free(pid);
    free(vals);
    free(B.grad);
    free(B.params);
    free(B.ids);
    free(B.rgrad);
    cm_placement_destroy(B.pl);
    cm_model_destroy(B.m);
    if (!o->dir) {
        st_rowdb_remove(rows_dir);
        st_rowdb_remove(shard_dir); /* Also a LevelDB directory. */
        rmdir(tmp);
    }
    return 0;
}
