"""The embedding tables, one a weight format over its parameters (nanoqwen/layers/weights.py), one row a token."""
from __future__ import annotations

import torch
from torch import nn

from nanoqwen.layers.weights import Int4Weights, Int8Weights, Weights


class Embedding(Weights):
    """The table in the model's dtype: rows vocab_size, cols hidden_size."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding(input_ids, self.weight)


class Int8Embedding(Int8Weights):
    """The table quantised per row (each row one output channel of a tied LM head); rows dequantised on lookup."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding_int8(input_ids, self.weight, self.scale)


class Int4Embedding(Int4Weights):
    """The table quantised in groups along each row (each row one output channel of a tied LM head); rows
    unpacked and dequantised on lookup."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.kernels.embedding_int4(input_ids, self.weight, self.scale, self.offset)


EMBEDDINGS: dict[str, type[nn.Module]] = {"none": Embedding, "int8": Int8Embedding, "int4": Int4Embedding}


def tie(head: nn.Module, embedding: nn.Module) -> None:
    """Makes the LM head share the embedding's parameters (its format's: nanoqwen/layers/weights.py)."""
    for name, param in embedding.named_parameters(recurse=False):
        setattr(head, name, param)
