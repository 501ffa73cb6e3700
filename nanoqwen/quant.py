"""Weight-only quantisation at load time (NANOQWEN_QUANT).

int8: symmetric, one scale per output channel (per row of [N, K]): w ~= q * scale, q in [-127, 127].
Scales are kept in the model's dtype, as the kernels take them: in bf16 a scale's rounding (<= 2^-9
relative) is below the rounding of the bf16 outputs it multiplies.
"""
from __future__ import annotations

import torch

CHUNK_ROWS = 4096  # rows quantised at a time: the fp32 temporaries stay a few MB even for the embedding


def quantize_int8_into(weight: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """weight: [N, K] float -> q_out: [N, K] int8 and scale_out: [N] (its dtype), written in place."""
    for start in range(0, weight.shape[0], CHUNK_ROWS):
        w = weight[start:start + CHUNK_ROWS].to(q_out.device, torch.float32)
        scale = (w.abs().amax(dim=1) / 127).to(scale_out.dtype)
        divisor = scale.float().masked_fill(scale == 0, 1.0).unsqueeze(1)  # an all-zero row stays zero
        q_out[start:start + CHUNK_ROWS] = (w / divisor).round_().clamp_(-127, 127).to(torch.int8)
        scale_out[start:start + CHUNK_ROWS] = scale
