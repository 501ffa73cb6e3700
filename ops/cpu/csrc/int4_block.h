/* Where the kernels find an int4 weight's nibbles, and 8 of them dequantised in registers, rounded as the torch
   reference rounds them: q * scale, then + offset, in fp32 (then to bf16 for a bf16 weight). dequant.c writes whole
   rows with it; linear_int4.c's fallback without scratch multiplies with it. Internal, not exported. */
#ifndef NANOQWEN_INT4_BLOCK_H
#define NANOQWEN_INT4_BLOCK_H

#include "gemv.h"

/* The layouts. Plain: ops/torch_ref/linear_int4.py's, row by row; column c of a 64-column block is nibble c / 16 of
   the block's 16-bit word c % 16. The kernels read one of two others, both in chunks of blocks (the last chunk of a
   row has K / 64 % width blocks where that is not 0), a chunk of nb blocks holding dword j of block b at byte
   4 (nb j + b): a vector then holds in int32 lane L dwords of block L % width only. Spanned, for the AVX-512 VNNI
   loops (linear_int4.c's span_vnni): chunks of 16 blocks (a span, 1024 columns; 512 bytes: 8 vectors of 64, lane b
   block b), each dword as plain (columns 2j, 2j + 16, 2j + 32, 2j + 48, 2j + 1, ... of its nibbles), so that a
   span's 8 vectors come as vpdpbusd takes them without the 24 permutes that transposed them in registers (1 row of
   1024 x 1024 hot, one thread on Zen 5: 0.87x the time, profiles/RESULTS.md, zen5); the rows one after another.
   Interleaved, for the AVX2 loops (linear_int4.c's il_*): chunks of 4 blocks (256 columns), dword j holding columns
   8j .. 8j + 7 of its block, nibble i column 8j + i, so that vpmaddubsw's int16 sums of 4 blocks add by vpaddw and
   one vpmaddwd leaves block b in lanes b and 4 + b (profiles/RESULTS.md, int4b8's "ubs-il"). And the rows in quads:
   each 4 rows 4q .. 4q + 3 (of the first N / 4 * 4) chunk by chunk, chunk c of row 4q + i at byte
   4q * K / 2 + 512 c + 32 nb i, so that a pass of 4 rows reads one stream, not 4 interleaved ones that the hardware
   prefetcher follows badly (1 row cold on Zen 3: 0.73-0.95x the time); the rest row by row.
   Interleaved exactly where linear_int4 takes those loops, else spanned: the one place that decides, for every
   reader of the weights (linear_int4.c, dequant.c, embedding.c) and for the repack at load (linear_int4_pack). */
static inline int int4_interleaved(void) { return !has_avx512vl_vnni(); }

/* Blocks in a whole chunk. */
static inline int int4_chunk_width(void) { return int4_interleaved() ? 4 : 16; }

/* Rows stored in quads: N / 4 * 4 where interleaved, else 0. */
static inline long int4_quad_rows(long N) { return int4_interleaved() ? N / 4 * 4 : 0; }

/* Blocks in chunk c of a row of K columns. */
static inline int int4_chunk_blocks(int K, long c) {
    const int width = int4_chunk_width();
    return K / 64 - width * c < width ? (int)(K / 64 - width * c) : width;
}

/* Byte offset of chunk c of weight row n (K columns, the first quad_rows rows in quads). */
static inline long int4_chunk_at(long n, long c, int K, long quad_rows) {
    return n < quad_rows ? (n & ~3L) * (K / 2) + 512 * c + 32L * int4_chunk_blocks(K, c) * (n & 3)
                         : n * (K / 2) + 32L * int4_chunk_width() * c;
}

/* Byte offset of dword j of block b of weight row n. */
static inline long int4_dword_at(long n, long b, int j, int K, long quad_rows) {
    const int width = int4_chunk_width();
    return int4_chunk_at(n, b / width, K, quad_rows) + 4L * (int4_chunk_blocks(K, b / width) * j + b % width);
}

/* Column k of plain row `row` (K / 2 bytes). */
static inline int int4_plain_nibble(const uint8_t *row, long k) {
    const uint8_t byte = row[32 * (k / 64) + 2 * (k % 16) + (k % 64 / 16 >> 1)];
    return k % 64 / 16 & 1 ? byte >> 4 : byte & 15;
}

/* Block b of spanned weight row n (K columns) as its 32 plain bytes: 8 dwords 4 nb bytes apart, inserted one by
   one: dequant_int4 of 3072 x 1024 bf16 took 1.02x the time it takes on plain rows, through a gather 1.50x. */
static inline __m256i int4_span_block(const uint8_t *w, long n, long b, int K) {
    const uint8_t *p = w + int4_dword_at(n, b, 0, K, 0);
    const long step = 4L * int4_chunk_blocks(K, b / 16);
    int32_t d[8];
    for (int j = 0; j < 8; j++) memcpy(d + j, p + step * j, 4);
    return _mm256_setr_epi32(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]);
}

/* Columns k .. k + 7 (k % 8 == 0) of plain row `row` (K / 2 bytes) as int32: nibble k % 64 / 16 of the words k % 16
   .. + 7 of its block. */
static inline __m256i int4_plain_columns8(const uint8_t *row, long k) {
    const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 32 * (k / 64) + 2 * (k % 16))));
    return _mm256_and_si256(_mm256_srli_epi32(words, (int)(4 * (k % 64 / 16))), _mm256_set1_epi32(15));
}

/* The 8 columns of an interleaved dword (nibble i column i) as int32. */
static inline __m256i int4_dword_columns8(const uint8_t *dword) {
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(*(const int *)dword),
                                              _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                            _mm256_set1_epi32(15));
}

/* Block b of weight row n (K columns) in the layout int4_interleaved() decides (quad_rows: int4_quad_rows(N)) -> q:
   column c's nibble at q[c], as int32. A reader of single columns builds each block once: embedding_int4 rebuilt
   a span's block for each column (2048 ids of the LM head's table: 8.3-10.4 ms against 2.3-5.1, profiles/RESULTS.md). */
static inline void int4_block_q(const uint8_t *w, long n, long b, int K, long quad_rows, int32_t q[64]) {
    if (!int4_interleaved()) {
        uint8_t bytes[32];
        _mm256_storeu_si256((__m256i *)bytes, int4_span_block(w, n, b, K));
        for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(q + 8 * j), int4_plain_columns8(bytes, 8 * j));
        return;
    }
    for (int j = 0; j < 8; j++)
        _mm256_storeu_si256((__m256i *)(q + 8 * j), int4_dword_columns8(w + int4_dword_at(n, b, j, K, quad_rows)));
}

/* 8 nibbles q (int32) dequantised: q * scale + offset as the reference rounds it. */
static inline __m256 int4_dequant8(__m256i q, __m256 scale, __m256 offset, int bf16) {
    /* the reference rounds the product before adding the offset: no FMA */
    return round8(_mm256_add_ps(round8(_mm256_mul_ps(_mm256_cvtepi32_ps(q), scale), 0), offset), bf16);
}

#endif
