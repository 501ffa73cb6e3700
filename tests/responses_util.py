"""What the Responses API's unit tests share."""
from __future__ import annotations

from typing import Any

from nanoqwen.api.responses_api import ResponseEvents
from nanoqwen.engine.request import Event


def failed_stream(stream: ResponseEvents, events: list[Event], message: str = "boom") -> list[dict[str, Any]]:
    """The events of `stream` for engine `events` ended by an engine error (`message`), as Serving sends them: the
    opening, each event's, the error event's, then `response.failed`."""
    out = stream.opening()
    for event in [*events, Event(error=message)]:
        out += stream.chunks(event)
    return out + stream.failure(message)
