/* cm_rng.c - stable hashes for names.
 * SPDX-License-Identifier: MIT
 */
#include "common/cm_rng.h"

#include <string.h>

uint64_t cm_hash_bytes(const void *p, size_t n, uint64_t seed) {
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL ^ cm_mix64(seed);
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return cm_mix64(h);
}

uint64_t cm_hash_str(const char *s, uint64_t seed) { return cm_hash_bytes(s, strlen(s), seed); }
