"""How many tokens a chunk of an unfinished prompt may take while streams decode, from measured step
times: such a step may take `stall` × a decode-only step longer than one carrying the smallest chunk
(MIN_CHUNK tokens). Where a step with prefill rows costs little more than a decode-only step, that is
about (1 + stall) × a decode-only step; where it costs far more whatever its chunk (an eager step
against a captured decode graph, GEMM routes that change with the row count), the chunk still grows
to what the streams' stall allows. A step's time is not proportional to its tokens, so the chunk
follows the measured times rather than a per-token model: after every step that carries one, it is
scaled by target / measured time, which converges on the target wherever time grows with tokens
(profiles/RESULTS.md, "Chunked prefill: paced chunks").
"""
from __future__ import annotations

from dataclasses import dataclass

# Smallest paced chunk: a long prompt keeps moving. On CPUs with AMX, steps of up to 32 rows run the
# linears through the C GEMV kernels, whose time grows with every row, and larger ones through oneDNN's
# GEMM, nearly flat in rows: 8 decode rows + 32 tokens already take the GEMM.
MIN_CHUNK = 32
# Weight of the newest step in the moving averages of step times.
SMOOTHING = 0.5


@dataclass
class StepTimes:
    """The times of one kind of streams' step: without drafts (a captured graph where there is one) or with
    them (eager, 2-4x longer): averaged apart, so that neither swings the other's chunk target."""

    decode_s: float | None = None  # a decode-only step, averaged
    # A step carrying a MIN_CHUNK-token paced chunk and no other prefill, in decode-only steps (averaged): a
    # ratio, so that it holds as the machine's load moves both.
    floor: float | None = None


class ChunkPacer:
    def __init__(self, stall: float, max_tokens: int) -> None:
        self.stall = stall
        self.max_tokens = max_tokens
        self.plain = StepTimes()  # steps whose rows have no drafts
        self.drafting = StepTimes()  # steps whose rows verify drafts
        self.tokens = min(MIN_CHUNK, max_tokens)  # the paced chunk; grows at most 2x a step from here

    def observe(self, decode_rows: int, prefill_tokens: int, paced_tokens: int, seconds: float,
                drafts: int = 0) -> None:
        """A step's wall time: `decode_rows` decoding rows (one token each, and `drafts` drafts in all),
        `prefill_tokens` prompt tokens, of which `paced_tokens` in chunks that left their prompt unfinished or
        were its paced last chunk. It is timed against the decode-only steps of its kind (drafts or none)."""
        times = self.drafting if drafts else self.plain
        if not prefill_tokens:
            times.decode_s = _average(times.decode_s, seconds)
            return
        if not (paced_tokens and decode_rows and times.decode_s):
            return
        if paced_tokens == prefill_tokens == self.tokens == MIN_CHUNK:
            times.floor = _average(times.floor, seconds / times.decode_s)
        target = ((times.floor or 1.0) + self.stall) * times.decode_s
        if seconds <= target and paced_tokens < self.tokens:  # the prompt ended short of the allowance
            return
        # the ratio bounded before it scales: a large stall's target (1e308) overflowed the product to inf
        scaled = int(self.tokens * min(target / seconds, 2.0))
        self.tokens = max(MIN_CHUNK, self.tokens // 2, min(scaled, self.max_tokens))


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)
