"""Earlier reasoning sent back by clients, through `gunicorn -k gevent server:app`: Responses `reasoning` items in the
shapes agent frameworks replay (whole, only an id, cut with no item after it, opaque) and chat's assistant messages
carrying `reasoning_content`, `reasoning` or `<think>` in their content. Each renders the prompt the equivalent
`previous_response_id` or chat history renders (Qwen3's template keeps the reasoning of the turns after the last
user message), or is refused by name."""
from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import requests

from chat_http import MODEL
from server_process import GunicornServer

GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 16, "reasoning": {"effort": "none"}}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_time", "description": "The time", "parameters": TIME, "strict": True}]
QUESTION = {"role": "user", "content": "What time is it?"}
MORE = {"role": "user", "content": "And in CET?"}
THOUGHT = {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Ask the clock."}]}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_time", "arguments": '{"zone": "UTC"}'}
OUTPUT = {"type": "function_call_output", "call_id": "call_1", "output": "12:00"}
CHAT_CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
Json = dict[str, Any]


def _create(server: GunicornServer, body: Json) -> Json:
    answer = requests.post(f"{server.url}/v1/responses", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _refusal(server: GunicornServer, items: list[Json], status: int = 400) -> Json:
    answer = requests.post(f"{server.url}/v1/responses", json={**GREEDY, "tools": TOOLS, "input": items}, timeout=60)
    assert answer.status_code == status, answer.text
    return answer.json()["error"]


def _counted(server: GunicornServer, items: list[Json]) -> int:
    answer = requests.post(f"{server.url}/v1/responses/input_tokens", timeout=60,
                           json={"model": MODEL, "tools": TOOLS, "input": items})
    assert answer.status_code == 200, answer.text
    return answer.json()["input_tokens"]


def _chat_tokens(server: GunicornServer, messages: list[Json]) -> list[int]:
    answer = requests.post(f"{server.url}/tokenize", timeout=60,
                           json={"model": MODEL, "messages": messages, "tools": CHAT_TOOLS})
    assert answer.status_code == 200, answer.text
    return answer.json()["tokens"]


def _answer(response: Json) -> tuple[int, str]:
    (message,) = response["output"]
    return response["usage"]["input_tokens"], message["content"][0]["text"]


def test_a_replayed_history_makes_the_prompt_of_its_previous_response_id(server: GunicornServer) -> None:
    """A tool loop's reasoning (after the last user message: Qwen3's template keeps it) continued by
    previous_response_id, and replayed by a client that stores nothing: whole, or its reasoning item as only the id
    of the stored one (clients that keep ids and drop the text). The same prompt and greedy answer each way."""
    first = _create(server, {**GREEDY, "tools": TOOLS, "input": [QUESTION, THOUGHT, CALL, OUTPUT]})
    stored = requests.get(f"{server.url}/v1/responses/{first['id']}/input_items?order=asc", timeout=30).json()
    thought_id = stored["data"][1]["id"]
    continued = _create(server, {**GREEDY, "tools": TOOLS, "previous_response_id": first["id"]})
    whole = _create(server, {**GREEDY, "tools": TOOLS, "store": False,
                             "input": [QUESTION, THOUGHT, CALL, OUTPUT, *first["output"]]})
    bare = {"type": "reasoning", "id": thought_id, "summary": []}
    by_id = _create(server, {**GREEDY, "tools": TOOLS, "store": False,
                             "input": [QUESTION, bare, CALL, OUTPUT, *first["output"]]})
    textless = {**bare, "summary": [{"type": "summary_text", "text": ""}], "content": []}  # no text: only its id
    assert _answer(_create(server, {**GREEDY, "tools": TOOLS, "store": False,
                                    "input": [QUESTION, textless, CALL, OUTPUT, *first["output"]]})) == _answer(by_id)
    unthought = _create(server, {**GREEDY, "tools": TOOLS, "store": False,
                                 "input": [QUESTION, CALL, OUTPUT, *first["output"]]})
    assert _answer(continued) == _answer(whole) == _answer(by_id)
    assert _answer(unthought)[0] < _answer(by_id)[0]  # the reasoning is in the prompt


def test_reasoning_that_no_output_follows_is_a_turn_of_its_own(server: GunicornServer) -> None:
    """An answer cut in its reasoning (its output a reasoning item alone) replayed, or continued: the turn chat's
    client resends for it (no text, its reasoning), not a later turn's reasoning nor dropped."""
    cut = {"role": "assistant", "content": "", "reasoning_content": "Ask the clock."}
    assert _counted(server, [QUESTION, THOUGHT, MORE]) == len(_chat_tokens(server, [QUESTION, cut, MORE]))
    assert _counted(server, [QUESTION, THOUGHT]) == len(_chat_tokens(server, [QUESTION, cut]))
    # a later tool turn does not take it as its reasoning
    turn = {"role": "assistant", "content": None, "tool_calls": CHAT_CALLS}
    tool = {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}
    assert _counted(server, [QUESTION, THOUGHT, MORE, CALL, OUTPUT]) == len(
        _chat_tokens(server, [QUESTION, cut, MORE, turn, tool]))
    # nor splits a call from its output: it waits for the next message (or the next assistant turn); the same count
    # either way, so the greedy answers of the two prompts are compared
    split = _create(server, {**GREEDY, "tools": TOOLS, "input": [QUESTION, CALL, THOUGHT, OUTPUT, MORE]})
    chat = requests.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [QUESTION, turn, tool, cut, MORE], "tools": CHAT_TOOLS, "temperature": 0,
        "max_tokens": 16, "reasoning_effort": "none"}).json()
    assert _answer(split) == (chat["usage"]["prompt_tokens"], chat["choices"][0]["message"]["content"])


def test_an_empty_encrypted_content_is_none(server: GunicornServer) -> None:
    """`encrypted_content: ""` says nothing, as null (OpenAI's is null where not populated; OpenAI-compatible servers
    send ""): the item's summary is its reasoning, and an item with only an id besides stands for the stored one. It
    hid the summary (the reasoning dropped from the prompt), and the id (the item dropped, never looked up)."""
    summary = [{"type": "summary_text", "text": "Ask the clock."}]
    cut = {"role": "assistant", "content": "", "reasoning_content": "Ask the clock."}
    expected = len(_chat_tokens(server, [QUESTION, cut, MORE]))
    for empty in ("", None):
        summarised = {"type": "reasoning", "summary": summary, "encrypted_content": empty}
        assert _counted(server, [QUESTION, summarised, MORE]) == expected, empty
    first = _create(server, {**GREEDY, "tools": TOOLS, "input": [QUESTION, THOUGHT, CALL, OUTPUT]})
    thought_id = requests.get(f"{server.url}/v1/responses/{first['id']}/input_items?order=asc",
                              timeout=30).json()["data"][1]["id"]
    by_id = _counted(server, [QUESTION, {"type": "reasoning", "id": thought_id, "summary": []}, CALL, OUTPUT])
    assert by_id == _counted(server, [QUESTION, THOUGHT, CALL, OUTPUT])
    assert _counted(server, [QUESTION, {"type": "reasoning", "id": thought_id, "summary": [], "encrypted_content": ""},
                             CALL, OUTPUT]) == by_id
    error = _refusal(server, [QUESTION, {"type": "reasoning", "summary": [], "encrypted_content": ""}, CALL, OUTPUT])
    assert error["param"] == "input.[1]" and "content, encrypted_content or summary" in error["message"]


def test_reasoning_items_that_cannot_be_read_are_refused_by_name(server: GunicornServer) -> None:
    """Never dropped silently: the id of no stored item (OpenAI's 404, word for word: clients recover by it), an
    item with neither text nor id (empty texts are none), the id of an item that is no reasoning, an encrypted_content
    this server did not issue (OpenAI's own, a Fernet token)."""
    error = _refusal(server, [QUESTION, {"type": "reasoning", "id": "rs_unknown", "summary": []}, CALL, OUTPUT], 404)
    assert error == {"message": "Item with id 'rs_unknown' not found. Items are not persisted when `store` is set to "
                                "false. Try again with `store` set to true, or remove this item from your input.",
                     "type": "invalid_request_error", "param": "input", "code": None}
    for textless in ({"type": "reasoning", "summary": []},
                     {"type": "reasoning", "summary": [{"type": "summary_text", "text": ""}], "content": []}):
        error = _refusal(server, [QUESTION, textless, CALL, OUTPUT])
        assert error["param"] == "input.[1]" and "content, encrypted_content or summary" in error["message"]
    first = _create(server, {**GREEDY, "input": [QUESTION]})
    message_id = first["output"][0]["id"]
    error = _refusal(server, [QUESTION, {"type": "reasoning", "id": message_id, "summary": []}, CALL, OUTPUT])
    assert error["param"] == "input.[1].id" and "not a reasoning item" in error["message"]
    foreign = {"type": "reasoning", "id": "rs_x", "summary": [], "encrypted_content": "gAAAAABpQ2VjcmV0dG9rZW4="}
    error = _refusal(server, [QUESTION, foreign, CALL, OUTPUT])
    assert error["param"] == "input.[1].encrypted_content", error
    # the OpenAPI document says so too (profiles/fuzz_openapi.py sends what it offers)
    doc = requests.get(f"{server.url}/openapi.json", timeout=30).json()
    body = doc["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator({**body, "components": doc["components"]})
    assert not validator.is_valid({"model": MODEL, "input": [QUESTION, {"type": "reasoning", "summary": []}]})
    assert not validator.is_valid({"model": MODEL, "input": [QUESTION, {"type": "reasoning", "content": [
        {"type": "reasoning_text", "text": ""}], "summary": []}]})
    assert not validator.is_valid({"model": MODEL, "input": [QUESTION, {"type": "reasoning", "summary": [],
                                                                        "encrypted_content": ""}]})
    assert validator.is_valid({"model": MODEL, "input": [QUESTION, THOUGHT]})
    assert validator.is_valid({"model": MODEL, "input": [QUESTION, {"type": "reasoning", "id": "rs_1"}]})


@pytest.mark.parametrize("last", [True, False], ids=["kept", "before-the-last-question"])
def test_chat_reasoning_fields_and_think_tags_render_alike(server: GunicornServer, last: bool) -> None:
    """An assistant message's reasoning as `reasoning_content` (vLLM's, DeepSeek's), `reasoning` (the newer name)
    or `<think>…</think>` in its content (what the template itself splits off) makes one prompt; the template keeps
    it on the last turn and drops it before a later user message."""
    tail = [] if last else [MORE]
    shapes = [{"content": "Noon.", "reasoning_content": "Ask."}, {"content": "Noon.", "reasoning": "Ask."},
              {"content": "<think>\nAsk.\n</think>\n\nNoon."}]
    prompts = [_chat_tokens(server, [QUESTION, {"role": "assistant", **shape}, *tail]) for shape in shapes]
    unthought = _chat_tokens(server, [QUESTION, {"role": "assistant", "content": "Noon."}, *tail])
    assert prompts[0] == prompts[1] == prompts[2]
    assert (prompts[0] != unthought) == last
