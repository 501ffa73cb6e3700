"""Quantisation quality: each weight format's logits against the unquantised model's, same inputs.

    python profiles/quant_quality.py [--positions 320] [--quant int8 int4]
                                     [--int4-activations exact int8-block int8-row] [--out DIR]

Models: the test checkpoints (the 2-layer tied and untied test models, random weights) in fp32, as
transformers' Qwen3 with the weights nanoqwen quantises replaced by their dequantised values; with
NANOQWEN_QUANT the engine's greedy output equals that reference token for token (tests/test_quant.py).
Inputs: one random sequence of --positions tokens (seeded); every position's next-token logits.
Relative logit error: ||quantised - original|| / ||original|| per position, mean and max.
Top-1 agreement: the share of positions whose argmax is the same. Random weights give near-flat
logits, so top-1 agreement here is a harsh lower bound on what a trained model would show.
--int4-activations: what int4 linears' activations cost rounded to int8: int8-block, one scale a 64-column block
(max |x| / 127), as the AVX2 kernel rounds bf16 rows (csrc/act_block8.h, its torch reference
ops/torch_ref/act_block8.py, which tests/test_cpu_linear_int4.py checks the kernel against; profiles/RESULTS.md,
lanes int4b8 and int4il); int8-row, one a row. As that kernel computes (tests/quant_reference.py's
int4_linears_as_kernels): the nibbles times the scales take the rounded activations, the group offsets the exact
ones.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from checkpoints import load_hf_model, make_checkpoint  # noqa: E402
from quant_reference import DEQUANTISED, int4_linears_as_kernels, load_quantised_hf_model  # noqa: E402

ACTIVATION_BLOCK = {"exact": None, "int8-block": 64, "int8-row": 0}  # columns an int8 scale covers (0: the row)


@torch.no_grad()
def compare(path: Path, quant: str, positions: int, activations: str = "exact") -> dict:
    ids = torch.tensor([common.random_prompts(1, positions, 0)[0]])
    unquantised = load_hf_model(path)
    original = unquantised(ids).logits[0].float()  # [P, V]
    model = load_quantised_hf_model(path, quant)
    if ACTIVATION_BLOCK[activations] is not None:
        assert quant == "int4", "the activations' rounding models the int4 kernel (its offsets)"
        int4_linears_as_kernels(model, unquantised, torch.float32, ACTIVATION_BLOCK[activations])
    quantised = model(ids).logits[0].float()
    rel = (quantised - original).norm(dim=-1) / original.norm(dim=-1)
    return {"rel_error_mean": rel.mean().item(), "rel_error_max": rel.max().item(),
            "top1_agreement": (quantised.argmax(-1) == original.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=320)
    parser.add_argument("--quant", nargs="+", default=list(DEQUANTISED), choices=list(DEQUANTISED))
    parser.add_argument("--int4-activations", nargs="+", default=["exact"], choices=list(ACTIVATION_BLOCK))
    parser.add_argument("--out", type=Path, default=common.OUT)
    args = parser.parse_args()
    rows = []
    for name, tied in (("2-layer test model, tied", True), ("2-layer test model, untied", False)):
        for quant in args.quant:
            for activations in args.int4_activations if quant == "int4" else ["exact"]:
                label = quant if activations == "exact" else f"{quant}, {activations} activations"
                rows.append({"checkpoint": name, "quant": label, **compare(
                    make_checkpoint(tie_word_embeddings=tied), quant, args.positions, activations)})
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
