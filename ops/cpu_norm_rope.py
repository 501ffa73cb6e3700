"""RMSNorm (+ residual add) and q/k-norm + RoPE + KV store as single CPU kernel calls.

At decode sizes each of these is ~10 tiny torch ops per layer, and on a 2-core CPU their
dispatch costs more than their arithmetic. The kernels reproduce the torch references' rounding
step by step (statistics in fp32, each intermediate rounded to the model dtype where torch rounds
it), so they match them to the bit in fp32 and bf16 alike; padded lanes (slot -1) write nothing.
Source: ops/csrc/norm_rope.c, built by ops/cpu_build.py; where they cannot be, the dispatcher keeps
the torch references.
"""
from __future__ import annotations

import torch

from ops import cpu_build

KERNEL = cpu_build.CKernel("cpu_norm_rope", "norm_rope.c", ("rms_norm", "qk_norm_rope_store"))
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
