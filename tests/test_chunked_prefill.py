"""Chunked prefill mixed with decode under a step token budget, against transformers: prompts split
across steps off block boundaries, decode rows beside prefill chunks, prefix hits, n choices,
preemption and aborts mid-prefill."""
from __future__ import annotations

import pytest
import torch

from engine_util import collect, engine_step, generate, greedy, hf_greedy, load_engine, run
from nanoqwen.engine import EngineConfig, SamplingParams
from nanoqwen.engine.scheduler import Batch

BUDGET = 7  # tokens a step: chunks end off the 16-token block boundaries
PROMPTS = [
    [9707, 1879, 11, 358, 1079],
    list(range(1000, 1037)),  # crosses two block boundaries
    [42] * 16,
    list(range(5000, 5100, 3)),
]


def chunked_engine(checkpoint, **overrides):
    return load_engine(checkpoint, **{"max_batch": 4, "max_step_tokens": BUDGET, **overrides})


def record_batches(engine) -> list[list[tuple[int, int, int]]]:
    """Every step's rows from now on as (sequence id, tokens, uncomputed tokens before the step)."""
    steps: list[list[tuple[int, int, int]]] = []
    schedule = engine.scheduler.schedule

    def recording() -> Batch:
        batch = schedule()
        steps.append([(id(seq), n, seq.num_uncomputed_tokens) for seq, n in batch.rows])
        return batch

    engine.scheduler.schedule = recording
    return steps


def test_budget_must_leave_room_for_a_chunk():
    with pytest.raises(ValueError, match="max_step_tokens"):
        EngineConfig(max_batch=8, max_step_tokens=8)
    assert EngineConfig.from_env({"NANOQWEN_MAX_STEP_TOKENS": "0"}).max_step_tokens == 0
    assert EngineConfig(max_batch=8).max_step_tokens == 512
    assert EngineConfig(max_batch=300).max_step_tokens == 600


def test_chunked_mixed_steps_match_transformers(tiny_checkpoint, hf):
    engine = chunked_engine(tiny_checkpoint)
    steps = record_batches(engine)
    results = generate(engine, PROMPTS, greedy(12))
    for prompt, result in zip(PROMPTS, results):
        assert result.choices[0].token_ids == hf_greedy(hf, prompt, 12)
        assert result.usage.prompt_tokens == len(prompt)
    assert all(sum(n for _, n, _ in rows) <= BUDGET for rows in steps)
    assert any(n < left for rows in steps for _, n, left in rows)  # a prompt split across steps
    assert any(any(left == 1 for _, _, left in rows) and any(left > 1 for _, _, left in rows)
               for rows in steps)  # decode rows beside a chunk
    assert engine.block_manager.usage == 0.0


def test_long_prompt_chunks_off_block_boundaries(tiny_checkpoint, hf):
    engine = chunked_engine(tiny_checkpoint)
    prompt = list(range(3000, 3045))
    steps = record_batches(engine)
    [result] = generate(engine, [prompt], greedy(4, logprobs=True, top_logprobs=3))
    assert [rows[0][1] for rows in steps[:7]] == [7] * 6 + [3]  # 45 = 6 × 7 + 3, then decode
    tokens = result.choices[0].token_ids
    assert tokens == hf_greedy(hf, prompt, 4)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    for step, lp in enumerate(result.choices[0].logprobs):  # the first from the prompt's last chunk
        assert lp.logprob == pytest.approx(ref[step, tokens[step]].item(), abs=1e-4)
        assert [t.token_id for t in lp.top_logprobs] == ref[step].topk(3).indices.tolist()


def test_decode_rows_keep_running_during_a_long_prefill(tiny_checkpoint, hf):
    engine = chunked_engine(tiny_checkpoint, max_step_tokens=12)
    streams = [engine.submit(p, greedy(40))[1] for p in PROMPTS[:3]]
    engine_step(engine)
    while any(seq.num_uncomputed_tokens > 1 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine_step(engine)
    long_prompt = list(range(6000, 6098))
    steps = record_batches(engine)
    streams.append(engine.submit(long_prompt, greedy(4))[1])
    run(engine)
    prefill_steps = [rows for rows in steps if any(left > 1 for _, _, left in rows)]
    assert len(prefill_steps) == -(-98 // 9)  # 3 decode tokens + 9 prompt tokens a step
    assert all(sum(1 for _, _, left in rows if left == 1) == 3 for rows in prefill_steps)
    for stream, prompt, n in zip(streams, [*PROMPTS[:3], long_prompt], [40, 40, 40, 4]):
        assert collect(stream).choices[0].token_ids == hf_greedy(hf, prompt, n)


def test_prefix_hits_with_chunking(tiny_checkpoint, hf):
    engine = chunked_engine(tiny_checkpoint)
    system = list(range(2000, 2050))  # 3 full blocks
    first, second = system + [9707, 1879], system + [100, 200, 300]
    [a] = generate(engine, [first], greedy(6))
    [b] = generate(engine, [second], greedy(6))
    assert (a.usage.cached_tokens, b.usage.cached_tokens) == (0, 48)
    assert a.choices[0].token_ids == hf_greedy(hf, first, 6)
    assert b.choices[0].token_ids == hf_greedy(hf, second, 6)
    # Arriving while the other is mid-prefill, a request waits for its chunks, then hits their blocks.
    third, fourth = [5] * 40 + [1, 2], [5] * 40 + [3, 4]
    stream3 = engine.submit(third, greedy(6))[1]
    engine_step(engine, 3)
    stream4 = engine.submit(fourth, greedy(6))[1]
    run(engine)
    c, d = collect(stream3), collect(stream4)
    assert d.usage.cached_tokens == 32
    assert c.choices[0].token_ids == hf_greedy(hf, third, 6)
    assert d.choices[0].token_ids == hf_greedy(hf, fourth, 6)


def test_n_choices_share_the_prompt_and_sample_as_unchunked(tiny_checkpoint):
    prompt = list(range(4000, 4040))
    params = SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=8, ignore_eos=True)
    [whole] = generate(load_engine(tiny_checkpoint, max_batch=4, max_step_tokens=0), [prompt], params)
    engine = chunked_engine(tiny_checkpoint)
    [chunked] = generate(engine, [prompt], params)
    assert [c.token_ids for c in chunked.choices] == [c.token_ids for c in whole.choices]
    assert engine.stats()["prefix_cache_hits"] == 2 * 2  # choices 2 and 3 reuse 2 full blocks


def test_preemption_mid_prefill(tiny_checkpoint, hf, monkeypatch):
    # 6 usable blocks: the decoding stream's next block can only come from the prefilling one.
    engine = chunked_engine(tiny_checkpoint, max_step_tokens=9, num_kv_blocks=7, max_model_len=128)
    preempted: list[tuple[int, int]] = []
    preempt = engine.scheduler.preempt
    monkeypatch.setattr(engine.scheduler, "preempt",
                        lambda seq: (preempted.append((seq.num_computed_tokens, len(seq))), preempt(seq)))
    short, long_prompt = list(range(300, 315)), list(range(700, 770))
    first = engine.submit(short, greedy(60))[1]
    engine_step(engine, 2)
    second = engine.submit(long_prompt, greedy(5))[1]
    run(engine)
    assert any(0 < computed < length for computed, length in preempted)
    assert collect(first).choices[0].token_ids == hf_greedy(hf, short, 60)
    assert collect(second).choices[0].token_ids == hf_greedy(hf, long_prompt, 5)
    assert engine.block_manager.usage == 0.0


def test_abort_mid_prefill_keeps_only_computed_blocks(tiny_checkpoint, hf):
    engine = chunked_engine(tiny_checkpoint)
    prompt = list(range(8000, 8050))
    request_id, stream = engine.submit(prompt, greedy(4))
    engine_step(engine, 3)  # 21 of 50 tokens computed
    engine.abort(request_id)
    run(engine)
    aborted = collect(stream)
    assert aborted.choices[0].finish_reason == "abort" and aborted.choices[0].token_ids == []
    assert engine.block_manager.usage == 0.0
    [again] = generate(engine, [prompt], greedy(4))
    assert again.usage.cached_tokens == 16
    assert again.choices[0].token_ids == hf_greedy(hf, prompt, 4)


def test_budget_off_prefills_a_whole_prompt_alone(tiny_checkpoint, hf):
    engine = chunked_engine(tiny_checkpoint, max_step_tokens=0)
    first = engine.submit(PROMPTS[0], greedy(8))[1]
    engine_step(engine)
    steps = record_batches(engine)
    second = engine.submit(PROMPTS[1], greedy(4))[1]
    run(engine)
    assert [(n, left) for _, n, left in steps[0]] == [(37, 37)]  # the stream waits a step
    assert len(steps[1]) == 2
    assert collect(first).choices[0].token_ids == hf_greedy(hf, PROMPTS[0], 8)
    assert collect(second).choices[0].token_ids == hf_greedy(hf, PROMPTS[1], 4)
