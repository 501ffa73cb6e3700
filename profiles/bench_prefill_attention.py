"""Prefill attention over the paged cache with and without a cached prefix: time and peak memory.

    python profiles/bench_prefill_attention.py [--tokens 16384] [--cached 0 32 8192] [--threads N]
        [--kernels torch cpu] [--dtype bfloat16] [--decode-rows N] [--repeats N] [--out DIR]

One layer of Qwen3-0.6B's attention (16 query heads, 8 KV heads, head dim 128, bf16 by default) over
a prompt of --tokens tokens of which the first --cached are already in the paged cache (16-token
blocks), so the call gets --tokens minus --cached new tokens. --kernels names the implementations:
`torch` (ops.torch_ref's prefill_attention_torch), `cpu` (the CPU kernel set's op: the C kernel or
SDPA per sequence), `c` (the C kernel alone, for every sequence), `triton` (the Triton kernel on
CUDA). --decode-rows adds that many query_len-1 sequences over the same context to the call, as a
chunked-prefill step mixes them in. Each (kernels, case) runs in a fresh process; peak memory = the
growth of its maximum RSS over the call (on CUDA: the peak allocated over the inputs), inputs
excluded. A prefix hit should never be slower than no hit, and its memory should stay linear in the
context. With --repeats, the fastest of that many calls (the first one warms up). Writes
bench_prefill_attention.{json,md} into --out.
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
KERNELS = ("torch", "cpu", "c", "triton")


def implementation(kernels: str):
    """The prefill attention op that --kernels names, built where it is compiled."""
    if kernels == "torch":
        return prefill_attention_torch
    if kernels == "triton":
        from ops.triton.prefill_attention import prefill_attention_triton

        return prefill_attention_triton
    from ops.cpu import prefill_attention

    assert prefill_attention.KERNEL.build(), prefill_attention.KERNEL.error
    if kernels == "cpu":
        return prefill_attention.prefill_attention_cpu
    return lambda q, k, v, k_cache, v_cache, *rest: prefill_attention.prefill_attention_kernel(
        q, k_cache, v_cache, *rest)


def one_case(kernels: str, dtype: torch.dtype, tokens: int, cached: int, decode_rows: int, repeats: int) -> dict:
    attend = implementation(kernels)
    device = torch.device("cuda" if kernels == "triton" else "cpu")
    new = tokens - cached
    blocks = -(-tokens // BLOCK)
    k_cache = torch.randn(blocks, BLOCK, HKV, D, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    # Decode rows share the prompt's blocks (as prefix-cache hits would): no cache memory of their own.
    table = torch.arange(blocks, dtype=torch.int32, device=device).expand(1 + decode_rows, blocks)
    rows = [*range(cached, tokens), *[tokens - 1] * decode_rows]
    k = k_cache.flatten(0, 1)[rows]
    v = v_cache.flatten(0, 1)[rows]
    q = torch.randn(len(rows), HQ, D, dtype=dtype, device=device)
    args = (q, k, v, k_cache, v_cache, table, [new] + [1] * decode_rows, [tokens] * (1 + decode_rows), D**-0.5)
    if device.type == "cuda":
        attend(*args)  # compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        attend(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"kernels": kernels, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "cached": cached,
            "new": new, "decode_rows": decode_rows, "seconds": min(seconds), "peak_mib": (peak - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--cached", type=int, nargs="+", default=[0, 32, 8192])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=["torch", "cpu"])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--decode-rows", type=int, default=0,
                        help="query_len-1 sequences over the same context in the call, as a chunked-prefill step has")
    parser.add_argument("--repeats", type=int, default=1, help="calls per case; the fastest is reported")
    parser.add_argument("--out", type=Path, default=common.OUT)
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case is not None:
        with torch.inference_mode():
            print(json.dumps(one_case(args.kernels[0], getattr(torch, args.dtype), args.tokens, args.case,
                                      args.decode_rows, args.repeats)))
        return
    info = common.machine_info(torch.device("cuda" if "triton" in args.kernels else "cpu"))
    results = []
    for cached in args.cached:
        for kernels in args.kernels:  # side by side per case: the load moves less between them
            command = [sys.executable, __file__, "--tokens", str(args.tokens), "--threads", str(args.threads),
                       "--kernels", kernels, "--dtype", args.dtype, "--decode-rows", str(args.decode_rows),
                       "--repeats", str(args.repeats),
                       "--case", str(cached)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.splitlines()[-1]))
            print(results[-1], flush=True)
    table = common.markdown_table(
        ["kernels", "dtype", "prompt tokens", "cached", "new", "decode rows", "seconds", "peak MiB over inputs"],
        [[r["kernels"], r["dtype"], str(r["tokens"]), str(r["cached"]), str(r["new"]), str(r["decode_rows"]),
          f"{r['seconds']:.3f}", f"{r['peak_mib']:.0f}"] for r in results],
    )
    report = f"{common.machine_line(info)}\n\n`{common.command_line()}`\n\n{table}\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_prefill_attention.md").write_text(report)
    (args.out / "bench_prefill_attention.json").write_text(json.dumps(
        {"machine": info, "command": common.command_line(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
