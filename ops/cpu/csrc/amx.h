/* AMX for the decode-sized linears: the tile plumbing every linear shares (permission, configuration, the B
   operand's quads), and the bf16 block linear.c multiplies: 16 weight rows x 32 columns against up to 32
   activation rows in one tdpbf16ps (linear_int8.c and linear_int4.c multiply integers, by tdpbssd/tdpbusd).
   Internal, not exported. Needs GCC 11+ or clang 12+.

   Why: from 2 activation rows on, the AVX-512 loops stop being bound by the weight reads and are bound by
   vdpbf16ps (one per 32 weights and row; measured ~0.7 ns each on the 2-core Xeon), so 8 rows ran at 63% of
   the read bandwidth (bf16). One tdpbf16ps does 16 x 16 x 32 multiply-adds. One activation row
   streams as fast through the AVX-512 loops, so AMX starts at AMX_MIN_ROWS. */
#ifndef NANOQWEN_AMX_H
#define NANOQWEN_AMX_H

#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "gemv.h"

#define AMX_ROWS 16      /* weight rows per tile, and activation rows per tile of sums */
#define AMX_MIN_ROWS 2   /* activation rows from which AMX serves */
#define AMX_MAX_ROWS 32  /* two tiles of sums */
/* How far ahead each of a block's 16 weight rows is prefetched (1 KB, half gemv.h's one-row distance, measured 2-5%
   slower at 8 rows) */
#define AMX_PREFETCH_BYTES 2048

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Before a tileloadd of memory this code wrote: GCC's _tile_loadd is an asm without a memory operand, so
   without this the compiler may drop or sink the stores it cannot see being read (it did, at -O3). */
#define AMX_STORES_VISIBLE() __asm__ volatile("" ::: "memory")

struct tile_config {  /* ldtilecfg's operand, palette 1 */
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Whether this CPU has AMX-BF16, the build's ISA cap (gemv.h) allows it and Linux lets this process use the tiles
   (asked on the first call; the permission is the process's, so the pool's helpers have it too). */
static inline int amx_ready(void) {
    static int ready = -1;
    int r = __atomic_load_n(&ready, __ATOMIC_ACQUIRE);
    if (r < 0) {
        r = NANOQWEN_ISA >= NANOQWEN_ISA_AUTO && has_avx512_bf16() && __builtin_cpu_supports("amx-bf16") &&
            syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        __atomic_store_n(&ready, r, __ATOMIC_RELEASE);
    }
    return r;
}

/* And AMX-INT8 (tdpbssd, tdpbusd) too. */
static inline int amx_int8_ready(void) { return amx_ready() && __builtin_cpu_supports("amx-int8"); }

/* q: [R, K] bytes -> out: [K / 4, R] groups of 4 bytes (q[r][4i .. 4i + 3] at out + 4 * (i * R + r)): the B
   operand of every tile product here, the R rows as the tile's columns. int8 pieces (act_quant.h) for
   tdpbssd / tdpbusd, 64 columns of K per tile; bf16 rows as 2 K bytes for tdpbf16ps, 32 columns (pairs). */
static inline void act_quads(const int8_t *q, int R, int K, int8_t *out) {
    for (int i = 0; i < K / 4; i++)
        for (int r = 0; r < R; r++) memcpy(out + 4 * ((long)i * R + r), q + (long)r * K + 4 * i, 4);
}

/* Around every function that uses AMX (callers included): AMX CPUs have the AVX-512 subsets too. */
#define AMX_BEGIN _Pragma("GCC push_options") \
    _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16\")")
#define AMX_END _Pragma("GCC pop_options")

AMX_BEGIN

/* Tile 0: the block's weights; 1 and 3: activation rows 0-15 and 16-31; 2 and 4: their sums. */
static inline void amx_configure(int M) {
    const int cols0 = M < AMX_ROWS ? M : AMX_ROWS, cols1 = M - cols0;
    struct tile_config config = {.palette = 1};
    config.rows[0] = AMX_ROWS, config.colsb[0] = 64;
    for (int t = 1; t <= (cols1 ? 4 : 2); t++)  /* an unused tile must have no rows and no columns */
        config.rows[t] = AMX_ROWS, config.colsb[t] = (uint16_t)(4 * (t <= 2 ? cols0 : cols1));
    _tile_loadconfig(&config);
}

/* sums[m][i] = the fp32 dot product of activation row m < M (pairs: its act_quads) with weight row i < 16 of
   the bf16 block at w (rows of K weights), exact products. */
INLINE void amx_block(const uint16_t *w, const uint32_t *pairs, int M, int K, float sums[AMX_MAX_ROWS][AMX_ROWS]) {
    const int split = M > AMX_ROWS;
    _tile_zero(2);
    if (split) _tile_zero(4);
    for (int k = 0; k < K; k += 32) {
        for (int i = 0; i < AMX_ROWS; i++) __builtin_prefetch(w + (long)i * K + k + AMX_PREFETCH_BYTES / 2);
        _tile_loadd(0, w + k, 2 * K);
        _tile_loadd(1, pairs + (long)k / 2 * M, M * 4);
        _tile_dpbf16ps(2, 0, 1);
        if (split) {
            _tile_loadd(3, pairs + (long)k / 2 * M + AMX_ROWS, M * 4);
            _tile_dpbf16ps(4, 0, 3);
        }
    }
    /* the tiles hold [weight row][activation row]: stored as such, then transposed by the caller's indexing */
    float t[2][AMX_ROWS][AMX_ROWS];
    _tile_stored(2, t[0], sizeof t[0][0]);
    if (split) _tile_stored(4, t[1], sizeof t[0][0]);
    for (int m = 0; m < M; m++)
        for (int i = 0; i < AMX_ROWS; i++) sums[m][i] = t[m / AMX_ROWS][i][m % AMX_ROWS];
}

AMX_END

#endif
