"""An extra gunicorn config for the profiles (GUNICORN_CMD_ARGS="-c profiles/gil_watch_conf.py"): nanoqwen's own
settings and hooks, and in the worker, where set:
- SWITCH_ENV (seconds): its sys.setswitchinterval, how long a thread running Python keeps the GIL from one that waits
  for it (the event loop's, the engine's);
- LATE_ENV (seconds): a native thread that sleeps TICK_S in a loop and, each time it wakes later than that, prints a
  `gil_watch:` line into the server's log: when (time.monotonic, the same clock in every process here), how late, and
  where each other thread is then (a C call that kept the GIL has just returned to that line; Python code hands the
  GIL over at the switch interval, so a wait longer than that is a C call, a collection, or a holder the kernel did
  not run); and each full (generation 2) collection, a `gil_watch_gc:` line: when it ended, its wall and CPU ms;
- GC_WATCH_ENV (seconds): a native thread that prints, each time that long, a `gc_watch:` line: when, the worker's RSS,
  the collector's thresholds and counts and how many full collections ran (flood_grammars: the thresholds put off
  while grammars are made, nanoqwen/api/full_collections.py, must come back).
bench_weigh_served's --switch-ms and --gil-late-ms; flood_grammars."""
from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable
from types import FrameType

if __name__ == "__config__":  # as gunicorn loads a config file; imported (bench_weigh_served: the names), no server's
    from nanoqwen.gunicorn_conf import *  # noqa: F403

SWITCH_ENV = "NANOQWEN_PROFILE_SWITCH_S"
LATE_ENV = "NANOQWEN_PROFILE_GIL_LATE_S"
GC_WATCH_ENV = "NANOQWEN_PROFILE_GC_WATCH_S"
TICK_S = 0.001
WATCH_LINE = "gil_watch: "
GC_LINE = "gil_watch_gc: "
GC_WATCH_LINE = "gc_watch: "


def post_worker_init(worker: object) -> None:
    if seconds := os.environ.get(SWITCH_ENV):
        sys.setswitchinterval(float(seconds))
    print(f"gil_watch_conf: the worker's switch interval {sys.getswitchinterval() * 1e3:g} ms", file=sys.stderr,
          flush=True)
    from gevent import monkey

    from nanoqwen.engine.threads import start_native_thread
    sleep, get_ident = monkey.get_original("time", "sleep"), monkey.get_original("_thread", "get_ident")
    if late := os.environ.get(LATE_ENV):
        start_native_thread(lambda: _watch(float(late), sleep, get_ident))
        from profiles.gc_timing import timed_collections  # the worker's path has the checkout, not profiles/

        gc.callbacks.append(timed_collections(_full_collection))
    if every := os.environ.get(GC_WATCH_ENV):
        start_native_thread(lambda: _watch_collector(float(every), sleep))


def _watch(late_s: float, sleep: Callable[[float], None], get_ident: Callable[[], int]) -> None:
    me = get_ident()
    while True:
        started = time.perf_counter()
        sleep(TICK_S)
        waited = time.perf_counter() - started - TICK_S
        if waited > late_s:
            where = "; ".join(f"{tid}: {_stack(frame)}" for tid, frame in sys._current_frames().items() if tid != me)
            print(f"{WATCH_LINE}{time.monotonic():.3f} {waited * 1e3:.1f} ms late; {where}", file=sys.stderr,
                  flush=True)


def _watch_collector(every_s: float, sleep: Callable[[float], None]) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    while True:
        with open("/proc/self/statm") as statm:
            rss_mb = int(statm.read().split()[1]) * page / 2**20
        threshold, count = ",".join(map(str, gc.get_threshold())), ",".join(map(str, gc.get_count()))
        print(f"{GC_WATCH_LINE}{time.monotonic():.3f} rss_mb={rss_mb:.0f} threshold={threshold} count={count} "
              f"full={gc.get_stats()[2]['collections']}", file=sys.stderr, flush=True)
        sleep(every_s)


def _full_collection(info: dict[str, int], wall: float, cpu: float) -> None:
    if info["generation"] == 2:
        print(f"{GC_LINE}{time.monotonic():.3f} {wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU", file=sys.stderr,
              flush=True)


def _stack(frame: FrameType | None, depth: int = 3) -> str:
    """The frame and its callers, `depth` of them: `file:line function < ...`."""
    out = []
    while frame is not None and len(out) < depth:
        out.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(out)
