"""Server-sent events framing."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from nanoqwen.api.encode import compact_json, encode_text
from nanoqwen.api.errors import generation_error

if TYPE_CHECKING:
    from nanoqwen.engine.request import Event

DONE = "data: [DONE]\n\n"
# a comment line, which SSE clients skip: written once the client's end of stream came (serving.client_probe)
PROBE = ": keep-alive\n\n"
PROBE_BYTES = PROBE.encode()  # a background follower's frames are bytes
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any, split: bool = False) -> str:
    """`split`: encoded in small C calls (encode_text), for a large chunk built off the loop."""
    data = encode_text(obj) if split else compact_json(obj)
    return f"data: {data}\n\n"


def named_event(chunk: dict[str, Any], split: bool = False) -> str:
    """A chunk framed with its `type` as the SSE event name (the Responses API's events)."""
    return f"event: {chunk['type']}\n{sse(chunk, split)}"


@dataclass
class RunningUsage:
    """vLLM's `stream_options.continuous_usage_stats`: the usage so far, on every chunk of a stream."""

    prompt_tokens: int
    completion_tokens: int = 0

    def add(self, event: Event) -> None:
        self.completion_tokens += len(event.token_ids)

    def json(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class DoneFraming:
    """Chat and legacy completions' streams: `data:` chunks, a failure as an error object, `data: [DONE]` last."""

    ending: ClassVar[str] = DONE
    repeats_answer: ClassVar[bool] = False  # its last chunk has the usage, not the answer
    running: RunningUsage | None  # the builder's: the continuous usage, when the client asked for it

    def with_usage(self, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`chunks` as they go out, each with the continuous usage when asked for: the usage as it is now (a held
        chunk's too, not as when it was built), one object for them all."""
        if self.running is not None and chunks:
            usage = self.running.json()
            for chunk in chunks:
                chunk["usage"] = usage
        return chunks

    def repeats(self, chunk: dict[str, Any]) -> bool:
        return False

    def head(self) -> dict[str, Any]:
        """The fields every chunk of the stream starts with, the same in each (id, object, created, model...)."""
        raise NotImplementedError

    @cached_property
    def _framed_head(self) -> str:
        return f'data: {compact_json(self.head())[:-1]},"choices":'

    @cached_property
    def _head_size(self) -> int:
        return len(self.head())

    def frame(self, chunk: dict[str, Any], split: bool = False) -> str:
        """A chunk of the builder's (`head()`, then `choices`, then perhaps `usage`, as its objects are built) with
        its head encoded once for the stream: encoding it again for every token was most of a token's JSON."""
        if split or "choices" not in chunk or len(chunk) != self._head_size + 1 + ("usage" in chunk):
            return sse(chunk, split)  # a large one built off the loop, an error, or one with a key of its own
        usage = f',"usage":{compact_json(chunk["usage"])}' if "usage" in chunk else ""
        return f'{self._framed_head}{compact_json(chunk["choices"])}{usage}}}\n\n'

    def failure(self, message: str, param: str | None = None) -> list[dict[str, Any]]:
        return [generation_error(message, param).body()]
