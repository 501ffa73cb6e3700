from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class Int8Embedding(nn.Module):
    """The table quantised per row (each row one output channel of a tied LM head); rows dequantised on lookup."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(vocab_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = F.embedding(input_ids, self.scale.unsqueeze(1))  # [N, 1]
        return F.embedding(input_ids, self.weight).to(scale.dtype) * scale


EMBEDDINGS: dict[str, type[nn.Module]] = {"none": Embedding, "int8": Int8Embedding}


def tie(head: nn.Module, embedding: nn.Module) -> None:
    """Makes the LM head share the embedding's parameters (weight, and scale when quantised)."""
    for name, param in embedding.named_parameters(recurse=False):
        setattr(head, name, param)
