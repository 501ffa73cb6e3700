"""bench_serving.py's mixed workloads, through the real server, per step token budget.

- long: `streams` streaming clients decode (sampled with Qwen's defaults, a shared system prompt);
  once each has its first tokens, a `long_tokens`-token prompt arrives. Reports the streams'
  inter-token latency p50/p99/max (per token, over their whole streams) and the newcomer's time
  to first token.
- ttft: `clients` streaming clients at once, each the shared system prompt + its own question.
  Reports TTFT p50/p99 and output tokens/s.

Prompts are token ids sent to /v1/completions, so their lengths are exact on any tokenizer.
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import sse_chunks
from nanoqwen.api.metrics import percentile
from server_process import GunicornServer

QWEN_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}  # Qwen3's generation_config.json


@dataclass
class WorkloadSettings:
    system_tokens: int = 256  # shared system prompt before every prompt
    question_tokens: int = 64  # each client's own part
    stream_tokens: int = 96  # tokens each running stream generates (long)
    streams: int = 8
    long_tokens: int = 4096
    clients: int = 32  # ttft
    ttft_tokens: int = 16  # tokens each ttft client generates


@dataclass
class Stream:
    start: float
    deltas: list[float]
    tokens: int


def token_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 100_000) for _ in range(n)]


def stream_completion(url: str, prompt: list[int], max_tokens: int, seed: int,
                      on_delta: Callable[[int], None] = lambda n: None) -> Stream:
    # logprobs: every token gets its own chunk (a token without text of its own otherwise has none), so
    # the deltas are per token.
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "seed": seed, "stream": True,
            "logprobs": 0, "stream_options": {"include_usage": True}, **QWEN_SAMPLING}
    start = time.perf_counter()
    deltas, tokens = [], 0
    for chunk in sse_chunks(f"{url}/v1/completions", body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0].get("logprobs"):
            deltas.append(time.perf_counter())
            on_delta(len(deltas))
    return Stream(start, deltas, tokens)


def in_threads(calls: list[Callable[[], Stream]]) -> tuple[list[threading.Thread], list[Stream | None]]:
    results: list[Stream | None] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    return threads, results


def long_prompt_into_streams(url: str, s: WorkloadSettings) -> dict:
    system = token_ids(0, s.system_tokens)
    started = threading.Semaphore(0)

    def on_delta(n: int) -> None:
        if n == 4:  # past its prefill, decoding
            started.release()

    threads, streams = in_threads([
        lambda i=i: stream_completion(url, system + token_ids(100 + i, s.question_tokens), s.stream_tokens, i, on_delta)
        for i in range(s.streams)
    ])
    for _ in range(s.streams):
        started.acquire()
    newcomer = stream_completion(url, token_ids(999, s.long_tokens), 4, 999)
    for t in threads:
        t.join()
    itl = [b - a for st in streams for a, b in zip(st.deltas, st.deltas[1:])]
    ms = 1000.0
    return {"streams_itl_p50_ms": percentile(itl, 50) * ms, "streams_itl_p99_ms": percentile(itl, 99) * ms,
            "streams_itl_max_ms": max(itl) * ms, "newcomer_ttft_ms": (newcomer.deltas[0] - newcomer.start) * ms}


def concurrent_ttft(url: str, s: WorkloadSettings) -> dict:
    system = token_ids(0, s.system_tokens)
    barrier = threading.Barrier(s.clients)

    def client(i: int) -> Stream:
        barrier.wait()
        return stream_completion(url, system + token_ids(500 + i, s.question_tokens), s.ttft_tokens, i)

    threads, streams = in_threads([lambda i=i: client(i) for i in range(s.clients)])
    for t in threads:
        t.join()
    ttft = [st.deltas[0] - st.start for st in streams]
    wall = max(st.deltas[-1] for st in streams) - min(st.start for st in streams)
    ms = 1000.0
    return {"ttft_p50_ms": percentile(ttft, 50) * ms, "ttft_p99_ms": percentile(ttft, 99) * ms,
            "tokens_per_s": sum(st.tokens for st in streams) / wall}


def run_budgets(env: dict[str, str], budgets: list[int], stalls: list[float], s: WorkloadSettings,
                out: Path) -> list[dict]:
    """A server per budget (0 = chunking off) and, chunking on, per prefill stall, in turn: a warm-up
    request, then both workloads."""
    rows = []
    for budget, stall in [(b, st) for b in budgets for st in (stalls if b else [0.0])]:
        budget_env = {**env, "NANOQWEN_MAX_STEP_TOKENS": str(budget), "NANOQWEN_PREFILL_STALL": str(stall),
                      "NANOQWEN_MAX_BATCH": str(max(s.clients, s.streams + 1)),
                      "NANOQWEN_MAX_QUEUE": str(max(s.clients, s.streams + 1))}
        with GunicornServer(budget_env, out / f"gunicorn-budget{budget}-stall{stall:g}.log") as server:
            stream_completion(server.url, token_ids(7, s.system_tokens + s.question_tokens), 4, 7)
            rows.append({"max_step_tokens": budget, "prefill_stall": stall, **long_prompt_into_streams(server.url, s),
                         **concurrent_ttft(server.url, s)})
    return rows


def markdown(rows: list[dict], s: WorkloadSettings) -> str:
    lines = [f"| max_step_tokens | prefill_stall | streams' ITL p50 ms | ITL p99 ms | p99/p50 | ITL max ms | "
             f"{s.long_tokens}-token newcomer TTFT ms | TTFT p50 ms ({s.clients} clients) | TTFT p99 ms | tok/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        stall = f"{r['prefill_stall']:g}" if r["max_step_tokens"] else "–"
        lines.append(
            f"| {r['max_step_tokens'] or 'off'} | {stall} | {r['streams_itl_p50_ms']:.1f} | "
            f"{r['streams_itl_p99_ms']:.1f} | "
            f"{r['streams_itl_p99_ms'] / r['streams_itl_p50_ms']:.2f} | {r['streams_itl_max_ms']:.1f} | "
            f"{r['newcomer_ttft_ms']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
            f"{r['tokens_per_s']:.1f} |")
    return "\n".join(lines)
