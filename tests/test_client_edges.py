"""Edge values and round trips an OpenAI client user sends, found by probing the real server (the shared tiny
checkpoint server, fp32) with the official `openai` client and raw HTTP: each is what OpenAI's API does."""
from __future__ import annotations

from typing import Any

import openai
import pytest
import requests

from chat_http import MODEL, post_chat
from server_process import GunicornServer

USER = [{"role": "user", "content": "What is the best book?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def client(chat_server: GunicornServer) -> openai.OpenAI:
    return chat_server.openai_client()


def _ok(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def test_top_p_0_keeps_the_most_likely_token_alone(chat_server: GunicornServer) -> None:
    """OpenAI takes top_p 0 (the spec's range is 0.0-1.0): only the most likely token survives, so a sampled
    answer is the greedy one; chat, legacy completions and Responses (which echoes it) alike."""
    greedy = _ok(post_chat(chat_server, {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 0,
                                         **NO_THINKING}))["choices"][0]["message"]["content"]
    sampled = _ok(post_chat(chat_server, {"model": MODEL, "messages": USER, "max_tokens": 8, "temperature": 1.5,
                                          "top_p": 0, "n": 3, "seed": 5, **NO_THINKING}))
    assert [c["message"]["content"] for c in sampled["choices"]] == [greedy] * 3
    completion = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6}
    texts = [_ok(requests.post(f"{chat_server.url}/v1/completions", json={**completion, **extra}, timeout=120))
             ["choices"][0]["text"] for extra in ({"temperature": 0}, {"temperature": 1.0, "top_p": 0, "seed": 9})]
    assert texts[0] == texts[1]
    response = _ok(requests.post(f"{chat_server.url}/v1/responses", json={
        "model": MODEL, "input": "Hi", "max_output_tokens": 16, "temperature": 1.0, "top_p": 0}, timeout=120))
    assert response["top_p"] == 0 and response["status"] in ("completed", "incomplete")
    error = post_chat(chat_server, {"model": MODEL, "messages": USER, "top_p": -0.01}).json()["error"]
    assert error["param"] == "top_p"


def test_the_clients_dumped_assistant_message_goes_back_into_the_history(client: openai.OpenAI) -> None:
    """`messages.append(reply.choices[0].message.model_dump())` sends every field of the client's message type,
    `annotations: null` among them (and an answer with citations a list): the next turn takes them, as vLLM does;
    only an assistant message has them."""
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0,
                                           extra_body=NO_THINKING)
    dumped = reply.choices[0].message.model_dump()
    assert dumped["annotations"] is None
    cited = {**dumped, "annotations": [{"type": "url_citation", "url_citation": {
        "start_index": 0, "end_index": 1, "title": "t", "url": "https://example.com"}}]}
    follow_up = {"role": "user", "content": "And the second best?"}
    answers = [client.chat.completions.create(model=MODEL, messages=[*USER, message, follow_up], max_tokens=3,
                                              temperature=0, extra_body=NO_THINKING)
               for message in (dumped, cited, reply.choices[0].message)]
    assert len({a.choices[0].message.content for a in answers}) == 1  # the annotations are not in the prompt
    assert len({a.usage.prompt_tokens for a in answers}) == 1
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{**USER[0], "annotations": cited["annotations"]}],
                                       max_tokens=2)
    assert info.value.param == "messages.[0]"


def test_a_call_cut_short_goes_back_into_the_history(chat_server: GunicornServer, client: openai.OpenAI) -> None:
    """A forced call cut by max_tokens keeps its arguments so far (`{"` here): sent back with its tool answer, as an
    agent loop does, it was a 400 on every later turn; the next turn's prompt shows it as written."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=12, temperature=0, tools=tools,
                                           tool_choice="required", extra_body=NO_THINKING)
    [call] = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "length" and call.function.arguments == '{"'
    history = [*USER, reply.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "failed"}]
    assert client.chat.completions.create(model=MODEL, messages=history, max_tokens=2, tools=tools).choices
    ids = _ok(requests.post(f"{chat_server.url}/tokenize", json={"model": MODEL, "messages": history, "tools": tools},
                            timeout=60))["tokens"]
    prompt = _ok(requests.post(f"{chat_server.url}/detokenize", json={"model": MODEL, "tokens": ids}, timeout=60))
    assert '<tool_call>\n{"name": "f", "arguments": {"}\n</tool_call>' in prompt["prompt"]


@pytest.mark.parametrize("arguments", [
    "city=Paris", "[" * 5000 + "]" * 5000,  # was a 500 once: RecursionError
    '{"city": "\\ud800"}',  # was a 500 once, decoded: the tokenizer got a lone surrogate
    '{"city": NaN}', '{"city": 1e309}', "[1]",
])
def test_malformed_arguments_in_the_history_are_written_as_sent(chat_server: GunicornServer, arguments: str) -> None:
    """Arguments that are no JSON object (what a model writes, cut short or malformed) are not decoded: the prompt
    holds them as sent, never a 500."""
    call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    messages = [*USER, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c",
                                                                       "content": "sunny"}]
    ids = _ok(requests.post(f"{chat_server.url}/tokenize", json={"model": MODEL, "messages": messages},
                            timeout=60))["tokens"]
    prompt = _ok(requests.post(f"{chat_server.url}/detokenize", json={"model": MODEL, "tokens": ids}, timeout=60))
    assert f'"arguments": {arguments}}}\n</tool_call>' in prompt["prompt"]
    if len(ids) < 1000:
        assert _ok(post_chat(chat_server, {"model": MODEL, "messages": messages, "max_tokens": 2}))["choices"]
