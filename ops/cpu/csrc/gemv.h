/* The inner loops of the decode-sized linear kernels (linear.c; linear_int8.c without VNNI): one weight row against a
   few activation rows, the weights widened in registers as they stream. Internal, not exported. */
#ifndef NANOQWEN_GEMV_H
#define NANOQWEN_GEMV_H

#include "simd.h"

/* How a weight row is stored; the loops take it as a constant, so each gets its own branch-free body. */
enum { W_F32, W_I8 };

#define INLINE static inline __attribute__((always_inline))

/* Far enough ahead of the loads for the line to arrive in time: the hardware prefetcher alone left a
   quarter of the memory bandwidth unused (measured 18.4 -> 24.1 GB/s at batch 1 on a 2-core Xeon). 2 KB, not
   4: once the int8 loop stopped widening, one row's linears streamed faster with the nearer distance (a step's
   linears, idle 2-core Xeon: int8 22.9 vs 23.7-26.4 ms, bf16 42.9-43.9 vs 44.6-46.3 ms). The AMX blocks have
   their own distance (amx.h). */
#define PREFETCH_BYTES 2048

/* A prefetch of what is read next, non-temporal where `nta` (a constant where inlined: one instruction either way). */
INLINE void prefetch_read(const void *p, int nta) {
    if (nta) __builtin_prefetch(p, 0, 0);  /* prefetchnta */
    else __builtin_prefetch(p);
}

/* ---- AVX2 + FMA: every x86 CPU the kernels build for ---- */

/* 8 int8 -> 8 fp32. The 8-byte load folds into the sign extension (vpmovsxbd ymm, m64): one shuffle-port
   uop per 8 weights, where loading 16 bytes and shifting the upper half down took 1.5. */
INLINE __m256 widen_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Weights k..k+31 of row r as fp32 (bf16 weights take dot_rows_bf16_avx2 instead). */
INLINE void widen32(const void *r, int k, int kind, __m256 w[4]) {
    if (kind == W_I8) {
        const int8_t *p = (const int8_t *)r + k;
        w[0] = widen_i8(p), w[1] = widen_i8(p + 8), w[2] = widen_i8(p + 16), w[3] = widen_i8(p + 24);
    } else {
        const float *f = (const float *)r + k;
        w[0] = _mm256_loadu_ps(f), w[1] = _mm256_loadu_ps(f + 8), w[2] = _mm256_loadu_ps(f + 16);
        w[3] = _mm256_loadu_ps(f + 24);
    }
}

/* How an activation row is stored: fp32 (for bf16 weights split already: evens then odds in each group of 16,
   linear.c's `split_even_odd`, the order a bf16 weight row widens in without shuffles: `v << 16` holds the
   even-indexed values and `v & 0xffff0000` the odd-indexed ones), or bf16 rows as they came, widened in registers
   at each use, which needs no scratch: X_BF16_SPLIT split so (for bf16 weights), X_BF16 in order (for int8
   weights). Bit for bit the same products as fp32 rows widened before. */
enum { X_F32, X_BF16_SPLIT, X_BF16 };

/* Activations k..k+31 of row x as fp32 (X_F32 or X_BF16), in order. */
INLINE void load_x32(const void *x, int k, int xkind, __m256 v[4]) {
    if (xkind == X_BF16) {
        for (int j = 0; j < 4; j++) v[j] = load8(x, k + 8 * j, 1);
    } else {
        for (int j = 0; j < 4; j++) v[j] = _mm256_loadu_ps((const float *)x + k + 8 * j);
    }
}

/* o0 (and o1 when x1 is not NULL) = the fp32 dot products of weight row r with activation rows x0, x1. */
INLINE void dot2_avx2(const void *r, int kind, const void *x0, const void *x1, int xkind, int K, float *o0,
                      float *o1) {
    const int size = kind == W_F32 ? 4 : 1;
    __m256 a[4], b[4], w[4], x[4];
    for (int j = 0; j < 4; j++) a[j] = b[j] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        __builtin_prefetch((const char *)r + size * k + PREFETCH_BYTES);
        widen32(r, k, kind, w);
        load_x32(x0, k, xkind, x);
        for (int j = 0; j < 4; j++) a[j] = _mm256_fmadd_ps(x[j], w[j], a[j]);
        if (x1) {
            load_x32(x1, k, xkind, x);
            for (int j = 0; j < 4; j++) b[j] = _mm256_fmadd_ps(x[j], w[j], b[j]);
        }
    }
    *o0 = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    if (x1) *o1 = hsum(_mm256_add_ps(_mm256_add_ps(b[0], b[1]), _mm256_add_ps(b[2], b[3])));
}

/* Columns k..k+15 of row m of x (rows of K) as fp32: *e the even-indexed, *o the odd-indexed (X_F32: rows split
   already; X_BF16_SPLIT: bf16, split here by a shift and a mask). */
INLINE void split16(const void *x, int m, int K, int k, int xkind, __m256 *e, __m256 *o) {
    if (xkind == X_F32) {
        const float *f = (const float *)x + (long)m * K + k;
        *e = _mm256_loadu_ps(f), *o = _mm256_loadu_ps(f + 8);
    } else {
        const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + (long)m * K + k));
        *e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *o = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
    }
}

#define AVX2_WROWS 2  /* weight rows one pass of dot_rows_bf16_avx2 serves */
#define AVX2_XROWS 4  /* activation rows it serves: 8 accumulators, 4 weight and 2 activation registers of 16 */

/* One activation row (bf16 weights here, int8 in linear_int8.c): a pass takes SPREAD_ROWS weight rows, one from each
   SPREAD_ROWS-th of the thread's chunk, so that a thread reads SPREAD_ROWS streams 32 KB apart (128 KB chunks), each
   in its own pages; the chunk's last rows % SPREAD_ROWS one at a time. One stream a thread, or 2-4 adjacent rows a
   pass (streams 1-6 KB apart, sharing pages), read slower: a step's 1-row linears cold, 2 threads, in one process, at
   load 4-5, took 0.79-0.83x the time of main's 2-4 adjacent rows for bf16, and 0.77-0.83x of one row a pass for int8
   in 3 runs of 4 (one 1.005x); profiles/RESULTS.md, int8b1. */
#define SPREAD_ROWS 4
/* Which passes prefetch their weight rows in software: all but the spread passes (one activation row), which leave
   their SPREAD_ROWS streams to the hardware prefetcher; there the prefetches cost more than they brought (a step's
   1-row linears cold, 2 threads, in one process, at load 1.6-6: 0.90-0.93x the time without them for bf16 in 4 runs,
   0.93-0.99x for int8 in 11; profiles/RESULTS.md, gemv), where 2-row passes (bf16, 8 rows: 1.02-1.33x the time
   without) and single rows need theirs. A pass is told by its width W alone: only a spread pass takes SPREAD_ROWS
   weight rows (bf16's multi-row passes AVX2_WROWS, int8's and tails 1). */
_Static_assert(AVX2_WROWS != SPREAD_ROWS, "a pass of SPREAD_ROWS weight rows must be a spread pass");
static inline int prefetch_in_software(int W) { return W != SPREAD_ROWS; }

/* The rows apart of a spread pass of W weight rows over a chunk's rows start .. end - 1 (one from each W-th of it):
   whole passes cover W * it rows. */
static inline long spread_stride(long start, long end, int W) { return (end - start) / W; }

/* out[i * AVX2_XROWS + m] = the fp32 dot product of bf16 weight row r + i * stride (i < W) with activation row m < rows
   of x (X_F32: fp32 rows split as linear.c's `split_even_odd` leaves them; X_BF16_SPLIT: bf16 rows, split in
   registers), W, rows and xkind constants. Each activation vector loaded meets W weight rows: with one weight row a
   pass, a load per FMA bound the loop as the FMAs do. Each sum is one chain, two FMAs (evens, odds) per 16 columns in
   column order, whatever W and rows: a row's outputs are the same bits alone as in a batch of any size. */
INLINE void dot_rows_bf16_avx2(const uint16_t *r, long stride, const void *x, int xkind, int W, int rows, int K,
                               float *out) {
    __m256 a[SPREAD_ROWS][AVX2_XROWS];
    for (int i = 0; i < W; i++)
        for (int m = 0; m < rows; m++) a[i][m] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        __m256 even[SPREAD_ROWS], odds[SPREAD_ROWS];
        for (int i = 0; i < W; i++) {
            if (prefetch_in_software(W)) __builtin_prefetch(r + i * stride + k + PREFETCH_BYTES / 2);
            split16(r + i * stride, 0, 0, k, X_BF16_SPLIT, &even[i], &odds[i]);
        }
        for (int m = 0; m < rows; m++) {
            __m256 xe, xo;
            split16(x, m, K, k, xkind, &xe, &xo);
            __asm__("" : "+x"(xe), "+x"(xo));  /* in registers: GCC would fold a load into each FMA (one hot
                                                  512 x 1024, 8 rows: 155 -> 129 µs) */
            for (int i = 0; i < W; i++) a[i][m] = _mm256_fmadd_ps(xo, odds[i], _mm256_fmadd_ps(xe, even[i], a[i][m]));
        }
    }
    for (int i = 0; i < W; i++)
        for (int m = 0; m < rows; m++) out[i * AVX2_XROWS + m] = hsum(a[i][m]);
}

/* ---- AVX-512 (F, BW, BF16), chosen at run time where the CPU has it ---- */

#define GEMV_MAX_ROWS 8  /* activation rows one pass over a weight row serves: 16 accumulators */

/* Around every function that uses AVX-512 (callers included, so the helpers inline into them). */
#define AVX512_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16\")")
#define AVX512_END _Pragma("GCC pop_options")

/* AVX-512F alone, a subset of every caller's target (linear_int4's and linear_int8's VNNI loops have no BF16). */
_Pragma("GCC push_options") _Pragma("GCC target(\"avx512f\")")

/* The sum of v's 16 lanes in one fixed order, GCC's _mm512_reduce_add_ps's (the upper half onto the lower, then
   quarters, pairs, neighbours), which lane_sums16 keeps: a row's output is the same bits either way (but a NaN's:
   an add passes on its first operand's NaN, and the compiler may swap operands). */
INLINE float lane_sum(__m512 v) {
    const __m256 h = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)),
                                   _mm512_castps512_ps256(v));
    const __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
    const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(1, 1, 1, 1))));
}

/* Lane j: lane_sum(v[j]), 16 at once: each round adds two vectors' halves (quarters, pairs, neighbours) in one add. */
INLINE __m512 lane_sums16(const __m512 v[16]) {
    __m512 h[8], q[4], p[2];
    for (int k = 0; k < 8; k++)  /* lanes 0-7: v[2k]'s halves added, 8-15 v[2k + 1]'s */
        h[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)));
    for (int k = 0; k < 4; k++)  /* quarter c: v[4k + c]'s */
        q[k] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * k], h[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)),
                             _mm512_shuffle_f32x4(h[2 * k], h[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)));
    for (int k = 0; k < 2; k++)  /* quarter c: v[8k + c]'s pair, then v[8k + 4 + c]'s */
        p[k] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * k], q[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(q[2 * k], q[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(p[0], p[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(p[0], p[1], _MM_SHUFFLE(3, 1, 3, 1)));  /* 4c + r: v[4r + c]'s */
    return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), s);
}

_Pragma("GCC pop_options")

AVX512_BEGIN

/* v rounded to bf16 as round8 rounds (to nearest even, as torch does; vcvtneps2bf16 flushes subnormals), in the
   upper half of each dword (the lower half not cleared). */
INLINE __m512i round16_bits(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
}

/* Weights k..k+15 of row r as fp32 (bf16 weights take dot_rows_bf16 instead). */
INLINE __m512 widen16(const void *r, int k, int kind) {
    if (kind == W_I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)r + k))));
    return _mm512_loadu_ps((const float *)r + k);
}

/* out[m] = the fp32 dot product of weight row r with activation row x + m * K, m < rows (a constant
   <= GEMV_MAX_ROWS): each 16 weights widened once, FMA'd into every row's two accumulators. */
INLINE void dot_rows_avx512(const void *r, int kind, const float *x, int rows, int K, float *out) {
    const int size = kind == W_F32 ? 4 : 1;
    __m512 a[GEMV_MAX_ROWS][2];
    for (int m = 0; m < rows; m++) a[m][0] = a[m][1] = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 32) {
        __builtin_prefetch((const char *)r + size * k + PREFETCH_BYTES);
        __m512 w0 = widen16(r, k, kind), w1 = widen16(r, k + 16, kind);
        for (int m = 0; m < rows; m++) {
            a[m][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (long)m * K + k), w0, a[m][0]);
            a[m][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + (long)m * K + k + 16), w1, a[m][1]);
        }
    }
    for (int m = 0; m < rows; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
}

/* As dot_rows_avx512 for bf16 activations (x: rows of K bf16) and bf16 weights: vdpbf16ps multiplies
   pairs of bf16 exactly and accumulates them in fp32, so neither side is widened and each activation row
   costs one instruction per 32 weights. At one activation row the weights are prefetched non-temporally: each is read
   once a step, and so streamed it evicts less of what the step's other kernels read next (a replayed bf16 b1 step on
   Zen 5: attention, the norms and silu_mul 0.92-0.95x their time, the logits' widening 0.84x, the linears'
   unchanged in the step, loaded; alone, bench_cpu_linear's pass 1.04-1.05x by median, 0.96-1.02x at best; quiet,
   whole bf16 b1 decode 53.5-55.5 tok/s against 48.0-52.8 without, in the machine's faster state: profiles/
   RESULTS.md, step34 and the thirty-fourth session). At one row left after a pass of more (9, 17 rows) the row
   was just read, mostly from L1: the same bits either way. */
INLINE void dot_rows_bf16(const uint16_t *r, const uint16_t *x, int rows, int K, float *out) {
    __m512 a[GEMV_MAX_ROWS][2];
    for (int m = 0; m < rows; m++) a[m][0] = a[m][1] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        prefetch_read(r + k + PREFETCH_BYTES / 2, rows == 1);
        prefetch_read(r + k + 32 + PREFETCH_BYTES / 2, rows == 1);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(r + k), w1 = (__m512bh)_mm512_loadu_si512(r + k + 32);
        for (int m = 0; m < rows; m++) {
            a[m][0] = _mm512_dpbf16_ps(a[m][0], (__m512bh)_mm512_loadu_si512(x + (long)m * K + k), w0);
            a[m][1] = _mm512_dpbf16_ps(a[m][1], (__m512bh)_mm512_loadu_si512(x + (long)m * K + k + 32), w1);
        }
    }
    if (k < K) {  /* K % 64 == 32 */
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(r + k);
        for (int m = 0; m < rows; m++)
            a[m][0] = _mm512_dpbf16_ps(a[m][0], (__m512bh)_mm512_loadu_si512(x + (long)m * K + k), w0);
    }
    for (int m = 0; m < rows; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
}

AVX512_END

/* Calls BODY(R) with R a compile-time constant equal to `rows` (1..GEMV_MAX_ROWS), so each count gets its
   own fully unrolled loop with its accumulators in registers. */
#define WITH_CONST_ROWS(rows, BODY) \
    switch (rows) { \
        case 1: BODY(1); break; case 2: BODY(2); break; case 3: BODY(3); break; case 4: BODY(4); break; \
        case 5: BODY(5); break; case 6: BODY(6); break; case 7: BODY(7); break; default: BODY(8); break; \
    }

/* The instruction sets a build may take, whatever else the CPU has (the cpu_isa setting: ops/cpu/build.py builds
   each cap into a library of its own, -DNANOQWEN_ISA=NANOQWEN_ISA_<CAP>), so that a CPU with AVX-512 runs, and
   tests, the AVX2 loops, or AVX-512's without AMX. Every run-time choice of loops goes through has_avx512 or
   amx_ready (amx.h). */
#define NANOQWEN_ISA_AVX2 0
#define NANOQWEN_ISA_AVX512 1
#define NANOQWEN_ISA_AUTO 2  /* all the CPU has, AMX included */
#ifndef NANOQWEN_ISA
#define NANOQWEN_ISA NANOQWEN_ISA_AUTO
#endif

static inline int has_avx512(void) {
    return NANOQWEN_ISA >= NANOQWEN_ISA_AVX512 && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw");
}
static inline int has_avx512_bf16(void) { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
/* AVX-512 VNNI (vpdpbusd, on 512-bit registers), which the int8 pieces' loops need; linear_int4's VL too, for the
   masked 256-bit load of bf16 scales and offsets (load16). Tests build NANOQWEN_NO_VNNI to check the loops without
   it (int8's and int4's) on a CPU with it. */
#ifdef NANOQWEN_NO_VNNI
static inline int has_avx512_vnni(void) { return 0; }
#else
static inline int has_avx512_vnni(void) { return has_avx512() && __builtin_cpu_supports("avx512vnni"); }
#endif
static inline int has_avx512vl_vnni(void) { return has_avx512_vnni() && __builtin_cpu_supports("avx512vl"); }

#endif
