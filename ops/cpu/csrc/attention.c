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

/* 16 values from index i as two fp32 vectors. bf16 without shuffles: v << 16 holds the even-indexed values
   and v & 0xffff0000 the odd-indexed ones (a widening by vpmovzxwd took the one shuffle port per 8 values).
   q, K and V all load this way, so their products pair up; store16 interleaves the output back. */
static inline void load16(const void *p, long i, int bf16, __m256 v[2]) {
    if (!bf16) {
        v[0] = _mm256_loadu_ps((const float *)p + i), v[1] = _mm256_loadu_ps((const float *)p + i + 8);
        return;
    }
    const __m256i u = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

/* Stores 16 values that load16's layout holds, rounded to the dtype, at p + i. */
static inline void store16(void *p, long i, const __m256 v[2], int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)p + i, v[0]), _mm256_storeu_ps((float *)p + i + 8, v[1]);
        return;
    }
    const __m256i even = _mm256_srli_epi32(_mm256_castps_si256(round8(v[0], 1)), 16);
    const __m256i odd = _mm256_castps_si256(round8(v[1], 1));
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm256_or_si256(even, odd));
}

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
        for (int i = 0; i < nv; i += 2) {
            load16(a->q, base + 8 * i, bf16, qv[g] + i);
            qv[g][i] = _mm256_mul_ps(qv[g][i], _mm256_set1_ps(a->scale));
            qv[g][i + 1] = _mm256_mul_ps(qv[g][i + 1], _mm256_set1_ps(a->scale));
            acc[g][i] = acc[g][i + 1] = _mm256_setzero_ps();
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
                __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                for (int i = 0; i < nv; i += 2)
                    for (int j = 0; j < 4; j++) {
                        __m256 k[2];
                        load16(a->kc, rows[t + j] + 8 * i, bf16, k);
                        s[j] = _mm256_fmadd_ps(qv[g][i + 1], k[1], _mm256_fmadd_ps(qv[g][i], k[0], s[j]));
                    }
                for (int j = 0; j < 4; j++) p[g][t + j] = hsum(s[j]);
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
            for (int i = 0; i < nv; i += 2) {
                __m256 v[2];
                load16(a->vc, rows[t] + 8 * i, bf16, v);
                for (int g = 0; g < G; g++) {
                    const __m256 pv = _mm256_set1_ps(p[g][t]);
                    acc[g][i] = _mm256_fmadd_ps(pv, v[0], acc[g][i]);
                    acc[g][i + 1] = _mm256_fmadd_ps(pv, v[1], acc[g][i + 1]);
                }
            }
    }
    for (int g = 0; g < G; g++) {
        const long base = ((long)b * Hq + h * G + g) * D;
        const __m256 inv = _mm256_set1_ps(l[g] > 0.0f ? 1.0f / l[g] : 0.0f);
        for (int i = 0; i < nv; i += 2) {
            const __m256 o[2] = {_mm256_mul_ps(acc[g][i], inv), _mm256_mul_ps(acc[g][i + 1], inv)};
            store16(a->out, base + 8 * i, o, bf16);
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
