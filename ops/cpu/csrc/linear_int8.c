/* int8 weight-only linear layers (symmetric per output channel): the why is in ops/cpu/linear_int8.py. */
#include "nanoqwen_cpu.h"
#include "amx.h"
#include "gemv.h"
#include "pool.h"

static inline void store_scaled(void *y, long at, float v, const void *scale, int n, int bf16) {
    if (bf16) ((uint16_t *)y)[at] = f32_to_bf16(v * bf16_to_f32(((const uint16_t *)scale)[n]));
    else ((float *)y)[at] = v * ((const float *)scale)[n];
}

struct linear_int8_args {
    const void *x;  /* fp32, or bf16 when bf16_dot */
    const uint32_t *pairs;  /* for linear_int8_amx: x as pair_rows (amx.h) makes it */
    const int8_t *w;
    const void *scale;
    void *y;
    int M, N, K, bf16, bf16_dot;
    long rows;  /* per chunk */
};

/* AVX2: two activation rows per pass over a weight row. */
static void linear_int8_avx2(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    const int M = a->M, N = a->N, K = a->K;
    const long end = pool_chunk_end(chunk, a->rows, N);
    for (long n = chunk * a->rows; n < end; n++) {
        const int8_t *r = a->w + n * K;
        for (int m = 0; m < M; m += 2) {
            float o0, o1 = 0.0f;  /* o1 is written only when there is a second row */
            const float *x0 = (const float *)a->x + (long)m * K, *x1 = m + 1 < M ? x0 + K : 0;
            dot2_avx2(r, W_I8, x0, x1, K, &o0, &o1);
            store_scaled(a->y, (long)m * N + n, o0, a->scale, n, a->bf16);
            if (x1) store_scaled(a->y, (long)(m + 1) * N + n, o1, a->scale, n, a->bf16);
        }
    }
}

AVX512_BEGIN
/* AVX-512: up to GEMV_MAX_ROWS activation rows per pass over a weight row. fp32 activations: each 16
   weights widened once; bf16 activations (bf16_dot): weights converted to bf16 (exactly), vdpbf16ps. */
static void linear_int8_avx512_rows(const struct linear_int8_args *a, long start, long end) {
    const int M = a->M, N = a->N, K = a->K;
    for (long n = start; n < end; n++) {
        const int8_t *r = a->w + n * K;
        for (int m0 = 0; m0 < M; m0 += GEMV_MAX_ROWS) {
            const int rows = M - m0 < GEMV_MAX_ROWS ? M - m0 : GEMV_MAX_ROWS;
            float o[GEMV_MAX_ROWS];
            if (a->bf16_dot) {
#define BODY(R) dot_rows_bf16(r, W_I8, (const uint16_t *)a->x + (long)m0 * K, R, K, o)
                WITH_CONST_ROWS(rows, BODY)
#undef BODY
            } else {
#define BODY(R) dot_rows_avx512(r, W_I8, (const float *)a->x + (long)m0 * K, R, K, o)
                WITH_CONST_ROWS(rows, BODY)
#undef BODY
            }
            for (int m = 0; m < rows; m++) store_scaled(a->y, (long)(m0 + m) * N + n, o[m], a->scale, n, a->bf16);
        }
    }
}

static void linear_int8_avx512(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    linear_int8_avx512_rows(a, chunk * a->rows, pool_chunk_end(chunk, a->rows, a->N));
}
AVX512_END

AMX_BEGIN
/* AMX (amx.h), bf16 activations: 16 weight rows at a time; the rows past the last whole 16 take the AVX-512 loop. */
static void linear_int8_amx(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    const int M = a->M, N = a->N, K = a->K;
    const long start = chunk * a->rows, end = pool_chunk_end(chunk, a->rows, N);
    const long whole = N / AMX_ROWS * AMX_ROWS;
    if (start < whole) {
        amx_configure(M);
        for (long n0 = start; n0 < (end < whole ? end : whole); n0 += AMX_ROWS) {
            float sums[AMX_MAX_ROWS][AMX_ROWS];
            amx_block(a->w + n0 * K, W_I8, a->pairs, M, K, sums);
            for (int m = 0; m < M; m++)
                for (int i = 0; i < AMX_ROWS; i++) store_scaled(a->y, (long)m * N + n0 + i, sums[m][i], a->scale, n0 + i, 1);
        }
        _tile_release();
    }
    if (end > whole) linear_int8_avx512_rows(a, start > whole ? start : whole, end);
}
AMX_END

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]. One weight row at a time, as linear() in linear.c; every
   product is exact in fp32 (fp32 activations are never rounded to bf16). */
void linear_int8(const void *x, const int8_t *w, const void *scale, void *y, int M, int N, int K, int bf16) {
    const long rows = pool_rows_per_chunk(K), chunks = (N + rows - 1) / rows;
    /* One row streams faster through the fp32 loop (measured 75 vs 80 ms for a 0.6B step's linears); from
       2 rows on, bf16: AMX where the CPU has it (amx.h), else vdpbf16ps (8 rows: 162 vs 197 ms). */
    if (bf16 && M >= AMX_MIN_ROWS && M <= AMX_MAX_ROWS && amx_ready()) {
        uint32_t *pairs = (uint32_t *)malloc((size_t)K / 2 * M * sizeof(uint32_t));
        pair_rows((const uint16_t *)x, pairs, M, K);
        const long amx_rows = (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS;
        struct linear_int8_args a = {x, pairs, w, scale, y, M, N, K, bf16, 1, amx_rows};
        pool_run(linear_int8_amx, &a, (N + amx_rows - 1) / amx_rows);
        free(pairs);
        return;
    }
    if (bf16 && M > 1 && has_avx512_bf16()) {
        struct linear_int8_args a = {x, 0, w, scale, y, M, N, K, bf16, 1, rows};
        pool_run(linear_int8_avx512, &a, chunks);
        return;
    }
    float *widened = 0;
    const float *xf = (const float *)x;
    if (bf16) {
        widened = (float *)malloc((size_t)M * K * sizeof(float));
        for (long i = 0; i < (long)M * K; i++) widened[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xf = widened;
    }
    struct linear_int8_args a = {xf, 0, w, scale, y, M, N, K, bf16, 0, rows};
    pool_run(has_avx512() ? linear_int8_avx512 : linear_int8_avx2, &a, chunks);
    free(widened);
}
