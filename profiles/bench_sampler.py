"""What sampling adds to a decode step: greedy against sampled and filtered, at several batch sizes.

    python profiles/bench_sampler.py [--batches 1 8 32] [--repeats 30] [--new-tokens 16] [--rounds 2]
        [--threads N] [--no-engine] [--device auto] [--small] [--out DIR]

1. The sampler alone (`nanoqwen.sampler.sample`) on random fp32 logits [B, V] of Qwen3-0.6B's
   151,936-token vocabulary, for each setting below, in the sampler mode the engine would pick
   (`runner.sampling.sampling_mode`); on the CPU both as the torch sampler and as the C kernel
   (ops/cpu/sample.py). The settings take turns within each repeat, so a shared machine's load falls
   on all of them alike; ms = the median over --repeats.
   Then a penalised batch-8 step's sampling (`PenaltyBuilder.build`, one new token a row, then `sample`, Qwen's
   defaults): 0, 1 and 8 rows with presence, frequency and repetition penalties, histories of 100 and 2000 tokens.
2. Unless --no-engine: whole engine decode steps (`Engine.step()`, as bench_decode.py times them) on
   the random 0.6B-shaped bf16 checkpoint (--small: the 2-layer test model, whose vocabulary is
   small), all rows greedy against all rows with each sampled setting, and their ratio (target: at
   most 1.15 at every batch).
--threads sets torch's intra-op threads for both (on a shared CPU, 1 stalls least).
Writes bench_sampler.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.config import resolve_device  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402
from nanoqwen.engine.sequence import Request, Sequence  # noqa: E402
from nanoqwen.engine.stream import EventStream  # noqa: E402
from nanoqwen.runner.penalties import PenaltyBuilder  # noqa: E402
from nanoqwen.runner.sampling import sampling_mode  # noqa: E402
from nanoqwen.sampler import SamplingRows, sample, seed_key  # noqa: E402
from ops.cpu import sample as cpu_sample  # noqa: E402

VOCAB = 151_936  # Qwen3-0.6B
TARGET_RATIO = 1.15
SETTINGS = {
    "greedy": SamplingParams(temperature=0.0),
    "qwen defaults (T 0.7, top-p 0.95, top-k 20)": SamplingParams(temperature=0.7, top_p=0.95, top_k=20),
    "temperature 1.0": SamplingParams(temperature=1.0),
    "top-p 0.95 (no top-k)": SamplingParams(temperature=0.7, top_p=0.95),
}
SAMPLED = [name for name in SETTINGS if name != "greedy"]
QWEN = SETTINGS["qwen defaults (T 0.7, top-p 0.95, top-k 20)"]
PENALISED = SamplingParams(temperature=0.7, top_p=0.95, top_k=20, presence_penalty=0.5, frequency_penalty=0.3,
                           repetition_penalty=1.1)
PENALTY_BATCH = 8


def rows(params: SamplingParams, batch: int, device: torch.device) -> SamplingRows:
    def col(value: float, dtype: torch.dtype) -> torch.Tensor:
        return torch.full((batch,), value, dtype=dtype, device=device)

    return SamplingRows(
        temperature=col(params.temperature, torch.float32), top_p=col(params.top_p, torch.float32),
        top_k=col(params.top_k, torch.int32), min_p=col(params.min_p, torch.float32),
        keys=torch.tensor([seed_key(i) for i in range(batch)], dtype=torch.int64, device=device),
        steps=col(3, torch.int32),
    )


def sampler_backends(device: torch.device) -> list[str]:
    """The samplers `sample` can run here: on a CPU where the C kernel builds, it and the torch sampler."""
    return ["torch", "kernel"] if device.type == "cpu" and cpu_sample.KERNEL.build() else ["torch"]


@torch.inference_mode()
def sampler_ms(batch: int, repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """{backend: {setting: median ms of one `sample` call}}, the calls interleaved within each repeat."""
    logits = torch.randn(batch, VOCAB, device=device) * 3
    calls = {name: (rows(p, batch, device), sampling_mode([p])) for name, p in SETTINGS.items()}
    backends = sampler_backends(device)
    times: dict[str, dict[str, list[float]]] = {b: {name: [] for name in calls} for b in backends}
    for repeat in range(repeats + 1):  # the first round warms up
        for backend in backends:
            cpu_sample.KERNEL.ready = backend == "kernel"  # `sample`'s own switch between the two
            for name, (settings, mode) in calls.items():
                common.synchronize(device)
                start = time.perf_counter()
                sample(logits, settings, mode)
                common.synchronize(device)
                if repeat:
                    times[backend][name].append(time.perf_counter() - start)
    cpu_sample.KERNEL.ready = "kernel" in backends
    return {b: {name: 1000 * statistics.median(t) for name, t in by_name.items()} for b, by_name in times.items()}


def penalised_rows(penalised: int, history: int) -> list[Sequence]:
    """PENALTY_BATCH sequences of `history` random tokens (50 of prompt), the first `penalised` with PENALISED."""
    rng = np.random.default_rng(history)
    seqs = []
    for i in range(PENALTY_BATCH):
        tokens = rng.integers(0, VOCAB, history).tolist()
        request = Request(str(i), PENALISED if i < penalised else QWEN, EventStream(), 50)
        seqs.append(Sequence(request, 0, tokens[:50], seed=i, max_tokens=history))
        seqs[-1].token_ids = tokens
    return seqs


@torch.inference_mode()
def penalties_ms(repeats: int, device: torch.device) -> dict[str, float]:
    """{"penalised rows / history": median ms of a step's PenaltyBuilder.build and `sample`}, the cases interleaved,
    a plain `sample` just before each (the kernel's threads awake, as in a step)."""
    logits = torch.randn(PENALTY_BATCH, VOCAB, device=device) * 3
    settings, mode = rows(QWEN, PENALTY_BATCH, device), sampling_mode([QWEN])
    to_device = functools.partial(torch.Tensor.to, device=device)
    cases = {f"{n} / {h}": (penalised_rows(n, h), PenaltyBuilder(to_device)) for n in (0, 1, 8) for h in (100, 2000)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(repeats + 1):  # the first round warms up (and counts every history once)
        for name, (seqs, builder) in cases.items():
            for seq in seqs:
                seq.token_ids.append(repeat)
            sample(logits, settings, mode)
            common.synchronize(device)
            start = time.perf_counter()
            penalties = builder.build(seqs) if any(s.request.params.penalized for s in seqs) else None
            sample(logits, settings, mode, penalties)
            common.synchronize(device)
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def engine_steps(args: argparse.Namespace, device: torch.device) -> list[dict]:
    engine = common.load_engine(common.checkpoint(args.small), device=args.device, dtype="auto", graph="auto",
                                kernels="auto", max_batch=max(args.batches), max_model_len=256)
    set_threads(args.threads)  # loading set the engine's own
    out = []
    for batch in args.batches:
        prompts = common.random_prompts(batch, 16, seed=batch)
        ms: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):  # the settings take turns: each one's fastest run is kept
            for name, params in SETTINGS.items():
                ms[name].append(common.engine_decode(engine, prompts, args.new_tokens, params).median_step_s * 1000)
        greedy = min(ms["greedy"])
        out.append({"batch": batch, "greedy_ms": greedy,
                    "sampled": {name: {"ms": min(ms[name]), "ratio": min(ms[name]) / greedy} for name in SAMPLED}})
    return out


def set_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_engine_args(parser, dtype=False)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="engine runs of each setting, taking turns")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--no-engine", action="store_true")
    args = parser.parse_args()
    set_threads(args.threads)
    device = resolve_device(args.device)
    info = common.machine_info(device)
    print(common.machine_line(info))
    sampler = {batch: sampler_ms(batch, args.repeats, device) for batch in args.batches}
    backends = list(sampler[args.batches[0]])
    columns = [(b, backend) for b in args.batches for backend in backends]
    table = common.markdown_table(["setting (sampler mode)", *[f"B={b} {backend} ms" for b, backend in columns]], [
        [f"{name} ({sampling_mode([p])})", *[f"{sampler[b][backend][name]:.2f}" for b, backend in columns]]
        for name, p in SETTINGS.items()
    ])
    penalised = penalties_ms(args.repeats, device)
    table += "\n\n" + common.markdown_table(
        [f"B={PENALTY_BATCH}, Qwen's defaults: penalised rows / history tokens", "build + sample ms"],
        [[name, f"{ms:.2f}"] for name, ms in penalised.items()])
    steps = [] if args.no_engine else engine_steps(args, device)
    if steps:
        table += "\n\n" + common.markdown_table(
            ["batch", "greedy step ms", *[f"{name}: ms, ratio (target <= {TARGET_RATIO})" for name in SAMPLED]],
            [[str(s["batch"]), f"{s['greedy_ms']:.1f}",
              *[f"{s['sampled'][n]['ms']:.1f}, {s['sampled'][n]['ratio']:.2f}" for n in SAMPLED]] for s in steps],
        )
    report = f"{common.machine_line(info)}\n\n`{common.command_line()}`\n\n{table}\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sampler.md").write_text(report)
    (args.out / "bench_sampler.json").write_text(json.dumps(
        {"machine": info, "command": common.command_line(), "sampler_ms": sampler, "penalties_ms": penalised,
         "engine_steps": steps}, indent=2))


if __name__ == "__main__":
    main()
