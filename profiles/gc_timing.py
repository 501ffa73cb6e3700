"""The profiles' timing of the collector's runs (stall_watch.py, gil_watch_conf.py, bench_gil_holds.py): a
gc.callbacks entry that hands each collection's wall and CPU seconds to the profile's own report."""
from __future__ import annotations

import time
from collections.abc import Callable

Done = Callable[[dict[str, int], float, float], None]  # (the collector's info, wall seconds, CPU seconds)


def timed_collections(done: Done) -> Callable[[str, dict[str, int]], None]:
    """A gc.callbacks entry that calls done(info, wall, CPU) as each collection ends, on its thread (CPU: that thread's
    time). One slot holds the start: the collector runs one collection at a time, begun and ended on one thread."""
    started: list[tuple[float, float]] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = [(time.perf_counter(), time.thread_time())]
        elif started:
            wall, cpu = started.pop()
            done(info, time.perf_counter() - wall, time.thread_time() - cpu)

    return timed
