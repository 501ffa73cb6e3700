"""A torch.profiler Chrome trace of one engine decode step, after warm-up, and its 20 costliest ops.

    python profiles/trace_step.py [--batch 1] [--prompt-len 128] [--warmup 3] [--graph auto]
        [--dtype auto] [--kernels auto] [--device auto] [--quant none] [--small] [--out DIR]

The traced step is a full `Engine.step()` (inputs, model, sampling, detokenisation) for --batch
sequences of --prompt-len random prompt tokens. Writes trace.json (open in chrome://tracing or
ui.perfetto.dev) and trace_top_ops.txt (the table printed, by self device time on CUDA, else by
self CPU time) into --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.choices import GRAPHS, QUANTS  # noqa: E402
from nanoqwen.config import resolve_device  # noqa: E402
from nanoqwen.engine import SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3, help="decode steps before the traced one")
    parser.add_argument("--graph", default="auto", choices=GRAPHS)
    parser.add_argument("--quant", default="none", choices=QUANTS, help="weight format (NANOQWEN_QUANT)")
    common.add_engine_args(parser)
    args = parser.parse_args()

    device = resolve_device(args.device)
    new_tokens = args.warmup + 2  # the prefill's token, the warm-up steps, the traced step
    engine = common.load_engine(
        common.checkpoint(args.small), device=str(device), dtype=args.dtype, graph=args.graph,
        kernels=args.kernels, max_batch=args.batch, max_model_len=args.prompt_len + new_tokens, quant=args.quant,
    )
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for prompt in common.random_prompts(args.batch, args.prompt_len, seed=0):
        engine.submit(prompt, params)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        engine.drain_inbox()
        for _ in range(1 + args.warmup):  # prefill, then warm-up decode steps
            engine.step()
        if len(engine.scheduler.running) != args.batch:
            raise RuntimeError("not every sequence is decoding: the traced step would not be a full batch")
        common.synchronize(device)
        with profile(activities=activities, record_shapes=True) as prof, record_function("decode_step"):
            engine.step()
            common.synchronize(device)

    info = engine.info()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=20)
    header = (f"decode step: batch {args.batch}, context {args.prompt_len + args.warmup + 1}, {info['dtype']}, "
              f"graph {info['graph']}, kernels {info['kernels']}, quant {args.quant}, {info['device']}\n"
              f"{common.machine_line(common.machine_info(device))}\ncommand: {common.command_line()}\n")
    if device.type == "cuda":  # to hold against tests/test_launches.py's count (10 per layer + 5)
        on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        copies = sum(e.name.startswith(("Memcpy", "Memset")) for e in on_device)
        header += f"on the device in the step: {len(on_device) - copies} kernels, {copies} copies/memsets\n"
    print(header + table)
    args.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(args.out / "trace.json"))
    (args.out / "trace_top_ops.txt").write_text(header + table + "\n")
    print(f"trace: {args.out / 'trace.json'}")


if __name__ == "__main__":
    main()
