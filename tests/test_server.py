"""End to end: `gunicorn -k gevent server:app` serving a small random checkpoint on the CPU."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from nanoqwen.api.process import GunicornServer

MODEL = "qwen3-0.6b"
MAX_MODEL_LEN = 512
USER = [{"role": "user", "content": "Tell me a story about a robot."}]
GREEDY = {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 8}


def _serve(checkpoint: Path, log: Path, **env: str) -> GunicornServer:
    base = {"NANOQWEN_MODEL": str(checkpoint), "NANOQWEN_DEVICE": "cpu", "NANOQWEN_DTYPE": "float32",
            "NANOQWEN_MAX_MODEL_LEN": str(MAX_MODEL_LEN)}
    return GunicornServer({**base, **env}, log).start()


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    srv = _serve(tiny_checkpoint, tmp_path_factory.mktemp("server") / "gunicorn.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """API key, CORS, a custom model name, and room for one running plus one waiting request."""
    srv = _serve(tiny_checkpoint, tmp_path_factory.mktemp("guarded") / "gunicorn.log",
                 NANOQWEN_API_KEY="secret", NANOQWEN_MAX_BATCH="1", NANOQWEN_MAX_QUEUE="1",
                 NANOQWEN_CORS_ORIGINS="http://allowed.example", NANOQWEN_SERVED_MODEL_NAME="tiny",
                 NANOQWEN_DTYPE="bfloat16", NANOQWEN_CACHE_DIR=str(tmp_path_factory.mktemp("kernel-cache")))
    yield srv
    srv.stop()


def _client(srv: GunicornServer, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def _post(srv: GunicornServer, body: Any, timeout: float = 120, **kwargs: Any) -> requests.Response:
    return requests.post(f"{srv.url}/v1/chat/completions", json=body, timeout=timeout, **kwargs)


def _stats(srv: GunicornServer) -> dict[str, Any]:
    return requests.get(f"{srv.url}/stats", timeout=10).json()


def _sse_payloads(response: requests.Response) -> Iterator[str]:
    """The `data:` payloads of an SSE response, checking the framing (one line, then a blank one)."""
    lines = response.iter_lines(decode_unicode=True)
    for line in lines:
        assert line.startswith("data: "), line
        assert next(lines) == ""
        yield line[len("data: "):]


def _stream(srv: GunicornServer, body: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    """All chunks of a streamed completion (ending with [DONE])."""
    with _post(srv, {**body, "stream": True}, stream=True, **kwargs) as response:
        assert response.status_code == 200, response.text
        payloads = list(_sse_payloads(response))
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def _wait_for(predicate: Any, timeout: float = 10.0, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(poll)


def _assert_error(response: requests.Response, status: int, *, param: str | None = None,
                  code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# -- informational endpoints ---------------------------------------------------------------

def test_health_models_stats_metrics(server: GunicornServer) -> None:
    health = requests.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["uptime"] > 0
    info = health["model_info"]
    assert {k: info[k] for k in ("model_name", "device", "dtype", "max_model_len")} == {
        "model_name": MODEL, "device": "cpu", "dtype": "float32", "max_model_len": MAX_MODEL_LEN}
    assert info["kernels"] in ("torch", "triton") and info["graph"] and info["max_batch"] >= 1

    models = requests.get(f"{server.url}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [(MODEL, "model", "nano-qwen3-serving")]
    assert isinstance(models["data"][0]["created"], int)
    assert _client(server).models.retrieve(MODEL).id == MODEL

    stats = _stats(server)
    for key in ("requests_served", "total_tokens_generated", "average_response_time", "queue_length",
                "active_requests", "tokens_per_second", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                "kv_cache_usage", "prefix_cache_hit_rate"):
        assert key in stats

    metrics = requests.get(f"{server.url}/metrics", timeout=10)
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert "nanoqwen_queue_length" in metrics.text and "nanoqwen_time_to_first_token_seconds" in metrics.text


# -- completions ---------------------------------------------------------------------------

def test_openai_client_non_streaming(server: GunicornServer) -> None:
    completion = _client(server).chat.completions.create(**GREEDY)
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == MODEL and completion.system_fingerprint.startswith("fp_")
    (choice,) = completion.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert completion.usage.completion_tokens == 8 and completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8
    assert not hasattr(choice.message, "reasoning_content")  # only when the model thought


def test_greedy_stream_equals_non_stream(server: GunicornServer) -> None:
    client = _client(server)
    whole = client.chat.completions.create(**GREEDY)
    chunks = list(client.chat.completions.create(**GREEDY, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_raw_sse(server: GunicornServer) -> None:
    with _post(server, {**GREEDY, "stream": True}, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"
        payloads = list(_sse_payloads(response))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in c for c in chunks)  # no include_usage: no usage key at all
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) >= 1


def test_n_choices(server: GunicornServer) -> None:
    body = {**GREEDY, "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 5}
    whole = _post(server, body).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert whole["usage"]["completion_tokens"] == 10

    chunks = _stream(server, {**body, "stream_options": {"include_usage": True}})
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
        streamed = "".join(c["delta"].get("content", "") for c in mine)
        assert streamed == whole["choices"][index]["message"]["content"]  # same seed, same samples
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_logprobs(server: GunicornServer) -> None:
    body = {**GREEDY, "max_tokens": 4, "logprobs": True, "top_logprobs": 3}
    whole = _post(server, body).json()
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"], abs=1e-4)  # greedy
    streamed = [e for c in _stream(server, body) if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]


def test_sampling_fields_reach_the_engine(server: GunicornServer) -> None:
    whole = _post(server, {**GREEDY, "max_tokens": 12}).json()["choices"][0]["message"]["content"]
    stop = whole[len(whole) // 2:][:3]
    stopped = _post(server, {**GREEDY, "max_tokens": 12, "stop": [stop]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["message"]["content"] == whole[:whole.index(stop)]

    seeded = {**GREEDY, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7, "max_completion_tokens": 6}
    assert _post(server, seeded).json()["choices"] == _post(server, seeded).json()["choices"]

    thinking = _post(server, GREEDY).json()["usage"]["prompt_tokens"]
    no_thinking = _post(server, {**GREEDY, "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert no_thinking["usage"]["prompt_tokens"] > thinking  # the template added an empty think block

    parts = [{"role": "user", "content": [{"type": "text", "text": USER[0]["content"]}]}]
    as_parts = _post(server, {**GREEDY, "messages": parts, "user": "u1", "some_future_field": 1}).json()
    assert as_parts["choices"][0]["message"] == _post(server, GREEDY).json()["choices"][0]["message"]


# -- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": {"text": "x"}}]}, "messages.[0].content"),
    ({**GREEDY, "temperature": 2.5}, "temperature"),
    ({**GREEDY, "top_p": 1.5}, "top_p"),
    ({**GREEDY, "max_tokens": 0}, "max_tokens"),
    ({**GREEDY, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({**GREEDY, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**GREEDY, "response_format": {"type": "json_object"}}, "response_format"),
])
def test_invalid_request(server: GunicornServer, body: dict[str, Any], param: str) -> None:
    _assert_error(_post(server, body), 400, param=param)


def test_invalid_json_and_transport_errors(server: GunicornServer) -> None:
    url = f"{server.url}/v1/chat/completions"
    _assert_error(requests.post(url, data=b"{not json", timeout=10), 400)
    _assert_error(requests.post(url, data=b"[1, 2]", timeout=10), 400)
    _assert_error(requests.post(url, data=b"x" * (9 << 20), timeout=30), 413)
    response = requests.get(url, timeout=10)
    _assert_error(response, 405)
    assert "POST" in response.headers["Allow"]
    _assert_error(requests.get(f"{server.url}/v1/nothing", timeout=10), 404)


def test_unknown_model(server: GunicornServer) -> None:
    _assert_error(_post(server, {**GREEDY, "model": "gpt-4"}), 404, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        _client(server).chat.completions.create(**{**GREEDY, "model": "gpt-4"})


@pytest.mark.parametrize("stream", [False, True])
def test_context_length_exceeded(server: GunicornServer, stream: bool) -> None:
    response = _post(server, {**GREEDY, "max_tokens": MAX_MODEL_LEN, "stream": stream})
    error = _assert_error(response, 400, code="context_length_exceeded")
    prompt_tokens = _post(server, {**GREEDY, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert str(MAX_MODEL_LEN) in error["message"] and str(prompt_tokens + MAX_MODEL_LEN) in error["message"]
    long_prompt = [{"role": "user", "content": "word " * (2 * MAX_MODEL_LEN)}]
    _assert_error(_post(server, {"messages": long_prompt, "stream": stream}), 400, code="context_length_exceeded")


# -- concurrency ---------------------------------------------------------------------------

def test_concurrent_streams_and_exact_stats(server: GunicornServer) -> None:
    before = _stats(server)
    bodies = [{**GREEDY, "max_tokens": 4 + i % 5, "stream_options": {"include_usage": True}} for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda body: _stream(server, body), bodies))
    usages = [chunks[-1]["usage"] for chunks in results]
    assert [u["completion_tokens"] for u in usages] == [b["max_tokens"] for b in bodies]
    after = _stats(server)
    assert after["requests_served"] - before["requests_served"] == 16
    assert after["total_tokens_generated"] - before["total_tokens_generated"] == sum(b["max_tokens"] for b in bodies)
    assert after["active_requests"] == 0 and after["queue_length"] == 0
    assert after["average_response_time"] > 0 and after["ttft_p50_ms"] > 0


def _assert_aborted_early(srv: GunicornServer, before: dict[str, Any], max_tokens: int) -> None:
    _wait_for(lambda: _stats(srv)["requests_aborted"] == before["requests_aborted"] + 1)
    _wait_for(lambda: _stats(srv)["active_requests"] == 0)
    after = _stats(srv)
    assert after["requests_served"] == before["requests_served"]
    assert after["engine_tokens_generated"] - before["engine_tokens_generated"] < max_tokens  # cut short


def test_stream_disconnect_aborts(server: GunicornServer) -> None:
    before = _stats(server)
    with _post(server, {**GREEDY, "max_tokens": 400, "stream": True}, stream=True) as response:
        payloads = _sse_payloads(response)
        for _ in range(3):
            next(payloads)
    _assert_aborted_early(server, before, 400)


def test_non_stream_disconnect_aborts(server: GunicornServer) -> None:
    """The client hangs up once generation has started (not after a fixed time: the tiny model
    finishes hundreds of tokens in well under a second on a fast machine)."""
    before = _stats(server)
    max_tokens = MAX_MODEL_LEN - 64
    body = json.dumps({**GREEDY, "max_tokens": max_tokens}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head + body)
        _wait_for(lambda: _stats(server)["engine_tokens_generated"] > before["engine_tokens_generated"], poll=0.005)
    _assert_aborted_early(server, before, max_tokens)


def test_health_is_fast_while_generating(server: GunicornServer) -> None:
    started = threading.Event()
    stop = threading.Event()

    def generate() -> None:
        with _post(server, {**GREEDY, "max_tokens": 400, "stream": True}, stream=True) as response:
            for i, _ in enumerate(_sse_payloads(response)):
                if i == 2:
                    started.set()
                if stop.is_set():
                    return

    worker = threading.Thread(target=generate)
    worker.start()
    try:
        assert started.wait(60)
        session = requests.Session()
        timings = []
        for _ in range(10):
            t0 = time.perf_counter()
            assert session.get(f"{server.url}/health", timeout=10).status_code == 200
            timings.append(time.perf_counter() - t0)
            time.sleep(0.05)
        assert _stats(server)["active_requests"] == 1  # it really was generating meanwhile
    finally:
        stop.set()
        worker.join()
    assert max(timings) < 0.1, timings


# -- API key, CORS, model name, queue limit ------------------------------------------------

def test_cpu_kernels_build_inside_the_gevent_worker(guarded: GunicornServer) -> None:
    """An empty kernel cache: the engine thread runs the C compiler through subprocess inside the gevent worker."""
    cache = Path(guarded._env["NANOQWEN_CACHE_DIR"])
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.so")) == ["cpu_attention", "cpu_linear", "cpu_norm_rope"]
    assert "could not build" not in guarded.log()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    assert _post(guarded, body, headers={"Authorization": "Bearer secret"}).status_code == 200


def test_api_key(guarded: GunicornServer) -> None:
    body = {**GREEDY, "model": "tiny", "max_tokens": 2}
    _assert_error(_post(guarded, body), 401, code="invalid_api_key")
    _assert_error(_post(guarded, body, headers={"Authorization": "Bearer wrong"}), 401)
    with pytest.raises(openai.AuthenticationError):
        _client(guarded, "wrong").models.list()
    completion = _client(guarded, "secret").chat.completions.create(**body)
    assert completion.model == "tiny" and completion.usage.completion_tokens == 2
    assert requests.get(f"{guarded.url}/health", timeout=10).status_code == 200  # open, like /stats


def test_served_model_name_and_cors(guarded: GunicornServer) -> None:
    auth = {"Authorization": "Bearer secret"}
    _assert_error(_post(guarded, {**GREEDY, "model": MODEL}, headers=auth), 404, code="model_not_found")
    preflight = requests.options(f"{guarded.url}/v1/chat/completions", timeout=10, headers={
        "Origin": "http://allowed.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://allowed.example"
    other = requests.get(f"{guarded.url}/v1/models", headers={**auth, "Origin": "http://evil.example"}, timeout=10)
    assert other.status_code == 200 and "Access-Control-Allow-Origin" not in other.headers
    assert "Access-Control-Allow-Origin" not in requests.get(f"{guarded.url}/health", timeout=10).headers


def test_queue_full(guarded: GunicornServer) -> None:
    auth = {"Authorization": "Bearer secret"}
    long = {**GREEDY, "model": "tiny", "max_tokens": 400, "stream": True}
    with _post(guarded, long, headers=auth, stream=True) as running:
        payloads = _sse_payloads(running)
        next(payloads), next(payloads)  # role, then a token: it holds the only batch slot
        with _post(guarded, long, headers=auth, stream=True) as waiting:
            assert waiting.status_code == 200
            _wait_for(lambda: _stats(guarded)["queue_length"] == 1)
            refused = _post(guarded, {**long, "stream": False}, headers=auth)
            _assert_error(refused, 503, code="queue_full")
            assert int(refused.headers["Retry-After"]) >= 1
    _wait_for(lambda: (s := _stats(guarded))["queue_length"] == 0 and s["active_requests"] == 0)
