/* Activation rows as int8 blocks, llama.cpp's Q8 style, for linear_int4.c's bf16 rows: vpmaddubsw against the
   nibbles on CPUs without AVX-512 VNNI (act8_block_row), vpdpbusd where it has it (linear_int4.c's block_row, in
   its spans' order). Internal, not exported.

   Each 64-column block of row m gets a scale of its own, s = max |x| / 127 over the block (act8_scale), and
       x[m, k] ~= s * q[m, k],   q = clamp(round(x * act8_inverse(s)), -127, 127) (fp32, round to nearest even),
   so |x - s q| <= s / 2 = max over the block / 254 an element, rounded once. An all-zero block has scale 0 and q 0;
   a row with a NaN or an infinity has NaN scales (every block's). Both loops round so, as the torch reference
   (ops/torch_ref/act_block8.py) does: the same q and scales bit for bit.

   Written as the interleaved int4 weights are read (int4_block.h): in chunks of 4 blocks, each chunk's 32-byte
   vector V holding in int32 lane L columns of block L % 4 (linear_int4.c's IL_COLUMN), the even columns of 16 (V even)
   or the odd ones. So each block's 16-column runs are split even / odd by one byte shuffle and stored a dword at a
   time, 16 bytes apart: no second pass rearranges them.

   The same pass over a row also sums its groups (the offsets multiply them) and says whether it is past the pieces'
   range (act_quant.h's PIECES_RANGE), which each took a pass of its own (~0.35 ms of a ~35 ms int4 step at 8 rows,
   profiles/RESULTS.md, lane b8_43).

   act8_block_row(x, bf16, m, M, K, G, q, lanes, gsum): row m of M; returns whether it is out of range
   (act_quant.h's pieces_out_of_range)
       x:     [M, K] bf16 (bf16 != 0) or fp32; K % 64 == 0, G % 64 == 0, K % G == 0.
       q:     [chunks][M][256] int8, row m's written, chunks = ceil(K / 256), the places of blocks past K 0.
       lanes: [M][chunks][8] fp32, row m's written: lane L the scale of the chunk's block L % 4 (0 past K).
       gsum:  [M][K / G] fp32, row m's written: each group's sum, 8 columns a vector added in column order, then
              hsum'd. */
#ifndef NANOQWEN_ACT_BLOCK8_H
#define NANOQWEN_ACT_BLOCK8_H

#include <float.h>
#include <string.h>

#include "act_quant.h"
#include "simd.h"

/* A block's scale from its largest |x| (amax): 0 below FLT_MIN, inf from an infinite amax (the row is not finite). */
static inline float act8_scale(float amax) {
    const float s = amax / 127.0f;
    return s >= FLT_MIN ? s : 0.0f;
}

/* What a block's values are multiplied by before they are rounded to int8. */
static inline float act8_inverse(float s) { return s > 0.0f ? 1.0f / s : 0.0f; }

static inline int act8_block_row(const void *x, int bf16, int m, int M, int K, int G, int8_t *q, float *lanes,
                                 float *gsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i top = _mm256_set1_epi32(127), bottom = _mm256_set1_epi32(-127);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    /* each 16 columns' even ones, then their odd ones */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const int blocks = K / 64, per_group = G / 64;
    const long chunks = (K + 255) / 256;
    float *lane = lanes + (long)m * chunks * 8;
    if (blocks % 4) {  /* the last chunk's places past K */
        memset(q + ((chunks - 1) * M + m) * 256, 0, 256);
        memset(lane + (chunks - 1) * 8, 0, 8 * sizeof *lane);
    }
    int finite = 1, wild = 0;
    __m256 group = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        const long at = (long)m * K + 64L * b;
        __m256 v[8], amax = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
        if (b % per_group == 0) group = _mm256_setzero_ps();
        for (int i = 0; i < 8; i++) {
            v[i] = load8(x, at + 8 * i, bf16);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
            group = _mm256_add_ps(group, v[i]);
        }
        if ((b + 1) % per_group == 0) gsum[(long)m * (K / G) + b / per_group] = hsum(group);
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float most = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))), s = act8_scale(most);
        wild |= pieces_out_of_range(_mm256_movemask_ps(unordered) != 0, most);
        finite &= _mm256_movemask_ps(unordered) == 0 && s <= FLT_MAX;
        lane[b / 4 * 8 + b % 4] = lane[b / 4 * 8 + b % 4 + 4] = s;
        const __m256 inverse = _mm256_set1_ps(act8_inverse(s));
        __m256i c[8];
        for (int i = 0; i < 8; i++)  /* the clamp only catches the rounding past 127 (and a NaN row's values) */
            c[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)), top), bottom);
        int8_t *to = q + ((long)b / 4 * M + m) * 256 + 4 * (b % 4);
        for (int i = 0; i < 8; i += 4) {  /* packs works within 128-bit lanes: dwords 0 4 1 5 2 6 3 7, put back */
            const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(c[i], c[i + 1]), _mm256_packs_epi32(c[i + 2], c[i + 3]));
            int32_t dword[8];  /* dword d: columns 8 i + 16 (d / 4) + 8 (d % 2)'s evens (d % 4 < 2) or odds */
            _mm256_storeu_si256((__m256i *)dword, _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(w, order), split));
            for (int d = 0; d < 8; d++) memcpy(to + 16 * (2 * i + d), &dword[d], 4);
        }
    }
    if (!finite)
        for (int b = 0; b < blocks; b++) lane[b / 4 * 8 + b % 4] = lane[b / 4 * 8 + b % 4 + 4] = NAN;
    return wild;
}

#endif
