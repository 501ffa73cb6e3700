"""The Triton variants a server compiles while it serves: none past its load.

Triton compiles a kernel at the first launch of each variant: its constexprs, and whether each integer argument is 1
or divisible by 16 and each pointer 16-byte aligned. A compile took ~0.7 s on the H200's host, a stall for every
stream (gpu_first run1: chunked prefill's inter-token latency max 693 ms, one compile at a long prompt's first chunk).
Here the kernels run under TRITON_INTERPRET=1, which compiles nothing, and each launch's variant is worked out as
Triton's JIT does it (its own specialisation function, the kernel's do_not_specialize lists honoured).
"""
from __future__ import annotations

import inspect
import os
from collections import defaultdict

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("works the variants out under TRITON_INTERPRET=1", allow_module_level=True)

from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from engine_util import collect, engine_step, greedy, load_engine, run  # noqa: E402
from nanoqwen.runner.runner import WARM_UP_TOKENS  # noqa: E402
from ops.triton.linear_int4 import linear_int4_triton  # noqa: E402
from ops.triton.linear_int8 import linear_int8_triton  # noqa: E402

Variants = dict[str, set[tuple]]


def variant(kernel: InterpretedFunction, args: tuple, kwargs: dict) -> tuple:
    """What Triton's JIT compiles a launch of `kernel` as: each argument's type and specialisation (a constexpr's
    value), then the launch options (num_warps)."""
    params = inspect.signature(kernel.fn).parameters
    values = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    no_specialize = set(kernel.kwargs.get("do_not_specialize") or ())
    no_align = set(kernel.kwargs.get("do_not_specialize_on_alignment") or ())
    key: list = []
    for i, (name, param) in enumerate(params.items()):
        value = values.get(name, param.default)
        if "constexpr" in str(param.annotation):
            key.append(value)
        else:
            key.append(native_specialize_impl(BaseBackend, value, False, not {i, name} & no_specialize,
                                              not {i, name} & no_align))
    return (*key, *sorted((k, v) for k, v in kwargs.items() if k not in params))


@pytest.fixture
def variants(monkeypatch) -> Variants:
    """kernel name -> the variants launched, from now on."""
    seen: Variants = defaultdict(set)
    launch = InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        seen[self.fn.__name__].add(variant(self, args, kwargs))
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recorded)
    return seen


def test_a_chunked_prefill_launches_only_what_the_warm_up_compiled(tiny_checkpoint, variants, monkeypatch):
    # As bench_serving's chunked server, in small: a stream decodes while a long prompt arrives in chunks beside it
    # (paced by the budget alone: the same steps on every machine). 4-token blocks keep the prompt short.
    engine = load_engine(tiny_checkpoint, kernels="triton", dtype="bfloat16", max_batch=4, max_step_tokens=32,
                         block_size=4)
    runner = engine.runner
    runner._warm_up()  # what the runner does at load where Triton compiles (not under the interpreter)
    warm = {name: set(keys) for name, keys in variants.items()}
    packed = runner.prefill
    served: Variants = defaultdict(set)

    def prefill(*args, **kwargs):  # the packed steps only: the decode steps' variants are captured with their graphs
        variants.clear()
        try:
            return packed(*args, **kwargs)
        finally:
            for name, keys in variants.items():
                served[name] |= keys

    monkeypatch.setattr(runner, "prefill", prefill)
    _, stream = engine.submit([9707, 1879, 11, 358, 1079], greedy(3))
    engine_step(engine, 2)  # its prefill, a decode step
    # 64 tokens: a 16-block table (Triton's "divisible by 16", where the warm-up's had 1 to 8 blocks), its first chunk
    # of 31 beside the decode row: 2 attention tiles (an even count: the sequences' words aligned, where the warm-up's
    # single tiles left them unaligned)
    _, long_stream = engine.submit(list(range(1000, 1064)), greedy(2))
    run(engine)
    assert len(collect(long_stream).choices[0].token_ids) == 2 and len(collect(stream).choices[0].token_ids) == 3
    assert served.keys() == warm.keys(), "the packed steps and the warm-up launch the same kernels"
    for name, keys in served.items():
        assert keys <= warm[name], f"{name}: {len(keys - warm[name])} variants compiled while serving"
    assert len(warm["_prefill_kernel"]) == 1, "one prefill attention variant whatever the step's shape"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_warm_up_token_counts_cover_every_row_count_of_the_weight_only_linears(quant, variants):
    """A packed step's linears get its token count (or its sampled rows) as their row count: any count (here 1 to 40:
    the GEMV's row paddings, both tilings, each with every kind of integer) launches a variant one of WARM_UP_TOKENS
    launched."""
    k, n = 64, 64
    torch.manual_seed(0)

    def launch(rows: int) -> None:
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        if quant == "int8":
            linear_int8_triton(x, torch.zeros(n, k, dtype=torch.int8), torch.ones(n, dtype=torch.bfloat16))
        else:
            groups = torch.ones(n, k // 64, dtype=torch.bfloat16)
            linear_int4_triton(x, torch.zeros(n, k // 2, dtype=torch.uint8), groups, groups)

    for rows in WARM_UP_TOKENS:
        launch(rows)
    warm = {name: set(keys) for name, keys in variants.items()}
    for rows in range(1, 41):
        launch(rows)
    assert "_gemv_kernel" in warm and len(warm) == 2, "the GEMV (no split at this shape) and the tiled kernel"
    for name, keys in variants.items():
        assert keys == warm.get(name), f"{name}: row counts whose variant the warm-up did not compile"
