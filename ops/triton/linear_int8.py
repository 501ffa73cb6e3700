"""Triton int8 weight-only linear: weights dequantised in registers, fp32 accumulation, the per-row
scale applied to the sums. Decode-sized inputs (at most GEMV_MAX_ROWS rows) take the GEMV of gemv.py;
more rows this tl.dot kernel: 16-row tiles with narrow column blocks up to 16 rows, square ones past."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ops.triton.decode_attention import _dot
from ops.triton.gemv import INT8, decode_sized, gemv


@triton.jit
def _linear_int8_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr,
    M, N, x_stride, out_stride,
    K: tl.constexpr,  # a layer's width (a few per model): constant loop bounds, which Triton 3.6's interpreter needs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_stride + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0)  # [BLOCK_K, BLOCK_N] int8
        # int8 values are exact in bf16 and fp32; via fp32, as the interpreter casts int8 to bf16 wrongly
        acc += _dot(x, w.to(tl.float32).to(x.dtype), INTERPRETED, PRECISION)
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * out_stride + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# Column blocks of a weight the interpreter runs at most: a 150k-row LM head takes 38 blocks of 4096 rows, where
# 297 of 512 made test_quant's interpreted int8 decode 2x as slow (24.8 s against 52.9, 6 tokens) and 32-row
# blocks take minutes.
INTERPRETED_PROGRAMS = 64


class WeightOnlyLaunch(NamedTuple):
    rows: torch.Tensor  # [M, K], unit stride along K
    out: torch.Tensor  # [M, N] in x's dtype
    block_m: int
    block_n: int
    interpreted: bool


def weight_only_launch(x: torch.Tensor, n: int) -> WeightOnlyLaunch:
    """The shared setup of the weight-only linears: x's rows, the output, and the tile sizes (small
    tiles for decode-sized batches)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    interpreted = x.device.type == "cpu"
    block_m, block_n = (16, 32) if m <= 16 else (64, 64)
    if interpreted:  # the interpreter's time goes per program: at most INTERPRETED_PROGRAMS column blocks
        block_n = max(512, triton.next_power_of_2(triton.cdiv(n, INTERPRETED_PROGRAMS)))
    return WeightOnlyLaunch(rows, torch.empty(m, n, dtype=x.dtype, device=x.device), block_m, block_n, interpreted)


def linear_int8_triton(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Triton version of `linear_int8_torch`. x: [..., K], weight: [N, K] int8 contiguous, scale: [N]."""
    if decode_sized(x):
        return gemv(x, weight, INT8, scale)
    return linear_int8_tiled(x, weight, scale)


def linear_int8_tiled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """linear_int8_triton's tl.dot kernel, at any number of rows."""
    n = weight.shape[0]
    rows, out, block_m, block_n, interpreted = weight_only_launch(x, n)
    m, k = rows.shape
    _linear_int8_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
        rows, weight, scale, out, m, n, rows.stride(0), n,
        K=k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128 if m <= 16 else 64,
        INTERPRETED=interpreted, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out.view(*x.shape[:-1], n)
