"""TLS as gunicorn serves it (`--certfile` / `--keyfile`, a self-signed certificate made here): the openai client's
answers, streamed and not, and the client probe on a TLS socket (its recv takes no flags)."""
from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import Iterator

import pytest
import requests

from chat_http import MODEL, cpu_env, raw_request
from checkpoints import make_checkpoint
from server_process import GunicornServer
from waits import wait_for

pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # our own certificate
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "Count to a hundred."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    with GunicornServer(cpu_env(make_checkpoint()), folder / "gunicorn.log",
                        args=["--certfile", str(cert), "--keyfile", str(key)]) as srv:
        yield srv


def test_the_openai_client_is_answered_over_tls(server: GunicornServer) -> None:
    client = server.openai_client()
    body = {"model": MODEL, "messages": USER, "max_tokens": 4, "temperature": 0, "extra_body": NO_THINKING}
    answer = client.chat.completions.create(**body)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        **body, stream=True) if chunk.choices)
    assert answer.usage.completion_tokens == 4 and streamed == answer.choices[0].message.content


def _running(server: GunicornServer) -> bool:
    return requests.get(f"{server.url}/stats", timeout=30, verify=False).json()["active_requests"] > 0


def _response(sock: ssl.SSLSocket) -> tuple[bytes, bytes]:
    """One response's status line and body (Content-Length framed) read off a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"connection closed after {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail(f"connection closed inside the body: {body!r}")
    return lines[0], body[:length]


def test_a_tls_client_that_sends_its_next_request_early_gets_its_answer(server: GunicornServer) -> None:
    """A keep-alive client may send its next request while its collected answer is generated: the probe's peek at the
    readable TLS socket raised (its recv takes no flags), taken for a client gone, the answer aborted."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 400, "temperature": 0, "ignore_eos": True, **NO_THINKING}
    context = ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", server.port)) as raw, context.wrap_socket(raw) as sock:
        sock.sendall(raw_request(body))
        wait_for(lambda: _running(server), 30, 0.02, "the first request never ran")
        sock.sendall(raw_request({**body, "max_tokens": 1}))  # the next one, while the first is generated
        status, answer = _response(sock)
        assert status == b"HTTP/1.1 200 OK", (status, answer)
        assert json.loads(answer)["usage"]["completion_tokens"] == 400
        status, answer = _response(sock)
        assert status == b"HTTP/1.1 200 OK" and json.loads(answer)["usage"]["completion_tokens"] == 1
