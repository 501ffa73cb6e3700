"""int4 weight-only linear: the packed layout every backend reads, and the reference that dequantises
and multiplies.

Weights are asymmetric per group of G input columns (G % 64 == 0): w ~= q * scale + offset, q in [0, 15].
Packed two per byte, in blocks of 64 columns (32 bytes): little-endian 16-bit word i of a block holds
q[i], q[16 + i], q[32 + i], q[48 + i] in its four nibbles, low first. One mask or shift of the words
then yields 16 consecutive columns: the Triton kernels unpack in registers without shuffles. The CPU's kernels
rearrange the blocks' dwords at load (Kernels.repack_int4, ops/cpu/linear_int4.repack, csrc/int4_block.h): AVX-512
VNNI's by spans of 16 blocks, AVX2's interleaved in chunks of 4 blocks and the rows in quads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 64  # columns per packed block; a group is a whole number of blocks


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: [N, K] uint8 in [0, 15], K % 64 == 0 -> [N, K / 2] uint8 in the block layout."""
    n, k = q.shape
    q = q.view(n, k // BLOCK, 4, 16)
    low = q[:, :, 0] | (q[:, :, 1] << 4)  # [N, K / 64, 16]: byte 2i of each block
    high = q[:, :, 2] | (q[:, :, 3] << 4)  # byte 2i + 1
    return torch.stack([low, high], dim=-1).view(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 2] uint8 -> q: [N, K] uint8 in [0, 15]."""
    n, half = packed.shape
    p = packed.view(n, half // 32, 16, 2)
    low, high = p[..., 0], p[..., 1]
    return torch.stack([low & 15, low >> 4, high & 15, high >> 4], dim=2).view(n, 2 * half)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """packed: [N, K / 2] uint8, scale, offset: [N, K / G] -> [N, K] fp32 = q * scale + offset per group."""
    q = unpack_int4(packed).float()
    n, groups = scale.shape
    q = q.view(n, groups, -1) * scale.float().unsqueeze(2) + offset.float().unsqueeze(2)
    return q.view(n, -1)


def repack_int4_torch(weight: torch.Tensor) -> None:
    """The layout above is every reader's here: nothing to rearrange."""


def linear_int4_torch(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x: [..., K], weight: [N, K / 2] uint8 packed, scale, offset: [N, K / G] -> [..., N]: dequantise,
    multiply in fp32."""
    return F.linear(x.float(), dequantize_int4(weight, scale, offset)).to(x.dtype)
