"""attention.c at the model's shapes against an fp64 reference: each sequence's keys split across the pool's
threads and combined (flash-decoding), on one thread, and with its AVX2 loops on a CPU that would take AVX-512."""
from __future__ import annotations

import pytest
import torch

from ops.cpu import attention as cpu_attention
from ops.cpu import build as cpu_build
from ops.torch_ref.decode_attention import decode_attention_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

HQ, HKV, D, BLOCK = 16, 8, 128, 16
# With 2 threads a call cuts the batch's keys into parts of max(128, ceil(keys / 8) rounded up to 32) keys:
# 1 (one thread), 512 (4 parts), 513 (5, the last of 1 key), 1023 (8, the last of 127), 1025 (7 of 160),
# a long sequence next to short ones (8 parts of 416 and three whole), eight with one in 6 parts.
LENGTHS = [[1], [512], [513], [1023], [1025], [3000, 1, 17, 130], [129] * 7 + [2000]]


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_attention.KERNEL.build(), cpu_attention.KERNEL.error


@pytest.fixture(scope="module")
def avx2_lib(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_build, "FLAGS", [*cpu_build.FLAGS, "-DNANOQWEN_AVX2_ONLY"])
        kernel = cpu_build.CKernel("avx2_attention", "attention.c", ("decode_attention",))
        assert kernel.build(tmp_path_factory.mktemp("avx2")), kernel.error
    return kernel.lib


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def case(lengths: list[int], dtype: torch.dtype, seed: int) -> tuple:
    """Each sequence in its own shuffled blocks; every cache slot outside the contexts NaN, so a read past a
    context (or of block 0) shows."""
    torch.manual_seed(seed)
    width = max(-(-n // BLOCK) for n in lengths)
    k_cache = torch.full((1 + len(lengths) * width, BLOCK, HKV, D), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tables = (torch.randperm(len(lengths) * width) + 1).view(len(lengths), width).int()
    for b, n in enumerate(lengths):
        slots = k_cache[tables[b].long()].view(-1, HKV, D)
        slots[:n] = torch.randn(n, HKV, D).to(dtype)
        k_cache[tables[b].long()] = slots.view(width, BLOCK, HKV, D)
        slots = v_cache[tables[b].long()].view(-1, HKV, D)
        slots[:n] = torch.randn(n, HKV, D).to(dtype)
        v_cache[tables[b].long()] = slots.view(width, BLOCK, HKV, D)
    q = (2 * torch.randn(len(lengths), HQ, D)).to(dtype)  # sharper softmaxes than unit q's
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32), D**-0.5


def reference64(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:  # [B, Hq, D] fp64
    out = []
    for b, n in enumerate(lens.tolist()):
        k = k_cache[tables[b].long()].view(-1, HKV, D)[:n].double().repeat_interleave(HQ // HKV, dim=1)
        v = v_cache[tables[b].long()].view(-1, HKV, D)[:n].double().repeat_interleave(HQ // HKV, dim=1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", weights, v))
    return torch.stack(out)


def call(lib, q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    out = torch.empty_like(q)
    lib.decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                         lens.data_ptr(), out.data_ptr(), q.shape[0], HQ, HKV, D, BLOCK, tables.shape[1], scale,
                         int(q.dtype == torch.bfloat16))
    return out


def error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return (out.double() - exact).abs().mean().item()


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda n: f"{n[0]}+{len(n) - 1}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", ["built", "AVX2"])
def test_matches_an_fp64_reference_as_closely_as_torch(lengths, dtype, loops, threads, avx2_lib):
    inputs = case(lengths, dtype, seed=len(lengths) + lengths[0])
    exact = reference64(*inputs)
    out = call(cpu_attention.KERNEL.lib if loops == "built" else avx2_lib, *inputs)
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=1e-5)
        return
    # bf16 (its output rounded to 8 bits) no further from the exact values than torch's own bf16 attention (the
    # NaN slots zeroed for torch's SDPA, which multiplies them by a zero weight): measured 0.72-0.86 of its error,
    # where q scaled and rounded to bf16 before the dot products gives 1.56-1.88
    torch_out = decode_attention_torch(inputs[0], inputs[1].nan_to_num(), inputs[2].nan_to_num(), *inputs[3:])
    assert error(out, exact) <= error(torch_out, exact)
