"""deploy/nginx.conf in front of two replicas of the tiny checkpoint, through a real nginx: streams
spread over both, a replica killed mid-run fails its streams cleanly (no hang) while the others
finish, new requests all go to the survivor, and the affinity header pins a conversation."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from balancer import Nginx
from chat_http import read_all
from server_process import GunicornServer

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None,
                                reason="needs the nginx binary (apt-get install nginx-light)")

MODEL = "qwen3-0.6b"
STREAMS = 6
STREAM_TOKENS = 1500  # long enough that no stream of the doomed replica ends before the kill
TIMEOUT = (5, 30)  # connect, longest silence: a request that hangs fails the test instead
NGINX_BAD_REQUEST = "nginx could not read the request: its request line, its headers (one Host of a host name or " \
                    "address and an optional port, RFC 9112 3.2) or its body framing."


@contextmanager
def _two_replicas(checkpoint: Path, logs: Path, **env: str) -> Iterator[list[GunicornServer]]:
    """Two replicas of `checkpoint` on one thread each, loading together, with `env` added."""
    env = {"NANOQWEN_MODEL": str(checkpoint), "NANOQWEN_DEVICE": "cpu", "NANOQWEN_DTYPE": "float32",
           "NANOQWEN_MAX_MODEL_LEN": "2048", "NANOQWEN_THREADS": "1", **env}
    servers = [GunicornServer(env, logs / f"replica{i}.log").launch() for i in range(2)]
    try:
        for server in servers:
            server.wait_healthy()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def replicas(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[GunicornServer]]:
    """Started once for the module: its tests count requests as deltas, and the one that kills a replica runs last."""
    with _two_replicas(tiny_checkpoint, tmp_path_factory.mktemp("replicas")) as servers:
        yield servers


def _served(server: GunicornServer) -> int:
    return requests.get(f"{server.url}/stats", timeout=5).json()["requests_served"]


@dataclass
class Outcome:
    chunks: int = 0
    completion_tokens: int = 0  # from the final usage chunk
    done: bool = False  # reached `data: [DONE]`
    error: str | None = None


def _stream(url: str, started: threading.Event | None = None) -> Outcome:
    outcome = Outcome()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long story"}], "stream": True,
            "max_tokens": STREAM_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    try:
        with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=TIMEOUT) as response:
            response.raise_for_status()
            for line in response.iter_lines(decode_unicode=True):
                if not line:
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    outcome.done = True
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    outcome.completion_tokens = chunk["usage"]["completion_tokens"]
                outcome.chunks += 1
                if started is not None:
                    started.set()
    except (requests.RequestException, ValueError) as exc:
        outcome.error = type(exc).__name__
    return outcome


def _kill(server: GunicornServer) -> None:
    """The whole replica at once, as a crashed host: worker and master, no graceful shutdown."""
    worker = requests.get(f"{server.url}/stats", timeout=5).json()["workers"][0]["pid"]
    os.kill(worker, signal.SIGKILL)
    os.kill(server._proc.pid, signal.SIGKILL)
    server.wait(10)


def test_conversation_id_pins_a_replica(replicas, tmp_path):
    assert all(s._proc.poll() is None for s in replicas), "runs before the test that kills a replica"
    with Nginx(tmp_path, [f"127.0.0.1:{s.port}" for s in replicas]) as lb:
        before = [_served(s) for s in replicas]
        for i in range(4):
            response = requests.post(f"{lb.url}/v1/chat/completions", timeout=TIMEOUT,
                                     headers={"X-Conversation-Id": "conversation-42"},
                                     json={"model": MODEL, "messages": [{"role": "user", "content": f"turn {i}"}],
                                           "max_tokens": 2})
            assert response.status_code == 200, response.text
        gained = sorted(_served(s) - b for s, b in zip(replicas, before))
        assert gained == [0, 4]


def test_an_http10_request_without_host_is_served(replicas, tmp_path):
    """An HTTP/1.0 client may send no Host (HAProxy's default health check): nginx passed it on as HTTP/1.1 with none
    (its `$host` empty, the header dropped), which a replica must refuse (400); it now names the upstream."""
    with (Nginx(tmp_path, [f"127.0.0.1:{s.port}" for s in replicas]) as lb,
          socket.create_connection(("127.0.0.1", lb.port), timeout=30) as sock):
        sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        answer = read_all(sock)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"200", answer


def _raw_answer(lb: Nginx, raw: bytes) -> tuple[bytes, bytes]:
    """The (head, body) nginx answers to `raw` (a request's line and headers, sent with `Connection: close`)."""
    with socket.create_connection(("127.0.0.1", lb.port), timeout=30) as sock:
        sock.sendall(raw + b"Connection: close\r\n\r\n")
        answer = read_all(sock)
    head, body = answer.split(b"\r\n\r\n", 1)
    return head, body


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\r\nHost: a,b\r\n", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n",
    b"GET /health HTTP/1.1\r\nHost: a, b\r\n", b"GET /he\x01alth HTTP/1.1\r\nHost: a\r\n", b"GARBAGE\r\n",
    b"GET /health HTTP/1.1\r\nHost: a:1,b:2\r\n", b"GET /health HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 9000 + b"\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n",
], ids=["joined", "two", "joined-space", "bad-target", "bad-line", "joined-ports", "header-too-large", "bad-length"])
def test_what_nginx_refuses_is_refused_in_the_api_s_envelope(replicas, tmp_path, raw: bytes):
    """nginx refuses two Host lines, two joined with ", " (a space: no host name), a malformed request line, a header
    past its buffers (494) and a bad Content-Length with its HTML 400, but took `a,b` and `a:1,b:2` (a comma is valid
    in its host names) and passed them on, a replica's 400 (RFC 9110 5.3: two Hosts joined): each one refusal now,
    nginx's, in the OpenAI envelope, as the API's others."""
    with Nginx(tmp_path, [f"127.0.0.1:{s.port}" for s in replicas]) as lb:
        head, body = _raw_answer(lb, raw)
    assert head.split(b" ")[1] == b"400", head + body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"] == NGINX_BAD_REQUEST, body


@pytest.mark.parametrize(("raw", "status", "code"), [
    (b"GET /health?q=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n", b"414", "uri_too_long"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n", b"501",
     "unsupported_transfer_coding"),
    (b"GET /health HTTP/2.0\r\nHost: a\r\n", b"505", None),
], ids=["target-past-buffers", "gzip-chunked", "http2-request-line"])
def test_nginx_s_other_refusals_are_in_the_api_s_envelope(replicas, tmp_path, raw: bytes, status: bytes,
                                                          code: str | None):
    """A request line past nginx's buffers (414), a transfer coding it does not decode (501; a replica answers
    `gzip, chunked` a 415) and an HTTP version past 1.1 (505) were nginx's HTML pages: now the OpenAI envelope, with
    the code a replica's own 414 or 501 carries (none for 505)."""
    with Nginx(tmp_path, [f"127.0.0.1:{s.port}" for s in replicas]) as lb:
        head, body = _raw_answer(lb, raw)
    assert head.split(b" ")[1] == status, head + body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] is None, body


def test_a_body_past_nginx_s_limit_is_refused_in_the_api_s_envelope(replicas, tmp_path):
    """A body past client_max_body_size (8 MiB, the replicas' own limit) nginx refuses before any replica reads it:
    with its HTML 413 page, where a replica answers its 413 request_too_large in OpenAI's envelope. Now nginx answers
    the replica's error."""
    with Nginx(tmp_path, [f"127.0.0.1:{s.port}" for s in replicas]) as lb:
        response = requests.post(f"{lb.url}/v1/chat/completions", data=b'{"messages": "' + b"x" * (9 << 20) + b'"}',
                                 headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 413, response.text
    assert response.json() == {"error": {"message": "The request body is too large (limit 8388608 bytes)",
                                         "type": "invalid_request_error", "param": None, "code": "request_too_large"}}


def test_a_trace_nginx_refuses_is_refused_in_the_api_s_envelope(replicas, tmp_path):
    """nginx answers TRACE itself with its HTML 405 page, before any replica: now in the envelope of a replica's 405
    method_not_allowed. A replica's own 405 passes as it is."""
    with Nginx(tmp_path, [f"127.0.0.1:{s.port}" for s in replicas]) as lb:
        head, body = _raw_answer(lb, b"TRACE / HTTP/1.1\r\nHost: a\r\n")
        replicas_own = requests.delete(f"{lb.url}/v1/models", timeout=TIMEOUT)
    assert head.split(b" ")[1] == b"405", head + body
    assert json.loads(body)["error"] == {"message": "nginx does not forward TRACE requests (RFC 9110 9.3.8)",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "method_not_allowed"}, body
    assert replicas_own.status_code == 405, replicas_own.text
    assert replicas_own.json()["error"]["message"] == "Method DELETE is not allowed on /v1/models", replicas_own.text


def test_a_request_right_after_every_replica_answered_queue_full_reaches_them(tiny_checkpoint, tmp_path):
    """A replica's 503 queue_full ("at capacity", Retry-After: 1) is its answer, not a fault: nginx retries the
    request on the next replica and goes on sending to both. Open-source nginx counts every status it retries on as a
    failure, so with `max_fails=1` a request that met both replicas full marked both down for fail_timeout (10 s, then
    1 s): every request in it, /v1/models too, got nginx's own no_replica however soon a replica had room."""
    with _two_replicas(tiny_checkpoint, tmp_path, NANOQWEN_MAX_BATCH="1", NANOQWEN_MAX_QUEUE="1") as servers, \
            Nginx(tmp_path, [f"127.0.0.1:{s.port}" for s in servers]) as lb:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:  # 2 replicas of 2 places (running and queued) each: 4 refused at least
            burst = [pool.submit(requests.post, f"{lb.url}/v1/chat/completions", json=body, timeout=TIMEOUT)
                     for _ in range(8)]
            refused = next(r for r in map(Future.result, as_completed(burst)) if r.status_code == 503)
            assert refused.json()["error"]["code"] == "queue_full", refused.text  # both replicas tried: both full
            answers = []  # until one is served: each replica's own answer, never nginx's no_replica
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and 200 not in answers[-1:]:
                response = requests.post(f"{lb.url}/v1/chat/completions", json={**body, "max_tokens": 2},
                                         timeout=TIMEOUT)
                answers.append(response.status_code if response.ok else response.json()["error"]["code"])
        assert answers[-1] == 200 and set(answers) <= {200, "queue_full"}, answers
        assert requests.get(f"{lb.url}/v1/models", timeout=TIMEOUT).status_code == 200


# Last in the module: it ends both replicas.
def test_replica_killed_mid_stream_fails_cleanly_and_the_survivor_takes_over(replicas, tmp_path):
    alive, doomed = replicas
    with Nginx(tmp_path, [f"127.0.0.1:{s.port}" for s in replicas]) as lb:
        served_before = [_served(s) for s in replicas]
        events = [threading.Event() for _ in range(STREAMS)]
        with ThreadPoolExecutor(STREAMS) as pool:
            futures = [pool.submit(_stream, lb.url, event) for event in events]
            assert all(event.wait(60) for event in events), "every stream gets its first token"
            _kill(doomed)
            outcomes = [future.result(timeout=120) for future in futures]  # bounded: no hang

        assert all(o.done != (o.error is not None) for o in outcomes), outcomes  # done or failed, never both
        completed = [o for o in outcomes if o.done]
        failed = [o for o in outcomes if not o.done]
        assert all(o.completion_tokens == STREAM_TOKENS for o in completed), outcomes
        # least_conn put half the streams on each replica: the doomed one's broke, the others finished.
        assert len(completed) == len(failed) == STREAMS // 2, outcomes
        assert _served(alive) == served_before[0] + len(completed)

        with requests.Session() as session:  # new requests: the first may hit the dead replica and be retried
            for i in range(6):
                response = session.post(f"{lb.url}/v1/chat/completions", timeout=TIMEOUT, json={
                    "model": MODEL, "messages": [{"role": "user", "content": f"after {i}"}], "max_tokens": 2})
                assert response.status_code == 200, response.text
        assert _served(alive) == served_before[0] + len(completed) + 6

        # With no replica left, clients get an OpenAI-style error, not nginx's HTML page.
        alive.stop()
        response = requests.post(f"{lb.url}/v1/chat/completions", timeout=TIMEOUT,
                                 json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 503 and response.json()["error"]["code"] == "no_replica"
