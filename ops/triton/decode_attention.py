"""Triton paged decode attention: one new query token per sequence, flash-decoding with split-K."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# A full-length sequence gets at least this many tokens per split-K program.
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64


@triton.jit
def _dot(a, b, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    if INTERPRETED:  # the CPU interpreter multiplies bf16 as raw integer bits
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _attend_tile(
    q, k_head, v_head, block_table, tile, end, visible, m, l, acc, qk_scale, cols, col_mask,
    k_block_stride, k_slot_stride, v_block_stride, v_slot_stride,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax over the BLOCK_N tokens from `tile` (up to `end`), row i seeing the tokens before
    visible[i] (decode: all of them; prefill: causal): -> the updated (m, l, acc)."""
    tokens = tile + tl.arange(0, BLOCK_N)
    token_mask = tokens < end
    blocks = tl.load(block_table + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
    slots = tokens % BLOCK_SIZE
    kv_mask = token_mask[:, None] & col_mask
    k_rows = (blocks * k_block_stride + slots * k_slot_stride)[:, None]
    k = tl.load(k_head + k_rows + cols, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    scores = _dot(q, tl.trans(k), INTERPRETED, PRECISION) * qk_scale  # [BLOCK_ROWS, BLOCK_N]
    scores = tl.where(tokens[None, :] < visible[:, None], scores, float("-inf"))
    # Finite: every row sees the first token of the first tile it runs (token 0 for prefill's causal rows).
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    p = tl.exp2(scores - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    l = l * alpha + tl.sum(p, axis=1)
    v_rows = (blocks * v_block_stride + slots * v_slot_stride)[:, None]
    v = tl.load(v_head + v_rows + cols, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, INTERPRETED, PRECISION)
    return m_new, l, acc


@triton.jit
def _attend_tiles(
    q, k_head, v_head, block_table, start, end, visible, m, l, acc, qk_scale, cols, col_mask,
    k_block_stride, k_slot_stride, v_block_stride, v_slot_stride,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
):
    """_attend_tile over the tiles of BLOCK_N tokens from `start` to `end`: -> the updated (m, l, acc)."""
    if INTERPRETED:
        # Triton 3.6's interpreter cannot take tensor bounds in range(): its __index__ is
        # int() of a 1-element array, which NumPy >= 2.4 refuses. A while loop needs only bool().
        tile = start
        while tile < end:
            m, l, acc = _attend_tile(
                q, k_head, v_head, block_table, tile, end, visible, m, l, acc, qk_scale, cols, col_mask,
                k_block_stride, k_slot_stride, v_block_stride, v_slot_stride,
                BLOCK_SIZE, BLOCK_N, INTERPRETED, PRECISION,
            )
            tile += BLOCK_N
    else:  # a for loop, which the compiler software-pipelines
        for tile in range(start, end, BLOCK_N):
            m, l, acc = _attend_tile(
                q, k_head, v_head, block_table, tile, end, visible, m, l, acc, qk_scale, cols, col_mask,
                k_block_stride, k_slot_stride, v_block_stride, v_slot_stride,
                BLOCK_SIZE, BLOCK_N, INTERPRETED, PRECISION,
            )
    return m, l, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr,  # [B, Hq, S, D] fp32 partials; the final [B, Hq, D] in q's dtype when S == 1
    max_ptr, sum_ptr,  # [B, Hq, S] fp32 (max in the log2 domain); unused when S == 1
    qk_scale,  # softmax scale * log2(e)
    q_batch_stride, q_head_stride,
    k_block_stride, k_slot_stride, k_head_stride,
    v_block_stride, v_slot_stride, v_head_stride,
    block_table_stride,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr,  # the CPU interpreter
    PRECISION: tl.constexpr,  # tl.dot's input_precision
):
    """One (sequence, kv head, split): all GROUP query heads against one share of the context.

    The group is padded to BLOCK_GROUP >= 16 rows so both products run on tensor cores, and
    the kv head's cache is read once for the whole group.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    group = tl.arange(0, BLOCK_GROUP)
    q_heads = kv_head * GROUP + group  # [BLOCK_GROUP]
    cols = tl.arange(0, BLOCK_D)[None, :]
    col_mask = cols < HEAD_DIM
    head_mask = (group < GROUP)[:, None] & col_mask  # [BLOCK_GROUP, BLOCK_D]
    q = tl.load(q_ptr + seq * q_batch_stride + q_heads[:, None] * q_head_stride + cols, mask=head_mask, other=0.0)

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
    block_table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    k_head = k_cache_ptr + kv_head * k_head_stride
    v_head = v_cache_ptr + kv_head * v_head_stride
    visible = tl.zeros([BLOCK_GROUP], tl.int32) + end
    m, l, acc = _attend_tiles(
        q, k_head, v_head, block_table, start, end, visible, m, l, acc, qk_scale, cols, col_mask,
        k_block_stride, k_slot_stride, v_block_stride, v_slot_stride,
        BLOCK_SIZE, BLOCK_N, INTERPRETED, PRECISION,
    )

    part = (seq * GROUP * tl.num_programs(1) + q_heads) * NUM_SPLITS + split  # flat [B, Hq, S] index
    out_ptrs = out_ptr + part[:, None] * HEAD_DIM + cols
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=head_mask)
    else:
        tl.store(out_ptrs, acc, mask=head_mask)
        tl.store(max_ptr + part, m, mask=group < GROUP)
        tl.store(sum_ptr + part, l, mask=group < GROUP)


@triton.jit
def _decode_combine_kernel(
    partial_ptr, max_ptr, sum_ptr,  # as written by _decode_split_kernel
    out_ptr,  # [B, Hq, D] contiguous
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (sequence, query head): rescale each split's partial to the global max and sum them."""
    row = tl.program_id(0).to(tl.int64)  # flat [B, Hq] index
    splits = tl.arange(0, BLOCK_SPLITS)
    cols = tl.arange(0, BLOCK_D)
    split_mask = splits < NUM_SPLITS
    m = tl.load(max_ptr + row * NUM_SPLITS + splits, mask=split_mask, other=float("-inf"))
    l = tl.load(sum_ptr + row * NUM_SPLITS + splits, mask=split_mask, other=0.0)
    # Split 0 always holds the first token, so the max is finite; neutral splits weigh 0.
    weight = tl.exp2(m - tl.max(m, axis=0))
    partial_ptrs = partial_ptr + (row * NUM_SPLITS + splits[:, None]) * HEAD_DIM + cols[None, :]
    partial = tl.load(partial_ptrs, mask=split_mask[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(partial * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + cols, out.to(out_ptr.dtype.element_ty), mask=cols < HEAD_DIM)


# CUDA device index -> multiprocessor count. Filled when the kernels are selected (ops.select_kernels), so
# that a torch.compile trace of the decode step reads a dict and never queries the driver.
_SM_COUNTS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: plan as for an H100
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Split-K factor from static shapes only (CUDA graphs): about two programs per SM, but no
    more splits than a full-length (`max_context`) sequence fills with MIN_SPLIT_TOKENS each."""
    wanted = triton.cdiv(2 * num_sms(device), batch * num_kv_heads)
    return max(1, min(wanted, max_context // MIN_SPLIT_TOKENS, MAX_SPLITS))


def decode_attention_triton(
    q: torch.Tensor,  # [B, Hq, D], any batch/head strides, unit stride along D
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32
    context_lens: torch.Tensor,  # [B] int32, >= 1
    scale: float,
    num_splits: int | None = None,  # split-K factor; default from the static shapes
) -> torch.Tensor:  # [B, Hq, D]
    """Triton version of `decode_attention_torch`: flash-decoding over the paged cache, GQA-grouped."""
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    assert 1 <= num_splits <= MAX_SPLITS
    assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1, "the head dim must be contiguous"
    out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_splits == 1:
        partial = out
        maxes = sums = out  # unused
    else:
        partial = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        maxes = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
        sums = torch.empty_like(maxes)
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, partial, maxes, sums,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, NUM_SPLITS=num_splits,
        BLOCK_GROUP=max(16, triton.next_power_of_2(group)), BLOCK_N=64 if block_d <= 128 else 32,
        BLOCK_D=block_d, INTERPRETED=q.device.type == "cpu",
        # fp32: exact products, not tf32. bf16/fp16 run on tensor cores either way, except that
        # "ieee" turns their dots into FMA loops (no mma in the PTX): leave them the default.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    if num_splits > 1:
        _decode_combine_kernel[(batch * num_q_heads,)](
            partial, maxes, sums, out,
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d, num_warps=4,
        )
    return out
