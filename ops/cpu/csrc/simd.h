/* Helpers the kernels share: bf16 <-> fp32, AVX2 reductions, a vector exp. Internal, not exported. */
#ifndef NANOQWEN_SIMD_H
#define NANOQWEN_SIMD_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256 widen(const uint16_t *p) {  /* 8 bf16 -> 8 fp32: a 16-bit shift */
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

/* 8 values of a bf16 or fp32 array from index i, as fp32. */
static inline __m256 load8(const void *p, long i, int bf16) {
    return bf16 ? widen((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}

/* v rounded to bf16 (to nearest even; never NaN here), kept in fp32. For fp32, v behind an optimisation
   barrier: where a torch reference rounds a product before adding it, the compiler must not fuse the two
   into an FMA. */
static inline __m256 round8(__m256 v, int bf16) {
    if (!bf16) {
        __asm__("" : "+x"(v));
        return v;
    }
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

/* v rounded as store1 rounds (f32_to_bf16: to nearest even, a NaN kept a NaN, quieted), kept in fp32: round8 alone
   does not promise a NaN. */
static inline __m256 round8_as_stored(__m256 v, int bf16) {
    if (!bf16) return v;
    return _mm256_blendv_ps(round8(v, 1), _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x400000))),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* Stores 8 values that round8 rounded at p + i: for bf16, their upper halves. */
static inline void store8(void *p, long i, __m256 v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    __m256i u = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element i of a bf16 (bf16 != 0) or fp32 array as fp32, and v stored there (rounded as torch does). */
static inline float load1(const void *p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void store1(void *p, long i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v); else ((float *)p)[i] = v;
}

/* exp(x) for the floats of a BITS-bit vector (256: exp8, here; 512: exp16, pointwise.c), Cephes' expf: x = n ln2 + r
   (ln2 in two parts), exp(r) by a degree-6 polynomial, times 2^n; about 1 ulp. x is clamped to [-88.4, 89]: 89
   overflows to inf, as expf does. One body for both widths: the same operations lane for lane, so the same bits.
   ROUND: the width's round-to-integer (round, roundscale; the same immediate). */
#define DEFINE_EXP(NAME, BITS, ROUND) \
    static inline __m##BITS NAME(__m##BITS x) { \
        x = _mm##BITS##_min_ps(_mm##BITS##_max_ps(x, _mm##BITS##_set1_ps(-88.3762626647949f)), \
                               _mm##BITS##_set1_ps(89.0f)); \
        __m##BITS n = _mm##BITS##_##ROUND##_ps(_mm##BITS##_mul_ps(x, _mm##BITS##_set1_ps(1.44269504088896341f)), \
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); \
        __m##BITS r = _mm##BITS##_fnmadd_ps(n, _mm##BITS##_set1_ps(0.693359375f), x); \
        r = _mm##BITS##_fnmadd_ps(n, _mm##BITS##_set1_ps(-2.12194440e-4f), r); \
        __m##BITS p = _mm##BITS##_set1_ps(1.9875691500e-4f); \
        p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(1.3981999507e-3f)); \
        p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(8.3334519073e-3f)); \
        p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(4.1665795894e-2f)); \
        p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(1.6666665459e-1f)); \
        p = _mm##BITS##_fmadd_ps(p, r, _mm##BITS##_set1_ps(5.0000001201e-1f)); \
        p = _mm##BITS##_fmadd_ps(p, _mm##BITS##_mul_ps(r, r), _mm##BITS##_add_ps(r, _mm##BITS##_set1_ps(1.0f))); \
        /* 2^n in two factors, so that n = 128 (x near 88.7) does not overflow the exponent field */ \
        __m##BITS##i e = _mm##BITS##_cvtps_epi32(n); \
        __m##BITS##i half = _mm##BITS##_srai_epi32(e, 1); \
        __m##BITS a = _mm##BITS##_castsi##BITS##_ps( \
            _mm##BITS##_slli_epi32(_mm##BITS##_add_epi32(half, _mm##BITS##_set1_epi32(127)), 23)); \
        __m##BITS b = _mm##BITS##_castsi##BITS##_ps(_mm##BITS##_slli_epi32( \
            _mm##BITS##_add_epi32(_mm##BITS##_sub_epi32(e, half), _mm##BITS##_set1_epi32(127)), 23)); \
        return _mm##BITS##_mul_ps(_mm##BITS##_mul_ps(p, a), b); \
    }
DEFINE_EXP(exp8, 256, round)

#endif
