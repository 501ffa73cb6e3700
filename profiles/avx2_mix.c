/* What the AVX2 int8 linear's inner loop (ops/cpu/csrc/linear_int8.c, madd_pieces: int16 activation pieces against
   the weights widened to int16, vpmaddwd) can reach on this core: its instruction mix alone, hot in L1, one thread,
   timed by the thread's CPU time, in cycles by a dependent add chain (1 cycle an add); with `int4`, the AVX2 int4
   linear's 8-row and 1-row loops instead (below). Not a test; profiles/RESULTS.md (lanes b8_40 and int4b8_40,
   fortieth session; int4b1_41, forty-first) has the figures.

   The kernel's iteration at 8 bf16 rows (two passes of 4 piece rows, AVX2_MAX_PIECES): 32 weights of one weight row
   widened by 2 vpmovsxbw, 8 vpmaddwd each loading 32 bytes of a piece row (rows S bytes apart: S = 2 K, 2048 for
   the K 1024 shapes, 4096 and 6144 for o and down), 8 vpaddd into 4 accumulators: 128 weight x row products. Rows:
     throughput   12 independent vpmaddwd, vpaddd, vpmaddubsw (register operands): each instruction's issue rate
     reg          the iteration with the pieces in registers (no piece loads)
     L1 S         the iteration as the kernel runs it (pieces loaded from L1, S apart), and + prefetch: its prefetcht0
     2 wrows S    two weight rows a pass sharing each piece load (8 loads for 256 products), per weight row
     8 rows S     the 8 piece rows in one pass (one widening for 8 rows), per 4 rows
   Each loop walks its pieces 64 bytes an iteration through 2 KB a row and its weights through 4 KB, so all stays in L1.

   Build from the repository root:
     cc -O2 -mavx2 profiles/avx2_mix.c -o profiles/out/avx2_mix
   Run: taskset -c 1 profiles/out/avx2_mix [int4] [ITERATIONS 20000000 [S ...]] (S: the piece rows' distance in bytes,
   default 2048 4096 6144; at most 6144; int4: the int4 8-row and 1-row loops' mixes instead, below) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define REGS "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
    "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

static short pieces[4 * 6144 + 8 * 6144] __attribute__((aligned(64)));  /* 8 rows up to 6144 bytes apart, and slack */
static signed char weights[4096 + 2048] __attribute__((aligned(64)));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* The fastest of 5 runs of `n` iterations of BODY (asm, operands %0 pieces, %1 weights, %2 S, %3 3 S), ns each. */
#define TIMED(n, S, BODY) ({ \
        double best_ = 1e30; \
        const long s_ = (S), s3_ = 3 * (S); \
        for (int run_ = 0; run_ < 5; run_++) { \
            const double t0_ = now(); \
            for (long i_ = 0; i_ < (n); i_++) { \
                const char *p_ = (const char *)pieces + (i_ & 31) * 64; \
                const signed char *w_ = weights + (i_ & 127) * 32; \
                __asm__ volatile(BODY ::"r"(p_), "r"(w_), "r"(s_), "r"(s3_) : REGS); \
            } \
            const double t_ = now() - t0_; \
            best_ = t_ < best_ ? t_ : best_; \
        } \
        best_ / (n) * 1e9; \
    })

#define REPEAT12(op) op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9) op(10) op(11)
#define MADD_R(j) "vpmaddwd %%ymm15, %%ymm" #j ", %%ymm" #j "\n"
#define ADD_R(j) "vpaddd %%ymm15, %%ymm" #j ", %%ymm" #j "\n"
#define UBS_R(j) "vpmaddubsw %%ymm15, %%ymm" #j ", %%ymm" #j "\n"

/* 32 weights widened into ymm14 (columns 0-15) and ymm15 (16-31) */
#define WIDEN "vpmovsxbw (%1), %%ymm14\n vpmovsxbw 16(%1), %%ymm15\n"
/* acc r (ymm0-3) += piece row r (at %0 + r S) against the widened weights: madd into ymm4-11, then 8 adds */
#define ADDS4 "vpaddd %%ymm4, %%ymm0, %%ymm0\n vpaddd %%ymm5, %%ymm1, %%ymm1\n vpaddd %%ymm6, %%ymm2, %%ymm2\n" \
    "vpaddd %%ymm7, %%ymm3, %%ymm3\n vpaddd %%ymm8, %%ymm0, %%ymm0\n vpaddd %%ymm9, %%ymm1, %%ymm1\n" \
    "vpaddd %%ymm10, %%ymm2, %%ymm2\n vpaddd %%ymm11, %%ymm3, %%ymm3\n"
#define MADDS4_REG "vpmaddwd %%ymm12, %%ymm14, %%ymm4\n vpmaddwd %%ymm13, %%ymm14, %%ymm5\n" \
    "vpmaddwd %%ymm12, %%ymm14, %%ymm6\n vpmaddwd %%ymm13, %%ymm14, %%ymm7\n vpmaddwd %%ymm12, %%ymm15, %%ymm8\n" \
    "vpmaddwd %%ymm13, %%ymm15, %%ymm9\n vpmaddwd %%ymm12, %%ymm15, %%ymm10\n vpmaddwd %%ymm13, %%ymm15, %%ymm11\n"
#define MADDS4_L1 "vpmaddwd (%0), %%ymm14, %%ymm4\n vpmaddwd (%0,%2,1), %%ymm14, %%ymm5\n" \
    "vpmaddwd (%0,%2,2), %%ymm14, %%ymm6\n vpmaddwd (%0,%3,1), %%ymm14, %%ymm7\n vpmaddwd 32(%0), %%ymm15, %%ymm8\n" \
    "vpmaddwd 32(%0,%2,1), %%ymm15, %%ymm9\n vpmaddwd 32(%0,%2,2), %%ymm15, %%ymm10\n" \
    "vpmaddwd 32(%0,%3,1), %%ymm15, %%ymm11\n"
/* two weight rows (ymm8/9: row 0's columns 0-15 / 16-31, ymm10/11 row 1's, 2048 bytes on), accumulators ymm0-3 row 0,
   ymm4-7 row 1; each piece loaded once into ymm12 or ymm13 for both */
#define WIDEN2 "vpmovsxbw (%1), %%ymm8\n vpmovsxbw 16(%1), %%ymm9\n vpmovsxbw 2048(%1), %%ymm10\n" \
    "vpmovsxbw 2064(%1), %%ymm11\n"
#define PAIR(at, r, r1, wa, wb, t) "vmovdqa " at ", %%ymm" #t "\n vpmaddwd %%ymm" #t ", %%ymm" #wa ", %%ymm14\n" \
    "vpaddd %%ymm14, %%ymm" #r ", %%ymm" #r "\n vpmaddwd %%ymm" #t ", %%ymm" #wb ", %%ymm15\n" \
    "vpaddd %%ymm15, %%ymm" #r1 ", %%ymm" #r1 "\n"
/* acc += the piece at `at` against widened weights w, through t */
#define MA(at, w, t, acc) "vpmaddwd " at ", %%ymm" #w ", %%ymm" #t "\n vpaddd %%ymm" #t ", %%ymm" #acc ", %%ymm" #acc "\n"

/* The 8 rows in one pass: rows 0-3 from p, 4-7 from p + 4 S; accumulators ymm0-7, the madds through ymm8-13. */
static double loop8(long n, long S) {
    double best = 1e30;
    for (int run = 0; run < 5; run++) {
        const double t0 = now();
        for (long i = 0; i < n; i++) {
            const char *p = (const char *)pieces + (i & 31) * 64, *p4 = p + 4 * S;
            const signed char *w = weights + (i & 127) * 32;
            __asm__ volatile(
                "vpmovsxbw (%1), %%ymm14\n vpmovsxbw 16(%1), %%ymm15\n"
                MA("(%0)", 14, 8, 0) MA("(%0,%2,1)", 14, 9, 1) MA("(%0,%2,2)", 14, 10, 2) MA("(%0,%3,1)", 14, 11, 3)
                MA("(%4)", 14, 12, 4) MA("(%4,%2,1)", 14, 13, 5) MA("(%4,%2,2)", 14, 8, 6) MA("(%4,%3,1)", 14, 9, 7)
                MA("32(%0)", 15, 10, 0) MA("32(%0,%2,1)", 15, 11, 1) MA("32(%0,%2,2)", 15, 12, 2)
                MA("32(%0,%3,1)", 15, 13, 3) MA("32(%4)", 15, 8, 4) MA("32(%4,%2,1)", 15, 9, 5)
                MA("32(%4,%2,2)", 15, 10, 6) MA("32(%4,%3,1)", 15, 11, 7)
                ::"r"(p), "r"(w), "r"(S), "r"(3 * S), "r"(p4) : REGS);
        }
        const double t = now() - t0;
        best = t < best ? t : best;
    }
    return best / n * 1e9;
}

/* ---- int4 mode: linear_int4.c's AVX2 8-row loop (il_rows at 8 bf16 rows: il_row_sums8, il_row_chunk8).
   An iteration is one chunk of a weight row (4 blocks, 256 weights, 128 bytes) against 8 int8 activation rows (their
   chunk contiguous, 256 bytes a row): 4 weight loads, 4 vpsrlw and 8 vpand unpack the nibbles once into ymm0-7 (the
   mask from memory, as the kernel's); then for each row 8 vpmaddubsw loading its 256 bytes, 7 vpaddw, a vpmaddwd by
   ones (ymm8), a convert, a vmulps of the group scales (ymm9) by the row's block scales (loaded) and an FMA into the
   row's fp32 sums in L1 (loaded and stored; the kernel's GCC keeps 2 of the 8 in registers): 2048 products. Rows
   (cycles per row, 256 products):
     multiplies   the 8 vpmaddubsw and the vpmaddwd alone, registers: the multiply bound
     reg          a row's integer work with the activations in a register (no loads, no fp32 end)
     L1 (the kernel's mix)  the iteration as above
     + spills     and per row what GCC gave il_rows before the fortieth session (objdump of 8809461's build): a nibble
                  vector and the group scales reloaded from the stack, the sums stored twice */

static int8_t acts[4 * 2048] __attribute__((aligned(64)));   /* 4 chunks of 8 rows */
static float row_scales[8 * 32] __attribute__((aligned(64))), sums[8 * 8 + 24] __attribute__((aligned(64)));
static uint16_t group_scales[64] __attribute__((aligned(64)));
static const short ones16[16] __attribute__((aligned(32))) = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
static const unsigned char mask15[32] __attribute__((aligned(32))) = {
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15};

/* The fastest of 5 runs of `n` iterations of BODY (asm, operands %0 a chunk's 8 activation rows, %1 its weights (a
   quad's chunk: 4 weight rows 128 bytes apart), %2 the rows' block scales (row r 128 bytes on), %3 their fp32 sums
   (row r 32 bytes on), %4 the nibble mask, %5 the 4 weight rows' bf16 group scales (row i 32 bytes on), %6 int16 ones;
   r11 free), ns each. */
#define TIMED4(n, BODY) ({ \
        double best_ = 1e30; \
        for (int run_ = 0; run_ < 5; run_++) { \
            const double t0_ = now(); \
            for (long i_ = 0; i_ < (n); i_++) { \
                const int8_t *q_ = acts + (i_ & 3) * 2048; \
                const signed char *w_ = weights + (i_ & 7) * 512; \
                __asm__ volatile(BODY ::"r"(q_), "r"(w_), "r"(row_scales), "r"(sums), "r"(mask15), \
                                 "r"(group_scales), "r"(ones16) : REGS, "r11"); \
            } \
            const double t_ = now() - t0_; \
            best_ = t_ < best_ ? t_ : best_; \
        } \
        best_ / (n) * 1e9; \
    })

#define Y(r) "%%ymm" #r
/* vector v of the chunk's nibbles: the low ones into ymm(2v), the high ones into ymm(2v + 1) */
#define NIB(v, lo, hi) "vmovdqu " #v "*32(%1), " Y(lo) "\n vpsrlw $4, " Y(lo) ", " Y(hi) "\n" \
    "vpand (%4), " Y(lo) ", " Y(lo) "\n vpand (%4), " Y(hi) ", " Y(hi) "\n"
#define UNPACK NIB(0, 0, 1) NIB(1, 2, 3) NIB(2, 4, 5) NIB(3, 6, 7) "vbroadcastf128 (%2), " Y(9) "\n"
#define UBS(r, v, t) "vpmaddubsw " #r "*256+" #v "*32(%0), " Y(v) ", " Y(t) "\n"
#define ADDW(b, a) "vpaddw " Y(b) ", " Y(a) ", " Y(a) "\n"
/* row r's 256 int8 against the 8 nibble vectors: int16 sums (7 vpaddw) in ymm10, then by ones into int32 */
#define INTS(r) UBS(r, 0, 10) UBS(r, 1, 11) ADDW(11, 10) UBS(r, 2, 11) UBS(r, 3, 12) ADDW(12, 11) ADDW(11, 10) \
    UBS(r, 4, 11) UBS(r, 5, 12) ADDW(12, 11) ADDW(11, 10) UBS(r, 6, 11) UBS(r, 7, 12) ADDW(12, 11) ADDW(11, 10) \
    "vpmaddwd " Y(8) ", " Y(10) ", " Y(10) "\n"
/* the fp32 end: sums[r] += convert(ymm10) x group scales x row r's block scales */
#define END(r) "vcvtdq2ps " Y(10) ", " Y(10) "\n vmulps " #r "*128(%2), " Y(9) ", " Y(11) "\n" \
    "vfmadd213ps " #r "*32(%3), " Y(11) ", " Y(10) "\n vmovaps " Y(10) ", " #r "*32(%3)\n"
/* GCC's extras a row: ymm6 and ymm9 reloaded from the stack (here the sums' slack), the sums stored a second time */
#define SPILLS(r) "vmovdqa 256(%3), " Y(13) "\n vmovaps 288(%3), " Y(14) "\n vmovaps " Y(10) ", 320(%3)\n"
#define ROW8(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#define L1ROW(r) INTS(r) END(r)
#define SPILLROW(r) INTS(r) END(r) SPILLS(r)
/* the integer work with the activations in ymm13 */
#define UBSR(v, t) "vpmaddubsw " Y(13) ", " Y(v) ", " Y(t) "\n"
#define REGROW(r) UBSR(0, 10) UBSR(1, 11) ADDW(11, 10) UBSR(2, 11) UBSR(3, 12) ADDW(12, 11) ADDW(11, 10) UBSR(4, 11) \
    UBSR(5, 12) ADDW(12, 11) ADDW(11, 10) UBSR(6, 11) UBSR(7, 12) ADDW(12, 11) ADDW(11, 10) \
    "vpmaddwd " Y(8) ", " Y(10) ", " Y(10) "\n"
#define MULROW(r) UBSR(0, 10) UBSR(1, 11) UBSR(2, 12) UBSR(3, 14) UBSR(4, 15) UBSR(5, 10) UBSR(6, 11) UBSR(7, 12) \
    "vpmaddwd " Y(8) ", " Y(14) ", " Y(15) "\n"

/* ---- int4 mode, 1 row: linear_int4.c's AVX2 1-row loop (il_quad at 1 bf16 row: il_quad8, il_quad_chunk8). An
   iteration is one chunk of a pass of 4 weight rows (a quad's chunk: 4 x 128 bytes, one stream) against the one int8
   activation row (256 bytes): for each of the chunk's 4 vectors v the row's two activation vectors loaded once (ymm9,
   ymm10) for the 4 weight rows, and each weight row's vector loaded (ymm5), unpacked (vpsrlw, 2 vpand with the mask in
   ymm0), 2 vpmaddubsw and 2 vpaddw (1 at v 0) into its int16 sum (ymm1-4); then each weight row's end: a vpmaddwd by
   ones (ymm11), a convert, its 4 bf16 group scales widened (vpmovzxwd, vpslld, vinsertf128: il_scales4) times the
   chunk's block scales (loaded), an FMA into its fp32 sum (ymm12-15). Rows (cycles per weight row of a chunk, 256
   products):
     reg 1 row      the integer work alone, the weights and activations in registers (no loads, no fp32 end)
     L1 1 row       the iteration with its loads and ends, the fp32 sums in registers: the loop's own mix
     + GCC's extras as GCC builds il_quad_1_1_1 (objdump of the runtime build at a0c7ec4): each weight vector loaded
                    twice (for the shift, and as the low nibbles' vpand operand), two of the 4 fp32 sums through the
                    stack (FMA from it, stored back), 5 pointers reloaded from it, and its 8 prefetcht0 */
#define Q1ACTS(v) "vmovdqa " #v "*64(%0), " Y(9) "\n vmovdqa " #v "*64+32(%0), " Y(10) "\n"
/* weight row i's vector v into its int16 sum ymm s: LOW the low nibbles' vpand, ADD how the pair's sum is added */
#define Q1ROW(v, i, s, LOW, ADD) "vmovdqu " #v "*32+" #i "*128(%1), " Y(5) "\n vpsrlw $4, " Y(5) ", " Y(6) "\n" \
    LOW(v, i) "vpand " Y(0) ", " Y(6) ", " Y(6) "\n vpmaddubsw " Y(9) ", " Y(5) ", " Y(5) "\n" \
    "vpmaddubsw " Y(10) ", " Y(6) ", " Y(6) "\n" ADD(s)
#define LOW_REG(v, i) "vpand " Y(0) ", " Y(5) ", " Y(5) "\n"
#define LOW_MEM(v, i) "vpand " #v "*32+" #i "*128(%1), " Y(0) ", " Y(5) "\n"
#define FIRST(s) "vpaddw " Y(6) ", " Y(5) ", " Y(s) "\n"
#define NEXT(s) "vpaddw " Y(6) ", " Y(5) ", " Y(5) "\n vpaddw " Y(5) ", " Y(s) ", " Y(s) "\n"
#define Q1V(v, LOW, ADD) Q1ACTS(v) Q1ROW(v, 0, 1, LOW, ADD) Q1ROW(v, 1, 2, LOW, ADD) Q1ROW(v, 2, 3, LOW, ADD) \
    Q1ROW(v, 3, 4, LOW, ADD)
#define Q1INTS(LOW) "vmovdqa (%4), " Y(0) "\n" Q1V(0, LOW, FIRST) Q1V(1, LOW, NEXT) Q1V(2, LOW, NEXT) Q1V(3, LOW, NEXT)
/* weight row i's end: its sum ymm s by ones, converted, times its group scales x the block scales (ymm7), into f */
#define Q1SCALED(i, s) "vpmaddwd " Y(11) ", " Y(s) ", " Y(s) "\n vcvtdq2ps " Y(s) ", " Y(s) "\n" \
    "vpmovzxwd " #i "*32(%5), %%xmm7\n vpslld $16, %%xmm7, %%xmm7\n vinsertf128 $1, %%xmm7, " Y(7) ", " Y(7) "\n" \
    "vmulps (%2), " Y(7) ", " Y(7) "\n"
#define END_REG(i, s, f) Q1SCALED(i, s) "vfmadd231ps " Y(7) ", " Y(s) ", " Y(f) "\n"
#define END_MEM(i, s, f) Q1SCALED(i, s) "vfmadd213ps " #i "*32(%3), " Y(7) ", " Y(s) "\n vmovaps " Y(s) ", " #i "*32(%3)\n"
#define Q1ENDS(E01) "vmovdqa (%6), " Y(11) "\n" E01(0, 1, 12) E01(1, 2, 13) END_REG(2, 3, 14) END_REG(3, 4, 15)
#define Q1EXTRAS "prefetcht0 2048(%1)\n prefetcht0 2112(%1)\n prefetcht0 2176(%1)\n prefetcht0 2240(%1)\n" \
    "prefetcht0 2304(%1)\n prefetcht0 2368(%1)\n prefetcht0 2432(%1)\n prefetcht0 2496(%1)\n mov 256(%3), %%r11\n" \
    "mov 264(%3), %%r11\n mov 272(%3), %%r11\n mov 280(%3), %%r11\n mov 288(%3), %%r11\n"
/* the integer work in registers: the weights' vector in ymm8 */
#define Q1ROW_REG(s, ADD) "vpsrlw $4, " Y(8) ", " Y(6) "\n vpand " Y(0) ", " Y(8) ", " Y(5) "\n vpand " Y(0) ", " Y(6) \
    ", " Y(6) "\n vpmaddubsw " Y(9) ", " Y(5) ", " Y(5) "\n vpmaddubsw " Y(10) ", " Y(6) ", " Y(6) "\n" ADD(s)
#define Q1V_REG(ADD) Q1ROW_REG(1, ADD) Q1ROW_REG(2, ADD) Q1ROW_REG(3, ADD) Q1ROW_REG(4, ADD)
#define Q1REG Q1V_REG(FIRST) Q1V_REG(NEXT) Q1V_REG(NEXT) Q1V_REG(NEXT) "vpmaddwd " Y(11) ", " Y(1) ", " Y(1) "\n" \
    "vpmaddwd " Y(11) ", " Y(2) ", " Y(2) "\n vpmaddwd " Y(11) ", " Y(3) ", " Y(3) "\n" \
    "vpmaddwd " Y(11) ", " Y(4) ", " Y(4) "\n"

static void int4_mode(long n, double ghz) {
    for (int i = 0; i < (int)sizeof acts; i++) acts[i] = (int8_t)(i * 37);
    printf("int4 8-row loop (il_rows): cycles a row of a chunk (256 weights x 1 row), fastest of 5 runs of %ld\n", n);
    printf("%-34s %7.2f  (9 multiplies)\n", "multiplies", ghz / 8 * TIMED4(n, ROW8(MULROW)));
    printf("%-34s %7.2f  (16 instructions)\n", "reg: integer work, no loads", ghz / 8 * TIMED4(n, ROW8(REGROW)));
    printf("%-34s %7.2f  (20 a row + 17 a chunk)\n", "L1 (the kernel's mix)", ghz / 8 * TIMED4(n, UNPACK ROW8(L1ROW)));
    printf("%-34s %7.2f  (23 a row + 17 a chunk)\n", "L1 + the kernel's spills",
           ghz / 8 * TIMED4(n, UNPACK ROW8(SPILLROW)));
    printf("int4 1-row loop (il_quad): cycles a weight row of a chunk (256 weights x 1 row)\n");
    printf("%-34s %7.2f  (28 a weight row)\n", "reg 1 row: integer work, no loads", ghz / 4 * TIMED4(n, Q1REG));
    printf("%-34s %7.2f  (34 a weight row, 6 reading memory; 10 loads a chunk)\n", "L1 1 row (the loop's mix)",
           ghz / 4 * TIMED4(n, Q1INTS(LOW_REG) Q1ENDS(END_REG)));
    printf("%-34s %7.2f  (and 4 loads a weight row; 2 loads, 2 stores, 13 more a chunk)\n", "L1 1 row + GCC's extras",
           ghz / 4 * TIMED4(n, Q1INTS(LOW_MEM) Q1ENDS(END_MEM) Q1EXTRAS));
}

/* The core's clock in GHz: a dependent chain of adds, 1 cycle each. */
static double clock_ghz(long n) {
    double best = 1e30;
    for (int run = 0; run < 5; run++) {  /* a dependent chain of adds: 1 cycle each */
        long x = 0;
        const double t0 = now();
        for (long i = 0; i < 20 * n; i += 8)
            __asm__ volatile("add $1, %0\n add $1, %0\n add $1, %0\n add $1, %0\n add $1, %0\n add $1, %0\n"
                             "add $1, %0\n add $1, %0\n" : "+r"(x));
        const double t = now() - t0;
        best = t < best ? t : best;
    }
    return 20 * n / best / 1e9;
}

int main(int argc, char **argv) {
    const int int4 = argc > 1 && !strcmp(argv[1], "int4");
    argc -= int4, argv += int4;
    const long n = argc > 1 ? atol(argv[1]) : 20000000;
    const double ghz = clock_ghz(n);
    if (int4) {
        printf("clock %.3f GHz (a dependent add a cycle)\n", ghz);
        int4_mode(n, ghz);
        return 0;
    }
    printf("clock %.3f GHz (a dependent add a cycle); cycles an iteration, fastest of 5 runs of %ld\n", ghz, n);
    printf("%-34s %7.2f  (12 instructions)\n", "throughput vpmaddwd", ghz * TIMED(n, 0, REPEAT12(MADD_R)));
    printf("%-34s %7.2f  (12 instructions)\n", "throughput vpaddd", ghz * TIMED(n, 0, REPEAT12(ADD_R)));
    printf("%-34s %7.2f  (12 instructions)\n", "throughput vpmaddubsw", ghz * TIMED(n, 0, REPEAT12(UBS_R)));
    printf("%-34s %7.2f  (128 products)\n", "reg: pieces in registers", ghz * TIMED(n, 2048, WIDEN MADDS4_REG ADDS4));
    const long fixed[] = {2048, 4096, 6144};
    const int count = argc > 2 ? argc - 2 : 3;
    for (int s = 0; s < count; s++) {
        const long S = argc > 2 ? atol(argv[2 + s]) : fixed[s];
        char name[64];
        snprintf(name, sizeof name, "L1 S %ld (the kernel's)", S);
        printf("%-34s %7.2f  (128 products)\n", name, ghz * TIMED(n, S, WIDEN MADDS4_L1 ADDS4));
        snprintf(name, sizeof name, "L1 S %ld + prefetch", S);
        printf("%-34s %7.2f  (128 products)\n", name,
               ghz * TIMED(n, S, "prefetcht0 2048(%1)\n" WIDEN MADDS4_L1 ADDS4));
        snprintf(name, sizeof name, "2 wrows S %ld, per weight row", S);
        printf("%-34s %7.2f  (128 products)\n", name, ghz / 2 * TIMED(n, S, WIDEN2
               PAIR("(%0)", 0, 4, 8, 10, 12) PAIR("(%0,%2,1)", 1, 5, 8, 10, 13) PAIR("(%0,%2,2)", 2, 6, 8, 10, 12)
               PAIR("(%0,%3,1)", 3, 7, 8, 10, 13) PAIR("32(%0)", 0, 4, 9, 11, 12) PAIR("32(%0,%2,1)", 1, 5, 9, 11, 13)
               PAIR("32(%0,%2,2)", 2, 6, 9, 11, 12) PAIR("32(%0,%3,1)", 3, 7, 9, 11, 13)));
        snprintf(name, sizeof name, "8 rows S %ld, per 4 rows", S);
        printf("%-34s %7.2f  (128 products)\n", name, ghz / 2 * loop8(n, S));
    }
    return 0;
}
