/* The AVX2 int4 linear (linear_int4.c's madd loops: int16 activation pieces against the nibbles widened to int16,
   vpmaddwd) against vpmaddubsw variants (int8 activations against the nibbles as bytes, 32 products an instruction
   against 16), at 1 and 8 bf16 activation rows, over one layer's four matrices at Qwen3-0.6B's shapes (8 MB, in L3)
   and a small hot one; one thread, the variants alternated with the order rotated, timed by the calling thread's CPU
   time (medians). Not a test; profiles/RESULTS.md (lane int4b8, twenty-fourth session) has the figures.

   The variants' activations: each 64-column block of a row rounded to int8 with a scale of its own (max |x| / 127,
   as llama.cpp's Q8 activations; "-row": one scale a row), the offsets times the exact fp32 group sums as now. A block
   is two vpmaddubsw (u8 nibble x s8 activation; pair sums <= 2 * 15 * 127) and a vpaddw, 4 products an int16 lane.
   How 4 blocks' int16 sums (each block its group's scale) become fp32:
     ubs-h2   two rounds of vphaddw (16 products a lane <= 30,480: no wrap), one vpmaddwd by ones (block b in int32
              lanes b and 4 + b), one convert, one FMA by the 4 groups' weight x activation scales (in both halves)
     ubs-h1   one round of vphaddw, two vpmaddwd, converts and FMAs
     ubs-md   no vphaddw: a vpmaddwd by ones, a convert and an FMA each block; ubs-md-row with one scale a row
     ubs-il   the weights rearranged (ab_il_pack) so that no vphaddw is needed: 4 blocks' int16 sums add by vpaddw
     bound-adds  ubs-h2 with vpaddw for vphaddw (wrong sums, the rest of the work alike); bound-quant the rounding
              of the activations alone (vectorised, in the nibbles' order)
   8 rows: one weight row against the 8, each 4 blocks unpacked once, the rows' sums in L1 (as madd_rows); 1 row: a
   quad's 4 weight rows against it, sums in registers (as madd_pieces). G = 64, K % 256 == 0 only.

   Build from the repository root:
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/ab_int4_rows.c -o profiles/out/ab_int4_rows ops/cpu/csrc/pool.c -lm
   Run: [COLD_MB=N] OMP_NUM_THREADS=1 taskset -c 0 profiles/out/ab_int4_rows [ROUNDS 15] [CALLS A ROUND 20] [VARIANT...]
   (the kernel and the variants named, default all; COLD_MB: copies of each matrix, N MB in all, cycled through so
   that each call reads from DRAM when N is well past the L3's 32 MB)
   Prints, per shape and row count, each variant's median µs a call, its ratio to the kernel's (median of the rounds'
   ratios), and its largest |y - exact| over sum_k |w_k| max|x| (the exact product in double from the dequantised
   weights and the bf16 activations; every 7th output, every row). */
#include "linear_int4.c"

#include <stdio.h>

#include "ab_rows.h"

#define G 64

/* The variants' weights: the layout the AVX2 kernel read before the interleaving (twenty-fourth session), block b of
   row 4q + i at 4q * K / 2 + 128 b + 32 i, the last N % 4 rows plain. */
static long quad_block_at(long n, long b, int K, long quad_rows) {
    return n < quad_rows ? (n & ~3L) * (K / 2) + 128 * b + 32 * (n & 3) : n * (K / 2) + 32 * b;
}

static void quad_pack(uint8_t *w, const uint8_t *plain, int N, int K) {
    for (long n = 0; n < N; n++)
        for (long b = 0; b < K / 64; b++) memcpy(w + quad_block_at(n, b, K, N / 4 * 4), plain + n * (K / 2) + 32 * b, 32);
}

struct shape { const char *name; int N, K; };
static const struct shape shapes[] = {{"qkv", 4096, 1024}, {"o", 1024, 2048}, {"gate_up", 6144, 1024},
                                      {"down", 1024, 3072}, {"hot", 512, 1024}};
#define SHAPES 5

struct ubs_args {
    const int8_t *q;    /* [K / 64][M][64] int8, each block's columns in the nibbles' order */
    const float *a;     /* [M][K / 256][VECS * 8]: each 4 blocks' activation scales in the mode's lanes */
    const float *rs;    /* [M]: each row's one scale (row_scale) */
    const float *xsum;  /* [M][K / 64] */
    const uint8_t *w;
    const uint16_t *scale, *offset;
    uint16_t *y;
    int M, N, K, row_scale;
    long rows, quad_rows;
};

/* Row m's block scales (or one scale a row), int8 values in the nibbles' order, and its group sums. */
static void ubs_quant(const uint16_t *x, int M, int K, int row_scale, int8_t *q, float *a, float *xsum) {
    const int blocks = K / 64;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int m = 0; m < M; m++) {
        const uint16_t *r = x + (long)m * K;
        __m256 rowmax = _mm256_setzero_ps();
        if (row_scale)
            for (int k = 0; k < K; k += 8) rowmax = _mm256_max_ps(rowmax, _mm256_andnot_ps(sign, load8(r, k, 1)));
        for (int b = 0; b < blocks; b++) {
            __m256 v[8], amax = rowmax, sum = _mm256_setzero_ps();
            for (int i = 0; i < 8; i++) {
                v[i] = load8(r, 64 * b + 8 * i, 1), sum = _mm256_add_ps(sum, v[i]);
                if (!row_scale) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            const float s = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))) / 127.0f;
            const __m256 inv = _mm256_set1_ps(s > 0 ? 1.0f / s : 0.0f);
            __m256i c[4];  /* columns 16 i .. 16 i + 15 as int16 */
            for (int i = 0; i < 4; i++) {
                const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i], inv));
                const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i + 1], inv));
                c[i] = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xd8);
            }
            const __m256i low = _mm256_set1_epi16(0xff);
            __m256i *out = (__m256i *)(q + ((long)b * M + m) * 64);
            _mm256_store_si256(out, _mm256_or_si256(_mm256_and_si256(c[0], low), _mm256_slli_epi16(c[2], 8)));
            _mm256_store_si256(out + 1, _mm256_or_si256(_mm256_and_si256(c[1], low), _mm256_slli_epi16(c[3], 8)));
            xsum[(long)m * blocks + b] = hsum(sum);
            a[(long)m * blocks + b] = s;
        }
    }
}

/* A block's 64 nibbles as bytes: lo (w & 15): columns i, 32 + i at bytes 2i, 2i + 1; hi: 16 + i, 48 + i. */
INLINE void ubs_nibbles(const uint8_t *block, __m256i *lo, __m256i *hi) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)block), m = _mm256_set1_epi8(15);
    *lo = _mm256_and_si256(v, m), *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
}

/* Block b's int16 sums of 4 products a lane: its nibbles (u[2b], u[2b + 1]) times its activations. */
INLINE __m256i ubs_pairs(const __m256i u[8], const int8_t *q, long stride, int b) {
    const __m256i *p = (const __m256i *)(q + b * stride);
    return _mm256_add_epi16(_mm256_maddubs_epi16(u[2 * b], _mm256_load_si256(p)),
                            _mm256_maddubs_epi16(u[2 * b + 1], _mm256_load_si256(p + 1)));
}

/* How four blocks' int16 sums become fp32: H2 two rounds of vphaddw, one vpmaddwd by ones (lanes b, 4 + b: block b),
   one scale vector; H1 one round (two vpmaddwd, two vectors: lanes of blocks 2k, 2k + 1 as A A B B A A B B); MD a
   vpmaddwd by ones, a convert and an FMA each block (four vectors, each a block's scale broadcast). */
enum { H2, H1, MD, ADDS, IL };  /* ADDS: a bound, H2 with vpaddw for vphaddw (wrong sums, the rest of the work alike) */
#define VECS(mode) ((mode) == H2 || (mode) == ADDS || (mode) == IL ? 1 : (mode) == H1 ? 2 : 4)
static int lane_block(int mode, int k, int l) {
    return mode == H2 || mode == ADDS || mode == IL ? l % 4 : mode == H1 ? 2 * k + l % 4 / 2 : k;
}

INLINE __m256 ubs_accumulate(const __m256i u[8], const int8_t *q, long stride, const __m256 *sc, int mode, __m256 f) {
    const __m256i one = _mm256_set1_epi16(1);
    __m256i p[4];
    _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++) p[b] = ubs_pairs(u, q, stride, b);
    if (mode == H2 || mode == ADDS) {
        const __m256i t = mode == ADDS ? _mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3]))
                                       : _mm256_hadd_epi16(_mm256_hadd_epi16(p[0], p[1]), _mm256_hadd_epi16(p[2], p[3]));
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(t, one)), sc[0], f);
    }
    if (mode == H1) {
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_hadd_epi16(p[0], p[1]), one)), sc[0], f);
        return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_hadd_epi16(p[2], p[3]), one)), sc[1], f);
    }
    _Pragma("GCC unroll 4") for (int b = 0; b < 4; b++)
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p[b], one)), sc[b], f);
    return f;
}

/* Weight row n's scale vectors for the 4 groups from g (lane_block's lanes). */
INLINE void ubs_scales(const struct ubs_args *a, long n, int g, int mode, __m256 *ws) {
    const __m128i h = _mm_loadl_epi64((const __m128i *)(a->scale + n * (a->K / G) + g));
    const __m256 s = _mm256_castps128_ps256(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
    if (mode == H2 || mode == ADDS) ws[0] = _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3));
    else if (mode == H1)
        ws[0] = _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1)),
        ws[1] = _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(2, 2, 3, 3, 2, 2, 3, 3));
    else
        _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) ws[k] = _mm256_permutevar8x32_ps(s, _mm256_set1_epi32(k));
}

/* Weight row n's output for row m given its fp32 lanes o (the offsets times the group sums added here). */
INLINE float ubs_end(const struct ubs_args *a, long n, int m, __m256 o) {
    const int groups = a->K / G;
    if (a->row_scale) o = _mm256_mul_ps(o, _mm256_set1_ps(a->rs[m]));
    for (int g = 0; g < groups; g += 8)
        o = _mm256_fmadd_ps(load8(a->offset, n * groups + g, 1), _mm256_loadu_ps(a->xsum + (long)m * groups + g), o);
    return hsum(o);
}

/* 8 rows: weight row n against all of them, each 4 blocks unpacked once, the rows' sums in L1. */
INLINE void ubs_rows8(const struct ubs_args *a, long n, int mode) {
    const int K = a->K, V = VECS(mode);
    const long step = n < a->quad_rows ? 128 : 32, stride = (long)MAXM * 64;
    const uint8_t *w = a->w + quad_block_at(n, 0, K, a->quad_rows);
    float f[MAXM][8] __attribute__((aligned(32)));
    for (int r = 0; r < MAXM; r++) _mm256_store_ps(f[r], _mm256_setzero_ps());
    for (int b = 0; b < K / 64; b += 4, w += 4 * step) {
        __m256i u[8];
        __m256 ws[4];
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) ubs_nibbles(w + i * step, &u[2 * i], &u[2 * i + 1]);
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) __builtin_prefetch(w + 8 * (K / 2) + i * step);
        ubs_scales(a, n, b, mode, ws);
        const int8_t *q = a->q + (long)b * stride;
        _Pragma("GCC unroll 8") for (int r = 0; r < MAXM; r++) {
            __m256 sc[4];
            const float *as = a->a + ((long)r * (K / 256) + b / 4) * 8 * V;
            _Pragma("GCC unroll 4") for (int k = 0; k < V; k++)
                sc[k] = a->row_scale ? ws[k] : _mm256_mul_ps(ws[k], _mm256_load_ps(as + 8 * k));
            _mm256_store_ps(f[r], ubs_accumulate(u, q + 64 * r, stride, sc, mode, _mm256_load_ps(f[r])));
        }
    }
    for (int r = 0; r < MAXM; r++) store1(a->y, (long)r * a->N + n, ubs_end(a, n, r, _mm256_load_ps(f[r])), 1);
}

/* 1 row: 4 weight rows n .. n + 3 (a quad) against it, sums in registers. */
INLINE void ubs_rows1(const struct ubs_args *a, long n, int mode) {
    const int K = a->K, V = VECS(mode);
    const long step = n < a->quad_rows ? 128 : 32, next = n < a->quad_rows ? 32 : K / 2;
    const uint8_t *w = a->w + quad_block_at(n, 0, K, a->quad_rows);
    __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < K / 64; b += 4, w += 4 * step) {
        const int8_t *q = a->q + (long)b * 64;
        const float *as = a->a + (b / 4) * 8 * V;
        _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) __builtin_prefetch(w + 8 * (K / 2) + 64 * i);
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
            __m256i u[8];
            __m256 ws[4];
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; c++)
                ubs_nibbles(w + i * next + c * step, &u[2 * c], &u[2 * c + 1]);
            ubs_scales(a, n + i, b, mode, ws);
            _Pragma("GCC unroll 4") for (int k = 0; k < V; k++)
                if (!a->row_scale) ws[k] = _mm256_mul_ps(ws[k], _mm256_load_ps(as + 8 * k));
            f[i] = ubs_accumulate(u, q, 64, ws, mode, f[i]);
        }
    }
    for (int i = 0; i < 4; i++) store1(a->y, n + i, ubs_end(a, n + i, 0, f[i]), 1);
}

#define UBS_CHUNK(mode) \
    static void ubs_chunk_##mode(const void *ctx, long chunk) { \
        const struct ubs_args *a = ctx; \
        const long end = pool_chunk_end(chunk, a->rows, a->N); \
        for (long n = chunk * a->rows; n < end; n += a->M == 1 ? 4 : 1) \
            if (a->M == 1) ubs_rows1(a, n, mode); else ubs_rows8(a, n, mode); \
    }
UBS_CHUNK(H2) UBS_CHUNK(H1) UBS_CHUNK(MD) UBS_CHUNK(ADDS)
static const pool_fn ubs_chunks[4] = {ubs_chunk_H2, ubs_chunk_H1, ubs_chunk_MD, ubs_chunk_ADDS};

/* "ubs-il": the weights rearranged (ab_il_pack) so that no vphaddw is needed: each 4 blocks of a row (128 bytes, a quad's
   4 rows' in turn) as 4 vectors whose bytes 4L .. 4L + 3 (int32 lane L) hold columns of block L % 4 only, so that the
   8 vpmaddubsw of 4 blocks sum in int16 by vpaddw alone (16 products a lane, <= 30,480) and one vpmaddwd by ones
   leaves block b in lanes b and 4 + b, as H2 does. The activations in the same order (ab_il_arrange, not timed: a kernel
   would write them so when it rounds them). */
static inline int ab_il_column(int v, int h, int t, int nib) { return ((v * 2 + h) * 4 + t) * 2 + nib; }
static inline long ab_il_at(long n, int c, int K) { return n / 4 * 4 * (K / 2) + c * 512 + n % 4 * 128; }

static int plain_nibble(const uint8_t *plain, int K, long n, int k) {
    const uint8_t byte = plain[n * K / 2 + 32 * (k / 64) + 2 * (k % 16) + k % 64 / 16 / 2];
    return (byte >> (4 * (k % 64 / 16 % 2))) & 15;
}

static void ab_il_pack(const uint8_t *plain, uint8_t *out, int N, int K) {
    for (long n = 0; n < N; n++)
        for (int c = 0; c < K / 256; c++)
            for (int v = 0; v < 4; v++)
                for (int j = 0; j < 32; j++) {
                    const int b = j / 4 % 4, h = j / 16, t = j % 4, k = 256 * c + 64 * b;
                    out[ab_il_at(n, c, K) + 32 * v + j] = (uint8_t)(plain_nibble(plain, K, n, k + ab_il_column(v, h, t, 0))
                                                       | plain_nibble(plain, K, n, k + ab_il_column(v, h, t, 1)) << 4);
                }
}

static uint8_t *ab_il_w;  /* the shape's weights as ab_il_pack leaves them */
static int8_t ab_il_q[MAXK / 256 * MAXM * 256] __attribute__((aligned(64)));

/* A chunk's nibbles (il_nibbles) times a bf16 row's 256 int8 at q: block b's sum in int32 lanes b and 4 + b, the 8
   vpmaddubsw added in int16 as a tree (no wrap: linear_int4.c's il_row_chunk8). */
static inline __m256i ab_products8(const __m256i u[8], const int8_t *q) {
    const __m256i *p = (const __m256i *)q;
    __m256i s[4];
    for (int v = 0; v < 4; v++)
        s[v] = _mm256_add_epi16(_mm256_maddubs_epi16(u[2 * v], _mm256_load_si256(p + 2 * v)),
                                _mm256_maddubs_epi16(u[2 * v + 1], _mm256_load_si256(p + 2 * v + 1)));
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(s[0], s[1]), _mm256_add_epi16(s[2], s[3])),
                             _mm256_set1_epi16(1));
}

/* ubs_quant's values (q, in the nibbles' order) rearranged: ab_il_q[c][m][v * 2 + nib][32]. */
static void ab_il_arrange(const int8_t *q, int M, int K) {
    for (int m = 0; m < M; m++)
        for (int c = 0; c < K / 256; c++)
            for (int v = 0; v < 4; v++)
                for (int nib = 0; nib < 2; nib++)
                    for (int j = 0; j < 32; j++) {
                        const int b = j / 4 % 4, col = ab_il_column(v, j / 16, j % 4, nib), i = col % 16, g = col / 16;
                        ab_il_q[((long)c * M + m) * 256 + (v * 2 + nib) * 32 + j] =
                            q[((long)(4 * c + b) * M + m) * 64 + (g & 1) * 32 + 2 * i + (g >> 1)];
                    }
}

static void ab_il_chunk(const void *ctx, long chunk) {
    const struct ubs_args *a = ctx;
    const int K = a->K;
    const long end = pool_chunk_end(chunk, a->rows, a->N);
    for (long n = chunk * a->rows; n < end; n += a->M == 1 ? 4 : 1) {
        if (a->M == 1) {
            __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int c = 0; c < K / 256; c++) {
                const uint8_t *w = a->w + ab_il_at(n, c, K);
                const __m256 as = _mm256_load_ps(a->a + c * 8);
                _Pragma("GCC unroll 8") for (int i = 0; i < 8; i++) __builtin_prefetch(w + 8 * (K / 2) + 64 * i);
                _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
                    __m256i u[8];
                    __m256 ws;
                    _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++)
                        ubs_nibbles(w + 128 * i + 32 * v, &u[2 * v], &u[2 * v + 1]);
                    ubs_scales(a, n + i, 4 * c, H2, &ws);
                    f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ab_products8(u, a->q + c * 256)), _mm256_mul_ps(ws, as),
                                           f[i]);
                }
            }
            for (int i = 0; i < 4; i++) store1(a->y, n + i, ubs_end(a, n + i, 0, f[i]), 1);
            continue;
        }
        float f[MAXM][8] __attribute__((aligned(32)));
        for (int r = 0; r < MAXM; r++) _mm256_store_ps(f[r], _mm256_setzero_ps());
        for (int c = 0; c < K / 256; c++) {
            const uint8_t *w = a->w + ab_il_at(n, c, K);
            __m256i u[8];
            __m256 ws;
            _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++) ubs_nibbles(w + 32 * v, &u[2 * v], &u[2 * v + 1]);
            _Pragma("GCC unroll 2") for (int i = 0; i < 2; i++) __builtin_prefetch(w + 8 * (K / 2) + 64 * i);
            ubs_scales(a, n, 4 * c, H2, &ws);
            _Pragma("GCC unroll 8") for (int r = 0; r < MAXM; r++) {
                const __m256 sc = _mm256_mul_ps(ws, _mm256_load_ps(a->a + ((long)r * (K / 256) + c) * 8));
                _mm256_store_ps(f[r], _mm256_fmadd_ps(_mm256_cvtepi32_ps(ab_products8(u, a->q + ((long)c * MAXM + r) * 256)),
                                                      sc, _mm256_load_ps(f[r])));
            }
        }
        for (int r = 0; r < MAXM; r++) store1(a->y, (long)r * a->N + n, ubs_end(a, n, r, _mm256_load_ps(f[r])), 1);
    }
}

static int8_t ubs_q[MAXK / 64 * MAXM * 64] __attribute__((aligned(64)));
static float ubs_a[MAXM * MAXK / 64], ubs_lanes[MAXM * MAXK / 8] __attribute__((aligned(64))), ubs_rs[MAXM],
    ubs_xsum[MAXM * MAXK / 64];

static void linear_int4_ubs(const uint16_t *x, const uint8_t *w, const uint16_t *scale, const uint16_t *offset,
                            uint16_t *y, int M, int N, int K, int mode, int row_scale) {
    ubs_quant(x, M, K, row_scale, ubs_q, ubs_a, ubs_xsum);
    const int V = VECS(mode), blocks = K / 64;
    for (int m = 0; m < M; m++) {
        ubs_rs[m] = ubs_a[m * blocks];
        for (int b4 = 0; b4 < blocks / 4; b4++)
            for (int k = 0; k < V; k++)
                for (int l = 0; l < 8; l++)
                    ubs_lanes[((m * blocks / 4 + b4) * V + k) * 8 + l] = ubs_a[m * blocks + 4 * b4 + lane_block(mode, k, l)];
    }
    const int il = mode == IL;
    const struct ubs_args a = {il ? ab_il_q : ubs_q, ubs_lanes, ubs_rs, ubs_xsum, il ? ab_il_w : w, scale, offset, y, M, N,
                               K, row_scale, (pool_rows_per_chunk(K / 2) + 3) / 4 * 4, N / 4 * 4};
    nanoqwen_pool_run(il ? ab_il_chunk : ubs_chunks[mode], &a, (N + a.rows - 1) / a.rows);
}

#define VARIANTS 8
static const char *names[VARIANTS] = {"kernel", "ubs-h2", "ubs-h1", "ubs-md", "ubs-md-row", "bound-quant",
                                      "bound-adds", "ubs-il"};

static const uint8_t *quad_w;  /* the shape's weights as quad_pack leaves them, for the ubs variants */

static void run(int v, const uint16_t *x, const uint8_t *w, const uint16_t *s, const uint16_t *o, uint16_t *y, int M,
                int N, int K) {
    if (v == 0) linear_int4(x, w, s, o, y, M, N, K, G, 1, 2);
    else if (v == 5) ubs_quant(x, M, K, 0, ubs_q, ubs_a, ubs_xsum);
    else linear_int4_ubs(x, quad_w, s, o, y, M, N, K, v == 1 ? H2 : v == 2 ? H1 : v == 6 ? ADDS : v == 7 ? IL : MD, v == 4);
}

int main(int argc, char **argv) {
    const int rounds = argc > 1 ? atoi(argv[1]) : 15, reps = argc > 2 ? atoi(argv[2]) : 20;
    const long cold = getenv("COLD_MB") ? atol(getenv("COLD_MB")) << 20 : 0;
    int chosen[VARIANTS], nv = 0;  /* the variants named after CALLS (default all), the kernel first */
    chosen[nv++] = 0;
    for (int i = 3; i < argc; i++)
        for (int v = 1; v < VARIANTS; v++)
            if (!strcmp(argv[i], names[v])) chosen[nv++] = v;
    if (argc <= 3)
        for (int v = 1; v < VARIANTS; v++) chosen[nv++] = v;
    if (rounds < 1 || rounds > 1000 || reps < 1) {
        fprintf(stderr, "usage: [COLD_MB=N] %s [ROUNDS 1..1000] [CALLS] [VARIANT...]\n", argv[0]);
        return 2;
    }
    static uint16_t x[MAXM * MAXK], y[MAXM * 6144];
    ab_rows_activations(x);
    for (int si = 0; si < SHAPES; si++) {
        const struct shape *sh = &shapes[si];
        const int N = sh->N, K = sh->K, groups = K / G;
        const long bytes = (long)N * K / 2 + 4L * N * groups;
        const int copies = cold ? (int)((cold + bytes - 1) / bytes) : 1;  /* cycled through: from DRAM past the L3 */
        uint8_t *w[copies], *qw[copies], *ilw[copies], *plain = malloc((long)N * K / 2);
        uint16_t *sc[copies], *of[copies];
        for (long i = 0; i < (long)N * K / 2; i++) plain[i] = (uint8_t)rand();
        for (int c = 0; c < copies; c++) {
            w[c] = aligned_alloc(64, (long)N * K / 2), qw[c] = aligned_alloc(64, (long)N * K / 2), ilw[c] = aligned_alloc(64, (long)N * K / 2);
            sc[c] = malloc(2L * N * groups), of[c] = malloc(2L * N * groups);
            memcpy(w[c], plain, (long)N * K / 2);
            uint8_t quad[4 * MAXK / 2];
            linear_int4_pack(w[c], quad, N, K);
            quad_pack(qw[c], plain, N, K);
            if (c) memcpy(ilw[c], ilw[0], (long)N * K / 2);
            else ab_il_pack(plain, ilw[0], N, K);
        }
        for (long i = 0; i < (long)N * groups; i++)
            sc[0][i] = f32_to_bf16(1e-3f * (float)(1 + rand() % 100)), of[0][i] = f32_to_bf16(-7.5f * bf16_to_f32(sc[0][i]));
        for (int c = 1; c < copies; c++) memcpy(sc[c], sc[0], 2L * N * groups), memcpy(of[c], of[0], 2L * N * groups);
        for (int M = 1; M <= MAXM; M += MAXM - 1) {
            ubs_quant(x, M, K, 0, ubs_q, ubs_a, ubs_xsum);
            ab_il_arrange(ubs_q, M, K);
            /* accuracy: each variant's largest |y - exact| / (sum |w| max|x|) over the rows and outputs */
            double worst[VARIANTS] = {0};
            ab_il_w = ilw[0], quad_w = qw[0];
            for (int j = 0; j < nv; j++) {
                const int v = chosen[j];
                if (v == 5) continue;  /* bound-quant writes no y: it has no error of its own */
                run(v, x, w[0], sc[0], of[0], y, M, N, K);
                for (int m = 0; m < M; m++) {
                    float xmax = 0;
                    for (int k = 0; k < K; k++) xmax = fmaxf(xmax, fabsf(bf16_to_f32(x[m * K + k])));
                    for (int n = 0; n < N; n += 7) {
                        double exact = 0, size = 0;
                        for (int k = 0; k < K; k++) {
                            const int byte = plain[(long)n * K / 2 + (k % 64 / 16 / 2) + 2 * (k % 16) + 32 * (k / 64)];
                            const int nib = (byte >> (4 * (k % 64 / 16 % 2))) & 15;
                            const double wk = (double)bf16_to_f32(sc[0][n * groups + k / G]) * nib
                                              + bf16_to_f32(of[0][n * groups + k / G]);
                            exact += wk * bf16_to_f32(x[m * K + k]), size += fabs(wk);
                        }
                        const double e = fabs(bf16_to_f32(y[(long)m * N + n]) - exact) / (size * xmax);
                        if (e > worst[v]) worst[v] = e;
                    }
                }
            }
            static double t[VARIANTS][1000];
            long call = 0;
            for (int r = -1; r < rounds; r++)
                for (int j = 0; j < nv; j++) {
                    const int v = chosen[(j + (r < 0 ? 0 : r)) % nv];
                    const double start = cpu_now();
                    for (int i = 0; i < reps; i++, call++) {
                        const int c = (int)(call % copies);
                        ab_il_w = ilw[c], quad_w = qw[c];
                        run(v, x, w[c], sc[c], of[c], y, M, N, K);
                    }
                    if (r >= 0) t[v][r] = (cpu_now() - start) / reps;
                }
            double base[1000];
            memcpy(base, t[0], rounds * sizeof *base);
            for (int j = 0; j < nv; j++) {
                const int v = chosen[j];
                double ratio[1000];
                for (int r = 0; r < rounds; r++) ratio[r] = t[v][r] / base[r];
                double copy[1000];
                memcpy(copy, t[v], rounds * sizeof *copy);
                printf("%-8s %5d x %4d  M %d  %-8s %8.1f us  ratio %.3f  worst err/bound-scale %.2e\n", sh->name, N, K,
                       M, names[v], 1e6 * median(copy, rounds), median(ratio, rounds), worst[v]);
            }
        }
        for (int c = 0; c < copies; c++) free(w[c]), free(qw[c]), free(ilw[c]), free(sc[c]), free(of[c]);
        free(plain);
    }
    double load[3];
    getloadavg(load, 3);
    printf("load average %.2f %.2f %.2f, %s\n", load[0], load[1], load[2], cold ? "cold (COLD_MB)" : "hot (in L3)");
    return 0;
}
