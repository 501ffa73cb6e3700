from __future__ import annotations

import torch
from torch import nn

from nanoqwen.config import ModelConfig
from nanoqwen.layers.linear import LINEARS
from nanoqwen.layers.metadata import AttentionMetadata
from nanoqwen.layers.norm import RMSNorm
from nanoqwen.layers.rotary import RotaryEmbedding
from ops import Kernels


class Attention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm, RoPE and a paged KV cache."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, kernels: Kernels, quant: str) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.eps = config.rms_norm_eps
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = LINEARS[quant](rows=q_size + 2 * kv_size, cols=config.hidden_size, kernels=kernels)
        self.o_proj = LINEARS[quant](rows=config.hidden_size, cols=q_size, kernels=kernels)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, kernels)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, kernels)
        self.rotary = rotary
        self.kernels = kernels
        # Views into the runner's KV pool: [num_blocks, block_size, Hkv, D] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        ops, n = self.kernels, x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        ops.qk_norm_rope_store(
            q, k, v, self.q_norm.weight, self.k_norm.weight, self.eps, self.rotary.cos_sin,
            positions, self.k_cache, self.v_cache, meta.slot_mapping,
        )
        if meta.prefill:
            out = ops.prefill_attention(
                q, k, v, self.k_cache, self.v_cache, meta.block_tables,
                meta.query_lens, meta.context_lens_host, self.scale,
            )
        else:
            out = ops.decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale)
        return self.o_proj(out.reshape(n, -1))
