/* A batch-1 decode step's linears, int8 and int4, through the kernels' own entry points (linear_int8, linear_int4: so
   the loop each dispatches to on the CPU it runs on, AVX-512 VNNI or AVX2), their passes alternated so both formats see
   the same machine load. Not a test. Any x86-64 CPU with AVX2.

   Per format: the step's 113 calls (bf16 activations, 2 pieces; int4 groups of 64 with bf16 scales and offsets), each
   call's fastest of PASSES passes from memory (the step's matrices in huge pages, step_matrices.h: int8 0.6 GB, int4
   0.34 GB), summed by kind; each kind's read rate against the fastest kind's (quiet, the LM head's: one call of 155 /
   87 MB, its start-up nothing beside it), as µs a call beyond that rate (the call's start-up: its activations'
   preparation, the pool's hand-off, the tail); the median step; and each kind's serial cost hot, one weight row (one chunk: no hand-off), the
   part of a call no second thread shares.

   Build from the repository root (the kernels and pool are the ones measured):
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/b1_linears.c -o profiles/out/b1_linears ops/cpu/csrc/linear_int8.c ops/cpu/csrc/linear_int4.c ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=2 profiles/out/b1_linears [PASSES]   (default 9) */
#include <stdio.h>
#include <stdlib.h>

#include "nanoqwen_cpu.h"
#include "step_matrices.h"

#define FORMATS 2
#define HOT_CALLS 2000

static const char *const names[FORMATS] = {"int8", "int4"};
static const int bytes64[FORMATS] = {64, INT4_BYTES64};

static uint16_t x[3072], y[151936], row_scales[151936];

/* One call of format f on matrix w of shape sh: int4's scales and offsets follow its nibbles, int8's row scales are
   one shared array (2 bytes a row: not what the step's time is made of). */
static void call(int f, const char *w, const struct shape *sh, int N) {
    if (f == 0) {
        linear_int8(x, (const int8_t *)w, row_scales, y, 1, N, (int)sh->K, 1);
        return;
    }
    linear_int4(x, (const uint8_t *)w, int4_scales_of(w, sh), int4_offsets_of(w, sh), y, 1, N, (int)sh->K, INT4_GROUP, 1,
                2);
}

int main(int argc, char **argv) {
    const int passes = argc > 1 ? atoi(argv[1]) : 9;
    for (int k = 0; k < 3072; k++) x[k] = (uint16_t)((rand() & 1) << 15 | (0x3e00 + rand() % 0x200));
    for (int n = 0; n < 151936; n++) row_scales[n] = 0x3a00;
    char *buf[FORMATS];
    for (int f = 0; f < FORMATS; f++)
        if (!(buf[f] = step_buffer(bytes64[f]))) return fprintf(stderr, "no memory for the step's matrices\n"), 1;
    int4_scales_fill(buf[1]);
    static double best[FORMATS][CALLS], steps[FORMATS][64];
    for (int f = 0; f < FORMATS; f++)
        for (int c = 0; c < CALLS; c++) best[f][c] = 1e30;
    for (int p = 0; p < passes && p < 64; p++)
        for (int f = 0; f < FORMATS; f++) {
            int c = 0;
            const double start = now();
            EACH_MATRIX(buf[f], bytes64[f], s, sh, w, {
                const double t = now();
                call(f, w, sh, (int)sh->N);
                const double d = now() - t;
                best[f][c] = d < best[f][c] ? d : best[f][c];
                c++;
            });
            steps[f][p] = now() - start;
        }
    for (int f = 0; f < FORMATS; f++) {
        double kind_s[KINDS] = {0}, serial_s[KINDS];
        const char *first[KINDS] = {0};  /* each kind's first matrix: its int4 scales and offsets where call finds them */
        int c = 0;
        EACH_MATRIX(buf[f], bytes64[f], s, sh, w, {
            kind_s[s] += best[f][c++];
            first[s] = first[s] ? first[s] : w;
        });
        for (int s = 0; s < KINDS; s++) {  /* one weight row, hot: the call's own serial part */
            serial_s[s] = 1e30;
            for (int r = 0; r < 9; r++) {
                const double t = now();
                for (int i = 0; i < HOT_CALLS; i++) call(f, first[s], &shapes[s], 1);
                const double d = (now() - t) / HOT_CALLS;
                serial_s[s] = d < serial_s[s] ? d : serial_s[s];
            }
        }
        qsort(steps[f], passes < 64 ? passes : 64, sizeof(double), by_value);
        double top_rate = 0, total = 0, beyond = 0, bytes = 0;
        for (int s = 0; s < KINDS; s++) {
            const double rate = (double)shapes[s].N * shapes[s].K / 64 * bytes64[f] * shapes[s].layers / kind_s[s];
            top_rate = rate > top_rate ? rate : top_rate;
        }
        printf("%s: kind, calls, ms a step (fastest calls), GB/s, µs a call beyond the fastest kind's rate, serial µs hot\n",
               names[f]);
        for (int s = 0; s < KINDS; s++) {
            const double b = (double)shapes[s].N * shapes[s].K / 64 * bytes64[f] * shapes[s].layers;
            const double extra = (kind_s[s] - b / top_rate) / shapes[s].layers;
            printf("  %-8s %3d  %7.3f  %6.1f  %6.2f  %5.2f\n", shapes[s].name, shapes[s].layers, 1e3 * kind_s[s],
                   b / kind_s[s] / 1e9, 1e6 * extra, 1e6 * serial_s[s]);
            total += kind_s[s], bytes += b, beyond += extra * shapes[s].layers;
        }
        printf("  %d calls: %.3f ms (fastest calls), %.3f ms median step of %d passes, %.3f GB; beyond the fastest "
               "kind's rate %.3f ms\n", CALLS, 1e3 * total, 1e3 * steps[f][(passes < 64 ? passes : 64) / 2], passes,
               bytes / 1e9, 1e3 * beyond);
    }
    return 0;
}
