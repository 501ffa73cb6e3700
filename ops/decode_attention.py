"""Attention of one new query token per sequence over the paged KV cache."""
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


try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: without it only the torch reference exists
    triton = None

# Each split-K program covers at least this many tokens of a full-length sequence.
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64

if triton is not None:

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr):
        if UPCAST:  # the CPU interpreter multiplies bf16 as raw integer bits
            a, b = a.to(tl.float32), b.to(tl.float32)
        # "ieee" only changes fp32 operands: exact fp32 instead of tf32 tensor cores.
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
        out_ptr,  # [B, Hq, S, D] fp32 partials; [B, Hq, D] in q's dtype when S == 1
        max_ptr, sum_ptr,  # [B, Hq, S] fp32, log2 domain; unused when S == 1
        qk_scale,  # softmax scale * log2(e)
        q_batch_stride, q_head_stride,
        k_block_stride, k_slot_stride, k_head_stride,
        v_block_stride, v_slot_stride, v_head_stride,
        block_table_stride,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        BLOCK_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ):
        """One (sequence, kv head, split): all GROUP query heads against one share of the context.

        The group is padded to BLOCK_GROUP >= 16 rows so both products run on tensor cores; each
        kv head's cache is read once per split for the whole group.
        """
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        rows = tl.arange(0, BLOCK_GROUP)[:, None]
        cols = tl.arange(0, BLOCK_D)[None, :]
        q_heads = kv_head * GROUP + rows
        row_mask = rows < GROUP
        col_mask = cols < HEAD_DIM
        q = tl.load(q_ptr + seq * q_batch_stride + q_heads * q_head_stride + cols, mask=row_mask & col_mask, other=0.0)

        # Equal shares of the actual length, in whole tiles: the grid is static (CUDA graphs), the
        # work per program is not. Splits past the end run no iterations and leave the neutral
        # partial (max -inf, sum 0, out 0).
        context_len = tl.load(context_lens_ptr + seq)
        split_len = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, context_len)

        m = tl.full([BLOCK_GROUP], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_GROUP], tl.float32)
        acc = tl.zeros([BLOCK_GROUP, BLOCK_D], tl.float32)
        offsets = tl.arange(0, BLOCK_N)
        block_table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
        k_head = k_cache_ptr + kv_head * k_head_stride
        v_head = v_cache_ptr + kv_head * v_head_stride
        for tile in range(start, end, BLOCK_N):
            tokens = tile + offsets
            token_mask = tokens < end
            blocks = tl.load(block_table + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
            slots = tokens % BLOCK_SIZE
            kv_mask = token_mask[:, None] & col_mask
            k = tl.load(k_head + (blocks * k_block_stride + slots * k_slot_stride)[:, None] + cols, mask=kv_mask, other=0.0)
            scores = _dot(q, tl.trans(k), UPCAST_DOT) * qk_scale  # [BLOCK_GROUP, BLOCK_N]
            scores = tl.where(token_mask[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(v_head + (blocks * v_block_stride + slots * v_slot_stride)[:, None] + cols, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT)
            m = m_new

        # Flat [B, Hq, S] index; with S == 1 it is the final [B, Hq] index.
        part = (seq * GROUP * tl.num_programs(1) + q_heads) * NUM_SPLITS + split  # [BLOCK_GROUP, 1]
        out_mask = row_mask & col_mask
        if NUM_SPLITS == 1:
            out = acc / l[:, None]
            tl.store(out_ptr + part * HEAD_DIM + cols, out.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.store(out_ptr + part * HEAD_DIM + cols, acc, mask=out_mask)
            part = tl.reshape(part, [BLOCK_GROUP])
            tl.store(max_ptr + part, m, mask=part < (part - rows.reshape([BLOCK_GROUP]) + GROUP))
