/* The int8 1-row linear (AVX-512 VNNI) against stand-alone variants of its loop, in one process, over a decode step's
   weight matrices (Qwen3-0.6B, 28 layers + the LM head, huge pages: 0.6 GB, only 1.2x a 480 MiB L3 such as this
   project's Xeon VM's host has), variants alternated with the order rotated, so that every variant sees the same
   machine load. Not a test. Needs AVX-512 VNNI. What a pass leaves in the L3 changes the next pass's time by up to
   ~10% there, and a rotation keeps each variant after the same neighbour: so each variant runs BLOCK passes in a
   row and only the last counts.

   Build from the repository root (the kernel's pool and activation pieces are the ones measured):
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/ab_int8_row.c -o profiles/out/ab_int8_row -lm
   Run: OMP_NUM_THREADS=2 profiles/out/ab_int8_row PASSES VARIANT...   (the first variant is the one the others are compared to)
     kernel          linear_int8 itself (since the seventeenth session: the xor-T1-4096 scheme below)
     sum-T0-2048     the kernel's scheme before it: u8 pieces against the s8 weights, a vpdpbusd for the row's sum,
                     prefetcht0 2 KB ahead (gemv.h's PREFETCH_BYTES)
     xor-...         the weights as u8 (w ^ 0x80) against s8 pieces, the 128s taken out by the pieces' lane sums
                     (no vpdpbusd for the row's sum): xor-none, xor-T0-2048, xor-T1-2048, xor-T1-4096,
                     xor-T1-4096-T0-512 (prefetcht1 4 KB ahead into L2 and prefetcht0 512 B ahead into L1),
                     xor-T1-8192-T0-1024, xor-NTA-2048
   BLOCK=N (default 3; 1 times every pass, confounded by the pass before): each variant's passes in a row.
   Every variant's outputs are checked equal to linear_int8's (bf16 activations, 2 pieces) before timing. Prints per
   variant: the pass's median and best, the sums over the step's 113 calls of each call's minimum and median (the
   minimum filters out time slices lost to other processes), and against the first variant the median of the per-pass
   ratios and the passes it was faster in. */
#include "linear_int8.c"
#include <stdio.h>
#include <sys/mman.h>

#include "step_matrices.h"

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
#undef XOR_ROWS

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

/* y = one bf16 row x against int8 weight w [N, K] by `fn` (0: linear_int8 itself). */
static void run_variant(pool_fn fn, const uint16_t *x, const int8_t *w, const uint16_t *scale, uint16_t *y, int N, int K) {
    if (!fn) {
        linear_int8(x, w, scale, y, 1, N, K, 1);
        return;
    }
    static __attribute__((aligned(64))) int8_t q[2 * 3072];
    static __attribute__((aligned(64))) float qscale[2];
    static __attribute__((aligned(64))) int32_t lanes[2 * 16];
    act_quant_rows(x, 1, 1, K, 2, q, qscale);
    if (fn == sum_t0_2048)  /* the old scheme's pieces: u8, q + 128 */
        for (int i = 0; i < 2 * K; i++) q[i] ^= (int8_t)0x80;
    else
        lane_offsets(q, 2, K, lanes);
    const struct row_args a = {q, qscale, lanes, w, scale, y, N, K, pool_rows_per_chunk(K)};
    pool_run(fn, &a, (N + a.rows - 1) / a.rows);
}

#pragma GCC pop_options

static const struct {
    const char *name;
    pool_fn fn;
} variants[] = {{"kernel", 0}, {"sum-T0-2048", sum_t0_2048}, {"xor-none", xor_none}, {"xor-T0-2048", xor_t0_2048},
                {"xor-T1-2048", xor_t1_2048}, {"xor-T1-4096", xor_t1_4096}, {"xor-T1-4096-T0-512", xor_t1_4096_t0_512},
                {"xor-T1-8192-T0-1024", xor_t1_8192_t0_1024}, {"xor-NTA-2048", xor_nta_2048}};
#define VARIANTS (int)(sizeof variants / sizeof variants[0])

#define MAX_PASSES 1000

static double median(double *v, int n) {
    qsort(v, n, sizeof *v, by_value);
    return v[n / 2];
}

int main(int argc, char **argv) {
    const int passes = argc > 1 ? atoi(argv[1]) : 0, nv = argc - 2, block = getenv("BLOCK") ? atoi(getenv("BLOCK")) : 3;
    int chosen[VARIANTS];
    if (passes < 1 || passes > MAX_PASSES || nv < 1 || nv > VARIANTS || block < 1) {
        fprintf(stderr, "usage: %s PASSES (1..%d) VARIANT...\n", argv[0], MAX_PASSES);
        return 2;
    }
    for (int i = 0; i < nv; i++) {
        chosen[i] = -1;
        for (int j = 0; j < VARIANTS; j++)
            if (!strcmp(argv[2 + i], variants[j].name)) chosen[i] = j;
        if (chosen[i] < 0) {
            fprintf(stderr, "no variant %s\n", argv[2 + i]);
            return 2;
        }
    }
    long total = 0;
    for (int s = 0; s < KINDS; s++) total += shapes[s].N * shapes[s].K * shapes[s].layers;
    const long footprint = total + CALLS * PAGE, huge = 2L << 20;
    char *base = mmap(0, footprint + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return 1;
    char *buf = (char *)(((uintptr_t)base + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(buf, footprint, MADV_HUGEPAGE);
    srand(1);
    for (long i = 0; i < footprint; i++) buf[i] = (char)(rand() % 255 - 127);
    static uint16_t x[3072], scale[151936], y[2][151936];
    for (int i = 0; i < 3072; i++) x[i] = f32_to_bf16((float)(rand() % 2001 - 1000) / 300.0f);
    for (int i = 0; i < 151936; i++) scale[i] = f32_to_bf16(0.01f + (float)(rand() % 100) * 1e-4f);
    EACH_MATRIX(buf, 1, s, sh, w, {
        run_variant(0, x, (const int8_t *)w, scale, y[0], (int)sh->N, (int)sh->K);
        for (int i = 0; i < nv; i++) {
            memset(y[1], 0xff, 2 * sh->N);  /* a variant that skips outputs must not pass on the last one's */
            run_variant(variants[chosen[i]].fn, x, (const int8_t *)w, scale, y[1], (int)sh->N, (int)sh->K);
            if (memcmp(y[0], y[1], 2 * sh->N)) {
                fprintf(stderr, "%s: outputs differ from linear_int8's\n", variants[chosen[i]].name);
                return 1;
            }
        }
    });
    static double pass[VARIANTS][MAX_PASSES], call[VARIANTS][MAX_PASSES][CALLS];
    for (int p = -1; p < passes; p++)  /* -1: a warm-up */
        for (int j = 0; j < nv; j++) {
            const int i = (j + (p < 0 ? 0 : p)) % nv;
            for (int r = 0; r < block; r++) {
                int c = 0;
                const double start = now();
                EACH_MATRIX(buf, 1, s, sh, w, {
                    const double t = now();
                    run_variant(variants[chosen[i]].fn, x, (const int8_t *)w, scale, y[1], (int)sh->N, (int)sh->K);
                    if (p >= 0) call[i][p][c] = now() - t;
                    c++;
                });
                if (p >= 0) pass[i][p] = now() - start;
            }
        }
    double load[3] = {0};
    if (getloadavg(load, 3) < 0) load[0] = -1;
    printf("%d passes (block %d), load average %.2f %.2f %.2f at the end, %.3f GB of weights a pass\n", passes, block,
           load[0], load[1], load[2], total / 1e9);
    for (int i = 0; i < nv; i++) {
        static double v[MAX_PASSES];
        double mins = 0, medians = 0;
        for (int c = 0; c < CALLS; c++) {
            for (int p = 0; p < passes; p++) v[p] = call[i][p][c];
            qsort(v, passes, sizeof *v, by_value);
            mins += v[0], medians += v[passes / 2];
        }
        int faster = 0;
        for (int p = 0; p < passes; p++) faster += pass[i][p] < pass[0][p], v[p] = pass[i][p] / pass[0][p];
        const double ratio = median(v, passes);
        memcpy(v, pass[i], passes * sizeof *v);
        const double m = median(v, passes);
        printf("%-20s pass median %6.2f ms (%4.1f GB/s), best %6.2f | calls: sum of minima %6.2f ms (%4.1f GB/s), "
               "of medians %6.2f ms | vs %s: ratio %.3f, faster in %d/%d\n",
               variants[chosen[i]].name, 1e3 * m, total / m / 1e9, 1e3 * v[0], 1e3 * mins, total / mins / 1e9,
               1e3 * medians, variants[chosen[0]].name, ratio, faster, passes);
    }
    return 0;
}
