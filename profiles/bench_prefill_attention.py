"""Prefill attention over the paged cache with and without a cached prefix: time and peak memory.

    python profiles/bench_prefill_attention.py [--tokens 16384] [--cached 0 32 8192] [--threads N] [--out DIR]

One layer of Qwen3-0.6B's attention (16 query heads, 8 KV heads, head dim 128, bf16) through
ops.torch_ref's prefill_attention_torch, on the CPU: a prompt of --tokens tokens of which the first
--cached are already in the paged cache (16-token blocks), so the call gets --tokens minus --cached
new tokens. Each case runs in a fresh process; peak memory = the growth of its maximum RSS over the
call (inputs excluded). A prefix hit should never be slower than no hit, and its memory should stay
linear in the context. Writes bench_prefill_attention.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from ops.torch_ref.prefill_attention import prefill_attention_torch  # noqa: E402

HQ, HKV, D, BLOCK = 16, 8, 128, 16


def one_case(tokens: int, cached: int) -> dict:
    new = tokens - cached
    blocks = -(-tokens // BLOCK)
    k_cache = torch.randn(blocks, BLOCK, HKV, D, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.arange(blocks, dtype=torch.int32).unsqueeze(0)
    k = k_cache.flatten(0, 1)[cached:tokens]
    v = v_cache.flatten(0, 1)[cached:tokens]
    q = torch.randn(new, HQ, D, dtype=torch.bfloat16)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    prefill_attention_torch(q, k, v, k_cache, v_cache, table, [new], [tokens], D**-0.5)
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"tokens": tokens, "cached": cached, "new": new, "seconds": seconds, "peak_mib": grown}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--cached", type=int, nargs="+", default=[0, 32, 8192])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--out", type=Path, default=common.OUT)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case is not None:
        with torch.inference_mode():
            print(json.dumps(one_case(args.tokens, args.case)))
        return
    info = common.machine_info(torch.device("cpu"))
    results = []
    for cached in args.cached:
        command = [sys.executable, __file__, "--tokens", str(args.tokens), "--threads", str(args.threads)]
        done = subprocess.run([*command, "--case", str(cached)], capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.splitlines()[-1]))
        print(results[-1], flush=True)
    table = common.markdown_table(
        ["prompt tokens", "cached", "new", "seconds", "peak MiB over inputs"],
        [[str(r["tokens"]), str(r["cached"]), str(r["new"]), f"{r['seconds']:.2f}", f"{r['peak_mib']:.0f}"]
         for r in results],
    )
    report = f"{common.machine_line(info)}\n\n`{common.command_line()}`\n\n{table}\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_prefill_attention.md").write_text(report)
    (args.out / "bench_prefill_attention.json").write_text(json.dumps(
        {"machine": info, "command": common.command_line(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
