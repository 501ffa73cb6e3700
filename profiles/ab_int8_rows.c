/* The AVX2 int8 linear's bf16 rows (linear_int8.c: int16 activation pieces against the weights widened to int16,
   vpmaddwd, 4 piece rows a pass) against vpmaddubsw variants with int8-block activations, at 1 and 8 rows, over one
   layer's four matrices at Qwen3-0.6B's shapes (15 MB, in L3); one thread, the variants alternated with the order
   rotated, timed by the calling thread's CPU time. Not a test; profiles/RESULTS.md (lane int8b8, twenty-sixth
   session) has the figures.

   The variants' activations: each 64-column block of a row rounded to [-L, L] with a scale of its own (max |x| / L,
   llama.cpp's Q8 style), stored block by block with the rows' blocks together (one pointer for a pass's rows). A
   weight row is read once for all the rows; per 32 weights and row: vpsignb (the weights' sign onto the activations),
   vpmaddubsw (|w| as u8), then
     ubs    L = 127: a vpmaddwd by ones per vpmaddubsw (pair sums <= 2 x 128 x 127 = 32,512: one pair an int16 lane),
            the block's two added, converted and FMA'd by the block's scale
     ubs7   L = 63: a block's two vpmaddubsw added in int16 first (4 products <= 32,256), one vpmaddwd a block: 3
            multiplies a block and row where the kernel and ubs take 4, for a coarser rounding (max |x| / 126)
     ubs7p2 ubs7 with each block's scale the row's (max |x| / 63) over a power of two, 2^-e (e <= P2_MAX, the largest
            with the block's values within +-63), so that the vpmaddwd multiplies by 2^(P2_MAX - e) in place of ones and
            the blocks' sums add in int32, converted and scaled once each P2_SPAN blocks: no convert or FMA a block

   Build from the repository root:
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/ab_int8_rows.c -o profiles/out/ab_int8_rows ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=1 taskset -c 0 profiles/out/ab_int8_rows [ROUNDS 25] [CALLS A ROUND 4]
   Prints, per shape and row count, each variant's median and minimum µs a call, its median over the kernel's, and
   its largest |y - exact| over sum_k |w_k| max|x| (the exact product in double with the bf16 activations; every 7th
   output, every row). */
#include "linear_int8.c"

#include <stdio.h>

#include "ab_rows.h"

#define VARIANTS 4
#define P2_MAX 8    /* ubs7p2's largest block exponent: 2^8 x 4 products of <= 128 x 63 a lane and block */
#define P2_SPAN 16  /* blocks whose int32 sums cannot overflow: 16 x 2 x 32,256 x 2^8 < 2^31 */

static const char *const names[VARIANTS] = {"kernel", "ubs", "ubs7", "ubs7p2"};
static const struct { const char *name; int N, K; } shapes[] = {{"qkv", 4096, 1024}, {"o", 1024, 2048},
                                                                 {"gate_up", 6144, 1024}, {"down", 1024, 3072}};
#define SHAPES 4

static int8_t blk_q[MAXK / 64 * MAXM * 64] __attribute__((aligned(64)));  /* [block][row][64] */
static float blk_s[MAXK / 64 * MAXM];                                      /* [block][row] */
static int32_t blk_f[MAXK / 64 * MAXM];  /* ubs7p2: [block][row] 2^(P2_MAX - e) in both int16 halves */
static float row_s[MAXM];                /* ubs7p2: each row's scale over 2^P2_MAX */

/* Each 64-column block of the M rows of x rounded to [-levels, levels] by its own scale (K % 64 == 0); `pow2`: the
   row's scale over a power of two (ubs7p2). */
static void blocks_quant(const uint16_t *x, int M, int K, int levels, int pow2) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i top = _mm256_set1_epi32(levels), bottom = _mm256_set1_epi32(-levels);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int m = 0; m < M; m++) {
        float most[MAXK / 64], rowmax = 0.0f;
        for (int b = 0; b < K / 64; b++) {
            __m256 amax = _mm256_setzero_ps();
            for (int i = 0; i < 8; i++) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load8(x, (long)m * K + 64 * b + 8 * i, 1)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            most[b] = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
            rowmax = fmaxf(rowmax, most[b]);
        }
        row_s[m] = rowmax / (float)levels / (float)(1 << P2_MAX);
        for (int b = 0; b < K / 64; b++) {
            float s = most[b];
            if (pow2) {  /* the largest e with most <= rowmax 2^-e */
                int e = 0;
                while (e < P2_MAX && s * (float)(2 << e) <= rowmax) e++;
                s = rowmax / (float)(1 << e);
                blk_f[b * M + m] = (1 << (P2_MAX - e)) * 0x10001;
            }
            s /= (float)levels;
            blk_s[b * M + m] = s;
            const __m256 inverse = _mm256_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
            __m256i c[8];
            for (int i = 0; i < 8; i++)
                c[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(
                           load8(x, (long)m * K + 64 * b + 8 * i, 1), inverse)), top), bottom);
            for (int i = 0; i < 8; i += 4) {
                const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(c[i], c[i + 1]), _mm256_packs_epi32(c[i + 2], c[i + 3]));
                _mm256_storeu_si256((__m256i *)(blk_q + ((long)b * M + m) * 64 + 8 * i), _mm256_permutevar8x32_epi32(w, order));
            }
        }
    }
}

/* The int16 pair sums of 32 weights v (u = |v|) with 32 activations at x. */
INLINE __m256i ubs_pairs(__m256i v, __m256i u, const int8_t *x) {
    return _mm256_maddubs_epi16(u, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)x), v));
}

/* Weight block b of row r (the row prefetched PREFETCH_BYTES ahead): its two halves and their absolute values. */
struct ubs_block { __m256i v0, v1, u0, u1; };
INLINE struct ubs_block ubs_load(const int8_t *r, int b) {
    __builtin_prefetch(r + 64 * b + PREFETCH_BYTES);
    const __m256i v0 = _mm256_loadu_si256((const __m256i *)(r + 64 * b));
    const __m256i v1 = _mm256_loadu_si256((const __m256i *)(r + 64 * b + 32));
    return (struct ubs_block){v0, v1, _mm256_abs_epi8(v0), _mm256_abs_epi8(v1)};
}

/* y[j, n] for weight rows 0 .. N - 1 against the `rows` rows' blocks (rows, seven constants). */
INLINE void ubs_pass(const int8_t *w, const uint16_t *scale, uint16_t *y, int rows, int N, int K, int seven) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (long n = 0; n < N; n++) {
        const int8_t *r = w + n * K;
        __m256 f[MAXM];
        for (int j = 0; j < rows; j++) f[j] = _mm256_setzero_ps();
        for (int b = 0; b < K / 64; b++) {
            const struct ubs_block wb = ubs_load(r, b);
            const int8_t *x = blk_q + (long)b * rows * 64;
            for (int j = 0; j < rows; j++) {
                const __m256i p0 = ubs_pairs(wb.v0, wb.u0, x + 64 * j), p1 = ubs_pairs(wb.v1, wb.u1, x + 64 * j + 32);
                const __m256i sum = seven ? _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones)
                                          : _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
                f[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_broadcast_ss(blk_s + b * rows + j), f[j]);
            }
        }
        for (int j = 0; j < rows; j++) y[(long)j * N + n] = f32_to_bf16(hsum(f[j]) * bf16_to_f32(scale[n]));
    }
}

/* ubs7p2: the blocks' int16 sums times 2^(P2_MAX - e) by the vpmaddwd, added in int32 over P2_SPAN blocks. */
INLINE void pow2_pass(const int8_t *w, const uint16_t *scale, uint16_t *y, int rows, int N, int K) {
    for (long n = 0; n < N; n++) {
        const int8_t *r = w + n * K;
        __m256 f[MAXM];
        for (int j = 0; j < rows; j++) f[j] = _mm256_setzero_ps();
        for (int b0 = 0; b0 < K / 64; b0 += P2_SPAN) {
            __m256i acc[MAXM];
            for (int j = 0; j < rows; j++) acc[j] = _mm256_setzero_si256();
            for (int b = b0; b < K / 64 && b < b0 + P2_SPAN; b++) {
                const struct ubs_block wb = ubs_load(r, b);
                const int8_t *x = blk_q + (long)b * rows * 64;
                for (int j = 0; j < rows; j++) {
                    const __m256i p = _mm256_add_epi16(ubs_pairs(wb.v0, wb.u0, x + 64 * j),
                                                       ubs_pairs(wb.v1, wb.u1, x + 64 * j + 32));
                    acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(p, _mm256_set1_epi32(blk_f[b * rows + j])));
                }
            }
            for (int j = 0; j < rows; j++) f[j] = _mm256_add_ps(f[j], _mm256_cvtepi32_ps(acc[j]));
        }
        for (int j = 0; j < rows; j++)
            y[(long)j * N + n] = f32_to_bf16(hsum(f[j]) * row_s[j] * bf16_to_f32(scale[n]));
    }
}

static void run(int v, const uint16_t *x, const int8_t *w, const uint16_t *scale, uint16_t *y, int M, int N, int K) {
    if (v == 0) {
        linear_int8(x, w, scale, y, M, N, K, 1);
        return;
    }
    blocks_quant(x, M, K, v >= 2 ? 63 : 127, v == 3);
    if (v == 3) {
        if (M == 1) pow2_pass(w, scale, y, 1, N, K); else pow2_pass(w, scale, y, MAXM, N, K);
    } else if (M == 1) {
        if (v == 2) ubs_pass(w, scale, y, 1, N, K, 1); else ubs_pass(w, scale, y, 1, N, K, 0);
    } else {
        if (v == 2) ubs_pass(w, scale, y, MAXM, N, K, 1); else ubs_pass(w, scale, y, MAXM, N, K, 0);
    }
}

int main(int argc, char **argv) {
    const int rounds = argc > 1 ? atoi(argv[1]) : 25, reps = argc > 2 ? atoi(argv[2]) : 4;
    if (rounds < 1 || rounds > 1000 || reps < 1) {
        fprintf(stderr, "usage: %s [ROUNDS 1..1000] [CALLS]\n", argv[0]);
        return 2;
    }
    static uint16_t x[MAXM * MAXK], y[MAXM * 6144];
    ab_rows_activations(x);
    for (int si = 0; si < SHAPES; si++) {
        const int N = shapes[si].N, K = shapes[si].K;
        int8_t *w = aligned_alloc(64, (long)N * K);
        uint16_t *scale = malloc(2L * N);
        for (long i = 0; i < (long)N * K; i++) w[i] = (int8_t)(rand() % 256 - 128);
        for (int n = 0; n < N; n++) scale[n] = f32_to_bf16(1e-3f * (float)(1 + rand() % 100));
        for (int M = 1; M <= MAXM; M += MAXM - 1) {
            double worst[VARIANTS] = {0}, t[VARIANTS][1000];
            for (int v = 0; v < VARIANTS; v++) {
                run(v, x, w, scale, y, M, N, K);
                for (int m = 0; m < M; m++) {
                    float xmax = 0.0f;
                    for (int k = 0; k < K; k++) xmax = fmaxf(xmax, fabsf(bf16_to_f32(x[m * K + k])));
                    for (int n = 0; n < N; n += 7) {
                        double exact = 0.0, size = 0.0;
                        for (int k = 0; k < K; k++)
                            exact += (double)w[(long)n * K + k] * bf16_to_f32(x[m * K + k]), size += abs(w[(long)n * K + k]);
                        const double s = bf16_to_f32(scale[n]);
                        const double err = fabs(bf16_to_f32(y[(long)m * N + n]) - exact * s) / (size * xmax * s);
                        worst[v] = err > worst[v] ? err : worst[v];
                    }
                }
            }
            for (int r = 0; r < rounds; r++)
                for (int i = 0; i < VARIANTS; i++) {
                    const int v = (i + r) % VARIANTS;
                    run(v, x, w, scale, y, M, N, K);
                    const double t0 = cpu_now();
                    for (int c = 0; c < reps; c++) run(v, x, w, scale, y, M, N, K);
                    t[v][r] = 1e6 * (cpu_now() - t0) / reps;
                }
            double base = 0.0;
            for (int v = 0; v < VARIANTS; v++) {
                const double mid = median(t[v], rounds);  /* sorts t[v]: its minimum is t[v][0] */
                if (!v) base = mid;
                printf("%-8s %d row%s %-6s median %8.1f µs  min %8.1f µs  %.3fx  error %.2e\n", shapes[si].name, M,
                       M > 1 ? "s" : " ", names[v], mid, t[v][0], mid / base, worst[v]);
            }
        }
        free(w), free(scale);
    }
    return 0;
}
