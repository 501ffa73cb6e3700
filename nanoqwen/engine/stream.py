"""Per-request event channel from the engine thread to whoever consumes the request.

The engine only calls `put` (from its own OS thread). `EventStream` is the plain-thread
consumer; the server passes a gevent-aware subclass whose `get` parks the greenlet instead
of blocking the hub.
"""
from __future__ import annotations

import collections
from collections.abc import Iterator

from nanoqwen.engine.request import Event
from nanoqwen.engine.threads import NativeEvent


class EventStream:
    def __init__(self) -> None:
        self._events: collections.deque[Event] = collections.deque()
        # made at the first wait, not here: the gevent subclass never waits on it (a native lock a request)
        self._ready: NativeEvent | None = None
        self.ended = False  # `get` has returned the last event

    def put(self, event: Event) -> None:
        """Called by the engine thread."""
        self._events.append(event)
        self._notify()

    def admitted(self) -> None:
        """Called by the engine thread once the request's first prefill is scheduled: it has left the queue."""

    def _notify(self) -> None:
        ready = self._ready
        if ready is not None:  # else no wait began: the reader finds the event appended
            ready.set()

    def _wait(self, timeout: float | None) -> bool:
        """Blocks until a `put` after the caller found no event, or for `timeout`: False if it passed. May return
        True with none there (its caller looks again)."""
        # the flag is there (cleared) before the reader looks: a put it does not see finds the flag and sets it
        if self._ready is None:
            self._ready = NativeEvent()
        self._ready.clear()
        return bool(self._events) or self._ready.wait(timeout)

    @property
    def waiting(self) -> bool:
        """Whether an event is there for `get` to return at once."""
        return bool(self._events)

    def get(self, timeout: float | None = None) -> Event:
        """Next event; raises TimeoutError if none arrives within `timeout` seconds."""
        while not self._events:
            if not self._wait(timeout):
                raise TimeoutError("no event from the engine")
        event = self._events.popleft()
        self.ended = event.is_last
        return event

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.get()
            yield event
            if event.is_last:
                return
