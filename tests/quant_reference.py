"""The torch reference of a quantised model: transformers' model with every weight nanoqwen quantises
replaced by its dequantised value (the same rounding as nanoqwen/quant.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from checkpoints import load_hf_model
from nanoqwen.quant import GROUP_SIZE, quantize_int4_into, quantize_int8_into
from ops.torch_ref.linear_int4 import dequantize_int4


def dequantised_int8(weight: torch.Tensor) -> torch.Tensor:
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=weight.dtype)
    quantize_int8_into(weight, q, scale)
    return q.to(weight.dtype) * scale.unsqueeze(1)


def dequantised_int4(weight: torch.Tensor) -> torch.Tensor:
    n, k = weight.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale, offset = (torch.empty(n, k // GROUP_SIZE, dtype=weight.dtype) for _ in range(2))
    quantize_int4_into(weight, packed, scale, offset)
    return dequantize_int4(packed, scale, offset).to(weight.dtype)


DEQUANTISED = {"int8": dequantised_int8, "int4": dequantised_int4}


def load_quantised_hf_model(path: Path, quant: str) -> torch.nn.Module:
    """transformers' fp32 model of the checkpoint with `quant`-dequantised linear and embedding weights."""
    model = copy.deepcopy(load_hf_model(path))  # deepcopy keeps a tied LM head tied
    with torch.no_grad():
        for module in [model.model.embed_tokens, model.lm_head, *model.model.layers.modules()]:
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(DEQUANTISED[quant](module.weight))
    return model

