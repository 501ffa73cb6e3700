"""A deployment under a path prefix: `SCRIPT_NAME=/api gunicorn -k gevent server:app` serves /api/v1/... and answers
any path outside the prefix with a clean 404, through the real server and the openai client."""
from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from chat_http import cpu_env, read_all
from checkpoints import make_checkpoint
from server_process import GunicornServer

PREFIX = "/api"
CHAT = {"model": "qwen3-0.6b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module", params=[PREFIX, f"{PREFIX}/"], ids=["prefix", "trailing-slash"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """SCRIPT_NAME as an operator writes it, with or without its trailing slash."""
    srv = GunicornServer(cpu_env(make_checkpoint(), SCRIPT_NAME=request.param),
                         tmp_path_factory.mktemp("prefix") / "log")
    srv.script_name = request.param
    srv.url += PREFIX  # its /health and the openai client's base URL
    with srv:
        yield srv


def _exchange(port: int, raw: bytes) -> tuple[bytes, dict]:
    """The head and JSON body of one raw request."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(raw)
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    return head, json.loads(body)


@pytest.mark.parametrize("raw", [
    b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /v1/models HTTP/1.0\r\n\r\n",
    b"GET /apiv1/models HTTP/1.1\r\nHost: localhost\r\n\r\n",  # the prefix's characters, not its segment
    b"GET /api%2fhealth HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: 200000\r\n\r\n" + b" " * 200000,  # its body unread: still the answer, not a reset
], ids=["health", "root", "http1.0", "mid-segment", "encoded-slash", "post-with-body"])
def test_a_path_outside_the_prefix_is_a_404(server: GunicornServer, raw: bytes) -> None:
    """gunicorn answered a path outside SCRIPT_NAME with a 500 ("Configuration problem: Request path '/health' does
    not start with SCRIPT_NAME '/api'"), a server error that clients retry, and served one that starts with the
    prefix's characters but not its path segment (`/apiv1/models`)."""
    _assert_not_found(*_exchange(server.port, raw))


def _assert_not_found(head: bytes, body: dict) -> None:
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"404", (head, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["code"] == "not_found", error
    assert "Unknown endpoint" in error["message"] and PREFIX in error["message"], error


def test_the_bare_prefix_under_a_trailing_slash_is_a_404(server: GunicornServer) -> None:
    """`/api` under SCRIPT_NAME `/api/` does not start with what gunicorn strips: its 500 once more."""
    if server.script_name.endswith("/"):
        _assert_not_found(*_exchange(server.port, b"GET /api HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
    else:  # the prefix itself: the app's own answer (its root), not gunicorn's
        head, _ = _exchange(server.port, b"GET /api HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert not head.startswith(b"HTTP/1.1 5"), head


def test_a_head_outside_the_prefix_has_no_body(server: GunicornServer) -> None:
    """The 404's head only, its Content-Length the body a GET would have had (RFC 9110 9.3.2): a body after a HEAD's
    answer is read as the start of the next answer. The worker logs the request, which gunicorn's access log misses."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404") and b"Content-Length: " in head and body == b"", (head, body)
    assert "HEAD /health: outside SCRIPT_NAME" in server.log(), server.log()


def test_paths_under_the_prefix_are_served(server: GunicornServer) -> None:
    """Through the openai client on `<server>/api/v1`, streamed and not, after the 404s above."""
    client = server.openai_client()
    assert client.chat.completions.create(**CHAT).choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**CHAT, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [model.id for model in client.models.list()] == ["qwen3-0.6b"]
