from __future__ import annotations

import torch
from torch import nn

from ops import Kernels


class MLP(nn.Module):
    """SwiGLU with gate and up projections packed into one matrix."""

    def __init__(self, hidden_size: int, intermediate_size: int, kernels: Kernels) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernels
        return k.linear(k.silu_mul(k.linear(x, self.gate_up_proj.weight)), self.down_proj.weight)
