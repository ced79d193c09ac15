/* ctr_planted.c - the planted CTR model, its data generator and metadata (see ctr_planted.h).
 * SPDX-License-Identifier: MIT
 *
 * Everything random is a counter-based draw (common/cm_rng.h) keyed by
 * the seed and what is being drawn, so a row, a weight or a rank's value
 * never depends on the order of generation, and the model needs no
 * memory however large the vocabularies.
 */
#include "tools/ctr_planted.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/cm_auc.h"
#include "common/cm_mem.h"
#include "common/cm_rng.h"
#include "common/cm_status.h"

#define NINT WK_CRITEO_NINT
#define NCAT WK_CRITEO_NCAT
#define NFIELDS WK_CRITEO_NFIELDS
#define CALIBRATION_ROWS 20000
#define PROGRESS_EVERY 100000

/* Stream tags: what a key draws, mixed into the seed. */
enum { TAG_ROW = 1, TAG_PERM, TAG_WEIGHT, TAG_NORMAL };

struct ctr_planted {
    ctr_knobs k;
    double b0;
    uint64_t row_key[3];        /* per split */
    uint64_t perm_key[NCAT];    /* perm_j */
    uint64_t weight_key[NFIELDS];
    uint64_t mix_inv[2];        /* inverses of cm_mix64's multipliers */
    uint32_t zig_k[128];        /* the ziggurat's tables (normal_draw) */
    double zig_w[128], zig_f[128];
    ctr_zipf zipf[NCAT];
    double cat_missing[NCAT];
    double int_mu[NINT], int_sigma[NINT], int_missing[NINT];
};

void ctr_knobs_default(ctr_knobs *k) {
    *k = (ctr_knobs){.seed = 1,
                     .train_rows = 2000000,
                     .test_rows = 200000,
                     .vocab_min = 4,
                     .vocab_max = 3000000,
                     .zipf_min = 1.05,
                     .zipf_max = 1.3,
                     .cat_missing = 0.04,
                     .int_missing = 0.1,
                     .int_negative = 0.02,
                     .k = 4,
                     .sigma_w = 0.23,
                     .sigma_v = 0.14,
                     .rank_scale = 30,
                     .tail_decay = 1.0,
                     .pos_rate = 0.25};
}

/* ===== Random draws ===== */

static uint64_t key_of(uint64_t seed, uint64_t tag, uint64_t what) {
    return cm_mix64(cm_mix64(seed ^ cm_mix64(tag)) ^ what);
}

/* Uniform in [0, 1) with 53 bits. */
static double unif(uint64_t key, uint64_t *c) {
    return (double)(cm_rand64(key, (*c)++) >> 11) * 0x1p-53;
}

/* N(0, 1) by Marsaglia and Tsang's ziggurat (128 layers), from stream
 * 'key' at counters *c, *c + 1, ... About 99% of draws take one 64-bit
 * word and a multiplication; Box-Muller's log and sincos made up half of
 * the generation time. Layer and value come from separate bits of the
 * word (the 2000 paper's shared low bits correlate them). */
static void ziggurat_init(ctr_planted *m) {
    const double m1 = 2147483648.0, vn = 9.91256303526217e-3;
    double dn = 3.442619855899, tn = dn;
    double q = vn / exp(-0.5 * dn * dn);
    m->zig_k[0] = (uint32_t)((dn / q) * m1);
    m->zig_k[1] = 0;
    m->zig_w[0] = q / m1;
    m->zig_w[127] = dn / m1;
    m->zig_f[0] = 1.0;
    m->zig_f[127] = exp(-0.5 * dn * dn);
    for (int i = 126; i >= 1; i--) {
        dn = sqrt(-2.0 * log(vn / dn + exp(-0.5 * dn * dn)));
        m->zig_k[i + 1] = (uint32_t)((dn / tn) * m1);
        tn = dn;
        m->zig_f[i] = exp(-0.5 * dn * dn);
        m->zig_w[i] = dn / m1;
    }
}

static double normal_draw(const ctr_planted *m, uint64_t key, uint64_t *c) {
    const double r = 3.442619855899; /* where the base layer's tail starts */
    for (;;) {
        uint64_t w = cm_rand64(key, (*c)++);
        int iz = (int)(w & 127);
        int32_t hz = (int32_t)(uint32_t)(w >> 32);
        uint32_t mag = hz < 0 ? 0u - (uint32_t)hz : (uint32_t)hz;
        double x = hz * m->zig_w[iz];
        if (mag < m->zig_k[iz]) return x;
        if (iz == 0) {
            /* The tail beyond r (Marsaglia 1964). */
            double xt, y;
            do {
                xt = -log1p(-unif(key, c)) / r;
                y = -log1p(-unif(key, c));
            } while (y + y < xt * xt);
            return hz > 0 ? r + xt : -r - xt;
        }
        /* A wedge: accept under the density, else draw again. */
        if (m->zig_f[iz] + unif(key, c) * (m->zig_f[iz - 1] - m->zig_f[iz]) < exp(-0.5 * x * x))
            return x;
    }
}

/* ===== Zipf by rejection-inversion ===== */

/* log1p(x) / x and expm1(x) / x, continuous at 0. */
static double helper1(double x) {
    return fabs(x) > 1e-8 ? log1p(x) / x : 1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x));
}
static double helper2(double x) {
    return fabs(x) > 1e-8 ? expm1(x) / x : 1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x));
}
/* h(x) = x^-s and H, an antiderivative of it, and H's inverse. */
static double zipf_h(double s, double x) { return exp(-s * log(x)); }
static double zipf_H(double s, double x) {
    double lx = log(x);
    return helper2((1.0 - s) * lx) * lx;
}
static double zipf_Hinv(double s, double x) {
    double t = x * (1.0 - s);
    if (t < -1.0) t = -1.0;
    return exp(helper1(t) * x);
}

void ctr_zipf_init(ctr_zipf *z, uint64_t n, double s) {
    z->n = n;
    z->s = s;
    z->h_x1 = zipf_H(s, 1.5) - 1.0;
    z->h_n = zipf_H(s, (double)n + 0.5);
    z->cut = 2.0 - zipf_Hinv(s, zipf_H(s, 2.5) - zipf_h(s, 2.0));
}

/* Ranks k = 1..n with P(k) ~ k^-s are drawn by inverting H on a uniform
 * over [H(1.5) - 1, H(n + 0.5)] and accepting k when the point falls under
 * the histogram of h (the area of bar k is h(k)); the cheap first test
 * accepts most draws without evaluating H again. */
uint64_t ctr_zipf_draw(const ctr_zipf *z, uint64_t key, uint64_t *counter) {
    for (;;) {
        double u = z->h_n + unif(key, counter) * (z->h_x1 - z->h_n);
        double x = zipf_Hinv(z->s, u);
        double kd = floor(x + 0.5);
        if (kd < 1.0) kd = 1.0;
        if (kd > (double)z->n) kd = (double)z->n;
        if (kd - x <= z->cut || u >= zipf_H(z->s, kd + 0.5) - zipf_h(z->s, kd))
            return (uint64_t)kd - 1;
    }
}

/* ===== Values and ranks ===== */

/* A 4-round Feistel network on 16-bit halves: a bijection of 32-bit
 * values for any key, inverted by running the rounds backwards. */
static uint32_t feistel_round(uint64_t key, int i, uint32_t half) {
    return (uint32_t)(cm_mix64(key ^ ((uint64_t)i << 32) ^ half) & 0xffff);
}

uint32_t ctr_planted_value(const ctr_planted *m, int j, uint32_t rank) {
    uint32_t l = rank >> 16, r = rank & 0xffff;
    for (int i = 0; i < 4; i++) {
        uint32_t t = r;
        r = l ^ feistel_round(m->perm_key[j], i, r);
        l = t;
    }
    return l << 16 | r;
}

uint32_t ctr_planted_rank(const ctr_planted *m, int j, uint32_t value) {
    uint32_t l = value >> 16, r = value & 0xffff;
    for (int i = 3; i >= 0; i--) {
        uint32_t t = l;
        l = r ^ feistel_round(m->perm_key[j], i, l);
        r = t;
    }
    return l << 16 | r;
}

/* cm_mix64 inverted: its xor-shifts and odd multiplications undone in
 * reverse order. */
static uint64_t unshift(uint64_t y, int s) {
    uint64_t x = y;
    for (int i = s; i < 64; i += s) x = y ^ (x >> s);
    return x;
}
static uint64_t inverse_odd(uint64_t a) {
    uint64_t x = a; /* correct to 3 bits; each Newton step doubles that */
    for (int i = 0; i < 5; i++) x *= 2 - a * x;
    return x;
}
static uint64_t unmix64(const ctr_planted *m, uint64_t x) {
    x = unshift(x, 31) * m->mix_inv[1];
    x = unshift(x, 27) * m->mix_inv[0];
    return unshift(x, 30) - 0x9e3779b97f4a7c15ULL;
}

/* The weight scale g of categorical field j's id (see the header). */
static double tail_scale(const ctr_planted *m, int j, uint64_t id) {
    if (id == 0 || m->k.tail_decay == 0) return 1.0;
    uint64_t x = unmix64(m, id) ^ cm_mix64((uint64_t)(NINT + j) + 1);
    /* Not a value this generator writes: the far end of the tail. */
    double rank = (x >> 32) ? 4294967296.0 : ctr_planted_rank(m, j, (uint32_t)x);
    return pow(1.0 + rank / m->k.rank_scale, -m->k.tail_decay);
}

/* ===== The model ===== */

double ctr_planted_logit(const ctr_planted *m, const uint64_t *ids, double *first_order) {
    const int k = m->k.k;
    double fo = m->b0, sum[CTR_K_MAX] = {0}, sumsq = 0.0;
    double z[CTR_K_MAX + 1];
    for (int f = 0; f < NFIELDS; f++) {
        double g = f < NINT ? 1.0 : tail_scale(m, f - NINT, ids[f]);
        uint64_t key = cm_rand64(m->weight_key[f], ids[f]), c = 0;
        for (int i = 0; i <= k; i++) z[i] = normal_draw(m, key, &c);
        fo += m->k.sigma_w * g * z[0];
        double sv = m->k.sigma_v * g;
        for (int j = 0; j < k; j++) {
            double u = sv * z[1 + j];
            sum[j] += u;
            sumsq += u * u;
        }
    }
    /* sum_{f<g} <u_f, u_g> = (|sum_f u_f|^2 - sum_f |u_f|^2) / 2 */
    double pair = -sumsq;
    for (int j = 0; j < k; j++) pair += sum[j] * sum[j];
    if (first_order) *first_order = fo;
    return fo + 0.5 * pair;
}

static double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }

int ctr_planted_int_has_negatives(int i) { return i == 1 || i == 9; }

void ctr_planted_example(const ctr_planted *m, int split, uint64_t row, ctr_example *ex) {
    const uint64_t key = cm_rand64(m->row_key[split], row);
    /* Normals from a stream of their own: the ziggurat's draws per value
     * vary, and the others' counters should not move with them. */
    const uint64_t nkey = cm_mix64(key ^ TAG_NORMAL);
    uint64_t c = 0, nc = 0;
    ex->missing = 0;
    for (int f = 0; f < NINT; f++) {
        int miss = unif(key, &c) < m->int_missing[f];
        int64_t v = 0;
        if (miss) {
            ex->missing |= (uint64_t)1 << f;
        } else if (ctr_planted_int_has_negatives(f) && unif(key, &c) < m->k.int_negative) {
            v = -1 - (int64_t)(cm_rand64(key, c++) & 1);
        } else {
            double z = normal_draw(m, nkey, &nc);
            double x = floor(exp(m->int_mu[f] + m->int_sigma[f] * z)) - 1.0;
            v = x < 0 ? 0 : x > 1e15 ? (int64_t)1e15 : (int64_t)x;
        }
        ex->ints[f] = v;
        ex->ids[f] = wk_criteo_int_id(v, miss);
    }
    for (int j = 0; j < NCAT; j++) {
        int f = NINT + j;
        int miss = unif(key, &c) < m->cat_missing[j];
        uint32_t x = 0;
        if (miss)
            ex->missing |= (uint64_t)1 << f;
        else
            x = ctr_planted_value(m, j, (uint32_t)ctr_zipf_draw(&m->zipf[j], key, &c));
        ex->cats[j] = x;
        ex->ids[f] = wk_criteo_cat_id(f, x, miss);
    }
    ex->logit = ctr_planted_logit(m, ex->ids, &ex->first_order);
    ex->label = unif(key, &c) < sigmoid(ex->logit);
}

size_t ctr_format_line(const ctr_example *ex, char *buf) {
    static const char hex[] = "0123456789abcdef";
    char *p = buf;
    *p++ = (char)('0' + ex->label);
    for (int i = 0; i < NINT; i++) {
        *p++ = '\t';
        if (ex->missing >> i & 1) continue;
        int64_t v = ex->ints[i];
        if (v < 0) *p++ = '-';
        uint64_t a = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
        char tmp[24];
        int n = 0;
        do {
            tmp[n++] = (char)('0' + a % 10);
            a /= 10;
        } while (a);
        while (n) *p++ = tmp[--n];
    }
    for (int j = 0; j < NCAT; j++) {
        *p++ = '\t';
        if (ex->missing >> (NINT + j) & 1) continue;
        for (int s = 28; s >= 0; s -= 4) *p++ = hex[(ex->cats[j] >> s) & 0xf];
    }
    *p++ = '\n';
    return (size_t)(p - buf);
}

/* ===== Creation ===== */

static int check_knobs(const ctr_knobs *k, char *err, size_t errlen) {
#define BAD(cond, ...)                          \
    if (cond) {                                 \
        cm_seterr(err, errlen, __VA_ARGS__);    \
        return CM_EINVAL;                       \
    }
    BAD(k->seed > INT64_MAX, "seed %llu: must be below 2^63", (unsigned long long)k->seed);
    BAD(k->train_rows > ((uint64_t)1 << 40) || k->test_rows > ((uint64_t)1 << 31),
        "too many rows (train at most 2^40, test at most 2^31)");
    BAD(!(k->vocab_min >= 1 && k->vocab_max >= k->vocab_min && k->vocab_max < 4294967296.0),
        "vocabularies: need 1 <= vocab_min <= vocab_max < 2^32 (got %g, %g)", k->vocab_min,
        k->vocab_max);
    BAD(!(k->zipf_min > 0 && k->zipf_max >= k->zipf_min && k->zipf_max <= 10),
        "zipf exponents: need 0 < zipf_min <= zipf_max <= 10 (got %g, %g)", k->zipf_min,
        k->zipf_max);
    BAD(!(k->cat_missing >= 0 && k->cat_missing <= 1), "cat_missing %g: not in [0, 1]",
        k->cat_missing);
    BAD(!(k->int_missing >= 0 && k->int_missing <= 0.5), "int_missing %g: not in [0, 0.5]",
        k->int_missing);
    BAD(!(k->int_negative >= 0 && k->int_negative <= 1), "int_negative %g: not in [0, 1]",
        k->int_negative);
    BAD(k->k < 1 || k->k > CTR_K_MAX, "k %d: not in [1, %d]", k->k, CTR_K_MAX);
    BAD(!(k->sigma_w >= 0 && k->sigma_w <= 100 && k->sigma_v >= 0 && k->sigma_v <= 100),
        "sigma_w, sigma_v: need 0..100 (got %g, %g)", k->sigma_w, k->sigma_v);
    BAD(!(k->rank_scale > 0) || !(k->tail_decay >= 0 && k->tail_decay <= 10),
        "rank_scale must be > 0 and tail_decay in [0, 10] (got %g, %g)", k->rank_scale,
        k->tail_decay);
    BAD(!(k->pos_rate > 0 && k->pos_rate < 1), "pos_rate %g: not in (0, 1)", k->pos_rate);
#undef BAD
    return CM_OK;
}

/* b0 such that the mean of sigmoid(b0 + logit) over calibration rows is
 * pos_rate (the mean is increasing in b0: bisection). */
static double solve_b0(ctr_planted *m) {
    double *z = cm_malloc(CALIBRATION_ROWS * sizeof *z);
    ctr_example ex;
    m->b0 = 0.0;
    for (int i = 0; i < CALIBRATION_ROWS; i++) {
        ctr_planted_example(m, CTR_SPLIT_CALIBRATION, (uint64_t)i, &ex);
        z[i] = ex.logit;
    }
    double lo = -50.0, hi = 50.0;
    for (int it = 0; it < 100 && hi - lo > 1e-12; it++) {
        double mid = 0.5 * (lo + hi), mean = 0.0;
        for (int i = 0; i < CALIBRATION_ROWS; i++) mean += sigmoid(mid + z[i]);
        if (mean / CALIBRATION_ROWS < m->k.pos_rate)
            lo = mid;
        else
            hi = mid;
    }
    free(z);
    return 0.5 * (lo + hi);
}

int ctr_planted_create(const ctr_knobs *k, ctr_planted **out, char *err, size_t errlen) {
    *out = NULL;
    int rc = check_knobs(k, err, errlen);
    if (rc != CM_OK) return rc;
    ctr_planted *m = cm_calloc(1, sizeof *m);
    m->k = *k;
    for (int s = 0; s < 3; s++) m->row_key[s] = key_of(k->seed, TAG_ROW, (uint64_t)s);
    for (int f = 0; f < NFIELDS; f++) m->weight_key[f] = key_of(k->seed, TAG_WEIGHT, (uint64_t)f);
    m->mix_inv[0] = inverse_odd(0xbf58476d1ce4e5b9ULL);
    m->mix_inv[1] = inverse_odd(0x94d049bb133111ebULL);
    ziggurat_init(m);
    /* Per-field shapes: fixed patterns, so that vocabulary size, exponent
     * and missing rate are not all in step across fields. */
    for (int j = 0; j < NCAT; j++) {
        m->perm_key[j] = key_of(k->seed, TAG_PERM, (uint64_t)j);
        double v = k->vocab_min * pow(k->vocab_max / k->vocab_min, j / (double)(NCAT - 1));
        double s = k->zipf_min + (k->zipf_max - k->zipf_min) * ((j * 11) % NCAT) / (NCAT - 1.0);
        ctr_zipf_init(&m->zipf[j], (uint64_t)llround(v), s);
        m->cat_missing[j] = k->cat_missing * ((j * 7) % 5) / 4.0;
    }
    for (int i = 0; i < NINT; i++) {
        m->int_mu[i] = 0.5 + 0.35 * ((i * 5) % NINT);
        m->int_sigma[i] = 0.8 + 0.1 * ((i * 7) % NINT);
        m->int_missing[i] = k->int_missing * ((i * 3) % 5) / 2.0;
    }
    m->b0 = solve_b0(m);
    *out = m;
    return CM_OK;
}

void ctr_planted_destroy(ctr_planted *m) { free(m); }

const ctr_knobs *ctr_planted_knobs(const ctr_planted *m) { return &m->k; }
double ctr_planted_b0(const ctr_planted *m) { return m->b0; }
uint64_t ctr_planted_vocab(const ctr_planted *m, int j) { return m->zipf[j].n; }
double ctr_planted_zipf_exponent(const ctr_planted *m, int j) { return m->zipf[j].s; }
double ctr_planted_cat_missing(const ctr_planted *m, int j) { return m->cat_missing[j]; }
double ctr_planted_int_mu(const ctr_planted *m, int i) { return m->int_mu[i]; }
double ctr_planted_int_sigma(const ctr_planted *m, int i) { return m->int_sigma[i]; }
double ctr_planted_int_missing(const ctr_planted *m, int i) { return m->int_missing[i]; }

/* ===== Files and metadata ===== */

/* mkdir -p */
static int make_dirs(const char *dir, char *err, size_t errlen) {
    char *p = cm_strdup(dir);
    int rc = CM_OK;
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != 0) continue;
        char c = *s;
        *s = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST) {
            cm_seterr(err, errlen, "%s: cannot create directory: %s", p, strerror(errno));
            rc = CM_EIO;
            break;
        }
        *s = c;
        if (!c) break;
    }
    struct stat st;
    if (rc == CM_OK && (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))) {
        cm_seterr(err, errlen, "%s: not a directory", dir);
        rc = CM_EIO;
    }
    free(p);
    return rc;
}

static void path_in(char *out, size_t n, const char *dir, const char *name) {
    snprintf(out, n, "%s/%s", dir, name);
}

/* The temporary name of 'name' in dir: hidden, and this process's own, so
 * that two generators writing the same data set do not collide. */
static void tmp_path_in(char *out, size_t n, const char *dir, const char *name) {
    snprintf(out, n, "%s/.%s.%ld.tmp", dir, name, (long)getpid());
}

/* Remove the temporary files of generators that died in dir (killed
 * half-way: up to a whole train.txt each). A file whose pid is alive
 * belongs to a generator still at work, and stays. */
static void remove_stale_tmp(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        static const char *names[] = {"train.txt", "test.txt", "meta.json"};
        for (int i = 0; i < 3; i++) {
            size_t n = strlen(names[i]);
            if (e->d_name[0] != '.' || strncmp(e->d_name + 1, names[i], n) != 0 ||
                e->d_name[1 + n] != '.')
                continue;
            char *end;
            long pid = strtol(e->d_name + 2 + n, &end, 10);
            if (end == e->d_name + 2 + n || strcmp(end, ".tmp") != 0 || pid <= 0) continue;
            if (pid != (long)getpid() && kill((pid_t)pid, 0) != 0 && errno == ESRCH) {
                char path[4096];
                path_in(path, sizeof path, dir, e->d_name);
                unlink(path);
            }
        }
    }
    closedir(d);
}

/* Flush f to disk and close it. */
static int close_synced(FILE *f, const char *path, char *err, size_t errlen) {
    int bad = fflush(f) != 0 || fsync(fileno(f)) != 0;
    int e = errno;
    bad |= fclose(f) != 0;
    if (bad) {
        cm_seterr(err, errlen, "%s: write failed: %s", path, strerror(e ? e : errno));
        return CM_EIO;
    }
    return CM_OK;
}

static json_t *knobs_json(const ctr_knobs *k) {
    return json_pack("{s:i, s:I, s:I, s:I, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:i, s:f, s:f, "
                     "s:f, s:f, s:f}",
                     "model_version", CTR_MODEL_VERSION, "seed", (json_int_t)k->seed,
                     "train_rows", (json_int_t)k->train_rows, "test_rows",
                     (json_int_t)k->test_rows, "vocab_min", k->vocab_min, "vocab_max",
                     k->vocab_max, "zipf_min", k->zipf_min, "zipf_max", k->zipf_max,
                     "cat_missing", k->cat_missing, "int_missing", k->int_missing,
                     "int_negative", k->int_negative, "k", k->k, "sigma_w", k->sigma_w,
                     "sigma_v", k->sigma_v, "rank_scale", k->rank_scale, "tail_decay",
                     k->tail_decay, "pos_rate", k->pos_rate);
}

/* A number, or null where it is undefined (AUC with one class). */
static json_t *json_num(double x) { return isfinite(x) ? json_real(x) : json_null(); }

static json_t *real_array(const ctr_planted *m, int n, double (*get)(const ctr_planted *, int)) {
    json_t *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_real(get(m, i)));
    return a;
}

static json_t *meta_json(const ctr_planted *m, const ctr_summary *s) {
    const ctr_knobs *k = &m->k;
    json_t *vocab = json_array(), *neg = json_array();
    for (int j = 0; j < NCAT; j++) json_array_append_new(vocab, json_integer((json_int_t)m->zipf[j].n));
    for (int i = 0; i < NINT; i++)
        if (ctr_planted_int_has_negatives(i)) json_array_append_new(neg, json_sprintf("I%d", i + 1));
    return json_pack(
        "{s:s, s:s, s:i, s:I, s:I, s:I, s:I, s:I, s:f, s:f, s:{s:i, s:i}, s:o, s:o, s:o, s:o, s:o, "
        "s:o, s:o, s:f, s:o, s:o, s:o, s:{s:{s:s, s:I}, s:{s:s, s:I}}, s:s, s:o}",
        "format", "criteo", "generator", "ctrgen (pstrain tools/ctr_planted.c)", "model_version",
        CTR_MODEL_VERSION, "seed", (json_int_t)k->seed, "train_rows", (json_int_t)k->train_rows,
        "test_rows", (json_int_t)k->test_rows, "train_positives", (json_int_t)s->train_positives,
        "test_positives", (json_int_t)s->test_positives, "train_positive_rate",
        k->train_rows ? (double)s->train_positives / (double)k->train_rows : 0.0,
        "test_positive_rate",
        k->test_rows ? (double)s->test_positives / (double)k->test_rows : 0.0, "fields", "int",
        NINT, "cat", NCAT, "cat_vocab", vocab, "zipf_exponents",
        real_array(m, NCAT, ctr_planted_zipf_exponent), "cat_missing_rates",
        real_array(m, NCAT, ctr_planted_cat_missing), "int_missing_rates",
        real_array(m, NINT, ctr_planted_int_missing), "int_lognormal_mu",
        real_array(m, NINT, ctr_planted_int_mu), "int_lognormal_sigma",
        real_array(m, NINT, ctr_planted_int_sigma), "int_negative_fields", neg, "b0", m->b0,
        "bayes_auc", json_num(s->bayes_auc), "bayes_logloss", json_num(s->bayes_logloss),
        "first_order_auc", json_num(s->first_order_auc), "files", "train", "name", "train.txt", "bytes",
        (json_int_t)s->train_bytes, "test", "name", "test.txt", "bytes", (json_int_t)s->test_bytes,
        "missing_values", "id 0 of the field's table, with its own weights (rank scale 1)", "knobs",
        knobs_json(k));
}

/* Write one split into 'tmp'. For the test split, probs / first-order
 * logits / labels (test_rows each) are filled for the metrics. */
static int write_split(const ctr_planted *m, int split, const char *tmp, ctr_progress_fn progress,
                       void *ud, uint64_t *positives, uint64_t *bytes, float *probs, float *fo,
                       int32_t *labels, char *err, size_t errlen) {
    const char *name = split == CTR_SPLIT_TRAIN ? "train" : "test";
    uint64_t rows = split == CTR_SPLIT_TRAIN ? m->k.train_rows : m->k.test_rows;
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        cm_seterr(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
        return CM_EIO;
    }
    setvbuf(f, NULL, _IOFBF, 1 << 20);
    char line[CTR_LINE_MAX];
    ctr_example ex;
    *positives = *bytes = 0;
    for (uint64_t r = 0; r < rows; r++) {
        ctr_planted_example(m, split, r, &ex);
        size_t n = ctr_format_line(&ex, line);
        if (fwrite(line, 1, n, f) != n) break; /* reported by close_synced */
        *bytes += n;
        *positives += (uint64_t)ex.label;
        if (probs) {
            probs[r] = (float)sigmoid(ex.logit);
            fo[r] = (float)ex.first_order;
            labels[r] = ex.label;
        }
        if (progress && (r + 1) % PROGRESS_EVERY == 0 && r + 1 < rows) progress(ud, name, r + 1, rows);
    }
    int rc = close_synced(f, tmp, err, errlen);
    if (rc == CM_OK && progress) progress(ud, name, rows, rows);
    return rc;
}

/* fsync a directory, so the renames in it are on disk too. */
static void sync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

int ctr_generate(const ctr_planted *m, const char *dir, ctr_progress_fn progress, void *ud,
                 ctr_summary *sum, char *err, size_t errlen) {
    int rc = make_dirs(dir, err, errlen);
    if (rc != CM_OK) return rc;
    remove_stale_tmp(dir);
    enum { TRAIN, TEST, META };
    static const char *names[] = {"train.txt", "test.txt", "meta.json"};
    char tmp[3][4096], fin[3][4096];
    for (int i = 0; i < 3; i++) {
        tmp_path_in(tmp[i], sizeof tmp[i], dir, names[i]);
        path_in(fin[i], sizeof fin[i], dir, names[i]);
    }
    size_t nt = (size_t)m->k.test_rows;
    float *probs = cm_malloc((nt ? nt : 1) * sizeof *probs);
    float *fo = cm_malloc((nt ? nt : 1) * sizeof *fo);
    int32_t *labels = cm_malloc((nt ? nt : 1) * sizeof *labels);
    ctr_summary s = {0};
    char *text = NULL;
    rc = write_split(m, CTR_SPLIT_TRAIN, tmp[TRAIN], progress, ud, &s.train_positives,
                     &s.train_bytes, NULL, NULL, NULL, err, errlen);
    if (rc == CM_OK)
        rc = write_split(m, CTR_SPLIT_TEST, tmp[TEST], progress, ud, &s.test_positives,
                         &s.test_bytes, probs, fo, labels, err, errlen);
    if (rc == CM_OK) {
        s.bayes_auc = cm_auc(probs, labels, nt);
        s.bayes_logloss = cm_logloss(probs, labels, nt);
        s.first_order_auc = cm_auc(fo, labels, nt);
        json_t *meta = meta_json(m, &s);
        text = json_dumps(meta, JSON_INDENT(2) | JSON_REAL_PRECISION(17));
        json_decref(meta);
        FILE *f = text ? fopen(tmp[META], "wb") : NULL;
        if (!f) {
            cm_seterr(err, errlen, "%s: cannot create: %s", tmp[META],
                      text ? strerror(errno) : "the metadata did not serialise");
            rc = CM_EIO;
        } else {
            fputs(text, f);
            fputc('\n', f);
            rc = close_synced(f, tmp[META], err, errlen);
        }
    }
    /* The old metadata goes first and the new comes last: in between, the
     * directory does not look like a complete data set. */
    if (rc == CM_OK && unlink(fin[META]) != 0 && errno != ENOENT) {
        cm_seterr(err, errlen, "%s: cannot remove: %s", fin[META], strerror(errno));
        rc = CM_EIO;
    }
    for (int i = 0; i < 3 && rc == CM_OK; i++) {
        if (rename(tmp[i], fin[i]) != 0) {
            cm_seterr(err, errlen, "%s: cannot rename to %s: %s", tmp[i], fin[i], strerror(errno));
            rc = CM_EIO;
        }
    }
    if (rc == CM_OK) sync_dir(dir);
    for (int i = 0; i < 3 && rc != CM_OK; i++) unlink(tmp[i]);
    free(text);
    free(probs);
    free(fo);
    free(labels);
    if (rc == CM_OK && sum) *sum = s;
    return rc;
}

int ctr_meta_matches(const char *dir, const ctr_knobs *k) {
    char path[4096];
    path_in(path, sizeof path, dir, "meta.json");
    json_t *meta = json_load_file(path, 0, NULL);
    if (!meta) return 0;
    json_t *want = knobs_json(k);
    int same = json_equal(json_object_get(meta, "knobs"), want);
    json_decref(want);
    json_decref(meta);
    return same;
}
