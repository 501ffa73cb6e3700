/* Dequantising blocks of int8 and int4 weight rows for prefill-sized linears: the why is in ops/cpu/dequant.py. Each
   int4 value is rounded as the torch reference rounds it: q * scale, then + offset, in fp32, then to the output dtype;
   int8 values are exact in either. */
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

struct int8_args {
    const int8_t *w;
    void *out;
    int K, bf16;
    long N, rows;  /* rows per chunk */
};

/* Chunk `chunk`'s weights as the run `run` (AVX2's or AVX-512's) converts them, then the last few one by one. */
#define INT8_CHUNK(run, ctx, chunk) do { \
        const struct int8_args a = *(const struct int8_args *)(ctx); \
        const long end = pool_chunk_end(chunk, a.rows, a.N) * a.K; \
        for (long i = run(a.w, a.out, chunk * a.rows * a.K, end, a.bf16); i < end; i++) \
            store1(a.out, i, (float)a.w[i], a.bf16); \
    } while (0)

/* ---- AVX-512: 16 columns a vector, for the spanned layout (which only AVX-512 VNNI CPUs store) ---- */

AVX512_BEGIN

/* The upper halves of the dwords of a and b, in order: 32 bf16 (each dword rounded by round16_bits, or exact). */
INLINE __m512i high_words(__m512i a, __m512i b) {
    static const int16_t odd[32] = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31,
                                    33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};
    return _mm512_permutex2var_epi16(a, _mm512_loadu_si512(odd), b);
}

/* Nibbles q (int32) of 16 columns dequantised, unrounded for bf16; `fused` where the product q * s is exact in fp32,
   so that an FMA rounds as the reference's product, then sum: for a bf16 scale (8 significant bits) of magnitude
   2^124 or less, 15 |s| < 2^128. A larger one's product may overflow, which the FMA does not see (scale 2^127,
   offset -1.5 * 2^127: 2.55e38 for the reference's inf); an fp32 scale's product is rounded. */
INLINE __m512 dequant16(__m512i q, __m512 s, __m512 o, int fused) {
    if (fused) return _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, o);
    __m512 product = _mm512_mul_ps(_mm512_cvtepi32_ps(q), s);
    __asm__("" : "+v"(product));  /* the reference rounds the product before adding the offset: no FMA */
    return _mm512_add_ps(product, o);
}

/* Whether q * s + o (q < 16) is 0 or a normal fp32 for bf16 s and o, each 0 or of magnitude 2^-118 or more: the sum
   is then a multiple of 2^-125 (their ulps'), never subnormal, which vcvtneps2bf16 would flush to 0. */
INLINE int never_subnormal(float s, float o) {
    return (s == 0 || fabsf(s) >= 0x1p-118f) && (o == 0 || fabsf(o) >= 0x1p-118f);
}

/* The 8 x 8 qwords of v transposed (v[i] lane j <- v[j] lane i): three rounds of two-source permutes, round d
   swapping the lanes with bit d set of v[i] with those without of v[i + d]. */
INLINE void transpose_qwords(__m512i v[8]) {
    static const int64_t lo[3][8] = {{0, 8, 2, 10, 4, 12, 6, 14}, {0, 1, 8, 9, 4, 5, 12, 13}, {0, 1, 2, 3, 8, 9, 10, 11}};
    static const int64_t hi[3][8] = {{1, 9, 3, 11, 5, 13, 7, 15}, {2, 3, 10, 11, 6, 7, 14, 15}, {4, 5, 6, 7, 12, 13, 14, 15}};
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < 8; i++)
            if (!(i & 1 << r)) {
                const __m512i a = v[i], b = v[i | 1 << r];
                v[i] = _mm512_permutex2var_epi64(a, _mm512_loadu_si512(lo[r]), b);
                v[i | 1 << r] = _mm512_permutex2var_epi64(a, _mm512_loadu_si512(hi[r]), b);
            }
}

/* Block b's 64 columns of row n from its 16 words (int32 lane w: word w, whose nibble t is column 16 t + w); bf16
   rounded by vcvtne2ps2bf16 where `native` (AVX512-BF16) and no value can be subnormal, else as round8 rounds. */
INLINE void block64(const struct dequant_args *a, long n, long b, __m512i words, int bf16, int native) {
    const long g = n * (a->K / a->G) + 64 * b / a->G;
    const float scale = load1(a->scale, g, bf16), offset = load1(a->offset, g, bf16);
    const __m512 s = _mm512_set1_ps(scale), o = _mm512_set1_ps(offset);
    const int fused = bf16 && fabsf(scale) <= 0x1p124f;  /* false for inf and NaN too */
    __m512 v[4];
    for (int t = 0; t < 4; t++) {
        const __m512i q = _mm512_srli_epi32(words, 4 * t);  /* the words zero-extended: nibble 3 needs no mask */
        v[t] = dequant16(t == 3 ? q : _mm512_and_si512(q, _mm512_set1_epi32(15)), s, o, fused);
    }
    const long at = n * a->K + 64 * b;
    if (!bf16) {
        for (int t = 0; t < 4; t++) _mm512_storeu_ps((float *)a->out + at + 16 * t, v[t]);
    } else if (native && never_subnormal(scale, offset)) {
        for (int t = 0; t < 4; t += 2)
            _mm512_storeu_si512((uint16_t *)a->out + at + 16 * t, (__m512i)_mm512_cvtne2ps_pbh(v[t + 1], v[t]));
    } else {
        for (int t = 0; t < 4; t += 2)
            _mm512_storeu_si512((uint16_t *)a->out + at + 16 * t,
                                high_words(round16_bits(v[t]), round16_bits(v[t + 1])));
    }
}

/* Row n's spans: a span's 8 vectors (lane b: dword j of block b) transposed as qwords leave v[p] holding blocks 2p
   and 2p + 1 dword by dword, alternately; a masked word permute takes one block's 16 words as int32. */
INLINE void span_rows512(const struct dequant_args *a, long chunk, int bf16, int native) {
    int16_t pick[2][32];
    for (int w = 0; w < 16; w++)
        for (int e = 0; e < 2; e++) pick[e][2 * w] = (int16_t)(4 * (w / 2) + 2 * e + w % 2), pick[e][2 * w + 1] = 0;
    const __m512i picks[2] = {_mm512_loadu_si512(pick[0]), _mm512_loadu_si512(pick[1])};
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++)
        for (long c = 0; c < (a->K / 64 + 15) / 16; c++) {
            const int nb = int4_chunk_blocks(a->K, c);
            const uint8_t *at = a->w + int4_chunk_at(n, c, a->K, 0);
            __m512i v[8];
            for (int j = 0; j < 8; j++) v[j] = _mm512_maskz_loadu_epi32((__mmask16)((1u << nb) - 1), at + 4 * nb * j);
            transpose_qwords(v);
            for (int b = 0; b < nb; b++)
                block64(a, n, 16 * c + b, _mm512_maskz_permutexvar_epi16(0x55555555u, picks[b & 1], v[b / 2]), bf16,
                        native);
        }
}

/* int8 weights i .. end - 1 -> bf16 (the upper halves of their exact fp32) or fp32, 32 a pass; returns where the
   passes stopped. */
INLINE long int8_run512(const int8_t *w, void *out, long i, long end, int bf16) {
    for (; i + 32 <= end; i += 32) {
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i))));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + i + 16))));
        if (bf16) {
            _mm512_storeu_si512((uint16_t *)out + i, high_words(_mm512_castps_si512(lo), _mm512_castps_si512(hi)));
        } else {
            _mm512_storeu_ps((float *)out + i, lo);
            _mm512_storeu_ps((float *)out + i + 16, hi);
        }
    }
    return i;
}

static void dequant_int8_rows512(const void *ctx, long chunk) { INT8_CHUNK(int8_run512, ctx, chunk); }

static void dequant_span_rows512(const void *ctx, long chunk) {
    const struct dequant_args a = *(const struct dequant_args *)ctx;
    if (!a.bf16) span_rows512(&a, chunk, 0, 0);
    else if (has_avx512_bf16()) span_rows512(&a, chunk, 1, 1);
    else span_rows512(&a, chunk, 1, 0);
}

AVX512_END

/* The arguments copied, so that the compiler keeps them in registers across the stores to out (which might alias
   them for all it knows), and bf16 a constant in each instance. */
static void dequant_il_rows(const void *ctx, long chunk) {
    const struct dequant_args a = *(const struct dequant_args *)ctx;
    if (a.bf16) il_rows(&a, chunk, 1); else il_rows(&a, chunk, 0);
}

/* Shapes: see nanoqwen_cpu.h. */
void dequant_int4(const uint8_t *w, const void *scale, const void *offset, void *out, int N, int K, int G, int bf16) {
    const struct dequant_args a = {w, scale, offset, out, N, K, G, bf16, pool_rows_per_chunk(K / 2), int4_quad_rows(N)};
    /* spanned only where int4_interleaved() is false, which needs AVX-512 (int4_block.h) */
    nanoqwen_pool_run(int4_interleaved() ? dequant_il_rows : dequant_span_rows512, &a, (N + a.rows - 1) / a.rows);
}

INLINE long int8_run(const int8_t *w, void *out, long i, long end, int bf16) {
    for (; i + 8 <= end; i += 8)
        store8(out, i, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + i)))), bf16);
    return i;
}

static void dequant_int8_rows(const void *ctx, long chunk) { INT8_CHUNK(int8_run, ctx, chunk); }

/* Shapes: see nanoqwen_cpu.h. */
void dequant_int8(const int8_t *w, void *out, int N, int K, int bf16) {
    const struct int8_args a = {w, out, K, bf16, N, pool_rows_per_chunk(K)};
    nanoqwen_pool_run(has_avx512() ? dequant_int8_rows512 : dequant_int8_rows, &a, (N + a.rows - 1) / a.rows);
}
