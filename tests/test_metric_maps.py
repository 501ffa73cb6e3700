"""prometheus-client's metric maps with their pages reserved (nanoqwen.api.metric_maps): where the disk has no room
a map's making or growing raises ENOSPC instead of a later write into it killing the worker with SIGBUS."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from prometheus_client import values
from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE

import nanoqwen.api.metrics  # noqa: F401  installs the reserved maps, as a worker's app does


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _no_room(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_map_is_reserved_when_made_and_grown(tmp_path: Path) -> None:
    path = tmp_path / "counter_1.db"
    mapped = values.MmapedDict(str(path))
    assert _allocated(path) >= path.stat().st_size == _INITIAL_MMAP_SIZE  # prometheus-client's own: sparse
    for i in range(400):  # ~300 bytes an entry: past the first 64 KiB
        mapped.write_value(f"a key long enough to fill the map's first pages sooner, number {i:04}" * 4, i, 0.0)
    assert _allocated(path) >= path.stat().st_size > _INITIAL_MMAP_SIZE
    mapped.close()


def test_a_map_that_cannot_be_reserved_raises_and_keeps_what_it_holds(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    made, unmade = tmp_path / "counter_1.db", tmp_path / "counter_2.db"
    mapped = values.MmapedDict(str(made))
    mapped.write_value("kept", 1.0, 0.0)
    monkeypatch.setattr(os, "posix_fallocate", _no_room)
    with pytest.raises(OSError, match="No space left"):
        values.MmapedDict(str(unmade))
    assert not unmade.exists()  # an empty file would fail the scrapes' reader
    with pytest.raises(OSError, match="No space left"):
        for i in range(400):  # its first growth
            mapped.write_value(f"a key long enough to fill the map's first pages sooner, number {i:04}" * 4, i, 0.0)
    grown = i
    monkeypatch.undo()
    mapped.write_value("a later key", 2.0, 0.0)
    assert dict((k, v) for k, v, _ in mapped.read_all_values())["kept"] == 1.0
    assert len(list(mapped.read_all_values())) == grown + 2
    mapped.close()
