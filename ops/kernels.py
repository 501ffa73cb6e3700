"""The op signatures, and the kernel set that implements them for one (device, dtype, backend).

Every backend implements the torch reference's contract (ops/torch_ref/): same arguments, same
results up to rounding. A set is chosen once, by ops.select_kernels, and held by the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class RmsNorm(Protocol):
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [..., H] -> (norm(x + residual) * weight, x + residual); without residual the second is x."""
        ...


class QkNormRopeStore(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # [N, Hq, D], may be a strided view of the fused qkv output
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,  # [N, Hkv, D]
        q_weight: torch.Tensor,  # [D]
        k_weight: torch.Tensor,  # [D]
        eps: float,
        cos_sin: torch.Tensor,  # [max_pos, D] fp32: cos | sin
        positions: torch.Tensor,  # [N] int
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        slot_mapping: torch.Tensor,  # [N] int; -1 = padded lane, writes nothing
    ) -> None:
        """In place: q, k <- rope(rmsnorm(q|k)); k/v written into the paged cache at slot_mapping."""
        ...


class DecodeAttention(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # [B, Hq, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        block_tables: torch.Tensor,  # [B, W] int32
        context_lens: torch.Tensor,  # [B] int32, >= 1 (padded lanes: 1, reading the null block)
        scale: float,
    ) -> torch.Tensor:  # [B, Hq, D]
        ...


class PrefillAttention(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # [N, Hq, D], the new tokens of all sequences, concatenated
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,  # [N, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], already holding k/v of the new tokens
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [S, W] int32
        query_lens: list[int],  # new tokens per sequence
        context_lens: list[int],  # cached + new tokens per sequence
        scale: float,
    ) -> torch.Tensor:  # [N, Hq, D]
        ...


class Linear(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x: [..., K], weight: [N, K] -> [..., N]: F.linear without bias."""
        ...


class LinearInt8(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x: [..., K], weight: [N, K] int8, scale: [N] in x's dtype -> [..., N] = (x @ weight.T) * scale:
        int8 weight-only linear, symmetric per output channel, accumulated in fp32."""
        ...


class LinearInt4(Protocol):
    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """x: [..., K], weight: [N, K / 2] uint8 (two 4-bit q per byte, ops/torch_ref/linear_int4.py), scale,
        offset: [N, K / G] in x's dtype -> [..., N] = x @ (q * scale + offset).T per group of G columns,
        accumulated in fp32."""
        ...


class RepackInt4(Protocol):
    def __call__(self, weight: torch.Tensor) -> None:
        """weight: [N, K / 2] uint8 as quantize_int4_into packs it (LinearInt4's format) -> in place, in the row order
        this set's int4 linears and embedding read (the same bytes; nothing to do for the references)."""
        ...


class SiluMul(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[..., 2I] (gate | up) -> silu(gate) * up: [..., I]."""
        ...


class Embedding(Protocol):
    def __call__(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """input_ids: [...] int, weight: [V, H] -> [..., H]: F.embedding."""
        ...


class EmbeddingInt8(Protocol):
    def __call__(self, input_ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """weight: [V, H] int8, scale: [V] -> [..., H] = q * scale per row, in scale's dtype (LinearInt8's format)."""
        ...


class EmbeddingInt4(Protocol):
    def __call__(
        self, input_ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """weight: [V, H / 2] uint8, scale, offset: [V, H / G] (LinearInt4's format) -> [..., H] = q * scale +
        offset, rounded in fp32, then to scale's dtype."""
        ...


class ToFp32(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [...] float -> fp32 (x itself when fp32): the LM head's logits as the sampler takes them."""
        ...


@dataclass(frozen=True)
class Kernels:
    name: str  # the backend setting it was selected for: "torch" or "triton"
    rms_norm: RmsNorm
    qk_norm_rope_store: QkNormRopeStore
    decode_attention: DecodeAttention
    prefill_attention: PrefillAttention
    linear: Linear
    linear_int8: LinearInt8
    linear_int4: LinearInt4
    repack_int4: RepackInt4
    silu_mul: SiluMul
    embedding: Embedding
    embedding_int8: EmbeddingInt8
    embedding_int4: EmbeddingInt4
    to_fp32: ToFp32
    # Whether decode attention copies every block-table column it is given (the torch reference),
    # rather than stopping at each context length (the Triton and CPU kernels): the runner then
    # passes it only the columns the longest sequence needs.
    decode_attention_gathers: bool
    # Whether every op of a decode step is a C call that ops/cpu/graph.py records (the CPU set, with every
    # C kernel built), so that NANOQWEN_GRAPH=cpugraph can replay it.
    cpu_graph: bool
    # Whether a kernel compiles at its first launch of each variant (Triton on a GPU, not its interpreter): the
    # runner then runs the steps it does not capture once at load (ModelRunner._warm_up), not in a request's time.
    compiles_at_first_launch: bool = False
