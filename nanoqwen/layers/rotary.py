from __future__ import annotations

import torch


class RotaryEmbedding:
    """The cos/sin table of neox-style RoPE, shared by every attention layer (not a parameter)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.cos_sin = torch.empty(0)  # [max_positions, head_dim] fp32: cos | sin

    def build(self, device: torch.device) -> None:
        # Same arithmetic as transformers' default rope init, in fp32.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)  # [D/2]
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)
