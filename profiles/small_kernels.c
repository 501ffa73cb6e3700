/* A decode step's small kernels at ROWS rows (rms_norm, qk_norm_rope_store, silu_mul, the logits' widening to fp32 and
   the greedy argmax), Qwen3-0.6B's shapes in bf16, each call timed alone: its wall time and the calling thread's CPU
   time (which leaves out the pool helper's share). Before each call a prefill-sized silu_mul (2,048 x 3,072, on the
   pool) evicts the caches, as the step's streamed weights do, and keeps the helper spinning; the argmax follows the
   widening, as a step with logprobs runs them, and the argmax of the bf16 logits follows that (read last, as the LM
   head wrote them last in a greedy step). Prints per kernel the median and the 2nd percentile of both over CALLS calls,
   then the load average. Not a test. Any x86-64 CPU with AVX2.

   Which chunks a call gives the pool is the tree's (csrc/pool.h): for an A/B, build the same line in a checkout of
   the other revision and alternate the two binaries. On a loaded 2-core machine the helper rarely gets a core within
   a call of tens of µs, so both trees measure the caller alone; `chrt -f 5` (root) runs them as on a quiet machine,
   and takes both cores from every other process for the run (keep CALLS small).

   Build from the repository root:
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/small_kernels.c -o profiles/out/small_kernels ops/cpu/csrc/norm_rope.c ops/cpu/csrc/pointwise.c ops/cpu/csrc/sample.c ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=2 profiles/out/small_kernels [ROWS [CALLS]]   (default 8 rows, 200 calls) */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "nanoqwen_cpu.h"
#include "model_shape.h"

#define MAX_ROWS 32
#define MAX_CALLS 2000
#define FLUSH_ROWS 2048
#define EPS 1e-6f

enum { NORM, QK, SILU, WIDEN, ARGMAX, ARGMAX16, OPS };
static const char *const op_names[OPS] = {"rms_norm", "qk_norm_rope_store", "silu_mul", "bf16_to_fp32",
                                          "argmax_rows", "argmax_rows bf16"};

static uint16_t hidden[MAX_ROWS * HIDDEN], normed[MAX_ROWS * HIDDEN], residual[MAX_ROWS * HIDDEN],
    qkv[MAX_ROWS * (HQ + 2 * HKV) * D], gate_up[MAX_ROWS * 2 * INTER], act[MAX_ROWS * INTER],
    logits16[MAX_ROWS * VOCAB], norm_w[HIDDEN], q_w[D], k_w[D], kc[MAX_ROWS * HKV * D], vc[MAX_ROWS * HKV * D];
static float logits[MAX_ROWS * VOCAB], cos_sin[MAX_ROWS * D];
static int64_t tokens[MAX_ROWS];
static int32_t positions[MAX_ROWS], slots[MAX_ROWS];
static uint16_t *flush_in, *flush_out;

static double clock_s(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static uint16_t small_bf16(void) { return (uint16_t)((rand() & 1) << 15 | (0x3d00 + rand() % 0x300)); }

static void run_op(int op, int rows) {
    const long row = (HQ + 2 * HKV) * D;
    switch (op) {
    case NORM:
        rms_norm(hidden, residual, norm_w, normed, residual, rows, HIDDEN, EPS, 1);
        break;
    case QK:
        qk_norm_rope_store(qkv, qkv + HQ * D, qkv + (HQ + HKV) * D, q_w, k_w, EPS, cos_sin, positions, kc, vc, slots,
                           rows, HQ, HKV, D, row, row, row, 1);
        break;
    case SILU:
        silu_mul(gate_up, act, rows, INTER, 1);
        break;
    case WIDEN:
        bf16_to_fp32(logits16, logits, (long)rows * VOCAB);
        break;
    case ARGMAX:
        argmax_rows(logits, tokens, rows, VOCAB, 0);
        break;
    default:  /* a greedy step's: the LM head's bf16 logits as they are, no widening */
        argmax_rows(logits16, tokens, rows, VOCAB, 1);
    }
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double nth(double *v, int n, int at) {
    qsort(v, (size_t)n, sizeof *v, by_value);
    return v[at];
}

int main(int argc, char **argv) {
    const int rows = argc > 1 ? atoi(argv[1]) : 8, calls = argc > 2 ? atoi(argv[2]) : 200;
    if (rows < 1 || rows > MAX_ROWS || calls < 1 || calls > MAX_CALLS)
        return fprintf(stderr, "usage: %s [ROWS (1..%d) [CALLS (1..%d)]]\n", argv[0], MAX_ROWS, MAX_CALLS), 2;
    flush_in = calloc((size_t)FLUSH_ROWS * 2 * INTER, 2), flush_out = calloc((size_t)FLUSH_ROWS * INTER, 2);
    if (!flush_in || !flush_out) return fprintf(stderr, "no memory for the flush\n"), 1;
    for (int i = 0; i < MAX_ROWS * HIDDEN; i++) hidden[i] = small_bf16(), residual[i] = small_bf16();
    for (int i = 0; i < MAX_ROWS * (HQ + 2 * HKV) * D; i++) qkv[i] = small_bf16();
    for (int i = 0; i < MAX_ROWS * 2 * INTER; i++) gate_up[i] = small_bf16();
    for (long i = 0; i < (long)MAX_ROWS * VOCAB; i++) logits16[i] = small_bf16();
    for (int i = 0; i < HIDDEN; i++) norm_w[i] = 0x3f80;  /* 1.0 */
    for (int i = 0; i < D; i++) q_w[i] = k_w[i] = 0x3f80;
    for (int i = 0; i < MAX_ROWS * D; i++) cos_sin[i] = (float)(i % D) / D;
    for (int i = 0; i < MAX_ROWS; i++) positions[i] = i, slots[i] = i;
    static double wall[OPS][MAX_CALLS], cpu[OPS][MAX_CALLS];
    for (int c = 0; c < calls; c++)
        for (int op = 0; op < OPS; op++) {
            if (op < ARGMAX) silu_mul(flush_in, flush_out, FLUSH_ROWS, INTER, 1);
            const double c0 = clock_s(CLOCK_THREAD_CPUTIME_ID), t0 = clock_s(CLOCK_MONOTONIC);
            run_op(op, rows);
            wall[op][c] = clock_s(CLOCK_MONOTONIC) - t0;
            cpu[op][c] = clock_s(CLOCK_THREAD_CPUTIME_ID) - c0;
        }
    printf("%d rows, %d calls; kind: µs a call wall / caller CPU, median (2nd percentile)\n", rows, calls);
    for (int op = 0; op < OPS; op++)
        printf("  %-19s %7.1f / %7.1f  (%7.1f / %7.1f)\n", op_names[op], 1e6 * nth(wall[op], calls, calls / 2),
               1e6 * nth(cpu[op], calls, calls / 2), 1e6 * nth(wall[op], calls, calls / 50),
               1e6 * nth(cpu[op], calls, calls / 50));
    double load[3];
    if (getloadavg(load, 3) == 3) printf("token %ld; load average at the end: %.2f %.2f %.2f\n", (long)tokens[0],
                                         load[0], load[1], load[2]);
    return 0;
}
