"""Prefill-sized int8 and int4 linears (ops/cpu/dequant.py): the dequantising kernels against the references'
rounding, the blocked GEMM against the references and the exact product, and the row threshold."""
from __future__ import annotations

import threading

import pytest
import torch

import ops.cpu
from call_rows import record_rows
from cpu_isas import LOOPS, capped
from int4_packing import as_loaded
from ops import torch_ref
from ops.cpu import build as cpu_build
from ops.cpu import dequant, embedding, graph
from ops.cpu import linear_int4 as cpu_int4
from ops.cpu import linear_int8 as cpu_int8
from ops.torch_ref.linear_int4 import dequantize_int4, linear_int4_torch
from ops.torch_ref.linear_int8 import linear_int8_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

DTYPES = [torch.float32, torch.bfloat16]

def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    for kernel in (dequant.KERNEL, cpu_int8.KERNEL, cpu_int4.KERNEL):
        assert kernel.build(), kernel.error


def int8_operands(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(m * n + k)
    x = torch.randn(m, k).to(dtype)
    x[:, ::37] *= 30  # outlier channels, as real activations have
    return x, torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) / 100).to(dtype)


def int4_operands(m: int, n: int, k: int, g: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(m * n + k)
    x = torch.randn(m, k).to(dtype)
    x[:, ::37] *= 30
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    return x, w, (torch.rand(n, k // g) / 50).to(dtype), (torch.randn(n, k // g) / 10).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loops", LOOPS)
def test_dequantised_int4_rows_are_the_references_to_the_bit(dtype, loops):
    """From weights packed as the loader packs them for the build (avx2: interleaved); rows 0-36 whole, then rows 4-36
    (a block of prefill's from a quad's start)."""
    _, w, scale, offset = int4_operands(1, 37, 384, 128, dtype)
    lib = capped(dequant.KERNEL, loops).lib
    packed = as_loaded(w, capped(cpu_int4.KERNEL, loops).lib)
    for n0 in (0, 4):
        out = torch.empty(37 - n0, 384, dtype=dtype)
        graph.call(lib.dequant_int4, packed[n0:], scale[n0:], offset[n0:], out, 37 - n0, 384, 128,
                   int(dtype == torch.bfloat16))
        assert torch.equal(out, dequantize_int4(w[n0:], scale[n0:], offset[n0:]).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize(("k", "g"), [(64, 64), (128, 128), (192, 64), (256, 64), (320, 64), (1216, 64), (1216, 1216),
                                      (1024, 128), (2112, 64), (2112, 192), (2944, 128)])
def test_dequantised_int4_rows_of_each_chunk_tail_are_the_references_to_the_bit(dtype, loops, k, g):
    """Rows of 1-3 blocks past their whole 256-column chunks (and of none), groups of one block to the whole row; and
    past whole 1024-column spans (the AVX-512 loop's transposed span: 1-15 blocks past 0-2 spans, and none past one);
    7 rows (a quad, then 3 row by row), from row 0 and from row 4."""
    _, w, scale, offset = int4_operands(1, 7, k, g, dtype)
    lib = capped(dequant.KERNEL, loops).lib
    packed = as_loaded(w, capped(cpu_int4.KERNEL, loops).lib)
    for n0 in (0, 4):
        out = torch.empty(7 - n0, k, dtype=dtype)
        graph.call(lib.dequant_int4, packed[n0:], scale[n0:], offset[n0:], out, 7 - n0, k, g,
                   int(dtype == torch.bfloat16))
        assert torch.equal(out, dequantize_int4(w[n0:], scale[n0:], offset[n0:]).to(dtype))


def dequantised_int4(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, loops: str) -> torch.Tensor:
    """w: [N, K / 2] plain, scale, offset: [N, K / 64] -> dequant_int4's rows, through the weights as loaded."""
    n, k = w.shape[0], 2 * w.shape[1]
    out = torch.empty(n, k, dtype=scale.dtype)
    graph.call(capped(dequant.KERNEL, loops).lib.dequant_int4, as_loaded(w, capped(cpu_int4.KERNEL, loops).lib),
               scale, offset, out, n, k, 64, int(scale.dtype == torch.bfloat16))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loops", LOOPS)
def test_dequantised_int4_subnormals_are_the_references_to_the_bit(dtype, loops):
    """Groups whose values fall below fp32's (and bf16's) normal range beside normal ones: the AVX-512 loop rounds
    those as the reference does (vcvtneps2bf16 would flush them to 0) and keeps its fast rounding for the others.
    Tiny scales and offsets (2^-125 times the usual), and normal ones in [2^-126, 2^-125) whose sum is subnormal
    (scale (1 + r) 2^-126, offset -2^-126: r 2^-126 at q = 1), which a guard of "0 or normal" would let through."""
    _, w, scale, offset = int4_operands(1, 8, 1024, 64, dtype)
    group = torch.arange(scale.numel()).view(scale.shape) % 3
    scale = torch.where(group == 0, scale * 2.0**-125, torch.where(group == 1, (1 + scale) * 2.0**-126, scale))
    offset = torch.where(group == 0, offset * 2.0**-125, torch.where(group == 1, -(2.0**-126), offset))
    expected = dequantize_int4(w, scale, offset).to(dtype)
    subnormal = (expected != 0).logical_and(expected.abs() < 2.0**-126)
    assert subnormal.sum() > 1000
    assert subnormal[group.repeat_interleave(64, 1) == 1].sum() > 100  # the normal groups' q = 1
    assert torch.equal(dequantised_int4(w, scale, offset, loops), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loops", LOOPS)
def test_dequantised_int4_overflows_are_the_references(dtype, loops):
    """Groups of scale 2^127, offset -1.5 * 2^127, whose products overflow to inf from q = 2 before the offset is
    added (the reference's order: a fused multiply-add would give 0.5 * 2^127), and of scale 2^124, offset -2^127,
    the largest the AVX-512 loop fuses (finite), beside normal ones."""
    _, w, scale, offset = int4_operands(1, 8, 1024, 64, dtype)
    group = torch.arange(scale.numel()).view(scale.shape) % 3
    scale = torch.where(group == 0, 2.0**127, torch.where(group == 1, 2.0**124, scale))
    offset = torch.where(group == 0, -1.5 * 2.0**127, torch.where(group == 1, -(2.0**127), offset))
    expected = dequantize_int4(w, scale, offset).to(dtype)
    assert expected.isinf().sum() > 1000 and expected[group.repeat_interleave(64, 1) == 1].isfinite().all()
    assert torch.equal(dequantised_int4(w, scale, offset, loops), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize(("n", "k"), [(37, 384), (9, 40), (3, 8), (2, 5)])
def test_dequantised_int8_rows_are_the_weights_exactly(dtype, loops, n, k):
    """Whole 32-column passes and the last few weights one by one (K % 32 != 0, and fewer than a pass in all), from
    row 0 and from row 1 (a start off the passes' alignment)."""
    _, q, _ = int8_operands(1, n, k, dtype)
    lib = capped(dequant.KERNEL, loops).lib
    for n0 in (0, 1):
        out = torch.full((n - n0, k), float("nan"), dtype=dtype)
        graph.call(lib.dequant_int8, q[n0:], out, n - n0, k, int(dtype == torch.bfloat16))
        assert torch.equal(out, q[n0:].to(dtype))


def ulps(out: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|out - reference| in bf16 ulps of the reference."""
    ulp = 2.0 ** (torch.floor(torch.log2(reference.double().abs().clamp_min(2**-100))) - 7)
    return (out.double() - reference.double()).abs() / ulp


# (rows, output channels, input columns): at the threshold and beyond; a small block (monkeypatched) so that N
# spans whole blocks and a partial last one; odd N
SHAPES = [(dequant.MIN_ROWS, 37, 256), (dequant.MIN_ROWS + 30, 100, 1024)]


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("native_bf16", [True, False])
def test_int8_matches_reference(monkeypatch, m, n, k, dtype, native_bf16):
    monkeypatch.setattr(dequant, "BLOCK_BYTES", 8 * k * 2)  # 8 bf16 or 4 fp32 weight rows a block
    monkeypatch.setattr(dequant, "TILE_ROWS", 4)
    monkeypatch.setattr(dequant, "AVX512_BF16", native_bf16)
    x, q, scale = int8_operands(m, n, k, dtype)
    out = cpu_int8.linear_int8(x, q, scale)
    assert out.dtype == dtype and out.shape == (m, n)
    reference = linear_int8_torch(x, q, scale)
    if dtype == torch.float32:  # the reference's arithmetic, its sums in another order
        torch.testing.assert_close(out, reference, atol=1e-5 * k**0.5, rtol=1e-5)
    else:  # fp32 sums rounded to bf16 (with native bf16: before the scale and after)
        assert ulps(out, reference).max() <= 1


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("native_bf16", [True, False])
def test_int4_matches_reference(monkeypatch, m, n, k, dtype, native_bf16):
    monkeypatch.setattr(dequant, "BLOCK_BYTES", 6 * k * 2)  # 6 bf16 or 3 fp32 rows: blocks of whole quads, 4
    monkeypatch.setattr(dequant, "TILE_ROWS", 4)
    monkeypatch.setattr(dequant, "AVX512_BF16", native_bf16)
    x, w, scale, offset = int4_operands(m, n, k, 128, dtype)
    out = cpu_int4.linear_int4(x, as_loaded(w), scale, offset)
    assert out.dtype == dtype and out.shape == (m, n)
    reference = linear_int4_torch(x, w, scale, offset)
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference, atol=1e-5 * k**0.5, rtol=1e-5)
        return
    if not native_bf16:  # the reference's arithmetic, then one rounding to bf16
        assert ulps(out, reference).max() <= 1
        return
    # each weight rounded to bf16 (2^-9 relative), then the output (half an ulp): against the exact product
    rows, weights = x.double(), dequantize_int4(w, scale, offset).double()
    exact, magnitude = rows @ weights.T, rows.abs() @ weights.abs().T
    assert ((out.double() - exact).abs() <= (2**-9 + 2**-22) * magnitude + 2**-8 * exact.abs()).all()
    assert (ulps(out, reference) > 1).float().mean() < 0.2


def operands(quant: str, m: int) -> tuple[torch.Tensor, ...]:
    if quant == "int8":
        return int8_operands(m, 40, 128, torch.bfloat16)
    return int4_operands(m, 40, 128, 64, torch.bfloat16)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_threshold_is_on_the_calls_rows(monkeypatch, quant):
    """MIN_ROWS rows take the blocked GEMM, one fewer the decode kernel (which chunked prefill's
    mixed steps reach by their row count alone)."""
    module = cpu_int8 if quant == "int8" else cpu_int4
    calls = []
    record_rows(monkeypatch, calls, (dequant, f"linear_{quant}"), (module, f"linear_{quant}_cpu"))
    x, *weights = operands(quant, dequant.MIN_ROWS)
    for rows in (x, x[:-1]):
        getattr(module, f"linear_{quant}")(rows, *weights)
    assert calls == [(f"linear_{quant}", dequant.MIN_ROWS), (f"linear_{quant}_cpu", dequant.MIN_ROWS - 1)]


@pytest.mark.parametrize("missing", [cpu_int4.KERNEL, dequant.KERNEL, embedding.KERNEL],
                         ids=["linear_int4", "dequant", "embedding"])
def test_int4_without_one_of_its_kernels_takes_the_references(monkeypatch, missing):
    """The kernel set where linear_int4.c, dequant.c or embedding.c did not build: the int4 linears, the int4 embedding
    and the repack at load are the torch references' (the C files read one layout, which the references do not)."""
    monkeypatch.setattr(missing, "ready", False)
    kernel_set = ops.cpu.kernels(torch.bfloat16, hidden_size=128, head_dim=64, num_heads=2, num_kv_heads=1)
    ref = torch_ref.KERNELS
    assert (kernel_set.linear_int4, kernel_set.embedding_int4, kernel_set.repack_int4) == (
        ref.linear_int4, ref.embedding_int4, ref.repack_int4)
    monkeypatch.setattr(missing, "ready", True)
    kernel_set = ops.cpu.kernels(torch.bfloat16, hidden_size=128, head_dim=64, num_heads=2, num_kv_heads=1)
    assert (kernel_set.linear_int4, kernel_set.repack_int4) == (cpu_int4.linear_int4, cpu_int4.repack)


@pytest.mark.parametrize("n,k", [(1024, 3072), (4096, 1024), (6144, 1024), (1024, 2048), (151936, 1024), (300, 512)])
def test_blocks_are_whole_tiles_of_about_equal_size(monkeypatch, n, k):
    """Qwen3-0.6B's linears (and its LM head, for prompt logprobs): as few blocks as BLOCK_BYTES allows, of whole
    TILE_ROWS, the fewest that cover the weight in that many blocks (down_proj's 1024 rows of 3072 went as 680 + 344,
    where oneDNN's GEMM runs slower a row than two 512s)."""
    monkeypatch.setattr(dequant, "_scratch", dequant._Scratch())
    _, rows = dequant._block(torch.bfloat16, n, k)
    blocks = -(-n // rows)
    assert blocks == -(-n * k * 2 // dequant.BLOCK_BYTES)
    assert rows == n or (rows % dequant.TILE_ROWS == 0 and (rows - dequant.TILE_ROWS) * blocks < n)


def test_the_scratch_is_kept_across_calls_one_per_thread(monkeypatch):
    """One buffer per thread and GEMM dtype, sized by the largest block a call needed (at most BLOCK_BYTES)."""
    monkeypatch.setattr(dequant, "_scratch", dequant._Scratch())
    x, q, scale = int8_operands(dequant.MIN_ROWS, 300, 512, torch.float32)
    with torch.inference_mode():  # as the engine calls it
        dequant.linear_int8(x, q, scale)
    kept = dequant._scratch.by_dtype[torch.float32]
    dequant.linear_int8(x, q, scale)  # outside inference_mode, as tests and tools call it: still writable
    dequant.linear_int8(x[:, :256].contiguous(), q[:, :256].contiguous(), scale)  # shorter rows: the same buffer
    assert dequant._scratch.by_dtype[torch.float32] is kept
    assert kept.numel() == 300 * 512  # the whole weight is one block, smaller than BLOCK_BYTES

    others = {}

    def run() -> None:
        dequant.linear_int8(x, q, scale)
        others.update(dequant._scratch.by_dtype)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert others[torch.float32] is not kept and dequant._scratch.by_dtype[torch.float32] is kept


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_prefill_sized_prompt_matches_the_quantised_reference(monkeypatch, quant):
    """fp32 activations with the C kernels: a prompt of MIN_ROWS + 7 tokens takes the blocked GEMM, and greedy
    output equals transformers on the same dequantised weights token for token."""
    from checkpoints import make_checkpoint
    from engine_util import generate, greedy, hf_greedy, load_engine
    from quant_reference import load_quantised_hf_model

    checkpoint = make_checkpoint()
    prompts = [list(range(2000, 2000 + dequant.MIN_ROWS + 7))]
    expected = [hf_greedy(load_quantised_hf_model(checkpoint, quant), p, 4) for p in prompts]
    engine = load_engine(checkpoint, kernels="auto", quant=quant)
    calls = []
    record_rows(monkeypatch, calls, (dequant, f"linear_{quant}"))
    assert [r.choices[0].token_ids for r in generate(engine, prompts, greedy(4))] == expected
    assert calls and all(rows == len(prompts[0]) for _, rows in calls)
