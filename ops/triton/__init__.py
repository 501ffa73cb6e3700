"""The Triton kernels: on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests)."""
from __future__ import annotations

import dataclasses

import torch

from ops import torch_ref
from ops.kernels import Kernels
from ops.triton.activation import silu_mul_triton
from ops.triton.decode_attention import decode_attention_triton, num_sms
from ops.triton.gemv import float_linear
from ops.triton.linear_int4 import linear_int4_triton
from ops.triton.linear_int8 import linear_int8_triton
from ops.triton.prefill_attention import prefill_attention_triton
from ops.triton.rms_norm import rms_norm_triton
from ops.triton.rope import qk_norm_rope_store_triton


def kernels(base: Kernels, device: torch.device, float_gemv: bool = False) -> Kernels:
    """`base` (the device's own set) with the ops Triton implements replaced; bf16/fp32 linears stay
    `base`'s (cuBLAS on CUDA) unless `float_gemv`, which gives decode-sized batches Triton's GEMV. The int8
    and int4 linears and paged prefill attention are Triton's."""
    if device.type == "cuda":
        num_sms(device)  # queried now, outside any torch.compile trace
    return dataclasses.replace(
        base,
        name="triton",
        rms_norm=rms_norm_triton,
        qk_norm_rope_store=qk_norm_rope_store_triton,
        decode_attention=decode_attention_triton,
        prefill_attention=prefill_attention_triton,
        silu_mul=silu_mul_triton,
        linear=float_linear(base.linear) if float_gemv else base.linear,
        linear_int8=linear_int8_triton,
        linear_int4=linear_int4_triton,
        repack_int4=torch_ref.KERNELS.repack_int4,
        # no Triton kernels for these: the references, also where `base` is the CPU set (under the interpreter)
        embedding=torch_ref.KERNELS.embedding,
        embedding_int8=torch_ref.KERNELS.embedding_int8,
        embedding_int4=torch_ref.KERNELS.embedding_int4,
        to_fp32=torch_ref.KERNELS.to_fp32,
        decode_attention_gathers=False,
        cpu_graph=False,
        compiles_at_first_launch=device.type == "cuda",
    )
