"""prometheus-client's metric maps with their pages reserved (nanoqwen.api.metric_maps): where the disk has no room
a map's making raises ENOSPC instead of a later write into it killing the worker with SIGBUS; and the worker's
metrics over those maps (nanoqwen.api.metrics), in multiprocess mode as under gunicorn."""
from __future__ import annotations

import errno
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, values
from prometheus_client.multiprocess import MultiProcessCollector

from nanoqwen.api import metric_maps, metrics
from nanoqwen.api.config import MAX_SERVED_NAME_CHARS
from nanoqwen.api.errors import APIError
from nanoqwen.api.metric_maps import MAP_SIZE
from nanoqwen.api.metrics import PrometheusMetrics, ServerStats, Submitted
from nanoqwen.api.shared_stats import MULTIPROC_ENV
from nanoqwen.engine.request import Event, Usage


@pytest.fixture
def value_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type]:
    """prometheus-client's multiprocess mode into tmp_path, with the reserved maps, as in a worker: its value class."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    monkeypatch.setattr(values, "MmapedDict", values.MmapedDict)  # install()'s undone after
    monkeypatch.setattr(values, "_multi_process_cleanups", [])
    metric_maps.install()
    made = values.MultiProcessValue()
    monkeypatch.setattr(values, "ValueClass", made)
    yield made
    made.close_all_files()


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _no_room(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _live(cls: type) -> int:
    gc.collect()
    return sum(type(o) is cls for o in gc.get_objects())


def _scraped(directory: Path) -> CollectorRegistry:
    """What another worker's scrape reads of the maps (this worker's also where it was SIGKILLed)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))
    return registry


def test_a_map_is_reserved_when_made(value_class: type, tmp_path: Path) -> None:
    path = tmp_path / "counter_1.db"
    mapped = values.MmapedDict(str(path))
    assert _allocated(path) >= path.stat().st_size == MAP_SIZE  # prometheus-client's own: sparse
    mapped.close()


def test_a_map_that_cannot_be_reserved_raises_and_leaves_no_file(value_class: type, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "posix_fallocate", _no_room)
    with pytest.raises(OSError, match="No space left"):
        values.MmapedDict(str(tmp_path / "counter_2.db"))
    assert not list(tmp_path.iterdir())  # an empty file would fail the scrapes' reader


def test_a_map_is_seen_by_the_scrapes_only_once_reserved(value_class: type, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Another worker's scrape reads every `*.db` of the directory: a map there before its reservation reads empty
    (prometheus-client's reader raises struct.error: a 500), or is listed and then removed where it fails."""
    seen_while_reserving = []
    reserve = os.posix_fallocate

    def watched(fd: int, offset: int, length: int) -> None:
        seen_while_reserving.extend(tmp_path.glob("*.db"))
        reserve(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", watched)
    values.MmapedDict(str(tmp_path / "counter_3.db")).close()
    assert seen_while_reserving == []
    assert [path.name for path in tmp_path.iterdir()] == ["counter_3.db"]


@pytest.mark.parametrize("name", ["qwen3-0.6b", "a" * MAX_SERVED_NAME_CHARS,
                                  "\U0001f600" * (MAX_SERVED_NAME_CHARS // 12)],  # 12 characters escaped
                         ids=["short", "longest", "longest escaped"])
def test_the_metrics_maps_are_those_reserved_and_never_grow(value_class: type, tmp_path: Path, name: str) -> None:
    """ServerStats reserves PrometheusMetrics.MAPS by prometheus-client's names; every series is made at once, in
    each map's first size: no growth (which would be unreserved) is left for a later write, with the longest served
    name (vLLM's label, repeated in each series' key) too."""
    ServerStats(lambda: None, model_name=name).publish()
    maps = sorted(tmp_path.iterdir())
    assert [path.name for path in maps] == sorted(f"{kind}_{os.getpid()}.db" for kind in PrometheusMetrics.MAPS)
    for path in maps:
        assert _allocated(path) >= path.stat().st_size == MAP_SIZE, path
        assert int.from_bytes(path.read_bytes()[:4], "little") < MAP_SIZE // 2, path  # the bytes used


@pytest.mark.parametrize("unreservable", PrometheusMetrics.MAPS)
def test_maps_that_cannot_all_be_made_make_no_metric_until_they_can(value_class: type, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    unreservable: str) -> None:
    """One kind of map without room, the others made: no publish makes a metric (prometheus-client keeps each value
    made, so one made again at every retry grew the worker's memory), the requests' counts wait; once it has room
    they are all in the maps."""
    real = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(unreservable):
            _no_room()
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    stats = ServerStats(lambda: None)
    trace = stats.begin()
    trace.on_event(Event(token_ids=[1, 2]))
    stats.finish(trace, Usage(prompt_tokens=3, completion_tokens=2), Submitted(1, None, [3]))
    with pytest.raises(OSError, match="No space left"):
        stats.publish()
    made = _live(value_class)
    for _ in range(20):
        with pytest.raises(OSError, match="No space left"):
            stats.publish()
    assert _live(value_class) == made == 0
    monkeypatch.setattr(os, "posix_fallocate", real)
    stats.publish()
    scraped = _scraped(tmp_path)
    assert scraped.get_sample_value("nanoqwen_requests_total", {"outcome": "served"}) == 1
    assert scraped.get_sample_value("nanoqwen_prompt_tokens_total") == 3
    assert scraped.get_sample_value("nanoqwen_request_duration_seconds_count") == 1


def test_a_request_is_in_the_maps_before_the_next_publish(value_class: type, tmp_path: Path) -> None:
    """Once the maps are made a request's own counts are written at once: a worker SIGKILLed before its next publish
    loses only the per-token counts it kept pending."""
    stats = ServerStats(lambda: None)
    stats.publish()
    for _ in range(2):
        trace = stats.begin()
        trace.on_event(Event(token_ids=[1]))
        trace.on_event(Event(token_ids=[2]))
        stats.finish(trace, Usage(prompt_tokens=4, completion_tokens=2), Submitted(1, None, [4]))
    stats.abort(stats.begin(), Submitted(1, None, [1]))
    scraped = _scraped(tmp_path)
    assert scraped.get_sample_value("nanoqwen_requests_total", {"outcome": "served"}) == 2
    assert scraped.get_sample_value("nanoqwen_requests_total", {"outcome": "aborted"}) == 1
    assert scraped.get_sample_value("nanoqwen_prompt_tokens_total") == 8
    assert scraped.get_sample_value("nanoqwen_time_to_first_token_seconds_count") == 2
    assert scraped.get_sample_value("nanoqwen_request_duration_seconds_count") == 2
    assert scraped.get_sample_value("nanoqwen_generation_tokens_total") == 0  # pending
    stats.publish()
    assert _scraped(tmp_path).get_sample_value("nanoqwen_generation_tokens_total") == 4


def test_a_multiprocess_directory_gone_at_a_scrape_is_unavailable(value_class: type,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Gone between any check and prometheus-client's own (its ValueError): a 503 `stats_unavailable`, not a 500."""
    def gone(registry: CollectorRegistry, path: str | None = None) -> None:
        raise ValueError("env PROMETHEUS_MULTIPROC_DIR is not set or not a directory")

    monkeypatch.setattr(metrics, "FoldedCollector", gone)
    with pytest.raises(APIError) as raised:
        ServerStats(lambda: None).prometheus()
    assert (raised.value.status, raised.value.code) == (503, "stats_unavailable")


@pytest.mark.parametrize("garbage", [b"abc", bytes(range(64))])
def test_a_damaged_live_map_is_unavailable(value_class: type, tmp_path: Path, garbage: bytes) -> None:
    """A map prometheus-client cannot read (its struct.error or RuntimeError, not an OSError): a 503
    `stats_unavailable` that says so, not a 500 at every scrape."""
    (tmp_path / "counter_7.db").write_bytes(garbage)
    with pytest.raises(APIError) as raised:
        ServerStats(lambda: None).prometheus()
    assert (raised.value.status, raised.value.code) == (503, "stats_unavailable")
    assert "a metrics map is damaged" in raised.value.message
