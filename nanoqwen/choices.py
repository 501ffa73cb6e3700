"""The values the engine's named settings take, and the default model: checked by nanoqwen.settings, offered by
`nanoqwen serve` (nanoqwen/cli.py), which never imports torch."""
from __future__ import annotations

DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torch's names; "auto" besides
KERNELS = ("auto", "torch", "triton")
GRAPHS = ("auto", "none", "compile", "cudagraph", "cpugraph")
GENERATION_CONFIGS = ("auto", "none")
QUANTS = ("none", "int8", "int4")  # weight formats, nanoqwen/quant.py
# The instruction sets the CPU kernels may take (ops/cpu/build.py, csrc/gemv.h): all the CPU has, or at most AVX2, or
# at most AVX-512 (no AMX)
CPU_ISAS = ("auto", "avx2", "avx512")
