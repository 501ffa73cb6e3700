/* int4 weight-only linear layers (asymmetric groups along K): the why is in ops/cpu/linear_int4.py, the
   packed layout in ops/torch_ref/linear_int4.py. AVX-512 (F, BW, VL, BF16), selected per function. */
#include "nanoqwen_cpu.h"
#include "simd.h"

void linear_int4_supported(int *ok) {
    __builtin_cpu_init();
    *ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

#define ROWS 8  /* activation rows sharing one unpacking of a weight block */

/* The four 16-column slices of a 64-column block (32 bytes: nibble j of word i = q[16j + i]), each as
   16-bit lanes holding the bf16 bits of 128 + q: or-ing q into the mantissa of 128.0 (0x4300) is exact. */
static inline void unpack_bf16(const uint8_t *p, __m256i out[4]) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)p);
    const __m256i nib = _mm256_set1_epi16(0x000f), base = _mm256_set1_epi16(0x4300);
    /* ternary logic 0xEA: (a & b) | c */
    out[0] = _mm256_ternarylogic_epi32(w, nib, base, 0xEA);
    out[1] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 4), nib, base, 0xEA);
    out[2] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 8), nib, base, 0xEA);
    out[3] = _mm256_or_si256(_mm256_srli_epi16(w, 12), base);
}

/* The same slices as fp32 q (exact), 16 lanes each. */
static inline void unpack_f32(const uint8_t *p, __m512 out[4]) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    const __m512i nib = _mm512_set1_epi32(0xf);
    out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(w, nib));
    out[1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, 4), nib));
    out[2] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, 8), nib));
    out[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 12));
}

static inline float load_f(const void *p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* Up to 16 values (count) from p[i...], bf16 or fp32, as fp32 lanes; the rest 0. */
static inline __m512 load16(const void *p, long i, int count, int bf16) {
    const __mmask16 mask = (__mmask16)((1u << count) - 1u);
    if (!bf16) return _mm512_maskz_loadu_ps(mask, (const float *)p + i);
    const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* sum_g xsum[g] * (offset[i + g] - bias * scale[i + g]) over the groups of one weight row. */
static inline float group_terms(const void *scale, const void *offset, long i, const float *xsum, int groups,
                                float bias, int bf16) {
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < groups; g += 16) {
        const int count = groups - g < 16 ? groups - g : 16;
        const __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(bias), load16(scale, i + g, count, bf16),
                                          load16(offset, i + g, count, bf16));
        acc = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1u), xsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* sums[r] = sum over the row's groups g of scale[g] * sum_{k in g} x[r][k] * (bias + q[k]), for R <= ROWS
   activation rows (bf16, bias 128 from the unpacking above). R is a constant where this is inlined. */
static inline __attribute__((always_inline)) void
row_dots_bf16(const uint8_t *w, const void *scale, long n, const uint16_t *x, int K, int G, int R, float *sums) {
    __m256 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    const int per_group = G / 64;
    for (int b = 0; b < K / 64; b++) {
        __builtin_prefetch(w + (long)b * 32 + 4096);
        __m256i q[4];
        unpack_bf16(w + (long)b * 32, q);
        const __m256 s = _mm256_set1_ps(bf16_to_f32(((const uint16_t *)scale)[n * (K / G) + b / per_group]));
        for (int r = 0; r < R; r++) {
            const uint16_t *xr = x + (long)r * K + b * 64;
            __m256 t = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)q[0], (__m256bh)_mm256_loadu_si256((const __m256i *)xr));
            t = _mm256_dpbf16_ps(t, (__m256bh)q[1], (__m256bh)_mm256_loadu_si256((const __m256i *)(xr + 16)));
            t = _mm256_dpbf16_ps(t, (__m256bh)q[2], (__m256bh)_mm256_loadu_si256((const __m256i *)(xr + 32)));
            t = _mm256_dpbf16_ps(t, (__m256bh)q[3], (__m256bh)_mm256_loadu_si256((const __m256i *)(xr + 48)));
            acc[r] = _mm256_fmadd_ps(t, s, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) sums[r] = hsum(acc[r]);
}

/* As row_dots_bf16 for fp32 activations, bias 0: fp32 products, as the reference's. */
static inline __attribute__((always_inline)) void
row_dots_f32(const uint8_t *w, const void *scale, long n, const float *x, int K, int G, int R, float *sums) {
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const int per_group = G / 64;
    for (int b = 0; b < K / 64; b++) {
        __builtin_prefetch(w + (long)b * 32 + 4096);
        __m512 q[4];
        unpack_f32(w + (long)b * 32, q);
        const __m512 s = _mm512_set1_ps(((const float *)scale)[n * (K / G) + b / per_group]);
        for (int r = 0; r < R; r++) {
            const float *xr = x + (long)r * K + b * 64;
            __m512 t = _mm512_mul_ps(q[0], _mm512_loadu_ps(xr));
            t = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(xr + 16), t);
            t = _mm512_fmadd_ps(q[2], _mm512_loadu_ps(xr + 32), t);
            t = _mm512_fmadd_ps(q[3], _mm512_loadu_ps(xr + 48), t);
            acc[r] = _mm512_fmadd_ps(t, s, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

static void row_dots(const uint8_t *w, const void *scale, long n, const void *x, int K, int G, int R, int bf16,
                     float *sums) {
    /* one specialisation per row count: the row loops unroll and the accumulators stay in registers */
#define CASE(r) case r: \
    if (bf16) row_dots_bf16(w, scale, n, (const uint16_t *)x, K, G, r, sums); \
    else row_dots_f32(w, scale, n, (const float *)x, K, G, r, sums); \
    break;
    switch (R) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) }
#undef CASE
}

/* y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * q[n, k] + offset[n, g] * xsum[m, g]. The bf16 path
   multiplies by 128 + q (see unpack_bf16), so its per-group constant is offset - 128 * scale. */
void linear_int4(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y, int M, int N,
                 int K, int G, int bf16) {
    const int groups = K / G;
    const float bias = bf16 ? 128.0f : 0.0f;
    float *xsum = (float *)malloc((size_t)M * groups * sizeof(float));  /* [M, groups] */
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int k = g * G; k < (g + 1) * G; k++) s += load_f(x, (long)m * K + k, bf16);
            xsum[m * groups + g] = s;
        }
    }
    const long row_bytes = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *wn = w + (long)n * (K / 2);
        for (int m0 = 0; m0 < M; m0 += ROWS) {
            const int R = M - m0 < ROWS ? M - m0 : ROWS;
            float sums[ROWS];
            row_dots(wn, scale, n, (const char *)x + m0 * row_bytes * K, K, G, R, bf16, sums);
            for (int r = 0; r < R; r++) {
                const int m = m0 + r;
                const float o = sums[r] + group_terms(scale, offset, (long)n * groups, xsum + (long)m * groups,
                                                      groups, bias, bf16);
                const long at = (long)m * N + n;
                if (bf16) ((uint16_t *)y)[at] = f32_to_bf16(o); else ((float *)y)[at] = o;
            }
        }
    }
    free(xsum);
}

#pragma GCC pop_options
