"""n-gram speculative decoding's proposer (prompt lookup): the longest suffix n-gram of a sequence's
tokens that occurred earlier in them -> the tokens that followed that occurrence, as drafts the
step verifies (nanoqwen/engine/engine.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nanoqwen.settings import SpeculativeConfig

if TYPE_CHECKING:  # annotations only
    from nanoqwen.engine.sequence import Sequence


class NgramMatcher:
    """A sequence's tokens in an int32 array, appended to as they come, searched at each proposal (vLLM's
    way, no index): the latest earlier occurrence of the longest suffix n-gram (min_n..max_n tokens). The
    search is one vectorised pass over the tokens for the last one, then, unless the latest of those
    positions ends a max_n-token occurrence, a filter of them per token of the n-gram: tens of µs at 32k
    tokens, where an index of every n-gram took ~14 MB and ~50 ms to build (profiles/RESULTS.md, "specfix",
    "specfix2")."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.buffer = np.empty(0, dtype=np.int32)  # its first `length` entries are the tokens; grows by doubling
        self.length = 0

    def _sync(self, tokens: list[int]) -> np.ndarray:
        """The tokens as an array; copies only those appended since the last call."""
        if len(tokens) > len(self.buffer):
            grown = np.empty(max(len(tokens), 2 * len(self.buffer)), dtype=np.int32)
            grown[: self.length] = self.buffer[: self.length]
            self.buffer = grown
        self.buffer[self.length : len(tokens)] = tokens[self.length :]
        self.length = len(tokens)
        return self.buffer[: self.length]

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
        ids = self._sync(tokens)
        length = len(ids)
        high = min(self.max_n, length - 1)
        if high < self.min_n:
            return []
        start = self._search(ids, high)
        if start is None:
            return []
        drafts: list[int] = []
        # Past the end the continuation repeats what it already proposed: a period-p loop
        # proposes its next `limit` tokens, not just p.
        for i in range(start, start + limit):
            drafts.append(tokens[i] if i < length else drafts[i - length])
        return drafts

    def _search(self, ids: np.ndarray, high: int) -> int | None:
        """Where the continuation of the latest earlier occurrence of the longest suffix n-gram (min_n..high
        tokens) starts; None if there is none."""
        length = len(ids)
        # last: where each earlier occurrence of the suffix's last n tokens ends (its last token's index), sorted
        last = np.flatnonzero(ids[: length - 1] == ids[-1])
        # A run of one token or a short loop: its latest position ends an occurrence of the longest n-gram, found
        # without filtering all of them at each n (~0.4 ms at 32k tokens of "\n").
        if len(last) and last[-1] >= high - 1 and np.array_equal(ids[last[-1] - high + 1 : last[-1] + 1],
                                                                 ids[length - high :]):
            return int(last[-1]) + 1
        start = None
        for n in range(1, high + 1):
            if n > 1:
                last = last[np.searchsorted(last, n - 1) :]
                last = last[ids[last - (n - 1)] == ids[length - n]]
            if not len(last):
                break
            if n >= self.min_n:
                start = int(last[-1]) + 1
        return start


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len

    def propose(self, seq: Sequence, budget: int) -> list[int]:
        """Drafts for a decoding sequence, at most `budget`, never more than can be emitted (max_tokens,
        max_model_len: the step emits up to one token more than it drafts). No drafts for a row whose logits
        at a position depend on the tokens before it (penalties, a grammar) or on its output index (a
        min_tokens still to reach bans the stop ids); logit_bias and allowed_token_ids are the same at every
        position, and the step applies them at each."""
        params = seq.request.params
        if params.penalized or seq.grammar is not None or seq.num_output_tokens < params.min_tokens:
            return []
        limit = min(self.config.num_speculative_tokens, budget, seq.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - len(seq) - 1)
        if limit <= 0:
            return []
        if seq.ngram is None:
            seq.ngram = NgramMatcher(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        return _cut_at_banned(seq, seq.ngram.propose(seq.token_ids, limit))


def _cut_at_banned(seq: Sequence, drafts: list[int]) -> list[int]:
    """The drafts before the first one the row may not sample (outside its allowed_token_ids, or a logit_bias
    of -100, OpenAI's ban): it would never be accepted, and it and those after it would take budget and blocks."""
    bias = seq.request.params.logit_bias
    mask = seq.request.allowed_mask
    if not bias and mask is None:
        return drafts
    words = None if mask is None else mask.numpy().view(np.uint32)  # sampler.token_bitmask's layout
    for i, token in enumerate(drafts):
        if bias.get(token, 0.0) <= -100 or (words is not None and not words[token // 32] >> (token % 32) & 1):
            return drafts[:i]
    return drafts
