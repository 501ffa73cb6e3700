"""Weight-only quantisation at load time (NANOQWEN_QUANT).

int8: symmetric, one scale per output channel (per row of [N, K]): w ~= q * scale, q in [-127, 127].
Scales are kept in the model's dtype, as the kernels take them: in bf16 a scale's rounding (<= 2^-9
relative) is below the rounding of the bf16 outputs it multiplies.

int4: asymmetric, one (scale, offset) per group of GROUP_SIZE input columns: w ~= q * scale + offset,
q in [0, 15], packed two per byte in the kernels' layout (ops/torch_ref/linear_int4.py). Measured on the
test checkpoints (profiles/RESULTS.md): groups of 32 err least but cost 25% more bytes than the
nibbles alone; 64 asymmetric erred as little as 32 symmetric at the same bytes, and less than 64
symmetric. Scale and offset are in the model's dtype, as for int8.
"""
from __future__ import annotations

import torch

from ops.torch_ref.linear_int4 import pack_int4

GROUP_SIZE = 64  # int4 columns per (scale, offset)
CHUNK_ROWS = 4096  # rows quantised at a time: the fp32 temporaries stay a few MB even for the embedding


def quantize_int8_into(weight: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """weight: [N, K] float -> q_out: [N, K] int8 and scale_out: [N] (its dtype), written in place."""
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        w = weight[start:start + CHUNK_ROWS].to(q_out.device, torch.float32)
        scale = (w.abs().amax(dim=1) / 127).to(scale_out.dtype)
        divisor = scale.float().masked_fill(scale == 0, 1.0).unsqueeze(1)  # an all-zero row stays zero
        q_out[start:start + CHUNK_ROWS] = (w / divisor).round_().clamp_(-127, 127).to(torch.int8)
        scale_out[start:start + CHUNK_ROWS] = scale


def quantize_int4_into(weight: torch.Tensor, packed_out: torch.Tensor, scale_out: torch.Tensor,
                       offset_out: torch.Tensor) -> None:
    """weight: [N, K] float -> packed_out: [N, K / 2] uint8, scale_out and offset_out: [N, K / G] (their
    dtype), written in place; G = K / scale_out.shape[1]."""
    n_groups = scale_out.shape[1]
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        w = weight[start:start + CHUNK_ROWS].to(packed_out.device, torch.float32)
        rows, k = w.shape
        w = w.view(rows, n_groups, k // n_groups)
        low = w.amin(dim=2)
        scale = ((w.amax(dim=2) - low) / 15).to(scale_out.dtype)
        offset = low.to(offset_out.dtype)
        # q from the stored (rounded) scale and offset; a constant group has scale 0 and q 0
        divisor = scale.float().masked_fill(scale == 0, 1.0).unsqueeze(2)
        q = ((w - offset.float().unsqueeze(2)) / divisor).round_().clamp_(0, 15).to(torch.uint8)
        packed_out[start:start + CHUNK_ROWS] = pack_int4(q.view(rows, k))
        scale_out[start:start + CHUNK_ROWS] = scale
        offset_out[start:start + CHUNK_ROWS] = offset
