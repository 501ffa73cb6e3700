from __future__ import annotations

import torch


def to_fp32_torch(x: torch.Tensor) -> torch.Tensor:
    """x in any float dtype -> fp32 (x itself when it is fp32): the LM head's logits for the sampler."""
    return x.float()
