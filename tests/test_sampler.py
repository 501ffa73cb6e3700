"""Sampling: filters, penalties against transformers' logits processors, and the seeded noise."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine_util import sequence
from nanoqwen import sampler
from nanoqwen.engine.request import SamplingParams
from nanoqwen.runner.penalties import PenaltyBuilder
from nanoqwen.runner.sampling import sampling_mode
from nanoqwen.sampler import (
    MODES,
    TOP_K_CANDIDATES,
    LogitAdjust,
    Penalties,
    apply_adjust,
    apply_penalties,
    exponential_noise,
    filter_logits,
    sample,
    seed_key,
)
from ops.cpu import sample as cpu_sample
from sampler_util import dense_penalties, penalised_batch, rows


@pytest.fixture(autouse=True)
def torch_sampler(monkeypatch):
    """The torch sampler, the reference on every device (tests/test_cpu_sample.py: the CPU kernel),
    even where an earlier test built the kernel."""
    monkeypatch.setattr(cpu_sample.KERNEL, "ready", False)


def penalties(tokens: list[int], repetition=1.0, presence=0.0, frequency=0.0, counts: list[int] | None = None
              ) -> Penalties:
    """One row's penalties: its seen `tokens` (distinct), generated `counts` times each (default: 0, prompt only)."""
    return Penalties(
        presence=torch.tensor([presence]), frequency=torch.tensor([frequency]), repetition=torch.tensor([repetition]),
        rows=torch.zeros(len(tokens), dtype=torch.int64), tokens=torch.tensor(tokens),
        counts=torch.tensor(counts or [0] * len(tokens), dtype=torch.float32),
    )


def test_penalty_builder_counts_each_sequences_new_tokens():
    """Each penalised row's distinct prompt and output tokens with their output counts, kept from step to step (the
    tokens a step appended counted, also those of steps a sequence missed); unpenalised rows get none."""
    params = SamplingParams(presence_penalty=0.5, repetition_penalty=1.2)
    seqs = [sequence([5, 6, 5], "a", params), sequence([9], "b"), sequence([3], "c", params)]
    builder = PenaltyBuilder(lambda t: t)

    def entries() -> set[tuple[int, int, float]]:
        p = builder.build(seqs)
        assert p.presence.tolist() == [0.5, 0.0, 0.5] and p.repetition.tolist() == pytest.approx([1.2, 1.0, 1.2])
        return set(zip(p.rows.tolist(), p.tokens.tolist(), p.counts.tolist()))

    assert entries() == {(0, 5, 0.0), (0, 6, 0.0), (2, 3, 0.0)}
    seqs[0].token_ids += [6, 7]
    seqs[2].token_ids += [3]
    assert entries() == {(0, 5, 0.0), (0, 6, 1.0), (0, 7, 1.0), (2, 3, 1.0)}
    kept = builder.build(seqs[:1])  # the others miss a step
    seqs[0].token_ids += [7] * 40 + list(range(100, 120))  # past the arrays' first capacity
    seqs[2].token_ids += [4, 2]  # new tokens above and below the first count's
    assert entries() == {(0, 5, 0.0), (0, 6, 1.0), (0, 7, 41.0), (2, 3, 1.0), (2, 4, 1.0), (2, 2, 1.0),
                         *((0, t, 1.0) for t in range(100, 120))}
    seqs[2].token_ids += [2, 3]
    assert {(t, c) for r, t, c in entries() if r == 2} == {(3, 2.0), (4, 1.0), (2, 2.0)}
    assert kept.tokens.tolist() == [5, 6, 7]  # a step's entries are its own copy
    finished = weakref.ref(seqs.pop())
    gc.collect()
    assert finished() is None  # the builder keeps no sequence (its request, its stream) alive past its end


def test_filters_match_transformers_warpers():
    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    for kw, warper in [
        ({"top_k": [5, 5, 5]}, TopKLogitsWarper(5)),
        ({"top_p": [0.7] * 3}, TopPLogitsWarper(0.7)),
        ({"min_p": [0.1] * 3}, MinPLogitsWarper(0.1)),
    ]:
        ours = filter_logits(logits, rows(3, **kw))
        ref = warper(None, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), kw
        kept = ~torch.isinf(ref)
        torch.testing.assert_close(ours[kept], logits[kept])


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(1)
    logits = torch.randn(1, 100)
    seen = torch.tensor([[3, 7, 7, 50]])
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(apply_penalties(logits, penalties([3, 7, 50], repetition=1.3)), ref)


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 10)
    out = apply_penalties(logits, penalties([2, 4], presence=0.5, frequency=0.25, counts=[3, 0]))
    assert out[0, 2].item() == pytest.approx(-(0.5 + 0.75))
    assert out[0, 3].item() == out[0, 4].item() == 0  # unseen; seen in the prompt only


@pytest.mark.parametrize("vocab", [37, 151936])
def test_penalties_touch_only_seen_tokens_as_the_dense_definition(vocab):
    """apply_penalties on its entries' tokens alone gives the [B, V] definition's logits bit for bit, every row."""
    logits, p = penalised_batch(vocab)
    assert torch.equal(apply_penalties(logits, p), dense_penalties(logits, p))


def test_greedy_rows_and_top_k_1_take_the_argmax():
    torch.manual_seed(2)
    logits = torch.randn(4, 1000)
    b = rows(4, temperature=[0.0, 1.0, 0.0, 2.0], top_k=[0, 1, 0, 1])
    assert torch.equal(sample(logits, b, "filter"), logits.argmax(-1))
    assert torch.equal(sample(logits, b, "greedy"), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    torch.manual_seed(3)
    logits = torch.randn(1, 20)
    probs = logits.softmax(-1)[0]
    counts = torch.zeros(20)
    for step in range(4000):
        counts[sample(logits, rows(1, steps=[step]), "sample")] += 1
    assert (counts / 4000 - probs).abs().max() < 0.03


def test_noise_depends_only_on_key_and_step():
    keys = torch.tensor([seed_key(1), seed_key(2), seed_key(1)])
    steps = torch.tensor([0, 0, 0])
    vocab = torch.arange(1000)
    noise = exponential_noise(keys, steps, vocab)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert not torch.equal(noise[0], exponential_noise(keys[:1], torch.tensor([1]), vocab)[0])
    ids = torch.tensor([[5, 999, 0], [7, 7, 300], [0, 1, 2]])  # a row's noise for chosen ids: the same values
    assert torch.equal(exponential_noise(keys, steps, ids), noise.gather(1, ids))
    assert 0.9 < noise.mean().item() < 1.1 and (noise > 0).all()


def test_noise_is_positive_so_a_banned_token_never_wins():
    keys, steps = torch.arange(64, dtype=torch.int64), torch.zeros(64, dtype=torch.int64)
    noise = exponential_noise(keys, steps, torch.arange(151936))  # ~0.6 draws of the top 24-bit value per row
    assert bool((noise > 0).all())
    logits = torch.full((64, 151936), float("-inf"))
    logits[:, 7] = 0.0
    assert sample(logits, rows(64), "sample").eq(7).all()


def test_logit_bias_and_grammar_mask_adjust_only_their_rows():
    logits = torch.randn(3, 70)
    bitmask = torch.zeros(1, 3, dtype=torch.int32)
    bitmask[0, 2] = 1 << 3  # row 1 may only take token 67
    adjust = LogitAdjust(bias_rows=torch.tensor([0, 0]), bias_tokens=torch.tensor([5, 6]),
                         bias_values=torch.tensor([100.0, -100.0]), mask_rows=torch.tensor([1]), bitmask=bitmask)
    adjusted = apply_adjust(logits, adjust)
    assert adjusted[0, 5] == logits[0, 5] + 100 and adjusted[0, 6] == logits[0, 6] - 100
    assert adjusted[1].isfinite().nonzero().flatten().tolist() == [67]
    assert torch.equal(adjusted[2], logits[2])
    for mode in ("greedy", "sample", "filter"):
        tokens = sample(logits, rows(3, temperature=[0.0, 1.0, 0.0], top_p=[1.0, 0.5, 1.0]), mode, adjust=adjust)
        assert tokens[:2].tolist() == [5, 67] and tokens[2] == logits[2].argmax()


def test_a_row_samples_the_same_in_every_mode_that_serves_it():
    """A batch-mate's settings pick the step's mode; a row's own tokens must not depend on it."""
    torch.manual_seed(4)
    logits = torch.randn(4, 3000) * 2
    settings = dict(temperature=[0.8, 0.0, 1.0, 1.3], top_p=[1.0, 1.0, 0.5, 1.0], top_k=[0, 0, 20, 0],
                    seeds=[11, 12, 13, 14])
    for step in range(20):
        b = rows(4, steps=[step] * 4, **settings)
        filtered = sample(logits, b, "filter")
        plain = [0, 1, 3]  # rows that do not filter
        own = {k: [v[i] for i in plain] for k, v in settings.items()}
        alone = sample(logits[plain], rows(3, steps=[step] * 3, **own), "sample")
        assert torch.equal(filtered[plain], alone)
        assert filtered[1] == logits[1].argmax()
        assert torch.isin(filtered[2], logits[2].topk(20).indices)


QWEN_DEFAULTS = dict(temperature=0.7, top_p=0.95, top_k=20)


def test_top_k_mode_serves_batches_whose_sampled_rows_all_have_a_small_top_k():
    def params(**kw):
        return SamplingParams(**{"temperature": 1.0, **kw})

    assert sampling_mode([params(**QWEN_DEFAULTS), params(temperature=0.0), params(top_k=TOP_K_CANDIDATES)]) == "top_k"
    assert sampling_mode([params(**QWEN_DEFAULTS), params()]) == "filter"  # a row without top-k: the vocabulary
    assert sampling_mode([params(top_k=TOP_K_CANDIDATES + 1)]) == "filter"
    assert sampling_mode([params(), params(temperature=0.0, top_k=5)]) == "sample"


def test_top_k_mode_scores_only_the_candidates(monkeypatch):
    """The cheap path: noise for the top candidates of each row, never the [B, V] vocabulary."""
    shapes = []
    noise = sampler.exponential_noise
    monkeypatch.setattr(sampler, "exponential_noise", lambda k, s, ids: shapes.append(ids.shape) or noise(k, s, ids))
    sample(torch.randn(3, 5000), rows(3, **{k: [v] * 3 for k, v in QWEN_DEFAULTS.items()}), "top_k")
    assert shapes == [(3, TOP_K_CANDIDATES)]


def test_a_small_top_k_row_samples_the_same_in_top_k_and_filter_modes():
    """Its batch-mates decide whether the step runs "top_k" or "filter": its tokens must not change."""
    torch.manual_seed(6)
    logits = torch.randn(4, 3000) * 3
    settings = dict(temperature=[0.7, 1.0, 1.5, 0.0], top_p=[0.95, 1.0, 0.5, 1.0], top_k=[20, 1, 64, 20],
                    min_p=[0.0, 0.0, 0.05, 0.0], seeds=[21, 22, 23, 24])
    mate = dict(temperature=[1.0], top_p=[0.9], top_k=[0], min_p=[0.0], seeds=[25])  # forces "filter"
    for step in range(50):
        alone = sample(logits, rows(4, steps=[step] * 4, **settings), "top_k")
        together = rows(5, steps=[step] * 5, **{k: v + mate[k] for k, v in settings.items()})
        with_mate = sample(torch.cat([logits, torch.randn(1, 3000)]), together, "filter")
        assert torch.equal(alone, with_mate[:4])
        assert alone[1] == logits[1].argmax() and alone[3] == logits[3].argmax()


def test_top_k_mode_follows_the_filtered_distribution():
    torch.manual_seed(7)
    logits = torch.randn(1, 200) * 2
    top = logits[0].topk(5)
    probs = torch.zeros(200).index_put_((top.indices,), (top.values / 0.7).softmax(-1))
    counts = torch.zeros(200)
    for step in range(4000):
        counts[sample(logits, rows(1, temperature=[0.7], top_k=[5], steps=[step]), "top_k")] += 1
    assert (counts / 4000 - probs).abs().max() < 0.03


def test_int32_key_bit_patterns_give_the_same_noise():
    keys = torch.tensor([seed_key(s) for s in range(8)], dtype=torch.int64)
    assert (keys >= 1 << 31).any()  # some keys only fit int32 as negative bit patterns
    as_int32 = torch.from_numpy(keys.numpy().astype("uint32").view("int32"))
    steps = torch.arange(8, dtype=torch.int32)
    vocab = torch.arange(500)
    assert torch.equal(exponential_noise(keys, steps, vocab), exponential_noise(as_int32, steps, vocab))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_compiled_sampler_matches_eager(mode):
    """The sampler as the compiled and captured decode step runs it (inductor here, fullgraph)."""
    torch.manual_seed(5)
    logits = torch.randn(3, 4000) * 3
    b = rows(3, temperature=[0.7, 0.0, 1.2], top_p=[0.9, 1.0, 1.0], top_k=[0, 0, 40], min_p=[0.0, 0.0, 0.02],
             steps=[3, 4, 5])
    compiled = torch.compile(sample, fullgraph=True)
    assert torch.equal(compiled(logits, b, mode), sample(logits, b, mode))
