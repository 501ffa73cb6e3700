from __future__ import annotations

import torch
from torch import nn

from nanoqwen.layers.linear import LINEARS
from ops import Kernels


class MLP(nn.Module):
    """SwiGLU with gate and up projections packed into one matrix."""

    def __init__(self, hidden_size: int, intermediate_size: int, kernels: Kernels, quant: str) -> None:
        super().__init__()
        self.gate_up_proj = LINEARS[quant](rows=2 * intermediate_size, cols=hidden_size, kernels=kernels)
        self.down_proj = LINEARS[quant](rows=hidden_size, cols=intermediate_size, kernels=kernels)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_mul(self.gate_up_proj(x)))
