"""The torch reference of decode attention: one new query token per sequence over the paged KV cache."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention_torch(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, W] int32; only the first ceil(len / block_size) entries are read
    context_lens: torch.Tensor,  # [B] int32, >= 1 (padded lanes: 1, reading the null block)
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    batch, width = block_tables.shape
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    length = width * block_size
    blocks = block_tables.long()
    k = k_cache[blocks].view(batch, length, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache[blocks].view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    valid = torch.arange(length, device=q.device) < context_lens.unsqueeze(1)  # [B, L]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
    )
    return out.squeeze(2)
