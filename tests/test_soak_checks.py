"""The soak's checks can fail: each fed a made-up fault (no server), and the honest case it must pass."""
from __future__ import annotations

import json
import random
import sys
from collections import Counter
from dataclasses import dataclass

import pytest

from server_process import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "profiles"))
import soak  # noqa: E402
import soak_replicas  # noqa: E402
from soak_background import BackgroundSoak, _order_problem  # noqa: E402
from soak_http import (  # noqa: E402
    REPLICAS_UNAVAILABLE,
    Json,
    Reply,
    Tally,
    answer_problem,
    logprobs_problem,
    tool_call_problem,
)

RESP = "resp_x"


def _stats(served: int, aborted: int, failed: int) -> Json:
    return {"requests_served": served, "requests_aborted": aborted, "requests_failed": failed}


def _tally(seen: dict[str, int], may_count: int) -> Tally:
    return Tally(seen=Counter(seen), may_count=may_count)


def _events(types: list[str], after: int = -1) -> list[Json]:
    return [{"type": t, "sequence_number": after + 1 + i, "code": "events_dropped"} for i, t in enumerate(types)]


def _error(status: int, param: str | None) -> Reply:
    body = {"error": {"message": "no", "type": "invalid_request_error", "param": param, "code": None}}
    return Reply(status, {}, json.dumps(body).encode())


@dataclass
class MadeUpGets(BackgroundSoak):
    """A BackgroundSoak whose GETs are made up: the run's status is `state` (None: deleted)."""

    state: str | None = "completed"

    def status(self, response_id: str) -> str | None:
        return self.state

    def wait_ended(self, response_id: str, timeout: float = 0) -> str | None:
        return self.state


@pytest.fixture
def background() -> MadeUpGets:
    return MadeUpGets(port=0, tally=Tally(), long_tokens=16)


def test_count_problems_flags_made_up_stats() -> None:
    tally = _tally({"served": 3, "aborted": 1}, may_count=6)
    assert soak.count_problems(_stats(10, 0, 0), _stats(13, 1, 0), tally) == []
    fewer = soak.count_problems(_stats(10, 0, 0), _stats(12, 1, 0), tally)  # one served the clients saw, uncounted
    assert fewer == ["/stats counted 2 requests served, the clients saw 3"]
    more = soak.count_problems(_stats(10, 0, 0), _stats(14, 2, 1), tally)  # 7 finished of at most 6 sent
    assert len(more) == 1 and "7 requests finished" in more[0] and "at most 6" in more[0]


@pytest.mark.parametrize("busy", ["active_requests", "queue_length", "kv_cache_usage", None])
def test_drained_flags_a_server_still_busy(busy: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """soak.py's and soak_replicas.py's check after a round: a request running or waiting, or a KV block held, once
    idle_stats gave up waiting, is a problem naming the server; the round keeps the drained figures."""
    stats = {key: 0 for key in soak.DRAINED_KEYS} | {"workers": [{"pid": 1}]} | ({busy: 1} if busy else {})
    monkeypatch.setattr(soak, "idle_stats", lambda url: stats)
    after = soak.drained("http://127.0.0.1:1", "replica b")
    assert after.stats == stats and after.figures == {key: stats[key] for key in soak.DRAINED_KEYS}
    assert after.problems == ([f"replica b not drained: {after.figures}"] if busy else [])


def test_order_problem_flags_gaps_and_openings() -> None:
    assert _order_problem(_events(["response.created", "response.in_progress"]), -1) is None
    assert _order_problem(_events(["response.output_text.delta"], after=4), 4) is None
    assert _order_problem([], 4) is None  # starting_after at the run's last event
    assert _order_problem([], -1) is not None
    assert _order_problem(_events(["response.in_progress"]), -1) is not None
    gap = _events(["response.created", "response.in_progress", "response.completed"])
    gap[2]["sequence_number"] = 3
    assert _order_problem(gap, -1) is not None


def test_stream_problem_flags_a_cut_stream(background: MadeUpGets) -> None:
    whole = _events(["response.created", "response.output_text.delta", "response.completed"])
    assert background._stream_problem(whole, -1, RESP) is None
    assert background._stream_problem(_events(["error"], after=7), 7, RESP) is None  # events_dropped: left behind
    cut = whole[:2]
    assert background._stream_problem(cut, -1, RESP) is not None  # completed, yet no end event
    background.state = "cancelled"
    assert background._stream_problem(cut, -1, RESP) is None  # a cancelled run has no end event of its own
    assert background._stream_problem([], -1, RESP) is not None  # not even response.created
    background.state = "completed"
    assert background._stream_problem([], 5, RESP) is None  # starting_after at or past its last event
    background.state = "in_progress"
    assert background._stream_problem([], 5, RESP) is not None  # ended while the run goes on


def test_follow_refusal_problem_flags_wrong_refusals(background: MadeUpGets) -> None:
    assert background._follow_refusal_problem(_error(404, None), RESP, -1, may_be_deleted=True) is None
    assert background._follow_refusal_problem(_error(404, None), RESP, -1, may_be_deleted=False) is not None
    assert background._follow_refusal_problem(_error(400, "starting_after"), RESP, 3, False) is None
    assert background._follow_refusal_problem(_error(400, "stream"), RESP, 3, False) is None  # ended: events gone
    background.state = "in_progress"
    assert background._follow_refusal_problem(_error(400, "stream"), RESP, 3, False) is not None  # kept while it runs
    assert background._follow_refusal_problem(_error(400, "input"), RESP, 3, False) is not None
    assert background._follow_refusal_problem(Reply(500, {}, b"Internal Server Error"), RESP, 3, True) is not None
    assert background._follow_refusal_problem(Reply(404, {}, b"not found"), RESP, 3, True) is not None  # no envelope


def _tool_stream(arguments: list[str]) -> Reply:
    """A streamed chat answer calling the soak's strict get_weather in two chunks, its arguments cut in `arguments`."""
    def delta(index: int, piece: str) -> Json:
        head = {"id": "call_0", "type": "function", "function": {"name": "get_weather"}} if index == 0 else {}
        function = {**head.get("function", {}), "arguments": piece}
        return {"role": "assistant", "tool_calls": [{"index": 0, **head, "function": function}]}
    chunks = [{"id": "chatcmpl-x", "choices": [{"index": 0, "delta": delta(i, piece),
                                                "finish_reason": "tool_calls" if i == len(arguments) - 1 else None}]}
              for i, piece in enumerate(arguments)]
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    return Reply(200, {"content-type": "text/event-stream"}, body.encode())


@pytest.mark.parametrize("arguments, problem", [
    (['{"city": "Pa', 'ris"}'], None),
    (['{"city": "Pa', 'ris", "zone": "utc"}'], "Additional properties"),  # additionalProperties: false
    (['{"city": "Llanfairpwll', 'gwyngyll"}'], "too long"),  # maxLength 12
    (['{"city": "Pa', 'ris"'], "not JSON"),
])
def test_strict_tool_stream_checks_read_its_chunks_once(arguments: list[str], problem: str | None) -> None:
    reply = _tool_stream(arguments)
    assert answer_problem(reply, True, 1) is None  # well formed, whatever its arguments
    parsed = reply.chunks
    found = tool_call_problem(reply, soak.STRICT_TOOLS)
    assert reply.chunks is parsed  # the SSE body parsed once for both checks
    assert found is None if problem is None else problem in found


def test_a_stream_ending_tool_calls_without_a_call_is_flagged() -> None:
    reply = _tool_stream(['{"city": "Pa', 'ris"}'])
    reply.body = reply.body.replace(b'"tool_calls": [', b'"content": "", "x": [')  # the same stream, no call
    assert answer_problem(reply, True, 1) is None
    assert tool_call_problem(reply, soak.STRICT_TOOLS) == "choices [0] end tool_calls without a call"


def test_a_preempting_mode_that_preempted_nothing_is_flagged() -> None:
    def rounds(preemptions: int) -> list[soak.RoundResult]:
        drained = {"preemptions": preemptions}
        return [soak.RoundResult(1.0, 1, {}, [], 1.0, 1.0, 1.0, 1.0, (), [7], 100.0, drained, {}, {})]

    assert soak.soak_problems(rounds(0), 300, 48, preempts=True) == [
        "no request was preempted: the mode soaked nothing it is for"]
    assert soak.soak_problems(rounds(3), 300, 48, preempts=True) == []
    assert soak.soak_problems(rounds(0), 300, 48) == []


def test_a_held_loop_is_flagged_and_the_machines_load_is_not() -> None:
    """The /health bound is on the polls less the CPU waits (Poll.held): a round whose polls took long only while the
    loop's thread waited for a CPU passes; one whose loop was held fails, naming the longest holds."""
    def round_of(wall_p99: float, held_p99: float) -> soak.RoundResult:
        return soak.RoundResult(1.0, 1, {}, [], 1.0, wall_p99, wall_p99, held_p99, ((held_p99 / 1e3, 0.9, 0.0),),
                                [7], 100.0, {"preemptions": 0}, {}, {})

    assert soak.soak_problems([round_of(900.0, 40.0)], 300, 48) == []
    assert soak.soak_problems([round_of(900.0, 450.0)], 300, 48) == [
        "round 0: /health held p99 450 ms (wall p99 900 ms), the longest (held, wall, loop CPU s): ((0.45, 0.9, 0.0),)"]


def _logprobs_reply(content: str, tokens: list[str], finish: str, stream: bool) -> Reply:
    entries = [{"token": t, "bytes": list(t.encode()), "logprob": -1.0, "top_logprobs": []} for t in tokens]
    if not stream:
        choice = {"index": 0, "message": {"content": content}, "logprobs": {"content": entries},
                  "finish_reason": finish}
        return Reply(200, {}, json.dumps({"choices": [choice]}).encode())
    chunks = [{"choices": [{"index": 0, "delta": {"content": content[:1]}, "logprobs": {"content": entries[:1]}}]},
              {"choices": [{"index": 0, "delta": {"content": content[1:]}, "logprobs": {"content": entries[1:]}}]},
              {"choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}]
    return Reply(200, {}, "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("content,tokens,stops,finish,ok", [
    ("hello wor", ["hel", "lo", " world"], True, "stop", True),  # the last token runs on into the stop string "ld"
    ("hello", ["hel", "lo"], True, "stop", True),
    ("hello", ["hel", "lo", ""], True, "stop", True),  # a last token of no bytes (an id past the tokenizer's)
    ("", [], True, "stop", True),
    ("hello wor", ["hel", "lo", " wor", "ld"], True, "stop", False),  # a token the stop string cut away whole
    ("hello wor", ["hel", " wor"], True, "stop", False),  # one lost
    ("hello", ["hel", "lo", "lo"], True, "stop", False),  # one twice
    ("", ["x"], True, "stop", False),
    ("hello", ["hel", "lo"], False, "length", True),
    ("hello wor", ["hel", "lo", " world"], False, "length", False),  # no stop string: the tokens are the content
    ("hello wor", ["hel", "lo", " world"], True, "length", False),  # a held tail lost at a length finish
    ("hell", ["hel", "lo"], False, "stop", False),  # ended by <|im_end|>: every token is in the content
])
def test_logprobs_problem_finds_tokens_that_do_not_spell_the_content(content: str, tokens: list[str], stops: bool,
                                                                     finish: str, ok: bool, stream: bool) -> None:
    reply = _logprobs_reply(content, tokens, finish, stream)
    assert (logprobs_problem(reply, stream, stops) is None) == ok


def _unavailable(code: str | None) -> Reply:
    return Reply(503, {}, json.dumps({"error": {"message": "no", "type": "server_error", "param": None,
                                                "code": code}}).encode())


@pytest.mark.parametrize(("code", "server", "replicas"), [
    ("queue_full", True, True), ("model_loading", False, True), ("no_replica", False, True),
    ("internal_error", False, False), (None, False, False)])
def test_only_the_documented_503s_pass(code: str | None, server: bool, replicas: bool) -> None:
    """One server at capacity: the 503 its client may get (a soak waits for its model, and never restarts it); through
    nginx to replicas also a replica loading (restarted) and nginx with every replica down. Any other is flagged."""
    assert (answer_problem(_unavailable(code), False, 1) is None) is server
    assert (answer_problem(_unavailable(code), False, 1, REPLICAS_UNAVAILABLE) is None) is replicas


@pytest.mark.parametrize("code", ["model_loading", "no_replica"])
def test_only_the_replicas_soak_takes_their_503s(code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """soak.py's scenarios on one server flag a 503 that only replicas behind nginx answer; soak_replicas.py's, through
    nginx, pass it. Each scenario that sends one request, answered that 503."""
    monkeypatch.setattr(soak, "send", lambda port, raw, timeout=120: _unavailable(code))
    for kind, problems in ((soak.Soak, 6), (soak_replicas.ReplicaSoak, 0)):
        scenarios = kind(0, Tally(), "probe")
        for scenario in (scenarios.valid, scenarios.responses, scenarios.probe, scenarios.fuzz,
                         scenarios.wrong_request, scenarios.oversized):
            scenario(random.Random(0))
        assert len(scenarios.tally.problems) == problems, (kind, scenarios.tally.problems)
