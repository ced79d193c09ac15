/* ps_optim.c - SGD, momentum and Adam over float arrays.
 * SPDX-License-Identifier: MIT
 *
 * Loops are written so gcc vectorises them at -O2/-O3 (restrict pointers, no
 * branches in the body).
 */
#include "ps/ps_optim.h"

#include <math.h>
#include <string.h>

ps_optim_cfg ps_optim_defaults(int kind, float lr) {
    ps_optim_cfg c = {.kind = kind, .lr = lr, .momentum = 0.9f, .beta1 = 0.9f,
                      .beta2 = 0.999f, .epsilon = 1e-8f};
    return c;
}

int ps_optim_parse(const char *name) {
    if (!strcmp(name, "sgd")) return PS_OPTIM_SGD;
    if (!strcmp(name, "momentum")) return PS_OPTIM_MOMENTUM;
    if (!strcmp(name, "adam")) return PS_OPTIM_ADAM;
    if (!strcmp(name, "add")) return PS_OPTIM_ADD;
    return -1;
}

const char *ps_optim_name(int kind) {
    switch (kind) {
    case PS_OPTIM_SGD: return "sgd";
    case PS_OPTIM_MOMENTUM: return "momentum";
    case PS_OPTIM_ADAM: return "adam";
    case PS_OPTIM_ADD: return "add";
    }
    return "unknown";
}

int ps_optim_nslots(int kind) {
    switch (kind) {
    case PS_OPTIM_MOMENTUM: return 1;
    case PS_OPTIM_ADAM: return 2;
    default: return 0;
    }
}

static void sgd(float lr, float *restrict w, const float *restrict g, size_t n) {
    for (size_t i = 0; i < n; i++) w[i] -= lr * g[i];
}

static void add(float *restrict w, const float *restrict g, size_t n) {
    for (size_t i = 0; i < n; i++) w[i] += g[i];
}

static void momentum(float lr, float mu, float *restrict w, const float *restrict g,
                     float *restrict a, size_t n) {
    for (size_t i = 0; i < n; i++) {
        a[i] = mu * a[i] + g[i];
        w[i] -= lr * a[i];
    }
}

static void adam(const ps_optim_cfg *c, int64_t t, float *restrict w, const float *restrict g,
                 float *restrict m, float *restrict v, size_t n) {
    /* Bias corrections in double: b^t for large t underflows gracefully. */
    const float c1 = (float)(1.0 / (1.0 - pow((double)c->beta1, (double)t)));
    const float c2 = (float)(1.0 / (1.0 - pow((double)c->beta2, (double)t)));
    const float b1 = c->beta1, b2 = c->beta2, lr = c->lr, eps = c->epsilon;
    for (size_t i = 0; i < n; i++) {
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        w[i] -= lr * (m[i] * c1) / (sqrtf(v[i] * c2) + eps);
    }
}

void ps_optim_apply(const ps_optim_cfg *cfg, int64_t t, float *w, const float *g, float *slots,
                    size_t n) {
    switch (cfg->kind) {
    case PS_OPTIM_SGD: sgd(cfg->lr, w, g, n); break;
    case PS_OPTIM_MOMENTUM: momentum(cfg->lr, cfg->momentum, w, g, slots, n); break;
    case PS_OPTIM_ADAM: adam(cfg, t < 1 ? 1 : t, w, g, slots, slots + n, n); break;
    case PS_OPTIM_ADD: add(w, g, n); break;
    }
}
