"""Eager decode steps (graph none) of an odd number of rows, run as ModelRunner.step_rows decides (unpadded) and
padded to the next bucket as before, interleaved step by step; Qwen3-0.6B's shape on the CPU. Both sample the same
tokens (asserted).

    python profiles/bench_step_rows.py [--batches 3 33] [--quant none int8] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402
from nanoqwen.runner import batch_buckets  # noqa: E402


def bench(args: argparse.Namespace, quant: str, batch: int) -> dict:
    engine = common.load_engine(common.checkpoint(args.small), device="cpu", dtype="auto", graph="none",
                                kernels="auto", max_batch=args.max_batch, max_model_len=args.context + 64, quant=quant)
    runner = engine.runner
    times: dict[str, list[float]] = {"padded": [], "unpadded": []}
    with torch.inference_mode():
        seqs = common.prefilled(engine, common.random_prompts(batch, args.context, seed=1),
                                SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), 0)
        padded = next(b for b in batch_buckets(args.max_batch) if b >= batch)
        for _ in range(args.reps):  # the runner alone: the sequences' state never moves
            tokens = []
            for name, rows in (("padded", padded), ("unpadded", batch)):
                start = time.perf_counter()
                tokens.append(runner.decode(seqs, rows).tokens)
                times[name].append(time.perf_counter() - start)
            assert tokens[0] == tokens[1], "padding changed the tokens"
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return {"quant": quant, "batch": batch, "padded_to": padded, **{f"{k}_ms": round(v, 1) for k, v in ms.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", nargs="+", default=["none", "int8"])
    parser.add_argument("--batches", nargs="+", type=int, default=[3, 33])
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--context", type=int, default=64, help="each sequence's tokens before the steps")
    parser.add_argument("--small", action="store_true", help="the 2-layer test model")
    args = parser.parse_args()
    for quant in args.quant:
        for batch in args.batches:
            print(bench(args, quant, batch), flush=True)


if __name__ == "__main__":
    main()
