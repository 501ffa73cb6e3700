/* What the C profiling tools (stream_ceiling.c, ab_harness.h's tools) share: a Qwen3-0.6B batch-1 decode step's weight
   matrices in step order (each layer's 4, then the LM head), and their clock. Not a kernel header. */
#ifndef NANOQWEN_PROFILES_STEP_MATRICES_H
#define NANOQWEN_PROFILES_STEP_MATRICES_H

#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

struct shape {
    const char *name;
    long N, K;
    int layers;
};
static const struct shape shapes[] = {{"qkv", 4096, 1024, 28}, {"o", 1024, 2048, 28}, {"gate_up", 6144, 1024, 28},
                                      {"down", 1024, 3072, 28}, {"lm_head", 151936, 1024, 1}};
#define KINDS 5
#define CALLS (4 * 28 + 1) /* the step's linears */
#define PAGE 4096L          /* each matrix starts on a page, as nanoqwen/hugepages.py's ALIGN places the weights */

/* The body (the last argument, commas and all) for each of the step's matrices in step order: s its kind (an index into shapes), sh its shape, w its first
   byte, `bytes64` bytes each 64 weights (their scales included) after `buf`. */
#define EACH_MATRIX(buf, bytes64, s, sh, w, ...) do { \
        char *w = (buf); \
        for (int layer_ = 0; layer_ <= 28; layer_++) \
            for (int s = layer_ < 28 ? 0 : 4; s < (layer_ < 28 ? 4 : 5); s++) { \
                const struct shape *sh = &shapes[s]; \
                __VA_ARGS__; \
                w += (sh->N * sh->K / 64 * (bytes64) + PAGE - 1) / PAGE * PAGE; \
            } \
    } while (0)

/* The bytes from the step's first matrix to its last one's end (`bytes64` bytes each 64 weights), as EACH_MATRIX
   places them. */
static inline long step_bytes(int bytes64) {  /* inline: not every tool uses it */
    long bytes = 0;
    EACH_MATRIX((char *)0, bytes64, s, sh, w, bytes = (long)w + sh->N * sh->K / 64 * bytes64);
    return bytes;
}

/* An int4 matrix in these buffers: groups of INT4_GROUP weights, INT4_BYTES64 bytes each 64 weights: 32 of nibbles,
   then (after all the nibbles) a bf16 scale and offset each group. */
#define INT4_GROUP 64
#define INT4_BYTES64 36

/* An int4 matrix w's [N][K / INT4_GROUP] bf16 scales, after its nibbles, and as many offsets after them. */
static inline const uint16_t *int4_scales_of(const char *w, const struct shape *sh) {
    return (const uint16_t *)(w + sh->N * sh->K / 2);
}
static inline const uint16_t *int4_offsets_of(const char *w, const struct shape *sh) {
    return int4_scales_of(w, sh) + sh->N * sh->K / INT4_GROUP;
}

/* The int4 matrices' scales and offsets in the step's buffer `buf` (INT4_BYTES64) as small bf16 values (random bytes
   would hold NaNs and infinities). */
static inline void int4_scales_fill(char *buf) {
    EACH_MATRIX(buf, INT4_BYTES64, s, sh, w, {
        uint16_t *scale = (uint16_t *)int4_scales_of(w, sh);
        for (long i = 0; i < 2 * sh->N * sh->K / INT4_GROUP; i++) scale[i] = (uint16_t)(0x3a00 + rand() % 0x200);
    });
}

/* `bytes` of 2 MB pages, 2 MB aligned (never unmapped); 0 where they cannot be mapped. */
static inline char *huge_pages(long bytes) {
    char *p = mmap(0, bytes + (2L << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 0;
    p = (char *)(((uintptr_t)p + (2L << 20) - 1) & ~((2L << 20) - 1));
    madvise(p, bytes, MADV_HUGEPAGE);
    return p;
}

/* The step's matrices (`bytes64` bytes each 64 weights) in one buffer of 2 MB pages, each byte random in -127..127; 0
   where it cannot be mapped. */
static inline char *step_buffer(int bytes64) {
    const long bytes = step_bytes(bytes64);
    char *buf = huge_pages(bytes);
    if (!buf) return 0;
    for (long i = 0; i < bytes; i++) buf[i] = (char)(rand() % 255 - 127);
    return buf;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static inline double thread_cpu_now(void) {  /* the calling thread's CPU time: other processes' slices left out */
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int by_value(const void *a, const void *b) {  /* qsort's, for doubles */
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static inline double median(double *v, int n) {  /* sorts v */
    qsort(v, n, sizeof *v, by_value);
    return v[n / 2];
}

#endif
