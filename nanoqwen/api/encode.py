"""A large JSON answer built and encoded in pieces, off the event loop.

A non-streamed answer with logprobs holds ~20 dicts per token (n=32 × 480 tokens × top 20: 18 MB
of JSON): built on the loop and encoded in one `json.dumps`, it held the loop for seconds. In a
native thread the Python part (building) yields the GIL every switch interval, but one C
`json.dumps` call does not: the answer is encoded one small subtree (a token's logprobs) per call,
whatever its depth (a chat choice's, a Responses event's output item's).
"""
from __future__ import annotations

import json
from typing import Any, NoReturn

compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # Flask's compact output


class EncodedList(list):
    """A list encoded once, where it is made: encode_text writes `json` for it wherever it is repeated (a response's
    echoed tools, in each event that carries the response and in the store's copies: 4,000 tools held the loop
    ~0.2 s a stream). Anything else encodes it as the list it is. Its mutators raise, since `json` would go stale (a
    list still, not a tuple: it equals the list it encodes, as the parsed answers do); the items are not guarded: a
    dict changed inside it goes stale too, so nothing changes a tool after it is echoed."""

    def __init__(self, items: list[Any]) -> None:
        super().__init__(items)
        self.json = encode_text(items)

    def _unchanged(self, *args: Any) -> NoReturn:
        raise TypeError("an EncodedList does not change: its json was made once")

    append = extend = insert = remove = pop = clear = sort = reverse = _unchanged
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _unchanged

    def __reduce__(self) -> tuple[type, tuple[list[Any]]]:  # copy and pickle rebuild it whole, not by append
        return EncodedList, (list(self),)


def _whole(value: Any) -> bool:
    """Encoded in one call: a scalar, a flat list or object, or one token's logprobs entry (a `logprob` key)."""
    if isinstance(value, dict):
        return "logprob" in value or not any(isinstance(v, (dict, list)) for v in value.values())
    if isinstance(value, list):
        # not only value[0]: echo's top_logprobs start with None (the prompt's first token)
        return not any(isinstance(v, (dict, list)) for v in value)
    return True


def _pieces(value: Any, out: list[str]) -> None:
    if isinstance(value, EncodedList):
        out.append(value.json)
    elif _whole(value):
        out.append(compact_json(value))
    elif isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):  # json.dumps would write 1 as "1": compact_json(1) writes 1, not JSON
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            out.append(f"{',' if i else ''}{compact_json(key)}:")
            _pieces(item, out)
        out.append("}")
    else:
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _pieces(item, out)
        out.append("]")


def encode_text(value: Any) -> str:
    """`value` as compact JSON (what `sse` writes), in small C calls."""
    out: list[str] = []
    _pieces(value, out)
    return "".join(out)


def encode_json(value: Any) -> bytes:
    """`value` as Flask's jsonify writes it (compact, UTF-8, a final newline), in small C calls."""
    return f"{encode_text(value)}\n".encode()
