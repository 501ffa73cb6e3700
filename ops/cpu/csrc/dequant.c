/* Dequantising blocks of int4 weight rows for prefill-sized linears: the why is in ops/cpu/dequant.py. Each value
   is rounded as the torch reference rounds it: q * scale, then + offset, in fp32, then to the output dtype. */
#include "nanoqwen_cpu.h"
#include "pool.h"
#include "simd.h"

struct dequant_args {
    const uint8_t *w;  /* rows of K / 2 bytes in ops/torch_ref/linear_int4.py's layout */
    const void *scale, *offset;
    void *out;
    int N, K, G, bf16;
    long rows;  /* per chunk */
};

/* Column c of a 64-column block is nibble c / 16 of the block's 16-bit word c % 16: 8 words widened to 32 bits
   give 8 consecutive columns of each of the block's four 16-column quarters. */
static void dequant_int4_chunk(const void *ctx, long chunk) {
    const struct dequant_args *a = ctx;
    const int K = a->K, groups = K / a->G;
    const __m256i nibble = _mm256_set1_epi32(15);
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        const uint8_t *row = a->w + n * (K / 2);
        for (int b = 0; b < K / 64; b++) {
            const long g = n * groups + b * 64 / a->G;
            const __m256 s = _mm256_set1_ps(load1(a->scale, g, a->bf16)), o = _mm256_set1_ps(load1(a->offset, g, a->bf16));
            for (int half = 0; half < 2; half++) {
                const __m256i words = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + b * 32 + half * 16)));
                for (int j = 0; j < 4; j++) {
                    const __m256i q = _mm256_and_si256(_mm256_srli_epi32(words, 4 * j), nibble);
                    /* the reference rounds the product before adding the offset: no FMA */
                    const __m256 v = _mm256_add_ps(round8(_mm256_mul_ps(_mm256_cvtepi32_ps(q), s), 0), o);
                    store8(a->out, n * K + b * 64 + j * 16 + half * 8, round8(v, a->bf16), a->bf16);
                }
            }
        }
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void dequant_int4(const uint8_t *w, const void *scale, const void *offset, void *out, int N, int K, int G, int bf16) {
    const struct dequant_args a = {w, scale, offset, out, N, K, G, bf16, pool_rows_per_chunk(K / 2)};
    pool_run(dequant_int4_chunk, &a, (N + a.rows - 1) / a.rows);
}
