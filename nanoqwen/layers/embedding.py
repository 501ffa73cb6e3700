from __future__ import annotations

import torch
from torch import nn

from nanoqwen.quant import GROUP_SIZE
from ops import Kernels


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.kernels = kernels

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding(input_ids, self.weight)


class Int8Embedding(nn.Module):
    """The table quantised per row (each row one output channel of a tied LM head); rows dequantised on lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=torch.int8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(vocab_size))
        self.kernels = kernels

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding_int8(input_ids, self.weight, self.scale)


class Int4Embedding(nn.Module):
    """The table quantised as an Int4Linear's weight (each row one output channel of a tied LM head);
    rows unpacked and dequantised on lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, kernels: Kernels) -> None:
        super().__init__()
        groups = hidden_size // GROUP_SIZE
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size // 2, dtype=torch.uint8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(vocab_size, groups))
        self.offset = nn.Parameter(torch.empty(vocab_size, groups))
        self.kernels = kernels

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding_int4(input_ids, self.weight, self.scale, self.offset)


EMBEDDINGS: dict[str, type[nn.Module]] = {"none": Embedding, "int8": Int8Embedding, "int4": Int4Embedding}


def tie(head: nn.Module, embedding: nn.Module) -> None:
    """Makes the LM head share the embedding's parameters (weight, and scale when quantised)."""
    for name, param in embedding.named_parameters(recurse=False):
        setattr(head, name, param)
