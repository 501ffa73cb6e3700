"""A stop string's tokens and logprobs through `gunicorn -k gevent server:app`: the text is cut before the stop string,
and the tokens that spelled only the text cut away are not listed (llama.cpp drops the stop word's tokens too; vLLM
lists them, its text and logprobs then disagreeing): the tokens listed spell the answer, chat and legacy, streamed or
not, each choice of n, whether the answer reasons first. Greedy on the tiny random checkpoint: the answer with a stop
string is the free answer's first tokens, so the stop string is made to begin at a token of the free answer."""
from __future__ import annotations

import json
from typing import Any

import pytest
import requests

from chat_http import MODEL, sse_events, sse_payloads
from server_process import GunicornServer

MAX_TOKENS = 24
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": MAX_TOKENS,
        "temperature": 0, "logprobs": True, "top_logprobs": 1}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
LEGACY = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 1}


def _post(server: GunicornServer, path: str, body: dict[str, Any]) -> requests.Response:
    answer = requests.post(f"{server.url}{path}", json=body, timeout=300, stream=bool(body.get("stream")))
    assert answer.status_code == 200, answer.text
    return answer


def chat_tokens(server: GunicornServer, body: dict[str, Any]) -> list[tuple[list[str], str, str]]:
    """Each choice's (tokens listed, content, finish reason), collected or streamed as `body` asks."""
    answer = _post(server, "/v1/chat/completions", body)
    if not body.get("stream"):
        return [([t["token"] for t in c["logprobs"]["content"]], c["message"]["content"], c["finish_reason"])
                for c in answer.json()["choices"]]
    choices: dict[int, tuple[list[str], list[str], list[str]]] = {}
    for payload in sse_payloads(answer):
        for c in [] if payload == "[DONE]" else json.loads(payload)["choices"]:
            tokens, text, reason = choices.setdefault(c["index"], ([], [], []))
            tokens += [t["token"] for t in (c["logprobs"] or {}).get("content") or []]
            text.append(c["delta"].get("content") or "")
            reason += [c["finish_reason"]] if c["finish_reason"] else []
    return [(tokens, "".join(text), reason[0]) for _, (tokens, text, reason) in sorted(choices.items())]


def legacy_tokens(server: GunicornServer, body: dict[str, Any]) -> list[tuple[list[str], str, str]]:
    """Each choice's (tokens listed, text, finish reason) of a legacy completion, collected or streamed."""
    answer = _post(server, "/v1/completions", body)
    if not body.get("stream"):
        return [(c["logprobs"]["tokens"], c["text"], c["finish_reason"]) for c in answer.json()["choices"]]
    choices: dict[int, tuple[list[str], list[str], list[str]]] = {}
    for payload in sse_payloads(answer):
        for c in [] if payload == "[DONE]" else json.loads(payload)["choices"]:
            tokens, text, reason = choices.setdefault(c["index"], ([], [], []))
            tokens += (c["logprobs"] or {}).get("tokens") or []
            text.append(c["text"])
            reason += [c["finish_reason"]] if c["finish_reason"] else []
    return [(tokens, "".join(text), reason[0]) for _, (tokens, text, reason) in sorted(choices.items())]


def stop_at(tokens: list[str]) -> tuple[int, str]:
    """(k, a stop string that first occurs where free token k begins, running on into token k + 1): the answer with it
    is tokens[:k]."""
    text = "".join(tokens)
    for k in range(2, len(tokens) - 2):
        start = len("".join(tokens[:k]))
        stop = tokens[k] + tokens[k + 1][:1]
        if tokens[k].strip() and "\ufffd" not in "".join(tokens[k - 1 : k + 2]) and text.find(stop) == start:
            return k, stop
    raise AssertionError(f"no stop string to cut {tokens} at")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("settings", [NO_THINKING, {**NO_THINKING, "n": 2}, {}], ids=["plain", "n2", "thinking"])
def test_a_chat_answers_tokens_listed_spell_its_text_up_to_the_stop_string(
        server: GunicornServer, stream: bool, settings: dict[str, Any]) -> None:
    """On main the stop string's tokens were listed: the tokens joined ran past the content."""
    [(free, content, reason), *_] = chat_tokens(server, {**CHAT, **settings})
    assert reason == "length" and len(free) == MAX_TOKENS
    k, stop = stop_at(free)
    choices = chat_tokens(server, {**CHAT, **settings, "stop": [stop], "stream": stream})
    assert len(choices) == settings.get("n", 1)
    for tokens, text, reason in choices:
        assert (tokens, reason) == (free[:k], "stop")
        if "chat_template_kwargs" in settings:  # without a thought the content is the answer's whole text
            assert "".join(tokens) == text == content[: len(text)]


def test_the_openai_client_reads_a_stop_strings_answer_and_its_logprobs(server: GunicornServer) -> None:
    """The official client parses the collected answer and the stream (its role chunk's `logprobs: {content: []}`,
    the chunks whose logprobs waited with their text) into the tokens the raw answer lists."""
    [(free, _, _)] = chat_tokens(server, {**CHAT, **NO_THINKING})
    k, stop = stop_at(free)
    body = {**CHAT, "stop": [stop], "extra_body": NO_THINKING}
    client = server.openai_client()
    [choice] = client.chat.completions.create(**body).choices
    assert [t.token for t in choice.logprobs.content] == free[:k] and choice.finish_reason == "stop"
    chunks = [c for chunk in client.chat.completions.create(**body, stream=True) for c in chunk.choices]
    streamed = [t.token for c in chunks if c.logprobs and c.logprobs.content for t in c.logprobs.content]
    assert streamed == free[:k] and "".join(c.delta.content or "" for c in chunks) == choice.message.content
    assert chunks[0].delta.role == "assistant" and chunks[0].logprobs.content == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_legacy_completions_tokens_listed_spell_its_text_up_to_the_stop_string(
        server: GunicornServer, stream: bool) -> None:
    [(free, _, reason)] = legacy_tokens(server, LEGACY)
    assert reason == "length" and len(free) == MAX_TOKENS
    k, stop = stop_at(free)
    [(tokens, text, reason)] = legacy_tokens(server, {**LEGACY, "stop": stop, "stream": stream})
    assert (tokens, reason) == (free[:k], "stop") and "".join(tokens) == text


@pytest.mark.parametrize("stream", [False, True])
def test_tokens_held_for_a_stop_string_that_does_not_come_are_listed(server: GunicornServer, stream: bool) -> None:
    """min_tokens past the stop string's place (vLLM's: no stop string ends the answer before it): the tokens held
    while it might have been one all go out, in order, by the end; on the legacy endpoint too."""
    [(free, content, _)] = chat_tokens(server, {**CHAT, **NO_THINKING})
    k, stop = stop_at(free)
    assert stop not in content[len("".join(free[: k + 2])) - len(stop) + 1:]  # else it would end the answer after all
    unchecked = {"stop": [stop], "min_tokens": k + 2, "stream": stream}
    [(tokens, text, reason)] = chat_tokens(server, {**CHAT, **NO_THINKING, **unchecked})
    assert (tokens, text, reason) == (free, content, "length")
    [(legacy, legacy_text, _)] = legacy_tokens(server, LEGACY)
    k, stop = stop_at(legacy)
    assert stop not in legacy_text[len("".join(legacy[: k + 2])) - len(stop) + 1:]
    [(tokens, _, reason)] = legacy_tokens(server, {**LEGACY, **unchecked, "stop": stop, "min_tokens": k + 2})
    assert (tokens, reason) == (legacy, "length")


def test_a_responses_text_lists_the_tokens_of_its_text(server: GunicornServer) -> None:
    """Responses take no stop string; their text's logprobs, collected and streamed, are its tokens' (the collected
    response's events no longer build the bytes-less list only its stream sends)."""
    body = {"model": MODEL, "input": "Tell me a story", "max_output_tokens": MAX_TOKENS, "temperature": 0,
            "top_logprobs": 1, "include": ["message.output_text.logprobs"], **NO_THINKING}
    [message] = _post(server, "/v1/responses", body).json()["output"]
    [part] = message["content"]
    assert "".join(lp["token"] for lp in part["logprobs"]) == part["text"]
    assert all("bytes" in lp for lp in part["logprobs"])
    deltas = [json.loads(data) for kind, data in sse_events(_post(server, "/v1/responses", {**body, "stream": True}))
              if kind == "response.output_text.delta"]
    assert [lp["token"] for d in deltas for lp in d["logprobs"]] == [lp["token"] for lp in part["logprobs"]]
    assert all("bytes" not in lp for d in deltas for lp in d["logprobs"])
