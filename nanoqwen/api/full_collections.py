"""The cyclic collector's full collections put off while a grammar is made in the grammars' pool.

A large JSON Schema's admission (structured._grammar: its copy, rewrite and weighing, on a pool thread) keeps ~50k
objects alive (its copy, object_runs' Merged/Rows/Adds memo) while it allocates millions more. Each full (generation 2)
collection it set off walked all of them with the GIL held, collecting nothing, and every stream and /health waited: as
served, two a 264 KB schema, 10-151 ms of CPU each and up to 0.55 s of wall at a load of 9-13 (profiles/RESULTS.md,
stall42: the admission's longest GIL holds by far; llguidance drops the GIL to compile). The worker froze what it loaded
(gc.freeze), so generation 2 holds little and the collector's rule (a full collection once what generation 2 gained
passes a quarter of it) lets one run about every 70,000 allocations. While a grammar is made only the young generations
are collected, and once no grammar is being made the full collections resume: the walk then due finds the job's objects
freed (the schema's trees by their reference counts; a refused schema's walk stays alive in its exception's traceback
until the 400 is sent, so not at the job's end). A full collection due (by the threshold; the quarter rule not asked)
when a job starts alone runs then, once; beside another job (the grammars' pool has two threads) only once full
collections have been off MAX_OFF_S, so that it does not walk the other's schema but long-lived cyclic garbage from the
loop and the engine waits no longer than that, whatever the flood of jobs. An incremental collector (CPython
3.14.0-3.14.4) walks the old generation a slice at a time and has no generation 2 threshold to raise: there the jobs run
as they are.
"""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any, TypeVar

from nanoqwen.engine.threads import native_lock

T = TypeVar("T")

NEVER = 2**31 - 1  # generation 2's threshold (young collections between two full ones) while put off
MAX_OFF_S = 10.0  # the longest full collections stay off while jobs overlap without a break
GENERATIONAL = gc.get_threshold()[2] != 0  # an incremental collector (CPython 3.14.0-3.14.4) has no generation 2


class FullCollections:
    """One count of the jobs running with full collections put off: the collector is the process's."""

    def __init__(self) -> None:
        self._lock = native_lock()  # the grammars' pool threads are native
        self._running = 0
        self._threshold = 0  # generation 2's own, read as the first of overlapping jobs starts, restored after
        self._off_since = 0.0  # when full collections were last put off, or the last one due ran

    def put_off(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) with no full collection started meanwhile; the one due, if one is, first (alone, or after
        MAX_OFF_S beside other jobs)."""
        if not GENERATIONAL:
            return fn(*args)
        with self._lock:
            now = time.monotonic()
            if not self._running:
                young, older, self._threshold = gc.get_threshold()
                gc.set_threshold(young, older, NEVER)
                self._off_since = now
            self._running += 1
            due = gc.isenabled() and gc.get_count()[2] > self._threshold and (
                self._running == 1 or now - self._off_since > MAX_OFF_S)
            if due:
                self._off_since = now
        try:
            if due:
                gc.collect()  # outside the lock: a finalizer it runs may make a grammar
            return fn(*args)
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    young, older, _ = gc.get_threshold()
                    gc.set_threshold(young, older, self._threshold)


FULL_COLLECTIONS = FullCollections()
