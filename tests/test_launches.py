"""Kernel launches per decode step, counted so that the number cannot creep back up.

On a GPU, decode at small batches is launch-bound: each launch costs a few microseconds whatever
it computes. Here the step runs with the Triton backend under TRITON_INTERPRET=1 and every launch
it would make on CUDA is counted: each Triton kernel launch, each linear (one cuBLAS GEMM), and
each other aten op torch dispatches that computes something (views and allocations launch nothing).
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("counts launches on the CPU under TRITON_INTERPRET=1", allow_module_level=True)

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from engine_util import generate, greedy, load_engine  # noqa: E402
from ops.cpu import sample as cpu_sample  # noqa: E402

# Allocations: no kernel on CUDA.
SILENT = {"empty.memory_format", "empty_strided.default", "empty_like.default"}


def computes(func, args, kwargs, out) -> bool:
    """Whether an aten op launches a kernel: it writes into an input, or returns new storage (not a
    view, and not `to`/`contiguous`/`reshape` handing back their input). Ops returning no tensor
    (promote_types) launch nothing."""
    if func._schema.is_mutable:
        return True
    storages = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return any(t.untyped_storage().data_ptr() not in storages for t in outs)


class LaunchCounter(TorchDispatchMode):
    """Counts launches by name: `triton:<kernel>`, `linear`, `aten:<op>`. Work done inside a counted
    launch (the interpreter's own tensor ops, the CPU linear kernel's) is not counted again."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter[str] = Counter()
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = f"{func._opname}.{func._overloadname}"
        if not self.inside and name not in SILENT and computes(func, args, kwargs, out):
            self.launches[f"aten:{func._opname}"] += 1
        return out

    def launch(self, name: str, run, *args, **kwargs):
        if not self.inside:
            self.launches[name] += 1
        self.inside += 1
        try:
            return run(*args, **kwargs)
        finally:
            self.inside -= 1


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    engine = load_engine(tiny_checkpoint, kernels="triton", dtype="bfloat16", max_batch=4)  # as served
    generate(engine, [[1000, 1001, 1002]], greedy(2))  # compiled and warm
    return engine


def count_decode_step(engine, monkeypatch) -> Counter[str]:
    counter = LaunchCounter()
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, **k: counter.launch(f"triton:{self.fn.__name__}", run, self, *a, **k))
    runner = engine.runner
    kernels = runner.model.kernels
    counted = dataclasses.replace(kernels, linear=lambda *a: counter.launch("linear", kernels.linear, *a))
    argmax = cpu_sample.argmax_rows_cpu  # the CPU sampler's greedy kernel, where CUDA launches torch's argmax
    monkeypatch.setattr(cpu_sample, "argmax_rows_cpu", lambda *a: counter.launch("argmax", argmax, *a))
    for module in runner.model.modules():  # every layer holds the model's kernel set
        if getattr(module, "kernels", None) is kernels:
            monkeypatch.setattr(module, "kernels", counted)
    inputs = runner._bucket_inputs(1, runner._table_width(64))
    with torch.inference_mode(), counter:
        runner._decode_step("greedy", inputs)
    return counter.launches


def test_a_greedy_decode_step_launches_ten_kernels_per_layer(engine, monkeypatch):
    launches = count_decode_step(engine, monkeypatch)
    layers = engine.model_config.num_hidden_layers
    assert layers == 2
    # Per layer: input RMSNorm (+ residual add), QKV GEMM, q/k-norm + RoPE + KV store, split-K
    # attention + its combine, O GEMM, post-attention RMSNorm (+ residual add), gate|up GEMM,
    # SiLU * up, down GEMM.
    per_layer = {"triton:_rms_norm_kernel": 2, "linear": 4, "triton:_qk_norm_rope_store_kernel": 1,
                 "triton:_decode_split_kernel": 1, "triton:_decode_combine_kernel": 1, "triton:_silu_mul_kernel": 1}
    # Around the layers: the embedding gather, the final RMSNorm, the LM head GEMM, the logits
    # widened to fp32 (`to`), and greedy sampling's one argmax. Qwen3-0.6B's 28 layers: 285 launches.
    around = {"aten:embedding": 1, "triton:_rms_norm_kernel": 1, "linear": 1, "aten:to": 1, "argmax": 1}
    expected = Counter({name: layers * n for name, n in per_layer.items()}) + Counter(around)
    assert launches == expected, f"{sum(launches.values())} launches: {dict(launches)}"
    assert sum(launches.values()) == 10 * layers + 5
