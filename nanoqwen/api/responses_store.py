"""The responses this worker stored (`store: true`), for `previous_response_id` and `GET/DELETE /v1/responses/{id}`.

In memory and per worker process: a response is found only by the worker that made it (run one worker,
or route a conversation to one), and none survives a restart. Kept as encoded JSON (what GET answers,
the bytes the bound counts), bounded by count and by bytes, the oldest dropped first. Whether a response is
kept is decided before its first event (which says `store`): not when its history and input already reach a
quarter of the bound, so that one entry cannot empty the store, nor, a stream, when the streams in progress
(their snapshots and inputs, as held) would pass bounds of their own; once said, it is kept (alone, if its
output made it larger than the bound).
A stream kept, or a background response (responses_background), exists from its first event: until it ends, GET
answers the `response.created` snapshot (status "in_progress", no output yet; a background response's "queued" until
the engine starts on it), its input items are listed, and an item reference to one of them or to one of its output
items so far is told apart from an unknown one; a response answered whole is found once finished
(nobody learns its id before). DELETE meanwhile removes a stream for
good: the generation goes on for the client that asked (deleting is not cancelling; a background response's
is cancelled), and the finished response
is not kept. It cannot be continued (`previous_response_id`) before it ends: a 400 with our own code
`previous_response_in_progress`.
Items are found by id too (`item_reference`): a finished response's input and output items.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from nanoqwen.api.encode import encode_json, encode_text
from nanoqwen.api.stored import Bounded
from nanoqwen.engine.threads import native_lock

Json = dict[str, Any]
MAX_RESPONSES = 1024
MAX_BYTES = 64 << 20
OutputIds = Callable[[], Collection[str]]


@dataclass(frozen=True)
class Entry:
    """What GET and input_items answer for a response: a finished one (Stored), or one in progress."""

    body: bytes  # the response, as GET answers it
    input_items: bytes  # this request's input items, with ids: a JSON list
    background: bool = field(default=False, kw_only=True)  # made with `background: true`: it may be cancelled

    @property
    def size(self) -> int:
        return len(self.body) + len(self.input_items)


@dataclass(frozen=True)
class Stored(Entry):
    history: bytes  # the items a continuation starts from (the earlier ones, its input, its output): a JSON list
    own_at: int  # where in history its own items (input and output) start, after a "[" or ","
    spans: dict[str, tuple[int, int]]  # its own items', by id: where each one is in history, from own_at

    def item(self, item_id: str) -> Json:
        """One of its own items, as a continuation needs it (no logprobs): only its own bytes parsed."""
        start, end = self.spans[item_id]
        return json.loads(self.history[self.own_at + start:self.own_at + end])

    def item_size(self, item_id: str) -> int:
        start, end = self.spans[item_id]
        return end - start

    @property
    def size(self) -> int:
        return super().size + len(self.history)


@dataclass(frozen=True)
class Inputs:
    """A response's input items as stored (with ids), each encoded once: as input_items lists them, and as a
    continuation reads them, which the store joins with its output's as the response is kept (Inputs.of)."""

    listed: bytes = b"[]"  # a JSON list
    own: bytes = b""  # the items without logprobs, comma-separated: a JSON list's inside
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # where each one is in `own`, by id

    @classmethod
    def of(cls, items: list[Json], resent: Collection[int] = ()) -> Inputs:
        """16,000 items: ~270 ms. An item without logprobs (all but an earlier answer's text resent with them) is
        the same bytes in both. The calls `resent` (by place: a previous response's, check_items') are listed, as
        sent, not read twice: the history holds them."""
        listed = [encode_text(item).encode() for item in items]
        kept = [(item, piece) for i, (item, piece) in enumerate(zip(items, listed)) if i not in resent]
        own = [piece if (bare := _without_logprobs(item)) is item else encode_text(bare).encode()
               for item, piece in kept]
        return cls(b"[" + b",".join(listed) + b"]", b",".join(own), _spans([item for item, _ in kept], own))


def _spans(items: list[Json], pieces: list[bytes], at: int = 0) -> dict[str, tuple[int, int]]:
    """Where each item is (by id) in its encoding `pieces` joined by commas, starting `at`."""
    spans = {}
    for item, piece in zip(items, pieces):
        spans[item["id"]] = (at, at + len(piece))
        at += len(piece) + 1
    return spans


def _without_logprobs(item: Json) -> Json:
    """An item as a continuation needs it: its text parts' logprobs never reach the prompt."""
    content = item.get("content")
    if not isinstance(content, list) or not any("logprobs" in part for part in content):
        return item
    return {**item, "content": [{k: v for k, v in part.items() if k != "logprobs"} for part in content]}


def _history(previous: Stored | None, own: bytes) -> tuple[bytes, int]:
    """The history of a response whose own items are `own` (a JSON list's inside) after `previous`'s, and where they
    start in it: the earlier history copied once."""
    earlier = previous.history if previous is not None else b"[]"
    if not own:
        return earlier, len(earlier) - 1
    head = memoryview(earlier)[:-1] if earlier != b"[]" else b""
    joined = b"".join((head, b"," if head else b"[", own, b"]"))
    return joined, len(head) + 1


class ResponseStore:
    """Written by the request greenlets, and by the native thread that builds a large answer: locked."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._entries: Bounded[Stored] = Bounded(max_responses, max_bytes)
        # item id -> the id of the response holding it, or the ids (oldest first) of the few holding one resent: a
        # list each would be thousands of allocations a put, on the event loop, that bring full collections nearer
        self._items: dict[str, str | list[str]] = {}
        # the responses begun and not ended, their `response.created` snapshots: bounded alike, each kept in full
        self._running: dict[str, Entry] = {}
        self._running_bytes = 0
        # response id -> its input items' ids, and what gives those of its output items so far
        self._running_items: dict[str, tuple[Collection[str], OutputIds]] = {}
        self._lock = native_lock()  # held only around the dict and counter updates

    def begin(self, response: Json, inputs: Inputs, output_ids: OutputIds = frozenset) -> bytes | None:
        """`response` (in progress; `inputs` its input items, `output_ids` giving its output items' ids so far) found
        by id until it ends: finished (put, begun), deleted or ended. Returns its encoding (what GET answers), or None,
        not begun, when the count or the bytes of the responses in progress (their snapshots and inputs, as held) would
        pass the store's bounds."""
        entry = Entry(encode_json(response), inputs.listed, background=response.get("background") is True)
        with self._lock:
            if len(self._running) >= self.max_responses or self._running_bytes + entry.size > self.max_bytes:
                return None
            self._running[response["id"]] = entry
            self._running_bytes += entry.size
            self._running_items[response["id"]] = (inputs.spans.keys(), output_ids)
        return entry.body

    def progress(self, response: Json) -> None:
        """The snapshot GET answers for a response in progress replaced (queued, then in progress), if it still is
        in progress: its size changes by a few bytes, not checked against the bounds."""
        body = encode_json(response)
        with self._lock:
            entry = self._running.get(response["id"])
            if entry is not None:
                self._running[response["id"]] = dataclasses.replace(entry, body=body)
                self._running_bytes += len(body) - len(entry.body)

    def end(self, response_id: str) -> None:
        """The response begun no longer in progress (finished, failed, its client gone): not kept if not put."""
        with self._lock:
            self._pop_running(response_id)

    def put(self, response: Json, inputs: Inputs, previous: Stored | None, begun: bool) -> bytes:
        """Keeps `response` (its `previous` response's history before it, `inputs` its input items) and returns its
        encoding; the oldest entries go until the bounds hold, or until it is the only one. Each entry holds its
        whole history, the input items' encodings joined into it. One `begun` is kept only while still in progress
        (not deleted meanwhile)."""
        output = [encode_text(_without_logprobs(item)).encode() for item in response["output"]]
        history, own_at = _history(previous, b",".join([inputs.own, *output] if inputs.own else output))
        spans = {**inputs.spans, **_spans(response["output"], output, len(inputs.own) + 1 if inputs.own else 0)}
        body = encode_json(response)
        response_id = response["id"]
        with self._lock:
            if begun and self._pop_running(response_id) is None:
                return body
            stored = Stored(body, inputs.listed, history, own_at, spans, background=response.get("background") is True)
            self._pop(response_id)
            shared = spans.keys() & self._items.keys()
            self._items.update(dict.fromkeys(spans.keys() - shared, response_id))
            for item_id in shared:
                held = self._items[item_id]
                self._items[item_id] = [held, response_id] if isinstance(held, str) else [*held, response_id]
            for dropped_id, dropped in self._entries.put(response_id, stored):
                self._forget_items(dropped_id, dropped)
        return body

    def keeps(self, known_bytes: int) -> bool:
        """Whether a response is kept whose history and input (its output still to come) are this large."""
        return known_bytes < self.max_bytes // 4

    def get(self, response_id: str) -> Entry | None:
        """The response finished, else the one in progress (an Entry, not Stored), with this id."""
        with self._lock:
            return self._entries.entries.get(response_id) or self._running.get(response_id)

    def holder(self, item_id: str) -> Stored | None:
        """The latest kept response holding the item with this id (as input or output)."""
        with self._lock:
            held = self._items.get(item_id)
            if held is None:
                return None
            return self._entries.entries[held if isinstance(held, str) else held[-1]]

    def running_holder(self, item_id: str) -> str | None:
        """The id of a response in progress whose input, or output so far, holds the item with this id."""
        with self._lock:
            running = list(self._running_items.items())
        return next((rid for rid, (inputs, outputs) in running if item_id in inputs or item_id in outputs()), None)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._pop(response_id) or self._pop_running(response_id) is not None

    def _pop_running(self, response_id: str) -> Entry | None:
        entry = self._running.pop(response_id, None)
        if entry is not None:
            self._running_bytes -= entry.size
            del self._running_items[response_id]
        return entry

    def _pop(self, response_id: str) -> bool:
        stored = self._entries.pop(response_id)
        if stored is None:
            return False
        self._forget_items(response_id, stored)
        return True

    def _forget_items(self, response_id: str, stored: Stored) -> None:
        for item_id in stored.spans:
            held = self._items[item_id]
            if isinstance(held, str):
                del self._items[item_id]
            else:
                rest = [holder for holder in held if holder != response_id]
                self._items[item_id] = rest[0] if len(rest) == 1 else rest

