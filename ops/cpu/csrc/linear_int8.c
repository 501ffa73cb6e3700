/* int8 weight-only linear layers (symmetric per output channel): the why is in ops/cpu/linear_int8.py. */
#include "nanoqwen_cpu.h"
#include "simd.h"

/* 8 int8 -> 8 fp32. The 8-byte load folds into the sign extension (vpmovsxbd ymm, m64): one shuffle-port
   uop per 8 weights, where loading 16 bytes and shifting the upper half down took 1.5 (that port bounds
   this loop). */
static inline __m256 widen_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Dot products of one int8 weight row with one or two fp32 activation rows; K % 32 == 0. The row is
   dequantised in registers, 32 values (32 bytes) at a time; the scale is applied to the sums. */
static inline void row_dot2_i8(const int8_t *r, const float *x0, const float *x1, int K, float *o0, float *o1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int k = 0; k < K; k += 32) {
        __builtin_prefetch(r + k + 4096);  /* as in linear.c: the prefetcher alone leaves bandwidth unused */
        __m256 w0 = widen_i8(r + k), w1 = widen_i8(r + k + 8), w2 = widen_i8(r + k + 16), w3 = widen_i8(r + k + 24);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), w0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 8), w1, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 16), w2, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 24), w3, a3);
        if (x1) {
            b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), w0, b0);
            b1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 8), w1, b1);
            b2 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 16), w2, b2);
            b3 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 24), w3, b3);
        }
    }
    *o0 = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    if (x1) *o1 = hsum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
}

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]. One weight row at a time, as linear() in linear.c. */
void linear_int8(const void *x, const int8_t *w, const void *scale, void *y, int M, int N, int K, int bf16) {
    float *widened = 0;
    const float *xf = (const float *)x;
    if (bf16) {
        widened = (float *)malloc((size_t)M * K * sizeof(float));
        for (long i = 0; i < (long)M * K; i++) widened[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xf = widened;
    }
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *r = w + (long)n * K;
        const float s = bf16 ? bf16_to_f32(((const uint16_t *)scale)[n]) : ((const float *)scale)[n];
        for (int m = 0; m < M; m += 2) {
            float o0, o1 = 0.0f;  /* o1 is written only when there is a second row */
            const float *x1 = m + 1 < M ? xf + (long)(m + 1) * K : 0;
            row_dot2_i8(r, xf + (long)m * K, x1, K, &o0, &o1);
            const long at = (long)m * N + n;
            if (bf16) ((uint16_t *)y)[at] = f32_to_bf16(o0 * s); else ((float *)y)[at] = o0 * s;
            if (x1) {
                if (bf16) ((uint16_t *)y)[at + N] = f32_to_bf16(o1 * s); else ((float *)y)[at + N] = o1 * s;
            }
        }
    }
    free(widened);
}
