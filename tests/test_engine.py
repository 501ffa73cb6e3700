"""The runtime core against transformers: greedy equality, batching, prefix cache, preemption,
sampling, stop strings, aborts."""
from __future__ import annotations

import os
import random
import time

import pytest
import torch

from checkpoints import load_hf_model, make_checkpoint
from engine_util import (
    collect,
    engine_step,
    generate,
    generate_together,
    greedy,
    hf_greedy,
    load_engine,
    odd_text,
    run,
    started_engine,
)
from nanoqwen.engine import Engine, EngineConfig, SamplingParams
from nanoqwen.engine.engine import PromptTooLongError, QueueFullError, ShuttingDownError
from nanoqwen.engine.stream import EventStream
from nanoqwen.engine.validation import InvalidRequest

PROMPTS = [
    [9707, 1879, 11, 358, 1079],  # "Hello world, I am"
    [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198],  # ChatML turn
    list(range(1000, 1037)),  # crosses two block boundaries
    [42] * 16,  # exactly one block
    [7] * 17,  # a block + 1
    [100, 200, 300],
    list(range(5000, 5100, 3)),
    [151643],
]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return load_engine(tiny_checkpoint)


@pytest.fixture(scope="module")
def references(hf):
    return [hf_greedy(hf, p, 24) for p in PROMPTS]


def test_single_request_matches_transformers(engine, references):
    for prompt, ref in zip(PROMPTS[:4], references):
        [result] = generate(engine, [prompt], greedy(24))
        assert result.choices[0].token_ids == ref
        assert result.choices[0].finish_reason == "length"
        assert result.usage.prompt_tokens == len(prompt)
        assert result.usage.completion_tokens == 24


def test_concurrent_requests_joining_at_different_steps(engine, references):
    """8 requests of different lengths; each joins while the earlier ones are mid-decode."""
    streams = []
    for prompt in PROMPTS:
        streams.append(engine.submit(prompt, greedy(24))[1])
        engine_step(engine, 3)  # a prefill step, then decode steps with the batch so far
    run(engine)
    for stream, ref in zip(streams, references):
        assert collect(stream).choices[0].token_ids == ref


def test_logprobs_match_transformers(engine, hf):
    prompt = PROMPTS[0]
    [result] = generate(engine, [prompt], greedy(6, logprobs=True, top_logprobs=5))
    tokens = result.choices[0].token_ids
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    ref = logits.log_softmax(-1)
    for step, lp in enumerate(result.choices[0].logprobs):
        assert lp.token_id == tokens[step]
        assert lp.logprob == pytest.approx(ref[step, tokens[step]].item(), abs=1e-4)
        top = ref[step].topk(5)
        assert [t.token_id for t in lp.top_logprobs] == top.indices.tolist()
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert bytes(lp.bytes) == engine.token_bytes.bytes(lp.token_id)


def test_prefix_cache_hits_give_identical_output(tiny_checkpoint, hf):
    engine = load_engine(tiny_checkpoint)
    system = list(range(2000, 2050))  # 3 full blocks of a shared "system prompt"
    first = system + [9707, 1879]
    second = system + [100, 200, 300]
    [a] = generate(engine, [first], greedy(10))
    [b] = generate(engine, [second], greedy(10))
    assert a.usage.cached_tokens == 0
    assert b.usage.cached_tokens == 48
    assert b.choices[0].token_ids == hf_greedy(hf, second, 10)
    # a multi-turn resend: prompt + the answer + a new turn reuses the answer's full blocks too
    resend = first + a.choices[0].token_ids + [13, 14, 15]
    [c] = generate(engine, [resend], greedy(5))
    assert c.usage.cached_tokens == (len(first) + 10 - 1) // 16 * 16
    assert c.choices[0].token_ids == hf_greedy(hf, resend, 5)
    stats = engine.stats()
    assert stats["prefix_cache_hits"] > 0 and 0 < stats["prefix_cache_hit_rate"] < 1
    # vLLM's counts, in tokens: every hit block's, and the tokens of the full prompt blocks looked up
    assert stats["prefix_cache_hit_tokens"] == b.usage.cached_tokens + c.usage.cached_tokens
    assert stats["prefix_cache_queried_tokens"] == sum((len(p) - 1) // 16 * 16 for p in (first, second, resend))


def test_steps_are_counted_in_vllms_iteration_buckets(tiny_checkpoint):
    """Each step's tokens in the bucket of vLLM's iteration_tokens_total bounds that holds them, and their sum: a
    20-token prompt's prefill (<= 32) and 4 decode steps (<= 1) for 5 tokens."""
    engine = load_engine(tiny_checkpoint, enable_prefix_caching=False)
    generate(engine, [list(range(100, 120))], greedy(5))
    stats = engine.stats()
    assert stats["step_buckets"] == [4, 0, 0, 1] + [0] * 10 and stats["step_tokens"] == 24


def test_prefix_cache_rejects_hash_collisions(tiny_checkpoint, hf):
    engine = load_engine(tiny_checkpoint)
    blocks = engine.block_manager
    prompt = list(range(3000, 3040))
    generate(engine, [prompt], greedy(2))
    # Corrupt the recorded tokens of the cached first block: equality must reject the hit.
    first_block = blocks.hash_to_block[hash((None, tuple(prompt[:16])))]
    blocks.block_tokens[first_block] = tuple([0] * 16)
    [result] = generate(engine, [prompt], greedy(4))
    assert result.usage.cached_tokens == 0
    assert result.choices[0].token_ids == hf_greedy(hf, prompt, 4)


def test_preemption_under_a_tiny_pool(tiny_checkpoint, references):
    # 9 usable blocks (144 tokens) for 8 requests that need up to 61 tokens each.
    engine = load_engine(tiny_checkpoint, num_kv_blocks=10, max_model_len=128)
    results = generate(engine, PROMPTS, greedy(24))
    assert engine.scheduler.preemptions > 0
    for result, ref in zip(results, references):
        assert result.choices[0].token_ids == ref
    assert engine.block_manager.usage == 0.0


def test_seeded_sampling_is_independent_of_the_batch(engine):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    [alone] = generate(engine, [PROMPTS[2]], params)
    others = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.5, min_p=0.05, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.7, presence_penalty=1.0, frequency_penalty=0.5, max_tokens=18, ignore_eos=True),
    ]
    streams = [engine.submit(PROMPTS[i], p)[1] for i, p in enumerate(others)]
    seeded = engine.submit(PROMPTS[2], params)[1]
    run(engine)
    assert collect(seeded).choices[0].token_ids == alone.choices[0].token_ids
    assert all(collect(s).choices[0].token_ids for s in streams)
    [again] = generate(engine, [PROMPTS[2]], params)
    assert again.choices[0].token_ids == alone.choices[0].token_ids
    [other_seed] = generate(engine, [PROMPTS[2]], SamplingParams(**{**params.__dict__, "seed": 99}))
    assert other_seed.choices[0].token_ids != alone.choices[0].token_ids


def test_seeded_choices_are_the_same_after_preemption_and_in_chunked_prefill(tiny_checkpoint, engine):
    """vLLM's per-request generator semantics: a seeded request's tokens are those it gets alone, also when it is
    preempted and recomputed (9 usable blocks for 8 requests) and its prompt prefilled in chunks beside decoding rows
    (a 9-token step budget); n = 2 choices differ and each repeats; penalised, filtered and plain sampling alike."""
    kinds = [
        dict(temperature=0.9, top_p=0.9, top_k=50),
        dict(temperature=1.2, min_p=0.05, n=2),
        dict(temperature=0.7, presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.3),
        dict(temperature=1.0, logit_bias={1000: 3.0, 1001: 2.0}),
    ]
    params = [SamplingParams(seed=40 + i, max_tokens=24, ignore_eos=True, **kinds[i % len(kinds)])
              for i in range(len(PROMPTS))]
    alone = [[c.token_ids for c in generate(engine, [prompt], p)[0].choices] for prompt, p in zip(PROMPTS, params)]
    tight = load_engine(tiny_checkpoint, num_kv_blocks=10, max_model_len=128, max_step_tokens=9)
    streams = [tight.submit(prompt, p)[1] for prompt, p in zip(PROMPTS, params)]
    run(tight)
    together = [[c.token_ids for c in collect(s, p.n).choices] for s, p in zip(streams, params)]
    assert tight.scheduler.preemptions > 0
    assert together == alone
    assert all(len(set(map(tuple, choices))) == len(choices) for choices in alone)  # n = 2: distinct choices


def test_repetition_penalty_matches_transformers(engine, hf):
    """Greedy with a repetition penalty on every prompt and output token, as transformers applies it;
    in a batch with an unpenalised request, which must keep its plain greedy tokens."""
    prompts = [[7] * 17, list(range(1000, 1037))]
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.8, max_tokens=16, ignore_eos=True)
    plain, *outputs = generate_together(engine, [PROMPTS[0], *prompts], [greedy(16), penalised, penalised])
    for prompt, tokens in zip(prompts, outputs):
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False, repetition_penalty=1.8,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt):].tolist()
        assert tokens == expected
    assert plain == hf_greedy(hf, PROMPTS[0], 16)


def test_n_choices_share_the_prompt(engine):
    prompt = list(range(4000, 4040))
    before = engine.stats()["prefix_cache_hits"]
    [result] = generate(engine, [prompt], SamplingParams(temperature=1.0, n=3, seed=5, max_tokens=8, ignore_eos=True))
    outputs = [c.token_ids for c in result.choices]
    assert all(len(o) == 8 for o in outputs)
    assert len({tuple(o) for o in outputs}) == 3
    assert engine.stats()["prefix_cache_hits"] - before == 2 * 2  # choices 2 and 3 reuse 2 full blocks
    assert result.usage.completion_tokens == 24


def test_max_tokens_absent_runs_to_the_context_limit(tiny_checkpoint):
    engine = load_engine(tiny_checkpoint, max_model_len=40)
    [result] = generate(engine, [PROMPTS[0]], SamplingParams(temperature=0.0, ignore_eos=True))
    assert len(result.choices[0].token_ids) == 40 - len(PROMPTS[0])
    assert result.choices[0].finish_reason == "length"


def test_eos_and_stop_token_ids_finish_with_stop(engine, references):
    ref = references[2]
    stop_id = ref[5]
    [result] = generate(engine, [PROMPTS[2]], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id]))
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.token_ids == ref[: ref.index(stop_id) + 1]


def test_text_deltas_equal_the_decoded_output(engine):
    """Random weights emit byte tokens that are not valid UTF-8 alone: deltas stay consistent."""
    for prompt in PROMPTS[:4]:
        _, stream = engine.submit(prompt, greedy(30), split_reasoning=False)
        run(engine)
        choice = collect(stream).choices[0]
        assert choice.reasoning == ""
        assert choice.text == engine.tokenizer.decode(choice.token_ids, skip_special_tokens=True)


def test_stop_string_split_across_tokens(engine):
    prompt = PROMPTS[2]
    [full] = generate(engine, [prompt], greedy(30))
    pieces = [engine.tokenizer.decode([t]) for t in full.choices[0].token_ids]
    # a stop string made of the end of one token's text and the start of the next one's
    k = next(i for i in range(3, len(pieces) - 1) if pieces[i].isprintable() and pieces[i + 1].isprintable()
             and len(pieces[i]) >= 1 and len(pieces[i + 1]) >= 1 and "\ufffd" not in pieces[i] + pieces[i + 1])
    stop = pieces[k][-1:] + pieces[k + 1][:1]
    text = full.choices[0].text
    [stopped] = generate(engine, [prompt], greedy(30, stop=[stop]))
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.index(stop)]
    assert stop not in choice.text


def test_a_failed_request_sends_the_text_it_held_back_as_a_length_cut_would(engine):
    """Text a choice held back (what may still become a stop string; an incomplete UTF-8 character alike) went
    nowhere when its request failed. A failure ends the answer where it is, as a finish by length does: the held
    text comes in an event of its own before the error event."""
    prompt, k = PROMPTS[2], 8
    [cut] = generate(engine, [prompt], greedy(k))
    text = cut.choices[0].text
    assert text.isprintable() and len(text) > 3
    _, stream = engine.submit(prompt, greedy(100, stop=[text[-3:] + "\x00"]))  # the answer's end begins the stop
    engine_step(engine, k)
    before = collect(stream)
    assert before.choices[0].token_ids == cut.choices[0].token_ids and before.choices[0].text == text[:-3]
    engine.fail_all("boom")
    engine_step(engine)
    after = collect(stream)
    assert (after.choices[0].text, after.choices[0].finish_reason, after.error) == (text[-3:], None, "boom")
    assert not after.choices[0].token_ids


def test_an_aborted_request_sends_the_text_it_held_back_as_a_length_cut_would(engine):
    """An abort (a cancelled background response, whose output so far is kept) ends the answer where it is: the text
    held back comes with the abort's finish (it went nowhere)."""
    prompt, k = PROMPTS[2], 8
    [cut] = generate(engine, [prompt], greedy(k))
    text = cut.choices[0].text
    request_id, stream = engine.submit(prompt, greedy(100, stop=[text[-3:] + "\x00"]))  # the answer's end begins it
    engine_step(engine, k)
    assert collect(stream).choices[0].text == text[:-3]
    engine.abort(request_id)
    engine_step(engine)
    after = collect(stream)
    assert (after.choices[0].text, after.choices[0].finish_reason) == (text[-3:], "abort")


def test_requests_sharing_a_stream_send_every_held_text_before_an_error(engine):
    """A legacy completion's prompts share one stream, which ends at its first error event: every request's held text
    goes out before any request's error (the second prompt's came after the first's error, and was never read)."""
    prompt, k = PROMPTS[2], 8
    [cut] = generate(engine, [prompt], greedy(k))
    text = cut.choices[0].text
    stream = EventStream()
    for _ in range(2):
        engine.submit(prompt, greedy(100, stop=[text[-3:] + "\x00"]), stream=stream)
    engine_step(engine, k)
    collect(stream)
    engine.fail_all("boom")
    engine_step(engine)
    events = []
    while True:
        try:
            events.append(stream.get(timeout=0))
        except TimeoutError:
            break
    assert [(event.text, event.error) for event in events] == [(text[-3:], None)] * 2 + [("", "boom")] * 2


def test_a_held_text_that_cannot_be_flushed_still_fails_its_request(engine, monkeypatch):
    """A text pipeline that raises as it is flushed loses its held text, not its request's error event."""
    _, stream = engine.submit(PROMPTS[2], greedy(100, stop=["never"]))
    engine_step(engine, 2)
    monkeypatch.setattr("nanoqwen.text.TextPipeline.finish", lambda self: 1 / 0)
    engine.fail_all("boom")
    engine_step(engine)
    assert collect(stream).error == "boom"


def test_abort_frees_blocks(engine):
    request_id, stream = engine.submit(PROMPTS[2], greedy(1000))
    engine_step(engine, 4)
    assert engine.block_manager.usage > 0
    assert engine.stats()["active_requests"] == 1
    engine.abort(request_id)
    run(engine)
    result = collect(stream)
    assert result.choices[0].finish_reason == "abort"
    assert result.usage is not None
    assert engine.block_manager.usage == 0.0
    assert engine.stats()["active_requests"] == 0


class _Admissions(EventStream):
    """Records, at each admission the engine reports, how many events it had put before."""

    def __init__(self) -> None:
        super().__init__()
        self.admitted_after: list[int] = []

    def admitted(self) -> None:
        self.admitted_after.append(len(self._events))


def test_a_request_is_reported_admitted_once_as_its_prefill_is_scheduled_not_when_aborted_queued(engine):
    kept, aborted = _Admissions(), _Admissions()
    engine.submit(PROMPTS[0], greedy(3, n=2), stream=kept)
    request_id, _ = engine.submit(PROMPTS[1], greedy(3), stream=aborted)
    engine.abort(request_id)
    assert kept.admitted_after == []  # submitted: queued
    engine_step(engine)
    assert kept.admitted_after == [0]  # once for its two choices, before any of their events
    run(engine)
    assert kept.admitted_after == [0] and aborted.admitted_after == []
    assert collect(kept, 2).usage is not None and collect(aborted).choices[0].finish_reason == "abort"


def test_a_batchs_prompts_are_queued_together_all_or_none(tiny_checkpoint, monkeypatch):
    """submit_all queues a legacy completion's prompts as one: the engine stepping while the later ones are still
    validated (its own thread, under load) admits none early (they began steps apart: a failed step found them at
    different tokens); a prompt refused, or a queue without room for all, queues none of them."""
    engine = load_engine(tiny_checkpoint, max_queue=3)
    validate = Engine.validate
    monkeypatch.setattr(Engine, "validate", lambda self, *args: (engine_step(self), validate(self, *args)))
    streams = [_Admissions(), _Admissions()]
    engine.submit_all([PROMPTS[0], PROMPTS[0]], greedy(3), streams)
    assert [stream.admitted_after for stream in streams] == [[], []]
    engine_step(engine)
    assert [stream.admitted_after for stream in streams] == [[0], [0]]
    assert len(streams[0]._events) == len(streams[1]._events) > 0  # prefilled in one step
    run(engine)
    assert [len(collect(stream).choices[0].token_ids) for stream in streams] == [3, 3]
    monkeypatch.setattr(Engine, "validate", validate)

    bad = [PROMPTS[0], [engine.model_config.vocab_size]]
    with pytest.raises(InvalidRequest):
        engine.submit_all(bad, greedy(3), [EventStream(), EventStream()])
    engine.submit(PROMPTS[0], greedy(3))  # one queued: room for 2 more
    with pytest.raises(QueueFullError):
        engine.submit_all([PROMPTS[1]] * 3, greedy(3), [EventStream() for _ in range(3)])
    with pytest.raises(InvalidRequest, match="more than the server queues") as refused:
        engine.submit_all([PROMPTS[1]] * 4, greedy(3), [EventStream() for _ in range(4)])
    assert refused.value.param == "messages"  # the engine's name for a prompt, the endpoint's given by Serving
    assert engine.stats()["queue_length"] == 1
    run(engine)
    assert engine.stats()["active_requests"] == 0


def test_a_fail_all_between_a_requests_registration_and_its_queueing_leaves_it_ended(engine):
    """enqueue registers a request, then queues its inbox item: a fail_all queued between the two ends the request,
    and its item, drained after, must not start it (it generated to max_tokens for a stream already ended)."""
    stream = EventStream()
    engine.enqueue([engine.request(PROMPTS[0], greedy(5), stream, True)])
    engine._inbox.appendleft(("fail_all", "stopping"))
    run(engine)
    result = collect(stream)
    assert result.error == "stopping" and result.choices[0].token_ids == []
    assert (engine.stats()["queue_length"], engine.stats()["active_requests"]) == (0, 0)


def test_a_fail_all_refusing_later_requests_ends_those_taken_and_refuses_the_next(tiny_checkpoint):
    """A stopping worker's cut (fail_all with refuse_later) ends the running and the queued requests with its error;
    a request submitted after it, before or after the engine took the fail_all in, is refused at once (a 503 the
    client retries elsewhere), queued and counted nowhere: it was accepted, then failed with the running ones' error
    (a 500, or a stream's error event after its 200 head, neither retried). A plain fail_all refuses nothing."""
    engine = load_engine(tiny_checkpoint)
    engine.fail_all("boom")
    run(engine)
    [served] = generate(engine, [PROMPTS[0]], greedy(2))
    assert served.error is None and len(served.choices[0].token_ids) == 2
    _, running = engine.submit(PROMPTS[0], greedy(100))
    engine_step(engine, 2)
    _, queued = engine.submit(PROMPTS[1], greedy(100))
    finished = engine.stats()["requests_finished"]
    engine.fail_all("stopping", refuse_later=True)
    with pytest.raises(ShuttingDownError):
        engine.submit(PROMPTS[2], greedy(5))
    assert engine.stats()["queue_length"] == 1  # the queued one alone
    run(engine)
    with pytest.raises(ShuttingDownError):
        engine.submit_all([PROMPTS[2], PROMPTS[3]], greedy(5), [EventStream(), EventStream()])
    ran, waited = collect(running), collect(queued)
    assert (ran.error, waited.error, len(waited.choices[0].token_ids)) == ("stopping", "stopping", 0)
    assert ran.choices[0].token_ids
    stats = engine.stats()
    assert (stats["queue_length"], stats["active_requests"], stats["requests_finished"]) == (0, 0, finished + 2)


def test_untied_sharded_rope_parameters_checkpoint():
    path = make_checkpoint(tie_word_embeddings=False, rope_style="parameters", max_shard_size="2MB", seed=3)
    assert (path / "model.safetensors.index.json").exists()
    engine = load_engine(path)
    hf = load_hf_model(path)
    prompts = [PROMPTS[0], PROMPTS[2]]
    results = generate(engine, prompts, greedy(12))
    for prompt, result in zip(prompts, results):
        assert result.choices[0].token_ids == hf_greedy(hf, prompt, 12)


def test_engine_thread_serves_concurrent_submitters(tiny_checkpoint, references):
    threaded = started_engine(tiny_checkpoint, max_batch=4)
    streams = []
    order = list(range(len(PROMPTS)))
    random.Random(0).shuffle(order)
    try:
        for i in order:
            streams.append((i, threaded.submit(PROMPTS[i], greedy(24))[1]))
        for i, stream in streams:
            tokens = [t for event in stream for t in event.token_ids]
            assert tokens == references[i]
    finally:
        threaded.shutdown()


def test_template_opened_thinking_goes_to_reasoning(engine):
    """A prompt ending inside <think> (some templates open it): output before </think> is reasoning."""
    think, end_think = engine.tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    prompt = PROMPTS[1] + [think, 198]
    _, stream = engine.submit(prompt, greedy(6))
    run(engine)
    choice = collect(stream).choices[0]
    assert choice.text == "" and choice.reasoning == engine.tokenizer.decode(choice.token_ids)
    closed = PROMPTS[1] + [think, 198, end_think, 198]
    _, stream = engine.submit(closed, greedy(6))
    run(engine)
    choice = collect(stream).choices[0]
    assert choice.reasoning == "" and choice.text == engine.tokenizer.decode(choice.token_ids)


def test_bfloat16_engine_tracks_transformers(tiny_checkpoint, hf):
    """bf16 weights through the CPU bf16 kernels: the distribution stays close to transformers'."""
    engine = load_engine(tiny_checkpoint, dtype="bfloat16")
    prompt = PROMPTS[2]
    [result] = generate(engine, [prompt], greedy(8, logprobs=True, top_logprobs=3))
    tokens = result.choices[0].token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    for step, lp in enumerate(result.choices[0].logprobs):
        assert lp.logprob == pytest.approx(ref[step, tokens[step]].item(), abs=0.15)
        assert ref[step].argmax().item() in [t.token_id for t in lp.top_logprobs]


def test_engine_thread_survives_a_failing_step(tiny_checkpoint, monkeypatch):
    """A bug in a step fails the requests in flight with an error event; later requests are served."""
    threaded = started_engine(tiny_checkpoint, max_batch=4)
    try:
        real_schedule = threaded.scheduler.schedule
        monkeypatch.setattr(threaded.scheduler, "schedule", lambda: 1 / 0)
        _, stream = threaded.submit(PROMPTS[0], greedy(4))
        last = stream.get(timeout=30)  # raises TimeoutError if the engine thread died instead
        assert last.error and "ZeroDivisionError" in last.error
        assert threaded.stats()["active_requests"] == 0 and threaded.block_manager.usage == 0.0
        monkeypatch.setattr(threaded.scheduler, "schedule", real_schedule)
        _, stream = threaded.submit(PROMPTS[0], greedy(4))
        assert sum(len(e.token_ids) for e in stream) == 4
    finally:
        threaded.shutdown()


def test_a_step_that_runs_out_of_memory_fails_only_its_requests(tiny_checkpoint, monkeypatch, references):
    """A kernel's MemoryError (or any exception) in the runner fails the requests of that step with an error event;
    a request still waiting, and later ones, are served transformers' tokens: the failed batch's KV blocks, whatever
    the step left in them, are never reused, not even the prompt blocks an earlier step computed and cached."""
    threaded = started_engine(tiny_checkpoint, max_batch=1)
    try:
        runner = threaded.runner
        real_step, steps = runner.step, []
        noise = torch.Generator().manual_seed(0)

        def step_then_fail_the_third(batch):
            output = real_step(batch)
            steps.append(len(steps))
            if len(steps) == 3:  # a step that failed part way: garbage in every block of its batch
                blocks = [b for seq, _ in batch.rows for b in seq.block_table]
                for cache in (runner.k_cache, runner.v_cache):
                    cache[:, blocks] = torch.randn(cache[:, blocks].shape, generator=noise) * 10
                raise MemoryError("injected")
            return output

        monkeypatch.setattr(runner, "step", step_then_fail_the_third)
        cached = PROMPTS[2]  # 37 tokens: its 2 full blocks are cached by its prefill, the failed step's first
        (_, failing), (_, waiting) = (threaded.submit(p, greedy(8)) for p in (cached, PROMPTS[1]))
        events = list(failing)
        assert events[-1].error == "internal error during generation: MemoryError: injected"
        assert sum(len(e.token_ids) for e in events) == 2  # the tokens of the two steps before
        assert [t for e in waiting for t in e.token_ids] == references[1][:8]
        hits = threaded.block_manager.prefix_hits
        _, again = threaded.submit(cached, greedy(8))
        assert [t for e in again for t in e.token_ids] == references[2][:8]
        assert threaded.block_manager.prefix_hits == hits  # recomputed, not served from the failed blocks
        assert threaded.stats()["active_requests"] == 0 and threaded.block_manager.usage == 0.0
    finally:
        threaded.shutdown()


def test_engine_starts_once_and_stops_at_once_when_never_started(tmp_path):
    """shutdown() of an engine never started has no thread to wait for (it waited out its whole timeout); a second
    start() is refused: two engine threads would step one scheduler."""
    idle = Engine(EngineConfig(model=str(tmp_path / "unused"), device="cpu"))
    began = time.monotonic()
    idle.shutdown(timeout=60)
    assert time.monotonic() - began < 30  # half the timeout: a wait for no thread waits it all, a load's pause far less
    failing = Engine(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))
    failing.start()  # its thread ends on the load error
    with pytest.raises(RuntimeError, match="already started"):
        failing.start()
    failing.shutdown(timeout=60)
    assert failing.load_error is not None


def test_a_forked_child_reports_its_engine_thread_gone(tmp_path):
    """A fork after start() (gunicorn --preload with a plain worker) leaves the child no engine thread: /health and
    requests must say why instead of waiting for a model forever."""
    started = Engine(EngineConfig(model=str(tmp_path / "missing"), device="cpu"))
    started.start()
    started.shutdown(timeout=60)
    lost = "started before this process forked"
    assert lost not in started.load_error
    pid = os.fork()
    if pid == 0:  # the child: report by exit status only, never return into pytest
        os._exit(0 if lost in (started.load_error or "") and not started.ready else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert lost not in started.load_error  # the parent's own engine is untouched


def test_encode_messages_matches_the_tokenizer(engine, tiny_checkpoint):
    """The prompt goes through the Rust tokenizer's encode_batch (it releases the GIL): same ids as
    transformers, and a too-long prompt is refused before its ids become a Python list."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Héllo <think> 12345 <|im_end|> \U0001f600  spaces\n\nend"}]
    for kwargs in ({"enable_thinking": False}, {}):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        expected = tokenizer.encode(text, add_special_tokens=False)
        assert engine.encode_messages(messages, kwargs) == expected
    assert engine.encode_messages(messages, {}, max_tokens=len(expected)) == expected
    with pytest.raises(PromptTooLongError) as info:
        engine.encode_messages(messages, {}, max_tokens=len(expected) - 1)
    assert info.value.num_tokens == len(expected)


def test_a_text_cut_before_each_turn_tokenises_as_the_whole(tiny_checkpoint):
    """turn_pieces: the tokens of the pieces, in order, are the whole text's, for texts that cut turn starts, words,
    spaces, combining marks and emoji at the cut, or put a turn start in a message's content."""
    from transformers import AutoTokenizer

    from nanoqwen.engine.pieces import TURN_START, turn_pieces

    backend = AutoTokenizer.from_pretrained(str(tiny_checkpoint)).backend_tokenizer
    rng = random.Random(0)
    parts = [TURN_START, "<|im_end|>", " ", "\n", "a", "é", "\u0301", "  x", "'s", "123", "\U0001f642", "<think>"]
    texts = ["", TURN_START, f"{TURN_START}user\nhe\u0301llo {TURN_START} x<|im_end|>\n{TURN_START}assistant\n",
             *("".join(rng.choice(parts) for _ in range(40)) for _ in range(300))]
    for text in texts:
        pieces = turn_pieces(text)
        assert "".join(pieces) == text and all(piece.count(TURN_START) <= 1 for piece in pieces)
        assert [token for piece in backend.encode_batch_fast(pieces, add_special_tokens=False) for token in piece.ids] \
            == backend.encode(text, add_special_tokens=False).ids, text


def test_a_text_cut_between_words_tokenises_as_the_whole(tiny_checkpoint):
    """word_pieces: a cut at a space between two ASCII letters, between two digits, or between a CJK letter and a CJK
    punctuation mark keeps the whole text's tokens, for odd texts cut every few characters (the cut's argument is in
    its docstring); each kind of cut is made."""
    from transformers import AutoTokenizer

    from nanoqwen.engine.pieces import word_pieces, words_split

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    backend = tokenizer.backend_tokenizer
    assert words_split(tokenizer)
    rng = random.Random(0)
    cuts: list[str] = []
    for text in [odd_text(rng, 60) for _ in range(400)]:
        pieces = word_pieces(text, 2)
        cuts += [piece[:1] for piece in pieces[1:]]
        assert "".join(pieces) == text
        assert [token for piece in backend.encode_batch_fast(pieces, add_special_tokens=False) for token in piece.ids] \
            == backend.encode(text, add_special_tokens=False).ids, text
    digits, marks = set("0123456789"), set("\uff0c\u3002\u3001\uff1b\uff1a\uff1f\uff01")
    assert " " in cuts and set(cuts) & digits and set(cuts) & marks and set(cuts) <= {" ", *digits, *marks}
    assert len(cuts) > 400


def test_a_tokenizer_of_another_pre_tokenizer_is_not_cut_between_words(tiny_checkpoint):
    """cl100k's digits come three at a time: word_pieces' argument is Qwen's pattern's alone."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    from nanoqwen.engine.pieces import QWEN_SPLIT, words_split

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert not words_split(tokenizer)


@pytest.mark.parametrize(("added", "text", "cut"), [
    ("<|box_12|>", "a<|box_12|>b", True), ("字，", "中字，字", True), ("a b", "xa bx", True),
    ("<|x|>", "1<|x|>2", False)])
def test_a_tokenizer_with_an_added_token_holding_a_cuts_character_is_not_cut_between_words(
        tiny_checkpoint, added: str, text: str, cut: bool) -> None:
    """An added token holding a digit, a CJK mark or a space could span a cut (word_pieces would cut inside it, and its
    pieces' tokens would not be the whole's): words_split refuses the tokenizer; one holding none of them is cut."""
    from transformers import AutoTokenizer

    from nanoqwen.engine.pieces import word_pieces, words_split

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    tokenizer.add_tokens([added])
    backend = tokenizer.backend_tokenizer
    pieces = word_pieces(text, 1)
    kept = [token for piece in backend.encode_batch_fast(pieces, add_special_tokens=False) for token in piece.ids] \
        == backend.encode(text, add_special_tokens=False).ids
    assert (words_split(tokenizer), kept, len(pieces)) == (not cut, not cut, 2 if cut else 1)


def _record_batches(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The texts of each encode_batch_fast call the engine's tokenizer makes from now on."""
    backend = engine.tokenizer.backend_tokenizer
    batches: list[list[str]] = []

    class Recording:
        def encode_batch_fast(self, texts: list[str], **kwargs: bool) -> list:
            batches.append(texts)
            return backend.encode_batch_fast(texts, **kwargs)

        def num_special_tokens_to_add(self, is_pair: bool) -> int:
            return backend.num_special_tokens_to_add(is_pair)

    monkeypatch.setattr(engine.tokenizer, "_tokenizer", Recording(), raising=False)
    return batches


def test_plain_texts_encode_in_pieces_as_the_tokenizer_encodes_them(engine, monkeypatch):
    """encode_texts (a legacy completion's prompts, /tokenize's) hands the tokenizer a long text's pieces, cut between
    words, through encode_batch_fast (no offsets; each piece's encoding freed alone), and gets the ids
    `tokenizer(texts)` gets, for odd texts of up to 200,000 characters, with special tokens or without."""
    rng = random.Random(1)
    texts = ["", "hi there", "w " * 100000, *(odd_text(rng, rng.choice((10, 30000, 60000))) for _ in range(8))]
    expected = {special: engine.tokenizer(texts, add_special_tokens=special)["input_ids"] for special in (True, False)}
    batches = _record_batches(engine, monkeypatch)
    for special in (True, False):
        assert engine.encode_texts(texts, special) == expected[special]
    assert engine.words_split and len(batches) == 2 and len(batches[0]) > len(texts) + 3, [len(b) for b in batches]
    with pytest.raises(PromptTooLongError) as info:
        engine.encode_texts(texts, max_tokens=100000)
    assert info.value.num_tokens == len(expected[True][2])


def test_a_text_of_digits_or_cjk_encodes_in_pieces(engine, monkeypatch):
    """A long text with no space between ASCII letters is cut too: between digits, and at CJK punctuation (each was
    one encoding of its millions of tokens, freed in one call holding the GIL)."""
    texts = ["0123456789" * 20000, "我们今天讨论模型的推理速度，以及长提示的分词。" * 9000]
    expected = engine.tokenizer(texts)["input_ids"]
    batches = _record_batches(engine, monkeypatch)
    assert engine.encode_texts(texts) == expected
    assert len(batches[0]) == 8 and max(len(piece) for piece in batches[0]) < 65600  # 4 pieces each


def test_a_prompt_is_encoded_a_turn_at_a_time_without_offsets(engine, monkeypatch):
    """encode_messages hands the tokenizer the prompt's turns (encoded in parallel, freed one by one), through
    encode_batch_fast: an encoding's offsets took 0.23 s to free holding the GIL at 3.7M tokens."""
    backend = engine.tokenizer.backend_tokenizer
    batches = _record_batches(engine, monkeypatch)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ids = engine.encode_messages(messages, {"enable_thinking": False})
    assert engine.turns_split and len(batches) == 1 and len(batches[0]) == 5, batches
    assert ids == backend.encode("".join(batches[0]), add_special_tokens=False).ids
