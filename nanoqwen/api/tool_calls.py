"""Hermes-format tool calls in the model's answer: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

Qwen3 is trained to emit them (the `<tool_call>`/`</tool_call>` tokens, ids 151657/151658, are not
special tokens, so they reach the decoded text). The parser is incremental: it takes the text
deltas of one choice as the engine emits them and returns the content to send and the pieces of
calls decoded so far, and every split of the same text gives the same content and calls, so a
streamed answer reassembles to the non-streamed one.

A block that starts as Qwen3 writes one, `{"name": "<name>", "arguments": {`, is a call from
there on: its id and name go out at once and its arguments, the model's raw JSON text of the
object, as they are decoded (up to the object's closing brace, or the block's end when cut short),
as OpenAI streams them. Those arguments are not checked: they are out before the object closes, so
a call cannot turn back into content, and the non-streamed answer (the same parser) carries the
same text; like OpenAI's, they may be invalid JSON (`{"a": NaN}`) unless a forced tool_choice
constrained them. Any other block is judged when it closes: a call if it is strict JSON
(nanoqwen.api.strict_json: an object with a string `name` and an object `arguments`), sent whole;
else it stays in the content as the model wrote it, with the whitespace around it. Whitespace next to a
call (Qwen3 puts a newline between calls) is layout, not content.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from nanoqwen.api import strict_json

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
CALL_HEAD = '{"name":"'  # a call's first characters, JSON whitespace apart


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
class CallDelta:
    """A piece of the call at `index`: its first piece has the id and name, the rest argument text."""

    index: int
    arguments: str = ""
    name: str | None = None
    id: str | None = None


@dataclass
class Parsed:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __add__(self, other: Parsed) -> Parsed:
        return Parsed(self.content + other.content, self.calls + other.calls)


def assemble(deltas: list[CallDelta]) -> list[ToolCall]:
    """The whole calls that a list of pieces makes up, in order."""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        if delta.id is not None:
            calls[delta.index] = ToolCall(delta.name or "", "", delta.id)
        calls[delta.index].arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]


# A block's start as Qwen3 writes it; the arguments object starts where it ends.
HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)', re.DOTALL)


def _header_name(block: str, end: int) -> tuple[str, int] | None:
    """(name, where the arguments start) when block[:end] starts as a streamable call."""
    match = HEADER.match(block, 0, end)
    if match is None:
        return None
    try:
        name = strict_json.loads(match.group(1))
    except ValueError:
        return None
    return (name, match.end()) if name else None


@dataclass
class _Arguments:
    """The scan of a streamed call's arguments object through the block text."""

    index: int | None  # the call's; None: a call past max_calls, dropped
    pos: int  # next character to scan
    sent: int  # arguments text sent up to here
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False

    def advance(self, block: str, end: int) -> str:
        """Scans block[pos:end]; -> the arguments text that is new."""
        while self.pos < end and not self.done:
            ch = block[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
        text, self.sent = block[self.sent : self.pos], self.pos
        return text if self.index is not None else ""


def parse_call(block: str) -> ToolCall | None:
    """The call in a block's inner text, or None when it is not one."""
    try:
        obj = strict_json.loads(block)
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
    are dropped, neither calls nor content. constrained: a block the model opens follows the calls' grammar (tool_choice
    "required" or named, a strict tool under "auto"), so one cut short before its call shows is dropped, not content.
    """

    def __init__(self, max_calls: int | None = None, constrained: bool = False) -> None:
        self.max_calls = max_calls
        self.constrained = constrained
        self.num_calls = 0
        self._cut = False  # the answer (a stop string, EOS, max_tokens) ended inside a kept call, its name or arguments
        self._pending = ""  # text not yet classified: trailing whitespace, a partial tag, or a block
        self._in_block = False
        self._after_block = False  # leading whitespace here is layout
        self._layout = ""  # the whitespace before the open block: content unless the block is a call
        self._streamed: _Arguments | None = None  # the block's call, once its start shows it is one

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        # Inside a long block only the new text (and a tag cut at its start) needs searching.
        searched = max(0, len(self._pending) - len(CLOSE) + 1) if self._in_block else 0
        self._pending += text
        while True:
            if self._in_block:
                end = self._pending.find(CLOSE, searched)
                searched = 0
                # Up to `known` the text is surely the block's (not the start of its closing tag).
                known = end if end >= 0 else len(self._pending) - _partial_tag(self._pending, CLOSE)
                self._stream(known, out)
                if end < 0:
                    return out
                block, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                self._in_block = False
                self._after_block = self._streamed is not None or self._close(block, out)
                self._streamed = None
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                before = self._pending[:start]
                text = self._text(before.rstrip())
                out.content += text
                self._layout = "" if self._after_block and not text else before[len(before.rstrip()):]
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
        """What is left at the end of the answer: a partial tag is content, and so is an unclosed block before its call
        shows, unless it follows calls or is constrained and is a call's start as far as it goes: then it is the markup
        of a call cut short, dropped (prose that spelled the tag stays content)."""
        out = Parsed()
        if self._in_block:
            self._stream(len(self._pending), out)
            streamed = self._streamed
            if streamed is not None:
                self._cut = streamed.index is not None and not streamed.done
            elif (self.num_calls or self.constrained) and _opens_call(self._pending):
                self._cut = self.max_calls is None or self.num_calls < self.max_calls  # one past them: dropped anyway
            else:
                out.content = self._layout + OPEN + self._pending
        elif not (self.num_calls and not self._pending.strip()):
            out.content = self._text(self._pending)
        self._pending = ""
        self._in_block = False
        self._streamed = None
        self._layout = ""
        return out

    @property
    def called(self) -> bool:
        """The answer holds calls, the last one whole (one cut short is no call to make: OpenAI's "tool_calls"
        finish reason says the calls are there to make)."""
        return self.num_calls > 0 and not self._cut

    def _stream(self, known: int, out: Parsed) -> None:
        """The call in the open block's first `known` characters: its start once it shows, then the
        arguments text that is new."""
        if self._streamed is None:
            header = _header_name(self._pending, known)
            if header is None:
                return
            name, start = header
            index = self._keep_call()
            self._streamed = _Arguments(index, start, start)
            if index is not None:
                out.calls.append(CallDelta(index, name=name, id=call_id()))
        if arguments := self._streamed.advance(self._pending, known):
            out.calls.append(CallDelta(self._streamed.index, arguments))

    def _keep_call(self) -> int | None:
        """The index of a new call, or None past max_calls."""
        if self.max_calls is not None and self.num_calls >= self.max_calls:
            return None
        self.num_calls += 1
        return self.num_calls - 1

    def _close(self, block: str, out: Parsed) -> bool:
        """A closed block not streamed as a call: a call (-> True), else content with its layout, as written."""
        call = parse_call(block)
        if call is None:
            out.content += self._layout + OPEN + block + CLOSE
            return False
        if (index := self._keep_call()) is not None:
            out.calls.append(CallDelta(index, call.arguments, call.name, call.id))
        return True


def _opens_call(text: str) -> bool:
    """Whether an unclosed block's text is a call's start as far as it goes (`{"name": "...`, JSON whitespace apart)."""
    compact = "".join(text.split())
    return CALL_HEAD.startswith(compact) or compact.startswith(CALL_HEAD)
