/* embedding_loop.c - your own training loop with embedding tables on the
 * parameter servers, through the client library only (pstrain/pstrain.h):
 *
 *     cc embedding_loop.c $(pkg-config --cflags --libs pstrain) -lm -o embedding_loop
 *
 * Each example is a (user, item) pair of ids; the model predicts
 * sum(U[user]) + sum(V[item]) + b from two tables, U (4 floats a row) and V
 * (2), and one dense bias b, and learns a planted target. Rows exist only on
 * the shards (created on first use, by id); every step a worker pushes the
 * gradients of the rows its batch used, with the dense gradient, and gets
 * back the next batch's rows in the same call. The chief (rank 0)
 * initialises the shards and shuts them down at the end.
 *
 *     ./embedding_loop --ps-hosts 127.0.0.1:5000 --rank 1 --workers 2 &
 *     ./embedding_loop --ps-hosts 127.0.0.1:5000 --rank 0 --workers 2
 *
 * Exit status 0 when the loss fell below a twentieth of its start.
 * SPDX-License-Identifier: MIT
 */
#include <getopt.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pstrain/pstrain.h>

#define USERS 500
#define ITEMS 300
#define BATCH 64

/* A small deterministic generator (xorshift64*). */
static uint64_t next_u64(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static double target(uint64_t u, uint64_t i) { return sin(0.7 * (double)u) + cos(1.3 * (double)i); }

/* One batch: its examples and its unique rows (users, then items). */
typedef struct batch {
    uint64_t user[BATCH], item[BATCH];
    size_t begin[3];
    uint64_t ids[2 * BATCH];
    int slot_user[BATCH], slot_item[BATCH]; /* Each example's row slots. */
} batch;

static int slot_of(uint64_t *ids, size_t from, size_t *n, uint64_t id) {
    for (size_t k = from; k < *n; k++)
        if (ids[k] == id) return (int)k;
    ids[*n] = id;
    return (int)(*n)++;
}

static void draw(batch *b, uint64_t *rng) {
    size_t n = 0;
    for (int e = 0; e < BATCH; e++) {
        b->user[e] = next_u64(rng) % USERS;
        b->item[e] = next_u64(rng) % ITEMS;
    }
    b->begin[0] = 0;
    for (int e = 0; e < BATCH; e++) b->slot_user[e] = slot_of(b->ids, 0, &n, b->user[e]);
    b->begin[1] = n;
    for (int e = 0; e < BATCH; e++) b->slot_item[e] = slot_of(b->ids, b->begin[1], &n, b->item[e]);
    b->begin[2] = n;
}

/* The batch's mean squared error with the rows' values (width w floats a
 * slot) and bias b; the gradients of the rows and of b. */
static double step_loss(const batch *b, const float *vals, size_t w, const float *params,
                        float *row_grad, float *grad) {
    double loss = 0.0;
    memset(row_grad, 0, b->begin[2] * w * sizeof *row_grad);
    grad[0] = 0.0f;
    for (int e = 0; e < BATCH; e++) {
        const float *u = vals + (size_t)b->slot_user[e] * w, *v = vals + (size_t)b->slot_item[e] * w;
        double pred = params[0] + u[0] + u[1] + u[2] + u[3] + v[0] + v[1];
        double d = pred - target(b->user[e], b->item[e]);
        loss += d * d / BATCH;
        float g = (float)(2.0 * d / BATCH);
        for (int k = 0; k < 4; k++) row_grad[(size_t)b->slot_user[e] * w + k] += g;
        for (int k = 0; k < 2; k++) row_grad[(size_t)b->slot_item[e] * w + k] += g;
        grad[0] += g;
    }
    return loss;
}

static void die(const char *what, const char *err) {
    fprintf(stderr, "embedding_loop: %s: %s\n", what, err);
    exit(1);
}

int main(int argc, char **argv) {
    static const struct option lo[] = {{"ps-hosts", 1, 0, 'p'},   {"rank", 1, 0, 'r'},
                                       {"workers", 1, 0, 'w'},    {"steps", 1, 0, 's'},
                                       {"token-file", 1, 0, 't'}, {"admin-token-file", 1, 0, 'a'},
                                       {0, 0, 0, 0}};
    pst_options o;
    pst_options_default(&o);
    o.num_workers = 1;
    o.lr = 0.05f;
    o.table_optimizer = "adagrad";
    o.table_lr = 0.1f;
    long steps = 400;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'p': o.ps_hosts = optarg; break;
        case 'r': o.rank = atoi(optarg); break;
        case 'w': o.num_workers = atoi(optarg); break;
        case 's': steps = atol(optarg); break;
        case 't': o.auth_token_file = optarg; break;
        case 'a': o.admin_token_file = optarg; break;
        default:
            fprintf(stderr, "usage: embedding_loop --ps-hosts H:P[,H:P...] [--rank R] "
                            "[--workers W] [--steps N] [--token-file F] [--admin-token-file F]\n");
            return 2;
        }
    }
    pst_var vars[] = {{"bias", 1}};
    pst_table tables[] = {{"user", 4}, {"item", 2}};
    o.vars = vars;
    o.nvars = 1;
    o.tables = tables;
    o.ntables = 2;
    char err[512];
    pst_client *ps;
    if (pst_client_create(&o, &ps, err, sizeof err) != 0) die("connect", err);
    size_t w = pst_row_width(ps);
    float params[1], grad[1];
    float *vals[2] = {calloc(2 * BATCH * w, sizeof(float)), calloc(2 * BATCH * w, sizeof(float))};
    float *row_grad = calloc(2 * BATCH * w, sizeof(float));
    if (o.rank == 0 && pst_init(ps, NULL, err, sizeof err) != 0) die("initialise", err);
    if (pst_pull(ps, 0, params, NULL, err, sizeof err) != 0) die("pull", err);
    uint64_t rng = 0x9e3779b97f4a7c15ull ^ (uint64_t)(o.rank + 1) * 0xbf58476d1ce4e5b9ull;
    batch b[2];
    draw(&b[0], &rng);
    pst_rows rows = {b[0].begin, b[0].ids};
    if (pst_pull_rows(ps, 0, &rows, vals[0], 1, err, sizeof err) != 0) die("pull rows", err);
    double first = 0.0, last = 0.0;
    for (long t = 0; t < steps; t++) {
        int cur = (int)(t & 1), nxt = cur ^ 1;
        last = step_loss(&b[cur], vals[cur], w, params, row_grad, grad);
        if (t == 0) first = last;
        draw(&b[nxt], &rng);
        pst_rows used = {b[cur].begin, b[cur].ids}, next = {b[nxt].begin, b[nxt].ids};
        if (pst_step_rows(ps, t, grad, params, &used, row_grad, &next, vals[nxt], err,
                          sizeof err) != 0)
            die("step", err);
        if (t % 100 == 0 || t == steps - 1)
            printf("rank %d step %ld loss %.6f\n", o.rank, t, last);
    }
    printf("rank %d: loss %.6f after %ld steps (from %.6f)\n", o.rank, last, steps, first);
    if (o.rank == 0 && pst_shutdown(ps, 0, err, sizeof err) != 0) die("shutdown", err);
    pst_client_destroy(ps);
    free(vals[0]);
    free(vals[1]);
    free(row_grad);
    return last < first / 20.0 ? 0 : 1;
}
