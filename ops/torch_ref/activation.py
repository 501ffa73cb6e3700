"""The torch reference of SwiGLU's activation: silu(gate) * up over the packed gate|up projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """x: [N, 2I] (gate | up) -> silu(gate) * up: [N, I], each op rounded to x's dtype as transformers does."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
