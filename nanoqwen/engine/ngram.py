"""n-gram speculative decoding's proposer (prompt lookup): the longest suffix n-gram of a sequence's
tokens that occurred earlier in them -> the tokens that followed that occurrence, as drafts the
step verifies (nanoqwen/engine/engine.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from nanoqwen.config import SpeculativeConfig
from nanoqwen.runner.sampling import logits_adjusted

if TYPE_CHECKING:  # annotations only
    from nanoqwen.engine.sequence import Sequence


class NgramIndex:
    """Each n-gram (min_n..max_n tokens) of a token list -> the position just after its latest
    occurrence, kept up to date as tokens are appended: a step indexes only its new tokens."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self.latest: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending at positions up to here are in `latest`

    def extend(self, tokens: list[int], end: int) -> None:
        """Indexes the n-grams of tokens[:end] not indexed yet."""
        for stop in range(self.indexed + 1, end + 1):
            for n in range(self.min_n, min(self.max_n, stop) + 1):
                self.latest[tuple(tokens[stop - n : stop])] = stop
        self.indexed = max(self.indexed, end)

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the longest suffix n-gram."""
        length = len(tokens)
        self.extend(tokens, length - 1)  # the suffix's own occurrence is not "earlier"
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            start = self.latest.get(tuple(tokens[length - n :]))
            if start is not None:
                drafts: list[int] = []
                # Past the end the continuation repeats what it already proposed: a period-p loop
                # proposes its next `limit` tokens, not just p.
                for i in range(start, start + limit):
                    drafts.append(tokens[i] if i < length else drafts[i - length])
                return drafts
        return []


class NgramProposer:
    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len

    def propose(self, seq: Sequence, budget: int) -> list[int]:
        """Drafts for a decoding sequence, at most `budget`; none for a row whose logits a penalty or an
        adjustment changes (its sampling depends on the tokens before it), and never more than can be
        emitted (max_tokens, max_model_len: the step emits up to one token more than it drafts)."""
        params = seq.request.params
        if params.penalized or logits_adjusted(seq):
            return []
        limit = min(self.config.num_speculative_tokens, budget, seq.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - len(seq) - 1)
        if limit <= 0:
            return []
        if seq.ngram is None:
            seq.ngram = NgramIndex(self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        return seq.ngram.propose(seq.token_ids, limit)
