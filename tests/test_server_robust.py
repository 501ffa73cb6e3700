"""Hostile load through a real gunicorn server: what the soak (profiles/soak.py) found, and a short soak."""
from __future__ import annotations

import copy
import gc
import json
import pickle
import random
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

import chat_http
from chat_http import HELD_S, MODEL, Poll, cpu_env, health_polled, most_held, post_chat
from checkpoints import make_checkpoint
from nanoqwen import worker
from nanoqwen.api import encode
from nanoqwen.api.strict_json import MAX_SEPARATORS
from nanoqwen.engine import Engine, EngineConfig
from server_process import REPO_ROOT, GunicornServer

sys.path.insert(0, str(REPO_ROOT / "profiles"))
import soak  # noqa: E402
from soak_store import StoreSoak  # noqa: E402

USER = [{"role": "user", "content": "Tell me a story about a robot."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """Its own server: the soak sizes "past the context" for cpu_env's 512 tokens, reads /stats to see the
    server drained, and leaves it under hostile load that no other module's tests should inherit."""
    with GunicornServer(cpu_env(make_checkpoint()), tmp_path_factory.mktemp("robust") / "gunicorn.log") as srv:
        yield srv


Answers = list[requests.Response]


def _while_health_polled(srv: GunicornServer, send: Callable[[], Answers]) -> tuple[Answers, list[Poll]]:
    """What send() answers, and the /health polls meanwhile."""
    with health_polled(srv, 0.005) as polls:
        answers = send()
    return answers, polls


def test_bodies_of_many_tiny_values_are_refused_before_parsing(server: GunicornServer) -> None:
    """Under 8 MiB but a million values: parsed and validated on the loop they held it for 1-5 s.
    Past 8 MiB: gunicorn read the rest of the body after the 413 (to reuse the connection) without
    letting the loop run, 1.8 s for 9 MiB."""
    url = server.url
    wide = json.dumps({f"k{i}": 1 for i in range(400_000)})
    ids = json.dumps({"model": MODEL, "prompt": [1] * 1_000_000, "max_tokens": 1})
    messages = json.dumps({"model": MODEL, "messages": USER * 100_000, "max_tokens": 1})

    def send() -> Answers:
        headers = {"Content-Type": "application/json"}
        bodies = [("/v1/chat/completions", wide), ("/v1/completions", ids), ("/v1/completions", "1" * (9 << 20)),
                  ("/detokenize", ids.replace("prompt", "tokens")), ("/v1/chat/completions", messages)]
        return [requests.post(f"{url}{path}", data=data, headers=headers, timeout=60) for path, data in bodies]

    answers, polls = _while_health_polled(server, send)
    for answer in answers:
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "request_too_large"
    assert max(p.held for p in polls) < HELD_S, most_held(polls)
    # a whole context as token ids is within the limit (here it is past the test model's context)
    full = {"model": MODEL, "prompt": [1] * (MAX_SEPARATORS - 100), "max_tokens": 1}
    refused = requests.post(f"{url}/v1/completions", json=full, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    # commas and colons inside strings are not values
    text = {"model": MODEL, "messages": [{"role": "user", "content": 'a, "b": \\c, ' * (MAX_SEPARATORS // 2)}],
            "max_tokens": 1}
    assert post_chat(server, text).json()["error"]["code"] == "context_length_exceeded"


def test_a_large_answer_is_whole_and_health_stays_fast(server: GunicornServer) -> None:
    """An answer past serving.LARGE_ANSWER objects is whole, and /health is not held meanwhile by more than HELD_S
    (a blocking call on its path). That it is built off the loop is checked in process (test_api_responses'
    large collected answer): built on the loop it takes < 50 ms here, which no /health bound can tell from load."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 64, "n": 2, "logprobs": True, "top_logprobs": 20,
            "ignore_eos": True, "temperature": 0}
    answers, polls = _while_health_polled(server, lambda: [post_chat(server, body)])
    (answer,) = answers
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    choices = answer.json()["choices"]
    assert [len(c["logprobs"]["content"]) for c in choices] == [64] * 2
    assert all(len(t["top_logprobs"]) == 20 for c in choices for t in c["logprobs"]["content"])
    assert len({c["message"]["content"] for c in choices}) == 1  # greedy: every choice the same
    assert max(p.held for p in polls) < HELD_S, most_held(polls)


def test_encode_json_is_flasks_output_in_small_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from flask import Flask

    app = Flask("t")
    app.json.sort_keys = False
    app.json.ensure_ascii = False
    entry = {"token": "é\u2028", "logprob": -0.5, "bytes": [195, 169], "top_logprobs": [{"token": "x"}] * 20}
    logprobs = {"content": [entry] * 50, "top_logprobs": [None, *[entry] * 30]}  # echo's start with None
    answer = {"id": "x", "choices": [{"index": i, "message": {"content": "ü"}, "logprobs": logprobs} for i in range(3)],
              "usage": None, "empty": [], "nested": [[{"a": [{}]}]]}
    calls: list[str] = []
    dumps = encode.compact_json
    monkeypatch.setattr(encode, "compact_json", lambda value: calls.append(dumps(value)) or calls[-1])
    with app.app_context():
        assert encode.encode_json(answer) == app.json.response(answer).get_data()
    assert max(map(len, calls)) == len(dumps(entry))  # one token's entry per call at most
    with pytest.raises(TypeError):  # not `{1:[{}]}`, which is not JSON
        encode.encode_text({1: [{}]})


def test_an_encoded_list_does_not_change() -> None:
    """Its json is written wherever it is encoded (a response's echoed tools): a change would not reach it."""
    items = [{"a": 1}, {"b": 2}]
    encoded = encode.EncodedList(items)
    changes: list[Callable[[list], object]] = [
        lambda x: x.append(3), lambda x: x.extend([3]), lambda x: x.insert(0, 3), lambda x: x.remove(items[0]),
        lambda x: x.pop(), lambda x: x.clear(), lambda x: x.sort(key=str), lambda x: x.reverse(),
        lambda x: x.__setitem__(0, 3), lambda x: x.__delitem__(0), lambda x: x.__iadd__([3]), lambda x: x.__imul__(2)]
    for change in changes:
        with pytest.raises(TypeError):
            change(encoded)
    assert encoded == items and encode.encode_text({"e": encoded}) == f'{{"e":{encode.compact_json(items)}}}'
    for copied in (copy.copy(encoded), copy.deepcopy(encoded), pickle.loads(pickle.dumps(encoded))):
        assert type(copied) is encode.EncodedList and copied == items and copied.json == encoded.json


def test_the_loaded_model_is_frozen_out_of_the_collector() -> None:
    """The worker's hook freezes what the load left, in the engine thread before requests are let in."""
    # the default kernel cache, as every engine test's: an empty one is a cold build of every C kernel wherever this
    # process has built none yet (alone, or a worker's first in-process load: 66-96 s on the 2-core Zen 3)
    engine = Engine(EngineConfig(model=str(make_checkpoint()), device="cpu", dtype="float32", graph="none",
                                 kernels="torch"))
    ready_at_freeze = []

    def freeze() -> None:
        ready_at_freeze.append(engine.ready)
        worker._freeze_loaded_objects()

    gc.unfreeze()
    try:
        engine.load(before_ready=freeze)
        assert ready_at_freeze == [False] and engine.ready
        assert gc.get_freeze_count() > 10_000  # torch, the tokenizer and the model's objects
    finally:
        gc.unfreeze()


def test_short_soak(server: GunicornServer) -> None:
    """profiles/soak.py for two short rounds (background responses and bursts of strict-tool streams among them): every
    invariant it checks holds."""
    answer = soak.greedy_probe(server.url)
    # the stored chat traffic left out: in 5 s rounds its share would crowd out the scenarios asserted below
    rounds = [soak.run_round(server, answer, seconds=5, clients=6, seed=seed, long_tokens=24, tool_weight=8,
                             store_weight=0) for seed in range(2)]
    assert soak.soak_problems(rounds, health_p99_ms=300, rss_growth_mb=48) == []
    assert sum(r.requests for r in rounds) > 30
    scenarios = {key.split()[0] for r in rounds for key in r.statuses}
    assert {"valid", "fuzz", "disconnect", "bg-room"} <= scenarios
    assert {"tool-stream", "tool-reset"} & scenarios
    assert any(s.startswith("bg-") and s != "bg-room" for s in scenarios)  # the clients' background traffic


def test_the_store_soak_s_traffic_leaves_the_store_consistent(server: GunicornServer) -> None:
    """profiles/soak_store.py's scenarios one after another (stored completions made streamed or not, some left
    mid-stream, listed, retrieved, updated, deleted), then its settle (the auto-pager walked while ids are deleted;
    every listed id readable, none twice, none lost): no problem, and each kind of request was made."""
    tally = soak.Tally()
    store = StoreSoak(server.port, tally)
    rng = random.Random(31)
    for _ in range(40):
        store.scenario(rng)
    store.settle()
    assert tally.problems == []
    assert {"store-create", "store-list", "store-delete"} <= {key.split()[0] for key in tally.statuses}
    assert store.whole  # completions read whole were kept (and listed: settle checks it)


def test_the_soaks_continuations_answer_the_calls_they_continue(server: GunicornServer) -> None:
    """A stored response holding a call, continued as the soak's Responses clients do (by previous_response_id and by
    item references): each continuation answers the call, as OpenAI requires, and so is served."""
    earlier = requests.post(f"{server.url}/v1/responses", timeout=120, json={
        "model": MODEL, "input": "Weather in Paris?", "tools": soak.RESPONSES_TOOLS, "tool_choice": "required",
        "reasoning": {"effort": "none"}, "max_output_tokens": 16, "temperature": 0}).json()
    assert [item["type"] for item in earlier["output"]] == ["function_call"]
    ways = set()
    for seed in range(6):
        body = soak.response_body(random.Random(seed), earlier) | {"stream": False}
        ways.add("previous_response_id" in body)
        reply = requests.post(f"{server.url}/v1/responses", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
    assert ways == {True, False}


def test_an_error_gunicorn_answers_with_an_unknown_status_keeps_its_reason() -> None:
    """HTTPStatus(599) raised inside gunicorn's error handler: the client got no answer at all."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        worker.write_json_error(ours, 599, "Odd Status", "odd")
        ours.shutdown(socket.SHUT_WR)
        head = theirs.recv(65536).split(b"\r\n")[0]
    assert head == b"HTTP/1.1 599 Odd Status"


def test_connections_idle_at_the_limit_make_room_for_a_new_one(tmp_path: Path) -> None:
    """worker_connections connections that send nothing (or half a head) held every slot for the keep-alive timeout
    (75 s), and a new client, /health's too, waited that long in the listen backlog: now the one idle longest goes."""
    slots = 8
    args = ("--worker-connections", str(slots))
    with GunicornServer(cpu_env(make_checkpoint()), tmp_path / "gunicorn.log", args=args) as srv:
        busy = socket.create_connection(("127.0.0.1", srv.port), timeout=30)  # a request in flight is not idle
        busy.sendall(chat_http.raw_request({"model": MODEL, "messages": USER, "max_tokens": 400, "stream": True,
                                            "ignore_eos": True}))
        head = b""
        while b"\r\n" not in head:
            head += busy.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=30) for _ in range(slots - 2)]
        idle[-1].sendall(b"GET /health HTTP/1.1\r\n")  # half a head
        with requests.Session() as session:  # a keep-alive connection, idle after its answer: every slot taken
            assert session.get(f"{srv.url}/health", timeout=30).status_code == 200
            for _ in range(3):
                assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200  # waited 75 s
        assert chat_http.server_stats(srv)["active_requests"] == 1  # busy's stream ran on while room was made
        assert idle[0].recv(1) == b""  # the oldest idle connection was closed
        received = b""
        while b"data: [DONE]" not in received and (chunk := busy.recv(1 << 16)):
            received += chunk
        assert b"data: [DONE]" in received, received[-300:]  # the stream went on to its end, never closed as idle
        for sock in [busy, *idle]:
            sock.close()
