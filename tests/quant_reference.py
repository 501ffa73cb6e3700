"""The torch reference of a quantised model: transformers' model with every weight nanoqwen quantises
replaced by its dequantised value (the same rounding as nanoqwen/quant.py), and optionally its int4 linears computed
as the kernels compute them (int4_linears_as_kernels)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoints import load_hf_model
from nanoqwen.quant import GROUP_SIZE, quantize_int4_into, quantize_int8_into
from ops.torch_ref.act_block8 import act_block8
from ops.torch_ref.linear_int4 import dequantize_int4, unpack_int4


def dequantised_int8(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=dtype)
    quantize_int8_into(weight, q, scale)
    return q.float() * scale.float().unsqueeze(1)


def quantised_int4(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight: [N, K] -> nanoqwen's int4 of it: packed [N, K / 2] uint8, scale and offset [N, K / G] in `dtype`."""
    n, k = weight.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scale, offset = (torch.empty(n, k // GROUP_SIZE, dtype=dtype) for _ in range(2))
    quantize_int4_into(weight, packed, scale, offset)
    return packed, scale, offset


def dequantised_int4(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_int4(*quantised_int4(weight, dtype))


# weight, the dtype of its scales (and offsets) -> its dequantised value, fp32
DEQUANTISED = {"int8": dequantised_int8, "int4": dequantised_int4}


def load_quantised_hf_model(path: Path, quant: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' model of the checkpoint in `dtype` with `quant`-dequantised linear and embedding weights, their
    scales in `dtype` as the engine keeps them."""
    model = copy.deepcopy(load_hf_model(path))  # deepcopy keeps a tied LM head tied
    modules = [model.model.embed_tokens, model.lm_head, *model.model.layers.modules()]
    # by identity: a tied LM head is the embedding's table, quantised once as the engine does (twice, it took half of
    # a tied checkpoint's reference: 151936 rows)
    weights = {id(m.weight): m.weight for m in modules if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    with torch.no_grad():
        for weight in weights.values():
            weight.copy_(DEQUANTISED[quant](weight, dtype))
    return model.to(dtype)


@dataclass
class ActivationRounding:
    """What int4_linears_as_kernels' hooks read at each call: `block` columns an int8 scale covers (0: the row; None:
    the activations exact). Set between calls, one model serves each rounding."""
    block: int | None


def int4_linears_as_kernels(model: torch.nn.Module, original: torch.nn.Module, dtype: torch.dtype,
                            block: int | None) -> ActivationRounding:
    """model's linears (forward hooks) as the int4 kernels compute them from `original`'s weights quantised with
    scales and offsets in `dtype`: the nibbles times the scales take the activations rounded to int8 (act_block8,
    `block` columns a scale, 0 the row; None: exact), the group offsets the exact activations (y = W x_q + O (x - x_q),
    O each column's group offset); in float64, the output in the activations' dtype. Returns the rounding the hooks
    read."""
    rounding = ActivationRounding(block)
    weights = dict(original.named_modules())
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        packed, scale, offset = quantised_int4(weights[name].weight, dtype)
        levels = unpack_int4(packed).double() * scale.double().repeat_interleave(GROUP_SIZE, dim=1)
        offsets = offset.double().repeat_interleave(GROUP_SIZE, dim=1)  # [N, K]

        def hook(module, args, output, levels=levels, offsets=offsets):
            x = args[0]
            rounded = x.double() if rounding.block is None else act_block8(x, rounding.block)
            return (F.linear(rounded, levels) + F.linear(x.double(), offsets)).to(x.dtype)
        module.register_forward_hook(hook)
    return rounding
