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
  while grammars are made, nanoqwen/api/full_collections.py, must come back);
- MEMORY_WATCH_ENV (seconds): a native thread that prints, each time that long, a `memory_watch:` line: when, the
  worker's RSS and its anonymous part, what glibc's malloc has handed out (in its arenas and mmapped) and holds free
  in its arenas (mallinfo2, every arena), Python's allocated blocks, the grammars cached, the stored chat completions'
  and responses' counts and bytes, the requests finished;
- TRIM_ENV (seconds): each time that long, glibc's malloc_trim(0) (the free memory of every arena given back), a
  `malloc_trim:` line with its ms and the RSS before and after (rss_watch.py: the worker's memory under long use).
bench_weigh_served's --switch-ms and --gil-late-ms; flood_grammars; rss_watch."""
from __future__ import annotations

import ctypes
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
MEMORY_WATCH_ENV = "NANOQWEN_PROFILE_MEMORY_WATCH_S"
TRIM_ENV = "NANOQWEN_PROFILE_TRIM_S"
TICK_S = 0.001
WATCH_LINE = "gil_watch: "
GC_LINE = "gil_watch_gc: "
GC_WATCH_LINE = "gc_watch: "
MEMORY_WATCH_LINE = "memory_watch: "
TRIM_LINE = "malloc_trim: "


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
    if memory_s := os.environ.get(MEMORY_WATCH_ENV):
        start_native_thread(lambda: _watch_memory(float(memory_s), sleep))
    if trim_s := os.environ.get(TRIM_ENV):
        start_native_thread(lambda: _trim(float(trim_s), sleep))


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
    while True:
        threshold, count = ",".join(map(str, gc.get_threshold())), ",".join(map(str, gc.get_count()))
        print(f"{GC_WATCH_LINE}{time.monotonic():.3f} rss_mb={_rss_mb():.0f} threshold={threshold} count={count} "
              f"full={gc.get_stats()[2]['collections']}", file=sys.stderr, flush=True)
        sleep(every_s)


def _watch_memory(every_s: float, sleep: Callable[[float], None]) -> None:
    from nanoqwen.api.chat_store import ChatStore
    from nanoqwen.api.responses_store import ResponseStore
    from nanoqwen.engine.grammar_cache import heap_used, mallinfo
    from nanoqwen.wsgi import app, engine

    while not engine.ready:
        sleep(0.5)
    # the app's services, as its views hold them (gc.get_objects misses them: frozen out of the collector's walk)
    services = [cell.cell_contents for view in app.view_functions.values() for cell in view.__closure__ or ()]
    stores = {id(s): s for s in (getattr(service, "store", None) for service in services)}
    chats = [s for s in stores.values() if isinstance(s, ChatStore)]
    responses = [s for s in stores.values() if isinstance(s, ResponseStore)]
    while True:
        info, mb = mallinfo(), 2**20
        print(f"{MEMORY_WATCH_LINE}{time.monotonic():.3f} rss_mb={_rss_mb():.0f} anon_mb={_anon_mb():.0f} "
              f"malloc_used_mb={heap_used() / mb:.1f} malloc_free_mb={info.fordblks / mb:.1f} "
              f"py_blocks={sys.getallocatedblocks()} grammars={engine.grammars.cache_stats()[0]} "
              f"chats={sum(len(s._entries.entries) for s in chats)}/{sum(s._entries.bytes for s in chats)} "
              f"responses={sum(len(s._entries.entries) for s in responses)}/{sum(s._entries.bytes for s in responses)}"
              f" finished={engine.requests_finished}", file=sys.stderr, flush=True)
        sleep(every_s)


def _trim(every_s: float, sleep: Callable[[float], None]) -> None:
    trim = ctypes.CDLL(None).malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    while True:
        sleep(every_s)
        rss, started = _rss_mb(), time.perf_counter()
        trim(0)
        print(f"{TRIM_LINE}{time.monotonic():.3f} {(time.perf_counter() - started) * 1e3:.1f} ms rss_mb={rss:.0f} -> "
              f"{_rss_mb():.0f}", file=sys.stderr, flush=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _anon_mb() -> float:
    """The resident memory no file backs (the heaps, Python's arenas, the stacks), not the libraries' code."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) / 1024


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
