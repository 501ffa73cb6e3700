"""A large JSON answer built and encoded in pieces, off the event loop.

A non-streamed answer with logprobs holds ~20 dicts per token (n=32 × 480 tokens × top 20: 18 MB
of JSON): built on the loop and encoded in one `json.dumps`, it held the loop for seconds. In a
native thread the Python part (building) yields the GIL every switch interval, but one C
`json.dumps` call does not: the answer is encoded one small subtree (a token's logprobs) per call.
"""
from __future__ import annotations

import json
from typing import Any

SPLIT_DEPTH = 5  # root, choices, a choice, its logprobs, their per-token list: a token's entry is one call
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # Flask's compact output


def _pieces(value: Any, depth: int, out: list[str]) -> None:
    if depth < SPLIT_DEPTH and isinstance(value, dict):
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            out.append(f"{',' if i else ''}{_dumps(key)}:")
            _pieces(item, depth + 1, out)
        out.append("}")
    elif depth < SPLIT_DEPTH and isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        # not only value[0]: echo's top_logprobs start with None (the prompt's first token)
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _pieces(item, depth + 1, out)
        out.append("]")
    else:
        out.append(_dumps(value))


def encode_json(value: Any) -> bytes:
    """`value` as Flask's jsonify writes it (compact, UTF-8, a final newline), in small C calls."""
    out: list[str] = []
    _pieces(value, 0, out)
    out.append("\n")
    return "".join(out).encode("utf-8")
