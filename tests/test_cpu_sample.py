"""The CPU sampling kernel (ops/cpu/sample.py) against the torch sampler: the same tokens where no
near-tie exists, the same distributions, every filter's edge cases, and a row's tokens independent of
its batch-mates and of the step's mode."""
from __future__ import annotations

import math

import pytest
import torch

from engine_util import generate, generate_together, greedy, load_engine
from nanoqwen.engine import SamplingParams
from nanoqwen.runner import runner
from nanoqwen.sampler import (
    TOP_K_CANDIDATES,
    LogitAdjust,
    Penalties,
    SamplingRows,
    apply_adjust,
    apply_penalties,
    filter_logits,
    sample,
    token_bitmask,
)
from ops.cpu import build
from ops.cpu import sample as cpu_sample
from sampler_util import adjusted_batch, penalised_batch, rows, sample_with_torch_penalties
from sampling_reference import chi2_critical

pytestmark = pytest.mark.skipif(build.unavailable() is not None, reason=f"{build.unavailable()}")


@pytest.fixture
def use(monkeypatch):
    """use(backend): `sample` runs the C kernel ("kernel") or the torch sampler ("torch") on the CPU."""
    assert cpu_sample.KERNEL.build(), cpu_sample.KERNEL.error

    def switch(backend: str) -> None:
        monkeypatch.setattr(cpu_sample.KERNEL, "ready", backend == "kernel")

    switch("kernel")
    return switch


# One row per filter and combination: (temperature, top_p, top_k, min_p).
SETTINGS = [
    (1.0, 1.0, 0, 0.0), (0.7, 0.95, 20, 0.0), (0.7, 0.95, 0, 0.0), (1.0, 1.0, 0, 0.05), (1.3, 0.5, 100, 0.0),
    (0.5, 0.01, 0, 0.0), (1.0, 0.999, 0, 0.1), (0.7, 0.9, 1000, 0.0), (2.0, 0.95, 0, 0.01), (0.3, 0.8, 300, 0.0),
    (1.0, 1.0, 64, 0.2), (0.7, 0.6, 3000, 0.02), (0.0, 0.9, 20, 0.0), (1e-6, 1.0, 0, 0.0),
]


def settings_rows(step: int, seed: int) -> SamplingRows:
    t, p, k, m = zip(*SETTINGS)
    return rows(len(SETTINGS), step, seeds=[seed * 100 + i for i in range(len(SETTINGS))],
                temperature=list(t), top_p=list(p), top_k=list(k), min_p=list(m))


@pytest.mark.parametrize("vocab", [37, 4000, 151936])
@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0])
def test_kernel_samples_the_torch_samplers_tokens(use, vocab, scale):
    """Distinct logits (no exact ties): on these seeds no race or filter cut is within rounding of a
    tie, so the kernel's own logs and sums give the torch sampler's tokens, every row and step."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(len(SETTINGS), vocab, generator=g) * scale
    logits[3, ::3] = float("-inf")  # a grammar's mask
    for step in range(3):
        r = settings_rows(step, seed=vocab)
        use("kernel")
        ours = sample(logits, r, "filter")
        use("torch")
        assert torch.equal(ours, sample(logits, r, "filter")), step
        assert logits.gather(1, ours.unsqueeze(1)).isfinite().all()


def test_a_row_samples_the_same_whatever_its_batch_mates_and_mode(use):
    torch.manual_seed(1)
    logits = torch.randn(len(SETTINGS), 3000) * 2
    for step in range(10):
        together = sample(logits, settings_rows(step, seed=3), "filter")
        for i in range(len(SETTINGS)):
            alone = settings_rows(step, seed=3)[i:i + 1]
            modes = ["filter"] + (["top_k"] if 0 < alone.top_k.item() <= TOP_K_CANDIDATES else [])
            modes += ["sample"] if not bool(alone.filtered) else []
            mate = torch.randn(1, 3000)
            for mode in modes:
                assert sample(logits[i:i + 1], alone, mode) == together[i], (step, i, mode)
                padded = SamplingRows(*(torch.cat([getattr(alone, f), getattr(alone, f)]) for f in
                                        ("temperature", "top_p", "top_k", "min_p", "keys", "steps")))
                assert sample(torch.cat([mate, logits[i:i + 1]]), padded, mode)[1] == together[i]


@pytest.mark.parametrize("setting", [(1.0, 1.0, 0, 0.0), (0.7, 1.0, 5, 0.0), (0.8, 0.7, 0, 0.0), (1.2, 1.0, 0, 0.15),
                                     (1.0, 0.9, 8, 0.05)])
def test_kernel_follows_the_filtered_distribution(use, setting):
    """Chi-square of 6000 draws against softmax(filter(logits / T)) over 12 tokens."""
    temperature, top_p, top_k, min_p = setting
    logits = torch.linspace(-2.0, 1.5, 12)[torch.randperm(12, generator=torch.Generator().manual_seed(2))].unsqueeze(0)
    one = rows(1, temperature=[temperature], top_p=[top_p], top_k=[top_k], min_p=[min_p])
    probs = filter_logits(logits / temperature, one).softmax(-1)[0]
    draws = 6000
    counts = torch.zeros(12)
    for step in range(draws):
        one.steps.fill_(step)
        counts[sample(logits, one, "filter")] += 1
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    expected = probs[kept] * draws
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    assert chi2 < chi2_critical(int(kept.sum()) - 1, z=3.72), (counts, expected)  # p = 1e-4


def test_filter_edges(use):
    torch.manual_seed(3)
    logits = torch.randn(1, 5000) * 2
    order = logits[0].argsort(descending=True)
    for step in range(30):
        # top_p 1.0 keeps the whole top-k; a tiny top_p or top-k 1 keeps the maximum alone
        token = sample(logits, rows(1, step, top_k=[40], top_p=[1.0]), "filter")
        assert token in order[:40]
        for kw in ({"top_p": [1e-6]}, {"top_k": [1]}, {"min_p": [1.0]}):
            assert sample(logits, rows(1, step, **kw), "filter") == order[0]
    hits = {sample(logits, rows(1, step, top_k=[40], top_p=[1.0]), "filter").item() for step in range(300)}
    assert len(hits) > 20  # top_p 1.0 cut nothing within the top-k


def test_banned_tokens_never_win(use):
    """-inf logits (a grammar's mask, a -100 bias pushed to -inf) are never sampled, whatever the filters,
    even when nearly every token is banned."""
    vocab = 151936
    logits = torch.randn(4, vocab)
    allowed = [7, 151935, 4096]
    bitmask = torch.zeros(4, (vocab + 31) // 32, dtype=torch.int32)
    for token in allowed:
        bitmask[:, token // 32] |= 1 << (token % 32)
    adjust = LogitAdjust(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                         torch.arange(4), bitmask)
    for step in range(20):
        r = rows(4, step, temperature=[1.0, 0.7, 2.0, 1.0], top_p=[1.0, 0.95, 1.0, 0.99], top_k=[0, 20, 0, 5000],
                 min_p=[0.0, 0.0, 1e-9, 0.0])
        for mode in ("sample", "filter"):
            assert all(t in allowed for t in sample(logits, r, mode, adjust=adjust).tolist())
    only = torch.full((2, vocab), float("-inf"))
    only[:, 123] = -50.0
    assert sample(only, rows(2, top_p=[1.0, 0.5], min_p=[0.0, 0.3]), "filter").eq(123).all()


@pytest.mark.parametrize("vocab", [37, 4001, 151936])
def test_kernel_adjusts_rows_as_apply_adjust(use, vocab):
    """The kernel applies the biases and masks itself (to a copy of each row they touch): the tokens it samples on
    apply_adjust's logits, greedy (torch.argmax's, ties included) and seeded in every filter, and the logits it
    was given untouched."""
    logits, adjust = adjusted_batch(vocab)
    given = logits.clone()
    reference = apply_adjust(logits, adjust)
    greedy = sample(logits, rows(8, temperature=[0.0] * 8), "greedy", adjust=adjust)
    assert torch.equal(greedy, reference.argmax(-1))
    assert greedy[2:5].tolist() == [3, 10, 0] and greedy[1] == vocab - 1  # the ties' first; all masked: token 0
    for step in range(4):
        r = rows(8, step, temperature=[1.0, 0.7, 1.0, 0.5, 1.0, 0.0, 1.3, 0.7], top_p=[1, 0.95, 1, 1, 0.9, 1, 0.8, 1],
                 top_k=[0, 20, 0, 2, 0, 0, 300, 0], min_p=[0, 0, 0.05, 0, 0.05, 0, 0, 0])
        tokens = sample(logits, r, "filter", adjust=adjust)
        assert torch.equal(tokens, sample(reference, r, "filter")), step
        finite = reference.gather(1, tokens.unsqueeze(1)).isfinite().flatten().tolist()
        assert finite == [True] * 4 + [False] + [True] * 3  # row 4: no token allowed
        assert tokens[4] == 0  # there greedy's token (min_p's window held none: it was the scratch's last one)
    assert torch.equal(logits, given)


@pytest.mark.parametrize("vocab", [37, 4001, 151936])
def test_kernel_penalises_rows_as_apply_penalties(use, vocab):
    """The kernel applies the penalties itself (to a copy of each penalised row), then the biases and masks: the
    tokens it samples on apply_penalties' then apply_adjust's logits, greedy (torch's argmax, as the torch sampler
    gives) and seeded in every filter, and the logits it was given untouched."""
    logits, penalties = penalised_batch(vocab)
    # row 4 also masked (its maximum, token 1, allowed) and biased; row 6 biased only
    adjust = LogitAdjust(torch.tensor([4, 4, 6]), torch.tensor([2, 3, 1]), torch.tensor([-1.0, 0.5, 0.25]),
                         torch.tensor([4]), token_bitmask([1, 2, 3, vocab - 1], vocab).unsqueeze(0))
    given = logits.clone()
    reference = apply_adjust(apply_penalties(logits, penalties), adjust)
    greedy = sample(logits, rows(8, temperature=[0.0] * 8), "greedy", penalties, adjust)
    assert torch.equal(greedy, reference.argmax(-1))
    assert greedy[:7].tolist() == [2, 2, 6, 1, 1, 2, 1]  # penalties moved rows 0-2 and 5 off their maximum, token 1
    use("torch")
    assert torch.equal(sample(logits, rows(8, temperature=[0.0] * 8), "greedy", penalties, adjust), greedy)
    use("kernel")
    for step in range(4):
        r = rows(8, step, temperature=[1.0, 0.7, 1.0, 0.5, 1.0, 0.3, 1.3, 0.7], top_p=[1, 0.95, 1, 1, 0.9, 1, 0.8, 1],
                 top_k=[0, 20, 0, 2, 0, 0, 300, 0], min_p=[0, 0, 0.05, 0, 0.05, 0, 0, 0])
        tokens = sample(logits, r, "filter", penalties, adjust)
        assert torch.equal(tokens, sample(reference, r, "filter")), step
    assert torch.equal(logits, given)


def test_kernel_rounds_the_frequency_product_as_torch(use):
    """logit - frequency x count with the product rounded to fp32 first, as torch's two operations (a fused
    multiply-subtract rounds once: here 1 ulp higher, above the tie with token 2 set to torch's value)."""
    logits = torch.full((1, 16), -1.0)
    logits[0, 5] = 2.2132716
    p = Penalties(torch.zeros(1), torch.tensor([0.3]), torch.ones(1), torch.tensor([0]), torch.tensor([5]),
                  torch.tensor([7.0]))
    logits[0, 2] = apply_penalties(logits, p)[0, 5]
    assert sample(logits, rows(1, temperature=[0.0]), "greedy", p) == 2


def test_engine_penalises_as_apply_penalties_before_the_kernel(use, tiny_checkpoint, monkeypatch):
    """fp32 engine, one batch: penalised rows (greedy and seeded; prompts that repeat tokens; one with a logit_bias)
    beside plain ones give the same tokens with the kernel penalising them as with apply_penalties in torch before
    the kernel (the path before it), the greedy ones also the torch sampler's; the penalties change tokens."""
    prompts = [[7] * 17, [42, 43] * 8, list(range(1000, 1037)), [9707, 1879, 11, 358, 1079], [100, 200, 300] * 3]
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=3, max_tokens=16, ignore_eos=True,
                            presence_penalty=1.0, frequency_penalty=0.7, repetition_penalty=1.2)
    batch = [greedy(16, repetition_penalty=1.8), greedy(16, presence_penalty=1.5, frequency_penalty=0.5), seeded,
             greedy(16), greedy(16, repetition_penalty=0.7, frequency_penalty=-0.3, logit_bias={300: 0.5})]
    engine = load_engine(tiny_checkpoint, max_batch=len(batch))
    ours = generate_together(engine, prompts, batch)

    monkeypatch.setattr(runner, "sample", sample_with_torch_penalties)
    assert generate_together(engine, prompts, batch) == ours
    monkeypatch.setattr(runner, "sample", sample)
    use("torch")
    torch_sampler = generate_together(engine, prompts, batch)
    assert [torch_sampler[i] for i in (0, 1, 3, 4)] == [ours[i] for i in (0, 1, 3, 4)]
    plain = generate_together(engine, prompts[:2], [greedy(16)] * 2)
    assert ours[0] != plain[0] and ours[1] != plain[1]


@pytest.mark.parametrize("vocab", [37, 4001])
@pytest.mark.parametrize("scratches", [1, 2])
def test_rows_stay_within_their_scratch(use, monkeypatch, vocab, scratches):
    """Every row's working memory is its row scratch (sample_scratch_bytes' size, one per thread at once): the largest
    filter window (every token tied at the maximum: all of them sorted, then cut by top-p or min-p), a small top-k's
    stream and adjusted rows (penalised, biased, masked) sample as the torch sampler does, and the bytes past the
    scratch are never written."""
    size = cpu_sample.scratch_bytes(vocab, scratches)
    memory = torch.full((size + 32 * vocab + 4096,), 0xA5, dtype=torch.uint8)  # past a row scratch: no crash
    monkeypatch.setattr(cpu_sample, "_scratch", cpu_sample._Scratch(memory[:size], vocab))
    logits, penalties = penalised_batch(vocab)
    logits[3] = 1.0
    _, adjust = adjusted_batch(vocab)
    r = rows(8, 1, temperature=[1.0, 0.7, 1.0, 0.5, 1.0, 0.0, 1.3, 0.7], top_p=[1, 0.95, 1, 0.5, 0.9, 1, 0.8, 1],
             top_k=[0, 20, 0, 0, 0, 0, 300, 5], min_p=[0, 0, 0.05, 0, 0.05, 0, 0, 0.1])
    for p, a in ((None, None), (penalties, None), (penalties, adjust)):
        tokens = sample(logits, r, "filter", p, a)
        use("torch")
        assert torch.equal(tokens, sample(logits, r, "filter", p, a))
        use("kernel")
    assert bool((memory[size:] == 0xA5).all())


def test_a_scratch_too_small_for_a_row_raises(use, monkeypatch):
    """A scratch short of one row's (which `reserve` never leaves) samples no row: the kernel's status raises, never a
    token read from memory the kernel did not write."""
    vocab = 4001
    memory = torch.zeros(cpu_sample.scratch_bytes(vocab, 1) - 64, dtype=torch.uint8)
    monkeypatch.setattr(cpu_sample, "_scratch", cpu_sample._Scratch(memory, vocab))
    with pytest.raises(MemoryError, match="sample_rows"):
        sample(torch.randn(2, vocab), rows(2, 1, temperature=[1.0, 0.7]), "sample")
    monkeypatch.setattr(cpu_sample, "_scratch", cpu_sample._Scratch(memory[:0], vocab))  # none at all: the same
    with pytest.raises(MemoryError, match="sample_rows"):
        sample(torch.randn(1, vocab), rows(1, 1, temperature=[1.0]), "sample")


def test_engine_reserves_the_kernels_scratch_at_setup(use, tiny_checkpoint, hf, monkeypatch):
    """The engine reserves the kernel's scratch (a row scratch for each of its threads, for its vocabulary) when it is
    set up: its steps, penalised, biased and filtered, run with `reserve` failing; a failure there fails the load.
    The kernel adjusts a copy of each row, never the logits: a penalised row's logprobs are the model's own,
    transformers' log_softmax, though the penalty chose other tokens than the model's greedy ones."""
    monkeypatch.setattr(cpu_sample, "_scratch", cpu_sample._Scratch(torch.empty(0, dtype=torch.uint8), 0))
    engine = load_engine(tiny_checkpoint, max_batch=4)
    vocab = engine.runner.config.vocab_size
    assert cpu_sample._scratch.vocab_size == vocab
    assert cpu_sample._scratch.memory.numel() == cpu_sample.scratch_bytes(vocab, torch.get_num_threads())

    def reserve(vocab_size: int) -> None:
        raise MemoryError("the sampler's scratch")

    monkeypatch.setattr(cpu_sample, "reserve", reserve)
    prompt = [7] * 17
    penalised = greedy(8, repetition_penalty=1.8, logprobs=True)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, min_p=0.01, seed=3, max_tokens=8, ignore_eos=True,
                            presence_penalty=1.0, frequency_penalty=0.7, logit_bias={300: 0.5})
    result, sampled = generate(engine, [prompt], penalised)[0], generate(engine, [prompt], seeded)[0]
    assert result.error is None and sampled.error is None and len(sampled.choices[0].token_ids) == 8
    tokens = result.choices[0].token_ids
    with torch.no_grad():
        model = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
    assert tokens != model.argmax(-1).tolist()
    for step, lp in enumerate(result.choices[0].logprobs):
        assert lp.logprob == pytest.approx(model[step, tokens[step]].item(), abs=1e-4), step
    with pytest.raises(MemoryError, match="scratch"):
        load_engine(tiny_checkpoint, max_batch=4)


def test_greedy_rows_take_torchs_argmax(use):
    logits = torch.randn(3, 1000)
    logits[1, [10, 500]] = 9.0  # a tie: the first index, as torch.argmax
    tokens = sample(logits, rows(3, temperature=[0.0, 0.0, 1.0]), "sample")
    assert tokens[:2].tolist() == [logits[0].argmax().item(), 10]


@pytest.mark.slow
def test_compiled_sampler_calls_the_kernel(use):
    """torch.compile (fullgraph, as the compiled decode step) runs the same kernel as eager code."""
    torch.manual_seed(5)
    logits = torch.randn(len(SETTINGS), 4000) * 3
    r = settings_rows(step=2, seed=4)
    compiled = torch.compile(sample, fullgraph=True)
    for mode in ("top_k", "sample", "filter"):
        assert torch.equal(compiled(logits, r, mode), sample(logits, r, mode))


@pytest.mark.parametrize("vocab", [37, 4000, 151936])
def test_greedy_is_torch_argmax(use, vocab):
    """The CPU greedy mode runs the kernel's argmax: torch.argmax's tokens, the first of tied maxima included."""
    torch.manual_seed(vocab)
    logits = torch.randn(5, vocab)
    logits[1, 3] = logits[1, vocab - 1] = logits[1].max() + 1  # a tie: the first wins
    logits[2] = -math.inf  # every token masked (a grammar's dead end): token 0, as torch gives
    logits[3, vocab - 1] = 100.0  # the last token, past the last whole vector of 8 when vocab % 8
    expected = logits.argmax(dim=-1)
    assert torch.equal(cpu_sample.argmax_rows_cpu(logits), expected)
    assert torch.equal(sample(logits, rows(5, temperature=[0.0] * 5), "greedy"), expected)


@pytest.mark.parametrize("vocab", [37, 151936])
def test_greedy_reads_bf16_logits_as_they_are(use, vocab):
    """A greedy step's argmax reads the LM head's bf16 logits, no fp32 copy made: the tokens of their widening's
    argmax, ties (the first wins), an all -inf row (token 0) and a last token past the whole vectors included; NaNs
    as the fp32 kernel takes them (never the maximum; an all-NaN row token 0)."""
    torch.manual_seed(vocab)
    logits = (torch.randn(7, vocab) * 4).bfloat16()
    logits[1, 3] = logits[1, vocab - 1] = logits[1].max() + 1
    logits[2] = -math.inf
    logits[3, vocab - 1] = 100.0
    logits[4, :vocab // 2] = logits[4].max()  # bf16's coarse values: many ties
    logits[5, 0] = logits[5, vocab // 2] = logits[5, vocab - 1] = math.nan
    logits[6] = math.nan
    expected = logits[:5].float().argmax(dim=-1)
    widened = cpu_sample.argmax_rows_cpu(logits.float())
    assert torch.equal(widened[:5], expected) and widened[6] == 0
    assert widened[5] == logits[5].float().nan_to_num(-math.inf).argmax()
    assert torch.equal(cpu_sample.argmax_rows_cpu(logits), widened)
    assert torch.equal(sample(logits, rows(7, temperature=[0.0] * 7), "greedy"), widened)
    with pytest.raises(ValueError, match="float16"):
        cpu_sample.argmax_rows_cpu(logits.half())


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_greedy_rows_split_over_threads_are_torch_argmax(batch):
    """argmax_rows gives the pool a row a chunk (batch 1's stays on the caller): each row's first maximum, ties
    included, as on one thread."""
    torch.manual_seed(batch)
    logits = torch.randn(batch, 151936)
    logits[:, [7, 151935]] = logits.max() + 1  # a tie in every row: the first wins
    logits[-1, 100_000] = math.inf
    before = torch.get_num_threads()
    try:
        tokens = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tokens.append(cpu_sample.argmax_rows_cpu(logits))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(tokens[0], logits.argmax(dim=-1)) and torch.equal(tokens[1], tokens[0])


def test_top_p_0_keeps_the_most_likely_token_alone(use):
    """OpenAI's top_p 0 (the API takes it): only the maximum survives, in the kernel and the torch sampler, with
    and without a top-k or min-p beside it, in every mode that serves the rows; a tie at the top (common in bf16
    logits) goes to the lowest id, as greedy's."""
    torch.manual_seed(5)
    logits = torch.randn(3, 151936) * 3
    for row, ids in enumerate(([90000, 100, 150000], [7100, 151935], [20, 21, 22, 140000])):
        logits[row, ids] = logits[row].max() + 1
    for backend in ("kernel", "torch"):
        use(backend)
        for step in range(10):
            r = rows(3, step, temperature=[1.0, 2.0, 0.5], top_p=[0.0] * 3, top_k=[0, 20, 5000], min_p=[0, 0, 0.1])
            assert torch.equal(sample(logits, r, "filter"), logits.argmax(-1)), (backend, step)
            small = rows(2, step, temperature=[1.0, 2.0], top_p=[0.0] * 2, top_k=[20, 3])
            assert torch.equal(sample(logits[:2], small, "top_k"), logits[:2].argmax(-1)), (backend, step)
