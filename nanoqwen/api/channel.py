"""An EventStream whose consumer is a greenlet and whose producer is the engine's OS thread.

The engine thread must not touch gevent objects directly (gevent's Event, and monkey-patched
threading primitives, belong to the hub's thread). It only schedules `Event.set` on the hub
with `loop.run_callback_threadsafe`, which wakes the loop through its thread-safe async watcher.
"""
from __future__ import annotations

import gevent
import gevent.event

from nanoqwen.engine.stream import EventStream


class GeventEventStream(EventStream):
    def __init__(self) -> None:
        super().__init__()
        self._loop = gevent.get_hub().loop  # the hub of the greenlet that will read
        self._flag = gevent.event.Event()

    def _notify(self) -> None:
        self._loop.run_callback_threadsafe(self._flag.set)

    def _clear(self) -> None:
        self._flag.clear()

    def _wait(self, timeout: float | None) -> bool:
        return self._flag.wait(timeout)
