"""The C paged decode attention (ops/cpu/csrc/attention.c) alone, at Qwen3-0.6B's shapes and long contexts.

    python profiles/bench_decode_attention.py [--shapes 1x1000 8x1000 8x100 ...] [--dtype bfloat16|float32]
        [--repeats 20] [--threads N] [--baseline GIT_REV] [--warm]

One call is one layer's attention: Hq 16, Hkv 8, D 128, block size 16, a query token per sequence. A shape
is BATCHxCONTEXT (every sequence that long) or BATCHxCONTEXT+REST (one sequence of CONTEXT, the others of
REST: a long sequence next to short ones). Each sequence's blocks are distinct and scattered (a random
permutation of the cache's, as tests/test_cpu_attention_split.py builds them: the engine's blocks are not in
order either, and blocks in order would flatter the hardware prefetchers), and a 64 MiB buffer is written
before every call, so the cache holds none of the KV, as in a decode step after the linears streamed their
weights. Prints the best call's µs per layer, the KV it read in GB/s and as a fraction of the memory
read bandwidth (profiles/common.py's), and x 28 layers. --baseline: also builds ops/cpu/csrc as of that git
revision and times it, interleaved call by call with the working tree's kernel. --warm: no buffer written between
calls, so the KV stays in the caches where it fits (1x1000's 4 MB does): the kernel's compute alone, which a change
can speed up while it slows the cold calls (profiles/RESULTS.md, lane attn2).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_cpu_linear import versions_of  # noqa: E402
from ops.cpu import build  # noqa: E402

LAYERS, HQ, HKV, D, BLOCK = 28, 16, 8, 128, 16


def caller(csrc: Path, cache: Path, isa: str):
    kernel = build.CKernel(f"bench_attention_{csrc.parent.parent.parent.name}", "attention.c", ("decode_attention",),
                           csrc=csrc)
    assert kernel.build(cache, isa), kernel.error

    def attend(q, kc, vc, tables, lens, out):
        kernel.lib.decode_attention(q.data_ptr(), q.stride(0), kc.data_ptr(), vc.data_ptr(), tables.data_ptr(),
                                    lens.data_ptr(), out.data_ptr(), q.shape[0], HQ, HKV, D, BLOCK, tables.shape[1],
                                    D**-0.5, int(q.dtype == torch.bfloat16))

    return attend


def parse_shape(shape: str) -> list[int]:
    """'8x1000' -> eight lengths of 1000; '8x4000+100' -> one of 4000 and seven of 100."""
    batch, lengths = shape.split("x")
    first, _, rest = lengths.partition("+")
    return [int(first)] + [int(rest or first)] * (int(batch) - 1)


def inputs(lengths: list[int], dtype: torch.dtype) -> tuple:
    width = max(-(-n // BLOCK) for n in lengths)
    k_cache = torch.randn(1 + len(lengths) * width, BLOCK, HKV, D, dtype=dtype)  # block 0 unused, as in the engine
    tables = (1 + torch.randperm(len(lengths) * width, dtype=torch.int32)).view(len(lengths), width)
    q = torch.randn(len(lengths), HQ, D, dtype=dtype)
    return q, k_cache, torch.randn_like(k_cache), tables, torch.tensor(lengths, dtype=torch.int32), torch.empty_like(q)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["1x100", "1x1000", "1x4000", "8x100", "8x1000", "8x4000",
                                                        "8x4000+100"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline", default=None, help="a git revision whose kernel to time as well")
    parser.add_argument("--warm", action="store_true", help="leave the KV in the caches between calls")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    versions = versions_of(args.baseline, "bench_decode_attention_", caller)
    bandwidth = common.read_bandwidth(torch.device("cpu"))
    print(f"{common.machine_line(common.machine_info(torch.device('cpu')))}; threads {torch.get_num_threads()}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; {args.dtype}, Hq {HQ}, Hkv {HKV}, D {D}, block {BLOCK}")
    dtype = getattr(torch, args.dtype)
    junk = torch.empty(64 << 20, dtype=torch.uint8)
    for shape in args.shapes:
        lengths = parse_shape(shape)
        tensors = inputs(lengths, dtype)
        kv_bytes = 2 * sum(lengths) * HKV * D * dtype.itemsize
        best = dict.fromkeys(versions, float("inf"))
        for _ in range(args.repeats):
            for name, attend in versions.items():
                if not args.warm:
                    junk.add_(1)
                start = time.perf_counter()
                attend(*tensors)
                best[name] = min(best[name], time.perf_counter() - start)
        for name, t in best.items():
            print(f"{name}: {shape:>11}: {t * 1e6:7.0f} µs/layer, {kv_bytes / t / 1e9:5.1f} GB/s of KV "
                  f"({kv_bytes / t / bandwidth:4.0%} of read bandwidth), x {LAYERS} layers {LAYERS * t * 1e3:6.1f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
