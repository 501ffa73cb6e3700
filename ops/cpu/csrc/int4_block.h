/* Where the kernels find a 64-column block of an int4 weight row, and the block dequantised in registers, rounded
   as the torch reference rounds it: q * scale, then + offset, in fp32 (then to bf16 for a bf16 weight). dequant.c
   writes whole rows with it; linear_int4.c's fallback without scratch multiplies with it. Internal, not exported. */
#ifndef NANOQWEN_INT4_BLOCK_H
#define NANOQWEN_INT4_BLOCK_H

#include "gemv.h"

/* The rows' order in memory. Plain: ops/torch_ref/linear_int4.py's, row by row. Quads: each 4 rows 4q..4q + 3 (of
   the first N / 4 * 4) block by block, block b of row 4q + i at byte 4q * K / 2 + 128 b + 32 i, the rest plain; for
   the AVX2 loops (linear_int4.c's madd_pieces), whose pass of 4 rows then reads one stream, not 4 interleaved ones
   that the hardware prefetcher follows badly (1 row cold on Zen 3: 0.73-0.95x the time, profiles/RESULTS.md).
   Quads exactly where linear_int4 takes those loops: the one place that decides, for every reader of the weights
   (linear_int4.c, dequant.c, embedding.c) and for the repack at load (linear_int4_pack). */
static inline int int4_quads(void) { return !has_avx512vl_vnni(); }

/* Rows stored in quads: int4_quads()'s answer for N rows, asked once a call. */
static inline long int4_quad_rows(long N) { return int4_quads() ? N / 4 * 4 : 0; }

/* Byte offset of block b (32 bytes) of weight row n of K columns, the first quad_rows rows in quads. */
static inline long int4_block_at(long n, long b, int K, long quad_rows) {
    return n < quad_rows ? (n & ~3L) * (K / 2) + 128 * b + 32 * (n & 3) : n * (K / 2) + 32 * b;
}

/* Column c of a block is nibble c / 16 of the block's 16-bit word c % 16: half h's 8 words widened to 32 bits
   (int4_words) give, nibble j of them (int4_dequant8), columns j * 16 + h * 8 .. + 7. */
static inline __m256i int4_words(const uint8_t *block, int half) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(block + half * 16)));
}

static inline __m256 int4_dequant8(__m256i words, int j, __m256 scale, __m256 offset, int bf16) {
    const __m256i q = _mm256_and_si256(_mm256_srli_epi32(words, 4 * j), _mm256_set1_epi32(15));
    /* the reference rounds the product before adding the offset: no FMA */
    return round8(_mm256_add_ps(round8(_mm256_mul_ps(_mm256_cvtepi32_ps(q), scale), 0), offset), bf16);
}

#endif
