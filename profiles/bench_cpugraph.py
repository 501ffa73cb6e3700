"""The CPU graph's saving per decode step: eager against replayed, interleaved in one engine.

    python profiles/bench_cpugraph.py [--dtype bfloat16] [--quant none int8 int4] [--batches 1 8]
        [--repeats 20] [--prompt-len 32] [--small] [--per-call] [--host]

One engine per weight format (NANOQWEN_GRAPH=cpugraph) prefills --batch random prompts, then runs the
model part of the decode step (embedding to fp32 logits; sampling excluded, it is the same in both)
over the staged inputs --repeats times each way, alternating: eagerly (`compute_logits` of `ModelRunner._decode_hidden`:
Python, torch allocations and views around the C calls), as the recorded calls replayed (`GraphRunner.run`'s
replay: one call into csrc/replay.c) and as the Python loop of the recorded ctypes calls (the replay where
replay.c is missing). Alternating gives all the same machine load; medians are reported, of wall time and of
the calling thread's CPU time (which a loaded machine inflates less), and the replayed logits are checked equal to
the eager ones.

--per-call: the greedy step's cost by C function (its recording as a step without logprobs replays it: the argmax
included), each call timed alone (median over --repeats of the per-step sums): wall time, and the CPU time of the
calling thread, which a loaded machine inflates less (for kernels on the thread pool it leaves out the helpers' share).
Then the replay's own cost (256 calls of a kernel given no work, replayed by replay.c and by the Python loop).

--host: what a whole engine decode step (`Engine.step`: scheduling, staging, the replay, sampling, output) spends
outside its replay, over --repeats greedy steps of fresh sequences: medians of the step, of its replay and of
their difference, the step's Python around the kernels.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.choices import QUANTS  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402
from ops.cpu import graph as cpu_graph  # noqa: E402
from ops.cpu import pointwise  # noqa: E402


def bench(quant: str, batch: int, args: argparse.Namespace) -> dict:
    engine = common.load_engine(common.checkpoint(args.small), device="cpu", dtype=args.dtype, graph="cpugraph",
                                kernels="auto", max_batch=batch, max_model_len=args.prompt_len + 8 + args.repeats,
                                quant=quant)
    runner = engine.runner
    for prompt in common.random_prompts(batch, args.prompt_len, seed=0):
        engine.submit(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.drain_inbox()
    with torch.inference_mode():
        engine.step()  # prefill
        engine.step()  # a decode step: the block of the token staged below is allocated
    seqs = engine.scheduler.running
    runner.inputs.stage_decode(seqs, batch)
    runner.inputs.upload_decode(batch)
    recording, replayed, _ = runner.graphs._cpu_graphs[batch]
    inputs = runner.inputs.bucket(batch, runner._table_width(runner.max_blocks_per_seq * runner.block_size))
    assert recording.packed is not None, "the recording is not replayed by csrc/replay.c"
    eager: list[torch.Tensor] = []  # the last step's logits alone: each step's freed before the next, as served

    def eager_step() -> None:
        eager.clear()
        eager.append(runner.model.compute_logits(runner._decode_hidden(inputs)))

    ways = {"eager": eager_step, "replay": recording.replay,
            "loop": lambda: python_loop(recording)}
    wall: dict[str, list[float]] = {way: [] for way in ways}
    cpu: dict[str, list[float]] = {way: [] for way in ways}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for way, step in ways.items():
                c, start = time.thread_time(), time.perf_counter()
                step()
                wall[way].append(time.perf_counter() - start)
                cpu[way].append(time.thread_time() - c)
    assert torch.equal(eager[-1], replayed), "the replay's logits differ from the eager step's"
    if (args.per_call or args.host) and batch not in runner.graphs._cpu_greedy:
        raise SystemExit(f"--per-call/--host time the greedy step recorded whole: batch {batch}'s was not (its argmax "
                         "is not capturable where the C sampler did not build)")
    with torch.inference_mode():
        breakdown = per_call(runner.graphs._cpu_greedy[batch][0], args.repeats) if args.per_call else []
    if args.host:
        breakdown.append(host_side(engine, batch, args.prompt_len, args.repeats))
    ms = {way: 1000 * statistics.median(wall[way]) for way in ways}
    cpu_ms = {way: 1000 * statistics.median(cpu[way]) for way in ways}
    return {"quant": quant, "batch": batch, "calls": len(recording.calls), "ms": ms, "cpu_ms": cpu_ms,
            "per_call": breakdown}


def python_loop(recording: cpu_graph.Recording) -> None:
    """The recording replayed as the Python loop of its ctypes calls, as where replay.c did not build."""
    packed, recording.packed = recording.packed, None
    try:
        recording.replay()
    finally:
        recording.packed = packed


def host_side(engine, batch: int, prompt_len: int, steps: int) -> str:
    """`steps` greedy engine decode steps of `batch` fresh sequences, each timed whole and its replay apart."""
    with torch.inference_mode():
        while engine.scheduler.has_work:  # the sequences bench() left running
            engine.step()
    recording = engine.runner.graphs._cpu_greedy[batch][0]
    replay_s: list[float] = []

    def timed_replay() -> None:
        start = time.perf_counter()
        cpu_graph.Recording.replay(recording)
        replay_s.append(time.perf_counter() - start)

    recording.replay = timed_replay  # the instance's: the step replays this recording, greedy and whole
    try:
        run = common.engine_decode(engine, common.random_prompts(batch, prompt_len, seed=1), steps)
    finally:
        del recording.replay
    assert len(replay_s) >= len(run.step_s), "a step did not replay the timed recording"
    step, replay = (1000 * statistics.median(t) for t in (run.step_s, replay_s[-len(run.step_s):]))
    host = 1000 * statistics.median(s - r for s, r in zip(run.step_s, replay_s[-len(run.step_s):]))
    return (f"Engine.step {step:.2f} ms, its replay {replay:.2f} ms, the step outside its replay {host:.3f} ms "
            f"(medians of {len(run.step_s)} steps)")


def replay_loop_ms(calls: int, repeats: int) -> tuple[float, float]:
    """A replay's cost outside the kernels: `calls` recorded calls of a kernel given no work, replayed by replay.c
    and by the Python loop (ms)."""
    idle = cpu_graph.Recording()
    nothing = (ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_long(0))  # bf16_to_fp32 of 0 values
    idle.calls = [(pointwise.KERNEL.lib.bf16_to_fp32, nothing)] * calls
    idle.pack()
    times: dict[str, list[float]] = {"replay": [], "loop": []}
    for _ in range(10 * repeats):
        for way, step in (("replay", idle.replay), ("loop", lambda: python_loop(idle))):
            start = time.perf_counter()
            step()
            times[way].append(time.perf_counter() - start)
    return 1000 * statistics.median(times["replay"]), 1000 * statistics.median(times["loop"])


def per_call(recording: cpu_graph.Recording, repeats: int) -> list[str]:
    """The step's cost by C function and the replay loop's own cost, as lines to print."""
    wall: dict[str, list[float]] = collections.defaultdict(list)
    cpu: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(repeats):
        step_wall: dict[str, float] = collections.defaultdict(float)
        step_cpu: dict[str, float] = collections.defaultdict(float)
        for fn, fn_args in recording.calls:
            c, t = time.thread_time(), time.perf_counter()
            fn(*fn_args)
            step_wall[fn.__name__] += time.perf_counter() - t
            step_cpu[fn.__name__] += time.thread_time() - c
        for name in step_wall:
            wall[name].append(step_wall[name])
            cpu[name].append(step_cpu[name])
    counts = collections.Counter(fn.__name__ for fn, _ in recording.calls)
    lines = ["| C function | calls | wall ms/step | µs/call | caller CPU ms/step |", "|---|---:|---:|---:|---:|"]
    for name in sorted(wall, key=lambda n: -statistics.median(wall[n])):
        ms = 1000 * statistics.median(wall[name])
        lines.append(f"| {name} | {counts[name]} | {ms:.2f} | {1000 * ms / counts[name]:.1f} "
                     f"| {1000 * statistics.median(cpu[name]):.2f} |")
    replay, loop = replay_loop_ms(len(recording.calls), repeats)
    lines.append(f"replay alone ({len(recording.calls)} calls doing nothing): replay.c {replay:.3f} ms, "
                 f"Python loop {loop:.3f} ms")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--quant", nargs="+", default=list(QUANTS), choices=QUANTS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--small", action="store_true", help="the 2-layer test checkpoint")
    parser.add_argument("--per-call", action="store_true", help="also the replayed step's cost by C function")
    parser.add_argument("--host", action="store_true", help="also Engine.step's time outside its replay")
    args = parser.parse_args()
    print(f"{common.machine_line(common.machine_info(torch.device('cpu')))}\n`{common.command_line()}`", flush=True)
    print("| dtype | quant | batch | C calls | eager ms | replayed ms | Python loop ms | eager CPU ms "
          "| replayed CPU ms | Python loop CPU ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    breakdowns: list[str] = []
    for quant in args.quant:
        for batch in args.batches:
            r = bench(quant, batch, args)
            ms, cpu = (" | ".join(f"{r[k][way]:.2f}" for way in ("eager", "replay", "loop")) for k in ("ms", "cpu_ms"))
            print(f"| {args.dtype} | {quant} | {batch} | {r['calls']} | {ms} | {cpu} |", flush=True)
            if args.per_call or args.host:
                breakdowns += [f"\n{args.dtype}, quant {quant}, batch {batch}, by C function:", *r["per_call"]]
            common.release(torch.device("cpu"))
    print("\n".join(breakdowns))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
