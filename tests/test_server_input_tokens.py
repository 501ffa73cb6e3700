"""`POST /v1/responses/input_tokens` through `gunicorn -k gevent server:app` and the `openai` client: the count is
`usage.input_tokens` of a create with the same fields, whatever makes the prompt; what a count cannot take is a 400
naming it."""
from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types.responses import input_token_count_params

from chat_http import CHAT_SERVER_MAX_MODEL_LEN, MODEL
from nanoqwen.api.responses_schemas import ResponseCountRequest
from server_process import GunicornServer

TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_time", "description": "The time", "parameters": TIME, "strict": True}]
THOUGHT = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Ask the clock."}]}
TOOL_LOOP = [{"role": "user", "content": "What time is it?"}, THOUGHT,
             {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"zone": "UTC"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}]
NO_THINKING = {"reasoning": {"effort": "none"}}
# past the 1024-token context whole; without the long item it fits, with room for create's 16 tokens
LONG = [{"role": "system", "content": "S"}, {"role": "user", "content": "word " * 1100},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Hi"}]
# past responses_api.LONG_CHARS_PER_TOKEN characters per token of the context: searched at once, never tokenised
# whole; the first tokenises to ~4,000 tokens an item, the second's spaces to 157 (the search keeps it whole)
FAR_TOO_LONG = [*[{"role": "user", "content": "word " * 4000}] * 3, {"role": "user", "content": "Hi"}]
LOOKS_TOO_LONG = [{"role": "user", "content": " " * 20000}, {"role": "user", "content": "Hi"}]
Json = dict[str, Any]


@pytest.fixture(scope="module")
def client(chat_server: GunicornServer) -> openai.OpenAI:
    return chat_server.openai_client(timeout=300)


def _count(client: openai.OpenAI, **fields: Any) -> int:
    counted = client.responses.input_tokens.count(model=MODEL, **fields)
    assert counted.object == "response.input_tokens"
    return counted.input_tokens


def _created(client: openai.OpenAI, **fields: Any) -> Any:
    return client.responses.create(model=MODEL, temperature=0, max_output_tokens=16, **fields)


def _error(client: openai.OpenAI, status: int, **fields: Any) -> Json:
    with pytest.raises(openai.APIStatusError) as exc:
        client.responses.input_tokens.count(**fields)
    assert exc.value.status_code == status
    return exc.value.body


def test_the_body_is_the_openai_packages() -> None:
    """A field a newer client sends must be decided (implemented, or refused by name) before it is taken. Beside
    them, vLLM's chat_template_kwargs: it changes the prompt, so the count takes it as create does."""
    assert set(ResponseCountRequest.model_fields) == {*input_token_count_params.InputTokenCountParams.__annotations__,
                                                      "chat_template_kwargs"}


@pytest.mark.parametrize("fields", [
    {"input": "Hello there", "instructions": "Answer briefly.", **NO_THINKING},
    {"input": "Hello there"},  # thinking: the template leaves the think block open
    {"input": "Hello there", "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},  # vLLM's field
    {"input": TOOL_LOOP, "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": False, **NO_THINKING},
    {"input": [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "A time, as JSON."}],
     "text": {"format": {"type": "json_schema", "name": "t", "schema": TIME, "strict": True}}, **NO_THINKING},
    {"input": LONG, "truncation": "auto", **NO_THINKING},
    {"input": FAR_TOO_LONG, "truncation": "auto", **NO_THINKING},
    {"input": LOOKS_TOO_LONG, "truncation": "auto", **NO_THINKING},
], ids=["instructions", "thinking", "template kwargs", "tool loop", "json schema", "truncated", "far too long",
        "looks too long"])
def test_the_count_is_creates_usage(client: openai.OpenAI, fields: Json) -> None:
    assert _count(client, **fields) == _created(client, **fields).usage.input_tokens


@pytest.mark.parametrize("items, kept", [(LONG, [LONG[0], *LONG[2:]]), (FAR_TOO_LONG, FAR_TOO_LONG[-1:]),
                                         (LOOKS_TOO_LONG, LOOKS_TOO_LONG)])
def test_truncation_keeps_the_most_items_that_fit(client: openai.OpenAI, items: list[Json], kept: list[Json]) -> None:
    assert _count(client, input=items, truncation="auto") == _count(client, input=kept)


def test_nothing_fitting_is_the_whole_prompts_error(client: openai.OpenAI) -> None:
    """Searched at once or after the whole was tried, the error counts the whole prompt, as without truncation."""
    for items in (LONG[:2], FAR_TOO_LONG[:2]):
        assert _error(client, 400, input=items, truncation="auto") == _error(client, 400, input=items)


def test_thinking_and_tools_change_the_count(client: openai.OpenAI) -> None:
    """The count is the prompt's, not the input's alone: thinking off closes an empty think block, tools are
    listed in the system turn, a reasoning item reaches the template."""
    plain = _count(client, input="Hello there")
    assert _count(client, input="Hello there", **NO_THINKING) > plain
    assert _count(client, input="Hello there", tools=TOOLS) > plain
    assert _count(client, input=TOOL_LOOP, tools=TOOLS) > _count(client, input=TOOL_LOOP[:1] + TOOL_LOOP[2:],
                                                                  tools=TOOLS)


def test_previous_responses_and_item_references_count_as_in_create(client: openai.OpenAI) -> None:
    first = _created(client, input="Hi", **NO_THINKING)
    second = _created(client, input="Tell me more.", previous_response_id=first.id, **NO_THINKING)
    follow = {"input": [{"role": "user", "content": "And then?"}], "previous_response_id": second.id, **NO_THINKING}
    assert _count(client, **follow) == _created(client, **follow).usage.input_tokens
    (said,) = client.responses.input_items.list(first.id).data
    referred = {"input": [{"type": "item_reference", "id": said.id}, {"id": first.output[0].id},
                          {"role": "user", "content": "Tell me more."}], **NO_THINKING}
    assert _count(client, **referred) == _created(client, **referred).usage.input_tokens == second.usage.input_tokens
    # a continuation past the context: the count truncates as create does, or blames what create blames
    long_first = _created(client, input="word " * 600, instructions="Be brief.", **NO_THINKING)
    past = {"input": "word " * 500, "instructions": "Be brief.", "previous_response_id": long_first.id,
            **NO_THINKING}
    cut = _created(client, truncation="auto", **past)
    assert _count(client, truncation="auto", **past) == cut.usage.input_tokens
    error = _error(client, 400, **past)
    assert (error["code"], error["param"]) == ("context_length_exceeded", "previous_response_id")


# 5,000 items (10,000 values): a body worked on in the long prompts' thread (serving.lane), too long whole
MANY = [{"role": "user", "content": "hi"}] * 5000


def test_a_large_truncated_input_is_served_as_the_items_it_keeps(client: openai.OpenAI) -> None:
    """Its items made a chat request of and searched in the long prompts' thread, and stored from there: its answer
    is the answer to the items kept alone (the most that fit: every item tokenises alike), its input is listed, its
    continuation is cut to fit too, and its errors are a small input's (two: any error raised in the thread comes
    back as it is; the streamed path's routing is test_api_large_body's, in process)."""
    last = {"role": "user", "content": "Hi"}
    base, one = (_count(client, input=[*MANY[:n], last], **NO_THINKING) for n in (0, 1))
    cut = _created(client, input=[*MANY, last], truncation="auto", **NO_THINKING)
    counted = cut.usage.input_tokens
    kept, rest = divmod(counted - base, one - base)
    assert rest == 0 and 0 < kept < len(MANY)
    alone = _created(client, input=[*MANY[:kept], last], **NO_THINKING)
    assert alone.usage.input_tokens == cut.usage.input_tokens and alone.output_text == cut.output_text
    with pytest.raises(openai.BadRequestError):  # one more item would not fit
        _created(client, input=[*MANY[:kept + 1], last], **NO_THINKING)
    listed = client.responses.input_items.list(cut.id, order="asc", limit=2)
    assert [item.content[0].text for item in listed.data] == ["hi", "hi"] and listed.has_more
    follow = {"input": "And then?", "previous_response_id": cut.id, "truncation": "auto", **NO_THINKING}
    assert _created(client, **follow).usage.input_tokens <= CHAT_SERVER_MAX_MODEL_LEN - 16  # its history cut too
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    for status, bad in ((404, [{"type": "item_reference", "id": "msg_none"}]), (400, [call])):
        assert _error(client, status, input=[*MANY, *bad]) == _error(client, status, input=bad)


NOT_A_SCHEMA = {"type": "nothing"}


@pytest.mark.parametrize("fields", [
    {"text": {"format": {"type": "json_schema", "name": "p", "schema": NOT_A_SCHEMA}}},
    {"text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "string", "pattern": "(("}}}},
    # the schema's error whatever the prompt, as create: not the prompt's context_length_exceeded
    {"input": LONG[:2], "text": {"format": {"type": "json_schema", "name": "p", "schema": NOT_A_SCHEMA}}},
    {"tools": [{**TOOLS[0], "parameters": {"type": "object", "properties": {"a": NOT_A_SCHEMA}}}],
     "tool_choice": "required"},
], ids=["bad type", "bad pattern", "too long too", "forced tool"])
def test_a_grammar_create_refuses_the_count_refuses(client: openai.OpenAI, fields: Json) -> None:
    """The count did not compile the output grammar: a schema create refused with a 400 still got a count."""
    fields = {"input": "Hi", **fields}
    with pytest.raises(openai.BadRequestError) as created:
        _created(client, **fields)
    assert _error(client, 400, model=MODEL, **fields) == created.value.body
    assert created.value.body["param"] in ("text.format", "tools"), created.value.body


@pytest.mark.parametrize("fields, status, param, code", [
    ({"extra_body": {"stream": True}}, 400, "stream", None),
    ({"extra_body": {"max_output_tokens": 16}}, 400, "max_output_tokens", None),
    ({"extra_body": {"store": False}}, 400, "store", None),
    ({"extra_body": {"temperature": 0}}, 400, "temperature", None),
    ({"extra_body": {"include": ["message.output_text.logprobs"]}}, 400, "include", None),
    ({"conversation": "conv_1"}, 400, "conversation", "unsupported_parameter"),
    ({"personality": "friendly"}, 400, "personality", "unsupported_parameter"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools.[0]", "unsupported_parameter"),
    ({"tool_choice": "required"}, 400, "tool_choice", None),  # without tools, as create
    ({"previous_response_id": "resp_unknown"}, 400, "previous_response_id", "previous_response_not_found"),
    ({"input": [{"type": "item_reference", "id": "msg_unknown"}]}, 404, "input", None),
    ({"input": LONG}, 400, "input", "context_length_exceeded"),  # truncation "disabled", the default
    ({"input": LONG[:2], "truncation": "auto"}, 400, "input", "context_length_exceeded"),  # the last item alone
    ({"input": FAR_TOO_LONG[:2], "truncation": "auto"}, 400, "input", "context_length_exceeded"),
    ({"input": None}, 400, "input", None),  # nothing to count
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
])
def test_bad_bodies_name_the_field(client: openai.OpenAI, fields: Json, status: int, param: str,
                                   code: str | None) -> None:
    error = _error(client, status, **{"model": MODEL, "input": "Hi", **fields})
    assert (error["param"], error["code"]) == (param, code), error
