"""The compiled CPU int4 weight-only matmul against the torch reference, and its dispatch."""
from __future__ import annotations

import pytest
import torch

from ops.cpu import build as cpu_build
from ops.cpu import linear_int4 as cpu_int4
from ops.torch_ref.linear_int4 import linear_int4_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_int4.KERNEL.build(), cpu_int4.KERNEL.error


needs_avx512 = pytest.mark.skipif(not cpu_int4.KERNEL.build() or not cpu_int4.supported(),
                                  reason="this CPU lacks AVX-512 F/BW/VL (the kernel's requirement)")

# (rows, output channels, input columns, group size): 1-8 rows share one unpacking, 9+ take a second pass
SHAPES = [(1, 64, 64, 64), (2, 13, 128, 64), (3, 4096, 1024, 64), (8, 1024, 3072, 64), (9, 40, 256, 128),
          (32, 6, 192, 64), (5, 151, 1024, 1024)]


def operands(m: int, n: int, k: int, g: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(m * n + k)
    x = torch.randn(m, k).to(dtype)
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    return x, w, (torch.rand(n, k // g) / 50).to(dtype), (torch.randn(n, k // g) / 10).to(dtype)


@needs_avx512
@pytest.mark.parametrize("m,n,k,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(m, n, k, g, dtype):
    x, w, scale, offset = operands(m, n, k, g, dtype)
    out = cpu_int4.linear_int4_cpu(x, w, scale, offset)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = linear_int4_torch(x, w, scale, offset)
    if dtype == torch.float32:  # fp32 sums in another order: rounding only
        torch.testing.assert_close(out, ref, atol=1e-5 * k**0.5, rtol=1e-5)
    else:  # one bf16 rounding of the same fp32 result, at most one ulp apart
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-3 * k**0.5, rtol=8e-3)


@needs_avx512
def test_dispatch_by_rows(monkeypatch):
    calls = []
    real = cpu_int4.linear_int4_cpu
    monkeypatch.setattr(cpu_int4, "linear_int4_cpu", lambda x, *w: calls.append(x.shape[0]) or real(x, *w))
    x, w, scale, offset = operands(cpu_int4.MAX_ROWS + 1, 48, 128, 64, torch.float32)
    for rows in (x[:1], x[:5].view(5, 1, 128), x):  # decode rows: the C kernel; prefill rows: the reference
        out = cpu_int4.linear_int4(rows, w, scale, offset)
        assert out.shape == (*rows.shape[:-1], 48)
        torch.testing.assert_close(out, linear_int4_torch(rows, w, scale, offset), atol=1e-4, rtol=1e-5)
    assert calls == [1, 5]
