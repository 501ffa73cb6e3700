"""Edge values and round trips an OpenAI client user sends, found by probing the real server (the shared tiny
checkpoint server, fp32) with the official `openai` client and raw HTTP: each is what OpenAI's API does."""
from __future__ import annotations

import json
import socket
import time
from typing import Any, Literal

import openai
import pydantic
import pytest
import requests

from chat_http import (
    CLIENT_HELLO,
    HELD_S,
    MODEL,
    engine_idle,
    health_polled,
    most_held,
    post_chat,
    raw_request,
    read_all,
    server_stats,
)
from checkpoints import TOKEN_IDS
from server_process import GunicornServer
from waits import wait_for

USER = [{"role": "user", "content": "What is the best book?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def _ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def test_top_p_0_keeps_the_most_likely_token_alone(chat_server: GunicornServer) -> None:
    """OpenAI takes top_p 0 (the spec's range is 0.0-1.0): only the most likely token survives, so a sampled
    answer is the greedy one; chat, legacy completions and Responses (which echoes it) alike."""
    greedy = _ok(post_chat(chat_server, {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0,
                                         **NO_THINKING}))["choices"][0]["message"]["content"]
    sampled = _ok(post_chat(chat_server, {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 1.5,
                                          "top_p": 0, "n": 3, "seed": 5, **NO_THINKING}))
    assert [c["message"]["content"] for c in sampled["choices"]] == [greedy] * 3
    completion = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6}
    texts = [_ok(requests.post(f"{chat_server.url}/v1/completions", json={**completion, **extra}, timeout=120))
             ["choices"][0]["text"] for extra in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0, "seed": 9})]
    assert texts[0] == texts[1]
    response = _ok(requests.post(f"{chat_server.url}/v1/responses", json={
        "model": MODEL, "input": "Hi", "max_output_tokens": 16, "temperature": 1.0, "top_p": 0}, timeout=120))
    assert response["top_p"] == 0 and response["status"] in ("completed", "incomplete")
    error = post_chat(chat_server, {"model": MODEL, "messages": USER, "top_p": -0.01}).json()["error"]
    assert error["param"] == "top_p"


def test_the_clients_dumped_assistant_message_goes_back_into_the_history(client: openai.OpenAI) -> None:
    """`messages.append(reply.choices[0].message.model_dump())` sends every field of the client's message type,
    `annotations: []` among them as OpenAI answers (null from older servers, a list with citations): the next turn
    takes them, as vLLM does; only an assistant message has them."""
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0,
                                           extra_body=NO_THINKING)
    dumped = reply.choices[0].message.model_dump()
    assert dumped["annotations"] == [] and dumped["refusal"] is None
    cited = {**dumped, "annotations": [{"type": "url_citation", "url_citation": {
        "start_index": 0, "end_index": 1, "title": "t", "url": "https://example.com"}}]}
    follow_up = {"role": "user", "content": "And the second best?"}
    answers = [client.chat.completions.create(model=MODEL, messages=[*USER, message, follow_up], max_tokens=3,
                                              temperature=0, extra_body=NO_THINKING)
               for message in (dumped, {**dumped, "annotations": None}, cited, reply.choices[0].message)]
    assert len({a.choices[0].message.content for a in answers}) == 1  # the annotations are not in the prompt
    assert len({a.usage.prompt_tokens for a in answers}) == 1
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{**USER[0], "annotations": cited["annotations"]}],
                                       max_tokens=2)
    assert info.value.param == "messages.[0]"


def test_a_call_cut_short_goes_back_into_the_history(chat_server: GunicornServer, client: openai.OpenAI) -> None:
    """A forced call cut by max_tokens keeps its arguments so far (`{"` here): sent back with its tool answer, as an
    agent loop does, it was a 400 on every later turn; the next turn's prompt shows it as written."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, tools=tools,
                                           tool_choice="required", extra_body=NO_THINKING)
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "length" and call.function.arguments == '{"'
    history = [*USER, reply.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "failed"}]
    assert client.chat.completions.create(model=MODEL, messages=history, max_tokens=2, tools=tools).choices
    ids = _ok(requests.post(f"{chat_server.url}/tokenize", json={"model": MODEL, "messages": history, "tools": tools},
                            timeout=60))["tokens"]
    prompt = _ok(requests.post(f"{chat_server.url}/detokenize", json={"model": MODEL, "tokens": ids}, timeout=60))
    assert '<tool_call>\n{"name": "f", "arguments": {"}\n</tool_call>' in prompt["prompt"]


@pytest.mark.parametrize("arguments", [
    "city=Paris", "[" * 5000 + "]" * 5000,  # was a 500 once: RecursionError
    '{"city": "\\ud800"}',  # was a 500 once, decoded: the tokenizer got a lone surrogate
    '{"city": NaN}', '{"city": 1e309}', "[1]",
])
def test_malformed_arguments_in_the_history_are_written_as_sent(chat_server: GunicornServer, arguments: str) -> None:
    """Arguments that are no JSON object (what a model writes, cut short or malformed) are not decoded: the prompt
    holds them as sent, never a 500."""
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [*USER, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c",
                                                                       "content": "sunny"}]
    ids = _ok(requests.post(f"{chat_server.url}/tokenize", json={"model": MODEL, "messages": messages},
                            timeout=60))["tokens"]
    prompt = _ok(requests.post(f"{chat_server.url}/detokenize", json={"model": MODEL, "tokens": ids}, timeout=60))
    assert f'"arguments": {arguments}}}\n</tool_call>' in prompt["prompt"]
    if len(ids) < 1000:
        assert _ok(post_chat(chat_server, {"model": MODEL, "messages": messages, "max_tokens": 2}))["choices"]


def _answers(srv: GunicornServer, raw: bytes) -> tuple[list[tuple[bytes, dict[str, Any]]], bool]:
    """Each (head, JSON body) the server answers `raw` on one connection until it closes it or goes quiet for 5 s,
    and whether it closed it."""
    data, closed = b"", False
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(raw)
        try:
            while chunk := sock.recv(1 << 16):
                data += chunk
            closed = True
        except TimeoutError:
            pass
    answers = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
                     .split(b":")[1])
        answers.append((head, json.loads(data[:length])))
        data = data[length:]
    return answers, closed


def _status(head: bytes) -> int:
    return int(head.split(b" ")[1])


HEALTH_CLOSE = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("raw, status", [
    # a Content-Length past the 8 MiB limit, the body not sent: the 413 comes at once
    (raw_request(b"{}").replace(b"Content-Length: 2", f"Content-Length: {9 << 20}".encode()), 413),
    (raw_request({"model": MODEL, "prompt": "hi"}, "/tokenize", "Content-Encoding: gzip\r\n") + HEALTH_CLOSE, 415),
], ids=["413", "415"])
def test_an_answer_to_a_body_not_read_says_the_connection_closes(chat_server: GunicornServer, raw: bytes,
                                                                 status: int) -> None:
    """gunicorn said `Connection: keep-alive` and then closed the connection (it ignores an app's Connection
    header): a client that believed it would reuse a closed connection. The request pipelined behind is not read."""
    [(head, body)], closed = _answers(chat_server, raw)
    assert _status(head) == status and body["error"]["code"] in ("request_too_large", "unsupported_media_type")
    assert b"\r\nConnection: close\r\n" in head and closed


def test_a_kept_connection_serves_the_requests_pipelined_behind_an_error(chat_server: GunicornServer) -> None:
    """Where the answer says keep-alive (the body was read, or gunicorn reads it), the next requests are served."""
    raw = (raw_request({"model": MODEL}, "/v1/nothing") + raw_request(b'{"model": ', "/tokenize")
           + raw_request({"model": MODEL, "prompt": "hi"}, "/tokenize") + HEALTH_CLOSE)
    answers, closed = _answers(chat_server, raw)
    assert [_status(head) for head, _ in answers] == [404, 400, 200, 200] and closed
    assert all(b"\r\nConnection: keep-alive\r\n" in head for head, _ in answers[:3])
    assert answers[2][1]["tokens"] and answers[3][1]["status"] == "healthy"


@pytest.mark.parametrize("first", [CLIENT_HELLO, b"\x00\x01\x02\x03\xff\xfe", b"GET /health\x00"],
                         ids=["tls-hello", "binary", "nul-in-line"])
def test_bytes_no_request_line_begins_with_are_refused_at_once(chat_server: GunicornServer, first: bytes) -> None:
    """`https://` pointed at this plain-HTTP port, or other bytes no request line holds: gunicorn waited for a line
    feed or 4 KiB, and without them the connection held its slot, unanswered, for the keep-alive timeout (75 s). As
    nginx and uvicorn do, it is answered 400 without waiting for more bytes, and closed. A request sent byte by byte on
    another connection meanwhile (each prefix checked as it comes) is served as before. Not timed (the answer may take
    up to _answers' 5 s of quiet under load): a connection held answers nothing within them (the keep-alive timeout is
    75 s)."""
    request = HEALTH_CLOSE
    with socket.create_connection(("127.0.0.1", chat_server.port), timeout=10) as slow:
        slow.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(request)):
            if i == len(request) // 2:
                answers, closed = _answers(chat_server, first)
            slow.sendall(request[i:i + 1])
            time.sleep(0.002)
        assert read_all(slow).startswith(b"HTTP/1.1 200 ")
    assert len(answers) == 1 and closed, answers
    [(head, body)] = answers
    assert _status(head) == 400, head
    assert body["error"]["type"] == "invalid_request_error" and "request line" in body["error"]["message"]


def test_a_large_body_not_read_is_not_read_on_the_loop(chat_server: GunicornServer) -> None:
    """An answer before the body was read (a 404, a 405) left gunicorn to read the rest before the next request, in
    one go: a local client's 96 MB held the loop for ~1 s. Past 64 KiB such a body closes the connection after the
    answer, read and dropped meanwhile (a lingering close, yielding) so that a client still sending gets the answer,
    not a reset. The holds are checked first: they are what the keep-alive drain breaks (held 3.7 s), not only
    its Connection header. linger's own yield is not seen here: this client sends slower than the loop reads."""
    with health_polled(chat_server, 0.005) as polls:
        answers = [requests.post(f"{chat_server.url}{path}", data=b" " * (96 << 20), timeout=60)
                   for path in ("/v1/nothing", "/health")]
    assert max(p.held for p in polls) < HELD_S, most_held(polls)
    assert [(a.status_code, a.headers["Connection"]) for a in answers] == [(404, "close"), (405, "close")]
    chunked = raw_request(b"", "/v1/nothing", "Transfer-Encoding: chunked\r\n").replace(b"Content-Length: 0\r\n", b"")
    [(head, _)], closed = _answers(chat_server, chunked + b"5\r\nabcde\r\n0\r\n\r\n" + HEALTH_CLOSE)
    assert _status(head) == 404 and b"\r\nConnection: close\r\n" in head and closed


@pytest.mark.parametrize("method, path, meant", [
    ("POST", "/v1//chat/completions", "/v1/chat/completions"),  # a base URL ending in `/`, joined naively
    ("POST", "//v1/chat/completions", "/v1/chat/completions"),
    ("POST", "/v1/chat/completions/", "/v1/chat/completions"),
    ("POST", "/v1/completions/", "/v1/completions"),
    ("GET", "/v1//models", "/v1/models"),
    ("GET", "/v1/models/", "/v1/models"),
    ("GET", "//health", "/health"),
    ("GET", "/v1/responses/resp_1/", "/v1/responses/resp_1"),
    ("DELETE", "/v1/responses//resp_1", "/v1/responses/resp_1"),
    ("POST", "/v1/models/", None),  # `/v1/models` takes no POST
    ("POST", "/v1/nothing/", None),
])
def test_a_path_with_an_empty_segment_or_a_trailing_slash_is_a_json_404(chat_server: GunicornServer, method: str,
                                                                        path: str, meant: str | None) -> None:
    """`//` was a 308 with an HTML page (werkzeug's redirect), `//` leading it served the route; as OpenAI and vLLM,
    each is a 404 in OpenAI's envelope, naming the route it likely meant."""
    [(head, body)], _ = _answers(chat_server, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2"
                                               "\r\nConnection: close\r\n\r\n{}".encode())
    assert _status(head) == 404 and b"\r\nContent-Type: application/json\r\n" in head
    assert body["error"]["code"] == "not_found" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(f"Unknown endpoint: {method} {path}")
    hint = body["error"]["message"].partition(" (did you mean ")[2]
    assert hint == ("" if meant is None else f"{meant}? Check the client's base URL for a trailing slash.)")


class Verdict(pydantic.BaseModel):
    ok: bool
    grade: Literal["good", "bad"]


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # the client's own dump of `parsed`
def test_the_clients_parsed_message_goes_back_into_the_history(client: openai.OpenAI) -> None:
    """`.parse()`'s message object sent back as it is carries `parsed` (and a tool call's `parsed_arguments`): the
    client strips them from Responses input only, and vLLM takes them; a 400 naming `parsed` stopped the loop. They
    are not part of the prompt; on a message of another role, or without text content, `parsed` is refused."""
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 40, "temperature": 0, "extra_body": NO_THINKING}
    formatted = client.chat.completions.parse(messages=USER, response_format=Verdict, **kwargs).choices[0].message
    called = client.chat.completions.parse(messages=USER, tools=[openai.pydantic_function_tool(Verdict)],
                                           tool_choice="required", parallel_tool_calls=False, **kwargs)
    called = called.choices[0].message
    assert isinstance(formatted.parsed, Verdict) and isinstance(called.tool_calls[0].function.parsed_arguments, Verdict)
    follow_up = {"role": "user", "content": "And the second best?"}
    for message in (formatted, called):
        plain = message.model_dump(exclude_none=True, exclude={"parsed"})
        for call in plain.get("tool_calls", ()):
            del call["function"]["parsed_arguments"]
        tool_answer = [{"role": "tool", "tool_call_id": c.id, "content": "ok"} for c in message.tool_calls or ()]
        usages = [client.chat.completions.create(messages=[*USER, sent, *tool_answer, follow_up], **kwargs).usage
                  for sent in (message, plain)]
        assert usages[0].prompt_tokens == usages[1].prompt_tokens
    for wrong in ({**USER[0], "parsed": {"ok": True}}, {"role": "assistant", "content": None, "parsed": {"ok": True}}):
        with pytest.raises(openai.BadRequestError) as info:  # another role; a value with no text it came from
            client.chat.completions.create(messages=[wrong, *USER], **kwargs)
        assert info.value.param == "messages.[0]"


def test_a_service_tier_openai_does_not_know_is_refused(chat_server: GunicornServer) -> None:
    """Any string was taken on chat (Responses already checked OpenAI's names): the client's `service_tier="flx"`
    ran without a word, where OpenAI answers 400."""
    body = {"model": MODEL, "messages": USER, "max_tokens": 1}
    assert _ok(post_chat(chat_server, {**body, "service_tier": "flex"}))["service_tier"] == "default"
    error = post_chat(chat_server, {**body, "service_tier": "flx"}).json()["error"]
    assert error["param"] == "service_tier" and error["type"] == "invalid_request_error"


def test_the_served_tier_is_named_in_the_answer_and_every_chunk(client: openai.OpenAI) -> None:
    """OpenAI answers with the tier that served the request ("default" for `auto` or none), in the completion and
    in each chunk of a stream, usage chunk included; the client's types read it."""
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 2}
    assert client.chat.completions.create(**kwargs).service_tier == "default"
    chunks = list(client.chat.completions.create(**kwargs, service_tier="auto", stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and {c.service_tier for c in chunks} == {"default"}


def _expecting(srv: GunicornServer, path: str, length: int, headers: str = "") -> socket.socket:
    """A connection that sent a POST's head with `Expect: 100-continue` and no body yet."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
                  f"Expect: 100-continue\r\nContent-Length: {length}\r\n\r\n").encode())
    return sock


@pytest.mark.parametrize("path, length, status", [
    ("/v1/nothing", 100, 404),  # a route that does not exist
    ("/v1/chat/completions", 9 << 20, 413),  # past the 8 MiB limit
    ("/health", 10, 405),
])
def test_a_request_refused_before_its_body_gets_no_100_continue(chat_server: GunicornServer, path: str, length: int,
                                                               status: int) -> None:
    """gunicorn sent `100 Continue` before the app saw the request, so a client sent a whole body to a request the
    app then refused. As uvicorn (h11, vLLM's server) does, it comes at the app's first read of the body: a refusal
    before it is the only answer, and it closes the connection (the client, told no 100, sends no body)."""
    with _expecting(chat_server, path, length) as sock:
        answer = read_all(sock)  # returns: the server closes the connection, no body sent
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"\r\nConnection: close\r\n" in head, answer
    assert json.loads(body)["error"]["message"]


def _answer_on(sock: socket.socket, buffered: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """One answer with a Content-Length read off a kept connection: its head, its body, and what came after it."""
    data = buffered
    while b"\r\n\r\n" not in data:
        data += sock.recv(1 << 16)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += sock.recv(1 << 16)
    return head, rest[:length], rest[length:]


def test_requests_read_get_100_continue_first_and_keep_the_connection(chat_server: GunicornServer) -> None:
    """Each of two `Expect: 100-continue` requests on one connection, and a chunked one, gets its 100 when the app
    reads its body, then its answer, and the connection stays open; so does a GET whose Expect has no body to wait for
    (it needs no 100, and is no refusal before a body)."""
    body = json.dumps({"model": MODEL, "messages": USER, "max_tokens": 1}).encode()
    head_of_post = raw_request(body, headers="Expect: 100-continue\r\n")[:-len(body)]
    with socket.create_connection(("127.0.0.1", chat_server.port), timeout=10) as sock:
        rest = b""
        for _ in range(2):
            sock.sendall(head_of_post)
            assert sock.recv(1 << 16) == b"HTTP/1.1 100 Continue\r\n\r\n"
            sock.sendall(body)
            head, answer, rest = _answer_on(sock, rest)
            assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head
            assert json.loads(answer)["choices"]
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")  # a chunked body waits too
        assert sock.recv(1 << 16) == b"HTTP/1.1 100 Continue\r\n\r\n"
        half = len(body) // 2
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:]))
        sock.sendall(chunked + b"0\r\n\r\n")
        head, answer, rest = _answer_on(sock, rest)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(answer)["choices"]
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n\r\n")
        head, _, rest = _answer_on(sock, rest)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head, head
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # the connection still serves
        assert _answer_on(sock, rest)[0].startswith(b"HTTP/1.1 200 ")


def test_an_auto_tools_streams_headers_go_before_its_first_chunk(chat_server: GunicornServer) -> None:
    """With tools and tool_choice auto a choice's role delta waits for its output: an answer of `<tool_call>` tokens
    alone (biased) sends no chunk until it ends, hundreds of steps later. Its headers go at once all the same (a
    client's read timeout and a proxy's first-byte one count from them): they come while the request still runs,
    with no chunk after them. The client then goes, and the request is aborted (tests/test_server_disconnect.py)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    body = {"model": MODEL, "messages": USER, "tools": tools, "stream": True, "temperature": 0, "ignore_eos": True,
            "max_tokens": 200, "logit_bias": {str(TOKEN_IDS["<tool_call>"]): 100},
            **NO_THINKING}
    with socket.create_connection(("127.0.0.1", chat_server.port), timeout=60) as sock:
        sock.sendall(raw_request(body))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(1 << 16)
        stats = server_stats(chat_server)
        running = stats["active_requests"] + stats["queue_length"]  # the headers may go before the engine admits it
        head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head, head
    assert running == 1 and b"data:" not in rest, (running, rest)
    wait_for(lambda: engine_idle(chat_server), timeout=60)


@pytest.mark.parametrize("header", ["SCRIPT_NAME: /x", "SCRIPT_NAME: /v1\r\nPATH_INFO: /models"])
def test_a_loopback_clients_script_name_or_path_info_header_is_not_trusted(chat_server: GunicornServer,
                                                                            header: str) -> None:
    """gunicorn reads SCRIPT_NAME and PATH_INFO from a loopback peer's headers by default (forwarder_headers): a proxy
    on this host passing underscore headers let any client make /health a 500 ("Request path '/health' does not
    start with SCRIPT_NAME '/x'"), or, with PATH_INFO beside it, try another path than the one asked (its 500 here).
    The headers are ignored."""
    with socket.create_connection(("127.0.0.1", chat_server.port), timeout=30) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\nConnection: close\r\n\r\n".encode())
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert json.loads(body)["status"] == "healthy", body
