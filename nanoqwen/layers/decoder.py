from __future__ import annotations

import torch
from torch import nn

from nanoqwen.config import ModelConfig
from nanoqwen.layers.attention import Attention
from nanoqwen.layers.metadata import AttentionMetadata
from nanoqwen.layers.mlp import MLP
from nanoqwen.layers.norm import RMSNorm
from nanoqwen.layers.rotary import RotaryEmbedding
from ops import Kernels


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, kernels: Kernels, quant: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.self_attn = Attention(config, rotary, kernels, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, kernels, quant)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual
