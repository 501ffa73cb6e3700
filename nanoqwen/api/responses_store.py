"""The responses this worker stored (`store: true`), for `previous_response_id` and `GET/DELETE /v1/responses/{id}`.

In memory and per worker process: a response is found only by the worker that made it (run one worker,
or route a conversation to one), and none survives a restart. Bounded by count and by bytes, the
oldest dropped first.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from nanoqwen.api.errors import APIError
from nanoqwen.engine.threads import native_lock

Json = dict[str, Any]
MAX_RESPONSES = 1024
MAX_BYTES = 64 << 20
MAX_LIST_LIMIT = 100


@dataclass(frozen=True)
class Stored:
    response: Json
    input_items: list[Json]  # this request's input items, with ids
    history: list[Json]  # the items a continuation starts from: the earlier ones, its input, its output
    size: int


class ResponseStore:
    """Written by the request greenlets, and by the native thread that builds a large answer: locked."""

    def __init__(self, max_responses: int = MAX_RESPONSES, max_bytes: int = MAX_BYTES) -> None:
        self.max_responses = max_responses
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0
        self._lock = native_lock()  # held only around the dict and counter updates

    def put(self, response: Json, input_items: list[Json], previous: Stored | None) -> None:
        """Keeps `response` (its `previous` response's history before it) unless it alone is past max_bytes."""
        earlier = previous.history if previous is not None else []
        # the earlier items are counted as the previous entry's whole size, which holds them
        size = len(json.dumps([response, input_items])) + (previous.size if previous is not None else 0)
        if size > self.max_bytes:
            return
        stored = Stored(response, input_items, [*earlier, *input_items, *response["output"]], size)
        with self._lock:
            self._pop(response["id"])
            self._entries[response["id"]] = stored
            self._bytes += size
            while len(self._entries) > self.max_responses or self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.size

    def get(self, response_id: str) -> Stored | None:
        with self._lock:
            return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._pop(response_id)

    def _pop(self, response_id: str) -> bool:
        stored = self._entries.pop(response_id, None)
        if stored is not None:
            self._bytes -= stored.size
        return stored is not None


def list_page(items: list[Json], args: dict[str, str]) -> Json:
    """OpenAI's list of items: newest first by default (`order`), `limit` (1-100, 20), `after`/`before` an item id."""
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(400, "Invalid value for 'order': expected 'asc' or 'desc'", param="order")
    limit = args.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        raise APIError(400, f"Invalid value for 'limit': an integer from 1 to {MAX_LIST_LIMIT}", param="limit")
    items = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in items]
    for name in ("after", "before"):
        if name in args and args[name] not in ids:
            raise APIError(400, f"Invalid value for '{name}': no input item '{args[name]}'", param=name)
    start = ids.index(args["after"]) + 1 if "after" in args else 0
    end = ids.index(args["before"]) if "before" in args else len(items)
    page = items[start:end][:int(limit)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < end}
