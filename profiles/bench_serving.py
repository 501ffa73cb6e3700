"""Serving benchmark: N concurrent streaming clients over HTTP, and the same load on the bare engine.

    python profiles/bench_serving.py [--model DIR | --shape {0.6b,tiny}] [--clients 1 8 32]
        [--max-tokens 128] [--prompt-words 64] [--device auto] [--dtype auto] [--out DIR]
        [--workloads uniform mixed] [--max-step-tokens 0 256] [--long-tokens 4096] [--streams 8]
        [--prefill-stall 1.0] [--ttft-clients 32] [--system-tokens 256]

For each N, N distinct prompts are submitted at once (greedy, ignore_eos, max_tokens each): first
straight to `Engine` in this process, then as streaming chat completions to `gunicorn -k gevent
server:app` on a loopback port. Reports time to first token and inter-token latency (p50/p99, per
content delta), output throughput, and the HTTP layer's overhead (engine throughput / server
throughput - 1). Without --model it builds a random checkpoint of Qwen3-0.6B's shape (cached
under .cache/). Prints a markdown table and writes bench_serving.{json,md}, the server's log and,
if matplotlib is installed, bench_serving.png into --out (default: the git-ignored profiles/out/).

The `mixed` workloads (profiles/serving_workloads.py) run through the server once per
--max-step-tokens value (0 = chunked prefill off) and --prefill-stall value, sampled with Qwen3's
defaults behind a shared system prompt: a --long-tokens prompt arriving into --streams running
streams (their ITL p50/p99, its TTFT), and TTFT with --ttft-clients concurrent clients.
bench_serving_mixed.{json,md} records the machine, command, settings and load average with the figures.

With --check-greedy it first starts the server in fp32 and asks it, through the `openai` client, for
a greedy completion with logprobs; its tokens must equal transformers' fp32 greedy tokens on the
same weights and prompt (exit 1 otherwise), written to greedy_check.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import serving_workloads  # noqa: E402
from common import command_line, machine_info, machine_line, sse_chunks, write_outputs  # noqa: E402
from nanoqwen.api.metrics import percentile  # noqa: E402
from nanoqwen.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from server_process import GunicornServer  # noqa: E402

FILLER = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a", "robot", "counts",
          "the", "stars"]


@dataclass
class Trace:
    """One client's request: when it was sent, when each content delta arrived, when it ended."""

    start: float
    deltas: list[float]
    completion_tokens: int
    end: float


@dataclass
class Row:
    path: str  # "engine" | "http"
    clients: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tokens_per_s: float
    overhead_pct: float | None = None  # http rows: engine throughput / http throughput - 1


def prompt(run: str, client: int, words: int) -> list[dict[str, str]]:
    text = " ".join(FILLER[i % len(FILLER)] for i in range(words))
    return [{"role": "user", "content": f"[{run} client {client}] {text}"}]


def summarize(path: str, clients: int, traces: list[Trace]) -> Row:
    ttft = [t.deltas[0] - t.start for t in traces if t.deltas]
    itl = [b - a for t in traces for a, b in zip(t.deltas, t.deltas[1:])]
    wall = max(t.end for t in traces) - min(t.start for t in traces)
    ms = 1000.0
    return Row(path, clients, percentile(ttft, 50) * ms, percentile(ttft, 99) * ms, percentile(itl, 50) * ms,
               percentile(itl, 99) * ms, sum(t.completion_tokens for t in traces) / wall)


def run_concurrently(clients: int, one: Callable[[int], Trace]) -> list[Trace]:
    traces: list[Trace | None] = [None] * clients
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        traces[i] = one(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return traces  # type: ignore[return-value]


def engine_client(engine: Engine, messages: list[dict[str, str]], max_tokens: int) -> Trace:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    # Tokenizing is part of the request in both paths: the server does it per request too.
    _, stream = engine.submit(engine.encode_messages(messages), params)
    deltas, tokens = [], 0
    for event in stream:
        if event.text or event.reasoning:  # what the server would send as a chunk
            deltas.append(time.perf_counter())
        if event.usage is not None:
            tokens = event.usage.completion_tokens
        if event.error is not None:
            raise RuntimeError(event.error)
    return Trace(start, deltas, tokens, time.perf_counter())


def http_client(url: str, messages: list[dict[str, str]], max_tokens: int) -> Trace:
    body = {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    deltas, tokens = [], 0
    for chunk in sse_chunks(f"{url}/v1/chat/completions", body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and (chunk["choices"][0]["delta"].get("content")
                                 or chunk["choices"][0]["delta"].get("reasoning_content")):
            deltas.append(time.perf_counter())
    return Trace(start, deltas, tokens, time.perf_counter())


def bench_engine(env: dict[str, str], client_counts: list[int], max_tokens: int, words: int) -> list[Row]:
    engine = Engine(EngineConfig.from_env(env))
    engine.start()
    while not engine.ready:
        if engine.load_error is not None:
            raise RuntimeError(engine.load_error)
        time.sleep(0.1)
    try:
        engine_client(engine, prompt("warmup", 0, words), 4)
        return [summarize("engine", n, run_concurrently(
            n, lambda i, n=n: engine_client(engine, prompt(f"n{n}", i, words), max_tokens))) for n in client_counts]
    finally:
        engine.shutdown()


def bench_http(env: dict[str, str], client_counts: list[int], max_tokens: int, words: int, log: Path) -> list[Row]:
    with GunicornServer(env, log) as server:
        http_client(server.url, prompt("warmup", 0, words), 4)
        return [summarize("http", n, run_concurrently(
            n, lambda i, n=n: http_client(server.url, prompt(f"n{n}", i, words), max_tokens))) for n in client_counts]


def check_greedy(env: dict[str, str], words: int, max_tokens: int, out: Path) -> bool:
    """The server's fp32 greedy tokens (openai client, logprobs bytes) against transformers' in fp32."""
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine_util import hf_greedy
    from nanoqwen.text import TokenBytes

    messages = prompt("greedy", 0, words)
    fp32 = {**env, "NANOQWEN_DTYPE": "float32"}
    with GunicornServer(fp32, out / "gunicorn-greedy.log") as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        reply = client.chat.completions.create(
            model="qwen3-0.6b", messages=messages, temperature=0, max_tokens=max_tokens, logprobs=True,
            extra_body={"ignore_eos": True},
        )
    served = [bytes(entry.bytes) for entry in reply.choices[0].logprobs.content]
    tokenizer = AutoTokenizer.from_pretrained(env["NANOQWEN_MODEL"])
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(env["NANOQWEN_MODEL"], dtype=torch.float32).to(device).eval()
    expected_ids = hf_greedy(hf, ids, max_tokens)
    del hf
    table = TokenBytes(tokenizer)
    expected = [table.bytes(i) for i in expected_ids]
    same = served == expected
    (out / "greedy_check.json").write_text(json.dumps(
        {"equal": same, "prompt_tokens": len(ids), "served": [b.hex() for b in served],
         "transformers": [b.hex() for b in expected], "transformers_ids": expected_ids}, indent=1))
    print(f"greedy through the server (fp32, openai client) {'equals' if same else 'DIFFERS FROM'} "
          f"transformers over {max_tokens} tokens")
    return same


def markdown(rows: list[Row]) -> str:
    lines = ["| clients | path | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | tok/s | HTTP overhead |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r.clients, r.path)):
        overhead = "" if r.overhead_pct is None else f"{r.overhead_pct:+.1f}%"
        lines.append(f"| {r.clients} | {r.path} | {r.ttft_p50_ms:.1f} | {r.ttft_p99_ms:.1f} | {r.itl_p50_ms:.1f} | "
                     f"{r.itl_p99_ms:.1f} | {r.tokens_per_s:.1f} | {overhead} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metrics = [("ttft_p50_ms", "TTFT p50 (ms)"), ("itl_p50_ms", "ITL p50 (ms)"), ("tokens_per_s", "output tok/s")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for ax, (key, label) in zip(axes, metrics):
        for name in ("engine", "http"):
            mine = sorted((r for r in rows if r.path == name), key=lambda r: r.clients)
            ax.plot([r.clients for r in mine], [getattr(r, key) for r in mine], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="checkpoint directory or Hub id (default: a random checkpoint, see --shape)")
    source.add_argument("--shape", choices=("0.6b", "tiny"), default="0.6b", help="random checkpoint to build")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=REPO / "profiles" / "out")
    parser.add_argument("--check-greedy", action="store_true",
                        help="first check the server's fp32 greedy tokens against transformers")
    parser.add_argument("--workloads", nargs="+", choices=("uniform", "mixed"), default=["uniform", "mixed"])
    defaults = serving_workloads.WorkloadSettings()
    parser.add_argument("--max-step-tokens", type=int, nargs="+", default=[0, 256],
                        help="step token budgets the mixed workloads compare (0 = chunked prefill off)")
    parser.add_argument("--prefill-stall", type=float, nargs="+", default=[1.0],
                        help="prefill stalls each nonzero budget runs with (0 = chunks not paced)")
    parser.add_argument("--long-tokens", type=int, default=defaults.long_tokens)
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--stream-tokens", type=int, default=defaults.stream_tokens)
    parser.add_argument("--ttft-clients", type=int, default=defaults.clients)
    parser.add_argument("--system-tokens", type=int, default=defaults.system_tokens)
    args = parser.parse_args()

    model = args.model
    if model is None:
        import torch

        from checkpoints import make_checkpoint, qwen3_0_6b_shape

        # The tiny model at 0.6B's context limit, so the mixed workloads' 4,096-token prompt fits.
        shape = qwen3_0_6b_shape() if args.shape == "0.6b" else {"max_position_embeddings": 40960}
        model = str(make_checkpoint(**shape, dtype=torch.bfloat16 if args.shape == "0.6b" else torch.float32))
    env = {"NANOQWEN_MODEL": model, "NANOQWEN_DEVICE": args.device, "NANOQWEN_DTYPE": args.dtype,
           "NANOQWEN_MAX_BATCH": str(max(args.clients)), "NANOQWEN_MAX_QUEUE": str(max(args.clients))}

    args.out.mkdir(parents=True, exist_ok=True)
    greedy_ok = not args.check_greedy or check_greedy(env, args.prompt_words, 16, args.out)
    if "uniform" in args.workloads:
        uniform(env, args, model)
    if "mixed" in args.workloads:
        mixed(env, args, model)
    if not greedy_ok:
        sys.exit("the server's greedy tokens differ from transformers': see greedy_check.json")


def uniform(env: dict[str, str], args: argparse.Namespace, model: str) -> None:
    gc.collect()
    rows = bench_engine(env, args.clients, args.max_tokens, args.prompt_words)
    gc.collect()  # the engine's model and KV pool go before the server loads its own
    http_rows = bench_http(env, args.clients, args.max_tokens, args.prompt_words, args.out / "gunicorn.log")
    engine_tput = {r.clients: r.tokens_per_s for r in rows}
    for r in http_rows:
        r.overhead_pct = (engine_tput[r.clients] / r.tokens_per_s - 1) * 100
    rows += http_rows

    table = markdown(rows)
    print(f"model {model} ({args.shape if args.model is None else 'given'}), {args.max_tokens} tokens per client\n")
    print(table)
    (args.out / "bench_serving.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    (args.out / "bench_serving.md").write_text(table + "\n")
    if plot(rows, args.out / "bench_serving.png"):
        print(f"\nplot: {args.out / 'bench_serving.png'}")


def mixed(env: dict[str, str], args: argparse.Namespace, model: str) -> None:
    import torch

    settings = serving_workloads.WorkloadSettings(
        system_tokens=args.system_tokens, stream_tokens=args.stream_tokens,
        streams=args.streams, long_tokens=args.long_tokens, clients=args.ttft_clients,
    )
    machine = machine_info(torch.device("cpu") if args.device in ("auto", "cpu") else torch.device(args.device))
    rows = serving_workloads.run_budgets(env, args.max_step_tokens, args.prefill_stall, settings, args.out)
    machine["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    server_env = {k: v for k, v in os.environ.items() if k.startswith("NANOQWEN_")}  # what the servers inherit
    header = (f"{machine_line(machine)}, {machine['load_avg_1m_end']} at the end\n`{command_line()}`\n"
              f"server environment {server_env or 'none'} "
              "(+ max_batch, max_queue, max_step_tokens, prefill_stall per row)\n"
              f"model {model} ({args.shape if args.model is None else 'given'}); "
              f"sampled {serving_workloads.QWEN_SAMPLING}; "
              f"settings {asdict(settings)}\n")
    table = header + "\n" + serving_workloads.markdown(rows, settings)
    print(table)
    data = {"machine": machine, "command": command_line(), "model": model, "server_env": server_env,
            "settings": asdict(settings), "rows": rows}
    write_outputs(args.out, "bench_serving_mixed", data, table)


if __name__ == "__main__":
    main()
