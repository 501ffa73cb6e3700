/* What the C linears' thread pool can stream at all: a decode step's weight matrices (Qwen3-0.6B, batch 1, in
   step order, 28 layers + the LM head, a fresh buffer in huge pages, 0.6-1.2 GB: at least a large L3), read either by
   the kernels themselves or by a plain loop of vector loads through the same pool and chunking. Not a test.

   Build against one kernel's source (its pool is the one measured), from the repository root:
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc -DKERNEL_C='"linear.c"' -DWBYTES=2 profiles/stream_ceiling.c -o profiles/out/sc_bf16 ops/cpu/csrc/pool.c -lm
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc -DKERNEL_C='"linear_int8.c"' -DWBYTES=1 -DINT8 profiles/stream_ceiling.c -o profiles/out/sc_int8 ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=2 profiles/out/sc_bf16 PASSES MODE
     MODE 0: the kernel (linear / linear_int8, 1 bf16 activation row)
          1: plain read, the pool's 128 KB chunks, a software prefetch every 128 bytes, 2 KB ahead
          2: plain read, the pool's chunks, no software prefetch
          3: plain read, each matrix in two contiguous halves (one a thread), no software prefetch
   ROWS=N: N activation rows (mode 0). GAP_US=N: the calling thread busy for N µs before each call (outside the
   timing), as a step's other ops are between its linears. OFFSET=N: each matrix starts N bytes past a 4 KB page
   (nanoqwen/hugepages.py's ALIGN), N taken modulo 4096 and rounded down to 64 (the loads are aligned). HOT=1: each
   call made twice in a row and the second timed, its weights where the first left them (L2/L3): a kind whose time is
   the same streamed and hot is bound by its loop, not the memory. CLOCK=cpu: the calling thread's CPU time, not the
   wall (with OMP_NUM_THREADS=1 on a loaded machine: time slices lost to other processes left out).
   Prints the CPU's widest vector ISA (which of linear_int8's loops runs), then ms and GB/s per matrix kind and for the
   step's linears (minimum and median over the passes). */
#include KERNEL_C
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "step_matrices.h"

#define MAX_PASSES 64

struct plain_read {
    const char *w;
    long rows, N, row_bytes;
    int prefetch;
    float *sink;
};

static void read_chunk(const void *ctx, long chunk) {
    const struct plain_read *a = ctx;
    const long end = pool_chunk_end(chunk, a->rows, a->N);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (const char *p = a->w + chunk * a->rows * a->row_bytes; p < a->w + end * a->row_bytes; p += 128) {
        if (a->prefetch) __builtin_prefetch(p + 2048);
        s0 = _mm256_add_ps(s0, _mm256_load_ps((const float *)p));
        s1 = _mm256_add_ps(s1, _mm256_load_ps((const float *)(p + 32)));
        s2 = _mm256_add_ps(s2, _mm256_load_ps((const float *)(p + 64)));
        s3 = _mm256_add_ps(s3, _mm256_load_ps((const float *)(p + 96)));
    }
    a->sink[chunk & 15] += hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

static void report(const char *name, double *t, int passes, long bytes) {
    qsort(t, passes, sizeof(double), by_value);
    printf("  %-8s min %7.2f ms (%4.1f GB/s)  median %7.2f ms (%4.1f GB/s)\n", name, 1e3 * t[0], bytes / t[0] / 1e9,
           1e3 * t[passes / 2], bytes / t[passes / 2] / 1e9);
}

#ifdef INT8
static uint16_t scale[151936];
#endif

static void run_kernel(const uint16_t *x, const char *w, uint16_t *y, int M, long N, long K) {
#ifdef INT8
    linear_int8(x, (const int8_t *)w, scale, y, M, N, K, 1);
#else
    linear(x, w, y, M, N, K, 1);
#endif
}

int main(int argc, char **argv) {
    const int passes = argc > 1 ? atoi(argv[1]) : 10;
    const int mode = argc > 2 ? atoi(argv[2]) : 0;
    const int M = getenv("ROWS") ? atoi(getenv("ROWS")) : 1, gap_us = getenv("GAP_US") ? atoi(getenv("GAP_US")) : 0;
    const long offset = getenv("OFFSET") ? atol(getenv("OFFSET")) % PAGE / 64 * 64 : 0;
    const int hot = getenv("HOT") && atoi(getenv("HOT"));
    const int cpu_clock = getenv("CLOCK") && !strcmp(getenv("CLOCK"), "cpu");
    double (*clock_now)(void) = cpu_clock ? thread_cpu_now : now;
    if (passes < 1 || passes > MAX_PASSES) {
        fprintf(stderr, "PASSES must be 1..%d\n", MAX_PASSES);
        return 2;
    }
    if (M < 1 || M > 8) {
        fprintf(stderr, "ROWS must be 1..8\n");
        return 2;
    }
    long total = 0, bytes[KINDS];
    for (int s = 0; s < KINDS; s++) total += bytes[s] = shapes[s].N * shapes[s].K * WBYTES * shapes[s].layers;
    const long footprint = total + CALLS * PAGE;  /* room for each matrix's start on a page plus the offset */
    const long huge = 2L << 20;
    char *base = mmap(0, footprint + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return 1;
    char *buf = (char *)(((uintptr_t)base + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(buf, footprint, MADV_HUGEPAGE);
    for (long i = 0; i < footprint; i++) buf[i] = WBYTES == 1 ? (char)(i % 7 - 3) : (char)(i & 1 ? 0x3c : i % 251);
    static uint16_t x[8 * 3072], y[8 * 151936];
    for (int i = 0; i < 8 * 3072; i++) x[i] = 0x3f80;  /* bf16 1.0 */
#ifdef INT8
    for (int i = 0; i < 151936; i++) scale[i] = 0x3c00;
#endif
    float sink[16] = {0};
    double t[KINDS][MAX_PASSES], step[MAX_PASSES];
    for (int p = 0; p < passes; p++) {
        double per[KINDS] = {0};
        EACH_MATRIX(buf + offset, 64 * WBYTES, s, sh, w, {
            const long row_bytes = sh->K * WBYTES;
            for (const double g = now(); now() - g < gap_us * 1e-6;) _mm_pause();
            double start = 0;
            for (int again = 0; again <= hot; again++) {
                start = clock_now();
                if (mode == 0) {
                    run_kernel(x, w, y, M, sh->N, sh->K);
                } else {
                    const long rows = mode == 3 ? (sh->N + 1) / 2 : pool_rows_per_chunk(row_bytes);
                    const struct plain_read r = {w, rows, sh->N, row_bytes, mode == 1, sink};
                    nanoqwen_pool_run(read_chunk, &r, (sh->N + rows - 1) / rows);
                }
            }
            per[s] += clock_now() - start;
        });
        step[p] = 0;
        for (int s = 0; s < KINDS; s++) step[p] += t[s][p] = per[s];
    }
    printf("mode %d, %d activation row(s), %.3f GB of weights a step, %d passes, %s, %s clock; CPU: %s\n", mode, M,
           total / 1e9, passes, hot ? "hot" : "streamed", cpu_clock ? "thread cpu" : "wall",
           has_avx512_vnni() ? "AVX-512 VNNI" : has_avx512() ? "AVX-512 without VNNI" : "AVX2 (no AVX-512)");
    for (int s = 0; s < KINDS; s++) report(shapes[s].name, t[s], passes, bytes[s]);
    report("step", step, passes, total);
    return sink[0] == 12345.0f;  /* the sums are used */
}
