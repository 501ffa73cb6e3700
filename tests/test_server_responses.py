"""`POST /v1/responses` and the stored responses' routes through `gunicorn -k gevent server:app` and the `openai`
client (its `responses.stream` helper checks the event order and accumulates the events)."""
from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import jsonschema
import openai
import pytest
import requests

from chat_http import HELD_S, MODEL, health_polled, most_held, post_chat, server_stats, sse_events
from engine_util import GRAMMAR_FAILED
from nanoqwen.api.strict_json import MAX_SEPARATORS
from responses_util import polled
from server_process import GunicornServer
from waits import wait_for

GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 16, "reasoning": {"effort": "none"}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
PERSON_FORMAT = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_time", "description": "The time", "parameters": TIME, "strict": True}]
FORCED = {**GREEDY, "max_output_tokens": 60, "tools": TOOLS, "tool_choice": {"type": "function", "name": "get_time"}}
DUPLICATE_OUTPUT = ("Duplicate function_call_output for call_id 'call_1'. Each function_call must have exactly one "
                    "matching function_call_output")
VOLATILE = ("id", "created_at", "completed_at")  # differ between two identical requests
Json = dict[str, Any]


@pytest.fixture(scope="module")
def client(server: GunicornServer) -> openai.OpenAI:
    return server.openai_client(timeout=300)


def _comparable(response: Any) -> Json:
    """A response as JSON without what differs between two identical requests (its items' ids, and the cached
    tokens: the second finds the first's prompt in the prefix cache), nor what the stream helper adds (`parsed`,
    `parsed_arguments`)."""
    out = {k: v for k, v in response.model_dump().items() if k not in VOLATILE}
    out["output"] = [{k: v for k, v in item.items() if k not in ("id", "call_id", "parsed_arguments")}
                     for item in out["output"]]
    for item in out["output"]:
        for part in item.get("content") or []:
            part.pop("parsed", None)
    out["usage"]["input_tokens_details"].pop("cached_tokens")
    return out


def test_greedy_text_and_usage_equal_chat(client: openai.OpenAI, server: GunicornServer) -> None:
    response = client.responses.create(input=[{"role": "user", "content": "Hello there"}],
                                       instructions="Answer briefly.", **GREEDY)
    chat = post_chat(server, {"model": MODEL, "temperature": 0, "max_tokens": 16, "reasoning_effort": "none",
                              "messages": [{"role": "system", "content": "Answer briefly."},
                                           {"role": "user", "content": "Hello there"}]}).json()
    assert response.output_text == chat["choices"][0]["message"]["content"] != ""
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
    (message,) = response.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat["usage"]["prompt_tokens"],
                                                         chat["usage"]["completion_tokens"])
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0 and usage.input_tokens_details.cached_tokens >= 0
    # the random model runs to the limit: incomplete, as OpenAI reports it
    assert chat["choices"][0]["finish_reason"] == "length"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert message.status == "incomplete"
    assert (response.instructions, response.temperature, response.max_output_tokens) == ("Answer briefly.", 0, 16)
    assert response.reasoning.effort == "none" and response.store is True and response.tool_choice == "auto"


def test_logprobs_need_include(client: openai.OpenAI) -> None:
    """top_logprobs without the include is a 400 naming it (OpenAI's answers `logprobs: []`, asked for and not
    given); 0 asks for nothing include would add."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(input="Hi", top_logprobs=2, **GREEDY)
    assert refused.value.body["param"] == "top_logprobs" and "message.output_text.logprobs" in refused.value.message
    plain = client.responses.create(input="Hi", top_logprobs=0, **GREEDY)
    assert plain.output[0].content[0].logprobs is None
    scored = client.responses.create(input="Hi", top_logprobs=2, include=["message.output_text.logprobs"], **GREEDY)
    logprobs = scored.output[0].content[0].logprobs
    assert "".join(lp.token for lp in logprobs) == scored.output_text == plain.output_text
    assert len(logprobs) == scored.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in logprobs)


def test_get_s_include_adds_the_parts_create_did_not_ask_for(client: openai.OpenAI, server: GunicornServer) -> None:
    """GET's `include` (the openai client's `include[]=...`), on the response and its input items: a reasoning
    item's encrypted_content made from its text; an output_text part's logprobs, `[]` where create did not ask for
    them (not computed then). Without it, the response as create answered it."""
    thought = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Ask the clock."}]}
    items = [{"role": "user", "content": "Hi"}, thought, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "What time is it?"}]
    both = ["reasoning.encrypted_content", "message.output_text.logprobs"]
    plain = client.responses.create(input=items, **GREEDY)
    assert client.responses.retrieve(plain.id).model_dump() == plain.model_dump()
    full = client.responses.retrieve(plain.id, include=both)
    (message,) = full.output  # the test model's reasoning items: test_api_responses' test_get_s_include_...
    assert message.model_dump(exclude={"content"}) == plain.output[0].model_dump(exclude={"content"})
    assert [part.logprobs for part in message.content] == [[]]
    listed = client.responses.input_items.list(plain.id, include=both, order="asc").data
    assert listed[1].encrypted_content == base64.b64encode(b"Ask the clock.").decode()
    assert listed[2].content[0].logprobs == [] and listed[0].content[0].type == "input_text"
    scored = client.responses.create(input="Hi", include=["message.output_text.logprobs"], **GREEDY)
    assert scored.output[0].content[0].logprobs
    assert client.responses.retrieve(scored.id, include=both[1:]).model_dump() == scored.model_dump()
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.retrieve(plain.id, include=["file_search_call.results"])
    assert exc.value.body["param"] == "include"


def test_json_schema_output_streamed_and_not(client: openai.OpenAI) -> None:
    body = {**GREEDY, "max_output_tokens": 80, "input": "A person as JSON.", "text": PERSON_FORMAT}
    response = client.responses.create(**body)
    assert response.status == "completed" and response.completed_at is not None
    jsonschema.validate(json.loads(response.output_text), PERSON)
    assert response.text.format.type == "json_schema" and response.text.format.name == "person"
    with client.responses.stream(**body) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == response.output_text and _comparable(events[-1].response) == _comparable(response)
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == response.output_text


MISSING_REF = {"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}  # no grammar can hold it
CONTAINS = {"type": "object", "properties": {"a": {"type": "array", "contains": {"type": "integer"}}}}  # not enforced


@pytest.mark.parametrize("parameters, strict, refused", [
    (MISSING_REF, None, False), (MISSING_REF, True, True), (MISSING_REF, False, False), (CONTAINS, None, False),
    (CONTAINS, True, True), (None, None, False)])  # None: no arguments (a 500 before)
def test_a_function_tool_without_strict_is_constrained_leniently(client: openai.OpenAI, parameters: Json,
                                                                 strict: bool | None, refused: bool) -> None:
    """`strict` omitted is OpenAI's Responses default, strict (echoed as true): its calls are constrained with
    tool_choice auto too, leniently (a keyword the engine cannot enforce is ignored; a schema no grammar can hold
    leaves the calls free, where a sent `strict: true` refuses both). `strict: false`: the calls free."""
    tool = {"type": "function", "name": "f", "parameters": parameters, **({} if strict is None else {"strict": strict})}
    body = {**GREEDY, "input": "Hi", "tools": [tool], "tool_choice": "auto"}
    if refused:
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(**body)
        assert info.value.body["param"] == "tools"
    else:
        assert client.responses.create(**body).tools[0].strict is (strict is not False)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_time"}])
def test_a_forced_call_with_a_text_format_answers_with_the_call(client: openai.OpenAI, tool_choice: Any) -> None:
    """The Agents SDK's OpenAIResponsesModel with `output_type` and tool_choice "required" sends both, as chat's
    model does (where the pair is accepted, OpenAI's rule): the answer is the call (it was a 400 here alone)."""
    response = client.responses.create(input="What time is it?", **{**FORCED, "tool_choice": tool_choice},
                                       text=PERSON_FORMAT, parallel_tool_calls=False)
    (call,) = response.output
    assert call.type == "function_call" and call.status == "completed" and response.status == "completed"
    jsonschema.validate(json.loads(call.arguments), TIME)
    assert response.text.format.type == "json_schema"
    with client.responses.stream(input="What time is it?", **{**FORCED, "tool_choice": tool_choice},
                                 text=PERSON_FORMAT, parallel_tool_calls=False) as stream:
        final = stream.get_final_response()
    assert _comparable(final) == _comparable(response)


def test_chat_template_kwargs_as_vllm_s(client: openai.OpenAI) -> None:
    """vLLM's Responses takes chat's `chat_template_kwargs` (an Agents SDK or LangChain user on Qwen3 sends
    `enable_thinking: false` so through extra_body); it was a 400 saying the field itself was no template variable."""
    plain = {k: v for k, v in GREEDY.items() if k != "reasoning"}

    def prompt_tokens(**body: Any) -> int:
        return client.responses.create(input="Hi", **plain, **body).usage.input_tokens

    off = prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off == prompt_tokens(reasoning={"effort": "none"}) != prompt_tokens()
    for kwargs, param in (({"thinking": False}, "chat_template_kwargs.thinking"),
                          ({"enable_thinking": True}, "reasoning.effort")):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(input="Hi", **GREEDY, extra_body={"chat_template_kwargs": kwargs})
        assert info.value.body["param"] == param
    assert "reasoning_effort" not in info.value.body["message"]  # the field this request has, not chat's


def test_forced_function_call_streamed_and_not(client: openai.OpenAI) -> None:
    response = client.responses.create(input="What time is it?", **FORCED)
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_time" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), TIME)
    assert response.status == "completed" and response.output_text == ""
    with client.responses.stream(input="What time is it?", **FORCED) as stream:
        events = list(stream)
    assert _comparable(events[-1].response) == _comparable(response)
    assert [e.type for e in events if e.type.startswith("response.output_item")] == [
        "response.output_item.added", "response.output_item.done"]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(deltas) > 1 and "".join(deltas) == done.arguments == call.arguments and done.name == "get_time"
    assert [e.type for e in events][2] == "response.output_item.added" and events[2].item.status == "in_progress"
    # the call and its output sent back, the call as the SDK's object dumps (its optional fields null)
    items = [{"role": "user", "content": "What time is it?"}, call.model_dump(by_alias=True),
             {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}]
    loop = client.responses.create(input=items, tools=TOOLS, **GREEDY)
    assert loop.output[0].type == "message" and loop.usage.input_tokens > response.usage.input_tokens


def _calls_per_answer(client: openai.OpenAI, tries: int, **fields: Any) -> list[int]:
    """Function calls in each of `tries` forced answers sampled at temperature 2 (about one in three of the random
    model's has several: the grammar lets a call follow a call), up to the first with several."""
    counts: list[int] = []
    for _ in range(tries):
        response = client.responses.create(input="What time is it?", **{**FORCED, "temperature": 2.0,
                                           "max_output_tokens": 200, "tool_choice": "required"}, **fields)
        assert response.max_tool_calls == fields.get("max_tool_calls"), response
        counts.append(sum(item.type == "function_call" for item in response.output))
        if counts[-1] > 1:
            break
    return counts


def test_max_tool_calls_caps_built_in_tools_only(client: openai.OpenAI) -> None:
    """OpenAI's max_tool_calls counts calls to built-in tools (none here): echoed, it drops no function call; beside
    parallel_tool_calls false (whose grammar allows one call) it does not lower that one."""
    assert _calls_per_answer(client, 40, max_tool_calls=1)[-1] > 1
    assert _calls_per_answer(client, 8, max_tool_calls=5, parallel_tool_calls=False) == [1] * 8


def test_tool_choice_auto_without_tools_is_the_default_sent(client: openai.OpenAI) -> None:
    """Responses' default tool_choice (or "none"), sent by a client with no tools (or `[]`), is the answer without it,
    counted alike; chat's refusal of "auto" without tools is not the Responses API's (it was a 400 naming
    tool_choice)."""
    plain = client.responses.create(input="Hi", **GREEDY)
    for tools, choice in itertools.product(({}, {"tools": []}), ("auto", "none")):
        sent = client.responses.create(input="Hi", tool_choice=choice, **tools, **GREEDY)
        assert (sent.output_text, sent.tool_choice, sent.tools) == (plain.output_text, choice, [])
        counted = client.responses.input_tokens.count(model=MODEL, input="Hi", reasoning=GREEDY["reasoning"],
                                                      tool_choice=choice, **tools)
        assert counted.input_tokens == plain.usage.input_tokens


def test_tool_loop_and_reasoning_items_equal_the_chat_history(client: openai.OpenAI, server: GunicornServer) -> None:
    arguments = '{"zone": "UTC"}'
    thought = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Ask the clock."}]}
    items = [{"role": "user", "content": "What time is it?"}, thought,
             {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": arguments},
             {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}]
    response = client.responses.create(input=items, tools=TOOLS, **GREEDY)
    messages = [{"role": "user", "content": "What time is it?"},
                {"role": "assistant", "content": None, "reasoning_content": "Ask the clock.", "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": arguments}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    chat_tools = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
    chat = post_chat(server, {"model": MODEL, "temperature": 0, "max_tokens": 16, "reasoning_effort": "none",
                              "messages": messages, "tools": chat_tools}).json()
    assert response.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert response.output_text == chat["choices"][0]["message"]["content"]
    # the reasoning reached the template (this turn follows the last user message, so Qwen3's keeps it)
    unthought = client.responses.create(input=[item for item in items if item is not thought], tools=TOOLS, **GREEDY)
    assert unthought.usage.input_tokens < response.usage.input_tokens


def test_previous_response_id_continues_and_the_store_routes(client: openai.OpenAI, server: GunicornServer) -> None:
    first = client.responses.create(input="Hi", metadata={"session": "a"}, **GREEDY)
    assert first.metadata == {"session": "a"}
    follow = client.responses.create(input="Tell me more.", previous_response_id=first.id, **GREEDY)
    # the output items as the SDK's objects dump (their unset optional fields null)
    history = [{"role": "user", "content": "Hi"}, *[item.model_dump(by_alias=True) for item in first.output],
               {"role": "user", "content": "Tell me more."}]
    whole = client.responses.create(input=history, **GREEDY)
    assert follow.previous_response_id == first.id
    assert (follow.output_text, follow.usage.input_tokens) == (whole.output_text, whole.usage.input_tokens)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    replay = requests.get(f"{server.url}/v1/responses/{first.id}?stream=true", timeout=30)
    assert replay.status_code == 400 and replay.json()["error"]["param"] == "stream"
    for route, name, param in (("", "include[]", "include"), ("/input_items", "include", "include"),
                               ("/input_items", "starting_after", "starting_after")):
        unread = requests.get(f"{server.url}/v1/responses/{first.id}{route}", params={name: "x"}, timeout=30)
        assert unread.status_code == 400 and unread.json()["error"]["param"] == param
    for limit in ("²", "0", "101", "-1"):  # "²".isdigit(), but int("²") fails
        refused = requests.get(f"{server.url}/v1/responses/{first.id}/input_items", params={"limit": limit}, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "limit"
    (item,) = client.responses.input_items.list(first.id).data
    assert item.type == "message" and item.role == "user" and item.content[0].text == "Hi"
    assert item.id.startswith("msg_")
    for method, route in (("delete", ""), ("post", "/cancel")):  # nothing to read: a query is refused, not ignored
        unread = requests.request(method, f"{server.url}/v1/responses/{first.id}{route}?foo=1", timeout=30)
        assert unread.status_code == 400 and unread.json()["error"]["param"] == "foo"
    deleted = requests.delete(f"{server.url}/v1/responses/{first.id}", timeout=30).json()
    assert deleted == {"id": first.id, "object": "response", "deleted": True}
    for call in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id),
                 lambda: client.responses.input_items.list(first.id)):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert exc.value.body["message"] == f"Response with id '{first.id}' not found."
    unstored = client.responses.create(input="Hi", store=False, **GREEDY)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(input="Hi", previous_response_id=first.id, **GREEDY)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "previous_response_id"
    assert exc.value.body["code"] == "previous_response_not_found"


def test_instructions_do_not_carry_over_and_an_unstored_continuation_ends_the_chain(client: openai.OpenAI) -> None:
    """OpenAI's rules: a previous response's `instructions` are not carried over (a continuation has its own, or
    none), and a continuation made with `store: false` answers but cannot be continued."""
    first = client.responses.create(input="Hi", instructions="Answer in French.", **GREEDY)
    history = [{"role": "user", "content": "Hi"}, *[item.model_dump(by_alias=True) for item in first.output],
               {"role": "user", "content": "More."}]
    for instructions in (None, "Be brief."):
        asked = {} if instructions is None else {"instructions": instructions}
        follow = client.responses.create(input="More.", previous_response_id=first.id, store=False, **asked, **GREEDY)
        whole = client.responses.create(input=history, store=False, **asked, **GREEDY)
        assert follow.instructions == instructions and follow.store is False
        assert (follow.output_text, follow.usage.input_tokens) == (whole.output_text, whole.usage.input_tokens)
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(input="Again.", previous_response_id=follow.id, **GREEDY)
        assert exc.value.body["code"] == "previous_response_not_found"


def _streamed(client: openai.OpenAI, **body: Any) -> Any:
    """The final response of a stream, after checking that its opening events agree with it on `store`."""
    events = list(client.responses.create(stream=True, **body))
    assert [e.response.store for e in events[:2]] == [events[-1].response.store] * 2
    return events[-1].response


def test_item_references_resolve_to_stored_items(client: openai.OpenAI) -> None:
    first = client.responses.create(input="Hi", **GREEDY)
    (said,) = client.responses.input_items.list(first.id).data
    refs = [{"type": "item_reference", "id": said.id}, {"id": first.output[0].id}]  # the type may be omitted
    follow = client.responses.create(input="Tell me more.", previous_response_id=first.id, **GREEDY)
    for create in (client.responses.create, lambda **body: _streamed(client, **body)):
        resolved = create(input=[*refs, {"role": "user", "content": "Tell me more."}], **GREEDY)
        assert (resolved.output_text, resolved.usage.input_tokens) == (follow.output_text, follow.usage.input_tokens)
        listed = client.responses.input_items.list(resolved.id, order="asc").data
        assert [item.id for item in listed[:2]] == [said.id, first.output[0].id]
    with pytest.raises(openai.NotFoundError) as exc:  # OpenAI's
        client.responses.create(input=[{"role": "user", "content": "a"}, {"type": "item_reference", "id": "msg_x"}],
                                **GREEDY)
    assert exc.value.body["param"] == "input" and "Item with id 'msg_x' not found." in exc.value.body["message"]


def test_truncation_auto_drops_the_first_items_but_not_system_ones(client: openai.OpenAI) -> None:
    first = client.responses.create(input="word " * 600, instructions="Be brief.", **GREEDY)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(input="word " * 500, previous_response_id=first.id, truncation="disabled", **GREEDY)
    assert exc.value.body["code"] == "context_length_exceeded"
    # its first input item goes; its answer fits
    kept = client.responses.create(input=[{"id": first.output[0].id}, {"role": "user", "content": "word " * 500}],
                                   instructions="Be brief.", **GREEDY)
    for create in (client.responses.create, lambda **body: _streamed(client, **body)):
        cut = create(input="word " * 500, instructions="Be brief.", previous_response_id=first.id,
                     truncation="auto", **GREEDY)
        assert (cut.output_text, cut.usage.input_tokens) == (kept.output_text, kept.usage.input_tokens)
        assert cut.truncation == "auto" and cut.store is True
    items = [{"role": "system", "content": "S"}, {"role": "user", "content": "word " * 1100},
             {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Hi"}]
    kept = client.responses.create(input=[items[0], *items[2:]], **GREEDY)
    cut = client.responses.create(input=items, truncation="auto", **GREEDY)
    assert (cut.output_text, cut.usage.input_tokens) == (kept.output_text, kept.usage.input_tokens)
    with pytest.raises(openai.BadRequestError) as exc:  # the last item alone is too long: never dropped
        client.responses.create(input=items[:2], truncation="auto", **GREEDY)
    assert exc.value.body["code"] == "context_length_exceeded"


def test_the_stream_ends_without_done(server: GunicornServer) -> None:
    body = {**GREEDY, "input": "Hi", "stream": True}
    with requests.post(f"{server.url}/v1/responses", json=body, stream=True, timeout=60) as answer:
        named = list(sse_events(answer))
    assert named[0][0] == "response.created" and named[-1][0] == "response.incomplete"
    assert all(data != "[DONE]" for _, data in named)


def test_one_tool_sent_twice_is_one_tool_two_of_one_name_a_400(client: openai.OpenAI) -> None:
    """The same tool twice is one (a forced call to it served, as chat's); two different tools of one name are a 400
    naming tools: a call or a named tool_choice would not say which one it means."""
    response = client.responses.create(input="What time is it?", **{**FORCED, "tools": [*TOOLS, *TOOLS]})
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_time" and response.status == "completed"
    jsonschema.validate(json.loads(call.arguments), TIME)
    with pytest.raises(openai.BadRequestError, match="'get_time' names two different functions") as exc:
        client.responses.create(**{**GREEDY, "input": "Hi", "tools": [*TOOLS, {**TOOLS[0], "description": "Other"}]})
    assert exc.value.body["param"] == "tools" and exc.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("field, param", [
    # refused top-level fields: test_conformance's test_every_request_field_is_implemented_or_refused_by_name
    ({"tools": [{"type": "web_search"}]}, "tools.[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input.[0].content.[0]"),
    ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]}, "input.[0]"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"reasoning": {"summary": "detailed"}}, "reasoning.summary"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"),
])
def test_refused_fields_name_themselves(client: openai.OpenAI, field: Json, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(**{**GREEDY, "input": "Hi", **field})
    assert exc.value.body["param"] == param and exc.value.body["code"] == "unsupported_parameter"


@pytest.mark.parametrize("field, param", [
    ({"max_output_tokens": 8}, "max_output_tokens"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"service_tier": "cheapest"}, "service_tier"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"frequency_penalty": 1.0}, "frequency_penalty"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.[0].call_id"),
    ({"input": "word " * 1100}, "input"),  # past the 1024-token context
    ({"text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "nothing"}}}}, "text.format"),
])
def test_bad_values_are_400s(server: GunicornServer, field: Json, param: str) -> None:
    answer = requests.post(f"{server.url}/v1/responses", json={**GREEDY, "input": "Hi", **field}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


CALL = {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"zone": "UTC"}'}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}


@pytest.mark.parametrize("items, message", [
    ([OUTPUT], "No tool call found for function call output with call_id call_1."),
    ([OUTPUT, CALL], "No tool call found for function call output with call_id call_1."),
    ([CALL, {**OUTPUT, "call_id": "call_2"}], "No tool call found for function call output with call_id call_2."),
    ([CALL], "No tool output found for function call call_1."),
    ([CALL, {**CALL, "call_id": "call_2"}, OUTPUT], "No tool output found for function call call_2."),
    ([{**CALL, "id": "fc_1"}, OUTPUT, {"role": "user", "content": "Again.", "id": "fc_1"}],
     "Duplicate item found with id fc_1. Remove duplicate items from your input and try again."),
], ids=["no-call", "before-its-call", "other-id", "unanswered", "one-of-two-unanswered", "duplicate-id"])
@pytest.mark.parametrize("route", ["/v1/responses", "/v1/responses/input_tokens"])
def test_items_pair_as_openai_s(server: GunicornServer, items: list[Json], message: str,
                                              route: str) -> None:
    """Were taken (a tool message answering nothing in the template; a call never answered; an item twice) where
    OpenAI refuses them, its messages and param."""
    body = {"model": MODEL, "input": [{"role": "user", "content": "What time is it?"}, *items], "tools": TOOLS}
    answer = requests.post(f"{server.url}{route}", json=body, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"] == {
        "message": message, "type": "invalid_request_error", "param": "input", "code": None}, answer.text


@pytest.mark.parametrize("items, message, at", [
    ([{**CALL, "call_id": ""}, OUTPUT], None, 1),
    ([CALL, OUTPUT, {**CALL, "name": "get_date"}, OUTPUT], DUPLICATE_OUTPUT, 4),
    ([CALL, OUTPUT, OUTPUT], DUPLICATE_OUTPUT, 3),
    ([CALL, OUTPUT, {**CALL, "name": "get_date"}],
     "Duplicate function_call for call_id 'call_1'. Each function_call must have a call_id of its own.", 3),
], ids=["empty-call-id", "two-calls-one-id-answered", "two-outputs-one-call", "two-calls-one-id"])
def test_a_call_id_is_one_call_s_answered_once(client: openai.OpenAI, items: list[Json], message: str | None,
                                               at: int) -> None:
    """Were taken: a call with call_id "" (an output's "" was refused), two calls of one call_id and two outputs of
    one call (the template paired them by order). Refused naming the repeat, as OpenAI's "Each function_call must
    have exactly one matching function_call_output" at the second output (a client's per-turn ids reused across
    turns, reported); ours at a second call no output answers."""
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.input_tokens.count(model=MODEL, tools=TOOLS,
                                            input=[{"role": "user", "content": "What time is it?"}, *items])
    assert exc.value.body["param"] == f"input.[{at}].call_id", exc.value.body
    assert message is None or exc.value.body["message"] == message


def test_a_call_id_repeated_after_a_previous_response_names_the_input_item(client: openai.OpenAI) -> None:
    """The history's items come first: the repeat is named by its place in the input (a client's per-turn ids
    reused across turns, as reported: OpenAI's words at the second output)."""
    first = client.responses.create(input=[{"role": "user", "content": "What time is it?"}, CALL, OUTPUT],
                                    tools=TOOLS, **GREEDY)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(input=[{"role": "user", "content": "And now?"}, CALL, OUTPUT], tools=TOOLS,
                                previous_response_id=first.id, **GREEDY)
    assert exc.value.body["param"] == "input.[2].call_id" and exc.value.body["message"] == DUPLICATE_OUTPUT


def _called(client: openai.OpenAI) -> tuple[Any, Json, Json]:
    """A response's forced call, that call as a client resends it without its id (arguments re-serialised in its own
    way: a JavaScript client's JSON.stringify), and its output."""
    first = client.responses.create(input="What time is it?", **FORCED)
    [call] = [item for item in first.output if item.type == "function_call"]
    arguments = json.dumps(json.loads(call.arguments), indent=1)
    assert arguments != call.arguments
    resent = {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": arguments}
    return first, resent, {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}


def test_the_calls_answered_resent_without_their_id_are_the_history_s(client: openai.OpenAI) -> None:
    """The function_call input item's `id` is optional (openai's ResponseFunctionToolCallParam): a client answering a
    previous response's call, sending the call again without its id beside its output, got "Duplicate function_call"
    (400), and so did one re-serialising its arguments. It is the history's call (same call_id, name, and arguments
    as JSON): templated and stored once, and the next turn builds on it. input_items lists the input as sent (it
    listed the output alone), the call under the id of the history's (an id listed is one an item reference finds).
    The same call_id with other arguments is still another call, refused."""
    first, resent, output = _called(client)
    second = client.responses.create(input=[resent, output], tools=TOOLS, previous_response_id=first.id, **GREEDY)
    assert second.status in ("completed", "incomplete"), second
    listed = client.responses.input_items.list(second.id, order="asc").data
    assert [item.type for item in listed] == ["function_call", "function_call_output"], listed
    [call] = [item for item in first.output if item.type == "function_call"]
    assert (listed[0].id, listed[0].arguments) == (call.id, resent["arguments"]), listed
    third = client.responses.create(input="And now?", tools=TOOLS, previous_response_id=second.id, **GREEDY)
    assert third.status in ("completed", "incomplete"), third
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(input=[{**resent, "arguments": json.dumps({"zone": "nowhere"})}, output], tools=TOOLS,
                                previous_response_id=first.id, **GREEDY)
    assert exc.value.body["param"] == "input.[0].call_id", exc.value.body


def test_a_call_resent_is_the_history_s_once_and_only_while_unanswered(client: openai.OpenAI) -> None:
    """Only the previous response's own calls (unanswered in its history) are taken as resent, each once: a call
    answered earlier sent again alone was dropped, the input left empty (a 200 from the history alone, where `input:
    []` is a 400), and one resent twice beside one output was dropped twice. Both are a second call of the call_id."""
    first, resent, output = _called(client)
    second = client.responses.create(input=[resent, output], tools=TOOLS, previous_response_id=first.id, **GREEDY)
    for previous, items, at in ((second.id, [resent], 0), (first.id, [resent, resent, output], 1)):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(input=items, tools=TOOLS, previous_response_id=previous, **GREEDY)
        assert exc.value.body["param"] == f"input.[{at}].call_id", exc.value.body
        assert exc.value.body["message"].startswith("Duplicate function_call for call_id"), exc.value.body


def test_a_call_made_directly_by_the_model_is_taken(client: openai.OpenAI) -> None:
    """openai's function_call and its output carry `caller` (the newest client's types): `{"type": "direct"}` is a call
    the model made itself, every call here (as `allowed_callers: ["direct"]` is taken); a history sent back with it was
    refused. input_items lists it as sent (it listed none, read as null). A program's call (programmatic tool
    calling) is still refused, naming it."""
    direct = {"caller": {"type": "direct"}}
    answer = client.responses.create(input=[{**CALL, **direct}, {**OUTPUT, **direct}], tools=TOOLS, **GREEDY)
    assert answer.status in ("completed", "incomplete"), answer
    first, resent, output = _called(client)  # a previous response's call resent: listed as sent too
    second = client.responses.create(input=[{**resent, **direct}, output], tools=TOOLS, previous_response_id=first.id,
                                     **GREEDY)
    for made, callers in ((answer, [direct["caller"]] * 2), (second, [direct["caller"], None])):
        listed = client.responses.input_items.list(made.id, order="asc").data
        assert [item.model_dump(exclude_unset=True).get("caller") for item in listed] == callers, listed
    program = {"caller": {"type": "program", "caller_id": "call_0"}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(input=[{**CALL, **program}, OUTPUT], tools=TOOLS, **GREEDY)
    assert exc.value.body["param"] == "input.[0].caller", exc.value.body


@pytest.mark.parametrize("route", ["/v1/responses", "/v1/responses/input_tokens"])
def test_truncation_keeps_the_call_the_last_output_answers(server: GunicornServer, route: str) -> None:
    """An agent loop past the context: the long first message goes, the call the last item answers stays (it went,
    and its output alone broke the pairing: a 400)."""
    items = [{"role": "user", "content": "word " * 1100}, CALL, OUTPUT]
    body = {"model": MODEL, "tools": TOOLS, "truncation": "auto",
            **({"max_output_tokens": 16} if route == "/v1/responses" else {})}
    cut = requests.post(f"{server.url}{route}", json={**body, "input": items}, timeout=60)
    kept = requests.post(f"{server.url}{route}", json={**body, "input": items[1:]}, timeout=60)
    assert cut.status_code == kept.status_code == 200, cut.text
    counts = [answer.json().get("input_tokens") or answer.json()["usage"]["input_tokens"] for answer in (cut, kept)]
    assert counts[0] == counts[1] > 0


def test_truncation_never_leaves_an_output_without_its_call(server: GunicornServer) -> None:
    """A call too long to keep beside the output that answers it: past the context, not the output alone."""
    call = {**CALL, "arguments": json.dumps({"zone": "word " * 1100})}
    body = {"model": MODEL, "tools": TOOLS, "truncation": "auto",
            "input": [{"role": "user", "content": "Hi"}, call, OUTPUT]}
    answer = requests.post(f"{server.url}/v1/responses/input_tokens", json=body, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "context_length_exceeded", answer.text


def test_items_between_a_call_and_its_output_are_taken(server: GunicornServer) -> None:
    """Not chat's order (the answers right after the calls): a reasoning item between two calls, a message between
    a call and its output."""
    reasoning = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Both."}]}
    second, later = {**CALL, "call_id": "call_2"}, {**OUTPUT, "call_id": "call_2"}
    body = {"model": MODEL, "tools": TOOLS, "input": [
        {"role": "user", "content": "What time is it?"}, CALL, reasoning, second, OUTPUT,
        {"role": "user", "content": "And?"}, later]}
    answer = requests.post(f"{server.url}/v1/responses/input_tokens", json=body, timeout=30)
    assert answer.status_code == 200 and answer.json()["input_tokens"] > 0, answer.text


@pytest.mark.parametrize("truncation", ["disabled", "auto"])
def test_a_bad_schema_is_refused_before_the_prompt_is_templated(server: GunicornServer, truncation: str) -> None:
    """As chat refuses it: a prompt past the context (its one item too: no truncation makes it fit) still gets
    the schema's error, and a long conversation is not tokenised or searched before it."""
    schema, text = {"type": "nothing"}, "word " * 1100
    answer = requests.post(f"{server.url}/v1/responses", timeout=60, json={
        **GREEDY, "input": text, "truncation": truncation,
        "text": {"format": {"type": "json_schema", "name": "p", "schema": schema}}})
    chat = post_chat(server, {"model": MODEL, "messages": [{"role": "user", "content": text}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": schema}}})
    assert answer.status_code == chat.status_code == 400, answer.text
    assert (answer.json()["error"]["param"], chat.json()["error"]["param"]) == ("text.format", "response_format")
    named = chat.json()["error"]["message"].replace("response_format", "text.format")  # chat's, naming this field
    assert answer.json()["error"]["message"] == named


@pytest.mark.parametrize("tools", [{}, {"tools": TOOLS, "tool_choice": "auto"}, FORCED],
                         ids=["alone", "auto", "forced"])
def test_a_schema_error_names_text_format_and_quotes_the_schema_as_sent(client: openai.OpenAI, server: GunicornServer,
                                                                       tools: Json) -> None:
    """The error names this request's field, text.format, where it names a field: the schema's own words that spell
    chat's (`response_format`, here a $ref's) are quoted as sent. Chat's error was rewritten word by word, the quote
    too. On each way the schema is compiled: alone, beside a strict tool's calls, checked beside a forced call."""
    schema = {"type": "object", "properties": {"response_format": {"$ref": "#/$defs/response_format"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(input="Hi", **{**GREEDY, **tools},
                                text={"format": {"type": "json_schema", "name": "p", "schema": schema}})
    chat = post_chat(server, {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}).json()["error"]
    quoted = chat["message"].removeprefix("invalid response_format: ")
    assert "/$defs/response_format" in quoted, chat
    assert info.value.body["param"] == "text.format"
    assert info.value.body["message"] == f"invalid text.format: {quoted}"


def test_a_grammar_that_errs_mid_answer_fails_the_response(client: openai.OpenAI, server: GunicornServer) -> None:
    """A text.format whose matcher errs mid-answer (the lexer of its pattern out of fuel after a token or two) ended
    the response `completed`, its text short of the schema. Now it fails as OpenAI fails a request it cannot serve
    (`invalid_prompt`): a stream's `response.failed`, kept failed; a background one found failed; a collected one a
    400 naming text.format, its code `invalid_prompt` too (it was null). Counted as failed each."""
    schema = {"type": "object", "properties": {"k": {"type": "string", "pattern": "^a{100000}$"}}, "required": ["k"],
              "additionalProperties": False}
    body = {**GREEDY, "input": "Hi", "max_output_tokens": 20,
            "text": {"format": {"type": "json_schema", "name": "costly", "schema": schema, "strict": True}}}
    failed = server_stats(server)["requests_failed"]
    (*_, last) = client.responses.create(stream=True, **body)
    assert last.type == "response.failed" and last.response.status == "failed"
    assert (last.response.error.code, last.response.error.message) == ("invalid_prompt", GRAMMAR_FAILED)
    assert client.responses.retrieve(last.response.id).error == last.response.error
    found = polled(client, client.responses.create(background=True, **body).id)
    assert found.status == "failed" and found.error == last.response.error
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(**body)
    assert info.value.body == {"message": GRAMMAR_FAILED, "type": "invalid_request_error", "param": "text.format",
                               "code": "invalid_prompt"}
    assert server_stats(server)["requests_failed"] == failed + 3


def test_a_call_cut_short_continues(client: openai.OpenAI, server: GunicornServer) -> None:
    """The model's call cut by max_output_tokens (its arguments not JSON) continues by previous_response_id, and
    resent as an item by a client that stores nothing."""
    cut = client.responses.create(input="What time is it?", **{**FORCED, "max_output_tokens": 16})
    (call,) = cut.output
    assert cut.status == call.status == "incomplete" and call.type == "function_call"
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.arguments)
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}
    for unanswered, message in (([{"role": "user", "content": "Go on."}],
                                 f"No tool output found for function call {call.call_id}."),
                                ([{**answer, "call_id": "call_x"}],
                                 "No tool call found for function call output with call_id call_x."),
                                ([call.model_dump(by_alias=True), answer],  # resent with the response holding it
                                 f"Duplicate item found with id {call.id}. Remove duplicate items from your input "
                                 "and try again.")):
        with pytest.raises(openai.BadRequestError) as exc:  # OpenAI's: the previous response's call is answered
            client.responses.create(input=unanswered, previous_response_id=cut.id, tools=TOOLS, **GREEDY)
        assert (exc.value.body["param"], exc.value.body["message"]) == ("input", message)
    follow = client.responses.create(input=[answer], previous_response_id=cut.id, tools=TOOLS, **GREEDY)
    resent = client.responses.create(input=[{"role": "user", "content": "What time is it?"},
                                            call.model_dump(by_alias=True), answer], store=False, tools=TOOLS,
                                     **GREEDY)
    assert follow.output_text == resent.output_text and follow.usage.input_tokens == resent.usage.input_tokens


def test_a_continuation_past_the_context_blames_the_history_or_the_input(client: openai.OpenAI) -> None:
    first = client.responses.create(input="word " * 900, **GREEDY)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(input="word " * 200, previous_response_id=first.id, **GREEDY)
    error = exc.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "previous_response_id"
    assert "in the input and previous responses' items, 16 in the completion" in error["message"]
    assert "reduce the length of the input and previous responses' items or" in error["message"]
    assert "messages" not in error["message"]
    with pytest.raises(openai.BadRequestError) as exc:  # the new input alone is too long
        client.responses.create(input="word " * 1100, previous_response_id=first.id, **GREEDY)
    error = exc.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert "in the input, 16 in the completion" in error["message"] and "previous" not in error["message"]
    # no new input at all (the history and a longer answer than before): nothing of its own to blame
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(previous_response_id=first.id, **{**GREEDY, "max_output_tokens": 200})
    assert (exc.value.body["code"], exc.value.body["param"]) == ("context_length_exceeded", "previous_response_id")


def test_a_large_answer_streamed_and_not_keeps_health_fast(client: openai.OpenAI, server: GunicornServer) -> None:
    """Past serving.LARGE_ANSWER (128 tokens with 20 alternatives each): the stored entry and the stream's last
    events, each repeating the answer, are encoded off the event loop; /health stays fast meanwhile."""
    body = {**GREEDY, "max_output_tokens": 128, "input": "Tell me a story about a robot.",
            "include": ["message.output_text.logprobs"], "top_logprobs": 20}
    with health_polled(server, 0.005) as polls:
        whole = client.responses.create(**body)
        with client.responses.stream(**body) as stream:  # cut at max_output_tokens: no response.completed
            last = list(stream)[-1]
    streamed = last.response
    assert last.type == "response.incomplete" and whole.usage.output_tokens == 128
    logprobs = whole.output[-1].content[0].logprobs
    assert [len(t.top_logprobs) for t in logprobs] == [20] * 128
    # the same tokens (the second request's prompt comes from the prefix cache: logprobs equal to ~1e-7)
    assert streamed.output_text == whole.output_text
    assert [t.token for t in streamed.output[-1].content[0].logprobs] == [t.token for t in logprobs]
    assert client.responses.retrieve(streamed.id).model_dump() == streamed.model_dump()
    assert max(p.held for p in polls) < HELD_S, most_held(polls)


# long enough for a few requests meanwhile, as test_server's test_health_is_fast_while_generating needs
LONG_STREAM = {**GREEDY, "max_output_tokens": 400, "input": "Tell me a long story.", "stream": True}


def test_a_stored_response_exists_from_its_first_event_and_a_delete_meanwhile_holds(server: GunicornServer) -> None:
    """GET answers the `response.created` snapshot while generating, its input items are listed, a continuation
    waits for it (400); DELETE removes it for good: its client still gets the whole stream, and nothing is kept."""
    with requests.post(f"{server.url}/v1/responses", json=LONG_STREAM, stream=True, timeout=60) as answer:
        events = sse_events(answer)
        name, data = next(events)
        created = json.loads(data)["response"]
        url = f"{server.url}/v1/responses/{created['id']}"
        assert name == "response.created" and requests.get(url, timeout=30).json() == created
        assert created["status"] == "in_progress" and created["output"] == [] and created["store"] is True
        (item,) = requests.get(f"{url}/input_items", timeout=30).json()["data"]
        assert item["content"] == [{"type": "input_text", "text": "Tell me a long story."}]
        follow = requests.post(f"{server.url}/v1/responses", timeout=30,
                               json={**GREEDY, "input": "More.", "previous_response_id": created["id"]})
        error = follow.json()["error"]
        assert follow.status_code == 400 and error["param"] == "previous_response_id"
        assert error["code"] == "previous_response_in_progress"  # so it was still in progress until the delete
        deleted = requests.delete(url, timeout=30)
        assert deleted.json() == {"id": created["id"], "object": "response", "deleted": True}
        assert requests.get(url, timeout=30).status_code == 404
        rest = list(events)
    last = json.loads(rest[-1][1])["response"]
    assert rest[-1][0] == "response.incomplete" and last["usage"]["output_tokens"] == 400
    for route in ("", "/input_items"):
        assert requests.get(f"{url}{route}", timeout=30).status_code == 404
    assert requests.delete(url, timeout=30).status_code == 404


def test_a_stored_stream_cut_by_its_client_leaves_nothing_behind(server: GunicornServer) -> None:
    with requests.post(f"{server.url}/v1/responses", json=LONG_STREAM, stream=True, timeout=60) as answer:
        # held: a reader dropped mid-stream closes the connection at once (urllib3), before the GET
        events = sse_events(answer)
        name, data = next(events)
        url = f"{server.url}/v1/responses/{json.loads(data)['response']['id']}"
        found = requests.get(url, timeout=30)
        assert found.status_code == 200 and found.json()["status"] == "in_progress", found.text

    def gone() -> bool:  # aborted, not kept: in progress until then
        found = requests.get(url, timeout=30)
        assert found.status_code == 404 or found.json()["status"] == "in_progress", found.text
        return found.status_code == 404

    wait_for(gone, 10, what=f"{url} to go (a 404) once its reader went")
    # the engine drops the aborted request at its next step, after the store let it go
    wait_for(lambda: (stats := server_stats(server))["active_requests"] == 0
             and stats["queue_length"] == 0)


def test_the_calls_of_a_body_share_its_budget_of_values(client: openai.OpenAI) -> None:
    """Each call's arguments fit alone; together past the body's 65,536 values they are a 413, as on chat (they
    were parsed on the event loop without a bound: 64 such calls were seconds)."""
    arguments = '{"a": [' + "1," * 40_000 + "1]}"
    calls = [item for i in range(2) for item in (
        {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": arguments},
        {"type": "function_call_output", "call_id": f"c{i}", "output": "ok"})]
    with pytest.raises(openai.APIStatusError) as info:
        client.responses.create(**{**GREEDY, "input": [*calls, {"role": "user", "content": "Hi"}]})
    assert info.value.status_code == 413 and info.value.body["code"] == "request_too_large", info.value.body


def _values(item: Json) -> int:
    """The values `item` charges to a request's budget: its `,` and `:`, those of the JSON in its strings too
    (its call's arguments; no other string here holds one)."""
    text = json.dumps(item)
    return text.count(",") + text.count(":")


def test_items_referred_to_share_the_body_s_budget_of_values(server: GunicornServer) -> None:
    """A referenced item's values, and its call's arguments', are the request's as if sent in its body: the
    arguments of all the references had a budget of their own (65,536 values beside the body's), and a message's
    parts were not counted at all (only the 8 MiB the items resolved may hold bounded them: about a million values)."""
    hi, empty = {"type": "input_text", "text": "Hi"}, {"type": "input_text", "text": ""}  # 4 values, no token
    arguments = '{"a": [' + "1," * 60 + "1]}"  # 62 values: what the call's values are known within
    # not through openai: its request transform takes a second for 2,000 parts
    stored = requests.post(f"{server.url}/v1/responses", timeout=120, json={**GREEDY, "input": [
        {"role": "user", "content": [hi, *[empty] * 2_000]},
        {"type": "function_call", "call_id": "c0", "name": "f", "arguments": arguments},
        {"type": "function_call_output", "call_id": "c0", "output": "ok"}, {"role": "user", "content": "Hi"}]}).json()
    listed = requests.get(f"{server.url}/v1/responses/{stored['id']}/input_items?order=asc", timeout=30).json()["data"]
    message, call, output = listed[:3]
    assert call["arguments"] == arguments and _values(message) > 8_000, listed[:2]
    # the body's own values are parts too (cheap to parse, no token), leaving `left` of the budget to its references
    for refs, left, fits in (([message], _values(message) + 30, True), ([message] * 2, _values(message) + 30, False),
                             ([call, output], _values(call) + 30, True), ([call, output], _values(call) - 30, False)):
        body = {"model": MODEL, "input": [*({"type": "item_reference", "id": ref["id"]} for ref in refs),
                                          {"role": "user", "content": [hi]}]}
        body["input"][-1]["content"] += [empty] * ((MAX_SEPARATORS - left - _values(body)) // 4)
        # the count's prompt is create's (one code path): create is asked only what it must refuse
        for route in ("/v1/responses/input_tokens",) if fits else ("/v1/responses/input_tokens", "/v1/responses"):
            answer = requests.post(f"{server.url}{route}", json=body, timeout=120)
            if fits:
                assert answer.status_code == 200, answer.text
            else:
                assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large", answer.text
