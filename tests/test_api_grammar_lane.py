"""Grammars compile in a lane of their own (Serving.compiling): a client's costly grammars never hold up another's
prompt in the tokenising lane, nor a grammar already cached (looked up in the tokenising lane), and a full grammar
lane is a 503 as a full tokenising lane is. Long prompts are tokenised in a lane of their own too."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gevent
import pytest
from flask.testing import FlaskClient

from checkpoints import EOS_IDS, VOCAB_SIZE
from engine_util import load_engine, shared_tokenizer
from nanoqwen.api import offload, structured
from nanoqwen.api.app import create_app
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.errors import APIError
from nanoqwen.api.schemas import parse_chat_request
from nanoqwen.api.serving import Serving
from nanoqwen.engine.grammar import Grammars
from nanoqwen.engine.request import SamplingParams
from nanoqwen.engine.threads import NativeEvent
from nanoqwen.engine.validation import InvalidRequest
from nanoqwen.text import TokenBytes

SLOW_S = 1.5


class _BlockedGrammars:
    """Grammars whose every compile holds its native thread until `release` (an in-process stand-in for a costly
    grammar: up to ~0.3 s of llguidance's fuel each), or SLOW_S where its text starts with "slow"."""

    def __init__(self) -> None:
        self.release = NativeEvent()
        self.started = 0
        self.hits: dict[tuple[str, str], str] = {}

    def cached(self, key: tuple[str, str]) -> str | None:
        return self.hits.get(key)

    def from_text(self, kind: str, text: str, param: str) -> str:
        self.started += 1
        if text.startswith("slow"):
            time.sleep(SLOW_S)
        else:
            assert self.release.wait(30)
        return f"compiled {text}"


@pytest.fixture()
def lanes() -> Iterator[tuple[Serving, _BlockedGrammars]]:
    grammars = _BlockedGrammars()
    config = ServerConfig(tokenizer_threads=2, grammar_threads=2, max_pending_grammars=3)
    serving = Serving(SimpleNamespace(grammars=grammars), config, SimpleNamespace())  # type: ignore[arg-type]
    yield serving, grammars
    grammars.release.set()
    for pool in (serving.compiling, serving.tokenizing, serving.tokenizing_long):
        pool.stop()


def _until(done: Callable[[], bool], what: str) -> None:
    """Waits for `done`: a failure after 10 s, not a test spinning until it is killed (the wait is for a thread that
    never starts when the lane under test is broken)."""
    with gevent.Timeout(10, AssertionError(f"not within 10 s: {what}")):
        while not done():
            gevent.sleep(0.01)


def _compile(serving: Serving, regex: str) -> gevent.Greenlet:
    req = SimpleNamespace(constraint=SimpleNamespace(kind="regex", value=regex, param="guided_regex"))
    return gevent.spawn(lambda: structured.structured_grammar(serving, req).grammar)


def test_a_prompt_tokenises_while_every_grammar_thread_is_busy(lanes: tuple[Serving, _BlockedGrammars]) -> None:
    serving, grammars = lanes
    compiles = [_compile(serving, f"a{{{i}}}") for i in range(3)]  # both threads busy, one waiting
    _until(lambda: grammars.started >= 2, "two compiles started")
    prompt = gevent.spawn(serving.off_loop, 10, lambda: "tokenised")
    prompt.join(timeout=10)  # before the grammars' lane, it waited for the compiles: never, until release
    assert prompt.successful() and prompt.value == "tokenised"
    assert not any(c.ready() for c in compiles)
    grammars.release.set()
    assert [c.get(timeout=10) for c in compiles] == [f"compiled a{{{i}}}" for i in range(3)]


def test_a_short_prompt_tokenises_while_long_ones_hold_their_lane(lanes: tuple[Serving, _BlockedGrammars]) -> None:
    """Two prompts of long_prompt_chars or more (7.5 MB: seconds each) hold their lane; a shorter one is tokenised
    meanwhile. In the tokenising lane they would hold both its threads, the short one waiting behind them."""
    serving, grammars = lanes
    chars = serving.config.long_prompt_chars
    started: list[int] = []

    def long_tokenisation() -> bool:
        started.append(1)
        return grammars.release.wait(30)

    longs = [gevent.spawn(serving.off_loop, chars, long_tokenisation) for _ in range(2)]
    _until(lambda: bool(started), "a long prompt's tokenisation started")
    prompt = gevent.spawn(serving.off_loop, chars - 1, lambda: "tokenised")
    prompt.join(timeout=10)
    assert prompt.successful() and prompt.value == "tokenised"
    assert not any(g.ready() for g in longs)
    grammars.release.set()
    assert [g.get(timeout=10) for g in longs] == [True, True]


def test_a_full_grammar_lane_is_a_503(lanes: tuple[Serving, _BlockedGrammars]) -> None:
    serving, grammars = lanes
    compiles = [_compile(serving, f"b{{{i}}}") for i in range(3)]
    _until(lambda: grammars.started >= 2, "two compiles started")
    with pytest.raises(APIError) as refused:
        _compile(serving, "c").get(timeout=10)
    assert (refused.value.status, refused.value.code) == (503, "queue_full")
    assert "3 grammars are already being compiled" in refused.value.message
    assert refused.value.headers["Retry-After"]
    grammars.release.set()
    assert len([c.get(timeout=10) for c in compiles]) == 3


def test_a_full_grammar_lanes_retry_after_is_its_expected_wait(lanes: tuple[Serving, _BlockedGrammars]) -> None:
    """The lane's 503 said `Retry-After: 1` while 24 costly grammars kept it full ~35 s (the openai client's retries
    all met it full). Now it is the seconds until the compiles pending are done, at the lane's last compiles' mean:
    3 pending on 2 threads, after compiles of SLOW_S, at least ceil(3 x SLOW_S / 2)."""
    serving, grammars = lanes
    assert [c.get(timeout=30) for c in [_compile(serving, f"slow{i}") for i in range(2)]]
    compiles = [_compile(serving, f"e{{{i}}}") for i in range(3)]
    _until(lambda: grammars.started >= 2 + 2, "two compiles started")
    with pytest.raises(APIError) as refused:
        _compile(serving, "f").get(timeout=10)
    assert refused.value.status == 503
    assert int(refused.value.headers["Retry-After"]) >= math.ceil(3 * SLOW_S / 2)
    grammars.release.set()
    assert len([c.get(timeout=10) for c in compiles]) == 3


def test_a_cached_grammar_never_waits_behind_the_compiles(lanes: tuple[Serving, _BlockedGrammars]) -> None:
    """A client re-sending its grammar every turn, while another's flood fills the grammar lane: its cache hit is
    served (it was the queue's 503, or a wait behind every compile)."""
    serving, grammars = lanes
    grammars.hits[("regex", "sent before")] = "cached"
    compiles = [_compile(serving, f"d{{{i}}}") for i in range(3)]  # both threads busy, the queue full
    _until(lambda: grammars.started >= 2, "two compiles started")
    assert _compile(serving, "sent before").get(timeout=10) == "cached"
    assert not any(c.ready() for c in compiles)
    grammars.release.set()
    assert len([c.get(timeout=10) for c in compiles]) == 3


@pytest.fixture(scope="module")
def app(tiny_checkpoint: Path) -> Iterator[FlaskClient]:
    """The app of a loaded engine (not started: every prompt here is too long for its 1,024-token context)."""
    engine = load_engine(tiny_checkpoint, max_model_len=1024)
    try:
        yield create_app(engine, ServerConfig()).test_client()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("path, field, made_by", [
    ("/v1/chat/completions", "messages", "encode_here"),
    ("/v1/responses", "input", "encode_here"),  # made a chat request of, encoded as chat's
    ("/tokenize", "messages", "_encode_messages"),
    ("/v1/completions", "prompt", "_encoded"),
])
@pytest.mark.parametrize("long", [True, False])
def test_a_prompt_of_long_prompt_chars_is_tokenised_in_the_long_lane(
        app: FlaskClient, monkeypatch: pytest.MonkeyPatch, path: str, field: str, made_by: str, long: bool) -> None:
    """Each endpoint measures its prompt for the lane: one of long_prompt_chars characters is tokenised in the long
    prompts' pool, one a character shorter in the tokenising pool. (A chat measured as 0 characters took the short
    lane, which only a timed gunicorn test caught, 1 time in 2.)"""
    config = ServerConfig()
    lanes = {True: (config.long_prompt_threads, config.max_pending_long_prompts),
             False: (config.tokenizer_threads, config.max_pending_prompts)}
    assert lanes[True] != lanes[False]
    runs: list[tuple[int, int, str]] = []
    run = offload.NativePool.run

    def recorded(pool: offload.NativePool, fn: Callable[..., Any], *args: Any) -> Any:
        runs.append((pool.workers, pool.max_pending, getattr(fn, "__name__", "")))
        return run(pool, fn, *args)

    monkeypatch.setattr(offload.NativePool, "run", recorded)
    text = ("word " * config.long_prompt_chars)[:config.long_prompt_chars - (not long)]
    prompt = [{"role": "user", "content": text}] if field == "messages" else text
    answer = app.post(path, json={field: prompt})
    assert answer.status_code == (200 if path == "/tokenize" else 400), answer.json
    assert [lane for lane in runs if lane[2] == made_by] == [(*lanes[long], made_by)], runs


@pytest.fixture()
def real(tiny_checkpoint: Path) -> Iterator[tuple[Serving, list[Any], list[Any]]]:
    """A Serving of real Grammars, and what its tokenising lane returned and its grammar lane ran, in order."""
    tokenizer = shared_tokenizer(tiny_checkpoint)
    grammars = Grammars(tokenizer, TokenBytes(tokenizer), VOCAB_SIZE, EOS_IDS)
    serving = Serving(SimpleNamespace(grammars=grammars), ServerConfig(), SimpleNamespace())  # type: ignore[arg-type]
    looked_up: list[Any] = []
    compiles: list[Any] = []
    off_loop, compile_off_loop = serving.off_loop, serving.compile_off_loop
    serving.off_loop = lambda chars, fn, *args: looked_up.append(off_loop(chars, fn, *args)) or looked_up[-1]
    serving.compile_off_loop = lambda fn, *args: compiles.append(fn) or compile_off_loop(fn, *args)  # type: ignore
    yield serving, looked_up, compiles
    for pool in (serving.compiling, serving.tokenizing):
        pool.stop()


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "hi"}]


def test_a_forced_calls_response_format_is_checked_once(real: tuple[Serving, list[Any], list[Any]]) -> None:
    """A forced call beside a response_format: the format is checked (its 400 names it) in the calls' one turn in the
    grammar lane (it took one of its own before them); the same request again finds their grammar cached, and takes no
    turn in the grammar lane (it took one every time)."""
    serving, _, compiles = real
    body = {"messages": USER, "tools": [TOOL], "tool_choice": "required",
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}}
    first = structured.output_grammar(serving, parse_chat_request(body, None)).grammar
    assert len(compiles) == 1
    assert structured.output_grammar(serving, parse_chat_request(body, None)).grammar is first
    assert len(compiles) == 1
    bad = {**body, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "$ref": "#/$defs/gone"}}}}
    with pytest.raises(InvalidRequest) as refused:
        structured.output_grammar(serving, parse_chat_request(bad, None))
    assert refused.value.param == "response_format"


def test_a_forced_call_beside_a_response_format_past_the_bounds_in_all_compiles_nothing(
        real: tuple[Serving, list[Any], list[Any]]) -> None:
    """A forced call's schema and a response_format beside it, each within the properties bound, past it in all: the
    400 naming the larger part, before any grammar is compiled (the format was compiled alone first, up to ~6 s)."""
    serving, _, _ = real

    def required(prefix: str, count: int) -> dict[str, Any]:
        names = [f"{prefix}{i}" for i in range(count)]
        return {"type": "object", "properties": {name: {"type": "integer"} for name in names}, "required": names}
    body = {"messages": USER, "tool_choice": "required",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": required("t", 2_000)}}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": required("a", 3_001)}}}
    with pytest.raises(InvalidRequest, match="properties in all") as refused:
        structured.output_grammar(serving, parse_chat_request(body, None))
    assert refused.value.param == "response_format"
    assert serving.engine.grammars.cache_stats() == (0, 0)


def test_a_changed_response_format_beside_the_same_forced_tools_finds_their_calls_compiled(
        real: tuple[Serving, list[Any], list[Any]]) -> None:
    """Forced calls' grammar is their tools' alone: a changed response_format beside them finds it (it recompiled
    them), as do the tools forced without one; the changed format is still checked (its 400) and charged with them
    (past the properties bound in all: the 400 naming the larger part)."""
    serving, _, _ = real

    def required(prefix: str, count: int) -> dict[str, Any]:
        names = [f"{prefix}{i}" for i in range(count)]
        return {"type": "object", "properties": {name: {"type": "integer"} for name in names}, "required": names}

    def grammar(answer: dict[str, Any] | None) -> Any:
        body = {"messages": USER, "tool_choice": "required",
                "tools": [{"type": "function", "function": {"name": "f", "parameters": required("t", 2_000)}}]}
        if answer is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "a", "schema": answer}}
        return structured.output_grammar(serving, parse_chat_request(body, None)).grammar
    first = grammar(required("a", 1))
    assert grammar(required("b", 1)) is first and grammar(None) is first
    for answer, what in (({"type": "string", "pattern": "("}, "regex"), (required("c", 3_001), "properties in all")):
        with pytest.raises(InvalidRequest, match=what) as refused:
            grammar(answer)
        assert refused.value.param == "response_format"


@pytest.mark.parametrize("first, second", [(1, True), (0, False), ([1], [True])])
def test_tools_of_one_name_differing_as_json_only_are_two_tools(first: Any, second: Any) -> None:
    """Python's `==` takes 1 for true: two tools of one name, `const: 1` and `const: true`, are still a 400."""
    def tool(value: Any) -> dict[str, Any]:
        return {"type": "function", "function": {"name": "f", "parameters": {"const": value}}}

    with pytest.raises(APIError, match="'f' names two different functions") as refused:
        parse_chat_request({"messages": USER, "tools": [tool(first), tool(second)]}, None)
    assert refused.value.param == "tools"
    parse_chat_request({"messages": USER, "tools": [tool(first), tool(first)]}, None)


def test_a_tool_sent_twice_is_one_tool_to_the_grammar(real: tuple[Serving, list[Any], list[Any]]) -> None:
    """The same tool twice (accepted: schemas._check_tool_names) is one alternative of the calls' grammar: the
    request finds the grammar of the tool sent once."""
    serving, _, compiles = real
    once = {"messages": USER, "tools": [TOOL], "tool_choice": "required"}
    first = structured.output_grammar(serving, parse_chat_request(once, None)).grammar
    twice = {**once, "tools": [TOOL, TOOL]}
    assert structured.output_grammar(serving, parse_chat_request(twice, None)).grammar is first
    assert len(compiles) == 1


def test_a_long_key_is_made_in_the_grammar_lane(real: tuple[Serving, list[Any], list[Any]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool list whose key passes KEY_CHARS (a 10 MB list's JSON held a tokenising thread for 88 ms): the tokenising
    lane makes none of it; the grammar lane makes it and finds the grammar cached when it is sent again. A short key
    is still looked up in the tokenising lane."""
    serving, looked_up, compiles = real
    monkeypatch.setattr(structured, "KEY_CHARS", 200)
    strict = {**TOOL["function"], "strict": True}
    described = {**strict, "parameters": {"type": "object", "description": "d" * 300}}
    long = {"messages": USER, "tools": [{"type": "function", "function": described}], "tool_choice": "required"}
    first = structured.output_grammar(serving, parse_chat_request(long, None)).grammar
    assert looked_up == [(None, None)] and compiles == [structured._made]
    assert structured.output_grammar(serving, parse_chat_request(long, None)).grammar is first
    assert looked_up == [(None, None)] * 2 and compiles == [structured._made] * 2
    short = {**long, "tools": [{"type": "function", "function": strict}]}
    made = structured.output_grammar(serving, parse_chat_request(short, None)).grammar
    assert structured.output_grammar(serving, parse_chat_request(short, None)).grammar is made
    assert looked_up[-1][1] is made and len(compiles) == 3


JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
STRICT_TOOL = {"type": "function", "function": {**TOOL["function"], "strict": True}}
LENIENT_TOOL = {"type": "function", "function": {**TOOL["function"], "strict": False}}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [TOOL], "tool_choice": "required"}, "tools"),
    ({"tools": [TOOL], "tool_choice": "required", "response_format": JSON_FORMAT}, "tools"),
    ({"tools": [STRICT_TOOL]}, "tools"),
    ({"tools": [STRICT_TOOL], "response_format": JSON_FORMAT}, "tools"),  # either may have erred
    ({"tools": [LENIENT_TOOL], "response_format": JSON_FORMAT}, "response_format"),  # its calls: any JSON object
    ({"response_format": JSON_FORMAT}, "response_format"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs.regex"),
    ({"guided_choice": ["a", "b"]}, "guided_choice"),
    ({"tools": [LENIENT_TOOL]}, None),  # free text and free calls: no grammar
], ids=["forced", "forced_format", "strict_auto", "strict_auto_format", "lenient_auto_format", "format", "regex",
        "guided_choice", "free"])
def test_the_grammar_made_names_the_field_that_asked_for_it(real: tuple[Serving, list[Any], list[Any]],
                                                            fields: dict[str, Any], param: str | None) -> None:
    """The param of the request's failure mid-answer is the field whose grammar was made, told by the branch that made
    it (grammar_field re-derived it from the request beside output_grammar: a second home for the decision)."""
    serving, _, _ = real
    params = SamplingParams()
    structured.compiled(structured.output_grammar, serving, parse_chat_request({"messages": USER, **fields}, None),
                        params)
    assert params.grammar_field == param and (params.grammar is None) is (param is None)


class _CountedKeys(dict):
    """A dict that counts the keys a walk reads of it."""

    read = 0

    def items(self) -> Iterator[tuple[str, Any]]:
        for key in self:
            _CountedKeys.read += 1
            yield key, self[key]

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            _CountedKeys.read += 1
            yield key


@pytest.mark.parametrize("value, chars", [
    (10 ** 4_299, 4_300),  # an int's digits, counted 4
    ("é" * 1_000, 6_002),  # `\u00e9` each as json.dumps writes it (ensure_ascii), counted 1
    ("\U0001F600" * 500, 6_002),  # a surrogate pair each, 12
    ("\n" * 1_000, 2_002),
    ('"' * 1_000, 2_002),
], ids=["int", "non-ASCII", "astral", "control", "quotes"])
def test_the_key_walk_counts_what_json_writes(value: Any, chars: int) -> None:
    """_within is at least json.dumps' length (the key is made off the event loop past KEY_CHARS): an int by its
    digits, a string with its escapes (erring high, within a few times)."""
    assert not structured._within([value], chars - 10)
    assert structured._within([value], 4 * chars)


def test_the_key_walk_stops_once_past_its_limit() -> None:
    """A dict of 100,000 keys: each key read until the limit is passed, not all of them summed first."""
    _CountedKeys.read = 0
    assert not structured._within(_CountedKeys((f"k{i}", 0) for i in range(100_000)), 1_000)
    assert _CountedKeys.read < 1_000
