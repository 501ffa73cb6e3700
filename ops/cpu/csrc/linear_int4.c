/* int4 weight-only linear layers (asymmetric groups along K) by integer dot products: the why is in
   ops/cpu/linear_int4.py, the packed layout in ops/torch_ref/linear_int4.py. bf16 rows as int8 blocks (act_block8.h)
   and fp32 rows as int8 pieces by AVX-512 (F, BW, VL, VNNI) where the CPU has them (checked at run time; AMX-INT8's
   3+ rows as pieces whatever their dtype), else AVX2 against the interleaved layout (int4_block.h): int8 blocks for
   bf16 rows (vpmaddubsw), int16 pieces for fp32 rows (vpmaddwd). */
#include "nanoqwen_cpu.h"
#include "act_quant.h"
#include "act_block8.h"
#include "act_quant16.h"
#include "amx.h"
#include "int4_block.h"
#include "pool.h"
#include "scratch.h"

/* y[m, n .. n + 7] = v, rounded as store1 rounds. */
INLINE void store_row8(void *y, long at, __m256 v, int bf16) {
    store8(y, at, round8_as_stored(v, bf16), bf16);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

#define ROWS 8          /* activation rows sharing each load of a span's weights: 8 of 1-2 pieces, 4 of 3-4 (16
                           sums at most) */
#define ROW_BLOCK 16    /* weight rows taken span by span where a pass's pieces outgrow L1 */
#define L1_PIECES 16384 /* bytes of pieces beyond which they do (half an L1 data cache) */
#define STREAM_PIECES 8 /* the most piece rows (R * P) a pass takes row by row: two weight rows' sums in 16 registers */
#define STREAM_ROWS 4   /* and activation rows: 5-8 bf16 rows (int8 blocks) add their 10-16 fp32 sums to as many int32
                           ones, past the registers (1024 x 1024 hot, one thread, by spans: 5 rows 0.92x the time,
                           8 rows 0.87x; profiles/RESULTS.md, int4bl34) */
#define SPAN_BLOCKS 16  /* blocks of 64 columns in a span: one per int32 lane */
#define SPAN (SPAN_BLOCKS * 64)
#define AMX_INT8_COLUMNS 32  /* piece columns linear_int4_amx takes: two tiles of sums */
#define AMX_INT8_MIN_ROWS 3  /* activation rows from which linear_int4_amx serves: 2 rows take 34 µs through
                                the vpdpbusd loop against 48 through AMX, 3 rows 47 against 49 (hot 1024 x 1024) */

/* ---- the activations: each row as int8 pieces (act_quant.h), or a bf16 row as int8 blocks (act_block8.h) where
   AMX does not take it, in the order the weights' nibbles meet them ---- */

struct acts {
    int8_t *q;       /* [M][P][len]: piece p of row m, arranged (arrange_row; the rounding is elementwise), 0 past K */
    int8_t *quads;   /* [K / 4][M * P][4]: for linear_int4_amx, the pieces in unpacked_order as act_quads groups them */
    float *a;        /* [M][P]: each piece's scale (int8 blocks: unused) */
    float *scales;   /* [M][P][len / 64]: what block b of piece p of row m is scaled by: the piece's scale, or (int8
                        blocks, P 1) the block's (0 past K) */
    float *xsum;     /* [M][len / 64]: each block's fp32 activation sum, which the offsets multiply */
    float *gsum;     /* [K / G][16]: for linear_int4_amx, each group's sums of rows 0..M - 1, then 0 */
    int32_t *group;  /* [len / 64]: each block's group */
    long len;        /* K rounded up to whole spans */
};

/* Column of a 64-column block at byte j of step s: dword d of a block (int4_block.h's plain and spanned) holds, low
   nibbles first, q[2d], q[32 + 2d], q[2d + 1], q[33 + 2d] (step 2d), and 16 columns further in its high nibbles
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

/* x: one row of K fp32 activations -> sum: [lanes] each 64-column block's activation sum (fp32), for the offsets,
   and (scale not NULL) scale: [lanes] its int8 scale (act8_scale), all NaN where the row holds a NaN or an infinity;
   0 past K. Returns whether the row is past the pieces' range (act_quant.h's pieces_out_of_range). One pass over the
   row for all three. */
static int block_stats(const float *x, int K, long lanes, float *sum, float *scale) {
    __mmask16 unordered = 0;
    float most = 0.0f;
    __m512 top = _mm512_setzero_ps();  /* the row's largest |x| in each lane */
    for (long b = 0; b < lanes; b++) {
        __m512 s = _mm512_setzero_ps(), amax = _mm512_setzero_ps();
        for (int c = 0; c < 64 && b < K / 64; c += 16) {
            const __m512 v = _mm512_load_ps(x + b * 64 + c);
            s = _mm512_add_ps(s, v);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
            unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
        sum[b] = _mm512_reduce_add_ps(s);
        top = _mm512_max_ps(top, amax);
        if (!scale) continue;
        scale[b] = act8_scale(_mm512_reduce_max_ps(amax));
        most = scale[b] > most ? scale[b] : most;
    }
    if (scale && (unordered || !(most <= FLT_MAX)))
        for (long b = 0; b < K / 64; b++) scale[b] = NAN;
    return pieces_out_of_range(unordered != 0, _mm512_reduce_max_ps(top));
}

/* arranged: one row as arrange_row leaves it, scale: [len / 64] its blocks' (block_stats) -> q: [len] the row as
   int8 blocks, rounded as act_block8.h rounds them (in span t's step s, vector u's lane l holds block
   16t + 4u + l / 4). */
static void block_row(const float *arranged, long len, const float *scale, int8_t *q) {
    const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
    for (long t = 0; t < len / SPAN; t++) {
        float inverses[SPAN_BLOCKS];
        for (int b = 0; b < SPAN_BLOCKS; b++) inverses[b] = act8_inverse(scale[t * SPAN_BLOCKS + b]);
        __m512 inverse[4];
        for (int u = 0; u < 4; u++)
            inverse[u] = _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_srli_epi32(_mm512_set_epi32(
                15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2), _mm512_set1_epi32(4 * u)),
                _mm512_loadu_ps(inverses));
        for (long i = t * SPAN; i < (t + 1) * SPAN; i += 16) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(arranged + i), inverse[i / 16 % 4]));
            /* the clamp only catches a NaN row's values, as act8_block_row's */
            _mm_store_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(_mm512_max_epi32(_mm512_min_epi32(v, top),
                                                                                       bottom)));
        }
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

/* Dword d of the span of `count` (<= 16) blocks at p, spanned (int4_block.h): lane b block b's; the lanes past count
   0. Loaded where the loop takes it: 8 held in registers beside 16 sums spilled (they went through L1 then). */
static inline __m512i span_dwords(const uint8_t *p, int count, int d) {
    return count == SPAN_BLOCKS ? _mm512_loadu_si512(p + 64 * d)
                                : _mm512_maskz_loadu_epi32((__mmask16)((1u << count) - 1u), p + 4 * count * d);
}

struct linear_int4_args {
    struct acts x;
    const uint8_t *w;
    const void *scale, *offset;
    void *y;
    int M, N, K, G, P, bf16;
    long rows;  /* per chunk */
    const void *raw;  /* x as it came: linear_int4_unstaged's */
    long ahead_groups;  /* groups in PREFETCH_BYTES of a weight row (G / 2 bytes each): how far on stream_rows
                           prefetches the scales and offsets */
};

/* y[m, first .. first + 7] and y[m, second .. second + 7]: the lane sums of v[0..7] and of v[8..15]. */
static inline void store_sums16(const struct linear_int4_args *a, int m, long first, long second, const __m512 v[16]) {
    const __m512 y = lane_sums16(v);
    const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(y), 1));
    store_row8(a->y, (long)m * a->N + first, _mm512_castps512_ps256(y), a->bf16);
    store_row8(a->y, (long)m * a->N + second, upper, a->bf16);
}

/* Span `span` of weight rows n[i], i < W (<= 2), against activation rows m0 + r, r < R (<= ROWS), of P pieces, all
   constants where this is inlined: f[i][r] += the span's 16 blocks' scaled sums, lane b block b. Lane b of the int32
   sums collects block b's sum_k q[k] * piece[k] (vpdpbusd: the nibbles are the unsigned operand), then all 16 blocks'
   sums are converted and scaled at once. Each load of the pieces serves the W weight rows: at 1 activation row two
   (one of each stream, stream_rows) took 0.70x the time of one (hot in L2, one thread on Zen 5: 1024 x 1024, 10.0 µs
   against 14.1; the loads of the pieces, 32 a span and row, bound the loop, not its 32 vpdpbusd). At one activation
   row the high nibbles stay in place (w & 0xf0: 16 x the nibble, one op where shift and mask are two) in sums of
   their own, shifted back (exact: multiples of 16) at the span's end, which also halves each chain of vpdpbusd (1
   row hot in L2: 0.96x the time with the groups of 64 below, profiles/RESULTS.md, int4row; at 2 fp32 rows the extra
   sums spill: 1.05x). A weight row's sums take the same operations in the same order whatever W: the same bits.
   `ahead` is prefetched non-temporally where `nta` (a constant; stream_rows' at 1 row): each weight is read once a
   step, and so streamed it evicts less of what the step's other kernels read next (as linear_int8.c's
   VNNI_PREFETCH_AHEAD; a replayed int4 step on Zen 5: the norms, attention and silu_mul 0.95-0.99x their time, the
   linears' 1.01x, loaded; quiet, whole int4 b1 decode 140-141 tok/s against 128-132 without in the faster of the
   machine's two states, 114-116 against 102-105 in the slower: profiles/RESULTS.md, step34 and the thirty-fourth
   session). A row left after a pass of more (9, 17 rows) was just read: the hint matters little there. Where
   `streamed` (a constant; stream_rows'), the scales and offsets as far on in their own streams too (ahead_groups),
   which the hardware prefetcher left to demand misses at each span's start: 1 bf16 row from memory on Zen 5, the
   step's int4 linears 0.74-0.82x the time (profiles/RESULTS.md, nib37). */
static inline __attribute__((always_inline)) void
span_vnni(const struct linear_int4_args *a, const long n[], int W, int m0, int R, int P, long span, int count,
          const uint8_t *const ahead[], int nta, int streamed, __m512 f[][ROWS]) {
    const int K = a->K, groups = K / a->G, split = R == 1;
    const int RG = R * P * W <= 16 ? R : 16 / (P * W);  /* activation rows a group: 16 int32 sums at most */
    const long len = a->x.len, lanes = len / 64, b0 = span * SPAN_BLOCKS;
    const __m512i nibble = _mm512_set1_epi8(0xf), high = _mm512_set1_epi8((char)0xf0);
    __m512 s[2], off[2];
    _Pragma("GCC unroll 2") for (int i = 0; i < W; i++) {
        for (int k = 0; k < SPAN / 128; k++) prefetch_read(ahead[i] + 64 * k, nta);
        /* lane b's group scale and offset: with groups of 64 block b's; else each block's group, relative to the
           span's first, spread over its blocks */
        const int g0 = a->x.group[b0], used = groups - g0 < 16 ? groups - g0 : 16;
        if (streamed) {
            const long at = (n[i] * groups + g0 + a->ahead_groups) * (a->bf16 ? 2 : 4);
            prefetch_read((const char *)a->scale + at, nta), prefetch_read((const char *)a->offset + at, nta);
        }
        s[i] = load16(a->scale, n[i] * groups + g0, used, a->bf16);
        off[i] = load16(a->offset, n[i] * groups + g0, used, a->bf16);
        if (a->G > 64) {
            const __m512i idx = _mm512_sub_epi32(_mm512_load_si512(a->x.group + b0), _mm512_set1_epi32(g0));
            s[i] = _mm512_permutexvar_ps(idx, s[i]), off[i] = _mm512_permutexvar_ps(idx, off[i]);
        }
    }
    _Pragma("GCC unroll 8") for (int r0 = 0; r0 < R; r0 += RG) {
        __m512i acc[2][ROWS][ACT_MAX_PIECES], upper[2][ACT_MAX_PIECES];  /* upper[i][p]: 16 x the high nibbles' sums */
        const int in_group = R - r0 < RG ? R - r0 : RG;
        _Pragma("GCC unroll 2") for (int i = 0; i < W; i++)
            _Pragma("GCC unroll 8") for (int r = 0; r < in_group; r++)
                _Pragma("GCC unroll 4") for (int p = 0; p < P; p++) {
                    acc[i][r][p] = _mm512_setzero_si512();
                    if (split) upper[i][p] = _mm512_setzero_si512();
                }
        _Pragma("GCC unroll 8") for (int d = 0; d < 8; d++) {
            __m512i lo[2], hi[2];
            _Pragma("GCC unroll 2") for (int i = 0; i < W; i++) {
                const __m512i od = span_dwords(a->w + n[i] * (K / 2) + b0 * 32, count, d);
                lo[i] = _mm512_and_si512(od, nibble);
                hi[i] = split ? _mm512_and_si512(od, high) : _mm512_and_si512(_mm512_srli_epi32(od, 4), nibble);
            }
            _Pragma("GCC unroll 8") for (int r = 0; r < in_group; r++)
                _Pragma("GCC unroll 4") for (int p = 0; p < P; p++) {
                    const int8_t *q = a->x.q + ((long)(m0 + r0 + r) * P + p) * len + span * SPAN + d * 128;
                    const __m512i ql = _mm512_load_si512(q), qh = _mm512_load_si512(q + 64);
                    _Pragma("GCC unroll 2") for (int i = 0; i < W; i++) {
                        acc[i][r][p] = _mm512_dpbusd_epi32(acc[i][r][p], lo[i], ql);
                        if (split) upper[i][p] = _mm512_dpbusd_epi32(upper[i][p], hi[i], qh);
                        else acc[i][r][p] = _mm512_dpbusd_epi32(acc[i][r][p], hi[i], qh);
                    }
                }
        }
        _Pragma("GCC unroll 2") for (int i = 0; i < W; i++)
            _Pragma("GCC unroll 8") for (int r = 0; r < in_group; r++) {
                if (split)
                    _Pragma("GCC unroll 4") for (int p = 0; p < P; p++)
                        acc[i][r][p] = _mm512_add_epi32(acc[i][r][p], _mm512_srai_epi32(upper[i][p], 4));
                const float *pa = a->x.scales + (long)(m0 + r0 + r) * P * lanes + b0;
                __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][r][0]), _mm512_load_ps(pa));
                _Pragma("GCC unroll 4") for (int p = 1; p < P; p++)
                    sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][r][p]), _mm512_load_ps(pa + p * lanes), sum);
                f[i][r0 + r] = _mm512_fmadd_ps(sum, s[i], f[i][r0 + r]);
                f[i][r0 + r] = _mm512_fmadd_ps(off[i], _mm512_load_ps(a->x.xsum + (long)(m0 + r0 + r) * lanes + b0),
                                               f[i][r0 + r]);
            }
    }
}

/* Weight rows j .. j + W - 1 of rows_vnni's order (at 1 activation row the two streams' in turn: j even the first
   half's row j / 2, odd the second half's), their whole rows of spans, their f kept in sums by slot and stored each
   16 (store_sums16), or one by one past the last whole 16. */
static inline __attribute__((always_inline)) void
stream_rows(const struct linear_int4_args *a, long n0, int j, int W, int count, int half, int m0, int R, int P,
            __m512 sums[ROWS][16]) {
    const long spans = a->x.len / SPAN, whole = a->K / SPAN;  /* whole: spans of 16 blocks */
    const int last = a->K / 64 - (int)(spans - 1) * SPAN_BLOCKS;  /* blocks in the last span */
    long n[2];
    const uint8_t *w[2], *ahead[2];
    __m512 f[2][ROWS];
    _Pragma("GCC unroll 2") for (int i = 0; i < W; i++) {
        n[i] = n0 + (R > 1 ? j + i : (j + i) & 1 ? half + (j + i) / 2 : (j + i) / 2);
        w[i] = a->w + n[i] * (a->K / 2);
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) f[i][r] = _mm512_setzero_ps();
    }
    /* a constant count in the whole spans: their loads are plain */
    for (long span = 0; span < whole; span++) {
        _Pragma("GCC unroll 2") for (int i = 0; i < W; i++) ahead[i] = w[i] + span * SPAN / 2 + PREFETCH_BYTES;
        span_vnni(a, n, W, m0, R, P, span, SPAN_BLOCKS, ahead, R == 1, 1, f);
    }
    if (whole < spans) {
        _Pragma("GCC unroll 2") for (int i = 0; i < W; i++) ahead[i] = w[i] + whole * SPAN / 2 + PREFETCH_BYTES;
        span_vnni(a, n, W, m0, R, P, whole, last, ahead, R == 1, 1, f);
    }
    _Pragma("GCC unroll 2") for (int i = 0; i < W; i++) {
        const int at = j + i;
        if (count - (at & ~15) >= 16) {
            const int slot = R == 1 ? (at & 1) * 8 + (at & 15) / 2 : at & 15;  /* at 1 row 0-7 the first stream's */
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) sums[r][slot] = f[i][r];
            if ((at & 15) == 15) {
                const long first = n0 + (R == 1 ? (at & ~15) / 2 : at & ~15), second = first + (R == 1 ? half : 8);
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) store_sums16(a, m0 + r, first, second, sums[r]);
            }
            continue;
        }
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            store1(a->y, (long)(m0 + r) * a->N + n[i], lane_sum(f[i][r]), a->bf16);
    }
}

/* What rows_vnni's block prefetches before span `span` of weight row n: the row's next span; after its last, the
   same row of the next block. */
static inline const uint8_t *next_span(const struct linear_int4_args *a, long n, long span) {
    const long row = a->K / 2;
    return span + 1 < a->x.len / SPAN ? a->w + n * row + (span + 1) * SPAN / 2 : a->w + (n + ROW_BLOCK) * row;
}

/* y[m0 + r, n0 + i] for r < R, i < count weight rows: span by span across the weight rows where the pieces
   (R * P rows of len bytes) outgrow L1 (block), so that one span's stay there; else row by row, each streamed
   PREFETCH_BYTES ahead, at 1 row as two streams, the halves of the rows, a row of each a pass (at batch 1
   linear_int4_rows gives it a chunk's rows, else up to ROW_BLOCK: profiles/RESULTS.md, int4row). block: each row's
   next span is prefetched (next_span), `count` rows before it is read. Two weight rows a pass (span_vnni): row by
   row where their sums fit the registers (R * P <= STREAM_PIECES, R <= STREAM_ROWS), else span by span (block; f in
   memory there), in groups of activation rows: hot, one thread, 1024 x 1024 at 2 bf16 rows 0.70x the time of one
   weight row a pass, 4 rows 0.81x; 1024 x 3072 at 8 rows (block) 0.79x; 1024 x 1024 at 8 rows by spans 0.84x the
   time of one weight row a pass row by row (16 f in registers), where two took 1.21x (profiles/RESULTS.md,
   int4k33). */
/* Whether a pass of R activation rows of P pieces keeps its sums in registers (else by_spans takes it span by span). */
static inline int sums_fit(int R, int P) { return R * P <= STREAM_PIECES && R <= STREAM_ROWS; }

static inline __attribute__((always_inline)) void
rows_vnni(const struct linear_int4_args *a, long n0, int count, int m0, int R, int P, int block) {
    const long spans = a->x.len / SPAN;
    const int last = a->K / 64 - (int)(spans - 1) * SPAN_BLOCKS;  /* blocks in the last span */
    if (sums_fit(R, P) && !block) {  /* no row-by-row copy where by_spans never takes it */
        const int half = R == 1 ? (count + 1) / 2 : count;
        __m512 sums[ROWS][16];  /* 16 weight rows' f, reduced and stored together (at 1 row 8 of each stream) */
        int j = 0;
        for (; j + 1 < count; j += 2) stream_rows(a, n0, j, 2, count, half, m0, R, P, sums);
        for (; j < count; j++) stream_rows(a, n0, j, 1, count, half, m0, R, P, sums);
        return;
    }
    __m512 f[ROW_BLOCK][ROWS];
    for (int i = 0; i < count; i++)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) f[i][r] = _mm512_setzero_ps();
    for (long span = 0; span < spans; span++) {
        const int blocks = span + 1 < spans ? SPAN_BLOCKS : last;
        int i = 0;
        for (; i + 1 < count; i += 2) {
            const long n[2] = {n0 + i, n0 + i + 1};
            const uint8_t *ahead[2] = {next_span(a, n[0], span), next_span(a, n[1], span)};
            span_vnni(a, n, 2, m0, R, P, span, blocks, ahead, 0, 0, f + i);
        }
        for (; i < count; i++) {
            const long n = n0 + i;
            const uint8_t *ahead = next_span(a, n, span);
            span_vnni(a, &n, 1, m0, R, P, span, blocks, &ahead, 0, 0, f + i);
        }
    }
    _Static_assert(ROW_BLOCK == 16, "a whole block's outputs: store_sums16's");
    if (count == ROW_BLOCK) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            __m512 v[ROW_BLOCK];
            for (int i = 0; i < ROW_BLOCK; i++) v[i] = f[i][r];
            store_sums16(a, m0 + r, n0, n0 + 8, v);
        }
        return;
    }
    for (int i = 0; i < count; i++)
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
            store1(a->y, (long)(m0 + r) * a->N + n0 + i, lane_sum(f[i][r]), a->bf16);
}

/* rows_vnni with R activation rows of P pieces, both constants: one function per pair, not one switch over them all
   inlined into linear_int4_rows, whose single 280 KB function took gcc 26 s to compile (its passes grow faster than
   the code); apart, 10 s. */
#define ROWS_VNNI(r, p) \
    static __attribute__((noinline)) void rows_vnni_##r##_##p(const struct linear_int4_args *a, long n0, int count, \
                                                              int m0, int block) { \
        rows_vnni(a, n0, count, m0, r, p, block); \
    }
ROWS_VNNI(1, 1) ROWS_VNNI(1, 2) ROWS_VNNI(1, 3) ROWS_VNNI(1, 4) ROWS_VNNI(2, 1) ROWS_VNNI(2, 2) ROWS_VNNI(2, 3)
ROWS_VNNI(2, 4) ROWS_VNNI(3, 1) ROWS_VNNI(3, 2) ROWS_VNNI(3, 3) ROWS_VNNI(3, 4) ROWS_VNNI(4, 1) ROWS_VNNI(4, 2)
ROWS_VNNI(4, 3) ROWS_VNNI(4, 4) ROWS_VNNI(5, 1) ROWS_VNNI(5, 2) ROWS_VNNI(6, 1) ROWS_VNNI(6, 2) ROWS_VNNI(7, 1)
ROWS_VNNI(7, 2) ROWS_VNNI(8, 1) ROWS_VNNI(8, 2)
#undef ROWS_VNNI

/* Whether a pass of R activation rows takes its weight rows span by span (rows_vnni's block): where its pieces
   outgrow L1, or its sums the registers (at one span too: K 1024, 5-8 bf16 rows). */
static inline int by_spans(const struct linear_int4_args *a, int R) {
    return !sums_fit(R, a->P) || (a->x.len > SPAN && (long)R * a->P * a->x.len > L1_PIECES);
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

/* The permutes of unspan_row, round r making output e of a pair of vectors, as vpermt2d indices: lane L takes lane
   bits 3..0 of the source that bit 4 picks. Each round trades a bit of the vector index for one of the lane index:
   lanes (b3 b2 b1 b0) of vectors (d2 d1 d0) -> lanes (d2 b2 b1 b0) of (b3 d1 d0) -> (d2 d1 b1 b0) of (b3 b2 d0) ->
   (b0 d2 d1 d0) of (b3 b2 b1), dword d of block b. */
#define UNSPAN_INDEX(r, e, L) ((r) == 0 ? ((L) >> 3 & 1) << 4 | (e) << 3 | ((L) & 7) \
                             : (r) == 1 ? ((L) >> 2 & 1) << 4 | ((L) >> 3 & 1) << 3 | (e) << 2 | ((L) & 3) \
                             : ((L) & 1) << 4 | ((L) >> 2 & 1) << 3 | ((L) >> 1 & 1) << 2 | (e) << 1 | ((L) >> 3 & 1))
#define UNSPAN_LANES(r, e) {UNSPAN_INDEX(r, e, 0), UNSPAN_INDEX(r, e, 1), UNSPAN_INDEX(r, e, 2), \
        UNSPAN_INDEX(r, e, 3), UNSPAN_INDEX(r, e, 4), UNSPAN_INDEX(r, e, 5), UNSPAN_INDEX(r, e, 6), \
        UNSPAN_INDEX(r, e, 7), UNSPAN_INDEX(r, e, 8), UNSPAN_INDEX(r, e, 9), UNSPAN_INDEX(r, e, 10), \
        UNSPAN_INDEX(r, e, 11), UNSPAN_INDEX(r, e, 12), UNSPAN_INDEX(r, e, 13), UNSPAN_INDEX(r, e, 14), \
        UNSPAN_INDEX(r, e, 15)}
static const int32_t unspan_lanes[3][2][16] __attribute__((aligned(64))) = {
    {UNSPAN_LANES(0, 0), UNSPAN_LANES(0, 1)}, {UNSPAN_LANES(1, 0), UNSPAN_LANES(1, 1)},
    {UNSPAN_LANES(2, 0), UNSPAN_LANES(2, 1)}};

/* The nb (<= 16) blocks of the span at p (dword d of block b at byte 4 (nb d + b), int4_block.h) -> t[b]: their q
   as bytes, the 32 low nibbles of the block's plain bytes, then the high ones. The 8 vectors of the span
   transposed back to plain blocks (z[k]: blocks 2k and 2k + 1) by 24 permutes: the tiles of 3072 x 1024 in 33 µs
   against 98 with a block's 8 dwords inserted one by one, 14 from plain rows (profiles/RESULTS.md, int4b1fix). */
INLINE void unspan_row(const uint8_t *p, int nb, uint8_t t[][AMX_ROWS][64], int i) {
    const __mmask16 blocks = (__mmask16)((1u << nb) - 1u);
    __m512i o[8], u[8], v[8];
    for (int d = 0; d < 8; d++) o[d] = _mm512_maskz_loadu_epi32(blocks, p + 4 * nb * d);
    for (int k = 0; k < 4; k++)
        for (int e = 0; e < 2; e++)
            u[4 * e + k] = _mm512_permutex2var_epi32(o[k], _mm512_load_si512(unspan_lanes[0][e]), o[4 + k]);
    for (int h = 0; h < 2; h++)
        for (int k0 = 0; k0 < 2; k0++)
            for (int e = 0; e < 2; e++)
                v[4 * h + 2 * e + k0] = _mm512_permutex2var_epi32(u[4 * h + k0], _mm512_load_si512(unspan_lanes[1][e]),
                                                                  u[4 * h + 2 + k0]);
    for (int k = 0; k < nb; k += 2) {  /* z[k / 2], vector (b3 b2 b1), from v[(b3 b2 0)] and v[(b3 b2 1)] */
        const __m512i z = _mm512_permutex2var_epi32(v[k >> 1 & 6], _mm512_load_si512(unspan_lanes[2][k >> 1 & 1]),
                                                    v[(k >> 1 & 6) + 1]);
        const __m512i lo = _mm512_and_si512(z, _mm512_set1_epi8(0xf));
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), _mm512_set1_epi8(0xf));
        _mm256_store_si256((__m256i *)t[k][i], _mm512_castsi512_si256(lo));
        _mm256_store_si256((__m256i *)(t[k][i] + 32), _mm512_castsi512_si256(hi));
        if (k + 1 < nb) {
            _mm256_store_si256((__m256i *)t[k + 1][i], _mm512_extracti64x4_epi64(lo, 1));
            _mm256_store_si256((__m256i *)(t[k + 1][i] + 32), _mm512_extracti64x4_epi64(hi, 1));
        }
    }
}

/* Span s of the 16 spanned weight rows from n0 -> t: t[b] the tile of block 16 s + b's q. The next 16 rows (K / 8
   lines) are prefetched 8 lines a block (the LM head at 8 rows, out of cache: 10-18 ms against 15-27 with each
   row's block prefetched 2 KB ahead, on a loaded machine). */
static inline void unpack_span(const uint8_t *w, long n0, long s, int K, uint8_t t[16][AMX_ROWS][64]) {
    const int nb = int4_chunk_blocks(K, s);
    const uint8_t *p = w + int4_chunk_at(n0, s, K, 0);  /* the rows one after another: row n0 + i K / 2 bytes on */
    for (int l = 0; l < 8 * nb; l++) __builtin_prefetch(w + (n0 + AMX_ROWS) * (K / 2) + (128 * s + l) * 64);
    if (nb == 16)  /* a constant where inlined: the loads and stores unrolled */
        for (int i = 0; i < AMX_ROWS; i++) unspan_row(p + (long)i * (K / 2), 16, t, i);
    else
        for (int i = 0; i < AMX_ROWS; i++) unspan_row(p + (long)i * (K / 2), nb, t, i);
}

/* Group g's sums into tile c (and c2 when split), its weights and quads through tiles wt and qt. */
#define ISSUE(c, c2, wt, qt) do { \
        _tile_zero(c); \
        if (split) _tile_zero(c2); \
        for (int b_ = g * G / 64; b_ < (g + 1) * G / 64; b_++) { \
            const int8_t *quads_ = a->x.quads + (long)b_ * 16 * C * 4; \
            if (b_ % 16 == 0) { \
                AMX_STORES_VISIBLE();  /* the last span's tile loads read before it is rewritten */ \
                unpack_span(a->w, n0, b_ / 16, K, span); \
                AMX_STORES_VISIBLE(); \
            } \
            _tile_loadd(wt, span[b_ % 16], 64); \
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
        __attribute__((aligned(64))) uint8_t span[16][AMX_ROWS][64];  /* the current span's tiles (unpack_span) */
        for (long n0 = start; n0 < (end < whole ? end : whole); n0 += AMX_ROWS) {
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

/* Shapes: see nanoqwen_cpu.h. No AMX instruction: the operand is checked on every machine with the spanned layout;
   nothing written where weights are interleaved (its spans are 4 blocks: 16 would write past `tiles`). */
void linear_int4_amx_tiles(const uint8_t *w, int N, int K, uint8_t *tiles) {
    if (int4_interleaved()) return;
    __attribute__((aligned(64))) uint8_t span[16][AMX_ROWS][64];
    for (long n0 = 0; n0 + AMX_ROWS <= N; n0 += AMX_ROWS)
        for (long s = 0; s < (K + 1023) / 1024; s++) {
            const int nb = int4_chunk_blocks(K, s);
            unpack_span(w, n0, s, K, span);
            memcpy(tiles + (n0 / AMX_ROWS * (K / 64) + 16 * s) * sizeof span[0], span, nb * sizeof span[0]);
        }
}
AMX_INT8_END

/* linear_int4 where the CPU has AVX-512 VNNI: 1 and 2 rows, and every row count without AMX-INT8, vpdpbusd
   (linear_int4_rows), bf16 rows as int8 blocks (act_block8.h: the AVX2 loops' rounding; one vpdpbusd a weight and
   row where two pieces took two), fp32 rows as `pieces` int8 pieces (act_quant.h); more rows AMX (linear_int4_amx),
   every row as `pieces` pieces (the last N % 16 weight rows too, in the loop). Each row's out-of-range flag ([M], the
   caller's scratch); NULL: no scratch, nothing done. */
static const int *linear_int4_vnni(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y,
                                   int M, int N, int K, int G, int bf16, int pieces) {
    const long len = (K + SPAN - 1) / SPAN * SPAN, lanes = len / 64;
    const int amx = M >= AMX_INT8_MIN_ROWS && amx_int8_ready();
    const int vnni = !amx || N % AMX_ROWS;  /* linear_int4_amx leaves the last N % 16 weight rows to the VNNI loop */
    const int blocks = bf16 && !amx, P = blocks ? 1 : pieces;
    /* arranged pieces, pieces and their quads, block sums, the pieces' scales, the blocks' groups, fp32 rows,
       group sums, the pieces' scales by block, the rows' out-of-range flags */
    const size_t sizes[] = {(size_t)M * P * len, (size_t)M * P * K * 2, (size_t)M * lanes * 4, (size_t)M * P * 4,
                            (size_t)lanes * 4, (size_t)M * (K + len) * 4, (size_t)(K / G) * 16 * 4,
                            (size_t)M * P * lanes * 4, (size_t)M * sizeof(int)};
    enum { PARTS = sizeof sizes / sizeof sizes[0] };
    char *part[PARTS];
    if (!thread_scratch_parts(sizes, PARTS, part)) return 0;
    const struct acts acts = {(int8_t *)part[0], (int8_t *)part[1], (float *)part[3], (float *)part[7],
                              (float *)part[2], (float *)part[6], (int32_t *)part[4], len};
    float *rows = (float *)part[5], *arranged = rows + (long)M * K;
    int *wild = (int *)part[8];  /* block_stats' (act_quant_rows says the same of the same values) */
    for (long b = 0; b < lanes; b++) acts.group[b] = (int32_t)(b * 64 / G);
    for (int m = 0; m < M; m++) {
        float *row = rows + (long)m * K, *scales = acts.scales + (long)m * P * lanes;
        widen_row((const char *)x + (size_t)m * K * (bf16 ? 2 : 4), K, bf16, row);
        wild[m] = block_stats(row, K, lanes, acts.xsum + m * lanes, vnni && blocks ? scales : NULL);
        if (!vnni) continue;
        arrange_row(row, K, len, arranged);
        if (blocks) {
            block_row(arranged, len, scales, acts.q + (long)m * len);
            continue;
        }
        act_quant_rows(arranged, 0, 1, (int)len, P, acts.q + (long)m * P * len, acts.a + m * P, wild + m);
        for (int p = 0; p < P; p++)
            for (long b = 0; b < lanes; b++) scales[p * lanes + b] = acts.a[m * P + p];
    }
    struct linear_int4_args a = {.x = acts, .w = w, .scale = scale, .offset = offset, .y = y, .M = M, .N = N, .K = K,
                                 .G = G, .P = P, .bf16 = bf16, .rows = pool_rows_per_chunk(K / 2),
                                 .ahead_groups = PREFETCH_BYTES / (G / 2)};
    if (amx) {  /* the same scales as the arranged pieces': the split is elementwise, the maximum the row's */
        int8_t *q = acts.quads + (size_t)M * P * K;
        for (int g = 0; g < K / G; g++)
            for (int m = 0; m < 16; m++) {
                acts.gsum[g * 16 + m] = 0.0f;
                for (int b = g * G / 64; m < M && b < (g + 1) * G / 64; b++) acts.gsum[g * 16 + m] += acts.xsum[m * lanes + b];
            }
        unpacked_order(rows, M, K, arranged);
        act_quant_rows(arranged, 0, M, K, P, q, acts.a, wild);
        act_quads(q, M * P, K, acts.quads);
        a.rows = (a.rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
        nanoqwen_pool_run(linear_int4_amx, &a, (N + a.rows - 1) / a.rows);
    } else {
        nanoqwen_pool_run(linear_int4_chunk, &a, (N + a.rows - 1) / a.rows);
    }
    return wild;
}

#pragma GCC pop_options

/* ---- AVX2 (no AVX-512 VNNI): the weights interleaved (int4_block.h), a chunk of 4 blocks a step, against int8
   blocks (bf16 rows, act_block8.h: vpmaddubsw) or int16 pieces (fp32 rows, act_quant16.h: vpmaddwd) ---- */

#define IL_QUAD_PIECES 4  /* weight rows x piece rows an il_quad pass holds: its fp32 sums stay in registers */
#define IL_QUAD_ROWS 2    /* the most piece rows an il_quad pass takes (3 and more: il_rows) */
/* Piece rows an il_rows pass takes (3 and more): one weight row, each chunk unpacked once for all of them, their fp32
   sums in L1 (left to the compiler in the general loop they spilled worse: 8 bf16 rows of 512 x 1024 hot, 142 µs
   against 90, int4b8; bf16 rows' own loop, il_sums8, keeps them as locals). */
#define IL_ROW_PIECES 8
/* How far ahead the weights are prefetched: the same chunk of the row this many rows on (in quads, the same offset) */
#define IL_AHEAD_ROWS 8

/* q8, lanes and xsum: written by the job's staging chunks where it has them (stage). */
struct linear_int4_madd_args {
    int8_t *q8;          /* bf16 rows: [chunks][M][256] int8 blocks, each chunk's in the weights' order (act_block8.h) */
    const int16_t *q16;  /* fp32 rows: [chunks][M * P][256], each chunk's pieces in the widened weights' order
                            (il_arrange16), piece p of row m at m * P + p */
    float *lanes;        /* bf16 rows: [M][chunks][8], lane L the scale of the chunk's block L % 4 (0 past K) */
    const float *a;      /* [M * P]: each piece's scale; 1 for bf16 rows, whose scales are the blocks' (lanes) */
    float *xsum;         /* [M][K / G]: each group's fp32 activation sum, which the offsets multiply */
    const uint8_t *w;
    const void *scale, *offset;
    void *y;
    int M, N, K, G, P, bf16;
    struct pool_rows split;  /* the weight rows' chunks, after the staging ones */
    long quad_rows;  /* rows stored in quads (int4_block.h) */
    int groups;      /* K / G, not divided in the loops */
    struct pool_stage stage;  /* 2+ bf16 rows: the job's first M chunks stage them (int4_stage_row); else none */
};

/* Column of a chunk at byte p (0..31) of its vector V (0..7): lane p / 4 of vector V / 2's 32 bytes holds columns of
   block p / 4 % 4, its low nibbles the even ones (V even), its high nibbles the odd ones (int4_block.h). */
#define IL_COLUMN(V, p) (64 * ((p) / 4 % 4) + 8 * (2 * ((V) / 2) + (p) / 16) + 2 * ((p) % 4) + (V) % 2)

/* A last chunk of nb < 4 blocks at p read into a whole one's places, the blocks past nb 0. */
static __attribute__((noinline)) void il_whole(const uint8_t *p, int nb, uint32_t whole[32]) {
    memset(whole, 0, 32 * sizeof *whole);
    for (int j = 0; j < 8; j++)
        for (int b = 0; b < nb; b++) memcpy(whole + 4 * j + b, p + 4 * (nb * j + b), 4);
}

/* The chunk at p as its 4 vectors of nibble pairs u[2v] (low, as bytes) and u[2v + 1] (high). */
INLINE void il_nibbles(const uint8_t *p, __m256i u[8]) {
    const __m256i nibble = _mm256_set1_epi8(15);
    _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)(p + 32 * v));
        u[2 * v] = _mm256_and_si256(w, nibble), u[2 * v + 1] = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
    }
}

/* il_scales' lanes where the groups are not the blocks or the chunk is a row's last of fewer than 4 blocks. */
static __attribute__((noinline)) __m256 il_scales_spread(const struct linear_int4_madd_args *a, long n, long c, int nb) {
    float s[8];
    for (int L = 0; L < 8; L++)
        s[L] = L % 4 < nb ? load1(a->scale, n * a->groups + (4 * c + L % 4) * 64 / a->G, a->bf16) : 0.0f;
    return _mm256_loadu_ps(s);
}

/* 4 bf16 group scales at p, in lanes 0-3 and again in 4-7. */
INLINE __m256 il_scales4(const uint16_t *p) {
    const __m128 s = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)p)), 16));
    return _mm256_set_m128(s, s);
}

/* Weight row n's group scales for chunk c (nb blocks): lane L block L % 4's, 0 past nb. one: G == 64 (a constant). */
INLINE __m256 il_scales(const struct linear_int4_madd_args *a, long n, long c, int nb, int one) {
    if (!one || nb < 4) return il_scales_spread(a, n, c, nb);
    const long at = n * a->groups + 4 * c;
    if (a->bf16) return il_scales4((const uint16_t *)a->scale + at);
    const __m128 s = _mm_loadu_ps((const float *)a->scale + at);
    return _mm256_set_m128(s, s);
}

/* The nibbles widened to int16 for fp32 rows' pieces: e[2V] bytes 0-7 and 16-23 of u[V], e[2V + 1] bytes 8-15 and
   24-31. */
INLINE void il_widen(const __m256i u[8], __m256i e[16]) {
    const __m256i zero = _mm256_setzero_si256();
    _Pragma("GCC unroll 8") for (int V = 0; V < 8; V++)
        e[2 * V] = _mm256_unpacklo_epi8(u[V], zero), e[2 * V + 1] = _mm256_unpackhi_epi8(u[V], zero);
}

/* The widened nibbles (il_widen) times a piece row's 256 int16 at q: *lo with the blocks 0 0 1 1 0 0 1 1 in its int32
   lanes, *hi 2 2 3 3 2 2 3 3 (16 products a lane of at most 15 x 32767). */
INLINE void il_products16(const __m256i e[16], const int16_t *q, __m256i *lo, __m256i *hi) {
    const __m256i *p = (const __m256i *)q;
    __m256i s[16];
    _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++) s[i] = _mm256_madd_epi16(e[i], _mm256_load_si256(p + i));
    _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
        const __m256i t = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(s[h], s[2 + h]), _mm256_add_epi32(s[4 + h], s[6 + h])),
                                           _mm256_add_epi32(_mm256_add_epi32(s[8 + h], s[10 + h]), _mm256_add_epi32(s[12 + h], s[14 + h])));
        if (h) *hi = t; else *lo = t;
    }
}

/* f + a chunk's int32 sums of a bf16 activation row (block b in lanes b and 4 + b) times the group scales ws and the
   blocks' (lanes: the row's for the chunk): the fp32 end of every pass's chunk for a bf16 row. */
INLINE __m256 il_scaled8(__m256i sums, __m256 ws, const float *lanes, __m256 f) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(ws, _mm256_load_ps(lanes)), f);
}

/* f + chunk c's sums of fp32 activation row m's piece p times their scales, u the chunk's widened nibbles
   (il_widen): two converts and FMAs, by the group scales in lo's and hi's lanes. The same operations in the same
   order in every pass, so that a row's bits do not depend on its batch. */
INLINE __m256 il_step(const struct linear_int4_madd_args *a, const __m256i *u, __m256 ws, long c, int m, int p,
                      __m256 f) {
    __m256i lo, hi;
    il_products16(u, a->q16 + ((long)c * a->M * a->P + (long)m * a->P + p) * 256, &lo, &hi);
    f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_permutevar8x32_ps(ws, _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1)), f);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_permutevar8x32_ps(ws, _mm256_setr_epi32(2, 2, 3, 3, 2, 2, 3, 3)), f);
}

/* The 128 bytes of a chunk at p of nb blocks to read: p itself, or a row's last chunk of fewer than 4 blocks read into
   `whole` (il_whole); the same chunk IL_AHEAD_ROWS rows on prefetched. */
INLINE const uint8_t *il_chunk_bytes(const struct linear_int4_madd_args *a, const uint8_t *p, int nb,
                                     uint32_t whole[32]) {
    __builtin_prefetch(p + IL_AHEAD_ROWS * (a->K / 2)), __builtin_prefetch(p + IL_AHEAD_ROWS * (a->K / 2) + 64);
    if (nb == 4) return p;
    il_whole(p, nb, whole);
    return (const uint8_t *)whole;
}

/* The widened nibbles (fp32 rows) of chunk c of weight row n at p (nb blocks: 4 but in a row's last chunk, read into
   a whole one's places), and its group scales. */
INLINE void il_chunk(const struct linear_int4_madd_args *a, const uint8_t *p, long n, long c, int nb, int one,
                     __m256i e[16], __m256 *ws) {
    uint32_t whole[32] __attribute__((aligned(32)));
    __m256i u[8];
    il_nibbles(il_chunk_bytes(a, p, nb, whole), u);
    il_widen(u, e);
    *ws = il_scales(a, n, c, nb, one);
}

/* Where a pass's chunks are: weight row n's first at *w0, a row's next *step bytes on, the next row's *next (the rows
   of a pass are all in one quad or all plain, int4_block.h); a row's last chunk, if of fewer than 4 blocks, not
   (il_tail). */
INLINE void il_places(const struct linear_int4_madd_args *a, long n, const uint8_t **w0, long *step, long *next) {
    const int quad = n < a->quad_rows;
    *w0 = a->w + int4_chunk_at(n, 0, a->K, a->quad_rows), *step = quad ? 512 : 128, *next = quad ? 128 : a->K / 2;
}

/* Where weight row n's last chunk is where K % 256 leaves it K / 64 % 4 blocks: off il_places' steps. */
INLINE const uint8_t *il_tail(const struct linear_int4_madd_args *a, long n) {
    return a->w + int4_chunk_at(n, a->K / 256, a->K, a->quad_rows);
}

/* The end of weight row n for `rows` activation rows from m0 (rows, P constants), in one order for every pass, so
   that a row's outputs are the same bits whatever it is batched with: o[j] = activation row m0 + j's fp32 sums f[j * P
   + p] times its pieces' scales, piece by piece, then weight row n's group offsets times the row's group sums (xsum),
   8 groups a vector, ascending; the groups past the last 8 added to tail[j] in order. Then the lanes of o[j] are
   summed (hadd4's tree) and tail[j] added. Each 8 groups' offsets widened once for all the rows. */
INLINE void madd_ends(const struct linear_int4_madd_args *a, long n, int m0, int rows, int P, const __m256 *f,
                      __m256 *o, float *tail) {
    const int groups = a->groups;
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

/* A chunk's nibbles at p (unpacked once) against R bf16 rows' int8 (row r 256 r bytes after q; its block scales rs
   floats after lanes), ws the chunk's group scales: f[r] += the row's scaled sums (il_scaled8), block b's in int32
   lanes b and 4 + b. A row's 8 vpmaddubsw (pairs of at most 2 x 15 x 127) add in int16 (16 products a lane, at most
   30,480: no wrap), pair by pair into one sum, kept a chain by the empty asm: else GCC took all 8 products at once
   and reloaded a spilled nibble vector and ws each row (~32 instructions a row against ~25). */
INLINE void il_row_chunk8(const uint8_t *p, __m256 ws, const int8_t *q, const float *lanes, long rs, int R,
                          __m256 f[IL_ROW_PIECES]) {
    __m256i u[8];
    il_nibbles(p, u);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        const __m256i *x = (const __m256i *)(q + 256 * r);
        __m256i s = _mm256_setzero_si256();
        _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++) {
            const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(u[2 * v], _mm256_load_si256(x + 2 * v)),
                                               _mm256_maddubs_epi16(u[2 * v + 1], _mm256_load_si256(x + 2 * v + 1)));
            s = v ? _mm256_add_epi16(s, t) : t;
            __asm__("" : "+x"(s));
        }
        f[r] = il_scaled8(_mm256_madd_epi16(s, _mm256_set1_epi16(1)), ws, lanes + rs * r, f[r]);
    }
}

/* il_quad's chunk for R bf16 rows (int8 blocks), vector by vector: each pair of activation vectors loaded once for
   the W weight rows, each row's int16 sums s[i][r] in registers until the chunk's end (il_row_chunk8's sums, added in
   another order: exact integers, the same). w[i]: weight row i's chunk bytes; q: row m0's int8 for the chunk (row r
   256 r bytes on). */
INLINE void il_quad_ints8(const uint8_t *const w[], const int8_t *q, int W, int R,
                          __m256i s[IL_QUAD_PIECES][IL_QUAD_ROWS]) {
    const __m256i nibble = _mm256_set1_epi8(15);
    _Pragma("GCC unroll 4") for (int v = 0; v < 4; v++) {
        __m256i lo[IL_QUAD_ROWS], hi[IL_QUAD_ROWS];  /* the activations the vector's low and high nibbles meet */
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {
            lo[r] = _mm256_load_si256((const __m256i *)(q + 256 * r) + 2 * v);
            hi[r] = _mm256_load_si256((const __m256i *)(q + 256 * r) + 2 * v + 1);
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < W; i++) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(w[i] + 32 * v));
            const __m256i l = _mm256_and_si256(b, nibble), h = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);
            _Pragma("GCC unroll 2") for (int r = 0; r < R; r++) {
                const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(l, lo[r]), _mm256_maddubs_epi16(h, hi[r]));
                s[i][r] = v ? _mm256_add_epi16(s[i][r], t) : t;
                /* else GCC sums the chunk's 8 W R products as one tree: all live at once, spilled */
                __asm__("" : "+x"(s[i][r]));
            }
        }
    }
}

/* Chunk c (nb blocks; p: weight row n's, a row's next `next` bytes on, unused where nb < 4: il_tail) of weight rows
   n + i, i < W, against R bf16 rows (int8 blocks; q: row m0's for the chunk, row r 256 r bytes on; lanes: its block
   scales, row r `rs` floats on): acc[i][r] += the scaled sums (il_scaled8), the group scales at `scale` (row i
   a->groups on) where one (G == 64, a constant) and the chunk is whole. One weight row against 3 or more (il_rows):
   il_row_chunk8; else il_quad_ints8. The group scales are read before the integer sums: read after them (they then
   hold no registers through the chunk, and GCC keeps il_quad's 4 fp32 sums in registers, not 2 on the stack), 1 bf16
   row of 512 x 1024 hot took 1.02x the time (profiles/RESULTS.md, int4b1_41). */
INLINE void il_chunk8(const struct linear_int4_madd_args *a, const uint8_t *p, long next, const uint16_t *scale, long n,
                      long c, int nb, int W, int R, const int8_t *q, const float *lanes, long rs, int one,
                      __m256 acc[][IL_ROW_PIECES]) {
    uint32_t bytes[IL_QUAD_PIECES][32] __attribute__((aligned(32)));
    const uint8_t *w[IL_QUAD_PIECES];
    __m256 ws[IL_QUAD_PIECES];
    _Pragma("GCC unroll 4") for (int i = 0; i < W; i++)
        w[i] = il_chunk_bytes(a, nb < 4 ? il_tail(a, n + i) : p + i * next, nb, bytes[i]),
        ws[i] = one && nb == 4 ? il_scales4(scale + i * a->groups) : il_scales_spread(a, n + i, c, nb);
    if (R > IL_QUAD_ROWS) {
        il_row_chunk8(w[0], ws[0], q, lanes, rs, R, acc[0]);
        return;
    }
    __m256i s[IL_QUAD_PIECES][IL_QUAD_ROWS];
    il_quad_ints8(w, q, W, R, s);
    _Pragma("GCC unroll 4") for (int i = 0; i < W; i++)
        _Pragma("GCC unroll 2") for (int r = 0; r < R; r++)
            acc[i][r] = il_scaled8(_mm256_madd_epi16(s[i][r], _mm256_set1_epi16(1)), ws[i], lanes + rs * r, acc[i][r]);
}

/* The fp32 sums acc[i][r] (added to) of weight rows n + i, i < W, against R bf16 rows from m0 (W R <= IL_QUAD_PIECES:
   il_quad's; W 1, 3 <= R <= IL_ROW_PIECES: il_rows'), chunk by chunk (il_chunk8), the pointers stepped chunk by chunk
   and the sums locals. Through il_chunk and il_step (still the fp32 rows' way) GCC recomputed the pointers each chunk,
   spilled them and kept the sums and the activations on the stack: 1 bf16 row of 512 x 1024 hot, one thread, 10.5-10.8
   µs a call against 11.4-11.6 (~290 instructions a quad's chunk against ~220; profiles/RESULTS.md, int4b1); 8 rows
   1.3x the time of this (int4b8_40). */
INLINE void il_sums8(const struct linear_int4_madd_args *a, long n, int W, int m0, int R, int one,
                     __m256 acc[][IL_ROW_PIECES]) {
    const long chunks = (a->K + 255) / 256, whole = a->K / 256, qs = (long)a->M * 256;
    const uint8_t *w0;
    long step, next;
    il_places(a, n, &w0, &step, &next);
    const int8_t *q = a->q8 + (long)m0 * 256;
    const float *lanes = a->lanes + (long)m0 * chunks * 8;
    const uint16_t *scale = (const uint16_t *)a->scale + n * a->groups;
    for (long c = 0; c < whole; c++, w0 += step, q += qs, lanes += 8, scale += 4)
        il_chunk8(a, w0, next, scale, n, c, 4, W, R, q, lanes, chunks * 8, one, acc);
    if (a->K % 256) il_chunk8(a, NULL, next, scale, n, whole, a->K / 64 % 4, W, R, q, lanes, chunks * 8, one, acc);
}

/* y[m0 + j, n + i] for the `rows` activation rows from m0 and the W weight rows from n (W, rows, P and int8
   constants, W * rows * P <= IL_QUAD_PIECES): chunk by chunk (fp32 rows il_quad_chunk, bf16 rows il_sums8), each
   weight row's chunk against every piece row, the fp32 sums in registers, then the ends (madd_ends). Several weight
   rows a pass for few piece rows: their sums are independent FMA chains, and the end of a row (sums across lanes, the
   offsets) is shared; a pass of 4 reads one quad, one stream (int4_block.h). il_quad_chunk: fp32 rows' int16 pieces. */
INLINE void il_quad_chunk(const struct linear_int4_madd_args *a, const uint8_t *p, long next, long n, long c, int nb,
                          int W, int m0, int R, int P, int one, __m256 f[][IL_ROW_PIECES]) {
    _Pragma("GCC unroll 4") for (int i = 0; i < W; i++) {
        __m256i e[16];
        __m256 ws;
        il_chunk(a, nb < 4 ? il_tail(a, n + i) : p + i * next, n + i, c, nb, one, e, &ws);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) f[i][r] = il_step(a, e, ws, c, m0 + r / P, r % P, f[i][r]);
    }
}

INLINE void il_quad(const struct linear_int4_madd_args *a, long n, int W, int m0, int rows, int P, int one, int int8) {
    const int R = rows * P;
    __m256 f[IL_QUAD_PIECES][IL_ROW_PIECES];
    _Pragma("GCC unroll 4") for (int i = 0; i < W; i++)
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) f[i][r] = _mm256_setzero_ps();
    if (int8) {
        il_sums8(a, n, W, m0, R, one, f);
    } else {
        const long whole = a->K / 256;  /* chunks of 4 blocks; a last one of K / 64 % 4 */
        const uint8_t *w0;
        long step, next;
        il_places(a, n, &w0, &step, &next);
        for (long c = 0; c < whole; c++) il_quad_chunk(a, w0 + c * step, next, n, c, 4, W, m0, R, P, one, f);
        if (a->K % 256) il_quad_chunk(a, NULL, next, n, whole, a->K / 64 % 4, W, m0, R, P, one, f);
    }
    __m256 o[IL_QUAD_PIECES][IL_QUAD_ROWS];  /* [weight row][activation row] */
    float tail[IL_QUAD_PIECES][IL_QUAD_ROWS];
    _Pragma("GCC unroll 4") for (int i = 0; i < W; i++) madd_ends(a, n + i, m0, rows, P, f[i], o[i], tail[i]);
    _Pragma("GCC unroll 2") for (int j = 0; j < rows; j++) {
        __m256 v[4];
        float t[4], out[4];
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++)
            v[i] = i < W ? o[i][j] : _mm256_setzero_ps(), t[i] = i < W ? tail[i][j] : 0.0f;
        _mm_storeu_ps(out, _mm_add_ps(hsum4(v), _mm_loadu_ps(t)));
        _Pragma("GCC unroll 4") for (int i = 0; i < W; i++) store1(a->y, (long)(m0 + j) * a->N + n + i, out[i], a->bf16);
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

/* Weight row n's outputs from its fp32 sums f for the `rows` activation rows from m0, lane j row m0 + j: il_quad's
   ends (madd_ends), every row's lanes summed at once (hsum8). */
INLINE __m256 il_row_end(const struct linear_int4_madd_args *a, long n, int m0, int rows, int P, float f[][8]) {
    __m256 sums[IL_ROW_PIECES], o[8];
    float tail[8] __attribute__((aligned(32)));
    _Pragma("GCC unroll 8") for (int r = 0; r < rows * P; r++) sums[r] = _mm256_load_ps(f[r]);
    _Pragma("GCC unroll 8") for (int j = rows; j < 8; j++) o[j] = _mm256_setzero_ps(), tail[j] = 0.0f;
    madd_ends(a, n, m0, rows, P, sums, o, tail);
    return _mm256_add_ps(hsum8(o), _mm256_load_ps(tail));
}

/* y[m0 + j, n] for weight rows n .. end - 1 and the `rows` activation rows from m0 (rows, P, int8 constants,
   3 <= rows * P <= IL_ROW_PIECES): one weight row at a time, each chunk unpacked once for all the piece rows, whose
   fp32 sums stay in L1 (f; bf16 rows: il_sums8's locals); 8 weight rows' outputs transposed and stored as 8 contiguous
   values an activation row (the last (end - n) % 8 one by one). A row's sums take il_quad's order. */
INLINE void il_row_chunk(const struct linear_int4_madd_args *a, const uint8_t *p, long n, long c, int nb, int m0,
                         int R, int P, int one, float f[][8]) {
    __m256i e[16];
    __m256 ws;
    il_chunk(a, p, n, c, nb, one, e, &ws);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
        _mm256_store_ps(f[r], il_step(a, e, ws, c, m0 + r / P, r % P, _mm256_load_ps(f[r])));
}

INLINE void il_rows(const struct linear_int4_madd_args *a, long n, long end, int m0, int rows, int P, int one,
                    int int8) {
    const int R = rows * P;
    const long whole = a->K / 256;  /* chunks of 4 blocks; a last one of K / 64 % 4 */
    for (; n < end; n += 8) {
        const int W = end - n < 8 ? (int)(end - n) : 8;
        float f[8][IL_ROW_PIECES][8] __attribute__((aligned(32)));
        for (int i = 0; i < W; i++) {
            if (int8) {
                __m256 acc[1][IL_ROW_PIECES];
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) acc[0][r] = _mm256_setzero_ps();
                il_sums8(a, n + i, 1, m0, R, one, acc);
                _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) _mm256_store_ps(f[i][r], acc[0][r]);
                continue;
            }
            const uint8_t *w0;
            long step, next;
            il_places(a, n + i, &w0, &step, &next);
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) _mm256_store_ps(f[i][r], _mm256_setzero_ps());
            for (long c = 0; c < whole; c++) il_row_chunk(a, w0 + c * step, n + i, c, 4, m0, R, P, one, f[i]);
            if (a->K % 256) il_row_chunk(a, il_tail(a, n + i), n + i, whole, a->K / 64 % 4, m0, R, P, one, f[i]);
        }
        if (W == 8) {
            __m256 o[8], t[8];
            for (int i = 0; i < 8; i++) o[i] = il_row_end(a, n + i, m0, rows, P, f[i]);
            transpose8(o, t);
            _Pragma("GCC unroll 8") for (int j = 0; j < rows; j++)
                store_row8(a->y, (long)(m0 + j) * a->N + n, t[j], a->bf16);
            continue;
        }
        for (int i = 0; i < W; i++) {
            float out[8] __attribute__((aligned(32)));
            _mm256_store_ps(out, il_row_end(a, n + i, m0, rows, P, f[i]));
            _Pragma("GCC unroll 8") for (int j = 0; j < rows; j++)
                store1(a->y, (long)(m0 + j) * a->N + n + i, out[j], a->bf16);
        }
    }
}

/* il_rows with r activation rows of p pieces, int8 or int16 (i), all constants (and G == 64 or not): one function
   each, apart from linear_int4_madd_chunk (inlined there, the madd loops' 1-2 piece-row passes ran 5-8% slower). */
#define IL_ROWS(r, p, i) \
    static __attribute__((noinline)) void il_rows_##r##_##p##_##i(const struct linear_int4_madd_args *a, long n, \
                                                                  long end, int m0) { \
        if (a->G == 64) il_rows(a, n, end, m0, r, p, 1, i); else il_rows(a, n, end, m0, r, p, 0, i); \
    }
IL_ROWS(3, 1, 1) IL_ROWS(4, 1, 1) IL_ROWS(5, 1, 1) IL_ROWS(6, 1, 1) IL_ROWS(7, 1, 1) IL_ROWS(8, 1, 1)
IL_ROWS(3, 1, 0) IL_ROWS(4, 1, 0) IL_ROWS(5, 1, 0) IL_ROWS(6, 1, 0) IL_ROWS(7, 1, 0) IL_ROWS(8, 1, 0)
IL_ROWS(2, 2, 0) IL_ROWS(3, 2, 0) IL_ROWS(4, 2, 0)
#undef IL_ROWS

/* Weight rows of an il_quad pass for R piece rows: as many as the registers allow. */
#define IL_WEIGHT_ROWS(R) (IL_QUAD_PIECES / (R))

/* il_quad with r activation rows of p pieces, int8 or int16 (i), W weight rows and G == 64 or not, all constants: one
   function for each (r, p, i), not inlined into linear_int4_madd_chunk (there GCC kept the sums in memory and tested
   G and the quads a row; with those decided a pass and apart: 1 bf16 row of 4096 x 1024 in L3, one thread, 93 µs
   against 151). */
#define IL_QUAD(r, p, i) \
    static __attribute__((noinline)) void il_quad_##r##_##p##_##i(const struct linear_int4_madd_args *a, long n, \
                                                                  int W, int m0) { \
        const int one = a->G == 64; \
        if (W > 1 && one) il_quad(a, n, IL_WEIGHT_ROWS((r) * (p)), m0, r, p, 1, i); \
        else if (W > 1) il_quad(a, n, IL_WEIGHT_ROWS((r) * (p)), m0, r, p, 0, i); \
        else if (one) il_quad(a, n, 1, m0, r, p, 1, i); \
        else il_quad(a, n, 1, m0, r, p, 0, i); \
    }
IL_QUAD(1, 1, 1) IL_QUAD(2, 1, 1) IL_QUAD(1, 2, 0) IL_QUAD(1, 1, 0) IL_QUAD(2, 1, 0)
#undef IL_QUAD

/* Row m of linear_int4_madd's bf16 rows as int8 blocks (act8_block_row): its blocks, their scales and group sums. */
static int int4_stage_row(const void *job, long m) {
    const struct linear_int4_madd_args *a = job;
    return act8_block_row(a->stage.x, 1, (int)m, a->M, a->K, a->G, a->q8, a->lanes, a->xsum);
}

static void linear_int4_madd_chunk(const void *ctx, long chunk) {
    const struct linear_int4_madd_args *a = ctx;
    const int M = a->M, P = a->P, int8 = a->bf16, per = IL_ROW_PIECES / P;
    if (pool_stage_chunk(&a->stage, int4_stage_row, a, &chunk)) return;
    const long end = pool_rows_end(&a->split, chunk);
    for (int m0 = 0; m0 < M; m0 += per) {
        const int rows = M - m0 < per ? M - m0 : per, W = IL_WEIGHT_ROWS(rows * P);
        long n = pool_rows_start(&a->split, chunk);
        if (rows * P > IL_QUAD_ROWS) {
#define CASE(r, p, i) case (r) * 16 + (p) * 2 + (i): il_rows_##r##_##p##_##i(a, n, end, m0); break;
            switch (rows * 16 + P * 2 + int8) {
                CASE(3, 1, 1) CASE(4, 1, 1) CASE(5, 1, 1) CASE(6, 1, 1) CASE(7, 1, 1) CASE(8, 1, 1)
                CASE(3, 1, 0) CASE(4, 1, 0) CASE(5, 1, 0) CASE(6, 1, 0) CASE(7, 1, 0) CASE(8, 1, 0)
                CASE(2, 2, 0) CASE(3, 2, 0) CASE(4, 2, 0)
            }
#undef CASE
            continue;
        }
        /* whole: W weight rows a pass, else one (the tail) */
#define PASS(whole, r, p, i) { \
            if (whole) il_quad_##r##_##p##_##i(a, n, IL_WEIGHT_ROWS((r) * (p)), m0); \
            else il_quad_##r##_##p##_##i(a, n, 1, m0); \
        }
#define CASES(whole) \
        if (int8) { if (rows == 1) PASS(whole, 1, 1, 1) else PASS(whole, 2, 1, 1) } \
        else if (P == 2) PASS(whole, 1, 2, 0) \
        else if (rows == 1) PASS(whole, 1, 1, 0) \
        else PASS(whole, 2, 1, 0)
        for (; n + W <= end; n += W) CASES(1)
        for (; n < end; n++) CASES(0)
#undef CASES
#undef PASS
    }
}
_Static_assert(IL_QUAD_PIECES == 4 && IL_QUAD_ROWS == 2 && IL_ROW_PIECES == 8 && ACT16_MAX_PIECES == 2,
               "linear_int4_madd_chunk's cases");

/* The columns of a chunk's widened vectors (IL_COLUMN), as il_arrange16 reads them: [16][16], vector k's int16 element
   i (il_widen: bytes 0-7, 16-23 or 8-15, 24-31 of vector k / 2). */
#define IL_WORD(k, i) IL_COLUMN((k) / 2, ((i) < 8 ? (i) : (i) + 8) + 8 * ((k) % 2))
#define IL_WORDS(k) IL_WORD(k, 0), IL_WORD(k, 1), IL_WORD(k, 2), IL_WORD(k, 3), IL_WORD(k, 4), IL_WORD(k, 5), \
    IL_WORD(k, 6), IL_WORD(k, 7), IL_WORD(k, 8), IL_WORD(k, 9), IL_WORD(k, 10), IL_WORD(k, 11), IL_WORD(k, 12), \
    IL_WORD(k, 13), IL_WORD(k, 14), IL_WORD(k, 15)
static const int16_t il_word[256] = {IL_WORDS(0),  IL_WORDS(1),  IL_WORDS(2),  IL_WORDS(3),  IL_WORDS(4),  IL_WORDS(5),
                                     IL_WORDS(6),  IL_WORDS(7),  IL_WORDS(8),  IL_WORDS(9),  IL_WORDS(10), IL_WORDS(11),
                                     IL_WORDS(12), IL_WORDS(13), IL_WORDS(14), IL_WORDS(15)};

/* q: [K / 64][M * P][64] int16 pieces (act16_quant_rows) -> out: [chunks][M * P][256] in the widened weights'
   order, 0 past K. */
static void il_arrange16(const int16_t *q, int rows, int K, int16_t *out) {
    const long chunks = (K + 255) / 256;
    for (long c = 0; c < chunks; c++)
        for (int r = 0; r < rows; r++) {
            int16_t *to = out + (c * rows + r) * 256;
            for (int t = 0; t < 256; t++) {
                const long k = 256 * c + il_word[t];
                to[t] = k < K ? q[(k / 64 * rows + r) * 64 + k % 64] : 0;
            }
        }
}

/* linear_int4 on AVX2: bf16 rows as int8 blocks (act_block8.h), 2 or more staged by the job's first M chunks, a row
   each, on both threads (one by the caller before it: nothing to share, and a one-chunk job stays the caller's); fp32
   rows as ACT16_PIECES(pieces) int16 pieces, one of which holds what two int8 pieces do (act_quant16.h), so within
   the bound of `pieces` int8 ones for groups of up to 256 columns (a chunk; GROUP_SIZE is 64): a longer group's chunks
   are added in fp32, which costs up to ~1.7e-6 of the sum more (36,864 columns). Each row's out-of-range flag ([M],
   the caller's scratch); NULL: no scratch for them, nothing done. */
static const int *linear_int4_madd(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y,
                                   int M, int N, int K, int G, int bf16, int pieces) {
    const int P = bf16 ? 1 : ACT16_PIECES(pieces), groups = K / G;
    const long chunks = (K + 255) / 256;
    /* the pieces' scales, group sums, the chunks' block lanes (bf16), the pieces arranged, fp32's in column order,
       the rows' out-of-range flags */
    const size_t sizes[] = {(size_t)M * P * 4, (size_t)M * groups * 4, (size_t)M * chunks * 32,
                            (size_t)M * P * chunks * (bf16 ? 256 : 512), bf16 ? 0 : (size_t)M * P * K * 2,
                            (size_t)M * sizeof(int)};
    enum { PARTS = sizeof sizes / sizeof sizes[0] };
    char *part[PARTS];
    if (!thread_scratch_parts(sizes, PARTS, part)) return 0;
    float *a = (float *)part[0], *xsum = (float *)part[1], *lanes = (float *)part[2];
    int *wild = (int *)part[5];
    long done = 0;
    const long pass = IL_WEIGHT_ROWS(1), rows = (pool_rows_per_chunk(K / 2) + pass - 1) / pass * pass;  /* whole passes */
    const struct linear_int4_madd_args args = {(int8_t *)part[3], (const int16_t *)part[3], lanes, a, xsum, w, scale,
                                               offset, y, M, N, K, G, P, bf16, pool_rows_cut(N, rows, pass),
                                               int4_quad_rows(N), groups, {x, wild, bf16 && M > 1 ? M : 0, &done}};
    if (bf16) {
        for (int m = 0; m < M; m++) a[m] = 1.0f;
        if (M == 1) wild[0] = int4_stage_row(&args, 0);
    } else {
        act16_quant_rows(x, 0, M, K, P, 64, (int16_t *)part[4], a, wild);
        il_arrange16((const int16_t *)part[4], M * P, K, (int16_t *)part[3]);
        for (int m = 0; m < M; m++)
            for (int g = 0; g < groups; g++) {
                __m256 v = _mm256_setzero_ps();
                for (int k = g * G; k < (g + 1) * G; k += 8) v = _mm256_add_ps(v, load8(x, (long)m * K + k, 0));
                xsum[m * groups + g] = hsum(v);
            }
    }
    nanoqwen_pool_run(linear_int4_madd_chunk, &args, args.stage.rows + pool_rows_chunks(&args.split));
    return wild;
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
                int32_t q[64];
                int4_block_q(a->w, n, b, K, quad_rows, q);
                for (int j = 0; j < 8; j++)
                    acc = _mm256_fmadd_ps(int4_dequant8(_mm256_loadu_si256((const __m256i *)(q + 8 * j)), s, o, 0),
                                          load8(a->raw, (long)m * K + 64 * b + 8 * j, a->bf16), acc);
            }
            store1(a->y, (long)m * a->N + n, hsum(acc), a->bf16);
        }
}

/* y[m, n] for the M rows of x as the reference computes them (linear_int4_unstaged), on the pool. */
static void linear_int4_exact(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y, int M,
                              int N, int K, int G, int bf16) {
    const struct linear_int4_args a = {.w = w, .scale = scale, .offset = offset, .y = y, .M = M, .N = N, .K = K,
                                       .G = G, .bf16 = bf16, .rows = pool_rows_per_chunk(K / 2), .raw = x};
    nanoqwen_pool_run(linear_int4_unstaged, &a, (N + a.rows - 1) / a.rows);
}

/* y[m, n] = sum_g scale[n, g] * sum_{k in g} x[m, k] * q[n, k] + offset[n, g] * xsum[m, g], with each row of x
   taken as pieces of integers (act_quant.h, act_quant16.h, act_block8.h): the nibbles times the pieces are exact
   int32 sums, so the result differs from the reference's by sum_k |w[n, k]| * max|x[m]| / 254^P at most with P int8
   pieces, / 65534^P with P int16 pieces, sum over the blocks of sum_{k in block} |w[n, k]| * max_block |x[m]| / 254
   with int8 blocks (and fp32 rounding).
   With AVX-512 VNNI int8 blocks or pieces (linear_int4_vnni), in passes of AMX_INT8_COLUMNS / P rows where AMX-INT8
   serves; else int8 blocks or int16 pieces (linear_int4_madd); without scratch for them, linear_int4_unstaged. A row
   past PIECES_RANGE, infinite or NaN is then recomputed as the reference computes it (linear_int4_exact): its outputs
   are the reference's, finite, infinite (inf times a weight) or NaN alike, where the pieces' NaN scales made them all
   NaN. Parallel over chunks of output rows (pool.h). */
void linear_int4(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y, int M, int N,
                 int K, int G, int bf16, int pieces) {
    const int most = AMX_INT8_COLUMNS / pieces;  /* rows whose pieces linear_int4_amx takes at once */
    const size_t size = bf16 ? 2 : 4;
    /* AMX reads spans: a NANOQWEN_NO_VNNI build packs interleaved */
    if (M > most && amx_int8_ready() && !int4_interleaved()) {  /* in passes: 32 bf16 rows 168 µs against 598 */
        for (int m = 0; m < M; m += most)
            linear_int4((const char *)x + m * K * size, w, scale, offset, (char *)y + m * N * size,
                        M - m < most ? M - m : most, N, K, G, bf16, pieces);
        return;
    }
    const int *wild = int4_interleaved() ? linear_int4_madd(x, w, scale, offset, y, M, N, K, G, bf16, pieces)
                                         : linear_int4_vnni(x, w, scale, offset, y, M, N, K, G, bf16, pieces);
    if (!wild) {
        linear_int4_exact(x, w, scale, offset, y, M, N, K, G, bf16);
        return;
    }
    for (int m = 0; m < M; m++)  /* wild lies in this thread's scratch, which linear_int4_exact leaves alone */
        if (wild[m])
            linear_int4_exact((const char *)x + m * K * size, w, scale, offset, (char *)y + m * N * size, 1, N, K, G,
                              bf16);
}

/* Shapes: see nanoqwen_cpu.h. Each 4 rows in quads (then each row left) copied to `quad`, then written back dword by
   dword where int4_dword_at puts them: interleaved, each dword's nibbles columns 8j .. 8j + 7 in turn; spanned, as
   plain. */
void linear_int4_pack(uint8_t *w, uint8_t *quad, int N, int K) {
    const long row = K / 2, quad_rows = int4_quad_rows(N);
    const int interleaved = int4_interleaved();
    for (long n0 = 0; n0 < N; n0 += n0 < quad_rows ? 4 : 1) {
        const int count = n0 < quad_rows ? 4 : 1;
        memcpy(quad, w + n0 * row, count * row);
        for (int i = 0; i < count; i++)
            for (long b = 0; b < K / 64; b++)
                for (int j = 0; j < 8; j++) {
                    uint32_t dword = 0;
                    if (interleaved)
                        for (int t = 0; t < 8; t++)
                            dword |= (uint32_t)int4_plain_nibble(quad + i * row, 64 * b + 8 * j + t) << 4 * t;
                    else memcpy(&dword, quad + i * row + 32 * b + 4 * j, 4);
                    memcpy(w + int4_dword_at(n0 + i, b, j, K, quad_rows), &dword, 4);
                }
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void linear_int4_layout(int32_t *interleaved) { *interleaved = int4_interleaved(); }
