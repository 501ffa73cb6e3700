"""The prompt's logprobs (`SamplingParams.prompt_logprobs`) against transformers' log_softmax, with the
logits computed in slices, past prefix-cache hits, for n choices and with no answer (max_tokens 0)."""
from __future__ import annotations

import pytest
import torch

from engine_util import collect, engine_step, generate, greedy, hf_greedy, load_engine, run
from nanoqwen.engine.validation import InvalidRequest
from nanoqwen.runner import prompt_logprobs

PROMPT = list(range(1000, 1037))  # crosses two block boundaries
K = 3


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load_engine(tiny_checkpoint)


def reference(hf, prompt: list[int]) -> torch.Tensor:
    """transformers' log_softmax at positions 0 .. P-2 (each scoring the next prompt token): [P-1, V]."""
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


def check(scored, prompt: list[int], ref: torch.Tensor, engine) -> None:
    assert scored.first_token == engine.token_bytes.piece(prompt[0])
    assert [t.token_id for t in scored.tokens] == prompt[1:]
    for i, lp in enumerate(scored.tokens):
        assert lp.logprob == pytest.approx(ref[i, prompt[i + 1]].item(), abs=1e-4)
        top = ref[i].topk(K)
        assert [t.token_id for t in lp.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_in_slices_match_transformers(engine, hf, monkeypatch):
    monkeypatch.setattr(prompt_logprobs, "SLICE", 5)  # 36 scored positions: 8 slices, the last short
    model, rows = engine.runner.model, []
    compute_logits = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        rows.append(len(hidden))
        return compute_logits(hidden)

    monkeypatch.setattr(model, "compute_logits", recording)
    [result] = generate(engine, [PROMPT], greedy(3, prompt_logprobs=K))
    assert max(rows) == 5 and sum(rows) == len(PROMPT) - 1 + 3  # the slices, then a row per sampled token
    check(result.choices[0].prompt_logprobs, PROMPT, reference(hf, PROMPT), engine)
    # the answer is the same as without them
    [plain] = generate(engine, [PROMPT], greedy(3))
    assert result.choices[0].token_ids == plain.choices[0].token_ids and plain.choices[0].prompt_logprobs is None


def test_cached_prompt_is_recomputed_and_choices_share_the_scores(engine, hf):
    prompt = list(range(3000, 3040))
    generate(engine, [prompt], greedy(2))  # its full blocks are now cached
    [result] = generate(engine, [prompt], greedy(2, prompt_logprobs=K, n=2))
    assert result.usage.cached_tokens == 0
    ref = reference(hf, prompt)
    for choice in result.choices:
        check(choice.prompt_logprobs, prompt, ref, engine)
    assert result.choices[0].token_ids == result.choices[1].token_ids


def test_ranks_only_when_asked_for(engine, hf):
    """vLLM's rank (how many logprobs are >= the token's) with prompt_ranks, within transformers' rounding (1e-4);
    none otherwise (echo's logprobs do not pay for the extra pass)."""
    prompt = PROMPT[:12]
    ref = reference(hf, prompt)
    [ranked] = generate(engine, [prompt], greedy(1, prompt_logprobs=1, prompt_ranks=True))
    for i, lp in enumerate(ranked.choices[0].prompt_logprobs.tokens):
        own = ref[i, prompt[i + 1]].item()
        assert int((ref[i] > own + 1e-4).sum()) < lp.rank <= int((ref[i] >= own - 1e-4).sum())
    [plain] = generate(engine, [prompt], greedy(1, prompt_logprobs=1))
    assert {lp.rank for lp in plain.choices[0].prompt_logprobs.tokens} == {None}


def test_max_tokens_zero_scores_the_prompt_only(engine, hf):
    prompt = PROMPT[:9]
    [result] = generate(engine, [prompt], greedy(0, prompt_logprobs=0))
    (choice,) = result.choices
    assert choice.token_ids == [] and choice.finish_reason == "length" and result.usage.completion_tokens == 0
    assert all(lp.top_logprobs == [] for lp in choice.prompt_logprobs.tokens)
    assert [lp.logprob for lp in choice.prompt_logprobs.tokens] == pytest.approx(
        reference(hf, prompt).gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist(), abs=1e-4)
    [single] = generate(engine, [prompt[:1]], greedy(1, prompt_logprobs=2))  # nothing to score
    assert single.choices[0].prompt_logprobs.tokens == [] and len(single.choices[0].token_ids) == 1
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine.submit(prompt, greedy(0))


def test_prompt_scored_chunk_by_chunk_and_once_after_preemption(tiny_checkpoint, hf):
    """With chunked prefill each chunk scores its positions; a preemption mid-prompt recomputes the
    prompt without scoring its positions twice."""
    engine = load_engine(tiny_checkpoint, max_batch=4, max_step_tokens=7)  # 36 positions: 6 chunks
    stream = engine.submit(PROMPT, greedy(3, prompt_logprobs=K))[1]
    engine_step(engine, 3)
    [seq] = engine.scheduler.running
    assert 0 < len(seq.request.prompt_logprobs.tokens) < len(PROMPT) - 1  # part-way through its prompt
    engine.scheduler.preempt(seq)
    run(engine)
    result = collect(stream)
    check(result.choices[0].prompt_logprobs, PROMPT, reference(hf, PROMPT), engine)
    assert result.choices[0].token_ids == hf_greedy(hf, PROMPT, 3)
