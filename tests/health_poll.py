"""Polls a server's GET /health until its stdin closes, then prints the seconds each poll took as JSON.

Run by chat_http.health_polled in a process of its own: timed from the test's process, a poll also
waited for that process's GIL, which its client threads hold while they parse a large answer (0.4-0.5 s
on CI for 128 tokens × 20 logprobs), and that stall was the test's, not the server's.
"""
from __future__ import annotations

import json
import sys
import threading
import time

import requests


def main(url: str, interval: float) -> None:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    session = requests.Session()
    latencies: list[float] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        status = session.get(url, timeout=30).status_code
        latencies.append(time.perf_counter() - t0)
        if status != 200:
            sys.exit(f"/health answered {status}")
        if len(latencies) == 1:
            print("polling", flush=True)  # the caller's work starts now
        time.sleep(interval)
    print(json.dumps(latencies))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
