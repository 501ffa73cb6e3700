/* SiLU * up and bf16 -> fp32 logits: the why is in ops/cpu/pointwise.py. */
#include "nanoqwen_cpu.h"
#include "simd.h"

static inline __m256 load8(const void *p, long i, int bf16) {
    return bf16 ? widen((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}

/* 8 fp32 -> bf16 (round to nearest even; inputs are never NaN here) or fp32, stored at p + i. */
static inline void store8(void *p, long i, __m256 v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
}

/* bf16 rounding of 8 fp32 values, kept in fp32 (identity for fp32 models). */
static inline __m256 round8(__m256 v, int bf16) {
    if (!bf16) return v;
    uint16_t tmp[8];
    store8(tmp, 0, v, 1);
    return widen(tmp);
}

/* Shapes: see nanoqwen_cpu.h. */
void silu_mul(const void *x, void *out, int N, int I, int bf16) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int n = 0; n < N; n++) {
        const long gate = (long)n * 2 * I, up = gate + I, o = (long)n * I;
        for (int i = 0; i < I; i += 8) {
            __m256 g = load8(x, gate + i, bf16);
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            store8(out, o + i, _mm256_mul_ps(round8(silu, bf16), load8(x, up + i, bf16)), bf16);
        }
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void bf16_to_fp32(const uint16_t *x, float *out, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, widen(x + i));
    for (; i < n; i++) out[i] = bf16_to_f32(x[i]);
}
