/* Paged decode attention, one query token per sequence: the why is in ops/cpu/attention.py. */
#include "nanoqwen_cpu.h"
#include "gemv.h"
#include "pool.h"

#define MAX_G 16    /* query heads per kv head */
#define MAX_D 256   /* head dim */
/* Keys per tile: the online softmax rescales once per tile, and exponentiates a tile's scores 8 at a time. */
#define TILE 32

struct attention_args {
    const void *q, *kc, *vc;
    long sq;  /* q's token stride */
    const int32_t *tables, *ctx;
    void *out;
    int B, Hq, Hkv, D, bs, W, bf16;
    float scale;
    int avx512;  /* the AVX-512 loops (else AVX2) */
    int half;    /* acc's layout: bf16 values come as the even-indexed then the odd-indexed `half` of 2 * half */
    int split;   /* keys per part of a sequence */
    const int32_t *parts;  /* [B + 1]: the parts before sequence b; NULL: one part per sequence */
    float *partial;        /* per task of a sequence in several parts: m[G], l[G], acc[G][D] */
};

/* One task's online softmax over its keys, for the G query heads of its kv head. */
struct state {
    float m[MAX_G], l[MAX_G], p[MAX_G][TILE];
    long rows[2][TILE];  /* the current tile's and the next one's K/V element offsets */
    _Alignas(64) float q[MAX_G][MAX_D];  /* as the path's scores read it */
    _Alignas(64) float acc[MAX_G][MAX_D];  /* in the path's layout (`half`) */
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

/* Stores D values in the layout `half` (fp32: 8, natural order), times `mul`, at out + base. */
static void store_head(const struct attention_args *a, const float *acc, float mul, long base) {
    const __m256 f = _mm256_set1_ps(mul);
    for (int i = 0; i < a->D; i += 2 * a->half)
        for (int j = 0; j < a->half; j += 8) {
            const __m256 v[2] = {_mm256_mul_ps(_mm256_loadu_ps(acc + i + j), f),
                                 _mm256_mul_ps(_mm256_loadu_ps(acc + i + a->half + j), f)};
            store16(a->out, base + i + 2 * j, v, a->bf16);
        }
}

/* The element offsets of keys t0..t0 + TILE - 1 of the head h in sequence table; past end, the last key again
   (its scores unused). */
static void tile_rows(const struct attention_args *a, const int32_t *table, int h, int t0, int end, long *rows) {
    for (int t = 0; t < TILE; t++) {
        const int pos = t0 + t < end ? t0 + t : end - 1;
        rows[t] = (((long)table[pos / a->bs] * a->bs + pos % a->bs) * a->Hkv + h) * a->D;
    }
}

/* A tile's rows are a head's slice of each token (a few lines, Hkv * D apart), which the hardware prefetchers
   miss: the cache is cold after the linears streamed their weights. Each tile is prefetched while the one
   before it is computed. */
static void prefetch_rows(const struct attention_args *a, const long *rows, int n) {
    const long size = a->bf16 ? 2 : 4;
    for (int t = 0; t < n; t++)
        for (long byte = 0; byte < a->D * size; byte += 64) {
            _mm_prefetch((const char *)a->kc + rows[t] * size + byte, _MM_HINT_T0);
            _mm_prefetch((const char *)a->vc + rows[t] * size + byte, _MM_HINT_T0);
        }
}

/* Folds a tile's n scores p[g] into the running max and sum: p becomes exp(score - max), acc is rescaled
   where the max grew. */
static void softmax_tile(const struct attention_args *a, struct state *s, int n) {
    const int G = a->Hq / a->Hkv, padded = (n + 7) & ~7;
    for (int g = 0; g < G; g++) {
        float top = s->m[g];
        for (int t = 0; t < n; t++) top = s->p[g][t] > top ? s->p[g][t] : top;
        if (top > s->m[g]) {  /* a new running max: rescale what was accumulated */
            const float c = expf(s->m[g] - top);
            s->l[g] *= c;
            for (int i = 0; i < a->D; i += 8)
                _mm256_store_ps(s->acc[g] + i, _mm256_mul_ps(_mm256_load_ps(s->acc[g] + i), _mm256_set1_ps(c)));
            s->m[g] = top;
        }
        for (int t = n; t < padded; t++) s->p[g][t] = top;
        const __m256 mv = _mm256_set1_ps(s->m[g]);
        for (int t = 0; t < padded; t += 8)
            _mm256_storeu_ps(s->p[g] + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(s->p[g] + t), mv)));
        for (int t = 0; t < n; t++) s->l[g] += s->p[g][t];
    }
}

/* ---- AVX2: q scaled in fp32, in load16's layout; 4 keys scored at once (4 FMA chains in flight) ---- */

static void prepare_avx2(const struct attention_args *a, struct state *s, long base) {
    for (int g = 0; g < a->Hq / a->Hkv; g++)
        for (int i = 0; i < a->D; i += 16) {
            __m256 v[2];
            load16(a->q, base + (long)g * a->D + i, a->bf16, v);
            _mm256_store_ps(s->q[g] + i, _mm256_mul_ps(v[0], _mm256_set1_ps(a->scale)));
            _mm256_store_ps(s->q[g] + i + 8, _mm256_mul_ps(v[1], _mm256_set1_ps(a->scale)));
        }
}

static void scores_avx2(const struct attention_args *a, struct state *s, const long *rows, int n) {
    for (int t = 0; t < n; t += 4)
        for (int g = 0; g < a->Hq / a->Hkv; g++) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int i = 0; i < a->D; i += 16) {
                const __m256 q0 = _mm256_load_ps(s->q[g] + i), q1 = _mm256_load_ps(s->q[g] + i + 8);
                for (int j = 0; j < 4; j++) {
                    __m256 k[2];
                    load16(a->kc, rows[t + j] + i, a->bf16, k);
                    acc[j] = _mm256_fmadd_ps(q1, k[1], _mm256_fmadd_ps(q0, k[0], acc[j]));
                }
            }
            for (int j = 0; j < 4; j++) s->p[g][t + j] = hsum(acc[j]);
        }
}

/* acc[g] += p[g][t] * V[t], 16 dims of up to 4 heads at a time: their accumulators stay in registers. */
static void values_avx2(const struct attention_args *a, struct state *s, const long *rows, int n) {
    const int G = a->Hq / a->Hkv;
    for (int i = 0; i < a->D; i += 16)
        for (int g0 = 0; g0 < G; g0 += 4) {
            const int gn = G - g0 < 4 ? G - g0 : 4;
            __m256 acc[4][2];
            for (int g = 0; g < gn; g++)
                acc[g][0] = _mm256_load_ps(s->acc[g0 + g] + i), acc[g][1] = _mm256_load_ps(s->acc[g0 + g] + i + 8);
            for (int t = 0; t < n; t++) {
                __m256 v[2];
                load16(a->vc, rows[t] + i, a->bf16, v);
                for (int g = 0; g < gn; g++) {
                    const __m256 p = _mm256_set1_ps(s->p[g0 + g][t]);
                    acc[g][0] = _mm256_fmadd_ps(p, v[0], acc[g][0]);
                    acc[g][1] = _mm256_fmadd_ps(p, v[1], acc[g][1]);
                }
            }
            for (int g = 0; g < gn; g++)
                _mm256_store_ps(s->acc[g0 + g] + i, acc[g][0]), _mm256_store_ps(s->acc[g0 + g] + i + 8, acc[g][1]);
        }
}

/* ---- AVX-512: bf16 q . k by vdpbf16ps (products of bf16 are exact in fp32; the score is scaled after), a
   32-dim chunk of V as two vectors (even/odd for bf16, as load16 in 16s), D % 32 == 0 ---- */

AVX512_BEGIN

static void prepare_avx512(const struct attention_args *a, struct state *s, long base) {
    const int G = a->Hq / a->Hkv;
    if (a->bf16) {  /* bf16, at the start of each row */
        for (int g = 0; g < G; g++) memcpy(s->q[g], (const uint16_t *)a->q + base + (long)g * a->D, (size_t)a->D * 2);
        return;
    }
    for (int g = 0; g < G; g++)
        for (int i = 0; i < a->D; i += 16)
            _mm512_store_ps(s->q[g] + i, _mm512_mul_ps(_mm512_loadu_ps((const float *)a->q + base + (long)g * a->D + i),
                                                       _mm512_set1_ps(a->scale)));
}

/* The sums of 16 vectors' lanes, in one vector: pairs of vectors are interleaved and added, halving the count
   each time (45 instructions, where 16 horizontal sums take about 130). */
static inline __m512 reduce16(const __m512 v[16]) {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: v[2i] and v[2i+1]'s pairs of sums, interleaved */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: the lane's sums of v[4i] .. v[4i+3] */
        const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(w[2 * i]), _mm512_castps_pd(w[2 * i + 1]));
        const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(w[2 * i]), _mm512_castps_pd(w[2 * i + 1]));
        x[i] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    for (int i = 0; i < 2; i++)  /* the 128-bit lanes added in pairs */
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* q . k of 16 keys (rows); bf16 is a constant at each call, so each dtype gets its own loop. */
static inline __attribute__((always_inline)) __m512 dot16(const void *q, const void *kc, const long *rows, int D,
                                                          int bf16) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < D; i += bf16 ? 32 : 16) {
        if (bf16) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512((const uint16_t *)q + i);
            for (int j = 0; j < 16; j++)
                acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_loadu_si512((const uint16_t *)kc + rows[j] + i));
        } else {
            const __m512 qv = _mm512_load_ps((const float *)q + i);
            for (int j = 0; j < 16; j++)
                acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps((const float *)kc + rows[j] + i), acc[j]);
        }
    }
    return reduce16(acc);
}

static void scores_avx512(const struct attention_args *a, struct state *s, const long *rows, int n) {
    for (int g = 0; g < a->Hq / a->Hkv; g++)
        for (int t = 0; t < n; t += 16) {
            const __m512 sc = a->bf16 ? _mm512_mul_ps(dot16(s->q[g], a->kc, rows + t, a->D, 1), _mm512_set1_ps(a->scale))
                                      : dot16(s->q[g], a->kc, rows + t, a->D, 0);
            _mm512_storeu_ps(s->p[g] + t, sc);
        }
}

static inline __attribute__((always_inline)) void load32(const void *p, long i, int bf16, __m512 v[2]) {
    if (!bf16) {
        v[0] = _mm512_loadu_ps((const float *)p + i), v[1] = _mm512_loadu_ps((const float *)p + i + 16);
        return;
    }
    const __m512i u = _mm512_loadu_si512((const uint16_t *)p + i);
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    v[1] = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

/* As values_avx2, 32 dims at a time. */
static void values_avx512(const struct attention_args *a, struct state *s, const long *rows, int n) {
    const int G = a->Hq / a->Hkv;
    for (int i = 0; i < a->D; i += 32)
        for (int g0 = 0; g0 < G; g0 += 4) {
            const int gn = G - g0 < 4 ? G - g0 : 4;
            __m512 acc[4][2];
            for (int g = 0; g < gn; g++)
                acc[g][0] = _mm512_load_ps(s->acc[g0 + g] + i), acc[g][1] = _mm512_load_ps(s->acc[g0 + g] + i + 16);
            for (int t = 0; t < n; t++) {
                __m512 v[2];
                if (a->bf16) load32(a->vc, rows[t] + i, 1, v);
                else load32(a->vc, rows[t] + i, 0, v);
                for (int g = 0; g < gn; g++) {
                    const __m512 p = _mm512_set1_ps(s->p[g0 + g][t]);
                    acc[g][0] = _mm512_fmadd_ps(p, v[0], acc[g][0]);
                    acc[g][1] = _mm512_fmadd_ps(p, v[1], acc[g][1]);
                }
            }
            for (int g = 0; g < gn; g++)
                _mm512_store_ps(s->acc[g0 + g] + i, acc[g][0]), _mm512_store_ps(s->acc[g0 + g] + i + 16, acc[g][1]);
        }
}

AVX512_END

/* One task: part (task / Hkv) of a sequence's keys, kv head h = task % Hkv, the GQA group's query heads
   sharing each K/V row; an online softmax over tiles of keys, in fp32. A sequence in one part is written out;
   a part of several leaves its max, sum and unnormalised output in a->partial, for combine. */
static void attend(const void *args, long task) {
    const struct attention_args *a = args;
    const int G = a->Hq / a->Hkv, part = (int)(task / a->Hkv), h = (int)(task % a->Hkv);
    int b = part, parts = 1, begin = 0;
    if (a->parts) {
        int lo = 0, hi = part < a->B - 1 ? part : a->B - 1;  /* the last b with parts[b] <= part */
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (a->parts[mid] <= part) lo = mid;
            else hi = mid - 1;
        }
        b = lo, parts = a->parts[b + 1] - a->parts[b], begin = (part - a->parts[b]) * a->split;
    }
    const int end = parts > 1 && begin + a->split < a->ctx[b] ? begin + a->split : a->ctx[b];
    const int32_t *table = a->tables + (long)b * a->W;
    void (*scores)(const struct attention_args *, struct state *, const long *, int) =
        a->avx512 ? scores_avx512 : scores_avx2;
    void (*values)(const struct attention_args *, struct state *, const long *, int) =
        a->avx512 ? values_avx512 : values_avx2;
    struct state s;
    for (int g = 0; g < G; g++) {
        s.m[g] = -INFINITY, s.l[g] = 0.0f;
        memset(s.acc[g], 0, (size_t)a->D * sizeof(float));
    }
    (a->avx512 ? prepare_avx512 : prepare_avx2)(a, &s, b * a->sq + (long)h * G * a->D);
    if (begin < end) {
        tile_rows(a, table, h, begin, end, s.rows[0]);
        prefetch_rows(a, s.rows[0], end - begin < TILE ? end - begin : TILE);
    }
    for (int t0 = begin, cur = 0; t0 < end; t0 += TILE, cur ^= 1) {
        const int n = end - t0 < TILE ? end - t0 : TILE;
        if (t0 + TILE < end) {
            tile_rows(a, table, h, t0 + TILE, end, s.rows[cur ^ 1]);
            prefetch_rows(a, s.rows[cur ^ 1], end - t0 - TILE < TILE ? end - t0 - TILE : TILE);
        }
        scores(a, &s, s.rows[cur], n);
        softmax_tile(a, &s, n);
        values(a, &s, s.rows[cur], n);
    }
    if (parts == 1) {
        for (int g = 0; g < G; g++)
            store_head(a, s.acc[g], s.l[g] > 0.0f ? 1.0f / s.l[g] : 0.0f, ((long)b * a->Hq + h * G + g) * a->D);
        return;
    }
    float *out = a->partial + task * G * (a->D + 2);
    memcpy(out, s.m, G * sizeof(float));
    memcpy(out + G, s.l, G * sizeof(float));
    for (int g = 0; g < G; g++) memcpy(out + 2 * G + g * a->D, s.acc[g], (size_t)a->D * sizeof(float));
}

/* The outputs of the sequences in several parts: each part's sum and output weighted by exp(its max - the
   overall max). */
static void combine(const struct attention_args *a, int B) {
    const int G = a->Hq / a->Hkv, D = a->D, stride = G * (D + 2);
    _Alignas(64) float acc[MAX_D];
    for (int b = 0; b < B; b++) {
        const int first = a->parts[b], parts = a->parts[b + 1] - first;
        for (int h = 0; h < a->Hkv && parts > 1; h++)
            for (int g = 0; g < G; g++) {
                float top = -INFINITY, sum = 0.0f;
                for (int p = 0; p < parts; p++) {
                    const float m = a->partial[((long)(first + p) * a->Hkv + h) * stride + g];
                    top = m > top ? m : top;
                }
                memset(acc, 0, (size_t)D * sizeof(float));
                for (int p = 0; p < parts; p++) {
                    const float *part = a->partial + ((long)(first + p) * a->Hkv + h) * stride;
                    const float w = expf(part[g] - top);
                    sum += w * part[G + g];
                    for (int i = 0; i < D; i += 8)
                        _mm256_store_ps(acc + i, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_loadu_ps(part + 2 * G + g * D + i),
                                                                  _mm256_load_ps(acc + i)));
                }
                store_head(a, acc, sum > 0.0f ? 1.0f / sum : 0.0f, ((long)b * a->Hq + h * G + g) * D);
            }
    }
}

/* Below this many (token, kv head) pairs in the batch the whole call takes a few µs: one thread does it,
   as a helper that claimed a task and was then descheduled would cost far more. */
#define PARALLEL_MIN_PAIRS 4096
/* Flash-decoding: the keys of the batch are cut into about this many parts per thread and kv head, so that
   batch 1's few (sequence, kv head) tasks and a long sequence next to short ones still keep every thread busy,
   but no part shorter than MIN_SPLIT keys (each costs a q load and a combine). */
#define PARTS_PER_THREAD 4
#define MIN_SPLIT 128

/* Shapes: see nanoqwen_cpu.h. One task per (part of a sequence, kv head), on the thread pool (pool.h). */
void decode_attention(const void *q, long sq, const void *kc, const void *vc, const int32_t *tables,
                      const int32_t *ctx, void *out, int B, int Hq, int Hkv, int D, int bs, int W, float scale,
                      int bf16) {
    const int avx512 = D % 32 == 0 && (bf16 ? has_avx512_bf16() : has_avx512());
    struct attention_args a = {q, kc, vc, sq, tables, ctx, out, B, Hq, Hkv, D, bs, W, bf16, scale, avx512,
                               bf16 && avx512 ? 16 : 8, 0, 0, 0};
    long keys = 0;
    for (int b = 0; b < B; b++) keys += ctx[b];
    const int threads = omp_get_max_threads();
    if (keys * Hkv < PARALLEL_MIN_PAIRS || threads < 2) {
        for (long task = 0; task < (long)B * Hkv; task++) attend(&a, task);
        return;
    }
    /* parts <= keys / split + B <= target + B: the scratch's size depends on the shapes alone */
    const long target = (long)PARTS_PER_THREAD * threads, per = (keys + target - 1) / target;
    a.split = per < MIN_SPLIT ? MIN_SPLIT : (int)((per + TILE - 1) / TILE * TILE);
    const size_t floats = (size_t)(target + B) * Hq * (D + 2);
    float *scratch = thread_scratch(floats * sizeof(float) + (size_t)(B + 1) * sizeof(int32_t));
    if (!scratch) {
        pool_run(attend, &a, (long)B * Hkv);
        return;
    }
    int32_t *parts = (int32_t *)(scratch + floats);
    parts[0] = 0;
    for (int b = 0; b < B; b++) parts[b + 1] = parts[b] + (ctx[b] > a.split ? (ctx[b] - 1) / a.split + 1 : 1);
    a.parts = parts, a.partial = scratch;
    pool_run(attend, &a, (long)parts[B] * Hkv);
    combine(&a, B);
}
