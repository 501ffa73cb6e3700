"""The torch reference of per-head q/k RMSNorm + rotary embedding (in place) + write of k/v into the paged cache."""
from __future__ import annotations

import torch

from ops.torch_ref.rms_norm import rms_norm_torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style rotation (transformers' rotate_half); x: [N, H, D], cos/sin: [N, 1, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def qk_norm_rope_store_torch(
    q: torch.Tensor,  # [N, Hq, D] (may be a strided view of the fused qkv output)
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    eps: float,
    cos_sin: torch.Tensor,  # [max_pos, D] fp32: cos in the first half, sin in the second
    positions: torch.Tensor,  # [N] int
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [N] int; -1 = padded lane, writes nothing
) -> None:
    cos, sin = cos_sin[positions].chunk(2, dim=-1)  # [N, D/2] each
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1).to(q.dtype)  # [N, 1, D]
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1).to(q.dtype)
    q.copy_(rotate(rms_norm_torch(q, q_weight, eps)[0], cos, sin))
    k.copy_(rotate(rms_norm_torch(k, k_weight, eps)[0], cos, sin))
    # Padded lanes land in block 0, which the block manager never hands out.
    slots = slot_mapping.clamp(min=0).long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)
