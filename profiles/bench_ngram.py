"""The n-gram proposer's cost per sequence: memory, its first proposal (on a long prompt) and a decode step's.

    python profiles/bench_ngram.py [--lengths 8192 32768] [--lookup 1 4] [--steps 200] [--draw zipf]
        [--baseline GIT_REV] [--out DIR]

Tokens: a Zipf-like draw over Qwen3's vocabulary (seeded), so common tokens recur as in text, a uniform
one, or one token throughout (`run`: "\n\n\n...", every position a match of every n-gram). Per length:
the bytes the proposer holds (tracemalloc, after its first proposal), that first proposal's time (what the
engine thread spends in schedule() when a long prompt's sequence first decodes), then the median of `--steps`
decode steps (one token appended, one proposal). --baseline: the same for engine/ngram.py as of that
revision, interleaved length by length. Writes bench_ngram.{json,md}.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import time
import tracemalloc
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

import common

VOCAB = 151936
K = 4
NEWLINE = 198  # Qwen3's "\n"


def proposer_module(rev: str | None, tmp: Path) -> ModuleType:
    """nanoqwen/engine/ngram.py of the working tree, or of `rev`."""
    path = common.REPO / "nanoqwen/engine/ngram.py"
    if rev:
        path = tmp / f"ngram_{rev.replace('/', '_')}.py"
        path.write_text(subprocess.run(["git", "show", f"{rev}:nanoqwen/engine/ngram.py"], cwd=common.REPO,
                                       capture_output=True, text=True, check=True).stdout)
    spec = importlib.util.spec_from_file_location(f"ngram_{rev or 'tree'}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_proposer(module: ModuleType, low: int, high: int):
    cls = getattr(module, "NgramMatcher", None) or module.NgramIndex
    return cls(low, high)


def tokens(length: int, seed: int, draw: str) -> list[int]:
    if draw == "run":
        return [NEWLINE] * length
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.3, length) % VOCAB if draw == "zipf" else rng.integers(0, VOCAB, length)).tolist()


def measure(module: ModuleType, length: int, args: argparse.Namespace) -> dict:
    ids = tokens(length + args.steps, length, args.draw)
    seq = ids[:length]
    tracemalloc.start()  # slows what it traces: a proposer of its own, not timed
    traced = make_proposer(module, *args.lookup)
    traced.propose(seq, K)
    held, _ = tracemalloc.get_traced_memory()
    del traced
    tracemalloc.stop()
    proposer = make_proposer(module, *args.lookup)
    started = time.perf_counter()
    proposer.propose(seq, K)
    first = time.perf_counter() - started
    steps = []
    for token in ids[length:]:
        seq.append(token)
        started = time.perf_counter()
        proposer.propose(seq, K)
        steps.append(time.perf_counter() - started)
    return {"bytes": held, "first_ms": first * 1e3, "step_us": statistics.median(steps) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--lookup", type=int, nargs=2, default=[1, 4], metavar=("MIN", "MAX"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--draw", choices=["zipf", "uniform", "run"], default="zipf",
                        help="uniform: nearly every n-gram new (an index's worst case); run: one token throughout")
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--out", type=Path, default=common.OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    versions = {"tree": proposer_module(None, args.out)}
    if args.baseline:
        versions = {args.baseline: proposer_module(args.baseline, args.out)} | versions
    results: dict[str, dict[int, dict]] = {label: {} for label in versions}
    machine = common.machine_line(common.machine_info(torch.device("cpu")))
    lines = [machine, f"prompt_lookup {args.lookup[0]}..{args.lookup[1]}, k={K}, {args.draw} tokens", "",
             "| version | tokens | held MB | first proposal ms | step µs (median) |", "|---|---|---|---|---|"]
    for length in args.lengths:
        for label, module in versions.items():
            r = results[label][length] = measure(module, length, args)
            lines.append(f"| {label} | {length} | {r['bytes'] / 1e6:.2f} | {r['first_ms']:.1f} | {r['step_us']:.0f} |")
            print(lines[-1], flush=True)
    common.write_outputs(args.out, "bench_ngram", {"lookup": args.lookup, "results": results},
                         "\n".join([common.command_line(), "", *lines]) + "\n")


if __name__ == "__main__":
    main()
