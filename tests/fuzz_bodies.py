"""Random and mutated `POST /v1/chat/completions` bodies for fuzzing the server (seeded).

Used by tests/test_server.py (a short pass) and runnable for a longer one against a server:
`python tests/fuzz_bodies.py http://127.0.0.1:8000 2000 [seed]`.
Valid requests stay cheap: every value the fuzzer may put in a token count is tiny or far past
any context length.
"""
from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import requests

FIELDS = (
    "model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stream", "stream_options",
    "stop", "n", "seed", "presence_penalty", "frequency_penalty", "logprobs", "top_logprobs", "top_k", "min_p",
    "repetition_penalty", "ignore_eos", "stop_token_ids", "skip_special_tokens", "chat_template_kwargs", "user",
    "metadata", "store", "service_tier", "tools", "tool_choice", "logit_bias", "response_format", "modalities",
    "guided_json", "prediction", "parallel_tool_calls", "reasoning_effort", "unknown_field", "include_reasoning",
    "add_generation_prompt", "continue_final_message", "prompt_cache_retention", "prompt_cache_options", "moderation",
)
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "refusal", "reasoning_content", "tool_call_id", "extra")
VALUES: tuple[Any, ...] = (
    None, True, False, 0, 1, 2, -1, 0.5, 1.5, -2.5, 2**31, 2**64, -(2**63) - 1, 1e308, "", "x", "5", "true", "0.5",
    "\ud800", "a\udfffb", "\U0001f600", "<|im_end|>", "<think>", "\x00", "{{ 7*7 }}", "a" * 5000, [], [1], ["x"],
    ["\ud800"], [""], ["a", "b", "c", "d", "e"], {}, {"a": 1}, {"type": "text"}, {"type": "json_object"},
    {"enable_thinking": False}, {"enable_thinking": "no"}, {"chat_template": "{{ x }}"}, {"include_usage": True},
    [[[[[[]]]]]], {"role": "user", "content": "hi"}, [{"type": "text", "text": "hi"}], [{"type": "image_url"}],
    ["text"], "user", "assistant", "system", "tool", "developer", "qwen3-0.6b", "Qwen/Qwen3-0.6B",
    2**70, -0.0, 1e-320,
)
# JSON inside a string, as a tool call's arguments carry it
ARGUMENTS = ("", "{}", '{"city": "Paris"}', "[" * 3000 + "]" * 3000, '{"a": NaN}', '{"a": 1e309}', '{"a": "\\ud800"}',
             '{"a": 1, "a": 2}', "[1, 2]", '"x"', "{" * 40, "null")
NOISE = (b"\xed\xa0\x80", b"\xff", b"\\ud800", b"\\u0000", b"[" * 50, b"NaN", b"}", b'"', b",", b"\x00", b"\\",
         b"1e309", b"-0", b"18446744073709551616")
# sent with a body (cases()): each must be decoded as it says, or refused
HEADERS = ({}, {"Content-Type": "application/json; charset=ascii"},
           {"Content-Type": "application/json; charset=latin-1"}, {"Content-Type": "application/json; charset=utf-16"},
           {"Content-Type": "application/json; charset=bogus"}, {"Content-Encoding": "gzip"},
           {"Content-Encoding": "identity"}, {"Expect": "100-continue"})


def _value(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(VALUES))


def base_body(model: str, rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": rng.choice([1, 2]), "temperature": rng.choice([0, 0.7]),
                            "messages": [{"role": "user", "content": "Tell me about robots."}]}
    if rng.random() < 0.3:
        body["stream"] = True
    return body


def mutate(body: dict[str, Any], rng: random.Random) -> dict[str, Any] | bytes:
    """One to three structural mutations, and sometimes byte-level damage on top."""
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.45:
            body[rng.choice(FIELDS)] = _value(rng)
        elif kind < 0.55:
            body.pop(rng.choice(list(body) or ["model"]), None)
        elif kind < 0.85 and isinstance(body.get("messages"), list) and body["messages"]:
            message = rng.choice(body["messages"])
            if isinstance(message, dict):
                message[rng.choice(MESSAGE_FIELDS)] = _value(rng)
            else:
                body["messages"].append(_value(rng))
        elif kind < 0.93:
            body["messages"] = [{"role": rng.choice(["user", "assistant", "system", "tool", "developer"]),
                                 "content": _value(rng)} for _ in range(rng.randint(0, 4))]
        else:  # an earlier tool call whose arguments are hostile JSON in a string
            call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": rng.choice(ARGUMENTS)}}
            body["messages"] = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
                                {"role": "tool", "tool_call_id": "c", "content": "ok"}]
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_completion_tokens"] = 2  # else it generates up to the context length
    if rng.random() < 0.2:
        raw = bytearray(json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass"))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw) + 1)
            if rng.random() < 0.5:
                raw[at:at] = rng.choice(NOISE)
            else:
                del raw[at:at + rng.randint(1, 4)]
        return bytes(raw)
    return body


def bodies(model: str, seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        body = mutate(base_body(model, rng), rng)
        yield body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")


def cases(model: str, seed: int, count: int) -> Iterator[tuple[bytes, dict[str, str]]]:
    """`bodies(seed)` with the headers to send each with (drawn from a generator of their own)."""
    rng = random.Random(f"headers-{seed}")
    for body in bodies(model, seed, count):
        yield body, rng.choice(HEADERS)


def check(url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 60) -> str | None:
    """None when the server answered properly, else what was wrong."""
    try:
        with requests.post(f"{url}/v1/chat/completions", data=body, stream=True, timeout=timeout,
                           headers={"Content-Type": "application/json", **(headers or {})}) as response:
            text = response.content.decode("utf-8", "replace")
    except requests.RequestException as exc:
        return f"no answer: {exc}"
    if response.status_code < 400 and (headers or {}).get("Content-Encoding", "identity") != "identity":
        return f"{response.status_code} to a body whose Content-Encoding it ignored"
    if response.status_code >= 500:
        return f"{response.status_code}: {text[:300]}"
    if response.status_code >= 400:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{response.status_code} without an error envelope: {text[:300]}"
        return None if set(error) == {"message", "type", "param", "code"} else f"bad envelope: {text[:300]}"
    if response.headers.get("Content-Type", "").startswith("text/event-stream"):
        if not text.endswith("data: [DONE]\n\n") or "server_error" in text:
            return f"broken stream: {text[-300:]}"
        return None
    return None if "choices" in json.loads(text) else f"200 without choices: {text[:300]}"


def main(url: str, count: int, seed: int = 0) -> int:
    t0 = time.monotonic()
    failures = [(body, problem) for body, headers in cases("qwen3-0.6b", seed, count)
                if (problem := check(url, body, headers)) is not None]
    for body, problem in failures:
        print(problem, "<-", body[:200])
    print(f"{count} bodies, {len(failures)} failures, {time.monotonic() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0))
