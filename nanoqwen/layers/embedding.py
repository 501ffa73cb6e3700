"""The embedding tables: each weight format's table holds the parameters of that format's linear (nanoqwen/layers/
linear.py), one row a token as one row of a tied LM head, so the two share one declaration and `tie` hands the head
the table's parameters as they are; only the lookup differs."""
from __future__ import annotations

import torch
from torch import nn

from nanoqwen.layers.linear import Int4Linear, Int8Linear, Linear
from ops import Kernels


class Embedding(Linear):
    """The table in the model's dtype, [vocab_size, hidden_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, kernels: Kernels) -> None:
        super().__init__(hidden_size, vocab_size, kernels)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding(input_ids, self.weight)


class Int8Embedding(Int8Linear):
    """The table quantised per row (each row one output channel of a tied LM head); rows dequantised on lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, kernels: Kernels) -> None:
        super().__init__(hidden_size, vocab_size, kernels)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding_int8(input_ids, self.weight, self.scale)


class Int4Embedding(Int4Linear):
    """The table quantised as an Int4Linear's weight (each row one output channel of a tied LM head);
    rows unpacked and dequantised on lookup."""

    def __init__(self, vocab_size: int, hidden_size: int, kernels: Kernels) -> None:
        super().__init__(hidden_size, vocab_size, kernels)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding_int4(input_ids, self.weight, self.scale, self.offset)


EMBEDDINGS: dict[str, type[nn.Module]] = {"none": Embedding, "int8": Int8Embedding, "int4": Int4Embedding}


def tie(head: nn.Module, embedding: nn.Module) -> None:
    """Makes the LM head share the embedding's parameters (weight, and scale when quantised)."""
    for name, param in embedding.named_parameters(recurse=False):
        setattr(head, name, param)
