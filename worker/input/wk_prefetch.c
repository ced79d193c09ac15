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
 *   - At most one slot is HELD, and it is the one at 'head'.
 *   - 'done' is set once, by the producer, after its last batch or when it
 *     sees 'stopping'.
 * The producer fills a slot without holding mu: the slot is FREE, nobody
 * else touches it. Shutdown: wk_prefetch_stop(), called by the consumer
 * (so nobody waits in next()), sets 'stopping' and wakes the producer; the
 * producer finishes at most the batch it is gathering, exits, and is
 * joined before anything is freed.
 */
#include "worker/input/wk_prefetch.h"

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "common/cm_log.h"
#include "common/cm_mem.h"
#include "common/cm_status.h"
#include "worker/input/wk_order.h"

#define PREFETCH_DEFAULT_DEPTH 4

struct wk_prefetch {
    /* Set by wk_prefetch_start(), read-only afterwards. */
    wk_prefetch_cfg cfg;
    size_t steps_per_epoch;
    size_t lo, hi; /* This rank's slice of every global batch. */
    int depth;
    wk_batch *slots; /* depth buffers. */

    /* Used by the producer thread only. */
    uint32_t *perm;     /* Order of 'perm_epoch'; n entries. */
    int64_t perm_epoch; /* -1 before the first batch. */
    int tail;           /* Next slot to fill. */

    pthread_t thread;
    int thread_started;
    int sync_inited;
    pthread_mutex_t mu;
    pthread_cond_t can_take; /* Signalled when 'ready' grows or 'done' is set. */
    pthread_cond_t can_fill; /* Signalled when 'ready' shrinks or 'stopping' is set. */
    /* Protected by mu. */
    int head;     /* Oldest READY or HELD slot. */
    int ready;    /* READY + HELD slots. */
    int held;     /* Whether the consumer holds slots[head]. */
    int done;     /* The producer has made its last batch. */
    int stopping; /* wk_prefetch_stop() was called. */
};

/* Fill 's' with this rank's part of the global batch of 'step'. */
static void fill(wk_prefetch *p, wk_batch *s, int64_t step) {
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
}

static void *producer_main(void *arg) {
    wk_prefetch *p = arg;
    for (int64_t i = 0; i < p->cfg.nsteps; i++) {
        pthread_mutex_lock(&p->mu);
        while (p->ready == p->depth && !p->stopping) pthread_cond_wait(&p->can_fill, &p->mu);
        int stopping = p->stopping;
        pthread_mutex_unlock(&p->mu);
        if (stopping) break;

        fill(p, &p->slots[p->tail], p->cfg.first_step + i);
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
    if (!c->data || c->data->n == 0 || c->data->dim == 0) {
        cm_error("prefetch: empty data set");
        return CM_EINVAL;
    }
    if (c->data->n > (size_t)UINT32_MAX) {
        cm_error("prefetch: %zu examples is more than the order indexes", c->data->n);
        return CM_EINVAL;
    }
    if (c->global_batch == 0 || c->global_batch > c->data->n) {
        cm_error("prefetch: global batch %zu must be between 1 and the %zu examples",
                 c->global_batch, c->data->n);
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
    p->steps_per_epoch = wk_order_steps_per_epoch(cfg->data->n, cfg->global_batch);
    wk_order_slice(cfg->global_batch, cfg->rank, cfg->nranks, &p->lo, &p->hi);
    p->perm_epoch = -1;

    /* Every buffer the thread will ever use is allocated here. */
    rc = CM_ENOMEM;
    const char *why = "out of memory for the batch buffers";
    size_t slice = p->hi - p->lo;
    p->perm = cm_alloc_aligned(cfg->data->n * sizeof *p->perm);
    p->slots = cm_calloc((size_t)p->depth, sizeof *p->slots);
    if (!p->perm) goto fail;
    for (int i = 0; i < p->depth; i++) {
        p->slots[i].x = cm_alloc_aligned(slice * cfg->data->dim * sizeof(float));
        p->slots[i].y = cm_alloc_aligned(slice * sizeof(int32_t));
        if (!p->slots[i].x || !p->slots[i].y) goto fail;
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
    wk_prefetch_stop(p);
    return rc;
}

int wk_prefetch_next(wk_prefetch *p, wk_batch **out) {
    *out = NULL;
    pthread_mutex_lock(&p->mu);
    /* The caller must release the batch it holds first. */
    assert(!p->held);
    if (p->held) {
        pthread_mutex_unlock(&p->mu);
        return CM_EBUSY;
    }
    while (p->ready == 0 && !p->done) pthread_cond_wait(&p->can_take, &p->mu);
    int rc = CM_ESHUTDOWN;
    if (p->ready > 0) {
        p->held = 1;
        *out = &p->slots[p->head];
        rc = CM_OK;
    }
    pthread_mutex_unlock(&p->mu);
    return rc;
}

void wk_prefetch_release(wk_prefetch *p, wk_batch *b) {
    pthread_mutex_lock(&p->mu);
    assert(p->held && b == &p->slots[p->head]);
    if (p->held && b == &p->slots[p->head]) {
        p->held = 0;
        p->head = (p->head + 1) % p->depth;
        p->ready--;
        pthread_cond_signal(&p->can_fill);
    }
    pthread_mutex_unlock(&p->mu);
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
        }
        free(p->slots);
    }
    free(p->perm);
    free(p);
}
