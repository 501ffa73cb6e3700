/* Embedding lookups for every weight format, rounding as the torch references do: the why is in
   ops/cpu/embedding.py. */
#include "nanoqwen_cpu.h"
#include "int4_block.h"

/* Shapes: see nanoqwen_cpu.h. */
void embedding(const int32_t *ids, const void *table, void *out, int N, int H, int elem_size) {
    const size_t row = (size_t)H * elem_size;
    for (int n = 0; n < N; n++) memcpy((char *)out + n * row, (const char *)table + ids[n] * row, row);
}

/* Shapes: see nanoqwen_cpu.h. */
void embedding_int8(const int32_t *ids, const int8_t *table, const void *scale, void *out, int N, int H, int bf16) {
    for (int n = 0; n < N; n++) {
        const int8_t *q = table + (long)ids[n] * H;
        const float s = load1(scale, ids[n], bf16);
        for (int i = 0; i < H; i++) store1(out, (long)n * H + i, (float)q[i] * s, bf16);
    }
}

/* Shapes: see nanoqwen_cpu.h. The table's rows where linear_int4 reads them (int4_block.h). */
void embedding_int4(const int32_t *ids, const uint8_t *table, const void *scale, const void *offset, void *out,
                    int N, int V, int H, int G, int bf16) {
    const int groups = H / G;
    const long quad_rows = int4_quad_rows(V);
    for (int n = 0; n < N; n++)
        for (int b = 0; b < H / 64; b++) {
            const long g = (long)ids[n] * groups + 64 * b / G;  /* a block lies in one group: G % 64 == 0 */
            const float s = load1(scale, g, bf16), o = load1(offset, g, bf16);
            int32_t q[64];
            int4_block_q(table, ids[n], b, H, quad_rows, q);
            for (int c = 0; c < 64; c++) {
                float v = (float)q[c] * s;
                /* the reference rounds the product before adding the offset: no FMA contraction */
                __asm__("" : "+x"(v));
                store1(out, (long)n * H + 64 * b + c, v + o, bf16);
            }
        }
}
