"""SamplingRows built from per-row lists, for the sampler's tests (torch's and the CPU kernel's)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from nanoqwen.sampler import SamplingRows, seed_key


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
