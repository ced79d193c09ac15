/* rowbench.c - a shard's embedding rows beyond memory: rows/s of training
 * batches with the table at 1x, 4x and 10x the row budget, against the
 * same batches with every row in memory and against raw LevelDB random
 * reads of the same keys, all in the same run.
 * SPDX-License-Identifier: MIT
 *
 * The shard-side work of a training step on rows, in one process: a batch
 * of U unique ids per step (Zipf(s) over an id space, deduplicated, as a
 * worker's batch), read for training (creating missing rows) and then
 * updated with one Adagrad step (ps_rows_read + ps_rows_apply, the code a
 * PS shard runs under its lock). First with every row in memory: that run
 * also counts the rows the steps touch, T, and their bytes; then, for each
 * ratio k, a store with a budget of T's bytes / k over a fresh row store
 * (storage/st_rowdb) runs the same steps. Reported per ratio: rows/s (read
 * + update of a row counts once), its ratio to the in-memory run, the
 * cache's hit rate, rows read back and evicted, bytes written, and the
 * check that every row ends bit-identical to the in-memory run's.
 *
 * The reference: raw LevelDB (its C API, the row store's sizes, 12-byte
 * keys of (table, id) without versions, a 10-bit bloom filter) holding all
 * T rows, read back with leveldb_get in the order the steps asked for
 * them, from the page cache: the rate a store that read every row from
 * LevelDB would have at best.
 *
 * Output: one JSON line per configuration, with the load average before
 * and after (the figures mean something only on a quiet machine).
 */
#include <getopt.h>
#include <leveldb/c.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench_util.h"
#include "common/cm_mem.h"
#include "common/cm_model.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "ps/ps_optim.h"
#include "ps/ps_rows.h"
#include "tools/ctr_planted.h"
#include "storage/st_rowdb.h"

#define SEED 20261204u

typedef struct opts {
    int dim, rows, steps;
    long long ids;
    double zipf;
    const char *ratios, *dir;
    st_rowdb_opts db; /* LevelDB's sizes, for the row stores and the reference. */
} opts;

/* Step s's unique ids (a pure function of the seed and s) into ids;
 * set: scratch of cap (a power of two >= 2 x rows) entries. */
static void step_ids(const opts *o, const ctr_zipf *z, int step, uint64_t *ids, uint64_t *set,
                     size_t cap) {
    uint64_t counter = (uint64_t)step << 32;
    memset(set, 0, cap * sizeof *set);
    int n = 0;
    while (n < o->rows) {
        /* Scrambled so that popular ids are not small numbers; +1 keeps 0
         * free as the set's empty mark. */
        uint64_t id = (ctr_zipf_draw(z, SEED, &counter) + 1) * 0x9E3779B97F4A7C15ull;
        size_t i = (size_t)cm_mix64(id) & (cap - 1);
        while (set[i] && set[i] != id) i = (i + 1) & (cap - 1);
        if (set[i]) continue;
        set[i] = id;
        ids[n++] = id;
    }
}

static cm_model *make_model(int dim) {
    cm_var v[2];
    memset(v, 0, sizeof v);
    snprintf(v[0].name, sizeof v[0].name, "bias");
    v[0].kind = CM_VAR_DENSE;
    v[0].ndims = 1;
    v[0].dims[0] = 1;
    snprintf(v[1].name, sizeof v[1].name, "emb");
    v[1].kind = CM_VAR_TABLE;
    v[1].ndims = 1;
    v[1].dims[0] = dim;
    v[1].dim = dim;
    v[1].init = CM_INIT_UNIFORM;
    v[1].init_scale = 0.05f;
    cm_model *m = NULL;
    char err[256];
    if (cm_model_create_from_vars("rowbench", v, 2, &m, err, sizeof err) != CM_OK) {
        fprintf(stderr, "rowbench: %s\n", err);
        exit(1);
    }
    return m;
}

/* The steps on r; returns the seconds they took. Gradients: a pure
 * function of (step, position). */
static double run_steps(const opts *o, ps_rows *r, uint64_t *const *ids, float *out, float *g) {
    double t0 = cm_now();
    for (int s = 0; s < o->steps; s++) {
        ps_rows_read(r, 0, ids[s], (size_t)o->rows, 1, out);
        for (size_t i = 0; i < (size_t)o->rows * (size_t)o->dim; i++)
            g[i] = cm_randf(SEED + 1, ((uint64_t)s << 32) + i) - 0.5f;
        ps_rows_apply(r, 0, ids[s], (size_t)o->rows, g, 1.0f);
    }
    return cm_now() - t0;
}

/* The eviction policy's alternative, simulated on the same trace: exact
 * LRU over 'cap' rows (a row's first use in a step is a hit if it is among
 * the cap rows used last), evicting at every insert. Returns the hit rate
 * of first uses, comparable with 1 - misses / lookups of the read pass of
 * ps_rows (CLOCK; its update pass only hits). */
typedef struct lru {
    uint64_t *key;   /* Map: open addressing, 0 = empty (ids here are never 0). */
    uint32_t *slot;  /* The node of key[i]. */
    size_t mask;
    uint64_t *id;    /* Nodes: id, and a doubly linked list, head = newest. */
    uint32_t *prev, *next;
    uint32_t head, tail, n, cap;
} lru;

#define LRU_NIL UINT32_MAX

static size_t lru_find(const lru *l, uint64_t id) {
    size_t i = (size_t)cm_mix64(id) & l->mask;
    while (l->key[i] && l->key[i] != id) i = (i + 1) & l->mask;
    return i;
}

static void lru_unlink(lru *l, uint32_t x) {
    if (l->prev[x] != LRU_NIL) l->next[l->prev[x]] = l->next[x]; else l->head = l->next[x];
    if (l->next[x] != LRU_NIL) l->prev[l->next[x]] = l->prev[x]; else l->tail = l->prev[x];
}

static void lru_push(lru *l, uint32_t x) {
    l->prev[x] = LRU_NIL;
    l->next[x] = l->head;
    if (l->head != LRU_NIL) l->prev[l->head] = x; else l->tail = x;
    l->head = x;
}

/* Remove map entry i (backward shift, as ps_rows does). */
static void lru_map_delete(lru *l, size_t i) {
    size_t j = i;
    for (;;) {
        j = (j + 1) & l->mask;
        if (!l->key[j]) break;
        size_t k = (size_t)cm_mix64(l->key[j]) & l->mask;
        int stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (!stays) {
            l->key[i] = l->key[j];
            l->slot[i] = l->slot[j];
            i = j;
        }
    }
    l->key[i] = 0;
}

static double lru_hit_rate(const opts *o, uint64_t *const *ids, size_t cap) {
    lru l = {.cap = (uint32_t)(cap ? cap : 1), .head = LRU_NIL, .tail = LRU_NIL};
    size_t m = 16;
    while (m < 2 * (size_t)l.cap) m *= 2;
    l.key = cm_calloc(m, sizeof *l.key);
    l.slot = cm_malloc(m * sizeof *l.slot);
    l.mask = m - 1;
    l.id = cm_malloc(l.cap * sizeof *l.id);
    l.prev = cm_malloc(l.cap * sizeof *l.prev);
    l.next = cm_malloc(l.cap * sizeof *l.next);
    uint64_t hits = 0, looks = 0;
    for (int s = 0; s < o->steps; s++)
        for (int i = 0; i < o->rows; i++) {
            uint64_t id = ids[s][i];
            size_t at = lru_find(&l, id);
            looks++;
            if (l.key[at]) {
                hits++;
                lru_unlink(&l, l.slot[at]);
                lru_push(&l, l.slot[at]);
                continue;
            }
            uint32_t x;
            if (l.n < l.cap) {
                x = l.n++;
            } else {
                x = l.tail;
                lru_unlink(&l, x);
                lru_map_delete(&l, lru_find(&l, l.id[x]));
                at = lru_find(&l, id);
            }
            l.id[x] = id;
            l.key[at] = id;
            l.slot[at] = x;
            lru_push(&l, x);
        }
    free(l.key);
    free(l.slot);
    free(l.id);
    free(l.prev);
    free(l.next);
    return (double)hits / (double)looks;
}

/* Bit-identical rows (a visit of one against finds in the other). */
typedef struct cmp_ctx {
    ps_rows *other;
    int dim, nslots;
    size_t seen, differ;
} cmp_ctx;

static int cmp_row(void *ud, uint64_t id, const float *values, const float *slots,
                   int64_t count) {
    cmp_ctx *c = ud;
    int64_t oc = -1;
    const float *o = ps_rows_find(c->other, 0, id, &oc);
    c->seen++;
    if (!o || oc != count || memcmp(o, values, (size_t)c->dim * sizeof(float)) != 0 ||
        memcmp(o + c->dim, slots, (size_t)c->dim * (size_t)c->nslots * sizeof(float)) != 0)
        c->differ++;
    return CM_OK;
}

/* The raw LevelDB reference: every row of 'ref' into a LevelDB at dir
 * (the row store's options and keys), then gets in the steps' order.
 * Returns gets/s. */
typedef struct raw_fill {
    leveldb_t *db;
    leveldb_writeoptions_t *wo;
    leveldb_writebatch_t *b;
    size_t stride, pending;
    uint8_t *val;
} raw_fill;

/* The reference's keys: (table 0, id), 12 bytes big-endian, no version. */
#define RAW_KEY 12
static void raw_key(uint64_t id, uint8_t key[RAW_KEY]) {
    memset(key, 0, 4);
    for (int i = 0; i < 8; i++) key[4 + i] = (uint8_t)(id >> (56 - 8 * i));
}

static int raw_put(void *ud, uint64_t id, const float *values, const float *slots,
                   int64_t count) {
    raw_fill *f = ud;
    uint8_t key[RAW_KEY];
    raw_key(id, key);
    size_t dim = f->stride / 2;
    memcpy(f->val, &count, 8);
    memcpy(f->val + 8, values, dim * sizeof(float));
    memcpy(f->val + 8 + dim * sizeof(float), slots, dim * sizeof(float));
    leveldb_writebatch_put(f->b, (const char *)key, sizeof key, (const char *)f->val,
                           8 + f->stride * sizeof(float));
    if (++f->pending == 4096) {
        char *err = NULL;
        leveldb_write(f->db, f->wo, f->b, &err);
        if (err) {
            fprintf(stderr, "rowbench: leveldb: %s\n", err);
            exit(1);
        }
        leveldb_writebatch_clear(f->b);
        f->pending = 0;
    }
    return CM_OK;
}

static double raw_leveldb(const opts *o, ps_rows *ref, const char *dir, uint64_t *const *ids,
                          size_t *found) {
    leveldb_options_t *opt = leveldb_options_create();
    leveldb_options_set_create_if_missing(opt, 1);
    leveldb_options_set_write_buffer_size(opt, o->db.write_buffer);
    leveldb_options_set_max_file_size(opt, o->db.max_file);
    leveldb_options_set_compression(opt, leveldb_no_compression);
    leveldb_filterpolicy_t *fp = leveldb_filterpolicy_create_bloom(10);
    leveldb_options_set_filter_policy(opt, fp);
    leveldb_cache_t *cache = leveldb_cache_create_lru(o->db.block_cache);
    leveldb_options_set_cache(opt, cache);
    char *err = NULL;
    leveldb_destroy_db(opt, dir, &err);
    leveldb_free(err);
    err = NULL;
    leveldb_t *db = leveldb_open(opt, dir, &err);
    if (!db) {
        fprintf(stderr, "rowbench: cannot open %s: %s\n", dir, err);
        exit(1);
    }
    raw_fill f = {.db = db, .wo = leveldb_writeoptions_create(), .b = leveldb_writebatch_create(),
                  .stride = 2 * (size_t)o->dim};
    f.val = cm_malloc(8 + f.stride * sizeof(float));
    ps_rows_visit(ref, 0, raw_put, &f);
    leveldb_write(db, f.wo, f.b, &err);
    leveldb_readoptions_t *ro = leveldb_readoptions_create();
    size_t hits = 0;
    double t0 = cm_now();
    for (int s = 0; s < o->steps; s++)
        for (int i = 0; i < o->rows; i++) {
            uint8_t key[RAW_KEY];
            raw_key(ids[s][i], key);
            size_t n = 0;
            char *v = leveldb_get(db, ro, (const char *)key, sizeof key, &n, &err);
            hits += v != NULL;
            leveldb_free(v);
        }
    double dt = cm_now() - t0;
    *found = hits;
    leveldb_readoptions_destroy(ro);
    leveldb_writebatch_destroy(f.b);
    leveldb_writeoptions_destroy(f.wo);
    free(f.val);
    leveldb_close(db);
    leveldb_destroy_db(opt, dir, &err);
    leveldb_free(err);
    leveldb_options_destroy(opt);
    leveldb_cache_destroy(cache);
    leveldb_filterpolicy_destroy(fp);
    return (double)o->steps * o->rows / dt;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: rowbench [options]\n"
            "  --dim D          floats per row (default 16; Adagrad adds D slots)\n"
            "  --rows U         unique ids per step (default 4096)\n"
            "  --steps N        steps (default 400)\n"
            "  --ids N          id space (default 4000000)\n"
            "  --zipf S         Zipf exponent of the ids (default 1.05)\n"
            "  --ratios LIST    table / budget ratios (default 1,4,10)\n"
            "  --dir DIR        where the row stores go (default: a directory under $TMPDIR)\n"
            "  --write-buffer-mb N, --block-cache-mb N, --max-file-mb N\n"
            "                   LevelDB's sizes (default: the row store's, 4, 8, 16)\n"
            "  --quick          a few seconds (smoke test)\n");
}

int main(int argc, char **argv) {
    opts o = {.dim = 16, .rows = 4096, .steps = 400, .ids = 4000000, .zipf = 1.05,
              .ratios = "1,4,10",
              .db = {.write_buffer = ST_ROWDB_WRITE_BUFFER,
                     .block_cache = ST_ROWDB_BLOCK_CACHE,
                     .max_file = ST_ROWDB_MAX_FILE}};
    static const struct option lo[] = {
        {"dim", required_argument, 0, 'd'},   {"rows", required_argument, 0, 'u'},
        {"steps", required_argument, 0, 's'}, {"ids", required_argument, 0, 'n'},
        {"zipf", required_argument, 0, 'z'},  {"ratios", required_argument, 0, 'r'},
        {"dir", required_argument, 0, 'D'},   {"quick", no_argument, 0, 'q'},
        {"write-buffer-mb", required_argument, 0, 'B'},
        {"block-cache-mb", required_argument, 0, 'C'},
        {"max-file-mb", required_argument, 0, 'F'},
        {"help", no_argument, 0, 'h'},        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'd': o.dim = atoi(optarg); break;
        case 'u': o.rows = atoi(optarg); break;
        case 's': o.steps = atoi(optarg); break;
        case 'n': o.ids = atoll(optarg); break;
        case 'z': o.zipf = atof(optarg); break;
        case 'r': o.ratios = optarg; break;
        case 'D': o.dir = optarg; break;
        case 'B': o.db.write_buffer = (size_t)atoi(optarg) << 20; break;
        case 'C': o.db.block_cache = (size_t)atoi(optarg) << 20; break;
        case 'F': o.db.max_file = (size_t)atoi(optarg) << 20; break;
        case 'q': o.steps = 40, o.rows = 1024, o.ids = 200000; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc || o.dim < 1 || o.dim > 1024 || o.rows < 1 || o.rows > 1 << 20 ||
        o.steps < 1 || o.ids < 1 || !(o.zipf > 0.0 && o.zipf < 10.0) || !o.db.write_buffer ||
        !o.db.block_cache || !o.db.max_file) {
        fprintf(stderr, "rowbench: bad arguments (see --help)\n");
        return 2;
    }
    char *copy, *list[16];
    int nr = bu_split_list(o.ratios, &copy, list, 16);
    if (nr < 1) {
        fprintf(stderr, "rowbench: --ratios: a comma-separated list of numbers\n");
        return 2;
    }
    char tmp[512];
    if (o.dir) {
        snprintf(tmp, sizeof tmp, "%s", o.dir);
    } else {
        const char *t = getenv("TMPDIR");
        snprintf(tmp, sizeof tmp, "%s/rowbench.XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(tmp)) {
            perror("rowbench: mkdtemp");
            return 1;
        }
    }
    ctr_zipf z;
    ctr_zipf_init(&z, (uint64_t)o.ids, o.zipf);
    uint64_t **ids = cm_malloc((size_t)o.steps * sizeof *ids);
    size_t cap = 16;
    while (cap < 2 * (size_t)o.rows) cap <<= 1;
    uint64_t *set = cm_malloc(cap * sizeof *set);
    for (int s = 0; s < o.steps; s++) {
        ids[s] = cm_malloc((size_t)o.rows * sizeof **ids);
        step_ids(&o, &z, s, ids[s], set, cap);
    }
    free(set);
    size_t nf = (size_t)o.rows * (size_t)o.dim;
    float *out = cm_malloc(nf * sizeof *out), *g = cm_malloc(nf * sizeof *g);
    cm_model *m = make_model(o.dim);
    ps_optim_cfg oc = ps_optim_defaults(PS_OPTIM_ADAGRAD, 0.05f);

    double load0 = bu_load_average();
    ps_rows *ref = ps_rows_create(m, &oc, SEED);
    double t_mem = run_steps(&o, ref, ids, out, g);
    const double mem_rps = (double)o.steps * o.rows / t_mem;
    const size_t total = ps_rows_total(ref);
    const size_t row_cost = (size_t)o.dim * 2 * sizeof(float) + 17 + 32;
    const double table_mb = (double)total * (double)row_cost / (1 << 20);
    char raw_dir[600];
    snprintf(raw_dir, sizeof raw_dir, "%s/raw", tmp);
    size_t found = 0;
    double raw_gps = raw_leveldb(&o, ref, raw_dir, ids, &found);
    printf("{\"bench\":\"rowbench\",\"config\":\"in_memory\",\"dim\":%d,\"rows_per_step\":%d,"
           "\"steps\":%d,\"ids\":%lld,\"zipf\":%g,\"table_rows\":%zu,\"table_mb\":%.2f,"
           "\"write_buffer_mb\":%zu,\"block_cache_mb\":%zu,\"max_file_mb\":%zu,"
           "\"rows_per_sec\":%.0f,\"leveldb_gets_per_sec\":%.0f,\"leveldb_found\":%zu,"
           "\"load1_start\":%.2f,\"load1_end\":%.2f}\n",
           o.dim, o.rows, o.steps, o.ids, o.zipf, total, table_mb, o.db.write_buffer >> 20,
           o.db.block_cache >> 20, o.db.max_file >> 20, mem_rps, raw_gps, found,
           load0, bu_load_average());
    fflush(stdout);
    int failed = 0;
    for (int k = 0; k < nr; k++) {
        double ratio = atof(list[k]);
        if (!(ratio >= 1.0)) {
            fprintf(stderr, "rowbench: --ratios: %s is not >= 1\n", list[k]);
            return 2;
        }
        char dir[600], err[512];
        snprintf(dir, sizeof dir, "%s/rows", tmp);
        st_rowdb *db;
        if (st_rowdb_open_with(dir, &o.db, &db, err, sizeof err) != CM_OK) {
            fprintf(stderr, "rowbench: %s\n", err);
            return 1;
        }
        ps_rows *r = ps_rows_create(m, &oc, SEED);
        size_t budget = (size_t)((double)total * (double)row_cost / ratio);
        ps_rows_set_spill(r, db, budget);
        double l0 = bu_load_average();
        double t = run_steps(&o, r, ids, out, g);
        double l1 = bu_load_average();
        ps_rows_spill_stats st;
        ps_rows_spill_stats_get(r, &st);
        cmp_ctx cc = {.other = r, .dim = o.dim, .nslots = 1};
        ps_rows_visit(ref, 0, cmp_row, &cc);
        int ok = cc.differ == 0 && cc.seen == total && ps_rows_total(r) == total &&
                 st.resident_bytes <= budget;
        failed += !ok;
        const double rps = (double)o.steps * o.rows / t;
        /* The read pass's misses are every miss (the update pass finds the
         * rows it just read). */
        const double first = 1.0 - (double)st.misses / ((double)o.steps * o.rows);
        const double lru_rate = lru_hit_rate(&o, ids, budget / row_cost);
        printf("{\"bench\":\"rowbench\",\"config\":\"budget\",\"ratio\":%g,\"budget_mb\":%.3f,"
               "\"table_mb\":%.2f,\"rows_per_sec\":%.0f,\"ratio_to_in_memory\":%.3f,"
               "\"ratio_to_leveldb_gets\":%.3f,\"hit_rate\":%.4f,\"loads\":%llu,"
               "\"evictions\":%llu,\"mb_written\":%.1f,\"resident_rows\":%llu,"
               "\"clock_first_use_hit_rate\":%.4f,\"lru_first_use_hit_rate\":%.4f,"
               "\"load1_start\":%.2f,\"load1_end\":%.2f,\"check\":\"%s\"}\n",
               ratio, (double)budget / (1 << 20), table_mb, rps, rps / mem_rps, rps / raw_gps,
               (double)st.hits / (double)(st.hits + st.misses), (unsigned long long)st.loads,
               (unsigned long long)st.evictions, (double)st.bytes_written / (1 << 20),
               (unsigned long long)st.resident, first, lru_rate, l0, l1,
               ok ? "ok" : "rows differ from the in-memory run");
        fflush(stdout);
        ps_rows_destroy(r);
        st_rowdb_close(db);
        st_rowdb_remove(dir);
    }
    ps_rows_destroy(ref);
    cm_model_destroy(m);
    for (int s = 0; s < o.steps; s++) free(ids[s]);
    free(ids);
    free(out);
    free(g);
    free(copy);
    if (!o.dir) rmdir(tmp);
    return failed ? 1 : 0;
}
