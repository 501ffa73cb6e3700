/* RMSNorm (+ residual) and q/k-norm + RoPE + KV store, rounding as the torch references do: the
   why is in ops/cpu/norm_rope.py. Eight lanes at a time (H % 8 == 0, D % 16 == 0): at decode sizes the
   scalar loops took 13 us per norm and 40 us per layer's q/k heads at batch 1, 8x that at batch 8. */
#include "nanoqwen_cpu.h"
#include "pool.h"
#include "simd.h"

/* s = round(x + res) (or x) of one row into buf (and res_out where given); -> 1 / rms(s). */
static float row_scale(const void *x, long xo, const void *res, void *res_out, int H, float eps, int bf16,
                       float *buf) {
    __m256 ss = _mm256_setzero_ps();
    for (int i = 0; i < H; i += 8) {
        __m256 s = load8(x, xo + i, bf16);
        if (res) s = round8(_mm256_add_ps(s, load8(res, xo + i, bf16)), bf16);
        if (res_out) store8(res_out, xo + i, s, bf16);
        _mm256_storeu_ps(buf + i, s);
        ss = _mm256_fmadd_ps(s, s, ss);
    }
    return 1.0f / sqrtf(hsum(ss) / H + eps);
}

/* normed[i] = round(w[i] * round(buf[i] * inv)), i < H: model-dtype values in fp32. */
static inline __m256 scaled8(const float *buf, int i, __m256 inv, const void *w, int bf16) {
    return round8(_mm256_mul_ps(load8(w, i, bf16), round8(_mm256_mul_ps(_mm256_loadu_ps(buf + i), inv), bf16)), bf16);
}

struct rms_norm_args {
    const void *x, *res, *w;
    void *out, *res_out;
    int N, H;
    float eps;
    int bf16;
    long rows;  /* a chunk's: pool_row_chunk */
};

static void rms_norm_chunk(const void *ctx, long chunk) {
    const struct rms_norm_args *a = ctx;
    float buf[8192];
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        const long xo = n * a->H;
        const __m256 inv = _mm256_set1_ps(row_scale(a->x, xo, a->res, a->res_out, a->H, a->eps, a->bf16, buf));
        for (int i = 0; i < a->H; i += 8) store8(a->out, xo + i, scaled8(buf, i, inv, a->w, a->bf16), a->bf16);
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void rms_norm(const void *x, const void *res, const void *w, void *out, void *res_out, int N, int H, float eps,
              int bf16) {
    const struct rms_norm_args a = {x, res, w, out, res_out, N, H, eps, bf16, pool_row_chunk(N, H)};
    nanoqwen_pool_run(rms_norm_chunk, &a, (N + a.rows - 1) / a.rows);
}

/* One head in place: RMSNorm by w, then the neox rotation by (c, s), each product and the sum rounded. */
static void norm_rope_head(void *x, long base, const void *w, const float *c, const float *s, float eps, int D,
                           int bf16) {
    float buf[256];
    const __m256 inv = _mm256_set1_ps(row_scale(x, base, 0, 0, D, eps, bf16, buf));
    const int half = D / 2;
    for (int i = 0; i < half; i += 8) {
        __m256 x1 = scaled8(buf, i, inv, w, bf16), x2 = scaled8(buf, half + i, inv, w, bf16);
        __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
        __m256 lo = _mm256_sub_ps(round8(_mm256_mul_ps(x1, cv), bf16), round8(_mm256_mul_ps(x2, sv), bf16));
        __m256 hi = _mm256_add_ps(round8(_mm256_mul_ps(x2, cv), bf16), round8(_mm256_mul_ps(x1, sv), bf16));
        store8(x, base + i, round8(lo, bf16), bf16);
        store8(x, base + half + i, round8(hi, bf16), bf16);
    }
}

struct qk_args {
    void *q, *k;
    const void *v, *qw, *kw;
    float eps;
    const float *cos_sin;
    const int32_t *positions, *slots;
    void *kc, *vc;
    int N, Hq, Hkv, D;
    long sq, sk, sv;
    int bf16;
    long rows;  /* a chunk's: pool_row_chunk of a row's q and k heads */
};

static void qk_norm_rope_store_chunk(const void *ctx, long chunk) {
    const struct qk_args *a = ctx;
    const int D = a->D, half = D / 2, Hkv = a->Hkv, bf16 = a->bf16, size = bf16 ? 2 : 4;
    for (long n = chunk * a->rows; n < pool_chunk_end(chunk, a->rows, a->N); n++) {
        const float *cs = a->cos_sin + (long)a->positions[n] * D;
        float c[128], s[128];  /* cos and sin in the model dtype, as the reference converts them */
        for (int i = 0; i < half; i += 8) {
            _mm256_storeu_ps(c + i, round8(_mm256_loadu_ps(cs + i), bf16));
            _mm256_storeu_ps(s + i, round8(_mm256_loadu_ps(cs + half + i), bf16));
        }
        for (int h = 0; h < a->Hq; h++) norm_rope_head(a->q, n * a->sq + (long)h * D, a->qw, c, s, a->eps, D, bf16);
        for (int h = 0; h < Hkv; h++) norm_rope_head(a->k, n * a->sk + (long)h * D, a->kw, c, s, a->eps, D, bf16);
        if (a->slots[n] < 0) continue;
        const long dst = (long)a->slots[n] * Hkv * D;
        for (int h = 0; h < Hkv; h++) {
            memcpy((char *)a->kc + (dst + (long)h * D) * size, (const char *)a->k + (n * a->sk + (long)h * D) * size,
                   (size_t)D * size);
            memcpy((char *)a->vc + (dst + (long)h * D) * size, (const char *)a->v + (n * a->sv + (long)h * D) * size,
                   (size_t)D * size);
        }
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void qk_norm_rope_store(void *q, void *k, const void *v, const void *qw, const void *kw, float eps,
                        const float *cos_sin, const int32_t *positions, void *kc, void *vc, const int32_t *slots,
                        int N, int Hq, int Hkv, int D, long sq, long sk, long sv, int bf16) {
    const struct qk_args a = {q, k, v, qw, kw, eps, cos_sin, positions, slots, kc, vc, N, Hq, Hkv, D, sq, sk, sv, bf16,
                              pool_row_chunk(N, (long)(Hq + Hkv) * D)};
    nanoqwen_pool_run(qk_norm_rope_store_chunk, &a, (N + a.rows - 1) / a.rows);
}
