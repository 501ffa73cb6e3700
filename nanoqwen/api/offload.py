"""A small pool of real OS threads for CPU work a request greenlet must not do on the event loop.

Chat templating and tokenisation of a long prompt take seconds; run in a greenlet they would
freeze every stream and /health. Workers are native threads (see nanoqwen/engine/threads.py);
the waiting greenlet parks on a gevent Event that the worker sets through the hub's async
watcher (`send()` is the one thread-safe way to wake a gevent loop; the watcher also keeps the
loop alive while it waits).
"""
from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event

from nanoqwen.api.errors import APIError
from nanoqwen.engine.threads import NativeEvent, native_lock, start_native_thread

# The weight of a job's seconds in the pool's mean (an EWMA: a lane's last few jobs, not its history)
RECENT = 0.25


class PoolFullError(RuntimeError):
    """A full pool's refusal; `retry_after`: the whole seconds until the jobs pending now are done (NativePool)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    done: Any  # the waiting hub's async watcher
    value: Any = None
    error: BaseException | None = None


class NativePool:
    def __init__(self, workers: int, max_pending: int, stack_bytes: int | None = None,
                 jobs: str = "prompts are already being tokenised") -> None:
        self.workers = workers
        self.jobs = jobs  # what a refusal says max_pending of are pending
        self.stack_bytes = stack_bytes  # each worker's stack (start_native_thread); None: the default
        self.max_pending = max_pending  # running + waiting jobs; past it run() refuses
        self._jobs: collections.deque[_Job | None] = collections.deque()  # None: a worker's end
        self._lock = native_lock()  # held only around deque and counter updates
        self._has_jobs = NativeEvent()
        self._pending = 0
        self._started = False
        self._mean_s: float | None = None  # a job's seconds, over the last few ended (RECENT); None before any

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in a worker thread; the calling greenlet waits without blocking the loop.
        Raises PoolFullError when max_pending jobs are already pending, else what fn raises."""
        finished = gevent.event.Event()
        job = _Job(fn, args, gevent.get_hub().loop.async_())
        job.done.start(finished.set)  # before the worker can send()
        try:
            self._submit(job)
            finished.wait()
        finally:  # stop, not close: a worker may still send() to it if this greenlet was killed
            job.done.stop()
        if job.error is not None:
            try:
                raise job.error
            finally:  # the error's traceback holds this frame: its job holding the error was a cycle (_work)
                job = None
        return job.value

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._pending >= self.max_pending:
                # a full grammar lane (24 costly grammars) stayed full ~35 s: a client retrying after 1 s met it full
                wait = math.ceil(self._pending * (self._mean_s or 0.0) / self.workers)
                raise PoolFullError(f"{self.max_pending} {self.jobs}", max(1, wait))
            self._pending += 1
            self._jobs.append(job)
            self._has_jobs.set()
            if not self._started:  # lazily: apps built in tests that never tokenise start no threads
                self._started = True
                for _ in range(self.workers):
                    start_native_thread(self._work, self.stack_bytes)

    def stop(self) -> None:
        """Ends the workers once the jobs before are done (a test's pool); a later run() starts new ones."""
        with self._lock:
            if self._started:
                self._started = False
                self._jobs.extend([None] * self.workers)
                self._has_jobs.set()

    def _work(self) -> None:
        while True:
            self._has_jobs.wait()
            with self._lock:
                if not self._jobs:
                    self._has_jobs.clear()
                    continue
                job = self._jobs.popleft()
                if not self._jobs:
                    self._has_jobs.clear()
            if job is None:
                return
            started = time.monotonic()
            try:
                job.value = job.fn(*job.args)
            except BaseException as exc:  # handed to the waiting greenlet
                job.error = exc
            seconds = time.monotonic() - started
            with self._lock:
                self._pending -= 1
                self._mean_s = seconds if self._mean_s is None else self._mean_s + RECENT * (seconds - self._mean_s)
            done = job.done
            del job  # not kept while idle: its arguments, value and error (whose traceback holds every frame fn ran)
            done.send()
            del done  # nor its caller's wake-up


def run_or_503(pool: NativePool, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in one of `pool`'s threads; a 503 `queue_full` when its queue is full."""
    try:
        return pool.run(fn, *args)
    except PoolFullError as exc:
        raise APIError(503, f"the server is at capacity, retry later ({exc})", type="server_error",
                       code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
