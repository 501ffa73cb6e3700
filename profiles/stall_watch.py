"""Who held the event loop: each stall of a real gunicorn worker's loop, attributed from outside the process.

    python profiles/stall_watch.py [--mode default] [--reps 3 | --load N] [--burners 0] [--threshold 0.3] [--out DIR]

Serves the 2-layer test checkpoint (soak.py's `--mode` settings) with this file as an extra gunicorn config: the
worker runs a greenlet that writes the time into a shared map every 10 ms (the loop's pulse) and logs every garbage
collection over 20 ms (generation, wall and CPU ms, on the loop or another thread). This process reads the pulse and
each of the worker's threads' /proc schedstat every 10 ms. A pulse older than `--threshold` is a stall; at its end it
prints each thread's CPU and run-queue wait over the whole stall (from the last pulse) and its states sampled from the
threshold on (R: runnable, S: asleep or waiting for the GIL, D: disk), and half a second in, `py-spy dump` (if
installed) shows every thread's stack and which one holds the GIL.
gevent's own monitor (GEVENT_MONITOR_THREAD_ENABLE=1, GEVENT_MAX_BLOCKING_TIME=0.1) reports into the server's log
beside (its stacks are where the loop's thread next released the GIL, often a syscall, not what held it).

The load is the soak's room check replayed `--reps` times (32 background Responses created, then cancelled:
soak_background.py), with `--burners` busy processes beside; /health is polled every 50 ms from a process of its own
(chat_http.health_polled: p50/p99/max per rep; an answer other than 200 ends the run).
With `--load N` the server is instead started N times, the burners started before it, and /health polled every 20 ms
from another process from the launch to its first 200 (connections refused until the worker listens): the time to its
first answer (gunicorn's boot and the worker's imports), to ready, and the longest "loading" answer and gap between two
answers while the model loads.
Reading the report: the loop's thread runnable for the stall with little CPU is the machine's load (the kernel ran
others); asleep while another thread ran with the GIL is that thread's work; its own CPU is work on the loop.
"""
from __future__ import annotations

import gc
import mmap
import os
import struct
import sys
import time

PULSE_ENV = "NANOQWEN_STALL_PULSE"  # the map's path, for the worker
GC_SLOW_S = 0.02


def post_worker_init(worker: object) -> None:
    """In the worker (this file as a gunicorn config): the pulse greenlet and the collections' log."""
    import gevent
    from gevent import monkey

    from profiles.gc_timing import timed_collections  # the worker's path has the checkout, not profiles/

    get_ident = monkey.get_original("_thread", "get_ident")
    loop_thread = get_ident()

    def slow(info: dict[str, int], wall: float, cpu: float) -> None:
        if wall > GC_SLOW_S:
            where = "the loop" if get_ident() == loop_thread else "another thread"
            print(f"stall_watch: {time.strftime('%H:%M:%S')} gen{info['generation']} collection {1e3 * wall:.0f} ms "
                  f"wall, {1e3 * cpu:.0f} ms CPU, on {where}", file=sys.stderr, flush=True)

    def pulse() -> None:
        fd = os.open(os.environ[PULSE_ENV], os.O_RDWR)
        beat = mmap.mmap(fd, 16)
        while True:
            beat[:16] = struct.pack("qd", os.getpid(), time.monotonic())
            gevent.sleep(0.01)

    gc.callbacks.append(timed_collections(slow))
    gevent.spawn(pulse)


if __name__ != "__main__":  # read by gunicorn as its config: the server's own settings, and the hook above
    from nanoqwen.gunicorn_conf import *  # noqa: F403,E402
else:
    import argparse
    import collections
    import json
    import shutil
    import subprocess
    import tempfile
    import threading
    from pathlib import Path

    import common  # puts this checkout and its tests first on sys.path
    from chat_http import cpu_env, health_polled
    from checkpoints import make_checkpoint
    from nanoqwen.api.metrics import percentile
    from server_process import GunicornServer
    from soak import MODES
    from soak_background import BackgroundSoak
    from soak_http import Tally

    LOAD_POLL_S = 0.02

    Snapshot = dict[int, tuple[int, int, str]]  # thread id: CPU ns, run-queue wait ns, state

    def threads_of(pid: int) -> Snapshot:
        snapshot: Snapshot = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:  # the worker has exited
            return snapshot
        for tid in tids:
            try:
                cpu, wait, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                state = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, ValueError):  # the thread ended
                continue
            snapshot[int(tid)] = (int(cpu), int(wait), state)
        return snapshot

    def report(pid: int, seconds: float, base: Snapshot, end: Snapshot, states: collections.Counter,
               dump: str | None) -> None:
        print(f"{time.strftime('%H:%M:%S')} STALL {1e3 * seconds:.0f} ms (load {os.getloadavg()[0]:.1f})")
        rows = sorted(((end[t][0] - base[t][0], end[t][1] - base[t][1], t) for t in end if t in base), reverse=True)
        for cpu, wait, tid in rows[:5]:
            seen = {state: n for (t, state), n in states.items() if t == tid}
            print(f"   thread {tid}{' (the loop)' if tid == pid else ''}: CPU {cpu / 1e6:.0f} ms, run queue "
                  f"{wait / 1e6:.0f} ms, states {seen}")
        for line in (dump or "").splitlines():
            if line.startswith(("Thread", "    ")):
                print("     ", line)

    def watch(path: Path, threshold: float, stop: threading.Event) -> None:
        """Reads the pulse and the worker's threads every 10 ms; reports each stall at its end."""
        beat = mmap.mmap(os.open(path, os.O_RDONLY), 16, prot=mmap.PROT_READ)
        history: collections.deque[tuple[float, Snapshot]] = collections.deque(maxlen=1000)
        stall: dict | None = None
        while not stop.is_set():
            pid, last = struct.unpack("qd", beat[:16])
            now = time.monotonic()
            if pid:
                history.append((now, snapshot := threads_of(pid)))
                if now - last > threshold:
                    if stall is None:
                        base = next((s for t, s in reversed(history) if t <= last), history[0][1])
                        stall = {"pulse": last, "base": base, "states": collections.Counter(), "dump": None}
                    stall["states"].update((tid, state) for tid, (_, _, state) in snapshot.items())
                    if stall["dump"] is None and now - last > 0.5 and shutil.which("py-spy"):
                        stall["dump"] = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True,
                                                       text=True, timeout=30).stdout
                elif stall is not None:
                    report(pid, last - stall["pulse"], stall["base"], snapshot, stall["states"], stall["dump"])
                    stall = None
            time.sleep(0.01)

    def poll_loading(url: str) -> None:
        """In a process of its own: GET `url` every LOAD_POLL_S until a 200; prints each poll's (start, seconds,
        status) as JSON, start from this process's own, status 0 where the connection was refused."""
        import requests

        session = requests.Session()
        polls: list[tuple[float, float, int]] = []
        print("polling", flush=True)  # the caller launches the server now
        t0 = time.monotonic()
        while not polls or polls[-1][2] != 200:
            started = time.monotonic()
            try:
                status = session.get(url, timeout=120).status_code
            except requests.ConnectionError:
                status = 0
            polls.append((started - t0, time.monotonic() - started, status))
            time.sleep(LOAD_POLL_S)
        print(json.dumps(polls))

    def watch_load(srv: GunicornServer, start: int) -> None:
        """One start of the server, /health polled from its launch to ready (poll_loading): the summary line."""
        poller = subprocess.Popen([sys.executable, __file__, "--poll", f"{srv.url}/health"], stdout=subprocess.PIPE,
                                  text=True)
        assert poller.stdout.readline() == "polling\n"
        srv.launch()
        try:
            polls = json.loads(poller.communicate(timeout=600)[0])
        finally:
            poller.kill()
            srv.stop()
        answered = [(t, s, status) for t, s, status in polls if status]
        # the first answer's request waited in the listener's backlog for the worker's boot (its imports)
        loading = [1e3 * s for _, s, status in answered[1:] if status == 503]
        ends = [t + s for t, s, _ in answered]
        gaps = [1e3 * (b - a) for a, b in zip(ends, ends[1:])]
        print(f"start {start}: first answer {ends[0]:.1f} s (waited {answered[0][1]:.1f} s), ready {ends[-1]:.1f} s; "
              f"{len(loading)} loading answers after the first: p50 {percentile(loading, 50):.0f}, max "
              f"{max(loading, default=0):.0f} ms; longest gap between answers {max(gaps, default=0):.0f} ms "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)

    def main() -> None:
        if sys.argv[1:2] == ["--poll"]:
            poll_loading(sys.argv[2])
            return
        parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
        parser.add_argument("--mode", choices=sorted(MODES), default="default")
        parser.add_argument("--reps", type=int, default=3)
        parser.add_argument("--load", type=int, default=0, metavar="N",
                            help="instead of the room check: N starts, /health polled from the launch to ready")
        parser.add_argument("--burners", type=int, default=0,
                            help="busy processes beside, once the model is ready (with --load: from before the launch)")
        parser.add_argument("--threshold", type=float, default=0.3, help="seconds without a pulse that are a stall")
        parser.add_argument("--out", type=Path, default=common.OUT)
        args = parser.parse_args()
        args.out.mkdir(parents=True, exist_ok=True)
        pulse = Path(tempfile.mkstemp(prefix="nanoqwen-pulse-", dir="/dev/shm")[1])
        pulse.write_bytes(bytes(16))
        env = cpu_env(make_checkpoint(), **MODES[args.mode], GEVENT_MONITOR_THREAD_ENABLE="1",
                      GEVENT_MAX_BLOCKING_TIME="0.1", GUNICORN_CMD_ARGS=f"-c {Path(__file__).resolve()}",
                      **{PULSE_ENV: str(pulse)})
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(pulse, args.threshold, stop))
        watcher.start()
        burners: list[subprocess.Popen] = []
        try:
            if args.load:
                for _ in range(args.burners):  # one by one: an interrupt partway still kills those started
                    burners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
                for start in range(args.load):
                    with pulse.open("r+b") as beat:  # the last worker's pulse is no stall of the next (no truncation:
                        beat.write(bytes(16))         # the watcher has it mapped)
                    srv = GunicornServer(env, args.out / f"stall_watch-{args.mode}-load{start}.log")
                    watch_load(srv, start)
                    print(*[line for line in srv.log().splitlines() if line.startswith("stall_watch:")], sep="\n")
                return
            with GunicornServer(env, args.out / f"stall_watch-{args.mode}.log") as srv:
                for _ in range(args.burners):  # one by one: an interrupt partway still kills those started
                    burners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
                for rep in range(args.reps):
                    t0 = time.monotonic()
                    tally = Tally()
                    with health_polled(srv, 0.05) as polls:  # from a process of its own: not this one's GIL
                        BackgroundSoak(srv.port, tally, 300).settle()
                    health = [1e3 * p.seconds for p in polls]
                    print(f"rep {rep}: room check {time.monotonic() - t0:.1f} s, /health p50 "
                          f"{percentile(health, 50):.0f} p99 {percentile(health, 99):.0f} "
                          f"max {max(health):.0f} ms ({len(health)} answered, all 200), load "
                          f"{os.getloadavg()[0]:.1f}, problems {tally.problems[:3]}", flush=True)
                print(*[line for line in srv.log().splitlines() if line.startswith("stall_watch:")], sep="\n")
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
            stop.set()
            watcher.join()
            pulse.unlink()

    main()
