/* Activation rows as int8 blocks, llama.cpp's Q8 style, for vpmaddubsw against the nibbles on CPUs without AVX-512
   VNNI (AVX2 only: linear_int4.c's bf16 rows). Internal, not exported.

   Each 64-column block of row m gets a scale of its own, s = max |x| / 127 over the block, and
       x[m, k] ~= s * q[m, k],   q in [-127, 127] (round to nearest even),
   so |x - s q| <= s / 2 = max over the block / 254 an element, rounded once. An all-zero block has scale 0 and q 0;
   a row with a NaN or an infinity has NaN scales (every block's).

   act8_block_rows(x, bf16, M, K, q, scale)
       x:     [M, K] bf16 (bf16 != 0) or fp32; K % 64 == 0.
       q:     [M, K] int8, written, in x's order.
       scale: [M][K / 64] fp32, written. */
#ifndef NANOQWEN_ACT_BLOCK8_H
#define NANOQWEN_ACT_BLOCK8_H

#include <float.h>

#include "simd.h"

static inline void act8_block_rows(const void *x, int bf16, int M, int K, int8_t *q, float *scale) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i top = _mm256_set1_epi32(127), bottom = _mm256_set1_epi32(-127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int m = 0; m < M; m++) {
        int finite = 1;
        for (int b = 0; b < K / 64; b++) {
            const long at = (long)m * K + 64L * b;
            __m256 v[8], amax = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
            for (int i = 0; i < 8; i++) {
                v[i] = load8(x, at + 8 * i, bf16);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
                unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            float s = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))) / 127.0f;
            finite &= _mm256_movemask_ps(unordered) == 0 && s <= FLT_MAX;
            if (!(s >= FLT_MIN)) s = 0.0f;
            scale[(long)m * (K / 64) + b] = s;
            const __m256 inverse = _mm256_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
            __m256i c[8];
            for (int i = 0; i < 8; i++)  /* the clamp only catches the rounding past 127 (and a NaN row's values) */
                c[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)), top), bottom);
            for (int i = 0; i < 8; i += 4) {  /* packs works within 128-bit lanes: dwords 0 4 1 5 2 6 3 7, put back */
                const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(c[i], c[i + 1]), _mm256_packs_epi32(c[i + 2], c[i + 3]));
                _mm256_storeu_si256((__m256i *)(q + at + 8 * i), _mm256_permutevar8x32_epi32(w, order));
            }
        }
        if (!finite)
            for (int b = 0; b < K / 64; b++) scale[(long)m * (K / 64) + b] = NAN;
    }
}

#endif
