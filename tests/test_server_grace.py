"""The grace period of a stopping worker (SIGTERM, a reload, --max-requests), as a client on a kept-alive connection
sees it."""
from __future__ import annotations

import json
import socket
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


def test_a_request_begun_after_the_grace_periods_cut_is_refused_a_503_before_any_head(tiny_checkpoint: Path,
                                                                                     tmp_path: Path) -> None:
    """Streams running at the stop are failed 1.5 s before --graceful-timeout ends (their error event, then [DONE]);
    their heads went out before the stop, so their connections wait 1 s for a next request. One sent as soon as a
    failed stream ended (a client reusing its connection at once, as openai's and nginx's keep-alive pools do) ran
    until gunicorn killed the worker's handlers, cut without an answer; then it was accepted and failed: a 500, or a
    200 head and an error event, neither of which nginx or openai's client retries. It is refused now, streamed or
    not, before any head: a 503 `server_shutting_down` with Retry-After, its connection closed. Both cases on one
    server and one SIGTERM: two connections, each with its own long stream, each sending its next request at once."""
    env = cpu_env(tiny_checkpoint, NANOQWEN_MAX_MODEL_LEN="4096", NANOQWEN_THREADS="1")
    srv = GunicornServer(env, tmp_path / "gunicorn.log", args=["--graceful-timeout", str(GRACE_S)]).start()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000, "ignore_eos": True,
            "stream": True}
    streamed_next = [True, False]
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as first, \
                socket.create_connection(("127.0.0.1", srv.port), timeout=60) as second:
            socks = [first, second]
            for sock in socks:
                sock.sendall(raw_request(body))
            heads = [sock.recv(65536) for sock in socks]
            assert all(head.startswith(b"HTTP/1.1 200") for head in heads), heads
            srv.terminate()
            failed = []
            for sock, head, stream in zip(socks, heads, streamed_next, strict=True):
                failed.append(head + _read_through_done(sock))  # failed at the grace period's cut
                sock.sendall(raw_request({**body, "stream": stream}))  # at once, on the same connection
            refused = [read_all(sock) for sock in socks]
        status = srv.wait(GRACE_S + 30)
    finally:
        srv.stop()
    for answer in failed:
        head, payloads = _stream_events(answer)
        assert b"connection: close" not in head.lower() and payloads[-1] == "[DONE]", payloads[-3:]
        error = json.loads(payloads[-2])["error"]
        assert "ran past the grace period" in error["message"] and error["type"] == "server_error", error
    assert [answer[:12] for answer in refused] == [b"HTTP/1.1 503"] * 2, [answer[:300] for answer in refused]
    for answer, stream in zip(refused, streamed_next, strict=True):
        head, _, text = answer.partition(b"\r\n\r\n")
        lines = head.decode().lower().split("\r\n")
        assert {"connection: close", "retry-after: 1", "content-type: application/json"} <= set(lines), (stream, head)
        error = json.loads(text)["error"]
        assert error.keys() == {"message", "type", "param", "code"}, error
        assert (error["type"], error["code"], error["param"]) == ("server_error", "server_shutting_down", None), error
        assert "shutting down" in error["message"] and "grace period" not in error["message"], error
    assert status == 0, srv.log()
