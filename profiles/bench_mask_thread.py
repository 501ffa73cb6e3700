"""What filling a step's grammar masks beside the forward (the mask thread) saves against filling them on the engine
thread: whole engine steps (`Engine.step()`) of a greedy stream beside constrained ones, the masks on the mask thread
("thread") and run on the engine thread before the forward ("inline": the work and order of the serial fill it
replaced), the two alternated round by round in one process (the same load for both).

    python profiles/bench_mask_thread.py [--cases regex json plain] [--rounds 4] [--new-tokens 24] [--small]

Cases: `regex` one `a{70000}` row (inside LIMITS' fuel, ~20-100 ms a mask: profiles/RESULTS.md, fuel8) beside a
greedy row; `json` 7 rows under a JSON schema (an array of at least 1000 small objects: constrained throughout)
beside a greedy row (8 rows: a bucket the CPU graph replays); `plain1`/`plain8` greedy rows alone (no mask: both arms
run the same code). Per case and arm: median, p90 and max ms a step (after the prefill) and llguidance's own fill
time per step (the masks' sum).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_grammar import FILL_S, SCHEMA, _timed_masks  # noqa: E402
from nanoqwen.engine import Engine, SamplingParams  # noqa: E402
from nanoqwen.runner.mask_thread import MaskThread  # noqa: E402
from nanoqwen.runner.sampling import LogitAdjuster  # noqa: E402


def _requests(engine: Engine, case: str, new_tokens: int) -> list[SamplingParams]:
    greedy = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    if case == "regex":
        grammar = engine.grammars.from_text("regex", "a{70000}", "structured_outputs")
        return [greedy, SamplingParams(temperature=0.0, max_tokens=new_tokens, grammar=grammar)]
    if case == "json":
        grammar = engine.grammars.json_schema(SCHEMA, strict=True, param="response_format")
        return [greedy] + [SamplingParams(temperature=0.7, top_p=0.95, top_k=20, max_tokens=new_tokens,
                                          ignore_eos=True, grammar=grammar, seed=i) for i in range(7)]
    return [greedy] * (1 if case == "plain1" else 8)


def _steps(engine: Engine, params: list[SamplingParams]) -> tuple[list[float], float]:
    """-> (each step's seconds after the prefill, llguidance's fill seconds over them)."""
    prompts = common.random_prompts(len(params), 16, seed=len(params))
    for prompt, p in zip(prompts, params):
        engine.submit(prompt, p, split_reasoning=False)
    step_s = []
    with torch.inference_mode():
        engine.drain_inbox()
        engine.step()  # the prefill
        FILL_S.clear()
        while engine.scheduler.has_work:
            step_s.append(common.timed_step(engine))
    return step_s, sum(FILL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["regex", "json", "plain1", "plain8"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    engine = common.load_engine(common.checkpoint(args.small), device="auto", dtype="auto", graph="auto",
                                kernels="auto", max_batch=16, max_model_len=256)
    print(common.machine_line(common.machine_info(engine.runner.device)), "graph", engine.info()["graph"])
    LogitAdjuster._compute_masks = _timed_masks(LogitAdjuster._compute_masks)
    thread = engine.runner.adjuster._thread
    arms = {"thread": MaskThread.start.__get__(thread),
            "inline": lambda job, here=False: MaskThread.start(thread, job, here=True)}
    for case in args.cases:
        results: dict[str, list[float]] = {arm: [] for arm in arms}
        fills: dict[str, list[float]] = {arm: [] for arm in arms}
        for r in range(args.rounds):
            for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                thread.start = arms[arm]
                step_s, fill_s = _steps(engine, _requests(engine, case, args.new_tokens))
                results[arm] += step_s
                fills[arm].append(fill_s / len(step_s))  # over every step: one without a computed mask adds 0
        load = Path("/proc/loadavg").read_text().split()[0]
        for arm, step_s in results.items():
            ms = sorted(s * 1e3 for s in step_s)
            print(f"{case:7s} {arm:6s} step ms median {statistics.median(ms):7.2f}  p90 "
                  f"{ms[int(0.9 * (len(ms) - 1))]:7.2f}  max {ms[-1]:7.2f}  fill ms/step "
                  f"{statistics.median(fills[arm]) * 1e3:6.2f}  steps {len(ms)}  load {load}", flush=True)


if __name__ == "__main__":
    main()
