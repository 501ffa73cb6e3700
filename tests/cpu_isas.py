"""The C kernels' loops under each cpu_isa cap this CPU can tell apart (ops/cpu/build.py, csrc/gemv.h's NANOQWEN_ISA),
for the tests that run every one of them: "built" (the kernel set's own build, all the CPU has), "avx2" always (an
AVX2-only CPU's loops: on one, the built ones again), "avx512" where the CPU has AMX too (AVX-512's loops without AMX,
vdpbf16ps for the bf16 tiles: on an AVX-512 CPU without AMX, the built ones)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from ops import cpu
from ops.cpu import build as cpu_build

CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split())
VNNI = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= CPU_FLAGS  # the int8 pieces' loops (csrc/gemv.h)
AMX = "amx_bf16" in CPU_FLAGS
LOOPS = ["built", "avx2", *(["avx512"] if AMX else [])]


@functools.cache
def capped(kernel: cpu_build.CKernel, loops: str) -> cpu_build.CKernel:
    """`kernel`'s C file as `loops` (one of LOOPS, or a cpu_isa) takes it, built once into the kernel cache: "built"
    (or "auto") is `kernel` itself, a cap its own CKernel (a library of its own, its cache key holding the cap)."""
    if loops in ("built", "auto"):
        assert kernel.build(), kernel.error
        return kernel
    built = cpu_build.CKernel(kernel.name, kernel.source.name, kernel.functions)
    assert built.build(isa=loops), built.error
    return built


def cap_kernel_set(monkeypatch: pytest.MonkeyPatch, isa: str) -> None:
    """Every C kernel of ops.cpu swapped, for the test, for its build capped at `isa`, so that an engine this process
    loads with cpu_isa=`isa` takes that cap: the process's own kernels are built for one cap (CKernel.build). The
    prefill kernel's answer of whether its tiles serve is asked of the capped build anew."""
    for module in [m for m in vars(cpu).values() if getattr(m, "KERNEL", None) in cpu.C_KERNELS]:
        monkeypatch.setattr(module, "KERNEL", capped(module.KERNEL, isa))
    monkeypatch.setattr(cpu, "C_KERNELS", tuple(capped(kernel, isa) for kernel in cpu.C_KERNELS))
    monkeypatch.setattr(cpu.prefill_attention, "tiles_serve",
                        functools.cache(cpu.prefill_attention.tiles_serve.__wrapped__))
