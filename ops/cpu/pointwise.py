"""SwiGLU's silu(gate) * up, and the LM head's bf16 logits widened to fp32, as single C calls.

Both are a torch op or two, cheap but not C calls: the CPU graph (ops/cpu/graph.py) replays only C
calls, so every op of the decode step is one. silu_mul rounds as the reference does (silu rounded to
the dtype, then the product), its exp a polynomial within about an ulp of torch's; the logits are
widened by a separate pass rather than by the linear kernels writing fp32: the pass measured 0.02 ms
at batch 1 and 0.3 ms at batch 8 on the 2-core CPU (torch's `.float()` there: 0.01 and 0.3-17 ms,
its threads contending under load), and the linear kernels stay one dtype in and out.
Source: csrc/pointwise.c, built by build.py.
"""
from __future__ import annotations

import torch

from ops.cpu import build, graph
from ops.torch_ref.activation import silu_mul_torch
from ops.torch_ref.convert import to_fp32_torch

KERNEL = build.CKernel("cpu_pointwise", "pointwise.c", ("silu_mul", "bf16_to_fp32"))


def _silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [N, 2I] contiguous, bf16 or fp32, I % 8 == 0 -> [N, I]."""
    n, size = x.shape
    out = torch.empty(n, size // 2, dtype=x.dtype)
    with build.profiled("nanoqwen::silu_mul_cpu"):
        graph.call(KERNEL.lib.silu_mul, x, out, n, size // 2, int(x.dtype == torch.bfloat16))
    return out


def _silu_mul_fake(x):
    return x.new_empty(x.shape[0], x.shape[1] // 2)


def _bf16_to_fp32(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32)
    with build.profiled("nanoqwen::bf16_to_fp32_cpu"):
        graph.call(KERNEL.lib.bf16_to_fp32, x, out, x.numel())
    return out


def _bf16_to_fp32_fake(x):
    return x.new_empty(x.shape, dtype=torch.float32)


_silu_mul_op = build.kernel_op("silu_mul_cpu", _silu_mul, _silu_mul_fake)
_bf16_to_fp32_op = build.kernel_op("bf16_to_fp32_cpu", _bf16_to_fp32, _bf16_to_fp32_fake)


def silu_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.torch_ref.activation.silu_mul_torch; x bf16 or fp32."""
    if x.dim() != 2 or not x.is_contiguous() or x.shape[1] % 16:
        return silu_mul_torch(x)
    return _silu_mul_op(x)


def to_fp32_cpu(x: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.torch_ref.convert.to_fp32_torch."""
    if x.dtype != torch.bfloat16 or not x.is_contiguous():
        return to_fp32_torch(x)
    return _bf16_to_fp32_op(x)
