/* Every function the CPU kernels export, declared once: ops/cpu/build.py reads the ctypes types from these
   prototypes, and each .c file includes this header, so the compiler rejects a definition that drifts from it.
   Keep to one prototype per statement, returning void or int, with parameter types from: pointers, int, long,
   float. */
#ifndef NANOQWEN_CPU_H
#define NANOQWEN_CPU_H

#include <stdint.h>

/* What a kernel declared `int` returns (cpugraph_replay, below, returns an index): 0 once it ran, NANOQWEN_NO_MEMORY
   when it wrote nothing because its working memory could not be allocated or was given too small (ops/cpu/graph.py's
   call raises MemoryError for any nonzero). */
#define NANOQWEN_NO_MEMORY 1

/* linear.c: y = x @ w.T; x: [M, K], w: [N, K], y: [M, N], all bf16 or all fp32; K % 32 == 0. */
void linear(const void *x, const void *w, void *y, int M, int N, int K, int bf16);

/* linear_int8.c: y = (x @ w.T) * scale; x: [M, K], w: [N, K] int8, scale: [N], y: [M, N]; x, scale and y
   all bf16 or all fp32; K % 32 == 0. */
void linear_int8(const void *x, const int8_t *w, const void *scale, void *y, int M, int N, int K, int bf16);

/* linear_int4.c: y = x @ (q * scale + offset).T per group of G columns; x: [M, K], w: [N, K / 2] uint8 in
   the block layout of ops/torch_ref/linear_int4.py rearranged as int4_block.h gives (linear_int4_layout: 1 where
   that is interleaved, else 0, spanned; linear_int4_pack: w into it, in place), scale and
   offset: [N, K / G], y: [M, N]; x, scale, offset and y all bf16 or all fp32; K % G == 0, G % 64 == 0; each row
   of x taken as `pieces` (1 to 4) int8 pieces with AVX-512 VNNI, else as (pieces + 1) / 2 int16 pieces, at least
   as close, for fp32 rows, and as int8 blocks (one scale a 64-column block; `pieces` unused) for bf16 rows.
   linear_int4_pack's quad: [4, K / 2] uint8, its working memory. */
void linear_int4(const void *x, const uint8_t *w, const void *scale, const void *offset, void *y, int M, int N,
                 int K, int G, int bf16, int pieces);
void linear_int4_pack(uint8_t *w, uint8_t *quad, int N, int K);
void linear_int4_layout(int32_t *interleaved);
/* linear_int4_amx_tiles: spanned w (linear_int4_layout 0) -> tiles [N / 16][K / 64][16][64] uint8, the unsigned
   operands of AMX-INT8 that linear_int4 multiplies: tile [t][b] row i holds block b of weight row 16 t + i as bytes,
   its 32 plain bytes' low nibbles, then their high ones. */
void linear_int4_amx_tiles(const uint8_t *w, int N, int K, uint8_t *tiles);

/* dequant.c: out = q * scale + offset per group of G columns, rounded as ops/torch_ref/linear_int4.py does;
   w: [N, K / 2] uint8 in linear_int4's layout (rows from a multiple of 4 of the tensor's, N to its end or a multiple
   of 4: whole quads), scale and offset: [N, K / G], out: [N, K]; scale, offset and out all bf16 or all fp32;
   G % 64 == 0. */
void dequant_int4(const uint8_t *w, const void *scale, const void *offset, void *out, int N, int K, int G, int bf16);
/* dequant.c: out = w, exactly; w: [N, K] int8, out: [N, K] bf16 or fp32. */
void dequant_int8(const int8_t *w, void *out, int N, int K, int bf16);

/* attention.c: paged decode attention, one query token per sequence.
   q: [B, Hq, D] with token stride sq (heads contiguous: q may be a view of the fused qkv rows);
   k/v cache: [blocks, bs, Hkv, D]; tables: [B, W] int32; ctx: [B] int32; out: [B, Hq, D] contiguous.
   D % 16 == 0, Hq / Hkv <= 16, D <= 256. */
void decode_attention(const void *q, long sq, const void *kc, const void *vc, const int32_t *tables,
                      const int32_t *ctx, void *out, int B, int Hq, int Hkv, int D, int bs, int W, float scale,
                      int bf16);
/* Sets *avx512 to whether decode_attention takes its AVX-512 loops at head dim D (else AVX2). */
void decode_attention_avx512(int D, int bf16, int *avx512);

/* prefill_attention.c: causal attention of each sequence's new tokens over its paged context (the new
   tokens last, already in the cache). q, out: [N, Hq, D] with N = sum(qlens); k/v cache: [blocks, bs, Hkv, D];
   tables: [S, W] int32; qlens, ctx: [S] int32. D % 8 == 0, D <= 256, Hq / Hkv <= 64. tiles: the bf16 tiles where
   prefill_attention_tiles says they serve (bf16 only), else the AVX2 loops. */
int prefill_attention(const void *q, const void *kc, const void *vc, const int32_t *tables, const int32_t *qlens,
                      const int32_t *ctx, void *out, int S, int Hq, int Hkv, int D, int bs, int W, float scale,
                      int bf16, int tiles);
/* Sets *tiles to whether prefill_attention's bf16 tiles serve head dim D on this CPU (AMX-BF16 or AVX-512 BF16 within
   the build's cap, D % 32 == 0). */
void prefill_attention_tiles(int D, int *tiles);

/* norm_rope.c: x, res, out, res_out: [N, H] contiguous, H <= 8192, H % 8 == 0; res and res_out may be NULL. */
void rms_norm(const void *x, const void *res, const void *w, void *out, void *res_out, int N, int H, float eps,
              int bf16);

/* norm_rope.c: q: [N, Hq, D], k/v: [N, Hkv, D] with token strides sq/sk/sv (heads contiguous),
   D <= 256, D % 16 == 0; cos_sin: [P, D] fp32; positions: [N] int32; caches: [blocks * bs, Hkv, D];
   slots: [N] int32 (-1: write nothing). */
void qk_norm_rope_store(void *q, void *k, const void *v, const void *qw, const void *kw, float eps,
                        const float *cos_sin, const int32_t *positions, void *kc, void *vc, const int32_t *slots,
                        int N, int Hq, int Hkv, int D, long sq, long sk, long sv, int bf16);

/* embedding.c: out[n] = table[ids[n]]; ids: [N] int32 (in range), out: [N, H]. `embedding`: any dtype of
   elem_size bytes. `embedding_int8`: table [V, H] int8, scale [V], out = q * scale. `embedding_int4`: table
   [V, H / 2] uint8 in linear_int4's layout, scale and offset [V, H / G], out = q * scale + offset
   (rounded in fp32, then to the out dtype). Scales, offsets and out all bf16 or all fp32; H % 64 == 0. */
void embedding(const int32_t *ids, const void *table, void *out, int N, int H, int elem_size);
void embedding_int8(const int32_t *ids, const int8_t *table, const void *scale, void *out, int N, int H, int bf16);
void embedding_int4(const int32_t *ids, const uint8_t *table, const void *scale, const void *offset, void *out,
                    int N, int V, int H, int G, int bf16);

/* pointwise.c: x: [N, 2I] (gate | up), out: [N, I] = silu(gate) * up, bf16 or fp32, I % 8 == 0. */
void silu_mul(const void *x, void *out, int N, int I, int bf16);

/* pointwise.c: out[i] = x[i], bf16 -> fp32, n elements. */
void bf16_to_fp32(const uint16_t *x, float *out, long n);

/* sample.c: one token per row of logits [B, V] fp32: argmax where temperature is 0, else the exponential race
   over logits / max(temperature, 1e-5) after top-k (<= 0: off), top-p and min-p, with noise hashed from
   (keys, steps, token id). temperature, top_p, min_p: [B] fp32; top_k, keys, steps: [B] int32; tokens: [B].
   Each row's logits first adjusted as sampler.apply_penalties then apply_adjust do, without writing them:
   penalty_rows, penalty_tokens: [penalties] int64, penalty_counts: [penalties] fp32 (sorted by row, a row's tokens
   distinct), presence, frequency, repetition: [B] fp32 (read for the rows an entry names); bias_rows, bias_tokens:
   [biases] int64, bias_values: [biases] fp32 (sorted by row); mask_rows: [masks] int64, bitmask: [masks, W] int32.
   scratch: scratch_bytes, 64-byte aligned: the rows' only working memory (nothing is allocated), one row scratch
   for each thread that samples at once; less than sample_scratch_bytes(V, 1)'s: NANOQWEN_NO_MEMORY. */
int sample_rows(const float *logits, const float *temperature, const float *top_p, const int32_t *top_k,
                const float *min_p, const int32_t *keys, const int32_t *steps, const int64_t *bias_rows,
                const int64_t *bias_tokens, const float *bias_values, long biases, const int64_t *mask_rows,
                const int32_t *bitmask, int masks, int W, const int64_t *penalty_rows, const int64_t *penalty_tokens,
                const float *penalty_counts, long penalties, const float *presence, const float *frequency,
                const float *repetition, int64_t *tokens, int B, int V, void *scratch, long scratch_bytes);

/* sample.c: *bytes = the scratch of sample_rows for rows of V logits on `threads` threads. */
void sample_scratch_bytes(int V, int threads, int64_t *bytes);

/* sample.c: tokens[b] = the first maximum of row b of logits [B, V], bf16 (bf16 != 0) or fp32, as torch.argmax (but a
   NaN never wins). */
void argmax_rows(const void *logits, int64_t *tokens, int B, int V, int bf16);

/* replay.c: a CPU graph's replay (ops/cpu/graph.py). cpugraph_thunk sets *thunk to the function that calls the kernel
   `name` (a prototype above) from its arguments packed as 8-byte slots, NULL for any other name. cpugraph_replay runs
   n packed calls {thunk, kernel, slots} in order; -> the index of the first whose status was not 0 (it stops there),
   else -1. */
void cpugraph_thunk(const char *name, void **thunk);
int cpugraph_replay(const void *calls, int n);

#endif
