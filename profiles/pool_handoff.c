/* What a job's hand-off through the kernels' pool (ops/cpu/csrc/pool.c) costs at batch 1, in each speed state of the
   2-core Zen 5 KVM (profiles/RESULTS.md, step35: the host holds the two vCPUs on one CCD, ~77 ns a cache line's round
   trip, or on two, ~340 ns). Not a test. Needs AVX-512 VNNI.

   Each round prints the round trip before and after it (core_pair.h's measure, in this process), then:
   - empty jobs: the pool's round trip for a job of 2 chunks that do nothing (the caller spins 5 µs between jobs, so the
     helper is spinning, as between a step's linears), how often the helper ran a chunk, and the time from the post
     to the helper's chunk where it did;
   - the step's 113 int8 1-row linears (linear_int8's own loop and pieces, bf16, 2 pieces), each chunk timed on the
     thread that runs it: per call, the helper's first chunk after the post, the caller's wait after its own last
     chunk, the helper's share of the chunks; and each kind's read rate from each call's fastest of PASSES passes (the
     minimum filters out time slices lost to other processes), against the LM head's (one call of 155 MB: its hand-off is nothing beside it), so that a kind's time above the LM head's
     rate is what a call costs beyond streaming its weights.

   Build from the repository root (the kernel's loop and pool are the ones measured):
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/pool_handoff.c -o profiles/out/pool_handoff ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=2 profiles/out/pool_handoff [ROUNDS [PASSES]]   (default 6 rounds of 5 passes) */
#define _GNU_SOURCE  /* the affinity calls */
#include "linear_int8.c"

#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core_pair.h"
#include "step_matrices.h"

#define EMPTY_JOBS 2000
#define GAP_S 5e-6  /* the caller's work between two empty jobs */

/* ---- each chunk timed on the thread that runs it ---- */

static pthread_t caller;
static struct thread_times {  /* [0] the caller, [1] the helper, a line each; the caller clears both before a job,
                                 so the helper's is one line more that it fetches from the other vCPU */
    double first, last;
    long chunks;
} __attribute__((aligned(64))) times[2];
static pool_fn inner;

static void timed_chunk(const void *ctx, long chunk) {
    struct thread_times *t = &times[!pthread_equal(pthread_self(), caller)];
    const double start = now();
    if (!t->chunks) t->first = start;
    if (inner) inner(ctx, chunk);
    t->last = now();
    t->chunks++;
}

struct call_times {
    double helper_delay, caller_wait;  /* sums over the calls the helper joined / all calls, s */
    long joined, calls, helper_chunks, chunks;
};

/* Runs `fn` on `chunks` chunks through the pool, timed, adding to `sum`. */
static void timed_run(pool_fn fn, const void *ctx, long chunks, struct call_times *sum) {
    memset(times, 0, sizeof times);
    if (inner != fn) inner = fn;  /* written only when it changes: else one more line the helper fetches a call */
    const double post = now();
    nanoqwen_pool_run(timed_chunk, ctx, chunks);
    const double done = now();
    if (times[1].chunks) sum->helper_delay += times[1].first - post, sum->joined++;
    sum->caller_wait += times[0].chunks ? done - times[0].last : 0;
    sum->helper_chunks += times[1].chunks, sum->chunks += chunks, sum->calls++;
}

/* ---- the step's linears, as linear_int8 runs them at one bf16 row ---- */

static uint16_t x[3072], scale[151936], y[151936];

static void step_linear(const int8_t *w, int N, int K, struct call_times *sum) {
    static __attribute__((aligned(64))) int8_t q[2 * 3072];
    static __attribute__((aligned(64))) float qscale[2];
    static __attribute__((aligned(64))) int32_t lanes[2 * 16];
    int wild;
    act_quant_rows(x, 1, 1, K, PIECES_BF16, q, qscale, &wild);
    lane_offsets(q, PIECES_BF16, K, lanes);
    const struct linear_int8_args a = {0, q, qscale, lanes, w, scale, y, 1, N, K, PIECES_BF16, 1, pool_rows_per_chunk(K),
                                       0};
    timed_run(linear_int8_vnni_row, &a, (N + a.rows - 1) / a.rows, sum);
}

int main(int argc, char **argv) {
    const int rounds = argc > 1 ? atoi(argv[1]) : 6, passes = argc > 2 ? atoi(argv[2]) : 5;
    if (!has_avx512_vnni() || rounds < 1 || passes < 1) return 2;
    caller = pthread_self();
    char *buf = step_buffer(64);
    if (!buf) return 1;
    for (int i = 0; i < 3072; i++) x[i] = f32_to_bf16((float)(rand() % 2001 - 1000) / 300.0f);
    for (int i = 0; i < 151936; i++) scale[i] = f32_to_bf16(0.01f + (float)(rand() % 100) * 1e-4f);
    for (int r = 0; r < rounds; r++) {
        const double before = core_pair_best_ns(10);
        static double job[EMPTY_JOBS], delay[EMPTY_JOBS];
        int joined = 0;
        for (int i = 0; i < EMPTY_JOBS; i++) {
            for (const double gap = now(); now() - gap < GAP_S;) _mm_pause();
            struct call_times one = {0};
            const double start = now();
            timed_run(0, 0, 2, &one);
            job[i] = now() - start;
            if (one.joined) delay[joined++] = one.helper_delay;
        }
        qsort(job, EMPTY_JOBS, sizeof *job, by_value), qsort(delay, joined, sizeof *delay, by_value);
        double best = 1e9, fastest[CALLS], kinds[KINDS] = {0};  /* each call's fastest pass; their sums by kind */
        for (int c = 0; c < CALLS; c++) fastest[c] = 1e9;
        struct call_times sum = {0};
        for (int p = 0; p < passes; p++) {
            const double start = now();
            int c = 0;
            EACH_MATRIX(buf, 64, s, sh, w, const double t = now(); step_linear((const int8_t *)w, (int)sh->N, (int)sh->K, &sum);
                        const double took = now() - t; if (took < fastest[c]) fastest[c] = took; c++);
            const double took = now() - start;
            if (took < best) best = took;
        }
        {
            int c = 0;
            EACH_MATRIX(buf, 64, s, sh, w, kinds[s] += fastest[c++]);
        }
        const double after = core_pair_best_ns(10);
        printf("round %d, core pair %.0f / %.0f ns\n  empty job: median %.2f µs, p90 %.2f; the helper ran a chunk in "
               "%d/%d, post -> its chunk median %.2f µs\n", r, before, after, job[EMPTY_JOBS / 2] * 1e6,
               job[EMPTY_JOBS * 9 / 10] * 1e6, joined, EMPTY_JOBS, joined ? delay[joined / 2] * 1e6 : -1.0);
        printf("  linears: best pass %.3f ms; per call: the helper joined %ld/%ld, post -> its first chunk %.2f µs, "
               "the caller's wait after its last %.2f µs; the helper's share %.2f\n", best * 1e3, sum.joined,
               sum.calls, sum.joined ? sum.helper_delay / sum.joined * 1e6 : -1.0, sum.caller_wait / sum.calls * 1e6,
               (double)sum.helper_chunks / sum.chunks);
        const double head_rate = shapes[4].N * shapes[4].K / kinds[4];
        for (int s = 0; s < KINDS; s++) {
            const double call = kinds[s] / shapes[s].layers, bytes_call = (double)shapes[s].N * shapes[s].K;
            printf("  %-8s %6.3f ms, %5.1f GB/s, %7.1f µs a call, %5.2f µs a call beyond the LM head's rate\n",
                   shapes[s].name, kinds[s] * 1e3, bytes_call / call / 1e9, call * 1e6,
                   (call - bytes_call / head_rate) * 1e6);
        }
        double load[3];
        printf("  load %.2f\n", getloadavg(load, 3) < 0 ? -1.0 : load[0]);
        fflush(stdout);
    }
    return 0;
}
