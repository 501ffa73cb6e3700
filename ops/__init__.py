"""Kernels, one set per backend, selected once per model: `select_kernels` -> a `Kernels` the model holds.

ops/kernels.py     the op signatures and the Kernels set
ops/torch_ref/     the torch references: the contract, and the kernels where no other backend runs
ops/cpu/           compiled C kernels for x86 CPUs (csrc/), each where it serves, else the reference
ops/triton/        Triton kernels: CUDA, or the CPU under TRITON_INTERPRET=1 (tests)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ops import cpu, torch_ref
from ops.kernels import Kernels

BACKENDS = ("torch", "triton")

__all__ = ["BACKENDS", "Kernels", "select_kernels", "triton_available"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_kernels(
    setting: str, device: torch.device, dtype: torch.dtype, *,
    hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
    cpu_kernels: bool = True, cpu_isa: str = "auto", cache_dir: Path | None = None, float_gemv: bool = False,
) -> Kernels:
    """The kernels for a model of these sizes on `device` in `dtype`. `setting` is "torch", "triton"
    or "auto" (Triton on CUDA where installed, else torch); on the CPU this builds the C kernels
    into `cache_dir` (None: ops.cpu.build.resolve_cache_dir()'s default), capped at `cpu_isa`, unless `cpu_kernels`
    is off.
    `float_gemv`: the Triton set's float linears of decode-sized batches run its GEMV (ops/triton/gemv.py).
    Raises ValueError when the setting cannot run on `device`."""
    name = ("triton" if device.type == "cuda" and triton_available() else "torch") if setting == "auto" else setting
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "triton":
        if not triton_available():
            raise ValueError("NANOQWEN_KERNELS=triton needs the triton package (pip install triton)")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        if device.type != "cuda" and not (interpreted and device.type == "cpu"):
            raise ValueError(
                f"Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1; not on {device.type}"
            )
    elif float_gemv:
        raise ValueError(f"NANOQWEN_FLOAT_GEMV is a choice of the Triton kernels, not of {name!r}")
    if device.type == "cpu":
        base = cpu.kernels(dtype, hidden_size=hidden_size, head_dim=head_dim, num_heads=num_heads,
                           num_kv_heads=num_kv_heads, enabled=cpu_kernels, isa=cpu_isa, cache_dir=cache_dir)
    else:
        base = torch_ref.KERNELS
    if name == "triton":
        from ops import triton as triton_kernels  # imports triton: only where it is chosen

        return triton_kernels.kernels(base, device, float_gemv)
    return base
