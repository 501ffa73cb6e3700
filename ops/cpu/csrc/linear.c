/* Decode-sized linear layers (bf16/fp32 weights): the why is in ops/cpu/linear.py. */
#include "nanoqwen_cpu.h"
#include "amx.h"
#include "gemv.h"
#include "pool.h"
#include "scratch.h"

/* bf16 activations -> fp32, each group of 16 reordered as its 8 even-indexed then 8 odd-indexed values. */
static void split_even_odd(const uint16_t *x, float *out, long n) {
    for (long g = 0; g < n; g += 16)
        for (int j = 0; j < 8; j++) {
            out[g + j] = bf16_to_f32(x[g + 2 * j]);
            out[g + 8 + j] = bf16_to_f32(x[g + 2 * j + 1]);
        }
}

struct linear_args {
    const void *x, *w;  /* x: fp32, split as split_even_odd does for bf16 weights on AVX2 (unless unsplit) */
    const uint32_t *pairs;  /* for linear_amx: x's pairs of columns, as act_quads (amx.h) groups them */
    void *y;
    int M, N, K, bf16;
    long rows;  /* per chunk */
    int unsplit;  /* AVX2, bf16: x as it came, split in registers at each use (no scratch for the split) */
};

/* AVX2, fp32 weights: two activation rows per pass over a weight row. */
static void linear_avx2(const void *ctx, long chunk) {
    const struct linear_args *a = ctx;
    const int M = a->M, N = a->N, K = a->K;
    const long end = pool_chunk_end(chunk, a->rows, N);
    for (long n = chunk * a->rows; n < end; n++) {
        const float *r = (const float *)a->w + n * K;
        for (int m = 0; m < M; m += 2) {
            float o0, o1 = 0.0f;  /* o1 is written only when there is a second row */
            const float *x0 = (const float *)a->x + (long)m * K, *x1 = m + 1 < M ? x0 + K : 0;
            dot2_avx2(r, W_F32, x0, x1, X_F32, K, &o0, &o1);
            store1(a->y, (long)m * N + n, o0, 0);
            if (x1) store1(a->y, (long)(m + 1) * N + n, o1, 0);
        }
    }
}

/* y for weight rows n .. end - 1 and the `rows` activation rows from m0 (rows and xkind constants): W weight rows a
   pass spread over the chunk (gemv.h), SPREAD_ROWS with one activation row, AVX2_WROWS with more; the last rows one at
   a time. At 8 rows the chunk's two halves streamed a step's linears faster than 2 adjacent rows a pass (0.88-0.89x
   cold, 2 threads: profiles/RESULTS.md, gemv). */
INLINE void bf16_rows_avx2(const struct linear_args *a, long n, long end, int m0, int rows, int xkind) {
    const int N = a->N, K = a->K, W = rows == 1 ? SPREAD_ROWS : AVX2_WROWS;
    const uint16_t *w = a->w;
    const char *x = (const char *)a->x + (long)m0 * K * (xkind == X_F32 ? 4 : 2);
    const long stride = spread_stride(n, end, W);  /* also the passes */
    float o[SPREAD_ROWS * AVX2_XROWS];
    for (long p = 0; p < stride; p++) {
        const long first = n + p;  /* the pass's rows: first + i * stride, i < W */
        dot_rows_bf16_avx2(w + first * K, stride * K, x, xkind, W, rows, K, o);
        for (int i = 0; i < W; i++)
            for (int m = 0; m < rows; m++)
                store1(a->y, (long)(m0 + m) * N + first + i * stride, o[i * AVX2_XROWS + m], 1);
    }
    for (n += W * stride; n < end; n++) {
        dot_rows_bf16_avx2(w + n * K, 0, x, xkind, 1, rows, K, o);
        for (int m = 0; m < rows; m++) store1(a->y, (long)(m0 + m) * N + n, o[m], 1);
    }
}

_Static_assert(AVX2_WROWS <= SPREAD_ROWS, "o and dot_rows_bf16_avx2's sums hold SPREAD_ROWS weight rows");

/* AVX2, bf16 weights: AVX2_XROWS activation rows at a time over the chunk's weight rows, which the next group finds
   in L2 (8 rows, one thread, hot 512 x 1024: 165-220 -> 103-129 µs against two rows a pass). */
static void linear_bf16_avx2(const void *ctx, long chunk) {
    const struct linear_args *a = ctx;
    const long start = chunk * a->rows, end = pool_chunk_end(chunk, a->rows, a->N);
    for (int m0 = 0; m0 < a->M; m0 += AVX2_XROWS) {
        const int rows = a->M - m0 < AVX2_XROWS ? a->M - m0 : AVX2_XROWS;
        switch (a->unsplit ? -rows : rows) {  /* constants: the accumulators stay in registers */
            case 1: bf16_rows_avx2(a, start, end, m0, 1, X_F32); break;
            case 2: bf16_rows_avx2(a, start, end, m0, 2, X_F32); break;
            case 3: bf16_rows_avx2(a, start, end, m0, 3, X_F32); break;
            case 4: bf16_rows_avx2(a, start, end, m0, 4, X_F32); break;
            case -1: bf16_rows_avx2(a, start, end, m0, 1, X_BF16_SPLIT); break;
            case -2: bf16_rows_avx2(a, start, end, m0, 2, X_BF16_SPLIT); break;
            case -3: bf16_rows_avx2(a, start, end, m0, 3, X_BF16_SPLIT); break;
            default: bf16_rows_avx2(a, start, end, m0, 4, X_BF16_SPLIT); break;
        }
    }
}

AVX512_BEGIN
/* AVX-512: up to GEMV_MAX_ROWS activation rows per pass over a weight row; bf16 x bf16 by vdpbf16ps. Weight
   rows start..end - 1. */
static void linear_avx512_rows(const struct linear_args *a, long start, long end) {
    const int M = a->M, N = a->N, K = a->K, bf16 = a->bf16;
    const size_t row_bytes = (size_t)K * (bf16 ? 2 : 4);
    for (long n = start; n < end; n++) {
        const void *r = (const char *)a->w + n * row_bytes;
        for (int m0 = 0; m0 < M; m0 += GEMV_MAX_ROWS) {
            const int rows = M - m0 < GEMV_MAX_ROWS ? M - m0 : GEMV_MAX_ROWS;
            float o[GEMV_MAX_ROWS];
#define BODY(R) \
            if (bf16) dot_rows_bf16((const uint16_t *)r, (const uint16_t *)a->x + (long)m0 * K, R, K, o); \
            else dot_rows_avx512(r, W_F32, (const float *)a->x + (long)m0 * K, R, K, o)
            WITH_CONST_ROWS(rows, BODY)
#undef BODY
            for (int m = 0; m < rows; m++) store1(a->y, (long)(m0 + m) * N + n, o[m], bf16);
        }
    }
}

static void linear_avx512(const void *ctx, long chunk) {
    const struct linear_args *a = ctx;
    linear_avx512_rows(a, chunk * a->rows, pool_chunk_end(chunk, a->rows, a->N));
}
AVX512_END

AMX_BEGIN
/* AMX (amx.h): 16 weight rows at a time; the rows past the last whole 16 take the AVX-512 loop. */
static void linear_amx(const void *ctx, long chunk) {
    const struct linear_args *a = ctx;
    const int M = a->M, N = a->N;
    const long start = chunk * a->rows, end = pool_chunk_end(chunk, a->rows, N);
    const long whole = N / AMX_ROWS * AMX_ROWS;
    if (start < whole) {
        amx_configure(M);
        for (long n0 = start; n0 < (end < whole ? end : whole); n0 += AMX_ROWS) {
            float sums[AMX_MAX_ROWS][AMX_ROWS];
            amx_block((const uint16_t *)a->w + n0 * a->K, a->pairs, M, a->K, sums);
            for (int m = 0; m < M; m++)
                for (int i = 0; i < AMX_ROWS; i++) store1(a->y, (long)m * N + n0 + i, sums[m][i], 1);
        }
        _tile_release();
    }
    if (end > whole) linear_avx512_rows(a, start > whole ? start : whole, end);
}
AMX_END

/* y[m, n] = sum_k x[m, k] * w[n, k]. One weight row at a time (AVX2 bf16: two, half a chunk apart, or four a quarter
   apart at one activation row) keeps each thread's reads sequential streams (what the hardware prefetcher follows
   best); the row stays in L1 while every activation row uses it. With AMX, 16 weight rows at a time (linear_amx).
   Parallel over chunks of output rows (pool.h). */
void linear(const void *x, const void *w, void *y, int M, int N, int K, int bf16) {
    const size_t row_bytes = (size_t)K * (bf16 ? 2 : 4);
    struct linear_args a = {x, w, 0, y, M, N, K, bf16, pool_rows_per_chunk(row_bytes), 0};
    const long chunks = (N + a.rows - 1) / a.rows;
    uint32_t *pairs;
    /* out of memory for the pairs: the AVX-512 loop, which every CPU with AMX has */
    if (bf16 && M >= AMX_MIN_ROWS && M <= AMX_MAX_ROWS && amx_ready() &&
        (pairs = thread_scratch((size_t)K / 2 * M * sizeof(uint32_t)))) {
        act_quads((const int8_t *)x, M, 2 * K, (int8_t *)pairs);
        a.pairs = pairs, a.rows = (a.rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
        nanoqwen_pool_run(linear_amx, &a, (N + a.rows - 1) / a.rows);
        return;
    }
    if (bf16 ? has_avx512_bf16() : has_avx512()) {
        nanoqwen_pool_run(linear_avx512, &a, chunks);
        return;
    }
    float *split = bf16 ? thread_scratch((size_t)M * K * sizeof(float)) : 0;
    if (split) {
        split_even_odd((const uint16_t *)x, split, (long)M * K);
        a.x = split;
    }
    if (!bf16) {
        nanoqwen_pool_run(linear_avx2, &a, chunks);
        return;
    }
    a.unsplit = !split;
    /* whole passes of weight rows in every chunk but the last */
    const int wrows = M == 1 ? SPREAD_ROWS : AVX2_WROWS;
    a.rows = (a.rows + wrows - 1) / wrows * wrows;
    nanoqwen_pool_run(linear_bf16_avx2, &a, (N + a.rows - 1) / a.rows);
}
