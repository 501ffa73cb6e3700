"""A large body's JSON parse and its validation run in the offload threads, never on the event loop's: 8 MiB of
JSON took ~130 ms to parse and 16,000 messages ~60 ms to validate there, holding every stream and /health. So does a
large Responses request's conversion to a chat request (~200 ms for 16,000 items), with its truncation's search."""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from functools import partial, wraps
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from checkpoints import make_checkpoint
from engine_util import load_engine, started_engine
from nanoqwen.api import (
    chat,
    chat_store,
    chat_stored_api,
    completions,
    encode,
    offload,
    responses_api,
    serving,
    tokenize,
)
from nanoqwen.api.app import create_app
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.errors import APIError
from nanoqwen.api.responses_schemas import ResponsePromptFields
from nanoqwen.api.schemas import ChatPrompt, Tool
from nanoqwen.api.serving import LARGE_TOOL_VALUES
from nanoqwen.engine import Engine, EngineConfig

MESSAGES = [{"role": "user", "content": "hi"}] * 5000  # ~10,000 values, 125 kB
PAD = "x" * (1 << 17)  # one string: many characters, few values


def _record_threads(monkeypatch: pytest.MonkeyPatch, seen: dict[str, list[int]], owner: Any, name: str) -> None:
    """owner.name records in seen[name] the thread of each call."""
    fn: Callable[..., Any] = getattr(owner, name)

    @wraps(fn)
    def wrapper(*args: Any) -> Any:
        seen.setdefault(name, []).append(threading.get_ident())
        return fn(*args)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture()
def threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[int]]]:
    """The thread each parse and validation ran on, by function, recorded while the app serves."""
    seen: dict[str, list[int]] = {}
    recorded = partial(_record_threads, monkeypatch, seen)
    recorded(serving, "parse_json")
    recorded(chat, "parse_chat_request")
    recorded(completions, "parse_completion_request")
    recorded(responses_api, "parse_responses_request")
    recorded(responses_api, "parse_count_request")
    recorded(tokenize, "validate_body")
    yield seen


@pytest.mark.parametrize(("path", "body", "validation"), [
    ("/v1/chat/completions", {"messages": MESSAGES}, "parse_chat_request"),
    ("/v1/completions", {"prompt": [100] * 20000}, "parse_completion_request"),
    ("/v1/responses", {"input": MESSAGES}, "parse_responses_request"),
    ("/v1/responses/input_tokens", {"input": MESSAGES}, "parse_count_request"),
    ("/tokenize", {"messages": MESSAGES}, "validate_body"),
    ("/detokenize", {"tokens": [100] * 20000}, "validate_body"),
])
def test_a_body_of_many_values_is_parsed_and_validated_off_the_loop(
        tmp_path: Path, threads: dict[str, list[int]], path: str, body: dict[str, Any], validation: str) -> None:
    client = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig()).test_client()
    small = {k: v[:1] for k, v in body.items()}
    assert client.post(path, json=small).status_code == 503  # validated, then the model is still loading
    assert client.post(path, json=body).status_code == 503
    loop = threading.get_ident()
    assert threads["parse_json"][0] == loop and threads[validation][0] == loop  # a small body: no hand-off
    assert threads["parse_json"][1] != loop and threads[validation][1] != loop


def test_a_long_body_of_few_values_is_parsed_off_the_loop_and_validated_on_it(
        tmp_path: Path, threads: dict[str, list[int]]) -> None:
    client = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig()).test_client()
    assert client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PAD}]}).status_code == 503
    loop = threading.get_ident()
    assert len(threads["parse_json"]) == 1 and loop not in threads["parse_json"]
    assert threads["parse_chat_request"] == [loop]


def test_an_everyday_body_is_parsed_and_validated_on_the_loop(tmp_path: Path, threads: dict[str, list[int]]) -> None:
    """1,100 token ids validate in ~0.1 ms: handed to the long prompts' thread they would queue behind long prompts
    (or get its 503 when it is full)."""
    client = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig()).test_client()
    assert client.post("/v1/completions", json={"prompt": [100] * 1100}).status_code == 503
    loop = threading.get_ident()
    assert threads["parse_json"] == [loop] and threads["parse_completion_request"] == [loop]


def _tools(count: int, values: int) -> list[dict[str, Any]]:
    """`count` chat tools whose parameters hold about `values` values between them."""
    parameters = {"type": "object", "properties": {f"p{j}": {"type": "string"} for j in range(values // (2 * count))}}
    return [{"type": "function", "function": {"name": f"f{i}", "parameters": parameters}} for i in range(count)]


def _pools(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The max_pending of the pool each function handed off ran in, by function name, recorded while the app serves:
    which lane it took (ServerConfig's default prompts' and long prompts' differ)."""
    seen: dict[str, list[int]] = {}
    run = offload.NativePool.run

    def recorded(pool: offload.NativePool, fn: Callable[..., Any], *args: Any) -> Any:
        seen.setdefault(getattr(fn, "__name__", ""), []).append(pool.max_pending)
        return run(pool, fn, *args)

    monkeypatch.setattr(offload.NativePool, "run", recorded)
    return seen


def test_a_chat_request_of_many_tool_values_is_validated_in_the_tokenising_threads(
        tmp_path: Path, threads: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """LARGE_TOOL_VALUES values under its tools, far under the body's bound of values: each tool validated and measured
    as the request parses (1-5 us a value), a small job each for the tokenising threads, never queued behind long
    prompts (agents send 64 tools and more routinely). 64 tiny tools stay on the loop, 2 large ones leave it."""
    pools = _pools(monkeypatch)
    client = create_app(Engine(EngineConfig(model=str(tmp_path))), ServerConfig()).test_client()
    for tools in (_tools(64, LARGE_TOOL_VALUES // 4), _tools(2, LARGE_TOOL_VALUES)):
        body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
        assert client.post("/v1/chat/completions", json=body).status_code == 503
    loop = threading.get_ident()
    assert threads["parse_chat_request"][0] == loop and threads["parse_chat_request"][1] != loop
    assert pools == {"parse_chat_request": [ServerConfig().max_pending_prompts]}, pools


def test_a_large_requests_template_inputs_are_made_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its messages and tools turned into the template's inputs, and its tools dumped to weigh the prompt, in the
    threads (16,000 messages: ~35 ms; 8 MiB of tools: ~25 ms on the loop)."""
    recorded: dict[str, list[int]] = {}
    for name in ("template_messages", "template_tools"):
        _record_threads(monkeypatch, recorded, ChatPrompt, name)
    _record_threads(monkeypatch, recorded, Tool, "template")  # each tool's dump and size, weighed and templated
    engine = load_engine(make_checkpoint())
    try:
        client = create_app(engine, ServerConfig()).test_client()
        tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d"}} for i in range(1200)]
        answer = client.post("/v1/chat/completions", json={"messages": MESSAGES[:1200], "tools": tools})
    finally:
        engine.shutdown()
    assert answer.status_code == 400 and answer.json["error"]["code"] == "context_length_exceeded"
    assert sorted(recorded) == ["template", "template_messages", "template_tools"]
    assert not any(threading.get_ident() in threads for threads in recorded.values())


@pytest.fixture(scope="module")
def served() -> Iterator[FlaskClient]:
    """The app of a started engine (1024-token context): 5,000 "hi" messages are too long for it."""
    engine = started_engine(make_checkpoint(), graph="none", kernels="torch", max_batch=4, max_model_len=1024)
    try:
        yield create_app(engine, ServerConfig()).test_client()
    finally:
        engine.shutdown()


@pytest.fixture()
def conversing(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The thread each step of a Responses request's conversation ran on, by step, recorded while the app serves:
    its references resolved, its items checked and made a chat request of (the whole, and a truncation's candidates),
    its prompts templated, its input items encoded to be stored, its tools made as the response echoes them."""
    seen: dict[str, list[int]] = {}
    recorded = partial(_record_threads, monkeypatch, seen)
    recorded(responses_api.ResponsesService, "_resolved")
    recorded(responses_api, "check_items")
    recorded(ResponsePromptFields, "to_chat")
    recorded(ChatPrompt, "template_messages")
    recorded(responses_api, "_stored_inputs")
    recorded(responses_api, "echoed_tools")
    return seen


def _create(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    answer = client.post("/v1/responses", json={"max_output_tokens": 16, "truncation": "auto", **body})
    assert answer.status_code == 200, answer.json
    return answer.json


def test_a_large_responses_conversation_is_made_off_the_loop(
        served: FlaskClient, conversing: dict[str, list[int]]) -> None:
    """5,000 items (10,000 values): references resolved, checked, made a chat request of, searched for the items that
    fit (each candidate a chat request, templated where it is made), encoded for the store and the tools made as
    echoed, all in the long prompts' thread."""
    _create(served, {"input": MESSAGES})
    loop = threading.get_ident()
    assert set(conversing) == {"_resolved", "check_items", "to_chat", "template_messages", "_stored_inputs",
                               "echoed_tools"}
    assert len(conversing["to_chat"]) > 2 and not any(loop in threads for threads in conversing.values()), conversing


def test_a_responses_request_of_many_tool_values_is_made_off_the_loop(
        served: FlaskClient, conversing: dict[str, list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """LARGE_TOOL_VALUES values under its tools, far under the body's bound of values: each tool validated as chat's
    and measured when the request is made a chat request of (300 small ones: 17-34 ms), in the tokenising threads
    (never queued behind long prompts); its prompt templated where its length takes it. (It passes the 1,024-token
    context.)"""
    pools = _pools(monkeypatch)
    tools = [{"type": "function", **tool["function"]} for tool in _tools(2, LARGE_TOOL_VALUES)]
    answer = served.post("/v1/responses", json={"input": "hi", "tools": tools, "max_output_tokens": 16})
    assert answer.status_code == 400 and answer.json["error"]["code"] == "context_length_exceeded", answer.json
    loop = threading.get_ident()
    assert conversing["to_chat"] and loop not in conversing["to_chat"], conversing
    short = ServerConfig().max_pending_prompts  # beside them, the output grammar's lookup (_looked_up) and compile
    assert [pools[name] for name in ("parse_responses_request", "_conversation", "encode_here")] == [[short]] * 3, pools


def test_a_large_responses_request_takes_two_trips_to_the_long_prompts_thread(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """After its body's parse and validation: one to resolve and convert its items, one to fit its prompt (templated
    there) and encode its items for the store (an output grammar's compile, in its own pool, would come between
    them: after the conversation's errors, before any templating)."""
    runs: list[str] = []
    run = offload.NativePool.run

    def recorded(pool: offload.NativePool, fn: Callable[..., Any], *args: Any) -> Any:
        runs.append(getattr(fn, "__name__", ""))
        return run(pool, fn, *args)

    monkeypatch.setattr(offload.NativePool, "run", recorded)
    _create(served, {"input": MESSAGES})
    assert runs == ["parse_json", "parse_responses_request", "_conversation", "prompt"], runs


@pytest.mark.parametrize("stream", [False, True])
def test_a_stored_responses_input_items_are_encoded_once(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    """As input_items lists them and joined into the history a continuation reads, kept finished or failed (its
    5,000 input items encoded again with the answer took ~160 ms on the loop)."""
    encoded: list[str] = []
    compact = encode.compact_json

    def recorded(value: Any) -> str:
        if isinstance(value, dict) and str(value.get("text", "")).startswith("once "):
            encoded.append(value["text"])
        return compact(value)

    def broken(*args: Any) -> Any:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(encode, "compact_json", recorded)
    if stream:  # kept as it fails
        monkeypatch.setattr(responses_api.ResponseEvents, "_finish", broken)
    texts = [f"once {i}" for i in range(3)]
    answer = served.post("/v1/responses", json={"max_output_tokens": 16, "stream": stream,
                                                "input": [{"role": "user", "content": text} for text in texts]})
    assert answer.status_code == 200 and (b"response.failed" in answer.get_data()) == stream
    answer.close()
    assert sorted(encoded) == texts


@pytest.mark.parametrize("fields", [{"background": True}, {"store": False}])
def test_a_responses_tools_are_encoded_once(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch, fields: dict[str, bool]) -> None:
    """A background snapshot answered as the store encoded it, a response not stored written with its tools' encoding
    (echoed_tools' inside): Flask encoded them again, 4,000 tools 14-40 ms on the loop. Its status, content type and
    bytes are those Flask wrote."""
    description = "a tool encoded once " * 10
    tools = [{"type": "function", "name": f"f{i}", "description": description} for i in range(3)]
    encoded: list[str] = []
    app = served.application
    compact, dumps = encode.compact_json, app.json.dumps

    def counted(encoder: Callable[..., str], value: Any, **kwargs: Any) -> str:
        text = encoder(value, **kwargs)
        encoded.extend([text] if description in text else [])
        return text

    body = json.dumps({"input": "hi", "max_output_tokens": 16, "tools": tools, **fields})
    monkeypatch.setattr(encode, "compact_json", partial(counted, compact))
    monkeypatch.setattr(app.json, "dumps", partial(counted, dumps))
    answer = served.post("/v1/responses", data=body, content_type="application/json")
    assert len(encoded) == len(tools)  # each tool's description, where echoed_tools encoded the list
    written = answer.get_data()
    with app.app_context():
        flasks = app.json.response(json.loads(written))
    assert (answer.status_code, answer.content_type, written) == (200, flasks.content_type, flasks.get_data())
    if "background" in fields:
        assert json.loads(written)["status"] == "queued"
        assert served.post(f"/v1/responses/{answer.json['id']}/cancel").status_code == 200  # waits for its end
    else:
        assert json.loads(written)["status"] in ("completed", "incomplete")  # max_output_tokens may cut it


def test_an_answer_our_code_broke_is_the_500_its_stream_fails_with(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not streamed, a bug of ours building the answer reaches the app's last handler: its 500 says `server_error` as
    type and code, as the stream's `response.failed` does (its code was null)."""
    def broken(*args: Any) -> Any:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(responses_api.ResponseEvents, "_finish", broken)
    monkeypatch.setattr(responses_api.ResponseCollector, "build", broken)
    body = {"max_output_tokens": 16, "input": "hi", "store": False}
    answer = served.post("/v1/responses", json=body)
    assert answer.status_code == 500 and answer.json["error"] == {
        "message": "Internal server error", "type": "server_error", "param": None, "code": "server_error"}
    failed = next(json.loads(line[len("data: "):]) for line in served.post(
        "/v1/responses", json={**body, "stream": True}).get_data(as_text=True).splitlines()
        if line.startswith("data: ") and '"response.failed"' in line)
    assert failed["response"]["error"]["code"] == answer.json["error"]["code"]


def test_an_unhandled_errors_log_line_escapes_the_path(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The path is percent-decoded: its CR LF wrote a line of the client's choosing into the error log."""
    def broken(*args: Any) -> Any:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(responses_api.ResponsesService, "retrieve", broken)
    with caplog.at_level(logging.ERROR, logger="nanoqwen.api.app"):
        answer = served.get("/v1/responses/x%0D%0A[INFO] ready: FORGED%1B[31m")
    assert answer.status_code == 500
    assert caplog.messages == ["unhandled error on GET /v1/responses/x\\x0d\\x0a[INFO] ready: FORGED\\x1b[31m"]


def test_a_stored_completion_refused_503_leaves_nothing_generating(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a `store: true` request keeps is encoded off the loop for a large body, where a full queue is a 503:
    nothing may have been submitted by then (it was, and generated to max_tokens for nobody)."""
    submitted: list[Any] = []
    enqueue = Engine.enqueue

    def recorded(self: Engine, requests: list[Any]) -> None:
        submitted.append(requests)
        enqueue(self, requests)

    monkeypatch.setattr(Engine, "enqueue", recorded)

    def full(*args: Any) -> Any:
        raise APIError(503, "the server is at capacity, retry later", type="server_error", code="queue_full")

    monkeypatch.setattr(chat_store.StoredRequest, "of", full)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 900, "ignore_eos": True, "store": True}
    answer = served.post("/v1/chat/completions", json=body)
    assert answer.status_code == 503 and answer.json["error"]["code"] == "queue_full"
    assert submitted == []


def test_a_stored_completion_is_encoded_once(served: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept and answered in the same bytes (with logprobs, megabytes encoded twice); those Flask would write."""
    encoded: list[str] = []
    app = served.application
    compact, dumps = encode.compact_json, app.json.dumps

    def counted(encoder: Callable[..., str], value: Any, **kwargs: Any) -> str:
        text = encoder(value, **kwargs)
        encoded.extend([text] if '"chat.completion"' in text else [])  # the answer's `object`
        return text

    monkeypatch.setattr(encode, "compact_json", partial(counted, compact))
    monkeypatch.setattr(app.json, "dumps", partial(counted, dumps))
    answer = served.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 4, "store": True, "logprobs": True})
    assert answer.status_code == 200 and len(encoded) == 1
    written = answer.get_data()
    with app.app_context():
        flasks = app.json.response(json.loads(written))
    assert (answer.content_type, written) == (flasks.content_type, flasks.get_data())
    stored = served.get(f"/v1/chat/completions/{answer.json['id']}").json
    assert {key: value for key, value in stored.items() if key in answer.json} == answer.json


def test_a_large_stored_completion_s_messages_are_paged_off_the_loop(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to 16 MiB of kept messages are parsed for a page (15 MiB held the loop ~0.1 s): off it past the bound of a
    large body (lowered here, as the prompt must fit the context)."""
    seen: dict[str, list[int]] = {}
    _record_threads(monkeypatch, seen, chat_stored_api, "encoded_page")
    created = served.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 2, "store": True}).json
    url = f"/v1/chat/completions/{created['id']}/messages"
    assert served.get(url).json["data"][0]["content"] == "hi"
    monkeypatch.setattr(serving, "LARGE_BODY_CHARS", 10)
    assert served.get(url).json["data"][0]["content"] == "hi"
    loop = threading.get_ident()
    assert seen["encoded_page"][0] == loop and seen["encoded_page"][1] != loop


def test_a_large_stored_responses_input_items_are_paged_off_the_loop(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored response's input items are parsed for a page, as a stored completion's messages: 16,000 items (5 MB,
    kept with truncation auto) took ~20-25 ms of the loop's CPU a page, parsed there whatever their size. Off it past
    the bound of a large body, the page as on it."""
    seen: dict[str, list[int]] = {}
    _record_threads(monkeypatch, seen, responses_api, "encoded_page")
    created = _create(served, {"input": [{"role": "user", "content": "hi"}, {"role": "user", "content": "there"}]})
    url = f"/v1/responses/{created['id']}/input_items?order=asc&limit=1"
    on_loop = served.get(url)
    monkeypatch.setattr(serving, "LARGE_BODY_CHARS", 10)
    off_loop = served.get(url)
    assert on_loop.get_data() == off_loop.get_data() and on_loop.json["data"][0]["content"][0]["text"] == "hi"
    assert on_loop.json["has_more"] and on_loop.content_type == "application/json"
    loop = threading.get_ident()
    assert seen["encoded_page"][0] == loop and seen["encoded_page"][1] != loop


def test_a_request_bringing_in_many_stored_items_is_worked_on_off_the_loop(
        served: FlaskClient, conversing: dict[str, list[int]]) -> None:
    """A small body whose previous response's history holds 5,000 items, or whose item references bring in 80 kB:
    the stored items count (their characters, past LARGE_BODY_CHARS), not the body's few values, each reference its
    item's (resolved at its full size each time; the duplicates are refused after). One reference into a large
    response brings in its one item (parsed alone): worked on on the loop."""
    stored = _create(served, {"input": MESSAGES})
    first_input = served.get(f"/v1/responses/{stored['id']}/input_items?order=asc&limit=1").json["data"][0]["id"]
    one = _create(served, {"input": [{"role": "user", "content": "y" * 2000}]})
    item = served.get(f"/v1/responses/{one['id']}/input_items").json["data"][0]["id"]
    conversing.clear()
    _create(served, {"input": "hi", "previous_response_id": stored["id"]})
    answer = served.post("/v1/responses", json={"input": [{"type": "item_reference", "id": item}] * 40})
    assert answer.status_code == 400 and "Duplicate item" in answer.json["error"]["message"]
    loop = threading.get_ident()
    assert len(conversing["_resolved"]) == 2 and not any(loop in threads for threads in conversing.values())
    conversing.clear()
    _create(served, {"input": [{"type": "item_reference", "id": first_input}, {"role": "user", "content": "hi"}]})
    assert conversing["_resolved"] == [loop]


def test_a_small_responses_conversation_is_made_on_the_loop(
        served: FlaskClient, conversing: dict[str, list[int]]) -> None:
    """A few items: no hand-off (a hand-off costs more than their conversion); the prompt is templated in the
    tokenising threads, as ever."""
    stored = _create(served, {"input": MESSAGES[:3]})
    _create(served, {"input": "hi", "previous_response_id": stored["id"]})
    loop = threading.get_ident()
    assert all(threads == [loop] * len(threads) for name, threads in conversing.items() if name != "template_messages")
    assert len(conversing["to_chat"]) == 2 and loop not in conversing["template_messages"]


@pytest.mark.parametrize(("path", "body", "status", "owner", "check"), [
    ("/detokenize", {"tokens": [*[100] * 20000, 10**9]}, 400, tokenize, "_check_vocabulary"),
    ("/v1/completions", {"prompt": [100] * 500, "echo": True, "max_tokens": 1}, 200, completions, "_echoes"),
])
def test_token_ids_are_checked_against_the_vocabulary_off_the_loop(
        served: FlaskClient, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any], status: int,
        owner: Any, check: str) -> None:
    """/detokenize's ids, and a token-id prompt's to echo, are checked against the vocabulary (by `check`) in the
    thread that decodes them: a loop over 60,000 ids took milliseconds on the event loop."""
    seen: dict[str, list[int]] = {}
    _record_threads(monkeypatch, seen, owner, check)
    assert served.post(path, json=body).status_code == status
    assert seen[check] and threading.get_ident() not in seen[check]
