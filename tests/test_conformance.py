"""What the `openai` package's types and helpers, and the cases vLLM's and llama.cpp's server test
suites check, expect of `gunicorn -k gevent server:app` (the tiny random checkpoint, greedy, fp32).

Every request field of the openai types is either accepted or refused with a 400 naming it: the
field lists below must match the installed package's, so a field a newer package adds fails here
until it is decided.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Literal

import openai
import pydantic
import pytest
import requests
import torch
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Model
from openai.types import completion_create_params as legacy_params
from openai.types.chat import completion_create_params as chat_params
from openai.types.responses import Response, ResponseStreamEvent
from openai.types.responses import response_create_params as response_params

from chat_http import MODEL, post_chat, sse_events, sse_payloads
from checkpoints import IM_END_ID, THINK_ID, TOKEN_IDS
from nanoqwen.api.responses import ChunkBuilder, CompletionBuilder
from nanoqwen.api.schemas import ChatCompletionRequest, CompletionRequest, public_loc
from nanoqwen.engine.request import Event, TokenLogprob, Usage
from server_process import REPO_ROOT, GunicornServer
from wire_types import unknown_fields

USER = [{"role": "user", "content": "What is the best book?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
GREEDY = {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 4, **NO_THINKING}
GREEDY_THINKING = {key: value for key, value in GREEDY.items() if key != "chat_template_kwargs"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"]}}}]

# the version setup.cfg's test extra pins
OPENAI_VERSION = re.search(r"^\s*openai==(\S+)$", (REPO_ROOT / "setup.cfg").read_text(), re.M).group(1)
# A value for every request field of openai's chat CompletionCreateParams; what it must answer.
CHAT_FIELDS: dict[str, tuple[Any, Literal["ok", "refused"]]] = {
    "audio": ({"voice": "alloy", "format": "wav"}, "refused"),
    "frequency_penalty": (0.5, "ok"),
    "function_call": ("auto", "refused"),
    "functions": ([{"name": "f", "parameters": {}}], "refused"),
    "logit_bias": ({"11": -100}, "ok"),
    "logprobs": (True, "ok"),
    "max_completion_tokens": (2, "ok"),
    "max_tokens": (2, "ok"),
    "messages": (USER, "ok"),
    "metadata": ({"k": "v"}, "ok"),
    "modalities": (["text", "audio"], "refused"),
    "model": (MODEL, "ok"),
    "moderation": ({"model": "omni-moderation-latest"}, "refused"),
    "n": (2, "ok"),
    "parallel_tool_calls": (False, "ok"),
    "prediction": ({"type": "content", "content": "a"}, "ok"),
    "presence_penalty": (0.5, "ok"),
    "prompt_cache_key": ("k", "ok"),
    "prompt_cache_options": ({"mode": "explicit", "ttl": "30m"}, "ok"),
    "prompt_cache_retention": ("24h", "ok"),
    "reasoning_effort": ("xhigh", "ok"),
    "response_format": ({"type": "json_object"}, "ok"),
    "safety_identifier": ("s", "ok"),
    "seed": (7, "ok"),
    "service_tier": ("auto", "ok"),
    "stop": (["\n\n", "END"], "ok"),
    "store": (False, "ok"),
    "stream_options": ({"include_usage": True}, "ok"),
    "temperature": (0.5, "ok"),
    "tool_choice": ("auto", "ok"),
    "tools": (TOOLS, "ok"),
    "top_logprobs": (2, "ok"),
    "top_p": (0.9, "ok"),
    "user": ("u", "ok"),
    "verbosity": ("low", "refused"),
    "web_search_options": ({}, "refused"),
}
# What a field needs beside it to be valid (tool_choice needs tools, ...).
COMPANIONS: dict[str, dict[str, Any]] = {
    "top_logprobs": {"logprobs": True}, "stream_options": {"stream": True}, "tool_choice": {"tools": TOOLS},
    "parallel_tool_calls": {"tools": TOOLS},
}

RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}]
# openai's responses ResponseCreateParams; previous_response_id is tested on stored responses (test_server_responses)
RESPONSES_FIELDS: dict[str, tuple[Any, Literal["ok", "refused", "not_found"]]] = {
    "access_programs": ({"cyber": "standard"}, "refused"),
    "background": (True, "ok"),
    "background_options": ({"completion_window": "soonest"}, "refused"),
    "context_management": ([{"type": "compaction", "compact_threshold": 1000}], "refused"),
    "conversation": ("conv_1", "refused"),
    "image": ({"context_compression": "enabled"}, "refused"),
    "include": (["message.output_text.logprobs", "reasoning.encrypted_content"], "ok"),
    "input": ([{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}], "ok"),
    "instructions": ("Be brief.", "ok"),
    "max_output_tokens": (16, "ok"),
    "max_tool_calls": (1, "ok"),
    "metadata": ({"k": "v"}, "ok"),
    "model": (MODEL, "ok"),
    "moderation": ({"model": "omni-moderation-latest"}, "refused"),
    "parallel_tool_calls": (False, "ok"),
    "previous_response_id": ("resp_unknown", "not_found"),
    "prompt": ({"id": "pmpt_1"}, "refused"),
    "prompt_cache_key": ("k", "ok"),
    "prompt_cache_options": ({"mode": "explicit", "ttl": "12h", "prewarm": False}, "ok"),
    "prompt_cache_retention": ("24h", "ok"),
    "reasoning": ({"effort": "low", "summary": "auto"}, "ok"),
    "safety_identifier": ("s", "ok"),
    "service_tier": ("auto", "ok"),
    "store": (False, "ok"),
    "stream_options": ({"include_obfuscation": False}, "ok"),
    "temperature": (0.5, "ok"),
    "text": ({"format": {"type": "json_object"}}, "ok"),
    "tool_choice": ("required", "ok"),
    "tools": (RESPONSES_TOOLS, "ok"),
    "top_logprobs": (2, "ok"),
    "top_p": (0.9, "ok"),
    "truncation": ("auto", "ok"),
    "user": ("u", "ok"),
}
RESPONSES_COMPANIONS: dict[str, dict[str, Any]] = {
    "stream_options": {"stream": True}, "tool_choice": {"tools": RESPONSES_TOOLS},
    "max_tool_calls": {"tools": RESPONSES_TOOLS},  # parallel_tool_calls needs none here, unlike chat's
    "top_logprobs": {"include": ["message.output_text.logprobs"]},
}
LEGACY_FIELDS: dict[str, tuple[Any, Literal["ok", "refused"]]] = {
    "best_of": (3, "refused"),  # only 1 or n
    "echo": (True, "ok"),
    "frequency_penalty": (0.5, "ok"),
    "logit_bias": ({"11": -100}, "ok"),
    "logprobs": (2, "ok"),
    "max_tokens": (2, "ok"),
    "model": (MODEL, "ok"),
    "n": (2, "ok"),
    "presence_penalty": (0.5, "ok"),
    "prompt": ("Once upon a time", "ok"),
    "seed": (7, "ok"),
    "stop": ("\n", "ok"),
    "stream_options": ({"include_usage": True}, "ok"),
    "suffix": ("the end", "refused"),
    "temperature": (0.5, "ok"),
    "top_p": (0.9, "ok"),
    "user": ("u", "ok"),
}


def _chat(srv: GunicornServer, **body: Any) -> dict[str, Any]:
    response = post_chat(srv, {**GREEDY, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _chunks(srv: GunicornServer, body: dict[str, Any], path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    with requests.post(f"{srv.url}{path}", json={**body, "stream": True}, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        payloads = list(sse_payloads(response))
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def _error(response: requests.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_the_field_lists_are_the_openai_packages() -> None:
    hint = (f"the field lists are openai {OPENAI_VERSION}'s, {openai.__version__} is installed: install "
            f"openai=={OPENAI_VERSION} (setup.cfg's test extra), or bump its pin and list the new fields")
    assert set(CHAT_FIELDS) == set(chat_params.CompletionCreateParamsBase.__annotations__), hint
    assert set(LEGACY_FIELDS) == set(legacy_params.CompletionCreateParamsBase.__annotations__), hint
    assert set(RESPONSES_FIELDS) == set(response_params.ResponseCreateParamsBase.__annotations__), hint


ENDPOINTS = {  # path -> (its fields, a minimal body, the companions its fields need)
    "/v1/chat/completions": (CHAT_FIELDS, {"model": MODEL, "messages": USER, "max_tokens": 2}, COMPANIONS),
    "/v1/completions": (LEGACY_FIELDS, {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2}, COMPANIONS),
    "/v1/responses": (RESPONSES_FIELDS, {"model": MODEL, "input": "Hi", "max_output_tokens": 16},
                      RESPONSES_COMPANIONS),
}


@pytest.mark.parametrize("path,field", [(path, field) for path, (fields, *_) in ENDPOINTS.items() for field in fields])
def test_every_request_field_is_implemented_or_refused_by_name(server: GunicornServer, path: str, field: str) -> None:
    fields, minimal, companions = ENDPOINTS[path]
    value, outcome = fields[field]
    body = {**minimal, **companions.get(field, {}), field: value}
    response = requests.post(f"{server.url}{path}", json=body, timeout=120)
    if outcome == "ok":
        assert response.status_code == 200, response.text
    else:
        error = _error(response)
        code = "unsupported_parameter" if outcome == "refused" else "previous_response_not_found"
        assert (error["param"], error["code"]) == (field, code)


@pytest.mark.parametrize("body", [
    {"include": ["message.output_text.logprobs"], "top_logprobs": 2, "instructions": "Be brief."},
    {"tools": RESPONSES_TOOLS, "tool_choice": "required", "max_output_tokens": 40},
    {"background": True},  # queued: `response.queued`, then `response.in_progress`
])
def test_responses_and_their_events_validate_as_the_openai_types(server: GunicornServer, body: dict[str, Any]) -> None:
    body = {"model": MODEL, "input": "Hi", "temperature": 0, "max_output_tokens": 16, "reasoning": {"effort": "none"},
            **body}
    answer = requests.post(f"{server.url}/v1/responses", json=body, timeout=120)
    Response.model_validate(answer.json(), strict=True)
    with requests.post(f"{server.url}/v1/responses", json={**body, "stream": True}, stream=True,
                       timeout=120) as streamed:
        named = list(sse_events(streamed))
    payloads = [json.loads(data) for _, data in named]
    assert [p["type"] for p in payloads] == [name for name, _ in named]
    events = pydantic.TypeAdapter(list[ResponseStreamEvent]).validate_python(payloads, strict=True)
    assert events[-1].type in ("response.completed", "response.incomplete")
    second = "response.queued" if body.get("background") else "response.in_progress"
    assert [event.type for event in events[:2]] == ["response.created", second]


def test_the_responses_stream_helpers_events_hold_no_field_the_client_does_not_know(client: openai.OpenAI) -> None:
    """`client.responses.stream(...)` event by event: a text event's logprobs are OpenAI's `ResponseLogProb` (token,
    logprob, top_logprobs), without the output part's `bytes` (they were sent in every delta and `.done` event). The
    response's `store` is OpenAI's own field, which the client's type lacks."""
    with client.responses.stream(model=MODEL, input="Hi", max_output_tokens=16, temperature=0, top_logprobs=2,
                                 include=["message.output_text.logprobs"], reasoning={"effort": "none"}) as stream:
        events = list(stream)
    assert [event.type for event in events if event.type.startswith("response.output_text.")][-1].endswith(".done")
    delta = next(event for event in events if event.type == "response.output_text.delta")
    assert len(delta.logprobs) == 1 and len(delta.logprobs[0].top_logprobs) == 2
    unknown = {field for event in events for field, _ in unknown_fields(event, event.type, known=())}
    assert unknown <= {f"{kind}.response.store" for kind in ("response.created", "response.in_progress",
                                                              "response.completed", "response.incomplete")}, unknown
    [item] = events[-1].response.output
    assert item.content[0].logprobs and all(lp.bytes for lp in item.content[0].logprobs)  # the part keeps its bytes


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    [listed] = client.models.list().data
    assert listed == client.models.retrieve(MODEL)
    assert isinstance(listed, Model) and (listed.id, listed.object) == (MODEL, "model")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"


class Verdict(pydantic.BaseModel):
    ok: bool
    grade: Literal["good", "bad"]


def test_parse_and_stream_helpers_with_a_pydantic_response_format(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 40, "temperature": 0, "extra_body": NO_THINKING}
    parsed = client.chat.completions.parse(response_format=Verdict, **kwargs)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    with client.chat.completions.stream(response_format=Verdict, stream_options={"include_usage": True},
                                        **kwargs) as stream:
        events = Counter(event.type for event in stream)
        final = stream.get_final_completion()
    assert events["content.done"] == 1 and events["chunk"] > 3
    assert final.choices[0].message.parsed == parsed.choices[0].message.parsed
    # cached_tokens aside: the stream's prompt may hit the prefix cache that parse's filled
    assert final.usage.model_dump(exclude={"prompt_tokens_details"}) == parsed.usage.model_dump(
        exclude={"prompt_tokens_details"})


def test_responses_parse_and_stream_helpers_with_a_pydantic_text_format(client: openai.OpenAI) -> None:
    """`client.responses.parse(text_format=...)` and `.stream(text_format=...)`: the strict JSON schema they send as
    `text.format` holds, and the answer parses as the model (openai 3.63's helpers build their body anew)."""
    kwargs = {"model": MODEL, "input": "What is the best book?", "max_output_tokens": 40, "temperature": 0,
              "reasoning": {"effort": "none"}}
    parsed = client.responses.parse(text_format=Verdict, **kwargs)
    assert isinstance(parsed.output_parsed, Verdict) and parsed.status == "completed"
    with client.responses.stream(text_format=Verdict, **kwargs) as stream:
        events = Counter(event.type for event in stream)
        final = stream.get_final_response()
    assert events["response.output_text.delta"] > 3 and events["response.completed"] == 1
    assert final.output_parsed == parsed.output_parsed


def test_parse_with_a_strict_pydantic_tool(client: openai.OpenAI) -> None:
    """`openai.pydantic_function_tool`: a strict tool whose forced call's arguments parse as the model."""
    parsed = client.chat.completions.parse(
        model=MODEL, messages=USER, max_tokens=40, temperature=0, extra_body=NO_THINKING,
        tools=[openai.pydantic_function_tool(Verdict)], tool_choice="required", parallel_tool_calls=False)
    [call] = parsed.choices[0].message.tool_calls
    assert call.function.name == "Verdict" and isinstance(call.function.parsed_arguments, Verdict)


# `<tool_call>` first, then (a second call banned) the end: an answer that opens one call where tool_choice is auto
ONE_CALL = {"logit_bias": {str(TOKEN_IDS["<tool_call>"]): 100, str(IM_END_ID): 50}}


def test_a_strict_tools_call_follows_its_schema_with_tool_choice_auto(client: openai.OpenAI) -> None:
    """`strict: true` (what `openai.pydantic_function_tool` sends) holds with tool_choice auto too, as OpenAI's strict
    function calling: the answer is free, and a call the model opens follows the tool's schema, so `.parse()` and
    the stream helper parse its arguments. It was accepted and ignored: the model's own text, here no call at all."""
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 40, "temperature": 0, "extra_body": NO_THINKING,
              "tools": [openai.pydantic_function_tool(Verdict)], "parallel_tool_calls": False, **ONE_CALL}
    parsed = client.chat.completions.parse(**kwargs)
    [call] = parsed.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Verdict) and parsed.choices[0].finish_reason == "tool_calls"
    with client.chat.completions.stream(**kwargs) as stream:
        done = [event for event in stream if event.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [event.parsed_arguments for event in done] == [call.function.parsed_arguments]
    assert final.choices[0].message.tool_calls[0].function.arguments == call.function.arguments


def test_a_call_a_stop_string_cuts_short_ends_with_stop(client: openai.OpenAI) -> None:
    """A stop string met inside a call's arguments ends the answer there (as vLLM's stop strings do), the call cut
    short: its finish reason is "stop", not "tool_calls" (which says the calls are whole, there to make), in the
    collected answer and the stream alike."""
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 40, "temperature": 0, "extra_body": NO_THINKING,
              "tools": [openai.pydantic_function_tool(Verdict)], "stop": ["grade"],
              "tool_choice": {"type": "function", "function": {"name": "Verdict"}}}
    answer = client.chat.completions.create(**kwargs).choices[0]
    [call] = answer.message.tool_calls
    assert call.function.arguments.startswith('{"ok": ') and call.function.arguments.endswith(', "')
    assert answer.finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert "".join(call.function.arguments for c in chunks for call in c.choices[0].delta.tool_calls or []
                   if call.function.arguments) == call.function.arguments


class Trial(pydantic.BaseModel):  # a nested model: its schema refers to Verdict's in `$defs`
    verdict: Verdict


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "Trial"}}])
def test_a_forced_call_whose_schema_has_references(client: openai.OpenAI, tool_choice: Any) -> None:
    """vLLM's tools (test_completion_with_function_calling) and pydantic's nested models refer to `#/$defs/...`:
    the call's grammar held the arguments' schema inside its own, where `#` is no longer the arguments' (400 "Pointer
    '/$defs/Verdict' does not exist"); a schema referring to itself (`#`) compiles too."""
    parsed = client.chat.completions.parse(
        model=MODEL, messages=USER, max_tokens=40, temperature=0, extra_body=NO_THINKING,
        tools=[openai.pydantic_function_tool(Trial)], tool_choice=tool_choice, parallel_tool_calls=False)
    [call] = parsed.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Trial)
    tree = {"type": "object", "properties": {"leaf": {"type": "boolean"}, "next": {"$ref": "#"}}, "required": ["leaf"],
            "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "tree", "parameters": tree}}]
    answer = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=200, temperature=0, tools=tools,
                                            tool_choice="required", parallel_tool_calls=False, extra_body=NO_THINKING)
    [call] = answer.choices[0].message.tool_calls  # arguments as the schema allows: `#` was the wrapper's before
    assert call.function.name == "tree" and "leaf" in json.loads(call.function.arguments)


@pytest.mark.parametrize("bias", [{}, ONE_CALL])
def test_a_response_format_with_tools_answers_in_it_or_calls_one(client: openai.OpenAI, bias: dict[str, Any]) -> None:
    """A JSON response_format beside tools and tool_choice auto (the Agents SDK's `output_type` with tools) is the
    format of a text answer: the model may still call a tool, as OpenAI's may. The format's grammar held from the
    first token, so no call could open; now the answer is the JSON or calls (their arguments the tool's schema)."""
    parsed = client.chat.completions.parse(
        model=MODEL, messages=USER, max_tokens=40, temperature=0, extra_body=NO_THINKING, response_format=Verdict,
        tools=[openai.pydantic_function_tool(Trial)], **bias).choices[0]
    if bias:
        [call] = parsed.message.tool_calls
        assert isinstance(call.function.parsed_arguments, Trial) and parsed.finish_reason == "tool_calls"
        assert parsed.message.content is None and parsed.message.parsed is None
    else:
        assert isinstance(parsed.message.parsed, Verdict) and not parsed.message.tool_calls


def test_a_second_call_cut_before_its_name_leaves_no_markup(client: openai.OpenAI) -> None:
    """max_tokens cutting the second call right after `<tool_call>\n{"` (a stop string alike): the fragment is the
    markup of a call cut short, not content (it was, beside the whole first call), collected and streamed."""
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 31, "temperature": 0, "extra_body": NO_THINKING,
              "tools": [openai.pydantic_function_tool(Verdict)], **ONE_CALL}  # 28 tokens to the second <tool_call>
    answer = client.chat.completions.create(**kwargs).choices[0]
    [call] = answer.message.tool_calls
    assert Verdict.model_validate_json(call.function.arguments) and answer.finish_reason == "length"
    assert answer.message.content is None
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert not any(c.choices[0].delta.content for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


def test_a_strict_tools_first_call_cut_before_its_name_leaves_no_markup(client: openai.OpenAI) -> None:
    """tool_choice auto with a strict tool, max_tokens cutting its first call right after `<tool_call>\n{"`: the
    markup of a call cut short, as a later or a forced one's (it was the content), collected and streamed."""
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 3, "temperature": 0, "extra_body": NO_THINKING,
              "tools": [openai.pydantic_function_tool(Verdict)], "logit_bias": ONE_CALL["logit_bias"]}
    answer = client.chat.completions.create(**kwargs).choices[0]
    assert (answer.message.content, answer.message.tool_calls, answer.finish_reason) == ("", None, "length")
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


# Not strict, its schema one the grammar engine refuses (a look-behind): its calls are left free under tool_choice auto
LOOSE_TOOL = {"type": "function", "function": {"name": "zz", "parameters": {
    "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}}


@pytest.mark.parametrize("extra", [{"tools": [openai.pydantic_function_tool(Verdict), LOOSE_TOOL],
                                    "parallel_tool_calls": False, **ONE_CALL},
                                   {"tools": [LOOSE_TOOL], "response_format": {"type": "json_object"}}])
def test_a_tool_that_is_not_strict_is_left_free_beside_constrained_calls(client: openai.OpenAI,
                                                                        extra: dict[str, Any]) -> None:
    """Calls constrained under tool_choice auto (a strict tool beside, a JSON response_format) follow the strict
    tools' schemas alone, as OpenAI's and vLLM's strict auto mode: a tool that is not strict takes any JSON object.
    Its schema was compiled too, so one the engine refuses made the request a 400 that was a 200 without the strict
    tool or the format; the strict tool's call still follows its schema."""
    answer = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=40, temperature=0,
                                            extra_body=NO_THINKING, **extra).choices[0]
    if "logit_bias" in extra:
        [call] = answer.message.tool_calls
        assert call.function.name == "Verdict" and answer.finish_reason == "tool_calls"
        Verdict.model_validate_json(call.function.arguments)
    else:  # the format holds (the answer cut by max_tokens)
        assert answer.message.content.startswith("{") and not answer.message.tool_calls


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_a_response_format_no_grammar_holds_beside_tools_is_its_own_400(server: GunicornServer,
                                                                         tool_choice: str) -> None:
    """Checked apart from the calls' grammar it is compiled into (whose 400 names `tools`), and beside a forced call,
    whose answer is the call (it was accepted and ignored there)."""
    gone = {"type": "json_schema", "json_schema": {"name": "g", "schema": {"$ref": "#/$defs/gone"}}}
    body = {**GREEDY, "tools": TOOLS, "tool_choice": tool_choice, "response_format": gone}
    assert _error(post_chat(server, body))["param"] == "response_format"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "Verdict"}}])
def test_a_forced_call_with_a_response_format_answers_with_the_call(client: openai.OpenAI,
                                                                     tool_choice: Any) -> None:
    """The Agents SDK's `output_type` with tool_choice "required" sends both: OpenAI accepts the pair, vLLM drops the
    format; the answer is the call (it was a 400)."""
    answer = client.chat.completions.parse(
        model=MODEL, messages=USER, max_tokens=40, temperature=0, extra_body=NO_THINKING, response_format=Trial,
        tools=[openai.pydantic_function_tool(Verdict)], tool_choice=tool_choice, parallel_tool_calls=False).choices[0]
    [call] = answer.message.tool_calls
    assert isinstance(call.function.parsed_arguments, Verdict) and answer.finish_reason == "tool_calls"
    assert answer.message.content is None


def test_verbosity_at_openai_s_default_is_taken(server: GunicornServer) -> None:
    """As Responses' `text.verbosity`: "medium", OpenAI's default, changes nothing (the Agents SDK's
    `ModelSettings(verbosity="medium")` sends it to either API); another value is refused by name."""
    assert post_chat(server, {**GREEDY, "verbosity": "medium"}).status_code == 200
    assert _error(post_chat(server, {**GREEDY, "verbosity": "high"}))["param"] == "verbosity"


def test_with_raw_response(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=USER, max_tokens=2)
    assert raw.headers["content-type"] == "application/json" and raw.headers["x-request-id"]
    assert raw.parse().choices[0].message.role == "assistant"


USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
              "completion_tokens_details"}


def test_the_answer_and_its_chunks_carry_openais_fields(server: GunicornServer) -> None:
    """Field by field what OpenAI sends today: the message's `refusal: null` and `annotations: []`, the first delta's
    `refusal: null`, a choice's logprobs and finish_reason, the usage's details, `service_tier` and
    `system_fingerprint` on the answer and each chunk, `usage: null` on each chunk before the usage chunk."""
    answer = _chat(server)
    assert set(answer) == {"id", "object", "created", "model", "service_tier", "system_fingerprint", "choices",
                           "usage"}
    (choice,) = answer["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"] == {"role": "assistant", "content": choice["message"]["content"], "refusal": None,
                                 "annotations": []}
    assert set(answer["usage"]) == USAGE_KEYS
    assert set(answer["usage"]["prompt_tokens_details"]) == {"cached_tokens", "audio_tokens"}
    assert set(answer["usage"]["completion_tokens_details"]) == {"reasoning_tokens", "audio_tokens",
                                                                 "accepted_prediction_tokens",
                                                                 "rejected_prediction_tokens"}
    *chunks, last = _chunks(server, {**GREEDY, "stream_options": {"include_usage": True}})
    assert all(set(c) == set(answer) and c["usage"] is None and c["object"] == "chat.completion.chunk"
               for c in chunks)
    assert all(set(c["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"} for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert last["choices"] == [] and set(last["usage"]) == USAGE_KEYS  # its cached_tokens: the answer's prompt's


def test_streamed_n_choices_and_usage(server: GunicornServer) -> None:
    chunks = _chunks(server, {**GREEDY, "n": 3, "stream_options": {"include_usage": True}})
    *choice_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3 * GREEDY["max_tokens"]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in choice_chunks)
    by_index: dict[int, list[dict[str, Any]]] = {}
    for chunk in choice_chunks:
        by_index.setdefault(chunk["choices"][0]["index"], []).append(chunk["choices"][0])
    assert sorted(by_index) == [0, 1, 2]
    for choices in by_index.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        assert [c["finish_reason"] for c in choices].count("length") == 1 and choices[-1]["finish_reason"] == "length"
        assert all("role" not in c["delta"] for c in choices[1:])
    assert len({c["id"] for c in chunks}) == 1


def test_logprobs_shapes(server: GunicornServer) -> None:
    none = _chat(server, logprobs=False)["choices"][0]
    assert none["logprobs"] is None
    zero = _chat(server, logprobs=True, top_logprobs=0)["choices"][0]
    assert set(zero["logprobs"]) == {"content", "refusal"} and zero["logprobs"]["refusal"] is None  # as OpenAI's
    assert [len(t["top_logprobs"]) for t in zero["logprobs"]["content"]] == [0] * GREEDY["max_tokens"]
    five = _chat(server, logprobs=True, top_logprobs=5)["choices"][0]
    tokens = five["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == five["message"]["content"]
    for token in tokens:
        assert token["logprob"] <= 0 and len(token["top_logprobs"]) == 5
        assert token["top_logprobs"][0]["logprob"] >= token["logprob"]  # greedy: the sampled token is the top one
        assert bytes(token["bytes"]).decode(errors="replace") == token["token"]
    streamed = _chunks(server, {**GREEDY, "logprobs": True, "top_logprobs": 5})
    assert [t for c in streamed if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["content"]] \
        == tokens
    assert all(c["choices"][0]["logprobs"]["refusal"] is None for c in streamed if c["choices"][0]["logprobs"])
    assert _error(post_chat(server, {**GREEDY, "logprobs": True, "top_logprobs": 21}))["param"] == "top_logprobs"


def test_the_end_of_the_turn_has_no_logprob(server: GunicornServer, client: openai.OpenAI) -> None:
    """OpenAI's chat logprobs are the answer's text's tokens, not the end of the turn's (openai-python's recorded
    stream in tests/lib/chat/test_completions_streaming.py, test_content_logprobs_events: "Foo." ends with `.`). Its
    `<|im_end|>` was listed last: the stream helper's one `logprobs.content.delta` event without text, the tokens
    joined no longer the content. Legacy completions still list the token that ended the choice."""
    ended = {**NO_THINKING, "min_tokens": 3, "logit_bias": {str(IM_END_ID): 100}}
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2,
              "n": 2}
    with client.chat.completions.stream(**kwargs, extra_body=ended) as stream:
        events = Counter(event.type for event in stream)
        final = stream.get_final_completion()
    collected = client.chat.completions.create(**kwargs, extra_body=ended)
    for streamed, answer in zip(final.choices, collected.choices, strict=True):
        assert streamed.finish_reason == answer.finish_reason == "stop"
        tokens = [token.token for token in answer.logprobs.content]  # (their logprobs may differ by a rounding)
        assert [token.token for token in streamed.logprobs.content] == tokens and len(tokens) == 3
        assert "".join(tokens) == answer.message.content == streamed.message.content
    assert events["logprobs.content.delta"] == 6 and events["logprobs.content.done"] == 2
    legacy = requests.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": "Once upon", "max_tokens": 8, "logprobs": 1, "min_tokens": 3,
        "logit_bias": {str(IM_END_ID): 100}}).json()["choices"][0]
    assert legacy["finish_reason"] == "stop" and legacy["logprobs"]["tokens"][3:] == ["<|im_end|>"]


def test_an_empty_answer_streams_the_logprobs_it_collects(client: openai.OpenAI) -> None:
    """An answer whose first token ends the turn has no token to list: its stream says `content: []` on its finish
    chunk, as the collected answer does (the stream helper's choice.logprobs was None)."""
    kwargs = {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0, "logprobs": True, "n": 2,
              "extra_body": {**NO_THINKING, "logit_bias": {str(IM_END_ID): 100}}}
    with client.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    collected = client.chat.completions.create(**kwargs)
    for streamed, answer in zip(final.choices, collected.choices, strict=True):
        assert streamed.message.content == answer.message.content == ""
        assert streamed.logprobs is not None and answer.logprobs is not None
        assert streamed.logprobs.content == answer.logprobs.content == []


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings(server: GunicornServer, as_list: bool) -> None:
    free = _chat(server, max_tokens=8, logprobs=True)["choices"][0]
    tokens = [t["token"] for t in free["logprobs"]["content"]]
    stop = tokens[3].strip() or tokens[3]
    head = free["message"]["content"].split(stop)[0]
    stopped = _chat(server, max_tokens=8, stop=[stop, "never seen"] if as_list else stop)["choices"][0]
    assert (stopped["message"]["content"], stopped["finish_reason"]) == (head, "stop")


def test_max_completion_tokens_wins_over_max_tokens(server: GunicornServer) -> None:
    assert _chat(server, max_tokens=2, max_completion_tokens=5)["usage"]["completion_tokens"] == 5


def test_seeded_sampling_repeats(server: GunicornServer) -> None:
    body = {"temperature": 1.0, "max_tokens": 8, "n": 2}
    first, second = (_chat(server, seed=1234, **body) for _ in range(2))
    assert [c["message"] for c in first["choices"]] == [c["message"] for c in second["choices"]]


def test_tool_call_round_trip_with_the_clients_message_object(client: openai.OpenAI) -> None:
    """As users write it: the returned message object appended to `messages` as it is."""
    kwargs = {"model": MODEL, "tools": TOOLS, "temperature": 0, "max_tokens": 60, "extra_body": NO_THINKING}
    called = client.chat.completions.create(messages=USER, tool_choice="required", parallel_tool_calls=False,
                                           **kwargs).choices[0]
    assert called.finish_reason == "tool_calls"
    [call] = called.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    answered = client.chat.completions.create(
        messages=[*USER, called.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}], **kwargs)
    assert answered.choices[0].message.role == "assistant"


def test_a_call_without_arguments_in_the_history(server: GunicornServer) -> None:
    """vLLM's case: clients send a no-argument call's `arguments` as "" as well as "{}"."""
    def history(arguments: str) -> list[dict[str, Any]]:
        call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        return [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]

    def tokens(messages: list[dict[str, Any]]) -> list[int]:
        response = requests.post(f"{server.url}/tokenize", json={"messages": messages, "tools": TOOLS}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    assert tokens(history("")) == tokens(history("{}"))
    answers = [_chat(server, messages=history(arguments), tools=TOOLS)["choices"] for arguments in ("", "{}")]
    assert answers[0] == answers[1]


def test_reasoning_effort_levels(server: GunicornServer) -> None:
    """OpenAI's newer levels switch thinking on as the others do (Qwen3 has no effort levels); "none"
    switches it off."""
    for effort in ("xhigh", "max"):  # thinking on: enable_thinking false contradicts it
        assert _error(post_chat(server, {**GREEDY, "reasoning_effort": effort}))["param"] == "reasoning_effort"
    thinking, none = [post_chat(server, {**GREEDY_THINKING, "reasoning_effort": effort}).json()["choices"][0]["message"]
                      for effort in ("max", "none")]
    no_thinking = _chat(server)["choices"][0]["message"]
    assert none == no_thinking != thinking


def test_history_with_refusal_parts_and_cache_breakpoints(server: GunicornServer) -> None:
    """An assistant turn's refusal parts reach the template as its text; a text part's
    prompt_cache_breakpoint is a caching hint that changes nothing."""
    def tokens(messages: list[dict[str, Any]]) -> list[int]:
        response = requests.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": messages}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    plain = [*USER, {"role": "assistant", "content": "I can't."}, {"role": "user", "content": "Why?"}]
    parts = [{**USER[0], "content": [{"type": "text", "text": USER[0]["content"],
                                      "prompt_cache_breakpoint": {"mode": "explicit"}}]},
             {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}, plain[2]]
    assert tokens(parts) == tokens(plain)
    answers = [_chat(server, messages=messages)["choices"][0]["message"] for messages in (parts, plain)]
    assert answers[0] == answers[1]


CUSTOM_CALL = {"id": "c1", "type": "custom", "custom": {"name": "grep", "input": "x"}}  # openai's custom tool call


@pytest.mark.parametrize("body,param,code", [
    # the client's notation, without pydantic's union tags
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name",
     None),
    ({"response_format": {"type": "json_object", "schema": {"const": "42"}}}, "response_format.schema", None),
    ({"response_format": {"type": "sound"}}, "response_format", None),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {}}}, "tool_choice.function.name", None),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.[0].content.[0].text", None),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache": 1}]}]},
     "messages.[0].content.[0].cache", None),
    ({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]}, "messages.[0]", None),
    ({"prediction": {"type": "content", "content": [{"type": "text"}]}}, "prediction.content.[0].text", None),
    # OpenAI features this server does not implement
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.[0].content", "unsupported_parameter"),
    ({"messages": [{"role": "system", "content": [{"video_url": {"url": "data:,"}}]}]}, "messages.[0].content",
     "unsupported_parameter"),  # vLLM's typeless media part
    ({"tools": [{"type": "custom", "custom": {"name": "grep"}}]}, "tools.[0].type", "unsupported_parameter"),
    ({"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [CUSTOM_CALL]},
                   {"role": "tool", "tool_call_id": "c1", "content": "x"}]},
     "messages.[1].tool_calls.[0].type", "unsupported_parameter"),  # a custom tool's call in the history
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}},
     "tool_choice", "unsupported_parameter"),
    # vLLM's checks
    ({"stop_token_ids": [10**7]}, "stop_token_ids", None),
    ({"logit_bias": {str(10**7): 1}}, "logit_bias", None),
    ({"seed": 2**63}, "seed", None),
    ({"seed": -(2**63) - 1}, "seed", None),
    ({"stream_options": {"include_usage": True}}, "stream_options", None),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", None),
    ({"structured_outputs": {"regex": {"1": "Python"}}}, "structured_outputs.regex", None),
    ({"structured_outputs": {"regex": "[.*"}}, "structured_outputs.regex", None),
    ({"tools": TOOLS, "tool_choice": {}}, "tool_choice.type", None),
    ({"tools": TOOLS, "tool_choice": "bogus"}, "tool_choice", None),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", None),
    ({"thinking_token_budget": 10}, "thinking_token_budget", None),
    # llama.cpp's own fields
    ({"json_schema": {"const": "42"}}, "json_schema", None),
    ({"grammar": 'root ::= "a"'}, "grammar", None),
    ({"timings_per_token": True}, "timings_per_token", None),
    ({"return_progress": True}, "return_progress", None),
    # a field this server lacks is named before the errors that follow from its absence
    ({"messages": [], "prompt_token_ids": [1, 2]}, "prompt_token_ids", None),
    ({"messages": [], "functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    # llama.cpp's malformed messages
    ({"messages": None}, "messages", None),
    ({"messages": "string"}, "messages", None),
    ({"messages": [123]}, "messages.[0]", None),
    ({"messages": [{}]}, "messages.[0].role", None),
    ({"messages": [{"role": 123}]}, "messages.[0].role", None),
    ({"messages": [{"role": "system", "content": 123}]}, "messages.[0].content", None),
    ({"messages": [{"role": "user", "content": []}]}, "messages.[0].content", None),  # OpenAI's minimum length
    ({"messages": [{"role": "system", "content": "test"}, {}]}, "messages.[1].role", None),
])
def test_bad_requests_name_the_param(server: GunicornServer, body: dict[str, Any], param: str,
                                     code: str | None) -> None:
    error = _error(post_chat(server, {**GREEDY, **body}))
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


@pytest.mark.parametrize("schema,loc,public", [
    (CompletionRequest, ("prompt", "list[list[int]]", 0, 0), ("prompt", 0, 0)),  # a union inside a union's member
    (CompletionRequest, ("prompt", "list[int]", 0), ("prompt", 0)),
    (ChatCompletionRequest, ("messages", 0, "content", "other", 0, "text", "text"),
     ("messages", 0, "content", 0, "text")),
    (ChatCompletionRequest, ("response_format", "json_schema", "json_schema", "name"),
     ("response_format", "json_schema", "name")),
])
def test_public_loc_keeps_the_named_union_member(schema: type[pydantic.BaseModel], loc: tuple[Any, ...],
                                                 public: tuple[Any, ...]) -> None:
    assert public_loc(schema, loc) == public


@pytest.mark.parametrize("field,ids", [("stop_token_ids", [5, 10**7, -1]), ("logit_bias", {"5": 1, str(10**7): 1})])
def test_out_of_vocabulary_token_ids_are_named(server: GunicornServer, field: str, ids: Any) -> None:
    """vLLM's checks: the message names the bad ids and the vocabulary size."""
    error = _error(post_chat(server, {**GREEDY, field: ids}))
    assert error["param"] == field and str(10**7) in error["message"] and "151936" in error["message"]


@pytest.mark.parametrize("path,body,param,named", [
    ("/v1/chat/completions", {**GREEDY, "logit_bias": {"bad1": 50, "7": 1, "bad2": 20}}, "logit_bias",
     ["'bad1'", "'bad2'"]),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 10**7, -1]}, "prompt", [str(10**7), "-1", "out of vocabulary"]),
])
def test_every_bad_key_or_prompt_id_is_named(server: GunicornServer, path: str, body: dict[str, Any], param: str,
                                             named: list[str]) -> None:
    """vLLM's checks: all the logit_bias keys that are not token ids, the prompt ids out of the vocabulary."""
    error = _error(requests.post(f"{server.url}{path}", json=body, timeout=60))
    assert error["param"] == param and all(word in error["message"] for word in named), error


def test_streamed_text_offsets_equal_the_collected_ones(server: GunicornServer) -> None:
    """vLLM's case: a stop string holds text back while streaming; the offsets follow the tokens all the same."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logprobs": 0,
            "ignore_eos": True, "stop": ["\n\n\n\n"]}
    collected = requests.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]
    streamed = _chunks(server, body, "/v1/completions")
    offsets = [o for chunk in streamed if chunk["choices"][0]["logprobs"]
               for o in chunk["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == collected["logprobs"]["text_offset"] and len(offsets) == 6
    assert "".join(chunk["choices"][0]["text"] for chunk in streamed) == collected["text"]


def test_prompt_past_the_context_is_a_400(server: GunicornServer) -> None:
    """llama.cpp's and vLLM's case: no max_tokens, a prompt longer than the context."""
    error = _error(post_chat(server, {"model": MODEL, "messages": [{"role": "user", "content": "book " * 1200}]}))
    assert (error["param"], error["code"]) == ("messages", "context_length_exceeded")


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {**GREEDY, "n": 2}),
    ("/v1/completions", {"model": MODEL, "prompt": ["Once upon", "a time"], "max_tokens": 4, "temperature": 0}),
])
def test_continuous_usage_stats(server: GunicornServer, path: str, body: dict[str, Any]) -> None:
    """vLLM's `stream_options.continuous_usage_stats`: with include_usage, every chunk has the usage so far."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    *chunks, last = _chunks(server, {**body, "stream_options": options}, path)
    final = last["usage"]
    assert last["choices"] == [] and final["completion_tokens"] == 2 * 4
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == final["completion_tokens"]
    for chunk in chunks:
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == final["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    without = _chunks(server, {**body, "stream_options": {"continuous_usage_stats": True}}, path)
    assert all(chunk.get("usage") is None for chunk in without)


def test_reasoning_tokens_are_counted_per_choice_streamed_or_not() -> None:
    """`completion_tokens_details.reasoning_tokens`: each choice's tokens through its `</think>` token
    (the think tags included) when it reasoned, summed over the choices."""
    events = [
        Event(index=0, token_ids=[1]),  # <think>: no text of its own
        Event(index=1, text="Hi", token_ids=[5]),  # answers at once: no reasoning
        Event(index=0, reasoning="hmm", token_ids=[2]),
        Event(index=0, reasoning=" ok", token_ids=[3]),
        Event(index=0, token_ids=[4]),  # </think>
        Event(index=0, token_ids=[9]),  # content held back (a stop string's prefix): not reasoning
        Event(index=1, text=" there", token_ids=[6], finish_reason="stop"),
        Event(index=0, text="A", token_ids=[7]),
        Event(index=0, text="B", token_ids=[8], finish_reason="stop"),
    ]
    usage = Usage(prompt_tokens=3, completion_tokens=len(events))
    collected = CompletionBuilder(MODEL, "fp", n=2, want_logprobs=False, think_end=4)
    streamed = ChunkBuilder(MODEL, "fp", include_usage=True, n=2, think_end=4)
    for event in events:
        collected.add(event)
        streamed.chunks(event)
    assert collected.build(usage)["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4
    assert streamed.chunks(Event(usage=usage))[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 4


def test_include_reasoning_false_streams_the_content_tokens_logprobs_only() -> None:
    """A token not yet known to be reasoning or content (`<think>`, a held-back `<`) waits for the
    choice to show which."""
    def event(index: int, token: int, text: str = "", reasoning: str = "", finish: str | None = None) -> Event:
        return Event(index=index, text=text, reasoning=reasoning, token_ids=[token], finish_reason=finish,
                     logprobs=[TokenLogprob(token, str(token), -1.0, [], [])])

    events = [event(0, 1), event(1, 10), event(0, 2, reasoning="hmm"), event(1, 11, text="<p"),
              event(0, 4), event(0, 7, text="A"), event(1, 12), event(0, 8, text="B", finish="stop"),
              event(1, 13, finish="length")]
    streamed = ChunkBuilder(MODEL, "fp", include_usage=False, n=2, include_reasoning=False, think_end=4)
    collected = CompletionBuilder(MODEL, "fp", n=2, want_logprobs=True, include_reasoning=False, think_end=4)
    shown: dict[int, list[str]] = {0: [], 1: []}
    for e in events:
        collected.add(e)
        for chunk in streamed.chunks(e):
            choice = chunk["choices"][0]
            shown[choice["index"]] += [lp["token"] for lp in (choice["logprobs"] or {}).get("content", [])]
    assert shown == {0: ["7", "8"], 1: ["10", "11", "12", "13"]}
    choices = collected.build(Usage(prompt_tokens=1, completion_tokens=len(events)))["choices"]
    assert [[lp["token"] for lp in c["logprobs"]["content"]] for c in choices] == [shown[0], shown[1]]


def test_reasoning_tokens_and_include_reasoning(server: GunicornServer) -> None:
    """Forcing `<think>` at every step keeps the whole answer in reasoning; with thinking off there is
    none. vLLM's `include_reasoning: false` leaves it out of the answer, not out of the usage."""
    thinking = {**GREEDY_THINKING, "logit_bias": {str(THINK_ID): 100}}
    shown = post_chat(server, thinking).json()
    assert shown["choices"][0]["message"]["content"] == "" and shown["choices"][0]["message"]["reasoning_content"]
    assert shown["usage"]["completion_tokens_details"]["reasoning_tokens"] == GREEDY["max_tokens"]
    *_, last = _chunks(server, {**thinking, "stream_options": {"include_usage": True}})
    assert last["usage"] == shown["usage"]
    assert _chat(server)["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0

    # the reasoning tokens' logprobs are left out too (their tokens are its text); the content's stay
    hide = {"include_reasoning": False, "logprobs": True}
    hidden = post_chat(server, {**thinking, **hide}).json()
    assert hidden["choices"][0]["message"] == {"role": "assistant", "content": "", "refusal": None, "annotations": []}
    assert hidden["choices"][0]["logprobs"] == {"content": [], "refusal": None}
    assert hidden["usage"] == shown["usage"]
    *streamed, last = _chunks(server, {**thinking, **hide, "stream_options": {"include_usage": True}})
    assert all(set(c["choices"][0]["delta"]) <= {"role", "content", "refusal"} for c in streamed)
    *running, finish = streamed  # none listed, as the collected answer; each chunk says so (llama.cpp's tests)
    assert all(c["choices"][0]["logprobs"] == {"content": [], "refusal": None} for c in running)
    assert finish["choices"][0]["finish_reason"]
    assert finish["choices"][0]["logprobs"] == {"content": [], "refusal": None}
    assert last["usage"] == shown["usage"]
    answer = _chat(server, **hide)["choices"][0]["logprobs"]["content"]
    assert len(answer) == GREEDY["max_tokens"]
    assert [lp for c in _chunks(server, {**GREEDY, **hide}) for lp in (c["choices"][0]["logprobs"] or {}).get(
        "content", [])] == answer


def test_continue_final_message_prefills_the_answer(server: GunicornServer) -> None:
    """vLLM's prefill: the last assistant message left open, the answer continues it (llama.cpp
    continues a final assistant message by itself; here it takes vLLM's two flags)."""
    prefill = {"messages": [*USER, {"role": "assistant", "content": "Sure, the best"}],
               "add_generation_prompt": False, "continue_final_message": True}
    tokens = requests.post(f"{server.url}/tokenize", json={"model": MODEL, **prefill}, timeout=60).json()["tokens"]
    text = requests.post(f"{server.url}/detokenize", json={"tokens": tokens}, timeout=60).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nSure, the best")  # no <|im_end|>
    # With thinking on (the default) too, the template closed the message's think block: the
    # continuation is content, even a `<think>` (forced here) the model writes in it.
    for bias in (None, {str(THINK_ID): 100}):
        raw = requests.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": tokens, "max_tokens": 6, "temperature": 0,
            "logit_bias": bias}).json()["choices"][0]["text"]
        for thinking in (NO_THINKING, {"chat_template_kwargs": None}):
            answer = _chat(server, **prefill, **thinking, max_tokens=6, logit_bias=bias)["choices"][0]["message"]
            assert (answer["content"], answer.get("reasoning_content")) == (raw, None)
    constrained = ({"response_format": {"type": "json_object"}}, {"tools": TOOLS, "tool_choice": "required"},
                   {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                   {"tools": [openai.pydantic_function_tool(Verdict)]})  # a strict tool: its call is constrained
    for bad in ({"add_generation_prompt": True}, {"messages": USER}, *constrained):
        assert _error(post_chat(server, {**GREEDY, **prefill, **bad}))["param"] == "continue_final_message"


def test_a_null_tool_choice_is_an_absent_one(server: GunicornServer) -> None:
    """vLLM's test_tool_choice_null: clients that send their unset fields send `"tool_choice": null`, which is
    `auto` with tools (shown to the model, the answer parsed for calls; "none" would not show them) and nothing
    without."""
    for extra in ({"tools": TOOLS}, {}):
        null, absent = _chat(server, **extra, tool_choice=None), _chat(server, **extra)
        assert null["choices"] == absent["choices"]
        assert null["usage"]["prompt_tokens"] == absent["usage"]["prompt_tokens"]
    shown = _chat(server, tools=TOOLS, tool_choice=None)["usage"]["prompt_tokens"]
    assert shown > _chat(server, tools=TOOLS, tool_choice="none")["usage"]["prompt_tokens"]


def test_echo_starts_the_answer_with_the_prefill(server: GunicornServer) -> None:
    """vLLM's test_chat_echo: `echo` with continue_final_message puts the assistant message continued before the
    answer (the collected content, and streamed as the chunk after the role's); a last message of another role adds
    nothing (echo was refused before)."""
    prefill = {"messages": [*USER, {"role": "assistant", "content": [{"type": "text", "text": "Sure, the best"}]}],
               "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 4}
    plain = _chat(server, **prefill)["choices"][0]["message"]["content"]
    echoed = _chat(server, **prefill, echo=True)["choices"][0]["message"]["content"]
    assert echoed == "Sure, the best" + plain
    deltas = [c["choices"][0]["delta"] for c in _chunks(server, {**GREEDY, **prefill, "echo": True})]
    assert deltas[:2] == [{"role": "assistant", "content": "", "refusal": None}, {"content": "Sure, the best"}]
    assert "".join(d.get("content", "") for d in deltas) == echoed
    assert _chat(server, echo=True)["choices"] == _chat(server)["choices"]


def test_echo_starts_each_of_n_choices(server: GunicornServer) -> None:
    """vLLM's echo with `n: 2`: each choice's content starts with the assistant message continued, collected and
    streamed (each choice's first content delta, after its role delta)."""
    prefill = {"messages": [*USER, {"role": "assistant", "content": "Sure, the best"}], "echo": True, "n": 2,
               "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 4, "temperature": 1.0,
               "seed": 3}
    collected = [c["message"]["content"] for c in _chat(server, **prefill)["choices"]]
    assert len(collected) == 2 and all(content.startswith("Sure, the best") for content in collected), collected
    streamed = ["", ""]
    for chunk in _chunks(server, {**GREEDY, **prefill}):
        (choice,) = chunk["choices"]
        if "content" in choice["delta"] and "role" not in choice["delta"]:
            if not streamed[choice["index"]]:
                assert choice["delta"]["content"] == "Sure, the best", chunk
            streamed[choice["index"]] += choice["delta"]["content"]
    assert streamed == collected


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
@pytest.mark.parametrize("base", [GREEDY, {**GREEDY, "chat_template_kwargs": {"enable_thinking": True}}],
                         ids=["markup", "thought"])
def test_a_forced_call_cut_before_its_name_leaves_no_markup(server: GunicornServer, tool_choice: Any,
                                                            base: dict[str, Any]) -> None:
    """vLLM's case (as OpenAI answers it): max_tokens too small for the forced call (cut in its markup or its
    thought): no tool_calls, content "", finish_reason "length", streamed or not; the message resent is valid (with
    content null and no calls it was OpenAI's 400)."""
    body = {**base, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 3}
    choice = _chat(server, **body)["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("", "length")
    assert "tool_calls" not in choice["message"]
    *deltas, finish = [c["choices"][0] for c in _chunks(server, body)]
    assert deltas[0]["delta"] == {"role": "assistant", "content": None, "refusal": None}
    assert [d["delta"]["content"] for d in deltas[1:] if "content" in d["delta"]] == [""]
    assert finish["finish_reason"] == "length"
    resent = {**body, "messages": [*USER, choice["message"], {"role": "user", "content": "Again."}], "max_tokens": 1}
    assert _chat(server, **resent)["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_calls_first_delta_has_no_content(server: GunicornServer, tool_choice: Any) -> None:
    """OpenAI's recorded stream of a call (openai-python's snapshot of `get_weather`) opens with `role: assistant,
    content: null`, the collected message's content; a forced call's opened with `content: ""`. Every chunk and the
    collected answer name the tier that served them ("default")."""
    body = {**GREEDY, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 40, "service_tier": "auto"}
    collected = _chat(server, **body)
    assert collected["choices"][0]["message"]["content"] is None and collected["service_tier"] == "default"
    chunks = _chunks(server, body)
    first, *rest = [c["choices"][0]["delta"] for c in chunks]
    assert first == {"role": "assistant", "content": None, "refusal": None}
    assert all("content" not in d for d in rest) and any("tool_calls" in d for d in rest)
    assert {c["service_tier"] for c in chunks} == {"default"}


CALL_FIRST = {**NO_THINKING, "logit_bias": {str(TOKEN_IDS["<tool_call>"]): 100}}  # an answer that opens a call


@pytest.mark.parametrize("thinking", [NO_THINKING, {}, CALL_FIRST])
def test_an_auto_tools_stream_opens_each_choice_once_with_its_logprobs(server: GunicornServer,
                                                                      thinking: dict[str, Any]) -> None:
    """With tools offered and tool_choice auto each choice's role delta waits for its first output, and chunks of
    logprobs alone wait with it: through the server each of n choices opens once, first, with the collected answer's
    content kind (none before reasoning), and streams one logprob a token, as the collected answer holds; an answer
    opening with `<tool_call>` (biased) has chunks of logprobs alone before anything decides the role delta."""
    body = {**GREEDY_THINKING, **thinking, "tools": TOOLS, "n": 2, "logprobs": True, "max_tokens": 6}
    collected = post_chat(server, body).json()["choices"]  # not _chat: it would turn thinking off
    chunks = _chunks(server, {**body, "stream_options": {"include_usage": True}})
    for index, answer in enumerate(collected):
        choices = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        first, *rest = [c["delta"] for c in choices]
        assert first["role"] == "assistant" and all("role" not in d for d in rest)
        assert first.get("content", "none") == ("none" if answer["message"].get("reasoning_content") else
                                               "" if answer["message"]["content"] is not None else None)
        streamed = [lp for c in choices if c["logprobs"] for lp in c["logprobs"]["content"]]
        assert [lp["token"] for lp in streamed] == [lp["token"] for lp in answer["logprobs"]["content"]]
    assert chunks[-1]["usage"]["completion_tokens"] == sum(len(a["logprobs"]["content"]) for a in collected)


THINKS = {"logit_bias": {str(THINK_ID): 100}}  # every token `<think>`: an answer that only reasons


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("thinking", [THINKS, NO_THINKING, CALL_FIRST])
def test_an_auto_tools_streams_accumulated_message_is_the_collected_one(client: openai.OpenAI, thinking: dict[str, Any],
                                                                      n: int) -> None:
    """The openai client's ChatCompletionStreamState (its `chat.completions.stream` helper's) joins the deltas: with
    tools offered (tool_choice auto) its message is the collected one: an answer cut by max_tokens inside its reasoning
    has `content: ""` in both (the role delta, sent before the reasoning, cannot say it: a delta says it at the end)."""
    body = {"model": MODEL, "messages": USER, "tools": TOOLS, "temperature": 0, "max_tokens": 4, "n": n}
    extra = {key: value for key, value in thinking.items() if key != "logit_bias"}
    kwargs = {**body, "logit_bias": thinking.get("logit_bias"), "extra_body": extra}
    collected = client.chat.completions.create(**kwargs)
    state = ChatCompletionStreamState()
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        state.handle_chunk(chunk)
    streamed = state.current_completion_snapshot
    for whole, joined in zip(collected.choices, streamed.choices, strict=True):
        fields = ("content", "tool_calls", "refusal")
        assert [getattr(joined.message, f) for f in fields] == [getattr(whole.message, f) for f in fields]
        assert joined.finish_reason == whole.finish_reason
    if thinking is THINKS:
        assert [c.message.content for c in collected.choices] == [""] * n
        assert all(c.message.model_extra["reasoning_content"] for c in collected.choices)


@pytest.mark.parametrize("seed", [0, 2])  # seed 0: choices 1 and 2 decided before 0; seed 2: choice 2 before 1
def test_an_auto_tools_streams_choices_open_in_index_order(client: openai.OpenAI, seed: int) -> None:
    """A choice decided while a lower one still waits (opening with `<tool_call>`: biased) waits for it too: the openai
    client's stream helper takes the first chunk's choices as its list and indexes it (choice 1 first: IndexError).
    A held chunk goes out with the usage so far as it is sent (vLLM's continuous usage), never one that went back."""
    kwargs = {"model": MODEL, "messages": USER, "tools": TOOLS, "n": 3, "temperature": 1.0, "max_tokens": 6,
              "seed": seed, "logit_bias": {str(TOKEN_IDS["<tool_call>"]): 5}}
    state, counts = ChatCompletionStreamState(), []
    usage = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    for chunk in client.chat.completions.create(**kwargs, stream=True, extra_body={**NO_THINKING, **usage}):
        state.handle_chunk(chunk)
        counts.append(chunk.usage.completion_tokens)
    assert counts == sorted(counts) and counts[-1] == 18, counts
    streamed = state.current_completion_snapshot.choices
    collected = client.chat.completions.create(**kwargs, extra_body=NO_THINKING).choices
    assert [c.index for c in streamed] == [0, 1, 2]
    assert [(c.message.content, c.finish_reason) for c in streamed] == [
        (c.message.content, c.finish_reason) for c in collected]


@pytest.mark.parametrize("constraint,answer,expected", [
    ({"tools": TOOLS, "tool_choice": "required"}, lambda m: [c["function"]["name"] for c in m["tool_calls"]],
     ["get_weather"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"enum": ["yes", "no"]}}}},
     lambda m: json.loads(m["content"]) in ("yes", "no"), True),
])
def test_a_constraint_holds_when_a_thinking_model_answers_without_thinking(server: GunicornServer,
                                                                          constraint: dict[str, Any],
                                                                          answer: Any, expected: Any) -> None:
    """Thinking on (the default) and no `<think>` written first (banned here): the answer starts at
    once and follows the grammar from its first token (it was free text, a 200 with no call)."""
    body = {**GREEDY_THINKING, **constraint, "max_tokens": 40, "logit_bias": {str(THINK_ID): -100}}
    message = post_chat(server, body).json()["choices"][0]["message"]
    assert answer(message) == expected and "reasoning_content" not in message


PROMPT_IDS = [9707, 11, 1052, 374, 279, 1850, 2311, 30, 576, 4226, 374]  # "Hello, what is the best book? The answer is"


def _vllm_rank(ref: torch.Tensor, token: int) -> tuple[int, int]:
    """The bounds of vLLM's rank (how many logprobs are >= the token's) with transformers' logprobs [V], within
    1e-4: the server's logprobs round differently from transformers' (a near-tie may fall either way)."""
    own = ref[token].item()
    return int((ref > own + 1e-4).sum()) + 1, int((ref >= own - 1e-4).sum())


def _check_prompt_logprobs(positions: list[Any], prompt: list[int], hf: torch.nn.Module, k: int,
                           tokens: dict[int, str]) -> None:
    """vLLM's prompt_logprobs against transformers' log_softmax (fp32): the first position null, then the prompt
    token's logprob, rank and text, and the top k's with ranks 1..k; the prompt token's entry is its top-k one
    when it is among them."""
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)  # [P - 1, V]
    assert len(positions) == len(prompt) and positions[0] is None
    for i, (position, token) in enumerate(zip(positions[1:], prompt[1:], strict=True)):
        top = ref[i].topk(k)
        top_ids = top.indices.tolist()
        assert list(position)[0] == str(token) and len(position) == k + (token not in top_ids), position
        entry = position[str(token)]
        assert entry["logprob"] == pytest.approx(ref[i, token].item(), abs=1e-4)
        assert entry["decoded_token"] == tokens[token]
        if token in top_ids:
            assert entry["rank"] == top_ids.index(token) + 1
        else:
            low, high = _vllm_rank(ref[i], token)
            assert low <= entry["rank"] <= high and entry["rank"] > k, (entry, low, high)
        assert [position[str(t)]["rank"] for t in top_ids] == list(range(1, k + 1))
        assert [position[str(t)]["logprob"] for t in top_ids] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_are_vllms(server: GunicornServer, hf: torch.nn.Module) -> None:
    """vLLM's `prompt_logprobs` k: legacy completions per choice, chat at the top level (the templated prompt's),
    each position's dict of token id -> {logprob, rank, decoded_token} checked against transformers; a greedy
    continuation scored as prompt is rank 1 throughout."""
    def pieces(ids: list[int]) -> dict[int, str]:
        return {t: requests.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": [t]}, timeout=30)
                .json()["prompt"] for t in set(ids)}

    body = {"model": MODEL, "prompt": PROMPT_IDS, "max_tokens": 4, "temperature": 0, "prompt_logprobs": 3, "n": 2}
    answer = requests.post(f"{server.url}/v1/completions", json=body, timeout=120).json()
    first, second = answer["choices"]
    assert first["prompt_logprobs"] == second["prompt_logprobs"] and first["logprobs"] is None
    positions = first["prompt_logprobs"]
    listed = [int(t) for position in positions[1:] for t in position]
    _check_prompt_logprobs(positions, PROMPT_IDS, hf, 3, pieces(listed))

    continued = requests.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": first["text"]},
                              timeout=30).json()["tokens"]
    scored = requests.post(f"{server.url}/v1/completions", timeout=120, json={
        **body, "prompt": PROMPT_IDS + continued, "max_tokens": 1, "n": 1, "prompt_logprobs": 0}).json()
    tail = scored["choices"][0]["prompt_logprobs"][len(PROMPT_IDS):]
    assert [p[str(t)]["rank"] for p, t in zip(tail, continued, strict=True)] == [1] * len(continued)

    chat = _chat(server, prompt_logprobs=2)
    positions = chat["prompt_logprobs"]
    assert len(positions) == chat["usage"]["prompt_tokens"] and positions[0] is None
    assert all(len(p) in (2, 3) and {e["rank"] for e in p.values()} >= {1, 2} for p in positions[1:])
    assert "prompt_logprobs" not in _chat(server)


@pytest.mark.parametrize("path, extra, code", [
    ("/v1/chat/completions", {"prompt_logprobs": -1}, "unsupported_parameter"),
    ("/v1/completions", {"prompt_logprobs": -1}, "unsupported_parameter"),
    ("/v1/completions", {"prompt_logprobs": 21}, None),
    ("/v1/completions", {"prompt_logprobs": -2}, None),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, None),
    ("/v1/completions", {"prompt_logprobs": 2, "echo": True, "logprobs": 1}, None),
])
def test_prompt_logprobs_not_served_are_400s_naming_it(server: GunicornServer, path: str, extra: dict[str, Any],
                                                       code: str | None) -> None:
    prompt = {"messages": USER} if path == "/v1/chat/completions" else {"prompt": "Hi"}
    answer = requests.post(f"{server.url}{path}", json={"model": MODEL, "max_tokens": 2, **prompt, **extra},
                           timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "prompt_logprobs" and (code is None or error["code"] == code), error


def test_prompt_logprobs_0_in_a_stream_asks_for_nothing(server: GunicornServer) -> None:
    """vLLM takes 0 in a stream, whose chunks have no field for them."""
    chunks = _chunks(server, {**GREEDY, "prompt_logprobs": 0})
    assert chunks and all("prompt_logprobs" not in c for c in chunks)
