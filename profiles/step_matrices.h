/* What the C profiling tools (stream_ceiling.c, ab_int8_row.c) share: a Qwen3-0.6B batch-1 decode step's weight
   matrices in step order (each layer's 4, then the LM head), and their clock. Not a kernel header. */
#ifndef NANOQWEN_PROFILES_STEP_MATRICES_H
#define NANOQWEN_PROFILES_STEP_MATRICES_H

#include <time.h>

struct shape {
    const char *name;
    long N, K;
    int layers;
};
static const struct shape shapes[] = {{"qkv", 4096, 1024, 28}, {"o", 1024, 2048, 28}, {"gate_up", 6144, 1024, 28},
                                      {"down", 1024, 3072, 28}, {"lm_head", 151936, 1024, 1}};
#define KINDS 5

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int by_value(const void *a, const void *b) {  /* qsort's, for doubles */
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#endif
