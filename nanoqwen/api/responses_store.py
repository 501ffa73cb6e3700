"""The responses this worker stored (`store: true`), for `previous_response_id` and `GET/DELETE /v1/responses/{id}`.

In memory and per worker process: a response is found only by the worker that made it (run one worker,
or route a conversation to one), and none survives a restart. Bounded by count and by bytes, the
oldest dropped first.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from nanoqwen.api.errors import APIError

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


@dataclass
class ResponseStore:
    max_responses: int = MAX_RESPONSES
    max_bytes: int = MAX_BYTES
    _entries: OrderedDict[str, Stored] = field(default_factory=OrderedDict)
    _bytes: int = 0

    def put(self, response: Json, input_items: list[Json], earlier: list[Json]) -> None:
        history = [*earlier, *input_items, *response["output"]]
        # the history's own items are the response's and the input's: counted once
        size = len(json.dumps([response, input_items, earlier]))
        if size > self.max_bytes:
            return
        self.delete(response["id"])
        self._entries[response["id"]] = Stored(response, input_items, history, size)
        self._bytes += size
        while len(self._entries) > self.max_responses or self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.size

    def get(self, response_id: str) -> Stored | None:
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
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
