"""RMSNorm (+ residual add) and q/k-norm + RoPE + KV store as single CPU kernel calls.

At decode sizes each of these is ~10 tiny torch ops per layer, and on a 2-core CPU their
dispatch costs more than their arithmetic. The kernels reproduce the torch references' rounding
step by step (statistics in fp32, each intermediate rounded to the model dtype where torch rounds
it), so they match them to the bit in fp32 and bf16 alike, up to the order of the fp32 sum of squares;
padded lanes (slot -1) write nothing. Eight values at a time (AVX2): hidden sizes a multiple of 8, head
dims a multiple of 16 (each half of the rotation in whole vectors).
Source: csrc/norm_rope.c, built by build.py; where they cannot be, or for shapes they do not take,
the CPU kernel set keeps the torch references; for layouts they do not take (never the model's), they
call the references themselves.
"""
from __future__ import annotations

import torch

from ops.cpu import build, graph
from ops.torch_ref.rms_norm import rms_norm_torch
from ops.torch_ref.rope import qk_norm_rope_store_torch

KERNEL = build.CKernel("cpu_norm_rope", "norm_rope.c", ("rms_norm", "qk_norm_rope_store"))
MAX_HIDDEN = 8192
MAX_HEAD_DIM = 256


def takes_norm(hidden_size: int) -> bool:
    """Whether rms_norm serves rows of this size: a multiple of 8 values (the kernel's vector width)."""
    return hidden_size % 8 == 0 and hidden_size <= MAX_HIDDEN


def takes_rope(head_dim: int) -> bool:
    """Whether qk_norm_rope_store serves this head dim: a multiple of 16 (each half of the rotation in whole
    vectors)."""
    return head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM


def rms_norm_layout(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Contiguous rows of a size takes_norm serves."""
    return (x.dim() == 2 and x.is_contiguous() and takes_norm(x.shape[1])
            and (residual is None or residual.is_contiguous()))


def _rms_norm_into(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor,
    new_residual: torch.Tensor | None,
) -> None:
    with build.profiled("nanoqwen::rms_norm_cpu"):
        graph.call(KERNEL.lib.rms_norm, x, residual, weight, out, new_residual, x.shape[0], x.shape[1], eps,
                   int(x.dtype == torch.bfloat16))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _rms_norm_into(x, None, weight, eps, out, None)
    return out


def _add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, new_residual = torch.empty_like(x), torch.empty_like(x)
    _rms_norm_into(x, residual, weight, eps, out, new_residual)
    return out, new_residual


def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


def _add_rms_norm_fake(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


# Two ops, as a custom op's output may not alias its input (the norm without residual returns x).
_rms_norm_op = build.kernel_op("rms_norm_cpu", _rms_norm, _rms_norm_fake)
_add_rms_norm_op = build.kernel_op("add_rms_norm_cpu", _add_rms_norm, _add_rms_norm_fake)


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ops.torch_ref.rms_norm.rms_norm_torch; x, residual and weight of one dtype."""
    if not rms_norm_layout(x, residual):
        return rms_norm_torch(x, weight, eps, residual)
    if residual is None:
        return _rms_norm_op(x, weight, eps), x
    return _add_rms_norm_op(x, residual, weight, eps)


def qk_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Heads dense in each token (q, k, v may be views of the fused qkv rows), the cache contiguous, a head dim
    takes_rope serves."""
    dense = all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in (q, k, v))
    return dense and takes_rope(q.shape[-1]) and k_cache.is_contiguous()


def _qk_norm_rope_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
    cos_sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    n, num_heads, head_dim = q.shape
    # The runner's inputs are int32 already: these convert only for other callers.
    positions = positions.to(torch.int32).contiguous()
    slots = slot_mapping.to(torch.int32).contiguous()
    with build.profiled("nanoqwen::qk_norm_rope_store_cpu"):
        graph.call(
            KERNEL.lib.qk_norm_rope_store, q, k, v, q_weight, k_weight, eps, cos_sin, positions, k_cache, v_cache,
            slots, n, num_heads, k.shape[1], head_dim, q.stride(0), k.stride(0), v.stride(0),
            int(q.dtype == torch.bfloat16),
        )


def _qk_norm_rope_store_fake(q, k, v, q_weight, k_weight, eps, cos_sin, positions, k_cache, v_cache, slot_mapping):
    return None


_qk_norm_rope_store_op = build.kernel_op(
    "qk_norm_rope_store_cpu", _qk_norm_rope_store, _qk_norm_rope_store_fake,
    mutates_args=("q", "k", "k_cache", "v_cache"),
)


def qk_norm_rope_store_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
    cos_sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as ops.torch_ref.rope.qk_norm_rope_store_torch; q, k, v and the caches of one dtype."""
    impl = _qk_norm_rope_store_op if qk_layout(q, k, v, k_cache) else qk_norm_rope_store_torch
    impl(q, k, v, q_weight, k_weight, eps, cos_sin, positions, k_cache, v_cache, slot_mapping)
