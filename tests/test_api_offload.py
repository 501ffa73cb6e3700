"""NativePool: CPU work runs in real OS threads while the greenlet that waits for it lets the hub run."""
from __future__ import annotations

import _thread
import contextlib
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest

from hub_util import hub_ticks
from nanoqwen.api import metrics
from nanoqwen.api.errors import APIError
from nanoqwen.api.offload import NativePool, PoolFullError
from nanoqwen.api.shared_stats import MULTIPROC_ENV
from nanoqwen.engine.threads import NativeEvent

Pools = Callable[[int, int], NativePool]


@pytest.fixture()
def pools() -> Iterator[Pools]:
    """NativePool(workers, max_pending), each stopped after the test (its idle threads outlived it)."""
    made: list[NativePool] = []

    def make(workers: int, max_pending: int) -> NativePool:
        made.append(NativePool(workers, max_pending))
        return made[-1]

    yield make
    for pool in made:
        pool.stop()


def _in_parallel(pool: NativePool, then: Callable[[], int]) -> list[int]:
    """then() in both of a 2-worker pool's workers at once: each job blocks its OS thread until the other runs too (in
    parallel, or never: the wait fails)."""
    started: list[int] = []
    both_started = NativeEvent()

    def job() -> int:
        started.append(1)
        if len(started) == 2:
            both_started.set()
        assert both_started.wait(10)
        return then()

    return [g.get(timeout=30) for g in [gevent.spawn(pool.run, job) for _ in range(2)]]


def test_work_runs_off_the_hub_thread_and_the_hub_keeps_running(pools: Pools) -> None:
    pool = pools(2, 4)

    def busy_until_ticked() -> int:
        """Blocks its OS thread (a monkey-patched sleep would only yield) until the hub has ticked 10 times."""
        deadline = time.monotonic() + 10
        while len(ticks) < 10 and time.monotonic() < deadline:
            NativeEvent().wait(0.01)
        return threading.get_ident()

    with hub_ticks() as ticks:
        idents = _in_parallel(pool, busy_until_ticked)
    assert threading.get_ident() not in idents and len(set(idents)) == 2  # two workers
    assert len(ticks) >= 10  # the hub ran other greenlets meanwhile


def test_errors_reach_the_caller(pools: Pools) -> None:
    pool = pools(1, 1)
    with pytest.raises(ValueError, match="bad prompt"):
        pool.run(lambda: (_ for _ in ()).throw(ValueError("bad prompt")))
    assert pool.run(lambda a, b: a + b, 2, 3) == 5


class _Held:
    """An object a weak reference can name."""


def test_a_jobs_objects_are_freed_once_its_caller_is_done(pools: Pools) -> None:
    """A job's arguments, and the locals of the frames its error's traceback holds, are freed by their reference counts
    once the caller is done with them: neither kept by the idle worker until its next job nor in a cycle (the waiting
    frame's job held the error) that only a full collection frees. A 264 KB schema's refused weighing left its memo
    (~50k objects) so, and each full collection then walked it with the GIL held (profiles/RESULTS.md, stall42)."""
    pool = pools(1, 1)
    alive: list[weakref.ref[_Held]] = []

    def refused(schema: _Held) -> None:
        memo = _Held()
        alive.append(weakref.ref(memo))
        raise ValueError("refused")

    gc.disable()  # what a collection would free is not freed here
    try:
        schema = _Held()
        alive.append(weakref.ref(schema))
        pool.run(lambda held: None, schema)
        with contextlib.suppress(ValueError):
            pool.run(refused, schema)
        del schema
        assert [ref() for ref in alive] == [None, None]
    finally:
        gc.enable()


def test_pending_jobs_are_bounded(pools: Pools) -> None:
    pool = pools(1, 2)
    release = NativeEvent()
    running = [gevent.spawn(pool.run, release.wait, 10) for _ in range(2)]
    gevent.sleep(0.05)
    with pytest.raises(PoolFullError):
        pool.run(lambda: None)
    release.set()
    assert [g.get(timeout=10) for g in running] == [True, True]
    assert pool.run(lambda: "free again") == "free again"


def _ended(native_ids: list[int]) -> bool:
    """Whether these threads of this process end within seconds (their own ids: the process's thread count also
    moves with other tests' threads ending late)."""
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/self/task/{i}").exists() for i in native_ids) and time.monotonic() < deadline:
        gevent.sleep(0.01)
    return not any(Path(f"/proc/self/task/{i}").exists() for i in native_ids)


def test_stop_ends_the_workers() -> None:
    pool = NativePool(workers=2, max_pending=2)
    workers = _in_parallel(pool, _thread.get_native_id)
    assert len(set(workers)) == 2 and all(Path(f"/proc/self/task/{i}").exists() for i in workers)  # running
    pool.stop()
    assert _ended(workers)
    workers = _in_parallel(pool, _thread.get_native_id)  # new workers
    pool.stop()
    assert _ended(workers)


def test_scrapes_past_their_pending_bound_are_a_503(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under gunicorn a scrape's maps are read in one native thread (ServerStats.prometheus), SCRAPES_PENDING scrapes
    at most running or waiting: the next is a 503 `queue_full` with Retry-After; those waiting are answered."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    release = threading.Event()
    monkeypatch.setattr(metrics, "_maps_exposition", lambda directory, names: b"" if release.wait(30) else b"late")
    stats = metrics.ServerStats(lambda: None)
    waiting = [gevent.spawn(stats.prometheus) for _ in range(metrics.SCRAPES_PENDING)]
    gevent.sleep(0.1)  # each submitted
    with pytest.raises(APIError) as info:
        stats.prometheus()
    assert (info.value.status, info.value.code, "Retry-After" in info.value.headers) == (503, "queue_full", True)
    release.set()
    assert [scrape.get(timeout=30) for scrape in waiting] == [b""] * metrics.SCRAPES_PENDING
