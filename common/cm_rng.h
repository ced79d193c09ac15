/* cm_rng.h - counter-based random numbers and stable hashes.
 * SPDX-License-Identifier: MIT
 *
 * Everything random in the project is a pure function of a key and a
 * counter, so a value never depends on which process or thread computes it,
 * nor on the order in which values are drawn. This is what makes variable
 * initialisation independent of partitioning and the epoch order a
 * function of (seed, epoch) only.
 */
#ifndef CM_RNG_H
#define CM_RNG_H
#include <stddef.h>
#include <stdint.h>

/* SplitMix64 finaliser: a bijective 64-bit mixer. */
static inline uint64_t cm_mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* The 64-bit random word number 'counter' of stream 'key'. */
static inline uint64_t cm_rand64(uint64_t key, uint64_t counter) {
    return cm_mix64(key ^ cm_mix64(counter + 0x632be59bd9b4e019ULL));
}

/* Uniform in [0, 1) with 24 bits, from cm_rand64(key, counter). */
static inline float cm_randf(uint64_t key, uint64_t counter) {
    return (float)(cm_rand64(key, counter) >> 40) * (1.0f / 16777216.0f);
}

/* FNV-1a over bytes, then mixed: a stable hash for names. */
uint64_t cm_hash_bytes(const void *p, size_t n, uint64_t seed);
uint64_t cm_hash_str(const char *s, uint64_t seed);

/* A small sequential generator for tests and data generators (not for
 * anything that must be independent of draw order). */
typedef struct cm_rng {
    uint64_t key;
    uint64_t counter;
} cm_rng;

static inline void cm_rng_init(cm_rng *r, uint64_t seed) {
    r->key = cm_mix64(seed);
    r->counter = 0;
}
static inline uint64_t cm_rng_next(cm_rng *r) { return cm_rand64(r->key, r->counter++); }
static inline float cm_rng_uniform(cm_rng *r) { return cm_randf(r->key, r->counter++); }
/* Uniform integer in [0, n), n > 0, without modulo bias worth noting
 * (n < 2^32 here). */
static inline uint64_t cm_rng_below(cm_rng *r, uint64_t n) {
    return (uint64_t)(((unsigned __int128)cm_rng_next(r) * n) >> 64);
}

#endif /* CM_RNG_H */
