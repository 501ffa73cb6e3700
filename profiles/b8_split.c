/* How the kernels' two threads share a batch-8 decode step's linears: the step's 113 calls, int8 and int4 (bf16 rows;
   int4 groups of 64 with bf16 scales and offsets), through their entry points (so the loops each dispatches to on
   the CPU it runs on), the two formats' passes alternated. Each call is split into what the caller runs alone
   before the pool's job (the activations' quantisation) and after it (the out-of-range check), and the job, in which
   each chunk is timed on the thread that runs it. Not a test. Any x86-64 CPU with AVX2.

   Per format and matrix kind, ms a step (medians over PASSES passes from memory of each pass's sums over the
   kind's calls): the calls; the caller alone before and after the jobs; the jobs' wall time; each thread's time in
   chunks; the helper's start after each post; the caller's wait after its last chunk; the threads' idle share of
   the jobs (threads x the jobs' wall time, less their time in chunks, over the former). Robust to a loaded machine
   (whose other processes deschedule the helper): `cpu`, the chunks' CPU time on either thread, and `model`, the jobs
   as they would run quiet (modelled_job), with their idle share. OMP_NUM_THREADS 1 or 2 (one helper's chunks are
   timed): the step's CPU on one thread against two is how well they share it.

   Build from the repository root (the kernels and the pool are the ones measured; pool.c is included here with its
   entry point renamed, and the kernels call this file's wrapper of it):
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/b8_split.c -o profiles/out/b8_split ops/cpu/csrc/linear_int8.c ops/cpu/csrc/linear_int4.c -lm
   Run: OMP_NUM_THREADS=2 profiles/out/b8_split [PASSES [ROWS]]   (default 7 passes of 8 rows) */
#define nanoqwen_pool_run pool_run_untimed
#include "pool.c"
#undef nanoqwen_pool_run

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nanoqwen_cpu.h"
#include "step_matrices.h"

#define FORMATS 2
#define MAX_ROWS 16
#define MAX_PASSES 64

static const char *const names[FORMATS] = {"int8", "int4"};
static const int bytes64[FORMATS] = {64, INT4_BYTES64};

static uint16_t x[MAX_ROWS * 3072], y[MAX_ROWS * 151936], row_scales[151936];

/* ---- each chunk timed on the thread that runs it ---- */

static pthread_t caller;
static struct chunk_times {  /* [0] the caller, [1] the helper, a line each */
    double first, last, busy;
    long chunks;
} __attribute__((aligned(64))) times[2];
static pool_fn inner;
#define MAX_CHUNKS 2048
static double chunk_cpu[MAX_CHUNKS];  /* each chunk's CPU time on the thread that ran it */

static void timed_chunk(const void *ctx, long chunk) {
    struct chunk_times *t = &times[!pthread_equal(pthread_self(), caller)];
    const double start = now(), cpu = thread_cpu_now();
    if (!t->chunks) t->first = start;
    inner(ctx, chunk);
    if (chunk < MAX_CHUNKS) chunk_cpu[chunk] = thread_cpu_now() - cpu;
    t->last = now();
    t->busy += t->last - start;
    t->chunks++;
}

/* A job on a quiet machine, modelled: two threads of the measured chunks' CPU times, both starting at the post,
   claiming as pool.c's pool_work does (the thread whose clock is behind claims next, the caller first on a tie). */
static double modelled_job(long chunks) {
    double clock[2] = {0, 0};
    for (long next = 0; next < chunks;) {
        const int t = clock[1] < clock[0];
        const long take = pool_claim_size(chunks - next, 2);
        for (long c = next; c < next + take; c++) clock[t] += chunk_cpu[c];
        next += take;
    }
    return clock[0] > clock[1] ? clock[0] : clock[1];
}

enum { CALL, BEFORE, AFTER, JOB, CALLER, HELPER, START, WAIT, CPU, MODEL, METRICS };
static const char *const metric_names[METRICS] = {"call", "before", "after", "job", "caller", "helper", "start",
                                                  "wait", "cpu", "model"};
static double call_sums[METRICS], first_post, last_done;
static int jobs;

void nanoqwen_pool_run(pool_fn fn, const void *ctx, long chunks);
void nanoqwen_pool_run(pool_fn fn, const void *ctx, long chunks) {
    memset(times, 0, sizeof times);
    inner = fn;
    const double post = now();
    pool_run_untimed(timed_chunk, ctx, chunks);
    const double done = now();
    first_post = jobs++ ? first_post : post, last_done = done;
    call_sums[JOB] += done - post;
    call_sums[CALLER] += times[0].busy, call_sums[HELPER] += times[1].busy;
    if (times[1].chunks) call_sums[START] += times[1].first - post;
    if (times[0].chunks) call_sums[WAIT] += done - times[0].last;
    if (chunks <= MAX_CHUNKS) {
        for (long c = 0; c < chunks; c++) call_sums[CPU] += chunk_cpu[c];
        call_sums[MODEL] += modelled_job(chunks);
    }
}

/* One call of format f on matrix w of shape sh at `rows` rows, its parts added to sums[]. */
static void timed_call(int f, const char *w, const struct shape *sh, int rows, double sums[METRICS]) {
    memset(call_sums, 0, sizeof call_sums), jobs = 0;
    const double start = now();
    if (f == 0) {
        linear_int8(x, (const int8_t *)w, row_scales, y, rows, (int)sh->N, (int)sh->K, 1);
    } else {
        linear_int4(x, (const uint8_t *)w, int4_scales_of(w, sh), int4_offsets_of(w, sh), y, rows, (int)sh->N,
                    (int)sh->K, INT4_GROUP, 1, 2);
    }
    const double end = now();
    call_sums[CALL] = end - start;
    call_sums[BEFORE] = jobs ? first_post - start : 0, call_sums[AFTER] = jobs ? end - last_done : 0;
    for (int m = 0; m < METRICS; m++) sums[m] += call_sums[m];
}

int main(int argc, char **argv) {
    const int passes = argc > 1 && atoi(argv[1]) > 0 ? (atoi(argv[1]) < MAX_PASSES ? atoi(argv[1]) : MAX_PASSES) : 7;
    const int rows = argc > 2 && atoi(argv[2]) > 0 ? (atoi(argv[2]) < MAX_ROWS ? atoi(argv[2]) : MAX_ROWS) : 8;
    const int threads = omp_get_max_threads();
    if (threads > 2) return fprintf(stderr, "one or two threads (OMP_NUM_THREADS): one helper's chunks are timed\n"), 1;
    caller = pthread_self();
    for (int k = 0; k < MAX_ROWS * 3072; k++) x[k] = (uint16_t)((rand() & 1) << 15 | (0x3e00 + rand() % 0x200));
    for (int n = 0; n < 151936; n++) row_scales[n] = 0x3a00;
    char *buf[FORMATS];
    for (int f = 0; f < FORMATS; f++)
        if (!(buf[f] = step_buffer(bytes64[f]))) return fprintf(stderr, "no memory for the step's matrices\n"), 1;
    int4_scales_fill(buf[1]);
    static double sums[MAX_PASSES][FORMATS][KINDS + 1][METRICS];  /* [KINDS]: the step */
    for (int p = 0; p < passes; p++)
        for (int f = 0; f < FORMATS; f++)
            EACH_MATRIX(buf[f], bytes64[f], s, sh, w, timed_call(f, w, sh, rows, sums[p][f][s]));
    for (int p = 0; p < passes; p++)
        for (int f = 0; f < FORMATS; f++)
            for (int s = 0; s < KINDS; s++)
                for (int m = 0; m < METRICS; m++) sums[p][f][KINDS][m] += sums[p][f][s][m];
    for (int f = 0; f < FORMATS; f++) {
        printf("%s, %d rows, %d threads: ms a step, medians of %d passes; idle: the threads' idle share of the jobs\n",
               names[f], rows, threads, passes);
        printf("  %-8s", "kind");
        for (int m = 0; m < METRICS; m++) printf(" %8s", metric_names[m]);
        printf(" %6s %7s\n", "idle", "modelled");
        for (int s = 0; s <= KINDS; s++) {
            double med[METRICS], v[MAX_PASSES];
            for (int m = 0; m < METRICS; m++) {
                for (int p = 0; p < passes; p++) v[p] = sums[p][f][s][m];
                med[m] = median(v, passes);
            }
            printf("  %-8s", s < KINDS ? shapes[s].name : "step");
            for (int m = 0; m < METRICS; m++) printf(" %8.3f", 1e3 * med[m]);
            printf(" %5.1f%% %6.1f%%\n", 100 * (threads * med[JOB] - med[CALLER] - med[HELPER]) / (threads * med[JOB]),
                   100 * (2 * med[MODEL] - med[CPU]) / (2 * med[MODEL]));
        }
    }
    return 0;
}
