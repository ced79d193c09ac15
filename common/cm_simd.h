/* cm_simd.h - hot elementwise loops built twice, chosen at load time.
 * SPDX-License-Identifier: MIT
 *
 * CM_SIMD_CLONES before a function definition builds it for AVX2 and for
 * the baseline (an ifunc picks one when the program loads), so a build
 * without -march=native still runs 8-wide vectors where the CPU has them.
 * Use it only on elementwise loops: each output value is computed by the
 * same IEEE operations in both versions (ISO C mode contracts no FMA, and
 * AVX2 alone brings none), so both give bit-identical results. A function
 * with clones is never inlined: keep it for loops over whole buffers.
 */
#ifndef CM_SIMD_H
#define CM_SIMD_H

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define CM_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CM_SIMD_CLONES
#endif

#endif /* CM_SIMD_H */
