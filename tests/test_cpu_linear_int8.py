"""The compiled CPU int8 weight-only matmul against the torch reference and the exact product, and its dispatch."""
from __future__ import annotations

import math

import pytest
import torch

from call_rows import record_rows
from cpu_isas import AMX, LOOPS, VNNI, capped
from ops.cpu import build as cpu_build
from ops.cpu import dequant
from ops.cpu import linear_int8 as cpu_int8
from ops.torch_ref.linear_int8 import linear_int8_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    for kernel in (cpu_int8.KERNEL, dequant.KERNEL):  # dequant's: the prefill rows' (else the torch reference's)
        assert kernel.build(), kernel.error


SHAPES = [(1, 64, 32), (2, 13, 96), (3, 4096, 1024), (8, 1024, 3072), (32, 6, 32), (5, 151, 64), (20, 100, 96)]


def operands(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(m * n + k)
    x = torch.randn(m, k).to(dtype)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return x, w, (torch.rand(n) / 100).to(dtype)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(m, n, k, dtype):
    x, w, scale = operands(m, n, k, dtype)
    out = cpu_int8.linear_int8_cpu(x, w, scale)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = linear_int8_torch(x, w, scale)
    if dtype == torch.float32:  # fp32 sums in another order (and 4 activation pieces): rounding only
        torch.testing.assert_close(out, ref, atol=1e-5 * k**0.5, rtol=1e-5)
    else:  # one bf16 rounding of fp32 results within 2^-16 of each other: at most one ulp apart
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-3 * k**0.5, rtol=8e-3)


# Activation pieces per dtype and the bound their sum keeps: |x - sum of pieces| <= max|x| * PIECE_ERROR[P], fp32
# rounding of the residuals included. With VNNI int8 pieces (csrc/linear_int8.c's PIECES_BF16, PIECES_F32;
# act_quant.h), on AVX2 int16 pieces (PIECES16_BF16, PIECES16_F32; act_quant16.h), one of which is as close as
# two int8 ones.
PIECES = {"int8": {torch.bfloat16: 2, torch.float32: 4}, "int16": {torch.bfloat16: 1, torch.float32: 2}}
# The pieces the kernel set's own build ("built") takes here: int8 where the CPU has AVX512-VNNI, else int16 (AVX-512
# without VNNI widens each weight to fp32: exact products, within either bound).
LOOPS_PIECES = {"built": "int8" if VNNI else "int16", "avx2": "int16", "avx512": "int8"}  # avx512: with AMX, VNNI
PIECE_ERROR = {"int8": {p: 0.5 / 127 / 254 ** (p - 1) + 2**-23 for p in (2, 3, 4)},
               "int16": {p: 0.5 / 32767 / 65534 ** (p - 1) + 2**-23 for p in (1, 2)}}
# VNNI: 1 row vpdpbusd; 2+ rows with K % 64 == 0: AMX tdpbssd (rows in groups of 24 bf16 / 12 fp32 rows), else
# vpdpbusd in groups of 4 / 2 rows; odd N leaves AMX a partial block of weight rows. AVX2: vpmaddwd in groups of
# 4 / 2 rows (4 int16 piece rows).
# 7 rows: AVX2's group of 4 then of 3 (bf16), three of 2 then a row alone (fp32); K 8224: two of AVX2's 4096-column
# int32 spans and a partial third.
PIECE_SHAPES = [(1, 151, 1024), (1, 13, 96), (2, 77, 1024), (3, 13, 96), (8, 151, 3072), (16, 33, 2048),
                (32, 40, 64), (5, 9, 32), (7, 9, 96), (2, 17, 8224)]


def linear_with(loops: str, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`built`: the kernel set's own (int8 pieces where the CPU has VNNI, else int16); `avx2`: int16 pieces; `avx512`
    (where the CPU has AMX): int8 pieces by vpdpbusd."""
    if loops == "built":
        return cpu_int8.linear_int8_cpu(x, w, scale)
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    capped(cpu_int8.KERNEL, loops).lib.linear_int8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), out.data_ptr(),
                                                   x.shape[0], w.shape[0], x.shape[1], int(x.dtype == torch.bfloat16))
    return out


@pytest.mark.parametrize("m,n,k", PIECE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_within_the_piece_bound_of_the_exact_product(m, n, k, dtype, loops):
    """Against the exact product with the same int8 weights: the activation pieces' bound (one fewer int8 piece
    exceeds it 254-fold), fp32 rounding of the sums, and for bf16 the rounding of the output; int16 pieces' bound
    is within int8's."""
    x, w, scale = operands(m, n, k, dtype)
    x[:, ::37] *= 30  # outliers: the pieces' scales follow each row's largest element
    out, kind = linear_with(loops, x, w, scale).double(), LOOPS_PIECES[loops]
    xd, wd, sd = x.double(), w.double(), scale.double()
    exact = (xd @ wd.T) * sd
    pieces = xd.abs().amax(dim=1, keepdim=True) * PIECE_ERROR[kind][PIECES[kind][dtype]] * wd.abs().sum(dim=1)
    bound = (pieces + 2**-21 * (xd.abs() @ wd.abs().T)) * sd.abs()
    if dtype == torch.bfloat16:
        bound = bound + 2**-8 * (exact.abs() + bound)  # half a bf16 ulp
    excess = (out - exact).abs() / bound
    assert excess.max() <= 1, f"error {excess.max():.3g}x the bound"
    if dtype == torch.float32:  # the last piece is below fp32 rounding: as close as the reference's own sums
        reference = (linear_int8_torch(x, w, scale).double() - exact).abs().max()
        assert (out - exact).abs().max() <= 1.5 * reference


# K 96 and 2080: a last 32 columns (the vpdpbusd loops' masked tail); N 37: each chunk's pairs of weight rows, an odd
# last one alone (csrc/linear_int8.c's dot_pieces); 16 rows: passes of 4 bf16 or 2 fp32 rows, and of fewer.
@pytest.mark.parametrize("n,k", [(37, 96), (37, 1024), (37, 2080), (301, 3072)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_a_rows_outputs_do_not_depend_on_its_batch_mates(n, k, dtype, loops):
    """A row's outputs are the same bits alone as in a batch of 2-16 rows: with VNNI one row takes row_lanes and more
    dot_pieces (two weight rows a pass, 8 outputs reduced together), whose integer sums, piece scaling, reduction
    order and rounding are row_lanes' and dot_rows'; on AVX2 madd_pieces alike. AMX-INT8 (2+ rows, K % 64 == 0) sums
    in another order: its shapes are left out where the CPU has it."""
    if AMX and loops == "built" and k % 64 == 0:  # the avx512 cap turns AMX off: it runs dot_pieces
        pytest.skip("AMX-INT8's 2+ rows sum in another order than one row's vpdpbusd")
    x, w, scale = operands(16, n, k, dtype)
    x[:, ::37] *= 30
    alone = torch.cat([linear_with(loops, x[m:m + 1], w, scale) for m in range(16)])
    for rows in range(2, 17):
        batch = linear_with(loops, x[:rows], w, scale)
        assert torch.equal(batch, alone[:rows]), (rows, (batch != alone[:rows]).sum().item())


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("loops", [loops for loops in LOOPS if LOOPS_PIECES[loops] == "int8"])
def test_a_bf16_output_halfway_between_two_rounds_to_even(rows, loops):
    """Exact sums (integer activations, each row's largest 127: one piece each) halfway between two bf16 values, which
    torch rounds to even: 257 -> 256 and 263 -> 264 (rows [127, 127, 3]), 259 -> 260 and 269 -> 268 (the last row,
    [127, 127, 5]), against weight rows [1, 1, 1] and [1, 1, 3]; [1, 1, 0] gives an exact 254. Random operands never
    meet a tie: a batched end (dot_pieces' store_pass) that dropped the to-even term passed every other test. The int8
    pieces' loops (VNNI) only: the int16 pieces' sums are within their bound, not exact (3 is no multiple of 127's
    piece scale), so a tie is none there."""
    x = torch.zeros(rows, 64, dtype=torch.bfloat16)
    x[:, :3] = torch.tensor([127.0, 127.0, 3.0])
    x[rows - 1, 2] = 5
    w = torch.zeros(3, 64, dtype=torch.int8)
    w[:, :3] = torch.tensor([[1, 1, 1], [1, 1, 3], [1, 1, 0]], dtype=torch.int8)
    out = linear_with(loops, x, w, torch.ones(3, dtype=torch.bfloat16))
    expected = (x.double() @ w.double().T).to(torch.bfloat16)
    assert torch.equal(out, expected), (out, expected)


@pytest.mark.parametrize("k", [4096, 4128, 8192])
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("loops", LOOPS)
def test_the_largest_sums_do_not_overflow(m, k, loops):
    """Every activation at its row's largest magnitude (each piece at its limit) against weights of -128 and 127:
    the int32 sums at their largest, where a span of more columns than SPAN16 (csrc/linear_int8.c) would wrap; one
    row (the vpdpbusd loop, weight 127 read as u8 255) and two (AMX where K % 64 == 0), with and without a tail."""
    x = -torch.ones(m, k)
    w = torch.stack([torch.full((k,), -128, dtype=torch.int8), torch.full((k,), 127, dtype=torch.int8)])
    out = linear_with(loops, x, w, torch.ones(2))
    torch.testing.assert_close(out, torch.tensor([[128.0 * k, -127.0 * k]] * m), rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [1e36, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (3, 40, 1024), (17, 40, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_a_huge_or_non_finite_activation_gives_the_references_outputs(m, n, k, dtype, loops, value):
    """A row holding 1e36 (times the weights' 127 below FLT_MAX), an infinity or a NaN: its outputs are the
    reference's, inf (of its sign) where it has inf, NaN where it has NaN, finite within rounding where it is finite;
    the other rows keep their bits. The pieces made an infinity NaN on every output (a row's scales NaN); past
    act_quant.h's PIECES_RANGE a row takes the widening loops. 17 rows: AMX's second pass where the CPU has it."""
    x, w, scale = operands(m, n, k, dtype)
    w[0, 7] = 0  # inf x 0: NaN in the reference's one output too
    bad = m - 1
    clean = linear_with(loops, x, w, scale)
    x[bad, 7] = value
    out = linear_with(loops, x, w, scale)
    ref = linear_int8_torch(x, w, scale)[bad]
    assert ref.isinf().any() == math.isinf(value) and ref.isnan().all() == math.isnan(value)
    assert torch.equal(out[bad].isnan(), ref.isnan()) and torch.equal(out[bad].isinf(), ref.isinf())
    assert torch.equal(out[bad][ref.isinf()], ref[ref.isinf()])
    finite = ref.isfinite()
    torch.testing.assert_close(out[bad][finite].float(), ref[finite].float(), rtol=8e-3, atol=0)
    assert torch.equal(out[:bad], clean[:bad])


def test_dispatch_by_rows(monkeypatch):
    """Decode rows take the C kernel, prefill rows dequant.py's blocked GEMM (its C kernel dequantises the blocks)."""
    calls = []
    record_rows(monkeypatch, calls, (cpu_int8, "linear_int8_cpu"), (dequant, "linear_int8"))
    x, w, scale = operands(cpu_int8.MAX_ROWS + 1, 48, 64, torch.float32)
    for rows in (x[:1], x[:5].view(5, 1, 64), x):  # decode rows: the C kernel; prefill rows: dequant.py
        out = cpu_int8.linear_int8(rows, w, scale)
        assert out.shape == (*rows.shape[:-1], 48)
        torch.testing.assert_close(out, linear_int8_torch(rows, w, scale), atol=1e-4, rtol=1e-5)
    assert calls == [("linear_int8_cpu", 1), ("linear_int8_cpu", 5), ("linear_int8", cpu_int8.MAX_ROWS + 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_widening_loop_without_vnni(tmp_path, monkeypatch, dtype):
    """CPUs with AVX-512 but no VNNI widen every weight to fp32 (AVX2's widening loops, without scratch, are
    tests/test_cpu_no_scratch.py's)."""
    monkeypatch.setattr(cpu_build, "FLAGS", [*cpu_build.FLAGS, "-DNANOQWEN_NO_VNNI"])
    kernel = cpu_build.CKernel("no_vnni_linear_int8", "linear_int8.c", ("linear_int8",))
    assert kernel.build(tmp_path), kernel.error
    for m, n, k in [(1, 151, 1024), (3, 13, 96), (9, 40, 64)]:
        x, w, scale = operands(m, n, k, dtype)
        out = torch.empty(m, n, dtype=dtype)
        kernel.lib.linear_int8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), out.data_ptr(), m, n, k,
                               int(dtype == torch.bfloat16))
        tol = {"atol": 1e-5 * k**0.5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3 * k**0.5, "rtol": 8e-3}
        torch.testing.assert_close(out.float(), linear_int8_torch(x, w, scale).float(), **tol)
