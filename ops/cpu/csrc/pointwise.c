/* SiLU * up and bf16 -> fp32 logits: the why is in ops/cpu/pointwise.py. */
#include "nanoqwen_cpu.h"
#include "act_quant.h"
#include "gemv.h"
#include "pool.h"
#include "simd.h"

struct silu_mul_args {
    const void *x;
    void *out;
    int N, I, bf16;
    long rows;  /* a chunk's: pool_row_chunk */
};

/* out[o + i ..] = silu(x[gate + i ..]) * x[up + i ..], 8 values, rounded as the reference does. */
static inline void silu_mul8(const struct silu_mul_args *a, long gate, long up, long o, int i) {
    const __m256 g = load8(a->x, gate + i, a->bf16), one = _mm256_set1_ps(1.0f);
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    store8(a->out, o + i, round8(_mm256_mul_ps(round8(silu, a->bf16), load8(a->x, up + i, a->bf16)), a->bf16), a->bf16);
}

/* Rows [chunk * a->rows, ...) of silu_mul (pool.h; one thread: 8% of a 512-token bf16 prefill). */
static void silu_mul_chunk(const void *ctx, long chunk) {
    const struct silu_mul_args *a = ctx;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++)
        for (int i = 0; i < a->I; i += 8) silu_mul8(a, n * 2 * a->I, n * 2 * a->I + a->I, n * a->I, i);
}

AVX512_BEGIN
DEFINE_EXP(exp16, 512, roundscale)

/* round8 and store8 for 16 values. */
static inline __m512 round16(__m512 v, int bf16) {
    if (!bf16) {
        __asm__("" : "+v"(v));
        return v;
    }
    return _mm512_castsi512_ps(_mm512_and_si512(round16_bits(v), _mm512_set1_epi32((int)0xffff0000u)));
}
static inline void store16(void *p, long i, __m512 v, int bf16) {
    if (!bf16) _mm512_storeu_ps((float *)p + i, v);
    else _mm256_storeu_si256((__m256i *)((uint16_t *)p + i),
                             _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

/* silu_mul_chunk 16 values a step, the same operations lane for lane (the same bits): a decode step's silu_mul is its
   exp's and division's arithmetic, not a pass over memory (1 x 3072 bf16 hot on Zen 5: 2.4 µs by 8, 1.2 by 16). */
static void silu_mul_chunk512(const void *ctx, long chunk) {
    const struct silu_mul_args *a = ctx;
    const __m512 one = _mm512_set1_ps(1.0f);
    const int I = a->I, bf16 = a->bf16;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        const long gate = n * 2 * I, up = gate + I, o = n * I;
        int i = 0;
        for (; i + 16 <= I; i += 16) {
            const __m512 g = act_load16(a->x, gate + i, bf16);
            const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            store16(a->out, o + i, round16(_mm512_mul_ps(round16(silu, bf16), act_load16(a->x, up + i, bf16)), bf16),
                    bf16);
        }
        if (i < I) silu_mul8(a, gate, up, o, i);  /* I % 16 == 8 */
    }
}
AVX512_END

/* Shapes: see nanoqwen_cpu.h. */
void silu_mul(const void *x, void *out, int N, int I, int bf16) {
    const struct silu_mul_args a = {x, out, N, I, bf16, pool_row_chunk(N, I)};
    nanoqwen_pool_run(has_avx512() ? silu_mul_chunk512 : silu_mul_chunk, &a, (N + a.rows - 1) / a.rows);
}

/* bf16_to_fp32's values a pool chunk, the remainder in the last: under 2 chunks' (batch 1's logits) on the calling
   thread, a batch-8 step's 8 x 151,936 in 9 chunks on both threads. */
#define WIDEN_CHUNK_VALUES (1L << 17)

struct widen_args {
    const uint16_t *x;
    float *out;
    long n, chunks;
};

static void widen_chunk(const void *ctx, long chunk) {
    const struct widen_args *a = ctx;
    const long end = chunk == a->chunks - 1 ? a->n : (chunk + 1) * WIDEN_CHUNK_VALUES;
    long i = chunk * WIDEN_CHUNK_VALUES;
    for (; i + 8 <= end; i += 8) _mm256_storeu_ps(a->out + i, widen(a->x + i));
    for (; i < end; i++) a->out[i] = bf16_to_f32(a->x[i]);
}

/* Shapes: see nanoqwen_cpu.h. */
void bf16_to_fp32(const uint16_t *x, float *out, long n) {
    const struct widen_args a = {x, out, n, n < 2 * WIDEN_CHUNK_VALUES ? 1 : n / WIDEN_CHUNK_VALUES};
    nanoqwen_pool_run(widen_chunk, &a, a.chunks);
}
