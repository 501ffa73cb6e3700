"""Prefill-sized int8 and int4 linears: weight rows dequantised block by block, each block multiplied by torch's GEMM.

At many activation rows a linear is bound by arithmetic, not by reading the weights. The decode kernels
(linear_int8.py, linear_int4.py) split each activation row into 2 (bf16) or 4 (fp32) int8 pieces, 2-4x the
integer work of the rows, and the torch references they left prefill to widen the whole weight to fp32 for
the fp32 GEMM (2.5x slower than oneDNN's bf16 GEMM on an AVX-512-BF16 CPU). Here a block of weight rows is
dequantised into a scratch buffer kept by each thread and torch.mm writes that block's output columns: only a
block's worth of dequantised weights ever exists.
- int8: the q themselves (exact in bf16; csrc/dequant.c: to bf16 in a third of torch's copy_'s time), then the
  GEMM's output times the channels' scales, as the reference orders it. Its products are exact and summed in fp32;
  with bf16 activations the output is rounded to bf16 before the scale and after, so it is at most one bf16 ulp from
  the reference's (which rounds once).
- int4: q * scale + offset per group (csrc/dequant.c), rounded as the reference rounds, then to the GEMM's dtype:
  with bf16 activations each weight takes one bf16 rounding (2^-9 relative) the reference does not.
The GEMM runs in bf16 where the activations are bf16 and the CPU has AVX512-BF16 (linear.AVX512_BF16; every
AMX-BF16 CPU has it too), else in fp32 (fp32 activations, the exactness mode, always): there it is the reference's
arithmetic, block by block. oneDNN also takes bf16 on AVX-512 CPUs without AVX512-BF16 (linear.NATIVE_BF16), but
there it emulates the bf16 products.
Source: csrc/dequant.c, built by build.py.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ops.cpu import build, graph
from ops.cpu.linear import AVX512_BF16, MAX_ROWS

KERNEL = build.CKernel("cpu_dequant", "dequant.c", ("dequant_int4", "dequant_int8"))

# Activation rows from which the blocked GEMM serves, up to MAX_ROWS the decode kernels. Not where the GEMM starts to
# win (1 thread, 6144 x 1024, bf16, CPU ms, decode kernel / blocked GEMM: int8 16 rows 2.4 / 2.8, 32 rows 5.0 / 4.0;
# int4 32 rows 3.4 / 4.5) but where the decode kernels stop: a step of up to MAX_ROWS rows stays a bucket the CPU
# graph captures (graph.py records C calls, torch.mm is none), and the AMX kernels serve up to MAX_ROWS rows.
# int8 too: one thread's CPU time put its crossover at 17 rows on Zen 5 (a layer's four linears, bf16 rows, decode
# kernel / blocked: 16 rows 2.53 / 2.29 ms, 24 4.85 / 2.75), but whole steps at 2 threads, wall, OMP_WAIT_POLICY
# PASSIVE, took 67-69 ms by the decode kernel at 17 rows against 92-143 by the GEMM, the same at 32 rows
# (profiles/RESULTS.md, thirty-third session, lead).
MIN_ROWS = MAX_ROWS + 1
# A block of dequantised weights. One thread runs any block size from 256 KiB at the bf16 GEMM's pace; with two,
# each block is one OpenMP region of the GEMM, whose barrier waits for a descheduled thread on a shared CPU: 2-4
# MiB blocks (2-4 per linear of Qwen3-0.6B) ran 512 rows as fast as 1 MiB ones or faster, 256 KiB 1.2-2.3x slower.
BLOCK_BYTES = 4 << 20
# A block's rows come in whole tiles of this many, the blocks of a weight of about equal size (a block may pass
# BLOCK_BYTES by less than a tile): with blocks cut at BLOCK_BYTES, down_proj's 1024 rows of 3072 went as 680 + 344,
# and oneDNN's AMX GEMM ran the 344 and 680 slower a row than two 512s: down took 0.74x the time at 512 prompt rows,
# 0.77x at 2048, one thread (profiles/RESULTS.md, prefill8). Outputs may move by a bf16 ulp: oneDNN's blocking
# follows a block's N.
# Also whole quads of interleaved int4 rows (csrc/int4_block.h): a block's rows read as the tensor's.
TILE_ROWS = 64


class _Scratch(threading.local):
    """The calling thread's scratch buffers: concurrent calls never share a block."""

    def __init__(self) -> None:
        self.by_dtype: dict[torch.dtype, torch.Tensor] = {}


_scratch = _Scratch()


def takes(rows: int) -> bool:
    """Whether a call of `rows` activation rows of a quantised linear is for the blocked GEMM, and the dequantising
    kernel built."""
    return KERNEL.ready and rows >= MIN_ROWS


def _block(dtype: torch.dtype, n: int, k: int) -> tuple[torch.Tensor, int]:
    """The calling thread's scratch for `dtype` (kept, grown to the largest block a call has needed) and the rows
    of N (of K weights each) a block holds: whole TILE_ROWS, the blocks of about equal size."""
    most = max(1, BLOCK_BYTES // (k * torch.finfo(dtype).bits // 8))
    even = -(-n // -(-n // most))  # ceil(n / blocks), blocks = ceil(n / most)
    rows = min(n, -(-even // TILE_ROWS) * TILE_ROWS)
    buffers = _scratch.by_dtype
    if dtype not in buffers or buffers[dtype].numel() < rows * k:
        # a normal tensor: it outlives the call's inference_mode, outside which an inference tensor is read-only
        with torch.inference_mode(False):
            buffers[dtype] = torch.empty(rows * k, dtype=dtype)
    return buffers[dtype], rows


def blocked_linear(x: torch.Tensor, n: int, dequantise: Callable[[int, int, torch.Tensor], None],
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] = (x @ W.T) * scale (per output channel, if given), where dequantise(n0, n1, out)
    writes W[n0:n1] into out ([n1 - n0, K] in the GEMM's dtype)."""
    dtype = torch.bfloat16 if x.dtype == torch.bfloat16 and AVX512_BF16 else torch.float32
    rows = x.to(dtype).contiguous()
    k = rows.shape[1]
    out = torch.empty(rows.shape[0], n, dtype=dtype)
    scratch, block = _block(dtype, n, k)
    for n0 in range(0, n, block):
        n1 = min(n, n0 + block)
        weights = scratch[:(n1 - n0) * k].view(n1 - n0, k)
        dequantise(n0, n1, weights)
        columns = out[:, n0:n1]
        torch.mm(rows, weights.t(), out=columns)
        if scale is not None:
            columns.mul_(scale[n0:n1])
    return out.to(x.dtype)


def _linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [M, K] bf16 or fp32, weight: [N, K] int8, scale: [N] in x's dtype -> [M, N]."""
    weight = weight.contiguous()

    def dequantise(n0: int, n1: int, out: torch.Tensor) -> None:
        graph.call(KERNEL.lib.dequant_int8, weight[n0:n1], out, n1 - n0, weight.shape[1],
                   int(out.dtype == torch.bfloat16))

    with build.profiled("nanoqwen::linear_int8_prefill_cpu"):
        return blocked_linear(x, weight.shape[0], dequantise, scale)


def _linear_int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x: [M, K] bf16 or fp32, weight: [N, K / 2] uint8 in linear_int4's layout (linear_int4.repack), scale,
    offset: [N, K / G] in x's dtype, G % 64 == 0 -> [M, N]."""
    k = 2 * weight.shape[1]
    weight, scale, offset = weight.contiguous(), scale.contiguous(), offset.contiguous()

    def dequantise(n0: int, n1: int, out: torch.Tensor) -> None:
        s, o = scale[n0:n1].to(out.dtype), offset[n0:n1].to(out.dtype)
        graph.call(KERNEL.lib.dequant_int4, weight[n0:n1], s, o, out, n1 - n0, k, k // scale.shape[1],
                   int(out.dtype == torch.bfloat16))

    with build.profiled("nanoqwen::linear_int4_prefill_cpu"):
        return blocked_linear(x, weight.shape[0], dequantise)


def _fake(x: torch.Tensor, weight: torch.Tensor, *_: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


linear_int8 = build.kernel_op("linear_int8_prefill_cpu", _linear_int8, _fake)
linear_int4 = build.kernel_op("linear_int4_prefill_cpu", _linear_int4, _fake)
