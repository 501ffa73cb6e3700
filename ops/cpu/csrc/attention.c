/* Paged decode attention, one query token per sequence: the why is in ops/cpu/attention.py. */
#include <omp.h>

#include "nanoqwen_cpu.h"
#include "gemv.h"
#include "pool.h"
#include "scratch.h"

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
    const int32_t *parts;  /* [B + 1]: the parts before sequence b */
    float *state;          /* per part: `region` floats (see struct group) */
    long region;
};

/* The G query heads of one kv head, in its task's region of a->state: q (as the path's scores read it) and acc
   (in the layout `half`), G rows of D each; the running max m and sum l; p, the current tile's scores then
   weights. The region holds q, acc, m, l for all Hq heads, in that order. */
struct group {
    float *q, *acc, *m, *l;
    float (*p)[TILE];
    long off;  /* the kv head's offset in a token's K/V row */
};

/* 16 values from index i as two fp32 vectors. bf16 without shuffles: v << 16 holds the even-indexed values
   and v & 0xffff0000 the odd-indexed ones (a widening by vpmovzxwd took the one shuffle port per 8 values).
   q, K and V all load this way, so their products pair up; store16 interleaves the output back. */
INLINE void load16(const void *p, long i, int bf16, __m256 v[2]) {
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

/* The element offsets of tokens t0..t0 + TILE - 1's K/V rows in sequence table; past end, the last token
   again (its scores unused). */
static void tile_rows(const struct attention_args *a, const int32_t *table, int t0, int end, long *rows) {
    for (int t = 0; t < TILE; t++) {
        const int pos = t0 + t < end ? t0 + t : end - 1;
        rows[t] = ((long)table[pos / a->bs] * a->bs + pos % a->bs) * a->Hkv * a->D;
    }
}

/* The next tile is prefetched while one is computed: the cache is cold after the linears streamed their weights, and
   a block's tokens need not be next to each other. */
static void prefetch_rows(const struct attention_args *a, const long *rows, int n, int h0, int h1) {
    const long size = a->bf16 ? 2 : 4, first = (long)h0 * a->D * size, last = (long)h1 * a->D * size;
    for (int t = 0; t < n; t++)
        for (long byte = first; byte < last; byte += 64) {
            _mm_prefetch((const char *)a->kc + rows[t] * size + byte, _MM_HINT_T0);
            _mm_prefetch((const char *)a->vc + rows[t] * size + byte, _MM_HINT_T0);
        }
}

/* A tile's K and V rows read in address order, a load a cache line, before it is computed. With the prefetches alone
   a b1 step's attention read its cold cache at ~7.5 GB/s (~16 with these loads), as if each prefetch waited for its
   own line (likely: they do not train the L2's streamer, demand loads in order do): at 33 keys 26-28 -> 17-19 µs a
   layer, at 513 keys 334-405 -> 222-263 (profiles/b1_between.c, 2-core Zen 3; hot, the loads cost ~1.5 µs at 33
   keys). */
static void load_rows(const struct attention_args *a, const long *rows, int n, int h0, int h1) {
    /* heads h0 .. h1 - 1's bytes: multiples of 32 (D % 16 == 0) */
    const long size = a->bf16 ? 2 : 4, first = (long)h0 * a->D * size, last = (long)h1 * a->D * size;
    __m256i any = _mm256_setzero_si256();
    for (int t = 0; t < n; t++)
        for (long byte = first; byte < last; byte += 64) {
            const char *k = (const char *)a->kc + rows[t] * size + byte;
            const char *v = (const char *)a->vc + rows[t] * size + byte;
            any = _mm256_or_si256(any, _mm256_or_si256(_mm256_loadu_si256((const __m256i *)k),
                                                       _mm256_loadu_si256((const __m256i *)v)));
        }
    __asm__ volatile("" : : "x"(any));  /* the loads are kept, their values unused */
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

/* Folds a tile's n scores p[g] into the running max and sum: p becomes exp(score - max), acc is rescaled
   where the max grew. */
static void softmax_tile(const struct attention_args *a, const struct group *s, int n) {
    const int G = a->Hq / a->Hkv, D = a->D, padded = (n + 7) & ~7;
    for (int g = 0; g < G; g++) {
        float *p = s->p[g];
        for (int t = n; t < padded; t++) p[t] = -INFINITY;  /* their weights: exp8's smallest, ~1e-38 */
        __m256 top8 = _mm256_set1_ps(s->m[g]);
        for (int t = 0; t < padded; t += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(p + t));
        const float top = hmax(top8);
        if (!(top > -INFINITY)) {  /* no score above -inf yet (or a NaN): the tile weighs 0, not exp(-inf - -inf) */
            memset(p, 0, (size_t)padded * sizeof(float));
            continue;
        }
        if (top > s->m[g]) {  /* a new running max: rescale what was accumulated */
            const float c = expf(s->m[g] - top);
            s->l[g] *= c;
            for (int i = 0; i < D; i += 8)
                _mm256_store_ps(s->acc + g * D + i, _mm256_mul_ps(_mm256_load_ps(s->acc + g * D + i), _mm256_set1_ps(c)));
            s->m[g] = top;
        }
        const __m256 mv = _mm256_set1_ps(top);
        __m256 sum = _mm256_setzero_ps();
        for (int t = 0; t < padded; t += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + t), mv));
            _mm256_storeu_ps(p + t, e);
            sum = _mm256_add_ps(sum, e);
        }
        s->l[g] += hsum(sum);
    }
}

/* ---- AVX2: q scaled in fp32, in load16's layout; 4 keys scored at once (4 FMA chains in flight) ---- */

/* n values of q from q + base (whole heads of a token) into the state's q. */
static void prepare_avx2(const struct attention_args *a, float *q, long base, long n) {
    for (long i = 0; i < n; i += 16) {
        __m256 v[2];
        load16(a->q, base + i, a->bf16, v);
        _mm256_store_ps(q + i, _mm256_mul_ps(v[0], _mm256_set1_ps(a->scale)));
        _mm256_store_ps(q + i + 8, _mm256_mul_ps(v[1], _mm256_set1_ps(a->scale)));
    }
}

static void scores_avx2(const struct attention_args *a, const struct group *s, const long *rows, int n) {
    for (int t = 0; t < n; t += 4)
        for (int g = 0; g < a->Hq / a->Hkv; g++) {
            const float *q = s->q + g * a->D;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int i = 0; i < a->D; i += 16) {
                const __m256 q0 = _mm256_load_ps(q + i), q1 = _mm256_load_ps(q + i + 8);
                for (int j = 0; j < 4; j++) {
                    __m256 k[2];
                    load16(a->kc, rows[t + j] + s->off + i, a->bf16, k);
                    acc[j] = _mm256_fmadd_ps(q1, k[1], _mm256_fmadd_ps(q0, k[0], acc[j]));
                }
            }
            for (int j = 0; j < 4; j++) s->p[g][t + j] = hsum(acc[j]);
        }
}

/* acc[g] += p[g][t] * V[t] over n keys, for heads g0 .. g0 + GN - 1 and dims i .. i + 2 * W - 1, V loaded by
   LOAD (two vectors of W floats). GN and bf16 are constants at each use, so the accumulators stay in registers. */
#define VALUES_BODY(VEC, W, LOAD, BROADCAST, LOADA, STOREA, FMA) \
    const int D = a->D; \
    float *out = s->acc + g0 * D + i; \
    VEC acc[4][2]; \
    for (int g = 0; g < GN; g++) acc[g][0] = LOADA(out + g * D), acc[g][1] = LOADA(out + g * D + W); \
    for (int t = 0; t < n; t++) { \
        VEC v[2]; \
        LOAD(a->vc, rows[t] + s->off + i, bf16, v); \
        for (int g = 0; g < GN; g++) { \
            const VEC p = BROADCAST(s->p[g0 + g][t]); \
            acc[g][0] = FMA(p, v[0], acc[g][0]); \
            acc[g][1] = FMA(p, v[1], acc[g][1]); \
        } \
    } \
    for (int g = 0; g < GN; g++) STOREA(out + g * D, acc[g][0]), STOREA(out + g * D + W, acc[g][1]);

/* Calls FN(..., GN, bf16) with GN = min(4, G - g0) and bf16 as constants. */
#define VALUES_DISPATCH(FN) \
    for (int g0 = 0; g0 < G; g0 += 4) { \
        const int gn = G - g0 < 4 ? G - g0 : 4; \
        if (a->bf16) switch (gn) { \
            case 1: FN(a, s, rows, n, i, g0, 1, 1); break; case 2: FN(a, s, rows, n, i, g0, 2, 1); break; \
            case 3: FN(a, s, rows, n, i, g0, 3, 1); break; default: FN(a, s, rows, n, i, g0, 4, 1); \
        } \
        else switch (gn) { \
            case 1: FN(a, s, rows, n, i, g0, 1, 0); break; case 2: FN(a, s, rows, n, i, g0, 2, 0); break; \
            case 3: FN(a, s, rows, n, i, g0, 3, 0); break; default: FN(a, s, rows, n, i, g0, 4, 0); \
        } \
    }

INLINE void values16(const struct attention_args *a, const struct group *s, const long *rows, int n, int i, int g0,
                     int GN, int bf16) {
    VALUES_BODY(__m256, 8, load16, _mm256_set1_ps, _mm256_load_ps, _mm256_store_ps, _mm256_fmadd_ps)
}

static void values_avx2(const struct attention_args *a, const struct group *s, const long *rows, int n) {
    const int G = a->Hq / a->Hkv;
    for (int i = 0; i < a->D; i += 16) VALUES_DISPATCH(values16)
}

/* ---- AVX-512: bf16 q . k by vdpbf16ps (products of bf16 are exact in fp32; the score is scaled after), a
   32-dim chunk of V as two vectors (even/odd for bf16, as load16 in 16s), D % 32 == 0 ---- */

AVX512_BEGIN

/* As prepare_avx2: bf16 q as it is (two values per float), fp32 q scaled. */
static void prepare_avx512(const struct attention_args *a, float *q, long base, long n) {
    if (a->bf16) {
        memcpy(q, (const uint16_t *)a->q + base, (size_t)n * 2);
        return;
    }
    for (long i = 0; i < n; i += 16)
        _mm512_store_ps(q + i, _mm512_mul_ps(_mm512_loadu_ps((const float *)a->q + base + i), _mm512_set1_ps(a->scale)));
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

/* q . k of 16 keys (rows, plus off); bf16 is a constant at each call, so each dtype gets its own loop. */
static inline __attribute__((always_inline)) __m512 dot16(const void *q, const void *kc, const long *rows, long off,
                                                          int D, int bf16) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (int i = 0; i < D; i += bf16 ? 32 : 16) {
        if (bf16) {
            const __m512bh qv = (__m512bh)_mm512_loadu_si512((const uint16_t *)q + i);
            for (int j = 0; j < 16; j++)
                acc[j] = _mm512_dpbf16_ps(acc[j], qv,
                                          (__m512bh)_mm512_loadu_si512((const uint16_t *)kc + rows[j] + off + i));
        } else {
            const __m512 qv = _mm512_load_ps((const float *)q + i);
            for (int j = 0; j < 16; j++)
                acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps((const float *)kc + rows[j] + off + i), acc[j]);
        }
    }
    return reduce16(acc);
}

static void scores_avx512(const struct attention_args *a, const struct group *s, const long *rows, int n) {
    for (int g = 0; g < a->Hq / a->Hkv; g++)
        for (int t = 0; t < n; t += 16) {
            const __m512 sc = a->bf16 ? _mm512_mul_ps(dot16((const uint16_t *)s->q + g * a->D, a->kc, rows + t, s->off,
                                                            a->D, 1), _mm512_set1_ps(a->scale))
                                      : dot16(s->q + g * a->D, a->kc, rows + t, s->off, a->D, 0);
            _mm512_storeu_ps(s->p[g] + t, sc);
        }
}

INLINE void load32(const void *p, long i, int bf16, __m512 v[2]) {
    if (!bf16) {
        v[0] = _mm512_loadu_ps((const float *)p + i), v[1] = _mm512_loadu_ps((const float *)p + i + 16);
        return;
    }
    const __m512i u = _mm512_loadu_si512((const uint16_t *)p + i);
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    v[1] = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

INLINE void values32(const struct attention_args *a, const struct group *s, const long *rows, int n, int i, int g0,
                     int GN, int bf16) {
    VALUES_BODY(__m512, 16, load32, _mm512_set1_ps, _mm512_load_ps, _mm512_store_ps, _mm512_fmadd_ps)
}

static void values_avx512(const struct attention_args *a, const struct group *s, const long *rows, int n) {
    const int G = a->Hq / a->Hkv;
    for (int i = 0; i < a->D; i += 32) VALUES_DISPATCH(values32)
}

AVX512_END

/* Keys begin .. end - 1 of sequence b for kv heads h0 .. h1 - 1, each kv head's GQA group sharing its K/V rows:
   an online softmax over tiles of keys, in fp32, its state at `state` (q, acc, m, l of those kv heads' query
   heads, as a region of a->state holds all of them); written out when `store`. Reading every head of a token at
   once reads the cache in runs of whole blocks, which the prefetchers follow. */
static void attend_heads(const struct attention_args *a, int b, int begin, int end, int h0, int h1, float *state,
                         int store) {
    const int G = a->Hq / a->Hkv, D = a->D, heads = (h1 - h0) * G;
    const int32_t *table = a->tables + (long)b * a->W;
    void (*scores)(const struct attention_args *, const struct group *, const long *, int) =
        a->avx512 ? scores_avx512 : scores_avx2;
    void (*values)(const struct attention_args *, const struct group *, const long *, int) =
        a->avx512 ? values_avx512 : values_avx2;
    float *q = state, *acc = q + (long)heads * D, *m = acc + (long)heads * D, *l = m + heads;
    float p[MAX_G][TILE];
    long rows[2][TILE];  /* the current tile's and the next one's */
    (a->avx512 ? prepare_avx512 : prepare_avx2)(a, q, b * a->sq + (long)h0 * G * D, (long)heads * D);
    memset(acc, 0, (size_t)heads * D * sizeof(float));
    for (int i = 0; i < heads; i++) m[i] = -INFINITY, l[i] = 0.0f;
    if (begin < end) tile_rows(a, table, begin, end, rows[0]);
    for (int t0 = begin, cur = 0; t0 < end; t0 += TILE, cur ^= 1) {
        const int n = end - t0 < TILE ? end - t0 : TILE;
        load_rows(a, rows[cur], n, h0, h1);
        if (t0 + TILE < end) {
            tile_rows(a, table, t0 + TILE, end, rows[cur ^ 1]);
            prefetch_rows(a, rows[cur ^ 1], end - t0 - TILE < TILE ? end - t0 - TILE : TILE, h0, h1);
        }
        for (int h = h0; h < h1; h++) {
            /* bf16 q on AVX-512 takes half the floats */
            const long first = (long)(h - h0) * G, qoff = first * D / (a->avx512 && a->bf16 ? 2 : 1);
            const struct group s = {q + qoff, acc + first * D, m + first, l + first, p, (long)h * D};
            scores(a, &s, rows[cur], n);
            softmax_tile(a, &s, n);
            values(a, &s, rows[cur], n);
        }
    }
    if (store)
        for (int i = 0; i < heads; i++)
            store_head(a, acc + (long)i * D, l[i] > 0.0f ? 1.0f / l[i] : 0.0f, ((long)b * a->Hq + h0 * G + i) * D);
}

/* One task: part `task` of a sequence's keys, for all its heads, its state in the part's region of a->state. A
   sequence in one part is written out; the parts of one in several are combined after (combine). */
static void attend(const void *args, long task) {
    const struct attention_args *a = args;
    const int part = (int)task;
    int lo = 0, hi = part < a->B - 1 ? part : a->B - 1;  /* b: the last sequence with parts[b] <= part */
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (a->parts[mid] <= part) lo = mid;
        else hi = mid - 1;
    }
    const int b = lo, parts = a->parts[b + 1] - a->parts[b], begin = (part - a->parts[b]) * a->split;
    const int end = parts > 1 && begin + a->split < a->ctx[b] ? begin + a->split : a->ctx[b];
    attend_heads(a, b, begin, end, 0, a->Hkv, a->state + task * a->region, parts == 1);
}

/* Without a scratch (its allocation failed): each sequence whole on this thread, one kv head at a time, whose
   state (bounded by MAX_G and MAX_D, where all heads' is not) fits on the stack. */
static __attribute__((noinline)) void attend_unstaged(const struct attention_args *a) {
    _Alignas(64) float state[MAX_G * (2 * MAX_D + 2)];
    for (int b = 0; b < a->B; b++)
        for (int h = 0; h < a->Hkv; h++) attend_heads(a, b, 0, a->ctx[b], h, h + 1, state, 1);
}

/* The outputs of the sequences in several parts: each part's sum and output weighted by exp(its max - the
   overall max). */
static void combine(const struct attention_args *a) {
    const int Hq = a->Hq, D = a->D;
    _Alignas(64) float out[MAX_D];
    for (int b = 0; b < a->B; b++) {
        const int first = a->parts[b], parts = a->parts[b + 1] - first;
        for (int i = 0; i < Hq && parts > 1; i++) {
            float top = -INFINITY, sum = 0.0f;
            for (int p = 0; p < parts; p++) {
                const float m = a->state[(first + p) * a->region + 2L * Hq * D + i];
                top = m > top ? m : top;
            }
            memset(out, 0, (size_t)D * sizeof(float));
            for (int p = 0; p < parts && top > -INFINITY; p++) {  /* all -inf: no key weighs anything, out is 0 */
                const float *acc = a->state + (first + p) * a->region + (long)Hq * D, *m = acc + (long)Hq * D;
                const float w = expf(m[i] - top);
                sum += w * m[Hq + i];
                for (int j = 0; j < D; j += 8)
                    _mm256_store_ps(out + j, _mm256_fmadd_ps(_mm256_set1_ps(w), _mm256_load_ps(acc + (long)i * D + j),
                                                             _mm256_load_ps(out + j)));
            }
            store_head(a, out, sum > 0.0f ? 1.0f / sum : 0.0f, ((long)b * Hq + i) * D);
        }
    }
}

/* Below this many (token, kv head) pairs in the batch the whole call takes at most ~46 µs: one thread does it,
   as a helper that claimed a task and was then descheduled would cost far more. 512, not 4096: a pair read cold
   costs ~90 ns on a 2-core Zen 3, so batch 8 at 48 keys (3072 pairs) took 350-400 µs a layer on one thread and
   275-300 on two (profiles/bench_decode_attention.py, load 3.7-4.4). */
#define PARALLEL_MIN_PAIRS 512
/* Flash-decoding: the keys of the batch are cut into about this many parts per thread, so that batch 1 and a
   long sequence next to short ones still keep every thread busy, but no part shorter than MIN_SPLIT keys
   (each costs a q load and a combine). */
#define PARTS_PER_THREAD 4
#define MIN_SPLIT 128

static int takes_avx512(int D, int bf16) { return D % 32 == 0 && (bf16 ? has_avx512_bf16() : has_avx512()); }

void decode_attention_avx512(int D, int bf16, int *avx512) { *avx512 = takes_avx512(D, bf16); }

/* Shapes: see nanoqwen_cpu.h. One task per part of a sequence, on the thread pool (pool.h). */
void decode_attention(const void *q, long sq, const void *kc, const void *vc, const int32_t *tables,
                      const int32_t *ctx, void *out, int B, int Hq, int Hkv, int D, int bs, int W, float scale,
                      int bf16) {
    const int avx512 = takes_avx512(D, bf16);
    /* a part's region: q, acc, m, l of Hq heads, whole cache lines */
    const long region = ((long)Hq * (2 * D + 2) + 15) / 16 * 16;
    struct attention_args a = {q, kc, vc, sq, tables, ctx, out, B, Hq, Hkv, D, bs, W, bf16, scale, avx512,
                               bf16 && avx512 ? 16 : 8, INT32_MAX, 0, 0, region};
    long keys = 0;
    for (int b = 0; b < B; b++) keys += ctx[b];
    const int threads = omp_get_max_threads(), split = threads > 1 && keys * Hkv >= PARALLEL_MIN_PAIRS;
    /* parts <= keys / a.split + B <= target + B: the scratch's size depends on the shapes (and threads) alone, so
       a decode step allocates nothing once its first call has run */
    const long target = (long)PARTS_PER_THREAD * threads, per = (keys + target - 1) / target;
    if (split) a.split = per < MIN_SPLIT ? MIN_SPLIT : (int)((per + TILE - 1) / TILE * TILE);
    const long parts_max = target + B;
    a.state = thread_scratch(((size_t)parts_max * region) * sizeof(float) + (size_t)(B + 1) * sizeof(int32_t));
    if (!a.state) {
        attend_unstaged(&a);
        return;
    }
    int32_t *parts = (int32_t *)(a.state + parts_max * region);
    parts[0] = 0;
    for (int b = 0; b < B; b++) parts[b + 1] = parts[b] + (ctx[b] > a.split ? (ctx[b] - 1) / a.split + 1 : 1);
    a.parts = parts;
    if (split) nanoqwen_pool_run(attend, &a, parts[B]);
    else for (long task = 0; task < B; task++) attend(&a, task);
    combine(&a);
}
