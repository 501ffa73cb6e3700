"""The gevent hub's CPU per streamed token and per request, through a real `gunicorn -k gevent server:app`.

    python profiles/hub_cpu.py [--clients 16] [--tokens 64] [--rounds 5] [--prime TOKENS] [--repo DIR ...]
                               [--py-spy SECONDS [--native]] [--requests N]

Serves the tiny test checkpoint (fp32, CPU) and sends rounds of --clients concurrent streamed chat completions
(raw HTTP, greedy, ignore_eos): one round of --tokens tokens each, one of 1 token each. The worker's main thread is
the hub (the engine and the tokenizer pools run in their own native threads); its CPU time over a round comes from
/proc/<worker>/task/<worker>/schedstat (nanoseconds). Per request: the 1-token round's hub CPU / clients; per token:
(long round - short round) / (clients x (tokens - 1)). The whole worker's CPU is given beside it. Beside the hub's
median a token, its mean over the rounds: what the hub does every so often (the 0.5 s publish of /stats) lands in a
few long rounds, which the median leaves out.

Each --repo (default: this repository) is served by its own server from that directory (its `nanoqwen`, e.g. an
export of an earlier commit: `git archive REV | tar -x -C DIR`): all are up at once and the rounds alternate between
them, an A/B under the same load. Medians over --rounds. --prime N: first each server streams N tokens (rounded up to
whole rounds of 16 clients × 128 tokens), so that /stats' latency
samples and rate window are as full as in a server that has served a while (their
work at each 0.5 s publish grows with them). --py-spy S: afterwards, py-spy records the first server's hub for S
seconds of long rounds and prints its top functions (py-spy must be installed; --native: C frames too).

--requests N: the hub's CPU per request instead, from a tight loop: each round sends N back-to-back chat completions
of one token on one keep-alive connection, of each kind (plain, streamed, with tools, streamed with tools), the trees
alternated and their order reversed every other round; medians of --rounds.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from chat_http import cpu_env  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from server_process import GunicornServer, serving_together  # noqa: E402


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"expected one gunicorn worker, found {children}")
    return int(children[0])


def thread_cpu_ns(pid: int, tid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])


def process_cpu_ns(pid: int) -> int:
    return sum(thread_cpu_ns(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task"))


def stream(port: int, body: bytes, errors: list[str]) -> None:
    """One streamed chat completion, read to its end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200 or not data.endswith(b"data: [DONE]\n\n"):
            errors.append(f"{response.status}: {data[-200:]!r}")
    finally:
        conn.close()


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}]
KINDS = {"plain": {}, "stream": {"stream": True}, "tools": {"tools": TOOLS}, "stream+tools": {"stream": True,
                                                                                                "tools": TOOLS}}


def request_loop(conn: http.client.HTTPConnection, kind: str, n: int) -> None:
    """n chat completions of one token, one after the other on `conn`, read to their ends."""
    for i in range(n):
        body = json.dumps({"model": "qwen3-0.6b", "max_tokens": 1, "temperature": 0, "ignore_eos": True, **KINDS[kind],
                           "messages": [{"role": "system", "content": "You are helpful."},
                                        {"role": "user", "content": f"[{i}] count the stars over the lazy dog"}]})
        conn.request("POST", "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {data[:200]!r}")


def per_request(running: dict[str, GunicornServer], n: int, rounds: int) -> None:
    """The hub's CPU (and the wall time) per request of each kind, tight loops of n, the trees alternated."""
    conns = {name: http.client.HTTPConnection("127.0.0.1", srv.port, timeout=600) for name, srv in running.items()}
    for name in running:
        for kind in KINDS:
            request_loop(conns[name], kind, 10)  # warm
    results: dict[tuple[str, str], list[tuple[float, float]]] = {(name, kind): [] for name in running for kind in KINDS}
    for r in range(rounds):
        for kind in KINDS:
            for name in list(running)[:: 1 if r % 2 == 0 else -1]:
                worker = worker_pid(running[name].pid)
                hub0, t0 = thread_cpu_ns(worker, worker), time.perf_counter()
                request_loop(conns[name], kind, n)
                results[name, kind].append(((thread_cpu_ns(worker, worker) - hub0) / n / 1e3,
                                            (time.perf_counter() - t0) / n * 1e3))
    print(f"load average {os.getloadavg()[0]:.1f} at end; {n} requests of 1 token a round, medians of {rounds} rounds")
    print("| tree | kind | hub us/request | (each round) | wall ms/request |")
    print("| --- | --- | ---: | --- | ---: |")
    for (name, kind), rows in results.items():
        each = " ".join(f"{row[0]:.0f}" for row in rows)
        print(f"| {name} | {kind} | {statistics.median(row[0] for row in rows):.0f} | {each} | "
              f"{statistics.median(row[1] for row in rows):.1f} |")


def one_round(srv: GunicornServer, clients: int, tokens: int, tag: str) -> tuple[int, int, float]:
    """-> (hub CPU ns, worker CPU ns, wall s) of `clients` concurrent streams of `tokens` tokens."""
    worker = worker_pid(srv.pid)
    bodies = [json.dumps({
        "model": "qwen3-0.6b", "stream": True, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": f"[{tag} {i}] count the stars over the lazy dog"}],
    }).encode() for i in range(clients)]
    errors: list[str] = []
    threads = [threading.Thread(target=stream, args=(srv.port, body, errors)) for body in bodies]
    hub0, all0, t0 = thread_cpu_ns(worker, worker), process_cpu_ns(worker), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    hub, total = thread_cpu_ns(worker, worker) - hub0, process_cpu_ns(worker) - all0
    if errors:
        raise RuntimeError(f"{len(errors)} streams failed: {errors[0]}")
    return hub, total, wall


def py_spy(srv: GunicornServer, seconds: float, clients: int, tokens: int, native: bool) -> None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy is not installed: no profile")
        return
    worker = worker_pid(srv.pid)
    out = Path(tempfile.mkdtemp()) / "hub.txt"
    rec = subprocess.Popen([exe, "record", "--pid", str(worker), "--threads", "--format", "raw", "--rate", "1000",
                            "--duration", str(int(seconds)), "--output", str(out), *(["--native"] if native else [])],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        one_round(srv, clients, tokens, f"spy{n}")
        n += 1
    rec.wait(timeout=seconds + 60)
    summarize_spy(out, worker)


def summarize_spy(path: Path, hub_tid: int) -> None:
    """py-spy's raw (collapsed) stacks of the hub thread: self and inclusive samples per function."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or f"{hub_tid:#x}" not in frames[0] and str(hub_tid) not in frames[0]:
            continue
        n = int(count)
        total += n
        frames = [frame.rpartition(":")[0] or frame for frame in frames]  # per function, not per line
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames[1:]):
            inclusive[frame] = inclusive.get(frame, 0) + n
    print(f"py-spy: {total} samples of the hub thread (idle ones left out)")
    for title, table in (("self", own), ("inclusive", inclusive)):
        print(f"-- {title}")
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:45]:
            print(f"{100 * n / max(total, 1):5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prime", type=int, default=0, metavar="TOKENS")
    parser.add_argument("--repo", type=Path, action="append", help="a tree to serve (repeat for an A/B)")
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--native", action="store_true", help="py-spy samples C frames too")
    parser.add_argument("--requests", type=int, default=0, metavar="N", help="per request: tight loops of N")
    args = parser.parse_args()
    if args.native and not args.py_spy:
        parser.error("--native is py-spy's: give --py-spy SECONDS")
    if args.py_spy and args.requests:
        parser.error("--py-spy samples the streaming rounds, which --requests replaces")
    repos = args.repo or [REPO]
    env = cpu_env(make_checkpoint(), NANOQWEN_MAX_BATCH=str(max(16, args.clients)))
    logs = Path(tempfile.mkdtemp())
    servers = {}
    for i, repo in enumerate(repos):
        srv = GunicornServer(env, logs / f"gunicorn{i}.log")
        srv._cwd = repo.resolve()
        servers[str(repo)] = srv
    print(f"python {' '.join(sys.argv)}; load average {os.getloadavg()[0]:.1f} at start")
    with serving_together(servers) as running:
        if args.requests:
            per_request(running, args.requests, args.rounds)
            return
        for srv in running.values():  # warm: first-request effects out of the figures
            one_round(srv, args.clients, 4, "warm")
            for n in range(-(-args.prime // (16 * 128))):
                one_round(srv, 16, 128, f"prime{n}")
        results: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in running}
        for r in range(args.rounds):
            for name, srv in running.items():
                hub_long, all_long, wall = one_round(srv, args.clients, args.tokens, f"long{r}")
                hub_short, all_short, _ = one_round(srv, args.clients, 1, f"short{r}")
                tokens = args.clients * (args.tokens - 1)
                results[name].append(((hub_long - hub_short) / tokens / 1e3, hub_short / args.clients / 1e3,
                                      (all_long - all_short) / tokens / 1e3, args.clients * args.tokens / wall))
        print(f"load average {os.getloadavg()[0]:.1f} at end; {args.clients} clients x {args.tokens} tokens, "
              f"medians of {args.rounds} alternated rounds")
        print("| tree | hub us/token | (mean) | hub us/request | worker us/token | tok/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, rows in results.items():
            cols = [statistics.median(col) for col in zip(*rows)]
            mean = statistics.fmean(row[0] for row in rows)
            print(f"| {name} | {cols[0]:.1f} | {mean:.1f} | {cols[1]:.0f} | {cols[2]:.1f} | {cols[3]:.0f} |")
        if args.py_spy:
            py_spy(next(iter(running.values())), args.py_spy, args.clients, args.tokens, args.native)


if __name__ == "__main__":
    main()
