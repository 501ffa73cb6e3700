"""A flood of distinct grammars beside greedy streams on a real `gunicorn -k gevent server:app`, clients leaving.

    python profiles/flood_grammars.py [--seconds 180] [--sync-clients 15] [--async-clients 15] [--seed 0] [--out DIR]

Serves the 2-layer test checkpoint on the CPU in fp32 with profiles/gil_watch_conf.py's collector watch. Sync clients
(threads, the openai client) send strict json_schema, forced strict tools and Responses text.format requests, each
with a schema no other request has (every one compiles): big and small objects, anyOfs of `$ref` chains, optional hop
cycles, 5,000-hop chains, and ones the server refuses with a 400 (a lookahead pattern, a chain past the parser row);
a quarter of them leave after 0.3 s, mid-compile. Async clients (asyncio, AsyncOpenAI) stream greedy answers to
fixed prompts, strict json_schema chat answers and Responses text.format ones, a third of them closing the stream
after a few chunks, and now and then leave a forced strict tool call after 0.4 s. /health is polled throughout from
a process of its own.

Violations (exit status 1): a 5xx or an error other than 400/503, an answer that ended "stop" invalid against its
schema, a full greedy stream other than the idle server's answer to its prompt, a second worker, after the flood
(and SETTLE_S) the collector's thresholds not those before it or /stats not drained. Prints and writes
flood_grammars.json to --out (default profiles/out/): counts, /health's latency, the worker's RSS before, at its
peak and after, and its count of full collections (from its `gc_watch:` lines).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import re
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import openai

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "profiles")]

from chat_http import MODEL, cpu_env, health_polled  # noqa: E402
from checkpoints import make_checkpoint  # noqa: E402
from gil_watch_conf import GC_WATCH_ENV, GC_WATCH_LINE  # noqa: E402
from schema_shapes import HOP_CYCLE, closed_object, hop_chain, options_with_chains, ref_chain  # noqa: E402
from server_process import GunicornServer  # noqa: E402

WATCH_S = 2.0
SETTLE_S = 15.0  # after the clients stop: the jobs of those that left end, the watch prints the thresholds
PROMPTS = 4  # the greedy streams' prompts
NEW_TOKENS = 48


def schema(i: int) -> dict[str, Any]:
    """The i-th request's schema: its property names carry i, so that no two requests share a grammar."""
    kinds = [
        lambda: closed_object({f"p{i}_{j}": {"type": ["integer", "string", "boolean"][j % 3]} for j in range(60)}),
        lambda: closed_object({f"a{i}": {"type": "integer"}, "b": {"enum": ["x", f"y{i}"]}}),
        lambda: closed_object({f"r{i}": {"type": "string", "pattern": "(?=a)b"}}),  # a 400
        lambda: {**closed_object({"n": {"type": "integer"}}), "properties": {"n": {"type": "integer"},
                                                                             f"c{i}": {"$ref": "#/$defs/a"}},
                 "$defs": HOP_CYCLE},
        lambda: {**closed_object({f"h{i}": {"$ref": "#/$defs/h0"}}), "$defs": hop_chain(5000)},
        lambda: closed_object({f"n{i}": {"type": "array", "items": closed_object({"v": {"type": "number"}}),
                                         "maxItems": 3}}),
        lambda: closed_object({f"z{i}": ref_chain(3000)}),  # a 400: past the parser row
        lambda: closed_object({f"o{i}": options_with_chains(40, 12)}),
    ]
    return kinds[i % len(kinds)]()


class Flood:
    def __init__(self, url: str, deadline: float, solo: list[str]) -> None:
        self.url, self.deadline, self.solo = url, deadline, solo
        self.numbers = itertools.count()
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self._lock = threading.Lock()

    def note(self, what: str, problem: str | None = None) -> None:
        with self._lock:
            self.counts[what] += 1
            if problem is not None:
                self.problems.append(problem[:300])

    def check(self, content: str, sch: dict[str, Any]) -> None:
        if "h0" in sch.get("$defs", {}):  # a hop chain's integer: jsonschema's resolver recurses once a hop
            sch = closed_object({key: {"type": "integer"} for key in sch["properties"]})
        try:
            jsonschema.validate(json.loads(content), sch)
            self.note("valid")
        except (ValueError, jsonschema.ValidationError) as exc:
            self.note("invalid", f"invalid answer {content[:80]!r}: {exc}")

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError)):
            self.note("left mid-compile")
        elif isinstance(exc, openai.APIStatusError) and exc.status_code in (400, 503):
            self.note(str(exc.status_code))
        else:
            self.note("error", f"{type(exc).__name__}: {exc}")

    def sync_client(self, seed: int) -> None:
        rnd = random.Random(seed)
        waits = {False: openai.OpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0, timeout=120),
                 True: openai.OpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0, timeout=0.3)}
        while time.time() < self.deadline:
            i = next(self.numbers)
            sch, endpoint, leaves = schema(i), rnd.randrange(3), rnd.random() < 0.25
            client, messages = waits[leaves], [{"role": "user", "content": f"q{i}"}]
            try:
                if endpoint == 0:
                    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": sch, "strict": True}}
                    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW_TOKENS,
                                                         response_format=fmt).choices[0]
                    answers = [out.message.content] if out.finish_reason == "stop" else []
                elif endpoint == 1:
                    tool = {"type": "function", "function": {"name": f"f{i}", "parameters": sch, "strict": True}}
                    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=NEW_TOKENS,
                                                         tools=[tool], tool_choice="required").choices[0]
                    done = out.finish_reason in ("stop", "tool_calls")
                    answers = [call.function.arguments for call in out.message.tool_calls or []] if done else []
                else:
                    fmt = {"type": "json_schema", "name": "s", "schema": sch, "strict": True}
                    response = client.responses.create(model=MODEL, input=f"q{i}", max_output_tokens=NEW_TOKENS,
                                                       text={"format": fmt})
                    answers = [response.output_text] if response.status == "completed" else []
                self.note("200")
                for answer in answers:
                    self.check(answer, sch)
            except Exception as exc:  # noqa: BLE001 (each kind counted, the unexpected listed)
                self.failed(exc)

    async def async_client(self, seed: int) -> None:
        rnd = random.Random(seed)
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="-", max_retries=0, timeout=120)
        while time.time() < self.deadline:
            i = next(self.numbers)
            sch, cut, pick = schema(i), rnd.random() < 1 / 3, rnd.random()
            try:
                if pick < 0.15:
                    tool = {"type": "function", "function": {"name": f"f{i}", "parameters": sch, "strict": True}}
                    await asyncio.wait_for(client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=NEW_TOKENS,
                        tools=[tool], tool_choice="required"), 0.4)
                    self.note("200")
                elif pick < 0.55:
                    prompt = rnd.randrange(PROMPTS)
                    text, finish = await self._streamed(client, cut, messages=[{"role": "user",
                                                                                  "content": f"prompt {prompt}"}],
                                                        temperature=0)
                    if finish is not None and text != self.solo[prompt]:
                        self.note("stream differs", f"prompt {prompt}: {text!r} != {self.solo[prompt]!r}")
                    elif finish is not None:
                        self.note("stream as solo")
                elif pick < 0.775:
                    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": sch, "strict": True}}
                    text, finish = await self._streamed(client, cut, messages=[{"role": "user", "content": f"q{i}"}],
                                                        response_format=fmt)
                    if finish == "stop":
                        self.check(text, sch)
                else:
                    text, status = await self._response_streamed(client, cut, i, sch)
                    if status == "completed":
                        self.check(text, sch)
            except Exception as exc:  # noqa: BLE001
                self.failed(exc)

    async def _streamed(self, client: openai.AsyncOpenAI, cut: bool, **body: Any) -> tuple[str, str | None]:
        """A streamed chat answer's text and finish reason; (text so far, None) where `cut`: closed after a few
        chunks."""
        stream = await client.chat.completions.create(model=MODEL, max_tokens=NEW_TOKENS, stream=True, **body)
        return await self._read(stream, cut, _chat_piece)

    async def _response_streamed(self, client: openai.AsyncOpenAI, cut: bool, i: int,
                                 sch: dict[str, Any]) -> tuple[str, str | None]:
        """A streamed Responses answer's text and final status, as _streamed's."""
        fmt = {"type": "json_schema", "name": "s", "schema": sch, "strict": True}
        stream = await client.responses.create(model=MODEL, input=f"q{i}", max_output_tokens=NEW_TOKENS,
                                               text={"format": fmt}, stream=True)
        return await self._read(stream, cut, _response_piece)

    async def _read(self, stream: Any, cut: bool, read: Callable[[Any], tuple[str, str | None]]
                    ) -> tuple[str, str | None]:
        """The text and the last end `read` finds in the stream's items; (text so far, None) where `cut`."""
        parts, end, n = [], None, 0
        async for item in stream:
            text, ended = read(item)
            parts.append(text)
            end, n = ended or end, n + 1
            if cut and n == 3:
                await stream.close()
                self.note("left mid-stream")
                return "".join(parts), None
        self.note("200")
        return "".join(parts), end


def _chat_piece(chunk: Any) -> tuple[str, str | None]:
    """A chat chunk's text and finish reason."""
    if not chunk.choices:
        return "", None
    return chunk.choices[0].delta.content or "", chunk.choices[0].finish_reason


def _response_piece(event: Any) -> tuple[str, str | None]:
    """A Responses event's text and, at its end, the response's status."""
    if event.type == "response.output_text.delta":
        return event.delta, None
    if event.type in ("response.completed", "response.incomplete", "response.failed"):
        return "", event.response.status
    return "", None


def watched(log: str) -> list[dict[str, Any]]:
    """The worker's gc_watch lines: seconds, RSS, thresholds, counts, full collections."""
    rows = []
    for line in log.splitlines():
        if m := re.match(rf"{GC_WATCH_LINE}(\S+) rss_mb=(\d+) threshold=(\S+) count=(\S+) full=(\d+)", line):
            rows.append({"t": float(m[1]), "rss_mb": int(m[2]), "threshold": m[3], "count": m[4], "full": int(m[5])})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--sync-clients", type=int, default=15)
    parser.add_argument("--async-clients", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "profiles" / "out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = cpu_env(make_checkpoint(), **{GC_WATCH_ENV: str(WATCH_S)})
    config = ["-c", str(REPO / "profiles" / "gil_watch_conf.py")]
    with GunicornServer(env, args.out / "flood_grammars.log", args=config) as srv:
        client = srv.openai_client()
        solo = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"prompt {p}"}],
                                               max_tokens=NEW_TOKENS, temperature=0).choices[0].message.content or ""
                for p in range(PROMPTS)]
        time.sleep(WATCH_S * 2)
        before = watched(srv.log())[-1]
        flood = Flood(srv.url, time.time() + args.seconds, solo)
        with health_polled(srv, 0.5) as polls:
            threads = [threading.Thread(target=flood.sync_client, args=(args.seed + k,))
                       for k in range(args.sync_clients)]
            for thread in threads:
                thread.start()

            async def streams() -> None:
                await asyncio.gather(*(flood.async_client(args.seed + 1000 + k) for k in range(args.async_clients)))
            asyncio.run(streams())
            for thread in threads:
                thread.join()
        time.sleep(SETTLE_S)
        with urllib.request.urlopen(f"{srv.url}/stats") as answer:
            stats = json.load(answer)
        log = srv.log()
    rows = watched(log)
    after = rows[-1]
    seconds = sorted(p.seconds for p in polls)
    result = {
        "counts": dict(flood.counts), "problems": flood.problems[:20], "workers_booted": log.count("Booting worker"),
        "health_s": {"n": len(seconds), "median": seconds[len(seconds) // 2], "max": seconds[-1]},
        "threshold_before": before["threshold"], "threshold_after": after["threshold"],
        "rss_mb": {"before": before["rss_mb"], "peak": max(r["rss_mb"] for r in rows), "after": after["rss_mb"]},
        "full_collections": after["full"] - before["full"], "flood_s": args.seconds,
        "drained": {k: stats[k] for k in ("queue_length", "active_requests", "kv_cache_usage")},
    }
    problems = list(flood.problems)
    problems += [] if result["workers_booted"] == 1 else ["the worker restarted"]
    problems += [] if after["threshold"] == before["threshold"] else ["the collector's thresholds did not come back"]
    problems += [] if not any(result["drained"].values()) else [f"not drained: {result['drained']}"]
    (args.out / "flood_grammars.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
