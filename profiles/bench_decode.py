"""Decode throughput: our engine vs transformers.generate, same random weights, dtype and shapes.

    python profiles/bench_decode.py [--dtypes bfloat16 float32] [--batches 1 8 32] [--new-tokens 64]
        [--prompt-len 32] [--graph auto|none|compile|cudagraph|cpugraph] [--kernels auto|torch|triton]
        [--quant none int8 int4] [--hf-cache best|dynamic|static|none] [--float-gemv] [--cpu-isa auto|avx2|avx512]
        [--device auto] [--small] [--out DIR]

--float-gemv: with the Triton kernels, bf16/fp32 linears of decode steps of at most 8 rows by Triton's GEMV
instead of cuBLAS (NANOQWEN_FLOAT_GEMV), for an A/B against a run without it. --cpu-isa: the cap on the C kernels'
instructions (default: NANOQWEN_CPU_ISA's, as every profile's engine takes it: common.load_engine).

The engine's KV pool and prefill budget hold the whole batch at --prompt-len + --new-tokens, so long
contexts run too (profiles/common.py, load_engine's hold_batch).

Weights: a random checkpoint of Qwen3-0.6B's shape in bf16 (built once under .cache/; --small: the
2-layer test model), loaded by both engines in each --dtypes entry. Both decode greedily from the
same B distinct random prompts of --prompt-len tokens, --new-tokens each, ignoring EOS.

Method: decode is timed apart from prefill, step by step. Ours: the prefill step (which yields the
first token) is not timed; each later `Engine.step()` is. transformers: a streamer stamps the time
each token reaches the host; the intervals after the first token are its decode steps. Tokens/s =
B / median step time, robust to a shared machine's noise (the JSON also has the mean). Before
timing, each batch runs once (in full where a compiled shape depends on the context length).
transformers runs with its default (dynamic) cache and with a static cache (auto-compiled on CUDA);
`best` reports the faster per row and names it; `none` skips transformers (its columns stay empty),
for quick before/after runs of our own kernels. The last column compares the two greedy outputs:
sequences identical, and the mean number of leading tokens they share (in bf16 the two round
differently, so near-tied logits of random weights can diverge).

Bandwidth: the best of 7 sums over a 1 GiB fp32 tensor (on the CPU in huge pages, as the weights are).
The batch-1 limit is that bandwidth over the bytes one token must read: every weight once (a tied
embedding once, by the LM head) plus one embedding row; the KV cache read is left out (under 1% at these contexts).
--quant: nanoqwen runs once per weight format in each dtype (transformers runs its dtype's weights);
the limits table has a row per (dtype, quant) with its resident weight bytes.
Writes bench_decode.{json,md} and, if matplotlib imports, bench_decode.png into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from nanoqwen.choices import CPU_ISAS, DTYPE_NAMES, GRAPHS, QUANTS  # noqa: E402
from nanoqwen.config import resolve_device  # noqa: E402

TARGET_VS_HF, TARGET_OF_LIMIT, TARGET_BATCH8 = 2.0, 0.70, 4.0
WARMUP_TOKENS = 4


class _Stamps:
    """A transformers streamer that records when each generated token reaches the host."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:  # the first put is the prompt
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def bench_ours(model: Path, device: torch.device, dtype: str, quant: str, prompts: dict,
               args) -> tuple[dict, int, int, str]:
    """({batch: DecodeRun}, weight bytes per token, resident weight bytes, graph mode used)."""
    engine = common.load_engine(
        model, device=str(device), dtype=dtype, graph=args.graph, kernels=args.kernels,
        max_batch=max(args.batches), max_model_len=args.prompt_len + args.new_tokens, quant=quant, hold_batch=True,
        float_gemv=args.float_gemv, cpu_isa=args.cpu_isa,
    )
    graph = engine.info()["graph"]
    # A compiled step may recompile as the block-table width grows with the context: warm up in full.
    warmup = args.new_tokens if graph == "compile" else WARMUP_TOKENS
    runs = {}
    for batch, (warm, timed) in prompts.items():
        common.engine_decode(engine, warm, warmup)
        before = common.core_pair_ns()
        run = common.engine_decode(engine, timed, args.new_tokens)
        runs[batch] = dataclasses.replace(run, core_pair_ns=(before, common.core_pair_ns()))
        print(f"  nanoqwen {dtype} quant={quant} batch {batch}: {run.tokens_per_s:.1f} tok/s "
              f"(core pair {pair_text(runs[batch].core_pair_ns)} ns)", flush=True)
    weights = common.weight_bytes_per_token(engine.runner.model)
    resident = common.resident_weight_bytes(engine.runner.model)
    engine.shutdown()
    del engine
    common.release(device)
    return runs, weights, resident, graph


def hf_generate(hf, prompts: list[list[int]], new_tokens: int, cache: str, pad_id: int) -> common.DecodeRun:
    ids = torch.tensor(prompts, device=hf.device)
    stamps = _Stamps()
    out = hf.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, streamer=stamps, pad_token_id=pad_id,
        **({"cache_implementation": "static"} if cache == "static" else {}),
    )
    steps = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
    return common.DecodeRun(len(prompts), steps, out[:, ids.shape[1]:].tolist())


def pair_text(ns: tuple[int | None, ...]) -> str:
    return "/".join("–" if n is None else str(n) for n in ns)


def bench_hf(model: Path, device: torch.device, dtype: str, prompts: dict, args) -> dict:
    """{(cache, batch): DecodeRun} for each cache implementation asked for."""
    from transformers import AutoModelForCausalLM

    # Cast after loading: the dtype keyword's name differs between transformers 4 and 5.
    hf = AutoModelForCausalLM.from_pretrained(model).to(device=device, dtype=getattr(torch, dtype)).eval()
    pad_id = hf.generation_config.pad_token_id or 0
    if args.hf_cache == "none":
        return {}
    caches = ("dynamic", "static") if args.hf_cache == "best" else (args.hf_cache,)
    runs = {}
    for cache in caches:
        # On CUDA transformers compiles the forward for a static cache of the full length.
        full = cache == "static" and device.type == "cuda"
        for batch, (warm, timed) in prompts.items():
            hf_generate(hf, warm, args.new_tokens if full else WARMUP_TOKENS, cache, pad_id)
            runs[cache, batch] = hf_generate(hf, timed, args.new_tokens, cache, pad_id)
            print(f"  transformers {dtype} {cache} cache batch {batch}: "
                  f"{runs[cache, batch].tokens_per_s:.1f} tok/s", flush=True)
    del hf
    common.release(device)
    return runs


def theirs_best(theirs: dict, batch: int) -> float | None:
    return max((r.tokens_per_s for (c, b), r in theirs.items() if b == batch), default=None)


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(args) -> dict:
    device = resolve_device(args.device)
    model = common.checkpoint(args.small)
    info = common.machine_info(device)
    before = common.core_pair_ns()
    bandwidth = common.read_bandwidth(device)
    pair = before, common.core_pair_ns()
    print(f"{common.machine_line(info)}\nread bandwidth {bandwidth / 1e9:.1f} GB/s (core pair {pair_text(pair)} ns)"
          f"\ncheckpoint {model}", flush=True)
    prompts = {
        b: (common.random_prompts(b, args.prompt_len, 1000 + b), common.random_prompts(b, args.prompt_len, b))
        for b in args.batches
    }
    rows, summaries = [], []
    for dtype in args.dtypes:
        # the weight formats back to back: their ratios are what a shared machine's drift would blur
        ours_by_quant = {quant: bench_ours(model, device, dtype, quant, prompts, args) for quant in args.quant}
        theirs = bench_hf(model, device, dtype, prompts, args)
        rows += dtype_rows(dtype, ours_by_quant, theirs)
        summaries += [summary(dtype, quant, ours, weights, resident, theirs, bandwidth)
                      for quant, (ours, weights, resident, _) in ours_by_quant.items()]
    return {"machine": info, "command": common.command_line(), "checkpoint": str(model),
            "model": "2-layer test model" if args.small else "Qwen3-0.6B shape",
            "read_bandwidth_bytes_s": bandwidth, "bandwidth_core_pair_ns": pair,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "rows": rows, "summary": summaries}


def dtype_rows(dtype: str, ours_by_quant: dict, theirs: dict) -> list[dict]:
    rows = []
    for quant, (ours, _, _, graph) in ours_by_quant.items():
        for batch, run in ours.items():
            row = {"dtype": dtype, "quant": quant, "batch": batch, "graph": graph,
                   "ours_tok_s": run.tokens_per_s, "ours_mean_tok_s": run.mean_tokens_per_s,
                   "ours_ms_step": run.median_step_s * 1e3, "core_pair_ns": list(run.core_pair_ns)}
            mine = [(c, r) for (c, b), r in theirs.items() if b == batch]
            if mine:
                cache, hf = max(mine, key=lambda cr: cr[1].tokens_per_s)
                row |= {
                    "hf_cache": cache, "hf_tok_s": hf.tokens_per_s, "hf_mean_tok_s": hf.mean_tokens_per_s,
                    "hf_ms_step": hf.median_step_s * 1e3, "hf_all_tok_s": {c: r.tokens_per_s for c, r in mine},
                    "ratio": run.tokens_per_s / hf.tokens_per_s,
                    "greedy_identical": sum(a == b for a, b in zip(run.tokens, hf.tokens)),
                    "greedy_shared_prefix": sum(map(shared_prefix, run.tokens, hf.tokens)) / batch,
                }
            rows.append(row)
    return rows


def summary(dtype: str, quant: str, ours: dict, weights: int, resident: int, theirs: dict, bandwidth: float) -> dict:
    limit = bandwidth / weights
    result = {"dtype": dtype, "quant": quant, "weight_bytes_per_token": weights, "resident_weight_bytes": resident,
              "batch1_limit_tok_s": limit}
    if 1 in ours:
        result |= {"batch1_tok_s": ours[1].tokens_per_s, "batch1_of_limit": ours[1].tokens_per_s / limit}
        if theirs_best(theirs, 1):
            result["batch1_vs_hf"] = ours[1].tokens_per_s / theirs_best(theirs, 1)
    if 1 in ours and 8 in ours:
        result["batch8_over_batch1"] = ours[8].tokens_per_s / ours[1].tokens_per_s
    return result


def markdown(result: dict) -> str:
    def hf(r: dict) -> list[str]:
        if "hf_tok_s" not in r:
            return ["–"] * 5
        return [f"{r['hf_tok_s']:.1f}", r["hf_cache"], f"{r['hf_ms_step']:.1f}", f"{r['ratio']:.2f}×",
                f"{r['greedy_identical']}/{r['batch']} · {r['greedy_shared_prefix']:.1f}"]

    rows = [[r["dtype"], r["quant"], str(r["batch"]), f"{r['ours_tok_s']:.1f}", f"{r['ours_ms_step']:.1f}",
             pair_text(tuple(r["core_pair_ns"])), *hf(r)] for r in result["rows"]]
    table = common.markdown_table(
        ["dtype", "quant", "batch", "nanoqwen tok/s", "ms/step", "core pair ns", "transformers tok/s", "HF cache",
         "ms/step", "ratio", "identical outputs · mean shared prefix"], rows)

    def fmt(s: dict, key: str, spec: str, suffix: str = "") -> str:
        return format(s[key], spec) + suffix if key in s else "–"

    limits = common.markdown_table(
        ["dtype", "quant", "resident weights", "weights read/token", "batch-1 limit tok/s", "batch-1 tok/s", "of limit",
         f"batch-1 vs HF (≥{TARGET_VS_HF:g}×)", f"batch-8 / batch-1 (≥{TARGET_BATCH8:g}×)"],
        [[s["dtype"], s["quant"], f"{s['resident_weight_bytes'] / 1e9:.3f} GB",
          f"{s['weight_bytes_per_token'] / 1e9:.3f} GB", f"{s['batch1_limit_tok_s']:.1f}",
          fmt(s, "batch1_tok_s", ".1f"), fmt(s, "batch1_of_limit", ".0%"), fmt(s, "batch1_vs_hf", ".2f", "×"),
          fmt(s, "batch8_over_batch1", ".2f", "×")] for s in result["summary"]])
    graph = result["rows"][0]["graph"] if result["rows"] else "?"
    return "\n".join([
        "### Decode throughput: nanoqwen vs transformers",
        "",
        f"- Machine: {common.machine_line(result['machine'])}",
        f"- Command: `{result['command']}`",
        f"- {result['model']}, random weights; prompt {result['prompt_len']} tokens, "
        f"{result['new_tokens']} new tokens, greedy; nanoqwen graph mode "
        f"`{graph}`. Tokens/s = batch / median decode-step time (prefill excluded).",
        f"- Memory read bandwidth: {result['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s (best of 7 sums of a 1 GiB "
        f"fp32 tensor; core pair {pair_text(tuple(result['bandwidth_core_pair_ns']))} ns); batch-1 limit = "
        f"bandwidth / weight bytes per token (target ≥ {TARGET_OF_LIMIT:.0%}).",
        "- Core pair: a cache line's round trip between the two CPUs before / after each timed run (common.core_pair_ns"
        "; on the Zen 5 KVM ~77 ns: the host holds both vCPUs on one CCD, the slow state; ~340: on two, the fast one).",
        "",
        table,
        "",
        limits,
    ])


def plot(result: dict, path: Path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (dtype, quant) in enumerate(dict.fromkeys((r["dtype"], r["quant"]) for r in result["rows"])):
        mine = [r for r in result["rows"] if (r["dtype"], r["quant"]) == (dtype, quant)]
        batches, color, name = [r["batch"] for r in mine], f"C{i}", dtype if quant == "none" else f"{dtype} {quant}"
        ax.plot(batches, [r["ours_tok_s"] for r in mine], marker="o", color=color, label=f"nanoqwen {name}")
        if quant == "none" and all("hf_tok_s" in r for r in mine):
            ax.plot(batches, [r["hf_tok_s"] for r in mine], marker="s", linestyle="--", color=color,
                    label=f"transformers {dtype}")
        limit = next(s["batch1_limit_tok_s"] for s in result["summary"] if (s["dtype"], s["quant"]) == (dtype, quant))
        ax.axhline(limit, color=color, linewidth=0.8, linestyle=":")
        ax.text(0.01, limit, f"batch-1 weight-read limit, {name}", color=color, fontsize=7, va="bottom",
                transform=ax.get_yaxis_transform())
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("decode tokens/s (aggregate)")
    ax.set_title(f"Decode, {result['model']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=DTYPE_NAMES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--graph", default="auto", choices=GRAPHS)
    parser.add_argument("--quant", nargs="+", default=["none"], choices=QUANTS)
    parser.add_argument("--hf-cache", default="best", choices=["best", "dynamic", "static", "none"])
    parser.add_argument("--float-gemv", action="store_true", help="float linears of <= 8 rows by Triton's GEMV")
    parser.add_argument("--cpu-isa", choices=CPU_ISAS, help="the C kernels' instruction cap (else NANOQWEN_CPU_ISA's)")
    common.add_engine_args(parser, dtype=False)
    args = parser.parse_args()
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3 (two decode steps after the prefill's token)")

    result = measure(args)
    text = markdown(result)
    print("\n" + text)
    common.write_outputs(args.out, "bench_decode", result, text)
    if plot(result, args.out / "bench_decode.png"):
        print(f"\nplot: {args.out / 'bench_decode.png'}")
    print(f"results: {args.out / 'bench_decode.json'}, {args.out / 'bench_decode.md'}")


if __name__ == "__main__":
    main()
