"""Dead workers' counter and histogram maps folded into one archive of each kind (nanoqwen.api.metric_archive): the
run directory stays bounded across respawns, and a scrape at any point of a fold reads every count once."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from nanoqwen.api import metric_archive, shared_stats
from nanoqwen.api.metric_archive import FoldedCollector
from nanoqwen.api.shared_stats import MULTIPROC_ENV, RUN_DIR_ENV, finish_folds, forget_worker

LIVE = 1  # a worker alive throughout
LOG = logging.getLogger("test_metric_archive")  # gunicorn's master's log in its place
SERVED = mmap_key("reqs", "reqs_total", ["outcome"], ["served"], "Requests")
LOW = mmap_key("lat", "lat_bucket", ["le"], ["0.5"], "Latency")
HIGH = mmap_key("lat", "lat_bucket", ["le"], ["+Inf"], "Latency")
SUM = mmap_key("lat", "lat_sum", [], [], "Latency")


@pytest.fixture
def directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run directory as the master makes it, with a live worker's maps."""
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    shared_stats.stats_dir(tmp_path).mkdir()
    monkeypatch.setenv(RUN_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(MULTIPROC_ENV, str(metrics))
    _worker_maps(metrics, LIVE)
    return metrics


def _worker_maps(directory: Path, pid: int) -> None:
    """The maps of a worker that served `pid` requests: `pid` of them under 0.5 s, one more over, in 0.25 s each."""
    for kind, values in (("counter", {SERVED: pid + 1}), ("histogram", {LOW: pid, HIGH: 1, SUM: (pid + 1) / 4})):
        mapped = MmapedDict(str(directory / f"{kind}_{pid}.db"))
        for key, value in values.items():
            mapped.write_value(key, value, 0.0)
        mapped.close()


def _fold(directory: Path, pid: int) -> None:
    for kind in metric_archive.FOLDED:
        metric_archive.fold(directory, kind, pid)


def _scraped(directory: Path) -> tuple[float | None, ...]:
    registry = CollectorRegistry()
    FoldedCollector(registry, str(directory))
    return tuple(registry.get_sample_value(name, labels) for name, labels in (
        ("reqs_total", {"outcome": "served"}), ("lat_bucket", {"le": "0.5"}), ("lat_bucket", {"le": "+Inf"}),
        ("lat_count", {}), ("lat_sum", {})))


def _totals(pids: list[int]) -> tuple[float, ...]:
    served = sum(pid + 1 for pid in pids)
    return served, sum(pids), served, served, served / 4


def test_respawned_workers_leave_two_maps_and_every_count(directory: Path) -> None:
    """40 workers dead one after another (a server under --max-requests): one archive of each kind, of one size, and
    the live worker's maps; the totals every worker's."""
    sizes = set()
    for dead in range(2, 42):
        _worker_maps(directory, dead)
        forget_worker(dead, LOG.exception)
        maps = sorted(path.name for path in directory.iterdir())
        generation = 2 * dead - 3  # two a fold: the archive naming the dead pid, then renamed to name none
        assert maps == sorted([f"counter_{LIVE}.db", f"histogram_{LIVE}.db", f"counter_folded_{generation}_0.db",
                               f"histogram_folded_{generation}_0.db"])
        sizes.add(sum(path.stat().st_size for path in directory.glob("*_folded_*")))
        assert _scraped(directory) == _totals([LIVE, *range(2, dead + 1)])
    assert len(sizes) == 1


def test_a_worker_given_a_folded_workers_pid_is_counted(directory: Path) -> None:
    """pids are reused: the successor (or any later worker) may get the pid the archive folded last, whose maps a
    scrape skips while the fold is under way; once it is done the archive names none."""
    _worker_maps(directory, 2)
    forget_worker(2, LOG.exception)
    _worker_maps(directory, 2)
    assert _scraped(directory) == _totals([LIVE, 2, 2])


def test_a_fold_that_cannot_write_keeps_the_dead_maps(directory: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    _worker_maps(directory, 2)

    def full(path: Path, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    forget_worker(2, LOG.exception)
    assert sorted(path.name for path in directory.iterdir()) == ["counter_1.db", "counter_2.db", "histogram_1.db",
                                                                 "histogram_2.db"]
    assert _scraped(directory) == _totals([LIVE, 2])
    assert [record.getMessage() for record in caplog.records] == [
        f"worker 2: the fold of its {kind} map failed" for kind in ("counter", "histogram")]
    assert "No space left" in caplog.text  # its traceback


def _unlink_fails_once(monkeypatch: pytest.MonkeyPatch, matches: Callable[[Path], bool]) -> None:
    """Path.unlink raises an I/O error for the first path that `matches`, then works again."""
    unlink = Path.unlink

    def failing(path: Path, missing_ok: bool = False) -> None:
        if matches(path):
            monkeypatch.setattr(Path, "unlink", unlink)
            raise OSError(5, "Input/output error")
        unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", failing)


def test_a_fold_stopped_after_its_write_is_finished_by_the_next(directory: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The removal of the archive before it fails once: the next fold finishes that one first (else its archive named
    only its own pid, and 3's map was read on top of it for ever); a write's leftover goes too."""
    for dead in (2, 3):
        _worker_maps(directory, dead)
    forget_worker(2, LOG.exception)
    _unlink_fails_once(monkeypatch, lambda path: path.name.startswith("counter_folded_"))
    forget_worker(3, LOG.exception)
    assert [record.getMessage() for record in caplog.records] == ["worker 3: the fold of its counter map failed"]
    assert _scraped(directory) == _totals([LIVE, 2, 3])
    (directory / "counter_folded_9_0.db.making").write_bytes(b"")  # the master stopped during a write
    _worker_maps(directory, 4)
    forget_worker(4, LOG.exception)
    assert _scraped(directory) == _totals([LIVE, 2, 3, 4])
    assert sorted(path.name for path in directory.iterdir()) == sorted([
        f"counter_{LIVE}.db", f"histogram_{LIVE}.db", "counter_folded_5_0.db", "histogram_folded_5_0.db"])  # bounded


def test_a_fold_left_undone_is_finished_before_the_next_fork(directory: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """The removal of dead worker 2's counter map fails once, its archive written (naming 2): the master finishes the
    fold before it forks (gunicorn's pre_fork), and a worker forked then may be given pid 2. Its map is counted from
    the first scrape, and kept by the next fold; finished at that fold (before), it was skipped until then (the
    archive named 2) and removed by it, its counts lost."""
    _worker_maps(directory, 2)
    _unlink_fails_once(monkeypatch, lambda path: path.name == "counter_2.db")
    forget_worker(2, LOG.exception)
    assert [record.getMessage() for record in caplog.records] == ["worker 2: the fold of its counter map failed"]
    finish_folds(LOG.exception)  # pre_fork's
    _worker_maps(directory, 2)  # the forked worker, given pid 2
    assert _scraped(directory) == _totals([LIVE, 2, 2])
    _worker_maps(directory, 3)
    forget_worker(3, LOG.exception)
    assert _scraped(directory) == _totals([LIVE, 2, 2, 3])
    assert len(caplog.records) == 1


def test_a_finish_that_fails_is_logged_not_raised(directory: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """pre_fork's finish raising would end gunicorn's master loop, every worker with it."""
    _worker_maps(directory, 2)
    _fold(directory, 2)
    (directory / "histogram_folded_1_0.db").rename(directory / "histogram_folded_0_2.db")  # a fold left undone
    _unlink_fails_once(monkeypatch, lambda path: path.name == "histogram_2.db")
    finish_folds(LOG.exception)
    [failure] = caplog.records
    assert failure.getMessage() == "before a fork: the finish of a histogram fold left undone failed"
    assert failure.exc_info


@pytest.mark.parametrize("garbage", [b"abc", bytes(range(64))])
def test_a_damaged_map_is_logged_not_raised(directory: Path, caplog: pytest.LogCaptureFixture,
                                            garbage: bytes) -> None:
    """A map prometheus-client cannot read (struct.error and the like, not OSError) is logged with its traceback:
    raised from gunicorn's child_exit, it ended the master's loop and took every worker down. The other steps are
    done all the same."""
    (directory / "counter_7.db").write_bytes(garbage)
    (directory / "gauge_livesum_7.db").write_bytes(b"")
    snapshot = shared_stats.snapshot_path(directory.parent, 7)
    snapshot.write_text("{}")
    forget_worker(7, LOG.exception)
    [failure] = caplog.records
    assert failure.getMessage() == "worker 7: the fold of its counter map failed" and failure.exc_info
    assert not snapshot.exists() and not (directory / "gauge_livesum_7.db").exists()
    # set aside, out of the scrapes' glob: left in place, every scrape would fail for as long as the server runs
    assert not (directory / "counter_7.db").exists() and (directory / "counter_7.db.damaged").read_bytes() == garbage
    assert _scraped(directory) == _totals([LIVE])


def _before_call(monkeypatch: pytest.MonkeyPatch, target: object, name: str, call: int,
                 action: Callable[[], None]) -> None:
    """`target.name` runs `action` before its call number `call` (0 first; the action's own calls counted after)."""
    real = getattr(target, name)
    calls = []

    def wrapped(*args: object) -> object:
        calls.append(args)
        if len(calls) == call + 1:
            action()
        return real(*args)

    monkeypatch.setattr(target, name, wrapped)


@pytest.mark.parametrize("at", range(8))
def test_a_scrape_during_a_fold_counts_every_worker_once(directory: Path, monkeypatch: pytest.MonkeyPatch,
                                                          at: int) -> None:
    """Workers 2 and 3 folded, 4 dead: 4 is folded before the scrape's read of each map in turn (the archives, the
    live worker's and 4's maps: 6, then a retry's reads where the listed archive was gone): every count once."""
    for dead in (2, 3, 4):
        _worker_maps(directory, dead)
    _fold(directory, 2)
    _fold(directory, 3)
    _before_call(monkeypatch, MmapedDict, "read_all_values_from_file", at, lambda: _fold(directory, 4))
    assert _scraped(directory) == _totals([LIVE, 2, 3, 4])
    assert not (directory / "counter_4.db").exists()  # folded


def test_a_scrape_during_a_burst_of_folds_counts_every_worker_once(directory: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """40 workers dead at once, folded one after each of the scrape's listings (its read of the old archive fails):
    more retries than SCRAPE_TRIES, each after a fold, and the scrape still reads every count once."""
    dead = list(range(2, 42))
    for pid in dead:
        _worker_maps(directory, pid)
    _fold(directory, dead[0])
    waiting = dead[1:]
    files = FoldedCollector._files

    def listed_then_folded(collector: FoldedCollector) -> list[str]:
        listing = files(collector)
        if waiting:
            _fold(directory, waiting.pop(0))
        return listing

    monkeypatch.setattr(FoldedCollector, "_files", listed_then_folded)
    assert _scraped(directory) == _totals([LIVE, *dead])
    assert not waiting and len(dead) - 1 > metric_archive.SCRAPE_TRIES


def test_a_scrape_stops_once_a_retry_lists_the_same_maps(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A map listed that cannot be found with no fold since (a dangling link): retried once, not read again for each
    map listed (on the worker's event loop)."""
    (directory / "counter_99.db").symlink_to(directory / "gone")
    listings = []
    files = FoldedCollector._files

    def counted(collector: FoldedCollector) -> list[str]:
        listings.append(files(collector))
        return listings[-1]

    monkeypatch.setattr(FoldedCollector, "_files", counted)
    with pytest.raises(FileNotFoundError):
        _scraped(directory)
    assert len(listings) == 2


def test_a_scrape_between_the_archives_write_and_the_dead_maps_removal(directory: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The new archive in place, the one before and the dead maps not yet removed: each count read once."""
    for dead in (2, 3):
        _worker_maps(directory, dead)
    _fold(directory, 2)
    write = metric_archive._write
    seen = []

    def written(path: Path, data: bytes) -> None:
        write(path, data)
        seen.append(_scraped(directory))

    monkeypatch.setattr(metric_archive, "_write", written)
    _fold(directory, 3)
    assert seen == [_totals([LIVE, 2, 3])] * 2  # after the counters' archive, and the histograms'
