/* Issue 12's idea, bounded before it is built: in a batch-1 decode step the pool's helper spins idle while the caller
   runs the serial kernels between two linears (the norms, rope, attention, silu_mul: ~0.95 ms a fast int8 step); could
   it read the rows of the NEXT linear that it will compute, so that its share comes from its own caches? Not a test.
   Needs AVX-512 VNNI.

   The step's 113 int8 1-row linears (linear_int8's own loop and pieces, bf16, 2 pieces), each after a serial window of
   its kind's length (window_us: the caller reads its kernels' cold bytes, then spins), on a two-thread scheme of this
   tool's own: the caller claims the call's chunks from the front, the helper from the back (a CAS on one word holding
   both ends; neither waits for a chunk the other has not claimed, as in pool.c). Variants, alternated pass by pass:
   - `none`: the helper spins through the window (yielding every 64 pauses, as pool.c's);
   - `busy`: it spins without yielding (on its core when the call comes, as a pre-reading helper is);
   - `load`: it reads the call's chunks from the last one back, a line at a time, until the window ends or it has read
     half the call (its share), then claims from the back what it read first;
   - `prefetch`: the same with prefetcht1 (to its L2) instead of loads;
   - `whole`: the bound of the idea: the helper reads its whole share (half the call) by loads, the caller waits for
     it after its window, and the call is timed from then (its window's wait left out);
   - `pool`: the kernels' own pool (pool.c, its helper spinning through the window), this tool's helper parked.
   Each round prints the core pair's round trip before and after it (the speed state, core_pair.h), then per variant
   the step's best and median pass and its windows' median (a window the helper's reads slowed runs over), the sum of
   each call's fastest pass (its window and its linear: the minimum filters out time slices lost to other processes),
   MB pre-read a step (whole chunks), and per kind that fastest call, µs.

   Exit status 3 where a variant's outputs differ from the pool's (a chunk run twice or not at all).

   Build from the repository root:
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/preread_bound.c -o profiles/out/preread_bound -lm -lpthread
   Run: OMP_NUM_THREADS=2 profiles/out/preread_bound [ROUNDS [PASSES]]   (default 4 rounds of 40 passes, 10 a variant) */
#define _GNU_SOURCE
#include "linear_int8.c"
#include "pool.c"  /* pool_claim_size: the claims are the pool's */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "core_pair.h"
#include "step_matrices.h"

/* The caller's serial window before each kind's call, µs (profiles/RESULTS.md, step34's int8 map, a step's ms over its
   calls): rms_norm before qkv, gate_up and the LM head; qk_norm_rope_store + decode_attention before o; silu_mul
   before down. In it the caller first reads its kernels' cold bytes from a ring larger than the L3s (attention: a
   layer's bf16 K and V at 40 positions; the others their rows and norm weights), then spins to the window's end. */
static const double window_us[KINDS] = {1.6, 18.6, 1.6, 3.2, 1.6};
static const long window_bytes[KINDS] = {8L << 10, 164L << 10, 8L << 10, 12L << 10, 8L << 10};
#define RING_BYTES (256L << 20)
static char *ring;
static long ring_at;

/* The caller's window before a call of kind s; how long it took, s (more than window_us where its reads ran over). */
static double serial_window(int s) {
    const double start = now();
    __m256i sum = _mm256_setzero_si256();
    for (long i = 0; i < window_bytes[s]; i += 64, ring_at = (ring_at + 64) % RING_BYTES)
        sum = _mm256_or_si256(sum, _mm256_load_si256((const __m256i *)(ring + ring_at)));
    __asm__ volatile("" ::"x"(sum));
    while (now() - start < window_us[s] * 1e-6) _mm_pause();
    return now() - start;
}

enum { NONE, BUSY, LOAD, PREFETCH, WHOLE, POOL, VARIANTS };
static const char *const variant_names[VARIANTS] = {"none", "busy", "load", "prefetch", "whole", "pool"};

enum { IDLE, PREREAD, LINEAR, PARK, QUIT };
static struct {
    unsigned seq;  /* a new job each increment */
    int what, variant;
    const struct linear_int8_args *a;
    long chunks;
} __attribute__((aligned(64))) post;
static uint64_t ends __attribute__((aligned(64)));  /* lo << 32 | hi: the caller's next chunk, the helper's last + 1 */
static struct {
    long finished;     /* chunks the helper finished of the current call */
    uint64_t preread;  /* the PREREAD job's seq << 32 | the chunks it read (from the back): a helper descheduled
                          through a call stores its count late, under its own seq */
} __attribute__((aligned(64))) helper_state;

static inline unsigned posted(void) { return __atomic_load_n(&post.seq, __ATOMIC_ACQUIRE); }

/* Reads chunks from the last back, up to half of them, until the job changes; how many it read whole. */
static long preread(const struct linear_int8_args *a, long chunks, int variant, unsigned seq) {
    __m256i sum = _mm256_setzero_si256();
    long c = chunks - 1;
    for (; c >= chunks - chunks / 2; c--) {
        const char *from = (const char *)(a->w + c * a->rows * a->K);
        const long bytes = (pool_chunk_end(c, a->rows, a->N) - c * a->rows) * a->K;
        for (long at = 0; at < bytes; at += 4096) {
            if (posted() != seq) goto out;
            for (long i = at; i < at + 4096 && i < bytes; i += 64)
                if (variant != PREFETCH) sum = _mm256_or_si256(sum, _mm256_load_si256((const __m256i *)(from + i)));
                else _mm_prefetch(from + i, _MM_HINT_T1);
        }
    }
out:
    __asm__ volatile("" ::"x"(sum));
    return chunks - 1 - c;
}

/* Claims from the front (the caller) or the back (the helper) until the ends meet; chunks run. */
static long claim_and_run(const struct linear_int8_args *a, int back) {
    long ran = 0;
    for (uint64_t w = __atomic_load_n(&ends, __ATOMIC_ACQUIRE);;) {
        const long lo = (long)(w >> 32), hi = (long)(uint32_t)w;
        if (lo >= hi) return ran;
        const long take = pool_claim_size(hi - lo, 2), first = back ? hi - take : lo;
        const uint64_t next = back ? w - (uint64_t)take : w + ((uint64_t)take << 32);
        if (!__atomic_compare_exchange_n(&ends, &w, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) continue;
        for (long c = first; c < first + take; c++) linear_int8_vnni_row(a, c);
        ran += take;
        w = next;
    }
}

static void *helper(void *unused) {
    (void)unused;
    for (unsigned seen = 0;;) {
        unsigned seq;
        for (unsigned spins = 1; (seq = posted()) == seen; spins++)
            if (spins % 64) _mm_pause();
            else sched_yield();  /* as pool.c's helper: another runnable thread on this core runs first */
        seen = seq;
        if (post.what == QUIT) return 0;
        while (post.what == PARK && posted() == seq) syscall(SYS_futex, &post.seq, FUTEX_WAIT_PRIVATE, seq, 0, 0, 0);
        if (post.what == PREREAD && post.variant == BUSY)
            while (posted() == seq) _mm_pause();
        if (post.what == PREREAD && (post.variant == LOAD || post.variant == PREFETCH || post.variant == WHOLE))
            __atomic_store_n(&helper_state.preread,
                             (uint64_t)seq << 32 | (uint64_t)preread(post.a, post.chunks, post.variant, seq),
                             __ATOMIC_RELEASE);
        if (post.what == LINEAR) __atomic_fetch_add(&helper_state.finished, claim_and_run(post.a, 1), __ATOMIC_RELEASE);
    }
}

/* Posts a job; its seq. */
static unsigned publish(int what, int variant, const struct linear_int8_args *a, long chunks) {
    const int parked = post.what == PARK;
    post.what = what, post.variant = variant, post.a = a, post.chunks = chunks;
    const unsigned seq = __atomic_add_fetch(&post.seq, 1, __ATOMIC_RELEASE);
    if (parked) syscall(SYS_futex, &post.seq, FUTEX_WAKE_PRIVATE, 1, 0, 0, 0);
    return seq;
}

/* The chunks the helper pre-read for the PREREAD job `seq`: 0 until it has stored them. */
static long preread_for(unsigned seq) {
    const uint64_t v = __atomic_load_n(&helper_state.preread, __ATOMIC_ACQUIRE);
    return (unsigned)(v >> 32) == seq ? (long)(uint32_t)v : 0;
}

static uint16_t x[3072], scale[151936], y[151936];

/* One call after its window; returns the seconds of both, adds the chunks pre-read and the window's seconds. */
static double step_call(const int8_t *w, int s, int variant, long *preread_chunks, double *window) {
    static __attribute__((aligned(64))) int8_t q[2 * 3072];
    static __attribute__((aligned(64))) float qscale[2];
    static __attribute__((aligned(64))) int32_t lanes[2 * 16];
    const struct shape *sh = &shapes[s];
    static struct linear_int8_args a;
    a = (struct linear_int8_args){0, q, qscale, lanes, w, scale, y, 1, (int)sh->N, (int)sh->K, PIECES_BF16, 1,
                                  pool_rows_per_chunk(sh->K), 0};
    const long chunks = (sh->N + a.rows - 1) / a.rows;
    const unsigned pre = variant != POOL ? publish(PREREAD, variant, &a, chunks) : 0;
    double start = now();
    *window += serial_window(s);
    if (variant == WHOLE) {  /* the bound: the helper's whole share read before the call, however long that takes */
        while (preread_for(pre) != chunks / 2) _mm_pause();
        start = now();
    }
    int wild;
    act_quant_rows(x, 1, 1, (int)sh->K, PIECES_BF16, q, qscale, &wild);
    lane_offsets(q, PIECES_BF16, (int)sh->K, lanes);
    if (variant == POOL) {  /* the kernels' own pool, this tool's helper parked */
        nanoqwen_pool_run(linear_int8_vnni_row, &a, chunks);
        return now() - start;
    }
    __atomic_store_n(&helper_state.finished, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&ends, (uint64_t)chunks, __ATOMIC_RELEASE);
    publish(LINEAR, variant, &a, chunks);
    const long mine = claim_and_run(&a, 0);
    for (unsigned spins = 1; __atomic_load_n(&helper_state.finished, __ATOMIC_ACQUIRE) != chunks - mine; spins++)
        if (spins % 1024) _mm_pause();
        else sched_yield();
    *preread_chunks += preread_for(pre);
    return now() - start;
}

int main(int argc, char **argv) {
    const int rounds = argc > 1 ? atoi(argv[1]) : 4, passes = argc > 2 ? atoi(argv[2]) : 40;
    if (!has_avx512_vnni() || rounds < 1 || passes < VARIANTS || passes > 300) return 2;
    char *buf = step_buffer(64);
    if (!buf) return 1;
    for (int i = 0; i < 3072; i++) x[i] = f32_to_bf16((float)(rand() % 2001 - 1000) / 300.0f);
    for (int i = 0; i < 151936; i++) scale[i] = f32_to_bf16(0.01f + (float)(rand() % 100) * 1e-4f);
    ring = mmap(0, RING_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ring == MAP_FAILED) return 1;
    memset(ring, 1, RING_BYTES);
    pthread_t t;
    if (pthread_create(&t, 0, helper, 0) != 0) return 1;
    {  /* every chunk runs once on the two-ended claims: each variant's outputs are the pool's, bit for bit */
        static uint16_t want[151936];
        long pre = 0;
        double window = 0;
        EACH_MATRIX(buf, 64, s, sh, w, for (int v = VARIANTS - 1; v >= 0; v--) {
            publish(v == POOL ? PARK : IDLE, v, 0, 0);
            memset(y, 0xff, sizeof y);
            step_call((const int8_t *)w, s, v, &pre, &window);
            if (v == POOL) memcpy(want, y, sizeof y);
            else if (memcmp(want, y, sh->N * sizeof *y) != 0) return 3;
        });
    }
    for (int r = 0; r < rounds; r++) {
        const double before = core_pair_best_ns(10);
        static double step[VARIANTS][300], windows[VARIANTS][300], fastest[VARIANTS][CALLS];
        double mb[VARIANTS] = {0};
        int n[VARIANTS] = {0};
        for (int v = 0; v < VARIANTS; v++)
            for (int c = 0; c < CALLS; c++) fastest[v][c] = 1e9;
        for (int p = 0; p < passes; p++) {
            const int v = p % VARIANTS;
            long pre = 0;
            int c = 0;
            double window = 0;
            publish(v == POOL ? PARK : IDLE, v, 0, 0);
            const double start = now();
            EACH_MATRIX(buf, 64, s, sh, w, const double took = step_call((const int8_t *)w, s, v, &pre, &window);
                        if (took < fastest[v][c]) fastest[v][c] = took; c++);
            windows[v][n[v]] = window;
            step[v][n[v]++] = now() - start;
            mb[v] += (double)pre * POOL_CHUNK_BYTES / 1e6;  /* whole chunks of 128 KB (the LM head's: 128 rows) */
        }
        const double after = core_pair_best_ns(10);
        double load[3];
        printf("round %d, core pair %.0f / %.0f ns, load %.2f\n", r, before, after,
               getloadavg(load, 3) < 0 ? -1.0 : load[0]);
        for (int v = 0; v < VARIANTS; v++) {
            double kinds[KINDS] = {0}, linears = 0;
            int c = 0;
            EACH_MATRIX((char *)0, 64, s, sh, w, (void)w; kinds[s] += fastest[v][c]; linears += fastest[v][c]; c++);
            qsort(step[v], n[v], sizeof **step, by_value), qsort(windows[v], n[v], sizeof **windows, by_value);
            printf("  %-8s step best %.3f median %.3f ms (windows median %.3f); calls %.3f ms; pre-read %.1f MB a step; "
                   "µs a call:", variant_names[v], step[v][0] * 1e3, step[v][n[v] / 2] * 1e3, windows[v][n[v] / 2] * 1e3,
                   linears * 1e3, mb[v] / n[v]);
            for (int s = 0; s < KINDS; s++) printf(" %s %.1f", shapes[s].name, kinds[s] / shapes[s].layers * 1e6);
            printf("\n");
        }
        fflush(stdout);
    }
    publish(QUIT, 0, 0, 0);
    pthread_join(t, 0);
    return 0;
}
