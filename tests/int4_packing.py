"""int4 weights as the loader leaves them for the C kernels (ops/cpu/linear_int4.repack), for the tests that call
the kernels directly, and the quads' layout (csrc/int4_block.h) undone in torch."""
from __future__ import annotations

import ctypes
import functools

import pytest
import torch

from ops.cpu import build as cpu_build
from ops.cpu import linear_int4 as cpu_int4


@functools.cache
def avx2_only(kernel: cpu_build.CKernel) -> cpu_build.CKernel:
    """`kernel`'s C file as a CPU without AVX-512 runs it, built once into the kernel cache (under
    tests/test_cpu_no_scratch.py's name for the same build)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_build, "FLAGS", [*cpu_build.FLAGS, "-DNANOQWEN_AVX2_ONLY"])
        built = cpu_build.CKernel(f"{kernel.source.stem}_avx2_only", kernel.source.name, kernel.functions)
        assert built.build(), built.error
    return built


def as_loaded(packed: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """packed: [N, K / 2] as quantize_int4_into writes it -> a copy in the layout a build of linear_int4.c (the
    kernel set's by default) and the same flags' dequant.c and embedding.c read, repacked as the loader does."""
    copy = packed.clone()
    cpu_int4.repack(copy, lib)
    return copy


def from_quads(packed: torch.Tensor) -> torch.Tensor:
    """packed: [N, K / 2] in quads (block b of row 4q + i at byte 4q * K / 2 + 128 b + 32 i, rows from N // 4 * 4
    plain) -> the plain layout."""
    n, half = packed.shape
    whole = n // 4 * 4
    quads = packed[:whole].reshape(n // 4, half // 32, 4, 32).transpose(1, 2).reshape(whole, half)
    return torch.cat([quads, packed[whole:]])
