/* SiLU * up and bf16 -> fp32 logits: the why is in ops/cpu/pointwise.py. */
#include "nanoqwen_cpu.h"
#include "simd.h"

/* Shapes: see nanoqwen_cpu.h. */
void silu_mul(const void *x, void *out, int N, int I, int bf16) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int n = 0; n < N; n++) {
        const long gate = (long)n * 2 * I, up = gate + I, o = (long)n * I;
        for (int i = 0; i < I; i += 8) {
            __m256 g = load8(x, gate + i, bf16);
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            store8(out, o + i, round8(_mm256_mul_ps(round8(silu, bf16), load8(x, up + i, bf16)), bf16), bf16);
        }
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void bf16_to_fp32(const uint16_t *x, float *out, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, widen(x + i));
    for (; i < n; i++) out[i] = bf16_to_f32(x[i]);
}
