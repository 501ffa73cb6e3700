/* int4 weight-only linear layers (asymmetric groups along K) by integer dot products: the why is in
   ops/cpu/linear_int4.py, the packed layout in ops/torch_ref/linear_int4.py. AVX-512 (F, BW, VL, VNNI) int8 pieces
   where the CPU has them (checked at run time), else AVX2 int16 pieces (vpmaddwd). */
#include "nanoqwen_cpu.h"
#include "act_quant.h"
#include "act_quant16.h"
#include "amx.h"
#include "int4_block.h"
#include "pool.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

#define ROWS 8          /* activation rows sharing one transposition of a span's weights: 8 of 1-2 pieces, 4 of 3-4
                           (16 sums in registers at most) */
#define ROW_BLOCK 16    /* weight rows taken span by span where a pass's pieces outgrow L1 */
#define L1_PIECES 16384 /* bytes of pieces beyond which they do (half an L1 data cache) */
#define SPAN_BLOCKS 16  /* blocks of 64 columns in a span: one per int32 lane */
#define SPAN (SPAN_BLOCKS * 64)
#define AMX_INT8_COLUMNS 32  /* piece columns linear_int4_amx takes: two tiles of sums */
#define AMX_INT8_MIN_ROWS 3  /* activation rows from which linear_int4_amx serves: 2 rows take 34 µs through
                                the vpdpbusd loop against 48 through AMX, 3 rows 47 against 49 (hot 1024 x 1024) */

/* ---- the activations: each row as int8 pieces (act_quant.h) in the order the weights' nibbles meet them ---- */

struct acts {
    int8_t *q;       /* [M][P][len]: piece p of row m, arranged (arrange_row; the split is elementwise), 0 past K */
    int8_t *quads;   /* [K / 4][M * P][4]: for linear_int4_amx, the pieces in unpacked_order as act_quads groups them */
    float *a;        /* [M][P]: each piece's scale */
    float *xsum;     /* [M][len / 64]: each block's fp32 activation sum, which the offsets multiply */
    float *gsum;     /* [K / G][16]: for linear_int4_amx, each group's sums of rows 0..M - 1, then 0 */
    int32_t *group;  /* [len / 64]: each block's group */
    long len;        /* K rounded up to whole spans */
};

/* Column of a 64-column block at byte j of step s, after transpose_span: dword d of a block holds, low nibbles
   first, q[2d], q[32 + 2d], q[2d + 1], q[33 + 2d] (step 2d), and 16 columns further in its high nibbles
   (step 2d + 1). */
static inline int column_at(int s, int j) {
    static const int8_t pair[4] = {0, 32, 1, 33};
    return 16 * (s & 1) + 2 * (s >> 1) + pair[j];
}

/* x: one row of K fp32 activations -> out: [len] fp32, arranged: span t's step s holds at lane b (4 bytes) the
   columns column_at(s, 0..3) of block 16t + b; 0 past K. */
static void arrange_row(const float *x, int K, long len, float *out) {
    int32_t lanes[16];  /* position l of 16 consecutive ones: block l / 4 of a quarter span, byte l % 4 */
    for (int l = 0; l < 16; l++) lanes[l] = 64 * (l / 4) + column_at(0, l % 4);
    const __m512i lane = _mm512_loadu_si512(lanes);
    const int blocks = K / 64;
    for (long t = 0; t < len / SPAN; t++)
        for (int s = 0; s < 16; s++)
            for (int u = 0; u < 4; u++) {  /* blocks 16t + 4u ... + 3 */
                const long b0 = 16 * t + 4 * u;
                const int count = blocks - b0 >= 4 ? 4 : blocks - b0 > 0 ? (int)(blocks - b0) : 0;
                const __mmask16 present = (__mmask16)((1u << (4 * count)) - 1u);
                const __m512i at = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(64 * b0) + column_at(s, 0)));
                _mm512_store_ps(out + t * SPAN + s * 64 + 16 * u,
                                _mm512_mask_i32gather_ps(_mm512_setzero_ps(), present, at, x, 4));
            }
}

/* x: one row of K activations, bf16 or fp32 -> out: [K] fp32 (exact). */
static void widen_row(const void *x, int K, int bf16, float *out) {
    for (int k = 0; k < K; k += 16)
        _mm512_store_ps(out + k, bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                            _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + k))), 16))
                                      : _mm512_loadu_ps((const float *)x + k));
}

/* Each block's activation sum (fp32), for the offsets; 0 past the K / 64 blocks of x. */
static void block_sums(const float *x, int K, long lanes, float *out) {
    for (long b = 0; b < lanes; b++) {
        __m512 s = _mm512_setzero_ps();
        for (int c = 0; c < 64 && b < K / 64; c += 16) s = _mm512_add_ps(s, _mm512_load_ps(x + b * 64 + c));
        out[b] = _mm512_reduce_add_ps(s);
    }
}

/* ---- the weights ---- */

/* Up to 16 values (count) from p[i...], bf16 or fp32, as fp32 lanes; the rest 0. */
static inline __m512 load16(const void *p, long i, int count, int bf16) {
    const __mmask16 mask = (__mmask16)((1u << count) - 1u);
    if (!bf16) return _mm512_maskz_loadu_ps(mask, (const float *)p + i);
    const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The permutations of transpose_span: stage st (0..2) making output e (0, 1) of a pair of vectors. */
struct transpose_index {
    __m512i i[3][2];
};

static struct transpose_index transpose_indices(void) {
    struct transpose_index t;
    for (int e = 0; e < 2; e++) {
        int32_t s0[16], s1[16], s2[16];
        for (int L = 0; L < 16; L++) {
            s0[L] = ((L >> 3) & 1) << 4 | ((L >> 2) & 1) << 3 | e << 2 | (L & 3);
            s1[L] = ((L >> 2) & 1) << 4 | ((L >> 3) & 1) << 3 | ((L >> 1) & 1) << 2 | e << 1 | (L & 1);
            s2[L] = ((L >> 1) & 1) << 4 | (L & 0xc) | (L & 1) << 1 | e;
        }
        t.i[0][e] = _mm512_loadu_si512(s0), t.i[1][e] = _mm512_loadu_si512(s1), t.i[2][e] = _mm512_loadu_si512(s2);
    }
    return t;
}

/* The span of `count` (<= 16) blocks at p (32 bytes each; the rest read as 0) -> o[d], d < 8: lane b holds dword
   d of block b. Three rounds of two-source permutes, each trading one bit of the vector index for one of the lane
   index (z[k] holds blocks 2k, 2k + 1). */
static inline __attribute__((always_inline)) void transpose_span(const uint8_t *p, int count,
                                                                 const struct transpose_index *t, __m512i o[8]) {
    __m512i z[8], u[8], v[8];
    for (int k = 0; k < 8; k++) {
        const int n = count - 2 * k;
        z[k] = n >= 2 ? _mm512_loadu_si512(p + 64 * k)
                      : _mm512_maskz_loadu_epi32(n == 1 ? (__mmask16)0xff : 0, p + 64 * k);
    }
    for (int k = 0; k < 4; k++)
        for (int e = 0; e < 2; e++) u[4 * e + k] = _mm512_permutex2var_epi32(z[k], t->i[0][e], z[k + 4]);
    for (int h = 0; h < 2; h++)
        for (int k0 = 0; k0 < 2; k0++)
            for (int e = 0; e < 2; e++)
                v[4 * h + 2 * e + k0] = _mm512_permutex2var_epi32(u[4 * h + k0], t->i[1][e], u[4 * h + 2 + k0]);
    for (int h = 0; h < 4; h++)
        for (int e = 0; e < 2; e++) o[2 * h + e] = _mm512_permutex2var_epi32(v[2 * h], t->i[2][e], v[2 * h + 1]);
}

struct linear_int4_args {
    struct acts x;
    const uint8_t *w;
    const void *scale, *offset;
    void *y;
    int M, N, K, G, P, bf16;
    long rows;  /* per chunk */
    const void *raw;  /* x as it came: linear_int4_unstaged's */
};

/* Span `span` of weight row n against activation rows m0 + r, r < R (<= ROWS), of P pieces, both constants where
   this is inlined: f[r] += the span's 16 blocks' scaled sums, lane b block b. Lane b of the int32 sums collects block
   b's sum_k q[k] * piece[k] (vpdpbusd: the nibbles are the unsigned operand), then all 16 blocks' sums are converted
   and scaled at once. At one activation row the high nibbles stay in place (w & 0xf0: 16 x the nibble, one op where
   shift and mask are two) in sums of their own, shifted back (exact: multiples of 16) at the span's end, which also
   halves each chain of vpdpbusd (1 row hot in L2: 0.96x the time with the groups of 64 below, profiles/RESULTS.md,
   int4row; at 2 fp32 rows the extra sums spill: 1.05x). */
static inline __attribute__((always_inline)) void
span_vnni(const struct linear_int4_args *a, const struct transpose_index *t, long n, int m0, int R, int P, long span,
          int count, const uint8_t *ahead, __m512 f[ROWS]) {
    const int K = a->K, groups = K / a->G, split = R == 1;
    const long len = a->x.len, lanes = len / 64, b0 = span * SPAN_BLOCKS;
    const __m512i nibble = _mm512_set1_epi8(0xf), high = _mm512_set1_epi8((char)0xf0);
    __m512i o[8], acc[ROWS][ACT_MAX_PIECES], upper[ACT_MAX_PIECES];  /* upper[p]: 16 x the high nibbles' sums */
    for (int k = 0; k < SPAN / 128; k++) __builtin_prefetch(ahead + 64 * k);
    transpose_span(a->w + n * (K / 2) + b0 * 32, count, t, o);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 4") for (int p = 0; p < P; p++) {
            acc[r][p] = _mm512_setzero_si512();
            if (split) upper[p] = _mm512_setzero_si512();
        }
    _Pragma("GCC unroll 8") for (int d = 0; d < 8; d++) {
        const __m512i lo = _mm512_and_si512(o[d], nibble);
        const __m512i hi = split ? _mm512_and_si512(o[d], high) : _mm512_and_si512(_mm512_srli_epi32(o[d], 4), nibble);
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            _Pragma("GCC unroll 4") for (int p = 0; p < P; p++) {
                const int8_t *q = a->x.q + ((long)(m0 + r) * P + p) * len + span * SPAN + d * 128;
                acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], lo, _mm512_load_si512(q));
                if (split) upper[p] = _mm512_dpbusd_epi32(upper[p], hi, _mm512_load_si512(q + 64));
                else acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], hi, _mm512_load_si512(q + 64));
            }
    }
    if (split)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            _Pragma("GCC unroll 4") for (int p = 0; p < P; p++)
                acc[r][p] = _mm512_add_epi32(acc[r][p], _mm512_srai_epi32(upper[p], 4));
    /* lane b's group scale and offset: with groups of 64 block b's; else each block's group, relative to the span's
       first, spread over its blocks */
    const int g0 = a->x.group[b0], used = groups - g0 < 16 ? groups - g0 : 16;
    __m512 s = load16(a->scale, n * groups + g0, used, a->bf16), off = load16(a->offset, n * groups + g0, used, a->bf16);
    if (a->G > 64) {
        const __m512i idx = _mm512_sub_epi32(_mm512_load_si512(a->x.group + b0), _mm512_set1_epi32(g0));
        s = _mm512_permutexvar_ps(idx, s), off = _mm512_permutexvar_ps(idx, off);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        const float *pa = a->x.a + (long)(m0 + r) * P;
        __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_set1_ps(pa[0]));
        _Pragma("GCC unroll 4") for (int p = 1; p < P; p++)
            sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][p]), _mm512_set1_ps(pa[p]), sum);
        f[r] = _mm512_fmadd_ps(sum, s, f[r]);
        f[r] = _mm512_fmadd_ps(off, _mm512_load_ps(a->x.xsum + (long)(m0 + r) * lanes + b0), f[r]);
    }
}

/* y[m0 + r, n0 + i] for r < R, i < count weight rows: span by span across the weight rows where the pieces
   (R * P rows of len bytes) outgrow L1 (block), so that one span's stay there; else row by row, each streamed
   PREFETCH_BYTES ahead, at 1 row as two streams, the halves of the rows, a row of each in turn (at batch 1
   linear_int4_rows gives it a chunk's rows, else up to ROW_BLOCK: profiles/RESULTS.md, int4row). block: each row's next span is prefetched, `count` rows
   before it is read; a last span, the same row of the next block. */
static inline __attribute__((always_inline)) void
rows_vnni(const struct linear_int4_args *a, const struct transpose_index *t, long n0, int count, int m0, int R, int P,
          int block) {
    const long spans = a->x.len / SPAN, row = a->K / 2, whole = a->K / SPAN;  /* whole: spans of 16 blocks */
    const int last = a->K / 64 - (int)(spans - 1) * SPAN_BLOCKS;  /* blocks in the last span */
    if (!block) {
        const int half = R == 1 ? (count + 1) / 2 : count;
        for (int j = 0; j < count; j++) {
            const int i = R > 1 ? j : j & 1 ? half + j / 2 : j / 2;
            const uint8_t *w = a->w + (n0 + i) * row;
            __m512 f[ROWS];
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
            /* a constant count in the whole spans: their loads are plain */
            for (long span = 0; span < whole; span++)
                span_vnni(a, t, n0 + i, m0, R, P, span, SPAN_BLOCKS, w + span * SPAN / 2 + PREFETCH_BYTES, f);
            if (whole < spans) span_vnni(a, t, n0 + i, m0, R, P, whole, last, w + whole * SPAN / 2 + PREFETCH_BYTES, f);
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
                store1(a->y, (long)(m0 + r) * a->N + n0 + i, _mm512_reduce_add_ps(f[r]), a->bf16);
        }
        return;
    }
    __m512 f[ROW_BLOCK][ROWS];
    for (int i = 0; i < count; i++)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) f[i][r] = _mm512_setzero_ps();
    for (long span = 0; span < spans; span++)
        for (int i = 0; i < count; i++) {
            const uint8_t *w = a->w + (n0 + i) * row;
            span_vnni(a, t, n0 + i, m0, R, P, span, span + 1 < spans ? SPAN_BLOCKS : last,
                      span + 1 < spans ? w + (span + 1) * SPAN / 2 : w + ROW_BLOCK * row,
                      f[i]);
        }
    for (int i = 0; i < count; i++)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            store1(a->y, (long)(m0 + r) * a->N + n0 + i, _mm512_reduce_add_ps(f[i][r]), a->bf16);
}

/* rows_vnni with R activation rows of P pieces, both constants: one function per pair, not one switch over them all
   inlined into linear_int4_rows, whose single 280 KB function took gcc 26 s to compile (its passes grow faster than
   the code); apart, 10 s. The permutations are made here, so that they stay in registers. */
#define ROWS_VNNI(r, p) \
    static __attribute__((noinline)) void rows_vnni_##r##_##p(const struct linear_int4_args *a, long n0, int count, \
                                                              int m0, int block) { \
        const struct transpose_index t = transpose_indices(); \
        rows_vnni(a, &t, n0, count, m0, r, p, block); \
    }
ROWS_VNNI(1, 1) ROWS_VNNI(1, 2) ROWS_VNNI(1, 3) ROWS_VNNI(1, 4) ROWS_VNNI(2, 1) ROWS_VNNI(2, 2) ROWS_VNNI(2, 3)
ROWS_VNNI(2, 4) ROWS_VNNI(3, 1) ROWS_VNNI(3, 2) ROWS_VNNI(3, 3) ROWS_VNNI(3, 4) ROWS_VNNI(4, 1) ROWS_VNNI(4, 2)
ROWS_VNNI(4, 3) ROWS_VNNI(4, 4) ROWS_VNNI(5, 1) ROWS_VNNI(5, 2) ROWS_VNNI(6, 1) ROWS_VNNI(6, 2) ROWS_VNNI(7, 1)
ROWS_VNNI(7, 2) ROWS_VNNI(8, 1) ROWS_VNNI(8, 2)
#undef ROWS_VNNI

/* Whether a pass of R activation rows takes its weight rows span by span (rows_vnni's block). */
static inline int by_spans(const struct linear_int4_args *a, int R) {
    return a->x.len > SPAN && (long)R * a->P * a->x.len > L1_PIECES;
}

/* Weight rows start..end - 1, every activation row, ROWS (ROWS / 2 of 3-4 pieces) at a time. */
static void linear_int4_rows(const struct linear_int4_args *a, long start, long end) {
    const int most = a->P <= 2 ? ROWS : ROWS / 2;
    /* one row not span by span: the chunk's rows in one pass, as two streams (rows_vnni) */
    const long step = a->M == 1 && !by_spans(a, 1) ? end - start : ROW_BLOCK;
    for (long n0 = start; n0 < end; n0 += step) {
        const int count = end - n0 < step ? (int)(end - n0) : (int)step;
        for (int m0 = 0; m0 < a->M; m0 += most) {
            const int R = a->M - m0 < most ? a->M - m0 : most;
            const int block = by_spans(a, R);
#define CASE(r, p) case (r) * 8 + (p): rows_vnni_##r##_##p(a, n0, count, m0, block); break;
            switch (R * 8 + a->P) {
                CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
                CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
                CASE(5, 1) CASE(5, 2) CASE(6, 1) CASE(6, 2) CASE(7, 1) CASE(7, 2) CASE(8, 1) CASE(8, 2)
            }
#undef CASE
        }
    }
}

static void linear_int4_chunk(const void *ctx, long chunk) {
    const struct linear_int4_args *a = ctx;
    linear_int4_rows(a, chunk * a->rows, pool_chunk_end(chunk, a->rows, a->N));
}

/* ---- AMX-INT8: 16 weight rows x one block against every activation row's pieces ---- */

/* Column of a block at byte t of unpack_u8's 64: byte 2i of the block holds q[i] and q[16 + i], byte 2i + 1
   q[32 + i] and q[48 + i]; its low nibbles come first, then its high ones. */
static inline int unpacked_column(int t) { return ((t & 31) >> 1) + 32 * (t & 1) + 16 * (t >> 5); }

/* x: [M, K] fp32 -> out: [M, K] with each block's columns in unpack_u8's order (unpacked_column). */
static void unpacked_order(const float *x, int M, int K, float *out) {
    int32_t order[64];
    for (int t = 0; t < 64; t++) order[t] = unpacked_column(t);
    for (long b = 0; b < (long)M * K; b += 64)
        for (int t = 0; t < 64; t += 16)
            _mm512_storeu_ps(out + b + t, _mm512_i32gather_ps(_mm512_loadu_si512(order + t), x + b, 4));
}

#define AMX_INT8_BEGIN _Pragma("GCC push_options") \
    _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,amx-tile,amx-bf16,amx-int8\")")
#define AMX_INT8_END _Pragma("GCC pop_options")

AMX_INT8_BEGIN
/* The 32 packed bytes of a block -> its 64 q as bytes: the low nibbles, then the high ones. */
static inline __m512i unpack_u8(const uint8_t *p) {
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xffff0000u, v, 4), _mm512_set1_epi8(0xf));
}

/* Tiles 0 and 1: unpacked weights (16 rows x 64 q), alternately. Up to 16 piece columns: tiles 2 and 3 their
   quads, alternately, and 4 to 7 the sums of four groups in flight. More (split): tiles 2 and 3 the quads of
   columns 0-15 and 16-31, and the sums of two groups in flight: 4 and 5, 6 and 7. */
static void configure_int8_tiles(int C) {
    const int c0 = C < 16 ? C : 16, c1 = C - c0;
    struct tile_config config = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        config.rows[t] = AMX_ROWS;
        config.colsb[t] = (uint16_t)(t < 2 ? 64 : 4 * (c1 && (t == 3 || t == 5 || t == 7) ? c1 : c0));
    }
    _tile_loadconfig(&config);
}

/* Block b of 16 weight rows from w (rows of K / 2 bytes) -> t: the tile of their q. The next 16 rows (K / 8
   lines) are prefetched 8 lines a block (the LM head at 8 rows, out of cache: 10-18 ms against 15-27 with
   each row's block prefetched 2 KB ahead, on a loaded machine). */
static inline void unpack_block(const uint8_t *w, long b, int K, uint8_t t[AMX_ROWS][64]) {
    for (int l = 0; l < 8; l++) __builtin_prefetch(w + (long)AMX_ROWS * (K / 2) + (b * 8 + l) * 64);
    for (int i = 0; i < AMX_ROWS; i++) _mm512_store_si512(t[i], unpack_u8(w + (long)i * (K / 2) + b * 32));
}

/* Group g's sums into tile c (and c2 when split), its weights and quads through tiles wt and qt. */
#define ISSUE(c, c2, wt, qt) do { \
        _tile_zero(c); \
        if (split) _tile_zero(c2); \
        for (int b_ = g * G / 64; b_ < (g + 1) * G / 64; b_++) { \
            const int8_t *quads_ = a->x.quads + (long)b_ * 16 * C * 4; \
            __attribute__((aligned(64))) uint8_t tile_[AMX_ROWS][64]; \
            unpack_block(w, b_, K, tile_); \
            AMX_STORES_VISIBLE(); \
            _tile_loadd(wt, tile_, 64); \
            _tile_loadd(qt, quads_, C * 4); \
            _tile_dpbusd(c, wt, qt); \
            if (split) { \
                _tile_loadd(3, quads_ + 64, C * 4); \
                _tile_dpbusd(c2, wt, 3); \
            } \
        } \
    } while (0)

#define STORE(c, c2) do { \
        _tile_stored(c, sums[0], 64); \
        if (split) _tile_stored(c2, sums[1], 64); \
    } while (0)

/* AMX_INT8_MIN_ROWS or more activation rows with M * P <= AMX_INT8_COLUMNS pieces: 16 weight rows at a time,
   each block unpacked into a tile of 16 x 64 q (the unsigned operand of tdpbusd) against the pieces' quads
   (act_quads, columns m * P + p). A group's int32 sums are scaled per weight row in fp32 two groups later (one
   with two tiles of sums), so that the tile unit's latency is hidden; the pieces' scales apply last. The rows
   past the last whole 16 take linear_int4_rows. */
static void linear_int4_amx(const void *ctx, long chunk) {
    const struct linear_int4_args *a = ctx;
    const int M = a->M, N = a->N, K = a->K, G = a->G, P = a->P, groups = K / G, C = M * P, split = C > AMX_ROWS;
    const int lag = split ? 1 : 2;  /* groups in flight beyond the one being issued */
    const long start = chunk * a->rows, end = pool_chunk_end(chunk, a->rows, N);
    const long whole = N / AMX_ROWS * AMX_ROWS;
    if (start < whole) {
        configure_int8_tiles(C);
        for (long n0 = start; n0 < (end < whole ? end : whole); n0 += AMX_ROWS) {
            const uint8_t *w = a->w + n0 * (K / 2);
            __m512 acc[AMX_ROWS][2], off[AMX_ROWS];  /* [weight row][piece column | activation row] */
            for (int i = 0; i < AMX_ROWS; i++) acc[i][0] = acc[i][1] = off[i] = _mm512_setzero_ps();
            float sc[AMX_ROWS][groups], of[AMX_ROWS][groups];  /* fp32: broadcast from memory, a load alone */
            for (int i = 0; i < AMX_ROWS; i++)
                for (int g = 0; g < groups; g += 16) {
                    const int count = groups - g < 16 ? groups - g : 16;
                    const __mmask16 mask = (__mmask16)((1u << count) - 1u);
                    _mm512_mask_storeu_ps(sc[i] + g, mask, load16(a->scale, (n0 + i) * groups + g, count, a->bf16));
                    _mm512_mask_storeu_ps(of[i] + g, mask, load16(a->offset, (n0 + i) * groups + g, count, a->bf16));
                }
            for (int g = 0; g < groups + lag; g++) {
                if (g < groups) {
                    if (split) {
                        if (g & 1) ISSUE(6, 7, 1, 2); else ISSUE(4, 5, 0, 2);
                    } else {
                        switch (g & 3) {
                            case 0: ISSUE(4, 4, 0, 2); break;
                            case 1: ISSUE(5, 5, 1, 3); break;
                            case 2: ISSUE(6, 6, 0, 2); break;
                            default: ISSUE(7, 7, 1, 3); break;
                        }
                    }
                }
                const int done = g - lag;
                if (done < 0) continue;
                int32_t sums[2][AMX_ROWS][16];
                if (split) {
                    if (done & 1) STORE(6, 7); else STORE(4, 5);
                } else {
                    switch (done & 3) {
                        case 0: STORE(4, 4); break;
                        case 1: STORE(5, 5); break;
                        case 2: STORE(6, 6); break;
                        default: STORE(7, 7); break;
                    }
                }
                const __m512 xs = _mm512_load_ps(a->x.gsum + (long)done * 16);
                for (int i = 0; i < AMX_ROWS; i++) {
                    const __m512 scale = _mm512_set1_ps(sc[i][done]);
                    acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums[0][i])), scale, acc[i][0]);
                    if (split)
                        acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(sums[1][i])), scale, acc[i][1]);
                    off[i] = _mm512_fmadd_ps(xs, _mm512_set1_ps(of[i][done]), off[i]);
                }
            }
            /* y[m, n0 + i] for the 16 i at once: row m's columns gathered across the weight rows */
            float cols[AMX_ROWS][32], rows[AMX_ROWS][16];
            for (int i = 0; i < AMX_ROWS; i++) {
                _mm512_storeu_ps(cols[i], acc[i][0]), _mm512_storeu_ps(cols[i] + 16, acc[i][1]);
                _mm512_storeu_ps(rows[i], off[i]);
            }
            const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            for (int m = 0; m < M; m++) {
                __m512 y = _mm512_i32gather_ps(_mm512_add_epi32(_mm512_slli_epi32(lane, 4), _mm512_set1_epi32(m)),
                                               rows, 4);
                for (int p = 0; p < P; p++)
                    y = _mm512_fmadd_ps(_mm512_set1_ps(a->x.a[m * P + p]),
                                        _mm512_i32gather_ps(_mm512_add_epi32(_mm512_slli_epi32(lane, 5),
                                                                             _mm512_set1_epi32(m * P + p)), cols, 4), y);
                if (a->bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)a->y + (long)m * N + n0), (__m256i)_mm512_cvtneps_pbh(y));
                else _mm512_storeu_ps((float *)a->y + (long)m * N + n0, y);
            }
        }
        _tile_release();
    }
    if (end > whole) linear_int4_rows(a, start > whole ? start : whole, end);
}
#undef ISSUE
#undef STORE
AMX_INT8_END

/* linear_int4 where the CPU has AVX-512 VNNI, each row of x taken as P int8 pieces (act_quant.h): 1 and 2 rows, and
   every row count without AMX-INT8, vpdpbusd (linear_int4_rows); more AMX (linear_int4_amx). 0: no scratch for the
   pieces, nothing done. */
static int linear_int4_vnni(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y, int M,
                            int N, int K, int G, int bf16, int pieces) {
    const long len = (K + SPAN - 1) / SPAN * SPAN, lanes = len / 64;
    const int amx = M >= AMX_INT8_MIN_ROWS && amx_int8_ready();
    const int vnni = !amx || N % AMX_ROWS;  /* linear_int4_amx leaves the last N % 16 weight rows to the VNNI loop */
    /* arranged pieces, pieces and their quads, block sums, the pieces' scales, the blocks' groups, fp32 rows,
       group sums */
    const size_t sizes[] = {(size_t)M * pieces * len, (size_t)M * pieces * K * 2, (size_t)M * lanes * 4,
                            (size_t)M * pieces * 4, (size_t)lanes * 4, (size_t)M * (K + len) * 4,
                            (size_t)(K / G) * 16 * 4};
    enum { PARTS = sizeof sizes / sizeof sizes[0] };
    size_t total = 0;
    for (int i = 0; i < PARTS; i++) total += (sizes[i] + 63) / 64 * 64;
    char *part[PARTS];
    if (!(part[0] = (char *)thread_scratch(total))) return 0;
    for (int i = 1; i < PARTS; i++) part[i] = part[i - 1] + (sizes[i - 1] + 63) / 64 * 64;
    const struct acts acts = {(int8_t *)part[0], (int8_t *)part[1], (float *)part[3], (float *)part[2],
                              (float *)part[6], (int32_t *)part[4], len};
    float *rows = (float *)part[5], *arranged = rows + (long)M * K;
    for (long b = 0; b < lanes; b++) acts.group[b] = (int32_t)(b * 64 / G);
    for (int m = 0; m < M; m++) {
        float *row = rows + (long)m * K;
        widen_row((const char *)x + (size_t)m * K * (bf16 ? 2 : 4), K, bf16, row);
        block_sums(row, K, lanes, acts.xsum + m * lanes);
        if (vnni) {
            arrange_row(row, K, len, arranged);
            act_quant_rows(arranged, 0, 1, (int)len, pieces, acts.q + (long)m * pieces * len, acts.a + m * pieces);
        }
    }
    struct linear_int4_args a = {.x = acts, .w = w, .scale = scale, .offset = offset, .y = y, .M = M, .N = N, .K = K,
                                 .G = G, .P = pieces, .bf16 = bf16, .rows = pool_rows_per_chunk(K / 2)};
    if (amx) {  /* the same scales as the arranged pieces': the split is elementwise, the maximum the row's */
        int8_t *q = acts.quads + (size_t)M * pieces * K;
        for (int g = 0; g < K / G; g++)
            for (int m = 0; m < 16; m++) {
                acts.gsum[g * 16 + m] = 0.0f;
                for (int b = g * G / 64; m < M && b < (g + 1) * G / 64; b++) acts.gsum[g * 16 + m] += acts.xsum[m * lanes + b];
            }
        unpacked_order(rows, M, K, arranged);
        act_quant_rows(arranged, 0, M, K, pieces, q, acts.a);
        act_quads(q, M * pieces, K, acts.quads);
        a.rows = (a.rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
        pool_run(linear_int4_amx, &a, (N + a.rows - 1) / a.rows);
    } else {
        pool_run(linear_int4_chunk, &a, (N + a.rows - 1) / a.rows);
    }
    return 1;
}

#pragma GCC pop_options

/* ---- AVX2 (no AVX-512 VNNI): int16 activation pieces (act_quant16.h) against the nibbles widened to int16 ---- */

/* Accumulator sets a madd_pieces pass holds (W weight rows x rows activation rows x P pieces, W * rows * P <=
   MADD_MAX_PIECES): their int32 and fp32 sums stay in the 16 ymm registers; for 1-2 piece rows. */
#define MADD_MAX_PIECES 4
#define MADD_PIECE_ROWS 2  /* the most piece rows a madd_pieces pass takes (3 and more: madd_rows) */
/* Piece rows a madd_rows pass takes (3 and more): one weight row, each block unpacked once for all of them, their fp32
   sums in L1. One thread, 512 x 1024 hot in L2, 8 bf16 rows: 90 µs a call against 130 for two madd_pieces passes of
   4 (each unpacking every block again), 142 with the sums left to the compiler (spilled); 4 rows 50 against 66. */
#define MADD_ROW_PIECES 8
/* Blocks whose int32 sums cannot overflow: a lane adds 8 products of at most 15 * 32767 a block, so 546 blocks stay
   below 2^31; a longer group is summed in spans of these (tests/test_cpu_linear_int4.py overflows without them). */
#define MADD_SPAN_BLOCKS 512
/* How far ahead the weights are prefetched: the same column of the row this many rows on (4, 8 and 16 measured alike) */
#define MADD_AHEAD_ROWS 8
/* A pass of 8 weight rows (madd_rows) takes its groups in spans of MADD_SPAN_GROUPS, each span for all 8 rows, where
   its pieces exceed MADD_L1_PIECES bytes, so that a span's pieces stay in L1 for the 8 rows (32 KB on Zen 3) instead
   of each row reading them all from L2. One thread, hot, 8 bf16 rows: K 3072 0.78x the time, K 2048 0.92x; below the
   threshold spans were slower (3 rows at K 3072, 18 KB: 1.07-1.14x; 5 at K 2048, 20 KB: 1.08x), 24 KB even. */
#define MADD_SPAN_GROUPS 8
#define MADD_L1_PIECES 24576

struct linear_int4_madd_args {
    const int16_t *q;   /* [K / 64][M * P][64]: the pieces block by block, piece p of row m at m * P + p, so that a
                           pass's piece rows are constant offsets from one pointer */
    const float *a;     /* [M * P]: each piece's scale */
    const float *xsum;  /* [M][K / G]: each group's fp32 activation sum, which the offsets multiply */
    const uint8_t *w;
    const void *scale, *offset;
    void *y;
    int M, N, K, G, P, bf16;
    long rows;       /* per chunk */
    long quad_rows;  /* rows stored in quads (int4_block.h) */
};

/* The 64 nibbles of a block as int16: its 16 words hold, nibble j, columns 16j .. 16j + 15 in order (u[j]). */
INLINE void madd_nibbles(const uint8_t *block, __m256i u[4]) {
    const __m256i words = _mm256_loadu_si256((const __m256i *)block), nibble = _mm256_set1_epi16(15);
    u[0] = _mm256_and_si256(words, nibble), u[1] = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble);
    u[2] = _mm256_and_si256(_mm256_srli_epi16(words, 8), nibble), u[3] = _mm256_srli_epi16(words, 12);
}

/* The block's nibbles (madd_nibbles) times the 64 pieces at q, 16 products a vpmaddwd, summed as a tree, not a chain. */
INLINE __m256i madd_products(const __m256i u[4], const int16_t *q) {
    const __m256i *p = (const __m256i *)q;
    return _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(u[0], _mm256_load_si256(p)), _mm256_madd_epi16(u[1], _mm256_load_si256(p + 1))),
                            _mm256_add_epi32(_mm256_madd_epi16(u[2], _mm256_load_si256(p + 2)), _mm256_madd_epi16(u[3], _mm256_load_si256(p + 3))));
}

/* acc[r] = the 64 nibbles of a block times piece row r's 64 columns (q + 64 r), r < R. */
INLINE void madd_block(const uint8_t *block, const int16_t *q, int R, __m256i *acc) {
    __m256i u[4];
    madd_nibbles(block, u);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[r] = madd_products(u, q + 64 * r);
}

/* sum[r] = the int32 sums of `count` (<= MADD_SPAN_BLOCKS) blocks from w (each `step` bytes from the last) against
   piece row r of q (each block's pieces `stride` int16 from the last), r < R; `ahead`: what to prefetch, one line a
   block. */
INLINE void madd_span(const uint8_t *w, long step, const int16_t *q, long stride, const uint8_t *ahead, int count,
                      int R, __m256i *sum) {
    __m256i acc[MADD_ROW_PIECES];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
    for (int i = 0; i < count; i++, w += step, q += stride, ahead += step) {
        __builtin_prefetch(ahead);
        madd_block(w, q, R, acc);
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) sum[r] = _mm256_add_epi32(sum[r], acc[r]);
    }
}

/* f[r] += one group's int32 sums of piece row r times the group's scale s, r < R: its blocks from w (each `step`
   bytes from the last) and q, in spans of MADD_SPAN_BLOCKS; `ahead`: what to prefetch, one line a block. one: a group
   is one block (a constant). */
INLINE void madd_group(const struct linear_int4_madd_args *a, const uint8_t *w, long step, const int16_t *q,
                       const uint8_t *ahead, int R, int one, __m256 s, __m256 *f) {
    const long stride = (long)a->M * a->P * 64;  /* from one block's pieces to the next's */
    __m256i acc[MADD_MAX_PIECES];
    if (one) {
        __builtin_prefetch(ahead);
        madd_block(w, q, R, acc);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), s, f[r]);
        return;
    }
    for (int done = 0; done < a->G / 64; done += MADD_SPAN_BLOCKS) {
        const int count = a->G / 64 - done < MADD_SPAN_BLOCKS ? a->G / 64 - done : MADD_SPAN_BLOCKS;
        madd_span(w + done * step, step, q + done * stride, stride, ahead + done * step, count, R, acc);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), s, f[r]);
    }
}

/* The end of weight row n for `rows` activation rows from m0 (rows, P constants), in one order for every pass, so
   that a row's outputs are the same bits whatever it is batched with: o[j] = activation row m0 + j's fp32 sums f[j * P
   + p] times its pieces' scales, piece by piece, then weight row n's group offsets times the row's group sums (xsum),
   8 groups a vector, ascending; the groups past the last 8 added to tail[j] in order. Then the lanes of o[j] are
   summed (hadd4's tree) and tail[j] added. Each 8 groups' offsets widened once for all the rows. */
INLINE void madd_ends(const struct linear_int4_madd_args *a, long n, int m0, int rows, int P, const __m256 *f,
                      __m256 *o, float *tail) {
    const int groups = a->K / a->G;
    const float *xsum = a->xsum + (long)m0 * groups;
    _Pragma("GCC unroll 8") for (int j = 0; j < rows; j++) {
        o[j] = _mm256_setzero_ps(), tail[j] = 0.0f;
        _Pragma("GCC unroll 2") for (int p = 0; p < P; p++)
            o[j] = _mm256_fmadd_ps(f[j * P + p], _mm256_set1_ps(a->a[(m0 + j) * P + p]), o[j]);
    }
    int g = 0;
    for (; g + 8 <= groups; g += 8) {
        const __m256 offset = load8(a->offset, n * groups + g, a->bf16);
        _Pragma("GCC unroll 8") for (int j = 0; j < rows; j++)
            o[j] = _mm256_fmadd_ps(offset, _mm256_loadu_ps(xsum + (long)j * groups + g), o[j]);
    }
    for (; g < groups; g++) {
        const float offset = load1(a->offset, n * groups + g, a->bf16);
        _Pragma("GCC unroll 8") for (int j = 0; j < rows; j++) tail[j] = fmaf(offset, xsum[(long)j * groups + g], tail[j]);
    }
}

/* Lanes 0-3 of o[0], ..., o[3] summed pairwise, each in lanes j and 4 + j: the one tree of every pass's lane sums. */
INLINE __m256 hadd4(const __m256 o[4]) {
    return _mm256_hadd_ps(_mm256_hadd_ps(o[0], o[1]), _mm256_hadd_ps(o[2], o[3]));
}

/* The sums of o[0..3]'s lanes. */
INLINE __m128 hsum4(const __m256 o[4]) {
    const __m256 t = hadd4(o);
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

/* y[m0 + j, n + i] for the `rows` activation rows from m0 and the W weight rows from n (W, rows and P constants,
   W * rows * P <= MADD_MAX_PIECES): each block of the W weight rows against every row's pieces, each group's int32
   sums scaled by its scale (8 groups' scales widened at once, then broadcast from memory), then the pieces' scales
   and the offsets times the group sums. Several weight rows a pass for few piece rows: their sums are independent
   FMA chains, and the end of a row (sums across lanes, the offsets) is shared. one: G == 64. The W rows are all in
   one quad or all plain (int4_block.h): a pass of 4 starts at a multiple of 4, one of 2 at an even row. */
INLINE void madd_pieces(const struct linear_int4_madd_args *a, long n, int W, int m0, int rows, int P, int one) {
    const int R = rows * P, G = a->G, groups = a->K / G, bf16 = a->bf16, quad = n < a->quad_rows;
    const long row = a->K / 2, stride = (long)a->M * P * 64 * (G / 64);  /* the pieces of one group to the next's */
    const long step = quad ? 128 : 32, next_row = quad ? 32 : row;  /* to a row's next block; to the next row's */
    const uint8_t *w = a->w + int4_block_at(n, 0, a->K, a->quad_rows);
    const int16_t *q = a->q + (long)m0 * P * 64;
    __m256 f[MADD_MAX_PIECES][MADD_MAX_PIECES];
    _Pragma("GCC unroll 4") for (int i = 0; i < W; i++)
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) f[i][r] = _mm256_setzero_ps();
    float scales[MADD_MAX_PIECES][8] __attribute__((aligned(32)));
    for (int g0 = 0; g0 < groups; g0 += 8) {
        const int count = groups - g0 < 8 ? groups - g0 : 8;
        _Pragma("GCC unroll 4") for (int i = 0; i < W; i++) {
            if (count == 8) _mm256_store_ps(scales[i], load8(a->scale, (n + i) * groups + g0, bf16));
            else for (int g = 0; g < count; g++) scales[i][g] = load1(a->scale, (n + i) * groups + g0 + g, bf16);
        }
        for (int g = 0; g < count; g++, w += G / 64 * step, q += stride)
            _Pragma("GCC unroll 4") for (int i = 0; i < W; i++)  /* MADD_AHEAD_ROWS rows on: the same offset in quads */
                madd_group(a, w + i * next_row, step, q, w + i * next_row + MADD_AHEAD_ROWS * row, R, one,
                           _mm256_broadcast_ss(scales[i] + g), f[i]);
    }
    __m256 o[MADD_MAX_PIECES][MADD_PIECE_ROWS];  /* [weight row][activation row] */
    float tail[MADD_MAX_PIECES][MADD_PIECE_ROWS];
    _Pragma("GCC unroll 4") for (int i = 0; i < W; i++) madd_ends(a, n + i, m0, rows, P, f[i], o[i], tail[i]);
    _Pragma("GCC unroll 2") for (int j = 0; j < rows; j++) {
        __m256 v[4];
        float t[4], out[4];
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++)
            v[i] = i < W ? o[i][j] : _mm256_setzero_ps(), t[i] = i < W ? tail[i][j] : 0.0f;
        _mm_storeu_ps(out, _mm_add_ps(hsum4(v), _mm_loadu_ps(t)));
        _Pragma("GCC unroll 4") for (int i = 0; i < W; i++) store1(a->y, (long)(m0 + j) * a->N + n + i, out[i], bf16);
    }
}

/* Lane j: the sum of o[j]'s lanes, as hsum4 sums them. */
INLINE __m256 hsum8(const __m256 o[8]) {
    const __m256 lo = hadd4(o), hi = hadd4(o + 4);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* t[j] lane i = o[i] lane j. */
INLINE void transpose8(const __m256 o[8], __m256 t[8]) {
    __m256 u[8], v[8];
    _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++)
        u[2 * i] = _mm256_unpacklo_ps(o[2 * i], o[2 * i + 1]),
        u[2 * i + 1] = _mm256_unpackhi_ps(o[2 * i], o[2 * i + 1]);
    _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++)
        _Pragma("GCC unroll 2") for (int e = 0; e < 2; e++) {
            const __m256 lo = u[4 * h + e], hi = u[4 * h + 2 + e];
            v[4 * h + 2 * e] = _mm256_shuffle_ps(lo, hi, 0x44), v[4 * h + 2 * e + 1] = _mm256_shuffle_ps(lo, hi, 0xee);
        }
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)
        t[j] = _mm256_permute2f128_ps(v[j], v[4 + j], 0x20), t[4 + j] = _mm256_permute2f128_ps(v[j], v[4 + j], 0x31);
}

/* y[m, n .. n + 7] = v, rounded as store1 rounds (a NaN stays a NaN, as round8 alone does not promise). */
INLINE void store_row8(void *y, long at, __m256 v, int bf16) {
    if (bf16) v = _mm256_blendv_ps(round8(v, 1), _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x400000))),
                                   _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    store8(y, at, v, bf16);
}

/* Groups g0 .. g1 - 1 of weight row n against the `rows` activation rows from m0 (rows, P constants,
   3 <= R = rows * P <= MADD_ROW_PIECES): each block unpacked once and multiplied by all R piece rows, each
   group's int32 sums scaled into the fp32 sums f[r] kept in memory (L1: left to the compiler, they spill worse,
   above). one: G == 64. */
INLINE void madd_row_groups(const struct linear_int4_madd_args *a, long n, int g0, int g1, int m0, int rows, int P,
                            int one, float f[][8]) {
    const int R = rows * P, G = a->G, groups = a->K / G, bf16 = a->bf16;
    const long step = n < a->quad_rows ? 128 : 32, stride = (long)a->M * P * 64;  /* to the next block's */
    const long b0 = (long)g0 * (G / 64);
    const uint8_t *w = a->w + int4_block_at(n, b0, a->K, a->quad_rows), *ahead = w + MADD_AHEAD_ROWS * (a->K / 2);
    const int16_t *q = a->q + b0 * stride + (long)m0 * P * 64;
    float scales[8] __attribute__((aligned(32)));
    for (; g0 < g1; g0 += 8) {
        const int count = g1 - g0 < 8 ? g1 - g0 : 8;
        if (count == 8) _mm256_store_ps(scales, load8(a->scale, n * groups + g0, bf16));
        else for (int g = 0; g < count; g++) scales[g] = load1(a->scale, n * groups + g0 + g, bf16);
        for (int g = 0; g < count; g++) {
            const __m256 s = _mm256_broadcast_ss(scales + g);
            if (one) {  /* madd_block, each row's sums scaled and stored before the next's products (no spills) */
                __m256i u[4];
                __builtin_prefetch(ahead);
                madd_nibbles(w, u);
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
                    _mm256_store_ps(f[r], _mm256_fmadd_ps(_mm256_cvtepi32_ps(madd_products(u, q + 64 * r)), s,
                                                          _mm256_load_ps(f[r])));
                w += step, ahead += step, q += stride;
                continue;
            }
            for (int done = 0; done < G / 64; done += MADD_SPAN_BLOCKS) {
                const int blocks = G / 64 - done < MADD_SPAN_BLOCKS ? G / 64 - done : MADD_SPAN_BLOCKS;
                __m256i sum[MADD_ROW_PIECES];
                madd_span(w, step, q, stride, ahead, blocks, R, sum);
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
                    _mm256_store_ps(f[r], _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), s, _mm256_load_ps(f[r])));
                w += blocks * step, ahead += blocks * step, q += blocks * stride;
            }
        }
    }
}

/* Weight row n's outputs from its fp32 sums f (madd_row_groups) for the `rows` activation rows from m0, lane j row
   m0 + j: madd_pieces' ends (madd_ends), every row's lanes summed at once (hsum8). */
INLINE __m256 madd_row_end(const struct linear_int4_madd_args *a, long n, int m0, int rows, int P, float f[][8]) {
    __m256 sums[MADD_ROW_PIECES], o[8];
    float tail[8] __attribute__((aligned(32)));
    _Pragma("GCC unroll 8") for (int r = 0; r < rows * P; r++) sums[r] = _mm256_load_ps(f[r]);
    _Pragma("GCC unroll 8") for (int j = rows; j < 8; j++) o[j] = _mm256_setzero_ps(), tail[j] = 0.0f;
    madd_ends(a, n, m0, rows, P, sums, o, tail);
    return _mm256_add_ps(hsum8(o), _mm256_load_ps(tail));
}

/* y[m0 + j, n] for weight rows n .. end - 1 and the `rows` activation rows from m0 (rows, P constants), 8 weight rows
   at a time (the chunk's last (end - n) % 8 together): a span of groups of each in turn (madd_row_groups; all of
   them, or MADD_SPAN_GROUPS where the pieces outgrow L1), then each row's ends (madd_row_end), 8 weight rows'
   outputs transposed and stored as 8 contiguous values an activation row, fewer one by one. A row's sums take the
   same order either way. */
INLINE void madd_rows(const struct linear_int4_madd_args *a, long n, long end, int m0, int rows, int P, int one) {
    const int R = rows * P, groups = a->K / a->G;
    const int span = (long)R * a->K * 2 > MADD_L1_PIECES ? MADD_SPAN_GROUPS : groups;
    for (; n < end; n += 8) {
        const int W = end - n < 8 ? (int)(end - n) : 8;
        float f[8][MADD_ROW_PIECES][8] __attribute__((aligned(32)));
        for (int i = 0; i < W; i++)
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) _mm256_store_ps(f[i][r], _mm256_setzero_ps());
        for (int g0 = 0; g0 < groups; g0 += span)
            for (int i = 0; i < W; i++)
                madd_row_groups(a, n + i, g0, groups - g0 < span ? groups : g0 + span, m0, rows, P, one, f[i]);
        if (W == 8) {
            __m256 o[8], t[8];
            for (int i = 0; i < 8; i++) o[i] = madd_row_end(a, n + i, m0, rows, P, f[i]);
            transpose8(o, t);
            _Pragma("GCC unroll 8") for (int j = 0; j < rows; j++)
                store_row8(a->y, (long)(m0 + j) * a->N + n, t[j], a->bf16);
            continue;
        }
        for (int i = 0; i < W; i++) {
            float out[8] __attribute__((aligned(32)));
            _mm256_store_ps(out, madd_row_end(a, n + i, m0, rows, P, f[i]));
            _Pragma("GCC unroll 8") for (int j = 0; j < rows; j++)
                store1(a->y, (long)(m0 + j) * a->N + n + i, out[j], a->bf16);
        }
    }
}

/* madd_rows with r activation rows of p pieces, both constants: one function each, apart from
   linear_int4_madd_chunk, whose 1-2 piece-row passes they slowed by 5-8% inlined there (hot, one thread). */
#define MADD_ROWS(r, p) \
    static __attribute__((noinline)) void madd_rows_##r##_##p(const struct linear_int4_madd_args *a, long n, long end, \
                                                              int m0) { \
        if (a->G == 64) madd_rows(a, n, end, m0, r, p, 1); else madd_rows(a, n, end, m0, r, p, 0); \
    }
MADD_ROWS(3, 1) MADD_ROWS(4, 1) MADD_ROWS(5, 1) MADD_ROWS(6, 1) MADD_ROWS(7, 1) MADD_ROWS(8, 1) MADD_ROWS(2, 2)
MADD_ROWS(3, 2) MADD_ROWS(4, 2)
#undef MADD_ROWS

/* Weight rows of a pass for R piece rows (`rows` activation rows of P pieces): as many as the accumulators allow. */
#define MADD_WEIGHT_ROWS(R) (MADD_MAX_PIECES / (R))
#define MADD_ROW_SERVES(R) ((R) > MADD_PIECE_ROWS)  /* piece rows from which a pass takes madd_rows */

static void linear_int4_madd_chunk(const void *ctx, long chunk) {
    const struct linear_int4_madd_args *a = ctx;
    const int M = a->M, per = MADD_ROW_PIECES / a->P, one = a->G == 64;
    const long end = pool_chunk_end(chunk, a->rows, a->N);
    for (int m0 = 0; m0 < M; m0 += per) {
        const int rows = M - m0 < per ? M - m0 : per, W = MADD_WEIGHT_ROWS(rows * a->P);
        long n = chunk * a->rows;
        /* constants: the accumulators stay in registers. whole: W weight rows a pass (W above), else one (the tail) */
#define PASS(whole, r, p) { \
            const int w = whole ? MADD_WEIGHT_ROWS((r) * (p)) : 1; \
            if (one) madd_pieces(a, n, w, m0, r, p, 1); else madd_pieces(a, n, w, m0, r, p, 0); \
        }
        if (MADD_ROW_SERVES(rows * a->P)) {
            switch (a->P == 1 ? rows : -rows) {
                case 3: madd_rows_3_1(a, n, end, m0); break;
                case 4: madd_rows_4_1(a, n, end, m0); break;
                case 5: madd_rows_5_1(a, n, end, m0); break;
                case 6: madd_rows_6_1(a, n, end, m0); break;
                case 7: madd_rows_7_1(a, n, end, m0); break;
                case 8: madd_rows_8_1(a, n, end, m0); break;
                case -2: madd_rows_2_2(a, n, end, m0); break;
                case -3: madd_rows_3_2(a, n, end, m0); break;
                default: madd_rows_4_2(a, n, end, m0); break;
            }
            continue;
        }
#define CASES(whole) \
        switch (a->P == 1 ? rows : -rows) { \
            case 1: PASS(whole, 1, 1); break; \
            case 2: PASS(whole, 2, 1); break; \
            default: PASS(whole, 1, 2); break; \
        }
        for (; n + W <= end; n += W) CASES(1)
        for (; n < end; n++) CASES(0)
#undef CASES
#undef PASS
    }
}
_Static_assert(MADD_MAX_PIECES == 4 && MADD_PIECE_ROWS == 2 && MADD_ROW_PIECES == 8 && ACT16_MAX_PIECES == 2,
               "linear_int4_madd_chunk's cases");

/* linear_int4 on AVX2: each row of x taken as ACT16_PIECES(pieces) int16 pieces, one of which holds what two int8
   pieces do (act_quant16.h), so within the bound of `pieces` int8 ones. 0: no scratch for them, nothing done. */
static int linear_int4_madd(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y, int M,
                            int N, int K, int G, int bf16, int pieces) {
    const int P = ACT16_PIECES(pieces), groups = K / G;
    const size_t scales = ((size_t)M * P * 4 + 63) / 64 * 64, sums = ((size_t)M * groups * 4 + 63) / 64 * 64;
    char *scratch = thread_scratch(scales + sums + (size_t)M * P * K * 2);
    if (!scratch) return 0;
    int16_t *blocks = (int16_t *)(scratch + scales + sums);
    float *xsum = (float *)(scratch + scales);
    act16_quant_rows(x, bf16, M, K, P, 64, blocks, (float *)scratch);
    for (int m = 0; m < M; m++)
        for (int g = 0; g < groups; g++) {
            __m256 v = _mm256_setzero_ps();
            for (int k = g * G; k < (g + 1) * G; k += 8) v = _mm256_add_ps(v, load8(x, (long)m * K + k, bf16));
            xsum[m * groups + g] = hsum(v);
        }
    const long pass = MADD_WEIGHT_ROWS(1), rows = (pool_rows_per_chunk(K / 2) + pass - 1) / pass * pass;  /* whole passes */
    const struct linear_int4_madd_args a = {blocks, (const float *)scratch, xsum, w, scale, offset, y,
                                            M, N, K, G, P, bf16, rows, int4_quad_rows(N)};
    pool_run(linear_int4_madd_chunk, &a, (N + a.rows - 1) / a.rows);
    return 1;
}

/* Without scratch for the pieces (out of memory): y[m, n] as the reference computes it, each 64-column block of the
   weight row dequantised in registers in fp32 (int4_block.h), times x in fp32. */
static void linear_int4_unstaged(const void *ctx, long chunk) {
    const struct linear_int4_args *a = ctx;
    const int K = a->K, groups = K / a->G;
    const long quad_rows = int4_quad_rows(a->N);
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++)
        for (int m = 0; m < a->M; m++) {
            __m256 acc = _mm256_setzero_ps();
            for (int b = 0; b < K / 64; b++) {
                const long g = n * groups + b * 64 / a->G;
                const __m256 s = _mm256_set1_ps(load1(a->scale, g, a->bf16));
                const __m256 o = _mm256_set1_ps(load1(a->offset, g, a->bf16));
                for (int half = 0; half < 2; half++) {
                    const __m256i words = int4_words(a->w + int4_block_at(n, b, K, quad_rows), half);
                    for (int j = 0; j < 4; j++)
                        acc = _mm256_fmadd_ps(int4_dequant8(words, j, s, o, 0),
                                              load8(a->raw, (long)m * K + b * 64 + j * 16 + half * 8, a->bf16), acc);
                }
            }
            store1(a->y, (long)m * a->N + n, hsum(acc), a->bf16);
        }
}

/* y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * q[n, k] + offset[n, g] * xsum[m, g], with each row of x
   taken as pieces of integers (act_quant.h, act_quant16.h): the nibbles times the pieces are exact int32 sums, so
   the result differs from the reference's by sum_k |w[n, k]| * max|x[m]| / 254^P at most with P int8 pieces,
   / 65534^P with P int16 pieces (and fp32 rounding).
   With AVX-512 VNNI int8 pieces (linear_int4_vnni), in passes of AMX_INT8_COLUMNS / P rows where AMX-INT8 serves;
   else int16 pieces (linear_int4_madd); without scratch for them, linear_int4_unstaged. Parallel over chunks of
   output rows (pool.h). */
void linear_int4(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y, int M, int N,
                 int K, int G, int bf16, int pieces) {
    const int most = AMX_INT8_COLUMNS / pieces;  /* rows whose pieces linear_int4_amx takes at once */
    if (M > most && amx_int8_ready()) {  /* in passes: 32 bf16 rows 168 µs against 598 through vpdpbusd */
        const size_t size = bf16 ? 2 : 4;
        for (int m = 0; m < M; m += most)
            linear_int4((const char *)x + m * K * size, w, scale, offset, (char *)y + m * N * size,
                        M - m < most ? M - m : most, N, K, G, bf16, pieces);
        return;
    }
    if (int4_quads() ? linear_int4_madd(x, w, scale, offset, y, M, N, K, G, bf16, pieces)
                     : linear_int4_vnni(x, w, scale, offset, y, M, N, K, G, bf16, pieces))
        return;
    const struct linear_int4_args a = {.w = w, .scale = scale, .offset = offset, .y = y, .M = M, .N = N, .K = K,
                                       .G = G, .bf16 = bf16, .rows = pool_rows_per_chunk(K / 2), .raw = x};
    pool_run(linear_int4_unstaged, &a, (N + a.rows - 1) / a.rows);
}

/* Shapes: see nanoqwen_cpu.h. Each 4 rows' blocks interleaved through the 4 rows of `quad`. */
void linear_int4_pack(uint8_t *w, uint8_t *quad, int N, int K) {
    const long row = K / 2, blocks = K / 64;
    for (long q = 0; q < N / 4; q++) {
        uint8_t *rows = w + 4 * q * row;
        memcpy(quad, rows, 4 * row);
        for (long b = 0; b < blocks; b++)
            for (int i = 0; i < 4; i++) memcpy(rows + int4_block_at(i, b, K, 4), quad + i * row + 32 * b, 32);
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void linear_int4_layout(int32_t *quads) { *quads = int4_quads(); }
