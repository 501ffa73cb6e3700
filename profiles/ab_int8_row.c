/* The int8 1-row linear (AVX-512 VNNI) against stand-alone variants of its loop, in one process, over a decode step's
   weight matrices (Qwen3-0.6B, 28 layers + the LM head, huge pages: 0.6 GB, only 1.2x a 480 MiB L3 such as this
   project's Xeon VM's host has), variants alternated with the order rotated, so that every variant sees the same
   machine load. Not a test. Needs AVX-512 VNNI. What a pass leaves in the L3 changes the next pass's time by up to
   ~10% there, and a rotation keeps each variant after the same neighbour: so each variant runs BLOCK passes in a
   row and only the last counts.

   Build from the repository root (the kernel's pool and activation pieces are the ones measured):
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/ab_int8_row.c -o profiles/out/ab_int8_row ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=2 profiles/out/ab_int8_row PASSES VARIANT...   (the first variant is the one the others are compared to)
     kernel          linear_int8 itself (since the seventeenth session the xor-T1-4096 scheme below; since step33 its
                     prefetch non-temporal, xor-NTA-4096)
     kernel-loop     the kernel's loop (linear_int8_vnni_row) called as the variants are, on their static pieces
     row-batch8      kernel-loop with 8 rows' ends reduced together (lane_sums16), then scaled, rounded and stored
     bound-row-no-end   not checked, a bound: kernel-loop without the rows' ends (wrong sums)
     sum-T0-2048     the kernel's scheme before it: u8 pieces against the s8 weights, a vpdpbusd for the row's sum,
                     prefetcht0 2 KB ahead (gemv.h's PREFETCH_BYTES)
     xor-...         the weights as u8 (w ^ 0x80) against s8 pieces, the 128s taken out by the pieces' lane sums
                     (no vpdpbusd for the row's sum): xor-none, xor-T0-2048, xor-T1-2048, xor-T1-4096,
                     xor-T1-4096-T0-512 (prefetcht1 4 KB ahead into L2 and prefetcht0 512 B ahead into L1),
                     xor-T1-8192-T0-1024, xor-NTA-2048, xor-NTA-4096
     chunk32-T1-4096, chunk64-T1-4096: xor-T1-4096 in the pool's chunks of 32 or 64 KB of weights (the kernel's:
                     128 KB), the threads' last chunks of a call shorter
     pair-T1-4096    xor-T1-4096 two weight rows a pass, each load of the pieces serving both
     spread2-T1-4096, spread2-none, spread4-T1-4096, spread4-none: 2 or 4 weight rows a pass, one from each half or
                     quarter of the chunk (gemv.h's spread passes), prefetched as xor-T1-4096 or not
     bound-read      not checked, a bound: the weights loaded and prefetched as xor-T1-4096, no pieces or products
     bound-read-pieces  the same with the pieces loaded too, no products
     bound-no-end    xor-T1-4096 without the row's end (its sums not scaled, reduced or stored)
   Every variant's outputs are checked equal to linear_int8's (bf16 activations, 2 pieces) before timing; the passes,
   BLOCK=N and the report are ab_harness.h's. Since ab_harness.h (nineteenth session) the activations are drawn in
   another order from the same seed: figures from before are not input for input comparable. */
#include "linear_int8.c"

#include "ab_harness.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

struct row_args {
    const int8_t *q;       /* [2][K] pieces: s8 (xor variants) or u8 (sum variant) */
    const float *qscale;   /* [2] */
    const int32_t *lanes;  /* [2][16]: 128 x each piece's sum in each int32 lane (xor variants) */
    const int8_t *w;
    const void *scale;
    void *y;
    int N, K;
    long rows;
};

enum { NONE = -1, NTA = 0, T1 = 2, T0 = 3 };  /* __builtin_prefetch's locality: prefetchnta, prefetcht1, prefetcht0 */

static inline __attribute__((always_inline)) void finish(const struct row_args *a, long n, __m512i s0, __m512i s1,
                                                         __m512i offset0, __m512i offset1) {
    __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s1, offset1)), _mm512_set1_ps(a->qscale[1]),
                               _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s0, offset0)), _mm512_set1_ps(a->qscale[0])));
    store_scaled(a->y, n, _mm512_reduce_add_ps(f), a->scale, (int)n, 1);
}

/* Weight rows of a chunk, one a pass, (w ^ 0x80) x s8 pieces; far/near: prefetch distances and localities (a
   distance of 0: none). K % 128 == 0. */
#define XOR_ROWS(NAME, FAR, FAR_HINT, NEAR, NEAR_HINT) \
    static void NAME(const void *ctx, long chunk) { \
        const struct row_args *a = ctx; \
        const int K = a->K; \
        const __m512i flip = _mm512_set1_epi8((char)0x80); \
        for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) { \
            const int8_t *w = a->w + n * K; \
            __m512i acc[2][2] = {{_mm512_setzero_si512(), _mm512_setzero_si512()}, \
                                 {_mm512_setzero_si512(), _mm512_setzero_si512()}}; \
            for (int k = 0; k < K; k += 128) { \
                if (FAR) __builtin_prefetch(w + k + FAR, 0, FAR_HINT), __builtin_prefetch(w + k + 64 + FAR, 0, FAR_HINT); \
                if (NEAR) __builtin_prefetch(w + k + NEAR, 0, NEAR_HINT), __builtin_prefetch(w + k + 64 + NEAR, 0, NEAR_HINT); \
                for (int h = 0; h < 2; h++) { \
                    const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64 * h), flip); \
                    acc[h][0] = _mm512_dpbusd_epi32(acc[h][0], v, _mm512_loadu_si512(a->q + k + 64 * h)); \
                    acc[h][1] = _mm512_dpbusd_epi32(acc[h][1], v, _mm512_loadu_si512(a->q + K + k + 64 * h)); \
                } \
            } \
            finish(a, n, _mm512_add_epi32(acc[0][0], acc[1][0]), _mm512_add_epi32(acc[0][1], acc[1][1]), \
                   _mm512_load_si512(a->lanes), _mm512_load_si512(a->lanes + 16)); \
        } \
    }
XOR_ROWS(xor_none, 0, T0, 0, T0)
XOR_ROWS(xor_t0_2048, 2048, T0, 0, T0)
XOR_ROWS(xor_t1_2048, 2048, T1, 0, T0)
XOR_ROWS(xor_t1_4096, 4096, T1, 0, T0)
XOR_ROWS(xor_t1_4096_t0_512, 4096, T1, 512, T0)
XOR_ROWS(xor_t1_8192_t0_1024, 8192, T1, 1024, T0)
XOR_ROWS(xor_nta_2048, 2048, NTA, 0, T0)
XOR_ROWS(xor_nta_4096, 4096, NTA, 0, T0)
XOR_ROWS(chunk32_t1_4096, 4096, T1, 0, T0)  /* xor-T1-4096 in the pool's chunks of 32 KB (run_variant) */
XOR_ROWS(chunk64_t1_4096, 4096, T1, 0, T0)  /* and of 64 KB (the pool's: 128 KB) */
#undef XOR_ROWS

/* R weight rows a pass, n + i * stride (i < R), each load of the pieces serving all R; PF: each row prefetched as
   xor-T1-4096 (else left to the hardware). Each row's sums are xor-T1-4096's, so its output is the same bits.
   K % 128 == 0. */
static inline __attribute__((always_inline)) void rows_pass(const struct row_args *a, long n, long stride, int R,
                                                             int PF) {
    const int K = a->K;
    const int8_t *w = a->w + n * K;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[4][2][2];
    for (int i = 0; i < R; i++)
        for (int h = 0; h < 2; h++) acc[i][h][0] = acc[i][h][1] = _mm512_setzero_si512();
    for (int k = 0; k < K; k += 128) {
        for (int i = 0; i < R && PF; i++) {
            const int8_t *r = w + i * stride * K + k + 4096;
            __builtin_prefetch(r, 0, T1), __builtin_prefetch(r + 64, 0, T1);
        }
        for (int h = 0; h < 2; h++) {
            const __m512i q0 = _mm512_loadu_si512(a->q + k + 64 * h), q1 = _mm512_loadu_si512(a->q + K + k + 64 * h);
            for (int i = 0; i < R; i++) {
                const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w + i * stride * K + k + 64 * h), flip);
                acc[i][h][0] = _mm512_dpbusd_epi32(acc[i][h][0], v, q0);
                acc[i][h][1] = _mm512_dpbusd_epi32(acc[i][h][1], v, q1);
            }
        }
    }
    for (int i = 0; i < R; i++)
        finish(a, n + i * stride, _mm512_add_epi32(acc[i][0][0], acc[i][1][0]),
               _mm512_add_epi32(acc[i][0][1], acc[i][1][1]), _mm512_load_si512(a->lanes),
               _mm512_load_si512(a->lanes + 16));
}

/* pair-...: rows n, n + 1 a pass; spreadR-...: R rows a pass, one from each R-th of the chunk (gemv.h's spread
   passes); -T1-4096: prefetched, -none: not. The chunk's last rows one at a time. */
#define PASSES(NAME, R, SPREAD, PF) \
    static void NAME(const void *ctx, long chunk) { \
        const struct row_args *a = ctx; \
        const long start = chunk * a->rows, end = pool_chunk_end(chunk, a->rows, a->N); \
        long n = start; \
        if (SPREAD) { \
            const long stride = (end - start) / R; \
            for (; n < start + stride; n++) rows_pass(a, n, stride, R, PF); \
            n = start + R * stride; \
        } else \
            for (; n + R <= end; n += R) rows_pass(a, n, 1, R, PF); \
        for (; n < end; n++) rows_pass(a, n, 1, 1, PF); \
    }
PASSES(pair_t1_4096, 2, 0, 1)
PASSES(spread2_t1_4096, 2, 1, 1)
PASSES(spread2_none, 2, 1, 0)
PASSES(spread4_t1_4096, 4, 1, 1)
PASSES(spread4_none, 4, 1, 0)
#undef PASSES

/* Bounds, not candidates: each weight row loaded and prefetched as xor-T1-4096 loads it and folded by xor, no
   products: bound-read the weights alone, bound-read-pieces the pieces' loads too (what the loop would take if its
   arithmetic were free). */
static inline __attribute__((always_inline)) void read_rows(const struct row_args *a, long chunk, int pieces) {
    const int K = a->K;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        const int8_t *w = a->w + n * K;
        __m512i v = _mm512_setzero_si512();
        for (int k = 0; k < K; k += 128) {
            __builtin_prefetch(w + k + 4096, 0, T1), __builtin_prefetch(w + k + 64 + 4096, 0, T1);
            for (int h = 0; h < 2; h++) {
                v = _mm512_xor_si512(v, _mm512_loadu_si512(w + k + 64 * h));
                if (pieces)
                    v = _mm512_add_epi8(v, _mm512_xor_si512(_mm512_loadu_si512(a->q + k + 64 * h),
                                                            _mm512_loadu_si512(a->q + K + k + 64 * h)));
            }
        }
        ((uint16_t *)a->y)[n] = (uint16_t)_mm512_reduce_add_epi32(v);
    }
}

/* A bound: xor-T1-4096's loop with the row's end (lane sums out, converted, scaled, reduced, stored) left out. */
static void bound_no_end(const void *ctx, long chunk) {
    const struct row_args *a = ctx;
    const int K = a->K;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        const int8_t *w = a->w + n * K;
        __m512i acc[2][2] = {{_mm512_setzero_si512(), _mm512_setzero_si512()},
                             {_mm512_setzero_si512(), _mm512_setzero_si512()}};
        for (int k = 0; k < K; k += 128) {
            __builtin_prefetch(w + k + 4096, 0, T1), __builtin_prefetch(w + k + 64 + 4096, 0, T1);
            for (int h = 0; h < 2; h++) {
                const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64 * h), flip);
                acc[h][0] = _mm512_dpbusd_epi32(acc[h][0], v, _mm512_loadu_si512(a->q + k + 64 * h));
                acc[h][1] = _mm512_dpbusd_epi32(acc[h][1], v, _mm512_loadu_si512(a->q + K + k + 64 * h));
            }
        }
        const __m512i s = _mm512_xor_si512(_mm512_xor_si512(acc[0][0], acc[1][0]),
                                           _mm512_xor_si512(acc[0][1], acc[1][1]));
        ((uint16_t *)a->y)[n] = (uint16_t)_mm_cvtsi128_si32(_mm512_castsi512_si128(s));
    }
}

/* The kernel's loop (row_lanes) with the rows' ends batched: 8 rows' lanes reduced together by lane_sums16 (the same
   additions as _mm512_reduce_add_ps; the chunk's last rows % 8 one at a time), each output then scaled, rounded and
   stored as the kernel does; and a bound, the ends left out (wrong sums). The 8 rows unrolled (their lanes in
   registers); tried with store_pass's vector end too, and in a loop with the lanes in memory (profiles/RESULTS.md,
   row37). */
static void row_batch8(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    const long end = pool_chunk_end(chunk, a->rows, a->N);
    long n = chunk * a->rows;
    for (; n + 8 <= end; n += 8) {
        __m512 f[16];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) f[i] = row_lanes(a, n + i, PIECES_BF16), f[i + 8] = _mm512_setzero_ps();
        float sums[8];
        _mm256_storeu_ps(sums, _mm512_castps512_ps256(lane_sums16(f)));
        for (int i = 0; i < 8; i++) store_scaled(a->y, n + i, sums[i], a->scale, (int)(n + i), 1);
    }
    for (; n < end; n++) store_scaled(a->y, n, _mm512_reduce_add_ps(row_lanes(a, n, PIECES_BF16)), a->scale, (int)n, 1);
}
static void bound_row_no_end(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++)
        ((uint16_t *)a->y)[n] = (uint16_t)_mm_cvtsi128_si32(_mm512_castsi512_si128(_mm512_castps_si512(
            row_lanes(a, n, PIECES_BF16))));
}

static void bound_read(const void *ctx, long chunk) { read_rows(ctx, chunk, 0); }
static void bound_read_pieces(const void *ctx, long chunk) { read_rows(ctx, chunk, 1); }

/* The kernel's scheme (u8 pieces x s8 weights, a vpdpbusd against ones for the row's sum), prefetcht0 2 KB ahead. */
static void sum_t0_2048(const void *ctx, long chunk) {
    const struct row_args *a = ctx;
    const int K = a->K;
    const __m512i ones = _mm512_set1_epi8(1);
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        const int8_t *w = a->w + n * K;
        __m512i acc[2][2] = {{_mm512_setzero_si512(), _mm512_setzero_si512()}, {_mm512_setzero_si512(), _mm512_setzero_si512()}};
        __m512i sum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int k = 0; k < K; k += 128) {
            __builtin_prefetch(w + k + 2048), __builtin_prefetch(w + k + 64 + 2048);
            for (int h = 0; h < 2; h++) {
                const __m512i v = _mm512_loadu_si512(w + k + 64 * h);
                sum[h] = _mm512_dpbusd_epi32(sum[h], ones, v);
                acc[h][0] = _mm512_dpbusd_epi32(acc[h][0], _mm512_loadu_si512(a->q + k + 64 * h), v);
                acc[h][1] = _mm512_dpbusd_epi32(acc[h][1], _mm512_loadu_si512(a->q + K + k + 64 * h), v);
            }
        }
        const __m512i offset = _mm512_slli_epi32(_mm512_add_epi32(sum[0], sum[1]), 7);
        finish(a, n, _mm512_add_epi32(acc[0][0], acc[1][0]), _mm512_add_epi32(acc[0][1], acc[1][1]), offset, offset);
    }
}

static uint16_t x[3072], scale[AB_MAX_N];

/* y = one bf16 row x against int8 weight w [N, K] by `fn` (0: linear_int8 itself). */
static void run_variant(pool_fn fn, const int8_t *w, uint16_t *y, int N, int K) {
    if (!fn) {
        linear_int8(x, w, scale, y, 1, N, K, 1);
        return;
    }
    static __attribute__((aligned(64))) int8_t q[2 * 3072];
    static __attribute__((aligned(64))) float qscale[2];
    static __attribute__((aligned(64))) int32_t lanes[2 * 16];
    int wild;
    act_quant_rows(x, 1, 1, K, 2, q, qscale, &wild);
    if (fn == linear_int8_vnni_row || fn == row_batch8 || fn == bound_row_no_end) {  /* the kernel's loop on the
                                                                                         variants' pieces */
        lane_offsets(q, 2, K, lanes);
        const struct linear_int8_args k = {0, q, qscale, lanes, w, scale, y, 1, N, K, 2, 1, pool_rows_per_chunk(K), 0};
        nanoqwen_pool_run(fn, &k, (N + k.rows - 1) / k.rows);
        return;
    }
    if (fn == sum_t0_2048)  /* the old scheme's pieces: u8, q + 128 */
        for (int i = 0; i < 2 * K; i++) q[i] ^= (int8_t)0x80;
    else
        lane_offsets(q, 2, K, lanes);
    const long rows = fn == chunk32_t1_4096   ? (32L << 10) / K
                      : fn == chunk64_t1_4096 ? (64L << 10) / K
                                              : pool_rows_per_chunk(K);
    const struct row_args a = {q, qscale, lanes, w, scale, y, N, K, rows};
    nanoqwen_pool_run(fn, &a, (N + a.rows - 1) / a.rows);
}

#pragma GCC pop_options

static const struct {
    const char *name;
    pool_fn fn;
} variants[] = {{"kernel", 0}, {"kernel-loop", linear_int8_vnni_row},
                {"row-batch8", row_batch8}, {"bound-row-no-end", bound_row_no_end}, {"sum-T0-2048", sum_t0_2048},
                {"xor-none", xor_none}, {"xor-T0-2048", xor_t0_2048},
                {"xor-T1-2048", xor_t1_2048}, {"xor-T1-4096", xor_t1_4096}, {"xor-T1-4096-T0-512", xor_t1_4096_t0_512},
                {"xor-T1-8192-T0-1024", xor_t1_8192_t0_1024}, {"xor-NTA-2048", xor_nta_2048},
                {"xor-NTA-4096", xor_nta_4096},
                {"chunk32-T1-4096", chunk32_t1_4096}, {"chunk64-T1-4096", chunk64_t1_4096},
                {"pair-T1-4096", pair_t1_4096}, {"spread2-T1-4096", spread2_t1_4096}, {"spread2-none", spread2_none},
                {"spread4-T1-4096", spread4_t1_4096}, {"spread4-none", spread4_none}, {"bound-read", bound_read},
                {"bound-read-pieces", bound_read_pieces}, {"bound-no-end", bound_no_end}};
#define VARIANTS (int)(sizeof variants / sizeof variants[0])

static void run(int i, const char *w, const struct shape *sh, uint16_t *y) {
    run_variant(variants[i].fn, (const int8_t *)w, y, (int)sh->N, (int)sh->K);
}

int main(int argc, char **argv) {
    for (int i = 0; i < 3072; i++) x[i] = f32_to_bf16((float)(rand() % 2001 - 1000) / 300.0f);
    for (int i = 0; i < AB_MAX_N; i++) scale[i] = f32_to_bf16(0.01f + (float)(rand() % 100) * 1e-4f);
    const char *names[VARIANTS];
    for (int i = 0; i < VARIANTS; i++) names[i] = variants[i].name;
    const struct ab_tool tool = {names, VARIANTS, 64, 0, run};
    return ab_main(&tool, argc, argv);
}
