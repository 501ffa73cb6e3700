/* A CPU graph's replay (ops/cpu/graph.py): every recorded kernel call of a step issued from here, in order, by one
   call from Python, not one ctypes call each. A thunk per prototype of nanoqwen_cpu.h calls a kernel's function
   pointer as its real type (__typeof__ of the prototype: the compiler checks each call), its arguments read from
   8-byte slots by the types the prototype gives (tests/test_cpu_build.py checks the slots against the header). */
#include <string.h>

#include "nanoqwen_cpu.h"

/* One argument, as graph.py packs it (its _Slot): a pointer, a long, an int or a float. */
union slot {
    void *p;
    long l;
    int i;
    float f;
};

typedef int (*thunk)(void *fn, const union slot *a);

/* One recorded call, as graph.py packs it (its _Call). */
struct call {
    thunk thunk;
    void *fn;
    const union slot *args;
};

static int thunk_linear(void *fn, const union slot *a) {
    ((__typeof__(linear) *)fn)(a[0].p, a[1].p, a[2].p, a[3].i, a[4].i, a[5].i, a[6].i);
    return 0;
}
static int thunk_linear_int8(void *fn, const union slot *a) {
    ((__typeof__(linear_int8) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].i, a[5].i, a[6].i, a[7].i);
    return 0;
}
static int thunk_linear_int4(void *fn, const union slot *a) {
    ((__typeof__(linear_int4) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].i, a[6].i, a[7].i, a[8].i, a[9].i,
        a[10].i);
    return 0;
}
static int thunk_linear_int4_pack(void *fn, const union slot *a) {
    ((__typeof__(linear_int4_pack) *)fn)(a[0].p, a[1].p, a[2].i, a[3].i);
    return 0;
}
static int thunk_linear_int4_layout(void *fn, const union slot *a) {
    ((__typeof__(linear_int4_layout) *)fn)(a[0].p);
    return 0;
}
static int thunk_linear_int4_amx_tiles(void *fn, const union slot *a) {
    ((__typeof__(linear_int4_amx_tiles) *)fn)(a[0].p, a[1].i, a[2].i, a[3].p);
    return 0;
}
static int thunk_dequant_int4(void *fn, const union slot *a) {
    ((__typeof__(dequant_int4) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].i, a[5].i, a[6].i, a[7].i);
    return 0;
}
static int thunk_dequant_int8(void *fn, const union slot *a) {
    ((__typeof__(dequant_int8) *)fn)(a[0].p, a[1].p, a[2].i, a[3].i, a[4].i);
    return 0;
}
static int thunk_decode_attention(void *fn, const union slot *a) {
    ((__typeof__(decode_attention) *)fn)(a[0].p, a[1].l, a[2].p, a[3].p, a[4].p, a[5].p, a[6].p, a[7].i, a[8].i, a[9].i,
        a[10].i, a[11].i, a[12].i, a[13].f, a[14].i);
    return 0;
}
static int thunk_decode_attention_avx512(void *fn, const union slot *a) {
    ((__typeof__(decode_attention_avx512) *)fn)(a[0].i, a[1].i, a[2].p);
    return 0;
}
static int thunk_prefill_attention(void *fn, const union slot *a) {
    return ((__typeof__(prefill_attention) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].p, a[6].p, a[7].i, a[8].i,
        a[9].i, a[10].i, a[11].i, a[12].i, a[13].f, a[14].i, a[15].i);
}
static int thunk_prefill_attention_tiles(void *fn, const union slot *a) {
    ((__typeof__(prefill_attention_tiles) *)fn)(a[0].i, a[1].p);
    return 0;
}
static int thunk_rms_norm(void *fn, const union slot *a) {
    ((__typeof__(rms_norm) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].i, a[6].i, a[7].f, a[8].i);
    return 0;
}
static int thunk_qk_norm_rope_store(void *fn, const union slot *a) {
    ((__typeof__(qk_norm_rope_store) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].f, a[6].p, a[7].p, a[8].p,
        a[9].p, a[10].p, a[11].i, a[12].i, a[13].i, a[14].i, a[15].l, a[16].l, a[17].l, a[18].i);
    return 0;
}
static int thunk_embedding(void *fn, const union slot *a) {
    ((__typeof__(embedding) *)fn)(a[0].p, a[1].p, a[2].p, a[3].i, a[4].i, a[5].i);
    return 0;
}
static int thunk_embedding_int8(void *fn, const union slot *a) {
    ((__typeof__(embedding_int8) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].i, a[5].i, a[6].i);
    return 0;
}
static int thunk_embedding_int4(void *fn, const union slot *a) {
    ((__typeof__(embedding_int4) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].i, a[6].i, a[7].i, a[8].i, a[9].i);
    return 0;
}
static int thunk_silu_mul(void *fn, const union slot *a) {
    ((__typeof__(silu_mul) *)fn)(a[0].p, a[1].p, a[2].i, a[3].i, a[4].i);
    return 0;
}
static int thunk_bf16_to_fp32(void *fn, const union slot *a) {
    ((__typeof__(bf16_to_fp32) *)fn)(a[0].p, a[1].p, a[2].l);
    return 0;
}
static int thunk_sample_rows(void *fn, const union slot *a) {
    return ((__typeof__(sample_rows) *)fn)(a[0].p, a[1].p, a[2].p, a[3].p, a[4].p, a[5].p, a[6].p, a[7].p, a[8].p,
        a[9].p, a[10].l, a[11].p, a[12].p, a[13].i, a[14].i, a[15].p, a[16].p, a[17].p, a[18].l, a[19].p, a[20].p,
        a[21].p, a[22].p, a[23].i, a[24].i, a[25].p, a[26].l);
}
static int thunk_sample_scratch_bytes(void *fn, const union slot *a) {
    ((__typeof__(sample_scratch_bytes) *)fn)(a[0].i, a[1].i, a[2].p);
    return 0;
}
static int thunk_argmax_rows(void *fn, const union slot *a) {
    ((__typeof__(argmax_rows) *)fn)(a[0].p, a[1].p, a[2].i, a[3].i, a[4].i);
    return 0;
}

static const struct {
    const char *name;
    thunk thunk;
} THUNKS[] = {
    {"linear", thunk_linear},
    {"linear_int8", thunk_linear_int8},
    {"linear_int4", thunk_linear_int4},
    {"linear_int4_pack", thunk_linear_int4_pack},
    {"linear_int4_layout", thunk_linear_int4_layout},
    {"linear_int4_amx_tiles", thunk_linear_int4_amx_tiles},
    {"dequant_int4", thunk_dequant_int4},
    {"dequant_int8", thunk_dequant_int8},
    {"decode_attention", thunk_decode_attention},
    {"decode_attention_avx512", thunk_decode_attention_avx512},
    {"prefill_attention", thunk_prefill_attention},
    {"prefill_attention_tiles", thunk_prefill_attention_tiles},
    {"rms_norm", thunk_rms_norm},
    {"qk_norm_rope_store", thunk_qk_norm_rope_store},
    {"embedding", thunk_embedding},
    {"embedding_int8", thunk_embedding_int8},
    {"embedding_int4", thunk_embedding_int4},
    {"silu_mul", thunk_silu_mul},
    {"bf16_to_fp32", thunk_bf16_to_fp32},
    {"sample_rows", thunk_sample_rows},
    {"sample_scratch_bytes", thunk_sample_scratch_bytes},
    {"argmax_rows", thunk_argmax_rows},
};

void cpugraph_thunk(const char *name, void **found) {
    *found = NULL;
    for (size_t t = 0; t < sizeof THUNKS / sizeof THUNKS[0]; t++)
        if (strcmp(THUNKS[t].name, name) == 0) *found = (void *)THUNKS[t].thunk;
}

int cpugraph_replay(const void *calls, int n) {
    const struct call *c = calls;
    for (int i = 0; i < n; i++)
        if (c[i].thunk(c[i].fn, c[i].args)) return i;
    return -1;
}
