/* int8 weight-only linear layers (symmetric per output channel): the why is in ops/cpu/linear_int8.py. */
#include "nanoqwen_cpu.h"
#include "act_quant.h"
#include "act_quant16.h"
#include "amx.h"
#include "gemv.h"
#include "pool.h"
#include "scratch.h"

/* int8 pieces per activation row (act_quant.h; measured in ops/cpu/linear_int8.py): bf16 outputs carry 2^-9
   of rounding, beside which 2 pieces' 2^-16 of the row's largest activation is noise; fp32 outputs take 4
   (2^-32), with which the error is fp32 rounding alone (3 left up to 3x the reference's). */
#define PIECES_BF16 2
#define PIECES_F32 4
#define VNNI_MAX_PIECES 8  /* activation pieces one pass of the vpdpbusd loop serves: 8 accumulators a set */
_Static_assert(VNNI_MAX_PIECES / PIECES_BF16 == 4 && VNNI_MAX_PIECES / PIECES_F32 == 2, "EACH_ROW_GROUP's cases");
#define TILE_PIECES 48     /* activation pieces one AMX pass serves: three tiles of 16 columns */
#define AMX_INT8_MIN_ROWS 2  /* 1 row streams faster by vpdpbusd (bench_cpu_linear, 1 thread: 48.7 vs 51.7 ms by AMX) */

struct linear_int8_args {
    const void *x;         /* the fallbacks: fp32 rows */
    int8_t *q;             /* the integer paths: the pieces, as rows of K (int8: vpdpbusd; int16: vpmaddwd, written by
                              linear_int8_madd's staging chunks where it has them) or act_quads (AMX) */
    float *qscale;         /* [M * P]: each piece's scale (as q) */
    const int32_t *offsets;  /* vpdpbusd: [M * P][16], 128 x each piece row's sum in each int32 lane (lane_offsets) */
    const int8_t *w;
    const void *scale;
    void *y;
    int M, N, K, P, bf16;
    long rows;  /* per chunk */
    int x_bf16;  /* linear_int8_avx2: x as it came (bf16), widened in registers (no scratch to widen it into) */
};

static inline void store_scaled(void *y, long at, float v, const void *scale, int n, int bf16) {
    if (bf16) ((uint16_t *)y)[at] = f32_to_bf16(v * bf16_to_f32(((const uint16_t *)scale)[n]));
    else ((float *)y)[at] = v * ((const float *)scale)[n];
}

/* ---- Without AVX512-VNNI: fp32 activations, each weight widened to fp32 ---- */

/* AVX2: two activation rows per pass over a weight row. */
static void linear_int8_avx2(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    const int M = a->M, N = a->N, K = a->K;
    const long end = pool_chunk_end(chunk, a->rows, N);
    for (long n = chunk * a->rows; n < end; n++) {
        const int8_t *r = a->w + n * K;
        for (int m = 0; m < M; m += 2) {
            float o0, o1 = 0.0f;  /* o1 is written only when there is a second row */
            const size_t x_bytes = (size_t)K * (a->x_bf16 ? 2 : 4);
            const char *x0 = (const char *)a->x + m * x_bytes, *x1 = m + 1 < M ? x0 + x_bytes : 0;
            if (a->x_bf16) dot2_avx2(r, W_I8, x0, x1, X_BF16, K, &o0, &o1);
            else dot2_avx2(r, W_I8, x0, x1, X_F32, K, &o0, &o1);
            store_scaled(a->y, (long)m * N + n, o0, a->scale, n, a->bf16);
            if (x1) store_scaled(a->y, (long)(m + 1) * N + n, o1, a->scale, n, a->bf16);
        }
    }
}

AVX512_BEGIN
/* AVX-512: up to GEMV_MAX_ROWS activation rows per pass over a weight row, each 16 weights widened once. */
static void linear_int8_avx512(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    const int M = a->M, N = a->N, K = a->K;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, N); n++) {
        const int8_t *r = a->w + n * K;
        for (int m0 = 0; m0 < M; m0 += GEMV_MAX_ROWS) {
            const int rows = M - m0 < GEMV_MAX_ROWS ? M - m0 : GEMV_MAX_ROWS;
            float o[GEMV_MAX_ROWS];
#define BODY(R) dot_rows_avx512(r, W_I8, (const float *)a->x + (long)m0 * K, R, K, o)
            WITH_CONST_ROWS(rows, BODY)
#undef BODY
            for (int m = 0; m < rows; m++) store_scaled(a->y, (long)(m0 + m) * N + n, o[m], a->scale, n, a->bf16);
        }
    }
}
AVX512_END

/* ---- AVX2 (no AVX-512): int16 activation pieces (act_quant16.h) against the weights widened to int16 ---- */

/* int16 pieces per activation row, for PIECES_BF16 and PIECES_F32 int8 ones above (act_quant16.h), the same reasons */
#define PIECES16_BF16 ACT16_PIECES(PIECES_BF16)
#define PIECES16_F32 ACT16_PIECES(PIECES_F32)
/* Piece rows one pass over a weight row serves. 4, not the 8 accumulators the registers could hold: 8 rows of
   pieces at K 3072 (48 KB) overflow the 32 KB L1 and were reloaded from L2 for every weight row, where each group of
   4 (24 KB) stays in L1 while it runs over the chunk's weight rows, which the next group then finds in L2 (one
   thread, 1024 x 3072 streamed, 8 rows: 604-737 -> 466-486 µs; K 1024 unchanged). */
#define AVX2_MAX_PIECES 4
/* Columns whose int32 sums cannot overflow: each lane adds two products of at most 128 * 32767 per 16 columns,
   4096 columns 2^31 - 65536 at most. */
#define SPAN16 4096
_Static_assert(AVX2_MAX_PIECES / PIECES16_BF16 == 4 && AVX2_MAX_PIECES / PIECES16_F32 == 2, "EACH_ROW_GROUP's cases");

/* acc[r] += the int16 piece row q + r * K against the 16 weights at w, r < R: 16 products a vpmaddwd. */
INLINE void madd16(const int8_t *w, const int16_t *q, int R, int K, __m256i *acc) {
    const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
    for (int r = 0; r < R; r++)
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(v, _mm256_loadu_si256((const __m256i *)(q + (long)r * K))));
}

/* y[m0 + j, n + i * stride] for the `rows` activation rows from m0 and the W weight rows n + i * stride (W, rows and
   P constants, W * rows * P <= 2 * AVX2_MAX_PIECES): each 16 weights widened once, against every row's pieces (a->q:
   int16 rows of K). */
INLINE void madd_pieces(const struct linear_int8_args *a, long n, long stride, int W, int m0, int rows, int P) {
    const int R = rows * P, K = a->K;
    const int8_t *w = a->w + n * K;
    const int16_t *q = (const int16_t *)a->q + (long)m0 * P * K;
    const float *s = a->qscale + m0 * P;
    __m256 sums[SPREAD_ROWS][AVX2_MAX_PIECES];
    for (int i = 0; i < W; i++)
        for (int r = 0; r < R; r++) sums[i][r] = _mm256_setzero_ps();
    for (int k0 = 0; k0 < K; k0 += SPAN16) {
        const int k1 = K - k0 < SPAN16 ? K : k0 + SPAN16;
        __m256i acc[SPREAD_ROWS][AVX2_MAX_PIECES];
        for (int i = 0; i < W; i++)
            for (int r = 0; r < R; r++) acc[i][r] = _mm256_setzero_si256();
        for (int k = k0; k < k1; k += 32)
            for (int i = 0; i < W; i++) {
                const int8_t *row = w + i * stride * K;
                if (prefetch_in_software(W)) __builtin_prefetch(row + k + PREFETCH_BYTES);
                madd16(row + k, q + k, R, K, acc[i]);
                madd16(row + k + 16, q + k + 16, R, K, acc[i]);
            }
        for (int i = 0; i < W; i++)
            for (int r = 0; r < R; r++) sums[i][r] = _mm256_add_ps(sums[i][r], _mm256_cvtepi32_ps(acc[i][r]));
    }
    for (int i = 0; i < W; i++)
        for (int j = 0; j < rows; j++) {
            __m256 o = _mm256_setzero_ps();
            for (int p = 0; p < P; p++) o = _mm256_fmadd_ps(sums[i][j * P + p], _mm256_set1_ps(s[j * P + p]), o);
            const long at = n + i * stride;
            store_scaled(a->y, (long)(m0 + j) * a->N + at, hsum(o), a->scale, (int)at, a->bf16);
        }
}

/* Weight rows n .. end - 1 against the `rows` activation rows from m0: with one activation row SPREAD_ROWS weight
   rows a pass spread over the chunk (gemv.h), else one; the last rows one at a time. */
INLINE void madd_rows(const struct linear_int8_args *a, long n, long end, int m0, int rows, int P) {
    if (rows == 1) {
        const long stride = spread_stride(n, end, SPREAD_ROWS);
        for (long p = 0; p < stride; p++) madd_pieces(a, n + p, stride, SPREAD_ROWS, m0, 1, P);
        n += SPREAD_ROWS * stride;
    }
    for (; n < end; n++) madd_pieces(a, n, 0, 1, m0, rows, P);
}

/* Weight rows [start, end) against one group of `max_pieces` / P activation rows at a time:
   SPAN(a, start, end, m0, rows, P) with rows and P constants, so that the accumulators stay in registers: 1-4 rows
   of `bf16_p` pieces (bf16 outputs), 1-2 of `f32_p` (the _Static_asserts above). */
#define EACH_ROW_GROUP(ctx, start, end, max_pieces, bf16_p, f32_p, SPAN) do { \
        const struct linear_int8_args *a_ = (ctx); \
        const long start_ = (start), end_ = (end); \
        const int per_ = (max_pieces) / a_->P; \
        for (int m0_ = 0; m0_ < a_->M; m0_ += per_) { \
            const int rows_ = a_->M - m0_ < per_ ? a_->M - m0_ : per_; \
            switch (a_->P == (bf16_p) ? rows_ : -rows_) { \
                case 1: SPAN(a_, start_, end_, m0_, 1, bf16_p); break; \
                case 2: SPAN(a_, start_, end_, m0_, 2, bf16_p); break; \
                case 3: SPAN(a_, start_, end_, m0_, 3, bf16_p); break; \
                case 4: SPAN(a_, start_, end_, m0_, 4, bf16_p); break; \
                case -1: SPAN(a_, start_, end_, m0_, 1, f32_p); break; \
                default: SPAN(a_, start_, end_, m0_, 2, f32_p); break; \
            } \
        } \
    } while (0)

struct linear_int8_madd_args {
    struct linear_int8_args a;
    struct pool_rows split;   /* the weight rows' chunks, after the staging ones */
    struct pool_stage stage;  /* 2+ rows: the job's first M chunks stage them (int8_stage_row); else none */
};

/* Row m of linear_int8_madd's job as int16 pieces (act16_quant_rows): its pieces and their scales. */
static int int8_stage_row(const void *ctx, long m) {
    const struct linear_int8_madd_args *job = ctx;
    const struct linear_int8_args *a = &job->a;
    const size_t row = (size_t)a->K * (a->bf16 ? 2 : 4);
    int wild;
    act16_quant_rows((const char *)job->stage.x + m * row, a->bf16, 1, a->K, a->P, a->K,
                     (int16_t *)a->q + m * a->P * a->K, a->qscale + m * a->P, &wild);
    return wild;
}

/* The job's staging chunks first (pool_stage_chunk); the rest one group of piece rows at a time over their weight
   rows (AVX2_MAX_PIECES). */
static void linear_int8_madd(const void *ctx, long chunk) {
    const struct linear_int8_madd_args *job = ctx;
    if (pool_stage_chunk(&job->stage, int8_stage_row, job, &chunk)) return;
    EACH_ROW_GROUP(&job->a, pool_rows_start(&job->split, chunk), pool_rows_end(&job->split, chunk), AVX2_MAX_PIECES,
                   PIECES16_BF16, PIECES16_F32, madd_rows);
}

/* ---- AVX512-VNNI: activation pieces (act_quant.h) against the int8 weights, int32 sums ---- */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

/* How far ahead the 1-row vpdpbusd loop prefetches its weight row: gemv.h's prefetcht0 2 KB ahead streamed a step's
   1-row linears slower on the 2-core AVX-512 Xeon (profiles/RESULTS.md, seventeenth session: as stand-alone loops,
   quiet, 0.88x the kernel's time with u8 weights and prefetcht1 this far ahead). Non-temporal (prefetchnta): each
   weight is read once a step, and so streamed it evicts less of what the step's other kernels and the engine read
   next (Zen 5, a replayed int8 step: attention, the norms and silu_mul 0.82x their time, the linears' unchanged;
   the loop alone as with prefetcht1; profiles/RESULTS.md, step33). */
#define VNNI_PREFETCH_AHEAD 4096

/* _mm512_dpbusd_epi32(acc, u, s) in place: with the intrinsic GCC 12 copied each of dot_pieces' 16 accumulators
   to another register and back every 64 weights (and spilled the copies past 32 registers). */
INLINE __m512i dpbusd_in_place(__m512i acc, __m512i u, __m512i s) {
    __asm__("vpdpbusd {%2, %1, %0|%0, %1, %2}" : "+v"(acc) : "v"(u), "v"(s));  /* AT&T | Intel operand order */
    return acc;
}

/* acc[i * VNNI_MAX_PIECES + r] += the 64 weights at w + i * K as u8 (w + 128, `mask`: which bytes count; the others
   128 against pieces of 0) against the int8 piece row q + r * K, i < W, r < R: each piece's load serves the W weight
   rows. The weights, not the pieces, take the + 128: it costs a vpxord a 64 weights where the pieces' + 128 cost a
   vpdpbusd for the weight row's sum, and it comes back out as the pieces' own sums, once a call (lane_offsets). */
INLINE void dpbusd64_rows(const int8_t *w, int W, const int8_t *q, int R, int K, __mmask64 mask, __m512i *acc) {
    __m512i v[2];
    for (int i = 0; i < W; i++)
        v[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + (long)i * K), _mm512_set1_epi8((char)0x80));
    for (int r = 0; r < R; r++) {
        const __m512i piece = _mm512_maskz_loadu_epi8(mask, q + (long)r * K);
        for (int i = 0; i < W; i++)
            acc[i * VNNI_MAX_PIECES + r] = dpbusd_in_place(acc[i * VNNI_MAX_PIECES + r], v[i], piece);
    }
}

/* dpbusd64_rows for one weight row: acc[r], r < R. */
INLINE void dpbusd64(const int8_t *w, const int8_t *q, int R, int K, __mmask64 mask, __m512i *acc) {
    dpbusd64_rows(w, 1, q, R, K, mask, acc);
}

/* out[r][l] = 128 x the sum of the bytes of piece row q + r * K (r < R) that int32 lane l of dpbusd64's sums meets:
   what the weights' + 128 added to that lane. */
static void lane_offsets(const int8_t *q, int R, int K, int32_t *out) {
    for (int r = 0; r < R; r++) {
        __m512i sum = _mm512_setzero_si512();
        for (int k = 0; k < K; k += 64)
            sum = _mm512_dpbusd_epi32(sum, _mm512_set1_epi8(1),
                                      _mm512_maskz_loadu_epi8(K - k < 64 ? 0xffffffffull : ~0ull, q + (long)r * K + k));
        _mm512_store_si512(out + 16 * r, _mm512_slli_epi32(sum, 7));
    }
}

/* y[m0 + j, n + i] = sums[i * rows + j] x scale[n + i] (i < W, j < rows), rounded as store_scaled rounds them. */
INLINE void store_pass(const struct linear_int8_args *a, long n, int W, int m0, int rows, __m256 sums) {
    const float *f32 = a->scale;
    const uint16_t *b16 = a->scale;
    __m256 scale = _mm256_set1_ps(a->bf16 ? bf16_to_f32(b16[n]) : f32[n]);
    if (W == 2)
        scale = _mm256_mask_blend_ps((__mmask8)(0xff << rows), scale,
                                     _mm256_set1_ps(a->bf16 ? bf16_to_f32(b16[n + 1]) : f32[n + 1]));
    const __m256i u = _mm256_castps_si256(round8_as_stored(_mm256_mul_ps(sums, scale), a->bf16));
    int32_t out[8];  /* bf16: the upper halves */
    _mm256_storeu_si256((__m256i *)out, a->bf16 ? _mm256_srli_epi32(u, 16) : u);
    for (int i = 0; i < W; i++)
        for (int j = 0; j < rows; j++) {
            const long at = (long)(m0 + j) * a->N + n + i;
            if (a->bf16) ((uint16_t *)a->y)[at] = (uint16_t)out[i * rows + j];
            else ((int32_t *)a->y)[at] = out[i * rows + j];
        }
}

/* y[m0 + j, n + i] for the `rows` activation rows from m0 and the W weight rows from n (W, rows and P constants,
   W <= 2, rows * P <= VNNI_MAX_PIECES): one vpdpbusd per piece, weight row and 64 weights, each piece's load shared
   by the W weight rows (W * rows * P accumulators: 16 at most, where one set of 8 for each of the even and odd
   blocks of a single weight row loaded a piece per vpdpbusd). Each lane's int32 sum, and so each output, is the
   same as with the pieces as u8 against the s8 weights; the outputs' reductions are batched (lane_sums16), same bits. */
INLINE void dot_pieces(const struct linear_int8_args *a, long n, int W, int m0, int rows, int P) {
    const int R = rows * P, K = a->K;
    const int8_t *w = a->w + n * K, *q = a->q + (long)m0 * P * K;
    const float *s = a->qscale + m0 * P;
    const int32_t *offsets = a->offsets + 16 * m0 * P;
    __m512i acc[2 * VNNI_MAX_PIECES];  /* from minus the offsets, which the weights' + 128 then add back */
    for (int r = 0; r < R; r++) {
        const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_load_si512(offsets + 16 * r));
        for (int i = 0; i < W; i++) acc[i * VNNI_MAX_PIECES + r] = start;
    }
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        for (int i = 0; i < W; i++) __builtin_prefetch(w + (long)i * K + k + PREFETCH_BYTES);
        dpbusd64_rows(w + k, W, q + k, R, K, ~0ull, acc);
    }
    if (k < K) dpbusd64_rows(w + k, W, q + k, R, K, 0xffffffffull, acc);  /* K % 64 == 32 */
    __m512 f[16];  /* [i * rows + j], reduced together */
    for (int i = 0; i < W; i++)
        for (int j = 0; j < rows; j++) {
            __m512 o = _mm512_setzero_ps();
            for (int p = 0; p < P; p++) {
                const int r = j * P + p;
                o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i * VNNI_MAX_PIECES + r]), _mm512_set1_ps(s[r]), o);
            }
            f[i * rows + j] = o;
        }
    for (int o = W * rows; o < 16; o++) f[o] = _mm512_setzero_ps();
    store_pass(a, n, W, m0, rows, _mm512_castps512_ps256(lane_sums16(f)));
}

/* One activation row: weight row n against its P pieces, as dot_pieces(a, n, 1, 0, 1, P) but in a loop of its own with
   its weights prefetched non-temporally (VNNI_PREFETCH_AHEAD): the 16 lanes whose sum is the row's output before its
   scale. Not folded into dot_pieces: folded, gcc copies each accumulator twice an iteration, and the step's 1-row
   linears took 1.15-1.22x ab_int8_row's xor-T1-4096 time, this 0.81-0.99x. */
INLINE __m512 row_lanes(const struct linear_int8_args *a, long n, int P) {
    const int K = a->K;
    const int8_t *w = a->w + n * K;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[2][PIECES_F32];
    for (int p = 0; p < P; p++) acc[0][p] = acc[1][p] = _mm512_setzero_si512();
    int k = 0;
    for (; k + 128 <= K; k += 128) {
        __builtin_prefetch(w + k + VNNI_PREFETCH_AHEAD, 0, 0);
        __builtin_prefetch(w + k + 64 + VNNI_PREFETCH_AHEAD, 0, 0);
        const __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512(w + k), flip);
        const __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64), flip);
        for (int p = 0; p < P; p++) {
            acc[0][p] = _mm512_dpbusd_epi32(acc[0][p], v0, _mm512_loadu_si512(a->q + (long)p * K + k));
            acc[1][p] = _mm512_dpbusd_epi32(acc[1][p], v1, _mm512_loadu_si512(a->q + (long)p * K + k + 64));
        }
    }
    if (k + 64 <= K) dpbusd64(w + k, a->q + k, P, K, ~0ull, acc[0]), k += 64;
    if (k < K) dpbusd64(w + k, a->q + k, P, K, 0xffffffffull, acc[1]);  /* K % 64 == 32 */
    __m512 f = _mm512_setzero_ps();
    for (int p = 0; p < P; p++) {
        const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(acc[0][p], acc[1][p]), _mm512_load_si512(a->offsets + 16 * p));
        f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a->qscale[p]), f);
    }
    return f;
}

/* Each row's end alone (reduced, scaled, rounded, stored): streamed from memory, as a step reads the weights, the ends
   cost nothing (ab_int8_row's bound-row-no-end, 2 threads: 1.000x), and 8 rows' ends batched as dot_pieces batches
   them (lane_sums16, store_pass), 8 rows unrolled, took 0.91-0.97x the time hot in L2 but 1.14x from memory
   (profiles/RESULTS.md, row37; row-batch8 keeps the unrolled loop to measure). */
INLINE void dot_rows(const struct linear_int8_args *a, long chunk, int P) {
    const long end = pool_chunk_end(chunk, a->rows, a->N);
    for (long n = chunk * a->rows; n < end; n++)
        store_scaled(a->y, n, _mm512_reduce_add_ps(row_lanes(a, n, P)), a->scale, (int)n, a->bf16);
}

static void linear_int8_vnni_row(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    if (a->P == PIECES_BF16) dot_rows(a, chunk, PIECES_BF16);  /* a constant: the accumulators stay in registers */
    else dot_rows(a, chunk, PIECES_F32);
}

/* Weight rows start .. end - 1 against the `rows` activation rows from m0: two a pass, an odd last one alone. */
INLINE void dot_span(const struct linear_int8_args *a, long start, long end, int m0, int rows, int P) {
    long n = start;
    for (; n + 2 <= end; n += 2) dot_pieces(a, n, 2, m0, rows, P);
    if (n < end) dot_pieces(a, n, 1, m0, rows, P);
}

/* One group of VNNI_MAX_PIECES / P activation rows at a time over the chunk's weight rows: the group's pieces stay in
   L1 (8 bf16 rows' at K 3072, 48 KB, did not), the chunk's weights in L2 for the next group. */
static void linear_int8_vnni(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    EACH_ROW_GROUP(ctx, chunk * a->rows, pool_chunk_end(chunk, a->rows, a->N), VNNI_MAX_PIECES, PIECES_BF16, PIECES_F32,
                   dot_span);
}

#pragma GCC pop_options

/* ---- AMX-INT8: tdpbssd, 16 weight rows x 64 columns against up to TILE_PIECES pieces ---- */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-int8")

/* Tile 0: `wrows` weight rows x 64 columns; 1-3: pieces' quads, 16 columns each (the last `cols` % 16);
   4-6: their int32 sums, [weight row][piece]. */
static void amx_int8_configure(int wrows, int cols) {
    struct tile_config config = {.palette = 1};
    config.rows[0] = (uint8_t)wrows, config.colsb[0] = 64;
    for (int t = 0; t * 16 < cols; t++) {
        const int c = cols - 16 * t < 16 ? cols - 16 * t : 16;
        config.rows[1 + t] = 16, config.colsb[1 + t] = (uint16_t)(4 * c);
        config.rows[4 + t] = (uint8_t)wrows, config.colsb[4 + t] = (uint16_t)(4 * c);
    }
    _tile_loadconfig(&config);
}

/* y rows m0.. of weight rows n0 .. n0 + wrows: the pieces of rows m0 .. (cols / P of them) start at column
   m0 * P of the quads (a->q, M * P columns). */
static void amx_int8_block(const struct linear_int8_args *a, long n0, int wrows, int m0, int cols) {
    const int K = a->K, P = a->P, stride = 4 * a->M * P;
    const int8_t *w = a->w + n0 * K, *q = a->q + 4 * m0 * P;
    _tile_zero(4);
    if (cols > 16) _tile_zero(5);
    if (cols > 32) _tile_zero(6);
    for (int k = 0; k < K; k += 64) {
        for (int i = 0; i < wrows; i++) __builtin_prefetch(w + (long)i * K + k + AMX_PREFETCH_BYTES);
        _tile_loadd(0, w + k, K);
        const int8_t *b = q + (long)k / 4 * stride;
        _tile_loadd(1, b, stride);
        _tile_dpbssd(4, 0, 1);
        if (cols > 16) {
            _tile_loadd(2, b + 64, stride);
            _tile_dpbssd(5, 0, 2);
        }
        if (cols > 32) {
            _tile_loadd(3, b + 128, stride);
            _tile_dpbssd(6, 0, 3);
        }
    }
    __attribute__((aligned(64))) int32_t c[3][AMX_ROWS][16];
    _tile_stored(4, c[0], 64);
    if (cols > 16) _tile_stored(5, c[1], 64);
    if (cols > 32) _tile_stored(6, c[2], 64);
    /* per activation row: its pieces' columns gathered across the weight rows, so that its outputs for the
       block's weight rows (contiguous in y) are summed and stored 16 at a time */
    const __mmask16 live = (__mmask16)((1u << wrows) - 1u);
    const __m512i rows16 = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    const __m512 wscale = a->bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                              _mm256_maskz_loadu_epi16(live, (const uint16_t *)a->scale + n0)), 16))
                                  : _mm512_maskz_loadu_ps(live, (const float *)a->scale + n0);
    const float *s = a->qscale + m0 * P;
    for (int j = 0; j < cols / P; j++) {
        __m512 o = _mm512_setzero_ps();
        for (int p = 0; p < P; p++) {
            const int col = j * P + p;
            const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live,
                _mm512_add_epi32(rows16, _mm512_set1_epi32(col % 16)), c[col / 16], 4);
            o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(s[col]), o);
        }
        o = _mm512_mul_ps(o, wscale);
        const long at = (long)(m0 + j) * a->N + n0;
        if (a->bf16) _mm256_mask_storeu_epi16((uint16_t *)a->y + at, live, (__m256i)_mm512_cvtneps_pbh(o));
        else _mm512_mask_storeu_ps((float *)a->y + at, live, o);
    }
}

static void linear_int8_amx(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    const int M = a->M, P = a->P, per = TILE_PIECES / P;
    const long end = pool_chunk_end(chunk, a->rows, a->N);
    int configured = -1;  /* wrows * 64 + cols of the loaded configuration */
    for (long n0 = chunk * a->rows; n0 < end; n0 += AMX_ROWS) {
        const int wrows = end - n0 < AMX_ROWS ? (int)(end - n0) : AMX_ROWS;
        for (int m0 = 0; m0 < M; m0 += per) {
            const int cols = (M - m0 < per ? M - m0 : per) * P;
            if (configured != wrows * 64 + cols) amx_int8_configure(wrows, cols), configured = wrows * 64 + cols;
            amx_int8_block(a, n0, wrows, m0, cols);
        }
    }
    _tile_release();
}

#pragma GCC pop_options

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] as the reference computes it: fp32 products of each weight widened. */
static void linear_int8_widened(const void *x, const int8_t *w, const void *scale, void *y, int M, int N, int K,
                                int bf16) {
    const long rows = pool_rows_per_chunk(K);
    float *widened = bf16 ? thread_scratch((size_t)M * K * sizeof(float)) : 0;
    if (widened)
        for (long i = 0; i < (long)M * K; i++) widened[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    struct linear_int8_args a = {widened ? widened : x, 0, 0, 0, w, scale, y, M, N, K, 0, bf16, rows, bf16 && !widened};
    nanoqwen_pool_run(has_avx512() && !a.x_bf16 ? linear_int8_avx512 : linear_int8_avx2, &a, (N + rows - 1) / rows);
}

/* The rows of x past the pieces' range, infinite or NaN again by the widening loops (act_quant.h's PIECES_RANGE):
   their pieces' NaN scales made every output NaN where the reference has inf times each weight. wild: each row's flag
   from its quantisation (act_quant_rows, act16_quant_rows). It lies in the caller's thread scratch, which
   linear_int8_widened's may move: read before its one call at M = 1; at M >= 2 the scratch already holds at least
   2 * M * K bytes, the 4 * K it asks. */
static void linear_int8_redo_out_of_range(const void *x, const int8_t *w, const void *scale, void *y, int M, int N,
                                          int K, int bf16, const int *wild) {
    const size_t size = bf16 ? 2 : 4;
    for (int m = 0; m < M; m++)
        if (wild[m])
            linear_int8_widened((const char *)x + m * K * size, w, scale, (char *)y + m * N * size, 1, N, K, bf16);
}

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]. One weight row at a time, as linear() in linear.c: by activation
   pieces where there is scratch for them, then any row out of their range again by the widening loops; else by them. */
void linear_int8(const void *x, const int8_t *w, const void *scale, void *y, int M, int N, int K, int bf16) {
    const long rows = pool_rows_per_chunk(K);
    const int P = bf16 ? PIECES_BF16 : PIECES_F32;
    const long pieces = (long)M * P;
    float *qscale;
    /* out of memory for the pieces: the widening loops below */
    if (has_avx512_vnni() &&
        (qscale = thread_scratch(64 * ((pieces * 4 + 63) / 64) + 64 * pieces + 2 * pieces * K + M * sizeof(int)))) {
        int32_t *offsets = (int32_t *)((char *)qscale + 64 * ((pieces * 4 + 63) / 64));
        int8_t *q = (int8_t *)(offsets + 16 * pieces), *quads = q + pieces * K;
        int *wild = (int *)(quads + pieces * K);
        struct linear_int8_args a = {0, q, qscale, offsets, w, scale, y, M, N, K, P, bf16, rows, 0};
        act_quant_rows(x, bf16, M, K, P, q, qscale, wild);
        if (M >= AMX_INT8_MIN_ROWS && K % 64 == 0 && amx_int8_ready()) {
            act_quads(q, (int)pieces, K, quads);
            a.q = quads, a.rows = (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
            nanoqwen_pool_run(linear_int8_amx, &a, (N + a.rows - 1) / a.rows);
        } else {
            lane_offsets(q, (int)pieces, K, offsets);
            nanoqwen_pool_run(M == 1 ? linear_int8_vnni_row : linear_int8_vnni, &a, (N + rows - 1) / rows);
        }
        linear_int8_redo_out_of_range(x, w, scale, y, M, N, K, bf16, wild);
        return;
    }
    const int P16 = bf16 ? PIECES16_BF16 : PIECES16_F32;
    const long pieces16 = (long)M * P16;
    if (!has_avx512() &&
        (qscale = thread_scratch(64 * ((pieces16 * 4 + 63) / 64) + 2 * pieces16 * K + M * sizeof(int)))) {
        int16_t *q = (int16_t *)((char *)qscale + 64 * ((pieces16 * 4 + 63) / 64));
        int *wild = (int *)(q + pieces16 * K);
        long done = 0;
        /* whole spread passes in every chunk but the last (more rows take one weight row a pass: any chunk serves) */
        const long spread = (rows + SPREAD_ROWS - 1) / SPREAD_ROWS * SPREAD_ROWS;
        const struct linear_int8_madd_args job = {{0, (int8_t *)q, qscale, 0, w, scale, y, M, N, K, P16, bf16, spread, 0},
                                                  pool_rows_cut(N, spread, SPREAD_ROWS), {x, wild, M > 1 ? M : 0, &done}};
        if (M == 1) wild[0] = int8_stage_row(&job, 0);  /* nothing to share: no staging chunk */
        nanoqwen_pool_run(linear_int8_madd, &job, job.stage.rows + pool_rows_chunks(&job.split));
        linear_int8_redo_out_of_range(x, w, scale, y, M, N, K, bf16, wild);
        return;
    }
    linear_int8_widened(x, w, scale, y, M, N, K, bf16);
}
