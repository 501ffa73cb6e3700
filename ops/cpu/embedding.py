"""Embedding lookups on the CPU, one C call per step for every weight format.

The torch lookups are a few ops each (the int8 and int4 tables dequantise in several), cheap but not
C calls: the CPU graph (ops/cpu/graph.py) replays only C calls, so the decode step's first op is one
too. Rows are copied or dequantised as the torch references do, to the bit. The runner's token ids are
int32; other callers' are converted.
Source: csrc/embedding.c, built by build.py.
"""
from __future__ import annotations

import torch

from ops.cpu import build, graph

KERNEL = build.CKernel("cpu_embedding", "embedding.c", ("embedding", "embedding_int8", "embedding_int4"))


def _ids(input_ids: torch.Tensor) -> torch.Tensor:
    return input_ids.reshape(-1).to(torch.int32).contiguous()


def _embedding(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    ids = _ids(input_ids)
    out = torch.empty(ids.shape[0], weight.shape[1], dtype=weight.dtype)
    with build.profiled("nanoqwen::embedding_cpu"):
        graph.call(KERNEL.lib.embedding, ids, weight, out, ids.shape[0], weight.shape[1], weight.element_size())
    return out


def _embedding_int8(input_ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    ids = _ids(input_ids)
    out = torch.empty(ids.shape[0], weight.shape[1], dtype=scale.dtype)
    with build.profiled("nanoqwen::embedding_int8_cpu"):
        graph.call(KERNEL.lib.embedding_int8, ids, weight, scale, out, ids.shape[0], weight.shape[1],
                   int(scale.dtype == torch.bfloat16))
    return out


def _embedding_int4(input_ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor) -> torch.Tensor:
    ids = _ids(input_ids)
    hidden = 2 * weight.shape[1]
    out = torch.empty(ids.shape[0], hidden, dtype=scale.dtype)
    with build.profiled("nanoqwen::embedding_int4_cpu"):
        graph.call(KERNEL.lib.embedding_int4, ids, weight, scale, offset, out, ids.shape[0], weight.shape[0], hidden,
                   hidden // scale.shape[1], int(scale.dtype == torch.bfloat16))
    return out


def _embedding_fake(input_ids, weight):
    return weight.new_empty(input_ids.numel(), weight.shape[1])


def _embedding_int8_fake(input_ids, weight, scale):
    return scale.new_empty(input_ids.numel(), weight.shape[1])


def _embedding_int4_fake(input_ids, weight, scale, offset):
    return scale.new_empty(input_ids.numel(), 2 * weight.shape[1])


_embedding_op = build.kernel_op("embedding_cpu", _embedding, _embedding_fake)
_embedding_int8_op = build.kernel_op("embedding_int8_cpu", _embedding_int8, _embedding_int8_fake)
_embedding_int4_op = build.kernel_op("embedding_int4_cpu", _embedding_int4, _embedding_int4_fake)


def embedding_cpu(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.torch_ref.embedding.embedding_torch; weight contiguous."""
    return _embedding_op(input_ids, weight).view(*input_ids.shape, weight.shape[1])


def embedding_int8_cpu(input_ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.torch_ref.embedding.embedding_int8_torch; scale bf16 or fp32."""
    return _embedding_int8_op(input_ids, weight, scale).view(*input_ids.shape, weight.shape[1])


def embedding_int4_cpu(input_ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor) -> torch.Tensor:
    """Same contract as ops.torch_ref.embedding.embedding_int4_torch; scale and offset bf16 or fp32; weight in
    linear_int4's layout (linear_int4.repack)."""
    return _embedding_int4_op(input_ids, weight, scale, offset).view(*input_ids.shape, 2 * weight.shape[1])
