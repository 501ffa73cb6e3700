/* The int4 1-row linear (AVX-512 VNNI: the weights stored by span, vpdpbusd) against stand-alone variants of its
   loop, in one process, over a decode step's int4 matrices (Qwen3-0.6B, 28 layers + the LM head, groups of 64
   with bf16 scales and offsets beside each matrix, huge pages: 0.34 GB), the variants alternated as ab_harness.h
   says. Not a test. Needs AVX-512 VNNI.

   Build from the repository root (the kernel's pool and activation pieces are the ones measured):
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/ab_int4_row.c -o profiles/out/ab_int4_row ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=2 profiles/out/ab_int4_row PASSES VARIANT...   (the first variant is the one the others are compared to)
     kernel           linear_int4 itself, on the weights stored by span
     loop-...         the kernel's 1-row loop (span_vnni at 1 row of 2 pieces) stand-alone, with a weight row's span
                      prefetched FAR bytes ahead at a hint (T0: prefetcht0, T1: prefetcht1 into L2, none); loop-T0-2048
                      is the kernel's loop before int4row (a fixed yardstick), spread-T0-2048-split-g64 the kernel's
                      loop from then until the weights were stored by span (int4b1), transposing them in registers.
                      -split: the high nibbles masked in place (w & 0xf0, 16 x the nibble) into accumulators of their
                      own, taken back by a shift (>> 4, exact) at the span's end: one op less a vector of weights and
                      twice the vpdpbusd chains. -g64: groups of 64 (a group a block) without the permutes that spread
                      a span's group scales and offsets over its blocks. -so, -so128, -so1024: the scales and offsets
                      prefetched too, 256 (128, 1024) bytes ahead. spread-..., spread4-...: a chunk's rows as 2 (4)
                      streams, a row of each in turn
     spans-...        the loop reading the weights stored by span as transpose_span leaves them (o[0..7], each lane
                      b dword d of block b; a copy of the step made so at start): plain loads, no permutes;
                      spans-loop-split-g64 one stream, spans-spread-split-g64 two (as spread-T0-2048-split-g64)
     bound-...        not checked, a bound: bound-no-permutes leaves the transposition out (wrong sums); bound-read
                      loads what the loop loads, weights, scales and offsets, prefetched as the kernel does, and
                      multiplies nothing; bound-read-weights the weights alone; bound-read-beside bound-read's
                      bytes as one stream, each span's scales and offsets beside its nibbles
   Every variant's outputs (but the bounds') are checked equal to linear_int4's (bf16 activations, 2 pieces) before
   timing; the passes, BLOCK=N and the report are ab_harness.h's. */
#include "linear_int4.c"

#include "ab_harness.h"

#define PIECES 2

static uint16_t x[3072];

static char *step, *spans;  /* the step's matrices (ab_harness.h's buffer), and their copy with the weights in spans */
static void to_spans(char *copy);

static void prepare(char *buf) {
    EACH_MATRIX(buf, INT4_BYTES64, s, sh, w, {
        uint16_t *scale = (uint16_t *)int4_scales_of(w, sh), *offset = (uint16_t *)int4_offsets_of(w, sh);
        for (long i = 0; i < sh->N * sh->K / INT4_GROUP; i++) {
            scale[i] = f32_to_bf16(1e-3f * (float)(1 + rand() % 100));
            offset[i] = f32_to_bf16(1e-2f * (float)(rand() % 201 - 100));
        }
    });
    const long footprint = step_bytes(INT4_BYTES64);  /* step_buffer's: a copy past it read beyond the mapping */
    const long huge = 2L << 20;
    char *base = mmap(0, footprint + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) exit(1);
    step = buf, spans = (char *)(((uintptr_t)base + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(spans, footprint, MADV_HUGEPAGE);
    memcpy(spans, buf, footprint);
    to_spans(spans);
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

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

/* The kernel's loop before its weights were stored by span (int4_block.h): the span of `count` (<= 16) plain
   blocks at p (32 bytes each; the rest read as 0) -> o[d], d < 8: lane b holds dword
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

/* Each weight row's spans (16 blocks, K % 1024 == 0 here) as transpose_span leaves them in registers, o[0..7] one
   after another: the layout the kernel and the spans- variants read with plain loads, no permutes (linear_int4_pack's
   where K % 1024 == 0). */
static void to_spans(char *copy) {
    const struct transpose_index t = transpose_indices();
    EACH_MATRIX(copy, INT4_BYTES64, s, sh, w, {
        for (long at = 0; at < sh->N * sh->K / 2; at += SPAN / 2) {
            __m512i o[8];
            transpose_span((uint8_t *)w + at, SPAN_BLOCKS, &t, o);
            for (int d = 0; d < 8; d++) _mm512_storeu_si512(w + at + 64 * d, o[d]);
        }
    });
}

enum { T1 = 2, T0 = 3 };  /* __builtin_prefetch's locality: prefetcht1, prefetcht0 */

/* span_vnni at 1 row of PIECES pieces, split / g64 / permutes as the header says. */
static inline __attribute__((always_inline)) void span_row(const struct linear_int4_args *a,
                                                           const struct transpose_index *t, long n, long span,
                                                           int split, int g64, int permutes, __m512 *f) {
    const int K = a->K, groups = K / a->G;
    const long len = a->x.len, b0 = span * SPAN_BLOCKS;
    const __m512i nibble = _mm512_set1_epi8(0xf), high = _mm512_set1_epi8((char)0xf0);
    __m512i o[8], acc[2][PIECES];
    if (permutes) transpose_span(a->w + n * (K / 2) + b0 * 32, SPAN_BLOCKS, t, o);
    else for (int k = 0; k < 8; k++) o[k] = _mm512_loadu_si512(a->w + n * (K / 2) + b0 * 32 + 64 * k);
    for (int p = 0; p < PIECES; p++) acc[0][p] = acc[1][p] = _mm512_setzero_si512();
    _Pragma("GCC unroll 8") for (int d = 0; d < 8; d++) {
        const __m512i lo = _mm512_and_si512(o[d], nibble);
        const __m512i hi = split ? _mm512_and_si512(o[d], high) : _mm512_and_si512(_mm512_srli_epi32(o[d], 4), nibble);
        _Pragma("GCC unroll 4") for (int p = 0; p < PIECES; p++) {
            const int8_t *q = a->x.q + p * len + span * SPAN + d * 128;
            acc[0][p] = _mm512_dpbusd_epi32(acc[0][p], lo, _mm512_load_si512(q));
            acc[split][p] = _mm512_dpbusd_epi32(acc[split][p], hi, _mm512_load_si512(q + 64));
        }
    }
    if (split)
        for (int p = 0; p < PIECES; p++) acc[0][p] = _mm512_add_epi32(acc[0][p], _mm512_srai_epi32(acc[1][p], 4));
    __m512 s, off;
    if (g64) {
        s = load16(a->scale, n * groups + b0, 16, a->bf16), off = load16(a->offset, n * groups + b0, 16, a->bf16);
    } else {
        const int g0 = a->x.group[b0];
        const __m512i idx = _mm512_sub_epi32(_mm512_load_si512(a->x.group + b0), _mm512_set1_epi32(g0));
        const int count = groups - g0 < 16 ? groups - g0 : 16;
        s = _mm512_permutexvar_ps(idx, load16(a->scale, n * groups + g0, count, a->bf16));
        off = _mm512_permutexvar_ps(idx, load16(a->offset, n * groups + g0, count, a->bf16));
    }
    const float *pa = a->x.a;
    __m512 sum = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[0][0]), _mm512_set1_ps(pa[0]));
    for (int p = 1; p < PIECES; p++) sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[0][p]), _mm512_set1_ps(pa[p]), sum);
    *f = _mm512_fmadd_ps(sum, s, *f);
    *f = _mm512_fmadd_ps(off, _mm512_load_ps(a->x.xsum + b0), *f);
}

/* A chunk's weight rows, one a pass (K % 1024 == 0: whole spans). FAR, NEAR: prefetch distances into the weight
   row (0: none) at their hints; SO: the scales and offsets prefetched too, SO bytes ahead (a span reads 32 of each). */
#define ROW_LOOP(NAME, FAR, HINT, NEAR, NEAR_HINT, SO, SPLIT, G64, PERMUTES) \
    static void NAME(const void *ctx, long chunk) { \
        const struct linear_int4_args *a = ctx; \
        const struct transpose_index t = transpose_indices(); \
        const long spans = a->x.len / SPAN, row = a->K / 2, groups = a->K / a->G; \
        for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) { \
            const uint8_t *w = a->w + n * row; \
            __m512 f = _mm512_setzero_ps(); \
            for (long span = 0; span < spans; span++) { \
                for (int k = 0; FAR && k < SPAN / 128; k++) \
                    __builtin_prefetch(w + span * SPAN / 2 + FAR + 64 * k, 0, HINT); \
                for (int k = 0; NEAR && k < SPAN / 128; k++) \
                    __builtin_prefetch(w + span * SPAN / 2 + NEAR + 64 * k, 0, NEAR_HINT); \
                if (SO) { \
                    const long g = n * groups + span * SPAN_BLOCKS; \
                    __builtin_prefetch((const char *)a->scale + 2 * g + SO); \
                    __builtin_prefetch((const char *)a->offset + 2 * g + SO); \
                } \
                span_row(a, &t, n, span, SPLIT, G64, PERMUTES, &f); \
            } \
            store1(a->y, n, _mm512_reduce_add_ps(f), a->bf16); \
        } \
    }
ROW_LOOP(loop_t0_2048, 2048, T0, 0, T0, 0, 0, 0, 1)
ROW_LOOP(loop_none, 0, T0, 0, T0, 0, 0, 0, 1)
ROW_LOOP(loop_t0_1024, 1024, T0, 0, T0, 0, 0, 0, 1)
ROW_LOOP(loop_t0_4096, 4096, T0, 0, T0, 0, 0, 0, 1)
ROW_LOOP(loop_t1_4096, 4096, T1, 0, T0, 0, 0, 0, 1)
ROW_LOOP(loop_t1_8192_t0_2048, 8192, T1, 2048, T0, 0, 0, 0, 1)
ROW_LOOP(loop_t1_4096_t0_1024, 4096, T1, 1024, T0, 0, 0, 0, 1)
ROW_LOOP(loop_t0_2048_so, 2048, T0, 0, T0, 256, 0, 0, 1)
ROW_LOOP(loop_t0_2048_so1024, 2048, T0, 0, T0, 1024, 0, 0, 1)
ROW_LOOP(loop_t0_2048_so128, 2048, T0, 0, T0, 128, 0, 0, 1)
ROW_LOOP(loop_t0_2048_split, 2048, T0, 0, T0, 0, 1, 0, 1)
ROW_LOOP(loop_t0_2048_g64, 2048, T0, 0, T0, 0, 0, 1, 1)
ROW_LOOP(loop_t0_2048_split_g64, 2048, T0, 0, T0, 0, 1, 1, 1)
ROW_LOOP(loop_t0_2048_so_split_g64, 2048, T0, 0, T0, 256, 1, 1, 1)
ROW_LOOP(bound_no_permutes, 2048, T0, 0, T0, 0, 0, 0, 0)
ROW_LOOP(spans_loop_split_g64, 2048, T0, 0, T0, 0, 1, 1, 0)
#undef ROW_LOOP

/* A chunk's weight rows as STREAMS streams, its parts, a row of each in turn; prefetcht0 2 KB ahead in each. */
#define SPREAD_LOOP(NAME, STREAMS, SPLIT, G64, PERMUTES) \
    static void NAME(const void *ctx, long chunk) { \
        const struct linear_int4_args *a = ctx; \
        const struct transpose_index t = transpose_indices(); \
        const long spans = a->x.len / SPAN, row = a->K / 2, start = chunk * a->rows; \
        const long end = pool_chunk_end(chunk, a->rows, a->N), part = (end - start + STREAMS - 1) / STREAMS; \
        for (long i = 0; i < part; i++) \
            for (int h = 0; h < STREAMS; h++) { \
                const long n = start + i + h * part; \
                if (n >= end) break; \
                const uint8_t *w = a->w + n * row; \
                __m512 f = _mm512_setzero_ps(); \
                for (long span = 0; span < spans; span++) { \
                    for (int k = 0; k < SPAN / 128; k++) __builtin_prefetch(w + span * SPAN / 2 + 2048 + 64 * k); \
                    span_row(a, &t, n, span, SPLIT, G64, PERMUTES, &f); \
                } \
                store1(a->y, n, _mm512_reduce_add_ps(f), a->bf16); \
            } \
    }
SPREAD_LOOP(spread_t0_2048, 2, 0, 0, 1)
SPREAD_LOOP(spread_t0_2048_split, 2, 1, 0, 1)
SPREAD_LOOP(spread_t0_2048_g64, 2, 0, 1, 1)
SPREAD_LOOP(spread_t0_2048_split_g64, 2, 1, 1, 1)
SPREAD_LOOP(spread4_t0_2048_split_g64, 4, 1, 1, 1)
SPREAD_LOOP(spans_spread_split_g64, 2, 1, 1, 0)
#undef SPREAD_LOOP

/* Bounds on the memory side: each span's weights (and with SO its group scales and offsets) loaded as the loop loads
   them, prefetched as the kernel does, and only folded together (no products). */
#define READ_LOOP(NAME, SO) \
    static void NAME(const void *ctx, long chunk) { \
        const struct linear_int4_args *a = ctx; \
        const long spans = a->x.len / SPAN, row = a->K / 2, groups = a->K / a->G; \
        for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) { \
            const uint8_t *w = a->w + n * row; \
            __m512i v = _mm512_setzero_si512(); \
            __m512 f = _mm512_setzero_ps(); \
            for (long span = 0; span < spans; span++) { \
                for (int k = 0; k < SPAN / 128; k++) __builtin_prefetch(w + span * SPAN / 2 + 2048 + 64 * k); \
                for (int k = 0; k < 8; k++) v = _mm512_xor_si512(v, _mm512_loadu_si512(w + span * SPAN / 2 + 64 * k)); \
                if (SO) \
                    f = _mm512_add_ps(f, _mm512_add_ps(load16(a->scale, n * groups + span * 16, 16, 1), \
                                                       load16(a->offset, n * groups + span * 16, 16, 1))); \
            } \
            store1(a->y, n, _mm512_reduce_add_ps(f) + (float)_mm512_reduce_add_epi32(v), a->bf16); \
        } \
    }
READ_LOOP(bound_read, 1)
READ_LOOP(bound_read_weights, 0)
#undef READ_LOOP

/* bound-read's bytes (a matrix's nibbles, group scales and offsets) read as one stream, each span's 16 scales and 16
   offsets beside its 512 bytes of nibbles (INT4_BYTES64 a block): how a layout with them beside the nibbles would be
   read (the rows are the matrix's bytes cut anew; K a whole number of spans, as every decode matrix's). */
static void bound_read_beside(const void *ctx, long chunk) {
    const struct linear_int4_args *a = ctx;
    const long spans = a->K / SPAN, stride = SPAN / 64 * INT4_BYTES64, row = spans * stride;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        const uint8_t *w = a->w + n * row;
        __m512i v = _mm512_setzero_si512();
        __m512 f = _mm512_setzero_ps();
        for (long span = 0; span < spans; span++) {
            const uint8_t *p = w + span * stride;
            for (int k = 0; k < stride / 64; k++) __builtin_prefetch(p + 2048 + 64 * k);
            for (int k = 0; k < 8; k++) v = _mm512_xor_si512(v, _mm512_loadu_si512(p + 64 * k));
            f = _mm512_add_ps(f, _mm512_add_ps(load16(p + 512, 0, 16, 1), load16(p + 544, 0, 16, 1)));
        }
        store1(a->y, n, _mm512_reduce_add_ps(f) + (float)_mm512_reduce_add_epi32(v), a->bf16);
    }
}

#pragma GCC pop_options

static const struct {
    const char *name;
    pool_fn fn;
} variants[] = {{"kernel", 0}, {"loop-T0-2048", loop_t0_2048}, {"loop-none", loop_none}, {"loop-T0-1024", loop_t0_1024},
                {"loop-T0-4096", loop_t0_4096}, {"loop-T1-4096", loop_t1_4096},
                {"loop-T1-8192-T0-2048", loop_t1_8192_t0_2048}, {"loop-T1-4096-T0-1024", loop_t1_4096_t0_1024},
                {"loop-T0-2048-so", loop_t0_2048_so},
                {"loop-T0-2048-so1024", loop_t0_2048_so1024}, {"loop-T0-2048-so128", loop_t0_2048_so128}, {"loop-T0-2048-split", loop_t0_2048_split},
                {"loop-T0-2048-g64", loop_t0_2048_g64}, {"loop-T0-2048-split-g64", loop_t0_2048_split_g64},
                {"loop-T0-2048-so-split-g64", loop_t0_2048_so_split_g64}, {"spread-T0-2048", spread_t0_2048},
                {"spread-T0-2048-split", spread_t0_2048_split}, {"spread-T0-2048-g64", spread_t0_2048_g64},
                {"spread-T0-2048-split-g64", spread_t0_2048_split_g64},
                {"spread4-T0-2048-split-g64", spread4_t0_2048_split_g64}, {"bound-no-permutes", bound_no_permutes},
                {"bound-read", bound_read}, {"bound-read-weights", bound_read_weights},
                {"bound-read-beside", bound_read_beside},
                {"spans-loop-split-g64", spans_loop_split_g64}, {"spans-spread-split-g64", spans_spread_split_g64}};
#define VARIANTS (int)(sizeof variants / sizeof variants[0])

/* The kernel's activation row for 1 row of PIECES pieces (linear_int4_vnni's steps), in static scratch. */
static struct acts prepared(int K) {
    static __attribute__((aligned(64))) int8_t q[PIECES * 3072];
    static __attribute__((aligned(64))) float a[PIECES], xsum[48], row[3072], arranged[3072];
    static __attribute__((aligned(64))) int32_t group[48];
    const long len = (K + SPAN - 1) / SPAN * SPAN, lanes = len / 64;
    for (long b = 0; b < lanes; b++) group[b] = (int32_t)(b * 64 / INT4_GROUP);
    widen_row(x, K, 1, row);
    block_stats(row, K, lanes, xsum, NULL);
    arrange_row(row, K, len, arranged);
    int wild;
    act_quant_rows(arranged, 0, 1, (int)len, PIECES, q, a, &wild);
    return (struct acts){.q = q, .a = a, .xsum = xsum, .group = group, .len = len};
}

static void run(int i, const char *w, const struct shape *sh, uint16_t *y) {
    const int N = (int)sh->N, K = (int)sh->K;
    if (!variants[i].fn || !strncmp(variants[i].name, "spans-", 6))
        w = spans + (w - step);  /* the same matrix, its weights in spans */
    if (!variants[i].fn) {
        linear_int4(x, (const uint8_t *)w, int4_scales_of(w, sh), int4_offsets_of(w, sh), y, 1, N, K, INT4_GROUP, 1,
                    PIECES);
        return;
    }
    const struct linear_int4_args a = {.x = prepared(K), .w = (const uint8_t *)w, .scale = int4_scales_of(w, sh),
                                       .offset = int4_offsets_of(w, sh), .y = y, .M = 1, .N = N, .K = K, .G = INT4_GROUP,
                                       .P = PIECES, .bf16 = 1, .rows = pool_rows_per_chunk(K / 2)};
    nanoqwen_pool_run(variants[i].fn, &a, (N + a.rows - 1) / a.rows);
}

int main(int argc, char **argv) {
    for (int i = 0; i < 3072; i++) x[i] = f32_to_bf16((float)(rand() % 2001 - 1000) / 300.0f);
    const char *names[VARIANTS];
    for (int i = 0; i < VARIANTS; i++) names[i] = variants[i].name;
    const struct ab_tool tool = {names, VARIANTS, INT4_BYTES64, prepare, run};
    return ab_main(&tool, argc, argv);
}
