from __future__ import annotations

import torch
from torch import nn

from ops import Kernels


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.kernels = kernels

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the add that precedes every Qwen3 norm is fused in."""
        return self.kernels.rms_norm(x, self.weight, self.eps, residual)
