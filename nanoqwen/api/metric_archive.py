"""Dead workers' counters and histograms folded into one map of each kind, and the scrapes that read them.

prometheus-client's multiprocess mode keeps a dead process's counter and histogram maps (their counts stay in the
totals: every map of the directory is summed at each scrape); a server whose workers are respawned for ever
(`--max-requests`, crashes) grew its run directory by 512 KiB a respawn and each scrape by two more maps to read. The
master (nanoqwen.api.shared_stats.forget_worker) folds a dead worker's maps into its kind's archive,
`<kind>_folded_<generation>_<pid>.db` (the pid: the worker folded in last), written whole under a name the scrapes'
`*.db` glob skips and renamed into place; then the archive before it and the dead maps are removed, and the archive is
renamed to the next generation naming no pid (a worker forked later may be given the dead one's pid: its live maps
would be skipped). A fold stopped after its archive's write (a removal that raised) is finished before the master's
next fork (so before any worker is given that pid) and by the next fold before it reads the archive: else the next
archive would name only its own pid, and the first pid's map be read on top of it.

Two files cannot change at once, so a scrape (FoldedCollector) reads the newest archive of each kind it lists and
skips the map of the pid that archive names. Another dead map it reads was not folded into that archive: one folded
before it was removed before the archive was made, so before the listing. An archive that a fold replaces after the
listing is removed, not found at its read, and the scrape starts again. No count is read twice or missed (a
counter never goes back) without a lock, which a stopped process could hold for ever. (The listing is one getdents
call under the directory's lock on Linux: the directory holds a few maps a live worker.)
"""
from __future__ import annotations

import collections
import glob
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

FOLDED = ("counter", "histogram")  # a dead worker's live gauges are removed (prometheus-client's mark_process_dead)
ARCHIVE = "folded"
NO_PID = 0  # an archive's pid once the map it folded last is gone (no process has pid 0)
SCRAPE_TRIES = 16  # a scrape's retries beyond one a map of its first listing (FoldedCollector.collect)
# what prometheus-client's read of a damaged map raises (a short file: struct.error; a used length past the end:
# RuntimeError; a key not UTF-8 or not JSON: ValueError), none an OSError
DAMAGED = (struct.error, RuntimeError, ValueError)


class DamagedMap(OSError):
    """A map of the directory that prometheus-client cannot read: an OSError, so a scrape is the 503 that says so."""


@dataclass(frozen=True)
class Archive:
    path: Path
    generation: int
    pid: int  # the worker folded in last

    @classmethod
    def newest(cls, paths: Iterable[Path]) -> Archive | None:
        archives = []
        for path in paths:
            _, _, generation, pid = path.stem.split("_")
            archives.append(cls(path, int(generation), int(pid)))
        return max(archives, key=lambda archive: archive.generation, default=None)


def _archive_path(directory: Path, kind: str, generation: int, pid: int) -> Path:
    return directory / f"{kind}_{ARCHIVE}_{generation}_{pid}.db"


def _encoded(values: dict[str, float]) -> bytes:
    """MmapedDict's file (its used length, padding, then each key's length, key padded to 8 bytes, value, timestamp);
    written with write(), not through a map: the master is not killed by a SIGBUS where the disk is full."""
    entries = []
    for key, value in values.items():
        encoded = key.encode()
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
        entries.append(struct.pack(f"i{len(padded)}sdd", len(encoded), padded, value, 0.0))
    body = b"".join(entries)
    return struct.pack("ii", 8 + len(body), 0) + body


def _write(path: Path, data: bytes) -> None:
    making = path.with_name(f"{path.name}.making")
    try:
        making.write_bytes(data)
        os.rename(making, path)
    except OSError:
        making.unlink(missing_ok=True)
        raise


def fold(directory: Path, kind: str, pid: int) -> None:
    """The dead worker `pid`'s map of `kind` (one of FOLDED) into its archive, then removed. Raises OSError where the
    archive cannot be written (a full disk): the dead map stays, and is read as before; or where a step after its
    write fails: the master finishes this one before its next fork (or the kind's next fold does)."""
    archive = finish(directory, kind)
    dead = directory / f"{kind}_{pid}.db"
    if not dead.exists():
        return
    totals: collections.Counter[str] = collections.Counter()
    for path in ([] if archive is None else [archive.path]) + [dead]:
        for key, value, _, _ in _read(path):
            totals[key] += value  # counters' and histograms' samples (each bucket its own count) add up
    generation = 0 if archive is None else archive.generation + 1
    _write(_archive_path(directory, kind, generation, pid), _encoded(totals))
    finish(directory, kind)


def _read(path: Path) -> list[tuple[str, float, float, int]]:
    """A map's entries; a damaged one set aside (out of the scrapes' `*.db` glob: each would be a 503 for as long as
    the server runs) and raised: its counts are lost, the master logs it."""
    try:
        return list(MmapedDict.read_all_values_from_file(str(path)))  # a generator: read whole here
    except DAMAGED as exc:
        aside = path.with_name(f"{path.name}.damaged")
        os.rename(path, aside)
        raise DamagedMap(f"{path.name} is damaged ({exc}): set aside as {aside.name}, its counts lost") from exc


def finish(directory: Path, kind: str) -> Archive | None:
    """The kind's newest archive, its fold finished where one stopped after its write (a fold's second half, a step
    that raised): the archives before it and the map it names removed, then renamed to name no pid (a worker forked
    later may be given the dead one's pid). A write's leftover (the master stopped during it) removed too. Run by the
    master before each fork (shared_stats.finish_folds) and at each fold: a fold left undone is finished before a
    worker can be given its pid, whose map would be skipped by the scrapes until then and removed by the finish. Where
    that finish fails too, it still may be (a live worker's counts lost: two failed steps and a reused pid)."""
    for making in directory.glob(f"{kind}_{ARCHIVE}_*.db.making"):
        making.unlink()
    archives = list(directory.glob(f"{kind}_{ARCHIVE}_*.db"))
    newest = Archive.newest(archives)
    if newest is None:
        return None
    for path in archives:
        if path != newest.path:
            path.unlink()
    if newest.pid == NO_PID:
        return newest
    (directory / f"{kind}_{newest.pid}.db").unlink(missing_ok=True)
    done = Archive(_archive_path(directory, kind, newest.generation + 1, NO_PID), newest.generation + 1, NO_PID)
    os.rename(newest.path, done.path)
    return done


class FoldedCollector(MultiProcessCollector):
    """prometheus-client's multiprocess collector, reading the archives as the module's docstring says."""

    def collect(self) -> Iterable[Metric]:
        files = self._files()
        # a retry a fold that removed a map between a listing and its read: the folds of the workers dead at the first
        # listing (a map each at least, listed), and of those that die during the scrape (a burst of deaths lists many
        # maps, which take long to read: the master folds on meanwhile)
        tries = len(files) + SCRAPE_TRIES
        while True:
            try:
                return self.merge(files, accumulate=True)
            except DAMAGED as exc:  # a live worker's (a dead one's is set aside by its fold)
                raise DamagedMap(f"a metrics map is damaged ({exc})") from exc
            except FileNotFoundError:
                listed, files = files, self._files()
                tries -= 1
                if tries == 0 or files == listed:  # no fold since: the map will not be found again
                    raise

    def _files(self) -> list[str]:
        """Every map listed, but each kind's older archives and the map its newest one folded in last."""
        paths = [Path(path) for path in glob.glob(os.path.join(self._path, "*.db"))]
        skipped = set()
        for kind in FOLDED:
            archives = [path for path in paths if path.name.startswith(f"{kind}_{ARCHIVE}_")]
            newest = Archive.newest(archives)
            if newest is not None:
                skipped.update(archives)
                skipped.discard(newest.path)
                skipped.add(newest.path.with_name(f"{kind}_{newest.pid}.db"))
        return [str(path) for path in paths if path not in skipped]
