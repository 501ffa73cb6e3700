"""A step's token masks are filled on the mask thread while the forward runs (nanoqwen/runner/mask_thread.py), joined
before sampling: constrained greedy answers are transformers' under the same masks in each mode, and the mask really
runs beside the forward (a matcher that waits for the forward, and a forward that waits for the mask). The thread
itself: close() never waits, so an owner dropped during a job ends it."""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import pytest
import torch
from llguidance import LLExecutor

from engine_util import GRAMMAR_FAILED, collect, engine_step, fill_row, greedy, load_engine, run
from nanoqwen.engine import Engine, SamplingParams
from nanoqwen.engine.grammar import RowGrammar
from nanoqwen.runner import sampling
from nanoqwen.runner.mask_thread import MaskThread

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1019)), [151644, 872, 198], list(range(5000, 5030, 3))]
MAX_TOKENS = 10
# Neither can end within MAX_TOKENS: the answer is MAX_TOKENS tokens, each under the grammar
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "minLength": 300}}, "required": ["name"]}
REGEX = "(ab|cd)[a-z ]{300}"
ALLOWED = [9707, 1879, 11, 358, 1079, 2000, 3000]
BIAS = {1879: 8.0, 11: -100.0}
MODES = {"none": dict(graph="none"), "cpugraph": dict(graph="auto")}
HANDSHAKE_S = 10.0  # how long either side waits for the other before the test fails


def _generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    """Each prompt's first choice, all in one batch, constrained from the first token (no thought first)."""
    streams = [engine.submit(prompt, p, split_reasoning=False)[1] for prompt, p in zip(prompts, params)]
    run(engine)
    return [collect(stream).choices[0].token_ids for stream in streams]


def _constrained_requests(engine: Engine) -> list[SamplingParams]:
    """One batch's rows: a JSON schema, a regex, a seeded JSON schema, allowed_token_ids, a logit_bias, none."""
    schema = engine.grammars.json_schema(SCHEMA, strict=True, param="response_format")
    regex = engine.grammars.from_text("regex", REGEX, "structured_outputs")
    return [greedy(MAX_TOKENS, grammar=schema), greedy(MAX_TOKENS, grammar=regex),
            SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True, grammar=schema),
            greedy(MAX_TOKENS, allowed_token_ids=ALLOWED), greedy(MAX_TOKENS, logit_bias=BIAS), greedy(MAX_TOKENS)]


def _reference(hf: torch.nn.Module, engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    """transformers' greedy tokens with the row's adjustments: its grammar's mask (a fresh matcher), its allowed
    ids, its bias."""
    vocab = engine.model_config.vocab_size
    row = RowGrammar.of(params.grammar, None, engine.generation.eos_token_ids) if params.grammar else None
    tokens: list[int] = []
    for _ in range(params.max_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, -1].float()  # [V]
        for token, value in params.logit_bias.items():
            logits[token] += value
        allowed = torch.ones(vocab, dtype=torch.bool)
        if row is not None:
            row.sync(prompt + tokens, len(prompt))
            bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)  # [1, ceil(V/32)]
            fill_row(row, bitmask)
            allowed = ((bitmask[0, torch.arange(vocab) // 32] >> (torch.arange(vocab) % 32)) & 1).bool()
        if params.allowed_token_ids is not None:
            allowed = torch.zeros(vocab, dtype=torch.bool)
            allowed[params.allowed_token_ids] = True
        tokens.append(int(logits.masked_fill(~allowed, float("-inf")).argmax()))
    return tokens


@pytest.fixture(scope="module")
def engines(tiny_checkpoint) -> dict[str, Engine]:
    return {mode: load_engine(tiny_checkpoint, **config) for mode, config in MODES.items()}


@pytest.fixture(scope="module")
def references() -> dict[int, list[int]]:
    """transformers' answer for each row of _constrained_requests (the same in each mode and pool), computed once."""
    return {}


@functools.cache
def _pool() -> LLExecutor:
    return LLExecutor(num_threads=2)


@pytest.mark.parametrize("pool", ["serial", "pool"])
def test_constrained_answers_are_transformers_under_the_same_masks_in_each_mode(engines, hf, references, pool: str,
                                                                                 monkeypatch) -> None:
    """Every row of one batch under its own adjustment, decoded with the masks filled beside the forward (the three
    matchers' one after another, or on llguidance's pool, whatever this machine's CPUs would choose): the greedy
    ones are transformers' under the same masks, the seeded one the same in each mode (and the grammar holds)."""
    monkeypatch.setattr(sampling, "_executor", lambda: _pool() if pool == "pool" else None)
    answers = {}
    for mode, engine in engines.items():
        rows = _constrained_requests(engine)
        answers[mode] = _generate(engine, [PROMPTS[i % len(PROMPTS)] for i in range(len(rows))], rows)
        for i, (params, got) in enumerate(zip(rows, answers[mode])):
            if params.greedy:
                if i not in references:
                    references[i] = _reference(hf, engine, PROMPTS[i % len(PROMPTS)], params)
                assert got == references[i], (mode, i)
        assert engine.info()["graph"] == ("none" if mode == "none" else "cpugraph")
    seeded = answers["none"][2]
    assert answers["cpugraph"][2] == seeded and len(seeded) == MAX_TOKENS
    text = engines["none"].tokenizer.decode(seeded)
    assert text.startswith('{"name": "') and '"' not in text[len('{"name": "'):]  # inside the 300 characters


@pytest.mark.parametrize("cpus, threads", [(1, None), (2, None), (3, 2), (16, 12), (64, 32)])
def test_the_mask_pool_is_made_where_it_has_two_threads(cpus: int, threads: int | None, monkeypatch) -> None:
    """A pool of one thread would compute the masks one after another, as the mask thread does, plus a handoff."""
    monkeypatch.setattr(sampling, "resolve_threads", lambda _: cpus)
    made: list[int] = []
    monkeypatch.setattr(sampling, "LLExecutor", lambda num_threads: made.append(num_threads) or num_threads)
    assert sampling._executor.__wrapped__() == threads
    assert made == ([threads] if threads else [])


class _Handshake:
    """A matcher's mask that waits for the forward to start, and a forward that waits for the mask to start: both go
    on only where the mask runs beside the forward (run after it, as on the engine thread, the forward waits in vain
    and the step fails the test)."""

    def __init__(self) -> None:
        self.mask_started = threading.Event()
        self.forward_started = threading.Event()
        self.forwards_alone = 0  # forwards that never saw the mask start

    def mask(self) -> None:
        self.mask_started.set()
        assert self.forward_started.wait(HANDSHAKE_S), "the mask ran before the forward and not beside it"

    def forward(self) -> None:
        self.forward_started.set()
        if not self.mask_started.wait(HANDSHAKE_S):
            self.forwards_alone += 1


class _WaitingMatcher:
    """A real matcher whose masks first run the handshake's side."""

    def __init__(self, matcher: Any, handshake: _Handshake) -> None:
        self._matcher = matcher
        self._handshake = handshake

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        self._handshake.mask()
        self._matcher.unsafe_compute_mask_ptr(pointer, size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._matcher, name)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_the_mask_is_computed_while_the_forward_runs(engines, mode: str, step: str, monkeypatch) -> None:
    """The prefill's sampled row (its first mask from the matcher: its compiled one dropped) and a decode step's."""
    engine = engines[mode]
    runner = engine.runner
    handshake = _Handshake()
    schema = engine.grammars.json_schema(SCHEMA, strict=True, param="response_format")
    plain = _generate(engine, [PROMPTS[0]], [greedy(3, grammar=schema)])
    request_id, stream = engine.submit(PROMPTS[0], greedy(3, grammar=schema), split_reasoning=False)
    row = engine._requests[request_id].sequences[0].grammar
    if step == "prefill":
        row.first_mask = None
        row.matcher = _WaitingMatcher(row.matcher, handshake)
    else:
        engine_step(engine)  # the prefill: its mask the compiled one
        row.matcher = _WaitingMatcher(row.matcher, handshake)
    if step == "prefill":
        model, forward = runner.model, runner.model.forward
        monkeypatch.setattr(model, "forward", lambda *args, **kw: handshake.forward() or forward(*args, **kw))
    else:
        run_graph = runner.graphs.run
        monkeypatch.setattr(runner.graphs, "run", lambda *args: handshake.forward() or run_graph(*args))
    engine_step(engine)
    assert handshake.mask_started.is_set() and handshake.forward_started.is_set()
    assert handshake.forwards_alone == 0
    monkeypatch.undo()
    run(engine)
    assert collect(stream).choices[0].token_ids == plain[0]


class _FailingMatcher(_WaitingMatcher):
    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        raise RuntimeError("the matcher broke")


def test_a_mask_that_raises_on_the_mask_thread_fails_its_step_as_on_the_engine_thread(engines) -> None:
    """The error reaches the engine thread at the join: the step's requests fail, the next one is served."""
    engine = engines["none"]
    schema = engine.grammars.json_schema(SCHEMA, strict=True, param="response_format")
    request_id, stream = engine.submit(PROMPTS[0], greedy(3, grammar=schema), split_reasoning=False)
    row = engine._requests[request_id].sequences[0].grammar
    row.first_mask = None
    row.matcher = _FailingMatcher(row.matcher, _Handshake())
    run(engine)
    assert "the matcher broke" in collect(stream).error
    answer = _generate(engine, [PROMPTS[1]], [greedy(3, grammar=schema)])
    assert len(answer[0]) == 3


@pytest.mark.parametrize("mode", list(MODES))
def test_a_matcher_that_errs_mid_answer_fails_its_request_and_no_other(engines, mode: str) -> None:
    """`a{100000}`'s lexer gives out after the first token (LIMITS' fuel): its matcher errs in its first decode step.
    Its request (both choices) fails naming the field that asked for the grammar, where it ended with "stop", a 200
    whose answer did not follow the regex; the rows beside it in the batch, constrained or not, are generated as
    alone, and the failed one's blocks are free."""
    engine = engines[mode]
    schema = engine.grammars.json_schema(SCHEMA, strict=True, param="response_format")
    costly = engine.grammars.from_text("regex", "a{100000}", "guided_regex")
    others = [greedy(MAX_TOKENS, grammar=schema), greedy(MAX_TOKENS)]
    alone = _generate(engine, PROMPTS[1:3], others)
    finished = engine.requests_finished
    failing = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=MAX_TOKENS, grammar=costly,
                             grammar_field="guided_regex")
    streams = [engine.submit(prompt, params, split_reasoning=False)[1]
               for prompt, params in zip(PROMPTS, [failing, *others])]
    run(engine)
    failed = collect(streams[0], 2)
    assert (failed.error_param, failed.error) == ("guided_regex", GRAMMAR_FAILED)
    assert failed.usage is None and all(set(choice.text) <= {"a"} for choice in failed.choices)
    assert [collect(stream).choices[0].token_ids for stream in streams[1:]] == alone
    assert engine.requests_finished == finished + 3 and not engine._requests
    assert engine.block_manager.usage == 0.0
    assert costly.spoiled and engine.grammars.cached(("regex", "a{100000}")) is None  # a lexer's error: compiled afresh


class _BlockedMatcher(_WaitingMatcher):
    """A real matcher whose mask waits for `go`, then raises: a failed step's job, still running after its step."""

    def __init__(self, matcher: Any) -> None:
        super().__init__(matcher, _Handshake())
        self.blocked = threading.Event()
        self.returned = threading.Event()
        self.go = threading.Event()

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        self.blocked.set()
        self.go.wait(HANDSHAKE_S)
        self.returned.set()
        raise RuntimeError("the failed step's mask broke")


@pytest.mark.parametrize("mode", list(MODES))
def test_a_step_that_fails_while_its_mask_runs_leaves_the_next_constrained_request_right(engines, hf, mode: str,
                                                                                          monkeypatch) -> None:
    """A decode step's forward raises while its row's mask is still computing: the step's request fails with the
    forward's error; the next step waits for that job, whose own error is the failed step's, not the next one's;
    a constrained request is then transformers' under its mask."""
    engine = engines[mode]
    runner = engine.runner
    schema = engine.grammars.json_schema(SCHEMA, strict=True, param="response_format")
    request_id, failed = engine.submit(PROMPTS[0], greedy(3, grammar=schema), split_reasoning=False)
    engine_step(engine)  # the prefill
    row = engine._requests[request_id].sequences[0].grammar
    matcher = row.matcher = _BlockedMatcher(row.matcher)

    def forward(*args: Any) -> None:
        assert matcher.blocked.wait(HANDSHAKE_S)
        raise RuntimeError("the forward broke")

    monkeypatch.setattr(runner.graphs, "run", forward)
    engine_step(engine)
    assert "the forward broke" in collect(failed).error
    assert matcher.blocked.is_set() and not matcher.returned.is_set()  # the job outlived its step
    monkeypatch.undo()
    thread = runner.adjuster._thread
    monkeypatch.setattr(thread, "start", lambda *args, **kw: matcher.go.set() or MaskThread.start(thread, *args, **kw))
    regex = engine.grammars.from_text("regex", REGEX, "structured_outputs")
    params = greedy(MAX_TOKENS, grammar=regex)
    assert _generate(engine, [PROMPTS[1]], [params]) == [_reference(hf, engine, PROMPTS[1], params)]
    assert matcher.returned.is_set()


def _close(thread: MaskThread, closed: threading.Event) -> None:
    thread.close()
    closed.set()


class _Owner:
    """A mask thread's owner as LogitAdjuster is one: its finalizer closes the thread, its jobs hold it."""

    def __init__(self, closed: threading.Event) -> None:
        self.thread = MaskThread()
        weakref.finalize(self, _close, self.thread, closed)

    def job(self, started: threading.Event, go: threading.Event) -> None:
        started.set()
        assert go.wait(HANDSHAKE_S)


def _ended(thread: MaskThread) -> threading.Event:
    """Set once `thread` is freed: its native thread, which holds it, has returned."""
    ended = threading.Event()
    weakref.finalize(thread, ended.set)
    return ended


def test_an_owner_dropped_while_its_job_runs_ends_the_thread() -> None:
    """The job holds the owner's last reference: its finalizer runs on the mask thread, whose close() must not wait
    for the job it is part of (it waited forever, and the thread and the owner's memory with it)."""
    started, go, closed = threading.Event(), threading.Event(), threading.Event()
    owner = _Owner(closed)
    ended = _ended(owner.thread)
    owner.thread.start(functools.partial(owner.job, started, go))
    assert started.wait(HANDSHAKE_S)
    del owner
    assert not closed.is_set()  # the running job holds the owner
    go.set()
    assert closed.wait(HANDSHAKE_S), "close() on the mask thread waited for its own job"
    assert ended.wait(HANDSHAKE_S), "the mask thread did not end"


def test_close_from_elsewhere_returns_before_the_job_ends_and_the_thread_ends_after_it() -> None:
    """As a finalizer run on the event loop: close() returns at once, the thread ends once its job is done."""
    started, go, closed = threading.Event(), threading.Event(), threading.Event()
    thread = MaskThread()
    ended = _ended(thread)
    thread.start(lambda: started.set() or go.wait(HANDSHAKE_S))
    assert started.wait(HANDSHAKE_S)
    closer = threading.Thread(target=_close, args=(thread, closed), daemon=True)
    closer.start()
    returned = closed.wait(HANDSHAKE_S)
    go.set()
    assert returned, "close() waited for the job"
    del thread
    assert ended.wait(HANDSHAKE_S), "the mask thread did not end after its job"


def test_close_ends_an_idle_thread() -> None:
    thread = MaskThread()
    ended = _ended(thread)
    thread.start(lambda: None)
    thread.wait()
    thread.close()
    del thread
    assert ended.wait(HANDSHAKE_S)
