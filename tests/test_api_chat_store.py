"""The stored chat completions' store (chat_store) on crafted completions and engine events: its bound, an update's
place, a list's cursor gone, and a stream kept once finished, never once failed."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from werkzeug.datastructures import MultiDict

from nanoqwen.api.chat_store import ChatStore, Keeping, KeptStream, StoredRequest, stored_messages
from nanoqwen.api.chat_stored_api import ChatStoredService
from nanoqwen.api.errors import APIError
from nanoqwen.api.responses import ChunkBuilder, CompletionBuilder
from nanoqwen.api.stored import Bounded
from nanoqwen.engine.request import Event, Usage

Json = dict[str, Any]


REQUEST = StoredRequest(b"[]", {})


def _completion(i: int, text: str = "", created: int = 0) -> Json:
    return {"id": f"chatcmpl-{i}", "object": "chat.completion", "model": "m", "created": created,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def test_the_store_is_bounded_by_count_and_bytes_the_oldest_dropped() -> None:
    store = ChatStore(max_completions=2, max_bytes=3000)
    for i in range(3):
        store.put(_completion(i), REQUEST)
    assert store.get("chatcmpl-0") is None
    assert json.loads(store.get("chatcmpl-1").body) == {**_completion(1), "metadata": {}}
    store = ChatStore(max_completions=100, max_bytes=3000)
    for i in range(5):  # ~700 bytes each, under a quarter of the bytes: four fit, the oldest goes
        store.put(_completion(i, "x" * 550), REQUEST)
    kept = store.listed()
    assert [completion_id for completion_id, _ in kept] == [f"chatcmpl-{i}" for i in range(1, 5)]
    store.put(_completion(5, "x" * 700), REQUEST)  # a quarter of the store with its request: answered, not kept
    assert store.get("chatcmpl-5") is None and store.listed() == kept  # (kept, it would have emptied the store)
    assert store.delete("chatcmpl-4") and not store.delete("chatcmpl-4") and len(store.listed()) == 3
    assert store.keeps(StoredRequest(b"x" * 747, {}, b"{}")) and not store.keeps(StoredRequest(b"x" * 748, {}, b"{}"))


def test_an_update_keeps_the_completion_s_place_and_listed_is_by_created() -> None:
    store = ChatStore(max_completions=2)
    store.put(_completion(0, created=5), REQUEST)
    store.put(_completion(1, created=4), REQUEST)  # finished later, begun earlier: listed first
    assert [completion_id for completion_id, _ in store.listed()] == ["chatcmpl-1", "chatcmpl-0"]
    updated = store.update("chatcmpl-0", {"k": "v"})
    assert json.loads(updated.body) == {**_completion(0, created=5), "metadata": {"k": "v"}}
    assert store.get("chatcmpl-0").metadata == {"k": "v"}
    assert json.loads(store.update("chatcmpl-0", {}).body)["metadata"] == {}
    store.put(_completion(2), REQUEST)  # the oldest kept goes, though updated since
    assert store.get("chatcmpl-0") is None and store.update("chatcmpl-0", {}) is None


def test_stored_messages_as_openai_lists_them() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    listed = json.loads(stored_messages([{"role": "user", "content": "hi", "name": "x"},
                                         {"role": "user", "content": parts}], "chatcmpl-1"))
    assert listed == [{"id": "chatcmpl-1-0", "role": "user", "content": "hi", "name": "x", "content_parts": None},
                      {"id": "chatcmpl-1-1", "role": "user", "content": "ab", "name": None, "content_parts": parts}]


def _kept_stream(store: ChatStore) -> KeptStream:
    keeping = Keeping(store, StoredRequest.of([], "chatcmpl-s", {"k": "v"}, {"seed": 3}), lambda fn: fn())
    return KeptStream(ChunkBuilder("m", "fp", False, id="chatcmpl-s"), CompletionBuilder("m", "fp", 1, False,
                                                                                          id="chatcmpl-s"), keeping)


def test_a_stream_is_kept_at_its_last_event_and_not_when_it_fails() -> None:
    store = ChatStore()
    stream = _kept_stream(store)
    stream.chunks(Event(0, text="Hel"))
    assert store.get("chatcmpl-s") is None  # not before it ends
    stream.chunks(Event(0, text="lo", finish_reason="stop"))
    stream.chunks(Event(0, usage=Usage(3, 2)))
    kept = json.loads(store.get("chatcmpl-s").body)
    assert kept["choices"][0]["message"]["content"] == "Hello" and kept["usage"]["total_tokens"] == 5
    assert (kept["metadata"], kept["seed"]) == ({"k": "v"}, 3)
    failed = ChatStore()
    stream = _kept_stream(failed)
    stream.chunks(Event(0, text="Hel"))
    stream.chunks(Event(0, error="engine failed"))
    assert failed.listed() == []


@dataclass(frozen=True)
class Sized:
    size: int


def test_a_replace_swaps_only_the_entry_it_read() -> None:
    """An update copies the entry out of the lock: one kept under its id since (another update) is not swapped back."""
    bounded: Bounded[Sized] = Bounded(4, 100)
    read, since = Sized(1), Sized(2)
    bounded.put("a", read)
    bounded.put("a", since)
    assert not bounded.replace("a", read, Sized(3)) and bounded.entries["a"] is since
    assert bounded.replace("a", since, Sized(4)) and bounded.entries["a"].size == bounded.bytes == 4


def _listed_after(service: ChatStoredService, after: str) -> list[str]:
    return [c["id"] for c in json.loads(service.list(MultiDict({"after": after, "limit": "1"})).get_data())["data"]]


def test_a_list_continues_after_a_cursor_deleted_or_dropped() -> None:
    """The cursor's place is kept when it goes: the next page is the one after where it stood."""
    store = ChatStore(max_completions=3)
    for i in range(4):  # the first dropped
        store.put(_completion(i, created=10 - i % 2), REQUEST)  # listed 1, 3, 0, 2 (by created, then as kept)
    service = ChatStoredService(store, lambda where, fn, *args: fn(*args))
    assert _listed_after(service, "chatcmpl-0") == ["chatcmpl-2"]
    assert store.delete("chatcmpl-1") and _listed_after(service, "chatcmpl-1") == ["chatcmpl-3"]
    with pytest.raises(APIError) as unknown:
        _listed_after(service, "chatcmpl-9")
    assert unknown.value.param == "after"
