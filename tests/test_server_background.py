"""Background responses (`background: true`) through `gunicorn -k gevent server:app` and the `openai` client: polled,
cancelled, deleted, a background stream resumed after its client went away or followed through a last burst of
events larger than the cap, and the 429 past MAX_RUNNING."""
from __future__ import annotations

from typing import Any

import openai
import pytest
import requests
from openai.types.responses import Response

from chat_http import MODEL, engine_idle, post_chat, server_stats
from nanoqwen.api.responses_background import MAX_RUNNING
from nanoqwen.settings import EngineConfig
from responses_util import RUNNING, polled
from server_process import GunicornServer
from waits import wait_for

GREEDY = {"model": MODEL, "temperature": 0, "max_output_tokens": 16, "reasoning": {"effort": "none"}}
LONG = {**GREEDY, "max_output_tokens": 400, "input": "Tell me a long story."}  # cancelled long before its end


@pytest.fixture(scope="module")
def client(chat_server: GunicornServer) -> openai.OpenAI:
    return chat_server.openai_client(timeout=300)


def _outcomes(chat_server: GunicornServer) -> tuple[int, int]:
    """/stats' counts of requests served and aborted."""
    stats = server_stats(chat_server)
    return stats["requests_served"], stats["requests_aborted"]


def _started(client: openai.OpenAI, events: int, **body: Any) -> tuple[str, list[Any]]:
    """A background stream's id and its first `events` events, its client gone after them."""
    with client.responses.create(background=True, stream=True, **body) as stream:
        seen = [event for _, event in zip(range(events), stream)]
    return seen[0].response.id, seen


def test_a_background_stream_resumes_with_create_s_include(client: openai.OpenAI) -> None:
    """The openai client resumes with create's `include` (`retrieve(id, stream=True, include=[...])`): the events
    replayed carry its parts. A value create did not name is a 400 naming `include`: the events are replayed as they
    were sent."""
    scored = ["message.output_text.logprobs"]
    response_id, first = _started(client, 6, **GREEDY, input="Tell me a story.", include=scored, top_logprobs=2)
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=5, include=scored))
    deltas = [e for e in [*first, *rest] if e.type == "response.output_text.delta"]
    assert deltas and all(e.logprobs and all(len(p.top_logprobs) == 2 for p in e.logprobs) for e in deltas)
    assert rest[-1].response.output[0].content[0].logprobs
    with pytest.raises(openai.BadRequestError) as more:
        list(client.responses.retrieve(response_id, stream=True, include=[*scored, "reasoning.encrypted_content"]))
    assert more.value.body["param"] == "include" and "reasoning.encrypted_content" in more.value.body["message"]


def test_a_background_response_is_polled_to_the_foreground_answer(client: openai.OpenAI) -> None:
    body = {**GREEDY, "input": "Hello there", "instructions": "Answer briefly.", "metadata": {"k": "v"}}
    queued = client.responses.create(background=True, **body)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    assert queued.usage is None and queued.store is True and queued.metadata == {"k": "v"}
    done = polled(client, queued.id)
    whole = client.responses.create(**body)
    assert whole.background is False and done.background is True and done.id == queued.id
    assert done.output_text == whole.output_text != "" and done.status == whole.status == "incomplete"
    assert (done.usage.input_tokens, done.usage.output_tokens) == (whole.usage.input_tokens, 16)
    assert [item.id for item in client.responses.input_items.list(done.id).data] == [
        item.id for item in client.responses.input_items.list(queued.id).data]
    # finished: cancelling answers it as it is (OpenAI: idempotent); continued like any stored response
    assert client.responses.cancel(done.id).model_dump() == done.model_dump()
    follow = client.responses.create(input="More.", previous_response_id=done.id, background=True, **GREEDY)
    assert polled(client, follow.id).usage.input_tokens > done.usage.input_tokens


def test_a_background_stream_resumes_after_its_client_left(client: openai.OpenAI, chat_server: GunicornServer) -> None:
    body = {**GREEDY, "max_output_tokens": 48, "input": "Tell me a story."}
    response_id, first = _started(client, 6, **body)
    assert [e.sequence_number for e in first] == list(range(6)) and first[0].response.background is True
    done = polled(client, response_id)  # generated to its end without a client
    assert done.status == "incomplete" and done.usage.output_tokens == 48
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=5, include_obfuscation=False))
    assert [e.sequence_number for e in rest] == list(range(6, 6 + len(rest)))
    assert rest[-1].type == "response.incomplete" and rest[-1].response.model_dump() == done.model_dump()
    text = "".join(e.delta for e in [*first, *rest] if e.type == "response.output_text.delta")
    assert text == done.output_text == client.responses.create(**body).output_text
    # at its last event: nothing more to send; past it: a 400 (it resent older events, then cut the stream short)
    assert list(client.responses.retrieve(response_id, stream=True, starting_after=rest[-1].sequence_number)) == []
    with pytest.raises(openai.BadRequestError) as past:
        list(client.responses.retrieve(response_id, stream=True, starting_after=rest[-1].sequence_number + 1))
    assert past.value.body["param"] == "starting_after", past.value.body
    # replayed whole while it generates, and followed live to its end
    response_id, _ = _started(client, 1, **body)
    replay = list(client.responses.retrieve(response_id, stream=True))
    assert [e.sequence_number for e in replay] == list(range(len(replay))) and replay[-1].type == "response.incomplete"
    assert "".join(e.delta for e in replay if e.type == "response.output_text.delta") == done.output_text


def test_a_live_follower_gets_a_last_burst_of_events_larger_than_the_cap(client: openai.OpenAI,
                                                                         chat_server: GunicornServer) -> None:
    # its `.done` events and `response.incomplete` each repeat the answer with its logprobs: ~1.2 MB together
    body = {**GREEDY, "max_output_tokens": 176, "input": "Tell me a story.", "top_logprobs": 20,
            "include": ["message.output_text.logprobs"]}
    with client.responses.create(background=True, stream=True, **body) as stream:
        events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete" and events[-1].response.usage.output_tokens == 176
    assert len(events[-1].response.output[0].content[0].logprobs) == 176
    answer = requests.get(f"{chat_server.url}/v1/responses/{events[0].response.id}", params={"stream": "true"},
                          timeout=30)  # its follower gone, the kept events are back to the cap: the first dropped
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "starting_after", answer.text


def test_cancelling_frees_the_engine_and_keeps_the_output_so_far(client: openai.OpenAI,
                                                                 chat_server: GunicornServer) -> None:
    response_id, first = _started(client, 8, **LONG)
    assert not engine_idle(chat_server)  # its client gone, still generating
    served, aborted = _outcomes(chat_server)
    cancelled = client.responses.cancel(response_id)
    assert _outcomes(chat_server) == (served, aborted + 1)  # counted as aborted, not served, once it ended
    assert cancelled.status == "cancelled" and cancelled.background is True
    (message,) = cancelled.output
    assert message.status == "incomplete" and 0 < cancelled.usage.output_tokens < 400
    assert len(message.content[0].text) > 0 and cancelled.completed_at is None
    wait_for(lambda: engine_idle(chat_server))
    assert client.responses.cancel(response_id).model_dump() == cancelled.model_dump()  # idempotent
    raw = requests.get(f"{chat_server.url}/v1/responses/{response_id}", timeout=30).json()
    assert Response.model_validate(raw, strict=True).model_dump() == cancelled.model_dump()
    # its stream ends after its items' `.done` events (OpenAI's stream events have no cancelled one)
    events = list(client.responses.retrieve(response_id, stream=True, starting_after=7))
    assert events[-1].type == "response.output_item.done" and events[-1].item.status == "incomplete"
    text = "".join(e.delta for e in [*first, *events] if e.type == "response.output_text.delta")
    assert text == message.content[0].text
    # the text the engine held back (an incomplete UTF-8 character) is kept, as a length cut keeps it (chat's: a
    # response's max_output_tokens is at least 16)
    cut = post_chat(chat_server, {"model": MODEL, "temperature": 0, "reasoning_effort": "none",
                                  "max_tokens": cancelled.usage.output_tokens,
                                  "messages": [{"role": "user", "content": LONG["input"]}]}).json()
    assert cut["choices"][0]["message"]["content"] == text


def test_a_background_response_is_queued_until_the_engine_starts_it(client: openai.OpenAI,
                                                                    chat_server: GunicornServer) -> None:
    """Queued while a completion of max_batch choices (the server runs the default) takes every row: cancelled there
    it has no output, counts as aborted and leaves the queue; a stream's `response.queued` is followed by
    `response.in_progress` once the rows are free."""
    filler = {"model": MODEL, "prompt": "Once", "n": EngineConfig.max_batch, "max_tokens": 1000, "temperature": 0,
              "stream": True, "extra_body": {"ignore_eos": True}}
    for _ in range(3):  # tried again where a fast host finished the completion before the cancel was answered
        with client.completions.create(**filler) as completion:
            next(iter(completion))  # its rows taken
            waiting = client.responses.create(background=True, **LONG)
            streamed, opening = _started(client, 2, **{**LONG, "max_output_tokens": 16})  # queued, then short
            retrieved = client.responses.retrieve(waiting.id)
            served, aborted = _outcomes(chat_server)
            cancelled = client.responses.cancel(waiting.id)
            outcomes = _outcomes(chat_server)
            stats = server_stats(chat_server)
        # the completion still generating after the cancel: the other one still queued
        full = (stats["active_requests"], stats["queue_length"]) == (1, 1)
        if full:
            break
        polled(client, streamed)
    assert full, f"the completion of {EngineConfig.max_batch} × 1000 tokens ended before the cancel, 3 times"
    assert (waiting.status, retrieved.status) == ("queued", "queued") and waiting.output == retrieved.output == []
    assert [(e.type, e.response.status) for e in opening] == [("response.created", "queued"),
                                                              ("response.queued", "queued")]
    assert (cancelled.status, cancelled.output, cancelled.usage.output_tokens) == ("cancelled", [], 0)
    assert outcomes == (served, aborted + 1) and stats["queue_length"] == 1  # the stream's, still queued
    rest = list(client.responses.retrieve(streamed, stream=True, starting_after=1))  # started once the rows freed
    assert (rest[0].type, rest[0].sequence_number, rest[0].response.status) == ("response.in_progress", 2,
                                                                                 "in_progress")
    assert rest[-1].type in ("response.incomplete", "response.completed") and rest[-1].response.output != []
    wait_for(lambda: engine_idle(chat_server))


@pytest.mark.parametrize("stream", [False, True])
def test_deleting_a_running_background_response_cancels_it(client: openai.OpenAI, chat_server: GunicornServer,
                                                           stream: bool) -> None:
    response_id = _started(client, 3, **LONG)[0] if stream else client.responses.create(background=True, **LONG).id
    served, aborted = _outcomes(chat_server)
    assert requests.delete(f"{chat_server.url}/v1/responses/{response_id}", timeout=30).json()["deleted"] is True
    wait_for(lambda: engine_idle(chat_server) and _outcomes(chat_server) == (served, aborted + 1))
    for call in (lambda: client.responses.retrieve(response_id), lambda: client.responses.cancel(response_id),
                 lambda: client.responses.retrieve(response_id, stream=True)):
        with pytest.raises(openai.NotFoundError):
            call()


def test_past_max_running_a_create_is_a_429_with_retry_after(client: openai.OpenAI,
                                                             chat_server: GunicornServer) -> None:
    body = {**GREEDY, "max_output_tokens": 900, "input": "Tell me a long story."}
    for _ in range(3):  # tried again where a fast host ended one before the last create answered
        running = [client.responses.create(background=True, **body).id for _ in range(MAX_RUNNING)]
        answer = requests.post(f"{chat_server.url}/v1/responses", json={**body, "background": True}, timeout=30)
        # in progress after it: each was generating while it was answered (it leaves the running ones after that)
        full = all(client.responses.retrieve(response_id).status in RUNNING for response_id in running)
        for response_id in [*running, *([answer.json()["id"]] if answer.status_code == 200 else [])]:
            assert requests.delete(f"{chat_server.url}/v1/responses/{response_id}", timeout=30).json()["deleted"]
        wait_for(lambda: engine_idle(chat_server))
        if full:
            break
    assert full, f"one of {MAX_RUNNING} background responses of 900 tokens ended before the next create, 3 times"
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "1", answer.text
    assert answer.json()["error"]["code"] == "rate_limit_exceeded"
    short = client.responses.create(background=True, **GREEDY, input="Hi")
    assert short.status == "queued"
    polled(client, short.id)  # ended, so the next test finds the engine idle
    wait_for(lambda: engine_idle(chat_server))


@pytest.mark.parametrize("background", [True, False])
def test_an_item_of_a_response_in_progress_is_named_as_such(client: openai.OpenAI, chat_server: GunicornServer,
                                                           background: bool) -> None:
    """A background stream's, or a foreground stream's while its client reads it: its input and its output so far."""
    with client.responses.create(background=background, stream=True, **LONG) as stream:
        first = []
        for event in stream:
            first.append(event)
            if event.type == "response.output_item.added":
                break
        response_id = first[0].response.id
        (said,) = client.responses.input_items.list(response_id).data
        written = first[-1].item  # its message, open
        assert written.status == "in_progress"
        for item_id in (said.id, written.id):
            with pytest.raises(openai.BadRequestError) as exc:
                client.responses.create(input=[{"type": "item_reference", "id": item_id}], **GREEDY)
            assert (exc.value.body["param"], exc.value.body["code"]) == ("input.[0].id", "response_in_progress")
            assert response_id in exc.value.body["message"]
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(input="Go on.", previous_response_id=response_id, **GREEDY)
        assert (exc.value.body["param"], exc.value.body["code"]) == ("previous_response_id",
                                                                     "previous_response_in_progress")
        if background:
            client.responses.cancel(response_id)
        else:
            list(stream)
    resolved = client.responses.create(input=[{"type": "item_reference", "id": said.id}], **GREEDY)
    assert resolved.usage.input_tokens == client.responses.create(input=LONG["input"], **GREEDY).usage.input_tokens
    client.responses.create(input=[{"type": "item_reference", "id": written.id}], **GREEDY)  # found once it ended
    wait_for(lambda: engine_idle(chat_server))


@pytest.mark.parametrize("query, param", [
    ({"stream": "true"}, "stream"),  # a foreground response: no events kept
    ({"stream": "yes"}, "stream"),
    ({"starting_after": "3"}, "starting_after"),  # without stream=true
    ({"stream": "true", "starting_after": "x"}, "starting_after"),
    ({"stream": "true", "starting_after": "-1"}, "starting_after"),
    ({"include_obfuscation": "false"}, "include_obfuscation"),  # without stream=true
    ({"stream": "true", "include_obfuscation": "no"}, "include_obfuscation"),
])
def test_bad_retrievals_are_400s(client: openai.OpenAI, chat_server: GunicornServer, query: dict[str, str],
                                 param: str) -> None:
    stored = client.responses.create(input="Hi", **GREEDY)
    answer = requests.get(f"{chat_server.url}/v1/responses/{stored.id}", params=query, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


def test_bad_background_requests(client: openai.OpenAI, chat_server: GunicornServer) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(input="Hi", background=True, store=False, **GREEDY)
    assert exc.value.body["param"] == "background"
    foreground = client.responses.create(input="Hi", **GREEDY)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.cancel(foreground.id)
    assert exc.value.body["message"] == "Responses can only be cancelled if they were created with background=true."
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")
    unstreamed = client.responses.create(input="Hi", background=True, **GREEDY)  # not streamed: no events kept
    polled(client, unstreamed.id)
    answer = requests.get(f"{chat_server.url}/v1/responses/{unstreamed.id}", params={"stream": "true"}, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stream"
