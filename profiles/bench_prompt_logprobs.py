"""What scoring the prompt (`echo` with `logprobs`, `SamplingParams.prompt_logprobs`) adds to a prefill.

    python profiles/bench_prompt_logprobs.py [--tokens 256 1024] [--repeats 2] [--threads N] [--small] [--out DIR]

One engine request of --tokens prompt tokens and one answer token, in three modes: `off` (no
prompt logprobs), `sliced` (the engine's: logits SLICE positions at a time) and `whole` (SLICE
raised past the prompt: all [tokens, 151936] fp32 logits at once, what slicing avoids). Each
(tokens, mode) runs in a fresh process: seconds = median over --repeats distinct prompts (no
prefix-cache hits), peak = growth of the maximum RSS over the first request (after a warm-up
request). Writes bench_prompt_logprobs.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402
from nanoqwen.runner import prompt_logprobs  # noqa: E402

MODES = ("off", "sliced", "whole")


def request_seconds(engine, prompt: list[int], params: SamplingParams) -> float:
    """One request through the engine's real steps, in this thread: its prefill is the step."""
    engine.submit(prompt, params)
    start = time.perf_counter()
    with torch.inference_mode():
        engine._drain_inbox()
        while engine.scheduler.has_work:
            engine.step()
    return time.perf_counter() - start


def one_case(tokens: int, mode: str, repeats: int, small: bool) -> dict:
    engine = common.load_engine(common.checkpoint(small), device="cpu", dtype="auto", graph="none", kernels="auto",
                                max_batch=1, max_model_len=tokens + 16)
    if mode == "whole":
        prompt_logprobs.SLICE = tokens
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=None if mode == "off" else 1)
    request_seconds(engine, common.random_prompts(1, 32, seed=99)[0], params)  # warm-up
    seconds, peak = [], 0.0
    for i, prompt in enumerate(common.random_prompts(repeats, tokens, seed=tokens)):
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds.append(request_seconds(engine, prompt, params))
        if i == 0:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"tokens": tokens, "mode": mode, "seconds": statistics.median(seconds), "peak_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--small", action="store_true", help="the 2-layer test model: a quick smoke run")
    parser.add_argument("--out", type=Path, default=common.OUT)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # internal: TOKENS MODE, print JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case is not None:
        print(json.dumps(one_case(int(args.case[0]), args.case[1], args.repeats, args.small)))
        return
    info = common.machine_info(torch.device("cpu"))
    results = []
    for tokens in args.tokens:
        for mode in MODES:
            command = [sys.executable, __file__, "--repeats", str(args.repeats), "--threads", str(args.threads),
                       *(["--small"] if args.small else []), "--case", str(tokens), mode]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.splitlines()[-1]))
            print(results[-1], flush=True)
    off = {r["tokens"]: r["seconds"] for r in results if r["mode"] == "off"}
    table = common.markdown_table(
        ["prompt tokens", "mode", "seconds", "vs off", "peak MiB"],
        [[str(r["tokens"]), r["mode"], f"{r['seconds']:.2f}", f"{r['seconds'] / off[r['tokens']]:.2f}",
          f"{r['peak_mib']:.0f}"] for r in results],
    )
    report = f"{common.machine_line(info)}\n\n`{common.command_line()}`\n\n{table}\n"
    print(report)
    common.write_outputs(args.out, "bench_prompt_logprobs",
                         {"machine": info, "command": common.command_line(), "results": results}, report)


if __name__ == "__main__":
    main()
