"""Soak through nginx (deploy/nginx.conf) in front of two replicas with small queues, one of them restarted mid-load.

    python profiles/soak_replicas.py [--rounds 3] [--round-seconds 200] [--clients 6] [--openai-clients 6]
        [--max-batch 4] [--max-queue 4] [--restarts hup term max-requests] [--seed 0] [--out DIR]
        [--server-options "max_fails=0"]

Two `gunicorn -k gevent server:app` replicas of the 2-layer test checkpoint (CPU, fp32, one torch thread each,
NANOQWEN_MAX_BATCH / NANOQWEN_MAX_QUEUE small so that the load fills them and they answer 503 queue_full) behind a
real nginx (tests/balancer.py). Each round, for --round-seconds: --openai-clients threads of the official client
(`max_retries` 2: its backoff honours Retry-After) ask short chat completions, streamed or not, through nginx; --clients
threads run soak.py's raw scenarios through nginx (valid answers, the greedy probe, fuzz, wrong requests, oversized
bodies, keep-alive after an error, disconnects at every point, slow readers, trickled and stalled bodies, strict-tool
bursts; not the stored or background ones: without X-Conversation-Id a follow-up may reach the other replica); one
thread holds a stream it never reads (TCP window full) through nginx. Replica B is restarted once per round but the
first, by turns: SIGHUP (gunicorn's graceful reload), SIGTERM (a graceful stop, then a fresh start on the same port)
or gunicorn's --max-requests (B runs with it throughout; its worker recycles on its own). Replica A is never
restarted: its /health is polled from a process of its own (chat_http.health_polled) all round.

Invariants (exit status 1 when broken): every answer well formed (soak_http's checks; no 5xx but the 503s
queue_full, model_loading (B restarted) and nginx's no_replica, every error OpenAI-shaped, through nginx too), the
official client never sees an error but those 503s after its retries; after each round each replica is drained (no
running or waiting request, KV usage 0), A's /stats counts agree with what the clients saw whenever B's worker did
not change (soak.count_problems over both) and with A's /metrics (requests by outcome, tokens), A's /health held p99
under --health-p99-ms, A's worker the same all soak and its RSS within --rss-growth-mb of the first round's, and no
traceback or 500 in either replica's log. Then the fairness check, on A directly: a stream that never reads and long
streams read as they come while --shorts short requests arrive; each short one must end within --short-bound-s, and
the long streams never stand still that long. Writes soak_replicas.json into --out (default profiles/out/replicas-
soak/).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai
import requests
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "profiles")]

from balancer import Nginx  # noqa: E402
from chat_http import MODEL, Poll, cpu_env, health_polled, most_held  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from nanoqwen.api.metrics import percentile  # noqa: E402
from server_process import GunicornServer  # noqa: E402
from soak import Soak, count_problems, drained, greedy_probe, health_summary, rss_mb  # noqa: E402
from soak_http import CHAT, REPLICAS_UNAVAILABLE, Connection, Json, Tally, request_bytes, reset, words  # noqa: E402

RESTARTS = ("hup", "term", "max-requests")
MAX_REQUESTS = 150  # replica B's worker recycles after this many requests in --restarts max-requests
UNREAD_TOKENS = 480  # the never-read stream: more than its socket buffers hold, within chat_http's 512 of context
# a replica's log: a traceback, or an access line with a 5xx but 503 (nanoqwen.access_log: "METHOD PATH" STATUS)
LOG_PROBLEM = re.compile(r'Traceback|" 5(?!03)\d\d ')
REFUSED = re.compile(r'"POST [^"]*" 503 ')  # in nginx's access log and a replica's alike
HEALTH_POLL_S = 0.05


@dataclass
class ReplicaSoak(Soak):
    """soak.py's raw scenarios through nginx, less those that need the same replica twice (stored, background and
    Responses continuations: a follow-up without X-Conversation-Id may reach the other); a replica restarted may
    answer model_loading, and nginx no_replica."""

    unavailable: tuple[str, ...] = REPLICAS_UNAVAILABLE

    def scenarios(self) -> list[tuple[float, Callable[[random.Random], None]]]:
        return [(30, self.valid), (4, self.probe), (10, self.fuzz), (4, self.wrong_request), (3, self.oversized),
                (4, self.keepalive_after_error), (16, self.disconnect), (4, self.slow_reader), (3, self.slow_body),
                (self.tool_weight, self.tool_burst)]


def openai_client(url: str, tally: Tally, seed: int, until: float) -> None:
    """The official client, its own retries on (2, Retry-After honoured): it may only fail with a 503."""
    rng = random.Random(seed)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=120)
    while time.monotonic() < until:
        stream = rng.random() < 0.5
        body: Json = {"model": MODEL, "messages": [{"role": "user", "content": words(rng, rng.randint(1, 40))}],
                      "max_tokens": rng.choice([1, 8, 24, 64]), "temperature": rng.choice([0, 0.8])}
        try:
            if stream:
                finished = [c.finish_reason for chunk in client.chat.completions.create(**body, stream=True)
                            for c in chunk.choices if c.finish_reason is not None]
            else:
                finished = [c.finish_reason for c in client.chat.completions.create(**body).choices]
            tally.record("openai", 200, None if finished else "an answer without a finish_reason")
        except openai.APIStatusError as exc:
            code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
            allowed = exc.status_code == 503 and code in REPLICAS_UNAVAILABLE
            tally.record("openai", exc.status_code, None if allowed else f"{exc.status_code}: {exc.body}")
        except openai.APIConnectionError as exc:
            tally.record("openai", 0, f"no answer after the client's retries: {exc!r}")


def never_read(port: int, tally: Tally, stop: threading.Event) -> None:
    """A long stream whose reader never reads (a small receive buffer, full): held until the round ends, then reset.
    Its top logprobs make it hundreds of KB, past what the sockets' buffers take."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long story"}], "stream": True,
            "max_tokens": UNREAD_TOKENS, "ignore_eos": True, "logprobs": True, "top_logprobs": 20}
    while not stop.is_set():
        conn = Connection(port, timeout=60, rcvbuf=4096)
        conn.sock.sendall(request_bytes("POST", CHAT, json.dumps(body).encode()))
        stop.wait(30)
        reset(conn.sock)
        tally.record("never-read", 0)


@dataclass
class Replicas:
    a: GunicornServer  # never restarted
    b: GunicornServer
    nginx: Nginx


def replica_env(checkpoint: Path, max_batch: int, max_queue: int) -> dict[str, str]:
    return cpu_env(checkpoint, NANOQWEN_THREADS="1", NANOQWEN_MAX_BATCH=str(max_batch),
                   NANOQWEN_MAX_QUEUE=str(max_queue))


@contextmanager
def serving(env: dict[str, str], out: Path, b_args: tuple[str, ...], server_options: str | None) -> Iterator[Replicas]:
    servers = [GunicornServer(env, out / "replica-a.log").launch(),
               GunicornServer(env, out / "replica-b.log", args=b_args).launch()]
    try:
        for server in servers:
            server.wait_healthy()
        (out / "nginx").mkdir(exist_ok=True)
        nginx = Nginx(out / "nginx", [f"127.0.0.1:{s.port}" for s in servers])
        if server_options is not None:  # another rule to weigh against deploy/nginx.conf's
            conf = nginx.dir / "nanoqwen.conf"
            conf.write_text(re.sub(r"(    server \S+) .*;", rf"\1 {server_options};", conf.read_text()))
        with nginx:
            yield Replicas(*servers, nginx)
    finally:
        for server in servers:
            server.stop()


def restart(server: GunicornServer, how: str) -> None:
    """Replica B restarted mid-load: SIGHUP (new worker, the old one drained), or SIGTERM and a fresh start on its port
    (`max-requests` restarts itself)."""
    if how == "hup":
        server.hangup()
    elif how == "term":
        server.terminate()
        server.wait(60)
        server.start()


@dataclass
class RoundResult:
    seconds: float
    restart: str
    requests: int
    statuses: dict[str, int]
    problems: list[str]
    health_p50_ms: float  # replica A's /health, wall clock
    health_p99_ms: float
    health_max_ms: float
    held_p99_ms: float
    most_held: tuple[tuple[float, float, float], ...]
    pids: dict[str, list[int]]  # replica -> its worker's pid before and after the round
    rss_mb: dict[str, float]
    drained: dict[str, Json]


def metrics_problems(server: GunicornServer, stats: Json) -> list[str]:
    """/metrics' finished requests by outcome and generated tokens against /stats' (one worker, never restarted)."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    families = text_string_to_metric_families(text)
    samples = {f.name: [s for s in f.samples if s.name.endswith("_total")] for f in families}
    counted = {s.labels["outcome"]: s.value for s in samples["nanoqwen_requests"]}
    counted["tokens"] = sum(s.value for s in samples["nanoqwen_generation_tokens"])
    seen = {k: stats[f"requests_{k}"] for k in ("served", "aborted", "failed")}
    seen["tokens"] = stats["total_tokens_generated"]
    return [f"/metrics counts {counted.get(k)} {k}, /stats {v}" for k, v in seen.items() if counted.get(k) != v]


def run_round(replicas: Replicas, probe_answer: str, index: int, how: str, args: argparse.Namespace) -> RoundResult:
    tally = Tally()
    soak = ReplicaSoak(replicas.nginx.port, tally, probe_answer)
    servers = {"a": replicas.a, "b": replicas.b}
    before = {name: requests.get(f"{s.url}/stats", timeout=30).json() for name, s in servers.items()}
    stop = threading.Event()
    holder = threading.Thread(target=never_read, args=(replicas.nginx.port, tally, stop))
    polls: list[Poll] = []
    t0 = time.monotonic()
    try:
        with health_polled(replicas.a, HEALTH_POLL_S) as polls:
            holder.start()
            until = t0 + args.round_seconds
            seed = args.seed * 1000 + index * 100
            threads = [threading.Thread(target=soak.client, args=(seed + i, until)) for i in range(args.clients)]
            threads += [threading.Thread(target=openai_client, args=(replicas.nginx.url, tally, seed + 50 + i, until))
                        for i in range(args.openai_clients)]
            for thread in threads:
                thread.start()
            if how in ("hup", "term"):
                time.sleep(args.round_seconds / 2)
                restart(replicas.b, how)
            for thread in threads:
                thread.join()
    except AssertionError as exc:
        tally.problems.append(f"replica a /health: {exc}")
    finally:
        stop.set()
        if holder.is_alive():
            holder.join()
    seconds = time.monotonic() - t0
    ended = {name: drained(server.url, f"replica {name}") for name, server in servers.items()}
    tally.problems += [p for end in ended.values() for p in end.problems]
    after = {name: end.stats for name, end in ended.items()}
    pids = {name: [before[name]["workers"][0]["pid"], after[name]["workers"][0]["pid"]] for name in servers}
    tally.problems += metrics_problems(replicas.a, after["a"])
    if pids["a"][0] != pids["a"][1]:
        tally.problems.append(f"replica a's worker changed: {pids['a']}")
    if pids["b"][0] == pids["b"][1]:  # the counts of a worker that stayed are comparable with the clients'
        summed = [{k: sum(s[k] for s in side.values()) for k in ("requests_served", "requests_aborted",
                                                                  "requests_failed")} for side in (before, after)]
        tally.problems += count_problems(*summed, tally)
    health = [1000 * p.seconds for p in polls]
    return RoundResult(seconds, how, tally.requests, dict(sorted(tally.statuses.items())), tally.problems,
                       percentile(health, 50), percentile(health, 99), max(health, default=0),
                       percentile([1000 * p.held for p in polls], 99), most_held(polls), pids,
                       {name: rss_mb(pid[1]) for name, pid in pids.items()},
                       {name: end.figures for name, end in ended.items()})


def fairness(server: GunicornServer, shorts: int, bound_s: float) -> tuple[list[float], list[str]]:
    """On one replica: a stream never read and one read as it comes, while `shorts` short requests arrive four at a
    time; each short one's seconds, and the problems (one past `bound_s`, the long stream standing still meanwhile)."""
    stop = threading.Event()
    holder = threading.Thread(target=never_read, args=(server.port, Tally(), stop))
    holder.start()
    long_body = {"model": MODEL, "messages": [{"role": "user", "content": "a long story"}], "stream": True,
                 "max_tokens": UNREAD_TOKENS, "ignore_eos": True}
    arrivals: list[float] = []  # each line of the long streams', when read
    started, shorts_done = threading.Event(), threading.Event()

    def long_stream() -> None:
        """Long streams one after the other until the short requests are done."""
        while not shorts_done.is_set():
            with requests.post(f"{server.url}{CHAT}", json=long_body, stream=True, timeout=120) as response:
                for _line in response.iter_lines():
                    arrivals.append(time.monotonic())
                    started.set()

    def short(i: int) -> float:
        t0 = time.monotonic()
        response = requests.post(f"{server.url}{CHAT}", timeout=120, json={
            "model": MODEL, "messages": [{"role": "user", "content": f"short {i}"}], "max_tokens": 4})
        seconds = time.monotonic() - t0
        return seconds if response.status_code == 200 else -response.status_code

    streamer = threading.Thread(target=long_stream)
    streamer.start()
    started.wait(60)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        seconds = list(pool.map(short, range(shorts)))
    t1 = time.monotonic()
    shorts_done.set()
    streamer.join()
    stop.set()
    holder.join()
    problems = [f"short request {i}: {s:.2f} s" for i, s in enumerate(seconds) if not 0 <= s <= bound_s]
    # the longest the long streams went without a line while the short ones ran
    marks = [t0, *(t for t in arrivals if t0 < t < t1), t1]
    if (gap := max(b - a for a, b in zip(marks, marks[1:]))) > bound_s:
        problems.append(f"the long stream stood still {gap:.2f} s while the short requests ran")
    return seconds, problems


def refused(replicas: Replicas) -> dict[str, int]:
    """POSTs answered 503 over the soak: by nginx to the clients (its access log; its no_replica among them) and by each
    replica to nginx (queue_full, model_loading)."""
    nginx = (replicas.nginx.dir / "access.log").read_text(errors="replace")
    return {"nginx": len(REFUSED.findall(nginx)), "a": len(REFUSED.findall(replicas.a.log())),
            "b": len(REFUSED.findall(replicas.b.log()))}


def log_problems(server: GunicornServer, name: str) -> list[str]:
    return [f"replica {name} log: {line[:300]}" for line in server.log().splitlines() if LOG_PROBLEM.search(line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-seconds", type=float, default=200)
    parser.add_argument("--clients", type=int, default=6, help="threads of soak.py's raw scenarios")
    parser.add_argument("--openai-clients", type=int, default=6, help="threads of the official client")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--restarts", nargs="+", choices=RESTARTS, default=list(RESTARTS),
                        help="how replica B is restarted, by turns, in the rounds after the first")
    parser.add_argument("--shorts", type=int, default=40)
    parser.add_argument("--short-bound-s", type=float, default=10)
    parser.add_argument("--health-p99-ms", type=float, default=300)
    parser.add_argument("--rss-growth-mb", type=float, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-options", help="each upstream server's options instead of deploy/nginx.conf's")
    parser.add_argument("--out", type=Path, default=REPO / "profiles" / "out" / "replicas-soak")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = replica_env(make_checkpoint(), args.max_batch, args.max_queue)
    hows = ["none"] + [args.restarts[i % len(args.restarts)] for i in range(args.rounds - 1)]
    b_args = ("--max-requests", str(MAX_REQUESTS)) if "max-requests" in hows else ()
    report: dict[str, Any] = {"command": " ".join(sys.argv), "uptime": Path("/proc/loadavg").read_text().strip()}
    with serving(env, args.out, b_args, args.server_options) as replicas:
        answer = greedy_probe(replicas.a.url)
        rounds = [run_round(replicas, answer, i, how, args) for i, how in enumerate(hows)]
        shorts, problems = fairness(replicas.a, args.shorts, args.short_bound_s)
        problems += drained(replicas.a.url, "replica a").problems
        problems += [p for r in rounds for p in r.problems]
        problems += [f"round {i}: replica a /health held p99 {r.held_p99_ms:.0f} ms, the longest: {r.most_held}"
                     for i, r in enumerate(rounds) if r.held_p99_ms > args.health_p99_ms]
        if len(rounds) > 1 and rounds[-1].rss_mb["a"] - rounds[0].rss_mb["a"] > args.rss_growth_mb:
            problems.append(f"replica a's RSS grew {rounds[0].rss_mb['a']:.0f} -> {rounds[-1].rss_mb['a']:.0f} MB")
        problems += log_problems(replicas.a, "a") + log_problems(replicas.b, "b")
        report["refused"] = refused(replicas)
    report |= {"rounds": [asdict(r) for r in rounds], "shorts_s": shorts, "problems": problems,
               "uptime_after": Path("/proc/loadavg").read_text().strip()}
    (args.out / "soak_replicas.json").write_text(json.dumps(report, indent=1))
    for i, r in enumerate(rounds):
        print(f"round {i} (restart: {r.restart}): {r.requests} requests in {r.seconds:.0f} s, replica a "
              f"{health_summary(r)}, RSS {r.rss_mb}, pids {r.pids}")
        print("   ", r.statuses)
        print("    drained:", r.drained)
    # /stats against the clients' counts runs only in a round whose replica B kept its worker (--max-requests, once
    # in --restarts, recycles B's worker in most rounds)
    print("rounds whose counts were checked:",
          [i for i, r in enumerate(report["rounds"]) if len(set(r["pids"]["b"])) == 1])
    print(f"fairness: {len(shorts)} short requests, p50 {percentile(shorts, 50):.2f} s, max {max(shorts):.2f} s")
    print("503s answered (nginx to the clients, each replica to nginx):", report["refused"])
    print(f"{len(problems)} problems", *problems[:40], sep="\n  ")
    print("load average:", report["uptime"], "->", report["uptime_after"])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
