/* What the 1- and 8-row A/B tools (ab_int8_rows.c, ab_int4_rows.c) share: their activations, the calling thread's
   CPU clock and a median. Not a kernel header; included after the kernel's source (its bf16 helpers). */
#ifndef NANOQWEN_PROFILES_AB_ROWS_H
#define NANOQWEN_PROFILES_AB_ROWS_H

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define MAXM 8
#define MAXK 3072

/* MAXM rows of MAXK bf16 activations in [-1, 1], a few channels 20x (outliers), the same each run. */
static void ab_rows_activations(uint16_t *x) {
    srand(1);
    for (int i = 0; i < MAXM * MAXK; i++) {
        float v = (float)(rand() % 20001 - 10000) / 10000.0f;
        if (i % 397 == 5) v *= 20.0f;
        x[i] = f32_to_bf16(v);
    }
}

/* The calling thread's CPU seconds. */
static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int by_value(const void *p, const void *q) {
    const double x = *(const double *)p, z = *(const double *)q;
    return x < z ? -1 : x > z;
}

/* v's median; v is left sorted. */
static double median(double *v, int n) {
    qsort(v, n, sizeof *v, by_value);
    return v[n / 2];
}

#endif
