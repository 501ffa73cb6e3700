"""Quantisation quality: each weight format's logits against the unquantised model's, same inputs.

    python profiles/quant_quality.py [--positions 320] [--quant int8 int4] [--out DIR]

Models: the test checkpoints (the 2-layer tied and untied test models, random weights) in fp32, as
transformers' Qwen3 with the weights nanoqwen quantises replaced by their dequantised values; with
NANOQWEN_QUANT the engine's greedy output equals that reference token for token (tests/test_quant.py).
Inputs: one random sequence of --positions tokens (seeded); every position's next-token logits.
Relative logit error: ||quantised - original|| / ||original|| per position, mean and max.
Top-1 agreement: the share of positions whose argmax is the same. Random weights give near-flat
logits, so top-1 agreement here is a harsh lower bound on what a trained model would show.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from checkpoints import load_hf_model, make_checkpoint  # noqa: E402
from quant_reference import DEQUANTISED, load_quantised_hf_model  # noqa: E402


@torch.no_grad()
def compare(path: Path, quant: str, positions: int) -> dict:
    ids = torch.tensor([common.random_prompts(1, positions, 0)[0]])
    original = load_hf_model(path)(ids).logits[0].float()  # [P, V]
    quantised = load_quantised_hf_model(path, quant)(ids).logits[0].float()
    rel = (quantised - original).norm(dim=-1) / original.norm(dim=-1)
    return {"rel_error_mean": rel.mean().item(), "rel_error_max": rel.max().item(),
            "top1_agreement": (quantised.argmax(-1) == original.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=320)
    parser.add_argument("--quant", nargs="+", default=list(DEQUANTISED), choices=list(DEQUANTISED))
    parser.add_argument("--out", type=Path, default=common.OUT)
    args = parser.parse_args()
    rows = []
    for name, tied in (("2-layer test model, tied", True), ("2-layer test model, untied", False)):
        for quant in args.quant:
            rows.append({"checkpoint": name, "quant": quant,
                         **compare(make_checkpoint(tie_word_embeddings=tied), quant, args.positions)})
    text = "\n".join([
        "### Quantisation quality against the unquantised model",
        "",
        f"- Command: `{common.command_line()}`; {args.positions} positions, fp32, random weights.",
        "",
        common.markdown_table(
            ["checkpoint", "quant", "relative logit error (mean)", "(max)", "top-1 agreement"],
            [[r["checkpoint"], r["quant"], f"{r['rel_error_mean']:.2e}", f"{r['rel_error_max']:.2e}",
              f"{r['top1_agreement']:.1%}"] for r in rows]),
    ])
    print(text)
    common.write_outputs(args.out, "quant_quality", {"rows": rows, "command": common.command_line()}, text)


if __name__ == "__main__":
    main()
