/* Paged prefill attention, flash style: the why is in ops/cpu/prefill_attention.py. */
#include <omp.h>

#include "nanoqwen_cpu.h"
#include "prefill_tiles.h"
#include "scratch.h"
#include "simd.h"

#define ROWS 64   /* query vectors per task: ROWS / G new tokens of one kv head's GQA group */
#define KEYS 64   /* keys per tile */
#define MAXD 256

/* 2^x for x <= 0 (x = -inf gives 0): 2^n into the exponent, 2^f for f in [-1/2, 1/2] by its Taylor
   series to degree 6 (relative error ~1e-7). */
static inline __m256 exp2_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5403530e-4f);  /* ln2^k / k! */
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(-127.0f), _CMP_GT_OQ));  /* below 2^-126: 0 */
}

typedef struct {
    float q[ROWS][MAXD];     /* scaled queries, fp32 */
    float kt[MAXD][KEYS];    /* the key tile, transposed */
    float v[KEYS][MAXD];     /* the value tile */
    float s[ROWS][KEYS];     /* scores, then probabilities */
    float acc[ROWS][MAXD];
    float m[ROWS], l[ROWS];
    int visible[ROWS];       /* keys a row sees: its position + 1; 0 for padding rows */
} Scratch;

/* Keys [t0, t0 + n) of kv head h into the tile (transposed K, V), zeros past n; prefetches the next
   tile's rows up to `end`: one head's rows are Hkv * D apart, too far for the hardware prefetcher. */
static void load_tile(Scratch *w, const void *kc, const void *vc, const int32_t *table, int t0, int n, int end, int h,
                      int Hkv, int D, int bs, int bf16) {
    float row[MAXD];
    const int size = bf16 ? 2 : 4;
    for (int j = 0; j < KEYS; j++) {
        if (t0 + KEYS + j < end) {
            int t = t0 + KEYS + j;
            long next = ((((long)table[t / bs] * bs + t % bs) * Hkv + h) * D) * size;
            for (int b = 0; b < D * size; b += 64) {
                _mm_prefetch((const char *)kc + next + b, _MM_HINT_T0);
                _mm_prefetch((const char *)vc + next + b, _MM_HINT_T0);
            }
        }
        if (j < n) {
            int t = t0 + j;
            long base = (((long)table[t / bs] * bs + t % bs) * Hkv + h) * D;
            for (int i = 0; i < D; i += 8) {
                _mm256_storeu_ps(row + i, load8(kc, base + i, bf16));
                _mm256_storeu_ps(&w->v[j][i], load8(vc, base + i, bf16));
            }
            for (int d = 0; d < D; d++) w->kt[d][j] = row[d];
        } else {
            for (int d = 0; d < D; d++) w->kt[d][j] = 0.0f;
            memset(w->v[j], 0, sizeof(float) * D);
        }
        memset(w->v[j] + D, 0, sizeof(float) * (((D + 31) & ~31) - D));  /* the 32-column blocks' padding */
    }
}

/* s[r..r+3][c..c+15] = q[r..r+3] . kt[:, c..c+15] */
static inline void scores_4x16(Scratch *w, int r, int c, int D) {
    __m256 a[4][2];
    for (int i = 0; i < 4; i++) a[i][0] = a[i][1] = _mm256_setzero_ps();
    for (int d = 0; d < D; d++) {
        __m256 k0 = _mm256_loadu_ps(&w->kt[d][c]), k1 = _mm256_loadu_ps(&w->kt[d][c + 8]);
        for (int i = 0; i < 4; i++) {
            __m256 b = _mm256_broadcast_ss(&w->q[r + i][d]);
            a[i][0] = _mm256_fmadd_ps(b, k0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(b, k1, a[i][1]);
        }
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(&w->s[r + i][c], a[i][0]);
        _mm256_storeu_ps(&w->s[r + i][c + 8], a[i][1]);
    }
}

/* Online softmax of row r over the tile's first `n` keys (the visible ones): s <- p, -> acc's rescale factor. */
static inline float softmax_row(Scratch *w, int r, int n) {
    float *s = w->s[r];
    __m256 idx = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), lim = _mm256_set1_ps((float)n);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int c = 0; c < KEYS; c += 8) {
        __m256 keep = _mm256_cmp_ps(_mm256_add_ps(idx, _mm256_set1_ps((float)c)), lim, _CMP_LT_OQ);
        __m256 x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + c), keep);
        _mm256_storeu_ps(s + c, x);
        mx = _mm256_max_ps(mx, x);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float m_new = fmaxf(w->m[r], _mm_cvtss_f32(h));
    __m256 mv = _mm256_set1_ps(m_new), sum = _mm256_setzero_ps();
    for (int c = 0; c < KEYS; c += 8) {
        __m256 p = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv));
        _mm256_storeu_ps(s + c, p);
        sum = _mm256_add_ps(sum, p);
    }
    float alpha = exp2f(w->m[r] - m_new);  /* m = -inf on the first tile: 0 */
    w->l[r] = w->l[r] * alpha + hsum(sum);
    w->m[r] = m_new;
    return alpha;
}

/* acc[r..r+1][c..c+31] = acc * alpha + p[r..r+1][:n] @ v[:n, c..c+31] */
static inline void accumulate_2x32(Scratch *w, int r, int c, int n, const float *alpha) {
    __m256 a[2][4];
    for (int i = 0; i < 2; i++) {
        __m256 al = _mm256_set1_ps(alpha[i]);
        for (int j = 0; j < 4; j++) a[i][j] = _mm256_mul_ps(_mm256_loadu_ps(&w->acc[r + i][c + 8 * j]), al);
    }
    for (int t = 0; t < n; t++) {
        __m256 p0 = _mm256_broadcast_ss(&w->s[r][t]), p1 = _mm256_broadcast_ss(&w->s[r + 1][t]);
        for (int j = 0; j < 4; j++) {
            __m256 vv = _mm256_loadu_ps(&w->v[t][c + 8 * j]);
            a[0][j] = _mm256_fmadd_ps(p0, vv, a[0][j]);
            a[1][j] = _mm256_fmadd_ps(p1, vv, a[1][j]);
        }
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) _mm256_storeu_ps(&w->acc[r + i][c + 8 * j], a[i][j]);
}

/* One task: new tokens [i0, i0 + count) of sequence `seq` (its first at q row q0), all G heads of kv head h. */
static void attend_task(Scratch *w, const void *q, const void *kc, const void *vc, const int32_t *table, void *out,
                        long q0, int i0, int count, int cached, int h, int Hq, int Hkv, int D, int bs, float qk_scale,
                        int bf16) {
    const int G = Hq / Hkv, rows = count * G, padded = (rows + 3) & ~3, width = (D + 31) & ~31;
    for (int r = 0; r < padded; r++) {
        w->m[r] = -INFINITY;
        w->l[r] = 0.0f;
        memset(w->acc[r], 0, sizeof(float) * width);
        if (r < rows) {
            long base = ((q0 + i0 + r / G) * Hq + h * G + r % G) * D;
            for (int i = 0; i < D; i += 8)
                _mm256_storeu_ps(&w->q[r][i], _mm256_mul_ps(load8(q, base + i, bf16), _mm256_set1_ps(qk_scale)));
            w->visible[r] = cached + i0 + r / G + 1;
        } else {
            memset(w->q[r], 0, sizeof(float) * D);
            w->visible[r] = 0;
        }
    }
    const int end = cached + i0 + count;  /* the last row sees keys [0, end) */
    for (int t0 = 0; t0 < end; t0 += KEYS) {
        const int n = end - t0 < KEYS ? end - t0 : KEYS;
        load_tile(w, kc, vc, table, t0, n, end, h, Hkv, D, bs, bf16);
        for (int r = 0; r < padded; r += 4)
            for (int c = 0; c < n; c += 16) scores_4x16(w, r, c, D);
        float alpha[ROWS];
        int seen[ROWS];
        for (int r = 0; r < padded; r++) {
            int k = w->visible[r] - t0;
            seen[r] = k <= 0 ? 0 : k < n ? k : n;
            alpha[r] = 1.0f;
            if (seen[r]) alpha[r] = softmax_row(w, r, seen[r]);
            else memset(w->s[r], 0, sizeof(float) * KEYS);  /* weighs nothing in its row pair */
        }
        for (int r = 0; r < padded; r += 2) {
            int k = seen[r] > seen[r + 1] ? seen[r] : seen[r + 1];
            if (k == 0) continue;
            for (int c = 0; c < width; c += 32) accumulate_2x32(w, r, c, k, alpha + r);
        }
    }
    for (int r = 0; r < rows; r++) {
        long base = ((q0 + i0 + r / G) * Hq + h * G + r % G) * D;
        float inv = 1.0f / w->l[r];
        for (int d = 0; d < D; d++) {
            float x = w->acc[r][d] * inv;
            if (bf16) ((uint16_t *)out)[base + d] = f32_to_bf16(x);
            else ((float *)out)[base + d] = x;
        }
    }
}

/* Shapes: see nanoqwen_cpu.h. Tasks (sequence, kv head, a run of new tokens: ROWS / G of them, or TILE_TASK_ROWS / G
   on the tiles), longest first. Its memory, a scratch a thread and the task table, is the call's own (scratch.h's
   call_memory, not a scratch kept between calls): allocated once, before any work, and freed at its end. */
int prefill_attention(const void *q, const void *kc, const void *vc, const int32_t *tables, const int32_t *qlens,
                      const int32_t *ctx, void *out, int S, int Hq, int Hkv, int D, int bs, int W, float scale,
                      int bf16, int tiles) {
    const int tiled = tiles && bf16 && tiles_take(D);
    const struct tile_layout layout = tile_layout(tiled ? D : 32);
    const int G = Hq / Hkv, span = (tiled ? TILE_TASK_ROWS : ROWS) / G, threads = omp_get_max_threads();
    const size_t each = ((tiled ? layout.total : sizeof(Scratch)) + 63) & ~(size_t)63;
    char *memory = call_memory((size_t)threads * each + sizeof(long) * (2 * (size_t)S + 1));
    if (!memory) return NANOQWEN_NO_MEMORY;
    long *first = (long *)(memory + (size_t)threads * each), *q0 = first + S + 1;
    first[0] = 0;
    for (int s = 0; s < S; s++) {
        q0[s] = s ? q0[s - 1] + qlens[s - 1] : 0;
        first[s + 1] = first[s] + (long)(qlens[s] + span - 1) / span * Hkv;
    }
    const long tasks = first[S];
    const float qk_scale = scale * 1.4426950408889634f;
    #pragma omp parallel num_threads(threads)
    {
        char *w = memory + (size_t)omp_get_thread_num() * each;
        #pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < tasks; task++) {
            int s = 0;
            while (first[s + 1] <= task) s++;
            long local = first[s + 1] - 1 - task;  /* last tiles first: they see the most keys */
            int tile = (int)(local / Hkv), h = (int)(local % Hkv), i0 = tile * span;
            int count = qlens[s] - i0 < span ? qlens[s] - i0 : span;
            if (tiled)
                tile_task(w, &layout, q, kc, vc, tables + (long)s * W, out, q0[s], i0, count, ctx[s] - qlens[s], h, Hq,
                         Hkv, D, bs, qk_scale);
            else
                attend_task((Scratch *)w, q, kc, vc, tables + (long)s * W, out, q0[s], i0, count, ctx[s] - qlens[s], h,
                            Hq, Hkv, D, bs, qk_scale, bf16);
        }
    }
    free(memory);
    return 0;
}

void prefill_attention_tiles(int D, int *tiles) { *tiles = tiles_take(D); }
