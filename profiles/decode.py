"""Decode tokens/s per batch bucket in each execution mode: eager, torch.compile, CUDA or CPU graphs.

    python profiles/decode.py [--modes none compile cudagraph cpugraph] [--max-batch 32] [--new-tokens 32]
        [--prompt-len 32] [--dtype auto] [--kernels auto] [--device auto] [--small] [--out DIR]

For each mode one engine (NANOQWEN_GRAPH=mode) decodes, at every bucket 1, 2, 4, ... --max-batch,
that many random prompts greedily; each bucket runs once untimed first (for `compile` in full, so
every shape it meets is compiled: cold, that takes minutes on a small CPU), then timed step by step
as in bench_decode.py: tokens/s = bucket / median decode-step time. Modes default to none and
compile, plus cudagraph on CUDA or cpugraph on the CPU. The table also says whether each mode's
greedy tokens equal the eager ones. Writes decode.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.choices import GRAPHS  # noqa: E402
from nanoqwen.config import resolve_device  # noqa: E402
from nanoqwen.runner import batch_buckets  # noqa: E402
from ops.cpu import build as cpu_build  # noqa: E402

WARMUP_TOKENS = 4


def bench_mode(mode: str, model: Path, args) -> list[dict]:
    engine = common.load_engine(
        model, device=args.device, dtype=args.dtype, graph=mode, kernels=args.kernels,
        max_batch=args.max_batch, max_model_len=args.prompt_len + args.new_tokens, hold_batch=True,
    )
    # A compiled step may recompile as the block-table width grows with the context: warm up in full.
    warmup = args.new_tokens if mode == "compile" else min(WARMUP_TOKENS, args.new_tokens)
    rows = []
    for bucket in batch_buckets(args.max_batch):
        start = time.perf_counter()
        common.engine_decode(engine, common.random_prompts(bucket, args.prompt_len, 1000 + bucket), warmup)
        warmup_s = time.perf_counter() - start
        run = common.engine_decode(engine, common.random_prompts(bucket, args.prompt_len, bucket), args.new_tokens)
        rows.append({"mode": mode, "bucket": bucket, "tok_s": run.tokens_per_s, "mean_tok_s": run.mean_tokens_per_s,
                     "ms_step": run.median_step_s * 1e3, "warmup_s": warmup_s, "tokens": run.tokens})
        print(f"  {mode:9} bucket {bucket:3}: {run.tokens_per_s:9.1f} tok/s  {run.median_step_s * 1e3:8.2f} ms/step"
              f"  (warm-up {warmup_s:.1f} s)", flush=True)
    info = engine.info()
    del engine
    common.release(resolve_device(args.device))
    for row in rows:
        row |= {"dtype": info["dtype"], "kernels": info["kernels"]}
    return rows


def markdown(result: dict) -> str:
    modes = result["modes"]
    by_key = {(r["mode"], r["bucket"]): r for r in result["rows"]}
    header = ["bucket"] + [f"{m} tok/s" for m in modes] + [f"{m} ms/step" for m in modes]
    rows = []
    for bucket in sorted({r["bucket"] for r in result["rows"]}):
        base = by_key.get((modes[0], bucket))
        cells = [str(bucket)]
        for mode in modes:
            r = by_key[mode, bucket]
            speedup = f" ({r['tok_s'] / base['tok_s']:.2f}×)" if mode != modes[0] else ""
            same = "" if r["tokens"] == base["tokens"] else " ≠"
            cells.append(f"{r['tok_s']:.1f}{speedup}{same}")
        cells += [f"{by_key[m, bucket]['ms_step']:.2f}" for m in modes]
        rows.append(cells)
    first = result["rows"][0]
    return "\n".join([
        "### Decode tokens/s per batch bucket and graph mode",
        "",
        f"- Machine: {common.machine_line(result['machine'])}",
        f"- Command: `{result['command']}`",
        f"- {first['dtype']}, kernels `{first['kernels']}`, prompt {result['prompt_len']} tokens, "
        f"{result['new_tokens']} new tokens; tokens/s = bucket / median decode-step time; (×) vs `{modes[0]}`; "
        f"≠ marks greedy tokens that differ from `{modes[0]}`'s.",
        "",
        common.markdown_table(header, rows),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=[graph for graph in GRAPHS if graph != "auto"])
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    common.add_engine_args(parser)
    args = parser.parse_args()
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3 (two decode steps after the prefill's token)")
    device = resolve_device(args.device)
    cpugraph = [] if cpu_build.unavailable() else ["cpugraph"]  # resolve_graph refuses it without the C kernels
    modes = args.modes or ["none", "compile"] + (["cudagraph"] if device.type == "cuda" else cpugraph)

    model = common.checkpoint(args.small)
    info = common.machine_info(device)
    print(f"{common.machine_line(info)}\ncheckpoint {model}", flush=True)
    rows = [row for mode in modes for row in bench_mode(mode, model, args)]
    result = {"machine": info, "command": common.command_line(), "checkpoint": str(model), "modes": modes,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows}
    text = markdown(result)
    print("\n" + text)
    common.write_outputs(args.out, "decode", result, text)
    print(f"results: {args.out / 'decode.json'}, {args.out / 'decode.md'}")


if __name__ == "__main__":
    main()
