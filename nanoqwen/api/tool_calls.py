"""Hermes-format tool calls in the model's answer: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Qwen3 is trained to emit them (the `<tool_call>`/`</tool_call>` tokens, ids 151657/151658, are not
special tokens, so they reach the decoded text). The parser is incremental: it takes the text
deltas of one choice as the engine emits them and returns the content to send and the calls
completed so far, and every split of the same text gives the same content and calls, so a
streamed answer reassembles to the non-streamed one. A call is returned once its block is closed
and parses (a JSON object with a string `name` and an object `arguments`); a block that does not
stays in the content as the model wrote it. Whitespace next to a block (Qwen3 puts a newline
between calls) is layout, not content.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=call_id)

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Parsed:
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)

    def __add__(self, other: Parsed) -> Parsed:
        return Parsed(self.content + other.content, self.calls + other.calls)


def parse_call(block: str) -> ToolCall | None:
    """The call in a block's inner text, or None when it is not one."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of tag."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ToolCallParser:
    """One choice's answer text → content and tool calls, delta by delta.

    max_calls: calls kept (1 when the request sets `parallel_tool_calls: false`); blocks past it
    are dropped, neither calls nor content.
    """

    def __init__(self, max_calls: int | None = None) -> None:
        self.max_calls = max_calls
        self.num_calls = 0
        self._pending = ""  # text not yet classified: trailing whitespace, a partial tag, or a block
        self._in_block = False
        self._after_block = False  # leading whitespace here is layout

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        # Inside a long block only the new text (and a tag cut at its start) needs searching.
        searched = max(0, len(self._pending) - len(CLOSE) + 1) if self._in_block else 0
        self._pending += text
        while True:
            if self._in_block:
                end = self._pending.find(CLOSE, searched)
                searched = 0
                if end < 0:
                    return out
                block, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                self._in_block = False
                self._after_block = True
                self._close(block, out)
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                out.content += self._text(self._pending[:start].rstrip())
                self._pending = self._pending[start + len(OPEN):]
                self._in_block = True
                continue
            # Hold back what may still turn out to be layout before a block, or the start of a tag.
            held = _partial_tag(self._pending, OPEN)
            text_part = self._pending[:len(self._pending) - held]
            keep = held + len(text_part) - len(text_part.rstrip())
            ready = len(self._pending) - keep
            out.content += self._text(self._pending[:ready])
            self._pending = self._pending[ready:]
            return out

    def _text(self, text: str) -> str:
        if self._after_block:
            text = text.lstrip()
            self._after_block = not text
        return text

    def finish(self) -> Parsed:
        """What is left at the end of the answer: an unclosed block or a partial tag is content."""
        out = Parsed()
        if self._in_block:
            out.content = OPEN + self._pending
        elif not (self.num_calls and not self._pending.strip()):
            out.content = self._text(self._pending)
        self._pending = ""
        self._in_block = False
        return out

    def _close(self, block: str, out: Parsed) -> None:
        call = parse_call(block)
        if call is None:
            out.content += OPEN + block + CLOSE
        elif self.max_calls is None or self.num_calls < self.max_calls:
            self.num_calls += 1
            out.calls.append(call)
