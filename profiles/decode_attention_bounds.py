"""bench_kernels.py's decode attention call on the CPU, under Triton's interpreter, with every load and store
address checked against the extents of the launch's tensors (tests/interpreter_bounds.py).

    TRITON_INTERPRET=1 python profiles/decode_attention_bounds.py [--batch 64] [--context 4096]

The bench's own inputs (decode_bench: Qwen3-0.6B's heads, blocks of 16, a shuffled block table) and split plan (the
interpreter plans as for 132 SMs, an H100's or H200's). Slow: B=64 ctx=4096 takes about 5 minutes on one core.
Exits 1 on the first out-of-bounds address.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "profiles")]

import bench_kernels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run under TRITON_INTERPRET=1 (the check hooks Triton's interpreter)")
    from interpreter_bounds import bounds_checked
    from ops.triton.decode_attention import decode_attention_triton

    bench_kernels.DEVICE = "cpu"
    bench = bench_kernels.decode_bench(args.batch, args.context)
    start = time.perf_counter()
    with bounds_checked() as checked:
        decode_attention_triton(*bench.make_args(0))
    print(f"decode_attention {bench.shape}: {checked.launches} launches, {checked.accesses} load/store addresses "
          f"checked, all in bounds ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
