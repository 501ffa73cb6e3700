"""NANOQWEN_SEND_TIMEOUT through `gunicorn -k gevent server:app`: a client that stops reading a stream is dropped
once the server's write has made no progress for the timeout (its request aborted in the engine; a background run
it followed left generating), while other clients, a slow but steady reader among them, are served meanwhile."""
from __future__ import annotations

import json
import math
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from chat_http import HELD_S, MODEL, cpu_env, dechunk, engine_idle, health_polled, most_held, raw_request, server_stats
from checkpoints import make_checkpoint
from health_poll import reported_schedstat, schedstat
from server_process import GunicornServer
from waits import wait_for

SEND_TIMEOUT_S = 2
LONG = 4000  # tokens: seconds of generation (~20 s here), far past the drop
STEADY = 60  # tokens of the slow but steady reader's stream
LOGPROBS = {"logprobs": True, "top_logprobs": 20}  # ~2 KB of stream a token: the buffers fill in well under a second
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 0,
        "ignore_eos": True, "stream": True, **LOGPROBS}
CLOSE = "Connection: close\r\n"  # the end of an answer is the end of the connection: a read to EOF ends
DEADLINE_S = 30  # any read loop's
# a last resort: the waits for a drop end on it or on LONG's tokens generated (no drop), not on time. The drop comes
# SEND_TIMEOUT_S after the buffers fill, which takes generation time, and load stretches that (12 s passed at load ~20)
DROP_WAIT_S = 120
ESTABLISHED = 0x01  # /proc/net/tcp's state


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    env = cpu_env(make_checkpoint(), NANOQWEN_SEND_TIMEOUT=str(SEND_TIMEOUT_S), NANOQWEN_MAX_MODEL_LEN="4096")
    with GunicornServer(env, tmp_path_factory.mktemp("send-timeout") / "gunicorn.log") as srv:
        yield srv


def _narrow_client(srv: GunicornServer, body: dict[str, Any], path: str = "/v1/chat/completions") -> socket.socket:
    """A connection that holds little on the client's side, its request sent. Both set before connecting: a small
    receive buffer (the client's TCP window), and a small MSS (it goes in the SYN: loopback's 64 KB one sizes the
    server's send buffer at 4 MB; a real network's, at ~100 KB)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.settimeout(DEADLINE_S)
    sock.connect(("127.0.0.1", srv.port))
    sock.sendall(raw_request(body, path, CLOSE))
    return sock


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the connection has sent up to `marker` at least."""
    out = b""
    deadline = time.monotonic() + DEADLINE_S
    while marker not in out:
        assert time.monotonic() < deadline, out[-500:]
        chunk = sock.recv(4096)
        assert chunk, f"closed before {marker!r}: {out[-500:]!r}"
        out += chunk
    return out


def _read_rest(sock: socket.socket, pause_s: float = 0.0) -> tuple[bytes, str]:
    """The rest of what the connection sends, read 2 KB at a time `pause_s` apart, and how it ended: eof or reset."""
    out = bytearray()
    deadline = time.monotonic() + DEADLINE_S
    with sock:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(2048)
            except ConnectionResetError:
                return bytes(out), "reset"
            if not chunk:
                return bytes(out), "eof"
            out += chunk
            time.sleep(pause_s)
    raise AssertionError(f"still open after {DEADLINE_S} s")


def _read_slowly(srv: GunicornServer, body: dict[str, Any]) -> tuple[str, float]:
    """A stream read whole at ~40 KB/s, steadily: its text and the seconds it took."""
    started = time.monotonic()
    sock = _narrow_client(srv, body)
    data, ended = _read_rest(sock, pause_s=0.05)
    head, _, payload = data.partition(b"\r\n\r\n")
    assert ended == "eof" and head.startswith(b"HTTP/1.1 200"), data[-500:]
    return dechunk(payload).decode(), time.monotonic() - started


def _generated(srv: GunicornServer, before: dict[str, Any], tokens: int) -> bool:
    """`tokens` generated since `before`: a stream not dropped (no timeout) can no longer be cut."""
    return server_stats(srv)["engine_tokens_generated"] - before["engine_tokens_generated"] >= tokens


def _send_queue(srv: GunicornServer, sock: socket.socket) -> int | None:
    """The bytes the server's end of `sock`'s connection holds, not yet acknowledged (/proc/net/tcp's tx_queue: sent,
    or waiting for the client's window), or None once the server has closed it."""
    ends = (srv.port, sock.getsockname()[1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, remote, state, queues = line.split()[:5]
        if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)) == ends and int(state, 16) == ESTABLISHED:
            return int(queues.split(":")[0], 16)
    return None


def _stalled(srv: GunicornServer, sock: socket.socket, before: dict[str, Any]) -> float:
    """The seconds from the server's last progress on `sock`'s connection (its send queue last changed: a write took
    bytes, or the client acknowledged some, which may come later) to its close, less the seconds the worker's loop
    thread waited for a CPU meanwhile (the machine's load, as Poll.held); inf if LONG + STEADY tokens were generated
    first (no drop). This thread's waits are not subtracted: polling, it wakes so often that they add up to seconds
    while only its last one delays seeing the close."""
    [worker] = server_stats(srv)["workers"]
    loop = f"/proc/{worker['pid']}/task/{worker['pid']}/schedstat"  # gevent's loop runs in the worker's main thread
    reported_schedstat(loop)
    queued, changed, waited, checked = -1, 0.0, 0.0, time.monotonic()
    deadline = checked + DROP_WAIT_S
    while (now_queued := _send_queue(srv, sock)) is not None:
        now = time.monotonic()
        if now_queued != queued:
            queued, changed, waited = now_queued, now, schedstat(loop)[1]
        if now > checked + 0.5:  # /stats is the loop's work too: not at every poll
            if _generated(srv, before, LONG + STEADY):
                return math.inf
            checked = now
        assert now < deadline, queued
        time.sleep(0.01)
    assert queued != -1, "the server's end of the connection was never seen in /proc/net/tcp"
    return time.monotonic() - changed - (schedstat(loop)[1] - waited)


def test_a_stream_whose_client_stops_reading_is_dropped(server: GunicornServer) -> None:
    before = server_stats(server)
    steady = {**CHAT, "max_tokens": STEADY, "stream_options": {"include_usage": True}}
    with health_polled(server, 0.05) as polls, ThreadPoolExecutor(1) as pool:
        stalled = _narrow_client(server, {**CHAT, "max_tokens": LONG})
        _read_until(stalled, b"\r\n\r\n")  # the answer's head; then it reads nothing
        stopped = time.monotonic()
        slow = pool.submit(_read_slowly, server, steady)
        stalled_s = _stalled(server, stalled, before)
        dropped_s = time.monotonic() - stopped
        text, slow_s = slow.result(timeout=DEADLINE_S)
        wait_for(lambda: engine_idle(server))
    cut, ended = _read_rest(stalled)
    # no progress for the timeout, counted from the last bytes it read at the earliest; when the buffers fill depends
    # on how fast the machine generates, but from the server's last progress, less the load, the drop took the
    # timeout: 1.5 × is halfway to a timeout twice as long
    assert dropped_s > SEND_TIMEOUT_S - 0.1 and stalled_s < 1.5 * SEND_TIMEOUT_S, (dropped_s, stalled_s)
    assert ended in ("reset", "eof") and b"[DONE]" not in cut
    after = server_stats(server)
    assert after["requests_aborted"] - before["requests_aborted"] == 1
    assert after["requests_served"] - before["requests_served"] == 1  # the slow reader's
    assert after["engine_tokens_generated"] - before["engine_tokens_generated"] < LONG  # cancelled in the engine

    # longer than the timeout in all; its ~120 KB of frames about fill the server's send buffer, so few writes of it
    # block, none for long:
    # that a single write longer than the timeout passes is tests/test_send_timeout.py's
    assert slow_s > SEND_TIMEOUT_S + 0.5
    assert text.endswith("data: [DONE]\n\n"), text[-500:]
    usage = json.loads(text.split("data: ")[-2])["usage"]
    assert usage["completion_tokens"] == STEADY
    assert max(p.held for p in polls) < HELD_S, most_held(polls)
    log = server.log()
    assert log.count(f"closed the connection of POST /v1/chat/completions: the client read nothing for "
                     f"{SEND_TIMEOUT_S} seconds") == 1
    assert "Traceback" not in log


def test_a_background_follower_that_stops_reading_leaves_the_run_generating(server: GunicornServer) -> None:
    body = {"model": MODEL, "input": "Tell me a long story.", "temperature": 0, "max_output_tokens": LONG,
            "reasoning": {"effort": "none"}, "background": True, "stream": True, "top_logprobs": 20,
            "include": ["message.output_text.logprobs"]}
    before = server_stats(server)
    follower = _narrow_client(server, body, "/v1/responses")
    created = _read_until(follower, b"event: response.in_progress")  # then it reads nothing
    response_id = re.search(rb'"id":"(resp_[^"]+)"', created).group(1).decode()
    marker = "closed the connection of POST /v1/responses"
    wait_for(lambda: marker in server.log() or _generated(server, before, LONG), timeout=DROP_WAIT_S)
    # a machine that generates LONG before the buffers fill has the drop still on its way: its timeout, then the write
    wait_for(lambda: marker in server.log(), timeout=10 * SEND_TIMEOUT_S)
    cut, ended = _read_rest(follower)
    assert ended in ("reset", "eof") and b"response.completed" not in cut
    client = server.openai_client()
    # only its follower left: the run goes on (or, on a machine fast enough, has completed), never aborted
    status = client.responses.retrieve(response_id).status
    aborted = server_stats(server)["requests_aborted"] - before["requests_aborted"]
    assert status in ("in_progress", "completed") and aborted == 0, (status, aborted)
    if status == "in_progress":
        assert client.responses.cancel(response_id).status == "cancelled"
    wait_for(lambda: engine_idle(server))
    assert "Traceback" not in server.log()
