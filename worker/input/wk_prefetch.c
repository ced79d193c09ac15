/* wk_prefetch.c - one reader thread feeding batches through a bounded ring.
 * SPDX-License-Identifier: MIT
 *
 * Design. 'depth' wk_batch buffers, allocated once, form a ring. The
 * producer fills slots in ring order; the consumer takes them in the same
 * order, so batches come out in step order.
 *
 *   slot states:  FREE --fill (producer)--> READY --next()--> HELD
 *                 HELD --release()--> FREE
 *
 * Invariants, under mu:
 *   - 'ready' counts READY plus HELD slots; they are the 'ready' slots
 *     starting at 'head'. The producer fills slot (head + ready) % depth,
 *     which it tracks itself as 'tail', and only while ready < depth, so
 *     it never writes a slot the consumer can see.
 *   - At most max_held slots are HELD, and they are the 'held' slots
 *     starting at 'head'.
 *   - 'done' is set once, by the producer, after its last batch, when it
 *     sees 'stopping', or on a read error ('error', then 'errmsg').
 * Click data: the producer owns a wk_criteo reader positioned at the next
 * good line of the training stream ('line', counted from the start of the
 * epoch); a new epoch rewinds it, a resumed run skips to its line first.
 * The producer fills a slot without holding mu: the slot is FREE, nobody
 * else touches it. Shutdown: wk_prefetch_stop(), called by the consumer
 * (so nobody waits in next()), sets 'stopping' and wakes the producer; the
 * producer finishes at most the batch it is gathering, exits, and is
 * joined before anything is freed.
 */
#include "worker/input/wk_prefetch.h"

#include <assert.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "common/cm_time.h"
#include "worker/input/wk_order.h"

#define PREFETCH_DEFAULT_DEPTH 4
#define PREFETCH_MAX_HELD 2

struct wk_prefetch {
    /* Set by wk_prefetch_start(), read-only afterwards. */
    wk_prefetch_cfg cfg;
    size_t steps_per_epoch;
    size_t lo, hi; /* This rank's slice of every global batch. */
    int depth;
    wk_batch *slots; /* depth buffers. */

    size_t n;          /* Examples per epoch in the source. */
    int nfields;       /* Clicks: fields per example (0 for images). */
    int max_held;

    /* Used by the producer thread only. */
    uint32_t *perm;     /* Order of 'perm_epoch'; n entries. */
    int64_t perm_epoch; /* -1 before the first batch. */
    int tail;           /* Next slot to fill. */
    wk_criteo *reader;  /* Clicks: the training stream... */
    int64_t line_epoch; /* ...at good line 'line' of this epoch (-1: not
                         * positioned yet). */
    size_t line;
    uint64_t *row_ids;  /* Clicks: one example's ids. */

    pthread_t thread;
    int thread_started;
    int sync_inited;
    pthread_mutex_t mu;
    pthread_cond_t can_take; /* Signalled when 'ready' grows or 'done' is set. */
    pthread_cond_t can_fill; /* Signalled when 'ready' shrinks, 'asked' grows or
                              * 'stopping' is set. */
    int64_t asked;           /* on_demand: batches wk_prefetch_next asked for. */
    /* Protected by mu. */
    int head;     /* Oldest READY or HELD slot. */
    int ready;    /* READY + HELD slots. */
    int held;     /* Slots the consumer holds, from slots[head]. */
    int done;     /* The producer has made its last batch. */
    int stopping; /* wk_prefetch_stop() was called. */
    int error;    /* The producer's error (CM_OK if none)... */
    char errmsg[512]; /* ...and its message, written before 'done'. */
};

/* Fill 's' with this rank's part of the global batch of 'step' (images). */
static int fill_images(wk_prefetch *p, wk_batch *s, int64_t step) {
    const wk_prefetch_cfg *c = &p->cfg;
    int64_t spe = (int64_t)p->steps_per_epoch;
    int64_t epoch = step / spe;
    size_t first = (size_t)(step % spe) * c->global_batch;
    /* Steps come in order, so the permutation changes once per epoch. */
    if (epoch != p->perm_epoch) {
        wk_order_epoch(c->seed, epoch, c->data->n, p->perm);
        p->perm_epoch = epoch;
    }
    s->step = step;
    s->epoch = epoch;
    s->n = p->hi - p->lo;
    wk_dataset_gather(c->data, p->perm + first + p->lo, s->n, s->x, s->y);
    return CM_OK;
}

/* The next good example of the stream into ids/label (NULL: skip it). */
static int read_line(wk_prefetch *p, uint64_t *ids, int32_t *label) {
    int32_t l;
    int rc = wk_criteo_next(p->reader, label ? label : &l, ids ? ids : p->row_ids, p->errmsg,
                            sizeof p->errmsg);
    if (rc == 0) {
        snprintf(p->errmsg, sizeof p->errmsg,
                 "%s ended after %zu good lines of the epoch; %zu were counted when the run "
                 "started (was the file changed?)",
                 p->cfg.ctr->train_path, p->line, p->n);
        return CM_ECORRUPT;
    }
    if (rc < 0) return rc;
    p->line++;
    return CM_OK;
}

/* Clicks: read the global batch of 'step' from the stream, keeping this
 * rank's slice, and deduplicate its rows. Every rank reads (and so
 * validates) every line: a bad line is skipped by all of them alike. */
static int fill_clicks(wk_prefetch *p, wk_batch *s, int64_t step) {
    const wk_prefetch_cfg *c = &p->cfg;
    int64_t spe = (int64_t)p->steps_per_epoch;
    int64_t epoch = step / spe;
    size_t first = (size_t)(step % spe) * c->global_batch;
    int rc;
    if (epoch != p->line_epoch || p->line > first) {
        if ((rc = wk_criteo_rewind(p->reader, p->errmsg, sizeof p->errmsg)) != CM_OK) return rc;
        p->line = 0;
        p->line_epoch = epoch;
    }
    while (p->line < first)
        if ((rc = read_line(p, NULL, NULL)) != CM_OK) return rc;
    size_t F = (size_t)p->nfields;
    for (size_t i = 0; i < c->global_batch; i++) {
        int mine = i >= p->lo && i < p->hi;
        size_t k = i - p->lo;
        if ((rc = read_line(p, mine ? s->ids + k * F : NULL, mine ? s->y + k : NULL)) != CM_OK)
            return rc;
    }
    s->step = step;
    s->epoch = epoch;
    s->n = p->hi - p->lo;
    wk_rowset_build(&s->rows, s->ids, s->n, c->field_table);
    return CM_OK;
}

static void *producer_main(void *arg) {
    wk_prefetch *p = arg;
    for (int64_t i = 0; i < p->cfg.nsteps; i++) {
        pthread_mutex_lock(&p->mu);
        while ((p->ready == p->depth || (p->cfg.on_demand && p->asked <= i)) && !p->stopping)
            pthread_cond_wait(&p->can_fill, &p->mu);
        int stopping = p->stopping;
        pthread_mutex_unlock(&p->mu);
        if (stopping) break;

        double t0 = cm_now();
        int rc = p->reader ? fill_clicks(p, &p->slots[p->tail], p->cfg.first_step + i)
                           : fill_images(p, &p->slots[p->tail], p->cfg.first_step + i);
        if (p->cfg.input_delay_s > 0) cm_sleep_until(t0 + p->cfg.input_delay_s);
        if (rc != CM_OK) {
            pthread_mutex_lock(&p->mu);
            p->error = rc;
            pthread_mutex_unlock(&p->mu);
            break;
        }
        p->tail = (p->tail + 1) % p->depth;

        pthread_mutex_lock(&p->mu);
        p->ready++;
        pthread_cond_signal(&p->can_take);
        pthread_mutex_unlock(&p->mu);
    }
    pthread_mutex_lock(&p->mu);
    p->done = 1;
    pthread_cond_signal(&p->can_take);
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static int check_cfg(const wk_prefetch_cfg *c) {
    if (!c->data == !c->ctr) {
        cm_error("prefetch: give images or click data");
        return CM_EINVAL;
    }
    size_t n = c->data ? c->data->n : c->ctr->n_train;
    if (n == 0 || (c->data && c->data->dim == 0)) {
        cm_error("prefetch: empty data set");
        return CM_EINVAL;
    }
    if (c->data && c->data->n > (size_t)UINT32_MAX) {
        cm_error("prefetch: %zu examples is more than the order indexes", c->data->n);
        return CM_EINVAL;
    }
    if (c->ctr && (!c->field_table || c->ntables < 1)) {
        cm_error("prefetch: click data needs the model's field tables");
        return CM_EINVAL;
    }
    if (c->global_batch == 0 || c->global_batch > n) {
        cm_error("prefetch: global batch %zu must be between 1 and the %zu examples",
                 c->global_batch, n);
        return CM_EINVAL;
    }
    if (c->nranks < 1 || c->rank < 0 || c->rank >= c->nranks) {
        cm_error("prefetch: bad rank %d of %d", c->rank, c->nranks);
        return CM_EINVAL;
    }
    if (c->first_step < 0 || c->nsteps < 0 || c->depth < 0) {
        cm_error("prefetch: negative first_step, nsteps or depth");
        return CM_EINVAL;
    }
    return CM_OK;
}

int wk_prefetch_start(const wk_prefetch_cfg *cfg, wk_prefetch **out) {
    *out = NULL;
    int rc = check_cfg(cfg);
    if (rc != CM_OK) return rc;

    wk_prefetch *p = cm_calloc(1, sizeof *p);
    p->cfg = *cfg;
    p->depth = cfg->depth > 0 ? cfg->depth : PREFETCH_DEFAULT_DEPTH;
    p->max_held = p->depth < PREFETCH_MAX_HELD ? p->depth : PREFETCH_MAX_HELD;
    p->n = cfg->data ? cfg->data->n : cfg->ctr->n_train;
    p->nfields = cfg->ctr ? WK_CRITEO_NFIELDS : 0;
    p->steps_per_epoch = wk_order_steps_per_epoch(p->n, cfg->global_batch);
    wk_order_slice(cfg->global_batch, cfg->rank, cfg->nranks, &p->lo, &p->hi);
    p->perm_epoch = -1;
    p->line_epoch = -1;

    /* Every buffer the thread will ever use is allocated here. */
    rc = CM_ENOMEM;
    const char *why = "out of memory for the batch buffers";
    size_t slice = p->hi - p->lo;
    p->slots = cm_calloc((size_t)p->depth, sizeof *p->slots);
    if (cfg->data) {
        if (!(p->perm = cm_alloc_aligned(cfg->data->n * sizeof *p->perm))) goto fail;
    } else {
        char err[512];
        const char *path = cfg->ctr->train_path;
        if ((rc = wk_criteo_open(&path, 1, &cfg->ctr->opts, &p->reader, err, sizeof err)) !=
            CM_OK) {
            cm_error("prefetch: %s", err);
            goto fail_logged;
        }
        rc = CM_ENOMEM;
        p->row_ids = cm_calloc(WK_CRITEO_NFIELDS, sizeof *p->row_ids);
    }
    for (int i = 0; i < p->depth; i++) {
        wk_batch *b = &p->slots[i];
        b->y = cm_alloc_aligned((slice ? slice : 1) * sizeof(int32_t));
        if (!b->y) goto fail;
        if (cfg->data) {
            if (!(b->x = cm_alloc_aligned((slice ? slice : 1) * cfg->data->dim * sizeof(float))))
                goto fail;
        } else {
            size_t nid = (slice ? slice : 1) * (size_t)p->nfields;
            if (!(b->ids = cm_alloc_aligned(nid * sizeof *b->ids)) ||
                wk_rowset_init(&b->rows, slice ? slice : 1, p->nfields, cfg->ntables) != CM_OK)
                goto fail;
        }
    }

    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->can_take, NULL);
    pthread_cond_init(&p->can_fill, NULL);
    p->sync_inited = 1;
    why = "cannot start the reader thread";
    if (pthread_create(&p->thread, NULL, producer_main, p) != 0) goto fail;
    p->thread_started = 1;
    *out = p;
    return CM_OK;

fail:
    cm_error("prefetch: %s", why);
fail_logged:
    wk_prefetch_stop(p);
    return rc;
}

int wk_prefetch_next(wk_prefetch *p, wk_batch **out) {
    *out = NULL;
    pthread_mutex_lock(&p->mu);
    /* The caller must release a batch first. */
    assert(p->held < p->max_held);
    if (p->held >= p->max_held) { /* (Not CM_EBUSY: pstrain reads that as a port taken.) */
        pthread_mutex_unlock(&p->mu);
        return CM_EINVAL;
    }
    if (p->cfg.on_demand) {
        p->asked++;
        pthread_cond_signal(&p->can_fill);
    }
    while (p->ready == p->held && !p->done) pthread_cond_wait(&p->can_take, &p->mu);
    int rc = p->error != CM_OK ? p->error : CM_ESHUTDOWN;
    if (p->ready > p->held) {
        *out = &p->slots[(p->head + p->held) % p->depth];
        p->held++;
        rc = CM_OK;
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

void wk_prefetch_release(wk_prefetch *p, wk_batch *b) {
    pthread_mutex_lock(&p->mu);
    assert(p->held && b == &p->slots[p->head]);
    if (p->held && b == &p->slots[p->head]) {
        p->held--;
        p->head = (p->head + 1) % p->depth;
        p->ready--;
        pthread_cond_signal(&p->can_fill);
    }
    pthread_mutex_unlock(&p->mu);
}

const char *wk_prefetch_error(wk_prefetch *p) {
    pthread_mutex_lock(&p->mu);
    const char *m = p->error != CM_OK ? p->errmsg : "";
    pthread_mutex_unlock(&p->mu);
    return m;
}

void wk_prefetch_stop(wk_prefetch *p) {
    if (!p) return;
    if (p->thread_started) {
        pthread_mutex_lock(&p->mu);
        p->stopping = 1;
        pthread_cond_signal(&p->can_fill);
        pthread_mutex_unlock(&p->mu);
        pthread_join(p->thread, NULL);
    }
    if (p->sync_inited) {
        pthread_cond_destroy(&p->can_fill);
        pthread_cond_destroy(&p->can_take);
        pthread_mutex_destroy(&p->mu);
    }
    if (p->slots) {
        for (int i = 0; i < p->depth; i++) {
            free(p->slots[i].x);
            free(p->slots[i].y);
            free(p->slots[i].ids);
            wk_rowset_free(&p->slots[i].rows);
        }
        free(p->slots);
    }
    wk_criteo_close(p->reader);
    free(p->row_ids);
    free(p->perm);
    free(p);
}
