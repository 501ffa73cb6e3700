"""How many requests a server with several workers refuses 503 `model_loading` while its workers recycle.

    python profiles/bench_respawn_503.py [--workers 2] [--max-requests 8] [--jitter 4] [--clients 10]
        [--requests 8] [--pause 0] [--term-every 0] [--out DIR]

One `gunicorn -k gevent server:app` of the 2-layer test checkpoint (CPU, fp32) with --workers, --max-requests (0: none)
and --max-requests-jitter; once every worker has loaded, --clients threads each send --requests short chat completions
through the official client without retries, --pause seconds apart, each on a connection of its own (the workers take
turns accepting, as for clients behind a balancer that opens new connections), while every --term-every seconds (0:
never) one worker, by turns, is sent SIGTERM (a kill's respawn). Counts each answer by outcome (served, or its error
code), and the workers' respawns from gunicorn's log. Lane scale43's restart load: 2 workers, --max-requests 8, jitter
4, 10 clients x 8 requests: both workers reach their limit within one load (the requests split evenly), where the
second now serves on till the first's successor serves (lane maxreq44). A load where one worker outlives the other's
respawn: --max-requests 0 --term-every 15 --clients 2 --requests 200 --pause 0.25. Writes respawn_503.json and .md into
--out (default profiles/out/respawn-503/).
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "profiles")]

from chat_http import MODEL, cpu_env, metric  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from common import command_line, markdown_table, write_outputs  # noqa: E402
from server_process import GunicornServer  # noqa: E402
from waits import wait_for  # noqa: E402


def _answer(srv: GunicornServer, pause: float) -> str:
    """One request on a new connection, after `pause` s: "served", or the error's code (its class where it has none)."""
    time.sleep(pause)
    with srv.openai_client(timeout=120) as client:
        try:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        except openai.APIStatusError as exc:
            return f"{exc.status_code} {exc.code}"
        except openai.APIError as exc:
            return type(exc).__name__
    return "served"


def _term_by_turns(srv: GunicornServer, every_s: float, done: threading.Event) -> None:
    """SIGTERM to one worker every `every_s` s, the slots by turns, until `done`."""
    turn = 0
    while not done.wait(every_s):
        workers = {w["slot"]: w["pid"] for w in requests.get(f"{srv.url}/stats", timeout=30).json()["workers"]}
        os.kill(workers[turn % len(workers)], signal.SIGTERM)
        turn += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-requests", type=int, default=8)
    parser.add_argument("--jitter", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--term-every", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=REPO / "profiles" / "out" / "respawn-503")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        gunicorn_args = ("--workers", str(args.workers), "--max-requests", str(args.max_requests),
                         "--max-requests-jitter", str(args.jitter))
        srv = GunicornServer(cpu_env(make_checkpoint()), Path(tmp) / "gunicorn.log", args=gunicorn_args)
        with srv:
            wait_for(lambda: metric(srv, "nanoqwen_model_ready") == args.workers, 300, 0.5, srv.log)
            load = os.getloadavg()[0]
            start = time.monotonic()
            done = threading.Event()
            with ThreadPoolExecutor(args.clients + 1) as pool:
                if args.term_every:
                    terms = pool.submit(_term_by_turns, srv, args.term_every, done)
                answers = list(pool.map(lambda _: [_answer(srv, args.pause) for _ in range(args.requests)],
                                        range(args.clients)))
                done.set()
                if args.term_every:
                    terms.result()
            seconds = time.monotonic() - start
            restarts = srv.log().count("Booting worker") - args.workers
    outcomes = collections.Counter(answer for client in answers for answer in client)
    data = {"command": command_line(), "load_avg_1m": load, "seconds": round(seconds, 1), "restarts": restarts,
            "outcomes": dict(outcomes), **vars(args) | {"out": str(args.out)}}
    rows = [[outcome, str(count)] for outcome, count in outcomes.most_common()]
    markdown = (f"`{data['command']}`: {args.clients} clients x {args.requests} requests in {data['seconds']} s, "
                f"{restarts} worker respawns, load {load:.1f} at the start\n\n"
                + markdown_table(["outcome", "requests"], rows))
    write_outputs(args.out, "respawn_503", data, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
