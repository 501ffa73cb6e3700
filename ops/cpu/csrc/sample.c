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

static int argmax(const float *x, int V) {  /* the first maximum, as torch.argmax */
    int best = 0;
    for (int i = 1; i < V; i++)
        if (x[i] > x[best]) best = i;
    return best;
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

static int race_winner(const struct race *r, int fallback) {
    float value[8];
    int32_t id[8];
    _mm256_storeu_ps(value, r->value);
    _mm256_storeu_si256((__m256i *)id, r->id);
    int best = -1;
    for (int j = 0; j < 8; j++)
        if (value[j] > -INFINITY && (best < 0 || value[j] > value[best] || (value[j] == value[best] && id[j] < id[best])))
            best = j;
    return best < 0 ? fallback : id[best];
}

/* An unfiltered row: the race over the whole vocabulary, skipping blocks of tokens that cannot
   beat the maximum logit's own race value. */
static int race_vocabulary(const float *x, int V, float t, uint32_t row) {
    const int top = argmax(x, V);
    const __m256 tv = _mm256_set1_ps(t);
    struct race r = {_mm256_set1_ps(-INFINITY), _mm256_setzero_si256()};
    __m256 first = _mm256_set1_ps(x[top] / t);
    first = _mm256_sub_ps(first, log_noise8(row, _mm256_set1_epi32(top)));
    const __m256 floor = _mm256_sub_ps(first, _mm256_set1_ps(NOISE_BOUND));
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, i, V, tv);
        if (!_mm256_movemask_ps(_mm256_cmp_ps(s, floor, _CMP_GT_OQ))) continue;
        __m256i ids = iota8(i);
        race_add(&r, _mm256_sub_ps(s, log_noise8(row, ids)), ids);
    }
    return race_winner(&r, top);
}

struct candidate {
    float s, w;  /* scaled logit, exp(s - the row's maximum) */
    int32_t id;
};

static int by_logit(const void *a, const void *b) {  /* descending, ties by ascending id */
    const struct candidate *x = a, *y = b;
    if (x->s != y->s) return x->s < y->s ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

static __thread struct candidate *scratch;
static __thread long scratch_size;

static struct candidate *candidates(long n) {  /* this thread's buffer, grown but never shrunk */
    if (n > scratch_size) {
        free(scratch);
        scratch = malloc((size_t)n * sizeof *scratch);
        scratch_size = scratch ? n : 0;
    }
    return scratch;
}

static inline __m256i bins8(__m256 s, __m256 smax) {
    __m256 d = _mm256_mul_ps(_mm256_sub_ps(smax, s), _mm256_set1_ps((float)BINS_PER_UNIT));
    return _mm256_cvttps_epi32(_mm256_min_ps(d, _mm256_set1_ps((float)(BINS - 1))));  /* +inf, NaN -> last */
}

struct row_filter {
    int top_k;  /* 0 = off */
    float top_p, min_p;  /* 1 / 0 = off */
};

/* The last bin the sort needs: with top-k, the one holding the k-th token (top-p and min-p then cut
   among those k, whose masses they need); else the one past top-p's mass (the next token may still
   survive, as it does when the mass before it is below top_p), or min-p's cut, whichever comes first. */
static int last_bin(const struct row_filter *f, const int *count, const double *mass, double total) {
    long n = 0;
    if (f->top_k) {
        for (int b = 0; b < BINS - 1; b++)
            if ((n += count[b]) >= f->top_k) return b;
        return BINS - 1;
    }
    int last = BINS - 1;
    if (f->min_p > 0) {  /* exp(s - smax) < min_p is dropped; one bin more for rounding */
        float d = -logf(f->min_p) * BINS_PER_UNIT + 1;
        last = d < 0 ? 0 : d < last ? (int)d : last;
    }
    double cum = 0;
    for (int b = 0; b < last && f->top_p < 1; b++) {
        if ((cum += mass[b]) >= f->top_p * total) {
            while (b + 1 < last && !count[b + 1]) b++;
            return b + 1;
        }
    }
    return last;
}

/* A filtered row: bins every token by its distance below the maximum, sorts only the bins the filters can
   keep, cuts top-k, then top-p, then min-p on them exactly as sampler._filter_sorted does, and races the rest. */
static int race_filtered(const float *x, int V, float t, uint32_t row, const struct row_filter *f) {
    const __m256 tv = _mm256_set1_ps(t);
    const __m256 smax = _mm256_set1_ps(x[argmax(x, V)] / t);
    int count[BINS] = {0};
    double mass[BINS] = {0};
    const int weigh = f->top_p < 1 && !f->top_k;  /* masses over the whole vocabulary */
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, i, V, tv);
        int32_t bin[8];
        float w[8];
        _mm256_storeu_si256((__m256i *)bin, bins8(s, smax));
        if (weigh) _mm256_storeu_ps(w, exp8(_mm256_sub_ps(s, smax)));
        for (int j = 0; j < 8 && i + j < V; j++) {
            count[bin[j]]++;
            if (weigh) mass[bin[j]] += w[j];
        }
    }
    double total = 0;
    for (int b = 0; b < BINS; b++) total += mass[b];
    const int last = last_bin(f, count, mass, total);
    long n = 0;
    for (int b = 0; b <= last; b++) n += count[b];
    struct candidate *c = candidates(n);
    if (!c) return argmax(x, V);
    n = 0;
    const __m256i lastv = _mm256_set1_epi32(last);
    for (int i = 0; i < V; i += 8) {
        __m256 s = scaled8(x, i, V, tv);
        int keep = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_add_epi32(lastv, _mm256_set1_epi32(1)),
                                                                              bins8(s, smax))));
        if (!keep) continue;
        float sv[8];
        _mm256_storeu_ps(sv, s);
        for (int j = 0; j < 8; j++)
            if (keep >> j & 1) c[n++] = (struct candidate){sv[j], 0, i + j};
    }
    qsort(c, (size_t)n, sizeof *c, by_logit);
    if (f->top_k && n > f->top_k) n = f->top_k;
    for (long r = 0; r < n; r += 8) {
        float sv[8], w[8];
        for (int j = 0; j < 8; j++) sv[j] = r + j < n ? c[r + j].s : -INFINITY;
        _mm256_storeu_ps(w, exp8(_mm256_sub_ps(_mm256_loadu_ps(sv), _mm256_set1_ps(c[0].s))));
        for (int j = 0; j < 8 && r + j < n; j++) c[r + j].w = w[j];
    }
    if (f->top_k) {
        total = 0;
        for (long r = 0; r < n; r++) total += c[r].w;
    }
    long kept = n;
    double before = 0;
    for (long r = 1; r < n && kept == n; r++) {
        before += c[r - 1].w;
        if ((f->top_p < 1 && before >= f->top_p * total) || c[r].w < f->min_p * c[0].w) kept = r;
    }
    struct race race = {_mm256_set1_ps(-INFINITY), _mm256_setzero_si256()};
    for (long r = 0; r < kept; r += 8) {
        float sv[8];
        int32_t ids[8];
        for (int j = 0; j < 8; j++) {
            sv[j] = r + j < kept ? c[r + j].s : -INFINITY;
            ids[j] = r + j < kept ? c[r + j].id : 0;
        }
        __m256i idv = _mm256_loadu_si256((const __m256i *)ids);
        race_add(&race, _mm256_sub_ps(_mm256_loadu_ps(sv), log_noise8(row, idv)), idv);
    }
    return race_winner(&race, c[0].id);
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
        a->tokens[b] = argmax(x, V);
        return;
    }
    const float t = a->temperature[b] > MIN_TEMPERATURE ? a->temperature[b] : MIN_TEMPERATURE;
    const uint32_t row = mix32((uint32_t)a->keys[b] ^ mix32((uint32_t)a->steps[b]));
    const struct row_filter f = {a->top_k[b] > 0 && a->top_k[b] < V ? a->top_k[b] : 0, a->top_p[b], a->min_p[b]};
    if (f.top_k || f.top_p < 1 || f.min_p > 0) a->tokens[b] = race_filtered(x, V, t, row, &f);
    else a->tokens[b] = race_vocabulary(x, V, t, row);
}

/* Shapes: see nanoqwen_cpu.h. */
void sample_rows(const float *logits, const float *temperature, const float *top_p, const int32_t *top_k,
                 const float *min_p, const int32_t *keys, const int32_t *steps, int64_t *tokens, int B, int V) {
    const struct sample_args a = {logits, temperature, top_p, min_p, top_k, keys, steps, tokens, V};
    pool_run(sample_row, &a, B);
}
