"""The CPU kernels: small C kernels (csrc/, AVX2 or AVX-512, one thread pool) built on first use, each taken where it
built and serves the model's dtype and shapes, the torch reference elsewhere."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ops import torch_ref
from ops.cpu import (
    attention,
    dequant,
    embedding,
    graph,
    linear,
    linear_int4,
    linear_int8,
    norm_rope,
    pointwise,
    prefill_attention,
    sample,
)
from ops.kernels import Kernels

C_KERNELS = (linear.KERNEL, linear_int8.KERNEL, linear_int4.KERNEL, attention.KERNEL, norm_rope.KERNEL,
             prefill_attention.KERNEL, embedding.KERNEL, pointwise.KERNEL, sample.KERNEL, dequant.KERNEL, graph.KERNEL)


def kernels(dtype: torch.dtype, *, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
            enabled: bool = True, isa: str = "auto", cache_dir: Path | None = None) -> Kernels:
    """Builds the C kernels now (or loads them from `cache_dir`) for the cpu_isa `isa`, running the C compiler; with
    `enabled` False, the torch references alone."""
    ref = torch_ref.KERNELS
    if not enabled:
        return ref
    for kernel in C_KERNELS:
        kernel.build(cache_dir, isa)
    if dtype not in (torch.bfloat16, torch.float32):
        return ref
    norms = norm_rope.KERNEL.ready and norm_rope.takes_norm(hidden_size)
    ropes = norm_rope.KERNEL.ready and norm_rope.takes_rope(head_dim)
    attends = attention.KERNEL.ready and attention.takes(head_dim, num_heads // num_kv_heads)
    embeds = embedding.KERNEL.ready
    prefills = prefill_attention.KERNEL.ready and prefill_attention.takes(head_dim, num_heads // num_kv_heads)
    # int4 weights are read by three C files (decode, prefill, embedding) in one layout (linear_int4.repack), which the
    # references do not read: all three, or the references
    int4 = linear_int4.KERNEL.ready and dequant.KERNEL.ready and embeds
    return dataclasses.replace(
        ref,
        rms_norm=norm_rope.rms_norm_cpu if norms else ref.rms_norm,
        qk_norm_rope_store=norm_rope.qk_norm_rope_store_cpu if ropes else ref.qk_norm_rope_store,
        decode_attention=attention.decode_attention_cpu if attends else ref.decode_attention,
        prefill_attention=prefill_attention.prefill_attention_cpu if prefills else ref.prefill_attention,
        linear=linear.linear,
        linear_int8=linear_int8.linear_int8,
        linear_int4=linear_int4.linear_int4 if int4 else ref.linear_int4,
        repack_int4=linear_int4.repack if int4 else ref.repack_int4,
        silu_mul=pointwise.silu_mul_cpu if pointwise.KERNEL.ready else ref.silu_mul,
        to_fp32=pointwise.to_fp32_cpu if pointwise.KERNEL.ready else ref.to_fp32,
        embedding=embedding.embedding_cpu if embeds else ref.embedding,
        embedding_int8=embedding.embedding_int8_cpu if embeds else ref.embedding_int8,
        embedding_int4=embedding.embedding_int4_cpu if int4 else ref.embedding_int4,
        decode_attention_gathers=not attends,
        # int4 where its kernel did not build keeps the reference: its steps stay eager (GraphRunner)
        cpu_graph=norms and ropes and attends and embeds and pointwise.KERNEL.ready and linear.KERNEL.ready
        and linear_int8.KERNEL.ready,
    )
