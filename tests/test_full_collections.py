"""The cyclic collector's full collections put off while grammars are made (nanoqwen/api/full_collections.py)."""
from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from nanoqwen.api import full_collections
from nanoqwen.api.full_collections import FullCollections

pytestmark = pytest.mark.skipif(not full_collections.GENERATIONAL, reason="an incremental collector: no put-off")


@pytest.fixture
def full_runs() -> Iterator[list[str]]:
    """Each full collection's start, as "full", in order with the marks a test appends."""
    runs: list[str] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            runs.append("full")

    threshold = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    gc.callbacks.append(record)
    try:
        yield runs
    finally:
        gc.callbacks.remove(record)
        gc.set_threshold(*threshold)


def make_one_due() -> None:
    """Past the fixture's generation 2 threshold (10): more generation 1 collections since the last full one."""
    for _ in range(12):
        gc.collect(1)


def test_a_due_full_collection_runs_before_a_lone_job_and_none_during_it(full_runs) -> None:
    collections = FullCollections()

    def job() -> int:
        full_runs.append("job")
        make_one_due()  # put off: none starts while the job runs
        full_runs.append("job done")
        return 7

    make_one_due()
    assert collections.put_off(job) == 7
    assert full_runs == ["full", "job", "job done"]
    assert gc.get_threshold() == (700, 10, 10)


def test_a_job_beside_another_does_not_walk_its_objects_until_full_collections_were_off_long(full_runs,
                                                                                             monkeypatch) -> None:
    """The grammars' pool has two threads: a job starting beside another one's big weighing ran the due full
    collection over that weighing's objects, the stall put_off is for; it runs there only past MAX_OFF_S."""
    collections = FullCollections()
    started, release = threading.Event(), threading.Event()
    gc.collect()  # none due as the first job starts alone
    full_runs.clear()

    def long_job() -> None:
        started.set()
        assert release.wait(30)

    first = threading.Thread(target=collections.put_off, args=(long_job,))
    first.start()
    try:
        assert started.wait(30)
        make_one_due()
        collections.put_off(full_runs.append, "beside")
        monkeypatch.setattr(full_collections, "MAX_OFF_S", 0.0)
        collections.put_off(full_runs.append, "beside, off long")
    finally:
        release.set()
        first.join(30)
    assert full_runs == ["beside", "full", "beside, off long"]
    assert gc.get_threshold() == (700, 10, 10)


def test_a_failing_job_gives_the_threshold_back(full_runs) -> None:
    def failing() -> None:
        assert gc.get_threshold()[2] == full_collections.NEVER
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        FullCollections().put_off(failing)
    assert gc.get_threshold() == (700, 10, 10) and full_runs == []
