"""Every answer and stream event a real gunicorn server sends, against the installed `openai` package's own types
(tests/wire_types.py: strict validation, and no field the type does not declare but those listed with their source),
and field by field against OpenAI's documented shapes where the types cannot tell: a field OpenAI always sends, null
or empty, is sent, not left out (`refusal`, `annotations`, `logprobs`, `system_fingerprint`, `service_tier`, usage's
`*_tokens_details`); one it never sends in that place (`audio`, `function_call`) is not."""
from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionDeleted, ChatCompletionStoreMessage
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from openai.types.shared import ErrorObject

from chat_http import MODEL, post_chat, sse_events, sse_payloads
from server_process import GunicornServer
from wire_types import wire_problems

NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
PARAMETERS = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get", "parameters": PARAMETERS}}]
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}
CHAT_CASES: dict[str, dict[str, Any]] = {
    "thinking (the reasoning fields)": {},
    "n, logprobs and top_logprobs": {"n": 2, "logprobs": True, "top_logprobs": 2, **NO_THINKING},
    "stop strings": {"stop": ["a", "e", "o"], **NO_THINKING},
    "tools, tool_choice required": {"tools": TOOLS, "tool_choice": "required", **NO_THINKING},
    "tools, a named tool_choice": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get"}},
                                   **NO_THINKING},
    "response_format json_schema": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": PARAMETERS, "strict": True}}, **NO_THINKING},
    "response_format json_object": {"response_format": {"type": "json_object"}, **NO_THINKING},
}
# OpenAI's fields of each object, always sent (null or empty where there is nothing), and those sent only in cases
CHAT_KEYS = {"id", "object", "created", "model", "choices", "usage", "service_tier", "system_fingerprint"}
CHUNK_KEYS = CHAT_KEYS - {"usage"}  # usage: with stream_options.include_usage, null on every chunk but the last
CHOICE_KEYS = {"index", "message", "logprobs", "finish_reason"}
MESSAGE_KEYS = {"role", "content", "refusal", "annotations"}
MESSAGE_SOMETIMES = {"tool_calls", "reasoning_content", "reasoning"}
USAGE_DETAILS = {"prompt_tokens_details": {"cached_tokens", "audio_tokens"},
                 "completion_tokens_details": {"reasoning_tokens", "audio_tokens", "accepted_prediction_tokens",
                                               "rejected_prediction_tokens"}}


def _chunks(response: requests.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return [json.loads(data) for data in sse_payloads(response) if data != "[DONE]"]


def _usage_problems(usage: dict[str, Any]) -> list[str]:
    return [f"usage.{name}: {usage.get(name)}" for name, keys in USAGE_DETAILS.items()
            if set(usage.get(name) or {}) != keys]


def _chat_shape_problems(body: dict[str, Any]) -> list[str]:
    problems = [] if set(body) == CHAT_KEYS else [f"keys {sorted(body)}"]
    for choice in body["choices"]:
        message = choice["message"]
        if set(choice) != CHOICE_KEYS or not MESSAGE_KEYS <= set(message) <= MESSAGE_KEYS | MESSAGE_SOMETIMES:
            problems.append(f"choice {choice}")
    return problems + _usage_problems(body["usage"])


def _chunk_shape_problems(chunks: list[dict[str, Any]]) -> list[str]:
    problems = [f"chunk keys {sorted(chunk)}" for chunk in chunks if set(chunk) != CHUNK_KEYS | {"usage"}]
    problems += [f"usage {chunk['usage']} before the last" for chunk in chunks[:-1] if chunk["usage"] is not None]
    problems += [f"chunk choice {choice}" for chunk in chunks for choice in chunk["choices"]
                 if set(choice) != CHOICE_KEYS - {"message"} | {"delta"}]
    return problems + _usage_problems(chunks[-1]["usage"])


@pytest.mark.parametrize("case", CHAT_CASES)
def test_chat_completions_collected_and_streamed_are_the_openai_types(server: GunicornServer, case: str) -> None:
    body = {**CHAT, **CHAT_CASES[case]}
    collected = post_chat(server, body).json()
    assert wire_problems(ChatCompletion, collected) + _chat_shape_problems(collected) == [], collected
    chunks = _chunks(post_chat(server, {**body, "stream": True, "stream_options": {"include_usage": True}},
                               stream=True))
    problems = [problem for chunk in chunks for problem in wire_problems(ChatCompletionChunk, chunk)]
    assert problems + _chunk_shape_problems(chunks) == [], chunks


def test_stored_chat_completions_are_the_openai_types(server: GunicornServer) -> None:
    """Retrieved, listed, its messages listed and deleted, as the openai client's `chat.completions` reads them. The
    package types a listed message as an assistant's (ChatCompletionStoreMessage is a ChatCompletionMessage); OpenAI's
    list holds the request's messages, its API reference's example a `"role": "user"` one, as ours."""
    created = post_chat(server, {**CHAT, **NO_THINKING, "store": True, "metadata": {"wire": "types"}}).json()
    url = f"{server.url}/v1/chat/completions"
    retrieved = requests.get(f"{url}/{created['id']}", timeout=30).json()
    listed = requests.get(url, params={"metadata[wire]": "types"}, timeout=30).json()
    messages = requests.get(f"{url}/{created['id']}/messages", timeout=30).json()
    deleted = requests.delete(f"{url}/{created['id']}", timeout=30).json()
    pages = {"object", "data", "first_id", "last_id", "has_more"}
    assert set(listed) == pages and set(messages) == pages and len(listed["data"]) == len(messages["data"]) == 1
    assert [*wire_problems(ChatCompletion, retrieved), *wire_problems(ChatCompletion, listed["data"][0]),
            *wire_problems(ChatCompletionStoreMessage, messages["data"][0], {("role", "user")}),
            *wire_problems(ChatCompletionDeleted, deleted)] == []


def test_a_stream_without_include_usage_sends_no_usage_field(server: GunicornServer) -> None:
    """OpenAI's `usage` is there only with stream_options.include_usage."""
    chunks = _chunks(post_chat(server, {**CHAT, **NO_THINKING, "stream": True}, stream=True))
    assert all(set(chunk) == CHUNK_KEYS for chunk in chunks), chunks


# OpenAI's legacy answers that the package's Completion type refuses: a streamed chunk's `finish_reason` null until its
# choice's last (the package parses chunks into Completion without validating, and has no null there); with `echo`,
# the first prompt token's logprob and alternatives null (it has no context to be predicted from): in a collected
# answer, and in a stream on each choice's first chunk (the echo's)
STREAM_NULLS = {("finish_reason", None)}
ECHO_NULLS = {("logprobs.token_logprobs.0", None), ("logprobs.top_logprobs.0", None)}


def legacy_problems(answer: dict[str, Any], echo: bool, streamed: bool, echoed: set[int]) -> list[str]:
    """wire_problems of a legacy answer or chunk, the nulls above allowed only where they are due. `echoed`: the
    choices whose first chunk was checked (a stream's), added to."""
    first = {choice["index"] for choice in answer["choices"]} - echoed
    echoed |= first
    known = (STREAM_NULLS if streamed else set()) | (ECHO_NULLS if echo and (first or not streamed) else set())
    return wire_problems(Completion, answer, known)


@pytest.mark.parametrize("body", [{"prompt": "hi", "logprobs": 2}, {"prompt": ["a", "b"], "n": 2, "echo": True},
                                  {"prompt": "hi there", "logprobs": 1, "echo": True}],
                         ids=["logprobs", "prompts, n and echo", "echo and logprobs"])
def test_legacy_completions_are_the_openai_types(server: GunicornServer, body: dict[str, Any]) -> None:
    body = {"model": MODEL, "max_tokens": 4, **body}
    echo = body.get("echo", False)
    collected = requests.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    assert legacy_problems(collected, echo, False, set()) == [], collected
    assert _usage_problems(collected["usage"]) == []
    chunks = _chunks(requests.post(f"{server.url}/v1/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}}, stream=True, timeout=120))
    echoed: set[int] = set()
    problems = [problem for chunk in chunks for problem in legacy_problems(chunk, echo, True, echoed)]
    ends = [choice["index"] for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"] is not None]
    assert problems + _usage_problems(chunks[-1]["usage"]) == [] and sorted(ends) == list(range(len(ends))), chunks


def test_legacy_nulls_are_allowed_only_where_due() -> None:
    """A collected completion's null finish_reason is a problem; so is a null first logprob without echo, or on a
    streamed choice's later chunk; a stream's null finish_reason and echo's first null logprob are not."""
    logprobs = {"tokens": ["a"], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    answer = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL, "choices": [
        {"index": 0, "text": "a", "logprobs": logprobs, "finish_reason": "length"}]}
    unfinished = {**answer, "choices": [{**answer["choices"][0], "finish_reason": None}]}
    assert legacy_problems(answer, True, False, set()) == []
    assert len(legacy_problems(unfinished, True, False, set())) == 1
    assert len(legacy_problems(answer, False, False, set())) == 2
    echoed: set[int] = set()
    assert legacy_problems(unfinished, True, True, echoed) == []
    assert len(legacy_problems(unfinished, True, True, echoed)) == 2  # not the choice's first chunk


def test_models_are_the_openai_types(server: GunicornServer) -> None:
    listed = requests.get(f"{server.url}/v1/models", timeout=30).json()
    assert listed["object"] == "list" and listed["data"]
    one = requests.get(f"{server.url}/v1/models/{MODEL}", timeout=30).json()
    assert [problem for model in [*listed["data"], one] for problem in wire_problems(Model, model)] == []


RESPONSES = {"model": MODEL, "input": "hi", "max_output_tokens": 16}
RESPONSE_TOOLS = [{"type": "function", "name": "get", "parameters": PARAMETERS, "strict": True}]
RESPONSES_CASES: dict[str, dict[str, Any]] = {
    "reasoning and text": {},
    "text": NO_THINKING,
    "a function call": {"tools": RESPONSE_TOOLS, "tool_choice": "required", **NO_THINKING},
    "json_schema": {"text": {"format": {"type": "json_schema", "name": "x", "schema": PARAMETERS}}, **NO_THINKING},
}


@pytest.mark.parametrize("case", RESPONSES_CASES)
def test_responses_collected_streamed_and_stored_are_the_openai_types(server: GunicornServer, case: str) -> None:
    body = {**RESPONSES, **RESPONSES_CASES[case]}
    collected = requests.post(f"{server.url}/v1/responses", json=body, timeout=120).json()
    assert wire_problems(Response, collected) == [], collected
    stored = requests.get(f"{server.url}/v1/responses/{collected['id']}", timeout=30).json()
    items = requests.get(f"{server.url}/v1/responses/{collected['id']}/input_items", timeout=30).json()
    assert wire_problems(Response, stored) + wire_problems(ResponseItemList, items) == []
    response = requests.post(f"{server.url}/v1/responses", json={**body, "stream": True}, stream=True, timeout=120)
    events = [(name, json.loads(data)) for name, data in sse_events(response)]
    problems = [problem for _, event in events for problem in wire_problems(ResponseStreamEvent, event)]
    assert problems + [name for name, event in events if name != event["type"]] == [], events


@pytest.mark.parametrize(("method", "path", "body"), [
    ("post", "/v1/chat/completions", {"model": MODEL}),
    ("post", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}),
    ("post", "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 1}),
    ("get", "/v1/responses/resp_none", None),
    ("get", "/v1/models/none", None),
], ids=["chat", "completions", "responses", "a response not stored", "a model not served"])
def test_errors_are_the_openai_error_object(server: GunicornServer, method: str, path: str,
                                            body: dict[str, Any] | None) -> None:
    answer = requests.request(method, server.url + path, json=body, timeout=30)
    assert answer.status_code in (400, 404) and set(answer.json()) == {"error"}, answer.text
    error = answer.json()["error"]
    assert wire_problems(ErrorObject, error) == [] and set(error) == {"message", "type", "param", "code"}, error


def test_the_check_finds_an_unknown_field_a_mistyped_one_and_a_missing_one() -> None:
    """wire_problems itself, on an answer of ours altered: each alteration is found, the listed extras are not."""
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x", "refusal": None, "annotations": [],
                                 "reasoning_content": "r"}, "logprobs": None, "finish_reason": "stop"}]}
    assert wire_problems(ChatCompletion, answer) == []
    assert wire_problems(ChatCompletion, {**answer, "extra": 1}) == ["$.extra (on ChatCompletion)"]
    assert len(wire_problems(ChatCompletion, {**answer, "created": "1"})) == 1  # strict: no string for a number
    assert len(wire_problems(ChatCompletion, {key: value for key, value in answer.items() if key != "model"})) == 1
    choice = {**answer["choices"][0], "finish_reason": None}
    assert wire_problems(ChatCompletion, {**answer, "choices": [choice]}, {("finish_reason", None)}) == []
    assert len(wire_problems(ChatCompletion, {**answer, "choices": [choice]}, {("index", None)})) == 1
