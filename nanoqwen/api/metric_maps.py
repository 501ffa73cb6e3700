"""prometheus-client's per-process metric maps, their pages reserved before they are written.

In multiprocess mode (under gunicorn: nanoqwen.api.shared_stats) each process keeps its metrics in files of the run
directory, mapped into memory; prometheus-client makes and grows a file by truncating it (a sparse file). Where the
filesystem then has no room for a page ($TMPDIR full), the first write into that page kills the process with SIGBUS.
Reserved with posix_fallocate the same shortage is an OSError (ENOSPC) at the making or growing instead, which the
caller answers (nanoqwen.api.metrics.ServerStats: tried again at each publish).
"""
from __future__ import annotations

import os

from prometheus_client import values
from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE, MmapedDict


def reserve(path: str, size: int) -> None:
    """The file's blocks up to `size` (or its length, if longer) allocated; a file this made is removed again where
    they cannot be (an empty file is no map: the scrapes' reader would fail on it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        length = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, max(size, length))
        except OSError:
            if length == 0:
                os.unlink(path)
            raise
    finally:
        os.close(fd)


class ReservedMmapedDict(MmapedDict):
    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            reserve(filename, _INITIAL_MMAP_SIZE)  # MmapedDict maps the file at its length where it has one
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        encoded = len(key.encode("utf-8"))
        entry = 4 + encoded + (8 - (encoded + 4) % 8) + 16  # MmapedDict's entry: length, padded key, value, timestamp
        capacity = self._capacity
        while self._used + entry > capacity:  # as MmapedDict grows it, before it writes into the new pages
            capacity *= 2
        if capacity > self._capacity:
            reserve(self._fname, capacity)
        super()._init_value(key)


def install() -> None:
    """Every map prometheus-client makes from now on is a ReservedMmapedDict. Fails at the worker's boot, not with a
    SIGBUS later, where prometheus-client no longer makes its maps through these names."""
    fields = {"_capacity", "_used", "_fname"}  # set by MmapedDict.__init__, read above
    if (values.MmapedDict not in (MmapedDict, ReservedMmapedDict) or not hasattr(MmapedDict, "_init_value")
            or not fields <= set(MmapedDict.__init__.__code__.co_names)):
        raise RuntimeError("prometheus-client's values no longer make their maps as mmap_dict.MmapedDict did")
    values.MmapedDict = ReservedMmapedDict
