"""GeventEventStream: the engine's OS thread feeds a greenlet without blocking the hub."""
from __future__ import annotations

import time

import gevent
import pytest

from hub_util import hub_ticks
from nanoqwen.api.channel import GeventEventStream
from nanoqwen.engine.request import Event, Usage
from nanoqwen.engine.threads import start_native_thread


def test_native_thread_wakes_the_greenlet_and_the_hub_keeps_running() -> None:
    stream = GeventEventStream()

    def produce() -> None:  # plays the engine thread: real OS thread, blocking sleeps
        for i in range(5):
            time.sleep(0.05)
            stream.put(Event(text=str(i), token_ids=[i]))
        stream.put(Event(usage=Usage(prompt_tokens=1, completion_tokens=5)))

    with hub_ticks() as ticks:
        start_native_thread(produce)
        events = gevent.spawn(lambda: list(stream)).get(timeout=5)
    assert "".join(e.text for e in events) == "01234" and events[-1].is_last
    assert len(ticks) >= 10  # the hub ran other greenlets while this one waited


def test_timeout() -> None:
    stream = GeventEventStream()
    with pytest.raises(TimeoutError):
        stream.get(timeout=0.05)
    stream.put(Event(text="late"))
    assert stream.get(timeout=1).text == "late"
