"""What a constrained row costs a decode step: batch 8 with no constrained row against one row under a
JSON-schema grammar (and one with a logit_bias, one short of its min_tokens, one with allowed_token_ids),
the other rows sampled with Qwen3's defaults.

    python profiles/bench_grammar.py [--batch 8] [--new-tokens 24] [--rounds 3] [--threads N]
        [--device auto] [--small] [--out DIR]

Whole engine decode steps (`Engine.step()`, as bench_decode.py times them) on the random 0.6B-shaped
bf16 checkpoint (--small: the 2-layer test model). The cases take turns within each round, so a
shared machine's load falls on all alike; ms = the median step over every round. The constrained
row's schema (an array of at least 1000 small objects) keeps it under the grammar for the whole run,
cycling through keys, numbers, enums and short strings. Also timed: llguidance's mask fill per
constrained row per step. Target: one constrained row adds at most 10% to the step.
Writes bench_grammar.{json,md} into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_sampler import rows as sampling_rows  # noqa: E402
from nanoqwen.engine import Engine, SamplingParams  # noqa: E402
from nanoqwen.engine.grammar import Grammar, RowGrammar  # noqa: E402
from nanoqwen.runner.sampling import LogitAdjuster, sampling_mode  # noqa: E402
from nanoqwen.sampler import LogitAdjust, sample  # noqa: E402

TARGET_RATIO = 1.10
QWEN = SamplingParams(temperature=0.7, top_p=0.95, top_k=20)
ITEM = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 10_000}, "name": {"type": "string", "maxLength": 8},
    "kind": {"enum": ["a", "b", "c"]}, "ok": {"type": "boolean"}},
    "required": ["id", "name", "kind", "ok"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 1000}
FILL_S: list[float] = []


def _timed_masks(compute):  # noqa: ANN001, ANN202 - wraps LogitAdjuster._compute_masks to time it
    """Each step's matcher masks (llguidance's calls), where a row computed one."""
    def timed(self: LogitAdjuster, pending: list) -> None:
        start = time.perf_counter()
        compute(self, pending)
        if pending:
            FILL_S.append(time.perf_counter() - start)
    return timed


@torch.inference_mode()
def sampler_ms(batch: int, vocab: int, grammar: Grammar, repeats: int = 30) -> dict[str, float]:
    """Median ms of `sample` on [batch, vocab] logits (Qwen's defaults): plain, with one row masked by
    the grammar's first step and ten biases on another, and with every row's two EOS ids banned
    (min_tokens not reached), interleaved."""
    logits = torch.randn(batch, vocab) * 3
    settings, mode = sampling_rows(QWEN, batch, torch.device("cpu")), sampling_mode([QWEN])
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    RowGrammar.of(grammar, None, []).fill_start(bitmask, 0)  # its compiled first mask, as a first step copies it
    adjust = LogitAdjust(torch.zeros(10, dtype=torch.int64), torch.arange(10), torch.full((10,), 5.0),
                         torch.tensor([batch - 1]), bitmask)
    eos = torch.tensor([151643, 151645] * batch)
    banned = LogitAdjust(torch.arange(batch).repeat_interleave(2), eos, torch.full((2 * batch,), float("-inf")),
                         torch.zeros(0, dtype=torch.int64), bitmask[:0])
    adjusts = {"plain": None, "adjusted": adjust, "min_tokens": banned}
    times: dict[str, list[float]] = {name: [] for name in adjusts}
    for repeat in range(repeats + 1):  # the first round warms up
        for name in times:
            start = time.perf_counter()
            sample(logits, settings, mode, adjust=adjusts[name])
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def decode(engine: Engine, prompts: list[list[int]], new_tokens: int, special: SamplingParams | None) -> list[float]:
    """Step times of a batch whose last row uses `special` (None: like the others)."""
    free = dataclasses.replace(QWEN, max_tokens=new_tokens, ignore_eos=True, seed=1)
    last = free if special is None else dataclasses.replace(special, max_tokens=new_tokens, seed=1)
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, last if i == len(prompts) - 1 else free, split_reasoning=False)
    return common.decode_steps(engine, len(prompts))


def main() -> None:
    def extra_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--new-tokens", type=int, default=24)
        parser.add_argument("--rounds", type=int, default=3)

    args, info, engine = common.batch_bench_setup(__doc__, extra_args)
    start = time.perf_counter()
    grammar = engine.grammars.json_schema(SCHEMA, strict=True, param="response_format")
    compile_s = time.perf_counter() - start
    cases = {"no constrained row": None,
             "one JSON-schema row": dataclasses.replace(QWEN, grammar=grammar),
             "one logit_bias row (10 entries)": dataclasses.replace(QWEN, logit_bias={i: 5.0 for i in range(10)}),
             "one row short of its min_tokens": dataclasses.replace(QWEN, min_tokens=args.new_tokens),
             "one allowed_token_ids row (1000 ids)": dataclasses.replace(QWEN, allowed_token_ids=list(range(1000)))}
    LogitAdjuster._compute_masks = _timed_masks(LogitAdjuster._compute_masks)
    prompts = common.random_prompts(args.batch, 16, seed=0)
    decode(engine, prompts, 4, None)  # warm-up
    steps: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, special in cases.items():
            steps[name] += decode(engine, prompts, args.new_tokens, special)
    sampler = sampler_ms(args.batch, engine.model_config.vocab_size, grammar)
    base = statistics.median(steps["no constrained row"]) * 1000
    rows = [{"case": name, "step_ms": statistics.median(s) * 1000, "ratio": statistics.median(s) * 1000 / base}
            for name, s in steps.items()]
    result = {"machine": info, "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "grammar_compile_s": compile_s, "mask_fill_ms_median": statistics.median(FILL_S) * 1000,
              "mask_fill_ms_max": max(FILL_S) * 1000, "sampler_ms": sampler, "cases": rows}
    table = common.markdown_table(["batch-8 decode step", "median ms", f"ratio (target <= {TARGET_RATIO})"],
                                  [[r["case"], f"{r['step_ms']:.1f}", f"{r['ratio']:.3f}"] for r in rows])
    table += (f"\n\nmask fill per constrained row per step: median {result['mask_fill_ms_median']:.2f} ms, "
              f"max {result['mask_fill_ms_max']:.2f} ms; the schema's compile {compile_s * 1000:.1f} ms; "
              f"the sampler alone (batch {args.batch}, Qwen's defaults): "
              f"{sampler['plain']:.2f} ms plain, {sampler['adjusted']:.2f} ms with one masked and one biased row, "
              f"{sampler['min_tokens']:.2f} ms with every row's EOS ids banned")
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_grammar.json").write_text(json.dumps(result, indent=2))
    (args.out / "bench_grammar.md").write_text(common.machine_line(info) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
