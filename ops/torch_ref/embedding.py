"""The torch references of the embedding lookups, one per weight format (nanoqwen/quant.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ops.torch_ref.linear_int4 import dequantize_int4


def embedding_torch(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """input_ids: [...], weight: [V, H] -> [..., H]."""
    return F.embedding(input_ids, weight)


def embedding_int8_torch(input_ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight: [V, H] int8, scale: [V] -> [..., H] in scale's dtype: each row dequantised, q * scale."""
    row_scale = F.embedding(input_ids, scale.unsqueeze(1))  # [..., 1]
    return F.embedding(input_ids, weight).to(row_scale.dtype) * row_scale


def embedding_int4_torch(input_ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         offset: torch.Tensor) -> torch.Tensor:
    """weight: [V, H / 2] uint8 packed, scale, offset: [V, H / G] -> [..., H] in scale's dtype: each row
    unpacked and dequantised in fp32, q * scale + offset."""
    flat = input_ids.reshape(-1)
    rows = dequantize_int4(F.embedding(flat, weight), F.embedding(flat, scale), F.embedding(flat, offset))
    return rows.to(scale.dtype).view(*input_ids.shape, -1)
