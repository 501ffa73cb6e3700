"""What scoring the prompt (`echo` with `logprobs`, `SamplingParams.prompt_logprobs`) adds to a prefill.

    python profiles/bench_prompt_logprobs.py [--tokens 256 1024] [--repeats 3] [--threads N] [--small] [--out DIR]

One engine request of --tokens prompt tokens and one answer token, in three modes: `off` (no
prompt logprobs), `sliced` (the engine's: logits SLICE positions at a time) and `whole` (SLICE
raised past the prompt: all [tokens, 151936] fp32 logits at once, what slicing avoids). Each
--tokens runs in a fresh process with the modes interleaved, repeat by repeat, on distinct prompts
(no prefix-cache hits): seconds = the median per mode, `vs off` = its ratio to off's in the same
process. Peak = the largest growth of the resident set over a request, sampled every 2 ms from
another thread. Writes bench_prompt_logprobs.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402
from nanoqwen.runner import prompt_logprobs  # noqa: E402

MODES = ("off", "sliced", "whole")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def request(engine, prompt: list[int], params: SamplingParams) -> tuple[float, float]:
    """One request through the engine's real steps, in this thread -> (seconds, peak MiB over its start)."""
    base, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], resident_bytes() - base)

    sampler = threading.Thread(target=sample)
    sampler.start()
    engine.submit(prompt, params)
    start = time.perf_counter()
    with torch.inference_mode():
        engine.drain_inbox()
        while engine.scheduler.has_work:
            engine.step()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return seconds, peak[0] / 2**20


def one_case(tokens: int, repeats: int, small: bool) -> list[dict]:
    engine = common.load_engine(common.checkpoint(small), device="cpu", dtype="auto", graph="none", kernels="auto",
                                max_batch=1, max_model_len=tokens + 16)
    sliced = prompt_logprobs.SLICE
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    prompts = iter(common.random_prompts(repeats * len(MODES) + 1, tokens, seed=tokens))
    request(engine, next(prompts)[:32], SamplingParams(temperature=0.0, max_tokens=1))  # warm-up
    for _ in range(repeats):
        for mode in MODES:
            prompt_logprobs.SLICE = tokens if mode == "whole" else sliced
            params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=None if mode == "off" else 1)
            runs[mode].append(request(engine, next(prompts), params))
    return [{"tokens": tokens, "mode": mode, "seconds": statistics.median(s for s, _ in runs[mode]),
             "peak_mib": max(p for _, p in runs[mode])} for mode in MODES]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--small", action="store_true", help="the 2-layer test model: a quick smoke run")
    parser.add_argument("--out", type=Path, default=common.OUT)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # internal: run one --tokens, print JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case is not None:
        print(json.dumps(one_case(args.case, args.repeats, args.small)))
        return
    info = common.machine_info(torch.device("cpu"))
    results = []
    for tokens in args.tokens:
        command = [sys.executable, __file__, "--repeats", str(args.repeats), "--threads", str(args.threads),
                   *(["--small"] if args.small else []), "--case", str(tokens)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results += json.loads(done.stdout.splitlines()[-1])
        print(results[-len(MODES):], flush=True)
    off = {r["tokens"]: r["seconds"] for r in results if r["mode"] == "off"}
    table = common.markdown_table(
        ["prompt tokens", "mode", "seconds", "vs off", "peak MiB over the request"],
        [[str(r["tokens"]), r["mode"], f"{r['seconds']:.2f}", f"{r['seconds'] / off[r['tokens']]:.2f}",
          f"{r['peak_mib']:.0f}"] for r in results],
    )
    report = f"{common.machine_line(info)}\n\n`{common.command_line()}`\n\n{table}\n"
    print(report)
    common.write_outputs(args.out, "bench_prompt_logprobs",
                         {"machine": info, "command": common.command_line(), "results": results}, report)


if __name__ == "__main__":
    main()
