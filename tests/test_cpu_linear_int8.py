"""The compiled CPU int8 weight-only matmul against the torch reference, and its dispatch."""
from __future__ import annotations

import pytest
import torch

from ops.cpu import build as cpu_build
from ops.cpu import linear_int8 as cpu_int8
from ops.torch_ref.linear_int8 import linear_int8_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_int8.KERNEL.build(), cpu_int8.KERNEL.error


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
    if dtype == torch.float32:  # fp32 sums in another order: rounding only
        torch.testing.assert_close(out, ref, atol=1e-5 * k**0.5, rtol=1e-5)
    else:  # one bf16 rounding of the same fp32 result, at most one ulp apart
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-3 * k**0.5, rtol=8e-3)


def test_dispatch_by_rows(monkeypatch):
    calls = []
    real = cpu_int8.linear_int8_cpu
    monkeypatch.setattr(cpu_int8, "linear_int8_cpu", lambda x, w, s: calls.append(x.shape[0]) or real(x, w, s))
    x, w, scale = operands(cpu_int8.MAX_ROWS + 1, 48, 64, torch.float32)
    for rows in (x[:1], x[:5].view(5, 1, 64), x):  # decode rows: the C kernel; prefill rows: the reference
        out = cpu_int8.linear_int8(rows, w, scale)
        assert out.shape == (*rows.shape[:-1], 48)
        torch.testing.assert_close(out, linear_int8_torch(rows, w, scale), atol=1e-4, rtol=1e-5)
    assert calls == [1, 5]
