"""What the Responses API's tests share."""
from __future__ import annotations

from typing import Any

import openai

from nanoqwen.api.responses_api import ResponseEvents
from nanoqwen.engine.request import Event
from waits import wait_for

RUNNING = ("queued", "in_progress")  # a response's statuses until it ends


def failed_stream(stream: ResponseEvents, events: list[Event], message: str = "boom") -> list[dict[str, Any]]:
    """The events of `stream` for engine `events` ended by an engine error (`message`), as Serving sends them: the
    opening, each event's, the error event's, then `response.failed`."""
    out = stream.opening()
    for event in [*events, Event(error=message)]:
        out += stream.chunks(event)
    return out + stream.failure(message)


def polled(client: openai.OpenAI, response_id: str) -> Any:
    """The response once it is no longer queued or in progress (a background one, polled)."""
    return wait_for(lambda: (response := client.responses.retrieve(response_id)).status not in RUNNING and response,
                    60, 0.02, lambda: f"response {response_id} to end: still "
                                      f"{client.responses.retrieve(response_id).status} after 60 s")
