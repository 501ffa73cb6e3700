"""Seeded sampling of every row of a step's logits in one kernel call; greedy decoding's argmax in another.

The torch sampler (nanoqwen/sampler.py) hashes noise for the whole vocabulary as several [B, V]
temporaries and sorts the vocabulary for top-p: 10-30x a greedy step's argmax on the CPU. Here each
row is read a few times with nothing materialised:
- the race: every token's hash, but its two logs only where a cheap upper bound of its race value
  (from the hash's bits: -log E <= -log(1 - u)) reaches the best value its lane has scored;
- a small top-k (<= 256): a streaming selection keeps the best k, which are sorted and filtered;
- otherwise: the tokens are binned by distance below the maximum (with their softmax mass for
  top-p); the filters' cut falls in a window of a few bins, and only those are sorted. The survivors
  are a prefix of the filters' order (logit descending, id ascending), as sampler._filter_sorted keeps.

The hash and formulas are exponential_noise's, but the logs are this kernel's polynomials, which can
differ from torch's by an ulp: so on the CPU every sampled mode runs this kernel, and a seeded row's
token depends on its own settings alone, whatever its batch-mates and the step's mode.
A row's penalties (sampler.Penalties: only the tokens its history holds), logit biases and token mask
(sampler.LogitAdjust) are applied to a copy of that row in the kernel: torch's full-vocabulary ops for them cost
2-110 ms a step on the 2-core CPU, fighting the kernels' threads.
Its only working memory is a scratch reserved here (`reserve`: at the engine's setup, for its vocabulary and threads),
a row scratch for each thread: a step allocates nothing, and no row has a way without it (before, a failed allocation
adjusted the logits in place, into that step's logprobs, or sampled a row unfiltered). Given a scratch too small for
one row, the kernel samples none and says so in its status, which graph.call raises as MemoryError.
Source: csrc/sample.c, built by build.py; where it cannot be, the torch sampler runs.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import torch

from ops.cpu import build, graph

KERNEL = build.CKernel("cpu_sample", "sample.c", ("sample_rows", "sample_scratch_bytes", "argmax_rows"))


@dataclass
class _Scratch:
    memory: torch.Tensor  # uint8, 64-byte aligned (torch's CPU allocator): sample_rows' scratch
    # The longest rows it serves: a step checks a caller that did not reserve without a ctypes call to size a row. The
    # size does not give it back: threads (then) x a row's bytes, rounded to cache lines (16 vocabularies a size).
    vocab_size: int


_scratch = _Scratch(torch.empty(0, dtype=torch.uint8), 0)
_reserving = threading.Lock()


def scratch_bytes(vocab_size: int, threads: int) -> int:
    """sample_rows' scratch for rows of vocab_size logits on `threads` threads (the C side sizes it)."""
    size = ctypes.c_int64()
    KERNEL.lib.sample_scratch_bytes(vocab_size, threads, ctypes.addressof(size))
    return size.value


def reserve(vocab_size: int) -> None:
    """Allocates the kernel's scratch for rows of vocab_size logits on torch.get_num_threads() threads (~5 MB a thread
    at 151,936), unless what it has covers them: the engine calls this at setup, so that its steps allocate nothing
    and running out of memory raises there. A scratch replaced stays alive while a running call holds it (its local
    reference); engines set up at once in one process take turns here."""
    global _scratch
    with _reserving:
        vocab_size = max(vocab_size, _scratch.vocab_size)
        size = scratch_bytes(vocab_size, torch.get_num_threads())
        memory = _scratch.memory
        if size > memory.numel():
            memory = torch.zeros(size, dtype=torch.uint8)  # its pages touched: committed now, not in a step
        _scratch = _Scratch(memory, vocab_size)


def _sample_rows(
    logits: torch.Tensor,  # [B, V] fp32
    temperature: torch.Tensor,  # [B] fp32; 0 = greedy
    top_p: torch.Tensor,  # [B] fp32
    top_k: torch.Tensor,  # [B] int32; <= 0 = off
    min_p: torch.Tensor,  # [B] fp32
    keys: torch.Tensor,  # [B] int32 bit patterns of the seed keys
    steps: torch.Tensor,  # [B] int32
    bias_rows: torch.Tensor,  # [N] int64: sampler.LogitAdjust's, applied to a copy of each row it names (any order)
    bias_tokens: torch.Tensor,  # [N] int64
    bias_values: torch.Tensor,  # [N] fp32
    mask_rows: torch.Tensor,  # [R] int64
    bitmask: torch.Tensor,  # [R, ceil(V / 32)] int32
    penalty_rows: torch.Tensor,  # [N] int64: sampler.Penalties' entries (any order; a row's tokens distinct)
    penalty_tokens: torch.Tensor,  # [N] int64
    penalty_counts: torch.Tensor,  # [N] fp32
    presence: torch.Tensor,  # [B] fp32 (read for the rows an entry names: may be empty without entries)
    frequency: torch.Tensor,  # [B] fp32
    repetition: torch.Tensor,  # [B] fp32
) -> torch.Tensor:  # [B] int64
    floats = (bias_values, penalty_counts, presence, frequency, repetition)
    ids = (bias_rows, bias_tokens, mask_rows, penalty_rows, penalty_tokens)
    if (len(mask_rows) and bitmask.shape[-1] * 32 < logits.shape[1]) or any(t.dtype != torch.float32 for t in floats) \
            or any(t.dtype != torch.int64 for t in ids) or (len(penalty_rows) and len(presence) < logits.shape[0]):
        raise ValueError(f"sample_rows: a bitmask of {bitmask.shape[-1]} words for {logits.shape[1]} logits, "
                         f"{len(presence)} penalised rows' settings for {logits.shape[0]}, what the C code reads as "
                         f"fp32 {[t.dtype for t in floats]}, as int64 {[t.dtype for t in ids]}")
    bias_rows, bias_tokens, bias_values = _by_row(bias_rows, bias_tokens, bias_values)
    penalty_rows, penalty_tokens, penalty_counts = _by_row(penalty_rows, penalty_tokens, penalty_counts)
    logits = logits.contiguous()
    rows = (temperature, top_p, top_k, min_p, keys, steps, bias_rows, bias_tokens, bias_values, mask_rows, bitmask,
            penalty_rows, penalty_tokens, penalty_counts, presence, frequency, repetition)
    (temperature, top_p, top_k, min_p, keys, steps, bias_rows, bias_tokens, bias_values, mask_rows, bitmask,
     penalty_rows, penalty_tokens, penalty_counts, presence, frequency, repetition) = (t.contiguous() for t in rows)
    if logits.shape[1] > _scratch.vocab_size:  # a caller other than an engine, which reserved at setup
        reserve(logits.shape[1])
    scratch = _scratch.memory
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    with build.profiled("nanoqwen::sample_rows_cpu"):
        graph.call(KERNEL.lib.sample_rows, logits, temperature, top_p, top_k, min_p, keys, steps, bias_rows,
                   bias_tokens, bias_values, len(bias_rows), mask_rows, bitmask, len(mask_rows), bitmask.shape[-1],
                   penalty_rows, penalty_tokens, penalty_counts, len(penalty_rows), presence, frequency, repetition,
                   tokens, logits.shape[0], logits.shape[1], scratch, scratch.numel())
    return tokens


def _by_row(rows: torch.Tensor, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Entries (rows [N], then columns [N] each) sorted by row, where they are not: the C code bisects by row.
    Stable: each row's entries in their order (the same sums)."""
    if len(rows) < 2 or not bool((rows[1:] < rows[:-1]).any()):
        return rows, *columns
    rows, order = rows.sort(stable=True)
    return rows, *(c[order] for c in columns)


def _sample_rows_fake(logits, temperature, top_p, top_k, min_p, keys, steps, bias_rows, bias_tokens, bias_values,
                      mask_rows, bitmask, penalty_rows, penalty_tokens, penalty_counts, presence, frequency,
                      repetition):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


sample_rows_cpu = build.kernel_op("sample_rows_cpu", _sample_rows, _sample_rows_fake)


def _argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] bf16 or fp32 -> [B] int64, torch.argmax's tokens (greedy decoding). Over 151,936 logits a row on
    the 2-core CPU, quiet: torch's argmax 0.19 ms at batch 1 and 0.79 ms at batch 8, this kernel 0.03 and 0.27;
    at load average 5 torch's took 8-16 ms at batch 8 (its threads contending), this kernel 0.5. bf16 rows are read
    as they are: a greedy step needs no fp32 copy of its logits."""
    if logits.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"argmax_rows reads bf16 or fp32 logits, not {logits.dtype}")
    logits = logits.contiguous()
    tokens = torch.empty(logits.shape[0], dtype=torch.int64)
    with build.profiled("nanoqwen::argmax_rows_cpu"):
        graph.call(KERNEL.lib.argmax_rows, logits, tokens, logits.shape[0], logits.shape[1],
                   int(logits.dtype == torch.bfloat16))
    return tokens


def _argmax_rows_fake(logits):
    return logits.new_empty(logits.shape[0], dtype=torch.int64)


argmax_rows_cpu = build.kernel_op("argmax_rows_cpu", _argmax_rows, _argmax_rows_fake)
