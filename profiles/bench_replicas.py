"""Replicas behind nginx (deploy/nginx.conf): 1 replica direct, 1 behind nginx, 2 behind nginx.

    python profiles/bench_replicas.py [--model DIR | --shape {0.6b,tiny}] [--clients 1 8]
        [--max-tokens 64] [--prompt-words 32] [--threads 2] [--repeat 3] [--out DIR]

Each replica is `gunicorn -k gevent server:app` on a loopback port; with two, each gets half of
--threads torch threads (the cores are shared, not added). The load is bench_serving's: N
concurrent greedy streaming chat completions, --repeat times per path (medians reported). nginx's
cost is the "nginx, 1 replica" row against "direct" (the same replica, runs interleaved); the "2
replicas" row is what a second replica buys on the same cores. Prints a markdown table and writes
bench_replicas.{json,md} and the logs into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "profiles"), str(REPO / "tests")]

from balancer import Nginx  # noqa: E402
from bench_serving import Row, http_client, prompt, run_concurrently, summarize  # noqa: E402
from server_process import GunicornServer  # noqa: E402


def measure(path: str, url: str, client_counts: list[int], max_tokens: int, words: int) -> list[Row]:
    http_client(url, prompt("warmup", 0, words), 4)
    return [summarize(path, n, run_concurrently(
        n, lambda i, n=n: http_client(url, prompt(f"{path} n{n}", i, words), max_tokens))) for n in client_counts]


def markdown(rows: list[Row]) -> str:
    lines = ["| clients | path | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | tok/s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.clients} | {r.path} | {r.ttft_p50_ms:.1f} | {r.ttft_p99_ms:.1f} | {r.itl_p50_ms:.1f} | "
              f"{r.itl_p99_ms:.1f} | {r.tokens_per_s:.1f} |" for r in sorted(rows, key=lambda r: r.clients)]
    return "\n".join(lines)


@contextlib.contextmanager
def replicas(env: dict[str, str], count: int, threads: int, out: Path) -> Iterator[tuple[str, str]]:
    """`count` replicas launched together and nginx in front: (the first replica's URL, nginx's URL)."""
    replica_env = {**env, "NANOQWEN_THREADS": str(max(1, threads // count))}
    with ExitStack() as stack:
        servers = [GunicornServer(replica_env, out / f"replica{count}-{i}.log").launch() for i in range(count)]
        for server in servers:
            stack.callback(server.stop)
        for server in servers:
            server.wait_healthy()
        nginx_dir = out / f"nginx-{count}"
        nginx_dir.mkdir(parents=True, exist_ok=True)
        yield servers[0].url, stack.enter_context(Nginx(nginx_dir, [f"127.0.0.1:{s.port}" for s in servers])).url


def median_rows(rows: list[Row]) -> list[Row]:
    """Per (path, clients), the median of each figure over the repeats."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.path, row.clients), []).append(row)
    numbers = [f.name for f in fields(Row) if f.name not in ("path", "clients", "overhead_pct")]
    return [Row(path, clients, **{n: statistics.median(getattr(r, n) for r in group) for n in numbers})
            for (path, clients), group in groups.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory (default: a random checkpoint, see --shape)")
    source.add_argument("--shape", choices=("0.6b", "tiny"), default="tiny", help="random checkpoint to build")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all, split between replicas")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path and client count (medians reported)")
    parser.add_argument("--out", type=Path, default=REPO / "profiles" / "out" / "replicas")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = args.model
    if model is None:
        import torch

        from checkpoints import make_checkpoint, qwen3_0_6b_shape

        shape = qwen3_0_6b_shape() if args.shape == "0.6b" else {}
        model = str(make_checkpoint(**shape, dtype=torch.bfloat16 if args.shape == "0.6b" else torch.float32))
    env = {"NANOQWEN_MODEL": model, "NANOQWEN_DEVICE": "cpu", "NANOQWEN_MAX_BATCH": str(max(args.clients)),
           "NANOQWEN_MAX_QUEUE": str(max(args.clients))}
    rows: list[Row] = []
    with replicas(env, 1, args.threads, args.out) as (direct, balanced):
        for _ in range(args.repeat):  # interleaved, so that drifting load hits both paths alike
            rows += measure("direct", direct, args.clients, args.max_tokens, args.prompt_words)
            rows += measure("nginx, 1 replica", balanced, args.clients, args.max_tokens, args.prompt_words)
    with replicas(env, 2, args.threads, args.out) as (_, balanced):
        for _ in range(args.repeat):
            rows += measure("nginx, 2 replicas", balanced, args.clients, args.max_tokens, args.prompt_words)
    rows = median_rows(rows)
    table = markdown(rows)
    print(f"model {model}, {args.max_tokens} tokens per client, {args.threads} threads in all\n\n{table}")
    (args.out / "bench_replicas.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    (args.out / "bench_replicas.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
