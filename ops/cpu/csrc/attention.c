/* Paged decode attention, one query token per sequence: the why is in ops/cpu/attention.py. */
#include "nanoqwen_cpu.h"
#include "simd.h"
#include "pool.h"

static inline __m256 load8(const void *p, long i, int bf16) {
    return bf16 ? widen((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}

struct attention_args {
    const void *q, *kc, *vc;
    long sq;  /* q's token stride */
    const int32_t *tables, *ctx;
    void *out;
    int Hq, Hkv, D, bs, W, bf16;
    float scale;
};

/* One task: sequence b = task / Hkv, kv head h = task % Hkv; an online softmax in fp32. */
static void attend(const void *args, long task) {
    const struct attention_args *a = args;
    const void *q = a->q, *kc = a->kc, *vc = a->vc;
    const int32_t *tables = a->tables, *ctx = a->ctx;
    void *out = a->out;
    const int Hq = a->Hq, Hkv = a->Hkv, D = a->D, bs = a->bs, W = a->W, bf16 = a->bf16, G = Hq / Hkv;
    const float scale = a->scale;
    const int b = (int)(task / Hkv), h = (int)(task % Hkv);
    __m256 qv[16][32], acc[16][32];
    float m[16], l[16];
    const int nv = D / 8;
    for (int g = 0; g < G; g++) {
        long base = b * a->sq + (long)(h * G + g) * D;
        for (int i = 0; i < nv; i++) {
            qv[g][i] = _mm256_mul_ps(load8(q, base + 8 * i, bf16), _mm256_set1_ps(scale));
            acc[g][i] = _mm256_setzero_ps();
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int t = 0; t < ctx[b]; t++) {
        long row = (((long)tables[(long)b * W + t / bs] * bs + t % bs) * Hkv + h) * D;
        for (int g = 0; g < G; g++) {
            __m256 s = _mm256_setzero_ps();
            for (int i = 0; i < nv; i++) s = _mm256_fmadd_ps(qv[g][i], load8(kc, row + 8 * i, bf16), s);
            float score = hsum(s);
            if (score > m[g]) {  /* new running max: rescale what was accumulated */
                float c = expf(m[g] - score);
                l[g] *= c;
                for (int i = 0; i < nv; i++) acc[g][i] = _mm256_mul_ps(acc[g][i], _mm256_set1_ps(c));
                m[g] = score;
            }
            float p = expf(score - m[g]);
            l[g] += p;
            __m256 pv = _mm256_set1_ps(p);
            for (int i = 0; i < nv; i++) acc[g][i] = _mm256_fmadd_ps(pv, load8(vc, row + 8 * i, bf16), acc[g][i]);
        }
    }
    for (int g = 0; g < G; g++) {
        long base = ((long)b * Hq + h * G + g) * D;
        __m256 inv = _mm256_set1_ps(l[g] > 0.0f ? 1.0f / l[g] : 0.0f);
        for (int i = 0; i < nv; i++) {
            float tmp[8];
            _mm256_storeu_ps(tmp, _mm256_mul_ps(acc[g][i], inv));
            for (int j = 0; j < 8; j++) {
                if (bf16) ((uint16_t *)out)[base + 8 * i + j] = f32_to_bf16(tmp[j]);
                else ((float *)out)[base + 8 * i + j] = tmp[j];
            }
        }
    }
}

/* Below this many (token, kv head) pairs in the batch the whole call takes a few µs: one thread does it,
   as a helper that claimed a task and was then descheduled would cost far more. */
#define PARALLEL_MIN_PAIRS 4096

/* Shapes: see nanoqwen_cpu.h. One task per (sequence, kv head), on the thread pool (pool.h). */
void decode_attention(const void *q, long sq, const void *kc, const void *vc, const int32_t *tables,
                      const int32_t *ctx, void *out, int B, int Hq, int Hkv, int D, int bs, int W, float scale,
                      int bf16) {
    struct attention_args a = {q, kc, vc, sq, tables, ctx, out, Hq, Hkv, D, bs, W, bf16, scale};
    long pairs = 0;
    for (int b = 0; b < B; b++) pairs += (long)ctx[b] * Hkv;
    if (pairs < PARALLEL_MIN_PAIRS)
        for (long task = 0; task < (long)B * Hkv; task++) attend(&a, task);
    else pool_run(attend, &a, (long)B * Hkv);
}
