"""Paged decode attention on the CPU: one query token per sequence, read straight from the blocks.

The torch reference gathers every block of the padded table into a new tensor and runs SDPA on
it; at decode sizes that costs far more than the arithmetic. This kernel walks each sequence's
block table up to its context length, one (sequence, kv head) per task, with the GQA group's
query heads sharing each K/V row, an online softmax and fp32 accumulation (bf16 or fp32 cache).
Built by ops/cpu_build.py; where it cannot be, the dispatcher keeps the torch reference.
"""
from __future__ import annotations

import ctypes

import torch

from ops import cpu_build

MAX_GROUP = 16  # query heads per kv head
MAX_HEAD_DIM = 256

_SOURCE = r"""
static inline __m256 load8(const void *p, long i, int bf16) {
    return bf16 ? widen((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}

/* q: [B, Hq, D]; k/v cache: [blocks, bs, Hkv, D]; tables: [B, W] int32; ctx: [B] int32;
   out: [B, Hq, D]. D % 8 == 0, Hq / Hkv <= 16, D <= 256. */
void decode_attention(const void *q, const void *kc, const void *vc, const int32_t *tables, const int32_t *ctx,
                      void *out, int B, int Hq, int Hkv, int D, int bs, int W, float scale, int bf16) {
    const int G = Hq / Hkv;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hkv; h++) {
            __m256 qv[16][32], acc[16][32];
            float m[16], l[16];
            const int nv = D / 8;
            for (int g = 0; g < G; g++) {
                long base = ((long)b * Hq + h * G + g) * D;
                for (int i = 0; i < nv; i++) {
                    qv[g][i] = _mm256_mul_ps(load8(q, base + 8 * i, bf16), _mm256_set1_ps(scale));
                    acc[g][i] = _mm256_setzero_ps();
                }
                m[g] = -INFINITY;
                l[g] = 0.0f;
            }
            for (int t = 0; t < ctx[b]; t++) {
                long row = (((long)tables[(long)b * W + t / bs] * bs + t % bs) * Hkv + h) * D;
                for (int g = 0; g < G; g++) {
                    __m256 s = _mm256_setzero_ps();
                    for (int i = 0; i < nv; i++) s = _mm256_fmadd_ps(qv[g][i], load8(kc, row + 8 * i, bf16), s);
                    float score = hsum(s);
                    if (score > m[g]) {  /* new running max: rescale what was accumulated */
                        float c = expf(m[g] - score);
                        l[g] *= c;
                        for (int i = 0; i < nv; i++) acc[g][i] = _mm256_mul_ps(acc[g][i], _mm256_set1_ps(c));
                        m[g] = score;
                    }
                    float p = expf(score - m[g]);
                    l[g] += p;
                    __m256 pv = _mm256_set1_ps(p);
                    for (int i = 0; i < nv; i++) acc[g][i] = _mm256_fmadd_ps(pv, load8(vc, row + 8 * i, bf16), acc[g][i]);
                }
            }
            for (int g = 0; g < G; g++) {
                long base = ((long)b * Hq + h * G + g) * D;
                __m256 inv = _mm256_set1_ps(l[g] > 0.0f ? 1.0f / l[g] : 0.0f);
                for (int i = 0; i < nv; i++) {
                    float tmp[8];
                    _mm256_storeu_ps(tmp, _mm256_mul_ps(acc[g][i], inv));
                    for (int j = 0; j < 8; j++) {
                        if (bf16) ((uint16_t *)out)[base + 8 * i + j] = f32_to_bf16(tmp[j]);
                        else ((float *)out)[base + 8 * i + j] = tmp[j];
                    }
                }
            }
        }
    }
}
"""


KERNEL = cpu_build.CKernel(
    "cpu_attention", _SOURCE,
    {"decode_attention": [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int]},
)


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    num_heads, head_dim = q.shape[1:]
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float32)
        and k_cache.dtype == q.dtype
        and head_dim % 8 == 0
        and head_dim <= MAX_HEAD_DIM
        and num_heads // k_cache.shape[2] <= MAX_GROUP
        and KERNEL.ready
    )


def decode_attention_cpu(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    q = q.contiguous()
    tables = block_tables.contiguous()
    out = torch.empty_like(q)
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    with cpu_build.profiled("nanoqwen::decode_attention_cpu"):
        KERNEL.lib.decode_attention(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), context_lens.data_ptr(),
            out.data_ptr(), batch, num_heads, num_kv_heads, head_dim, block_size, tables.shape[1], scale,
            int(q.dtype == torch.bfloat16),
        )
    return out


# The same kernel as an opaque op for torch.compile (the dispatcher costs tens of µs in eager).
decode_attention_cpu_op = torch.library.custom_op(
    "nanoqwen::decode_attention_cpu", decode_attention_cpu, mutates_args=()
)


@decode_attention_cpu_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(q)
