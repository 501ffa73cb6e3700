"""The C linear kernels (ops/cpu/) alone, on every linear of a Qwen3-0.6B-shaped decode step.

    python profiles/bench_cpu_linear.py [--rows 1 8] [--quant none int8 int4] [--repeats 5] [--threads N]
        [--baseline GIT_REV] [--torch] [--pages huge 4k] [--isas auto avx2] [--clock wall|cpu]

Each weight format holds a full model's distinct weights (28 layers of qkv, o, gate_up and down,
and the 151936-row LM head; random values), so a pass streams them from memory as a decode step
does: bf16 1.19 GB, int8 0.60 GB, int4 0.34 GB (their LM heads quantised too; int4 in groups of
64 with bf16 scales and offsets, as NANOQWEN_QUANT=int4). A pass calls the kernel on each weight in
model order with bf16 activations of --rows rows; its time is the median of --repeats passes after
one warm-up. Prints per-shape time and read bandwidth, the pass's tokens/s at those rows and its
fraction of the memory read bandwidth (profiles/common.py's best-of-7 sum, measured in the same run).
--baseline: also builds ops/cpu/csrc as of that git revision and times it, interleaved with the
working tree's kernels pass by pass, so both see the same machine load (one process: both trees' kernels run on
the thread pool loaded first, csrc/pool.c, so a change to pool.c needs two processes to compare). --pages huge 4k: the
weights in huge pages and in 4 KB pages, timed interleaved. --isas auto avx2: each version's kernels built for each
cpu_isa cap (ops/cpu/build.py; NANOQWEN_CPU_ISA is the CLI's, not read here), timed interleaved: an AVX-512 CPU's loops
against its AVX2 ones in one process (int4's layout differs by cap; the values are random, so either reads them).
--torch: torch's own GEMM (F.linear: oneDNN/MKL) on the bf16 weights as well, for the row counts where linear.py
hands over to it, and the int4 torch reference (ops/torch_ref/linear_int4.py: what a revision whose int4 kernel needs
AVX-512 VNNI ran on a CPU without it, where that revision's kernel, as a --baseline, would stop on an illegal
instruction).
--clock cpu: the calling thread's CPU time, not the wall clock's: with --threads 1 (the pool then runs every chunk on
the caller) all of a kernel's work, time spent waiting on memory included, but not the time slices other processes
take, so that kernels can be compared on a machine loaded past its cores (where wall-clock figures wander 1.3x).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.choices import CPU_ISAS, QUANTS  # noqa: E402
from nanoqwen.hugepages import move_into_huge_pages  # noqa: E402
from nanoqwen.quant import GROUP_SIZE as INT4_GROUP  # noqa: E402
from ops.cpu import build  # noqa: E402
from ops.cpu.linear_int4 import PIECES  # noqa: E402
from ops.torch_ref.linear_int4 import linear_int4_torch  # noqa: E402

LAYERS, HIDDEN, INTER, QKV, VOCAB = 28, 1024, 3072, 4096, 151936
INT4_PIECES = PIECES[torch.bfloat16]  # a revision before the pieces ignores this trailing argument
SHAPES = {"qkv": (QKV, HIDDEN), "o": (HIDDEN, 2048), "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
INPUTS = {name: k for name, (_, k) in SHAPES.items()} | {"lm_head": HIDDEN}  # each weight's input columns


def weights(quant: str, pages: str) -> list[tuple[str, tuple]]:
    """[(shape name, kernel arguments after x)] in model order, in huge pages as the engine loads them
    (nanoqwen/hugepages.py) or in 4 KB pages."""
    def make(n: int, k: int) -> tuple:
        if quant == "int8":
            return torch.empty(n, k, dtype=torch.int8), torch.empty(n, dtype=torch.bfloat16)
        if quant == "int4":
            groups = k // INT4_GROUP
            return (torch.empty(n, k // 2, dtype=torch.uint8), torch.empty(n, groups, dtype=torch.bfloat16),
                    torch.empty(n, groups, dtype=torch.bfloat16))
        return (torch.empty(n, k, dtype=torch.bfloat16),)

    out = [(name, make(*shape)) for _ in range(LAYERS) for name, shape in SHAPES.items()]
    out = [(name, tuple(nn.Parameter(t, requires_grad=False) for t in args))
           for name, args in [*out, ("lm_head", make(VOCAB, HIDDEN))]]
    if pages == "huge":
        move_into_huge_pages(nn.ParameterList(t for _, args in out for t in args))
    with torch.no_grad():  # written after the move, as the loader does: the first touch makes the pages
        for _, (w, *scales) in out:
            if w.dtype == torch.bfloat16:
                w.normal_()
            else:  # int4 nibble pairs, int8 values
                w.random_(0, 256) if w.dtype == torch.uint8 else w.random_(-127, 128)
            for i, t in enumerate(scales):  # int8 and int4 scales, int4 offsets
                t.uniform_(0, 0.01) if i == 0 else t.normal_(0, 0.1)
    return out


def sources(rev: str | None, into: Path) -> Path:
    """ops/cpu/csrc of the working tree, or as of git revision `rev` (exported under `into`)."""
    if rev is None:
        return build.CSRC
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", rev, "ops/cpu/csrc"], cwd=root, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "ops/cpu/csrc"


def versions_of(baseline: str | None, prefix: str, make: Callable[[Path, Path, str], Any],
                isas: tuple[str, ...] = ("auto",)) -> dict:
    """{label: make(csrc, cache, isa)}: the working tree's C sources and, with `baseline`, that revision's (listed
    first, so its pool.c is the one both load: ops/cpu/build.py's pool is the first a process loads), each built for
    each cpu_isa of `isas` (labelled by it where there are several or it is not auto)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    trees = {**({baseline: sources(baseline, tmp)} if baseline else {}), "working tree": sources(None, tmp)}
    return {(f"{label}, {isa}" if isas != ("auto",) else label): make(csrc, tmp / "cache", isa)
            for label, csrc in trees.items() for isa in isas}


def callers(csrc: Path, cache: Path, isa: str) -> dict:
    """{quant: kernel(x, *weights) -> y} for the C sources in `csrc`, built for the cpu_isa `isa`."""
    dense = build.CKernel(f"bench_linear_{csrc.parent.parent.parent.name}", "linear.c", ("linear",), csrc=csrc)
    int8 = build.CKernel(f"bench_int8_{csrc.parent.parent.parent.name}", "linear_int8.c", ("linear_int8",), csrc=csrc)
    int4 = build.CKernel(f"bench_int4_{csrc.parent.parent.parent.name}", "linear_int4.c", ("linear_int4",), csrc=csrc)
    assert all(k.build(cache, isa) for k in (dense, int8, int4)), dense.error or int8.error or int4.error

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
        dense.lib.linear(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], w.shape[0], x.shape[1], 1)
        return out

    def linear_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
        int8.lib.linear_int8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), out.data_ptr(), x.shape[0], w.shape[0],
                             x.shape[1], 1)
        return out

    def linear_int4(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
        int4.lib.linear_int4(x.data_ptr(), w.data_ptr(), scale.data_ptr(), offset.data_ptr(), out.data_ptr(),
                             x.shape[0], w.shape[0], x.shape[1], INT4_GROUP, 1, INT4_PIECES)
        return out

    return {"none": linear, "int8": linear_int8, "int4": linear_int4}


def run_pass(kernel, ws: list, xs: dict, times: dict, clock: Callable[[], float]) -> float:
    start = clock()
    for name, args in ws:
        t = clock()
        kernel(xs[INPUTS[name]], *args)
        times[name] += clock() - t
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--quant", nargs="+", default=["none", "int8"], choices=QUANTS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline", default=None, help="a git revision whose kernels to time as well")
    parser.add_argument("--torch", action="store_true",
                        help="time torch's F.linear on bf16 weights and the int4 torch reference as well")
    parser.add_argument("--pages", nargs="+", default=["huge"], choices=["huge", "4k"],
                        help="the weights' pages; two: both timed, interleaved")
    parser.add_argument("--clock", default="wall", choices=CLOCKS,
                        help="cpu: the calling thread's CPU time (with --threads 1 all the work; not the time slices "
                             "other processes take on a loaded machine)")
    parser.add_argument("--isas", nargs="+", default=["auto"], choices=CPU_ISAS,
                        help="the cpu_isa caps to build the kernels for; several: each timed, interleaved")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    versions = versions_of(args.baseline, "bench_cpu_linear_", callers, tuple(args.isas))
    if args.torch:
        versions["torch"] = {"none": F.linear, "int4": linear_int4_torch}
    bandwidth = common.read_bandwidth(torch.device("cpu"))
    print(f"{common.machine_line(common.machine_info(torch.device('cpu')))}; threads {torch.get_num_threads()}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    names = [*SHAPES, "lm_head"]
    for quant in args.quant:
        sets = {pages: weights(quant, pages) for pages in args.pages}
        total = sum(sum(t.numel() * t.element_size() for t in a) for _, a in sets[args.pages[0]])
        for rows in args.rows:
            xs = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in (HIDDEN, 2048, INTER)}
            timed = {(f"{v}, {pages} pages" if len(sets) > 1 else v): (kernels[quant], ws)
                     for v, kernels in versions.items() if quant in kernels for pages, ws in sets.items()}
            times = {v: dict.fromkeys(names, 0.0) for v in timed}
            passes = {v: [] for v in timed}
            for kernel, ws in timed.values():  # warm-up
                run_pass(kernel, ws, xs, dict.fromkeys(names, 0.0), clock)
            for _ in range(args.repeats):
                for v, (kernel, ws) in timed.items():
                    passes[v].append(run_pass(kernel, ws, xs, times[v], clock))
            ws = sets[args.pages[0]]
            for v in timed:
                step = statistics.median(passes[v])
                print(f"{v}: {quant} rows {rows}: pass {step * 1e3:.1f} ms (best {min(passes[v]) * 1e3:.1f}), "
                      f"{total / step / 1e9:.1f} GB/s = {total / step / bandwidth:.0%} of read bandwidth, "
                      f"{rows / step:.1f} tok/s (linears only)", flush=True)
                for name, t in times[v].items():
                    n_calls = sum(1 for nm, _ in ws if nm == name)
                    nbytes = sum(sum(x.numel() * x.element_size() for x in a) for nm, a in ws if nm == name)
                    print(f"    {name:8s} {t / args.repeats / n_calls * 1e6:8.0f} µs/call "
                          f"{nbytes * args.repeats / t / 1e9:5.1f} GB/s")
        del sets

if __name__ == "__main__":
    main()
