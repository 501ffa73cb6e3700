"""What the end-to-end tests share: a CPU server's environment and the chat-completion requests they send it."""
from __future__ import annotations

import collections
import contextlib
import json
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from engine_util import hf_greedy, shared_tokenizer
from server_process import GunicornServer
from waits import wait_for

T = TypeVar("T")

MODEL = "qwen3-0.6b"  # the served model name when NANOQWEN_SERVED_MODEL_NAME is unset
# A TLS ClientHello's first bytes (record and handshake headers, version, random, session id), short of the 0x0a of
# its supported_groups extension: one that reached it got gunicorn's bare-LF 400 at once, the rest waited for one.
CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(0x20, 0x40)) + b"\x20" + bytes(32)
MAX_MODEL_LEN = 512
CHAT_SERVER_MAX_MODEL_LEN = 1024  # conftest.py's shared chat_server
# vLLM's request fields this server does not implement, at vLLM's defaults (the values that change nothing), as
# clients built for vLLM send them; any other value is a 400 naming the field.
VLLM_COMMON_DEFAULTS: dict[str, Any] = {
    "use_beam_search": False, "length_penalty": 1.0, "include_stop_str_in_output": False,
    "spaces_between_special_tokens": True, "bad_words": [], "truncate_prompt_tokens": None,
    "priority": 0, "return_token_ids": False, "return_tokens_as_token_ids": False,
    "logits_processors": None, "cache_salt": None, "kv_transfer_params": None, "vllm_xargs": None,
    "guided_decoding_backend": "auto", "guided_whitespace_pattern": None, "structural_tag": None,
}
VLLM_CHAT_DEFAULTS = {**VLLM_COMMON_DEFAULTS, "add_special_tokens": False, "documents": None,
                      "chat_template": None, "mm_processor_kwargs": None, "media_io_kwargs": None}
VLLM_COMPLETION_DEFAULTS = {**VLLM_COMMON_DEFAULTS, "add_special_tokens": True, "prompt_embeds": None}


def cpu_env(checkpoint: Path, **env: str) -> dict[str, str]:
    """A server for `checkpoint` on the CPU in fp32 (exact against transformers), plus `env`."""
    return {"NANOQWEN_MODEL": str(checkpoint), "NANOQWEN_DEVICE": "cpu", "NANOQWEN_DTYPE": "float32",
            "NANOQWEN_MAX_MODEL_LEN": str(MAX_MODEL_LEN), **env}


def assert_serves_greedy(checkpoint: Path, hf_model: Callable[[Path], torch.nn.Module], env: dict[str, str],
                         log_path: Path, log_markers: tuple[str, ...], batches: list[list[list[int]]],
                         new_tokens: int, also: Callable[[GunicornServer], None] | None = None) -> None:
    """A real server started with `env` (its `ready:` line showing each of `log_markers`) answers each batch of prompts,
    one after the other, as greedy /v1/completions through the openai client with transformers' tokens, fp32; then
    `also(server)`."""
    with GunicornServer(env, log_path) as srv:
        assert all(marker in srv.log() for marker in log_markers), log_markers
        for prompts in batches:
            assert_completions_greedy(srv, checkpoint, hf_model(checkpoint), prompts, new_tokens)
        if also is not None:
            also(srv)


def completion_texts(srv: GunicornServer, body: dict[str, Any], stream: bool, api_key: str = "unused") -> list[str]:
    """Each choice's text of one /v1/completions through the openai client, reassembled when streamed."""
    client = srv.openai_client(api_key, timeout=600)
    if not stream:
        return [c.text for c in sorted(client.completions.create(**body).choices, key=lambda c: c.index)]
    texts = [""] * len(body["prompt"])
    for chunk in client.completions.create(**body, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    return texts


def assert_completions_greedy(srv: GunicornServer, checkpoint: Path, hf: torch.nn.Module, prompts: list[list[int]],
                              new_tokens: int, streams: tuple[bool, ...] = (False,)) -> None:
    """One batch of greedy /v1/completions through the openai client, once per mode in `streams` (streamed or
    not), gives `hf`'s greedy tokens (computed once)."""
    body = dict(model=MODEL, prompt=prompts, temperature=0, max_tokens=new_tokens,
                extra_body={"ignore_eos": True, "skip_special_tokens": False})
    tokenizer = shared_tokenizer(checkpoint)
    expected = [tokenizer.decode(hf_greedy(hf, p, new_tokens), skip_special_tokens=False) for p in prompts]
    for stream in streams:
        assert completion_texts(srv, body, stream) == expected, f"stream={stream}"


def wait_logged(predicate: Callable[[], T], what: str, srv: GunicornServer, timeout: float = 180.0,
                poll: float = 0.2) -> T:
    """wait_for, its failure saying what was waited for and the server's log."""
    return wait_for(predicate, timeout, poll, lambda: f"timed out waiting for {what}; log:\n{srv.log()}")


def server_stats(srv: GunicornServer) -> dict[str, Any]:
    return requests.get(f"{srv.url}/stats", timeout=30).json()


def metric(srv: GunicornServer, sample: str) -> float:
    """A sample's value in the server's /metrics, by its name and labels as written (`name{a="b"}`); 0 where absent."""
    response = requests.get(f"{srv.url}/metrics", timeout=30)
    response.raise_for_status()
    match = re.search(rf"^{re.escape(sample)} (\S+)$", response.text, re.M)
    return float(match.group(1)) if match else 0.0


def engine_idle(srv: GunicornServer) -> bool:
    """No request running or queued, no KV block held."""
    stats = server_stats(srv)
    return stats["active_requests"] == stats["queue_length"] == 0 and stats["kv_cache_usage"] == 0


def vllm_samples(text: str, *labels: str) -> dict[tuple[str | None, ...], float]:
    """A /metrics exposition's `vllm:` samples but buckets, summed by (name, each of `labels`' value: None where a
    sample has none). A plain dict: a series missing is a KeyError, not a 0."""
    totals: collections.Counter[tuple[str | None, ...]] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("vllm:") and "le" not in sample.labels:
                totals[(sample.name, *map(sample.labels.get, labels))] += sample.value
    return dict(totals)


def raw_request(body: dict[str, Any] | bytes, path: str = "/v1/chat/completions", headers: str = "",
                version: str = "HTTP/1.1") -> bytes:
    """A POST's bytes, for a client on a socket of its own."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} {version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def read_all(sock: socket.socket) -> bytes:
    """What a socket receives until the server closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def final_response(data: bytes) -> bytes:
    """What a raw exchange received from its final response on: the interim `100 Continue`s before it dropped."""
    while data.startswith(b"HTTP/1.1 100 "):
        data = data.partition(b"\r\n\r\n")[2]
    return data


def http_chunks(data: bytes) -> list[bytes]:
    """The chunks of a chunked transfer encoding (each of the server's writes), checking that it ends with the last."""
    out = []
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out.append(data[:size])
        data = data[size + 2:]


def dechunk(data: bytes) -> bytes:
    """The body of a chunked transfer encoding, checking that it ends with the last chunk."""
    return b"".join(http_chunks(data))


def post_chat(srv: GunicornServer, body: Any, timeout: float = 300, **kwargs: Any) -> requests.Response:
    return requests.post(f"{srv.url}/v1/chat/completions", json=body, timeout=timeout, **kwargs)


# The most a /health poll may be held (Poll.held) while the server works: at load ~21 the polls were held 0.15 s at
# most (their wall time up to 0.53 s); the stalls guarded take ~1 s or more (a 96 MB body read, a huge prompt
# tokenised, a stream's tokens waited for on the loop). Shorter holds (a large answer encoded, ~50 ms; llguidance's
# tokenizer built late, ~0.4 s) are checked in process instead.
HELD_S = 0.5


class Poll(NamedTuple):
    """One `GET /health` of health_polled: its seconds, when it ended (time.monotonic, the same clock in every
    process), and meanwhile the seconds the worker's event-loop thread ran and waited for a CPU, and the seconds the
    poller waited for one."""
    seconds: float
    ended: float
    loop_ran: float
    loop_preempted: float
    poller_preempted: float

    @property
    def started(self) -> float:
        return self.ended - self.seconds

    @property
    def held(self) -> float:
        """The poll's seconds less the machine's load: a loop stalled by its own process (work on the loop, a blocking
        call, the GIL held by another of its threads) counts; its thread or the poller waiting for a CPU does not.
        Waits of both at once are subtracted twice (their overlap is not reported): at 0 at least."""
        return max(0.0, self.seconds - self.loop_preempted - self.poller_preempted)


def most_held(polls: list[Poll]) -> tuple[tuple[float, float, float], ...]:
    """The longest holds, for an assertion's message: each with the seconds it took (the load's included) and the
    loop's CPU seconds meanwhile (work on the loop, else a wait: a blocking call, the GIL)."""
    return tuple(sorted((round(p.held, 3), round(p.seconds, 3), round(p.loop_ran, 3)) for p in polls)[-3:])


@contextlib.contextmanager
def health_polled(srv: GunicornServer, interval: float) -> Iterator[list[Poll]]:
    """Each `GET /health` polled every `interval` from a process of its own (tests/health_poll.py) while the body runs:
    the event loop's responsiveness meanwhile. Polling has started when the body starts; the list is filled as it
    ends. Every answer must be 200. The server has one worker."""
    polls: list[Poll] = []
    script = Path(__file__).with_name("health_poll.py")
    poller = subprocess.Popen([sys.executable, str(script), srv.url, str(interval)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if poller.stdout.readline() != "polling\n":
            raise AssertionError(f"the poller stopped before its first answer: {poller.communicate()[1]}")
        yield polls
        out, err = poller.communicate(timeout=60)  # closes its stdin: the poller's stop
    finally:
        poller.kill()
    assert poller.returncode == 0, err
    polls.extend(Poll(*poll) for poll in json.loads(out))


def _sse_lines(response: requests.Response) -> Iterator[str]:
    """An SSE response's lines as they arrive, its comment blocks (the server's probe of a client that half-closed)
    skipped, as the SSE spec says."""
    lines = response.iter_lines(decode_unicode=True)
    for line in lines:
        if line.startswith(":"):
            assert next(lines) == ""
            continue
        yield line


def sse_payloads(response: requests.Response) -> Iterator[str]:
    """The `data:` payloads of an SSE response as they arrive, checking the framing (one line, then a blank one)."""
    lines = _sse_lines(response)
    for line in lines:
        assert line.startswith("data: "), line
        assert next(lines) == ""
        yield line[len("data: "):]


def sse_events(response: requests.Response) -> Iterator[tuple[str, str]]:
    """The (`event:`, `data:`) pairs of a named-event SSE response (Responses') as they arrive, checking the framing
    (the two lines, then a blank one)."""
    lines = _sse_lines(response)
    for line in lines:
        assert line.startswith("event: "), line
        data = next(lines)
        assert data.startswith("data: "), data
        assert next(lines) == ""
        yield line[len("event: "):], data[len("data: "):]
