/* Activation rows as short sums of int8 "pieces", for integer dot products (vpdpbusd, tdpbssd) against int8
   or int4 weights: the weights stay the only lossy step, the activations lose no more than fp32/bf16 rounding.
   Internal, not exported; AVX-512 F/BW (callers check the CPU). linear_int8.c and linear_int4.c use it.

   Row m of x is split into P pieces (1 <= P <= ACT_MAX_PIECES):
       x[m, k] ~= sum_{p < P} scale[m * P + p] * q[m * P + p][k],   q in [-127, 127]
   scale[m * P] = max_k |x[m, k]| / 127; each next piece quantises the previous residual (|r| <= scale / 2)
   with scale / ACT_PIECE_RATIO, so |x[m, k] - sum| <= max_k |x[m, k]| / 127 / 254^(P - 1) / 2
   plus fp32 rounding (~2^-24 of the row's largest element): P = 2: 1.55e-5 (~2^-16) of the row's largest
   element, P = 3: 6.1e-8 (~2^-24; measured up to 7.0e-8 with the rounding), P = 4: 2.4e-10 (the rounding
   alone). An all-zero row (or a piece whose scale falls below FLT_MIN) has scale 0 and q 0; a row with a NaN
   or an infinity has NaN scales (and meaningless q), so that its dot products come out NaN.

   API (stable):
   act_quant_rows(x, bf16, M, K, P, q, scale, wild)
       x:     [M, K] bf16 (bf16 != 0) or fp32; K % 16 == 0.
       q:     [M * P, K] int8, written: piece p of row m is row m * P + p.
       scale: [M * P] fp32, written.
       wild:  [M], written: whether each row is past the pieces' range (pieces_out_of_range).
   AMX takes the pieces grouped in quads: act_quads (amx.h). */
#ifndef NANOQWEN_ACT_QUANT_H
#define NANOQWEN_ACT_QUANT_H

#include <float.h>

#include "simd.h"

#define ACT_MAX_PIECES 4
#define ACT_PIECE_RATIO 254.0f  /* 2 * 127: a residual of at most half the previous scale fills [-127, 127] */

/* The largest |x| the pieces take (act_quant.h, act_quant16.h, act_block8.h): the callers' fp32 ends multiply a
   block's int32 sum (linear_int4's up to 64 x 127 x 15) by the activations' scale (max |x| / 127), so that 3e38 gave
   inf where the reference is finite; below 2^64 that product stays under 2^74. A row past it, infinite or NaN (whose
   pieces' NaN scales make every output NaN) is recomputed by the caller as the reference computes it. */
#define PIECES_RANGE 0x1p64f

/* Whether a row is past the pieces' range: a NaN (`unordered`: whether one of its values is; a NaN can hide a lane's
   largest |x| from a max, which takes its second operand then), an infinity or a value past PIECES_RANGE (`most`: its
   largest |x|). Said by the pass that finds `most` (act_quant_rows, act16_quant_rows, act8_block_row, linear_int4.c's
   block_stats), not by one of its own: such a pass cost ~0.35 ms of a ~35 ms int4 step at 8 rows (profiles/RESULTS.md,
   lane b8_43). */
static inline int pieces_out_of_range(int unordered, float most) { return unordered || most > PIECES_RANGE; }

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")

static inline __m512 act_load16(const void *x, long i, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)x + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline void act_quant_rows(const void *x, int bf16, int M, int K, int P, int8_t *q, float *scale, int *wild) {
    for (int m = 0; m < M; m++) {
        const long row = (long)m * K;
        __m512 amax = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (int k = 0; k < K; k += 16) {
            const __m512 v = act_load16(x, row + k, bf16);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
        const float most = _mm512_reduce_max_ps(amax);
        wild[m] = pieces_out_of_range(nan != 0, most);
        float s = most / 127.0f;
        const int finite = !nan && s <= FLT_MAX;
        __m512 scales[ACT_MAX_PIECES], inverses[ACT_MAX_PIECES];
        for (int p = 0; p < P; p++, s /= ACT_PIECE_RATIO) {
            if (!(s >= FLT_MIN)) s = 0.0f;
            scale[m * P + p] = finite ? s : NAN;
            scales[p] = _mm512_set1_ps(s), inverses[p] = _mm512_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
        }
        for (int k = 0; k < K; k += 16) {
            __m512 r = act_load16(x, row + k, bf16);
            for (int p = 0; p < P; p++) {
                /* |r| * inverse <= 127 up to its rounding, so the conversion's saturation is no clamp; only a
                   row with a NaN or an infinity (NaN scales) reaches it */
                const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(r, inverses[p]));
                r = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(v), scales[p], r);  /* the exact residual, rounded once */
                _mm_storeu_si128((__m128i *)(q + (long)(m * P + p) * K + k), _mm512_cvtsepi32_epi8(v));
            }
        }
    }
}

#pragma GCC pop_options

#endif
