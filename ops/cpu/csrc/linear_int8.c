/* int8 weight-only linear layers (symmetric per output channel): the why is in ops/cpu/linear_int8.py. */
#include "nanoqwen_cpu.h"
#include "gemv.h"
#include "pool.h"

static inline void store_scaled(void *y, long at, float v, const void *scale, int n, int bf16) {
    if (bf16) ((uint16_t *)y)[at] = f32_to_bf16(v * bf16_to_f32(((const uint16_t *)scale)[n]));
    else ((float *)y)[at] = v * ((const float *)scale)[n];
}

struct linear_int8_args {
    const float *x;  /* fp32 */
    const int8_t *w;
    const void *scale;
    void *y;
    int M, N, K, bf16;
    long rows;  /* per chunk */
};

/* AVX2: two activation rows per pass over a weight row. */
static void linear_int8_avx2(const void *ctx, long chunk) {
    const struct linear_int8_args *a = ctx;
    const int M = a->M, N = a->N, K = a->K;
    const long end = (chunk + 1) * a->rows < N ? (chunk + 1) * a->rows : N;
    for (long n = chunk * a->rows; n < end; n++) {
        const int8_t *r = a->w + n * K;
        for (int m = 0; m < M; m += 2) {
            float o0, o1 = 0.0f;  /* o1 is written only when there is a second row */
            const float *x1 = m + 1 < M ? a->x + (long)(m + 1) * K : 0;
            dot2_avx2(r, W_I8, a->x + (long)m * K, x1, K, &o0, &o1);
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
    const long end = (chunk + 1) * a->rows < N ? (chunk + 1) * a->rows : N;
    for (long n = chunk * a->rows; n < end; n++) {
        const int8_t *r = a->w + n * K;
        for (int m0 = 0; m0 < M; m0 += GEMV_MAX_ROWS) {
            const int rows = M - m0 < GEMV_MAX_ROWS ? M - m0 : GEMV_MAX_ROWS;
            float o[GEMV_MAX_ROWS];
#define BODY(R) dot_rows_avx512(r, W_I8, a->x + (long)m0 * K, R, K, o)
            WITH_CONST_ROWS(rows, BODY)
#undef BODY
            for (int m = 0; m < rows; m++) store_scaled(a->y, (long)(m0 + m) * N + n, o[m], a->scale, n, a->bf16);
        }
    }
}
AVX512_END

/* y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]. One weight row at a time, as linear() in linear.c; the
   products are fp32 for bf16 activations too, so both dtypes sum the same values. */
void linear_int8(const void *x, const int8_t *w, const void *scale, void *y, int M, int N, int K, int bf16) {
    float *widened = 0;
    const float *xf = (const float *)x;
    if (bf16) {
        widened = (float *)malloc((size_t)M * K * sizeof(float));
        for (long i = 0; i < (long)M * K; i++) widened[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xf = widened;
    }
    struct linear_int8_args a = {xf, w, scale, y, M, N, K, bf16, pool_rows_per_chunk(K)};
    pool_run(has_avx512() ? linear_int8_avx512 : linear_int8_avx2, &a, (N + a.rows - 1) / a.rows);
    free(widened);
}
