"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch


def rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual) * weight, x + residual); x, residual: [..., H].

    Matches transformers' Qwen3RMSNorm: statistics in fp32, weight applied in the input dtype.
    """
    if residual is not None:
        x = x + residual
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, x


try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it only the torch reference exists
    triton = None

if triton is not None:

    @triton.jit
    def rms_normalize(x, weight, n: tl.constexpr, eps, dtype: tl.constexpr):
        """norm(x) * weight over the last axis of fp32 `x` (padding zeroed); rounds like the reference.

        `n` is the true (unpadded) length. The normalized value is rounded to `dtype` before the
        weight multiply, as Qwen3RMSNorm does, so bf16 results match it bit for bit on the GPU.
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
    rows = x.reshape(-1, hidden)  # a view for the usual contiguous [N, H] / [B, T, H]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is None:
        res_rows = new_residual = new_res_rows = rows  # unused by the kernel
    else:
        res_rows = residual.reshape(-1, hidden)
        if res_rows.stride(-1) != 1:
            res_rows = res_rows.contiguous()
        new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
        new_res_rows = new_residual.view(-1, hidden)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res_rows, weight, out, new_res_rows,
        rows.stride(0), res_rows.stride(0), hidden, new_res_rows.stride(0),
        eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out, x if residual is None else new_residual
