"""A stream's client that closes its socket while the stream writes nothing (its answer held back, or still queued) is
noticed and its request aborted, through the shared chat server and raw sockets. (A client that leaves while its stream
writes, and a collected answer's, are tests/test_server.py's.)"""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

from chat_http import MODEL, engine_idle, raw_request, server_stats
from checkpoints import TOKEN_IDS
from nanoqwen.engine import EngineConfig
from server_process import GunicornServer
from waits import wait_for

USER = [{"role": "user", "content": "What is the best book?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
FILLER_STEPS = 1000  # a queued close noticed at a poll interval: 2 steps measured at load 17-20; 100+ once, loaded
ENDED_S = 120  # a last resort: the waits end on a request's end or on tokens counted, not on time


@contextlib.contextmanager
def _head_read(srv: GunicornServer, body: dict[str, Any], path: str = "/v1/chat/completions") -> Iterator[None]:
    """A streamed request sent on a socket of its own, its response head read, then (on leaving) the socket closed:
    a FIN, as a client that timed out sends. Only a stream that sends its head alone will do: a chunk left unread
    would make the close a reset, which the server always noticed."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(raw_request(body, path))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(1 << 16)
        assert received.startswith(b"HTTP/1.1 200 "), received
        yield


def _ended(srv: GunicornServer, before: dict[str, Any], tokens: int) -> dict[str, Any]:
    """/stats once a request has ended since `before`, aborted or served (a close never noticed runs to its end), or
    `tokens` generated since: what was noticed late is counted, not timed. The snapshot that showed it."""
    ended = before["requests_aborted"] + before["requests_served"]

    now: dict[str, Any] = {}

    def done() -> bool:
        now.update(server_stats(srv))
        return (now["requests_aborted"] + now["requests_served"] > ended
                or now["engine_tokens_generated"] - before["engine_tokens_generated"] >= tokens)

    wait_for(done, timeout=ENDED_S, poll=0.02)
    return now


def test_a_tool_call_stream_whose_client_closed_is_aborted(chat_server: GunicornServer) -> None:
    """With tools and tool_choice auto, an answer of `<tool_call>` tokens alone (biased) sends no chunk until the call
    is parsed at its end: a client that closed its socket was noticed at no write, and the request ran to max_tokens
    for nobody (counted as served). Its end of stream is probed with an SSE comment, which the closed socket resets."""
    max_tokens = 600
    body = {"model": MODEL, "messages": USER, "tools": TOOLS, "stream": True, "temperature": 0, "ignore_eos": True,
            "max_tokens": max_tokens, "logit_bias": {str(TOKEN_IDS["<tool_call>"]): 100}, **NO_THINKING}
    before, log_before = server_stats(chat_server), len(chat_server.log())
    with _head_read(chat_server, body):
        pass
    after = _ended(chat_server, before, max_tokens)
    wait_for(lambda: engine_idle(chat_server))
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["requests_served"] == before["requests_served"]
    # cut short within a step or two of the probe (3 tokens measured; a poll interval late was 160-190 on this CPU)
    assert after["engine_tokens_generated"] - before["engine_tokens_generated"] < 50
    logged = chat_server.log()[log_before:]  # the probe written into a closed socket, and its reset: quietly
    assert "Traceback" not in logged and "[ERROR]" not in logged, logged


def test_a_queued_stream_whose_client_closed_leaves_the_queue(chat_server: GunicornServer) -> None:
    """A stream queued behind a full batch has its head sent (a legacy completion's alone: no role chunk), then
    nothing till the engine starts it: a client that closed its socket meanwhile was noticed only once it was admitted
    (its first write), after the batch had a free row. Now it is aborted from the queue while the batch still runs."""
    filler = {"model": MODEL, "prompt": "Once", "n": EngineConfig.max_batch, "max_tokens": FILLER_STEPS,
              "temperature": 0, "stream": True, "extra_body": {"ignore_eos": True}}
    client = chat_server.openai_client()
    body = {"model": MODEL, "prompt": "Hi", "stream": True, "max_tokens": 16}
    with client.completions.create(**filler) as completion:
        next(iter(completion))  # every row taken (the shared server runs the default max_batch)
        before = server_stats(chat_server)
        with _head_read(chat_server, body, "/v1/completions"):
            assert server_stats(chat_server)["queue_length"] == 1
        # ended, or the filler's every token generated: a close noticed only once a row is free ends after that
        after = _ended(chat_server, before, EngineConfig.max_batch * FILLER_STEPS)
        wait_for(lambda: server_stats(chat_server)["queue_length"] == 0)  # taken off at the engine's next step
        assert server_stats(chat_server)["active_requests"] == 1  # the filler still runs: no row was freed for it
    assert after["requests_aborted"] == before["requests_aborted"] + 1
    assert after["requests_served"] == before["requests_served"]
    # aborted while the filler held every row (counted in the same /stats), not once one was free: an order the server
    # reports, where a count of the filler's tokens meanwhile grew with the load (3,237 of a 3,200 bound once)
    assert after["active_requests"] == 1
    wait_for(lambda: engine_idle(chat_server), timeout=60)
