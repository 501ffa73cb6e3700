"""RMSNorm (+ residual add) and q/k-norm + RoPE + KV store as single CPU kernel calls.

At decode sizes each of these is ~10 tiny torch ops per layer, and on a 2-core CPU their
dispatch costs more than their arithmetic. The kernels reproduce the torch references' rounding
step by step (statistics in fp32, each intermediate rounded to the model dtype where torch rounds
it), so they match them to the bit in fp32 and bf16 alike; padded lanes (slot -1) write nothing.
Built by ops/cpu_build.py; where they cannot be, the dispatcher keeps the torch references.
"""
from __future__ import annotations

import ctypes

import torch

from ops import cpu_build

_SOURCE = r"""
static inline float ld(const void *p, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void st(void *p, long i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v); else ((float *)p)[i] = v;
}
static inline float rnd(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* One row: out = round(w * round(s * rsqrt(mean(s^2) + eps))), s = round(x + res) (or x); inputs in
   the model dtype, `out` in the model dtype or (out_f32) fp32 holding model-dtype values. */
static void norm_row(const void *x, long xo, const void *res, const void *w, void *out, void *res_out,
                     int H, float eps, int bf16, int out_f32, float *buf) {
    float ss = 0.0f;
    for (int i = 0; i < H; i++) {
        float s = ld(x, xo + i, bf16);
        if (res) s = rnd(s + ld(res, xo + i, bf16), bf16);
        buf[i] = s;
        ss += s * s;
    }
    float inv = 1.0f / sqrtf(ss / H + eps);
    for (int i = 0; i < H; i++) {
        if (res_out) st(res_out, xo + i, buf[i], bf16);
        float v = rnd(ld(w, i, bf16) * rnd(buf[i] * inv, bf16), bf16);
        if (out_f32) ((float *)out)[i] = v; else st(out, xo + i, v, bf16);
    }
}

/* x, res, out, res_out: [N, H] contiguous; res and res_out may be NULL. */
void rms_norm(const void *x, const void *res, const void *w, void *out, void *res_out, int N, int H, float eps,
              int bf16) {
    #pragma omp parallel for schedule(static) if (N >= 16)
    for (int n = 0; n < N; n++) {
        float buf[8192];
        norm_row(x, (long)n * H, res, w, out, res_out, H, eps, bf16, 0, buf);
    }
}

/* q: [N, Hq, D], k/v: [N, Hkv, D] with token strides sq/sk/sv (heads contiguous); cos_sin: [P, D] fp32;
   positions: [N] int32; caches: [blocks * bs, Hkv, D]; slots: [N] int32 (-1: write nothing). */
void qk_norm_rope_store(void *q, void *k, const void *v, const void *qw, const void *kw, float eps,
                        const float *cos_sin, const int32_t *positions, void *kc, void *vc, const int32_t *slots,
                        int N, int Hq, int Hkv, int D, long sq, long sk, long sv, int bf16) {
    #pragma omp parallel for schedule(static) if (N >= 16)
    for (int n = 0; n < N; n++) {
        const float *cs = cos_sin + (long)positions[n] * D;
        const int half = D / 2;
        float normed[512];
        for (int h = 0; h < Hq + Hkv; h++) {
            const int is_q = h < Hq;
            void *x = is_q ? q : k;
            const long base = is_q ? n * sq + (long)h * D : n * sk + (long)(h - Hq) * D;
            norm_row(x, base, 0, is_q ? qw : kw, normed, 0, D, eps, bf16, 1, normed + D);
            for (int i = 0; i < D; i++) {
                float c = rnd(cs[i % half], bf16), s = rnd(cs[half + i % half], bf16);
                float rot = i < half ? -normed[i + half] : normed[i - half];
                st(x, base + i, rnd(rnd(normed[i] * c, bf16) + rnd(rot * s, bf16), bf16), bf16);
            }
        }
        if (slots[n] < 0) continue;
        const long dst = (long)slots[n] * Hkv * D;
        const int size = bf16 ? 2 : 4;
        for (int h = 0; h < Hkv; h++) {
            memcpy((char *)kc + (dst + (long)h * D) * size, (const char *)k + (n * sk + (long)h * D) * size, (size_t)D * size);
            memcpy((char *)vc + (dst + (long)h * D) * size, (const char *)v + (n * sv + (long)h * D) * size, (size_t)D * size);
        }
    }
}
"""


KERNEL = cpu_build.CKernel("cpu_norm_rope", _SOURCE, {
    "rms_norm": [ctypes.c_void_p] * 5 + [ctypes.c_int] * 2 + [ctypes.c_float, ctypes.c_int],
    "qk_norm_rope_store": (
        [ctypes.c_void_p] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
        + [ctypes.c_long] * 3 + [ctypes.c_int]
    ),
})
MAX_HIDDEN = 8192
MAX_HEAD_DIM = 256


def _eligible(x: torch.Tensor) -> bool:
    return (
        KERNEL.ready
        and x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float32)
        and not torch.compiler.is_compiling()
    )


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return (
        _eligible(x)
        and x.dim() == 2
        and x.shape[-1] <= MAX_HIDDEN
        and x.is_contiguous()
        and weight.dtype == x.dtype
        and (residual is None or (residual.is_contiguous() and residual.dtype == x.dtype))
    )


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ops.rms_norm.rms_norm_torch, for [N, H] contiguous inputs."""
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x) if residual is not None else x
    with cpu_build.profiled("nanoqwen::rms_norm_cpu"):
        KERNEL.lib.rms_norm(
            x.data_ptr(), residual.data_ptr() if residual is not None else None, weight.data_ptr(), out.data_ptr(),
            new_residual.data_ptr() if residual is not None else None, x.shape[0], x.shape[1], eps,
            int(x.dtype == torch.bfloat16),
        )
    return out, new_residual


def qk_norm_rope_store_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (
        _eligible(q)
        and q.shape[-1] <= MAX_HEAD_DIM
        and all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] and t.dtype == q.dtype for t in (k, v, k_cache))
        and q.stride(-1) == 1
        and q.stride(-2) == q.shape[-1]
        and k_cache.is_contiguous()
    )


def qk_norm_rope_store_cpu(q, k, v, q_weight, k_weight, eps, cos_sin, positions, k_cache, v_cache, slot_mapping) -> None:
    """Same contract as ops.rope.qk_norm_rope_store_torch."""
    n, num_heads, head_dim = q.shape
    # The runner's inputs are int32 already: these convert only for other callers.
    positions = positions.to(torch.int32).contiguous()
    slots = slot_mapping.to(torch.int32).contiguous()
    with cpu_build.profiled("nanoqwen::qk_norm_rope_store_cpu"):
        KERNEL.lib.qk_norm_rope_store(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), q_weight.data_ptr(), k_weight.data_ptr(), eps,
            cos_sin.data_ptr(), positions.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
            n, num_heads, k.shape[1], head_dim, q.stride(0), k.stride(0), v.stride(0), int(q.dtype == torch.bfloat16),
        )
