"""Prefill throughput (time to first token) per weight format, and transformers' forward of the same prompts.

    python profiles/bench_prefill.py [--quant none int8 int4] [--prompt-len 128 512 2048] [--repeats 3]
        [--threads 2] [--clock wall|cpu] [--dtype bfloat16] [--hf | --no-hf] [--ops N] [--small] [--out DIR]

Weights: the random checkpoint of Qwen3-0.6B's shape in bf16 (common.checkpoint). For each format, one engine
(graph none, kernels auto, max_batch 1, whole prompts in one step) runs `--repeats` distinct random prompts of
each length; a prompt's time is its submit plus the one step that prefills it and yields the first token.
Tokens/s = prompt length / the fastest repeat (the least disturbed on a shared machine); the JSON keeps every
time. transformers: one forward of each prompt, in the same dtype, after the engines. --clock cpu times the
process's CPU seconds instead of wall seconds: with --threads 1 that is the work alone, which a shared machine's
other processes barely disturb (with more threads it counts their waiting spins too). --ops N profiles one more
prompt per format and length (torch.profiler) and lists its N ops of most self CPU time with their shares.
Writes bench_prefill.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.choices import QUANTS  # noqa: E402
from nanoqwen.engine import Engine, SamplingParams  # noqa: E402


def op_shares(prefill: Callable[[], None], top: int) -> dict[str, float]:
    """The `top` ops by self CPU time over one prefill (C kernels by their nanoqwen:: ranges), as shares of all."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        prefill()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return {e.key: e.self_cpu_time_total / total for e in events[:top]}


def prefill(engine: Engine, prompt: list[int]) -> None:
    """Submits one prompt and runs the step that prefills it and samples its first token."""
    engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0))
    with torch.inference_mode():
        engine.drain_inbox()
        engine.step()


def engine_times(model: Path, quant: str, dtype: str, lengths: list[int], repeats: int, threads: int,
                 clock: Callable[[], float], ops: int) -> tuple[dict[int, list[float]], dict[int, dict[str, float]]]:
    """Seconds per prompt of each length, and with `ops` the top ops' shares of one more prompt's prefill."""
    # threads: the engine's own (loading sets torch's to it: without it --threads 1 ran on every core)
    engine = common.load_engine(model, device="cpu", dtype=dtype, graph="none", kernels="auto", max_batch=1,
                                max_model_len=max(lengths) + 8, quant=quant, threads=threads)
    times, shares = {}, {}
    for length in lengths:
        times[length] = []
        *prompts, extra = common.random_prompts(repeats + 1, length, seed=length)
        for prompt in prompts:
            start = clock()
            prefill(engine, prompt)
            times[length].append(clock() - start)
        if ops:
            shares[length] = op_shares(functools.partial(prefill, engine, extra), ops)
    del engine
    common.release(torch.device("cpu"))
    return times, shares


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
    parser.add_argument("--ops", type=int, default=0, metavar="N",
                        help="also profile one more prompt per format and length: its N ops of most self CPU time")
    parser.add_argument("--small", action="store_true", help="the 2-layer test model: a quick smoke run")
    parser.add_argument("--out", type=Path, default=common.OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = common.machine_info(torch.device("cpu"))
    model = common.checkpoint(args.small)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    runs, shares = {}, {}
    for quant in args.quant:
        runs[quant], shares[quant] = engine_times(model, quant, args.dtype, args.prompt_len, args.repeats,
                                                  args.threads, clock, args.ops)
    if args.hf:
        runs["transformers"] = hf_times(model, args.dtype, args.prompt_len, args.repeats, clock)
    rows = [[name, *(f"{length / min(times[length]):.0f}" for length in args.prompt_len)]
            for name, times in runs.items()]
    markdown = "\n".join([
        f"Prefill tokens/s ({args.dtype}, best of {args.repeats}, {args.clock} clock): {common.machine_line(info)}",
        f"`{common.command_line()}`", "",
        common.markdown_table(["weights", *(f"{length} tokens" for length in args.prompt_len)], rows),
        *(["", f"Share of self CPU time, top {args.ops} ops (one more prompt, profiled):", ""] if args.ops else []),
        *(f"- {quant}, {length} tokens: " + ", ".join(f"{op} {share:.0%}" for op, share in top.items())
          for quant, by_length in shares.items() for length, top in by_length.items())])
    print(markdown)
    common.write_outputs(args.out, "bench_prefill", {"machine": info, "args": vars(args) | {"out": str(args.out)},
                                                     "seconds": runs, "op_shares": shares}, markdown)


if __name__ == "__main__":
    main()
