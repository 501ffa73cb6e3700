"""int4 weight-only linear layers on x86 CPUs with AVX-512 (F, BW, VL), up to linear.MAX_ROWS activation rows.

A weight takes half a byte plus its group's share of a scale and an offset, so decode reads about a
quarter of bf16's bytes. The kernel (csrc/linear_int4.c) streams each packed row once and unpacks it
in registers: one widening of 16 words, then a shift and mask per 16 columns (the block layout of
ops/torch_ref/linear_int4.py), converted to fp32 and FMA'd against fp32 activations (bf16 ones are
widened once per call: 16-lane fp32 FMAs measured faster than 8-lane VDPBF16PS here, 0.26 vs 0.33 ms
for 4096 x 1024 on one thread); each group's sum is scaled once, and the offsets enter through
per-group activation sums. Unpacked once per 8 activation rows. With AMX and 2 to 16 bf16 activation
rows, 16 weight rows at a time are unpacked to bf16 tiles and multiplied by tdpbf16ps (csrc/amx.h),
which the FMAs could not keep up with at 8 rows. Parallel over chunks of output rows on the kernels'
thread pool (csrc/pool.h). More rows (prefill) and CPUs without AVX-512 take the torch reference.
"""
from __future__ import annotations

import ctypes

import torch

from ops.cpu import build, graph
from ops.cpu.linear import MAX_ROWS
from ops.torch_ref.linear_int4 import BLOCK, linear_int4_torch

PIECES = {torch.bfloat16: 2, torch.float32: 3}  # int8 pieces per activation row
KERNEL = build.CKernel("cpu_linear_int4", "linear_int4.c", ("linear_int4", "linear_int4_supported"))


def supported() -> bool:
    """Whether the kernel built and this CPU has the AVX-512 subsets it uses."""
    if not KERNEL.ready:
        return False
    ok = ctypes.c_int(0)
    KERNEL.lib.linear_int4_supported(ctypes.byref(ok))
    return bool(ok.value)


def _linear_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS), weight: [N, K / 2] uint8 contiguous, scale, offset: [N, K / G] contiguous in
    x's dtype (bf16 or fp32), G % 64 == 0 -> [M, N]."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, weight.shape[0], dtype=x.dtype)
    with build.profiled("nanoqwen::linear_int4_cpu"):
        graph.call(KERNEL.lib.linear_int4, x, weight, scale, offset, out, m, weight.shape[0], k, k // scale.shape[1],
                   int(x.dtype == torch.bfloat16), PIECES[x.dtype])
    return out


def _linear_int4_fake(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


linear_int4_cpu = build.kernel_op("linear_int4_cpu", _linear_int4, _linear_int4_fake)


def linear_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The kernel set's linear_int4 where `supported()`: the C kernel up to MAX_ROWS rows, the torch
    reference beyond."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS or (rows.shape[1] // scale.shape[1]) % BLOCK:
        return linear_int4_torch(x, weight, scale, offset)
    out = linear_int4_cpu(rows, weight, scale, offset)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
