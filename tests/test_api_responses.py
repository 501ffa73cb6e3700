"""The Responses API's builders on crafted engine events (the random test model neither thinks nor calls by
itself), its input items' translation to chat messages, and the bounded store."""
from __future__ import annotations

import json
import threading
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Response

from nanoqwen.api import encode as encode_module
from nanoqwen.api import responses_api, responses_store
from nanoqwen.api import serving as serving_module
from nanoqwen.api import sse as sse_module
from nanoqwen.api.completions import TextCompletion
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.encode import compact_json, encode_json
from nanoqwen.api.errors import APIError
from nanoqwen.api.metrics import Submitted
from nanoqwen.api.responses import ChunkBuilder, ToolParsing, token_logprobs_json
from nanoqwen.api.responses_api import (
    ITEMS,
    LONG_CHARS_PER_TOKEN,
    Draft,
    ResponseCollector,
    ResponseEvents,
    ResponsesService,
    _stored_inputs,
    echoed_tools,
    kept_in_progress,
)
from nanoqwen.api.responses_include import response_with_parts, with_parts
from nanoqwen.api.responses_schemas import (
    INCLUDES,
    FunctionTool,
    ResponseCreateRequest,
    encode_reasoning,
    parse_responses_request,
)
from nanoqwen.api.responses_store import Inputs, ResponseStore, Stored
from nanoqwen.api.schemas import ChatCompletionRequest, Tool, parse_chat_request
from nanoqwen.api.serving import Batch, ClientGone, Serving
from nanoqwen.api.sse import DONE
from nanoqwen.api.stored import list_page
from nanoqwen.api.strict_json import Budget
from nanoqwen.engine.request import Event, PromptLogprobs, SamplingParams, TokenLogprob, Usage
from responses_util import failed_stream

THINK_END = 99
LOGPROBS = "message.output_text.logprobs"
Json = dict[str, Any]


def _chat(body: Json) -> ChatCompletionRequest:
    req = parse_responses_request(body, Budget())
    return req.to_chat(req.input_items)


@pytest.mark.parametrize("strict, constrained", [(None, True), (True, True), (False, False)])
def test_a_function_tool_constrains_its_calls_unless_strict_is_false(strict: bool | None, constrained: bool) -> None:
    """OpenAI's Responses default is strict: a tool that omits `strict` has its calls constrained under tool_choice
    auto too (leniently), where a chat tool that omits it does not (chat's default)."""
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}, **({} if strict is None else
                                                                                {"strict": strict})}
    chat = _chat({"input": "Hi", "tools": [tool]})
    assert (chat.tools[0].function.constrained, chat.constrains_calls) == (constrained, constrained)
    assert chat.tools[0].function.strict is strict


def test_the_responses_default_constraint_is_seen_by_the_chat_requests_own_checks() -> None:
    """A tool that omits `strict` is constrained as the chat request is validated (it was marked so after: a check
    inside saw it free). The one such check today, the refusal of continue_final_message with a constrained answer,
    no Responses request reaches (its chat fields never send continue_final_message): the mechanism, on a chat body."""
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure"}],
            "add_generation_prompt": False, "continue_final_message": True,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    assert not parse_chat_request(body, None).constrains_answer  # chat's default: free
    with pytest.raises(APIError) as refused:
        parse_chat_request(body, None, omitted_strict_constrains=True)
    assert (refused.value.status, refused.value.param) == (400, "continue_final_message")


def _lp(token: str) -> TokenLogprob:
    return TokenLogprob(0, token, -0.5, list(token.encode()), [])


def _draft(store: ResponseStore | None = None, begun: bool = True, **body: Any) -> Draft:
    """A response's draft kept in `store`, begun there (in progress) as create begins a stream's."""
    req = parse_responses_request({"input": "Hi", **body}, Budget())
    draft = Draft(req, SamplingParams(), "m", THINK_END, store, None, _stored_inputs(req), echoed_tools(req))
    if store is not None and begun:
        draft.begun = store.begin(draft.created(), draft.inputs) is not None
        assert draft.begun
    return draft


def _item(store: ResponseStore, item_id: str) -> Json | None:
    """The item an item_reference to `item_id` resolves to, as the server finds it."""
    found = store.holder(item_id)
    return found.item(item_id) if found is not None else None


THOUGHT = [Event(reasoning="Let me", token_ids=[1], logprobs=[_lp("Let me")]),
           Event(reasoning=" think", token_ids=[2], logprobs=[_lp(" think")]),
           Event(token_ids=[THINK_END], logprobs=[_lp("</think>")]),
           Event(text="Paris", token_ids=[4], logprobs=[_lp("Paris")]),
           Event(text=".", token_ids=[5], logprobs=[_lp(".")], finish_reason="stop", usage=Usage(7, 5))]
CALL_TEXT = ['<tool_call>\n{"name": "get', '_time", "arguments": {"zone', '": "UTC"}}', "\n</tool_call>"]


def _calls(texts: list[str]) -> list[Event]:
    """The engine's events of a call's text in pieces, the last one ending the answer."""
    last = len(texts) - 1
    return [Event(text=t, token_ids=[i], finish_reason="stop" if i == last else None,
                  usage=Usage(7, 4) if i == last else None) for i, t in enumerate(texts)]


def _both(events: list[Event], tools: ToolParsing | None = None, **body: Any) -> tuple[Json, list[Json]]:
    """The collected response and the stream's events for the same engine events."""
    tools = tools or ToolParsing()
    collector = ResponseCollector(_draft(**body), tools)
    stream = ResponseEvents(_draft(**body), tools)
    out = stream.opening()
    for event in events:
        collector.add(event)
        out += stream.chunks(event)
    return collector.build(events[-1].usage), out


def test_only_a_stream_builds_its_text_events_logprobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text events' bytes-less logprobs (OpenAI's `ResponseLogProb`) are built where the events are sent: a
    response not streamed builds its output parts' alone (it built both, the events' for nothing)."""
    built: list[bool] = []

    def recorded(logprobs: list[TokenLogprob], with_bytes: bool = True) -> list[Json]:
        built.append(with_bytes)
        return token_logprobs_json(logprobs, with_bytes)

    monkeypatch.setattr(responses_api, "token_logprobs_json", recorded)
    collector = ResponseCollector(_draft(include=[LOGPROBS]), ToolParsing())
    for event in THOUGHT:
        collector.add(event)
    (part,) = collector.build(Usage(7, 5))["output"][1]["content"]
    assert [lp["token"] for lp in part["logprobs"]] == ["Paris", "."] and built and all(built)
    stream = ResponseEvents(_draft(include=[LOGPROBS]), ToolParsing())
    for event in THOUGHT:
        stream.chunks(event)
    assert False in built


def _without_ids(response: Json) -> Json:
    output = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]
    return {**{k: v for k, v in response.items() if k not in ("id", "created_at", "completed_at")}, "output": output}


def test_reasoning_is_its_own_item_and_the_stream_agrees() -> None:
    response, events = _both(THOUGHT, include=["message.output_text.logprobs"])
    reasoning, message = response["output"]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_") and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think"}]
    (part,) = message["content"]
    assert part["text"] == "Paris." and [lp["token"] for lp in part["logprobs"]] == ["Paris", "."]
    assert response["usage"]["output_tokens_details"]["reasoning_tokens"] == 3  # through </think>
    assert response["status"] == "completed" and response["usage"]["total_tokens"] == 12
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e["output_index"] for e in events[2:-1]] == [0] * 7 + [1] * 7
    assert [lp["token"] for e in events if e["type"] == "response.output_text.delta" for lp in e["logprobs"]] == \
        ["Paris", "."]
    assert _without_ids(events[-1]["response"]) == _without_ids(response)


def test_encrypted_reasoning_comes_back_as_the_reasoning() -> None:
    response, _ = _both(THOUGHT, include=["reasoning.encrypted_content"])
    reasoning, message = response["output"]
    assert reasoning["encrypted_content"] == encode_reasoning("Let me think")
    del reasoning["content"]  # as a client that keeps only the opaque form sends it back
    chat = _chat({"input": [*response["output"], {"role": "user", "content": "And?"}]})
    assert chat.template_messages()[0] == {"role": "assistant", "content": "Paris.",
                                           "reasoning_content": "Let me think"}


def test_get_s_include_adds_what_create_left_out() -> None:
    """GET's `include` on a response made without it: its reasoning items' encrypted_content, as create's include
    makes it, and its output_text parts' logprobs, [] (not computed); what create included stays as it was."""
    plain, _ = _both(THOUGHT)
    full = json.loads(response_with_parts(encode_json(plain), frozenset(INCLUDES)))
    reasoning, message = full["output"]
    assert reasoning == {**plain["output"][0], "encrypted_content": encode_reasoning("Let me think")}
    assert message["content"] == [{**plain["output"][1]["content"][0], "logprobs": []}]
    included, _ = _both(THOUGHT, include=list(INCLUDES))
    assert json.loads(response_with_parts(encode_json(included), frozenset(INCLUDES))) == included


def test_get_s_include_leaves_a_bare_reasoning_input_item_as_stored() -> None:
    """An input reasoning item of an id only stands for a stored one: it has no text of its own to encode (it got an
    encrypted_content of nothing, ""); one with text gets its encrypted_content."""
    bare = {"id": "rs_1", "type": "reasoning", "summary": []}
    assert with_parts(dict(bare), frozenset(INCLUDES)) == bare
    thought = {**bare, "content": [{"type": "reasoning_text", "text": "Hm"}]}
    assert with_parts(dict(thought), frozenset(INCLUDES)) == {**thought, "encrypted_content": encode_reasoning("Hm")}


@pytest.mark.parametrize("zone", ['"UTC"', "NaN"], ids=["json", "nan"])
def test_called_functions_are_items_streamed_by_argument_deltas(zone: str) -> None:
    """A call in Qwen3's key order: its arguments as the model wrote them, unchecked (tool_calls.py), invalid JSON
    too, streamed and not alike."""
    response, events = _both(_calls([*CALL_TEXT[:2], f'": {zone}}}}}', CALL_TEXT[3]]), ToolParsing(enabled=True))
    (call,) = response["output"]
    assert call["type"] == "function_call" and call["name"] == "get_time" and call["arguments"] == f'{{"zone": {zone}}}'
    assert call["call_id"].startswith("call_") and call["id"].startswith("fc_") and call["status"] == "completed"
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and "".join(deltas) == call["arguments"]
    assert not any(e["type"].startswith("response.output_text") for e in events)
    streamed = events[-1]["response"]["output"][0]
    assert {**streamed, "id": "", "call_id": ""} == {**call, "id": "", "call_id": ""}


def _one_open_at_a_time(events: list[Json]) -> list[tuple[str, int, str]]:
    """(added or done, output index, item type) of the stream's items, checking each is done before the next."""
    items = [(e["type"].rsplit(".", 1)[1], e["output_index"], e["item"]["type"]) for e in events
             if e["type"] in ("response.output_item.added", "response.output_item.done")]
    assert [kind for kind, _, _ in items] == ["added", "done"] * (len(items) // 2)
    assert [index for _, index, _ in items] == [i for i in range(len(items) // 2) for _ in (0, 1)]
    return items


def test_items_are_streamed_one_at_a_time_in_the_order_written() -> None:
    """Text, a whole call, more text, a call cut short: each item done before the next one opens; only the cut
    one incomplete; the collected output in the same order; the message's logprobs its text's tokens only."""
    texts = ["Sure.", '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>', "\nThen",
             " more.", '\n<tool_call>\n{"name": "get_time", "arguments": {"zo']
    events = [Event(text=t, token_ids=[i], logprobs=[_lp(t)]) for i, t in enumerate(texts)]
    events[-1].finish_reason, events[-1].usage = "length", Usage(7, 5)
    response, streamed = _both(events, ToolParsing(enabled=True), include=[LOGPROBS])
    items = _one_open_at_a_time(streamed)
    assert [kind for _, _, kind in items[::2]] == ["message", "function_call", "message", "function_call"]
    output = response["output"]
    assert _without_ids(streamed[-1]["response"]) == _without_ids(response) and response["status"] == "incomplete"
    assert [(item["type"], item["status"]) for item in output] == [
        ("message", "completed"), ("function_call", "completed"), ("message", "completed"),
        ("function_call", "incomplete")]
    assert (output[1]["arguments"], output[3]["arguments"]) == ('{"zone": "UTC"}', '{"zo')
    assert [[lp["token"] for lp in item["content"][0]["logprobs"]] for item in output[::2]] == [["Sure."],
                                                                                                ["\nThen", " more."]]
    assert [item["content"][0]["text"] for item in output[::2]] == ["Sure.", "Then more."]


def test_cut_short_is_incomplete_and_a_failure_fails() -> None:
    events = [Event(text="Par", token_ids=[4], finish_reason="length", usage=Usage(7, 1))]
    response, streamed = _both(events)
    assert response["status"] == streamed[-1]["response"]["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"} and streamed[-1]["type"] == \
        "response.incomplete"
    assert response["output"][0]["status"] == "incomplete"
    (failed,) = ResponseEvents(_draft(), ToolParsing()).failure("boom")
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "boom"}


def _failed(events: list[Event], tools: ToolParsing, **body: Any) -> list[Json]:
    return failed_stream(ResponseEvents(_draft(**body), tools), events)


@pytest.mark.parametrize("texts", [["Sure.", "<tool_call>\n{"], CALL_TEXT[:2], ["Sunny.\n"], [CALL_TEXT[0]]],
                         ids=["held-text", "open-call", "whitespace", "held-call"])
def test_a_failed_stream_sends_what_it_held_and_fails_with_the_items_so_far(texts: list[str]) -> None:
    """An engine error (or the server shutting down) ended a stream with `response.failed` holding only the items
    done: the open one (a message whose deltas went out, a call) was missing, and text the tool parser held (what
    might yet be a call, trailing whitespace) never went out. Now the error cuts the answer as a length cut there
    would: the held text is sent, the open item done `incomplete`, and the failed response's output is what the
    cut response's is, its text the deltas'."""
    tools = ToolParsing(enabled=True)
    events = [Event(text=t, token_ids=[i], logprobs=[_lp(t)]) for i, t in enumerate(texts)]
    cut, _ = _both([*events, Event(finish_reason="length", usage=Usage(7, len(texts)))], tools, include=[LOGPROBS])
    streamed = _failed(events, tools, include=[LOGPROBS])
    _one_open_at_a_time(streamed)
    failed = streamed[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    output = failed["response"]["output"]
    assert _without_ids(failed["response"])["output"] == _without_ids(cut)["output"] and output
    assert output[-1]["status"] == "incomplete"
    texts_sent = "".join(e["delta"] for e in streamed if e["type"] == "response.output_text.delta")
    arguments_sent = "".join(e["delta"] for e in streamed if e["type"] == "response.function_call_arguments.delta")
    assert texts_sent == "".join(item["content"][0]["text"] for item in output if item["type"] == "message")
    assert arguments_sent == "".join(item["arguments"] for item in output if item["type"] == "function_call")
    logprobs = [lp["token"] for item in output if item["type"] == "message" for lp in item["content"][0]["logprobs"]]
    assert logprobs == [lp["token"] for e in streamed if e["type"] == "response.output_text.delta"
                        for lp in e["logprobs"]]


def test_a_failure_before_any_output_fails_with_none_and_open_reasoning_is_kept() -> None:
    """No empty message for a response that failed before its output (as a cancelled one); reasoning under way is
    an item done, as at any end."""
    streamed = _failed([], ToolParsing())
    assert [e["type"] for e in streamed] == ["response.created", "response.in_progress", "response.failed"]
    assert streamed[-1]["response"]["output"] == []
    streamed = _failed(THOUGHT[:2], ToolParsing())
    assert [item["type"] for item in streamed[-1]["response"]["output"]] == ["reasoning"]
    assert streamed[-1]["response"]["output"][0]["content"][0]["text"] == "Let me think"


def _collected(draft: Draft, events: list[Event], tools: ToolParsing | None = None) -> Json | bytes:
    collector = ResponseCollector(draft, tools or ToolParsing())
    for event in events:
        collector.add(event)
    return collector.build(events[-1].usage)


def test_a_stored_response_keeps_its_encoding_input_and_history_without_logprobs() -> None:
    store = ResponseStore()
    body = _collected(_draft(store, begun=False, instructions="Be brief.", include=[LOGPROBS]), THOUGHT)
    response = json.loads(body)
    stored = store.get(response["id"])
    assert stored.body == body and response["store"] is True
    (item,) = json.loads(stored.input_items)
    assert item["type"] == "message" and item["content"] == [{"type": "input_text", "text": "Hi"}]
    reasoning, message = response["output"]
    assert [lp["token"] for lp in message["content"][0]["logprobs"]] == ["Paris", "."]
    del message["content"][0]["logprobs"]
    assert json.loads(stored.history) == [item, reasoning, message]
    assert stored.size == len(stored.body) + len(stored.input_items) + len(stored.history)
    assert _collected(_draft(None), THOUGHT)["store"] is False


def test_a_response_larger_than_the_store_is_kept_alone_as_its_stream_said() -> None:
    store = ResponseStore(max_bytes=1000)  # room for its snapshot and input, as it begins
    store.put({"id": "resp_old", "output": []}, Inputs(), None, False)
    events = ResponseEvents(_draft(store), ToolParsing())
    opening = events.opening()
    for event in THOUGHT:
        events.chunks(event)
    assert [e["response"]["store"] for e in opening] == [True, True] and events.response["store"] is True
    assert store.get(events.response["id"]).body == events.body and len(events.body) > store.max_bytes
    assert store.get("resp_old") is None
    store.put({"id": "resp_new", "output": []}, Inputs(), None, False)  # the next one is kept: the large one goes
    assert store.get(events.response["id"]) is None and store.get("resp_new") is not None


def test_a_response_is_kept_only_under_a_quarter_of_the_store_and_a_continuation_past_it_is_refused() -> None:
    service = ResponsesService(SimpleNamespace())
    service.store = store = ResponseStore(max_bytes=4000)
    small = parse_responses_request({"input": "x" * 800}, Budget())

    def keeps(req: ResponseCreateRequest, previous: Stored | None) -> bool:
        return service._keeps(req, len(_stored_inputs(req).listed), previous)

    assert keeps(small, None) and not keeps(small.model_copy(update={"store": False}), None)
    assert not keeps(parse_responses_request({"input": "x" * 1000}, Budget()), None)  # said store: false up front
    store.put({"id": "resp_long", "output": [{"id": "msg_long", "text": "x" * 600}]}, Inputs(), None, False)
    long = store.get("resp_long")
    assert service._previous("resp_long", long) is long and not keeps(small, long)
    huge = {"id": "resp_huge", "output": [{"id": "msg_huge", "text": "x" * 4000}]}
    store.put(huge, Inputs(), long, False)  # its output
    with pytest.raises(APIError) as exc:
        service._previous("resp_huge", store.get("resp_huge"))
    assert (exc.value.status, exc.value.param) == (400, "previous_response_id")


def test_items_are_found_by_id_while_their_response_is_kept() -> None:
    store = ResponseStore(max_responses=2)
    logprobs = [{"token": "a", "logprob": 0.0, "bytes": [97], "top_logprobs": []}]
    said = {"id": "msg_out", "type": "message", "content": [{"type": "output_text", "text": "a", "logprobs": logprobs}]}
    store.put({"id": "resp_0", "output": [said]}, Inputs.of([{"id": "msg_in", "type": "message"}]), None, False)
    assert _item(store, "msg_in") == {"id": "msg_in", "type": "message"}
    assert _item(store, "msg_out") == {**said, "content": [{"type": "output_text", "text": "a"}]}
    assert _item(store, "msg_unknown") is None
    said_in = {"id": "msg_in", "type": "message", "role": "user"}
    store.put({"id": "resp_1", "output": []}, Inputs.of([said_in]), None, False)
    assert _item(store, "msg_in") == {"id": "msg_in", "type": "message", "role": "user"}  # the latest response's
    store.put({"id": "resp_2", "output": []}, Inputs(), None, False)  # resp_0 goes, and its items with it
    assert _item(store, "msg_out") is None and _item(store, "msg_in") is not None
    assert store.delete("resp_1") and _item(store, "msg_in") is None and store._items == {}


def test_deleting_an_items_latest_holder_finds_it_in_an_older_one() -> None:
    store = ResponseStore()
    said = {"id": "msg_o", "type": "message", "role": "assistant"}
    store.put({"id": "resp_a", "output": [said]}, Inputs(), None, False)
    store.put({"id": "resp_b", "output": []}, Inputs.of([{**said, "role": "user"}]), None, False)
    assert _item(store, "msg_o")["role"] == "user"
    store.put({"id": "resp_c", "output": []}, Inputs.of([{**said, "role": "system"}]), None, False)
    assert store.delete("resp_b") and _item(store, "msg_o")["role"] == "system"  # a middle holder gone
    assert store.delete("resp_c") and _item(store, "msg_o") == said
    assert store.delete("resp_a") and _item(store, "msg_o") is None and store._items == {}


def test_item_references_are_looked_up_once_parsed_alone_and_bounded_like_a_body(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store is looked up once per item referred to (on the loop, to weigh the request), each item parsed alone
    (not its response's other items), and each reference weighs its item's size: toward a large request (serving.lane)
    and against the body's bound."""
    store = ResponseStore()
    said = {"id": "msg_o", "type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": "x" * 90}]}
    heard = {"id": "msg_i", "type": "message", "role": "user", "content": "y" * 5000}
    store.put({"id": "resp_a", "output": [said]}, Inputs.of([heard]), None, False)
    sizes = {item["id"]: len(json.dumps(item, separators=(",", ":"))) for item in (said, heard)}
    looked_up, parsed = [], []
    holder = store.holder
    monkeypatch.setattr(store, "holder", lambda item_id: looked_up.append(item_id) or holder(item_id))
    monkeypatch.setattr(responses_store, "json", SimpleNamespace(loads=lambda text: parsed.append(len(text))
                                                                 or json.loads(text)))
    service = _service(lambda *args: [1], config=SimpleNamespace(max_body_bytes=10**6))
    service.store = store
    refs = parse_responses_request({"input": [{"id": "msg_o"}, {"id": "msg_i"}, {"role": "user", "content": "hi"}]},
                                   Budget())
    assert [getattr(item, "id", None) for item in service._prompt(refs, Budget()).req.input_items] == [
        "msg_o", "msg_i", None]
    assert looked_up == ["msg_o", "msg_i"] and parsed == [sizes["msg_o"], sizes["msg_i"]]
    refs = parse_responses_request({"input": [{"type": "item_reference", "id": "msg_o"}] * 3}, Budget())
    found = service._found(refs)
    resolved = service._resolved(refs, Budget(), found.holders)
    assert [item.id for item in resolved.input_items] == ["msg_o"] * 3 and found.chars == 3 * sizes["msg_o"]
    service.chat.serving.config.max_body_bytes = 3 * sizes["msg_o"]
    refs = parse_responses_request({"input": [{"id": "msg_o"}] * 4}, Budget())
    with pytest.raises(APIError) as exc:
        service._resolved(refs, Budget(), service._found(refs).holders)
    assert (exc.value.status, exc.value.param) == (400, "input")


def test_an_item_reference_needs_an_id_and_may_omit_its_type() -> None:
    (ref,) = parse_responses_request({"input": [{"id": "msg_1"}]}, Budget()).input_items
    assert (ref.type, ref.id) == ("item_reference", "msg_1")
    for item, param in (({"type": "item_reference"}, "input.[0].id"), ({"content": "hi"}, "input.[0].role")):
        with pytest.raises(APIError) as exc:
            parse_responses_request({"input": [item]}, Budget())
        assert exc.value.param == param


def test_a_cut_or_malformed_call_continues() -> None:
    """The model's own call, cut short or named outside OpenAI's rule, continues by previous_response_id and
    resent as an item; its arguments reach the template as written."""
    store = ResponseStore()
    cut = [Event(text='<tool_call>\n{"name": "ns.g", "arguments": {"b": ', token_ids=[1], finish_reason="length",
                 usage=Usage(7, 1))]
    response = json.loads(_collected(_draft(store), cut, ToolParsing(enabled=True)))
    (call,) = response["output"]
    assert (call["name"], call["arguments"], call["status"]) == ("ns.g", '{"b": ', "incomplete")
    history = ITEMS.validate_json(store.get(response["id"]).history)
    resent = parse_responses_request({"input": [{"role": "user", "content": "Hi"}, call,
                                                {"type": "function_call_output", "call_id": call["call_id"],
                                                 "output": "ok"}]}, Budget())
    go_on = parse_responses_request({"input": [{"type": "function_call_output", "call_id": call["call_id"],
                                                "output": "cut"}, {"role": "user", "content": "Go on"}]}, Budget())
    for chat in (go_on.to_chat([*history, *go_on.input_items]), resent.to_chat(resent.input_items)):
        (sent,) = chat.template_messages()[1]["tool_calls"]
        assert sent["function"] == {"name": "ns.g", "arguments": '{"b": '}


def test_a_constrained_first_call_cut_before_its_name_leaves_the_text_before_it() -> None:
    """A strict tool under "auto" (its calls constrained), the first call cut before its name: the message is the text
    before the markup, collected and streamed (it held `<tool_call>\n{"na`)."""
    cut = [Event(text="Sure. ", token_ids=[1]), Event(text='<tool_call>\n{"na', token_ids=[2], finish_reason="length",
                                                      usage=Usage(7, 2))]
    response, events = _both(cut, ToolParsing(enabled=True, constrained=True))
    (message,) = response["output"]
    assert (message["type"], message["status"], message["content"][0]["text"]) == ("message", "incomplete", "Sure.")
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Sure."
    assert _without_ids(events[-1]["response"]) == _without_ids(response)


def test_input_items_to_chat_messages() -> None:
    items = [{"role": "user", "content": "a"},
             {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "r1"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call", "call_id": "c2", "name": "f", "arguments": '{"x": 1}'},
             {"type": "function_call_output", "call_id": "c1", "output": "one"},
             {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
             {"role": "developer", "content": "d"}]
    chat = _chat({"input": items, "instructions": "sys"})
    calls = [{"id": c, "type": "function", "function": {"name": "f", "arguments": a}}
             for c, a in (("c1", {}), ("c2", {"x": 1}))]
    assert chat.template_messages() == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "r1", "tool_calls": calls},
        {"role": "tool", "content": "one", "tool_call_id": "c1"},
        {"role": "tool", "content": "two", "tool_call_id": "c2"},
        {"role": "system", "content": "d"}]


def _here(where: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Serving.off_loop_if of a service with no threads behind it."""
    return fn(*args)


def _serving(**fields: Any) -> SimpleNamespace:
    """A Serving with nothing behind it (no threads: off_loop_if runs here; no model: a context of 10**6 tokens,
    served as "m"); `fields` replace or add to its own."""
    engine = SimpleNamespace(sampling_defaults={}, think_ids=(THINK_END - 1, THINK_END))
    config = SimpleNamespace(served_model_name="m", max_body_bytes=ServerConfig().max_body_bytes)
    return SimpleNamespace(**{"engine": engine, "info": {"max_model_len": 10**6}, "check_serving": lambda model: None,
                              "validate": lambda parse, body, budget: parse(body, budget), "off_loop_if": _here,
                              "stats": SimpleNamespace(begin=lambda: None), "config": config, **fields})


def _service(encode: Callable[[ChatCompletionRequest, int | None, Any], list[int]],
             max_model_len: int = 10**6, **serving: Any) -> ResponsesService:
    """A ResponsesService whose chat templates and tokenises with `encode`, nothing else behind it (no grammar
    compiled); `max_model_len` only decides which prompts look too long (LONG_CHARS_PER_TOKEN characters a token)."""
    chat = SimpleNamespace(serving=_serving(info={"max_model_len": max_model_len}, **serving), encode=encode,
                           params=ChatCompletionRequest.sampling_params)
    return ResponsesService(chat)


def _counted(service: ResponsesService, req: ResponseCreateRequest) -> tuple[ChatCompletionRequest, list[int]]:
    """The chat request and ids the prompt's path (create's and the count's) makes of `req`."""
    prompt = service._prompt(req, Budget())
    return prompt.chat, prompt.ids


@pytest.mark.parametrize("looks_too_long", [False, True])
def test_truncation_keeps_the_latest_items_that_fit_templating_little(looks_too_long: bool) -> None:
    """A conversation 20x the context: the candidates templated stay about twice its size (a fake 1000-character
    context here), and the one kept is templated once. One that looks too long is not templated whole first."""
    sizes = []

    def encode(chat: ChatCompletionRequest, max_tokens: int | None, prompt_name: Any) -> list[int]:
        sizes.append(sum(len(m["content"]) for m in chat.template_messages()))
        if sizes[-1] > 1000:
            raise APIError(400, "too long", code="context_length_exceeded")
        return [sizes[-1]]

    service = _service(encode, 10 if looks_too_long else 10**6)
    items = [{"role": "system", "content": "s" * 100}, *({"role": "user", "content": f"{i:03}" + "x" * 97}
                                                        for i in range(200)), {"role": "user", "content": "last"}]
    req = parse_responses_request({"input": items, "truncation": "auto"}, Budget())
    chat, ids = _counted(service, req)
    # the system message, the last item and the 8 items before it: 904 characters (9 would be 1004)
    kept = [items[0], *items[-9:]]
    assert [m["content"] for m in chat.template_messages()] == [item["content"] for item in kept]
    assert ids == [904] and sizes.count(904) == 1
    whole = sum(len(item["content"]) for item in items)
    assert sizes.count(whole) == (not looks_too_long) and max(size for size in sizes if size != whole) < 2000
    too_long = {"role": "user", "content": "y" * 1000}
    req = parse_responses_request({"input": [*items[:3], too_long], "truncation": "auto"}, Budget())
    sizes.clear()
    with pytest.raises(APIError) as exc:  # the last item alone is too long: the whole prompt's error
        _counted(service, req)
    assert exc.value.code == "context_length_exceeded" and sizes.count(max(sizes)) == 1  # the whole prompt once


def _counting(counts: dict[str, int], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method`, counting its calls in counts[name]."""
    def counted(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return method(*args, **kwargs)
    return counted


def test_truncations_candidates_share_the_tools_validated_and_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate of a truncation's search is a chat request of the same tools: converted, validated and measured
    once (4,000 tools made each candidate ~0.9 s), and each candidate templates them all the same."""
    counts = {"to_chat": 0, "model_dump": 0}
    for owner, name in ((FunctionTool, "to_chat"), (Tool, "model_dump")):
        monkeypatch.setattr(owner, name, _counting(counts, name, getattr(owner, name)))
    shown: list[list[str]] = []

    def encode(chat: ChatCompletionRequest, max_tokens: int | None, prompt_name: Any) -> list[int]:
        shown.append([tool["function"]["name"] for tool in chat.template_tools() or []])
        size = sum(len(m["content"]) for m in chat.template_messages())
        if size > 1000:
            raise APIError(400, "too long", code="context_length_exceeded")
        return [size]

    tools = [{"type": "function", "name": f"f{i}", "parameters": {"type": "object"}} for i in range(3)]
    items = [{"role": "user", "content": "x" * 100} for _ in range(200)]
    req = parse_responses_request({"input": items, "tools": tools, "truncation": "auto"}, Budget())
    chat, ids = _counted(_service(encode), req)
    assert ids == [1000] and len(shown) > 5 and all(names == ["f0", "f1", "f2"] for names in shown)
    assert counts == {"to_chat": 3, "model_dump": 3}
    assert chat.template_chars() == 1000 + len(json.dumps(chat.template_tools()))


@pytest.mark.parametrize("count, kept", [(3, 404), (200, 904)])  # user items of 100 characters: fitting, cut
def test_create_compiles_first_and_submits_the_prompt_it_templated(count: int, kept: int) -> None:
    """create makes the parameters (its output grammar compiled) before templating anything, then submits the ids
    of the prompt kept, templated once: the whole's when it fits, else the candidate's found fitting."""
    calls: list[Any] = []

    def params(chat: ChatCompletionRequest) -> SamplingParams:
        calls.append("params")
        return SamplingParams(max_tokens=16)

    def encode(chat: ChatCompletionRequest, max_tokens: int | None, prompt_name: Any) -> list[int]:
        size = sum(len(m["content"]) for m in chat.template_messages())
        calls.append(("encode", size, max_tokens))
        if size > 1000:
            raise APIError(400, "too long", code="context_length_exceeded")
        return [size]

    def submit(chat: ChatCompletionRequest, params: SamplingParams, prompt: list[int], prompt_name: Any,
               reports_admission: bool) -> Batch:
        calls.append(("submit", prompt, params.max_tokens))
        return Batch(Submitted(1, None, [1]))

    serving = _serving(respond=lambda batch, stream, collector, trace, environ: collector)
    service = ResponsesService(SimpleNamespace(serving=serving, params=params, encode=encode, submit=submit))
    items = [{"role": "system", "content": "s" * 100}, *({"role": "user", "content": f"{i:03}" + "x" * 97}
                                                        for i in range(count)), {"role": "user", "content": "last"}]
    collector = service.create({"input": items, "truncation": "auto"}, Budget(), {})
    assert calls[0] == "params" and calls[-1] == ("submit", [kept], 16) and calls.count("params") == 1
    assert calls.count(("encode", kept, 16)) == 1 and all(call[2] == 16 for call in calls[1:])
    assert collector.draft.params.max_tokens == 16


def test_a_prompt_that_looks_too_long_but_fits_is_templated_under_three_times() -> None:
    """Runs of spaces or symbols make up to 128 characters a token: such a prompt is searched at once and found
    to fit whole, the whole the doubling's last candidate (a bisection up to it would template ~log2(n) prompts
    near its size: 11 times the whole for these 3000 items)."""
    sizes = []

    def encode(chat: ChatCompletionRequest, max_tokens: int | None, prompt_name: Any) -> list[int]:
        sizes.append(sum(len(m["content"]) for m in chat.template_messages()))
        return [sizes[-1]]

    items = [{"role": "user", "content": "-" * 100} for _ in range(3000)]
    whole = 100 * len(items)
    req = parse_responses_request({"input": items, "truncation": "auto"}, Budget())
    chat, ids = _counted(_service(encode, 10), req)
    assert len(chat.messages) == len(items) and ids == [whole]
    assert sizes.count(whole) == 1 and sum(sizes) <= 3 * whole, sizes


def test_calls_arguments_count_in_a_prompts_size() -> None:
    """A conversation of mostly calls' arguments is as long as they are: past LONG_CHARS_PER_TOKEN characters a
    token of the context it is searched at once, and it is tokenised in the long prompts' pool."""
    arguments = json.dumps({"text": "x" * 1000})
    items = [item for i in range(20) for item in (
        {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": arguments},
        {"type": "function_call_output", "call_id": f"c{i}", "output": "ok"})]
    chat = _chat({"input": [*items, {"role": "user", "content": "Hi"}]})
    assert chat.template_chars() > 20 * len(arguments)
    small = _chat({"input": [*(item for i in range(500) for item in (
        {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": f"c{i}", "output": ""})), {"role": "user", "content": "Hi"}]})
    assert small.template_chars() > 40 * 500  # many small calls are a long prompt too
    assert _service(lambda *args: [], max_model_len=20 * len(arguments) // LONG_CHARS_PER_TOKEN)._looks_too_long(chat)


def test_truncation_drops_an_output_with_its_call() -> None:
    def encode(chat: ChatCompletionRequest, max_tokens: int | None, prompt_name: Any) -> list[int]:
        if len(chat.template_messages()) > 3:
            raise APIError(400, "too long", code="context_length_exceeded")
        return []

    service = _service(encode)
    items = [{"role": "user", "content": "a"},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "one"}, {"role": "user", "content": "b"},
             {"role": "user", "content": "c"}]
    req = parse_responses_request({"input": items, "truncation": "auto"}, Budget())
    # keeping 3 items would keep the output without its call: the output goes too
    chat, _ = _counted(service, req)
    assert [m["content"] for m in chat.template_messages()] == ["b", "c"]


def test_responses_settings_become_chats() -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    chat = _chat({
        "input": "Hi", "max_output_tokens": 20, "temperature": 0.5, "top_logprobs": 3,
        "include": ["message.output_text.logprobs"], "reasoning": {"effort": "none", "summary": "auto"},
        "tools": tools, "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": False})
    params = chat.sampling_params()
    assert (params.max_tokens, params.temperature, params.logprobs, params.top_logprobs) == (20, 0.5, True, 3)
    assert chat.enable_thinking is False and chat.forces_tool_call and chat.kept_calls == 1
    text = _chat({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "p",
                                                                       "schema": {"type": "object"}},
                                                            "verbosity": "medium"}})
    assert text.response_format.json_schema.schema_ == {"type": "object"}
    with pytest.raises(APIError) as exc:
        _chat({"input": []})
    assert exc.value.param == "input"


def test_the_store_is_bounded_by_count_and_encoded_bytes() -> None:
    def response(i: int, text: str = "") -> Json:
        return {"id": f"resp_{i}", "output": [{"id": f"msg_{i}", "text": text}]}

    store = ResponseStore(max_responses=2, max_bytes=3000)
    for i in range(3):
        assert json.loads(store.put(response(i), Inputs(), None, False)) == response(i)
    assert store.get("resp_0") is None and store.get("resp_1") is not None and store.get("resp_2") is not None
    store.put(response(3, "x" * 1440), Inputs(), None, False)  # fits alone (it and its history): the older ones go
    assert store.get("resp_3") is not None and store.get("resp_1") is None and store.get("resp_2") is None
    store.put(response(4, "x" * 1600), Inputs(), None, False)  # larger than the whole store: kept alone
    assert store.get("resp_4") is not None and store.get("resp_3") is None
    assert store.delete("resp_4") and not store.delete("resp_4") and store._entries.bytes == 0
    # a continuation holds the earlier items too, counted once in it: the entries' sizes add up to the bound
    store = ResponseStore()
    first = store.get(json.loads(store.put(response(3, "x" * 900), Inputs(), None, False))["id"])
    follow = response(5)
    store.put(follow, Inputs.of([{"id": "msg_in"}]), first, False)
    later = store.get("resp_5")
    assert json.loads(later.history) == [*json.loads(first.history), {"id": "msg_in"}, *follow["output"]]
    assert later.size == len(later.body) + len(later.input_items) + len(later.history) < 2 * first.size
    assert store._entries.bytes == first.size + later.size


def test_input_items_pages() -> None:
    items = [{"id": f"msg_{i}"} for i in range(5)]

    def ids(**args: str) -> list[str]:
        return [item["id"] for item in list_page(items, args)["data"]]

    assert ids() == ["msg_4", "msg_3", "msg_2", "msg_1", "msg_0"]
    assert ids(order="asc", limit="2") == ["msg_0", "msg_1"] and list_page(items, {"limit": "2"})["has_more"]
    assert ids(order="asc", after="msg_1", before="msg_4") == ["msg_2", "msg_3"]
    for args, param in (({"limit": "0"}, "limit"), ({"order": "up"}, "order"), ({"after": "msg_9"}, "after")):
        with pytest.raises(APIError) as exc:
            list_page(items, args)
        assert exc.value.param == param


class _ThreadRecordingStore(ResponseStore):
    def put(self, response: Json, inputs: Inputs, previous: Any, begun: bool) -> bytes:
        self.thread = threading.get_ident()
        return super().put(response, inputs, previous, begun)


SCORED = TokenLogprob(0, "a", -0.5, [97], [_lp("b")] * 20)
LONG = [Event(text="a" * 120, token_ids=[1] * 120, logprobs=[SCORED] * 120)]  # past LARGE_ANSWER


def _served(stream: Any, events: list[Event], counted: list[str] | None = None) -> list[str]:
    """The frames of `stream` for `events` through Serving._stream, as the server sends them (split out of its writes,
    which join the frames of the events waiting); `counted` gets how the request was counted."""
    batch = Batch(Submitted(1, None, [1]))
    for event in events:
        batch.put(event)
    counted = [] if counted is None else counted
    stats = SimpleNamespace(finish=lambda trace, usage, submitted: counted.append("finish"),
                            abort=lambda trace, submitted: counted.append("abort"),
                            fail=lambda trace, submitted: counted.append("fail"))
    serving = Serving(None, ServerConfig(), stats)  # type: ignore[arg-type]
    try:
        writes = serving._stream(batch, stream, SimpleNamespace(on_event=lambda event: None), {})
        return [f"{frame}\n\n" for frame in "".join(writes).split("\n\n")[:-1]]
    finally:
        serving.encoding.stop()


def _breaking(kind: type, cut_breaks: bool = False) -> type:
    """`kind` whose chunks raise at an event of text "BUG" (a bug of ours in the stream's code), and with
    `cut_breaks` at the error's event too."""

    class Breaking(kind):
        def chunks(self, event: Event) -> list[Json]:
            if event.text == "BUG" or (cut_breaks and event.error is not None):
                raise RuntimeError("a bug of ours")
            return super().chunks(event)

    return Breaking


HELD = [Event(text="Sure. ", token_ids=[1]), Event(text="<tool_call>\n{", token_ids=[2]),
        Event(text="BUG", token_ids=[3])]


def _payloads(frames: list[str]) -> list[Any]:
    return [json.loads(frame.split("data: ", 1)[1]) for frame in frames if frame != DONE]


@pytest.mark.parametrize("cut_breaks", [False, True], ids=["held-sent", "cut-raises"])
def test_a_stream_our_code_broke_sends_what_it_held_as_an_engine_error_would(cut_breaks: bool) -> None:
    """An exception in the stream's own code ended it with the error alone: a chat stream's text held back (what
    might be a call, trailing whitespace) never went out, a Responses stream's `response.failed` lacked its open
    message. Now both end as an engine error ends them; where that cut raises too, the error alone still ends it."""
    chat = _served(_breaking(ChunkBuilder, cut_breaks)("m", "fp", include_usage=False, tools=ToolParsing(True)), HELD)
    assert chat[-1] == DONE and "error" in _payloads(chat)[-1]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in _payloads(chat)[:-1])
    assert content == ("Sure." if cut_breaks else "Sure. <tool_call>\n{")
    events = _payloads(_served(_breaking(ResponseEvents, cut_breaks)(_draft(), ToolParsing(True)), HELD))
    failed = events[-1]["response"]
    assert events[-1]["type"] == "response.failed" and failed["error"]["message"] == "internal server error"
    if cut_breaks:  # the items done only: none
        assert failed["output"] == []
    else:
        (message,) = failed["output"]
        assert (message["status"], message["content"][0]["text"]) == ("incomplete", "Sure. <tool_call>\n{")


def test_a_broken_stream_whose_failure_raises_too_ends_with_the_bare_error_counted_as_failed() -> None:
    """The failure event is built from the builder's state too (a Responses one repeats the items so far): where it
    raises as well, the bare error body still ends the stream (it ended with no error and no [DONE]). A stream our code
    broke is counted as failed (it was counted as aborted, as if its client had left)."""

    class FailureBreaks(_breaking(ResponseEvents)):
        def failure(self, message: str) -> list[Json]:
            raise RuntimeError("a second bug of ours")

    counted: list[str] = []
    events = _payloads(_served(FailureBreaks(_draft(), ToolParsing(True)), HELD, counted))
    assert events[-1] == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                    "code": "server_error"}}
    assert counted == ["fail"]


def test_a_legacy_stream_our_code_broke_sends_the_echo_still_waiting() -> None:
    """With `echo` and `logprobs` the echo waits for the first event (its prompt's logprobs): a bug there sent the
    error alone, where an engine error sends the echo first."""
    completion = _breaking(TextCompletion)("m", "fp", ["Hi there"], want_logprobs=True)
    first = Event(text="BUG", token_ids=[1], prompt_logprobs=PromptLogprobs("Hi", []))
    frames = _payloads(_served(completion, [first]))
    assert [frame.get("choices") for frame in frames] == [
        [{"index": 0, "text": "Hi there", "logprobs": None, "finish_reason": None}], None]
    assert frames[-1]["error"]["message"] == "internal server error"


def test_a_stream_whose_client_resets_after_its_finish_chunk_counts_as_finished(monkeypatch) -> None:
    """The engine's last event carries only the usage: without include_usage it writes nothing, and a client that
    reset once it read the finish chunk is not an abort (a probe at that event counted the answer as aborted)."""
    probes: list[int] = []

    def probe(environ: dict) -> bool:  # connected at the first event, reset after it
        probes.append(1)
        if len(probes) > 1:
            raise ClientGone
        return False

    monkeypatch.setattr(serving_module, "client_probe", probe)
    batch = Batch(Submitted(1, None, [1]))
    batch.put(Event(index=0, text="hi", token_ids=[1], finish_reason="stop"))
    batch.put(Event(index=0, usage=Usage(3, 1)))
    finished: list[Usage] = []
    aborted: list[Any] = []
    stats = SimpleNamespace(finish=lambda trace, usage, submitted: finished.append(usage),
                            abort=lambda trace, submitted: aborted.append(trace))
    serving = Serving(None, ServerConfig(), stats)  # type: ignore[arg-type]
    serving.abort = aborted.append  # type: ignore[method-assign]
    try:
        list(serving._stream(batch, ChunkBuilder("m", "fp", include_usage=False),
                             SimpleNamespace(on_event=lambda event: None), {}))
    finally:
        serving.encoding.stop()
    assert finished == [Usage(3, 1)] and not aborted


def test_a_large_streams_last_events_are_built_and_stored_off_the_loop() -> None:
    """Its `.done` events each repeat the whole answer's logprobs: built, framed and stored in a native thread."""
    store = _ThreadRecordingStore()
    events = [*LONG, Event(text="!", token_ids=[2], logprobs=[_lp("!")], finish_reason="stop", usage=Usage(7, 121))]
    frames = _served(ResponseEvents(_draft(store, include=[LOGPROBS], top_logprobs=20), ToolParsing()), events)
    assert store.thread != threading.get_ident()
    completed = json.loads(frames[-1].split("data: ", 1)[1])
    assert completed["type"] == "response.completed"
    (message,) = completed["response"]["output"]
    assert len(message["content"][0]["logprobs"]) == 121 and message["content"][0]["text"] == "a" * 120 + "!"
    assert json.loads(store.get(completed["response"]["id"]).body) == completed["response"]


def test_a_large_collected_answer_is_built_and_encoded_off_the_loop() -> None:
    """Past LARGE_ANSWER a collected answer (Responses' and chat's alike: Serving._collect) is built and encoded in a
    native thread. Checked here, not by a /health poll: an answer the suite can generate builds in < 50 ms on the loop
    (test_server_robust's large answer), too little for a hold a loaded machine cannot mimic."""
    built: list[int] = []

    class Recording(ResponseCollector):
        def build(self, usage: Usage | None) -> Json | bytes:
            built.append(threading.get_ident())
            return super().build(usage)

    batch = Batch(Submitted(1, None, [1]))
    last = Event(text="!", token_ids=[2], logprobs=[_lp("!")], finish_reason="stop", usage=Usage(7, 121))
    for event in [*LONG, last]:
        batch.put(event)
    stats = SimpleNamespace(finish=lambda trace, usage, submitted: None)
    serving = Serving(None, ServerConfig(), stats)  # type: ignore[arg-type]
    try:
        answer = serving._collect(batch, Recording(_draft(include=[LOGPROBS], top_logprobs=20), ToolParsing()),
                                  SimpleNamespace(on_event=lambda event: None), {})  # type: ignore[arg-type]
    finally:
        serving.encoding.stop()
    assert len(built) == 1 and built[0] != threading.get_ident()
    (message,) = json.loads(answer.get_data())["output"]
    assert len(message["content"][0]["logprobs"]) == 121


def test_a_responses_tools_are_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The echoed tools, repeated by every event that carries the response and by the store's copies, are encoded once
    (echoed_tools): 4,000 tools held the loop ~0.2 s a stream when each encoded them again. The frames and the stored
    response hold them all the same."""
    description = "a tool encoded once " * 10
    tools = [{"type": "function", "name": f"f{i}", "description": description, "parameters": {"type": "object"}}
             for i in range(3)]
    encoded: list[str] = []

    def counted(value: Any) -> str:
        text = compact_json(value)
        encoded.extend([text] if description in text else [])
        return text

    for module in (encode_module, sse_module):
        monkeypatch.setattr(module, "compact_json", counted)
    store = ResponseStore()
    stream = ResponseEvents(_draft(store, tools=tools, tool_choice="none"), ToolParsing())
    frames = _served(stream, [Event(text="hi", token_ids=[1], finish_reason="stop", usage=Usage(3, 1))])
    events = [json.loads(frame.split("data: ", 1)[1]) for frame in frames]
    responses = [event["response"] for event in events if "response" in event]
    assert [response["status"] for response in responses] == ["in_progress", "in_progress", "completed"]
    echoed = [{**tool, "strict": True} for tool in tools]
    assert all(response["tools"] == echoed for response in responses)
    assert json.loads(store.get(responses[-1]["id"]).body)["tools"] == echoed
    assert len(encoded) == len(tools)  # each tool's description, where echoed_tools encoded the list


class _ThreadRecordingEvents(ResponseEvents):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.threads: dict[str, int] = {}  # by chunk type, the thread that framed the last one

    def frame(self, chunk: Json, split: bool = False) -> str:
        self.threads[chunk["type"]] = threading.get_ident()
        return super().frame(chunk, split)


def test_a_large_message_closed_mid_stream_is_framed_off_the_loop() -> None:
    """A call starting after a long text closes the message: its `.done` events, repeating its logprobs, are
    framed in a native thread; the deltas stay on the loop."""
    calls = [Event(text=t, token_ids=[i], logprobs=[_lp(t)]) for i, t in enumerate(CALL_TEXT)]
    calls[-1].finish_reason, calls[-1].usage = "stop", Usage(7, 124)
    stream = _ThreadRecordingEvents(_draft(include=[LOGPROBS], top_logprobs=20), ToolParsing(enabled=True))
    frames = _served(stream, [*LONG, *calls])
    here = threading.get_ident()
    assert stream.threads["response.output_text.done"] != here and stream.threads["response.content_part.done"] \
        != here
    assert stream.threads["response.output_text.delta"] == stream.threads["response.function_call_arguments.delta"]\
        == here
    message, call = json.loads(frames[-1].split("data: ", 1)[1])["response"]["output"]
    assert len(message["content"][0]["logprobs"]) == 120 and call["arguments"] == '{"zone": "UTC"}'


def test_a_large_chat_streams_last_chunk_stays_on_the_loop() -> None:
    """Chat's last chunk has the usage, not the answer: it does not wait behind other answers' encoding."""

    class Recording(ChunkBuilder):
        def frame(self, chunk: Json, split: bool = False) -> str:
            self.thread = threading.get_ident()
            return super().frame(chunk, split)

    stream = Recording("m", "fp", include_usage=True)
    frames = _served(stream, [*LONG, Event(token_ids=[2], finish_reason="stop", usage=Usage(7, 121))])
    assert stream.thread == threading.get_ident() and frames[-1] == DONE
    assert json.loads(frames[-2].split("data: ", 1)[1])["usage"]["completion_tokens"] == 121


def test_settings_are_echoed_as_openai_does() -> None:
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}},
             {"type": "function", "name": "g", "parameters": {}, "strict": False, "defer_loading": False,
              "async": False}]
    response = _draft(tools=tools, service_tier="flex").response("completed", [], None)
    assert response["error"] is None
    assert response["tools"] == [{"type": "function", "name": "f", "description": None,
                                  "parameters": {"type": "object"}, "strict": True},
                                 {"type": "function", "name": "g", "description": None, "parameters": {},
                                  "strict": False}]
    assert response["service_tier"] == "default"


def test_one_event_ending_a_call_and_starting_text() -> None:
    """The call's tail goes to the call before the text after it closes the call."""
    texts = ['<tool_call>\n{"name": "get_time", "arguments": {"zone": "UT', 'C"}}\n</tool_call>\nThen more.']
    events = [Event(text=t, token_ids=[i]) for i, t in enumerate(texts)]
    events[-1].finish_reason, events[-1].usage = "stop", Usage(7, 2)
    response, streamed = _both(events, ToolParsing(enabled=True))
    assert [kind for _, _, kind in _one_open_at_a_time(streamed)[::2]] == ["function_call", "message"]
    call, message = response["output"]
    assert call["arguments"] == '{"zone": "UTC"}' and message["content"][0]["text"] == "Then more."
    assert _without_ids(streamed[-1]["response"]) == _without_ids(response)


def test_a_response_in_progress_is_found_deleted_for_good_and_not_continued() -> None:
    service = ResponsesService(SimpleNamespace())
    service.store = store = ResponseStore()
    draft = _draft(store, input="Hello")
    entry = store.get(draft.id)
    assert not isinstance(entry, Stored) and json.loads(entry.body) == draft.created()
    assert entry.input_items == draft.inputs.listed and json.loads(entry.body)["status"] == "in_progress"
    with pytest.raises(APIError) as exc:
        service._previous(draft.id, entry)
    assert (exc.value.status, exc.value.param, exc.value.code) == (400, "previous_response_id",
                                                                  "previous_response_in_progress")
    assert store.delete(draft.id) and store.get(draft.id) is None
    finished = json.loads(_collected(draft, THOUGHT))  # answered to its client, not kept
    assert finished["status"] == "completed" and store.get(draft.id) is None
    kept = _draft(store)
    stored = store.get(json.loads(_collected(kept, THOUGHT))["id"])
    assert isinstance(stored, Stored) and stored.input_items == kept.inputs.listed
    assert [item["content"] for item in json.loads(stored.input_items)] == [[{"type": "input_text", "text": "Hi"}]]
    ended = _draft(store)
    store.end(ended.id)  # its client gone, say: found no more, and a late finish keeps nothing
    _collected(ended, THOUGHT)
    assert store.get(ended.id) is None and store._running == {} and store._running_bytes == 0


def test_the_responses_in_progress_are_bounded_like_the_store() -> None:
    """By count and by the bytes each holds (its snapshot and input), checked as it begins: past either, not begun
    (it says `store: false`)."""
    first, second, third = ({**_draft().created(), "id": f"resp_{i:032}"} for i in range(3))
    entry = len(encode_json(first)) + 2  # its snapshot and "[]"
    store = ResponseStore(max_responses=2, max_bytes=1 << 20)
    assert store.begin(first, Inputs()) and store.begin(second, Inputs())
    assert not store.begin(third, Inputs()) and store._running_bytes == 2 * entry
    store = ResponseStore(max_bytes=2 * entry + 1)
    assert store.begin(first, Inputs()) and not store.begin(second, Inputs(b"[  ]"))
    assert store.begin(second, Inputs(b"[ ]")) and store._running_bytes == 2 * entry + 1
    store.end(first["id"])
    store.end(second["id"])
    assert store._running == {} and store._running_bytes == 0


def test_a_response_is_in_progress_until_its_stream_closed_or_failed() -> None:
    store = ResponseStore()

    def begun(respond: Callable[[], Any]) -> tuple[str, Any]:
        draft = _draft(store)
        seen = []  # whether the response was in progress while answering

        def answering() -> Any:
            seen.append(store.get(draft.id) is not None)
            return respond()

        answer = kept_in_progress(partial(store.end, draft.id), answering)
        assert seen == [True]
        return draft.id, answer

    def failing() -> Any:
        raise APIError(500, "engine error")

    with pytest.raises(APIError):
        begun(failing)
    assert store._running == {}
    response_id, streamed = begun(lambda: Response(iter(["event"])))
    assert store.get(response_id) is not None  # until the server closes the stream, read or not
    streamed.close()
    assert store._running == {} and store._running_bytes == 0


def _creating(store: ResponseStore, submit: Callable[[], Batch], respond: Callable[[], Any]) -> ResponsesService:
    """A service whose create submits and answers with these."""
    serving = _serving(respond=lambda batch, stream, collector, trace, environ: respond())
    service = ResponsesService(SimpleNamespace(
        serving=serving, params=lambda chat: SamplingParams(), encode=lambda chat, max_tokens, name: [1],
        submit=lambda chat, params, prompt, name, admission: submit()))
    service.store = store
    return service


def test_only_a_stream_is_in_progress_in_the_store_begun_before_it_is_submitted() -> None:
    """A response answered whole is not found before it ends (nobody knows its id): it holds no room among the
    responses in progress. A stream begins before its request is submitted, and ends if submitting fails."""
    store = ResponseStore()
    running: list[int] = []

    def respond() -> Response:
        running.append(len(store._running))
        return Response(iter(["event"]))

    def batch() -> Batch:
        return Batch(Submitted(1, None, [1]))

    _creating(store, batch, respond).create({"input": "Hi"}, Budget(), {})
    _creating(store, batch, respond).create({"input": "Hi", "stream": True}, Budget(), {}).close()
    assert running == [0, 1] and store._running == {}

    def refused() -> Batch:
        running.append(len(store._running))
        raise APIError(503, "queue full")

    with pytest.raises(APIError):
        _creating(store, refused, respond).create({"input": "Hi", "stream": True}, Budget(), {})
    assert running[-1] == 1 and store._running == {}

    def failing_begin(response: Json, inputs: Inputs, output_ids: object) -> bytes | None:
        raise MemoryError

    store.begin = failing_begin  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        _creating(store, refused, respond).create({"input": "Hi", "stream": True}, Budget(), {})
    assert len(running) == 3  # nothing submitted: no batch left unaborted, no stats left open
