"""What the stores of both APIs share (responses_store, chat_store): entries kept in memory by id, oldest first, bounded
by count and by bytes, and OpenAI's list pages over them."""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from werkzeug.datastructures import MultiDict

from nanoqwen.api.encode import encode_text
from nanoqwen.api.errors import APIError

Json = dict[str, Any]
MAX_LIST_LIMIT = 100


class Sized(Protocol):
    @property
    def size(self) -> int: ...


E = TypeVar("E", bound=Sized)
Place = tuple[int, int]  # an entry's place in a list: its `created`, then the order kept


class Bounded(Generic[E]):
    """Entries by id in the order kept; not locked: its owner's lock covers it."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, E] = OrderedDict()
        self.bytes = 0

    def put(self, key: str, entry: E) -> list[tuple[str, E]]:
        """Keeps `entry` (replacing one of its id) as the newest; the oldest go until the bounds hold, or until it is
        the only one. Returns those dropped, the one replaced first."""
        replaced = self.pop(key)
        dropped = [] if replaced is None else [(key, replaced)]
        self.entries[key] = entry
        self.bytes += entry.size
        while len(self.entries) > 1 and (len(self.entries) > self.max_entries or self.bytes > self.max_bytes):
            oldest = next(iter(self.entries))
            dropped.append((oldest, self.entries.pop(oldest)))
            self.bytes -= dropped[-1][1].size
        return dropped

    def replace(self, key: str, old: E, entry: E) -> bool:
        """The entry of this id, if still `old` (the one read, not one kept since), replaced in its place (not made
        the newest, none dropped)."""
        if self.entries.get(key) is not old:
            return False
        self.entries[key] = entry
        self.bytes += entry.size - old.size
        return True

    def pop(self, key: str) -> E | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size
        return entry


def check_query(args: Mapping[str, str], known: tuple[str, ...], repeatable: tuple[str, ...] = ()) -> None:
    """A query parameter we do not read (starting_after on input_items, ...) is refused by name, not ignored; so is
    one given twice (`limit=1&limit=x`: one would be read) unless `repeatable` (a list's values)."""
    query = MultiDict(args)  # Flask's request.args: each repeated key's values
    for name in query:
        if name not in known:
            raise APIError(400, f"Unsupported parameter '{name}' for this route", param=name,
                           code="unsupported_parameter")
        if name not in repeatable and len(query.getlist(name)) > 1:
            raise APIError(400, f"Invalid value for '{name}': given more than once", param=name)


def _order_limit(args: Mapping[str, str], default_order: str) -> tuple[bool, int]:
    """A list's `order` (`default_order`): whether ascending; and its `limit` (1-100, 20)."""
    order = args.get("order", default_order)
    if order not in ("asc", "desc"):
        raise APIError(400, "Invalid value for 'order': expected 'asc' or 'desc'", param="order")
    limit = args.get("limit", "20")
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        raise APIError(400, f"Invalid value for 'limit': an integer from 1 to {MAX_LIST_LIMIT}", param="limit")
    return order == "asc", int(limit)


def _page(page: list[Json], has_more: bool) -> Json:
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": has_more}


def list_page(items: list[Json], args: Mapping[str, str], default_order: str = "desc",
              noun: str = "input item") -> Json:
    """OpenAI's list of items (oldest first in `items`, which never change): `order` (`default_order`), `limit`
    (1-100, 20), `after`/`before` an item id (a `noun`'s)."""
    ascending, limit = _order_limit(args, default_order)
    items = items if ascending else items[::-1]
    ids = [item["id"] for item in items]
    for name in ("after", "before"):
        if name in args and args[name] not in ids:
            raise APIError(400, f"Invalid value for '{name}': no {noun} '{args[name]}'", param=name)
    start = ids.index(args["after"]) + 1 if "after" in args else 0
    end = ids.index(args["before"]) if "before" in args else len(items)
    page = items[start:end][:limit]
    return _page(page, start + len(page) < end)


def encoded_page(listed: bytes, args: Mapping[str, str], default_order: str, noun: str,
                 each: Callable[[Json], Json] | None = None) -> bytes:
    """list_page of a stored JSON list (`listed`, its bytes), each item of the page through `each`, encoded: the
    work whose hand-off Serving.off_loop_if decides by `listed`'s length (on the loop, 16,000 items took ~20-25 ms
    of its CPU a page)."""
    page = list_page(json.loads(listed), args, default_order, noun)
    if each is not None:
        page["data"] = [each(item) for item in page["data"]]
    return encode_text(page).encode()


def page_after(items: list[tuple[Place, Json]], args: Mapping[str, str], after: Place | None,
               default_order: str) -> Json:
    """OpenAI's list of `items` (each with its place, in that order), `order` and `limit` as list_page's, past the
    place `after` of the cursor: that item may be gone from `items` (filtered out, deleted, dropped), its place
    kept (a client deleting each item it pages through asks for the page after one it deleted)."""
    ascending, limit = _order_limit(args, default_order)
    if not ascending:
        items = items[::-1]
    if after is not None:
        items = [(place, item) for place, item in items if (place > after if ascending else place < after)]
    return _page([item for _, item in items[:limit]], len(items) > limit)
