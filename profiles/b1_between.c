/* A batch-1 decode step's kernels between its linears (rms_norm, qk_norm_rope_store, decode_attention, silu_mul, the
   logits' widening and argmax), each call timed alone by the TSC, in the step's order with the step's int8 linears
   (linear_int8, bf16, on the pool) streaming their weights between them: so each call meets its inputs where the step
   leaves them (the linears' outputs written partly by the pool's helper, the KV cache and the norms' weights evicted
   by 0.6 GB of weights), with no Python, ctypes or clock call around it. Not a test. Any x86-64 CPU with AVX2.

   Prints per kind: calls a step, the median µs a call over the passes' calls (a median: a call that lost its core to
   another process is one of hundreds), the step's sum of those, and the same call hot (its inputs in L1/L2, called
   again and again): the difference is what the step's memory costs the call, the hot figure its work. Then the TSC
   pair's own cost (not subtracted: ~10 ns) and the load average.

   Shapes: Qwen3-0.6B (hidden 1024, 16 query and 8 kv heads of 128, intermediate 3072, vocab 151936), the new token at
   position CONTEXT - 1 of blocks of 16 tokens.

   Build from the repository root (the kernels and pool are the ones measured):
     cc -O3 -mavx2 -mfma -fopenmp -Iops/cpu/csrc profiles/b1_between.c -o profiles/out/b1_between ops/cpu/csrc/linear_int8.c ops/cpu/csrc/norm_rope.c ops/cpu/csrc/attention.c ops/cpu/csrc/pointwise.c ops/cpu/csrc/sample.c ops/cpu/csrc/pool.c -lm
   Run: OMP_NUM_THREADS=2 profiles/out/b1_between [PASSES [CONTEXT [huge]]]   (default 9 passes, 33 keys; huge: the
   KV cache in 2 MB pages, else malloc's, as torch's) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <x86intrin.h>

#include "nanoqwen_cpu.h"
#include "step_matrices.h"
#include "model_shape.h"

#define BS 16
#define MAX_CONTEXT 4096
#define HOT_CALLS 400
#define EPS 1e-6f

enum { NORM, QK, ATTN, SILU, WIDEN, ARGMAX, OPS };
static const char *const op_names[OPS] = {"rms_norm", "qk_norm_rope_store", "decode_attention", "silu_mul",
                                          "bf16_to_fp32", "argmax_rows"};
static const int per_step[OPS] = {57, 28, 28, 28, 1, 1};

static uint16_t hidden[HIDDEN], normed[HIDDEN], act[INTER], residual[HIDDEN], qkv[(HQ + 2 * HKV) * D], attn[HQ * D], gate_up[2 * INTER],
    logits16[VOCAB], row_scales[VOCAB], norm_w[57][HIDDEN], q_w[28][D], k_w[28][D];
static float logits[VOCAB], cos_sin[MAX_CONTEXT * D];
static int64_t token;
static int32_t table[MAX_CONTEXT / BS], ctx, position, slot;
static uint16_t *kc[28], *vc[28];

static uint16_t small_bf16(void) { return (uint16_t)((rand() & 1) << 15 | (0x3d00 + rand() % 0x300)); }

/* Op `op` of layer `layer` (norm: the step's `layer`th norm): the step's call. */
static void run_op(int op, int layer) {
    switch (op) {
    case NORM:
        rms_norm(hidden, residual, norm_w[layer], normed, residual, 1, HIDDEN, EPS, 1);
        break;
    case QK:
        qk_norm_rope_store(qkv, qkv + HQ * D, qkv + (HQ + HKV) * D, q_w[layer], k_w[layer], EPS, cos_sin, &position,
                           kc[layer], vc[layer], &slot, 1, HQ, HKV, D, (HQ + 2 * HKV) * D, (HQ + 2 * HKV) * D,
                           (HQ + 2 * HKV) * D, 1);
        break;
    case ATTN:
        decode_attention(qkv, (HQ + 2 * HKV) * D, kc[layer], vc[layer], table, &ctx, attn, 1, HQ, HKV, D, BS,
                         MAX_CONTEXT / BS, 1.0f / sqrtf(D), 1);
        break;
    case SILU:
        silu_mul(gate_up, act, 1, INTER, 1);
        break;
    case WIDEN:
        bf16_to_fp32(logits16, logits, VOCAB);
        break;
    default:
        argmax_rows(logits, &token, 1, VOCAB, 0);
    }
}

static double samples[OPS][64 * 57];
static int counts[OPS];

/* Cycles of one run_op between fences; op < 0: the fences' own. */
static double cycles(int op, int layer) {
    _mm_lfence();
    const uint64_t t = __rdtsc();
    _mm_lfence();
    if (op >= 0) run_op(op, layer);
    _mm_lfence();
    return (double)(__rdtsc() - t);
}

static void timed(int op, int layer) { samples[op][counts[op]++] = cycles(op, layer); }

static void linear_call(const char *w, const struct shape *sh, const uint16_t *in, uint16_t *out) {
    linear_int8(in, (const int8_t *)w, row_scales, out, 1, (int)sh->N, (int)sh->K, 1);
}

/* One step: each layer's norm, qkv, q/k norm + rope + store, attention, o, norm, gate_up, silu_mul, down; the final
   norm, the LM head, the widening and the argmax. Its own kernels timed where `time`. */
static void step(char *buf, int time) {
    void (*op)(int, int) = time ? timed : run_op;
    int norms = 0;
    EACH_MATRIX(buf, 64, s, sh, w, {
        const int layer = layer_;
        switch (s) {
        case 0:
            op(NORM, norms++);
            linear_call(w, sh, normed, qkv);
            op(QK, layer);
            op(ATTN, layer);
            break;
        case 1:
            linear_call(w, sh, attn, hidden);
            break;
        case 2:
            op(NORM, norms++);
            linear_call(w, sh, normed, gate_up);
            op(SILU, layer);
            break;
        case 3:
            linear_call(w, sh, act, hidden);
            break;
        default:
            op(NORM, norms++);
            linear_call(w, sh, normed, logits16);
            op(WIDEN, 0);
            op(ARGMAX, 0);
        }
    });
}

int main(int argc, char **argv) {
    const int passes = argc > 1 ? atoi(argv[1]) : 9;
    ctx = argc > 2 ? atoi(argv[2]) : 33;
    const int huge = argc > 3 && !strcmp(argv[3], "huge");
    if (passes < 1 || passes > 64 || ctx < 1 || ctx > MAX_CONTEXT)
        return fprintf(stderr, "usage: %s [PASSES (1..64) [CONTEXT (1..%d)]]\n", argv[0], MAX_CONTEXT), 2;
    position = ctx - 1, slot = ctx - 1;
    for (int i = 0; i < MAX_CONTEXT / BS; i++) table[i] = i;
    for (int i = 0; i < HIDDEN; i++) hidden[i] = small_bf16();
    for (int i = 0; i < HIDDEN; i++) residual[i] = small_bf16();
    for (int n = 0; n < VOCAB; n++) row_scales[n] = 0x3a00;
    for (int l = 0; l < 57; l++)
        for (int i = 0; i < HIDDEN; i++) norm_w[l][i] = 0x3f80;  /* 1.0 */
    for (int l = 0; l < 28; l++)
        for (int i = 0; i < D; i++) q_w[l][i] = k_w[l][i] = 0x3f80;
    for (int p = 0; p < MAX_CONTEXT; p++)
        for (int i = 0; i < D / 2; i++) {
            const float f = p * powf(1e6f, -2.0f * i / D);
            cos_sin[p * D + i] = cosf(f), cos_sin[p * D + D / 2 + i] = sinf(f);
        }
    /* each layer's K and V cache as the runner allocates them: one [layers, blocks, BS, HKV, D] tensor each */
    const long cache = (long)(ctx + BS - 1) / BS * BS * HKV * D, bytes = 28 * cache * 2;
    for (int kv = 0; kv < 2; kv++) {
        uint16_t *all = huge ? (uint16_t *)huge_pages(bytes) : aligned_alloc(64, bytes);
        if (!all) return fprintf(stderr, "no memory for the KV cache\n"), 1;
        for (long i = 0; i < 28 * cache; i++) all[i] = small_bf16();
        for (int l = 0; l < 28; l++) (kv ? vc : kc)[l] = all + l * cache;
    }
    char *buf = step_buffer(64);
    if (!buf) return fprintf(stderr, "no memory for the step's matrices\n"), 1;
    step(buf, 0);  /* the first call's allocations (attention's scratch), the pool's start */
    for (int p = 0; p < passes; p++) step(buf, 1);
    double hot[OPS];
    for (int o = 0; o < OPS; o++) {
        static double calls[HOT_CALLS];
        for (int i = 0; i < HOT_CALLS; i++) calls[i] = cycles(o, 27);
        hot[o] = median(calls, HOT_CALLS);
    }
    static double pair[HOT_CALLS];
    for (int i = 0; i < HOT_CALLS; i++) pair[i] = cycles(-1, 0);
    const double t0 = now();
    const uint64_t c0 = __rdtsc();
    while (now() - t0 < 0.2) continue;
    const double us = 1e6 * (now() - t0) / (double)(__rdtsc() - c0);  /* µs a TSC tick */
    printf("%d passes, %d keys; kind, calls a step, µs a call in the step (median), ms a step, µs a call hot (median)\n",
           passes, ctx);
    double total = 0, total_hot = 0;
    for (int o = 0; o < OPS; o++) {
        const double m = us * median(samples[o], counts[o]);
        printf("  %-19s %3d  %7.2f  %6.3f  %7.2f\n", op_names[o], per_step[o], m, 1e-3 * m * per_step[o], us * hot[o]);
        total += m * per_step[o], total_hot += us * hot[o] * per_step[o];
    }
    printf("  all: %.3f ms a step in it, %.3f hot; the TSC pair %.3f µs; token %ld, a logit %g\n", 1e-3 * total,
           1e-3 * total_hot, us * median(pair, HOT_CALLS), (long)token, (double)logits[token]);
    double load[3];
    if (getloadavg(load, 3) == 3) printf("load average at the end: %.2f %.2f %.2f\n", load[0], load[1], load[2]);
    return 0;
}
