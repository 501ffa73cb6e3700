"""Each weight format's parameters, declared once for a matrix of `rows` output channels by `cols` inputs: a
linear layer and an embedding table of one format hold the same ones (so `tie` can hand a table's to the LM head
as they are) and differ only in their forward."""
from __future__ import annotations

import torch
from torch import nn

from nanoqwen.quant import GROUP_SIZE
from ops import Kernels


class Weights(nn.Module):
    """weight: [rows, cols] in the model's dtype."""

    def __init__(self, rows: int, cols: int, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols))
        self.kernels = kernels


class Int8Weights(nn.Module):
    """weight: [rows, cols] int8, scale: [rows] in the model's dtype (nanoqwen/quant.py)."""

    def __init__(self, rows: int, cols: int, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(rows))
        self.kernels = kernels


class Int4Weights(nn.Module):
    """q * scale + offset per group of GROUP_SIZE columns; weight: [rows, cols / 2] uint8 (two q per byte),
    scale, offset: [rows, cols / G] in the model's dtype (nanoqwen/quant.py)."""

    def __init__(self, rows: int, cols: int, kernels: Kernels) -> None:
        super().__init__()
        groups = cols // GROUP_SIZE
        self.weight = nn.Parameter(torch.empty(rows, cols // 2, dtype=torch.uint8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(rows, groups))
        self.offset = nn.Parameter(torch.empty(rows, groups))
        self.kernels = kernels
