"""Triton paged prefill attention: every sequence's new tokens over its cached prefix and itself, one launch.

Varlen flash attention over the block table: one program per (tile of new tokens, kv head), the tile's
rows being BLOCK_M tokens times the GQA group, so each K/V tile is read once for the whole group.
The tiles of all sequences are one flat list (longest context first), so a batch of a long prompt and
decode-sized rows (query_len 1, as chunked prefill mixes them) fills the grid evenly. Causal with a
cached prefix: new token i of a sequence with c cached tokens sees keys [0, c + i].
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ops.triton.decode_attention import _attend_tiles

BLOCK_ROWS = 64  # query rows (tokens x padded GQA group) per program
BLOCK_N = 64  # keys per tile


# Triton compiles a kernel once per variant of its integer and pointer arguments (an int equal to 1, one divisible
# by 16, a pointer 16-byte aligned), at its first launch: ~0.7 s on the H200's host, a stall for every stream.
# The block tables' width (the step's longest sequence, in blocks) and where the sequences' words start in the
# metadata (after 2 words a tile) change from step to step: neither is specialised on, so that every step
# launches the variant the first one compiled (a 4096-token prompt's 256 blocks stalled the streams 0.7 s on its
# first chunk: profiles/RESULTS.md, "gpuchunk").
@triton.jit(do_not_specialize=["block_table_stride"], do_not_specialize_on_alignment=["seqs_ptr"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
    tiles_ptr,  # [T, 2] int32: (sequence, first new token of the tile within it)
    seqs_ptr,  # [S, 3] int32: (first row of the sequence in q, query_len, context_len)
    out_ptr,  # [N, Hq, D] contiguous
    qk_scale,  # softmax scale * log2(e)
    q_token_stride, q_head_stride,
    k_block_stride, k_slot_stride, k_head_stride,
    v_block_stride, v_slot_stride, v_head_stride,
    block_table_stride,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr, PRECISION: tl.constexpr,
):
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile_id)
    first = tl.load(tiles_ptr + 2 * tile_id + 1)
    q_start = tl.load(seqs_ptr + 3 * seq).to(tl.int64)
    q_len = tl.load(seqs_ptr + 3 * seq + 1)
    cached = tl.load(seqs_ptr + 3 * seq + 2) - q_len

    rows = tl.arange(0, BLOCK_M * GROUP_PAD)
    token = first + rows // GROUP_PAD  # within the sequence's new tokens
    member = rows % GROUP_PAD
    row_ok = (token < q_len) & (member < GROUP)
    heads = kv_head * GROUP + member
    cols = tl.arange(0, BLOCK_D)[None, :]
    col_mask = cols < HEAD_DIM
    row_mask = row_ok[:, None] & col_mask
    q_rows = (q_start + token) * q_token_stride + heads * q_head_stride
    q = tl.load(q_ptr + q_rows[:, None] + cols, mask=row_mask, other=0.0)  # [BLOCK_M * GROUP_PAD, BLOCK_D]

    end = cached + tl.minimum(first + BLOCK_M, q_len)  # the tile's last token sees keys [0, end)
    visible = tl.where(row_ok, cached + token + 1, end)  # padding rows see everything: never all -inf

    m = tl.full([BLOCK_M * GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, BLOCK_D], tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    k_head = k_cache_ptr + kv_head * k_head_stride
    v_head = v_cache_ptr + kv_head * v_head_stride
    m, l, acc = _attend_tiles(
        q, k_head, v_head, block_table, 0, end, visible, m, l, acc, qk_scale, cols, col_mask,
        k_block_stride, k_slot_stride, v_block_stride, v_slot_stride,
        BLOCK_SIZE, BLOCK_N, INTERPRETED, PRECISION,
    )
    out_rows = ((q_start + token) * (GROUP * tl.num_programs(1)) + heads) * HEAD_DIM
    tl.store(out_ptr + out_rows[:, None] + cols, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=row_mask)


def tile_list(query_lens: list[int], context_lens: list[int], block_m: int) -> list[tuple[int, int]]:
    """(sequence, first new token) of every tile of block_m new tokens, the most keys to read first."""
    tiles = [(seq, first) for seq, q_len in enumerate(query_lens) for first in range(0, q_len, block_m)]
    return sorted(tiles, key=lambda t: context_lens[t[0]] - query_lens[t[0]] + t[1], reverse=True)


def prefill_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int], scale: float,
    block_rows: int = BLOCK_ROWS,
) -> torch.Tensor:
    """ops.kernels.PrefillAttention (its arguments' shapes there), q and the caches of unit stride along D: one launch
    for all sequences, K/V read through the tables (k and v, already in the cache, unused)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_m = max(1, block_rows // group_pad)
    assert q.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1, "the head dim must be contiguous"
    starts = list(itertools.accumulate(query_lens[:-1], initial=0))
    tiles = tile_list(query_lens, context_lens, block_m)
    flat = [x for tile in tiles for x in tile] + [x for row in zip(starts, query_lens, context_lens) for x in row]
    host = torch.tensor(flat, dtype=torch.int32)
    meta = host.to(q.device, non_blocking=True)
    out = torch.empty(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    _prefill_kernel[(len(tiles), num_kv_heads)](
        q, k_cache, v_cache, block_tables, meta, meta[2 * len(tiles):], out,
        scale * 1.4426950408889634,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N if block_d <= 128 else 32, BLOCK_D=block_d,
        INTERPRETED=q.device.type == "cpu",
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # as in decode_attention_triton
        num_warps=4,
    )
    return out
