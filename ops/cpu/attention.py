"""Paged decode attention on the CPU: one query token per sequence, read straight from the blocks.

The torch reference gathers every block of the padded table into a new tensor and runs SDPA on
it; at decode sizes that costs far more than the arithmetic. This kernel walks each sequence's
block table up to its context length with an online softmax over tiles of 32 keys (rescaled once
per tile) and fp32 accumulation (bf16 or fp32 cache). A task takes every head of its keys, each kv
head's GQA group sharing its K/V rows, so the cache is read in runs of whole tokens (Hkv * D values)
rather than a head's slice of each; the cache being cold after the linears streamed their weights, each
tile is first read in address order (a load a cache line: ~2x the cold rate of prefetches alone) and the next one
prefetched while it is computed. Flash-decoding: from 512 (token, kv
head) pairs a sequence's keys are cut into parts, about 4 per thread across the batch, each a task
on the thread pool leaving its max, sum and unnormalised output, combined at the end; batch 1 and a
long sequence next to short ones then keep every thread busy. The parts' state lives in a per-thread
scratch sized from the shapes (grown once, never per call); should it fail to allocate, each sequence
runs whole on the calling thread, a kv head at a time, its state on the stack. On AVX-512 (BF16) q . k of bf16 is
vdpbf16ps on the unscaled q (products of bf16 are exact in fp32; the score is scaled after), 16
keys' sums reduced together; elsewhere AVX2 + FMA. bf16 is read 16 values at a time by a shift and
a mask, as the linears read it, so the head dim must be a multiple of 16 (32 for the AVX-512 loops).
Source: csrc/attention.c, built by build.py; where it cannot be, or for shapes it does not take, the
CPU kernel set keeps the torch reference. profiles/bench_decode_attention.py times it alone.
"""
from __future__ import annotations

import torch

from ops.cpu import build, graph

MAX_GROUP = 16  # query heads per kv head
MAX_HEAD_DIM = 256

KERNEL = build.CKernel("cpu_attention", "attention.c", ("decode_attention", "decode_attention_avx512"))


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
