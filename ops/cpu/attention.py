"""Paged decode attention on the CPU: one query token per sequence, read straight from the blocks.

The torch reference gathers every block of the padded table into a new tensor and runs SDPA on
it; at decode sizes that costs far more than the arithmetic. This kernel walks each sequence's
block table up to its context length, one (sequence, kv head) per task, with the GQA group's
query heads sharing each K/V row, an online softmax over tiles of 32 keys (scored 4 at a time, rescaled
once per tile, exponentiated 8 at a time) and fp32 accumulation (bf16 or fp32 cache). Each tile's rows
are prefetched: in a decode step the cache is cold, the linears having streamed their weights through
it, and a head's rows lie too far apart for the hardware prefetchers (measured in the step at batch 1:
36 -> 22 us per layer). bf16 is read 16 values at a time by a shift and a mask, as the linears read it,
so the head dim must be a multiple of 16.
Source: csrc/attention.c, built by build.py; where it cannot be, or for shapes it does not take, the
CPU kernel set keeps the torch reference.
"""
from __future__ import annotations

import torch

from ops.cpu import build, graph

MAX_GROUP = 16  # query heads per kv head
MAX_HEAD_DIM = 256

KERNEL = build.CKernel("cpu_attention", "attention.c", ("decode_attention",))


def takes(head_dim: int, group: int) -> bool:
    """Whether the kernel serves these shapes; q and the cache must also be bf16 or fp32, of one dtype."""
    return head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM and group <= MAX_GROUP


def _decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    batch, num_heads, head_dim = q.shape
    if q.stride(-1) != 1 or q.stride(-2) != head_dim:  # the model's q, a view of the qkv rows, is read in place
        q = q.contiguous()
    tables = block_tables.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype)
    _, block_size, num_kv_heads, _ = k_cache.shape
    with build.profiled("nanoqwen::decode_attention_cpu"):
        graph.call(
            KERNEL.lib.decode_attention, q, q.stride(0), k_cache, v_cache, tables, context_lens, out, batch,
            num_heads, num_kv_heads, head_dim, block_size, tables.shape[1], scale, int(q.dtype == torch.bfloat16),
        )
    return out


def _decode_attention_fake(q, k_cache, v_cache, block_tables, context_lens, scale):
    return q.new_empty(q.shape)


decode_attention_cpu = build.kernel_op("decode_attention_cpu", _decode_attention, _decode_attention_fake)
