"""The torch references of every op: the contract each backend matches, and the kernels wherever no
other backend runs (MPS, CUDA without Triton, shapes the CPU kernels do not take)."""
from __future__ import annotations

import torch.nn.functional as F

from ops.kernels import Kernels
from ops.torch_ref.activation import silu_mul_torch
from ops.torch_ref.convert import to_fp32_torch
from ops.torch_ref.decode_attention import decode_attention_torch
from ops.torch_ref.embedding import embedding_int4_torch, embedding_int8_torch, embedding_torch
from ops.torch_ref.linear_int4 import linear_int4_torch, repack_int4_torch
from ops.torch_ref.linear_int8 import linear_int8_torch
from ops.torch_ref.prefill_attention import prefill_attention_torch
from ops.torch_ref.rms_norm import rms_norm_torch
from ops.torch_ref.rope import qk_norm_rope_store_torch

KERNELS = Kernels(
    name="torch",
    rms_norm=rms_norm_torch,
    qk_norm_rope_store=qk_norm_rope_store_torch,
    decode_attention=decode_attention_torch,
    prefill_attention=prefill_attention_torch,
    linear=F.linear,
    linear_int8=linear_int8_torch,
    linear_int4=linear_int4_torch,
    repack_int4=repack_int4_torch,
    silu_mul=silu_mul_torch,
    embedding=embedding_torch,
    embedding_int8=embedding_int8_torch,
    embedding_int4=embedding_int4_torch,
    to_fp32=to_fp32_torch,
    decode_attention_gathers=True,
    cpu_graph=False,
)
