"""The kernels when their per-thread scratch cannot be allocated (csrc/scratch.h's thread_scratch returns NULL, forced
by building with -DNANOQWEN_NO_SCRATCH): each linear kernel takes a way that needs none, with the same results (bit for
bit where the products and their order are the same) instead of writing through NULL; the prefill attention, which has
no such way, reports it and its wrapper raises. (The sampling kernel's scratch is reserved at setup,
tests/test_cpu_sample.py.)"""
from __future__ import annotations

import ctypes
import functools

import pytest
import torch

import paged_inputs
from cpu_isas import AMX, capped
from int4_packing import as_loaded
from ops.cpu import build as cpu_build
from ops.cpu import linear as cpu_linear
from ops.cpu import linear_int4 as cpu_int4
from ops.cpu import linear_int8 as cpu_int8
from ops.cpu import prefill_attention as cpu_prefill
from ops.torch_ref.linear_int4 import dequantize_int4
from ops.torch_ref.linear_int8 import linear_int8_torch
from ops.torch_ref.prefill_attention import prefill_attention_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

DTYPES = [torch.float32, torch.bfloat16]
# 1-3: one pass of the AVX2 paths (bf16: a group of 3; fp32: 2 + 1); 5 and 9: several, the last of one row
ROWS = [1, 2, 3, 5, 9]
# AMX serves bf16 dense rows from AMX_MIN_ROWS (csrc/amx.h) where the CPU has it (and the OS grants it)
AMX_MIN_ROWS = 2
BUILT = {kernel.source.name: kernel for kernel in (cpu_linear.KERNEL, cpu_int8.KERNEL, cpu_int4.KERNEL,
                                                   cpu_prefill.KERNEL)}  # by source
# "built": the kernel set's own; "loops": what a CPU without AVX-512 (so without VNNI or AMX) takes (int16 pieces;
# int4's bf16 rows int8 blocks)
VARIANTS = {"built": ("built", False), "built, no scratch": ("auto", True), "loops": ("avx2", False),
            "loops, no scratch": ("avx2", True)}  # (tests/cpu_isas.py's loops or a cpu_isa, without scratch)


@functools.cache
def lib(source: str, variant: str) -> ctypes.CDLL:
    """`source` built as `variant` says, in the kernel cache (its key holds the flags: each variant is its own
    library, built once on a machine)."""
    loops, no_scratch = VARIANTS[variant]
    if not no_scratch:
        return capped(BUILT[source], loops).lib
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_build, "FLAGS", [*cpu_build.FLAGS, "-DNANOQWEN_NO_SCRATCH"])
        kernel = cpu_build.CKernel(f"{source.removesuffix('.c')}_no_scratch", source, BUILT[source].functions)
        assert kernel.build(isa=loops), kernel.error
    return kernel.lib


def dense(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    lib.linear(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], x.shape[1],
               int(x.dtype == torch.bfloat16))
    return y


def int8(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    lib.linear_int8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], x.shape[1],
                    int(x.dtype == torch.bfloat16))
    return y


def int4(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    lib.linear_int4(x.data_ptr(), w.data_ptr(), scale.data_ptr(), offset.data_ptr(), y.data_ptr(), x.shape[0],
                    w.shape[0], x.shape[1], x.shape[1] // scale.shape[1], int(x.dtype == torch.bfloat16),
                    cpu_int4.PIECES[x.dtype])
    return y


def unstaged_int4(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """linear_int4_unstaged's arithmetic in torch, step for step: 8 fp32 lanes, lane l of step s column 8 s + l, one
    FMA each (the exact product, then one rounding: in fp64, whose 53 bits hold it), then hsum's pairwise order."""
    m, k = x.shape
    weight = dequantize_int4(w, scale, offset).double()  # fp32 (int4_block.h rounds as the reference does)
    xs = x.double()
    acc = torch.zeros(m, w.shape[0], 8, dtype=torch.float32)
    for start in range(0, k, 8):
        cols = slice(start, start + 8)
        acc = (acc.double() + xs[:, None, cols] * weight[None, :, cols]).float()
    quads = acc[..., :4] + acc[..., 4:]
    pairs = quads[..., :2] + quads[..., 2:]
    return (pairs[..., 0] + pairs[..., 1]).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_dense_without_scratch_gives_the_same_bits(m, dtype):
    """bf16 on AVX2 splits each activation row in registers at each use, as the scratch split it once. AMX's
    pairs fall back to the AVX-512 loop, whose sums go in another order: there the same up to that order."""
    torch.manual_seed(m)
    x, w = torch.randn(m, 256).to(dtype), torch.randn(77, 256).to(dtype)
    for loops in ("built", "loops"):
        out, scratch = dense(lib("linear.c", f"{loops}, no scratch"), x, w), dense(lib("linear.c", loops), x, w)
        if loops == "built" and AMX and dtype == torch.bfloat16 and m >= AMX_MIN_ROWS:
            # one bf16 ulp (2**-7 of the value at most), and near 0 the fp32 sums' difference
            torch.testing.assert_close(out, scratch, rtol=2**-7, atol=1e-4)
        else:
            assert torch.equal(out, scratch)
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    for variant in ("built, no scratch", "loops"):  # "loops": AVX2's multi-row loop on an AVX-512 CPU too
        torch.testing.assert_close(dense(lib("linear.c", variant), x, w).float(), x.float() @ w.float().T, **tol)


@pytest.mark.parametrize("variant", ["loops", "loops, no scratch"])
@pytest.mark.parametrize("n,k", [(3, 160), (999, 160), (1001, 1024), (1003, 2048)])
def test_avx2_dense_rows_are_batch_invariant(n, k, variant):
    """On AVX2 this kernel's outputs for a bf16 row are the same bits alone as in a batch of any size: every group
    size (1-4 rows) sums in one order. 1 row takes 4 weight rows a pass spread over the chunk (csrc/gemv.h), 2+ rows
    2, one from each half of it. K 160: chunks of 409 weight rows, rounded to 410 (2 rows) or 412 (1 row), the last of
    179 or 175 ending in single weight rows; K 1024: 1 row through another order differed in 2 of 8000 outputs;
    K 2048: the last chunk's 11 rows 2 spread passes and 3 single rows; N 3: a chunk of fewer rows than a pass, every
    row single."""
    torch.manual_seed(k)
    x, w = torch.randn(8, k).bfloat16(), torch.randn(n, k).bfloat16()
    kernel = lib("linear.c", variant)
    batch = dense(kernel, x, w)
    torch.testing.assert_close(batch.float(), x.float() @ w.float().T, atol=1e-2, rtol=1e-2)
    for m in range(1, 8):
        assert torch.equal(dense(kernel, x[:m], w), batch[:m]), m
        assert torch.equal(dense(kernel, x[m:m + 1], w), batch[m:m + 1]), m


@pytest.mark.parametrize("n,k", [(301, 1024), (37, 8192)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_avx2_int8_rows_are_batch_invariant(dtype, n, k):
    """On AVX2 a row's int8 outputs are the same bits alone (4 weight rows a pass spread over each chunk, csrc/gemv.h's
    SPREAD_ROWS) as in a batch (one weight row a pass): exact int32 sums, the same scaling. K 1024: 128-row chunks, the
    last chunk's 45 rows 11 passes and a single row; K 8192: chunks of 16, 16 and 5 rows, each pass's 4 rows' sums
    carried across 4096-column spans."""
    torch.manual_seed(7)
    x = torch.randn(4, k).to(dtype)
    w, scale = torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) / 100).to(dtype)
    kernel = lib("linear_int8.c", "loops")
    batch = int8(kernel, x, w, scale)
    for m in range(4):
        assert torch.equal(int8(kernel, x[m:m + 1], w, scale), batch[m:m + 1]), m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_int8_without_scratch(m, dtype):
    """Without the pieces' scratch (int8 with VNNI, int16 on AVX2) the CPU takes the widening loops; bf16 rows are
    widened in registers at each use."""
    torch.manual_seed(m)
    x = torch.randn(m, 320).to(dtype)
    w, scale = torch.randint(-127, 128, (53, 320), dtype=torch.int8), (torch.rand(53) / 100).to(dtype)
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 8e-3}
    for variant in ("built, no scratch", "loops, no scratch", "loops"):
        torch.testing.assert_close(int8(lib("linear_int8.c", variant), x, w, scale).float(),
                                   linear_int8_torch(x, w, scale).float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,g", [(1, 64), (2, 128), (5, 64), (9, 256)])
def test_int4_without_scratch_multiplies_the_dequantised_weights(m, g, dtype):
    """Without the pieces' scratch (int8 with VNNI, int16 on AVX2), each block dequantised in fp32 and multiplied in
    fp32, as the reference does: its result up to the order of the sums and the output's rounding, and exactly
    unstaged_int4's (so the fallback ran, not the pieces' way), on either CPU."""
    torch.manual_seed(m)
    x, w = torch.randn(m, 512).to(dtype), torch.randint(0, 256, (37, 256), dtype=torch.uint8)
    scale, offset = (torch.rand(37, 512 // g) / 50).to(dtype), (torch.randn(37, 512 // g) / 10).to(dtype)
    built, loops = lib("linear_int4.c", "built, no scratch"), lib("linear_int4.c", "loops, no scratch")
    out = int4(built, x, as_loaded(w, built), scale, offset)  # w packed for each build as the loader packs it
    assert torch.equal(out, unstaged_int4(x, w, scale, offset))
    assert torch.equal(int4(loops, x, as_loaded(w, loops), scale, offset), out)
    rtol = 1e-5 if dtype == torch.float32 else 2**-8  # bf16: one rounding
    torch.testing.assert_close(out.double(), x.double() @ dequantize_int4(w, scale, offset).double().T, rtol=rtol,
                               atol=1e-5)


def test_prefill_attention_capped_at_avx2_keeps_sdpa_for_long_runs(monkeypatch):
    """What an AVX2-only CPU builds, and the avx2 cap on any CPU: its kernel says the tiles do not serve, so bf16 runs
    past C_MAX_NEW go to SDPA (as before the tiles), and a call asking for the tiles gets the AVX2 loops, the same
    bits."""
    loops = capped(cpu_prefill.KERNEL, "avx2").lib
    flag = ctypes.c_int(1)
    loops.prefill_attention_tiles(128, ctypes.byref(flag))
    assert flag.value == 0
    monkeypatch.setattr(cpu_prefill.KERNEL, "lib", loops)
    monkeypatch.setattr(cpu_prefill, "tiles_serve", functools.cache(cpu_prefill.tiles_serve.__wrapped__))
    sdpa = []
    real = cpu_prefill._sdpa
    monkeypatch.setattr(cpu_prefill, "_sdpa", lambda q, *a: sdpa.append(q.shape[0]) or real(q, *a))
    args, _, _ = paged_inputs.paged([(70, 70), (40, 90), (1, 30)], 4, 2, 32, 4, dtype=torch.bfloat16)
    q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale = args
    out = cpu_prefill.prefill_attention_cpu(*args)
    torch.testing.assert_close(out, prefill_attention_torch(*args), atol=2e-2, rtol=2e-2)
    assert sdpa == [70, 40]
    tiles = cpu_prefill.prefill_attention_kernel(q, k_cache, v_cache, tables, query_lens, context_lens, scale, True)
    assert torch.equal(tiles, cpu_prefill.prefill_attention_kernel(q, k_cache, v_cache, tables, query_lens,
                                                                   context_lens, scale, False))


def test_prefill_attention_without_scratch_raises(monkeypatch):
    """Its scratch (a tile's Scratch per thread and the task table) not allocated: the kernel writes nothing and says
    so, and its wrapper raises MemoryError (before: a NULL malloc written through); with it, the reference's result."""
    args, _, _ = paged_inputs.paged([(3, 10), (1, 5)], 4, 2, 16, 4)
    q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale = args
    built = lib("prefill_attention.c", "built")
    monkeypatch.setattr(cpu_prefill.KERNEL, "lib", lib("prefill_attention.c", "built, no scratch"))
    with pytest.raises(MemoryError, match="prefill_attention"):
        cpu_prefill.prefill_attention_kernel(q, k_cache, v_cache, tables, query_lens, context_lens, scale)
    monkeypatch.setattr(cpu_prefill.KERNEL, "lib", built)
    out = cpu_prefill.prefill_attention_kernel(q, k_cache, v_cache, tables, query_lens, context_lens, scale)
    torch.testing.assert_close(out, prefill_attention_torch(*args), atol=1e-5, rtol=1e-5)
