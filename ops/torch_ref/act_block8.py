"""The torch reference of csrc/act_block8.h: activation rows rounded to int8, one scale a block of columns, as the
int4 kernels round bf16 rows (AVX2, and AVX-512 VNNI outside AMX-INT8's passes) before they multiply them by
the nibbles (ops/cpu/linear_int4.py)."""
from __future__ import annotations

import torch

BLOCK = 64  # columns a scale covers in the kernel


def act_block8(x: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """x: [..., K] -> [..., K] float64, each value s * q: s = max |x| / 127 over its `block` columns (0: its whole
    row) and q = round(x * (1 / s)) in [-127, 127], nearest even, in fp32 as the kernel computes them, so q and s are
    the kernel's bit for bit where the row is finite (a row with a NaN or inf: the kernel's scales are all NaN); a block
    of zeros (or of subnormal scale) is 0. float64 holds each s * q exactly."""
    width = block or x.shape[-1]
    parts = x.float().reshape(*x.shape[:-1], x.shape[-1] // width, width)
    step = parts.abs().amax(dim=-1, keepdim=True) / 127
    step = torch.where(step >= torch.finfo(torch.float32).tiny, step, 0)
    q = torch.round(parts * torch.where(step > 0, 1 / step, 0)).clamp(-127, 127)
    return (q.double() * step.double()).view(x.shape)
