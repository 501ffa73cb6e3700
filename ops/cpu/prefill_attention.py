"""Paged prefill attention on the CPU: every sequence's new tokens over its cached prefix and itself,
read straight from the blocks, in one call.

The torch reference loops over sequences in Python, gathers each context out of the blocks into a
new tensor, and runs SDPA per sequence (masked chunks of rows after a long prefix). This kernel is
flash attention over the block table: tasks of 64 query vectors (a run of new tokens times the GQA
group of one kv head) walk the context in tiles of 64 keys up to their last token's position, with
an online softmax and fp32 accumulation; memory is a fixed scratch per thread, whatever the context.
Source: csrc/prefill_attention.c, built by build.py.

On CPUs with AVX-512 BF16, bf16 also has the kernel's tiles (csrc/prefill_tiles.h): tasks of 512 query vectors
over 256-key blocks packed once a task, scores and P V with bf16 products and fp32 sums (on AMX's tiles where the CPU
has AMX-BF16, else by vdpbf16ps), the online softmax in fp32 on AVX-512. At 0.6B's shapes, a thread: 1.5-2x SDPA's
fused kernel on the AMX Xeon (profiles/RESULTS.md, "attn9"), 5-6x on a Zen 5 without AMX ("prefill32").

`prefill_attention_cpu`, the CPU kernel set's op, gives every sequence to the kernel's tiles where they serve (they
beat the AVX2 loops at every run length measured, a decode row included: profiles/RESULTS.md, "attn9fix",
"prefill32"); elsewhere (fp32, AVX2-only CPUs) the AVX2 loops take the sequences they win (C_MAX_NEW), SDPA's fused
kernels the rest: the reference's one causal call for a sequence with nothing or little cached; after a longer prefix,
one unmasked call over the prefix and one causal call over the new tokens, merged by their logsumexps: no [new,
context] mask, no score computed twice.
"""
from __future__ import annotations

import ctypes
import functools
import itertools

import torch

from ops.cpu import build, graph
from ops.torch_ref.prefill_attention import prefill_attention_torch

MAX_GROUP = 64  # query heads per kv head: a task's 64 query vectors hold at least one token's group
MAX_HEAD_DIM = 256
# New tokens per sequence up to which the C kernel takes a sequence with a cached prefix: it reads
# the context in place where SDPA first gathers it out of the blocks (decode rows of a chunked batch,
# short chunks). Longer runs of new tokens, and sequences with nothing cached, go to SDPA's fused kernels, whose
# oneDNN AMX/AVX-512 GEMMs the AVX2 loops do not match (profiles/RESULTS.md, "Paged prefill attention"). Not used
# where the tiles serve: they take every sequence.
C_MAX_NEW = 16
# A prefix under 1/SPLIT_MIN_PREFIX of the new tokens costs less padded under one causal SDPA call (the
# reference's route) than in a call of its own. Measured in bf16 at 0.6B's shapes: the reference 1.4x
# faster at 32 cached + 2016 new; the split even with it at 8192 + 8192 (the reference's padded call),
# 1.7x faster at 12288 + 4096 and 15360 + 1024 (the reference's masked rows).
SPLIT_MIN_PREFIX = 8

KERNEL = build.CKernel("cpu_prefill_attention", "prefill_attention.c", ("prefill_attention", "prefill_attention_tiles"))


def takes(head_dim: int, group: int) -> bool:
    """Whether the kernel serves these shapes; q and the cache must also be bf16 or fp32, of one dtype."""
    return head_dim % 8 == 0 and head_dim <= MAX_HEAD_DIM and group <= MAX_GROUP


@functools.cache
def tiles_serve(head_dim: int) -> bool:
    """Whether the kernel's tiles serve bf16 at this head dim on this CPU, within its build's cap (csrc/prefill_tiles.h:
    AMX-BF16 or AVX-512 BF16)."""
    flag = ctypes.c_int(0)
    KERNEL.lib.prefill_attention_tiles(head_dim, ctypes.byref(flag))
    return bool(flag.value)


def _prefill_attention(
    q: torch.Tensor,  # [N, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, W] int32
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    tiles: bool = False,  # the tiles where tiles_serve() says they serve, else the AVX2 loops
) -> torch.Tensor:  # [N, Hq, D]
    q = q.contiguous()
    tables = block_tables.contiguous()
    lens = torch.tensor([query_lens, context_lens], dtype=torch.int32)  # [2, S]
    out = torch.empty_like(q)
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    with build.profiled("nanoqwen::prefill_attention_cpu"):
        graph.call(
            KERNEL.lib.prefill_attention, q, k_cache, v_cache, tables, lens[0], lens[1], out, len(query_lens),
            num_heads, num_kv_heads, head_dim, block_size, tables.shape[1], scale, int(q.dtype == torch.bfloat16),
            int(tiles),
        )
    return out


def _prefill_attention_fake(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale, tiles=False):
    return torch.empty_like(q)


prefill_attention_kernel = build.kernel_op("prefill_attention_cpu", _prefill_attention, _prefill_attention_fake)


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [1, H, n, D], k/v: [1, H, m, D] -> (out [1, H, n, D], natural-log logsumexp [1, H, n] fp32)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal, scale=scale)


def _split_sdpa(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [n, Hq, D] over a prefix k/v [c, Hkv, D] (all visible) and its own k/v [n, Hkv, D] (causal): two
    fused SDPA calls merged by their logsumexps -> [n, Hq, D]."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_new.shape[1]
    group = num_heads // num_kv_heads
    heads = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    # The prefix masks nothing: a group's query heads are rows of one kv head's problem.
    grouped = heads.reshape(1, num_kv_heads, group * n, head_dim)
    o1, lse1 = _flash(grouped, k_prefix.transpose(0, 1).unsqueeze(0), v_prefix.transpose(0, 1).unsqueeze(0),
                      scale, False)
    o1, lse1 = o1.reshape(1, num_heads, n, head_dim), lse1.reshape(1, num_heads, n)
    kn = k_new.transpose(0, 1).unsqueeze(0).repeat_interleave(group, 1)  # [1, Hq, n, D]
    vn = v_new.transpose(0, 1).unsqueeze(0).repeat_interleave(group, 1)
    o2, lse2 = _flash(heads, kn, vn, scale, True)
    w1 = torch.sigmoid(lse1 - lse2).unsqueeze(-1)  # exp(lse1) / (exp(lse1) + exp(lse2))
    out = o2.float().lerp_(o1.float(), w1)  # in fp32: a bf16 weight would cost the output ~1e-2
    return out.squeeze(0).transpose(0, 1).to(q.dtype)


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    table: torch.Tensor, context_len: int, scale: float,
) -> torch.Tensor:
    """One sequence through SDPA's fused kernels: q, k, v: [n, H, D] of its new tokens, table: [W] -> [n, Hq, D]."""
    n = q.shape[0]
    cached = context_len - n
    if cached * SPLIT_MIN_PREFIX < n:  # the reference: one causal call, the short prefix's rows padded
        return prefill_attention_torch(q, k, v, k_cache, v_cache, table[None], [n], [context_len], scale)
    blocks = table[: -(-cached // k_cache.shape[1])]
    return _split_sdpa(q, k, v, _prefix(k_cache, blocks, cached), _prefix(v_cache, blocks, cached), scale)


def _prefix(cache: torch.Tensor, blocks: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first `tokens` cached rows of a sequence whose prefix is in `blocks` -> [tokens, Hkv, D]: a view
    when the blocks are consecutive (a fresh pool hands a long prompt a run of them), else a copy."""
    first = int(blocks[0])
    if int(blocks[-1]) - first == len(blocks) - 1 and bool((blocks.diff() == 1).all()):
        return cache[first : first + len(blocks)].flatten(0, 1)[:tokens]
    return cache.index_select(0, blocks).flatten(0, 1)[:tokens]


def prefill_attention_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, query_lens: list[int], context_lens: list[int], scale: float,
) -> torch.Tensor:
    """ops.kernels.PrefillAttention (its arguments' shapes there). Every sequence to the C kernel's tiles in one call
    (bf16 where tiles_serve() says so); else those of at most C_MAX_NEW new tokens after a cached prefix to its AVX2
    loops, in one call, the rest to SDPA's fused kernels."""
    if q.dtype == torch.bfloat16 and tiles_serve(q.shape[2]):
        return prefill_attention_kernel(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale, True)
    small = [n < c and n <= C_MAX_NEW for n, c in zip(query_lens, context_lens)]
    if all(small):
        return prefill_attention_kernel(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale, False)
    out = torch.empty_like(q)
    starts = list(itertools.accumulate(query_lens, initial=0))
    seqs = [s for s, is_small in enumerate(small) if is_small]
    if seqs:
        rows = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in seqs])
        out[rows] = prefill_attention_kernel(
            q[rows], k_cache, v_cache, block_tables[seqs], [query_lens[s] for s in seqs],
            [context_lens[s] for s in seqs], scale,
        )
    for s, is_small in enumerate(small):
        if not is_small:
            rows = slice(starts[s], starts[s + 1])
            out[rows] = _sdpa(q[rows], k[rows], v[rows], k_cache, v_cache, block_tables[s], context_lens[s], scale)
    return out
