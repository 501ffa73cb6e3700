"""Stored chat completions (`store: true`) through `gunicorn -k gevent server:app` and the `openai` client's
`chat.completions.retrieve/list/update/delete` and `chat.completions.messages.list`. Each test tags its completions
with a metadata value of its own and lists by it: the shared server holds other tests' completions too."""
from __future__ import annotations

import uuid
from typing import Any

import openai
import pytest
import requests

from chat_http import MODEL, engine_idle, sse_payloads
from server_process import GunicornServer
from waits import wait_for

GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 8, "reasoning_effort": "none"}
HI = [{"role": "user", "content": "Hello there"}]
Json = dict[str, Any]


def _tag() -> dict[str, str]:
    return {"test": uuid.uuid4().hex}


def _stored(client: openai.OpenAI, tag: dict[str, str], **kwargs: Any) -> Any:
    return client.chat.completions.create(messages=HI, store=True, metadata=tag, **{**GREEDY, **kwargs})


def _listed_ids(client: openai.OpenAI, **kwargs: Any) -> list[str]:
    return [completion.id for completion in client.chat.completions.list(**kwargs)]


def test_retrieve_is_create_s_answer_with_the_request_s_fields(client: openai.OpenAI) -> None:
    tag = _tag()
    created = _stored(client, tag, n=2, temperature=0.5, seed=7)
    got = client.chat.completions.retrieve(created.id)
    answer = created.model_dump(exclude_unset=True)
    assert {key: value for key, value in got.model_dump(exclude_unset=True).items() if key in answer} == answer
    assert len(got.choices) == 2 and got.choices[0].message.content
    stored = got.model_extra
    assert got.metadata == tag and stored["seed"] == 7 and stored["temperature"] == 0.5
    assert stored["tools"] is None and stored["input_user"] is None


@pytest.mark.parametrize("sent", [None, "client-req-1"])
def test_a_stored_completion_s_request_id_is_the_create_s(client: openai.OpenAI, sent: str | None) -> None:
    """OpenAI's stored completions carry `request_id` (its API reference's retrieve and list examples; not in the
    openai package's ChatCompletion type, which keeps it as an extra): the create's X-Request-Id as echoed, the
    server's or the client's, streamed too; not its id (a stored completion's is always new)."""
    tag = _tag()
    headers = {} if sent is None else {"X-Request-Id": sent}
    echoed = []
    for stream in (False, True):
        raw = client.chat.completions.with_raw_response.create(messages=HI, store=True, metadata=tag, stream=stream,
                                                               extra_headers=headers, **GREEDY)
        echoed.append(raw.headers["x-request-id"])
        created = raw.parse()
        completion_id = list(created)[0].id if stream else created.id  # a stream read to its end: kept
        assert echoed[-1] == (sent or echoed[-1]) and completion_id != f"chatcmpl-{echoed[-1]}"
        assert client.chat.completions.retrieve(completion_id).model_extra["request_id"] == echoed[-1]
    assert [c.model_extra["request_id"] for c in client.chat.completions.list(metadata=tag)] == echoed


def test_a_stream_is_stored_as_the_collected_completion(client: openai.OpenAI) -> None:
    tag = _tag()
    collected = _stored(client, tag, n=2)
    chunks = list(_stored(client, tag, n=2, stream=True, stream_options={"include_usage": True}))
    streamed = client.chat.completions.retrieve(chunks[0].id)
    assert streamed.created == chunks[0].created and streamed.usage == chunks[-1].usage == collected.usage
    assert [c.message for c in streamed.choices] == [c.message for c in collected.choices]
    assert [c.finish_reason for c in streamed.choices] == [c.finish_reason for c in collected.choices]
    texts = ["".join(chunk.choices[0].delta.content or "" for chunk in chunks
                     if chunk.choices and chunk.choices[0].index == i) for i in range(2)]
    assert texts == [c.message.content for c in streamed.choices]
    assert _listed_ids(client, metadata=tag) == [collected.id, streamed.id]


def test_list_pages_by_order_after_limit_model_and_metadata(client: openai.OpenAI) -> None:
    tag = _tag()
    ids = [_stored(client, tag).id for _ in range(3)]
    other = _stored(client, {**tag, "kind": "other"}).id
    assert _listed_ids(client, metadata=tag) == [*ids, other]  # oldest first, as OpenAI's default
    assert _listed_ids(client, metadata=tag, order="desc") == [other, *ids[::-1]]
    assert _listed_ids(client, metadata={**tag, "kind": "other"}) == [other]
    assert _listed_ids(client, metadata=tag, model=MODEL) == [*ids, other]
    assert _listed_ids(client, metadata=tag, model="another-model") == []
    page = client.chat.completions.list(metadata=tag, limit=2)
    assert [c.id for c in page.data] == ids[:2] and page.has_more
    assert [c.id for c in page.get_next_page().data] == [ids[2], other]  # after= the page's last id
    one = client.chat.completions.list(metadata=tag, after=ids[0], limit=1)
    assert [c.id for c in one.data] == [ids[1]] and (one.first_id, one.last_id) == (ids[1], ids[1])
    assert _listed_ids(client, metadata=tag, limit=1) == [*ids, other]  # every page followed


@pytest.mark.parametrize(("query", "param"), [("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order"),
                                              ("after=chatcmpl-none", "after"), ("before=x", "before")])
def test_bad_list_queries_are_400s_naming_the_param(server: GunicornServer, query: str, param: str) -> None:
    response = requests.get(f"{server.url}/v1/chat/completions?{query}", timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


KEY, VALUE = "k" * 64, "v" * 512  # OpenAI's longest metadata key and value


@pytest.mark.parametrize(("query", "param"), [
    ("metadata[k][x]=a", "metadata[k][x]"), ("metadata[k]]=a", "metadata[k]]"),
    (f"metadata[{KEY}k]=a", f"metadata[{KEY}k]"), (f"metadata[k]={VALUE}v", "metadata[k]"),
    ("&".join(f"metadata[k{i}]=a" for i in range(17)), "metadata")],
    ids=["nested", "bracket", "long-key", "long-value", "17-pairs"])
def test_a_metadata_filter_no_metadata_could_hold_is_a_400_naming_it(client: openai.OpenAI, server: GunicornServer,
                                                                     query: str, param: str) -> None:
    """A nested key, a key past 64 characters, a value past 512 or more than 16 pairs (OpenAI's metadata rules) matched
    nothing (an empty page): refused, naming the parameter. At the limits a filter still finds its completion."""
    tag = {"test": uuid.uuid4().hex, KEY: VALUE}
    created = _stored(client, tag)
    response = requests.get(f"{server.url}/v1/chat/completions?{query}", timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert _listed_ids(client, metadata=tag) == [created.id]
    assert _listed_ids(client, metadata={**tag, **{f"k{i}": "a" for i in range(14)}}) == []  # 16 pairs: a filter


def test_update_replaces_the_metadata_and_only_it(client: openai.OpenAI, server: GunicornServer) -> None:
    tag = _tag()
    created = _stored(client, tag)
    updated = client.chat.completions.update(created.id, metadata={**tag, "k": "v"})
    assert updated.metadata == {**tag, "k": "v"} and updated.choices == created.choices
    assert client.chat.completions.retrieve(created.id).metadata == {**tag, "k": "v"}
    assert _listed_ids(client, metadata={"k": "v", **tag}) == [created.id]
    url = f"{server.url}/v1/chat/completions/{created.id}"
    refused = requests.post(url, json={"metadata": {}, "temperature": 1}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature"
    bad = requests.post(url, json={"metadata": {"k": 1}}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata.k"
    missing = requests.post(url, json={}, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "metadata"
    assert client.chat.completions.retrieve(created.id).metadata == {**tag, "k": "v"}


def test_messages_list_pages_the_request_s_messages(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "How "}, {"type": "text", "text": "are you?"}]}]
    created = client.chat.completions.create(messages=messages, store=True, **GREEDY)
    listed = list(client.chat.completions.messages.list(created.id, limit=3))  # pages of 3 followed
    assert [m.id for m in listed] == [f"{created.id}-{i}" for i in range(4)]
    assert [(m.role, m.content) for m in listed] == [(m["role"], m["content"]) for m in messages[:3]] + [
        ("user", "How are you?")]
    assert listed[3].content_parts[1].text == "are you?" and listed[0].content_parts is None
    page = client.chat.completions.messages.list(created.id, order="desc", limit=2)
    assert [m.id for m in page.data] == [listed[3].id, listed[2].id] and page.has_more
    last = client.chat.completions.messages.list(created.id, order="desc", after=listed[1].id)
    assert [m.id for m in last.data] == [listed[0].id] and not last.has_more


def test_delete_then_404_and_store_false_is_not_kept(client: openai.OpenAI) -> None:
    tag = _tag()
    created = _stored(client, tag)
    deleted = client.chat.completions.delete(created.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (created.id, True, "chat.completion.deleted")
    for call in (client.chat.completions.retrieve, client.chat.completions.delete,
                 client.chat.completions.messages.list):
        with pytest.raises(openai.NotFoundError) as exc:
            call(created.id)
        assert exc.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.update(created.id, metadata={})
    unstored = client.chat.completions.create(messages=HI, metadata=tag, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(unstored.id)
    assert _listed_ids(client, metadata=tag) == []


def test_a_stored_completion_s_id_is_the_server_s_never_the_client_s(client: openai.OpenAI) -> None:
    """A retry resends its request id (X-Request-Id, the body's `request_id`): a stored completion's id is a new one
    each time, never the client's, so none replaces another; the header still comes back as sent."""
    tag = _tag()
    answers = [client.chat.completions.with_raw_response.create(
        messages=HI, store=True, metadata=tag, extra_headers={"X-Request-Id": "retried"},
        extra_body={"request_id": "retried"}, **GREEDY) for _ in range(2)]
    assert [answer.headers["X-Request-Id"] for answer in answers] == ["retried", "retried"]
    ids = [answer.parse().id for answer in answers]
    assert ids[0] != ids[1] and "retried" not in ids[0] + ids[1]
    assert _listed_ids(client, metadata=tag) == ids
    unstored = client.chat.completions.create(messages=HI, extra_headers={"X-Request-Id": "retried"}, **GREEDY)
    assert unstored.id == "chatcmpl-retried"  # vLLM's, when not stored


def test_paging_while_deleting_each_completion_listed(client: openai.OpenAI) -> None:
    """The openai client's auto-paging asks for the page after the last one listed, which the loop deleted."""
    tag = _tag()
    ids = [_stored(client, tag).id for _ in range(5)]
    deleted = []
    for completion in client.chat.completions.list(metadata=tag, limit=2):
        client.chat.completions.delete(completion.id)
        deleted.append(completion.id)
    assert deleted == ids and _listed_ids(client, metadata=tag) == []


def test_paging_after_a_cursor_updated_out_of_the_filter(client: openai.OpenAI) -> None:
    tag = _tag()
    ids = [_stored(client, tag).id for _ in range(3)]
    page = client.chat.completions.list(metadata=tag, limit=2)
    client.chat.completions.update(ids[1], metadata={"test": "moved"})
    assert [c.id for c in page.get_next_page().data] == [ids[2]]


@pytest.mark.parametrize(("method", "query", "param"), [("delete", "foo=1", "foo"), ("post", "foo=1", "foo"),
                                                        ("get", "limit=1&limit=abc", "limit")])
def test_unknown_or_repeated_query_parameters_are_400s(server: GunicornServer, client: openai.OpenAI, method: str,
                                                       query: str, param: str) -> None:
    tag = _tag()
    created = _stored(client, tag)
    url = {"get": f"{server.url}/v1/chat/completions?{query}"}.get(
        method, f"{server.url}/v1/chat/completions/{created.id}?{query}")
    answer = requests.request(method, url, json={"metadata": {}} if method == "post" else None, timeout=30)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param
    assert client.chat.completions.retrieve(created.id).metadata == tag


def test_a_stream_cut_by_its_client_is_not_kept(server: GunicornServer, client: openai.OpenAI) -> None:
    tag = _tag()
    body = {**GREEDY, "max_tokens": 400, "ignore_eos": True, "messages": HI, "store": True, "metadata": tag,
            "stream": True}
    with requests.post(f"{server.url}/v1/chat/completions", json=body, stream=True, timeout=60) as answer:
        next(sse_payloads(answer))  # then closed, long before its 400 tokens
    wait_for(lambda: engine_idle(server))
    assert _listed_ids(client, metadata=tag) == []
    finished = requests.post(f"{server.url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60)
    assert finished.status_code == 200 and len(_listed_ids(client, metadata=tag)) == 1  # read to its end: kept
