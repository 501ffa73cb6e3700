"""Many streams of one worker, woken together once an engine step (api/channel.py's HubWaker): through the shared chat
server, each gets exactly its own tokens in order, and one whose client vanished is aborted while the others finish."""
from __future__ import annotations

import json
import socket
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chat_http import MODEL, dechunk, engine_idle, raw_request, read_all, server_stats
from server_process import GunicornServer
from waits import wait_for

NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def _body(i: int, max_tokens: int) -> dict[str, Any]:
    """The openai client's arguments (vLLM's fields in extra_body) of stream i."""
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Stream {i}: count the stars over dog {i * i}"}],
            "temperature": 0, "max_tokens": max_tokens, "extra_body": {"ignore_eos": True, **NO_THINKING}}


def _raw_body(i: int, max_tokens: int) -> dict[str, Any]:
    body = _body(i, max_tokens)
    extra = body.pop("extra_body")
    return {**body, **extra, "stream": True, "stream_options": {"include_usage": True}}


def test_many_concurrent_streams_each_get_their_own_tokens_in_order(chat_server: GunicornServer) -> None:
    """24 streams of distinct prompts and lengths at once (the openai client): each one's deltas, joined, are its own
    answer as the same request collected gives it, and its usage counts its tokens."""
    client = chat_server.openai_client()
    bodies = [_body(i, 6 + i % 7) for i in range(24)]

    def streamed(body: dict[str, Any]) -> tuple[str, int | None]:
        text, usage = "", None
        for chunk in client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += (choice.delta.content or "") + (getattr(choice.delta, "reasoning_content", None) or "")
        return text, usage

    def collected(body: dict[str, Any]) -> str:
        message = client.chat.completions.create(**body).choices[0].message
        return (message.content or "") + (getattr(message, "reasoning_content", None) or "")

    with ThreadPoolExecutor(len(bodies)) as pool:
        streams = list(pool.map(streamed, bodies))
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(collected, bodies))
    assert [text for text, _ in streams] == answers
    assert [usage for _, usage in streams] == [b["max_tokens"] for b in bodies]
    assert len(set(answers)) > 1  # distinct prompts: a mix-up of streams would show
    wait_for(lambda: engine_idle(chat_server))


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_stream_whose_client_vanished_is_aborted_and_the_others_finish(chat_server: GunicornServer) -> None:
    """8 streams decoding together; once each has its first tokens, one client resets its connection: that request is
    aborted within a few steps, and the 7 others get every token, their usage and `[DONE]`."""
    max_tokens = 200
    before = server_stats(chat_server)
    socks = [socket.create_connection(("127.0.0.1", chat_server.port), timeout=60) for _ in range(8)]
    heads = []
    for i, sock in enumerate(socks):
        sock.sendall(raw_request(_raw_body(i, max_tokens), headers="Connection: close\r\n"))
    for sock in socks:  # each one's head and first token in hand: all decode
        received = b""
        while received.count(b"data: ") < 2:
            data = sock.recv(1 << 16)
            assert data, received
            received += data
        heads.append(received)
    _reset(socks.pop(3))
    heads.pop(3)
    with ThreadPoolExecutor(len(socks)) as pool:
        rests = list(pool.map(read_all, socks))
    for sock in socks:
        sock.close()
    for head, rest in zip(heads, rests):
        text = dechunk((head + rest).partition(b"\r\n\r\n")[2]).decode()
        assert text.endswith("data: [DONE]\n\n"), text[-300:]
        usage = json.loads(text.split("data: ")[-2])["usage"]
        assert usage["completion_tokens"] == max_tokens
    wait_for(lambda: engine_idle(chat_server))
    after = server_stats(chat_server)
    assert after["requests_aborted"] - before["requests_aborted"] == 1
    assert after["requests_served"] - before["requests_served"] == 7
    generated = after["engine_tokens_generated"] - before["engine_tokens_generated"]
    assert 7 * max_tokens <= generated < 8 * max_tokens - 50  # the vanished one cut short
