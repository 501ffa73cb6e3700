"""The torch reference of prefill attention: each sequence's new tokens over its cached prefix and itself."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention_torch(
    q: torch.Tensor,  # [N, Hq, D], the new tokens of all sequences, concatenated
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], already holding k/v of the new tokens
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, W] int32
    query_lens: list[int],  # new tokens per sequence
    context_lens: list[int],  # cached + new tokens per sequence
    scale: float,
) -> torch.Tensor:  # [N, Hq, D]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for seq, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens)):
        qs = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if ctx_len == q_len:  # nothing cached: the fresh k/v are the whole context
            ks, vs = k[start : start + q_len], v[start : start + q_len]
            mask, causal = None, True
        else:
            blocks = block_tables[seq, : (ctx_len + block_size - 1) // block_size].long()
            ks = k_cache[blocks].flatten(0, 1)[:ctx_len]  # [ctx, Hkv, D]
            vs = v_cache[blocks].flatten(0, 1)[:ctx_len]
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            mask = q_pos[:, None] >= torch.arange(ctx_len, device=q.device)[None, :]  # [n, ctx]
            causal = False
        o = F.scaled_dot_product_attention(
            qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
        )
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
        start += q_len
    return out
