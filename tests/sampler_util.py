"""SamplingRows built from per-row lists, and batches of adjusted and penalised rows: the sampler tests' (torch and
C kernel)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nanoqwen.sampler import LogitAdjust, Penalties, SamplingRows, apply_penalties, sample, seed_key, token_bitmask


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


def penalised_batch(vocab: int) -> tuple[torch.Tensor, Penalties]:
    """8 rows of logits [8, vocab] and their penalties, one edge a row (entries listed out of row order): 0 a
    repetition penalty on prompt tokens alone (count 0) that puts its maximum below the runner-up, and on a negative
    logit; 1 presence and frequency on generated tokens, its maximum generated 3 times; 2 negative ones lifting a
    low token to the top; 3 none; 4 all three, its maximum seen in the prompt and generated; 5 a repetition penalty
    below 1; 6 entries with neutral settings; 7 a third of the vocabulary, random counts."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab, generator=g) * 0.5
    logits[:, 1] = 5.0  # every row's maximum
    logits[:, 2] = 4.5  # and runner-up
    logits[:, 3] = -3.0
    third = torch.randperm(vocab, generator=g)[: vocab // 3]
    entries = [(7, t, c) for t, c in zip(third.tolist(), torch.randint(0, 4, (len(third),), generator=g).tolist())]
    entries += [(0, 1, 0), (0, 3, 0), (0, 4, 0), (1, 1, 3), (1, 5, 1), (2, 6, 2), (4, 1, 2), (4, 2, 0), (4, 3, 1),
                (5, 3, 0), (5, 2, 4), (6, 1, 5), (6, 3, 0)]
    r, t, c = zip(*entries)
    settings = [(0, 0, 1.3), (1.0, 0.5, 1), (-2.0, -2.0, 1), (0, 0, 1), (0.5, 0.25, 1.2), (0, 0.1, 0.5), (0, 0, 1),
                (0.7, 0.3, 1.1)]
    presence, frequency, repetition = (torch.tensor(column, dtype=torch.float32) for column in zip(*settings))
    return logits, Penalties(presence, frequency, repetition, torch.tensor(r), torch.tensor(t),
                             torch.tensor(c, dtype=torch.float32))


def dense_penalties(logits: torch.Tensor, penalties: Penalties) -> torch.Tensor:
    """Penalties as [B, V] operations on every token (the definition apply_penalties applies to the entries'
    tokens alone)."""
    counts = torch.zeros_like(logits).index_put((penalties.rows, penalties.tokens), penalties.counts)
    seen = torch.zeros_like(logits, dtype=torch.bool).index_put((penalties.rows, penalties.tokens), torch.tensor(True))
    rep = penalties.repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - penalties.frequency.unsqueeze(1) * counts - penalties.presence.unsqueeze(1) * (counts > 0).float()


def sample_with_torch_penalties(logits, rows, mode, penalties=None, adjust=None):  # noqa: ANN001, ANN201 - sample's signature
    """runner.sample as it was before the CPU sampler applied penalties: torch's apply_penalties first."""
    return sample(logits if penalties is None else apply_penalties(logits, penalties), rows, mode, None, adjust)
