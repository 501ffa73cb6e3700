"""Scrapes during a burst of worker deaths, as the clients of the scraped worker see them. A real gunicorn (one worker,
the tiny test checkpoint) gets `--dead` dead workers' maps (copies of its worker's own, under pids no process has),
which another process then folds one after another as gunicorn's master does at each reap (shared_stats.forget_worker:
a burst of deaths), while /metrics is scraped back to back and streamed completions run on the same worker. Printed a
round: the worst GET /health (polled every 10 ms from a process of its own: chat_http.health_polled), the worst gap
between two chunks of a stream, the scrapes' median and worst times and their statuses. Run from the checkout whose
server is timed (for a revision without this script, copy it and tests/server_process.py there):

    python profiles/bench_scrape_churn.py --dead 100 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

import common  # puts this checkout and its tests first on sys.path
from chat_http import cpu_env, health_polled, sse_payloads
from checkpoints import make_checkpoint
from server_process import GunicornServer, copy_maps_as_dead, worker_run_dir

DEAD_PID = 10**9  # above any pid_max: never a live worker's
# what gunicorn's master runs at each reap (nanoqwen/gunicorn_conf.py child_exit), for each dead pid in turn (its /stats
# snapshot, named by its pid, is none: its removal is a no-op)
FOLDER = ("import sys\nfrom nanoqwen.api.shared_stats import forget_worker\n"
          "for pid in sys.argv[1:]:\n    forget_worker(int(pid), print)\n")


def _streams(url: str, stop: threading.Event, gaps: list[float]) -> None:
    """Streamed completions one after another until `stop`: each gap between two of a stream's chunks."""
    while not stop.is_set():
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=120) as response:
            last = None
            for _ in sse_payloads(response):
                now = time.monotonic()
                if last is not None:
                    gaps.append(now - last)
                last = now


def _round(srv: GunicornServer, dead: int) -> dict[str, object]:
    pid = requests.get(f"{srv.url}/stats", timeout=30).json()["workers"][0]["pid"]
    run_dir = worker_run_dir(pid)
    pids = range(DEAD_PID, DEAD_PID + dead)
    copy_maps_as_dead(run_dir / "metrics", pid, pids)
    env = {**os.environ, "NANOQWEN_RUN_DIR": str(run_dir), "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "metrics")}
    stop, gaps, scrapes = threading.Event(), [], []
    streaming = threading.Thread(target=_streams, args=(srv.url, stop, gaps))
    with health_polled(srv, 0.01) as polls:
        streaming.start()
        time.sleep(0.5)  # the stream under way
        folder = subprocess.Popen([sys.executable, "-c", FOLDER, *map(str, pids)], cwd=common.REPO, env=env,
                                  stdout=subprocess.DEVNULL)
        while folder.poll() is None or not scrapes:
            start = time.monotonic()
            status = requests.get(f"{srv.url}/metrics", timeout=120).status_code
            scrapes.append((time.monotonic() - start, status))
        stop.set()
        streaming.join()
    seconds = [s for s, _ in scrapes]
    return {"dead": dead, "worst_health_ms": 1000 * max(p.seconds for p in polls),
            "worst_stream_gap_ms": 1000 * max(gaps), "scrapes": len(scrapes),
            "scrape_median_ms": 1000 * statistics.median(seconds), "scrape_worst_ms": 1000 * max(seconds),
            "statuses": sorted({status for _, status in scrapes}), "load": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dead", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN="1024")
    with tempfile.TemporaryDirectory() as tmp, GunicornServer(env, Path(tmp) / "gunicorn.log") as srv:
        requests.post(f"{srv.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 1}, timeout=120).raise_for_status()
        print(f"- `{common.command_line()}`", flush=True)
        for _ in range(args.rounds):
            print(json.dumps(_round(srv, args.dead)), flush=True)


if __name__ == "__main__":
    main()
