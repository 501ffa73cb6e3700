"""Polls a server's GET /health until its stdin closes, then prints each poll as JSON (chat_http.Poll's fields): its
seconds, when it ended, and meanwhile the seconds the worker's event-loop thread ran and waited for a CPU, and the
seconds this poller waited for one (/proc/<pid>/task/<tid>/schedstat: a preempted thread's wait is the machine's load).

Run by chat_http.health_polled in a process of its own: timed from the test's process, a poll also
waited for that process's GIL, which its client threads hold while they parse a large answer (0.4-0.5 s
on CI for 128 tokens × 20 logprobs), and that stall was the test's, not the server's.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import requests


class NoSchedstat(RuntimeError):
    """A thread's run-queue waits cannot be read: a wait less them would silently be wall time."""


def schedstat(path: str) -> tuple[float, float]:
    """A thread's seconds on a CPU, and runnable but waiting for one, since it started."""
    try:
        ran, waited, _ = Path(path).read_text().split()
    except FileNotFoundError:
        raise NoSchedstat(f"no {path}: its thread exited, or the kernel reports no run-queue waits "
                          "(CONFIG_SCHED_INFO)") from None
    return int(ran) / 1e9, int(waited) / 1e9


def reported_schedstat(path: str) -> tuple[float, float]:
    """schedstat of a thread that has run, checked first: a kernel without sched_info writes "0 0 0". Not for every
    read: a thread that stays on its CPU has its run time brought up to date at a tick or a switch only."""
    ran, waited = schedstat(path)
    if ran == 0:
        raise NoSchedstat(f"{path} reports no CPU time for a thread that has run: its run-queue waits are not "
                          "reported either")
    return ran, waited


def main(url: str, interval: float) -> None:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    session = requests.Session()
    stats = session.get(f"{url}/stats", timeout=30)
    stats.raise_for_status()
    workers = stats.json()["workers"]
    if len(workers) != 1:
        sys.exit(f"{len(workers)} workers: the poller reads one worker's loop thread")
    [worker] = workers
    loop = f"/proc/{worker['pid']}/task/{worker['pid']}/schedstat"  # gevent's loop runs in the worker's main thread
    own = "/proc/thread-self/schedstat"
    reported_schedstat(loop)  # the loop has served /stats
    polls: list[tuple[float, ...]] = []
    while not stop.is_set():
        # the waits are read inside the timed span: one outside it would be subtracted from a poll it was no part of
        t0 = time.monotonic()
        (ran, waited), (_, own_waited) = schedstat(loop), schedstat(own)
        status = session.get(f"{url}/health", timeout=30).status_code
        (ran_after, waited_after), (_, own_waited_after) = schedstat(loop), schedstat(own)
        t1 = time.monotonic()
        polls.append((t1 - t0, t1, ran_after - ran, waited_after - waited, own_waited_after - own_waited))
        if status != 200:
            sys.exit(f"/health answered {status}")
        if len(polls) == 1:
            print("polling", flush=True)  # the caller's work starts now
        time.sleep(interval)
    print(json.dumps(polls))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
