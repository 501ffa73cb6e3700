"""Tool calls and /tokenize, /detokenize through `gunicorn -k gevent server:app` and the `openai` client.

The random-weight checkpoint never emits a call by itself: that the answers' calls are parsed and
streamed is tested on crafted events (tests/test_api_protocol.py, tests/test_tool_calls.py); here,
that tools and the tool history reach the real chat template, and the shape of what comes back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import torch
from transformers import AutoTokenizer

from chat_http import MODEL
from engine_util import hf_greedy
from nanoqwen.api.strict_json import TOO_MANY_VALUES
from server_process import GunicornServer

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ROUND_TRIP = [
    *USER,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"},
]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 6, **NO_THINKING}
CLIENT_GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 6, "extra_body": NO_THINKING}


def _post(srv: GunicornServer, path: str, body: Any) -> requests.Response:
    return requests.post(f"{srv.url}{path}", json=body, timeout=120)


def _chat(srv: GunicornServer, **body: Any) -> dict[str, Any]:
    response = _post(srv, "/v1/chat/completions", {**GREEDY, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _templated(srv: GunicornServer, **body: Any) -> tuple[list[int], str]:
    tokens = _post(srv, "/tokenize", {"model": MODEL, **body})
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    text = _post(srv, "/detokenize", {"model": MODEL, "tokens": ids})
    assert text.status_code == 200, text.text
    return ids, text.json()["prompt"]


def _error(response: requests.Response, param: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error


def test_tools_reach_the_chat_template(server: GunicornServer) -> None:
    plain = _chat(server, messages=USER)["usage"]["prompt_tokens"]
    with_tools = _chat(server, messages=USER, tools=TOOLS)
    assert with_tools["usage"]["prompt_tokens"] > plain + 20
    assert with_tools["choices"][0]["finish_reason"] in ("stop", "length")  # the random model calls nothing
    # tool_choice "none": the tools are not shown (and answers not parsed), as if there were none
    assert _chat(server, messages=USER, tools=TOOLS, tool_choice="none")["usage"]["prompt_tokens"] == plain
    ids, text = _templated(server, messages=USER, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    assert len(ids) == with_tools["usage"]["prompt_tokens"]
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tool_round_trip_with_the_openai_client(server: GunicornServer) -> None:
    client = server.openai_client()
    answer = client.chat.completions.create(messages=ROUND_TRIP, tools=TOOLS, tool_choice="auto",
                                            parallel_tool_calls=True, **CLIENT_GREEDY)
    assert answer.choices[0].message.role == "assistant"
    ids, text = _templated(server, messages=ROUND_TRIP, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    assert answer.usage.prompt_tokens == len(ids)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21 °C\n</tool_response><|im_end|>\n'
            in text)


# What clients send that no test planned: content parts, an assistant turn with text and two calls (their arguments
# JSON strings), two tool answers in a row, and emoji, CJK, combining marks, control characters, a BOM and the
# model's own markup in plain text.
UNPLANNED = [
    {"role": "system", "content": "Résumé 日本語 \x01\t<|im_end|>"},
    {"role": "user", "content": [{"type": "text", "text": "e\u0301 👨\u200d👩\u200d👧 "},
                                 {"type": "text", "text": "</think> 🇯🇵\r\n"}]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Z\\u00fcrich"}'}},  # the template writes tojson's
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "東京"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "cloudy\u200b"},
    {"role": "tool", "tool_call_id": "call_2", "content": "<tool_call>\ufeff"},
    {"role": "user", "content": "ﬁne\u00a0? 😀"},
]


@pytest.mark.parametrize("template_kwargs", [{"enable_thinking": False}, {}])
def test_an_unplanned_conversation_is_transformers_prompt_and_greedy_answer(
    server: GunicornServer, tiny_checkpoint: Path, hf: torch.nn.Module, template_kwargs: dict[str, Any]
) -> None:
    """Rendered as transformers' apply_chat_template renders it (each call's arguments the object they hold), then
    answered through the openai client with transformers' greedy tokens and log-probabilities (fp32)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    def with_objects(call: dict[str, Any]) -> dict[str, Any]:
        return {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}

    as_objects = [{**m, "tool_calls": [with_objects(c) for c in m["tool_calls"]]} if "tool_calls" in m else m
                  for m in UNPLANNED]
    text = tokenizer.apply_chat_template(as_objects, tools=TOOLS, tokenize=False, add_generation_prompt=True,
                                         **template_kwargs)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    assert _templated(server, messages=UNPLANNED, tools=TOOLS, chat_template_kwargs=template_kwargs)[0] == prompt
    answer = server.openai_client().chat.completions.create(
        model=MODEL, messages=UNPLANNED, tools=TOOLS, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2,
        extra_body={"chat_template_kwargs": template_kwargs, "ignore_eos": True})
    tokens = hf_greedy(hf, prompt, 8)
    with torch.no_grad():
        reference = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].log_softmax(-1)
    choice = answer.choices[0]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 8)
    assert choice.message.content == tokenizer.decode(tokens, skip_special_tokens=True)
    assert choice.finish_reason == "length" and len(choice.logprobs.content) == 8
    assert b"".join(bytes(lp.bytes) for lp in choice.logprobs.content) == tokenizer.decode(tokens).encode()
    for lp, token, row in zip(choice.logprobs.content, tokens, reference):
        assert lp.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [top.logprob for top in lp.top_logprobs] == pytest.approx(row.topk(2).values.tolist(), abs=1e-4)


def test_streamed_answer_with_tools_equals_the_non_streamed_one(server: GunicornServer) -> None:
    client = server.openai_client()
    body = {**CLIENT_GREEDY, "max_tokens": 12, "messages": USER, "tools": TOOLS}
    whole = client.chat.completions.create(**body)
    stream = client.chat.completions.create(**body, stream=True)
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == whole.choices[0].message.content and reasons == [whole.choices[0].finish_reason]


def _with_arguments(arguments: str) -> dict[str, Any]:
    """A conversation whose assistant turn called get_weather with `arguments`."""
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return {"messages": [*USER, {"role": "assistant", "tool_calls": [call]}]}


def test_arguments_past_the_request_s_values_are_a_413(server: GunicornServer) -> None:
    """A string's values were not bounded; the case was a list, refused as "not a JSON object" before any limit."""
    response = _post(server, "/v1/chat/completions",
                     {**GREEDY, **_with_arguments('{"a": [' + "1," * 70_000 + "1]}")})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["message"].startswith(TOO_MANY_VALUES), error


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "get weather", "parameters": {"type": "string"}}}]},
     "tools.[0].function.name"),  # the name's error, not the parameters' (which had no name to say)
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),  # OpenAI's 400 without tools, which agents hit
    ({"tools": [], "parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "wizard"}}}}}], "tool_choice": "required"}, "tools"),
    ({"messages": [*USER, {"role": "tool", "content": "sunny"}]}, "messages.[1]"),
    ({"tools": [*TOOLS, {"type": "function", "function": {"name": "get_weather"}}]}, "tools"),  # a name given twice
])
def test_bad_tool_requests(server: GunicornServer, body: dict[str, Any], param: str) -> None:
    _error(_post(server, "/v1/chat/completions", {**GREEDY, "messages": USER, **body}), param)
    with pytest.raises(openai.BadRequestError) as info:
        server.openai_client().chat.completions.create(**{"messages": USER, **CLIENT_GREEDY, **body})
    assert info.value.body["param"] == param


INTEGER_BY_REF = {"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"type": "integer"}}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}, "auto"])
@pytest.mark.parametrize(("schema", "typed"), [({"type": "string"}, "string"), ({"type": "integer"}, "integer"),
                                               ({"type": ["object", "null"]}, ["object", "null"]),
                                               ({"type": "wizard"}, "wizard"), (INTEGER_BY_REF, "integer")])
def test_a_function_s_parameters_are_an_object_schema(server: GunicornServer, schema: dict[str, Any], typed: Any,
                                                      tool_choice: Any) -> None:
    """A call's arguments are a JSON object: a `parameters` schema typed otherwise, at its root or where the root's
    `$ref`s lead, is OpenAI's 400, in chat, Responses and the prompt counts (a forced call following `{"type":
    "string"}` was a 200 without a call: the markup in `content`, `finish_reason` "stop" or "length"; one following
    INTEGER_BY_REF, held to no object, a 200 with no call under "auto"). The message is OpenAI's where the type is a
    string; a list's form is ours (OpenAI prints Python's repr of it, `None` for a JSON null)."""
    message = f"Invalid schema for function 'f': schema must be a JSON Schema of 'type: \"object\"', got 'type: " \
              f"{json.dumps(typed)}'."
    chat = {**GREEDY, "messages": USER, "tool_choice": tool_choice,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}
    responses = {"model": MODEL, "input": "hi", "tools": [{"type": "function", "name": "f", "parameters": schema}],
                 "tool_choice": tool_choice if isinstance(tool_choice, str) else {"type": "function", "name": "f"}}
    for path, body, param in [
        ("/v1/chat/completions", chat, "tools.[0].function.parameters"),
        ("/v1/chat/completions", {**chat, "stream": True}, "tools.[0].function.parameters"),
        ("/tokenize", {k: v for k, v in chat.items() if k in ("model", "messages", "tools")},
         "tools.[0].function.parameters"),
        ("/v1/responses", {**responses, "max_output_tokens": 16}, "tools.[0].parameters"),
        ("/v1/responses/input_tokens", responses, "tools.[0].parameters"),
    ]:
        error = _error(_post(server, path, body), param)
        assert error["message"] == message and error["code"] == "invalid_function_parameters", (path, error)
    with pytest.raises(openai.BadRequestError) as info:
        server.openai_client().chat.completions.create(**{k: v for k, v in chat.items() if k in ("messages", "tools",
                                                          "tool_choice")}, **CLIENT_GREEDY)
    assert info.value.body["param"] == "tools.[0].function.parameters"


ONE_A = {"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"], "additionalProperties": False}


# ONE_A or a string, where a root `$ref` leads; then with a cycle back to `#` (that a call cannot follow: `b` is `[]`)
# (named as the `$defs` entry that call_arguments adds; then a `$defs` list, which llguidance takes too)
REF_TO_UNTYPED = {"$ref": "#/$defs/arguments", "$defs": {"arguments": {"anyOf": [{"type": "string"}, ONE_A]}}}
REF_INTO_A_LIST = {"$ref": "#/$defs/0", "$defs": [{"anyOf": [{"type": "string"}, ONE_A]}]}
CYCLE_TO_UNTYPED = {"$ref": "#/$defs/A", "$defs": {"A": {"anyOf": [{"type": "string"}, {**ONE_A, "properties": {
    **ONE_A["properties"], "b": {"type": "array", "items": {"$ref": "#"}, "maxItems": 0}}, "required": ["a", "b"]}]}}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}])
@pytest.mark.parametrize("parameters, arguments", [
    ({"anyOf": [{"type": "string"}, ONE_A]}, '{"a": 1}'),
    ({"anyOf": [{"type": "string"}, {"$ref": "#/$defs/A"}], "$defs": {"A": ONE_A}}, '{"a": 1}'),
    (REF_TO_UNTYPED, '{"a": 1}'), (REF_INTO_A_LIST, '{"a": 1}'), (CYCLE_TO_UNTYPED, '{"a": 1, "b": []}'),
], ids=["untyped-root", "ref-inside", "root-ref-to-untyped", "root-ref-into-a-list", "root-ref-to-untyped-cycle"])
def test_a_forced_call_s_untyped_parameters_are_an_object(server: GunicornServer, parameters: dict[str, Any],
                                                          arguments: str, tool_choice: Any) -> None:
    """Parameters that leave the type open are held to an object in a call (its Hermes arguments are one): the
    string they allowed was the markup left in `content`, no call (a 200 with `content: ""` and "length"). A `$ref`
    inside the root held still resolves; a root `$ref` to an untyped schema is held too, a cycle through `#` served."""
    choice = _chat(server, messages=USER, max_tokens=30, tool_choice=tool_choice,
                   tools=[{"type": "function", "function": {"name": "f", "parameters": parameters}}])["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == arguments, choice


# a cycle back to `#` that a call cannot follow (`a` is `[]`, no other key), so that the random model's call ends
ROOT_CYCLE = {"$ref": "#/$defs/A", "$defs": {"A": {"type": "object", "additionalProperties": False, "properties": {
    "a": {"type": "array", "items": {"$ref": "#"}, "maxItems": 0}}}}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "f"}}, "auto"])
def test_a_root_ref_that_a_cycle_runs_through_is_served(server: GunicornServer, tool_choice: Any) -> None:
    """A root `$ref` is not held to an object by a `type` beside it (its target's type is checked instead): llguidance
    refuses a sibling of a root `$ref` that a cycle runs through back to `#`, so the schema served before (a forced
    call, a strict tool under "auto") was a 400."""
    function = {"name": "f", "parameters": ROOT_CYCLE, "strict": True}
    choice = _chat(server, messages=USER, max_tokens=40, tool_choice=tool_choice,
                   tools=[{"type": "function", "function": function}])["choices"][0]
    if tool_choice != "auto":  # the random model calls nothing by itself
        assert choice["finish_reason"] == "tool_calls", choice
        assert isinstance(json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]), dict), choice


@pytest.mark.parametrize("parameters, refusal", [({"enum": [1, 2]}, "Unsatisfiable"), ({"const": "x"}, "Unsatisfiable"),
                                                 ({"$ref": "#"}, "circular references"),
                                                 ({"$ref": "#/$defs/A", "$defs": {"A": {"properties": {
                                                     "a": {"$ref": "#/$defs/arguments"}}}}}, "does not exist")])
def test_a_forced_call_s_parameters_that_hold_no_object_are_a_400(server: GunicornServer, parameters: dict[str, Any],
                                                                  refusal: str) -> None:
    """Untyped parameters held to an object (call_arguments) that allow none: llguidance's refusal, naming the tool. A
    `$ref` loop was found only where a call reached its arguments: cut before (`max_tokens` 6), a 200 with no call. A
    `$ref` to a `$defs` entry not sent stays llguidance's 400, not resolved to the entry call_arguments adds."""
    error = _error(_post(server, "/v1/chat/completions", {**GREEDY, "messages": USER, "tool_choice": "required",
                                                          "tools": [{"type": "function", "function": {
                                                              "name": "f", "parameters": parameters}}]}), "tools")
    assert refusal in error["message"] and "'f'" in error["message"], error


def _calling(*ids: str) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": i, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        for i in ids]}


def _answer(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "sunny"}


NOT_A_RESPONSE = ("Invalid parameter: messages with role 'tool' must be a response to a preceeding message with "
                  "'tool_calls'.")
UNANSWERED = ("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
              "'tool_call_id'. The following tool_call_ids did not have response messages: ")


@pytest.mark.parametrize("messages, param, message", [
    ([*USER, _answer("call_1")], "messages.[1].role", NOT_A_RESPONSE),
    ([*USER, {"role": "assistant", "content": "Let me see."}, _answer("call_1")], "messages.[2].role", NOT_A_RESPONSE),
    ([*USER, _calling("call_1"), _answer("call_2")], "messages.[2].tool_call_id",
     "Invalid parameter: 'tool_call_id' of 'call_2' not found in 'tool_calls' of previous message."),
    ([*USER, _calling("call_1"), _answer("call_1"), _calling("call_2"), _answer("call_1")],
     "messages.[4].tool_call_id",
     "Invalid parameter: 'tool_call_id' of 'call_1' not found in 'tool_calls' of previous message."),
    ([*USER, _calling("call_1", "call_2", "call_3"), _answer("call_2"), *USER], "messages.[1].role",
     UNANSWERED + "call_1, call_3"),
    ([*USER, _calling("call_1")], "messages.[1].role", UNANSWERED + "call_1"),
    ([*USER, _calling("call_1"), _answer("call_1"), _calling("call_2"), {"role": "assistant", "content": "Done."}],
     "messages.[3].role", UNANSWERED + "call_2"),
], ids=["no-call", "after-text", "other-id", "earlier-turn-s-id", "two-unanswered", "unanswered-last",
        "another-message-next"])
def test_tool_messages_answer_the_calls_before_them(server: GunicornServer, messages: list[dict[str, Any]],
                                                    param: str, message: str) -> None:
    """OpenAI's rule, its messages and params: were taken and templated (an answer to no call, a call never
    answered: a conversation an agent's history lost a message of)."""
    error = _error(_post(server, "/v1/chat/completions", {**GREEDY, "messages": messages, "tools": TOOLS}), param)
    assert (error["message"], error["code"]) == (message, None)


def test_tool_answers_in_any_order_before_the_next_message(server: GunicornServer) -> None:
    messages = [*USER, _calling("call_1", "call_2"), _answer("call_2"), _answer("call_1"), *USER,
                _calling("call_3"), _answer("call_3")]
    answer = server.openai_client().chat.completions.create(messages=messages, tools=TOOLS, **CLIENT_GREEDY)
    assert answer.choices[0].finish_reason in ("stop", "length")  # taken: the random model calls nothing
    with pytest.raises(openai.BadRequestError) as info:
        server.openai_client().chat.completions.create(messages=messages[:-1], tools=TOOLS, **CLIENT_GREEDY)
    assert (info.value.body["param"], info.value.body["message"]) == ("messages.[5].role", UNANSWERED + "call_3")


def test_tokenize_and_detokenize(server: GunicornServer) -> None:
    prompt = "Hello world, <tool_call> héllo"
    tokens = _post(server, "/tokenize", {"model": MODEL, "prompt": prompt, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) and tokens["max_model_len"] == 1024
    assert 151657 in tokens["tokens"]  # <tool_call> is one token
    assert _post(server, "/detokenize", {"model": MODEL, "tokens": tokens["tokens"]}).json() == {"prompt": prompt}
    no_gen = _post(server, "/tokenize", {"messages": USER, "add_generation_prompt": False}).json()
    gen = _post(server, "/tokenize", {"messages": USER}).json()
    assert gen["tokens"][:no_gen["count"]] == no_gen["tokens"] and gen["count"] > no_gen["count"]
    assert gen["token_strs"] is None
    chat = _chat(server, messages=USER, chat_template_kwargs=None)
    assert chat["usage"]["prompt_tokens"] == gen["count"]


def test_detokenize_takes_the_ids_a_prompt_takes(server: GunicornServer) -> None:
    """Ids the tokenizer lacks (from 151,669) but the model's embedding has (up to 151,935) are a prompt's: /detokenize
    decodes them to nothing, as vLLM's does (the tokenizer's decode); an id past the embedding is a 400 for both."""
    hello = _post(server, "/tokenize", {"prompt": "Hello"}).json()["tokens"]
    assert _post(server, "/detokenize", {"tokens": [*hello, 151669, 151935]}).json() == {"prompt": "Hello"}
    answer = _post(server, "/v1/completions", {"model": MODEL, "prompt": [*hello, 151935], "max_tokens": 1})
    assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == len(hello) + 1
    _error(_post(server, "/detokenize", {"tokens": [*hello, 151936]}), f"tokens.[{len(hello)}]")
    _error(_post(server, "/v1/completions", {"model": MODEL, "prompt": [*hello, 151936], "max_tokens": 1}), "prompt")


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": USER}, "prompt"),
    ("/tokenize", {"prompt": "x", "extra": 1}, "extra"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
    ("/tokenize", {"messages": USER, "add_generation_prompt": "yes"}, "add_generation_prompt"),
    ("/tokenize", {"messages": USER, "add_special_tokens": True}, "add_special_tokens"),  # vLLM's template fields
    ("/tokenize", {"messages": USER, "documents": []}, "documents"),
    ("/detokenize", {"tokens": [1, -1]}, "tokens.[1]"),
    ("/detokenize", {"tokens": [0, 10**9]}, "tokens.[1]"),
    ("/detokenize", {"tokens": ["1"]}, "tokens.[0]"),
    ("/detokenize", {}, "tokens"),
])
def test_tokenize_validation(server: GunicornServer, path: str, body: dict[str, Any], param: str) -> None:
    _error(_post(server, path, body), param)


def test_a_large_tokenize_body_is_served_as_a_small_one(server: GunicornServer) -> None:
    """5,000 messages (10,000 values: validated in the long prompts' thread) template as one message repeated, and
    20,000 ids decode as one repeated; their errors name the same fields as a small body's."""
    one, two = (_post(server, "/tokenize", {"messages": USER * n}).json()["tokens"] for n in (1, 2))
    turn = two[:len(two) - len(one)]
    many = _post(server, "/tokenize", {"messages": USER * 5000}).json()
    assert many["tokens"] == turn * 5000 + one[len(turn):] and many["count"] == len(many["tokens"])
    piece = _post(server, "/detokenize", {"tokens": one[:3]}).json()["prompt"]
    assert _post(server, "/detokenize", {"tokens": one[:3] * 7000}).json() == {"prompt": piece * 7000}
    _error(_post(server, "/tokenize", {"messages": USER * 5000, "add_generation_prompt": False,
                                       "continue_final_message": True}), "continue_final_message")
    _error(_post(server, "/tokenize", {"messages": [*USER * 4999, {"role": "wizard", "content": "x"}]}),
           "messages.[4999].role")
    _error(_post(server, "/detokenize", {"tokens": [*one[:3] * 7000, -1]}), "tokens.[21000]")


def test_tokenize_unknown_model(server: GunicornServer) -> None:
    response = _post(server, "/tokenize", {"model": "gpt-4", "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
