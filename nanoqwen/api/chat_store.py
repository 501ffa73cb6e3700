"""The chat completions this worker stored (`store: true`), for OpenAI's stored completions routes (chat_stored_api).

In memory and per worker process, as the Responses store (responses_store): a completion is found only by the worker
that made it (run one worker), and none survives a restart. Kept as encoded JSON (what GET answers, the bytes the bound
counts) with its request's messages, bounded by count and by bytes, the oldest dropped first (stored.Bounded). A
completion is kept once finished, streamed or not (a stream's as the collected answer would have been), never one that
failed or whose client left first; not one whose messages already reach a quarter of the bound.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nanoqwen.api.encode import encode_json, encode_text
from nanoqwen.api.responses import ChunkBuilder, CompletionBuilder
from nanoqwen.api.serving import LARGE_ANSWER, answer_weight
from nanoqwen.api.stored import Bounded, Place
from nanoqwen.engine.request import Event, Usage
from nanoqwen.engine.threads import native_lock

Json = dict[str, Any]
MAX_COMPLETIONS = 1024
MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class StoredCompletion:
    body: bytes  # the completion as GET answers it, without encode_json's final newline
    messages: bytes  # its request's messages, with ids: a JSON list
    model: str
    created: int
    metadata: dict[str, str]
    metadata_at: int  # where in `body` the metadata's JSON starts: an update replaces those bytes alone
    kept: int  # its rank in the order kept: of those `created` in the same second, the first kept is listed first

    @property
    def size(self) -> int:
        return len(self.body) + len(self.messages)

    @property
    def place(self) -> Place:
        return self.created, self.kept

    def with_metadata(self, metadata: dict[str, str]) -> StoredCompletion:
        """Its metadata replaced, the rest of its JSON (megabytes with logprobs) copied, not parsed."""
        end = self.metadata_at + len(encode_text(self.metadata).encode())
        body = b"".join((self.body[:self.metadata_at], encode_text(metadata).encode(), self.body[end:]))
        return dataclasses.replace(self, body=body, metadata=metadata)


@dataclass(frozen=True)
class StoredRequest:
    """What a stored completion keeps of its request, encoded as it begins (off the loop for a large body)."""

    messages: bytes  # stored_messages'
    metadata: dict[str, str]
    fields: bytes = b"{}"  # a JSON object: what else a stored completion says of its request besides create's answer

    @classmethod
    def of(cls, messages: list[Json], completion_id: str, metadata: dict[str, str], fields: Json) -> StoredRequest:
        return cls(stored_messages(messages, completion_id), metadata, encode_text(fields).encode())

    def completion(self, answer: bytes) -> tuple[bytes, int]:
        """The stored completion's JSON: create's `answer` (encode_json's, without metadata), the metadata, the other
        fields; and where the metadata's JSON starts in it."""
        head = answer[:-len(b"}\n")] + b',"metadata":'
        rest = b"}" if self.fields == b"{}" else b"," + self.fields[1:]
        return b"".join((head, encode_text(self.metadata).encode(), rest)), len(head)


def stored_messages(messages: list[Json], completion_id: str) -> bytes:
    """The messages as OpenAI lists a stored completion's: each with an id (the completion's, then `-` and its place),
    a name (null if none), a content part list's text as its `content` and the list as `content_parts` (else null)."""
    listed = []
    for i, message in enumerate(messages):
        content, parts = message.get("content"), None
        if isinstance(content, list):
            content, parts = "".join(part.get("text", "") for part in content), content
        listed.append({"id": f"{completion_id}-{i}", **message, "name": message.get("name"), "content": content,
                       "content_parts": parts})
    return encode_json(listed)


class ChatStore:
    """Written by the request greenlets and by the native thread that builds a large answer: locked."""

    def __init__(self, max_completions: int = MAX_COMPLETIONS, max_bytes: int = MAX_BYTES) -> None:
        self._entries: Bounded[StoredCompletion] = Bounded(max_completions, max_bytes)
        self._lock = native_lock()  # held only around the dict and counter updates
        self._kept = itertools.count()
        # the places of the latest completions deleted or dropped, as many as are kept: a list's cursor may be one
        self._gone: OrderedDict[str, Place] = OrderedDict()

    def keeps(self, request: StoredRequest) -> bool:
        """Whether a completion may be kept whose request is this: not one that could empty the store alone."""
        return self._fits(len(request.messages) + len(request.fields))

    def _fits(self, size: int) -> bool:
        return size < self._entries.max_bytes // 4

    def put(self, completion: Json, request: StoredRequest) -> bytes:
        """Keeps `completion` (create's answer, without metadata) with what it keeps of its `request`, unless the
        answer makes it one that could empty the store alone (logprobs of a long answer); returns the answer encoded
        (encode_json's): what create sends, not encoded again (megabytes with logprobs)."""
        answer = encode_json(completion)
        body, metadata_at = request.completion(answer)
        if not self._fits(len(body) + len(request.messages)):
            return answer
        with self._lock:
            entry = StoredCompletion(body, request.messages, completion["model"], completion["created"],
                                     request.metadata, metadata_at, next(self._kept))
            self._forget(self._entries.put(completion["id"], entry))
        return answer

    def get(self, completion_id: str) -> StoredCompletion | None:
        with self._lock:
            return self._entries.entries.get(completion_id)

    def update(self, completion_id: str, metadata: dict[str, str]) -> StoredCompletion | None:
        """The completion with its metadata replaced, in its place (its age unchanged): copied out of the lock, then
        swapped in if no other update came in between (else made again from that one)."""
        while (entry := self.get(completion_id)) is not None:
            updated = entry.with_metadata(metadata)
            with self._lock:
                if self._entries.replace(completion_id, entry, updated):
                    return updated
        return None

    def delete(self, completion_id: str) -> bool:
        with self._lock:
            entry = self._entries.pop(completion_id)
            if entry is not None:
                self._forget([(completion_id, entry)])
        return entry is not None

    def _forget(self, gone: list[tuple[str, StoredCompletion]]) -> None:
        """Holding the lock: the places of those deleted or dropped kept, the oldest forgotten past the bound."""
        for completion_id, entry in gone:
            self._gone[completion_id] = entry.place
        while len(self._gone) > self._entries.max_entries:
            self._gone.popitem(last=False)

    def place(self, completion_id: str) -> Place | None:
        """Where the completion of this id is listed, or was while kept (deleted or dropped lately): None if unknown."""
        with self._lock:
            entry = self._entries.entries.get(completion_id)
            return self._gone.get(completion_id) if entry is None else entry.place

    def listed(self) -> list[tuple[str, StoredCompletion]]:
        """Every completion kept, oldest first by `created` (then as kept)."""
        with self._lock:
            entries = list(self._entries.entries.items())
        return sorted(entries, key=lambda pair: pair[1].place)


@dataclass(frozen=True)
class Keeping:
    """Where and with what of its request one request's completion is kept."""

    store: ChatStore
    request: StoredRequest
    off_loop: Callable[..., Any]  # runs a large answer's encoding in the encoding thread

    def keep(self, completion: Json) -> bytes:
        return self.store.put(completion, self.request)


@dataclass
class KeptCollector:
    """A collected completion kept as it is built (only once finished: Serving builds no failed one), answered as the
    store encoded it."""

    builder: CompletionBuilder
    keeping: Keeping

    def add(self, event: Event) -> None:
        self.builder.add(event)

    def build(self, usage: Usage) -> bytes:
        return self.keeping.keep(self.builder.build(usage))


class KeptStream:
    """A stream's chunks (ChunkBuilder's), its events collected too: the completion kept at its last event unless that
    is an error. A client gone first ends the stream before it: nothing kept."""

    def __init__(self, chunks: ChunkBuilder, builder: CompletionBuilder, keeping: Keeping) -> None:
        self._chunks = chunks
        self._builder = builder
        self._keeping = keeping
        self._weight = 0
        self.ending = chunks.ending
        self.repeats_answer = chunks.repeats_answer

    def chunks(self, event: Event) -> list[Json]:
        out = self._chunks.chunks(event)
        if event.error is None:
            self._builder.add(event)
            self._weight += answer_weight(event)
            if event.usage is not None:
                keep, completion = self._keeping.keep, self._builder.build
                if self._weight < LARGE_ANSWER:
                    keep(completion(event.usage))
                else:
                    self._keeping.off_loop(lambda: keep(completion(event.usage)))
        return out

    def repeats(self, chunk: Json) -> bool:
        return self._chunks.repeats(chunk)

    def opening(self) -> list[Json]:
        return self._chunks.opening()

    def frame(self, chunk: Json, split: bool = False) -> str:
        return self._chunks.frame(chunk, split)

    def failure(self, message: str, param: str | None = None) -> list[Json]:
        return self._chunks.failure(message, param)
