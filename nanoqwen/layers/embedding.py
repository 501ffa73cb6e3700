from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ops import Kernels


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits; shares the embedding matrix when tied."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: Embedding | None, kernels: Kernels) -> None:
        super().__init__()
        self.kernels = kernels
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        else:
            self.weight = tied_to.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(hidden, self.weight).float()  # [S, V] fp32
