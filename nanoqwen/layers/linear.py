"""The model's linear layers: one class per weight format, chosen once at construction (NANOQWEN_QUANT),
so a forward pass never branches on it."""
from __future__ import annotations

import torch
from torch import nn

from nanoqwen.quant import GROUP_SIZE
from ops import Kernels


class Linear(nn.Module):
    """y = x @ weight.T, weight: [N, K] in the model's dtype."""

    def __init__(self, in_features: int, out_features: int, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight)


class Int8Linear(nn.Module):
    """y = (x @ weight.T) * scale, weight: [N, K] int8, scale: [N] in the model's dtype (nanoqwen/quant.py)."""

    def __init__(self, in_features: int, out_features: int, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(out_features))
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear_int8(x, self.weight, self.scale)


class Int4Linear(nn.Module):
    """y = x @ (q * scale + offset).T per group of GROUP_SIZE input columns; weight: [N, K / 2] uint8 (two q
    per byte), scale, offset: [N, K / G] in the model's dtype (nanoqwen/quant.py)."""

    def __init__(self, in_features: int, out_features: int, kernels: Kernels) -> None:
        super().__init__()
        groups = in_features // GROUP_SIZE
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(out_features, groups))
        self.offset = nn.Parameter(torch.empty(out_features, groups))
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear_int4(x, self.weight, self.scale, self.offset)


LINEARS: dict[str, type[nn.Module]] = {"none": Linear, "int8": Int8Linear, "int4": Int4Linear}
