"""What a prefill chunk adds to a step: engine steps with `--streams` sequences decoding, then with a
`--long-tokens` prompt arriving (its chunks beside their decode rows), per step token budget.

    python profiles/bench_chunked_steps.py [--budgets 24 64 256] [--streams 8] [--long-tokens 4096]
        [--threads N] [--small] [--out DIR]

Each budget loads its own engine (0.6B shape, bf16; --small: the 2-layer test model), chunks not
paced by time (prefill_stall 0): every chunk fills the budget. Reports the
median wall time of decode-only steps and of steps carrying the newcomer's chunks, and their ratio:
the streams' ITL p99 / p50 while a long prompt prefills. Writes bench_chunked_steps.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
from nanoqwen.engine import Engine, EngineConfig, SamplingParams
from nanoqwen.settings import env_setting

QWEN_SAMPLING = SamplingParams(temperature=0.6, top_p=0.95, top_k=20, seed=1, max_tokens=1000, ignore_eos=True)


def step_times(engine: Engine, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def measure(args: argparse.Namespace, budget: int) -> dict:
    engine = Engine(EngineConfig(
        model=str(common.checkpoint(args.small)), device=args.device, dtype=args.dtype, kernels=args.kernels,
        max_batch=args.streams + 1, max_step_tokens=budget, prefill_stall=0.0, threads=args.threads,
        max_model_len=args.long_tokens + 64, num_kv_blocks=(args.long_tokens + 64 * (args.streams + 1)) // 16 + 2,
        cpu_isa=env_setting("cpu_isa") or EngineConfig.cpu_isa,  # as the server and common.load_engine take it
    ))
    engine.load()
    with torch.inference_mode():
        for i in range(args.streams):
            engine.submit(common.random_prompts(1, 24, seed=i)[0], QWEN_SAMPLING)
        engine.drain_inbox()
        while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
            engine.step()
        decode = step_times(engine, args.steps)
        engine.submit(common.random_prompts(1, args.long_tokens, seed=99)[0],
                      SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        engine.drain_inbox()
        mixed = step_times(engine, args.steps)
    d, m = statistics.median(decode) * 1000, statistics.median(mixed) * 1000
    return {"max_step_tokens": budget, "decode_ms": d, "mixed_ms": m, "ratio": m / d}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_engine_args(parser)
    parser.add_argument("--budgets", type=int, nargs="+", default=[24, 64, 256])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    info = common.machine_info(torch.device("cpu") if args.device in ("auto", "cpu") else torch.device(args.device))
    rows = []
    for budget in args.budgets:
        rows.append(measure(args, budget))
        common.release(torch.device("cpu"))
    table = common.markdown_table(
        ["max_step_tokens", f"decode step ({args.streams} streams) ms", "step with a chunk ms", "ratio"],
        [[str(r["max_step_tokens"]), f"{r['decode_ms']:.0f}", f"{r['mixed_ms']:.0f}", f"{r['ratio']:.2f}"]
         for r in rows],
    )
    text = f"{common.machine_line(info)}\n`{common.command_line()}`\n\n{table}"
    print(text)
    common.write_outputs(args.out, "bench_chunked_steps", {"machine": info, "command": common.command_line(),
                                                           "rows": rows}, text)


if __name__ == "__main__":
    main()
