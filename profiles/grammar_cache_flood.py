"""Distinct big grammars, one request at a time, through a real `gunicorn -k gevent server:app`: the worker's memory as
the compiled-grammar cache fills (NANOQWEN_GRAMMAR_CACHE_MEMORY bounds it by bytes; before, by count alone), and what
their lexers grow after they are cached (charged to none).

    python profiles/grammar_cache_flood.py [--kind object|regex|branching] [--requests 32] [--every 8]
        [--budget BYTES] [--rounds 1] [--max-tokens 200]

Serves the 2-layer test checkpoint on the CPU in fp32, one worker, with profiles/gil_watch_conf.py's memory watch. Each
request (the openai client) sends a grammar no other sends: `object`, a strict json_schema of a closed object of 4,900
properties (~15 MB held, ~1 s to compile); `regex`, structured_outputs' `b{i}a{30000}` (~11 MB); `branching`,
`c{i}[ab]*a[ab]{20}` (tiny compiled; its lexer's states, a DFA's of up to 2^21, are built as answers walk it).
The first round sends each with max_tokens 1 (its compile and first mask: what the cache charges); each later
`--rounds` sends them all again with `--max-tokens` at temperature 1, a seed each, growing their cached lexers. Prints,
after every `--every` requests of the first round and after each later round, the worker's RSS, /stats'
grammars_cached and grammar_cache_bytes (absent before the byte bound: `-`), what malloc has handed out (the memory
watch's last line) and that growth since the start less the cache's bytes: what nothing is charged for.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from chat_http import MODEL, cpu_env  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from gil_watch_conf import MEMORY_WATCH_ENV  # noqa: E402
from rss_watch import rows  # noqa: E402
from schema_shapes import closed_object  # noqa: E402
from server_process import GunicornServer  # noqa: E402
from soak import rss_mb  # noqa: E402

PROPERTIES = 4_900
WATCH_S = 1.0


def body(kind: str, i: int) -> dict[str, Any]:
    if kind == "regex":
        return {"extra_body": {"structured_outputs": {"regex": f"b{i}a{{30000}}"}}}
    if kind == "branching":
        return {"extra_body": {"structured_outputs": {"regex": f"c{i}[ab]*a[ab]{{20}}"}}}
    schema = closed_object({f"p{i}_{j}": {"type": "integer"} for j in range(PROPERTIES)})
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema, "strict": True}}}


def report(srv: GunicornServer, done: str, started: float, heap_at_start: float | None) -> float:
    """A line of the worker's memory after `done`; what malloc had handed out (MB) then."""
    time.sleep(WATCH_S * 1.5)  # a memory_watch line after the last request
    worker = requests.get(f"{srv.url}/stats", timeout=30).json()["workers"][0]
    heap, cached = rows(srv.log())[-1]["malloc_used_mb"], worker.get("grammar_cache_bytes", 0) / 2**20
    uncharged = heap - (heap if heap_at_start is None else heap_at_start) - cached
    print(f"{done:>20}  {time.perf_counter() - started:6.1f} s  rss {rss_mb(worker['pid']):6.0f} MB  cached "
          f"{worker.get('grammars_cached', '-')}  cache {cached:6.1f} MB  malloc used {heap:6.1f} MB  uncharged "
          f"{uncharged:+6.1f} MB  load {os.getloadavg()[0]:.1f}", flush=True)
    return heap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("object", "regex", "branching"), default="object")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--budget", type=int, default=0, help="NANOQWEN_GRAMMAR_CACHE_MEMORY (0: the default)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=200, help="each request's after the first round")
    args = parser.parse_args()
    env = cpu_env(make_checkpoint(), **{MEMORY_WATCH_ENV: str(WATCH_S)},
                  **({"NANOQWEN_GRAMMAR_CACHE_MEMORY": str(args.budget)} if args.budget else {}))
    config = ["-c", str(REPO / "profiles" / "gil_watch_conf.py")]
    with tempfile.TemporaryDirectory() as log_dir, \
            GunicornServer(env, Path(log_dir) / "gunicorn.log", args=config) as srv:
        client = srv.openai_client()
        print(f"load {os.getloadavg()[0]:.1f}; {args.kind}, {args.requests} requests, {args.rounds} rounds")
        started = time.perf_counter()
        heap = report(srv, "0 requests", started, None)
        for r in range(args.rounds):
            for i in range(args.requests):
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=args.max_tokens if r else 1, temperature=1.0, seed=r,
                                               **body(args.kind, i))
                if not r and (i + 1) % args.every == 0 and i + 1 < args.requests:
                    report(srv, f"{i + 1} requests", started, heap)
            report(srv, f"round {r + 1}", started, heap)


if __name__ == "__main__":
    main()
