"""Triton per-head q/k RMSNorm + rotary embedding (in place) + write of k/v into the paged cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ops.triton.rms_norm import rms_normalize


@triton.jit
def _norm_rope_heads(
    ptr, token_stride, head_stride, weight_ptr, eps, cos, sin, rotate_sign,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """In place: one token's heads <- rope(rmsnorm(heads)); returns them, [BLOCK_HEADS, BLOCK_D] fp32."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (cols < HEAD_DIM)
    # rotate_half(x) reads the other half of each head: load it a second time, permuted
    # (an L1 hit), rather than shuffling registers. Writing in place is safe: every store
    # waits for its row's reductions, which wait for all of that row's loads.
    partner = (cols + HEAD_DIM // 2) % HEAD_DIM
    head_ptrs = ptr + tl.program_id(0).to(tl.int64) * token_stride + heads * head_stride
    x = tl.load(head_ptrs + cols, mask=mask, other=0.0).to(tl.float32)
    x_rot = tl.load(head_ptrs + partner, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < HEAD_DIM, other=0.0)
    weight_rot = tl.load(weight_ptr + partner, mask=cols < HEAD_DIM, other=0.0)
    dtype = ptr.dtype.element_ty
    y = rms_normalize(x, weight, HEAD_DIM, eps, dtype)
    y_rot = rms_normalize(x_rot, weight_rot, HEAD_DIM, eps, dtype)
    out = y * cos + rotate_sign * y_rot * sin
    tl.store(head_ptrs + cols, out.to(dtype), mask=mask)
    return out


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, q_weight_ptr, k_weight_ptr, cos_sin_ptr, positions_ptr, slot_mapping_ptr,
    k_cache_ptr, v_cache_ptr,
    q_token_stride, q_head_stride, k_token_stride, k_head_stride, v_token_stride, v_head_stride,
    cos_sin_stride, k_cache_block_stride, k_cache_slot_stride, k_cache_head_stride,
    v_cache_block_stride, v_cache_slot_stride, v_cache_head_stride,
    eps,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: its q/k heads share one cos/sin row.
    token = tl.program_id(0).to(tl.int64)
    half = HEAD_DIM // 2
    cols = tl.arange(0, BLOCK_D)[None, :]
    col_mask = cols < HEAD_DIM
    angle_ptrs = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * cos_sin_stride + cols % half
    cos = tl.load(angle_ptrs, mask=col_mask, other=0.0)
    sin = tl.load(angle_ptrs + half, mask=col_mask, other=0.0)
    rotate_sign = tl.where(cols < half, -1.0, 1.0)
    _norm_rope_heads(
        q_ptr, q_token_stride, q_head_stride, q_weight_ptr, eps, cos, sin, rotate_sign,
        NUM_Q_HEADS, HEAD_DIM, BLOCK_Q_HEADS, BLOCK_D,
    )
    k = _norm_rope_heads(
        k_ptr, k_token_stride, k_head_stride, k_weight_ptr, eps, cos, sin, rotate_sign,
        NUM_KV_HEADS, HEAD_DIM, BLOCK_KV_HEADS, BLOCK_D,
    )
    heads = tl.arange(0, BLOCK_KV_HEADS)[:, None]
    kv_mask = (heads < NUM_KV_HEADS) & col_mask
    v = tl.load(v_ptr + token * v_token_stride + heads * v_head_stride + cols, mask=kv_mask)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # slot -1 is a padded lane: no cache write
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        k_dst = k_cache_ptr + block * k_cache_block_stride + offset * k_cache_slot_stride
        v_dst = v_cache_ptr + block * v_cache_block_stride + offset * v_cache_slot_stride
        tl.store(k_dst + heads * k_cache_head_stride + cols, k.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(v_dst + heads * v_cache_head_stride + cols, v.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def qk_norm_rope_store_triton(
    q: torch.Tensor,  # [N, Hq, D], any token/head strides, unit stride along D
    k: torch.Tensor,  # [N, Hkv, D]
    v: torch.Tensor,  # [N, Hkv, D]
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    cos_sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton version of `qk_norm_rope_store_torch` in one launch; padded lanes write no cache."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    for t in (q, k, v, k_cache, v_cache, cos_sin):
        assert t.stride(-1) == 1, "the head dim must be contiguous"
    block_d = triton.next_power_of_2(head_dim)
    block_q_heads = triton.next_power_of_2(num_q_heads)
    _qk_norm_rope_store_kernel[(num_tokens,)](
        q, k, v, q_weight, k_weight, cos_sin, positions, slot_mapping, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0), *k_cache.stride()[:3], *v_cache.stride()[:3],
        eps,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_Q_HEADS=block_q_heads, BLOCK_KV_HEADS=triton.next_power_of_2(num_kv_heads), BLOCK_D=block_d,
        num_warps=min(max(block_q_heads * block_d // 512, 1), 8),
    )
