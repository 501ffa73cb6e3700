"""`/stats` and `/metrics` across the workers of one gunicorn server.

The master makes a fresh run directory per server (nanoqwen.gunicorn_conf) before anything imports
prometheus_client: its `metrics/` subdirectory is prometheus-client's multiprocess directory (counters
and histograms of every worker, dead ones' folded into one archive, summed at scrape time) and in `stats/` each live
worker publishes its `/stats` snapshot as `<pid>.json`, replaced atomically (by pid, not slot: the master's removal of
a dead worker's cannot take its successor's in that slot). The master removes a dead worker's snapshot and live gauges
(`child_exit`), so totals cover the live workers only.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nanoqwen.placement import SLOT_ENV

RUN_DIR_ENV = "NANOQWEN_RUN_DIR"
RAM_DIR = Path("/dev/shm")
# A container's /dev/shm is 64 MiB by default, shared with other tenants: below this much free, gunicorn's default
HEARTBEAT_MIN_FREE = 16 << 20
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PUBLISH_S = 0.5  # how stale another worker's /stats entry and gauges may be
# a snapshot not replaced for this long is from a worker whose loop has stalled: it accepts nothing either
SERVING_FRESH_S = 10 * PUBLISH_S
# Speculative decoding's counts, under vLLM's names: (name, help)
SPEC_DECODE_COUNTS = {
    "spec_decode_num_drafts": "Verify steps of rows that drafted (live workers)",
    "spec_decode_num_draft_tokens": "Tokens drafted by n-gram speculative decoding (live workers)",
    "spec_decode_num_accepted_tokens": "Drafted tokens the sampler agreed with (live workers)",
}
SUMMED = ("requests_served", "total_tokens_generated", "queue_length", "active_requests", "requests_aborted",
          "requests_failed", "total_prompt_tokens", "tokens_per_second", "preemptions", "engine_tokens_generated",
          "graph_compiles", "grammars_cached", "grammar_cache_bytes", *SPEC_DECODE_COUNTS)
WORST = ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "uptime")  # percentiles don't add up
AVERAGED = ("kv_cache_usage", "prefix_cache_hit_rate")  # every worker has the same pool size


def heartbeat_dir() -> str | None:
    """Where gunicorn's heartbeat file goes (worker_tmp_dir): /dev/shm, as gunicorn's docs advise (on a disk the
    loop's touch of it each second can wait behind other I/O), where it is writable with HEARTBEAT_MIN_FREE free;
    else None, gunicorn's default. The file is unlinked once made, so no one's cleanup (systemd-logind's RemoveIPC)
    can take it away. The run directory stays on the default temporary directory: a full /dev/shm made each worker's
    first write into a metrics map a SIGBUS."""
    if not (RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK | os.X_OK)):
        return None
    fs = os.statvfs(RAM_DIR)  # the file needs an inode (f_files 0: no limit) and no bytes; the bytes: the others' room
    inode = fs.f_files == 0 or fs.f_favail > 0
    return str(RAM_DIR) if inode and fs.f_bavail * fs.f_frsize >= HEARTBEAT_MIN_FREE else None


def make_run_dir() -> Path:
    """A fresh directory for one server, announced to its workers through the environment."""
    run_dir = Path(tempfile.mkdtemp(prefix="nanoqwen-"))
    (run_dir / "metrics").mkdir()
    stats_dir(run_dir).mkdir()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    os.environ[MULTIPROC_ENV] = str(run_dir / "metrics")
    return run_dir


def remove_run_dir() -> None:
    if RUN_DIR_ENV in os.environ:
        shutil.rmtree(os.environ[RUN_DIR_ENV], ignore_errors=True)


def stats_dir(run_dir: Path) -> Path:
    """Where each worker publishes its /stats snapshot."""
    return run_dir / "stats"


def snapshot_path(run_dir: Path, pid: int) -> Path:
    return stats_dir(run_dir) / f"{pid}.json"


def forgotten(pid: int) -> bool:
    """Whether worker `pid` has exited and the master has forgotten it (forget_worker: its live gauges, then its
    snapshot, gone). Its exit alone is not enough: the master reaps it (till then a zombie, signalled as if alive),
    then forgets it, folds in between. Another user's process with that pid by now: taken for gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, 0)
        return False
    return not snapshot_path(Path(os.environ[RUN_DIR_ENV]), pid).exists()


def forget_worker(pid: int, log_failure: Callable[..., None]) -> None:
    """In the master, once a worker has exited: its live gauges and snapshot go, its counters and histograms are
    folded into the archives (nanoqwen.api.metric_archive). Each step is tried whatever the others did; one that fails
    (a full disk, a damaged map) is logged with `log_failure` (a logger's `exception`: with its traceback)."""
    from prometheus_client import multiprocess

    from nanoqwen.api import metric_archive

    steps: dict[str, Callable[[], object]] = {
        "the removal of its live gauges' maps (mark_process_dead)": lambda: multiprocess.mark_process_dead(pid),
        "the removal of its /stats snapshot":
            lambda: snapshot_path(Path(os.environ[RUN_DIR_ENV]), pid).unlink(missing_ok=True),
    }
    for kind in metric_archive.FOLDED:  # each its own step: one kind's failure leaves the other's fold whole
        steps[f"the fold of its {kind} map"] = functools.partial(
            metric_archive.fold, Path(os.environ[MULTIPROC_ENV]), kind, pid)
    _each_tried(steps, f"worker {pid}", log_failure)


def finish_folds(log_failure: Callable[..., None]) -> None:
    """In the master, before it forks a worker: each kind's fold left undone (nanoqwen.api.metric_archive.finish)
    finished, while no live worker can have the pid its archive names (the dead worker's, given to no process forked
    since). Logged with `log_failure` where it fails, as forget_worker's steps."""
    from nanoqwen.api import metric_archive

    _each_tried({f"the finish of a {kind} fold left undone": functools.partial(
        metric_archive.finish, Path(os.environ[MULTIPROC_ENV]), kind) for kind in metric_archive.FOLDED},
        "before a fork", log_failure)


def _each_tried(steps: dict[str, Callable[[], object]], who: str, log_failure: Callable[..., None]) -> None:
    """Each step run whatever the others did; one that fails logged, not raised: an exception out of a gunicorn hook
    ends the master's loop, and every worker with it."""
    for step, run in steps.items():
        try:
            run()
        except Exception:
            log_failure("%s: %s failed", who, step)


def aggregate(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Server totals from per-worker snapshots (sums; worst-worker percentiles; request-weighted mean time)."""
    total: dict[str, Any] = {key: sum(w[key] for w in workers) for key in SUMMED}
    total |= {key: max((w[key] for w in workers), default=0.0) for key in WORST}
    total |= {key: sum(w[key] for w in workers) / len(workers) if workers else 0.0 for key in AVERAGED}
    drafted = total["spec_decode_num_draft_tokens"]
    total["spec_decode_acceptance_rate"] = total["spec_decode_num_accepted_tokens"] / drafted if drafted else 0.0
    served = total["requests_served"]
    total["average_response_time"] = (sum(w["average_response_time"] * w["requests_served"] for w in workers)
                                      / served if served else 0.0)
    return total


class SharedStats:
    """One worker's side of the run directory."""

    def __init__(self, run_dir: Path) -> None:
        from nanoqwen.api.offload import NativePool  # here: the master imports this module, and must not import torch

        self._run_dir = run_dir
        self._dir = stats_dir(run_dir)
        self._restart_turn: int | None = None  # the restart lock's file, held till exit (take_restart_turn)
        # the snapshot's write and rename, off the event loop: on a disk they waited up to 230 ms behind another
        # writer's I/O (profiles/RESULTS.md, lane stall27)
        self._writer = NativePool(1, max_pending=2, jobs="stats snapshots are already being written")

    @classmethod
    def from_env(cls) -> SharedStats | None:
        """None outside nanoqwen's gunicorn config (in-process apps keep their own numbers)."""
        return cls(Path(os.environ[RUN_DIR_ENV])) if RUN_DIR_ENV in os.environ else None

    @property
    def slot(self) -> int:
        # Read when used: with --preload the app (and this object) is built in the master, before
        # post_fork gives each worker its slot.
        return int(os.environ.get(SLOT_ENV, "0"))

    def publish(self, snapshot: dict[str, Any]) -> None:
        """Raises OSError where the snapshot cannot be written (a full disk, a run directory gone)."""
        from nanoqwen.api.offload import PoolFullError

        try:
            self._writer.run(self._write, json.dumps(snapshot))
        except PoolFullError:  # the writes before still wait on the disk: readers see the last one written
            return

    def _write(self, text: str) -> None:
        path = snapshot_path(self._run_dir, os.getpid())
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)  # readers see the old snapshot or the new one, never half of one
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _others(self) -> Iterator[Path]:
        return (path for path in self._dir.iterdir() if path.suffix == ".json" and int(path.stem) != os.getpid())

    def others(self) -> list[dict[str, Any]]:
        """The other workers' snapshots (this worker's own figures are live in its memory). Raises OSError where the
        directory cannot be listed or a snapshot read."""
        workers = []
        for path in self._others():
            try:
                workers.append(json.loads(path.read_text()))
            except FileNotFoundError:  # its worker died between the listing and the read
                continue
        return workers

    def another_serves(self) -> bool:
        """Whether another worker accepts connections with its model loaded (its snapshot's `serving`), as it published
        within SERVING_FRESH_S. A dead worker's snapshot is gone (forget_worker); a stopping one's says it no longer
        serves. Raises OSError as others()."""
        now = time.time()
        for path in self._others():
            try:
                if now - path.stat().st_mtime < SERVING_FRESH_S and json.loads(path.read_text()).get("serving"):
                    return True
            except FileNotFoundError:
                continue
        return False

    def take_restart_turn(self) -> bool:
        """Whether this worker may restart at --max-requests now that another one serves: no other worker's restart is
        under way. The turn is a lock on the run directory's `restart.lock`, held until this process exits (the
        kernel releases it): two workers that reached their limits at once each saw the other serve, and both
        restarted. Raises OSError where the lock's file cannot be opened."""
        if self._restart_turn is not None:
            return True
        fd = os.open(self._run_dir / "restart.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._restart_turn = fd
        return True
