"""Compiles every Triton kernel for Hopper (sm_90, the H100/H200) without a GPU, down to a cubin.

    python tests/triton_hopper.py        (exit 0 and one line per kernel and dtype when all compile)

Each kernel is launched through its real wrapper in ops/ on CPU tensors at Qwen3-0.6B's shapes; the
launch is intercepted and compiled ahead of time by the installed Triton with its bundled ptxas, with
the argument types and constexprs the wrapper passed, and the 16-byte divisibility the JIT would find
(tensors from torch's allocator, integers that are multiples of 16). The GEMV is planned as for a
132-SM GPU (not the interpreter's plan, which a CPU tensor would get). Run without TRITON_INTERPRET (the
interpreter compiles nothing); tests/test_triton_versions.py runs it under each Triton it supports.
"""
from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from ops.triton import gemv as gemv_module  # noqa: E402
from ops.triton.activation import silu_mul_triton  # noqa: E402
from ops.triton.decode_attention import decode_attention_triton  # noqa: E402
from ops.triton.linear_int4 import linear_int4_triton  # noqa: E402
from ops.triton.linear_int8 import linear_int8_triton  # noqa: E402
from ops.triton.prefill_attention import prefill_attention_triton  # noqa: E402
from ops.triton.rms_norm import rms_norm_triton  # noqa: E402
from ops.triton.rope import qk_norm_rope_store_triton  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64",
         torch.int8: "i8", torch.int16: "i16"}
HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, EPS = 1024, 3072, 16, 8, 128, 16, 1e-6
# Kernels whose tl.dot must run on tensor cores in bf16/fp16 (mma in the PTX, not an FMA loop).
TENSOR_CORE_KERNELS = {"_decode_split_kernel", "_prefill_kernel"}
# Kernels that must read their weights as 16-byte vectors (at the shapes launched here).
VECTOR_LOAD_KERNELS = {"_gemv_kernel"}
compiled: list[str] = []


def arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_launch(self: JITFunction, *args, grid, warmup, **kwargs) -> None:
    """Stands in for JITFunction.run: compiles the launch for sm_90 instead of running it."""
    options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
    bound = inspect.signature(self.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, (name, value)) in enumerate(zip(self.params, bound.arguments.items())):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = arg_type(value)
            aligned = value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor) else (
                type(value) is int and value % 16 == 0)
            if aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options)
    assert kernel.asm["cubin"], f"{self.fn.__name__}: no cubin"
    dtype = next(t for t in signature.values() if t.startswith("*"))[1:]
    if self.fn.__name__ in TENSOR_CORE_KERNELS and dtype in ("bf16", "fp16"):
        assert "mma" in kernel.asm["ptx"], f"{self.fn.__name__} ({dtype}): no tensor-core mma in the PTX"
    if self.fn.__name__ in VECTOR_LOAD_KERNELS:
        assert "ld.global.v4" in kernel.asm["ptx"], f"{self.fn.__name__} ({dtype}): no 16-byte loads in the PTX"
    compiled.append(f"{self.fn.__name__} {dtype}")
    print(f"compiled {self.fn.__name__} ({dtype}) for sm_90: {len(kernel.asm['cubin'])} bytes of cubin", flush=True)


def launch_all(dtype: torch.dtype, tokens: int) -> None:
    """Every kernel once through its wrapper: the decode and prefill shapes the engine runs."""
    x = torch.zeros(tokens, HIDDEN, dtype=dtype)
    rms_norm_triton(x, torch.ones(HIDDEN, dtype=dtype), EPS, x)
    silu_mul_triton(torch.zeros(tokens, 2 * INTER, dtype=dtype))
    qkv = torch.zeros(tokens, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
    q, k, v = (t.view(tokens, -1, HEAD_DIM) for t in qkv.split([Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                                                 KV_HEADS * HEAD_DIM], dim=-1))
    cache = torch.zeros(64, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype)
    positions = slots = torch.zeros(tokens, dtype=torch.int32)
    qk_norm_rope_store_triton(q, k, v, torch.ones(HEAD_DIM, dtype=dtype), torch.ones(HEAD_DIM, dtype=dtype), EPS,
                              torch.zeros(4096, HEAD_DIM), positions, cache, cache, slots)
    tables = torch.zeros(tokens, 32, dtype=torch.int32)
    lens = torch.ones(tokens, dtype=torch.int32)
    decode_attention_triton(q, cache, cache, tables, lens, HEAD_DIM**-0.5, num_splits=4)  # split + combine
    prefill_attention_triton(q, k, v, cache, cache, tables[:1], [tokens], [tokens + 16], HEAD_DIM**-0.5)
    w8, scale = torch.zeros(INTER, HIDDEN, dtype=torch.int8), torch.ones(INTER, dtype=dtype)
    w4, groups = torch.zeros(INTER, HIDDEN // 2, dtype=torch.uint8), torch.ones(INTER, HIDDEN // 64, dtype=dtype)
    for rows in (tokens, 16):  # the GEMV (split along K, then its reduce), and the tl.dot kernels past 8 rows
        linear_int8_triton(torch.zeros(rows, HIDDEN, dtype=dtype), w8, scale)
        linear_int4_triton(torch.zeros(rows, HIDDEN, dtype=dtype), w4, groups, groups)
    gemv_module.float_linear(None)(x, torch.zeros(INTER, HIDDEN, dtype=dtype))  # NANOQWEN_FLOAT_GEMV's


def plan_as_for_hopper() -> None:
    """gemv_plan for a 132-SM CUDA device, whatever device the tensors are on."""
    plan = gemv_module.gemv_plan
    gemv_module.num_sms = lambda device: 132
    gemv_module.gemv_plan = lambda n, k, fmt, device, **kw: plan(n, k, fmt, torch.device("cuda"), **kw)


def main() -> None:
    JITFunction.run = compile_launch
    plan_as_for_hopper()
    for dtype in (torch.bfloat16, torch.float32):
        launch_all(dtype, tokens=1)
    print(f"triton {triton.__version__}: {len(compiled)} kernels compiled for sm_90")


if __name__ == "__main__":
    main()
