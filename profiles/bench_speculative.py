"""n-gram speculative decoding on the CPU: what a verify step costs against a decode step, and tokens/s
with it on and off.

    python profiles/bench_speculative.py [--quant none int8] [--batches 1 8] [--ks 1 2 4 6] [--reps 7]
        [--new-tokens 48] [--context 64] [--threads N] [--small] [--out DIR]

Per weight format and batch: the median wall time of the runner's step for B decoding sequences
(--context-token contexts) with k drafts each (k + 1 positions a row: a decode step over them, the CPU
graph of their bucket), against the decode-only step (the CPU graph), the same 1-token rows through the
eager packed path, and the verify step through that packed path ("k=K packed"), the runs interleaved
rep by rep. From those, the tokens/s speedup at a per-token acceptance rate a: a verify
step of k drafts emits (1 - a^(k+1)) / (1 - a) tokens on average. Then end to end (engine steps, greedy,
batch B, 0.6B shape with random weights) with speculation on (k = the largest --ks) and off, on a
repetitive prompt (a span repeated) and an ordinary one, with the measured acceptance: random weights do
not copy their context as a real model does, so that rate says little; the table from step costs is
the figure to read. Writes bench_speculative.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: what a server with speculation runs
import torch  # noqa: E402

import common
from nanoqwen.engine import Engine, SamplingParams
from nanoqwen.engine.scheduler import Batch

ACCEPTANCE = (0.3, 0.5, 0.7, 0.9)


def load(args: argparse.Namespace, quant: str, batch: int, spec_k: int = 0) -> Engine:
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": spec_k, "prompt_lookup_max": 4,
                       "prompt_lookup_min": 2}) if spec_k else ""
    return common.load_engine(common.checkpoint(args.small), device="cpu", dtype="auto", graph="auto", kernels="auto",
                              max_batch=batch, max_model_len=args.context + 1024, quant=quant, speculative_config=spec,
                              threads=args.threads)


def step_costs(args: argparse.Namespace, quant: str, batch: int) -> dict:
    """Median seconds of a decode-only step (graph), an eager 1-token step and a verify step per k."""
    # speculation on: the static inputs and CPU-graph buckets are sized for max_batch × (1 + k) positions
    engine = load(args, quant, batch, max(args.ks))
    params = SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True)
    with torch.inference_mode():
        seqs = common.prefilled(engine, common.random_prompts(batch, args.context, seed=1), params, max(args.ks))
        runner = engine.runner
        times: dict[str, list[float]] = {}

        def timed(name: str, run) -> None:
            start = time.perf_counter()
            run()
            times.setdefault(name, []).append(time.perf_counter() - start)

        for _ in range(args.reps):  # the runner alone: the sequences' state never moves
            timed("decode", lambda: runner.decode(seqs, runner.step_rows(Batch(decode=seqs))))
            timed("eager", lambda: runner.prefill([(seq, 1) for seq in seqs], seqs))
            for k in args.ks:
                for seq in seqs:
                    seq.draft_ids = [1] * k
                timed(f"k={k}", lambda: runner.step(Batch(decode=seqs)))
                timed(f"k={k} packed", lambda: runner.prefill(Batch(decode=seqs).rows, seqs))
                for seq in seqs:
                    seq.draft_ids = []
    return {name: statistics.median(values) for name, values in times.items()}


def speedups(costs: dict, ks: list[int]) -> dict[str, dict[str, float]]:
    """Tokens/s with k drafts at each acceptance rate, as a multiple of decode-only steps' (every row drafting)."""
    return {f"k={k}": {str(a): (1 - a ** (k + 1)) / (1 - a) * costs["decode"] / costs[f"k={k}"] for a in ACCEPTANCE}
            for k in ks}


def end_to_end(args: argparse.Namespace, quant: str, batch: int, spec_k: int) -> dict:
    engine = load(args, quant, batch, spec_k)
    span = common.random_prompts(1, 40, seed=3)[0]
    workloads = {"repetitive": [span * 4 for _ in range(batch)],  # copy/edit-like: the answer may repeat the span
                 "ordinary": common.random_prompts(batch, 160, seed=4)}
    out = {}
    for name, prompts in workloads.items():
        before = engine.stats()
        run = common.engine_decode(engine, prompts, args.new_tokens)
        after = engine.stats()
        drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
        accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
        out[name] = {"tokens_per_s": batch * (args.new_tokens - 1) / sum(run.step_s),
                     "acceptance": accepted / drafted if drafted else 0.0, "drafted": drafted}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", nargs="+", default=["none", "int8"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 6])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=48, help="end to end; 0: step costs only")
    parser.add_argument("--context", type=int, default=64, help="each sequence's tokens before the steps")
    parser.add_argument("--threads", type=int, default=0, help="torch and C kernel threads (0: the CPUs')")
    parser.add_argument("--small", action="store_true", help="the 2-layer test model: a quick smoke run")
    parser.add_argument("--out", type=Path, default=common.OUT)
    args = parser.parse_args()
    machine = common.machine_line(common.machine_info(torch.device("cpu")))
    print(machine, flush=True)
    results = []
    header = ["quant", "batch", "decode ms", "eager 1-token ms", *(f"k={k} ms" for k in args.ks),
              *(f"k={k} packed ms" for k in args.ks),
              "speedup at acceptance " + "/".join(map(str, ACCEPTANCE)) + " (largest k)",
              "e2e tok/s off → on (repetitive, acceptance)", "e2e tok/s off → on (ordinary, acceptance)", "load"]
    rows = []
    for quant in args.quant:
        for batch in args.batches:
            costs = step_costs(args, quant, batch)
            gains = speedups(costs, args.ks)
            off = end_to_end(args, quant, batch, 0) if args.new_tokens else None
            on = end_to_end(args, quant, batch, max(args.ks)) if args.new_tokens else None
            load_avg = os.getloadavg()[0]
            results.append({"quant": quant, "batch": batch, "step_s": costs, "speedup": gains, "off": off, "on": on,
                            "load": load_avg})
            best = gains[f"k={max(args.ks)}"]
            e2e = [f"{off[w]['tokens_per_s']:.1f} → {on[w]['tokens_per_s']:.1f} ({on[w]['acceptance']:.2f})"
                   if off and on else "-" for w in ("repetitive", "ordinary")]
            rows.append([quant, str(batch), f"{costs['decode'] * 1e3:.1f}", f"{costs['eager'] * 1e3:.1f}",
                         *(f"{costs[f'k={k}'] * 1e3:.1f}" for k in args.ks),
                         *(f"{costs[f'k={k} packed'] * 1e3:.1f}" for k in args.ks),
                         "/".join(f"{best[str(a)]:.2f}" for a in ACCEPTANCE), *e2e, f"{load_avg:.2f}"])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
    table = common.markdown_table(header, rows)
    common.write_outputs(args.out, "bench_speculative", results, "\n".join([machine, common.command_line(), "", table]))
    print(table)


if __name__ == "__main__":
    main()
