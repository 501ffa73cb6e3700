/* A 64-column block of an int4 weight row (ops/torch_ref/linear_int4.py's layout) dequantised in registers, rounded
   as the torch reference rounds it: q * scale, then + offset, in fp32 (then to bf16 for a bf16 weight). dequant.c
   writes whole rows with it; linear_int4.c's fallback without scratch multiplies with it. Internal, not exported. */
#ifndef NANOQWEN_INT4_BLOCK_H
#define NANOQWEN_INT4_BLOCK_H

#include "simd.h"

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
