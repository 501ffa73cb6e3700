"""Real OS threads and locks, even when gevent has monkey-patched `threading`.

After `gevent.monkey.patch_all()`, `threading.Thread` (and even
`get_original("threading", "Thread")`) make greenlets, and `threading.Lock` is a gevent lock.
The engine must run torch in a real thread, so it builds on the original `_thread` primitives.
"""
from __future__ import annotations

import _thread
import contextlib
from collections.abc import Callable


def _original(name: str):
    try:
        from gevent import monkey
    except ImportError:
        return getattr(_thread, name)
    return monkey.get_original("_thread", name)


def start_native_thread(target: Callable[[], None], stack_bytes: int | None = None) -> int:
    """`stack_bytes`: the thread's stack (reserved, not committed: pages are touched as it grows); None: the default."""
    if stack_bytes is None:
        return _original("start_new_thread")(target, ())
    with _STARTING:
        before = _original("stack_size")(stack_bytes)
        try:
            return _original("start_new_thread")(target, ())
        finally:
            _original("stack_size")(before)


def native_lock():
    return _original("allocate_lock")()


_STARTING = native_lock()  # _thread's stack size is the process's: set and restored around one start at a time


class NativeEvent:
    """A set/wait flag that works across real threads whatever gevent has patched.

    Waiting blocks the calling OS thread: use it from real threads only, never from a greenlet.
    """

    def __init__(self) -> None:
        self._lock = native_lock()
        self._lock.acquire()  # held = not set

    def set(self) -> None:
        with contextlib.suppress(RuntimeError):  # already set
            self._lock.release()

    def clear(self) -> None:
        self._lock.acquire(False)

    def wait(self, timeout: float | None = None) -> bool:
        """True once set (and leaves it set); False on timeout."""
        if self._lock.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
            self._lock.release()
            return True
        return False


def native_local():
    """Storage per real OS thread (gevent's patched `threading.local` is per greenlet)."""
    return _original("_local")()
