"""How many tokens a chunk of an unfinished prompt may take while streams decode, from measured step
times: the chunk is resized after every step that carries one, so that such a step takes (1 +
stall) × a decode-only step. A step's time is not proportional to its tokens (a fixed part, GEMM
routes that change with the row count, attention that grows with the context), so the size follows
the measured times rather than a per-token model: scaled by target / measured time, which converges
on the target wherever time grows with tokens (profiles/RESULTS.md, "Chunked prefill: paced chunks").
"""
from __future__ import annotations

# Smallest paced chunk: a long prompt keeps moving. On CPUs with AMX, steps of up to 32 rows run the
# linears through the C GEMV kernels, whose time grows with every row, and larger ones through oneDNN's
# GEMM, nearly flat in rows: 8 decode rows + 32 tokens already take the GEMM.
MIN_CHUNK = 32
# Weight of the newest decode-only step in its moving average.
SMOOTHING = 0.5


class ChunkPacer:
    def __init__(self, stall: float, max_tokens: int) -> None:
        self.stall = stall
        self.max_tokens = max_tokens
        self.decode_s: float | None = None  # a decode-only step, averaged
        self.tokens = min(MIN_CHUNK, max_tokens)  # the paced chunk; grows at most 2x a step from here

    def observe(self, decode_rows: int, prefill_tokens: int, paced_tokens: int, seconds: float) -> None:
        """A step's wall time: `decode_rows` one-token rows, `prefill_tokens` other ones, of which
        `paced_tokens` in chunks that left their prompt unfinished or were its paced last chunk."""
        if not prefill_tokens:
            self.decode_s = seconds if self.decode_s is None else self.decode_s + SMOOTHING * (seconds - self.decode_s)
            return
        if not (paced_tokens and decode_rows and self.decode_s):
            return
        target = (1 + self.stall) * self.decode_s
        if seconds <= target and paced_tokens < self.tokens:  # the prompt ended short of the allowance
            return
        scaled = int(self.tokens * target / seconds)
        self.tokens = max(MIN_CHUNK, self.tokens // 2, min(scaled, 2 * self.tokens, self.max_tokens))
