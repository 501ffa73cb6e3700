"""The linear kernels when their per-thread scratch cannot be allocated (csrc/pool.h's thread_scratch returns NULL,
forced by building with -DNANOQWEN_NO_SCRATCH): each takes a way that needs none, with the same results (bit for
bit where the products and their order are the same) instead of writing through NULL."""
from __future__ import annotations

import pytest
import torch

from ops.cpu import build as cpu_build
from ops.cpu import linear as cpu_linear
from ops.cpu import linear_int4 as cpu_int4
from ops.cpu import linear_int8 as cpu_int8
from ops.torch_ref.linear_int4 import dequantize_int4
from ops.torch_ref.linear_int8 import linear_int8_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 2, 5, 9]  # 1 and 2: one pass of the AVX2 loops; 5 and 9: several, the last of one row


def built(tmp_path_factory: pytest.TempPathFactory, source: str, functions: tuple[str, ...], *defines: str):
    """`source` built with `defines` into its own cache folder (each set of flags is its own library)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_build, "FLAGS", [*cpu_build.FLAGS, *defines])
        name = "_".join([source.removesuffix(".c"), *(d.removeprefix("-DNANOQWEN_").lower() for d in defines)])
        kernel = cpu_build.CKernel(name, source, functions)
        assert kernel.build(tmp_path_factory.mktemp(name)), kernel.error
    return kernel.lib


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    """{(source, variant): library}: each kernel with and without its scratch, on this CPU's loops ("built": the
    kernel set's own) and on the AVX2 (dense) or widening (int8) loops a CPU without AVX-512 or VNNI takes."""
    assert cpu_linear.KERNEL.build() and cpu_int8.KERNEL.build()
    out = {("linear.c", "built"): cpu_linear.KERNEL.lib, ("linear_int8.c", "built"): cpu_int8.KERNEL.lib}
    for source, functions, loops in (("linear.c", ("linear",), "-DNANOQWEN_AVX2_ONLY"),
                                     ("linear_int8.c", ("linear_int8",), "-DNANOQWEN_NO_VNNI")):
        out[source, "loops"] = built(tmp_path_factory, source, functions, loops)
        out[source, "loops, no scratch"] = built(tmp_path_factory, source, functions, loops, "-DNANOQWEN_NO_SCRATCH")
    for source, functions in (("linear.c", ("linear",)), ("linear_int8.c", ("linear_int8",)),
                              ("linear_int4.c", ("linear_int4",))):
        out[source, "built, no scratch"] = built(tmp_path_factory, source, functions, "-DNANOQWEN_NO_SCRATCH")
    return out


def dense(lib, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    lib.linear(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], x.shape[1],
               int(x.dtype == torch.bfloat16))
    return y


def int8(lib, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    lib.linear_int8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), y.data_ptr(), x.shape[0], w.shape[0], x.shape[1],
                    int(x.dtype == torch.bfloat16))
    return y


def int4(lib, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    lib.linear_int4(x.data_ptr(), w.data_ptr(), scale.data_ptr(), offset.data_ptr(), y.data_ptr(), x.shape[0],
                    w.shape[0], x.shape[1], x.shape[1] // scale.shape[1], int(x.dtype == torch.bfloat16),
                    cpu_int4.PIECES[x.dtype])
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_dense_without_scratch_gives_the_same_bits(libs, m, dtype):
    """bf16 on AVX2 splits each activation row in registers at each use, as the scratch split it once; AMX's
    pairs fall back to the AVX-512 loop (this test runs it only where the CPU has AMX)."""
    torch.manual_seed(m)
    x, w = torch.randn(m, 256).to(dtype), torch.randn(77, 256).to(dtype)
    for loops in ("built", "loops"):
        assert torch.equal(dense(libs["linear.c", f"{loops}, no scratch"], x, w), dense(libs["linear.c", loops], x, w))
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(dense(libs["linear.c", "built, no scratch"], x, w).float(), x.float() @ w.float().T,
                               **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_int8_without_scratch(libs, m, dtype):
    """Without the pieces' scratch VNNI CPUs take the widening loops; bf16 rows are widened in registers at each use
    (the same bits as the widening loops with their scratch, on AVX2)."""
    torch.manual_seed(m)
    x = torch.randn(m, 320).to(dtype)
    w, scale = torch.randint(-127, 128, (53, 320), dtype=torch.int8), (torch.rand(53) / 100).to(dtype)
    assert torch.equal(int8(libs["linear_int8.c", "loops, no scratch"], x, w, scale),
                       int8(libs["linear_int8.c", "loops"], x, w, scale))
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 8e-3}
    for variant in ("built, no scratch", "loops, no scratch"):
        torch.testing.assert_close(int8(libs["linear_int8.c", variant], x, w, scale).float(),
                                   linear_int8_torch(x, w, scale).float(), **tol)


@pytest.mark.skipif(not cpu_int4.KERNEL.build() or not cpu_int4.supported(),
                    reason="this CPU lacks AVX-512 F/BW/VL/VNNI (the kernel's requirement)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,g", [(1, 64), (2, 128), (5, 64), (9, 256)])
def test_int4_without_scratch_multiplies_the_dequantised_weights(libs, m, g, dtype):
    """Each block dequantised in fp32 and multiplied in fp32, as the reference does: its result up to the order of
    the sums and the output's rounding."""
    torch.manual_seed(m)
    x, w = torch.randn(m, 512).to(dtype), torch.randint(0, 256, (37, 256), dtype=torch.uint8)
    scale, offset = (torch.rand(37, 512 // g) / 50).to(dtype), (torch.randn(37, 512 // g) / 10).to(dtype)
    out = int4(libs["linear_int4.c", "built, no scratch"], x, w, scale, offset)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0, "rtol": 2**-8}  # bf16: 1 rounding
    torch.testing.assert_close(out.double(), x.double() @ dequantize_int4(w, scale, offset).double().T, **tol)
    if dtype == torch.float32:  # the pieces' way differs in the last bits (bf16's rounding hides it): the hook took
        assert not torch.equal(out, int4(cpu_int4.KERNEL.lib, x, w, scale, offset))
