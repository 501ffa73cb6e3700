from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_int8_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [..., K], weight: [N, K] int8, scale: [N] -> [..., N]: dequantise, multiply in fp32, then scale."""
    return (F.linear(x.float(), weight.float()) * scale.float()).to(x.dtype)
