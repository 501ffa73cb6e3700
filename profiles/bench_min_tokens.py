"""What min_tokens costs a decode step: one batch whose rows are switched between "min_tokens not reached"
(every row's EOS ids banned: the step resamples with the ban) and "no min_tokens" on alternate steps, so
both see the same contexts and the same machine load.

    python profiles/bench_min_tokens.py [--batch 8] [--steps 40] [--threads N] [--device auto] [--small] [--out DIR]

Whole engine decode steps (`Engine.step()`) on the random 0.6B-shaped bf16 checkpoint (--small: the
2-layer test model), every row sampled with Qwen3's defaults; ms = the median step of each kind.
Writes bench_min_tokens.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402

QWEN = SamplingParams(temperature=0.7, top_p=0.95, top_k=20, ignore_eos=True, seed=1)


def main() -> None:
    def extra_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--steps", type=int, default=40, help="timed decode steps (half of each kind)")

    args, info, engine = common.batch_bench_setup(__doc__, extra_args)
    new_tokens = args.steps + 4
    params = [dataclasses.replace(QWEN, max_tokens=new_tokens) for _ in range(args.batch)]
    for prompt, p in zip(common.random_prompts(args.batch, 16, seed=0), params):
        engine.submit(prompt, p, split_reasoning=False)
    steps: dict[str, list[float]] = {"no min_tokens": [], "min_tokens not reached": []}
    with torch.inference_mode():
        engine.drain_inbox()
        for i in range(new_tokens - 1):  # the prefill, two warm-up steps, then the timed ones alternate
            kind = list(steps)[i % 2]
            for p in params:  # read by the runner each step: switches the ban on or off for the next step
                p.min_tokens = new_tokens if kind == "min_tokens not reached" else 0
            seconds = common.timed_step(engine)
            if i >= 3:
                steps[kind].append(seconds)
    if len(engine.scheduler.running) != args.batch:
        raise RuntimeError("a row finished early or was preempted")
    base = statistics.median(steps["no min_tokens"]) * 1000
    rows = [{"case": kind, "step_ms": statistics.median(s) * 1000, "ratio": statistics.median(s) * 1000 / base,
             "steps": len(s)} for kind, s in steps.items()]
    result = {"machine": info, "batch": args.batch, "cases": rows}
    table = common.markdown_table(
        [f"batch-{args.batch} decode step", "median ms", "ratio", "steps"],
        [[r["case"], f"{r['step_ms']:.1f}", f"{r['ratio']:.3f}", str(r["steps"])] for r in rows])
    print(table)
    common.write_outputs(args.out, "bench_min_tokens", result, common.machine_line(info) + "\n\n" + table)


if __name__ == "__main__":
    main()
