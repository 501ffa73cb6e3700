"""SamplingRows built from per-row lists, and a batch of adjusted rows: the sampler tests' (torch and C kernel)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nanoqwen.sampler import LogitAdjust, SamplingRows, seed_key, token_bitmask


def rows(count: int, step: int = 0, seeds: Sequence[int] | None = None, **columns: list) -> SamplingRows:
    """`count` rows, each column (temperature, top_p, top_k, min_p, steps) as given, else its neutral value (every
    row at `step`); row i seeded with seeds[i], else i."""
    def col(name: str, default: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(columns.get(name, [default] * count), dtype=dtype)

    return SamplingRows(
        temperature=col("temperature", 1.0, torch.float32), top_p=col("top_p", 1.0, torch.float32),
        top_k=col("top_k", 0, torch.int32), min_p=col("min_p", 0.0, torch.float32),
        keys=torch.tensor([seed_key(s) for s in (seeds or range(count))], dtype=torch.int64),
        steps=col("steps", step, torch.int32),
    )


def adjusted_batch(vocab: int) -> tuple[torch.Tensor, LogitAdjust]:
    """8 rows of logits [8, vocab] and what requests add to them, one edge a row: 0 biases (one entry twice, a -inf
    ban of its maximum), 1 all but its last token masked (biases on it and on a banned one), 2 a three-way tie made
    by a bias, 3 the same with the first of the tie masked, 4 every token masked, 5 nothing, 6 a random third
    allowed (its entries listed first), 7 masked with every allowed token but one banned by a -inf bias."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=g) * 3
    logits[2:4] = torch.randn(2, vocab, generator=g) * 0.1
    logits[2:4, [3, vocab - 2]] = 4.0
    logits[2:4, 10] = 2.0
    third = torch.randperm(vocab, generator=g)[: vocab // 3].tolist()
    masks = {1: [vocab - 1], 3: [i for i in range(vocab) if i != 3], 4: [], 6: third, 7: third[:5]}
    top = int(logits[0].argmax())
    entries = [(6, t, 1.5) for t in third[:7]] + [(0, 5, 2.0), (0, top, -math.inf), (0, 5, 0.25), (1, vocab - 1, 3.0),
                                                 (1, 0, 50.0), (2, 10, 2.0), (3, 10, 2.0)]
    entries += [(7, t, -math.inf) for t in third[1:5]] + [(7, third[5 % len(third)], 9.0)]
    r, t, v = zip(*entries)
    adjust = LogitAdjust(torch.tensor(r), torch.tensor(t), torch.tensor(v), torch.tensor(list(masks)),
                         torch.stack([token_bitmask(ids, vocab) for ids in masks.values()]))
    return logits, adjust
