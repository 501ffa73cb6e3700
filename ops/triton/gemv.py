"""Triton weight-only GEMV for decode-sized batches (at most GEMV_MAX_ROWS rows): bf16/fp32, int8 and int4
weights (the layouts of ops/torch_ref/linear_int8.py and linear_int4.py), each weight read once, fp32 sums.

A decode step's linears are skinny (1-8 rows against N x K weights): the cost is reading the weights, so
the tiling is chosen for that alone. Each program reads a [BLOCK_N, BLOCK_K] weight tile per step along K
(rows of the weight contiguous, so a warp's loads are 16-byte vectors along one row), dequantises it in
registers and reduces it against every activation row, with no tl.dot: at <= 8 rows the products are a
few FMAs per weight byte. Where N / BLOCK_N programs would leave SMs idle (N = 1024: 64 programs on 132
SMs), K is split too: each split writes fp32 partial sums to a scratch buffer kept per shape, and a second
kernel adds them in a fixed order, so the output is bit-reproducible (no atomics) and the launch allocates
nothing that a CUDA graph would have to own.

Rows: a program reduces every row, the loop over them unrolled (ROWS_PAD, a power of two), so more rows
cost more FMAs per weight read; past 8 rows the tiled tl.dot kernels of linear_int8.py / linear_int4.py
(tensor cores) take over, and bf16 stays cuBLAS. Split and tile sizes are planned from static shapes
only (gemv_plan), so a captured graph replays the same launches.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ops.kernels import Linear
from ops.triton.decode_attention import num_sms

GEMV_MAX_ROWS = 8
FLOAT, INT8, INT4 = 0, 1, 2  # weight formats (the kernel's FORMAT)
# Weight columns per step along K, at most (narrower where K is split finer): 256 bytes of a bf16 or int8 row (16
# lanes x 16 bytes), 128 of an int4 one, whose 4 dequantised floats per byte cost registers (512 columns took 146
# a thread, compiled for sm_90).
BLOCK_K = {FLOAT: 128, INT8: 256, INT4: 256}
BLOCK_N = 16
PROGRAMS_PER_SM = 4  # programs wanted per SM: enough loads in flight to cover HBM latency
REDUCE_BLOCK = 1024
# The interpreter's time goes per program: few, wide column blocks (linear_int8.INTERPRETED_PROGRAMS's reasoning).
INTERPRETED_PROGRAMS = 64
INTERPRETED_BLOCK_N = 512


class GemvPlan(NamedTuple):
    block_n: int
    block_k: int  # weight columns (inputs) per step along K; int4: a multiple of 64
    splits: int  # programs along K; 1 = no second pass
    split_k: int  # columns per split, a multiple of block_k


def gemv_plan(n: int, k: int, fmt: int, device: torch.device, splits: int | None = None,
              block_k: int | None = None) -> GemvPlan:
    """Tiles and K splits for an [N, K] weight: enough programs to fill the SMs `PROGRAMS_PER_SM` deep.
    `splits` and `block_k` force them (tests); splits are capped at one block_k step each."""
    if device.type == "cpu":  # the interpreter
        block_n = max(INTERPRETED_BLOCK_N, triton.next_power_of_2(triton.cdiv(n, INTERPRETED_PROGRAMS)))
        wanted = 1
    else:
        block_n = BLOCK_N
        wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), triton.cdiv(n, block_n))
    if block_k is None:
        block_k = min(BLOCK_K[fmt], max(64, triton.next_power_of_2(k)))
        while block_k > 64 and triton.cdiv(k, block_k) < wanted:  # narrower steps, for more splits
            block_k //= 2
    steps = triton.cdiv(k, block_k)
    if splits is None:
        splits = max(1, min(wanted, steps))
        if k % block_k == 0:  # splits of equal whole steps (the nearest count that divides them): no mask along K
            # a plain loop, not min(key=...): torch.compile traces this with fullgraph=True
            nearest = 1
            for s in range(1, steps + 1):
                if steps % s == 0 and abs(s - splits) <= abs(nearest - splits):
                    nearest = s
            splits = nearest
    splits = max(1, min(splits, steps))
    split_k = triton.cdiv(steps, splits) * block_k
    return GemvPlan(block_n, block_k, triton.cdiv(k, split_k), split_k)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, offset_ptr, out_ptr, partial_ptr,
    M, N, x_stride,
    K: tl.constexpr, GROUP: tl.constexpr, FORMAT: tl.constexpr,
    ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    SPLIT: tl.constexpr,  # whether out is partial sums (the second pass scales and casts) or the output
):
    # Splits that tile K exactly (gemv_plan's, where K is whole steps) need no mask along K
    EVEN_K: tl.constexpr = K % SPLIT_K == 0
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    col_ok = cols < N
    k_begin = tl.program_id(1) * SPLIT_K
    rows = tl.arange(0, ROWS_PAD)
    acc = tl.zeros((ROWS_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, SPLIT_K, BLOCK_K):
        start = k_begin + k0
        if FORMAT == 2:
            part = _int4_tile(x_ptr, w_ptr, scale_ptr, offset_ptr, M, x_stride, cols, col_ok, start,
                              K, GROUP, ROWS_PAD, BLOCK_N, BLOCK_K, EVEN_K)
        else:
            ks = start + tl.arange(0, BLOCK_K)
            k_ok = (ks < K) | EVEN_K
            # int8 and bf16 values are exact in fp32; via fp32, as the interpreter casts int8 to bf16 wrongly
            w = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
            part = tl.zeros((ROWS_PAD, BLOCK_N), dtype=tl.float32)
            for r in tl.static_range(ROWS_PAD):
                x_row = x_ptr + tl.minimum(r, M - 1) * x_stride  # padding rows reread the last
                x = tl.load(x_row + ks, mask=k_ok, other=0.0).to(tl.float32)
                part += tl.where(rows[:, None] == r, tl.sum(w * x[None, :], axis=1)[None, :], 0.0)
        acc += part
    out_mask = (rows < M)[:, None] & col_ok[None, :]
    if SPLIT:
        tl.store(partial_ptr + (tl.program_id(1) * M + rows[:, None]) * N + cols[None, :], acc, mask=out_mask)
    else:
        if FORMAT == 1:
            acc *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _int4_tile(x_ptr, w_ptr, scale_ptr, offset_ptr, M, x_stride, cols, col_ok, start,
               K: tl.constexpr, GROUP: tl.constexpr, ROWS_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """-> [ROWS_PAD, BLOCK_N]: x[:, start:start + BLOCK_K] against the int4 rows `cols`, dequantised as the
    reference does (q * scale + offset, fp32). A [BLOCK_N, BLOCKS, 16] tile of 16-bit words: word j of a
    64-column block holds columns j, 16 + j, 32 + j, 48 + j, one (scale, offset) per block."""
    BLOCKS: tl.constexpr = BLOCK_K // 64
    blocks = tl.arange(0, BLOCKS)
    words = tl.arange(0, 16)
    block_col = start + blocks * 64  # [BLOCKS]: each block's first column
    block_ok = (block_col < K) | EVEN_K
    ok = col_ok[:, None, None] & block_ok[None, :, None]
    w_rows = cols[:, None, None].to(tl.int64)
    packed = tl.load(w_ptr + w_rows * (K // 4) + start // 4 + blocks[None, :, None] * 16 + words[None, None, :],
                     mask=ok, other=0).to(tl.int32)  # [BLOCK_N, BLOCKS, 16]
    group = w_rows * (K // GROUP) + (block_col // GROUP)[None, :, None]  # [BLOCK_N, BLOCKS, 1]
    scale = tl.load(scale_ptr + group, mask=ok, other=0.0).to(tl.float32)
    offset = tl.load(offset_ptr + group, mask=ok, other=0.0).to(tl.float32)
    w0 = (packed & 15).to(tl.float32) * scale + offset
    w1 = ((packed >> 4) & 15).to(tl.float32) * scale + offset
    w2 = ((packed >> 8) & 15).to(tl.float32) * scale + offset
    w3 = ((packed >> 12) & 15).to(tl.float32) * scale + offset
    x_col = block_col[:, None] + words[None, :]  # [BLOCKS, 16]: nibble 0's column; nibble p's is 16 * p further
    x_ok = block_ok[:, None]
    rows = tl.arange(0, ROWS_PAD)
    part = tl.zeros((ROWS_PAD, BLOCK_N), dtype=tl.float32)
    for r in tl.static_range(ROWS_PAD):
        x_row = x_ptr + tl.minimum(r, M - 1) * x_stride + x_col  # padding rows reread the last
        x0 = tl.load(x_row, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
        x1 = tl.load(x_row + 16, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
        x2 = tl.load(x_row + 32, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
        x3 = tl.load(x_row + 48, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
        dot = tl.sum(tl.sum(w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3, axis=2), axis=1)  # [BLOCK_N]
        part += tl.where(rows[:, None] == r, dot[None, :], 0.0)
    return part


@triton.jit
def _gemv_reduce_kernel(partial_ptr, scale_ptr, out_ptr, M, N, SPLITS: tl.constexpr, FORMAT: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out[m, :] = sum over splits, in split order, of partial[s, m, :] (x the int8 row scale)."""
    row = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(partial_ptr + (s * M + row) * N + cols, mask=ok, other=0.0)
    if FORMAT == 1:
        acc *= tl.load(scale_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def decode_sized(x: torch.Tensor) -> bool:
    """Whether x: [..., K] has rows few enough for the GEMV."""
    return x.numel() <= GEMV_MAX_ROWS * x.shape[-1]


def float_linear(larger: Linear) -> Linear:
    """The Linear op: decode-sized batches (at most GEMV_MAX_ROWS rows) by the GEMV, more by `larger`."""

    def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if decode_sized(x):
            return gemv(x, weight, FLOAT)
        return larger(x, weight)

    return linear


# Split-K partial sums, one buffer per (device, splits, N) for up to GEMV_MAX_ROWS rows: allocated on a
# shape's first call (an eager step: the graph runner's pre-capture step of each bucket, the runner's packed
# warm-up steps before torch.compile traces a decode step) and reused, so a decode step allocates none. Calls on
# one stream run in order, so consecutive layers of one shape share it (one engine a process, as served).
_PARTIALS: dict[tuple, torch.Tensor] = {}


def _partials(device: torch.device, splits: int, n: int) -> torch.Tensor:
    key = (device, splits, n)
    if key not in _PARTIALS:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), "allocated inside a capture"
        buffer = torch.empty(splits * GEMV_MAX_ROWS * n, dtype=torch.float32, device=device)
        if not torch.compiler.is_compiling():
            # else torch.compile's CUDA graphs skip a step that writes a graph input not known to stay put
            torch._dynamo.mark_static_address(buffer)
        _PARTIALS[key] = buffer
    return _PARTIALS[key]


def gemv(x: torch.Tensor, weight: torch.Tensor, fmt: int, scale: torch.Tensor | None = None,
         offset: torch.Tensor | None = None, plan: GemvPlan | None = None) -> torch.Tensor:
    """x: [..., K] with at most GEMV_MAX_ROWS rows; weight: [N, K] (FLOAT: x's dtype; INT8: int8, scale [N]) or
    [N, K / 2] uint8 (INT4, scale and offset [N, K / G], K % 64 == 0) -> [..., N] in x's dtype. `plan`:
    gemv_plan's unless given (tests)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m, k = rows.shape
    n = weight.shape[0]
    assert m <= GEMV_MAX_ROWS, f"gemv takes at most {GEMV_MAX_ROWS} rows, got {m}"
    assert weight.is_contiguous(), "rows of the weight at a stride of K (or K / 2)"
    plan = plan or gemv_plan(n, k, fmt, x.device)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    partial = _partials(x.device, plan.splits, n) if plan.splits > 1 else out  # [splits, m, N] in its start
    w = weight.view(torch.int16) if fmt == INT4 else weight
    group = k // scale.shape[1] if fmt == INT4 else 1
    _gemv_kernel[(triton.cdiv(n, plan.block_n), plan.splits)](
        rows, w, weight if scale is None else scale, weight if offset is None else offset, out, partial,
        m, n, rows.stride(0),
        K=k, GROUP=group, FORMAT=fmt, ROWS_PAD=triton.next_power_of_2(m), BLOCK_N=plan.block_n,
        BLOCK_K=plan.block_k, SPLIT_K=plan.split_k, SPLIT=plan.splits > 1, num_warps=4,
    )
    if plan.splits > 1:
        _gemv_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK), m)](
            partial, weight if scale is None else scale, out, m, n,
            SPLITS=plan.splits, FORMAT=fmt, BLOCK=REDUCE_BLOCK, num_warps=4,
        )
    return out.view(*x.shape[:-1], n)
