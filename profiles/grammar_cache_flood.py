"""Distinct big grammars, one request at a time, through a real `gunicorn -k gevent server:app`: the worker's memory as
the compiled-grammar cache fills (NANOQWEN_GRAMMAR_CACHE_MEMORY bounds it by bytes; before, by count alone).

    python profiles/grammar_cache_flood.py [--kind object|regex] [--requests 32] [--every 8] [--budget BYTES]

Serves the 2-layer test checkpoint on the CPU in fp32, one worker. Each request (the openai client, max_tokens 1)
sends a grammar no other sends: `object`, a strict json_schema of a closed object of 4,900 properties (~15 MB held,
~1 s to compile); `regex`, structured_outputs' `b{i}a{30000}` (~11 MB). Prints, after every `--every` requests, the
worker's RSS and /stats' grammars_cached and grammar_cache_bytes (absent before the byte bound: `-`).
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
from schema_shapes import closed_object  # noqa: E402
from server_process import GunicornServer  # noqa: E402
from soak import rss_mb  # noqa: E402

PROPERTIES = 4_900


def body(kind: str, i: int) -> dict[str, Any]:
    if kind == "regex":
        return {"extra_body": {"structured_outputs": {"regex": f"b{i}a{{30000}}"}}}
    schema = closed_object({f"p{i}_{j}": {"type": "integer"} for j in range(PROPERTIES)})
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": schema, "strict": True}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("object", "regex"), default="object")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--budget", type=int, default=0, help="NANOQWEN_GRAMMAR_CACHE_MEMORY (0: the default)")
    args = parser.parse_args()
    env = cpu_env(make_checkpoint(), **({"NANOQWEN_GRAMMAR_CACHE_MEMORY": str(args.budget)} if args.budget else {}))
    with tempfile.TemporaryDirectory() as log_dir, GunicornServer(env, Path(log_dir) / "gunicorn.log") as srv:
        client = srv.openai_client()
        print(f"load {os.getloadavg()[0]:.1f}; {args.kind}, {args.requests} requests")
        started = time.perf_counter()
        for i in range(args.requests + 1):
            if i % args.every == 0:
                stats = requests.get(f"{srv.url}/stats", timeout=30).json()
                worker = stats["workers"][0]
                print(f"{i:4d} requests  {time.perf_counter() - started:6.1f} s  rss {rss_mb(worker['pid']):6.0f} MB  "
                      f"cached {worker.get('grammars_cached', '-')}  cache "
                      f"{worker.get('grammar_cache_bytes', 0) / 2**20:6.1f} MB  load {os.getloadavg()[0]:.1f}",
                      flush=True)
            if i < args.requests:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=1, **body(args.kind, i))


if __name__ == "__main__":
    main()
