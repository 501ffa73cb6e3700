"""Attention test inputs: prefill's over a random paged cache, shared by the reference, CPU and Triton tests, and
the CPU kernel set of a small attention shape."""
from __future__ import annotations

import torch

import ops

# (new tokens, context) per sequence: nothing cached, short and long cached prefixes, query_len 1
# rows (decode rows as chunked prefill mixes them in), a chunk after earlier chunks, contexts off the
# block size, a single-token prompt.
MIXED = [(5, 5), (7, 12), (1, 9), (3, 40), (20, 45), (1, 1), (33, 33), (1, 64), (16, 50)]


def paged(seqs: list[tuple[int, int]], num_q_heads: int = 4, num_kv_heads: int = 2, head_dim: int = 8,
          block_size: int = 4, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu",
          scattered: bool = True):
    """(new tokens, context) per sequence -> the kernel's arguments with a random paged cache (blocks
    scattered, else each sequence's a consecutive run; block 0 unused), and each sequence's full-context
    k/v [ctx, Hkv, D]."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-ctx // block_size) for _, ctx in seqs]
    shape = (sum(widths) + 1, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(device, dtype)
    v_cache = torch.randn(shape, generator=g).to(device, dtype)
    order = (torch.randperm(sum(widths), generator=g) if scattered else torch.arange(sum(widths))) + 1
    tables = torch.zeros(len(seqs), max(widths), dtype=torch.int32)
    full_k, full_v, k, v = [], [], [], []
    used = 0
    for i, ((q_len, ctx), width) in enumerate(zip(seqs, widths)):
        tables[i, :width] = order[used : used + width]
        used += width
        blocks = tables[i, :width].long().to(device)
        full_k.append(k_cache[blocks].flatten(0, 1)[:ctx])
        full_v.append(v_cache[blocks].flatten(0, 1)[:ctx])
        k.append(full_k[-1][ctx - q_len :])
        v.append(full_v[-1][ctx - q_len :])
    q = torch.randn(sum(q for q, _ in seqs), num_q_heads, head_dim, generator=g).to(device, dtype)
    args = (q, torch.cat(k), torch.cat(v), k_cache, v_cache, tables.to(device), [q for q, _ in seqs],
            [c for _, c in seqs], head_dim**-0.5 * 0.8)
    return args, full_k, full_v


def poisoned(k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, context_lens: list[int]):
    """The cache and tables with NaN wherever no sequence may read: the tail of each last block past its
    context, and a NaN block behind two extra table columns. -> (k_cache, v_cache, tables)."""
    block_size = k_cache.shape[1]
    poison = k_cache.shape[0]
    k_cache = torch.cat((k_cache, torch.full_like(k_cache[:1], float("nan"))))
    v_cache = torch.cat((v_cache, torch.full_like(v_cache[:1], float("nan"))))
    tables = torch.cat((tables, torch.full_like(tables[:, :2], poison)), dim=1)
    for row, ctx in enumerate(context_lens):
        last = tables[row, (ctx - 1) // block_size]
        k_cache[last, (ctx - 1) % block_size + 1 :] = float("nan")
        v_cache[last, (ctx - 1) % block_size + 1 :] = float("nan")
    return k_cache, v_cache, tables


def cpu_kernels(dtype: torch.dtype, head_dim: int = 16, num_heads: int = 4) -> ops.Kernels:
    """The CPU kernel set the model of these attention shapes (2 kv heads) gets."""
    return ops.select_kernels("torch", torch.device("cpu"), dtype, hidden_size=64, head_dim=head_dim,
                              num_heads=num_heads, num_kv_heads=2)
