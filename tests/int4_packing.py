"""int4 weights as the loader leaves them for the C kernels (ops/cpu/linear_int4.repack), for the tests that call
the kernels directly, and their two layouts (csrc/int4_block.h), AVX2's interleaved and AVX-512 VNNI's by span,
undone in torch."""
from __future__ import annotations

import ctypes

import torch

from ops.cpu import linear_int4 as cpu_int4
from ops.torch_ref.linear_int4 import pack_int4


def as_loaded(packed: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """packed: [N, K / 2] as quantize_int4_into writes it -> a copy in the layout a build of linear_int4.c (the
    kernel set's by default) and the same flags' dequant.c and embedding.c read, repacked as the loader does."""
    copy = packed.clone()
    cpu_int4.repack(copy, lib)
    return copy


def from_interleaved(packed: torch.Tensor) -> torch.Tensor:
    """packed: [N, K / 2] interleaved (each row in chunks of 4 blocks, the last K / 64 % 4 where that is not 0, a
    chunk of nb blocks holding columns 8j .. 8j + 7 of its block b as the nibbles of its dword nb j + b; chunk c of
    row 4q + i at byte 4q * K / 2 + 512 c + 32 nb i, rows from N // 4 * 4 row by row) -> the plain layout."""
    n, half = packed.shape
    k = torch.arange(2 * half)
    chunk, block, dword = k // 256, k // 64 % 4, k % 64 // 8
    blocks = torch.clamp(2 * half // 64 - 4 * chunk, max=4)
    within = 4 * (blocks * dword + block) + k % 8 // 2
    rows = torch.arange(n)[:, None]
    quad = rows < n // 4 * 4
    at = torch.where(quad, rows // 4 * 4 * half + 512 * chunk + 32 * blocks * (rows % 4), rows * half + 128 * chunk)
    nibbles = (packed.reshape(-1)[at + within] >> (4 * (k % 2))) & 15
    return pack_int4(nibbles)


def from_spanned(packed: torch.Tensor) -> torch.Tensor:
    """packed: [N, K / 2] by span (each row in spans of 16 blocks, the last K / 64 % 16 where that is not 0, a span of
    nb blocks holding dword j of its block b at byte 4 (nb j + b), as the plain layout holds it) -> the plain layout."""
    n, half = packed.shape
    byte = torch.arange(half)
    block, dword = byte // 32, byte % 32 // 4
    blocks = torch.clamp(half // 32 - block // 16 * 16, max=16)
    at = block // 16 * 512 + 4 * (blocks * dword + block % 16) + byte % 4
    return packed[:, at]
