from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoqwen.quant import GROUP_SIZE
from ops.torch_ref.linear_int4 import dequantize_int4


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


class Int4Embedding(nn.Module):
    """The table quantised as an Int4Linear's weight (each row one output channel of a tied LM head);
    rows unpacked and dequantised on lookup."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        groups = hidden_size // GROUP_SIZE
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size // 2, dtype=torch.uint8), requires_grad=False)
        self.scale = nn.Parameter(torch.empty(vocab_size, groups))
        self.offset = nn.Parameter(torch.empty(vocab_size, groups))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        rows = dequantize_int4(F.embedding(flat, self.weight), F.embedding(flat, self.scale),
                               F.embedding(flat, self.offset))  # [N, H] fp32
        return rows.to(self.scale.dtype).view(*input_ids.shape, -1)


EMBEDDINGS: dict[str, type[nn.Module]] = {"none": Embedding, "int8": Int8Embedding, "int4": Int4Embedding}


def tie(head: nn.Module, embedding: nn.Module) -> None:
    """Makes the LM head share the embedding's parameters (weight, and scale when quantised)."""
    for name, param in embedding.named_parameters(recurse=False):
        setattr(head, name, param)
