/* RMSNorm (+ residual) and q/k-norm + RoPE + KV store, rounding as the torch references do: the
   why is in ops/cpu/norm_rope.py. */
#include "nanoqwen_cpu.h"
#include "simd.h"

static inline float ld(const void *p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(void *p, long i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v); else ((float *)p)[i] = v;
}
static inline float rnd(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* One row: out = round(w * round(s * rsqrt(mean(s^2) + eps))), s = round(x + res) (or x); inputs in
   the model dtype, `out` in the model dtype or (out_f32) fp32 holding model-dtype values. */
static void norm_row(const void *x, long xo, const void *res, const void *w, void *out, void *res_out,
                     int H, float eps, int bf16, int out_f32, float *buf) {
    float ss = 0.0f;
    for (int i = 0; i < H; i++) {
        float s = ld(x, xo + i, bf16);
        if (res) s = rnd(s + ld(res, xo + i, bf16), bf16);
        buf[i] = s;
        ss += s * s;
    }
    float inv = 1.0f / sqrtf(ss / H + eps);
    for (int i = 0; i < H; i++) {
        if (res_out) st(res_out, xo + i, buf[i], bf16);
        float v = rnd(ld(w, i, bf16) * rnd(buf[i] * inv, bf16), bf16);
        if (out_f32) ((float *)out)[i] = v; else st(out, xo + i, v, bf16);
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void rms_norm(const void *x, const void *res, const void *w, void *out, void *res_out, int N, int H, float eps,
              int bf16) {
    #pragma omp parallel for schedule(static) if (N >= 16)
    for (int n = 0; n < N; n++) {
        float buf[8192];
        norm_row(x, (long)n * H, res, w, out, res_out, H, eps, bf16, 0, buf);
    }
}

/* Shapes: see nanoqwen_cpu.h. */
void qk_norm_rope_store(void *q, void *k, const void *v, const void *qw, const void *kw, float eps,
                        const float *cos_sin, const int32_t *positions, void *kc, void *vc, const int32_t *slots,
                        int N, int Hq, int Hkv, int D, long sq, long sk, long sv, int bf16) {
    #pragma omp parallel for schedule(static) if (N >= 16)
    for (int n = 0; n < N; n++) {
        const float *cs = cos_sin + (long)positions[n] * D;
        const int half = D / 2;
        float normed[512];
        for (int h = 0; h < Hq + Hkv; h++) {
            const int is_q = h < Hq;
            void *x = is_q ? q : k;
            const long base = is_q ? n * sq + (long)h * D : n * sk + (long)(h - Hq) * D;
            norm_row(x, base, 0, is_q ? qw : kw, normed, 0, D, eps, bf16, 1, normed + D);
            for (int i = 0; i < D; i++) {
                float c = rnd(cs[i % half], bf16), s = rnd(cs[half + i % half], bf16);
                float rot = i < half ? -normed[i + half] : normed[i - half];
                st(x, base + i, rnd(rnd(normed[i] * c, bf16) + rnd(rot * s, bf16), bf16), bf16);
            }
        }
        if (slots[n] < 0) continue;
        const long dst = (long)slots[n] * Hkv * D;
        const int size = bf16 ? 2 : 4;
        for (int h = 0; h < Hkv; h++) {
            memcpy((char *)kc + (dst + (long)h * D) * size, (const char *)k + (n * sk + (long)h * D) * size, (size_t)D * size);
            memcpy((char *)vc + (dst + (long)h * D) * size, (const char *)v + (n * sv + (long)h * D) * size, (size_t)D * size);
        }
    }
}
