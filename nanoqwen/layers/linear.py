"""The model's linear layers: one class per weight format, chosen once at construction (NANOQWEN_QUANT),
so a forward pass never branches on it. Each is made as its weight: `rows` output channels by `cols` inputs."""
from __future__ import annotations

import torch
from torch import nn

from nanoqwen.layers.weights import Int4Weights, Int8Weights, Weights


class Linear(Weights):
    """y = x @ weight.T, weight: [N, K] in the model's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight)


class Int8Linear(Int8Weights):
    """y = (x @ weight.T) * scale, weight: [N, K] int8, scale: [N]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear_int8(x, self.weight, self.scale)


class Int4Linear(Int4Weights):
    """y = x @ (q * scale + offset).T per group of GROUP_SIZE input columns (nanoqwen/layers/weights.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear_int4(x, self.weight, self.scale, self.offset)


LINEARS: dict[str, type[nn.Module]] = {"none": Linear, "int8": Int8Linear, "int4": Int4Linear}
