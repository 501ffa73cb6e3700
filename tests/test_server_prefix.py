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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    srv = GunicornServer(cpu_env(make_checkpoint(), SCRIPT_NAME=PREFIX), tmp_path_factory.mktemp("prefix") / "log")
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
    head, body = _exchange(server.port, raw)
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"404", (head, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["code"] == "not_found", error
    assert "Unknown endpoint" in error["message"] and PREFIX in error["message"], error


def test_paths_under_the_prefix_are_served(server: GunicornServer) -> None:
    """Through the openai client on `<server>/api/v1`, streamed and not, after the 404s above."""
    client = server.openai_client()
    assert client.chat.completions.create(**CHAT).choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**CHAT, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [model.id for model in client.models.list()] == ["qwen3-0.6b"]
