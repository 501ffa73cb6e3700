"""Server-sent events framing."""
from __future__ import annotations

import json
from typing import Any, ClassVar

from nanoqwen.api.errors import error_body

DONE = "data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class DoneFraming:
    """Chat and legacy completions' streams: `data:` chunks, a failure as an error object, `data: [DONE]` last."""

    ending: ClassVar[str] = DONE

    def frame(self, chunk: dict[str, Any]) -> str:
        return sse(chunk)

    def failure(self, message: str) -> list[dict[str, Any]]:
        return [error_body(message, type="server_error")]
