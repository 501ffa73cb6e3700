"""The engine's steps counted by the tokens each ran, in the buckets of vLLM's `vllm:iteration_tokens_total`
(nanoqwen.api.metrics_vllm adds their growth to it at each publish)."""
from __future__ import annotations

import bisect

# vLLM's bounds of vllm:iteration_tokens_total (vllm/v1/metrics/loggers.py); a step past the last one: the +Inf bucket
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class StepCounts:
    """Written by the engine thread alone: a step is one search and two additions (no lock, no container made). One
    count a bucket, not a step size, so that a reader's copy and a publish stay the same size whatever the steps
    were. A reader's copy may hold a step's bucket without its tokens (or those without the bucket): the next one
    holds both."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)  # +Inf last, as Prometheus' Histogram
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.buckets[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, tokens)] += 1  # the first bound >= tokens
        self.tokens += tokens
