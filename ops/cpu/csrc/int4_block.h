/* Where the kernels find a 64-column block of an int4 weight row, and the block dequantised in registers, rounded
   as the torch reference rounds it: q * scale, then + offset, in fp32 (then to bf16 for a bf16 weight). dequant.c
   writes whole rows with it; linear_int4.c's fallback without scratch multiplies with it. Internal, not exported. */
#ifndef NANOQWEN_INT4_BLOCK_H
#define NANOQWEN_INT4_BLOCK_H

#include "gemv.h"

/* The weights' order in memory, one of two, decided here for every reader of the weights (linear_int4.c, dequant.c,
   embedding.c) and for the repack at load (linear_int4_pack); ops/torch_ref/linear_int4.py's block layout is neither.
   Quads, where linear_int4 takes its AVX2 loops: each 4 rows 4q..4q + 3 (of the first N / 4 * 4) block by block,
   block b of row 4q + i at byte 4q * K / 2 + 128 b + 32 i, the rest plain (row by row, each block's 32 bytes in
   order); so that a pass of 4 rows (linear_int4.c's madd_pieces) reads one stream, not 4 interleaved ones that the
   hardware prefetcher follows badly (1 row cold on Zen 3: 0.73-0.95x the time, profiles/RESULTS.md). Spans, with
   AVX-512 VNNI: each row in place, its blocks in spans of 16 (the last K / 64 % 16, count), dword d (of 8) of the
   span's block b at byte 4 * (count * d + b) of the span's 16 * 32: the order in which the 1-row vpdpbusd loop wants
   them, lane b block b, loaded ready-made, not transposed by 24 permutes a span (hot in L2 0.76x the time,
   profiles/RESULTS.md, int4span). */
enum { INT4_QUADS = 1, INT4_SPANS = 2 };
static inline int int4_layout(void) { return has_avx512vl_vnni() ? INT4_SPANS : INT4_QUADS; }
static inline int int4_quads(void) { return int4_layout() == INT4_QUADS; }

/* Rows stored in quads: int4_quads()'s answer for N rows, asked once a call. */
static inline long int4_quad_rows(long N) { return int4_quads() ? N / 4 * 4 : 0; }

/* Byte offset of block b (32 bytes) of weight row n of K columns, the first quad_rows rows in quads, the rest plain. */
static inline long int4_block_at(long n, long b, int K, long quad_rows) {
    return n < quad_rows ? (n & ~3L) * (K / 2) + 128 * b + 32 * (n & 3) : n * (K / 2) + 32 * b;
}

/* Block b of weight row n of w, its 32 bytes in order, in either layout (spans: int4_layout() == INT4_SPANS,
   quad_rows then 0); in spans gathered, 8 dwords count * 4 bytes apart. */
static inline __m256i int4_block(const uint8_t *w, long n, long b, int K, long quad_rows, int spans) {
    if (!spans) return _mm256_loadu_si256((const __m256i *)(w + int4_block_at(n, b, K, quad_rows)));
    const long t = b / 16, left = K / 64 - 16 * t;
    const int count = left < 16 ? (int)left : 16;
    const __m256i dwords = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(count));
    return _mm256_i32gather_epi32((const int *)(w + n * (K / 2) + 512 * t + 4 * (b % 16)), dwords, 4);
}

/* Column c of a block is nibble c / 16 of the block's 16-bit word c % 16: half h's 8 words widened to 32 bits
   (int4_words) give, nibble j of them (int4_dequant8), columns j * 16 + h * 8 .. + 7. */
static inline __m256i int4_words(__m256i block, int half) {
    return _mm256_cvtepu16_epi32(half ? _mm256_extracti128_si256(block, 1) : _mm256_castsi256_si128(block));
}

static inline __m256 int4_dequant8(__m256i words, int j, __m256 scale, __m256 offset, int bf16) {
    const __m256i q = _mm256_and_si256(_mm256_srli_epi32(words, 4 * j), _mm256_set1_epi32(15));
    /* the reference rounds the product before adding the offset: no FMA */
    return round8(_mm256_add_ps(round8(_mm256_mul_ps(_mm256_cvtepi32_ps(q), scale), 0), offset), bf16);
}

#endif
