/* linear_int4's outputs on random cases, as raw bytes on stdout, so that two source trees' kernels are compared bit
   for bit (a rewrite of a loop that promises the same bits): shapes M 1-16 (8 a third of the time), K 64-3200 (K % 256
   != 0 among them), G 64/128/256/K, N 1-700 or 8 q + 0..8 (whole and partial passes of 8 weight rows), bf16 and fp32
   rows (their runtime pieces: 2 and 4, ops/cpu/linear_int4.py), a third of the cases with inf/NaN/1e30/subnormal/±0
   among the activations (1 in 500) and the group scales (1 in 50). The cases follow from the seed alone; each case's
   shape goes to stderr. Not a test.

   Build from the repository root, once from each tree (its ops/cpu/csrc in both places below: this one's, or
   another checkout's, e.g. a `git worktree add` of the base revision; the tool itself from this tree):
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/int4_bits.c -o profiles/out/int4_bits ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=1 profiles/out/int4_bits [CASES 300 [SEED 0]] > out.bin; then `cmp` the two builds' outputs. */
#include "linear_int4.c"

#include <stdio.h>

static uint64_t state = 88172645463325252ull;

static uint64_t next(void) {  /* xorshift64 */
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return state;
}

static float uniform(void) { return (float)((next() >> 11) * 0x1p-53) * 2.0f - 1.0f; }

static float special(void) {
    static const float values[] = {INFINITY, -INFINITY, NAN, 0.0f, -0.0f, 1e30f, 1e-40f};
    const uint64_t i = next() % 12;
    return i < 7 ? values[i] : uniform() * 100;
}

/* v into element i of an fp32 or bf16 (truncated) array */
static void put(void *p, long i, float v, int bf16) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if (bf16) ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
    else ((float *)p)[i] = v;
}

int main(int argc, char **argv) {
    const int cases = argc > 1 ? atoi(argv[1]) : 300;
    state += argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
    static const int Ks[] = {64, 128, 256, 320, 512, 768, 1024, 1088, 2048, 3072, 3200};
    static const int Gs[] = {64, 64, 128, 256, 0};
    for (int t = 0; t < cases; t++) {
        const int M = next() % 3 == 0 ? 8 : 1 + (int)(next() % 16), K = Ks[next() % 11];
        int G = Gs[next() % 5];
        if (G == 0 || K % G) G = next() % 2 ? K : 64;
        const int N = next() % 2 ? 1 + (int)(next() % 700) : 8 * (1 + (int)(next() % 40)) + (int)(next() % 9);
        const int bf16 = next() % 4 != 0, groups = K / G, odd = next() % 3 == 0;
        const size_t size = bf16 ? 2 : 4;
        uint8_t *w = malloc((size_t)N * K / 2), *quad = malloc((size_t)2 * K);
        char *x = malloc((size_t)M * K * size), *scale = malloc((size_t)N * groups * size);
        char *offset = malloc((size_t)N * groups * size), *y = malloc((size_t)M * N * size);
        for (long i = 0; i < (long)N * K / 2; i++) w[i] = (uint8_t)next();
        linear_int4_pack(w, quad, N, K);
        const float span = next() % 2 ? 1.0f : 1e-3f;
        for (long i = 0; i < (long)M * K; i++) put(x, i, odd && next() % 500 == 0 ? special() : uniform() * span, bf16);
        for (long i = 0; i < (long)N * groups; i++)
            put(scale, i, odd && next() % 50 == 0 ? special() : uniform() * 0.02f, bf16),
            put(offset, i, uniform() * 0.1f, bf16);
        memset(y, 0x55, (size_t)M * N * size);
        linear_int4(x, w, scale, offset, y, M, N, K, G, bf16, bf16 ? 2 : 4);
        fprintf(stderr, "case %d: M %d N %d K %d G %d %s\n", t, M, N, K, G, bf16 ? "bf16" : "fp32");
        fwrite(y, size, (size_t)M * N, stdout);
        free(w), free(quad), free(x), free(scale), free(offset), free(y);
    }
    return 0;
}
