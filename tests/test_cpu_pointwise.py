"""The compiled CPU silu * up and bf16 -> fp32 logits kernels against the torch references."""
from __future__ import annotations

import pytest
import torch

from cpu_isas import CPU_FLAGS, capped
from ops.cpu import build as cpu_build
from ops.cpu import pointwise as cpu_pointwise
from ops.torch_ref.activation import silu_mul_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_pointwise.KERNEL.build(), cpu_pointwise.KERNEL.error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,size", [(1, 16), (3, 6144), (8, 96), (77, 192)])  # 77: prefill-sized, 3 chunks
def test_silu_mul(dtype, rows, size):
    torch.manual_seed(rows + size)
    x = (torch.randn(rows, size) * 6).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp saturates on both sides; silu(0) = 0
    assert_silu_mul(cpu_pointwise.silu_mul_cpu(x), x)


def assert_silu_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    ref = silu_mul_torch(x)
    assert out.dtype == x.dtype and out.shape == ref.shape
    if x.dtype == torch.float32:  # the exp polynomial within ~2 ulp of torch's
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=3e-7)
    else:  # the same bf16 roundings; an fp32 ulp of silu may round the other way
        torch.testing.assert_close(out.float(), ref.float(), atol=0, rtol=2**-7)
        assert (out != ref).float().mean() < 0.01


@pytest.mark.skipif(not {"avx512f", "avx512bw"} <= CPU_FLAGS, reason="one loop (AVX2) on this CPU: nothing to compare")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,size", [(1, 6144), (3, 48), (2, 16)])  # 48, 16: I % 16 == 8, AVX-512's last 8 by 8
def test_silu_mul_avx512_gives_the_avx2_loops_bits(dtype, rows, size):
    """The AVX-512 loop (16 values a step) runs AVX2's operations lane for lane: the same bits, fp32's included (its
    exp's last ulp, which bf16's rounding would hide), over exp's whole range and its clamps, NaN, infinities, -0 and
    a denormal in the gate and in the up half. (Which loop the built library dispatches to is not seen here.)"""
    torch.manual_seed(size)
    x = (torch.randn(rows, size) * 30).to(dtype)
    inf, nan = float("inf"), float("nan")
    x[0, :8] = torch.tensor([-100.0, 100.0, -0.0, 88.5, nan, inf, -inf, 1e-40])  # the gate
    x[0, size // 2 : size // 2 + 8] = torch.tensor([nan, inf, -inf, -0.0, 1e-40, 0.0, 3e38, -3e38])  # the up half
    outs = []
    for loops in ("built", "avx2"):
        out = torch.empty(rows, size // 2, dtype=dtype)
        capped(cpu_pointwise.KERNEL, loops).lib.silu_mul(x.data_ptr(), out.data_ptr(), rows, size // 2,
                                                       int(dtype == torch.bfloat16))
        outs.append(out)
    assert torch.equal(outs[0].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       outs[1].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.fixture
def num_threads():
    """Sets torch's thread count (the pool's helpers: threads - 1) for a test, then restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 33])  # decode's chunks of 2 rows of 3072 (pool_row_chunk); 33: prefill's
def test_silu_mul_split_over_threads_gives_the_one_thread_bits(num_threads, dtype, rows):
    torch.manual_seed(rows)
    x = (torch.randn(rows, 2 * 3072) * 6).to(dtype)
    outs = []
    for threads in (1, 2):
        num_threads(threads)
        outs.append(cpu_pointwise.silu_mul_cpu(x))
    assert torch.equal(outs[0], outs[1])
    assert_silu_mul(outs[1], x)  # each chunk's rows once: a row skipped or doubled is wrong on one thread too


def test_rows_of_no_values_split_nothing():
    """A decode step's chunk is POOL_SPLIT_VALUES values of rows: rows of none divided by zero (SIGFPE)."""
    assert cpu_pointwise.silu_mul_cpu(torch.empty(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("n", [2 * 131072 - 1, 2 * 131072, 8 * 151936 + 3])  # one chunk, two, 9 (the last 3 longer)
def test_to_fp32_split_over_threads_widens_every_value(num_threads, n):
    """bf16_to_fp32's chunks (2^17 values, the remainder in the last) cover every value once: the exact widening."""
    x = torch.randn(n).to(torch.bfloat16)
    num_threads(2)
    assert torch.equal(cpu_pointwise.to_fp32_cpu(x), x.float())


def test_silu_mul_other_layouts_take_the_reference():
    x = torch.randn(2, 3, 32)  # 3-d: not the kernel's
    torch.testing.assert_close(cpu_pointwise.silu_mul_cpu(x), silu_mul_torch(x))


@pytest.mark.parametrize("shape", [(1, 151936), (3, 37)])
def test_to_fp32(shape):
    x = torch.randn(shape).to(torch.bfloat16)
    out = cpu_pointwise.to_fp32_cpu(x)
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    f = torch.randn(shape)
    assert cpu_pointwise.to_fp32_cpu(f) is f
