"""Prefill throughput (time to first token) per weight format, and transformers' forward of the same prompts.

    python profiles/bench_prefill.py [--quant none int8 int4] [--prompt-len 128 512 2048] [--repeats 3]
        [--threads 2] [--clock wall|cpu] [--dtype bfloat16] [--hf | --no-hf] [--small] [--out DIR]

Weights: the random checkpoint of Qwen3-0.6B's shape in bf16 (common.checkpoint). For each format, one engine
(graph none, kernels auto, max_batch 1, whole prompts in one step) runs `--repeats` distinct random prompts of
each length; a prompt's time is its submit plus the one step that prefills it and yields the first token.
Tokens/s = prompt length / the fastest repeat (the least disturbed on a shared machine); the JSON keeps every
time. transformers: one forward of each prompt, in the same dtype, after the engines. --clock cpu times the
process's CPU seconds instead of wall seconds: with --threads 1 that is the work alone, which a shared machine's
other processes barely disturb (with more threads it counts their waiting spins too).
Writes bench_prefill.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.choices import QUANTS  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402


def engine_times(model: Path, quant: str, dtype: str, lengths: list[int], repeats: int,
                 clock: Callable[[], float]) -> dict[int, list[float]]:
    engine = common.load_engine(model, device="cpu", dtype=dtype, graph="none", kernels="auto", max_batch=1,
                                max_model_len=max(lengths) + 8, quant=quant)
    times = {}
    for length in lengths:
        times[length] = []
        for prompt in common.random_prompts(repeats, length, seed=length):
            start = clock()
            engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0))
            with torch.inference_mode():
                engine.drain_inbox()
                engine.step()
            times[length].append(clock() - start)
    del engine
    common.release(torch.device("cpu"))
    return times


def hf_times(model: Path, dtype: str, lengths: list[int], repeats: int,
             clock: Callable[[], float]) -> dict[int, list[float]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    times = {}
    with torch.inference_mode():
        for length in lengths:
            times[length] = []
            for prompt in common.random_prompts(repeats, length, seed=length):
                start = clock()
                hf(torch.tensor([prompt]))
                times[length].append(clock() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", nargs="+", default=list(QUANTS), choices=QUANTS)
    parser.add_argument("--prompt-len", nargs="+", type=int, default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--small", action="store_true", help="the 2-layer test model: a quick smoke run")
    parser.add_argument("--out", type=Path, default=common.OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = common.machine_info(torch.device("cpu"))
    model = common.checkpoint(args.small)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runs = {quant: engine_times(model, quant, args.dtype, args.prompt_len, args.repeats, clock) for quant in args.quant}
    if args.hf:
        runs["transformers"] = hf_times(model, args.dtype, args.prompt_len, args.repeats, clock)
    rows = [[name, *(f"{length / min(times[length]):.0f}" for length in args.prompt_len)]
            for name, times in runs.items()]
    markdown = "\n".join([
        f"Prefill tokens/s ({args.dtype}, best of {args.repeats}, {args.clock} clock): {common.machine_line(info)}",
        f"`{common.command_line()}`", "",
        common.markdown_table(["weights", *(f"{length} tokens" for length in args.prompt_len)], rows)])
    print(markdown)
    common.write_outputs(args.out, "bench_prefill", {"machine": info, "args": vars(args) | {"out": str(args.out)},
                                                     "seconds": runs}, markdown)


if __name__ == "__main__":
    main()
