"""`truncation: "auto"` on a long conversation: a Responses create's latency, and the input token count's, against
a real `python -m nanoqwen serve` of each checkout given (the 2-layer test checkpoint, fp32 CPU, 512-token context),
their requests interleaved; /health is polled meanwhile from a process of its own (its worst answer is reported).
Beside the latency, the CPU seconds the server's processes spent on it (less noisy on a loaded machine).

    PYTHONPATH=$PWD python profiles/bench_truncation.py [--items 300] [--words 4000] [--reps 2] ROOT [ROOT ...]

ROOT: a checkout's root (e.g. one made by `git worktree add` or `git archive REV | tar -x -C DIR`); its own code
serves, and its /stats must list each worker's pid (from aea5834, 2026-12-01, on), which the poller reads to time
its event loop. The conversation: `--items` user messages of `--words` words, then "Hi" (300 x 4,000: 6 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from chat_http import MODEL, cpu_env, health_polled  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from server_process import GunicornServer  # noqa: E402


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(_cpu_seconds(int(child)) for child in children)


def _timed(url: str, body: bytes) -> tuple[float, int] | None:
    """(seconds, input tokens); None: the route is not there (a checkout without the count)."""
    start = time.perf_counter()
    answer = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=600)
    elapsed = time.perf_counter() - start
    if answer.status_code == 405:
        return None
    if answer.status_code != 200:
        raise SystemExit(f"{url}: {answer.status_code} {answer.text[:300]}")
    usage = answer.json().get("usage")
    return elapsed, usage["input_tokens"] if usage else answer.json()["input_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--words", type=int, default=4000)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    items = [{"role": "user", "content": "word " * args.words} for _ in range(args.items)]
    fields = {"model": MODEL, "input": [*items, {"role": "user", "content": "Hi"}], "truncation": "auto"}
    create = json.dumps({**fields, "max_output_tokens": 16, "temperature": 0}).encode()
    count = json.dumps(fields).encode()
    print(f"conversation: {len(create) / 1e6:.1f} MB; load average {os.getloadavg()}")
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN="512")
    logs = Path(tempfile.mkdtemp(prefix="bench_truncation_"))
    servers = [GunicornServer.cli([], {**env, "PYTHONPATH": str(root)}, logs / f"{i}.log", root)
               for i, root in enumerate(args.roots)]
    try:
        for srv in servers:
            srv.start()
        for rep in range(args.reps):
            for root, srv in zip(args.roots, servers):
                for name, path, body in (("create", "/v1/responses", create),
                                          ("count", "/v1/responses/input_tokens", count)):
                    with health_polled(srv, 0.05) as polls:
                        cpu = _cpu_seconds(srv.pid)
                        timed = _timed(f"{srv.url}{path}", body)
                        cpu = _cpu_seconds(srv.pid) - cpu
                    if timed is None:
                        continue
                    elapsed, tokens = timed
                    print(f"{root} {name} rep {rep}: {elapsed:.2f} s ({cpu:.2f} CPU s), {tokens} input tokens, "
                          f"/health max {1000 * max(p.seconds for p in polls):.0f} ms, load {os.getloadavg()[0]:.1f}",
                          flush=True)
    finally:
        for srv in servers:
            srv.stop()


if __name__ == "__main__":
    main()
