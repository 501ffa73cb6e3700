/* Seeded sampling of whole rows of logits in one or two passes: the why is in ops/cpu/sample.py. */
#include "nanoqwen_cpu.h"
#include "simd.h"
#include "pool.h"

#define TOKEN_STRIDE 0x2545F491u
#define MIN_TEMPERATURE 1e-5f
/* -log(E) <= -log(-log(1 - 2^-24)) = 16.64 for every token (E: its Exp(1) noise): a token whose
   scaled logit is this far below a race value already scored can never win the race. */
#define NOISE_BOUND 17.0f
/* Logits binned by their distance below the row's maximum, in 1/BINS_PER_UNIT steps; the last bin
   takes everything further (and -inf). */
#define BINS_PER_UNIT 16
#define BINS 1024
/* Up to this top-k, a row with top-p takes its masses from the sorted top-k alone, skipping an exp a token. */
#define WEIGH_TOP_K 256

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

/* exp(x) for x <= 0 (Cephes expf); below -87 (and -inf): 0. */
static inline __m256 exp8(__m256 x) {
    __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)), live);
}

/* log E of 8 tokens' Exp(1) noise: the formulas of nanoqwen/sampler.py's exponential_noise. */
static inline __m256 log_noise8(uint32_t row, __m256i ids) {
    __m256i bits = mix32_8(_mm256_add_epi32(_mm256_set1_epi32((int)row),
                                            _mm256_mullo_epi32(ids, _mm256_set1_epi32((int)TOKEN_STRIDE))));
    __m256 top24 = _mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 8));
    __m256 uniform = _mm256_min_ps(_mm256_mul_ps(_mm256_add_ps(top24, _mm256_set1_ps(0.5f)),
                                                 _mm256_set1_ps(1.0f / (1 << 24))),
                                   _mm256_set1_ps(1.0f - 1.0f / (1 << 24)));
    return log8(_mm256_sub_ps(_mm256_setzero_ps(), log8(uniform)));
}

static inline __m256i iota8(int first) {
    return _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* 8 scaled logits from token i on; lanes past V read -inf. */
static inline __m256 scaled8(const float *x, int i, int V, __m256 t) {
    if (i + 8 <= V) return _mm256_div_ps(_mm256_loadu_ps(x + i), t);
    float pad[8];
    for (int j = 0; j < 8; j++) pad[j] = i + j < V ? x[i + j] : -INFINITY;
    return _mm256_div_ps(_mm256_loadu_ps(pad), t);
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

static int race_winner(const struct race *r) {  /* -1 when every value was -inf */
    float value[8];
    int32_t id[8];
    _mm256_storeu_ps(value, r->value);
    _mm256_storeu_si256((__m256i *)id, r->id);
    int best = -1;
    for (int j = 0; j < 8; j++)
        if (value[j] > -INFINITY && (best < 0 || value[j] > value[best] || (value[j] == value[best] && id[j] < id[best])))
            best = j;
    return best < 0 ? -1 : id[best];
}

/* The first maximum of x / t, as torch.argmax: with t = 1 the greedy token; else the first token of the
   filters' order (scaled logit descending, id ascending), which survives every filter. */
static int argmax(const float *x, int V, float t) {
    struct race r = {_mm256_set1_ps(-INFINITY), _mm256_setzero_si256()};
    const __m256 tv = _mm256_set1_ps(t);
    for (int i = 0; i < V; i += 8) race_add(&r, scaled8(x, i, V, tv), iota8(i));
    const int best = race_winner(&r);
    return best < 0 ? 0 : best;
}

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

static inline int members8(__m256 s, __m256i ids, __m256 smax, const struct survivors *k) {
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
    return _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(bulk, in)));
}

/* The exponential race over the survivors, skipping blocks with none or whose logits cannot beat the
   top token's own race value (the top token always survives). */
static int race(const float *x, int V, float t, uint32_t row, int top, const struct survivors *k) {
    const __m256 tv = _mm256_set1_ps(t);
    const __m256 smax = _mm256_set1_ps(x[top] / t);
    const __m256 floor = _mm256_sub_ps(_mm256_sub_ps(smax, log_noise8(row, _mm256_set1_epi32(top))),
                                       _mm256_set1_ps(NOISE_BOUND));
    struct race r = {_mm256_set1_ps(-INFINITY), _mm256_setzero_si256()};
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, i, V, tv);
        int live = _mm256_movemask_ps(_mm256_cmp_ps(s, floor, _CMP_GT_OQ));
        if (!live) continue;
        __m256i ids = iota8(i);
        if (k->lo < BINS && !(live &= members8(s, ids, smax, k))) continue;
        __m256 value = _mm256_sub_ps(s, log_noise8(row, ids));
        __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
            _mm256_and_si256(_mm256_set1_epi32(live), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128)), _mm256_setzero_si256()));
        race_add(&r, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), value, mask), ids);
    }
    const int winner = race_winner(&r);
    return winner < 0 ? top : winner;
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

static __thread void *scratch;
static __thread size_t scratch_bytes;

static void *scratch_buffer(size_t bytes) {  /* this thread's buffer, grown but never shrunk */
    if (bytes > scratch_bytes) {
        free(scratch);
        scratch = malloc(bytes);
        scratch_bytes = scratch ? bytes : 0;
    }
    return scratch;
}

struct row_filter {
    int top_k;  /* 0 = off */
    float top_p, min_p;  /* 1 / 0 = off */
};

/* The first bin whose cumulative mass reaches `target`. */
static int mass_bin(const double *mass, double target) {
    double cum = 0;
    for (int b = 0; b < BINS - 1; b++)
        if ((cum += mass[b]) >= target) return b;
    return BINS - 1;
}

/* The window of bins [lo, hi] where the filters' cut can fall: every token before it survives, none
   after it does. With top-k, hi is the bin of the k-th token (top-p then needs the masses of all k). */
static void cut_window(const struct row_filter *f, const int *count, const double *mass, int weighed, int *lo, int *hi) {
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
    if (f->top_p < 1 && !weighed) *lo = 0;  /* a small top-k: its masses come from the sorted window */
    if (f->top_p < 1 && weighed) {
        double inside = 0, below = 0;  /* mass of bins < hi and of bins <= hi: the top-k's total lies between */
        for (int b = 0; b < BINS; b++) {
            if (b < *hi || !f->top_k) inside += mass[b];
            if (b <= *hi || !f->top_k) below += mass[b];
        }
        int first = mass_bin(mass, f->top_p * inside);
        *lo = first < *lo ? first : *lo;
        if (!f->top_k) {
            int last = mass_bin(mass, f->top_p * below);
            while (last < BINS - 1 && !count[last + 1]) last++;
            last = last < BINS - 1 ? last + 1 : last;  /* the token after the mass: its before may be < top_p */
            *hi = last < *hi ? last : *hi;
        }
    }
    if (*hi < *lo) *hi = *lo;
}

/* Top-k, then top-p, then min-p, as sampler._filter_sorted defines them on the sorted row: binning by
   distance below the maximum (with the softmax masses where top-p needs them) finds the window of bins
   where the cut falls; only those are sorted. -> the survivors. */
static struct survivors filter_row(const float *x, int V, float t, int top, const struct row_filter *f) {
    const __m256 tv = _mm256_set1_ps(t);
    const __m256 smax = _mm256_set1_ps(x[top] / t);
    int count[BINS] = {0};
    double mass[BINS] = {0};
    const int weighed = f->top_p < 1 && (!f->top_k || f->top_k > WEIGH_TOP_K);
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, i, V, tv);
        int32_t bin[8];
        float w[8];
        _mm256_storeu_si256((__m256i *)bin, bins8(s, smax));
        if (weighed) _mm256_storeu_ps(w, exp8(_mm256_sub_ps(s, smax)));
        for (int j = 0; j < 8 && i + j < V; j++) {
            count[bin[j]]++;
            if (weighed) mass[bin[j]] += w[j];
        }
    }
    struct survivors k = {0, 0, 0, -1};
    cut_window(f, count, mass, weighed, &k.lo, &k.hi);
    long n = 0, base = 0;
    double base_mass = 0, total = 0;
    for (int b = 0; b < BINS; b++) {
        if (b < k.lo) base += count[b], base_mass += mass[b];
        else if (b <= k.hi) n += count[b];
        total += mass[b];
    }
    uint64_t *keys = scratch_buffer((size_t)(n + 1) * (2 * sizeof *keys + sizeof(struct candidate)));
    if (!keys) return (struct survivors){BINS, 0, 0, -1};  /* out of memory: unfiltered */
    n = 0;
    const __m256i lo = _mm256_set1_epi32(k.lo - 1), hi = _mm256_set1_epi32(k.hi + 1);
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, i, V, tv);
        __m256i bin = bins8(s, smax);
        int in = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_and_si256(_mm256_cmpgt_epi32(bin, lo),
                                                                          _mm256_cmpgt_epi32(hi, bin))));
        if (!in) continue;
        float sv[8];
        _mm256_storeu_ps(sv, s);
        for (int j = 0; j < 8; j++)
            if (in >> j & 1) keys[n++] = order_key(sv[j], i + j);
    }
    const uint64_t *sorted = radix_sort(keys, keys + n, n);
    struct candidate *c = (struct candidate *)(keys + 2 * n);
    for (long r = 0; r < n; r++) c[r] = from_key(sorted[r]);
    for (long r = 0; r < n; r += 8) {
        float sv[8], w[8];
        for (int j = 0; j < 8; j++) sv[j] = r + j < n ? c[r + j].s : -INFINITY;
        _mm256_storeu_ps(w, exp8(_mm256_sub_ps(_mm256_loadu_ps(sv), smax)));
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
        if (drop) {
            k.drop_s = c[r].s;
            k.drop_id = c[r].id;
            return k;
        }
        before += c[r].w;
    }
    return k;
}

struct sample_args {
    const float *logits, *temperature, *top_p, *min_p;
    const int32_t *top_k, *keys, *steps;
    int64_t *tokens;
    int V;
};

static void sample_row(const void *args, long b) {
    const struct sample_args *a = args;
    const float *x = a->logits + b * a->V;
    const int V = a->V;
    if (a->temperature[b] == 0) {
        a->tokens[b] = argmax(x, V, 1.0f);
        return;
    }
    const float t = a->temperature[b] > MIN_TEMPERATURE ? a->temperature[b] : MIN_TEMPERATURE;
    const uint32_t row = mix32((uint32_t)a->keys[b] ^ mix32((uint32_t)a->steps[b]));
    const struct row_filter f = {a->top_k[b] > 0 && a->top_k[b] < V ? a->top_k[b] : 0, a->top_p[b], a->min_p[b]};
    const int top = argmax(x, V, t);
    const struct survivors all = {BINS, 0, 0, -1};
    const struct survivors k = f.top_k || f.top_p < 1 || f.min_p > 0 ? filter_row(x, V, t, top, &f) : all;
    a->tokens[b] = race(x, V, t, row, top, &k);
}

/* Shapes: see nanoqwen_cpu.h. */
void sample_rows(const float *logits, const float *temperature, const float *top_p, const int32_t *top_k,
                 const float *min_p, const int32_t *keys, const int32_t *steps, int64_t *tokens, int B, int V) {
    const struct sample_args a = {logits, temperature, top_p, min_p, top_k, keys, steps, tokens, V};
    pool_run(sample_row, &a, B);
}
