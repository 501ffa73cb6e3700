/* What the stand-alone A/B tools (ab_int8_row.c, ab_int4_row.c) share: a batch-1 step's weight matrices in one
   buffer of huge pages, every variant's outputs checked against the kernel's, then the variants timed over the step,
   alternated with the order rotated, and the report. Not a kernel header.

   A tool defines its variants (names[0]: the kernel, the reference of the check) and how one runs on a matrix, then
   calls ab_main from main. Each variant runs BLOCK passes in a row (environment, default 3; 1 times every pass,
   confounded by the pass before) and only the last counts: what a pass leaves in the L3 moves the next by up to
   ~10% on a machine whose L3 is about one pass. A variant whose name starts with "bound-" is not checked: a bound
   (work left out on purpose), not a candidate. Prints per variant: the pass's median and best, the sums over the
   step's 113 calls of each call's minimum and median (the minimum filters out time slices lost to other
   processes), and against the first variant named the median of the per-pass ratios and the passes it was faster
   in; the load average at the end. */
#ifndef NANOQWEN_PROFILES_AB_HARNESS_H
#define NANOQWEN_PROFILES_AB_HARNESS_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "step_matrices.h"

#define AB_MAX_PASSES 1000
#define AB_MAX_VARIANTS 32
#define AB_MAX_N 151936  /* the LM head's rows: the most outputs of a call */

struct ab_tool {
    const char *const *names;  /* the variants; names[0] the kernel */
    int count;
    int bytes64;  /* the buffer's bytes each 64 weights, their scales included (EACH_MATRIX) */
    void (*prepare)(char *buf);  /* after the buffer's random bytes (in -127..127): the tool's own parts; may be 0 */
    /* y ([sh->N] bf16) = one activation row against the matrix at w by variant i */
    void (*run)(int i, const char *w, const struct shape *sh, uint16_t *y);
};

static double ab_median(double *v, int n) {
    qsort(v, n, sizeof *v, by_value);
    return v[n / 2];
}

static int ab_main(const struct ab_tool *tool, int argc, char **argv) {
    const int passes = argc > 1 ? atoi(argv[1]) : 0, nv = argc - 2, block = getenv("BLOCK") ? atoi(getenv("BLOCK")) : 3;
    int chosen[AB_MAX_VARIANTS];
    if (passes < 1 || passes > AB_MAX_PASSES || nv < 1 || nv > AB_MAX_VARIANTS || block < 1) {
        fprintf(stderr, "usage: %s PASSES (1..%d) VARIANT...\n", argv[0], AB_MAX_PASSES);
        return 2;
    }
    for (int i = 0; i < nv; i++) {
        chosen[i] = -1;
        for (int j = 0; j < tool->count; j++)
            if (!strcmp(argv[2 + i], tool->names[j])) chosen[i] = j;
        if (chosen[i] < 0) {
            fprintf(stderr, "no variant %s; there are:", argv[2 + i]);
            for (int j = 0; j < tool->count; j++) fprintf(stderr, " %s", tool->names[j]);
            fprintf(stderr, "\n");
            return 2;
        }
    }
    long total = 0;
    for (int s = 0; s < KINDS; s++) total += shapes[s].N * shapes[s].K / 64 * tool->bytes64 * shapes[s].layers;
    srand(1);
    char *buf = step_buffer(tool->bytes64);
    if (!buf) return 1;
    if (tool->prepare) tool->prepare(buf);
    static uint16_t y[2][AB_MAX_N];
    EACH_MATRIX(buf, tool->bytes64, s, sh, w, {
        tool->run(0, w, sh, y[0]);
        for (int i = 0; i < nv; i++) {
            if (!strncmp(tool->names[chosen[i]], "bound-", 6)) continue;
            memset(y[1], 0xff, 2 * sh->N);  /* a variant that skips outputs must not pass on the last one's */
            tool->run(chosen[i], w, sh, y[1]);
            if (memcmp(y[0], y[1], 2 * sh->N)) {
                fprintf(stderr, "%s: outputs differ from %s's (%s)\n", tool->names[chosen[i]], tool->names[0],
                        sh->name);
                return 1;
            }
        }
    });
    static double pass[AB_MAX_VARIANTS][AB_MAX_PASSES], call[AB_MAX_VARIANTS][AB_MAX_PASSES][CALLS];
    for (int p = -1; p < passes; p++)  /* -1: a warm-up */
        for (int j = 0; j < nv; j++) {
            const int i = (j + (p < 0 ? 0 : p)) % nv;
            for (int r = 0; r < block; r++) {
                int c = 0;
                const double start = now();
                EACH_MATRIX(buf, tool->bytes64, s, sh, w, {
                    const double t = now();
                    tool->run(chosen[i], w, sh, y[1]);
                    if (p >= 0) call[i][p][c] = now() - t;
                    c++;
                });
                if (p >= 0) pass[i][p] = now() - start;
            }
        }
    double load[3] = {0};
    if (getloadavg(load, 3) < 0) load[0] = -1;
    printf("%d passes (block %d), load average %.2f %.2f %.2f at the end, %.3f GB of weights a pass\n", passes, block,
           load[0], load[1], load[2], total / 1e9);
    for (int i = 0; i < nv; i++) {
        static double v[AB_MAX_PASSES];
        double mins = 0, medians = 0;
        for (int c = 0; c < CALLS; c++) {
            for (int p = 0; p < passes; p++) v[p] = call[i][p][c];
            qsort(v, passes, sizeof *v, by_value);
            mins += v[0], medians += v[passes / 2];
        }
        int faster = 0;
        for (int p = 0; p < passes; p++) faster += pass[i][p] < pass[0][p], v[p] = pass[i][p] / pass[0][p];
        const double ratio = ab_median(v, passes);
        memcpy(v, pass[i], passes * sizeof *v);
        const double m = ab_median(v, passes);
        printf("%-24s pass median %6.2f ms (%4.1f GB/s), best %6.2f | calls: sum of minima %6.2f ms (%4.1f GB/s), "
               "of medians %6.2f ms | vs %s: ratio %.3f, faster in %d/%d\n",
               tool->names[chosen[i]], 1e3 * m, total / m / 1e9, 1e3 * v[0], 1e3 * mins, total / mins / 1e9,
               1e3 * medians, tool->names[chosen[0]], ratio, faster, passes);
    }
    return 0;
}

#endif
