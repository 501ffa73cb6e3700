"""The compiled CPU matmul (bf16 and fp32 weights) against torch, and its dispatch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ops.cpu import build as cpu_build
from ops.cpu import linear as cpu_linear

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_linear.KERNEL.build(), cpu_linear.KERNEL.error


SHAPES = [(1, 64, 32), (2, 13, 96), (3, 4096, 1024), (8, 1024, 3072), (32, 6, 32), (5, 151, 64), (20, 100, 96)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bf16_matches_fp32_reference(m, n, k):
    torch.manual_seed(m * n + k)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.randn(n, k, dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    out = cpu_linear.linear_cpu(x, w)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # fp32 accumulation: only the final rounding to bf16 differs from the fp32 product
    torch.testing.assert_close(out.float(), ref, atol=1e-3 * k**0.5, rtol=8e-3)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp32_matches_reference(m, n, k):
    torch.manual_seed(m + n * k)
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    out = cpu_linear.linear_cpu(x, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w), atol=1e-5 * k**0.5, rtol=1e-5)


def test_special_values_survive():
    x = torch.tensor([[1.0] * 32], dtype=torch.bfloat16)
    w = torch.zeros(3, 32, dtype=torch.bfloat16)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), -3.0e38
    out = cpu_linear.linear_cpu(x, w)
    assert out[0, 0].isnan() and out[0, 1] == float("inf") and out[0, 2] == torch.tensor(-3.0e38, dtype=torch.bfloat16)


@pytest.mark.parametrize("value", [3e38, -3e38, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_huge_or_non_finite_activation_gives_the_references_outputs(dtype, m, value):
    """As the int4 and int8 linears are checked (test_cpu_linear_int4.py): a row holding 3e38, an infinity or a NaN
    gives the reference's outputs, finite within fp32 rounding of the exact product, inf of its sign, NaN; the other
    rows are unchanged."""
    torch.manual_seed(m)
    x, w = torch.randn(m, 1024).to(dtype), (torch.randn(40, 1024) / 30).to(dtype)
    clean = cpu_linear.linear_cpu(x, w)
    bad = m // 2
    x[bad, 7] = value
    out, ref = cpu_linear.linear_cpu(x, w)[bad], F.linear(x.float(), w.float()).to(dtype)[bad]
    assert ref.isinf().any() == math.isinf(value) and ref.isnan().all() == math.isnan(value)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert torch.equal(out[ref.isinf()], ref[ref.isinf()])
    exact = x[bad].double() @ w.double().T
    bound = 2**-22 * (x[bad].double().abs() @ w.double().abs().T)
    if dtype == torch.bfloat16:
        bound = bound + 2**-8 * exact.abs()
    finite = ref.isfinite()
    assert ((out.double() - exact).abs()[finite] <= bound[finite]).all()
    others = torch.arange(m) != bad
    assert torch.equal(cpu_linear.linear_cpu(x, w)[others], clean[others])


def test_dispatch(monkeypatch):
    torch.manual_seed(0)
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    calls = []
    real = cpu_linear.linear_cpu
    monkeypatch.setattr(cpu_linear, "linear_cpu", lambda x, w: calls.append(x.shape) or real(x, w))
    monkeypatch.setattr(cpu_linear, "NATIVE_BF16", False)
    x3 = torch.randn(2, 3, 32, dtype=torch.bfloat16)  # leading dims are flattened and restored
    assert cpu_linear.linear(x3, w).shape == (2, 3, 48)
    assert calls == [(6, 32)]
    big = torch.randn(cpu_linear.MAX_ROWS + 1, 32, dtype=torch.bfloat16)  # prefill-sized: fp32 GEMM
    torch.testing.assert_close(cpu_linear.linear(big, w), F.linear(big.float(), w.float()).bfloat16())
    assert len(calls) == 1
    x32 = torch.randn(4, 32)  # fp32 weights take the kernel too
    torch.testing.assert_close(cpu_linear.linear(x32, w.float()), F.linear(x32, w.float()))
    assert calls[-1] == (4, 32)
    monkeypatch.setattr(cpu_linear.KERNEL, "ready", False)  # no compiler: rows are widened to fp32
    small = torch.randn(3, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(cpu_linear.linear(small, w), F.linear(small.float(), w.float()).bfloat16())
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dispatch_on_a_cpu_with_native_bf16(monkeypatch, dtype):
    """torch's own GEMM (oneDNN, MKL) takes over past NATIVE_BF16_MAX_ROWS rows."""
    torch.manual_seed(1)
    w = torch.randn(48, 32, dtype=dtype)
    calls = []
    real = cpu_linear.linear_cpu
    monkeypatch.setattr(cpu_linear, "linear_cpu", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    monkeypatch.setattr(cpu_linear, "NATIVE_BF16", True)
    limit = cpu_linear.NATIVE_BF16_MAX_ROWS[dtype]
    for rows in (1, limit, limit + 1, cpu_linear.MAX_ROWS + 1):
        x = torch.randn(rows, 32, dtype=dtype)
        out = cpu_linear.linear(x, w)
        torch.testing.assert_close(out.float(), F.linear(x.float(), w.float()), atol=3e-2, rtol=2e-2)
    assert calls == [1, limit]
