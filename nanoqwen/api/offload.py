"""A small pool of real OS threads for CPU work a request greenlet must not do on the event loop.

Chat templating and tokenisation of a long prompt take seconds; run in a greenlet they would
freeze every stream and /health. Workers are native threads (see nanoqwen/engine/threads.py);
the waiting greenlet parks on a gevent AsyncResult that the worker completes through the hub's
thread-safe `run_callback_threadsafe`, as GeventEventStream does for engine events.
"""
from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.event

from nanoqwen.engine.threads import NativeEvent, native_lock, start_native_thread

T = TypeVar("T")


class PoolFullError(RuntimeError):
    pass


class NativePool:
    def __init__(self, workers: int, max_pending: int) -> None:
        self.workers = workers
        self.max_pending = max_pending  # running + waiting jobs; past it run() refuses
        self._jobs: collections.deque = collections.deque()
        self._lock = native_lock()  # held only around deque and counter updates
        self._has_jobs = NativeEvent()
        self._pending = 0
        self._started = False

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a worker thread; the calling greenlet waits without blocking the loop.
        Raises PoolFullError when max_pending jobs are already pending, else what fn raises."""
        result: gevent.event.AsyncResult = gevent.event.AsyncResult()
        loop = gevent.get_hub().loop
        with self._lock:
            if self._pending >= self.max_pending:
                raise PoolFullError(f"{self.max_pending} prompts are already being tokenised")
            self._pending += 1
            self._jobs.append((fn, args, result, loop))
            self._has_jobs.set()
            if not self._started:  # lazily: apps built in tests that never tokenise start no threads
                self._started = True
                for _ in range(self.workers):
                    start_native_thread(self._work)
        return result.get()

    def _work(self) -> None:
        while True:
            self._has_jobs.wait()
            with self._lock:
                if not self._jobs:
                    self._has_jobs.clear()
                    continue
                fn, args, result, loop = self._jobs.popleft()
                if not self._jobs:
                    self._has_jobs.clear()
            try:
                value = fn(*args)
            except BaseException as exc:  # handed to the waiting greenlet
                loop.run_callback_threadsafe(result.set_exception, exc)
            else:
                loop.run_callback_threadsafe(result.set, value)
            finally:
                with self._lock:
                    self._pending -= 1
