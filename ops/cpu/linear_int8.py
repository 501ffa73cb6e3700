"""int8 weight-only linear layers on x86 CPUs (AVX2, AVX-512, VNNI, AMX), up to linear.MAX_ROWS activation rows.

Decode reads every weight once a step, so a weight in one byte instead of two halves the step's memory
traffic. Where the CPU has AVX512-VNNI the kernel never widens a weight (widening cost ~12 uops per 64
weights and kept one core below the memory's pace): each activation row is split into int8 pieces,
x ~= a1 * q1 + a2 * q2 (+ ...), one fp32 scale per piece and row (csrc/act_quant.h), and the pieces
meet the int8 weights in integer dot products, 64 multiply-adds an instruction:
- 1 row (and 2+ rows without AMX): `vpdpbusd`, the weights as u8 (w + 128) against the s8 pieces; each piece's
  per-lane sums, once a call, take the 128s back out. One row prefetches its weights 4 KB ahead: 0.89x the
  time of the old scheme (pieces as u8, a `vpdpbusd` for each weight row's sum, prefetcht0 2 KB) on the Xeon;
  non-temporally, so that the weights streamed evict less of what the step reads between the linears.
- 2+ rows (K % 64 == 0, AMX-INT8): `tdpbssd`, 16 weight rows x 64 columns against up to 48 pieces.
The int32 sums are exact; y[n] = scale[n] * sum_p a_p * dot_p in fp32. The weights stay the only lossy
step: 2 pieces for bf16 activations, 4 for fp32. Measured against the exact product with the same int8
weights (random rows with every 37th column x30, K 1024 and 3072, 1 and 8 rows; profiles/RESULTS.md):
bf16, 2 pieces: rms error 1.0002-1.005x the torch reference's (its bf16 rounding), 2.3-8.6% of outputs
one bf16 ulp from the reference's (3 pieces: 0.02-0.09%, the exact-product kernel 0.01%); fp32, 4
pieces: largest error 0.9-1.6e-7 of the largest output, within the reference's own 1.7-3.1e-7 (3
pieces: up to 6.1e-7). On AVX2 without AVX-512 (Zen 3) the pieces are int16 (csrc/act_quant16.h: one holds
what two int8 pieces do, so bf16 takes 1 and fp32 2, within the same bounds), each 16 weights are widened
to int16 once and `vpmaddwd` (16 products) meets up to 4 piece rows a pass (a group of them stays in L1 while it runs
over a chunk's weight rows): one thread, 512 x 1024 hot in L2, 8 rows 80-112 µs against 153 for the fp32 widening
loop of 2 rows a pass it replaced (profiles/RESULTS.md). At one row, 4 weight rows a pass, one from each quarter of
the thread's chunk (csrc/gemv.h's SPREAD_ROWS, which gives the figures): faster cold than one row a pass.
Without the pieces' scratch, and on AVX-512 without VNNI, each weight is widened to fp32 and FMA'd into up
to 8 rows per pass (AVX-512) or 2 (AVX2): exact products. Parallel over chunks of output rows on the thread pool, as
linear.py's kernel. More rows (prefill) are compute-bound: dequant.py's blocked GEMM serves them.
Source: csrc/linear_int8.c, built by build.py.
"""
from __future__ import annotations

import torch

from ops.cpu import build, dequant, graph
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
    """The kernel set's linear_int8: the C kernel up to MAX_ROWS rows (the torch reference where it did not build),
    dequant.py's blocked GEMM beyond, where dequant.c built."""
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if dequant.takes(rows.shape[0]):
        out = dequant.linear_int8(rows, weight, scale)
    elif KERNEL.ready and rows.shape[0] <= MAX_ROWS and rows.shape[1] % 32 == 0:
        out = linear_int8_cpu(rows, weight, scale)
    else:
        return linear_int8_torch(x, weight, scale)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
