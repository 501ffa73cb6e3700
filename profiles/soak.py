"""Soak: a real `gunicorn -k gevent server:app` under a random, concurrent mix of good, bad and rude clients.

    python profiles/soak.py [--modes default none int8 int4 bf16 torch spec tight] [--rounds 3] [--round-seconds 60]
        [--clients 10] [--seed 0] [--background-weight 10] [--tool-weight 8] [--store-weight 8]
        [--health-timeout 180] [--out DIR]

Per mode (default: the CPU server's defaults; `none`: NANOQWEN_GRAPH=none; `int8`/`int4`: NANOQWEN_QUANT=int8/int4;
`bf16`: NANOQWEN_DTYPE=bfloat16; `torch`: NANOQWEN_CPU_KERNELS=0, torch's ops alone; `spec`: n-gram speculative
decoding, NANOQWEN_SPECULATIVE_CONFIG; `tight`: 8 sequences in a 72-block KV pool of 8-token blocks, a 20-token step
budget, eager, so that running requests are preempted) it serves the 2-layer test checkpoint on the CPU in fp32
(bf16 in `bf16`) and runs `--rounds` rounds. In each, `--clients` threads pick scenarios at random for
`--round-seconds`: streamed and non-streamed chat, legacy completions (n>1, logprobs, stop strings, tools,
json_schema, seeds, max_tokens edge values) and Responses (`/v1/responses`: continued by previous_response_id or
item references, its calls answered, truncation "auto", stored or not, disconnected, read slowly), background
Responses (soak_background.py: polled, streamed, followers resumed at random `starting_after`, abandoned or read
slowly, cancels and DELETEs at every stage, continuations of runs in progress, bursts past the 32 running), stored
Chat Completions (soak_store.py: `store: true` streamed or not, n>1, left mid-stream, among lists, retrieves,
updates, message lists and deletes of the same ids), clients that disconnect (before the headers, while the prompt
is prefilled, mid-stream, after the last chunk before [DONE]), slow readers, stalled and trickled bodies, oversized
bodies and prompts, fuzzed JSON (tests/fuzz_bodies.py), wrong methods and content types, keep-alive reuse after an
error, bursts of concurrent strict-tool streams (half reset mid-stream, the rest's strict calls checked against
their schemas), and a fixed greedy probe; /health is polled from a process of its own (chat_http.health_polled) and
a prober thread reads /stats and /v1/models throughout.

Invariants (violations are listed and make the exit status 1): no 5xx but the documented 503s, every error
OpenAI-shaped, a chat answer's logprobs spell its content (soak_http.logprobs_problem), the worker pid never
changes, /health's p99 less the machine's load (chat_http.Poll.held: the
stalls of the worker's event loop, not its thread's or the poller's waits for a CPU) under --health-p99-ms, after
each round /stats shows no
running or waiting request and kv_cache_usage 0, the worker's RSS after the last round within --rss-growth-mb of the
first's, the probe's greedy answer always the one the idle server gave, every Responses answer that says it is stored
retrievable as it was answered, right after; once the clients stop every background response has ended (GET: a
terminal status, 404 once deleted) and 32 more fit, the chat store is consistent (soak_store.py's settle), and /stats'
served, aborted and failed counts are each at least those the clients saw end so and together at most the requests
that may have reached the engine. Writes soak.json to --out (default profiles/out/).
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "profiles")]

import fuzz_bodies  # noqa: E402
from chat_http import MODEL, Poll, cpu_env, health_polled, most_held  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from nanoqwen.api.metrics import percentile  # noqa: E402
from server_process import GunicornServer  # noqa: E402
from soak_background import BackgroundSoak  # noqa: E402
from soak_http import (  # noqa: E402
    CHAT,
    COMPLETIONS,
    RESPONSES,
    SERVER_UNAVAILABLE,
    Connection,
    Json,
    Reply,
    Tally,
    answer_problem,
    error_problem,
    hang_up,
    logprobs_problem,
    request_bytes,
    reset,
    response_problem,
    send,
    tool_call_problem,
    words,
)
from soak_store import StoreSoak  # noqa: E402

SPECULATIVE = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
MODES: dict[str, dict[str, str]] = {"default": {}, "none": {"NANOQWEN_GRAPH": "none"},
                                    "int8": {"NANOQWEN_QUANT": "int8"}, "int4": {"NANOQWEN_QUANT": "int4"},
                                    "bf16": {"NANOQWEN_DTYPE": "bfloat16"},
                                    "torch": {"NANOQWEN_CPU_KERNELS": "0"},
                                    "spec": {"NANOQWEN_SPECULATIVE_CONFIG": SPECULATIVE},
                                    # differential.py's eager pool: 576 KV tokens for 8 sequences, so they preempt
                                    "tight": {"NANOQWEN_MAX_BATCH": "8", "NANOQWEN_GRAPH": "none",
                                              "NANOQWEN_BLOCK_SIZE": "8", "NANOQWEN_MAX_STEP_TOKENS": "20",
                                              "NANOQWEN_NUM_KV_BLOCKS": "72"}}
PREEMPTING = frozenset({"tight"})  # a mode whose soak is void if nothing was preempted
PROBE = {"model": MODEL, "prompt": [9707, 11, 1879, 0, 358, 1079, 264, 12305], "max_tokens": 24,
         "temperature": 0, "ignore_eos": True, "logprobs": 1}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}}}
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}]
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}
STRICT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": CITY}},
                {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
                    "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}}, "required": ["zone"],
                    "additionalProperties": False}}}]
# beside them, a tool that is not strict (a name of its own: the soak checks calls by name against STRICT_TOOLS)
LENIENT_TOOLS = [{"type": "function", "function": {**TOOLS[0]["function"], "name": "get_forecast"}}]
TOOL_WEIGHT = 8  # of the bursts of strict-tool streams, against 96 for the plain scenarios
STORE_WEIGHT = 8  # of the stored Chat Completions scenarios
HEALTH_POLL_S = 0.05


def chat_body(rng: random.Random, long_tokens: int = 300) -> Json:
    body: Json = {"model": MODEL, "messages": [{"role": "user", "content": words(rng, rng.randint(1, 60))}],
                  "max_tokens": rng.choice([1, 1, 2, 8, 24, 64]), "stream": rng.random() < 0.5}
    if rng.random() < 0.3:
        body["n"] = rng.randint(2, 4)
    if rng.random() < 0.3:
        # the content then holds every token listed: soak_http.logprobs_problem
        body |= {"logprobs": True, "top_logprobs": rng.randint(0, 5), "skip_special_tokens": False,
                 "include_reasoning": False}
    if rng.random() < 0.2:
        body["stop"] = rng.sample(["the", "\n", " robot", "a", "</think>", "."], rng.randint(1, 4))
    if rng.random() < 0.2:
        body["tools"] = TOOLS
        body["tool_choice"] = rng.choice(["auto", "none", "required",
                                          {"type": "function", "function": {"name": "get_weather"}}])
    elif rng.random() < 0.15:
        body["response_format"] = JSON_FORMAT
        body["chat_template_kwargs"] = {"enable_thinking": False}
    if rng.random() < 0.5:
        body["seed"] = rng.randint(0, 2**31)
    body["temperature"] = rng.choice([0, 0.6, 1.0])
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    if body["stream"] and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.1:
        body.pop("max_tokens")  # up to the context
        body["max_completion_tokens"] = rng.choice([None, long_tokens]) if long_tokens >= 300 else long_tokens
    return body


def completion_body(rng: random.Random) -> Json:
    prompt: Any = rng.choice([words(rng, rng.randint(1, 40)), [rng.randrange(1, 150000) for _ in range(8)],
                              [words(rng, 5), words(rng, 9)]])
    body: Json = {"model": MODEL, "prompt": prompt, "max_tokens": rng.choice([1, 4, 16, 48]),
                  "stream": rng.random() < 0.5, "temperature": rng.choice([0, 0.8])}
    if rng.random() < 0.3:
        body["n"] = rng.randint(2, 3)
    if rng.random() < 0.3:
        body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.15:
        body["echo"] = True
        body["max_tokens"] = rng.choice([0, 2])
    if rng.random() < 0.2:
        body["stop"] = rng.choice(["the", ["a", "\n"]])
    if rng.random() < 0.4:
        body["seed"] = rng.randint(0, 1000)
    return body


def response_body(rng: random.Random, earlier: Json | None) -> Json:
    """A Responses request; one continuing `earlier` (a stored response) by its id or by item references."""
    body: Json = {"model": MODEL, "input": words(rng, rng.randint(1, 60)), "stream": rng.random() < 0.5,
                  "max_output_tokens": rng.choice([16, 24, 64]), "temperature": rng.choice([0, 0.8]),
                  "store": rng.random() < 0.8}
    if rng.random() < 0.3:
        body["input"] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": words(rng, 600)},
                         {"role": "user", "content": body["input"]}]
        body["truncation"] = "auto"  # the 600 words go when the answer would not fit
    # every call of `earlier` answered, as OpenAI requires of a continuation (a cut call's too)
    calls = [] if earlier is None else [item for item in earlier["output"] if item["type"] == "function_call"]
    outputs = [{"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"} for call in calls]
    if earlier is not None and rng.random() < 0.5:
        body |= {"previous_response_id": earlier["id"], "truncation": "auto"}
        if outputs:
            text = body["input"]
            body["input"] = [*outputs, *([{"role": "user", "content": text}] if isinstance(text, str) else text)]
    elif earlier is not None:
        refs = [{"type": "item_reference", "id": item["id"]} for item in earlier["output"]]
        body["input"] = [*refs, *outputs, {"role": "user", "content": words(rng, 8)}]
    if rng.random() < 0.3:
        body |= {"include": ["message.output_text.logprobs"], "top_logprobs": rng.randint(0, 20)}
    if rng.random() < 0.2:
        body |= {"tools": RESPONSES_TOOLS, "tool_choice": rng.choice(["auto", "required"])}
    if rng.random() < 0.5:
        body["reasoning"] = {"effort": "none"}
    return body


def choices_of(body: Json) -> int:
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return prompts * body.get("n", 1)


# -- scenarios ------------------------------------------------------------------------------

@dataclass
class Soak:
    port: int
    tally: Tally
    probe_answer: str
    long_tokens: int = 300  # the longest answers: streams that disconnect late or are read slowly, max_tokens
    background_weight: float = 10  # of the background Responses scenarios, against 96 for the others
    tool_weight: float = TOOL_WEIGHT  # of the concurrent strict-tool streams
    store_weight: float = STORE_WEIGHT  # of the stored Chat Completions scenarios
    unavailable: tuple[str, ...] = SERVER_UNAVAILABLE  # the 503 codes a request may get (soak_http.error_problem)
    background_soak: BackgroundSoak = field(init=False)
    store_soak: StoreSoak = field(init=False)

    def __post_init__(self) -> None:
        self.background_soak = BackgroundSoak(self.port, self.tally, self.long_tokens)
        self.store_soak = StoreSoak(self.port, self.tally)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # soak_http's checks with the 503 codes this soak allows: one home for them, so no check falls back to another's
    def answer_problem(self, reply: Reply, stream: bool, choices: int | None, valid: bool = True) -> str | None:
        return answer_problem(reply, stream, choices, self.unavailable, valid=valid)

    def response_problem(self, reply: Reply, stream: bool) -> tuple[str | None, Json | None]:
        return response_problem(reply, stream, self.unavailable)

    def error_problem(self, reply: Reply) -> str | None:
        return error_problem(reply, self.unavailable)

    def valid(self, rng: random.Random) -> None:
        chat = rng.random() < 0.6
        path, body = (CHAT, chat_body(rng, self.long_tokens)) if chat else (COMPLETIONS, completion_body(rng))
        reply = send(self.port, request_bytes("POST", path, json.dumps(body).encode()))
        problem = self.answer_problem(reply, body["stream"], choices_of(body))
        if problem is None and chat and body.get("logprobs") and "tools" not in body:
            problem = logprobs_problem(reply, body["stream"], bool(body.get("stop")))
        self.tally.record("valid", reply.status, problem)

    def responses(self, rng: random.Random) -> None:
        """A Responses request, perhaps continuing a stored one; a stored answer is then retrieved as answered."""
        with self.tally.lock:
            earlier = rng.choice(self.tally.stored) if self.tally.stored and rng.random() < 0.5 else None
        body = response_body(rng, earlier)
        reply = send(self.port, request_bytes("POST", RESPONSES, json.dumps(body).encode()))
        problem, final = self.response_problem(reply, body["stream"])
        if problem is None and final is not None and final["store"]:
            kept = send(self.port, request_bytes("GET", f"{RESPONSES}/{final['id']}"))
            if kept.status != 200 or json.loads(kept.body) != final:
                problem = f"stored response {final['id']} retrieved as {kept.status}: {kept.body[:300]!r}"
            with self.tally.lock:
                self.tally.stored = [*self.tally.stored[-63:], final]
        self.tally.record("responses", reply.status, problem)

    def probe(self, rng: random.Random) -> None:
        reply = send(self.port, request_bytes("POST", COMPLETIONS, json.dumps(PROBE).encode()))
        problem = None
        if reply.status == 200 and (text := json.loads(reply.body)["choices"][0]["text"]) != self.probe_answer:
            problem = f"greedy probe changed under load: {text!r} != {self.probe_answer!r}"
        self.tally.record("probe", reply.status, problem or self.answer_problem(reply, False, 1))

    def fuzz(self, rng: random.Random) -> None:
        body = fuzz_bodies.mutate(fuzz_bodies.base_body(MODEL, rng), rng)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
        if rng.random() < 0.3:  # the same damage aimed at the legacy endpoint
            path = COMPLETIONS
            raw = raw.replace(b'"messages"', b'"prompt"', 1)
        else:
            path = CHAT
        if rng.random() < 0.2:
            raw = rng.choice([b"[" * 100000, b'{"a":' * 5000 + b"1" + b"}" * 5000, b"1" * 5000,
                              b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
                              + b"\\ud83d" * 1000 + b'"}], "max_tokens": 1e400}', b"\x00" * 64, b"\xef\xbb\xbf{}"])
        reply = send(self.port, request_bytes("POST", path, raw))
        stream = reply.headers.get("content-type", "").startswith("text/event-stream")
        self.tally.record("fuzz", reply.status, self.answer_problem(reply, stream, None, valid=False))

    def wrong_request(self, rng: random.Random) -> None:
        good = json.dumps(chat_body(rng) | {"max_tokens": 1, "stream": False}).encode()
        method, path, body, ctype = rng.choice([
            ("GET", CHAT, b"", None), ("PUT", CHAT, good, "application/json"), ("DELETE", COMPLETIONS, b"", None),
            ("POST", "/v1/models", good, "application/json"), ("POST", "/v1/nope", good, "application/json"),
            ("POST", CHAT, good, "text/plain"), ("POST", CHAT, b"a=1&b=2", "application/x-www-form-urlencoded"),
            ("POST", CHAT, good, None), ("POST", CHAT, b"", "application/json"), ("GET", "/health/../stats", b"", None),
            ("POST", CHAT, good, "application/json; charset=latin-1"), ("PATCH", "/health", b"", None),
        ])
        reply = send(self.port, request_bytes(method, path, body, ctype))
        problem = self.error_problem(reply) if reply.status >= 400 else None
        self.tally.record("wrong", reply.status, problem)

    def oversized(self, rng: random.Random) -> None:
        if rng.random() < 0.3:  # past the 8 MiB body limit
            raw = request_bytes("POST", CHAT, b'{"messages": "' + b"x" * (9 << 20) + b'"}')
        else:  # past the context
            body = {"model": MODEL, "stream": rng.random() < 0.5, "max_tokens": rng.choice([1, 2000, None])}
            text = words(rng, rng.choice([600, 3000, 30000]))
            body |= {"messages": [{"role": "user", "content": text}]} if rng.random() < 0.5 else {"prompt": text}
            raw = request_bytes("POST", CHAT if "messages" in body else COMPLETIONS, json.dumps(body).encode())
        try:
            reply = send(self.port, raw)
        except (ConnectionError, OSError) as exc:  # the server may answer 413 and close before taking it all
            self.tally.record("oversized", 0, None if isinstance(exc, (BrokenPipeError, ConnectionResetError))
                              else f"no answer: {exc!r}")
            return
        self.tally.record("oversized", reply.status, self.error_problem(reply) if reply.status != 200 else
                          "an oversized request was answered 200")

    def keepalive_after_error(self, rng: random.Random) -> None:
        """An error answer, then a good request on the same connection."""
        conn = Connection(self.port)
        try:
            bad = rng.choice([request_bytes("POST", CHAT, b"{not json"), request_bytes("GET", "/v1/nope"),
                              request_bytes("POST", CHAT, json.dumps({"model": "other", "messages": []}).encode()),
                              request_bytes("PUT", COMPLETIONS, b"{}"),
                              request_bytes("POST", CHAT, json.dumps({"messages": [{"role": "user"}]}).encode())])
            first = conn.exchange(bad)
            self.tally.record("keepalive-error", first.status, self.error_problem(first))
            if first.headers.get("connection", "").lower() == "close":
                return
            body = {"model": MODEL, "messages": [{"role": "user", "content": words(rng, 8)}], "max_tokens": 4,
                    "stream": rng.random() < 0.5}
            second = conn.exchange(request_bytes("POST", CHAT, json.dumps(body).encode()))
            problem = self.answer_problem(second, body["stream"], 1)
            self.tally.record("keepalive-reuse", second.status, problem)
        finally:
            conn.close()

    def disconnect(self, rng: random.Random) -> None:
        """A client that goes away at a random point of its request (chat's, or a Responses one)."""
        stream = rng.random() < 0.7
        prompt = words(rng, rng.choice([5, 300]))
        if rng.random() < 0.4:
            body = {"model": MODEL, "input": prompt, "max_output_tokens": self.long_tokens, "stream": stream,
                    "include": ["message.output_text.logprobs"], "top_logprobs": rng.choice([0, 20])}
            path = RESPONSES
        else:
            body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": self.long_tokens,
                    "ignore_eos": True, "stream": stream, "n": rng.choice([1, 1, 3])}
            path = CHAT
        raw = request_bytes("POST", path, json.dumps(body).encode())
        point = rng.choice(["headers", "body", "prefill", "stream", "last"])
        conn = Connection(self.port, timeout=60)
        try:
            if point == "headers":
                conn.sock.sendall(raw[:rng.randrange(1, raw.index(b"\r\n\r\n"))])
            elif point == "body":
                conn.sock.sendall(raw[:rng.randrange(raw.index(b"\r\n\r\n") + 4, len(raw))])
            else:
                conn.sock.sendall(raw)
                if point == "prefill":
                    time.sleep(rng.choice([0, 0.01, 0.05]))
                elif stream:
                    self._read_stream_until(conn, point, rng)
                else:
                    time.sleep(rng.uniform(0, 0.5))
        except (ConnectionError, OSError) as exc:
            self.tally.record("disconnect", 0, f"{point}: {exc!r}")
        else:
            self.tally.record("disconnect", 0)
        finally:
            hang_up(conn.sock, rng)

    def _read_stream_until(self, conn: Connection, point: str, rng: random.Random) -> None:
        status, _ = conn.head()
        if status != 200:
            return
        seen = b""
        for chunk in conn.chunks():
            seen += chunk
            if point == "stream" and seen.count(b"data: ") > rng.randint(1, 30):
                return
            if point == "last" and (b'"finish_reason":"length"' in seen or b"event: response.output_item.done" in seen):
                return

    def slow_reader(self, rng: random.Random) -> None:
        """A stream whose client stops reading (its receive window fills), then reads on or hangs up."""
        responses = rng.random() < 0.5
        body: Json = {"model": MODEL, "stream": True}
        if responses:
            body |= {"input": words(rng, 20), "max_output_tokens": self.long_tokens,
                     "include": ["message.output_text.logprobs"], "top_logprobs": 20}
        else:
            body |= {"messages": [{"role": "user", "content": words(rng, 20)}], "max_tokens": self.long_tokens,
                     "ignore_eos": True, "logprobs": True, "top_logprobs": 20}
        conn = Connection(self.port, timeout=120, rcvbuf=4096)
        try:
            conn.sock.sendall(request_bytes("POST", RESPONSES if responses else CHAT, json.dumps(body).encode()))
            time.sleep(rng.uniform(1, 5))
            if rng.random() < 0.5:
                hang_up(conn.sock, rng)
                self.tally.record("slow-reader", 0)
                return
            # reading on at a 4 KiB window takes minutes for a Responses stream (~2 MB: its `.done` events repeat
            # the logprobs): the rest is read with a larger buffer, whose window stays under 64 KiB (the window
            # scale was settled from the 4 KiB buffer at connect and cannot grow now), fast enough
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            reply = conn.reply()
            problem = self.response_problem(reply, True)[0] if responses else \
                self.answer_problem(reply, True, 1)
            self.tally.record("slow-reader", reply.status, problem)
        finally:
            conn.close()

    def slow_body(self, rng: random.Random) -> None:
        """A body trickled in over a second or two (answered), or stalled and abandoned."""
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": words(rng, 10)}],
                           "max_tokens": 2}).encode()
        raw = request_bytes("POST", CHAT, body)
        conn = Connection(self.port, timeout=60)
        try:
            if rng.random() < 0.5:
                cut = rng.randrange(raw.index(b"\r\n\r\n") + 4, len(raw))
                conn.sock.sendall(raw[:cut])
                time.sleep(rng.uniform(0.5, 4))
                hang_up(conn.sock, rng)
                self.tally.record("stalled-body", 0)
                return
            for i in range(0, len(raw), 16):
                conn.sock.sendall(raw[i:i + 16])
                time.sleep(0.02)
            reply = conn.reply()
            self.tally.record("slow-body", reply.status, self.answer_problem(reply, False, 1))
        finally:
            conn.close()

    def background(self, rng: random.Random) -> None:
        self.background_soak.scenario(rng)

    def stored(self, rng: random.Random) -> None:
        self.store_soak.scenario(rng)

    def tool_burst(self, rng: random.Random) -> None:
        """2-8 concurrent streams with strict tools (auto, required or a named call; the lenient tool beside them at
        times), each read whole (every strict call's arguments checked against its schema) or reset mid-stream."""
        threads = [threading.Thread(target=self._tool_stream, args=(random.Random(rng.random()),))
                   for _ in range(rng.randint(2, 8))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _tool_stream(self, rng: random.Random) -> None:
        tools = STRICT_TOOLS + (LENIENT_TOOLS if rng.random() < 0.3 else [])
        body: Json = {"model": MODEL, "messages": [{"role": "user", "content": words(rng, rng.randint(1, 40))}],
                      "tools": tools, "stream": True, "max_tokens": rng.choice([8, 24, 64, 128]),
                      "temperature": rng.choice([0, 0.8, 1.0]), "n": rng.choice([1, 1, 2]),
                      "tool_choice": rng.choice(["auto", "auto", "required",
                                                 {"type": "function", "function": {"name": "get_time"}}])}
        if rng.random() < 0.3:
            body["parallel_tool_calls"] = False
        conn = Connection(self.port, timeout=120)
        try:
            conn.sock.sendall(request_bytes("POST", CHAT, json.dumps(body).encode()))
            if rng.random() < 0.5:
                status, headers = conn.head()
                cut = rng.randint(0, 40)
                for i, _ in enumerate(conn.chunks() if headers.get("transfer-encoding") == "chunked" else ()):
                    if i >= cut:
                        break
                reset(conn.sock)
                self.tally.record("tool-reset", status, None if status in (200, 503) else f"status {status}")
                return
            reply = conn.reply()
            problem = self.answer_problem(reply, True, body["n"]) or tool_call_problem(reply, STRICT_TOOLS)
            self.tally.record("tool-stream", reply.status, problem)
        finally:
            conn.close()

    def scenarios(self) -> list[tuple[float, Callable[[random.Random], None]]]:
        return [(30, self.valid), (12, self.responses), (4, self.probe), (14, self.fuzz), (6, self.wrong_request),
                (3, self.oversized), (6, self.keepalive_after_error), (14, self.disconnect), (3, self.slow_reader),
                (4, self.slow_body), (self.tool_weight, self.tool_burst), (self.background_weight, self.background),
                (self.store_weight, self.stored)]

    def client(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        weights, actions = zip(*self.scenarios())
        while time.monotonic() < until:
            action = rng.choices(actions, weights)[0]
            t0 = time.monotonic()
            try:
                action(rng)
            except Exception as exc:  # noqa: BLE001 - any failure of the server's side is a finding
                self.tally.record(action.__name__, 0, f"client failed: {exc!r}")
            with self.tally.lock:
                name = action.__name__
                self.tally.slowest_s[name] = max(self.tally.slowest_s.get(name, 0), time.monotonic() - t0)

    def prober(self, stop: threading.Event, interval: float = 0.25) -> None:
        """/stats's pids and /v1/models read throughout the round (/health is health_polled's)."""
        session = requests.Session()
        while not stop.is_set():
            try:
                stats = session.get(f"{self.url}/stats", timeout=30).json()
                self.tally.pids.update(w["pid"] for w in stats["workers"])
                if session.get(f"{self.url}/v1/models", timeout=30).status_code != 200:
                    self.tally.record("models", 0, "/v1/models did not answer 200")
            except requests.RequestException as exc:
                self.tally.record("stats", 0, f"probe failed: {exc!r}")
            stop.wait(interval)


# -- rounds ---------------------------------------------------------------------------------

# what a round's result keeps of /stats once the load drained
DRAINED_KEYS = ("requests_served", "requests_aborted", "requests_failed", "active_requests", "queue_length",
                "kv_cache_usage", "preemptions")


def _busy(stats: Json) -> bool:
    """Whether /stats shows a request running or waiting, or a KV block held."""
    return bool(stats["active_requests"] or stats["queue_length"] or stats["kv_cache_usage"])


def idle_stats(url: str, timeout: float = 60) -> Json:
    """/stats once the load has drained (nothing running or waiting, every KV block free), or the last seen."""
    deadline = time.monotonic() + timeout
    while True:
        stats = requests.get(f"{url}/stats", timeout=30).json()
        if not _busy(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


@dataclass
class Drained:
    """/stats after a round (idle_stats), and the problem where its load did not drain within the wait."""

    stats: Json
    problems: list[str]

    @property
    def figures(self) -> Json:
        """What the round's result keeps of it."""
        return {k: self.stats[k] for k in DRAINED_KEYS}


def drained(url: str, name: str) -> Drained:
    """The drained /stats of the server at `url` (`name`: the server's, for its problem)."""
    after = Drained(idle_stats(url), [])
    if _busy(after.stats):
        after.problems.append(f"{name} not drained: {after.figures}")
    return after


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def greedy_probe(url: str) -> str:
    response = requests.post(f"{url}{COMPLETIONS}", json=PROBE, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


@dataclass
class RoundResult:
    seconds: float
    requests: int
    statuses: dict[str, int]
    problems: list[str]
    health_p50_ms: float  # the polls' wall clock, the machine's load included
    health_p99_ms: float
    health_max_ms: float
    held_p99_ms: float  # the polls less the worker's loop thread's and the poller's waits for a CPU (Poll.held)
    most_held: tuple[tuple[float, float, float], ...]  # chat_http.most_held: the longest holds
    pids: list[int]
    rss_mb: float
    drained: Json
    seen: dict[str, int]  # requests seen to end served, aborted or failed; "may": at most this many counted
    slowest_s: dict[str, float]


def health_summary(r: Any) -> str:
    """A round's /health figures (a RoundResult's, here or soak_replicas.py's), for its printed line."""
    return (f"/health p50 {r.health_p50_ms:.1f} p99 {r.health_p99_ms:.1f} max {r.health_max_ms:.0f} ms "
            f"(held p99 {r.held_p99_ms:.1f})")


def count_problems(before: Json, after: Json, tally: Tally) -> list[str]:
    """/stats' finished requests over the round against what the clients saw: each count at least those seen to
    end so, and all of them at most the requests that may have reached the engine."""
    delta = {k: after[f"requests_{k}"] - before[f"requests_{k}"] for k in ("served", "aborted", "failed")}
    problems = [f"/stats counted {delta[k]} requests {k}, the clients saw {tally.seen[k]}"
                for k in delta if delta[k] < tally.seen[k]]
    if sum(delta.values()) > tally.may_count:
        problems.append(f"/stats counted {sum(delta.values())} requests finished ({delta}), at most "
                        f"{tally.may_count} may have reached the engine")
    return problems


def run_round(srv: GunicornServer, probe_answer: str, seconds: float, clients: int, seed: int,
              long_tokens: int = 300, background_weight: float = 10, tool_weight: float = TOOL_WEIGHT,
              store_weight: float = STORE_WEIGHT) -> RoundResult:
    tally = Tally()
    soak = Soak(srv.port, tally, probe_answer, long_tokens, background_weight, tool_weight, store_weight)
    before = requests.get(f"{soak.url}/stats", timeout=30).json()
    stop = threading.Event()
    prober = threading.Thread(target=soak.prober, args=(stop,))
    prober.start()
    polls: list[Poll] = []
    loaded_s = 0.0
    # /health timed from a process of its own: from this one a poll waited for its GIL, held by the clients' threads
    try:
        with health_polled(srv, HEALTH_POLL_S) as polls:
            t0 = time.monotonic()
            threads = [threading.Thread(target=soak.client, args=(seed * 1000 + i, t0 + seconds))
                       for i in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            loaded_s = time.monotonic() - t0
    except AssertionError as exc:  # the poller saw an answer other than 200, or failed
        tally.problems.append(f"/health: {exc}")
    finally:  # the prober is not a daemon: left running, the soak would never exit
        stop.set()
        prober.join()
    soak.background_soak.settle()
    soak.store_soak.settle()
    after = drained(soak.url, "the server")
    stats = after.stats
    tally.problems += after.problems + count_problems(before, stats, tally)
    pid = stats["workers"][0]["pid"]
    tally.pids.update(w["pid"] for w in stats["workers"])
    health = [1000 * p.seconds for p in polls]
    return RoundResult(loaded_s, tally.requests, dict(sorted(tally.statuses.items())), tally.problems,
                       percentile(health, 50), percentile(health, 99), max(health, default=0),
                       percentile([1000 * p.held for p in polls], 99), most_held(polls),
                       sorted(tally.pids), rss_mb(pid), after.figures, {**tally.seen, "may": tally.may_count},
                       {k: round(v, 2) for k, v in sorted(tally.slowest_s.items())})


def soak_problems(rounds: list[RoundResult], health_p99_ms: float, rss_growth_mb: float,
                  preempts: bool = False) -> list[str]:
    """Every invariant broken over the rounds of one server (`preempts`: its mode is meant to preempt)."""
    problems = [p for r in rounds for p in r.problems]
    if preempts and rounds and not rounds[-1].drained["preemptions"]:
        problems.append("no request was preempted: the mode soaked nothing it is for")
    pids = {pid for r in rounds for pid in r.pids}
    if len(pids) != 1:
        problems.append(f"the worker changed: pids {sorted(pids)}")
    problems += [f"round {i}: /health held p99 {r.held_p99_ms:.0f} ms (wall p99 {r.health_p99_ms:.0f} ms), the longest "
                 f"(held, wall, loop CPU s): {r.most_held}"
                 for i, r in enumerate(rounds) if r.held_p99_ms > health_p99_ms]
    if len(rounds) > 1 and rounds[-1].rss_mb - rounds[0].rss_mb > rss_growth_mb:
        problems.append(f"RSS grew {rounds[0].rss_mb:.0f} -> {rounds[-1].rss_mb:.0f} MB")
    return problems


def soak_server(srv: GunicornServer, rounds: int, seconds: float, clients: int, seed: int,
                background_weight: float, tool_weight: float,
                store_weight: float = STORE_WEIGHT) -> tuple[str, list[RoundResult]]:
    """The idle greedy probe, then `rounds` rounds of load."""
    answer = greedy_probe(srv.url)
    return answer, [run_round(srv, answer, seconds, clients, seed + i, background_weight=background_weight,
                              tool_weight=tool_weight, store_weight=store_weight) for i in range(rounds)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["default", "none", "int8"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--background-weight", type=float, default=10,
                        help="of the background Responses scenarios (the others weigh 96)")
    parser.add_argument("--tool-weight", type=float, default=TOOL_WEIGHT,
                        help="of bursts of concurrent strict-tool streams, some reset mid-stream")
    parser.add_argument("--store-weight", type=float, default=STORE_WEIGHT,
                        help="of the stored Chat Completions scenarios (store: true, lists, updates, deletes)")
    parser.add_argument("--health-p99-ms", type=float, default=300,
                        help="bound on /health's p99 less the machine's load (chat_http.Poll.held), each round")
    parser.add_argument("--health-timeout", type=float, default=180,
                        help="seconds each mode's server may take to answer /health 200 (the model's load: longer "
                             "on a busy machine)")
    parser.add_argument("--rss-growth-mb", type=float, default=48)
    parser.add_argument("--out", type=Path, default=REPO / "profiles" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = make_checkpoint()
    report: dict[str, Any] = {"command": " ".join(sys.argv), "uptime": Path("/proc/loadavg").read_text().strip()}
    failed = False
    for mode in args.modes:
        srv = GunicornServer(cpu_env(checkpoint, **MODES[mode]), args.out / f"soak-{mode}.log")
        srv.start(args.health_timeout)
        try:
            answer, rounds = soak_server(srv, args.rounds, args.round_seconds, args.clients, args.seed,
                                         args.background_weight, args.tool_weight, args.store_weight)
        finally:
            srv.stop()
        problems = soak_problems(rounds, args.health_p99_ms, args.rss_growth_mb, mode in PREEMPTING)
        failed |= bool(problems)
        report[mode] = {"probe": answer, "rounds": [asdict(r) for r in rounds], "problems": problems}
        for i, r in enumerate(rounds):
            print(f"{mode} round {i}: {r.requests} requests in {r.seconds:.0f} s, {health_summary(r)}, "
                  f"RSS {r.rss_mb:.0f} MB, {r.drained}")
            print("   ", r.statuses)
            print("    seen ended (may: at most counted):", r.seen)
            print("    slowest (s):", r.slowest_s)
        print(f"{mode}: {len(problems)} problems", *problems[:40], sep="\n  ")
    report["uptime_after"] = Path("/proc/loadavg").read_text().strip()
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    print("load average:", report["uptime"], "->", report["uptime_after"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
