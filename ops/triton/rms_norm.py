"""Triton RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_normalize(x, weight, n: tl.constexpr, eps, dtype: tl.constexpr):
    """norm(x) * weight over the last axis of fp32 `x`, whose padding is zero; `n` is the true length.

    The normalized value is rounded to `dtype` before the weight multiply, as Qwen3RMSNorm does.
    """
    variance = tl.sum(x * x, axis=-1, keep_dims=True) / n
    normed = (x * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
    return normed * weight.to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    x_stride, residual_stride, out_stride, new_residual_stride,
    eps,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # The reference sums in the input dtype; normalize that rounded sum, not the fp32 one.
        x = x.to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * new_residual_stride + cols, x, mask=mask)
        x = x.to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = rms_normalize(x, weight, HIDDEN, eps, x_ptr.dtype.element_ty)
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `rms_norm_torch`: one program per row, fp32 arithmetic."""
    hidden = x.shape[-1]
    rows = _rows(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = x
    residual_rows = new_residual_rows = rows  # placeholders: unused without a residual
    if residual is not None:
        residual_rows = _rows(residual)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        new_residual_rows = new_residual.view(-1, hidden)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, residual_rows, weight, out, new_residual_rows,
        rows.stride(0), residual_rows.stride(0), hidden, hidden,
        eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 256, 1), 16),  # 4 warps at Qwen3-0.6B's 1024: 16-byte bf16 loads
    )
    return out, new_residual


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [N, H] with unit column stride (a view unless the layout needs a copy)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
