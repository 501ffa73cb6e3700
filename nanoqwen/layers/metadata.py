"""Per-step attention inputs shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    prefill: bool
    slot_mapping: torch.Tensor  # [N] int32: cache slot of each new token; -1 = padded lane
    block_tables: torch.Tensor  # [S, W] int32
    context_lens: torch.Tensor  # [S] int32: cached + new tokens per sequence
    query_lens: list[int] | None = None  # prefill only: new tokens per sequence
    context_lens_host: list[int] | None = None  # prefill only
