/* Seeded sampling of whole rows of logits, a few passes a row: the why is in ops/cpu/sample.py. */
#include <pthread.h>

#include "nanoqwen_cpu.h"
#include "simd.h"
#include "pool.h"

#define TOKEN_STRIDE 0x2545F491u
#define MIN_TEMPERATURE 1e-5f
/* What log8's rounding may add to a race value beyond noise_bound8's exact bound. */
#define BOUND_MARGIN 0.01f
/* Logits binned by their distance below the row's maximum, in 1/BINS_PER_UNIT steps; the last bin
   takes everything further (and -inf). */
#define BINS_PER_UNIT 32
#define BINS 2048

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x5BD1E995u;
    return x ^ (x >> 16);
}

static inline __m256i mix32_8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x5BD1E995));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

/* Natural log of positive normal floats (Cephes logf). */
static inline __m256 log8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256i bits = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                   _mm256_set1_epi32(0x3F000000)));  /* [0.5, 1) */
    __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
    m = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(m, small));
    __m256 z = _mm256_mul_ps(m, m);
    __m256 y = _mm256_set1_ps(7.0376836292E-2f);
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993E-1f));
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174E-1f));
    y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
    y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
    y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
    return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

/* exp(x) for x <= 0 (simd.h's exp8); below -87 (and -inf): exactly 0. */
static inline __m256 exp8_nonpositive(__m256 x) {
    return _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ));
}

/* 8 tokens' noise bits: the hash of nanoqwen/sampler.py's exponential_noise. */
static inline __m256i noise_bits8(uint32_t row, __m256i ids) {
    return mix32_8(_mm256_add_epi32(_mm256_set1_epi32((int)row), _mm256_mullo_epi32(ids, _mm256_set1_epi32((int)TOKEN_STRIDE))));
}

/* log E of their Exp(1) noise E = -log u, u from the top 24 bits: exponential_noise's formulas. */
static inline __m256 log_noise8(__m256i bits) {
    __m256 top24 = _mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8));
    __m256 uniform = _mm256_min_ps(_mm256_mul_ps(_mm256_add_ps(top24, _mm256_set1_ps(0.5f)),
                                                 _mm256_set1_ps(1.0f / (1 << 24))),
                                   _mm256_set1_ps(1.0f - 1.0f / (1 << 24)));
    return log8(_mm256_sub_ps(_mm256_setzero_ps(), log8(uniform)));
}

/* An upper bound of -log E at a third of its cost: E = -log u >= 1 - u >= q / 2^25 with
   q = 2^24 - (u's 24 bits) >= 1, so -log E <= (25 - floor(log2 q)) ln 2 (+ BOUND_MARGIN). */
static inline __m256 noise_bound8(__m256i bits) {
    __m256i q = _mm256_sub_epi32(_mm256_set1_epi32(1 << 24), _mm256_srli_epi32(bits, 8));
    __m256i log2q = _mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(q)), 23);  /* + 127 */
    return _mm256_fnmadd_ps(_mm256_cvtepi32_ps(log2q), _mm256_set1_ps(0.693147181f),
                            _mm256_set1_ps((25 + 127) * 0.693147181f + BOUND_MARGIN));
}

static inline __m256i iota8(int first) {
    return _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 logits of a bf16 (bf16 != 0) or fp32 row from token i on, as fp32 (bf16's widened: exact); lanes past V read
   -inf. */
static inline __m256 logits8(const void *x, int bf16, int i, int V) {
    if (i + 8 <= V) return load8(x, i, bf16);
    float pad[8];
    for (int j = 0; j < 8; j++) pad[j] = i + j < V ? load1(x, i + j, bf16) : -INFINITY;
    return _mm256_loadu_ps(pad);
}

/* 8 scaled logits from token i on (x bf16 where bf16, else fp32); lanes past V read -inf. */
static inline __m256 scaled8(const void *x, int bf16, int i, int V, __m256 t) {
    return _mm256_div_ps(logits8(x, bf16, i, V), t);
}

/* Per-lane race leaders: a lane keeps its first maximum; the winner is the lowest id among the best. */
struct race {
    __m256 value;
    __m256i id;
};

static inline void race_add(struct race *r, __m256 value, __m256i id) {
    __m256 better = _mm256_cmp_ps(value, r->value, _CMP_GT_OQ);
    r->value = _mm256_blendv_ps(r->value, value, better);
    r->id = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r->id), _mm256_castsi256_ps(id), better));
}

/* The winner over n races' lanes; -1 when every value was -inf. */
static int race_winner(const struct race *r, int n) {
    float best_value = -INFINITY;
    int best = -1;
    for (int k = 0; k < n; k++) {
        float value[8];
        int32_t id[8];
        _mm256_storeu_ps(value, r[k].value);
        _mm256_storeu_si256((__m256i *)id, r[k].id);
        for (int j = 0; j < 8; j++)
            if (value[j] > -INFINITY && (best < 0 || value[j] > best_value || (value[j] == best_value && id[j] < best)))
                best_value = value[j], best = id[j];
    }
    return best;
}

/* The first maximum of x / t (x a bf16 row where bf16, else fp32), as torch.argmax: with t = 1 the greedy token;
   else the first token of the filters' order (scaled logit descending, id ascending), which survives every filter.
   Two races, 16 tokens a step: one race's compare-and-blend chain bounded the loop (151,936 logits: 50 vs 29 µs). */
static inline __attribute__((always_inline)) int first_max(const void *x, int bf16, int V, float t) {
    struct race r[2] = {{_mm256_set1_ps(-INFINITY), _mm256_setzero_si256()},
                        {_mm256_set1_ps(-INFINITY), _mm256_setzero_si256()}};
    const __m256 tv = _mm256_set1_ps(t);
    int i = 0;
    for (; i + 16 <= V; i += 16) {
        race_add(&r[0], scaled8(x, bf16, i, V, tv), iota8(i));
        race_add(&r[1], scaled8(x, bf16, i + 8, V, tv), iota8(i + 8));
    }
    for (; i < V; i += 8) race_add(&r[0], scaled8(x, bf16, i, V, tv), iota8(i));
    const int best = race_winner(r, 2);
    return best < 0 ? 0 : best;
}

static int argmax(const float *x, int V, float t) { return first_max(x, 0, V, t); }

static inline __m256i bins8(__m256 s, __m256 smax) {
    __m256 d = _mm256_mul_ps(_mm256_sub_ps(smax, s), _mm256_set1_ps((float)BINS_PER_UNIT));
    return _mm256_cvttps_epi32(_mm256_min_ps(d, _mm256_set1_ps((float)(BINS - 1))));  /* +inf, NaN -> last */
}

/* The tokens that survive the filters: a prefix of the order (scaled logit descending, id ascending), so
   all of bins < lo, then either everything up to bin `hi` (drop_id < 0) or what comes before the first
   dropped token (drop_s, drop_id). An unfiltered row: lo = BINS. */
struct survivors {
    int lo, hi;
    float drop_s;
    int32_t drop_id;
};

static inline __m256 members8(__m256 s, __m256i ids, __m256 smax, const struct survivors *k) {
    __m256i bin = bins8(s, smax);
    __m256i bulk = _mm256_cmpgt_epi32(_mm256_set1_epi32(k->lo), bin);
    __m256i in;
    if (k->drop_id < 0) {
        in = _mm256_cmpgt_epi32(_mm256_set1_epi32(k->hi + 1), bin);
    } else {
        __m256 ds = _mm256_set1_ps(k->drop_s);
        __m256 above = _mm256_cmp_ps(s, ds, _CMP_GT_OQ);
        __m256 tied = _mm256_and_ps(_mm256_cmp_ps(s, ds, _CMP_EQ_OQ),
                                    _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k->drop_id), ids)));
        in = _mm256_castps_si256(_mm256_or_ps(above, tied));
    }
    return _mm256_castsi256_ps(_mm256_or_si256(bulk, in));
}

/* The exponential race over the survivors. A token's exact noise is computed only where its bound
   reaches the best race value its lane has seen, starting from the top token's (which always survives)
   where the caller found it (top >= 0: a filtered row, whose survivors are binned below it). */
static int race(const float *x, int V, float t, uint32_t row, int top, const struct survivors *k) {
    const __m256 tv = _mm256_set1_ps(t);
    const __m256 smax = _mm256_set1_ps(top < 0 ? 0 : x[top] / t);
    __m256 bar = top < 0 ? _mm256_set1_ps(-INFINITY)
                         : _mm256_sub_ps(smax, log_noise8(noise_bits8(row, _mm256_set1_epi32(top))));
    struct race r = {_mm256_set1_ps(-INFINITY), _mm256_setzero_si256()};
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, 0, i, V, tv);
        __m256i ids = iota8(i);
        __m256i bits = noise_bits8(row, ids);
        __m256 live = _mm256_cmp_ps(_mm256_add_ps(s, noise_bound8(bits)), bar, _CMP_GE_OQ);
        if (k->lo < BINS) live = _mm256_and_ps(live, members8(s, ids, smax, k));
        if (!_mm256_movemask_ps(live)) continue;
        __m256 value = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_sub_ps(s, log_noise8(bits)), live);
        race_add(&r, value, ids);
        bar = _mm256_max_ps(bar, value);
    }
    const int winner = race_winner(&r, 1);
    return winner >= 0 ? winner : top >= 0 ? top : argmax(x, V, t);  /* every logit -inf */
}

struct candidate {
    float s, w;  /* scaled logit, exp(s - the row's maximum) */
    int32_t id;
};

/* A candidate as one integer that sorts ascending in the filters' order: scaled logit descending
   (-0 taken as +0, as a float comparison does), then id ascending. */
static inline uint64_t order_key(float s, int32_t id) {
    s += 0.0f;
    uint32_t u;
    memcpy(&u, &s, 4);
    u = u >> 31 ? ~u : u | 0x80000000u;  /* ascending with s */
    return (uint64_t)~u << 32 | (uint32_t)id;
}

static inline struct candidate from_key(uint64_t key) {
    uint32_t u = ~(uint32_t)(key >> 32);
    u = u >> 31 ? u & 0x7FFFFFFFu : ~u;
    struct candidate c = {0, 0, (int32_t)(uint32_t)key};
    memcpy(&c.s, &u, 4);
    return c;
}

/* LSD radix sort, a byte at a time, skipping bytes every key shares; -> a or tmp, whichever holds the result. */
static uint64_t *radix_sort(uint64_t *a, uint64_t *tmp, long n) {
    for (int shift = 0; shift < 64 && n > 1; shift += 8) {
        long count[256] = {0};
        for (long i = 0; i < n; i++) count[a[i] >> shift & 255]++;
        if (count[a[0] >> shift & 255] == n) continue;
        for (long d = 0, pos = 0; d < 256; d++) {
            long c = count[d];
            count[d] = pos;
            pos += c;
        }
        for (long i = 0; i < n; i++) tmp[count[a[i] >> shift & 255]++] = a[i];
        uint64_t *t = a;
        a = tmp;
        tmp = t;
    }
    return a;
}

struct row_filter {
    int top_k;  /* 0 = off */
    float top_p, min_p;  /* 1 / 0 = off */
};

/* The filters' cut on n candidates sorted in their order, after `base` surviving tokens of softmax mass
   base_mass (exp(s - smax) each) out of `total` (with top-k: the top-k's, summed here); fills their w.
   -> how many of them survive: a prefix, as in sampler._filter_sorted. */
static long cut(struct candidate *c, long n, long base, double base_mass, double total, const struct row_filter *f,
                __m256 smax) {
    for (long r = 0; r < n; r += 8) {
        float sv[8], w[8];
        for (int j = 0; j < 8; j++) sv[j] = r + j < n ? c[r + j].s : -INFINITY;
        _mm256_storeu_ps(w, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sv), smax)));
        for (int j = 0; j < 8 && r + j < n; j++) c[r + j].w = w[j];
    }
    if (f->top_k) {  /* the softmax is over the top-k alone */
        total = base_mass;
        for (long r = 0; r < n && base + r < f->top_k; r++) total += c[r].w;
    }
    double before = base_mass;
    for (long r = 0; r < n; r++) {
        const long rank = base + r;
        int drop = f->top_k && rank >= f->top_k;
        drop |= rank > 0 && f->top_p < 1 && before >= f->top_p * total;
        drop |= rank > 0 && c[r].w < f->min_p;  /* min_p times the top token's exp(0) = 1 */
        if (drop) return r;
        before += c[r].w;
    }
    return n;
}

/* The race over the first n sorted candidates, which are all the survivors. */
static int race_list(const struct candidate *c, long n, uint32_t row) {
    struct race r = {_mm256_set1_ps(-INFINITY), _mm256_setzero_si256()};
    for (long i = 0; i < n; i += 8) {
        float sv[8];
        int32_t ids[8];
        for (int j = 0; j < 8; j++) {
            sv[j] = i + j < n ? c[i + j].s : -INFINITY;
            ids[j] = i + j < n ? c[i + j].id : 0;
        }
        __m256i idv = _mm256_loadu_si256((const __m256i *)ids);
        race_add(&r, _mm256_sub_ps(_mm256_loadu_ps(sv), log_noise8(noise_bits8(row, idv))), idv);
    }
    const int winner = race_winner(&r, 1);
    return winner < 0 ? c[0].id : winner;
}

/* Up to this top-k, a row's candidates are its top-k, kept by a streaming selection (no histogram). */
#define SMALL_TOP_K 256
#define STREAM_CAPACITY 2048

/* A small top-k's candidates, sorted: every token better than the current k-th best joins a buffer;
   a full buffer is sorted and cut back to k, raising the bar. keys: the row's filter scratch (filter_bytes).
   -> how many (k, or V if fewer). */
static long top_candidates(const float *x, int V, __m256 tv, int k, uint64_t *keys, struct candidate **out) {
    uint64_t *tmp = keys + STREAM_CAPACITY, bar = UINT64_MAX;
    __m256 bar_s = _mm256_set1_ps(-INFINITY);
    long n = 0;
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, 0, i, V, tv);
        int in = _mm256_movemask_ps(_mm256_cmp_ps(s, bar_s, _CMP_GE_OQ));
        if (!in) continue;
        float sv[8];
        _mm256_storeu_ps(sv, s);
        for (int j = 0; j < 8; j++) {
            uint64_t key = order_key(sv[j], i + j);
            if (in >> j & 1 && key < bar && i + j < V) keys[n++] = key;
        }
        if (n > STREAM_CAPACITY - 8) {
            const uint64_t *sorted = radix_sort(keys, tmp, n);
            if (sorted != keys) memcpy(keys, sorted, (size_t)k * sizeof *keys);
            n = k;
            bar = keys[k - 1];
            bar_s = _mm256_set1_ps(from_key(bar).s);
        }
    }
    const uint64_t *sorted = radix_sort(keys, tmp, n);
    n = n < k ? n : k;
    *out = (struct candidate *)(tmp + STREAM_CAPACITY);
    for (long r = 0; r < n; r++) (*out)[r] = from_key(sorted[r]);
    return n;
}

/* The first bin whose cumulative mass reaches `target`. */
static int mass_bin(const double *mass, double target) {
    double cum = 0;
    for (int b = 0; b < BINS - 1; b++)
        if ((cum += mass[b]) >= target) return b;
    return BINS - 1;
}

/* The window of bins [lo, hi] where the filters' cut can fall: every token before it survives, none
   after it does. With top-k, hi is the bin of the k-th token (top-p then needs the masses of all k). */
static void cut_window(const struct row_filter *f, const int *count, const double *mass, int *lo, int *hi) {
    *lo = *hi = BINS - 1;
    long n = 0;
    if (f->top_k) {
        for (*hi = 0; *hi < BINS - 1 && (n += count[*hi]) < f->top_k; ++*hi) {}
        *lo = *hi;
    }
    if (f->min_p > 0) {  /* exp(s - smax) >= min_p: bins two past either side of -log(min_p) are certain */
        float edge = -logf(f->min_p) * BINS_PER_UNIT;
        int sure = edge < 2 ? 0 : edge - 2 < BINS - 1 ? (int)edge - 2 : BINS - 1;
        int none = edge + 2 < BINS - 1 ? (int)edge + 2 : BINS - 1;
        *lo = sure < *lo ? sure : *lo;
        if (!(f->top_k && f->top_p < 1)) *hi = none < *hi ? none : *hi;
    }
    if (f->top_p < 1) {
        double least = 0, most = 0;  /* the top-k's mass lies between the bins before hi's and those up to it */
        for (int b = 0; b < BINS; b++) {
            if (b < *hi || !f->top_k) least += mass[b];
            if (b <= *hi || !f->top_k) most += mass[b];
        }
        int first = mass_bin(mass, f->top_p * least * (1 - 1e-9));  /* the margins: summation order */
        *lo = first < *lo ? first : *lo;
        if (!f->top_k) {  /* the token after the mass: the first whose mass before it reaches top_p */
            int last = mass_bin(mass, f->top_p * most * (1 + 1e-9));
            while (last < BINS - 1 && !count[last + 1]) last++;
            last = last < BINS - 1 ? last + 1 : last;
            *hi = last < *hi ? last : *hi;
        }
    }
    if (*hi < *lo) *hi = *lo;
}

/* Top-k, then top-p, then min-p on a row's tokens, as sampler._filter_sorted defines them, and the race
   over the survivors. A small top-k's candidates come from a streaming selection; otherwise binning by
   distance below the maximum (with the softmax's masses for top-p) finds the window of bins where the
   cut falls, and only that is sorted. keys: the row's filter scratch (filter_bytes). */
static int race_filtered(const float *x, int V, float t, uint32_t row, const struct row_filter *f, uint64_t *keys) {
    const __m256 tv = _mm256_set1_ps(t);
    struct candidate *c;
    if (f->top_k && f->top_k <= SMALL_TOP_K) {
        long n = top_candidates(x, V, tv, f->top_k, keys, &c);
        return n ? race_list(c, cut(c, n, 0, 0, 0, f, _mm256_set1_ps(c[0].s)), row) : argmax(x, V, t);  /* 0: all NaN */
    }
    const int top = argmax(x, V, t);
    const __m256 smax = _mm256_set1_ps(x[top] / t);
    int count[BINS] = {0};
    double mass[BINS] = {0};
    const int weighed = f->top_p < 1;
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, 0, i, V, tv);
        int32_t bin[8];
        float w[8];
        _mm256_storeu_si256((__m256i *)bin, bins8(s, smax));
        if (weighed) _mm256_storeu_ps(w, exp8_nonpositive(_mm256_sub_ps(s, smax)));
        for (int j = 0; j < 8 && i + j < V; j++) {
            count[bin[j]]++;
            if (weighed) mass[bin[j]] += w[j];
        }
    }
    struct survivors k = {0, 0, 0, -1};
    cut_window(f, count, mass, &k.lo, &k.hi);
    long n = 0, base = 0;
    double base_mass = 0, total = 0;
    for (int b = 0; b < BINS; b++) {
        if (b < k.lo) base += count[b], base_mass += mass[b];
        total += mass[b];
    }
    const __m256i lo = _mm256_set1_epi32(k.lo - 1), hi = _mm256_set1_epi32(k.hi + 1);
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, 0, i, V, tv);
        __m256i bin = bins8(s, smax);
        int in = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(bin, lo),
                                                                          _mm256_cmpgt_epi32(hi, bin))));
        if (i + 8 > V) in &= (1 << (V - i)) - 1;  /* the -inf lanes past V, in the last bin, were not counted */
        if (!in) continue;
        float sv[8];
        _mm256_storeu_ps(sv, s);
        for (int j = 0; j < 8; j++)
            if (in >> j & 1) keys[n++] = order_key(sv[j], i + j);
    }
    if (!n && !k.lo) return top;  /* no bin kept whole, none in the window: every token -inf (a mask allowing none,
                                     in the last bin): greedy's token */
    const uint64_t *sorted = radix_sort(keys, keys + n, n);
    c = (struct candidate *)(keys + 2 * n);
    for (long r = 0; r < n; r++) c[r] = from_key(sorted[r]);
    const long kept = cut(c, n, base, base_mass, total, f, smax);
    if (!k.lo) return race_list(c, kept, row);
    if (kept < n) k.drop_s = c[kept].s, k.drop_id = c[kept].id;
    return race(x, V, t, row, top, &k);
}

/* What requests do to rows' logits: their penalties (sampler.Penalties), entries (row, token, output count) sorted by
   row, a row's tokens distinct, with every row's settings; then what they add (sampler.LogitAdjust): `biases` entries
   (row, token, value), sorted by row (each row's in their own order: ops/cpu/sample.py sorts them stably), and the
   `masks` rows under a token mask, each with its bitmask row of W words (bit t % 32 of word t / 32: token t
   allowed). */
struct adjust {
    const int64_t *penalty_rows, *penalty_tokens;
    const float *penalty_counts, *presence, *frequency, *repetition;
    long penalties;
    const int64_t *bias_rows, *bias_tokens;
    const float *bias_values;
    long biases;
    const int64_t *mask_rows;
    const int32_t *bitmask;
    int masks, W;
};

/* The first of n entries sorted by row that is not before row b (n where none is), by bisection. */
static long first_entry(const int64_t *rows, long n, long b) {
    long first = 0, last = n;
    while (first < last) {
        const long mid = first + (last - first) / 2;
        if (rows[mid] < b) first = mid + 1; else last = mid;
    }
    return first;
}

/* A seen token's logit penalised as sampler.apply_penalties does it, operation for operation: the repetition
   penalty, then minus frequency x count, then minus presence where it was generated. The barrier keeps the
   product a rounded fp32 of its own, as torch's: -O3 with FMA would fuse it into the subtraction. */
static inline float penalised(float v, float count, float presence, float frequency, float repetition) {
    v = v > 0 ? v / repetition : v * repetition;
    float product = frequency * count;
    __asm__("" : "+x"(product));
    v -= product;
    return v - presence * (count > 0 ? 1.0f : 0.0f);
}

/* Row b's x [V] as sampler.apply_penalties then apply_adjust leave it: x itself where no entry names the row, else
   y [V] (the row's own scratch) with the masked-out tokens at -inf, the seen tokens penalised and the biases added to
   the allowed ones. */
static const float *adjusted_row(const float *x, long b, int V, const struct adjust *a, float *y) {
    const int32_t *words = 0;
    for (int r = 0; r < a->masks; r++)
        if (a->mask_rows[r] == b) words = a->bitmask + (long)r * a->W;
    const long seen = first_entry(a->penalty_rows, a->penalties, b), first = first_entry(a->bias_rows, a->biases, b);
    const int penalised_row = seen < a->penalties && a->penalty_rows[seen] == b;
    if (!words && !penalised_row && (first == a->biases || a->bias_rows[first] != b)) return x;
    if (words) {
        const uint8_t *bytes = (const uint8_t *)words;  /* little-endian words: byte i / 8 holds tokens i..i+7 */
        const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        int i = 0;
        for (; i + 8 <= V; i += 8) {
            __m256i allowed = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bytes[i >> 3]), bit), bit);
            _mm256_storeu_ps(y + i, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(x + i),
                                                     _mm256_castsi256_ps(allowed)));
        }
        for (; i < V; i++) y[i] = bytes[i >> 3] >> (i & 7) & 1 ? x[i] : -INFINITY;
    } else {
        memcpy(y, x, (size_t)V * sizeof *y);
    }
    for (long j = seen; j < a->penalties && a->penalty_rows[j] == b; j++) {  /* a masked-out token stays -inf */
        const int64_t t = a->penalty_tokens[j];
        if (t >= 0 && t < V)
            y[t] = penalised(y[t], a->penalty_counts[j], a->presence[b], a->frequency[b], a->repetition[b]);
    }
    for (long j = first; j < a->biases && a->bias_rows[j] == b; j++) {  /* in entry order, as index_put adds them */
        const int64_t t = a->bias_tokens[j];
        if (t >= 0 && t < V && (!words || words[t >> 5] >> (t & 31) & 1))
            y[t] += a->bias_values[j];
    }
    return y;
}

/* A row's scratch, the filters' then the adjusted row's: bytes for V logits, whole cache lines each. The filters hold
   top_candidates' buffers or race_filtered's keys, their sorting's and candidates, for as many tokens as the row. */
static size_t filter_bytes(int V) {
    const size_t small = 2 * STREAM_CAPACITY * sizeof(uint64_t) + SMALL_TOP_K * sizeof(struct candidate);
    const size_t window = (size_t)V * (2 * sizeof(uint64_t) + sizeof(struct candidate));
    return ((small > window ? small : window) + 63) / 64 * 64;
}

static size_t row_scratch_bytes(int V) {
    return filter_bytes(V) + ((size_t)V * sizeof(float) + 63) / 64 * 64;
}

/* Shapes: see nanoqwen_cpu.h. */
void sample_scratch_bytes(int V, int threads, int64_t *bytes) {
    *bytes = (int64_t)threads * (int64_t)row_scratch_bytes(V);
}

struct sample_args {
    const float *logits, *temperature, *top_p, *min_p;
    const int32_t *top_k, *keys, *steps;
    struct adjust adjust;
    int64_t *tokens;
    int V, B;
    char *scratch;
    long next;  /* the next row a task claims */
};

static void sample_row(const struct sample_args *a, long b, char *scratch) {
    const int V = a->V;
    const float *x = adjusted_row(a->logits + b * V, b, V, &a->adjust, (float *)(scratch + filter_bytes(V)));
    if (a->temperature[b] == 0) {
        a->tokens[b] = argmax(x, V, 1.0f);
        return;
    }
    const float t = a->temperature[b] > MIN_TEMPERATURE ? a->temperature[b] : MIN_TEMPERATURE;
    const uint32_t row = mix32((uint32_t)a->keys[b] ^ mix32((uint32_t)a->steps[b]));
    const struct row_filter f = {a->top_k[b] > 0 && a->top_k[b] < V ? a->top_k[b] : 0, a->top_p[b], a->min_p[b]};
    if (f.top_k || f.top_p < 1 || f.min_p > 0) a->tokens[b] = race_filtered(x, V, t, row, &f, (uint64_t *)scratch);
    else a->tokens[b] = race(x, V, t, row, -1, &(struct survivors){BINS, 0, 0, -1});
}

/* Task `task` owns the task'th row scratch and samples the rows it claims, one at a time, until none is left: a thread
   never waits on rows a descheduled one has not claimed. */
static void sample_task(const void *args, long task) {
    struct sample_args *a = (struct sample_args *)args;
    char *scratch = a->scratch + task * row_scratch_bytes(a->V);
    for (long b; (b = __atomic_fetch_add(&a->next, 1, __ATOMIC_RELAXED)) < a->B;) sample_row(a, b, scratch);
}

/* One sample_rows at a time: its callers (engines on other threads) share the one scratch, and the pool's lock does not
   cover a call it runs on the caller alone (one row, or one thread). */
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;

static void scratch_lock_forked(void) {  /* the child of a fork has no other thread to hold it */
    pthread_mutex_init(&scratch_lock, 0);
}

__attribute__((constructor)) static void register_scratch_lock_forked(void) {
    pthread_atfork(0, 0, scratch_lock_forked);
}

/* Shapes: see nanoqwen_cpu.h. */
int sample_rows(const float *logits, const float *temperature, const float *top_p, const int32_t *top_k,
                const float *min_p, const int32_t *keys, const int32_t *steps, const int64_t *bias_rows,
                const int64_t *bias_tokens, const float *bias_values, long biases, const int64_t *mask_rows,
                const int32_t *bitmask, int masks, int W, const int64_t *penalty_rows, const int64_t *penalty_tokens,
                const float *penalty_counts, long penalties, const float *presence, const float *frequency,
                const float *repetition, int64_t *tokens, int B, int V, void *scratch, long scratch_bytes) {
    struct sample_args a = {logits, temperature, top_p, min_p, top_k, keys, steps,
                            {penalty_rows, penalty_tokens, penalty_counts, presence, frequency, repetition,
                             penalties, bias_rows, bias_tokens, bias_values, biases, mask_rows, bitmask, masks, W},
                            tokens, V, B, scratch, 0};
    const long scratches = scratch_bytes / (long)row_scratch_bytes(V);
    if (scratches < 1) return NANOQWEN_NO_MEMORY;  /* ops/cpu/sample.reserve sizes it: never from there */
    pthread_mutex_lock(&scratch_lock);
    nanoqwen_pool_run(sample_task, &a, B < scratches ? B : scratches);
    pthread_mutex_unlock(&scratch_lock);
    return 0;
}

struct argmax_args {
    const void *x;
    int64_t *tokens;
    int V, bf16;
};

/* argmax's with t = 1 inlined, whose division the compiler drops (x / 1 is x, bit for bit): the row is read at the
   memory's pace, bf16 at half fp32's bytes. */
static void argmax_row(const void *ctx, long b) {
    const struct argmax_args *a = ctx;
    const long at = b * a->V;
    a->tokens[b] = a->bf16 ? first_max((const uint16_t *)a->x + at, 1, a->V, 1.0f)
                           : first_max((const float *)a->x + at, 0, a->V, 1.0f);
}

/* Shapes: see nanoqwen_cpu.h. A row a pool chunk: batch 1's on the calling thread, which just wrote it (a row cut in
   ranges over the pool gained under 5 µs of its ~22 on the Zen 3, within the noise); batch 8's on both threads, the
   rows' first maxima as on one (profiles/RESULTS.md, lane splitb8_42). */
void argmax_rows(const void *logits, int64_t *tokens, int B, int V, int bf16) {
    const struct argmax_args a = {logits, tokens, V, bf16};
    nanoqwen_pool_run(argmax_row, &a, B);
}
