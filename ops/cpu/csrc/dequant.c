/* Dequantising blocks of int4 weight rows for prefill-sized linears: the why is in ops/cpu/dequant.py. Each value
   is rounded as the torch reference rounds it: q * scale, then + offset, in fp32, then to the output dtype. */
#include "nanoqwen_cpu.h"
#include "int4_block.h"
#include "pool.h"

struct dequant_args {
    const uint8_t *w;  /* rows of K / 2 bytes in linear_int4's layout (int4_block.h) */
    const void *scale, *offset;
    void *out;
    int N, K, G, bf16;
    long rows;       /* per chunk */
    long quad_rows;  /* rows stored in quads */
};

static void dequant_int4_chunk(const void *ctx, long chunk) {
    const struct dequant_args *a = ctx;
    const int K = a->K, groups = K / a->G;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        for (int b = 0; b < K / 64; b++) {
            const long g = n * groups + b * 64 / a->G;
            const __m256 s = _mm256_set1_ps(load1(a->scale, g, a->bf16)), o = _mm256_set1_ps(load1(a->offset, g, a->bf16));
            for (int k = b * 64; k < b * 64 + 64; k += 8)
                store8(a->out, n * K + k, int4_dequant8(int4_columns8(a->w, n, k, K, a->quad_rows), s, o, a->bf16),
                       a->bf16);
        }
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void dequant_int4(const uint8_t *w, const void *scale, const void *offset, void *out, int N, int K, int G, int bf16) {
    const struct dequant_args a = {w, scale, offset, out, N, K, G, bf16, pool_rows_per_chunk(K / 2), int4_quad_rows(N)};
    pool_run(dequant_int4_chunk, &a, (N + a.rows - 1) / a.rows);
}
