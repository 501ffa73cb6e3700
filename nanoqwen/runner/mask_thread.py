"""One native thread beside the engine thread, for a step's token masks: the mask of step t depends only on the
tokens sampled up to step t-1, known before step t's forward starts, so the masks are filled while the forward runs
(llguidance drops the GIL while it computes one) and joined just before sampling, as vLLM and SGLang overlap them."""
from __future__ import annotations

import contextlib
from collections.abc import Callable


class MaskThread:
    """Runs one job at a time, each on the thread or on the caller (`here`), after the job before it is done; the
    thread starts at the first job it takes and ends at close()."""

    def __init__(self) -> None:
        self._job: Callable[[], None] | None = None
        self._error: BaseException | None = None
        self._wake = None  # released: a job (or the end) for the thread
        self._idle = None  # held from a job's start to its end
        self._closed = False

    def start(self, job: Callable[[], None], here: bool = False) -> None:
        """Runs `job` on the thread (`here`: on the caller, now) once the job before is done, even one whose step
        failed and never waited for it; a job run here raises what it raises, one on the thread at wait()."""
        if self._idle is None:
            if here:
                job()
                return
            self._start_thread()
        self._idle.acquire()
        self._error = None  # a failed step's job: its error is that step's, gone with it
        if here:
            try:
                job()
            finally:
                self._idle.release()
            return
        self._job = job
        self._wake.release()

    def wait(self) -> None:
        """Returns once the last job is done; raises what it raised on the thread."""
        if self._idle is None:
            return
        self._idle.acquire()
        self._idle.release()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Ends the thread after its job, if one runs (its owner is gone). Never waits: it runs from the owner's
        finalizer, which may run on this thread itself (the job held the owner's last reference) or on the event
        loop."""
        if self._idle is None or self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):  # released already: a job given, not yet taken (its owner lives on)
            self._wake.release()

    def _start_thread(self) -> None:
        # imported here: the engine package imports the runner
        from nanoqwen.engine.threads import native_lock, start_native_thread

        self._wake, self._idle = native_lock(), native_lock()
        self._wake.acquire()
        start_native_thread(self._run)

    def _run(self) -> None:
        while True:
            self._wake.acquire()
            if self._closed:
                return
            try:
                self._job()
            except BaseException as exc:  # noqa: BLE001 -- raised on the engine thread, in wait()
                self._error = exc
            finally:
                self._job = None  # nothing of its owner kept alive between jobs: close() may come from here
                self._idle.release()
