"""Sampling: filters, penalties against transformers' logits processors, and the seeded noise."""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nanoqwen.sampler import SamplingBatch, apply_penalties, exponential_noise, filter_logits, sample, seed_key


def batch(rows: int, **kw) -> SamplingBatch:
    def col(name, default, dtype):
        return torch.tensor(kw.get(name, [default] * rows), dtype=dtype)

    b = SamplingBatch(
        temperature=col("temperature", 1.0, torch.float32), top_p=col("top_p", 1.0, torch.float32),
        top_k=col("top_k", 0, torch.int64), min_p=col("min_p", 0.0, torch.float32),
        keys=torch.tensor([seed_key(s) for s in kw.get("seeds", range(rows))]),
        steps=col("steps", 0, torch.int64), all_greedy=kw.get("all_greedy", False),
        needs_filter=kw.get("needs_filter", True),
    )
    return b


def test_filters_match_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    for kw, warper in [
        ({"top_k": [5, 5, 5]}, TopKLogitsWarper(5)),
        ({"top_p": [0.7] * 3}, TopPLogitsWarper(0.7)),
        ({"min_p": [0.1] * 3}, MinPLogitsWarper(0.1)),
    ]:
        ours = filter_logits(logits, batch(3, **kw))
        ref = warper(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), kw
        kept = ~torch.isinf(ref)
        torch.testing.assert_close(ours[kept], logits[kept])


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(1, 100)
    seen = torch.tensor([[3, 7, 7, 50]])
    b = batch(1, needs_filter=False)
    b.repetition = torch.tensor([1.3])
    b.presence = torch.zeros(1)
    b.frequency = torch.zeros(1)
    b.output_counts = torch.zeros(1, 100)
    b.seen_mask = torch.zeros(1, 100, dtype=torch.bool)
    b.seen_mask[0, seen[0]] = True
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(apply_penalties(logits, b), ref)


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 10)
    b = batch(1)
    b.repetition = torch.ones(1)
    b.presence = torch.tensor([0.5])
    b.frequency = torch.tensor([0.25])
    b.output_counts = torch.zeros(1, 10)
    b.output_counts[0, 2] = 3
    b.seen_mask = b.output_counts > 0
    out = apply_penalties(logits, b)
    assert out[0, 2].item() == pytest.approx(-(0.5 + 0.75))
    assert out[0, 3].item() == 0


def test_greedy_rows_and_top_k_1_take_the_argmax():
    torch.manual_seed(2)
    logits = torch.randn(4, 1000)
    b = batch(4, temperature=[0.0, 1.0, 0.0, 2.0], top_k=[0, 1, 0, 1])
    assert torch.equal(sample(logits, b), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    torch.manual_seed(3)
    logits = torch.randn(1, 20)
    probs = logits.softmax(-1)[0]
    counts = torch.zeros(20)
    for step in range(4000):
        counts[sample(logits, batch(1, steps=[step], needs_filter=False))] += 1
    assert (counts / 4000 - probs).abs().max() < 0.03


def test_noise_depends_only_on_key_and_step():
    keys = torch.tensor([seed_key(1), seed_key(2), seed_key(1)])
    steps = torch.tensor([0, 0, 0])
    noise = exponential_noise(keys, steps, 1000)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert not torch.equal(noise[0], exponential_noise(keys[:1], torch.tensor([1]), 1000)[0])
    assert 0.9 < noise.mean().item() < 1.1 and (noise > 0).all()
