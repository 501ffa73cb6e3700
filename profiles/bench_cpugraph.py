"""The CPU graph's saving per decode step: eager against replayed, interleaved in one engine.

    python profiles/bench_cpugraph.py [--dtype bfloat16] [--quant none int8 int4] [--batches 1 8]
        [--repeats 20] [--prompt-len 32] [--small]

One engine per weight format (NANOQWEN_GRAPH=cpugraph) prefills --batch random prompts, then runs the
model part of the decode step (embedding to fp32 logits; sampling excluded, it is the same in both)
over the staged inputs --repeats times each way, alternating: eagerly (`ModelRunner._decode_logits`:
Python, torch allocations and views around the C calls) and as the recorded calls replayed
(`GraphRunner.run`'s replay). Alternating gives both the same machine load; medians are reported, and
the replayed logits are checked equal to the eager ones.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402


def bench(quant: str, batch: int, args: argparse.Namespace) -> dict:
    engine = common.load_engine(common.checkpoint(args.small), device="cpu", dtype=args.dtype, graph="cpugraph",
                                kernels="auto", max_batch=batch, max_model_len=args.prompt_len + 8, quant=quant)
    runner = engine.runner
    for prompt in common.random_prompts(batch, args.prompt_len, seed=0):
        engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine._drain_inbox()
    with torch.inference_mode():
        engine.step()  # prefill
        engine.step()  # a decode step: the block of the token staged below is allocated
    seqs = engine.scheduler.running
    runner.inputs.stage_decode(seqs, batch)
    runner.inputs.upload_decode(batch)
    recording, replayed, inputs = runner.graphs._cpu_graphs[batch]
    times: dict[str, list[float]] = {"eager": [], "replay": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            eager = runner._decode_logits(inputs)
            times["eager"].append(time.perf_counter() - start)
            start = time.perf_counter()
            recording.replay()
            times["replay"].append(time.perf_counter() - start)
    assert torch.equal(eager, replayed), "the replay's logits differ from the eager step's"
    eager_ms, replay_ms = (1000 * statistics.median(times[k]) for k in ("eager", "replay"))
    return {"quant": quant, "batch": batch, "calls": len(recording.calls), "eager_ms": eager_ms,
            "replay_ms": replay_ms, "saved_ms": eager_ms - replay_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quant", nargs="+", default=["none", "int8", "int4"], choices=["none", "int8", "int4"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--small", action="store_true", help="the 2-layer test checkpoint")
    args = parser.parse_args()
    print(f"{common.machine_line(common.machine_info(torch.device('cpu')))}\n`{common.command_line()}`", flush=True)
    print("| dtype | quant | batch | C calls | eager ms | replayed ms | saved ms/step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for quant in args.quant:
        for batch in args.batches:
            r = bench(quant, batch, args)
            print(f"| {args.dtype} | {quant} | {batch} | {r['calls']} | {r['eager_ms']:.1f} | {r['replay_ms']:.1f} "
                  f"| {r['saved_ms']:.1f} |", flush=True)
            common.release(torch.device("cpu"))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
