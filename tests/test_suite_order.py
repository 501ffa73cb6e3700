"""The whole suite's two processes take the longest files first (tests/suite_order.py, conftest's hooks)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest
from suite_order import LONGEST_FIRST, file_order


def test_every_named_long_file_is_a_test_file_once() -> None:
    """A renamed or deleted file would drop out of the order silently."""
    here = Path(__file__).parent
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)
    assert [name for name in LONGEST_FIRST if not (here / name).is_file()] == []


def test_the_named_files_go_first_in_their_order_then_the_rest_by_test_count() -> None:
    first, second = LONGEST_FIRST[:2]
    collected = ["test_a.py", "test_many.py", first, "test_many.py", second, second, "test_many.py"]
    assert file_order(collected) == [first, second, "test_many.py", "test_a.py"]


def test_the_whole_suite_keeps_the_order_the_workers_collect(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-xdist (3.8+) re-sorts the files by test count unless told not to."""
    monkeypatch.setattr(conftest.os, "sched_getaffinity", lambda pid: {0, 1})
    option = SimpleNamespace(numprocesses=None, dist="no", loadscopereorder=True, capture="fd", usepdb=False,
                             trace=False)
    config = SimpleNamespace(option=option, args_source=pytest.Config.ArgsSource.TESTPATHS,
                             pluginmanager=SimpleNamespace(hasplugin=lambda name: name == "xdist"))
    conftest.pytest_cmdline_main(config)
    assert (option.numprocesses, option.dist, option.loadscopereorder) == (2, "loadfile", False)


def test_a_worker_sorts_its_collection_into_that_order() -> None:
    items = [SimpleNamespace(path=Path(name), nodeid=f"{name}::{i}") for i, name in
             enumerate(["test_a.py", LONGEST_FIRST[1], "test_a.py", LONGEST_FIRST[0]])]
    conftest.pytest_collection_modifyitems(SimpleNamespace(workerinput={}), items)
    assert [item.nodeid for item in items] == [f"{LONGEST_FIRST[0]}::3", f"{LONGEST_FIRST[1]}::1", "test_a.py::0",
                                               "test_a.py::2"]
