/* int4 weight-only linear layers (asymmetric groups along K): the why is in ops/cpu/linear_int4.py, the
   packed layout in ops/torch_ref/linear_int4.py. AVX-512 (F, BW, VL) for this file alone, checked at run time. */
#include "nanoqwen_cpu.h"
#include "amx.h"
#include "pool.h"
#include "simd.h"

void linear_int4_supported(int *ok) {
    __builtin_cpu_init();
    *ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")

#define ROWS 8  /* activation rows sharing one unpacking of a weight block */

/* The four 16-column slices of a 64-column block (32 bytes: nibble j of word i = q[16j + i]) as fp32 q
   (exact), 16 lanes each: one widening, then a shift and mask per slice. */
static inline void unpack_f32(const uint8_t *p, __m512 out[4]) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    const __m512i nib = _mm512_set1_epi32(0xf);
    out[0] = _mm512_cvtepi32_ps(_mm512_and_si512(w, nib));
    out[1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, 4), nib));
    out[2] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(w, 8), nib));
    out[3] = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 12));
}

/* bf16(q) for q < 16: the lookup table of unpack_bf16. */
static const uint16_t BF16_OF_NIBBLE[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                            0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};

/* A 64-column block as two rows of 32 bf16 q (exact) for AMX: its bytes widened to words, then the low and the
   high nibble of each looked up. Byte 2i of the block holds q[i] and q[16 + i], byte 2i + 1 q[32 + i] and
   q[48 + i], so out[0] pairs columns (i, 32 + i) for i < 16 and out[1] the same for 16 <= i < 32: the pairs
   pair_int4_columns makes of the activations. */
static inline void unpack_bf16(const uint8_t *p, __m512i out[2]) {
    const __m512i table = _mm512_loadu_si512(BF16_OF_NIBBLE);
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    out[0] = _mm512_permutexvar_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0xf)), table);
    out[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
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

/* sum_g xsum[g] * offset[i + g] over the groups of one weight row. */
static inline float group_terms(const void *offset, long i, const float *xsum, int groups, int bf16) {
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < groups; g += 16) {
        const int count = groups - g < 16 ? groups - g : 16;
        const __m512 sums = _mm512_maskz_loadu_ps((__mmask16)((1u << count) - 1u), xsum + g);
        acc = _mm512_fmadd_ps(load16(offset, i + g, count, bf16), sums, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* sums[r] = sum over the row's groups g of scale[g] * sum_{k in g} x[r][k] * q[k] for R <= ROWS fp32
   activation rows; fp32 products, as the reference's. R is a constant where this is inlined. */
static inline __attribute__((always_inline)) void
row_dots_f32(const uint8_t *w, const void *scale, long n, const float *x, int K, int G, int R, int bf16,
             float *sums) {
    __m512 acc[ROWS];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    const int per_group = G / 64;
    for (int b = 0; b < K / 64; b++) {
        __builtin_prefetch(w + (long)b * 32 + 4096);
        __m512 q[4];
        unpack_f32(w + (long)b * 32, q);
        const __m512 s = _mm512_set1_ps(load_f(scale, n * (K / G) + b / per_group, bf16));
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            const float *xr = x + (long)r * K + b * 64;
            __m512 t = _mm512_mul_ps(q[0], _mm512_loadu_ps(xr));
            t = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(xr + 16), t);
            t = _mm512_fmadd_ps(q[2], _mm512_loadu_ps(xr + 32), t);
            t = _mm512_fmadd_ps(q[3], _mm512_loadu_ps(xr + 48), t);
            acc[r] = _mm512_fmadd_ps(t, s, acc[r]);
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
}

static void row_dots(const uint8_t *w, const void *scale, long n, const float *x, int K, int G, int R, int bf16,
                     float *sums) {
    /* one specialisation per row count: the row loops unroll and the accumulators stay in registers */
#define CASE(r) case r: row_dots_f32(w, scale, n, x, K, G, r, bf16, sums); break;
    switch (R) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) }
#undef CASE
}

struct linear_int4_args {
    const float *x;     /* [M, K] fp32 */
    const uint32_t *pairs;  /* for linear_int4_amx: bf16 x as pair_int4_columns makes it */
    const float *xsum;  /* [M, groups]: each group's activation sum, which the offsets multiply */
    const uint8_t *w;
    const void *scale, *offset;
    void *y;
    int M, N, K, G, bf16;
    long rows;  /* per chunk */
};

static inline void store_out(void *y, long at, float v, int bf16) {
    if (bf16) ((uint16_t *)y)[at] = f32_to_bf16(v); else ((float *)y)[at] = v;
}

/* Weight rows start..end - 1, AVX-512. */
static void linear_int4_rows(const struct linear_int4_args *a, long start, long end) {
    const int M = a->M, N = a->N, K = a->K, groups = K / a->G;
    for (long n = start; n < end; n++) {
        const uint8_t *wn = a->w + n * (K / 2);
        for (int m0 = 0; m0 < M; m0 += ROWS) {
            const int R = M - m0 < ROWS ? M - m0 : ROWS;
            float sums[ROWS];
            row_dots(wn, a->scale, n, a->x + (long)m0 * K, K, a->G, R, a->bf16, sums);
            for (int r = 0; r < R; r++) {
                const int m = m0 + r;
                const float o = sums[r] + group_terms(a->offset, n * groups, a->xsum + (long)m * groups, groups,
                                                      a->bf16);
                store_out(a->y, (long)m * N + n, o, a->bf16);
            }
        }
    }
}

static void linear_int4_chunk(const void *ctx, long chunk) {
    const struct linear_int4_args *a = ctx;
    linear_int4_rows(a, chunk * a->rows, pool_chunk_end(chunk, a->rows, a->N));
}

/* x: [M, K] bf16 -> out: [K / 2, M] pairs (x[m, b + i], x[m, b + 32 + i]) for each block b of 64 columns and
   i < 32: tdpbf16ps's B operand in unpack_bf16's column order. */
static void pair_int4_columns(const uint16_t *x, uint32_t *out, int M, int K) {
    for (int b = 0; b < K; b += 64)
        for (int i = 0; i < 32; i++)
            for (int m = 0; m < M; m++)
                out[(long)(b / 2 + i) * M + m] = x[(long)m * K + b + i] | (uint32_t)x[(long)m * K + b + 32 + i] << 16;
}

AMX_BEGIN
/* AMX (amx.h), 2 to 16 bf16 activation rows: 16 weight rows at a time, each 64-column block unpacked to two
   tiles of bf16 q; a group's sums (tile 2) scaled per weight row and added, with the offset terms, in fp32.
   The rows past the last whole 16 take linear_int4_rows. */
static void linear_int4_amx(const void *ctx, long chunk) {
    const struct linear_int4_args *a = ctx;
    const int M = a->M, N = a->N, K = a->K, G = a->G, groups = K / G;
    const long start = chunk * a->rows, end = pool_chunk_end(chunk, a->rows, N);
    const long whole = N / AMX_ROWS * AMX_ROWS;
    const __mmask16 cols = (__mmask16)((1u << M) - 1u);
    if (start < whole) {
        amx_configure(M);
        for (long n0 = start; n0 < (end < whole ? end : whole); n0 += AMX_ROWS) {
            const uint8_t *w = a->w + n0 * (K / 2);
            __m512 acc[AMX_ROWS];  /* [weight row][activation row] */
            for (int i = 0; i < AMX_ROWS; i++) acc[i] = _mm512_setzero_ps();
            for (int g = 0; g < groups; g++) {
                _tile_zero(2);
                for (int b = g * G; b < (g + 1) * G; b += 64) {
                    __attribute__((aligned(64))) uint16_t tiles[2][AMX_ROWS][32];
                    for (int i = 0; i < AMX_ROWS; i++) {
                        const uint8_t *block = w + (long)i * (K / 2) + b / 2;
                        __builtin_prefetch(block + PREFETCH_BYTES / 2);
                        __m512i q[2];
                        unpack_bf16(block, q);
                        _mm512_store_si512(tiles[0][i], q[0]), _mm512_store_si512(tiles[1][i], q[1]);
                    }
                    AMX_STORES_VISIBLE();
                    _tile_loadd(0, tiles[0], 64);
                    _tile_loadd(1, a->pairs + (long)b / 2 * M, M * 4);
                    _tile_dpbf16ps(2, 0, 1);
                    _tile_loadd(0, tiles[1], 64);
                    _tile_loadd(1, a->pairs + (long)(b / 2 + 16) * M, M * 4);
                    _tile_dpbf16ps(2, 0, 1);
                }
                float sums[AMX_ROWS][AMX_ROWS];
                _tile_stored(2, sums, sizeof sums[0]);
                float xsum[AMX_ROWS];
                for (int m = 0; m < M; m++) xsum[m] = a->xsum[(long)m * groups + g];
                const __m512 xs = _mm512_maskz_loadu_ps(cols, xsum);
                for (int i = 0; i < AMX_ROWS; i++) {
                    const long at = (n0 + i) * groups + g;
                    const __m512 s = _mm512_set1_ps(bf16_to_f32(((const uint16_t *)a->scale)[at]));
                    const __m512 o = _mm512_set1_ps(bf16_to_f32(((const uint16_t *)a->offset)[at]));
                    acc[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(cols, sums[i]), s, _mm512_fmadd_ps(xs, o, acc[i]));
                }
            }
            for (int i = 0; i < AMX_ROWS; i++) {
                float out[AMX_ROWS];
                _mm512_storeu_ps(out, acc[i]);
                for (int m = 0; m < M; m++) store_out(a->y, (long)m * N + n0 + i, out[m], 1);
            }
        }
        _tile_release();
    }
    if (end > whole) linear_int4_rows(a, start > whole ? start : whole, end);
}
AMX_END

/* y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * q[n, k] + offset[n, g] * xsum[m, g]. bf16 activations
   are widened to fp32 first (exactly): fp32 FMAs on 16 lanes outrun VDPBF16PS here (a vdpbf16ps variant, the
   nibbles looked up as bf16, measured no faster at 1, 2 or 8 rows: profiles/RESULTS.md, "CPU linears: huge
   pages, AMX from 2 rows, int4 on the pool"), and the products stay the reference's; from 2 rows, AMX where
   the CPU has it. Parallel over chunks of output rows (pool.h). */
void linear_int4(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y, int M, int N,
                 int K, int G, int bf16) {
    const int groups = K / G;
    float *widened = 0;
    const float *xf = (const float *)x;
    if (bf16) {
        widened = (float *)malloc((size_t)M * K * sizeof(float));
        for (long i = 0; i < (long)M * K; i++) widened[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xf = widened;
    }
    float *xsum = (float *)malloc((size_t)M * groups * sizeof(float));  /* [M, groups] */
    for (int m = 0; m < M; m++) {
        for (int g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int k = g * G; k < (g + 1) * G; k++) s += xf[(long)m * K + k];
            xsum[m * groups + g] = s;
        }
    }
    struct linear_int4_args a = {xf, 0, xsum, w, scale, offset, y, M, N, K, G, bf16, pool_rows_per_chunk(K / 2)};
    if (bf16 && M >= AMX_MIN_ROWS && M <= AMX_ROWS && amx_ready()) {
        uint32_t *pairs = (uint32_t *)malloc((size_t)K / 2 * M * sizeof(uint32_t));
        pair_int4_columns((const uint16_t *)x, pairs, M, K);
        a.pairs = pairs, a.rows = (a.rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
        pool_run(linear_int4_amx, &a, (N + a.rows - 1) / a.rows);
        free(pairs);
    } else {
        pool_run(linear_int4_chunk, &a, (N + a.rows - 1) / a.rows);
    }
    free(xsum);
    free(widened);
}

#pragma GCC pop_options
