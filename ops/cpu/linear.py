"""Decode-sized linear layers on x86 CPUs (AVX2, AVX-512): bf16 or fp32 weights, up to 32 activation rows.

Decode is a matrix-vector product bounded by reading the weights. Without native bf16 matrix units
(no AVX-512-BF16/AMX) torch's bf16 GEMM converts element by element and reaches ~1 GB/s with more
than one row, and its fp32 GEMV leaves bandwidth unused; this kernel streams each weight row once and
multiplies it with every activation row held in cache: with AVX-512-BF16, bf16 pairs by vdpbf16ps
(exact products, fp32 sums), and from 2 rows with AMX, 16 weight rows at a time by `tdpbf16ps`
(csrc/amx.h); on AVX2, bf16 widened to fp32 in registers by a shift or a mask, then FMAs, 2 weight rows (one from
each half of the thread's chunk) and up to 4 activation rows a pass (each activation vector loaded meets every weight
row; at one activation row 4 weight rows a pass, one from each quarter of the thread's chunk: csrc/gemv.h's
SPREAD_ROWS), each sum in one order whatever the row count, so a bf16 row's outputs are the same bits alone as
batched (on AVX2 and AVX-512 without AMX; with AMX one row takes vdpbf16ps and more take tiles, two orders). The
1-row loop of another order (4 accumulators, one weight row) it replaced against it, one thread
(profiles/RESULTS.md, int8fix): 6144 x 1024 streamed 774-786 vs 736-791 µs, 1024 x 3072 streamed 381-425 vs 402-438,
hot 512 x 1024 28-42 vs 42-43 (2 FMA chains wait on latency; even/odd chains would need 16 accumulators at 2 x 4
rows plus the operands, more than AVX2's 16 registers). 4-8 weight rows a pass (8 chains) would be faster hot (1 row
27-40 µs) but streams slower with more weight rows read at once per thread (6144 x 1024, 1 row 890-1110 vs 683-917
µs): not kept, decode streams. 4 adjacent weight rows a pass streamed a decode step's 1-row linears 6-18% faster
at K 2048 and 3072 (o, down), 14-32% slower at K 1024 (bf16inflight); 4 rows a quarter of the chunk apart (streams
32 KB apart, each in its own pages) stream faster than either (csrc/gemv.h's SPREAD_ROWS gives the figures).
Parallel over chunks of output rows on csrc/pool.h's work-claiming threads.
Source: csrc/linear.c, built by build.py; where it cannot be, `linear` falls back to torch's GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.cpu import build, graph

MAX_ROWS = 32  # beyond this, activations are no longer a "vector": widen weights and use fp32 GEMM (csrc/pool.h's
# PREFILL_CHUNK_ROWS follows it: a decode step's silu_mul and norms go to the pool in chunks of a few rows)

KERNEL = build.CKernel("cpu_linear", "linear.c", ("linear",))


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [M, K] (M <= MAX_ROWS, K % 32 == 0), weight: [N, K] contiguous, both bf16 or both fp32 -> [M, N]."""
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    with build.profiled("nanoqwen::linear_cpu"):
        graph.call(KERNEL.lib.linear, x, weight, out, x.shape[0], weight.shape[0], x.shape[1],
                   int(x.dtype == torch.bfloat16))
    return out


def _linear_fake(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


linear_cpu = build.kernel_op("linear_cpu", _linear, _linear_fake)


# Whether this CPU has bf16 matrix instructions that oneDNN uses (AVX-512-BF16, AMX). Such CPUs run
# torch's own GEMMs with AVX-512, which win from a few rows on; below that this kernel still reads the
# weights faster. Measured on a 2-core AVX-512-BF16 Xeon, a Qwen3-0.6B pass of linears at 1 / 4 / 8 rows,
# with the AVX2 loops: bf16 50 / 70 / 136 ms against oneDNN's 76 / 96 / 129; fp32 at 4 / 8 / 16 rows
# 134 / 186 / 373 ms against MKL's 155 / 220 / 198. So there the kernel keeps only the rows up to these
# limits, except bf16 with AVX-512-BF16: one vdpbf16ps per 32 weights and row keeps the kernel bound by
# the weight reads up to MAX_ROWS (profiles/RESULTS.md, "C linear kernels at the bandwidth limit").
NATIVE_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
AVX512_BF16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
NATIVE_BF16_MAX_ROWS = {torch.bfloat16: MAX_ROWS if AVX512_BF16 else 6, torch.float32: 8}


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear without bias, with the decode fast path up to MAX_ROWS rows; for bf16 or fp32 weights
    (the CPU kernel set takes it for those dtypes only)."""
    bf16 = weight.dtype == torch.bfloat16
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    max_rows = NATIVE_BF16_MAX_ROWS[weight.dtype] if NATIVE_BF16 else MAX_ROWS
    if KERNEL.ready and rows.shape[0] <= max_rows and rows.shape[1] % 32 == 0 and weight.is_contiguous():
        out = linear_cpu(rows, weight)
    elif bf16 and rows.shape[0] > 1 and not NATIVE_BF16:  # widen the weights once: the fp32 GEMM runs at full speed
        out = F.linear(rows.float(), weight.float()).to(torch.bfloat16)
    else:
        out = F.linear(rows, weight)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
