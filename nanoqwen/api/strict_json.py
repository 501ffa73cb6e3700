"""Strict JSON: what a request may hold, in its body or in a string inside it (a tool call's arguments).

Python's json accepts lone UTF-16 surrogates (as `\\ud800` escapes, and as raw `ED A0 80` bytes,
which it decodes with `surrogatepass`), NaN/Infinity, and recurses once per nesting level; none
of that may reach the tokenizer, the schema or an error message.

Parsing and checking cost time per JSON value, not per byte, and run on the event loop: a text of
a million tiny values (8 MiB of `1,` or of `"k":0,`) held the loop for seconds. A request's values
are bounded by one Budget over its body and the JSON in its strings (per string, 64 calls' arguments
of 65k values each fit in 8 MiB): each text before it is parsed, by counting the separators outside
its strings (C-speed scans).

Free of the server's dependencies (flask, gevent, gunicorn): the tool-call parser uses it too.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from nanoqwen.api.errors import param_name

MAX_DEPTH = 64  # the deepest field of a valid request is ~5 levels down
# `,` and `:` outside strings: a full 40,960-token context as token ids takes 40,959
MAX_SEPARATORS = 1 << 16
_SURROGATE = re.compile("[\ud800-\udfff]")
TOO_MANY_VALUES = f"The request has more than {MAX_SEPARATORS} values in all (its body and the JSON in its strings)."


class JSONError(ValueError):
    """A JSON text refused: `status` 400, or 413 for more values than a request needs; `path`: the value at fault,
    `problem`: what is wrong with it (the message without where)."""

    def __init__(self, message: str, status: int = 400, path: tuple[str | int, ...] = (), problem: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.path = path
        self.problem = problem or message


def _bad_value(path: tuple[str | int, ...], what: str, problem: str) -> JSONError:
    return JSONError(f"Invalid value for '{param_name(path)}' in {what}: {problem}", path=path, problem=problem)


@dataclass
class Budget:
    """The separators (`,` and `:` outside strings) a request may still hold."""

    left: int = MAX_SEPARATORS
    # A body's separators under each of its top-level fields (loads' `fields`): its tools' weigh their validation
    fields: dict[str | int, int] = field(default_factory=dict)

    @property
    def used(self) -> int:
        """The separators charged so far: about the request's values, what validating it walks."""
        return MAX_SEPARATORS - self.left

    def charge(self, separators: int) -> None:
        self.left -= separators
        if self.left < 0:
            raise JSONError(TOO_MANY_VALUES, status=413)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def too_many_values(text: str | bytes, limit: int = MAX_SEPARATORS) -> bool:
    """Whether `text` has more than `limit` separators outside its strings (escaped
    quotes and backslashes removed first, so that every `"` left opens or closes a string)."""
    comma, colon, quote = (",", ":", '"') if isinstance(text, str) else (b",", b":", b'"')
    if text.count(comma) + text.count(colon) <= limit:
        return False
    text = _unescaped(text)
    if text.count(quote) > 2 * (limit + 1):  # a value per pair of quotes: more values than the limit
        return True
    return _outside_strings(text) > limit


def _unescaped(text: str | bytes) -> str | bytes:
    """`text` without escaped quotes and backslashes, so that every `"` left opens or closes a string."""
    quote, backslash = ('"', "\\") if isinstance(text, str) else (b'"', b"\\")
    return text.replace(backslash * 2, text[:0]).replace(backslash + quote, text[:0])


def _outside_strings(unescaped: str | bytes) -> int:
    """The `,` and `:` outside the strings of an _unescaped text (past an unclosed quote: none)."""
    comma, colon, quote = (",", ":", '"') if isinstance(unescaped, str) else (b",", b":", b'"')
    outside = unescaped[:0].join(unescaped.split(quote)[::2])
    return outside.count(comma) + outside.count(colon)


def checked_values(value: Any, what: str, fields: dict[str | int, int] | None = None) -> int:
    """The `,` and `:` outside strings in `value`'s JSON text (less any duplicate keys'), counted in the walk that
    refuses what json.loads passes and a request may not hold (one walk: counting in a second one cost 0.5-21 ms
    for 64k-65k values, the gaps lane's table in profiles/RESULTS.md). Iteratively (a recursive walk would hit the
    recursion limit json.loads just passed). Floats are checked here, not by a parse_float: that made float-heavy
    texts ~4x slower to parse, and its error named no field. `fields`: each top-level field's separators added to it.
    """
    if isinstance(value, str) and _SURROGATE.search(value):
        raise JSONError(f"{what} contains a lone UTF-16 surrogate (not valid Unicode).")
    if isinstance(value, float) and not math.isfinite(value):
        raise JSONError(f"{what} holds a number out of a float's range.")
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)] if isinstance(value, (dict, list)) else []
    count = 0
    while stack:
        path, node = stack.pop()
        if len(path) >= MAX_DEPTH:
            raise JSONError(f"{what} is nested more than {MAX_DEPTH} levels deep.")
        if node:
            separators = 2 * len(node) - 1 if isinstance(node, dict) else len(node) - 1
            count += separators
            if fields is not None and path:
                fields[path[0]] = fields.get(path[0], 0) + separators
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(key, str) and not key.isascii() and _SURROGATE.search(key):
                raise JSONError(f"A key in {what} contains a lone UTF-16 surrogate.", path=path,
                                problem="a key contains a lone UTF-16 surrogate (not valid Unicode).")
            if isinstance(child, str):
                if not child.isascii() and _SURROGATE.search(child):
                    raise _bad_value(path + (key,), what, "the string contains a lone UTF-16 surrogate (not valid "
                                                          "Unicode).")
            elif isinstance(child, (dict, list)):
                stack.append((path + (key,), child))
            elif isinstance(child, float) and not math.isfinite(child):  # 1e309 is inf (parse_constant: NaN only)
                raise _bad_value(path + (key,), what, "the number is out of a float's range.")
    return count


def _decoded(text: str, what: str) -> Any:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise JSONError(f"{what} is nested too deeply.") from None
    except ValueError:
        raise JSONError(f"{what} is not valid JSON.") from None


def loads(text: str, what: str = "the JSON", raw: bytes | None = None, budget: Budget | None = None,
          fields: bool = False) -> Any:
    """Decoded JSON within a request's limits on values (MAX_SEPARATORS, or what `budget` has left, charged) and depth;
    JSONError, its message naming `what` ("the JSON body"), for anything that is not strict JSON in valid Unicode.
    `raw`: the bytes `text` was decoded from in an ASCII-compatible charset, where its values are counted (a str
    holding one emoji takes 4 bytes a character: counting an 8 MiB body's made 32 MB temporaries). `fields` (a body's
    parse): the separators under each top-level field counted in `budget.fields` too."""
    if too_many_values(text if raw is None else raw, MAX_SEPARATORS if budget is None else budget.left):
        raise JSONError(TOO_MANY_VALUES, status=413)
    try:
        value = _decoded(text, what)
        count = checked_values(value, what, budget.fields if fields and budget is not None else None)
    except JSONError:
        if budget is not None:  # a caller may take what is not JSON as written (a tool call's arguments): counted
            budget.charge(_outside_strings(_unescaped(text if raw is None else raw)))
        raise
    if budget is not None:
        budget.charge(count)
    return value
