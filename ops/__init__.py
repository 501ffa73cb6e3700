"""Kernel dispatcher: every op has a torch reference and (where it pays) a Triton kernel.

The backend is process-wide: `torch` (CPU, MPS, and the reference everywhere) or `triton`
(default on CUDA; on the CPU only under TRITON_INTERPRET=1, for tests).
"""
from __future__ import annotations

import os

import torch

from ops import cpu_attention, cpu_linear, cpu_norm_rope
from ops.activation import silu_mul_torch
from ops.cpu_linear import linear
from ops.decode_attention import decode_attention_torch
from ops.prefill_attention import prefill_attention_torch
from ops.rms_norm import rms_norm_torch
from ops.rope import qk_norm_rope_store_torch

BACKENDS = ("torch", "triton")
_backend = "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def default_backend(device: torch.device) -> str:
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def build_cpu_kernels() -> None:
    """Compiles the CPU kernels now (or loads them from the cache), running the C compiler."""
    for module in (cpu_linear, cpu_attention, cpu_norm_rope):
        module.KERNEL.build()


def set_backend(name: str, device: torch.device) -> None:
    """Select the kernels; raises ValueError when `name` cannot run on `device`."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "triton":
        if not triton_available():
            raise ValueError("NANOQWEN_KERNELS=triton needs the triton package (pip install triton)")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            raise ValueError(
                f"Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1; not on {device.type}"
            )
        if device.type == "cuda":
            from ops.decode_attention import num_sms

            num_sms(device)  # queried now, outside any torch.compile trace
    _backend = name
    if device.type == "cpu":
        build_cpu_kernels()


def backend() -> str:
    return _backend


__all__ = ["linear", "rms_norm", "silu_mul", "qk_norm_rope_store", "decode_attention", "prefill_attention"]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual); without residual the second is x."""
    if _backend == "triton":
        from ops.rms_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    if cpu_norm_rope.rms_norm_supported(x, weight, residual):
        return cpu_norm_rope.rms_norm_cpu(x, weight, eps, residual)
    return rms_norm_torch(x, weight, eps, residual)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate | up) -> silu(gate) * up: [..., I]."""
    if _backend == "triton":
        from ops.activation import silu_mul_triton

        return silu_mul_triton(x)
    return silu_mul_torch(x)


def qk_norm_rope_store(q, k, v, q_weight, k_weight, eps, cos_sin, positions, k_cache, v_cache, slot_mapping) -> None:
    """In place: q, k <- rope(rmsnorm(q|k)); k/v written into the paged cache at slot_mapping."""
    if _backend == "triton":
        from ops.rope import qk_norm_rope_store_triton as impl
    elif cpu_norm_rope.qk_norm_rope_store_supported(q, k, v, k_cache):
        impl = cpu_norm_rope.qk_norm_rope_store_cpu
    else:
        impl = qk_norm_rope_store_torch
    impl(q, k, v, q_weight, k_weight, eps, cos_sin, positions, k_cache, v_cache, slot_mapping)


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    if _backend == "triton":
        from ops.decode_attention import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale)
    if cpu_attention.supports(q, k_cache):
        return cpu_attention.decode_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, scale)
    return decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens, scale)


def decode_attention_gathers(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether decode attention copies every block-table column it is given (the torch reference)
    rather than stopping at each context length (the Triton and CPU kernels)."""
    return _backend == "torch" and not cpu_attention.supports(q, k_cache)


def prefill_attention(q, k, v, k_cache, v_cache, block_tables, query_lens, context_lens, scale: float) -> torch.Tensor:
    return prefill_attention_torch(q, k, v, k_cache, v_cache, block_tables, query_lens, context_lens, scale)
