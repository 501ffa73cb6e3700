"""int8 weight-only linear layers on x86 CPUs (AVX2, AVX-512), up to linear.MAX_ROWS activation rows.

Decode reads every weight once a step, so a weight in one byte instead of two halves the step's
memory traffic: this kernel streams each int8 weight row once, widens it to fp32 in registers
(`cvtepi8_epi32` + `cvtepi32_ps`, 16 at a time with AVX-512) and FMAs it against every activation row
(up to 8 per pass), then applies the row's scale. With 2+ bf16 activation rows the widened weights are
rounded to bf16 (exact for int8) and multiplied by AMX's `tdpbf16ps`, 16 weight rows at a time, where the CPU
has AMX (csrc/amx.h), else by `vdpbf16ps`. Every product is exact
(no int8 activation dots), so fp32 activations give the torch reference's sums up to their order.
Parallel over chunks of output rows on the thread pool, as linear.py's kernel. More rows (prefill) are
compute-bound: the torch reference's fp32 GEMM on dequantised weights serves them.
Source: csrc/linear_int8.c, built by build.py.
"""
from __future__ import annotations

import torch

from ops.cpu import build, graph
from ops.cpu.linear import MAX_ROWS
from ops.torch_ref.linear_int8 import linear_int8_torch

KERNEL = build.CKernel("cpu_linear_int8", "linear_int8.c", ("linear_int8",))


def _linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS, K % 32 == 0), weight: [N, K] int8 contiguous, scale: [N] in x's dtype
    (bf16 or fp32) -> [M, N]."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    with build.profiled("nanoqwen::linear_int8_cpu"):
        graph.call(KERNEL.lib.linear_int8, x, weight, scale, out, x.shape[0], weight.shape[0], x.shape[1],
                   int(x.dtype == torch.bfloat16))
    return out


def _linear_int8_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


linear_int8_cpu = build.kernel_op("linear_int8_cpu", _linear_int8, _linear_int8_fake)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The kernel set's linear_int8: the C kernel up to MAX_ROWS rows, the torch reference beyond."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not (KERNEL.ready and rows.shape[0] <= MAX_ROWS and rows.shape[1] % 32 == 0):
        return linear_int8_torch(x, weight, scale)
    out = linear_int8_cpu(rows, weight, scale)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
