"""The torch reference of a quantised model: transformers' model with every weight nanoqwen quantises
replaced by its dequantised value (the same per-row rounding as nanoqwen/quant.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from checkpoints import load_hf_model
from nanoqwen.quant import quantize_int8_into


def dequantised(weight: torch.Tensor) -> torch.Tensor:
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=weight.dtype)
    quantize_int8_into(weight, q, scale)
    return q.to(weight.dtype) * scale.unsqueeze(1)


def load_int8_hf_model(path: Path) -> torch.nn.Module:
    """transformers' fp32 model of the checkpoint with int8-dequantised linear and embedding weights."""
    model = copy.deepcopy(load_hf_model(path))  # deepcopy keeps a tied LM head tied
    with torch.no_grad():
        for module in [model.model.embed_tokens, model.lm_head, *model.model.layers.modules()]:
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(dequantised(module.weight))
    return model
