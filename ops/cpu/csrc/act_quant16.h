/* Activation rows as short sums of int16 "pieces", for vpmaddwd against int8 weights widened to int16 on CPUs
   without AVX-512 VNNI (AVX2 only). act_quant.h's int8 pieces, one level wider: one int16 piece holds what two
   int8 pieces do. Internal, not exported.

   Row m of x is split into P pieces (1 <= P <= ACT16_MAX_PIECES):
       x[m, k] ~= sum_{p < P} scale[m * P + p] * q[m * P + p][k],   q in [-32767, 32767]
   scale[m * P] = max_k |x[m, k]| / 32767; each next piece quantises the previous residual (|r| <= scale / 2)
   with scale / ACT16_PIECE_RATIO, so |x[m, k] - sum| <= max_k |x[m, k]| / 32767 / 65534^(P - 1) / 2 plus fp32
   rounding: P = 1: 1.53e-5 of the row's largest element (act_quant.h's 2 pieces: 1.55e-5), P = 2: 2.3e-10 (its
   4 pieces: 2.4e-10). An all-zero row has scale 0 and q 0; a row with a NaN or an infinity has NaN scales.

   ACT16_PIECES(n) int16 pieces are as close as n int8 ones (act_quant.h): the callers' count, in one place.

   act16_quant_rows(x, bf16, M, K, P, block, q, scale, wild)
       x:     [M, K] bf16 (bf16 != 0) or fp32; K % 16 == 0.
       block: columns a block (K % block == 0, block % 16 == 0): K for piece rows of K, 64 for linear_int4's layout.
       q:     [K / block][M * P][block] int16, written: piece p of row m is row m * P + p of each block.
       scale: [M * P] fp32, written.
       wild:  [M], written: whether each row is past the pieces' range (act_quant.h's pieces_out_of_range). */
#ifndef NANOQWEN_ACT_QUANT16_H
#define NANOQWEN_ACT_QUANT16_H

#include <float.h>

#include "act_quant.h"
#include "simd.h"

#define ACT16_MAX_PIECES 2
#define ACT16_PIECES(int8_pieces) (((int8_pieces) + 1) / 2)
#define ACT16_PIECE_RATIO 65534.0f  /* 2 * 32767: a residual of at most half the previous scale fills the range */

static inline void act16_quant_rows(const void *x, int bf16, int M, int K, int P, int block, int16_t *q,
                                    float *scale, int *wild) {
    const long blocks = (long)M * P * block;  /* from one block's pieces to the next's */
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i top = _mm256_set1_epi32(32767), bottom = _mm256_set1_epi32(-32767);
    for (int m = 0; m < M; m++) {
        const long row = (long)m * K;
        __m256 amax = _mm256_setzero_ps(), unordered = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8) {
            const __m256 v = load8(x, row + k, bf16);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float most = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        wild[m] = pieces_out_of_range(_mm256_movemask_ps(unordered) != 0, most);
        float s = most / 32767.0f;
        const int finite = _mm256_movemask_ps(unordered) == 0 && s <= FLT_MAX;
        __m256 scales[ACT16_MAX_PIECES], inverses[ACT16_MAX_PIECES];
        for (int p = 0; p < P; p++, s /= ACT16_PIECE_RATIO) {
            if (!(s >= FLT_MIN)) s = 0.0f;
            scale[m * P + p] = finite ? s : NAN;
            scales[p] = _mm256_set1_ps(s), inverses[p] = _mm256_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
        }
        int16_t *out = q + (long)m * P * block;  /* row m's pieces in the block from k0 */
        for (int k0 = 0; k0 < K; k0 += block, out += blocks)
            for (int c = 0; c < block; c += 16) {
                __m256 r[2] = {load8(x, row + k0 + c, bf16), load8(x, row + k0 + c + 8, bf16)};
                for (int p = 0; p < P; p++) {
                    __m256i v[2];
                    for (int i = 0; i < 2; i++) {
                        /* the clamp only catches the rounding of |r| * inverse past 32767 (and a NaN row's values) */
                        v[i] = _mm256_cvtps_epi32(_mm256_mul_ps(r[i], inverses[p]));
                        v[i] = _mm256_max_epi32(_mm256_min_epi32(v[i], top), bottom);
                        /* the residual, rounded once */
                        r[i] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(v[i]), scales[p], r[i]);
                    }
                    /* packs works within 128-bit lanes: 0-3 8-11 4-7 12-15, put back in order */
                    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0xd8);
                    _mm256_storeu_si256((__m256i *)(out + (long)p * block + c), packed);
                }
            }
    }
}

#endif
