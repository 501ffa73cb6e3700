"""Server-sent events framing."""
from __future__ import annotations

import json
from typing import Any, ClassVar

from nanoqwen.api.encode import encode_text
from nanoqwen.api.errors import error_body

DONE = "data: [DONE]\n\n"
# a comment line, which SSE clients skip: written once the client's end of stream came (serving.client_probe)
PROBE = ": keep-alive\n\n"
PROBE_BYTES = PROBE.encode()  # a background follower's frames are bytes
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any, split: bool = False) -> str:
    """`split`: encoded in small C calls (encode_text), for a large chunk built off the loop."""
    data = encode_text(obj) if split else json.dumps(obj, ensure_ascii=False, separators=(',', ':'))
    return f"data: {data}\n\n"


def named_event(chunk: dict[str, Any], split: bool = False) -> str:
    """A chunk framed with its `type` as the SSE event name (the Responses API's events)."""
    return f"event: {chunk['type']}\n{sse(chunk, split)}"


class DoneFraming:
    """Chat and legacy completions' streams: `data:` chunks, a failure as an error object, `data: [DONE]` last."""

    ending: ClassVar[str] = DONE
    repeats_answer: ClassVar[bool] = False  # its last chunk has the usage, not the answer

    def repeats(self, chunk: dict[str, Any]) -> bool:
        return False

    def frame(self, chunk: dict[str, Any], split: bool = False) -> str:
        return sse(chunk, split)

    def failure(self, message: str) -> list[dict[str, Any]]:
        return [error_body(message, type="server_error")]
