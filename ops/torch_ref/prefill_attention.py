"""The torch reference of prefill attention: each sequence's new tokens over its cached prefix and itself.

Memory stays linear in the context when a prefix is cached: no [new, context] mask is built (an
explicit mask also takes SDPA off its causal block skipping). SDPA's is_causal aligns the mask
top-left (query i sees keys 0..i) where new tokens after a cached prefix need it bottom-right.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of new tokens per masked SDPA call when the prefix is long: its mask is [MASK_ROWS, context].
MASK_ROWS = 1024


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **mask) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **mask)


def _attend_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [1, Hq, n, D], the last n of k/v's ctx positions; k, v: [1, Hkv, ctx, D] -> [1, Hq, n, D]."""
    n, ctx = q.shape[2], k.shape[2]
    cached = ctx - n
    if 3 * n > ctx:
        # Zero queries in front of the new ones make top-left the right alignment: the causal kernel
        # does the work of the whole prompt uncached (the padding's rows are the cached²/2 scores
        # wasted), so a short cached prefix never costs more attention than none.
        padded = torch.cat([q.new_zeros(*q.shape[:2], cached, q.shape[3]), q], dim=2)
        return _attend(padded, k, v, scale, is_causal=True)[:, :, cached:]
    # A long prefix: padding would score it against itself; masked rows cost only new x context.
    out = torch.empty_like(q)
    for start in range(0, n, MASK_ROWS):
        rows = min(MASK_ROWS, n - start)
        end = cached + start + rows  # keys past the chunk's last token are never visible
        pos = torch.arange(cached + start, end, device=q.device)
        visible = pos[:, None] >= torch.arange(end, device=q.device)[None, :]  # [rows, end]
        out[:, :, start : start + rows] = _attend(
            q[:, :, start : start + rows], k[:, :, :end], v[:, :, :end], scale, attn_mask=visible
        )
    return out


def prefill_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int], scale: float,
) -> torch.Tensor:
    """ops.kernels.PrefillAttention (its arguments' shapes there): per sequence, in Python."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    start = 0
    for seq, (q_len, ctx_len) in enumerate(zip(query_lens, context_lens)):
        qs = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        if ctx_len == q_len:  # nothing cached: the fresh k/v are the whole context
            ks, vs = k[start : start + q_len], v[start : start + q_len]
            o = _attend(qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0), scale, is_causal=True)
        else:
            blocks = block_tables[seq, : (ctx_len + block_size - 1) // block_size].long()
            ks = k_cache[blocks].flatten(0, 1)[:ctx_len]  # [ctx, Hkv, D]
            vs = v_cache[blocks].flatten(0, 1)[:ctx_len]
            o = _attend_after_prefix(qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0), scale)
        out[start : start + q_len] = o.squeeze(0).transpose(0, 1)
        start += q_len
    return out
