"""The grace period of a stopping worker (SIGTERM, a reload, --max-requests), as a client on a kept-alive connection
sees it."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from chat_http import MODEL, cpu_env, http_chunks, raw_request, read_all
from server_process import GunicornServer

GRACE_S = 6


def _stream_events(head_and_body: bytes) -> tuple[bytes, list[str]]:
    """The head of a chunked SSE answer and its `data:` payloads (checking that the chunked body ended whole)."""
    head, _, body = head_and_body.partition(b"\r\n\r\n")
    try:
        text = b"".join(http_chunks(body)).decode()
    except ValueError:  # a size line cut short, or none after the last chunk read
        raise AssertionError(f"the chunked answer was cut: {body[-300:]!r}") from None
    return head, [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def _read_through_done(sock: socket.socket) -> bytes:
    """One chunked answer read up to its last chunk (the connection left open)."""
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before the answer's last chunk: {data[-300:]!r}"
        data += chunk
    return data


def test_a_request_begun_after_the_grace_periods_cut_ends_with_its_error_too(tiny_checkpoint: Path,
                                                                             tmp_path: Path) -> None:
    """A stream running at the stop is failed 1.5 s before --graceful-timeout ends (its error event, then [DONE]); its
    head went out before the stop, so its connection waits 1 s for a next request, which is served. One sent as soon
    as the failed stream ended (a client reusing its connection at once, as openai's and nginx's keep-alive pools do)
    was not failed: it ran until gunicorn killed the worker's handlers at the graceful timeout, its chunked answer cut
    without an error event or [DONE] (a non-streamed one: the connection closed without an answer). It fails at once
    now, as a request running at the cut does. Both kinds of next request on one server and one SIGTERM: two
    kept-alive connections, each with its own stream running at the stop."""
    env = cpu_env(tiny_checkpoint, NANOQWEN_MAX_MODEL_LEN="4096", NANOQWEN_THREADS="1")
    srv = GunicornServer(env, tmp_path / "gunicorn.log", args=["--graceful-timeout", str(GRACE_S)]).start()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    firsts: dict[bool, bytes] = {}
    seconds: dict[bool, bytes] = {}
    try:
        with (socket.create_connection(("127.0.0.1", srv.port), timeout=60) as streamed,
              socket.create_connection(("127.0.0.1", srv.port), timeout=60) as not_streamed):
            socks = {True: streamed, False: not_streamed}
            for stream, sock in socks.items():
                sock.sendall(raw_request(body))
                firsts[stream] = sock.recv(65536)
                assert firsts[stream].startswith(b"HTTP/1.1 200"), firsts[stream]
            srv.terminate()
            for stream, sock in socks.items():
                firsts[stream] += _read_through_done(sock)  # failed at the grace period's cut
                sock.sendall(raw_request({**body, "stream": stream}))  # at once, on the same connection
            ended = time.monotonic()
            for stream, sock in socks.items():
                seconds[stream] = read_all(sock)
            waited = time.monotonic() - ended
        status = srv.wait(GRACE_S + 30)
    finally:
        srv.stop()
    for first in firsts.values():
        head, payloads = _stream_events(first)
        assert b"connection: close" not in head.lower() and payloads[-1] == "[DONE]", payloads[-3:]
        assert "shutting down" in json.loads(payloads[-2])["error"]["message"], payloads[-3:]
    head, payloads = _stream_events(seconds[True])  # a cut chunked body fails here: no last chunk
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower(), head
    assert payloads[-1] == "[DONE]", (payloads[-3:], waited)
    errors = [json.loads(payloads[-2])["error"]]
    head, _, answer = seconds[False].partition(b"\r\n\r\n")  # it was no answer at all: the connection closed
    assert head.startswith(b"HTTP/1.1 500") and b"connection: close" in head.lower(), (seconds[False][:300], waited)
    errors.append(json.loads(answer)["error"])
    for error in errors:
        assert "shutting down" in error["message"] and error["type"] == "server_error", error
    assert status == 0, srv.log()
