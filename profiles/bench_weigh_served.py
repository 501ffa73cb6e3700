"""What weighing a large JSON Schema costs the other requests as served: through `gunicorn -k gevent server:app` (the
tiny checkpoint, CPU, fp32), a greedy stream decodes while the schema (`fuzz_schemas.py --weigh N --write-slow DIR`
writes the SLOW ones, 180-360 KB) is sent as a strict `response_format` `--sends` times, each a copy of its own (a
distinct `description`: the grammar cache would not weigh a schema sent again). Alternated: a window of the stream
alone, then one with a send at a time, `--rounds` times. /health is polled every 10 ms throughout (chat_http's
health_polled: its hold less the load). Through profiles/gil_watch_conf.py as an extra gunicorn config: `--switch-ms`,
the worker's sys.setswitchinterval (Python's default 5 ms); `--gil-late-ms`, a thread in the worker that sleeps 1 ms
in a loop logs each wake later than that (a single GIL wait, and where the other threads were) and each full collection
(wall and CPU), both counted a window each here (the stacks: the server log, its path printed).

Prints, a window each: the stream's tokens, its largest and 99th-percentile gap between two SSE events as they
arrive; the sends' status and seconds; /health's longest hold (the loop's own stall) and poll.

    python profiles/bench_weigh_served.py SCHEMA.json [--sends 3] [--rounds 3] [--window-s 3] [--switch-ms MS]
        [--gil-late-ms MS]
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from chat_http import MODEL, cpu_env, health_polled, sse_payloads  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from gil_watch_conf import GC_LINE, LATE_ENV, SWITCH_ENV, WATCH_LINE  # noqa: E402
from server_process import GunicornServer  # noqa: E402

STREAM_TOKENS = 4_000


def stream(srv: GunicornServer, arrivals: list[float], stop: threading.Event) -> None:
    """A greedy stream of STREAM_TOKENS tokens (min_tokens: no early end), each SSE event's arrival kept."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": STREAM_TOKENS,
            "min_tokens": STREAM_TOKENS, "temperature": 0.0, "stream": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    with requests.post(srv.url + "/v1/chat/completions", json=body, stream=True, timeout=600) as answer:
        for _ in sse_payloads(answer):
            arrivals.append(time.monotonic())
            if stop.is_set():
                return


def send(srv: GunicornServer, schema: dict[str, Any], copy: int) -> tuple[int, float]:
    """One strict response_format of `schema` (its copy-th description): the status and seconds to the answer."""
    fmt = {"type": "json_schema", "json_schema": {"name": "big", "strict": True,
                                                  "schema": {**schema, "description": f"copy {copy}"}}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
            "response_format": fmt, "chat_template_kwargs": {"enable_thinking": False}}
    started = time.monotonic()
    answer = requests.post(srv.url + "/v1/chat/completions", json=body, timeout=600)
    return answer.status_code, time.monotonic() - started


def gaps(arrivals: list[float], start: float, end: float) -> list[float]:
    inside = [t for t in arrivals if start <= t <= end]
    return [b - a for a, b in zip(inside, inside[1:])]


def logged(log: str, marker: str, field: int) -> list[tuple[float, float]]:
    """(when, the ms in its `field`-th word) of each line gil_watch_conf logged with `marker`."""
    lines = (line.split(marker, 1)[1].split() for line in log.splitlines() if marker in line)
    return [(float(words[0]), float(words[field])) for words in lines]


def waited(log: str, start: float, end: float, over_ms: float) -> str:
    waits = [ms for when, ms in logged(log, WATCH_LINE, 1) if start <= when <= end]
    cpus = [ms for when, ms in logged(log, GC_LINE, 4) if start <= when <= end]
    return (f"; GIL waits over {over_ms:g} ms: {len(waits)}, max {max(waits, default=0):.0f} ms; full collections "
            f"{len(cpus)}, CPU max {max(cpus, default=0):.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("schema", type=Path)
    parser.add_argument("--sends", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=3.0)
    parser.add_argument("--switch-ms", type=float, help="the worker's switch interval (default: Python's 5 ms)")
    parser.add_argument("--gil-late-ms", type=float, help="log the worker's GIL waits longer than this")
    args = parser.parse_args()
    schema = json.loads(args.schema.read_text())
    log = Path(tempfile.mkdtemp(prefix="weigh-served-")) / "server.log"
    copies = itertools.count()
    watched = {SWITCH_ENV: args.switch_ms, LATE_ENV: args.gil_late_ms}
    env = {name: str(ms / 1e3) for name, ms in watched.items() if ms is not None}
    if env:
        env["GUNICORN_CMD_ARGS"] = f"-c {Path(__file__).with_name('gil_watch_conf.py')}"
    with GunicornServer(cpu_env(make_checkpoint(), NANOQWEN_MAX_MODEL_LEN="8192", **env), log) as srv:
        arrivals: list[float] = []
        stop = threading.Event()
        streamer = threading.Thread(target=stream, args=(srv, arrivals, stop), daemon=True)
        with health_polled(srv, 0.01) as polls:
            streamer.start()
            while len(arrivals) < 20:
                time.sleep(0.05)
            windows: list[tuple[str, float, float, list[tuple[int, float]]]] = []
            for _ in range(args.rounds):
                start = time.monotonic()
                time.sleep(args.window_s)
                windows.append(("alone", start, time.monotonic(), []))
                start = time.monotonic()
                sent = [send(srv, schema, next(copies)) for _ in range(args.sends)]
                windows.append(("weighing", start, time.monotonic(), sent))
            stop.set()
        print(f"schema {args.schema.name}: {len(json.dumps(schema))} chars; stream {len(arrivals)} events; switch "
              f"interval {'5 (default)' if args.switch_ms is None else f'{args.switch_ms:g}'} ms; log {log}")
        for name, start, end, sent in windows:
            between = gaps(arrivals, start, end)
            held = [p for p in polls if start <= p.ended <= end]
            if len(between) < 2 or not held:  # the stream ended, or stalled through the window
                print(f"{name:9s} {end - start:5.2f} s: {len(between) + 1} events, {len(held)} polls: n/a")
                continue
            print(f"{name:9s} {end - start:5.2f} s: {len(between) + 1} events, gap max {max(between) * 1e3:.0f} ms, "
                  f"p99 {statistics.quantiles(between, n=100, method='inclusive')[98] * 1e3:.0f} ms, median "
                  f"{statistics.median(between) * 1e3:.1f} ms; /health held max "
                  f"{max(p.held for p in held) * 1e3:.0f} ms, poll max {max(p.seconds for p in held) * 1e3:.0f} ms"
                  + (f"; sends {[(status, round(s, 2)) for status, s in sent]}" if sent else "")
                  + (waited(srv.log(), start, end, args.gil_late_ms) if args.gil_late_ms is not None else ""))


if __name__ == "__main__":
    main()
