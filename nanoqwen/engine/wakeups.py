"""Wake-ups of other threads' event loops, held while the engine thread runs a step and sent together at its end.

A stream whose reader sleeps in an event loop (the server's gevent hub: api/channel.py) wakes that loop from the
engine thread with a thread-safe signal. One per stream a token cost the hub a callback and a wake-up each and the
engine a signal each; while the engine hands out a step's tokens (`HeldWakeups`), its signals wait for the end,
one per loop (its streams' own marks say which of them have news), and the loop hands each stream its events in one
pass.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from nanoqwen.engine.threads import native_local

log = logging.getLogger(__name__)
_held = native_local()  # .signals: the calling thread's held signals, while it holds them


class HeldWakeups:
    """`with HeldWakeups():` the signals the calling thread sends through `wake` go out as it leaves, in order (as
    the outermost one leaves, where they nest)."""

    def __enter__(self) -> None:
        self._outermost = getattr(_held, "signals", None) is None
        if self._outermost:
            _held.signals = []

    def __exit__(self, *exc: object) -> None:
        if not self._outermost:
            return
        signals, _held.signals = _held.signals, None
        for signal in signals:
            try:
                signal()
            except Exception:  # one loop's failure must not cost the others their wake-up, nor the engine its thread
                log.exception("waking a stream's loop failed")


def wake(signal: Callable[[], None]) -> None:
    """signal() now, or at the end of the calling thread's HeldWakeups."""
    signals = getattr(_held, "signals", None)
    if signals is None:
        signal()
    else:
        signals.append(signal)
