"""A step's penalties (sampler.Penalties) from its rows' token histories: each penalised sequence's distinct tokens
with their output counts, kept up to date from the tokens it gained since its last step, so that building them costs
its new tokens and its distinct tokens' copy, not a scan of its whole history (nor [B, V] counts)."""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from nanoqwen.sampler import Penalties

if TYPE_CHECKING:  # annotations only: the engine package imports the runner
    from nanoqwen.engine.sequence import Sequence


class TokenCounts:
    """One sequence's distinct tokens (prompt and output) with how often it generated each: those it had when first
    counted sorted (found by bisection: no per-token dict of a long history to build), later ones appended."""

    def __init__(self, seq: Sequence) -> None:
        self.owner = weakref.ref(seq)  # not the sequence itself: a finished one's request and stream go with it
        ids = np.asarray(seq.token_ids, dtype=np.int64)
        self.tokens, inverse = np.unique(ids, return_inverse=True)
        self.counts = np.bincount(inverse[seq.num_prompt_tokens:], minlength=len(self.tokens)).astype(np.float32)
        self.sorted = self.size = len(self.tokens)
        self.appended: dict[int, int] = {}  # token -> slot, past the sorted ones
        self.done = len(ids)  # the tokens of seq.token_ids counted so far

    def update(self, seq: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """Counts the tokens appended to seq (the owner) since the last call. -> (tokens int64 [n], output counts fp32
        [n]), views."""
        ids = seq.token_ids
        for pos in range(self.done, len(ids)):  # all generated: the prompt was counted at construction
            token = ids[pos]
            slot = int(np.searchsorted(self.tokens[: self.sorted], token))
            if slot == self.sorted or self.tokens[slot] != token:
                slot = self.appended.get(token, self.size)
            if slot == self.size:
                self.appended[token] = slot
                if slot == len(self.tokens):  # doubles: amortised O(1) a token
                    self.tokens = np.resize(self.tokens, 2 * slot + 8)
                    self.counts = np.resize(self.counts, 2 * slot + 8)
                self.tokens[slot], self.counts[slot] = token, 0.0
                self.size += 1
            self.counts[slot] += 1.0
        self.done = len(ids)
        return self.tokens[: self.size], self.counts[: self.size]


class PenaltyBuilder:
    """Each step's Penalties, from a TokenCounts per penalised sequence, kept from one step to the next while the
    sequence lives (one that missed steps is brought up to date from the tokens it gained since)."""

    def __init__(self, to_device: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.to_device = to_device
        self._counts: dict[int, TokenCounts] = {}  # id(seq) -> its counts

    def build(self, seqs: list[Sequence]) -> Penalties:
        """seqs: the step's rows (a drafting sequence's positions share its history: none is penalised)."""
        self._counts = {key: kept for key, kept in self._counts.items() if kept.owner() is not None}
        rows, tokens, outputs = [], [], []
        for row, seq in enumerate(seqs):
            if not seq.request.params.penalized:
                continue
            kept = self._counts.get(id(seq))
            if kept is None or kept.owner() is not seq:  # an id reused by a new sequence
                kept = self._counts[id(seq)] = TokenCounts(seq)
            seen, generated = kept.update(seq)
            rows.append(np.full(len(seen), row, dtype=np.int64))
            tokens.append(seen)
            outputs.append(generated)
        params = [seq.request.params for seq in seqs]

        def column(values: list[float]) -> torch.Tensor:
            return self.to_device(torch.tensor(values, dtype=torch.float32))

        def entries(parts: list[np.ndarray], dtype: type) -> torch.Tensor:
            return self.to_device(torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype)))

        return Penalties(
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            repetition=column([p.repetition_penalty for p in params]),
            rows=entries(rows, np.int64), tokens=entries(tokens, np.int64), counts=entries(outputs, np.float32),
        )
