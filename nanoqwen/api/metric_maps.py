"""prometheus-client's per-process metric maps, their pages reserved before they are written.

In multiprocess mode (under gunicorn: nanoqwen.api.shared_stats) each process keeps its metrics in files of the run
directory, mapped into memory; prometheus-client makes and grows a file by truncating it (a sparse file). Where the
filesystem then has no room for a page ($TMPDIR full), the first write into that page kills the process with SIGBUS.
Reserved with posix_fallocate the same shortage is an OSError (ENOSPC) at the making instead, which the caller
answers (nanoqwen.api.metrics.ServerStats: tried again at each publish).

The maps are never grown: each is reserved at MAP_SIZE, and nanoqwen.api.metrics makes every series it writes at once,
together a fraction of that size (tests/test_metric_maps.py checks both).
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import values
from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE, MmapedDict

# A map's size, four times prometheus-client's first one (64 KiB): our histograms' and vLLM's (metrics_vllm)
# series take ~67 KB of the histogram map, ~100 KB with the longest served name (nanoqwen.api.config), which it must
# hold with room to spare
MAP_SIZE = 4 * _INITIAL_MMAP_SIZE


def reserve(path: str, size: int) -> None:
    """The file's blocks up to `size` (or its length, if longer) allocated. A file not there yet is made under a name
    the scrapes' `*.db` glob skips and renamed into place once reserved: another worker's scrape would read it empty
    (a struct.error: a 500) or listed and then removed (a 503 on a worker that is well)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        _make_reserved(path, size)
        return
    try:
        os.posix_fallocate(fd, 0, max(size, os.fstat(fd).st_size))
    finally:
        os.close(fd)


def _make_reserved(path: str, size: int) -> None:
    making = f"{path}.making"
    fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        os.posix_fallocate(fd, 0, size)
        os.rename(making, path)
    except OSError:
        os.unlink(making)
        raise
    finally:
        os.close(fd)


def reserve_maps(directory: str, kinds: Iterable[str]) -> None:
    """This process's maps of these kinds (prometheus-client's file per metric type, a gauge's per mode) reserved at
    their first size, those reserved kept where a later one cannot be. Before any metric is made: one made while
    another's map could not be would be made again at each retry, and prometheus-client keeps every value it made (a
    module list, for its reset after a fork, never emptied)."""
    for kind in kinds:
        reserve(os.path.join(directory, f"{kind}_{os.getpid()}.db"), MAP_SIZE)


class ReservedMmapedDict(MmapedDict):
    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            reserve(filename, MAP_SIZE)  # MmapedDict maps the file at its length where it has one
        super().__init__(filename, read_mode)


def install() -> None:
    """Every map prometheus-client makes from now on is a ReservedMmapedDict. Fails at the worker's boot, not with a
    SIGBUS later, where prometheus-client no longer makes its maps through this name."""
    if values.MmapedDict not in (MmapedDict, ReservedMmapedDict):
        raise RuntimeError("prometheus-client's values no longer make their maps as mmap_dict.MmapedDict did")
    values.MmapedDict = ReservedMmapedDict
