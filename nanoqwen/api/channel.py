"""An EventStream whose consumer is a greenlet and whose producer is the engine's OS thread.

The engine thread must not touch gevent objects directly (the hub, its greenlets and watchers belong to the hub's
thread). It appends the event, marks the stream ready in its hub's HubWaker and signals the waker's thread-safe async
watcher, once per engine step however many streams it fed (engine/wakeups.py). In the hub, the waker's callback
switches into each ready stream's parked greenlet in turn: one cross-thread wake-up a step, where a
`run_callback_threadsafe` per stream a token cost the hub two callbacks and an Event's links each.
"""
from __future__ import annotations

import collections
import sys
from typing import Any

import gevent
from greenlet import getcurrent, greenlet

from nanoqwen.engine.stream import EventStream
from nanoqwen.engine.threads import native_local
from nanoqwen.engine.wakeups import wake


class HubWaker:
    """One per hub: the streams that have news, and the one signal that makes the hub hand them out."""

    def __init__(self, loop: Any) -> None:  # gevent's loop (libev's or libuv's)
        self.loop = loop
        self._ready: collections.deque[GeventEventStream] = collections.deque()
        self._signalled = False  # a signal is out (or held) that will run _dispatch after the last mark
        # as gevent's own thread-safe callbacks, it keeps no loop alive, but while a reader waits without a timeout
        self._async = loop.async_(ref=False)
        self._async.start(self._dispatch)
        self._untimed = 0  # readers waiting without a timeout

    def mark(self, stream: GeventEventStream) -> None:
        """Any thread: `stream` has news for its reader."""
        self._ready.append(stream)
        if not self._signalled:
            self._signalled = True
            wake(self._async.send)

    def untimed_wait(self, waits: int) -> None:
        """A reader starts (1) or ends (-1) a wait without a timeout: the signal it waits for keeps the loop alive,
        as a timed wait's timer does (else a put from a greenlet, whose signal the loop takes at its next turn,
        would find it gone: LoopExit)."""
        self._untimed += waits
        self._async.ref = self._untimed > 0

    def _dispatch(self) -> None:
        self._signalled = False  # before taking the marks: a mark after this signals again
        ready = self._ready
        try:
            for _ in range(len(ready)):
                ready.popleft()._wake()
        finally:  # something escaped mid-pass (an exit delivered in the hub): the streams left marked go next turn
            if ready and not self._signalled:
                self._signalled = True
                self._async.send()


_local = native_local()  # .waker: the waker of the thread's hub (one hub a thread, one loop a hub)


def _waker(loop: Any) -> HubWaker:
    waker = getattr(_local, "waker", None)
    if waker is None or waker.loop is not loop:  # the first, or a new hub's (the thread's last was destroyed)
        waker = _local.waker = HubWaker(loop)
    return waker


class GeventEventStream(EventStream):
    """Read by greenlets of the hub of the greenlet that makes it."""

    def __init__(self) -> None:
        super().__init__()
        self._hub = gevent.get_hub()
        self._waker = _waker(self._hub.loop)
        self._marked = False  # in the waker's ready streams, not yet handed out
        self._parked: greenlet | None = None  # the reader, while it waits for an event
        # the reader's timeout: one repeating timer a stream, restarted at each wait (a Timeout a wait was a timer
        # made, started and stopped and a Python object, a token)
        self._timer: Any = None
        self._timeout = 0.0

    def _notify(self) -> None:
        if not self._marked:
            self._marked = True
            self._waker.mark(self)

    def _wake(self) -> None:
        """In the hub: the stream's events are there for its reader (if it waits: else it finds them)."""
        self._marked = False  # before the reader looks: a put after this marks again
        self._resume(True)

    def _resume(self, woken: bool) -> None:
        parked = self._parked
        if parked is not None:
            try:
                parked.switch(woken)
            except BaseException:  # as gevent's Waiter: the hub reports what escapes a raw greenlet and goes on
                self._hub.handle_error(parked, *sys.exc_info())

    def _expire(self) -> None:
        if self._parked is None:  # the reader got its event, or left: the timer waits for its next wait
            self._timer.stop()
        else:
            self._resume(False)

    def _wait(self, timeout: float | None) -> bool:
        if timeout is not None:
            if timeout <= 0:
                return False  # a repeat of 0 would never fire
            if self._timer is None or timeout != self._timeout:
                if self._timer is not None:
                    self._timer.close()
                self._timer = self._hub.loop.timer(timeout, timeout)
                self._timeout = timeout
            self._timer.again(self._expire, update=False)
        else:
            if self._timer is not None:
                self._timer.stop()  # an untimed wait after timed ones
            self._waker.untimed_wait(1)
        self._parked = getcurrent()
        try:  # a timeout with an event there (its wake-up held by the engine's step) is no timeout
            return self._hub.switch() or bool(self._events)
        finally:
            self._parked = None
            if timeout is None:
                self._waker.untimed_wait(-1)

    def close(self) -> None:
        """Its reader is done with it (the last event read, or it left before: an abort, its client gone): the timer
        goes, where it ran on, ref'd, to its next expiry (a poll period a reader that left, the hub's exit waiting
        for it). Events put after this are kept for no one."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None
