"""The compiled CPU int4 weight-only matmul against the torch reference, and its dispatch."""
from __future__ import annotations

import math

import pytest
import torch

from call_rows import record_rows
from cpu_isas import CPU_FLAGS, LOOPS, VNNI, capped
from int4_packing import as_loaded, from_interleaved, from_spanned
from ops.cpu import build as cpu_build
from ops.cpu import dequant
from ops.cpu import linear_int4 as cpu_int4
from ops.torch_ref.act_block8 import act_block8
from ops.torch_ref.linear_int4 import dequantize_int4, linear_int4_torch, unpack_int4

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    for kernel in (cpu_int4.KERNEL, dequant.KERNEL):  # dequant.py's: prefill rows
        assert kernel.build(), kernel.error


# bf16 rows are int8 blocks, but where AMX-INT8 takes them (AMX_INT8_MIN_ROWS rows or more: int8 pieces); fp32 rows
# int8 pieces with AVX-512 F/BW/VL/VNNI, else (AVX2) int16 pieces, (pieces + 1) // 2 of them
needs_vnni = pytest.mark.skipif(not VNNI, reason="this CPU lacks AVX-512 F/BW/VL/VNNI (the int8 pieces' loops)")
AMX_INT8 = "amx_int8" in CPU_FLAGS
AMX_INT8_MIN_ROWS = 3  # csrc/linear_int4.c's
needs_amx_int8 = pytest.mark.skipif(not AMX_INT8, reason="this CPU lacks AMX-INT8 (the only bf16 rows taken as pieces)")

# (rows, output channels, input columns, group size). VNNI: 1-2 rows and fp32's many pieces take the vpdpbusd loop (8
# bf16 or 4 fp32 rows at a time, spans of 16 blocks, the last one partial below 1024 columns; where a pass's pieces
# outgrow L1 or more than 8 piece rows' sums the registers (5-8 bf16 rows even at one span: (7, 37, 576, 192), a span of
# 9 blocks, groups of 3, a last 16 of 5), 16 weight rows span by span, two a pass, the last 16 partial: (6, 37, 2112,
# 64)); 3-16 bf16 rows and 3-10 fp32 rows take AMX-INT8 where the CPU has it (16 bf16 rows: 32 piece columns, two
# tiles), its last N % 16 rows the loop; more rows take it in passes of that many. AVX2: chunks of 4 blocks, the last of
# K / 64 % 4 (K 64, 128, 192, 2112: 1, 2, 3, 1 blocks); 4 weight rows a pass at one piece row (1 bf16 or 1 fp32 row of
# one piece), 2 at two, the last N % 4 singly, in pool chunks of whole 4-row passes (88 rows at 3072 columns: (1, 301,
# 3072, 64) ends in a chunk of 37); 3-8 piece rows (3-8 bf16 or 2-4 fp32 rows) one weight row a pass, 8 bf16 or 4 fp32
# rows at a time ((9, 40, 256, 128): 8 then 1; (24, ...): 3 passes of 8), groups of one block, of two or of several
# chunks ((5, 151, 1024, 1024); at 1 row: (1, 24, 2304, 128))
SHAPES = [(1, 64, 64, 64), (1, 40, 3072, 64), (2, 13, 128, 64), (3, 4096, 1024, 64), (8, 1024, 3072, 64),
          (9, 40, 256, 128), (16, 35, 1024, 64), (32, 6, 192, 64), (24, 40, 1024, 64), (5, 151, 1024, 1024),
          (4, 48, 2048, 256), (6, 37, 2112, 64), (7, 40, 2112, 64), (1, 301, 3072, 64), (1, 24, 2304, 128),
          (7, 37, 576, 192)]


def operands(m: int, n: int, k: int, g: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(m * n + k)
    x = torch.randn(m, k).to(dtype)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    return x, w, (torch.rand(n, k // g) / 50).to(dtype), (torch.randn(n, k // g) / 10).to(dtype)


def block_error(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[M, N]: how far the AVX2 path's int8 blocks of bf16 rows may put y: each element within its 64-column block's
    largest / 254 (act_block8.h), times the weights' |w| summed over the block."""
    m, k = x.shape
    largest = x.abs().view(m, k // 64, 64).amax(dim=2)
    return (largest / 254) @ weights.abs().view(weights.shape[0], k // 64, 64).sum(dim=2).T


def piece_error(kind: str, pieces: int) -> float:
    """How far a row's pieces may be from it, per element, over its largest element: `pieces` int8 ones, or the
    int16 ones the AVX2 path takes for them (one holds what two int8 ones do)."""
    return 254.0**-pieces if kind == "int8" else 65534.0 ** -((pieces + 1) // 2)


def error_and_bound(x, w, scale, offset, out: torch.Tensor, pieces: int,
                    kind: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """|out - x @ W.T| (in fp64) and its bound with `pieces` pieces of `kind`: each row of x is its pieces plus a
    remainder of at most max|x[m]| * piece_error an element, so y is off by that times sum_k |W[n, k]|; kind
    "block": int8 blocks (block_error), `pieces` unused; then fp32 rounding, and the output's own rounding to bf16."""
    weights, rows = dequantize_int4(w, scale, offset).double(), x.double()
    ref = rows @ weights.T
    if kind == "block":
        pieces_term = block_error(rows, weights)
    else:
        pieces_term = rows.abs().amax(dim=1, keepdim=True) * weights.abs().sum(dim=1) * piece_error(kind, pieces)
    bound = 1.01 * pieces_term + 2**-22 * (rows.abs() @ weights.abs().T)
    if out.dtype == torch.bfloat16:
        bound = bound + 2**-8 * ref.abs()
    return (out.double() - ref).abs(), bound


def linear(loops: str, x, w, scale, offset) -> tuple[torch.Tensor, str]:
    """y and the kind of pieces it took: `built`, the kernel set's kernel; `avx2`, the AVX2 build (int8 blocks for
    bf16 rows, int16 pieces for fp32 ones); `avx512`, AVX-512's without AMX (int8 blocks for bf16 rows, int8 pieces
    for fp32 ones: a CPU with AMX has VNNI); w as quantize_int4_into writes it, repacked for the build as the loader
    does."""
    if x.dtype == torch.bfloat16:
        amx = loops == "built" and AMX_INT8 and x.shape[0] >= AMX_INT8_MIN_ROWS
        avx2 = avx512 = "int8" if amx else "block"
    else:
        avx2, avx512 = "int16", "int8"
    if loops == "built":
        return cpu_int4.linear_int4_cpu(x, as_loaded(w), scale, offset), avx512 if VNNI else avx2
    lib = capped(cpu_int4.KERNEL, loops).lib
    out, packed = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype), as_loaded(w, lib)
    lib.linear_int4(x.data_ptr(), packed.data_ptr(), scale.data_ptr(), offset.data_ptr(), out.data_ptr(),
                    x.shape[0], w.shape[0], x.shape[1], x.shape[1] // scale.shape[1], int(x.dtype == torch.bfloat16),
                    cpu_int4.PIECES[x.dtype])
    return out, avx512 if loops == "avx512" else avx2


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("k", [64, 192, 576, 1024, 2112, 3136])
def test_the_repack_at_load_round_trips(n, k):
    """The AVX2 build reads the rows interleaved (tests/int4_packing.py's from_interleaved: chunks of 4 blocks, K 192
    one of 3, rows in quads, the last N % 4 row by row), the AVX-512 one by span (from_spanned: spans of 16 blocks,
    K 2112 a last one of 1, 3136 of 1 and 576 a span of 9 alone); the built one interleaved exactly where it takes
    the AVX2 loops (without AVX-512 VNNI). Every nibble kept."""
    torch.manual_seed(n * k)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    interleaved = as_loaded(w, capped(cpu_int4.KERNEL, "avx2").lib)
    assert torch.equal(from_interleaved(interleaved), w) and not torch.equal(interleaved, w)
    built = as_loaded(w)
    assert cpu_int4.interleaved() == (not VNNI)
    if not VNNI:
        assert torch.equal(built, interleaved)
        return
    spanned = as_loaded(w, capped(cpu_int4.KERNEL, "avx512").lib)
    assert torch.equal(from_spanned(spanned), w) and torch.equal(built, spanned)
    assert torch.equal(spanned, w) == (k == 64)


@needs_vnni
@pytest.mark.parametrize("n", [16, 33, 80])
@pytest.mark.parametrize("k", [64, 576, 1024, 1088, 2112, 4032, 4096])
def test_the_amx_operand_holds_each_blocks_nibbles(n, k):
    """The tiles AMX-INT8 multiplies (linear_int4_amx_tiles, built span by span as linear_int4_amx builds them, by
    permutes from the spanned rows), checked on every AVX-512 VNNI machine, AMX or not: row i of tile [t][b] holds
    block b of weight row 16 t + i, byte j its low nibbles' columns (j < 32), then its high nibbles' (the plain
    layout's 16-bit word j % 32 // 2 holds columns j % 32 // 2 + 16 h, nibble h). K 576 a lone span of 9 blocks,
    1088 and 2112 a last one of 1, 4032 of 15; the last N % 16 rows take no tile."""
    torch.manual_seed(n + k)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    loaded, tiles = as_loaded(w), torch.full((n // 16, k // 64, 16, 64), 255, dtype=torch.uint8)
    cpu_int4.KERNEL.lib.linear_int4_amx_tiles(loaded.data_ptr(), n, k, tiles.data_ptr())
    q = unpack_int4(w)[: n // 16 * 16].view(n // 16, 16, k // 64, 64).transpose(1, 2)  # [tile, block, row, column]
    j = torch.arange(64)
    assert torch.equal(tiles, q[..., j % 32 // 2 + 32 * (j % 2) + 16 * (j // 32)])


def test_the_amx_operand_of_interleaved_weights_is_not_written():
    """Interleaved spans are 4 blocks: the export's 16-block steps wrote past its tiles (a heap overflow at K 2112)."""
    w = as_loaded(torch.randint(0, 256, (16, 2112 // 2), dtype=torch.uint8), capped(cpu_int4.KERNEL, "avx2").lib)
    tiles = torch.full((1, 2112 // 64 + 64, 16, 64), 255, dtype=torch.uint8)  # room past its end: no crash to see
    capped(cpu_int4.KERNEL, "avx2").lib.linear_int4_amx_tiles(w.data_ptr(), 16, 2112, tiles.data_ptr())
    assert (tiles == 255).all()


@pytest.mark.parametrize("m,n,k,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_matches_reference_within_the_pieces_bound(m, n, k, g, dtype, loops):
    x, w, scale, offset = operands(m, n, k, g, dtype)
    out, kind = linear(loops, x, w, scale, offset)
    assert out.dtype == dtype and out.shape == (m, n)
    err, bound = error_and_bound(x, w, scale, offset, out, cpu_int4.PIECES[dtype], kind)
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("n,k,g", [(1024, 1024, 64), (253, 2112, 64), (61, 2304, 128), (13, 1024, 1024),
                                   (37, 448, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", [
    pytest.param("built", marks=pytest.mark.skipif(not VNNI or "amx_int8" in CPU_FLAGS, reason=(
        "the built kernel is the AVX2 one here (the avx2 case), or with AMX-INT8 takes tiles from 3 rows, vpdpbusd "
        "below: two orders"))),
    *LOOPS[1:]])
def test_a_rows_outputs_do_not_depend_on_its_batch_mates(loops, dtype, n, k, g):
    """A row's outputs are the same bits alone as in a batch of 2, 3, 5, 8 or 9: on AVX2 1-2 piece rows (1-2 bf16 rows,
    1 fp32 row) take il_quad, 3-8 il_rows (8 bf16 or 4 fp32 rows a pass, 9 rows two passes), whose chunk sums, their
    scaling (il_scaled8, which il_quad8 and il_row_sums8 share) and ends (madd_ends) are the same for a row. The kernel
    before madd_ends failed every fp32 case at 2 rows (1367 of 2048 outputs at 1024 x 1024) and bf16's 1024 x 1024 at 8
    rows (1 output): fp32 is the sensitive dtype, bf16's rounding hides most differences. 33 and 18 groups: past the
    offsets' 8-group vectors, K 2112 a last chunk of one block, K 448 one of three, K 2304 at G 128 groups of two
    blocks; one group (G = K): the offsets' scalar tail alone; N 253, 61, 37 and 13: passes of fewer weight rows at each
    chunk's end and rows past the last quad."""
    x, w, scale, offset = operands(9, n, k, g, dtype)
    each = [linear(loops, x[m:m + 1], w, scale, offset) for m in range(9)]
    alone = torch.cat([out for out, _ in each])
    err, bound = error_and_bound(x, w, scale, offset, alone, cpu_int4.PIECES[dtype], each[0][1])
    assert (err <= bound).all(), (err / bound).max()
    for rows in (2, 3, 5, 8, 9):
        batch, _ = linear(loops, x[:rows], w, scale, offset)
        assert torch.equal(batch, alone[:rows]), (rows, (batch != alone[:rows]).sum().item())


@pytest.mark.parametrize("m,dtype", [(12, torch.bfloat16), (3, torch.bfloat16), (6, torch.float32)])
@pytest.mark.parametrize("g", [64, 192])
def test_avx2_row_pass_stores_every_chunk_end(m, dtype, g):
    """The AVX2 pass of one weight row against 3-8 piece rows: 8 weight rows' outputs transposed and stored together,
    a chunk's last rows % 8 one at a time. K 2112: chunks of 124 rows (128 KB of weights, whole passes of 4), each
    ending 4 rows past its last 8, N 253 a last chunk of 5; 12 bf16 rows take passes of 8 and 4 (lanes past a pass's
    rows unused), 3 one of 3, 6 fp32 rows (2 pieces each) passes of 4 and 2; 33 groups of one block (8 at a time,
    the last alone), 11 of three (the scales and offsets of the last 3 one by one)."""
    x, w, scale, offset = operands(m, 253, 2112, g, dtype)
    out, kind = linear("avx2", x, w, scale, offset)
    err, bound = error_and_bound(x, w, scale, offset, out, cpu_int4.PIECES[dtype], kind)
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("m,n,k,g", [(1, 64, 1024, 64), (8, 61, 1024, 64), (2, 37, 2112, 64), (5, 13, 192, 192),
                                     (1, 8, 64, 64), (1, 13, 192, 192), (2, 6, 448, 64),
                                     (1, 13, 128, 64), (8, 40, 3072, 64), (4, 24, 2304, 128)])
@pytest.mark.parametrize("loops", LOOPS)
def test_bf16_rows_are_int8_blocks(loops, m, n, k, g):
    """bf16 rows, in the AVX2 loops and the AVX-512 VNNI ones alike: each 64-column block rounded to int8 with its
    own scale, max|x| / 127, once (act_block8.h); then the products of the rounded rows exact and the offsets times
    the exact group sums. Its outputs are that model's within fp32 and bf16 rounding, and off the exact product by
    more than that: the kernels before (AVX2 int16 pieces, AVX-512 two int8 pieces: 2^-16 of the row maximum) were
    within the model's slack of the exact product, not the model. Column 5 of each row 30x the rest: one scale a row
    would be off by far more (block_error). AVX2 tails: K 2112 (33 blocks), 192 and 64 (a chunk of 3 and of 1
    block), 448 (a whole chunk and one of 3) at 1 and 2 rows, 128 (a chunk of 2) at 1 row; AVX-512: a lone span of
    1, 2, 3 and 7 blocks, a last one of 1 (2112) and of 2 (2304, groups of 2 blocks), 8 rows of 3072 columns span by
    span (the pieces outgrow L1)."""
    x, w, scale, offset = operands(m, n, k, g, torch.bfloat16)
    x[:, 5] *= 30
    out, kind = linear(loops, x, w, scale, offset)
    if kind != "block":
        pytest.skip("AMX-INT8 takes this many bf16 rows as int8 pieces")
    rounded = act_block8(x)
    levels = unpack_int4(w).double() * scale.double().repeat_interleave(g, dim=1)
    offsets = offset.double().repeat_interleave(g, dim=1)
    model = rounded @ levels.T + x.double() @ offsets.T
    slack = 2**-22 * (rounded.abs() @ levels.abs().T + x.double().abs() @ offsets.abs().T) + 2**-8 * model.abs()
    assert ((out.double() - model).abs() <= slack).all(), ((out.double() - model).abs() / slack).max()
    exact = x.double() @ dequantize_int4(w, scale, offset).double().T
    assert ((out.double() - exact).abs() > slack).any()
    err, bound = error_and_bound(x, w, scale, offset, out, cpu_int4.PIECES[torch.bfloat16], kind)
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("m,n,k,g", [(1, 64, 1024, 64), (8, 64, 1024, 64), (6, 37, 2112, 64)])
def test_avx2_fp32_fewer_pieces_break_the_bound(m, n, k, g):
    """The AVX2 path's fp32 rows: one int16 piece (2 int8 ones asked) breaks two's bound (bf16 rows take int8 blocks,
    whatever the pieces)."""
    x, w, scale, offset = operands(m, n, k, g, torch.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(cpu_int4.PIECES, torch.float32, 2)
        out, _ = linear("avx2", x, w, scale, offset)
    err, bound = error_and_bound(x, w, scale, offset, out, 4, "int16")
    assert (err > 2 * bound).any()
    err, bound = error_and_bound(x, w, scale, offset, out, 2, "int16")
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("m,dtype", [(2, torch.float32), (1, torch.float32), (1, torch.bfloat16)])
@pytest.mark.parametrize("loops", LOOPS)
def test_a_long_group_of_the_largest_products_does_not_overflow(loops, m, dtype):
    """One group of 36864 columns, every nibble 15 against pieces at their largest: 576 blocks of 3.9e6 an int32 lane,
    past 2^31, which the VNNI path sums per block and the AVX2 path per chunk of 4 blocks (converted to fp32 there:
    its fp32 rows' 144 chunks come within 1.7e-6 of the exact sum), in its passes of 1, 2 and 4 weight rows (2 and 1
    piece rows), 13 of them with a tail. 15 * 36864 is exact in bf16."""
    k, n = 36864, 13
    x = torch.ones(m, k, dtype=dtype)
    w = torch.full((n, k // 2), 255, dtype=torch.uint8)
    out, _ = linear(loops, x, w, torch.ones(n, 1, dtype=dtype), torch.zeros(n, 1, dtype=dtype))
    torch.testing.assert_close(out, torch.full((m, n), 15.0 * k, dtype=dtype), rtol=4e-6, atol=0)


@needs_vnni
@pytest.mark.parametrize("m,n,k,g,dtype,fewer", [
    *[(*shape, torch.float32, 2) for shape in [(1, 64, 1024, 64), (8, 64, 1024, 64), (16, 35, 1024, 64),
                                                (8, 37, 4160, 64)]],
    *[pytest.param(*shape, torch.bfloat16, 1, marks=needs_amx_int8)
      for shape in [(8, 64, 1024, 64), (16, 35, 1024, 64), (8, 37, 4160, 64)]]])
def test_fewer_pieces_break_the_bound(monkeypatch, m, n, k, g, dtype, fewer):
    """The bound above sees a missing piece in bf16 where AMX-INT8 takes bf16 rows as pieces (measured 6-12x over it,
    0.7-0.8x of it with both; elsewhere they are int8 blocks); fp32's fourth piece is below fp32 rounding
    (test_fp32_is_as_close_as_the_reference shows what it is for), the third is not (without both: 7-14x over)."""
    x, w, scale, offset = operands(m, n, k, g, dtype)
    pieces = cpu_int4.PIECES[dtype]
    monkeypatch.setitem(cpu_int4.PIECES, dtype, pieces - fewer)
    out = cpu_int4.linear_int4_cpu(x, as_loaded(w), scale, offset)
    err, bound = error_and_bound(x, w, scale, offset, out, pieces)
    assert (err > 2 * bound).any()
    err, bound = error_and_bound(x, w, scale, offset, out, pieces - fewer)  # and every output written
    assert (err <= bound).all(), (err / bound).max()


@pytest.mark.parametrize("m,n,k,g", [(3, 512, 1024, 64), (8, 256, 3072, 64)])
@pytest.mark.parametrize("loops", [pytest.param("built", marks=needs_vnni), *LOOPS[1:]])
def test_fp32_is_as_close_as_the_reference(monkeypatch, m, n, k, g, loops):
    """A row whose largest activation is 100x the rest: the pieces' error scales with it, the reference's with the
    products. Four pieces stay within the fp32 reference's distance from the exact product (measured 0.5-0.6x on
    a Xeon, 0.2-0.25x on an EPYC, whose F.linear sums less exactly; AVX2's two int16 pieces 0.2-0.3x on a Zen 3);
    three int8 ones, within their own bound, are over twice as far as four (3.5-7x; on the Xeon also 1.6-2.1x the
    reference's distance). AVX2 takes two int16 pieces for three int8 ones too."""
    x, w, scale, offset = operands(m, n, k, g, torch.float32)
    x[:, 5] *= 100
    exact = x.double() @ dequantize_int4(w, scale, offset).double().T
    reference = (linear_int4_torch(x, w, scale, offset).double() - exact).abs().max()
    out, kind = linear(loops, x, w, scale, offset)
    four = (out.double() - exact).abs().max()
    assert four <= reference
    if kind == "int16":
        return
    monkeypatch.setitem(cpu_int4.PIECES, torch.float32, cpu_int4.PIECES[torch.float32] - 1)
    three, _ = linear(loops, x, w, scale, offset)
    err, bound = error_and_bound(x, w, scale, offset, three, cpu_int4.PIECES[torch.float32])
    assert (err <= bound).all() and (three.double() - exact).abs().max() > 2 * four


@pytest.mark.parametrize("m", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_a_nan_activation_gives_its_row_nan_outputs(m, dtype, loops):
    x, w, scale, offset = operands(m, 48, 1024, 64, dtype)
    x[0, 7] = float("nan")
    out, _ = linear(loops, x, w, scale, offset)
    assert out[0].isnan().all() and out[1:].isfinite().all()


def fp32_error_and_bound(x, w, scale, offset, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|out - x @ W.T| (in fp64) and the bound of fp32 sums of the exact products (the reference's way), then the
    output's own rounding to bf16."""
    weights, rows = dequantize_int4(w, scale, offset).double(), x.double()
    ref = rows @ weights.T
    bound = 2**-22 * (rows.abs() @ weights.abs().T) + (2**-8 * ref.abs() if out.dtype == torch.bfloat16 else 0)
    return (out.double() - ref).abs(), bound


@pytest.mark.parametrize("value", [3e38, -3e38, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_a_huge_or_non_finite_activation_gives_the_references_outputs(loops, dtype, m, value):
    """A row holding 3e38 (finite, near FLT_MAX), an infinity or a NaN: its outputs are the reference's, finite within
    fp32 rounding of the exact product, inf where it has inf (of its sign), NaN where it has NaN; the other rows' bits
    are theirs without it. The AVX-512 loops made 3e38 inf (a block's int32 sum times the activations' scale, before
    the weights': 36-44 of 48 outputs) and both ISAs' int8 blocks and pieces made an infinity NaN (a row's scales NaN);
    past 2^64 a row takes the reference's fp32 products (csrc/linear_int4.c's PIECES_RANGE). K 2112: a last span and
    chunk of one block; 1, 3, 8 and 17 rows: every pass (AMX-INT8 from 3 rows where the CPU has it, in passes of 8
    fp32 or 16 bf16 rows: 17 checks a row of a second pass)."""
    x, w, scale, offset = operands(m, 48, 2112, 64, dtype)
    bad = m - 1  # in the last pass
    clean, _ = linear(loops, x, w, scale, offset)
    x[bad, 7] = value
    out, _ = linear(loops, x, w, scale, offset)
    ref = linear_int4_torch(x, w, scale, offset)[bad]
    assert ref.isinf().any() == math.isinf(value) and ref.isnan().all() == math.isnan(value)
    assert torch.equal(out[bad].isnan(), ref.isnan()) and torch.equal(out[bad].isinf(), ref.isinf())
    assert torch.equal(out[bad][ref.isinf()], ref[ref.isinf()])
    finite = ref.isfinite()
    err, bound = fp32_error_and_bound(x[bad:bad + 1], w, scale, offset, out[bad:bad + 1])
    assert (err[0][finite] <= bound[0][finite]).all(), (err[0][finite] / bound[0][finite]).max()
    others = torch.arange(m) != bad
    assert torch.equal(out[others], clean[others])


@pytest.mark.parametrize("value", [1.8e19, -1.8e19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_activations_just_below_the_pieces_range_take_the_pieces(loops, dtype, value):
    """Just below 2^64 a row (the rest of it about 2^58) still takes the integer pieces, within their bound: no sum
    overflows there. A bf16 row's int8 blocks show it: off the exact product by more than fp32 rounding (fp32 rows'
    pieces are as close as fp32 rounding)."""
    x, w, scale, offset = operands(1, 48, 2112, 64, dtype)
    x *= 2**58
    x[0, 7] = value
    out, kind = linear(loops, x, w, scale, offset)
    err, bound = error_and_bound(x, w, scale, offset, out, cpu_int4.PIECES[dtype], kind)
    assert (err <= bound).all(), (err / bound).max()
    if dtype == torch.bfloat16:
        err, bound = fp32_error_and_bound(x, w, scale, offset, out)
        assert (err > bound).any()


def test_dispatch_by_rows(monkeypatch):
    calls = []
    record_rows(monkeypatch, calls, (cpu_int4, "linear_int4_cpu"), (dequant, "linear_int4"))
    x, w, scale, offset = operands(cpu_int4.MAX_ROWS + 1, 48, 128, 64, torch.float32)
    packed = as_loaded(w)
    for rows in (x[:1], x[:5].view(5, 1, 128), x):  # decode rows: the C kernel; prefill rows: dequant.py
        out = cpu_int4.linear_int4(rows, packed, scale, offset)
        assert out.shape == (*rows.shape[:-1], 48)
        torch.testing.assert_close(out, linear_int4_torch(rows, w, scale, offset), atol=1e-4, rtol=1e-5)
    assert calls == [("linear_int4_cpu", 1), ("linear_int4_cpu", 5), ("linear_int4", cpu_int4.MAX_ROWS + 1)]
