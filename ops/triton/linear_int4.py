"""Triton int4 weight-only linear: packed 4-bit weights (ops/torch_ref/linear_int4.py) unpacked in
registers, one 64-column block per step. Each block's products are exact (x times q, q a small
integer in x's dtype) with fp32 sums; the group's scale multiplies the sums and its offset the
activations' sum. The weights are read as 16-bit words: word i of a block holds the nibbles of columns
i, 16 + i, 32 + i and 48 + i, so consecutive columns read consecutive words. Decode-sized inputs take the
GEMV of gemv.py, more rows this kernel, with the int8 kernel's tiles."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.decode_attention import _dot
from ops.triton.gemv import INT4, decode_sized, gemv
from ops.triton.linear_int8 import weight_only_launch


@triton.jit
def _linear_int4_kernel(
    x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr,
    M, N, x_stride, out_stride,
    K: tl.constexpr,  # a layer's width (a few per model): constant loop bounds, which Triton 3.6's interpreter needs
    GROUP: tl.constexpr,  # columns per (scale, offset), a multiple of 64
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    kk = tl.arange(0, 64)
    word = (kk % 16)[:, None]  # [64, 1]: the 16-bit word of the block holding column kk
    shift = (4 * (kk // 16))[:, None]  # and its nibble
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, 64):
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_stride + k0 + kk[None, :],
                    mask=row_ok[:, None], other=0.0)  # [BLOCK_M, 64]
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * (K // 4) + k0 // 4 + word,
                    mask=col_ok[None, :], other=0)  # [64, BLOCK_N] int16 words
        q = (w.to(tl.int32) >> shift) & 15
        # small integers are exact in bf16 and fp32; via fp32, as the interpreter casts integers to bf16 wrongly
        sums = _dot(x, q.to(tl.float32).to(x.dtype), INTERPRETED, PRECISION)  # [BLOCK_M, BLOCK_N]
        group = cols.to(tl.int64) * (K // GROUP) + k0 // GROUP
        scale = tl.load(scale_ptr + group, mask=col_ok, other=0.0).to(tl.float32)
        offset = tl.load(offset_ptr + group, mask=col_ok, other=0.0).to(tl.float32)
        x_sum = tl.sum(x.to(tl.float32), axis=1)  # [BLOCK_M]
        acc += sums * scale[None, :] + x_sum[:, None] * offset[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * out_stride + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def linear_int4_triton(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """Triton version of `linear_int4_torch`. x: [..., K], weight: [N, K / 2] uint8 contiguous, scale,
    offset: [N, K / G] contiguous, G % 64 == 0."""
    if decode_sized(x):
        return gemv(x, weight, INT4, scale, offset)
    return linear_int4_tiled(x, weight, scale, offset)


def linear_int4_tiled(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """linear_int4_triton's tl.dot kernel, at any number of rows."""
    n = weight.shape[0]
    rows, out, block_m, block_n, interpreted = weight_only_launch(x, n)
    m, k = rows.shape
    _linear_int4_kernel[(triton.cdiv(n, block_n), triton.cdiv(m, block_m))](
        rows, weight.view(torch.int16), scale, offset, out, m, n, rows.stride(0), n,
        K=k, GROUP=k // scale.shape[1], BLOCK_M=block_m, BLOCK_N=block_n,
        INTERPRETED=interpreted, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out.view(*x.shape[:-1], n)
