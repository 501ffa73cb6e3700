/* Paged decode attention, one query token per sequence: the why is in ops/cpu/attention.py. */
#include "nanoqwen_cpu.h"
#include "simd.h"
#include "pool.h"

struct attention_args {
    const void *q, *kc, *vc;
    long sq;  /* q's token stride */
    const int32_t *tables, *ctx;
    void *out;
    int Hq, Hkv, D, bs, W, bf16;
    float scale;
};

/* Keys per tile: the online softmax rescales once per tile, and exponentiates a tile's scores 8 at a time. */
#define TILE 32

/* One task: sequence b = task / Hkv, kv head h = task % Hkv, the GQA group's query heads sharing each K/V
   row; an online softmax over tiles of keys, in fp32. */
static void attend(const void *args, long task) {
    const struct attention_args *a = args;
    const int Hq = a->Hq, Hkv = a->Hkv, D = a->D, bs = a->bs, bf16 = a->bf16, G = Hq / Hkv, nv = D / 8;
    const long size = bf16 ? 2 : 4;
    const int b = (int)(task / Hkv), h = (int)(task % Hkv), len = a->ctx[b];
    const int32_t *table = a->tables + (long)b * a->W;
    __m256 qv[16][32], acc[16][32];
    float m[16], l[16], p[16][TILE];
    long rows[TILE];
    for (int g = 0; g < G; g++) {
        const long base = b * a->sq + (long)(h * G + g) * D;
        for (int i = 0; i < nv; i++) {
            qv[g][i] = _mm256_mul_ps(load8(a->q, base + 8 * i, bf16), _mm256_set1_ps(a->scale));
            acc[g][i] = _mm256_setzero_ps();
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int t0 = 0; t0 < len; t0 += TILE) {
        const int n = len - t0 < TILE ? len - t0 : TILE, n4 = (n + 3) & ~3, padded = (n + 7) & ~7;
        for (int t = 0; t < n4; t++) {  /* past n: the last key again, its scores unused */
            const int pos = t0 + (t < n ? t : n - 1);
            rows[t] = (((long)table[pos / bs] * bs + pos % bs) * Hkv + h) * D;
        }
        /* The tile's rows are a head's slice of each token (a few lines, Hkv * D apart), which the hardware
           prefetchers miss: the cache is cold after the linears streamed their weights. */
        for (int t = 0; t < n; t++)
            for (long byte = 0; byte < D * size; byte += 64) {
                _mm_prefetch((const char *)a->kc + rows[t] * size + byte, _MM_HINT_T0);
                _mm_prefetch((const char *)a->vc + rows[t] * size + byte, _MM_HINT_T0);
            }
        for (int t = 0; t < n; t += 4)  /* 4 keys at once: 4 FMA chains in flight instead of one */
            for (int g = 0; g < G; g++) {
                __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
                for (int i = 0; i < nv; i++) {
                    s0 = _mm256_fmadd_ps(qv[g][i], load8(a->kc, rows[t] + 8 * i, bf16), s0);
                    s1 = _mm256_fmadd_ps(qv[g][i], load8(a->kc, rows[t + 1] + 8 * i, bf16), s1);
                    s2 = _mm256_fmadd_ps(qv[g][i], load8(a->kc, rows[t + 2] + 8 * i, bf16), s2);
                    s3 = _mm256_fmadd_ps(qv[g][i], load8(a->kc, rows[t + 3] + 8 * i, bf16), s3);
                }
                p[g][t] = hsum(s0), p[g][t + 1] = hsum(s1), p[g][t + 2] = hsum(s2), p[g][t + 3] = hsum(s3);
            }
        for (int g = 0; g < G; g++) {
            float top = m[g];
            for (int t = 0; t < n; t++) top = p[g][t] > top ? p[g][t] : top;
            if (top > m[g]) {  /* a new running max: rescale what was accumulated */
                const float c = expf(m[g] - top);
                l[g] *= c;
                for (int i = 0; i < nv; i++) acc[g][i] = _mm256_mul_ps(acc[g][i], _mm256_set1_ps(c));
                m[g] = top;
            }
            for (int t = n; t < padded; t++) p[g][t] = top;
            const __m256 mv = _mm256_set1_ps(m[g]);
            for (int t = 0; t < padded; t += 8)
                _mm256_storeu_ps(p[g] + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(p[g] + t), mv)));
            for (int t = 0; t < n; t++) l[g] += p[g][t];
        }
        for (int t = 0; t < n; t++)
            for (int i = 0; i < nv; i++) {
                const __m256 v = load8(a->vc, rows[t] + 8 * i, bf16);
                for (int g = 0; g < G; g++) acc[g][i] = _mm256_fmadd_ps(_mm256_set1_ps(p[g][t]), v, acc[g][i]);
            }
    }
    for (int g = 0; g < G; g++) {
        const long base = ((long)b * Hq + h * G + g) * D;
        const __m256 inv = _mm256_set1_ps(l[g] > 0.0f ? 1.0f / l[g] : 0.0f);
        for (int i = 0; i < nv; i++) store8(a->out, base + 8 * i, round8(_mm256_mul_ps(acc[g][i], inv), bf16), bf16);
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
