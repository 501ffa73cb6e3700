"""The gevent hub's responsiveness while a test blocks a greenlet."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import gevent


@contextmanager
def hub_ticks(interval: float = 0.01) -> Iterator[list[float]]:
    """The times a greenlet ticking every `interval` ran during the block: many, if the hub kept running."""
    ticks: list[float] = []

    def tick() -> None:
        while True:
            ticks.append(time.perf_counter())
            gevent.sleep(interval)

    ticker = gevent.spawn(tick)
    try:
        yield ticks
    finally:
        ticker.kill()
