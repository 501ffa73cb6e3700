/* Paged prefill attention on bf16 tiles: every sequence where they serve, AMX's tiles multiplying them, or AVX-512
   BF16's vdpbf16ps on the same packed operands on a CPU without AMX (there SDPA's fused bf16 kernel reached 0.04-0.08
   TFLOP/s a thread against its GEMMs' 0.5 on a Zen 5: profiles/RESULTS.md, "prefill32"). Internal, included by
   prefill_attention.c.

   A task is TILE_TASK_ROWS query vectors (TILE_TASK_ROWS / G new tokens times the GQA group of one kv head). It walks
   the context in blocks of TILE_KEYS keys: each block is packed once for the task (K transposed into the B operand's
   pairs, V's rows interleaved in pairs), then every 32-row tile of queries that sees a key of it scores the block
   (S = Q K^T: bf16 products, fp32 sums), takes its online softmax in fp32 on AVX-512 (P rounded to bf16,
   as SDPA's bf16 kernel does) and adds P V into its fp32 accumulator rows. Tiles that see no key of a block are
   skipped (the causal upper triangle). Memory: a fixed scratch per thread, whatever the context. */
#ifndef NANOQWEN_PREFILL_TILES_H
#define NANOQWEN_PREFILL_TILES_H

#include "amx.h"

#define TILE_TASK_ROWS 512  /* query vectors per task: each key block packed once serves all of them */
#define TILE_KEYS 256       /* keys per block: a row's fixed costs a block (reductions, rescale) spread over more */
#define TILE_QT 32          /* query vectors per tile pair (two 16-row A tiles) */
/* A row's running maximum (log2 units) moves only when a block's passes it by more than this: P stays below 2^LAZY,
   and the accumulator's rescaling, a pass over its row, is rare after the first blocks. */
#define LAZY 8.0f

/* A thread's scratch at head dim D (D % 32 == 0, D <= 256): byte offsets of its parts. */
struct tile_layout {
    size_t q, kt, vp, s, p, acc, m, l, visible, total;
};

static inline struct tile_layout tile_layout(int D) {
    struct tile_layout o;
    size_t at = 0;
#define PART(name, bytes) (o.name = at, at += ((size_t)(bytes) + 63) & ~(size_t)63)
    PART(q, (size_t)TILE_TASK_ROWS * D * 2);        /* bf16 [rows][D]: the A operand of S */
    PART(kt, (size_t)D / 2 * TILE_KEYS * 4);        /* [D / 2][keys] pairs of K^T: S's B operand */
    PART(vp, (size_t)TILE_KEYS / 2 * D * 4);        /* [keys / 2][D] pairs of V rows: P V's B operand */
    PART(s, (size_t)TILE_QT * TILE_KEYS * 4);        /* fp32 [32][keys] scores of one tile pair */
    PART(p, (size_t)TILE_QT * TILE_KEYS * 2);        /* bf16 [32][keys] probabilities: P V's A operand */
    PART(acc, (size_t)TILE_TASK_ROWS * D * 4);      /* fp32 [rows][D] */
    PART(m, TILE_TASK_ROWS * 4);
    PART(l, TILE_TASK_ROWS * 4);
    PART(visible, TILE_TASK_ROWS * 4);
#undef PART
    o.total = at;
    return o;
}

/* Whether the tiles serve head dim D here: their products on AMX, or by AVX-512 BF16's vdpbf16ps where the CPU (or
   the build's cap) has no AMX. */
static inline int tiles_take(int D) { return D % 32 == 0 && D <= 256 && (amx_ready() || has_avx512_bf16()); }

AMX_BEGIN

/* The 16 x 16 dwords of r (rows) transposed in place. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {  /* r[4i + c], 128-bit lane L: rows 4i..4i+3 at column 4L + c */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
        __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
        t[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);       /* column c */
        t[4 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);   /* column 4 + c */
        t[8 + c] = _mm512_shuffle_i32x4(x0, y0, 0xdd);   /* column 8 + c */
        t[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xdd);  /* column 12 + c */
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* Keys [t0, t0 + n) of kv head h packed for the tiles up to `width` (n rounded up to 32, all the tiles read):
   kt[i][j] = the i-th bf16 pair of key j's row, vp[j / 2][d] = (V[j][d], V[j + 1][d]) for even j; keys past n are
   zeros (a zero V row weighs nothing, and keeps out NaN). */
static void tile_pack(uint32_t *kt, uint32_t *vp, const uint16_t *kc, const uint16_t *vc, const int32_t *table,
                     int t0, int n, int width, int h, int Hkv, int D, int bs) {
    const uint16_t *krow[TILE_KEYS], *vrow[TILE_KEYS];
    for (int j = 0; j < width; j++) {
        int t = t0 + j;
        long base = j < n ? (((long)table[t / bs] * bs + t % bs) * Hkv + h) * D : -1;
        krow[j] = base < 0 ? 0 : kc + base;
        vrow[j] = base < 0 ? 0 : vc + base;
    }
    for (int j0 = 0; j0 < width; j0 += 16) {
        for (int i0 = 0; i0 < D / 2; i0 += 16) {
            __m512i r[16];
            for (int j = 0; j < 16; j++)
                r[j] = krow[j0 + j] ? _mm512_loadu_si512(krow[j0 + j] + 2 * i0) : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(kt + (long)(i0 + i) * TILE_KEYS + j0, r[i]);
        }
    }
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int j = 0; j < width; j += 2) {
        for (int d = 0; d < D; d += 32) {
            __m512i a = vrow[j] ? _mm512_loadu_si512(vrow[j] + d) : _mm512_setzero_si512();
            __m512i b = vrow[j + 1] ? _mm512_loadu_si512(vrow[j + 1] + d) : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + (long)j / 2 * D + d, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(vp + (long)j / 2 * D + d + 16, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/* 2^x for 16 finite x <= LAZY (very negative: 0): 2^f for f in [-1/2, 1/2] by a degree-3 minimax polynomial (relative
   error 7.5e-5 at most, below the bf16 rounding of P, 2^-9; Taylor's coefficients had 7.9e-4; the sums l add the same
   values), times 2^n by vscalefps. */
static inline __m512 tile_exp2(__m512 x) {
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(5.517145e-2f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4261063e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9326097e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999281e-1f));
    return _mm512_scalef_ps(p, n);
}

/* The online softmax of row r's scores s (the first `seen` keys of the block visible, seen >= 1) scaled by c into
   p (bf16, zeros past seen up to `width`); acc's row rescaled when its maximum moves (LAZY). */
static inline void tile_softmax_row(const float *s, uint16_t *p, float *acc, float *m, float *l, int seen, int width,
                                   int D, float c) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int k = 0; k < seen; k += 16) {
        __mmask16 keep = seen - k >= 16 ? 0xffff : (__mmask16)((1u << (seen - k)) - 1);
        mx = _mm512_mask_max_ps(mx, keep, mx, _mm512_loadu_ps(s + k));
    }
    const float m_old = *m, top = _mm512_reduce_max_ps(mx) * c, m_new = top > m_old + LAZY ? top : m_old;
    const __m512 cv = _mm512_set1_ps(c), mv = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int k = 0; k < width; k += 32) {
        __m512 e[2];
        for (int u = 0; u < 2; u++) {
            int left = seen - k - 16 * u;
            __mmask16 keep = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
            e[u] = _mm512_maskz_mov_ps(keep, tile_exp2(_mm512_fmsub_ps(_mm512_loadu_ps(s + k + 16 * u), cv, mv)));
            sum = _mm512_add_ps(sum, e[u]);
        }
        _mm512_storeu_si512(p + k, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
    }
    if (m_old != m_new) {  /* m_old = -inf on the row's first block: acc is still zero */
        const float alpha = exp2f(m_old - m_new);
        *l *= alpha;
        const __m512 av = _mm512_set1_ps(alpha);
        for (int d = 0; d < D; d += 16) _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), av));
    }
    *l += _mm512_reduce_add_ps(sum);
    *m = m_new;
}

/* Tiles 4-7 += the 2 x 2 products of the A tiles at a0, a1 (16 rows of 32 bf16, sa bytes apart) and the B tiles at b0,
   b1 (16 rows of 16 bf16 pairs, sb bytes apart): each tile loaded serves two multiplies. */
static inline void amx_madd_2x2(const void *a0, const void *a1, int sa, const void *b0, const void *b1, int sb) {
    _tile_loadd(0, a0, sa);
    _tile_loadd(1, a1, sa);
    _tile_loadd(2, b0, sb);
    _tile_loadd(3, b1, sb);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(6, 1, 2);
    _tile_dpbf16ps(7, 1, 3);
}

/* Without AMX, the tile pair's products by vdpbf16ps on the same packed operands: each takes a row's bf16 pair (Q's,
   P's) broadcast against 16 pairs of K^T or V, 8 rows by 32 columns a pass (16 fp32 sums in registers). Only the
   pair's `live` rows (a multiple of 8) that hold queries: a decode row's task is 2 of 32 rows at 0.6B's GQA. */
#define VEC_ROWS 8

/* a[u][h] += sum over j < n of x's pair j of row u (x + u * xs) times b's pairs j, columns 16h..16h+15 (b + j * bs). */
static inline void vec_dot_8x32(__m512 a[VEC_ROWS][2], const uint32_t *x, long xs, const uint32_t *b, long bs, int n) {
    for (int j = 0; j < n; j++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + (long)j * bs);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + (long)j * bs + 16);
        for (int u = 0; u < VEC_ROWS; u++) {
            const __m512bh xu = (__m512bh)_mm512_set1_epi32((int)x[(long)u * xs + j]);
            a[u][0] = _mm512_dpbf16_ps(a[u][0], xu, b0);
            a[u][1] = _mm512_dpbf16_ps(a[u][1], xu, b1);
        }
    }
}

/* s[r][k] = Q[r] . K[k] for rows r < live of the tile pair (qs: [live][D] bf16) and keys k < width (kt:
   [D / 2][TILE_KEYS] pairs): s is [32][TILE_KEYS] fp32. */
static inline void vec_scores(const uint16_t *qs, const uint32_t *kt, float *s, int live, int width, int D) {
    for (int r = 0; r < live; r += VEC_ROWS)
        for (int k0 = 0; k0 < width; k0 += 32) {
            __m512 a[VEC_ROWS][2];
            for (int u = 0; u < VEC_ROWS; u++) a[u][0] = a[u][1] = _mm512_setzero_ps();
            vec_dot_8x32(a, (const uint32_t *)qs + (long)r * D / 2, D / 2, kt + k0, TILE_KEYS, D / 2);
            for (int u = 0; u < VEC_ROWS; u++) {
                _mm512_storeu_ps(s + (long)(r + u) * TILE_KEYS + k0, a[u][0]);
                _mm512_storeu_ps(s + (long)(r + u) * TILE_KEYS + k0 + 16, a[u][1]);
            }
        }
}

/* acc[r] += P[r] V for rows r < live (p: [32][TILE_KEYS] bf16, acc: [live][D] fp32) over keys < width (vp:
   [TILE_KEYS / 2][D] pairs). */
static inline void vec_pv(const uint16_t *p, const uint32_t *vp, float *acc, int live, int width, int D) {
    for (int r = 0; r < live; r += VEC_ROWS)
        for (int d = 0; d < D; d += 32) {
            __m512 a[VEC_ROWS][2];
            for (int u = 0; u < VEC_ROWS; u++) {
                a[u][0] = _mm512_loadu_ps(acc + (long)(r + u) * D + d);
                a[u][1] = _mm512_loadu_ps(acc + (long)(r + u) * D + d + 16);
            }
            vec_dot_8x32(a, (const uint32_t *)p + (long)r * TILE_KEYS / 2, TILE_KEYS / 2, vp + d, D, width / 2);
            for (int u = 0; u < VEC_ROWS; u++) {
                _mm512_storeu_ps(acc + (long)(r + u) * D + d, a[u][0]);
                _mm512_storeu_ps(acc + (long)(r + u) * D + d + 16, a[u][1]);
            }
        }
}

/* One task: new tokens [i0, i0 + count) of sequence `seq` (its first at q row q0), all G heads of kv head h; its
   products on AMX where amx_ready() says so, else by vdpbf16ps. */
static void tile_task(char *w, const struct tile_layout *o, const uint16_t *q, const uint16_t *kc, const uint16_t *vc,
                     const int32_t *table, uint16_t *out, long q0, int i0, int count, int cached, int h, int Hq,
                     int Hkv, int D, int bs, float c) {
    uint16_t *qs = (uint16_t *)(w + o->q), *p = (uint16_t *)(w + o->p);
    uint32_t *kt = (uint32_t *)(w + o->kt), *vp = (uint32_t *)(w + o->vp);
    float *s = (float *)(w + o->s), *acc = (float *)(w + o->acc), *m = (float *)(w + o->m), *l = (float *)(w + o->l);
    int *visible = (int *)(w + o->visible);
    const int G = Hq / Hkv, rows = count * G, padded = (rows + TILE_QT - 1) / TILE_QT * TILE_QT;
    for (int t = 0; t < count; t++)  /* a token's G heads are adjacent rows in q and here */
        memcpy(qs + (long)t * G * D, q + ((q0 + i0 + t) * Hq + (long)h * G) * D, sizeof(uint16_t) * G * D);
    memset(qs + (long)rows * D, 0, sizeof(uint16_t) * (padded - rows) * D);
    memset(acc, 0, sizeof(float) * padded * D);
    for (int r = 0; r < padded; r++) {
        m[r] = -INFINITY, l[r] = 0.0f;
        visible[r] = r < rows ? cached + i0 + r / G + 1 : 0;
    }
    const int amx = amx_ready();
    if (amx) {
        struct tile_config config = {.palette = 1};
        for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;
        _tile_loadconfig(&config);
    }
    const int end = cached + i0 + count;  /* the last row sees keys [0, end) */
    for (int t0 = 0; t0 < end; t0 += TILE_KEYS) {
        const int n = end - t0 < TILE_KEYS ? end - t0 : TILE_KEYS, width = (n + 31) & ~31;
        tile_pack(kt, vp, kc, vc, table, t0, n, width, h, Hkv, D, bs);
        AMX_STORES_VISIBLE();
        for (int r0 = 0; r0 < padded; r0 += TILE_QT) {
            const int last = r0 + TILE_QT <= rows ? r0 + TILE_QT - 1 : rows - 1;
            if (visible[last] <= t0) continue;  /* the causal upper triangle: no row of the tile sees the block */
            const int live = rows - r0 < TILE_QT ? (rows - r0 + VEC_ROWS - 1) / VEC_ROWS * VEC_ROWS : TILE_QT;
            if (!amx) vec_scores(qs + (long)r0 * D, kt, s, live, width, D);
            /* S = Q K^T: tiles 4-7 the 2 x 2 blocks of 16 rows x 16 keys, 0-1 Q, 2-3 K^T */
            for (int k0 = 0; amx && k0 < width; k0 += 32) {
                _tile_zero(4);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                for (int d = 0; d < D; d += 32)
                    amx_madd_2x2(qs + (long)r0 * D + d, qs + (long)(r0 + 16) * D + d, D * 2,
                                 kt + (long)d / 2 * TILE_KEYS + k0, kt + (long)d / 2 * TILE_KEYS + k0 + 16,
                                 TILE_KEYS * 4);
                _tile_stored(4, s + k0, TILE_KEYS * 4);
                _tile_stored(5, s + k0 + 16, TILE_KEYS * 4);
                _tile_stored(6, s + 16 * TILE_KEYS + k0, TILE_KEYS * 4);
                _tile_stored(7, s + 16 * TILE_KEYS + k0 + 16, TILE_KEYS * 4);
            }
            AMX_STORES_VISIBLE();  /* and the tiles' stores to the loads after them: asms without a memory operand */
            for (int r = r0; r < r0 + TILE_QT; r++) {
                const int k = visible[r] - t0, seen = k < n ? k : n;
                uint16_t *pr = p + (long)(r - r0) * TILE_KEYS;
                if (seen > 0) tile_softmax_row(s + (long)(r - r0) * TILE_KEYS, pr, acc + (long)r * D, m + r, l + r,
                                              seen, width, D, c);
                else memset(pr, 0, sizeof(uint16_t) * width);  /* weighs nothing in its tile */
            }
            AMX_STORES_VISIBLE();
            if (!amx) vec_pv(p, vp, acc + (long)r0 * D, live, width, D);
            /* acc += P V: tiles 4-7 the 2 x 2 blocks of 16 rows x 16 of D, 0-1 P, 2-3 V */
            for (int d = 0; amx && d < D; d += 32) {
                float *a0 = acc + (long)r0 * D + d, *a1 = a0 + 16L * D;
                _tile_loadd(4, a0, D * 4);
                _tile_loadd(5, a0 + 16, D * 4);
                _tile_loadd(6, a1, D * 4);
                _tile_loadd(7, a1 + 16, D * 4);
                for (int k0 = 0; k0 < width; k0 += 32)
                    amx_madd_2x2(p + k0, p + 16 * TILE_KEYS + k0, TILE_KEYS * 2, vp + (long)k0 / 2 * D + d,
                                 vp + (long)k0 / 2 * D + d + 16, D * 4);
                _tile_stored(4, a0, D * 4);
                _tile_stored(5, a0 + 16, D * 4);
                _tile_stored(6, a1, D * 4);
                _tile_stored(7, a1 + 16, D * 4);
            }
            AMX_STORES_VISIBLE();
        }
    }
    if (amx) _tile_release();
    for (int r = 0; r < rows; r++) {
        uint16_t *o_row = out + ((q0 + i0 + r / G) * Hq + (long)h * G + r % G) * D;
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        for (int d = 0; d < D; d += 16)
            _mm256_storeu_si256((__m256i *)(o_row + d),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + (long)r * D + d), inv)));
    }
}

AMX_END

#endif
