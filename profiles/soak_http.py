"""What the soak's scenarios share: raw HTTP over sockets (keep-alive, chunked framing, hang-ups), the tally of a
round, and the checks of an answer's shape."""
from __future__ import annotations

import json
import random
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import jsonschema

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
WORDS = ("robot", "river", "stone", "light", "music", "garden", "engine", "winter", "paper", "ocean")

ENDED = ("response.completed", "response.incomplete")
# the 503s a client of one server may get: at capacity (a soak waits until the model serves, and never restarts it)
SERVER_UNAVAILABLE = ("queue_full",)
# through nginx to replicas (soak_replicas.py): a replica restarted, loading or stopping (where nginx's retry on
# another met the same); nginx with every replica marked down
REPLICAS_UNAVAILABLE = (*SERVER_UNAVAILABLE, "model_loading", "server_shutting_down", "no_replica")
ERROR_KEYS = {"message", "type", "param", "code"}
Json = dict[str, Any]
# the scenarios whose 200 without a problem is an answer read whole (the engine's request served)
SERVED_WHEN_WHOLE = frozenset({"valid", "responses", "probe", "keepalive-reuse", "slow-reader", "slow-body",
                               "tool-stream"})


@dataclass
class Reply:
    status: int  # 0: no status line (we hung up first, or the server closed without an answer)
    headers: dict[str, str]
    body: bytes

    @cached_property
    def chunks(self) -> list[Json]:
        """A streamed chat or legacy answer's `data:` objects, parsed once for every check that reads them."""
        return [json.loads(block[6:]) for block in self.body.decode("utf-8").split("\n\n")
                if block.startswith("data: {")]


@dataclass
class Tally:
    """What one round saw; threads add to it under `lock`."""

    statuses: Counter = field(default_factory=Counter)  # "scenario status" -> count
    problems: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    requests: int = 0
    slowest_s: dict[str, float] = field(default_factory=dict)  # scenario -> its longest run
    stored: list[Json] = field(default_factory=list)  # the last stored Responses answers, for continuations
    background: dict[str, bool] = field(default_factory=dict)  # background responses made: id -> deleted
    # For /stats' counts, which count a request once it reached the engine: at most the requests that may have
    # (no status seen, a 200, a 5xx but 503), at least those seen to end as served (a whole answer read, or a
    # background response GET says completed or incomplete), aborted or failed (a background response GET
    # says cancelled or failed)
    may_count: int = 0
    seen: Counter = field(default_factory=Counter)  # "served" / "aborted" / "failed" -> count
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, scenario: str, status: int, problem: str | None = None, generates: bool = True) -> None:
        """One request's end; `generates`: one to a generating endpoint (a GET, cancel or DELETE does not)."""
        with self.lock:
            self.requests += 1
            self.statuses[f"{scenario} {status}"] += 1
            if problem is not None:
                self.problems.append(f"{scenario}: {problem}")
            if (generates and status in (0, 200)) or (status >= 500 and status != 503):
                self.may_count += 1
            if status == 200 and problem is None and scenario in SERVED_WHEN_WHOLE:
                self.seen["served"] += 1


# -- raw HTTP -------------------------------------------------------------------------------

def request_bytes(method: str, path: str, body: bytes = b"", content_type: str | None = "application/json",
                  extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def reset(sock: socket.socket) -> None:
    """Close with an RST, as a killed client or a proxy timing out does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def hang_up(sock: socket.socket, rng: random.Random) -> None:
    if rng.random() < 0.5:
        reset(sock)
    else:
        sock.close()


class Connection:
    """One keep-alive connection read with Content-Length or chunked framing."""

    def __init__(self, port: int, timeout: float = 120, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise ConnectionError("closed early")
        out, self.buf = self.buf.split(marker, 1)
        return out

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed early")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def head(self) -> tuple[int, dict[str, str]]:
        lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers

    def chunks(self) -> Any:
        """The body's chunks as they arrive (chunked framing), ending at the last chunk."""
        while size := int(self._until(b"\r\n").split(b";")[0], 16):
            data = self._exactly(size)
            self._exactly(2)  # before the chunk is handed out: a reader may stop at it and read on with a new one
            yield data
        self._until(b"\r\n")

    def reply(self) -> Reply:
        status, headers = self.head()
        return Reply(status, headers, self.body(headers))

    def body(self, headers: dict[str, str]) -> bytes:
        """The body after a head with these headers."""
        if headers.get("transfer-encoding") == "chunked":
            body = b"".join(self.chunks())
        elif "content-length" in headers:
            body = self._exactly(int(headers["content-length"]))
        else:
            while self._fill():
                pass
            body, self.buf = self.buf, b""
        return body

    def exchange(self, raw: bytes) -> Reply:
        self.sock.sendall(raw)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def send(port: int, raw: bytes, timeout: float = 120) -> Reply:
    conn = Connection(port, timeout)
    try:
        return conn.exchange(raw)
    finally:
        conn.close()


# -- checks ---------------------------------------------------------------------------------

def error_problem(reply: Reply, unavailable: tuple[str, ...] = SERVER_UNAVAILABLE) -> str | None:
    """None when a 4xx/5xx reply is an allowed, OpenAI-shaped error: a 5xx only as a 503 with one of the
    `unavailable` codes."""
    text = reply.body.decode("utf-8", "replace")
    if reply.status >= 500 and not (reply.status == 503 and any(f'"{code}"' in text for code in unavailable)):
        return f"{reply.status}: {text[:300]}"
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{reply.status} without an OpenAI error body: {text[:300]}"
    if set(error) != ERROR_KEYS or not isinstance(error["message"], str) or not error["message"]:
        return f"{reply.status} with a malformed error: {text[:300]}"
    return None


def answer_problem(reply: Reply, stream: bool, choices: int | None, unavailable: tuple[str, ...] = SERVER_UNAVAILABLE,
                   valid: bool = True) -> str | None:
    """None when a reply is well formed: a 200 with every choice (`choices` of them, None: any number)
    finished, or an allowed error (error_problem's), which a `valid` request may only get as a 503."""
    if reply.status != 200:
        if (problem := error_problem(reply, unavailable)) is not None or not valid or reply.status == 503:
            return problem
        return f"a valid request got {reply.status}: {reply.body[:300]!r}"
    text = reply.body.decode("utf-8")
    if not stream:
        answer = json.loads(text)
        done = [c for c in answer["choices"] if c.get("finish_reason") is not None]
        return None if choices in (None, len(done)) else f"{len(done)} of {choices} choices finished: {text[:300]}"
    if not text.endswith("data: [DONE]\n\n"):
        return f"stream without [DONE]: {text[-300:]}"
    events = reply.chunks
    if any("error" in e for e in events):
        return f"stream with an error event: {text[-300:]}"
    finished = {(c["index"]) for e in events for c in e.get("choices", []) if c.get("finish_reason") is not None}
    return None if choices in (None, len(finished)) else f"{len(finished)} of {choices} choices finished: {text[-300:]}"


def logprobs_problem(reply: Reply, stream: bool, stops: bool) -> str | None:
    """None unless a chat answer's logprobs do not spell its content: each choice's tokens joined (by their bytes) are
    its content; where a stop string (`stops`: the request has some) ended it, they begin with it and run past it by
    their last token at most (one a stop string cut into; none that only spelled text a stop string cut away): a held
    logprob lost, duplicated or out of order. For an answer without tool calls, asked with `skip_special_tokens:
    false` and `include_reasoning: false` (else a special token's or the thought's are listed, not in the content)."""
    if reply.status != 200:
        return None
    if stream:
        pieces = [(c["index"], c["delta"].get("content") or "", (c.get("logprobs") or {}).get("content") or [],
                   c.get("finish_reason")) for e in reply.chunks for c in e.get("choices", [])]
    else:
        pieces = [(c["index"], c["message"]["content"] or "", (c["logprobs"] or {}).get("content") or [],
                   c["finish_reason"]) for c in json.loads(reply.body)["choices"]]
    choices: dict[int, tuple[str, list[Json], str | None]] = {}
    for index, content, entries, finish in pieces:
        text, listed, finished = choices.get(index, ("", [], None))
        choices[index] = (text + content, listed + entries, finish or finished)
    for index, (content, entries, finish) in sorted(choices.items()):
        spelled = b"".join(bytes(e["bytes"]) for e in entries)
        if stops and finish == "stop":
            last = bytes(entries[-1]["bytes"]) if entries else b""
            wrong = not spelled.decode(errors="replace").startswith(content) or \
                bool(last and len(spelled) - len(last) >= len(content.encode()))
        else:
            wrong = spelled.decode(errors="replace") != content
        if wrong:
            return f"choice {index}'s logprobs spell {spelled!r}, its content is {content!r} (finish {finish})"
    return None


def tool_call_problem(reply: Reply, strict_tools: list[Json]) -> str | None:
    """None unless a streamed chat answer calls a strict tool with arguments its schema does not hold, or a choice
    that ends "tool_calls" has no call."""
    if reply.status != 200:
        return None
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in strict_tools}
    calls: dict[tuple[int, int], list[str]] = {}  # (choice, call) -> [name, arguments]
    ended: dict[int, str] = {}
    for chunk in reply.chunks:
        for choice in chunk.get("choices", []):
            for call in choice["delta"].get("tool_calls") or []:
                name_args = calls.setdefault((choice["index"], call["index"]), ["", ""])
                name_args[0] += call.get("function", {}).get("name") or ""
                name_args[1] += call.get("function", {}).get("arguments") or ""
            if choice.get("finish_reason") is not None:
                ended[choice["index"]] = choice["finish_reason"]
    for (index, _), (name, arguments) in sorted(calls.items()):
        if name not in schemas:
            continue
        try:
            error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schemas[name]).iter_errors(
                json.loads(arguments)))
            problem = None if error is None else error.message
        except ValueError:
            problem = "not JSON"
        if problem is not None and ended.get(index) == "tool_calls":
            return f"choice {index}: strict {name}({arguments!r}): {problem}"
    without = [i for i, reason in ended.items() if reason == "tool_calls" and not any(c == i for c, _ in calls)]
    return f"choices {without} end tool_calls without a call" if without else None


def parse_event(block: str) -> Json:
    """One Responses stream event (`event:` and `data:` lines), checked to carry its `event:` line's type."""
    head, data = block.split("\n", 1)
    event = json.loads(data.removeprefix("data: "))
    if head != f"event: {event['type']}":
        raise ValueError(f"event line {head!r} for a {event['type']} event")
    return event


def response_events(text: str) -> list[Json]:
    """A Responses stream's events; comment blocks (the server's probe of a client that half-closed) skipped, as the
    SSE spec says."""
    return [parse_event(block) for block in text.split("\n\n") if block and not block.startswith(":")]


def response_problem(reply: Reply, stream: bool,
                     unavailable: tuple[str, ...] = SERVER_UNAVAILABLE) -> tuple[str | None, Json | None]:
    """As answer_problem, for a valid Responses request, and its final response: streamed, numbered events
    from response.created to response.completed/incomplete, whose opening ones say what the last does of
    `store`."""
    if reply.status != 200:
        return answer_problem(reply, stream, None, unavailable), None
    text = reply.body.decode("utf-8")
    if not stream:
        answer = json.loads(text)
        return None if answer["status"] in ("completed", "incomplete") else f"status {answer['status']}", answer
    events = response_events(text)
    final = events[-1]["response"] if events and events[-1]["type"] in ENDED else None
    if final is None or events[0]["type"] != "response.created":
        return f"stream not from response.created to its end: {text[:200]!r} ... {text[-300:]!r}", None
    if [e["sequence_number"] for e in events] != list(range(len(events))):
        return "sequence numbers out of order", None
    if {events[0]["response"]["store"], events[1]["response"]["store"]} != {final["store"]}:
        return f"store {events[0]['response']['store']} opening, {final['store']} at the end", None
    return None, final


# -- request bodies -------------------------------------------------------------------------

def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))
