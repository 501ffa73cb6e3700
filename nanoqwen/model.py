"""Qwen3 for causal LM, assembled from the layers."""
from __future__ import annotations

import torch
from torch import nn

from nanoqwen.config import ModelConfig
from nanoqwen.layers.decoder import DecoderLayer
from nanoqwen.layers.embedding import EMBEDDINGS, tie
from nanoqwen.layers.linear import LINEARS
from nanoqwen.layers.metadata import AttentionMetadata
from nanoqwen.layers.norm import RMSNorm
from nanoqwen.layers.rotary import RotaryEmbedding
from ops import Kernels


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, kernels: Kernels, quant: str) -> None:
        super().__init__()
        self.embed_tokens = EMBEDDINGS[quant](config.vocab_size, config.hidden_size, kernels)
        self.layers = nn.ModuleList(
            DecoderLayer(config, rotary, kernels, quant) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    # checkpoint name -> (our parameter, shard) for the packed projections
    packed = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, max_positions: int, kernels: Kernels, quant: str = "none") -> None:
        """`quant`: the linear layers' (LM head and embedding included) weight format, nanoqwen/quant.py."""
        super().__init__()
        self.config = config
        self.kernels = kernels  # chosen once (ops.select_kernels); every layer holds the same set
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta)
        self.model = Qwen3Model(config, self.rotary, kernels, quant)
        self.lm_head = LINEARS[quant](rows=config.vocab_size, cols=config.hidden_size, kernels=kernels)
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)  # [N, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.kernels.to_fp32(self.head_logits(hidden))  # [S, V] fp32

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's logits [S, V] in the model's dtype: compute_logits before its widening to fp32."""
        return self.lm_head(hidden)

    def tie_weights(self) -> None:
        """Shares the embedding with the LM head where the checkpoint ties them (again once materialised)."""
        if self.config.tie_word_embeddings:
            tie(self.lm_head, self.model.embed_tokens)
