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

/* The scale and offset of the group of row n holding column k, broadcast. */
INLINE void group_at(const struct dequant_args *a, long n, long k, int bf16, __m256 *s, __m256 *o) {
    const long g = n * (a->K / a->G) + k / a->G;
    *s = _mm256_set1_ps(load1(a->scale, g, bf16));
    *o = _mm256_set1_ps(load1(a->offset, g, bf16));
}

/* Nibbles q of columns k .. k + 7 of row n dequantised into the output. */
INLINE void put8(const struct dequant_args *a, long n, long k, int bf16, __m256i q, __m256 s, __m256 o) {
    store8(a->out, n * a->K + k, int4_dequant8(q, s, o, bf16), bf16);
}

/* Spanned rows (int4_block.h): each block's plain bytes gathered from its span. */
INLINE void span_rows(const struct dequant_args *a, long chunk, int bf16) {
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++)
        for (long b = 0; b < a->K / 64; b++) {
            uint8_t bytes[32];
            __m256 s, o;
            _mm256_storeu_si256((__m256i *)bytes, int4_span_block(a->w, n, b, a->K));
            group_at(a, n, 64 * b, bf16, &s, &o);
            for (int j = 0; j < 8; j++) put8(a, n, 64 * b + 8 * j, bf16, int4_plain_columns8(bytes, 8 * j), s, o);
        }
}

/* The nb blocks of the interleaved chunk at `at`, columns k .. k + 64 nb - 1 of row n: block b's columns 8j .. 8j + 7
   from dword nb j + b. nb a constant where inlined, so that the dwords are fixed offsets from `at`. */
INLINE void il_chunk(const struct dequant_args *a, const uint8_t *at, int nb, long n, long k, int bf16) {
    for (int b = 0; b < nb; b++) {
        __m256 s, o;
        group_at(a, n, k + 64 * b, bf16, &s, &o);
        for (int j = 0; j < 8; j++)
            put8(a, n, k + 64 * b + 8 * j, bf16, int4_dword_columns8(at + 4 * (nb * j + b)), s, o);
    }
}

INLINE void il_rows(const struct dequant_args *a, long chunk, int bf16) {
    const int K = a->K;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        for (long c = 0; c < K / 256; c++)
            il_chunk(a, a->w + int4_chunk_at(n, c, K, a->quad_rows), 4, n, 256 * c, bf16);
        if (K % 256)  /* the row's last chunk, of fewer blocks */
            il_chunk(a, a->w + int4_chunk_at(n, K / 256, K, a->quad_rows), K % 256 / 64, n, K / 256 * 256, bf16);
    }
}

/* The arguments copied, so that the compiler keeps them in registers across the stores to out (which might alias
   them for all it knows), and bf16 a constant in each instance. */
static void dequant_span_rows(const void *ctx, long chunk) {
    const struct dequant_args a = *(const struct dequant_args *)ctx;
    if (a.bf16) span_rows(&a, chunk, 1); else span_rows(&a, chunk, 0);
}

static void dequant_il_rows(const void *ctx, long chunk) {
    const struct dequant_args a = *(const struct dequant_args *)ctx;
    if (a.bf16) il_rows(&a, chunk, 1); else il_rows(&a, chunk, 0);
}

/* Shapes: see nanoqwen_cpu.h. */
void dequant_int4(const uint8_t *w, const void *scale, const void *offset, void *out, int N, int K, int G, int bf16) {
    const struct dequant_args a = {w, scale, offset, out, N, K, G, bf16, pool_rows_per_chunk(K / 2), int4_quad_rows(N)};
    nanoqwen_pool_run(int4_interleaved() ? dequant_il_rows : dequant_span_rows, &a, (N + a.rows - 1) / a.rows);
}
