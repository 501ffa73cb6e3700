"""attention.c at the model's shapes against an fp64 reference: each sequence's keys split across the pool's
threads and combined (flash-decoding), on one thread, with its AVX2 loops on a CPU that would take AVX-512, and
without its scratch; the edges: empty contexts, padded lanes, other group sizes and head dims, scores of -inf."""
from __future__ import annotations

import ctypes

import pytest
import torch

from cpu_isas import CPU_FLAGS, LOOPS, capped
from ops.cpu import attention as cpu_attention
from ops.cpu import build as cpu_build
from ops.torch_ref.decode_attention import decode_attention_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

HQ, HKV, D, BLOCK = 16, 8, 128, 16
# With 2 threads a call from 512 (token, kv head) pairs (64 keys at HKV 8) cuts the batch's keys into parts of
# max(128, ceil(keys / 8) rounded up to 32) keys: 1 (one thread), 512 (4 parts), 513 (5, the last of 1 key),
# 1023 (8, the last of 127), 1025 (7 of 160), a long sequence next to short ones (8 parts of 416 and three whole),
# eight with one in 6 parts; under 4,096 pairs: eight of 8 keys (512 pairs: a task per sequence) and 340 keys (2,720
# pairs: parts of 128, the first sequence in 3).
LENGTHS = [[1], [512], [513], [1023], [1025], [3000, 1, 17, 130], [129] * 7 + [2000], [8] * 8, [300, 17, 3, 20]]


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_attention.KERNEL.build(), cpu_attention.KERNEL.error


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def case(lengths: list[int], dtype: torch.dtype, seed: int, hq: int = HQ, hkv: int = HKV, d: int = D) -> tuple:
    """Each sequence in its own shuffled blocks; every cache slot outside the contexts NaN, so a read past a
    context (or of block 0) shows."""
    torch.manual_seed(seed)
    width = max(1, *(-(-n // BLOCK) for n in lengths))
    k_cache = torch.full((1 + len(lengths) * width, BLOCK, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    tables = (torch.randperm(len(lengths) * width) + 1).view(len(lengths), width).int()
    for b, n in enumerate(lengths):
        for cache in (k_cache, v_cache):
            cache.view(-1, hkv, d)[slots(tables[b], n)] = torch.randn(n, hkv, d).to(dtype)
    q = (2 * torch.randn(len(lengths), hq, d)).to(dtype)  # sharper softmaxes than unit q's
    return q, k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32), d**-0.5


def slots(table: torch.Tensor, n: int) -> torch.Tensor:  # [n] the cache slots of a sequence's first n tokens
    positions = torch.arange(n)
    return table.long()[positions // BLOCK] * BLOCK + positions % BLOCK


def with_padded_lanes(inputs: tuple, lanes: int) -> tuple:
    """`lanes` more lanes padded as nanoqwen/runner/inputs.py pads a batch: context 1, table column 0 = block 0
    (here holding keys and values), the rest of the row stale (a real sequence's blocks)."""
    q, k_cache, v_cache, tables, lens, scale = inputs
    k_cache[0], v_cache[0] = torch.randn(k_cache.shape[1:]), torch.randn(v_cache.shape[1:])
    stale = tables[torch.randint(len(tables), (lanes,))]
    stale[:, 0] = 0
    return (torch.cat([q, torch.randn(lanes, *q.shape[1:]).to(q.dtype)]), k_cache, v_cache, torch.cat([tables, stale]),
            torch.cat([lens, torch.ones(lanes, dtype=torch.int32)]), scale)


def reference64(q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:  # [B, Hq, D] fp64; an empty context: 0
    hkv, d = k_cache.shape[2:]
    out = []
    for b, n in enumerate(lens.tolist()):
        k, v = (cache.view(-1, hkv, d)[slots(tables[b], n)].double() for cache in (k_cache, v_cache))  # [n, Hkv, D]
        weights = torch.softmax(torch.einsum("hgd,nhd->hgn", q[b].view(hkv, -1, d).double(), k) * scale, dim=-1)
        out.append(torch.einsum("hgn,nhd->hgd", weights, v).reshape(-1, d))
    return torch.stack(out)


def call(lib, q, k_cache, v_cache, tables, lens, scale) -> torch.Tensor:
    out = torch.empty_like(q)
    lib.decode_attention(q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                         lens.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1], k_cache.shape[2], q.shape[2],
                         BLOCK, tables.shape[1], scale, int(q.dtype == torch.bfloat16))
    return out


def assert_close(out: torch.Tensor, exact: torch.Tensor) -> None:
    """fp32 to within its rounding; bf16 to within its output's (8 bits) with room for its q . k's."""
    tol = {"atol": 2e-6, "rtol": 1e-5} if out.dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(out.double(), exact, **tol)


def error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return (out.double() - exact).abs().mean().item()


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda n: f"{n[0]}+{len(n) - 1}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_matches_an_fp64_reference_as_closely_as_torch(lengths, dtype, loops, threads):
    inputs = case(lengths, dtype, seed=len(lengths) + lengths[0])
    exact = reference64(*inputs)
    out = call(capped(cpu_attention.KERNEL, loops).lib, *inputs)
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        assert_close(out, exact)
        return
    # bf16 (its output rounded to 8 bits) no further from the exact values than torch's own bf16 attention (the
    # NaN slots zeroed for torch's SDPA, which multiplies them by a zero weight): measured 0.72-0.86 of its error,
    # where q scaled and rounded to bf16 before the dot products gives 1.56-1.88
    torch_out = decode_attention_torch(inputs[0], inputs[1].nan_to_num(), inputs[2].nan_to_num(), *inputs[3:])
    assert error(out, exact) <= error(torch_out, exact)


def takes_avx512(lib, head_dim: int, bf16: int) -> bool:
    avx512 = ctypes.c_int(-1)
    lib.decode_attention_avx512(head_dim, bf16, ctypes.byref(avx512))
    return bool(avx512.value)


@pytest.mark.parametrize("isa", ["auto", "avx512", "avx2"])
def test_each_cap_takes_avx512_where_the_cpu_has_it_and_the_cap_allows(isa):
    """So that "built" above tests the AVX-512 (BF16) loops wherever the CPU has them, and each cap (cpu_isa) the
    loops it names: the Linux kernel's view of the CPU (/proc/cpuinfo) against the library's own. (Before the cap
    was a setting, every build took AVX-512 here.)"""
    lib = cpu_attention.KERNEL.lib if isa == "auto" else capped(cpu_attention.KERNEL, isa).lib
    avx512 = {"avx512f", "avx512bw"} <= CPU_FLAGS and isa != "avx2"
    assert takes_avx512(lib, D, 0) == avx512
    assert takes_avx512(lib, D, 1) == (avx512 and "avx512_bf16" in CPU_FLAGS)
    assert not takes_avx512(lib, 48, 0)  # D % 32 != 0: AVX2


EDGES = {  # name: (lengths, Hq, Hkv, D, padded lanes); the long ones are split with 2 threads
    "empty contexts": ([0, 3000, 0], HQ, HKV, D, 0),
    "padded lanes": ([4000], HQ, HKV, D, 3),
    "G=3": ([1025, 3], 12, 4, D, 0),  # values' 3-head branch
    "D=64": ([1025, 3], HQ, HKV, 64, 0),
}


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_edges(edge, dtype, loops, threads):
    lengths, hq, hkv, d, lanes = EDGES[edge]
    inputs = with_padded_lanes(case(lengths, dtype, 7, hq, hkv, d), lanes)
    assert_close(call(capped(cpu_attention.KERNEL, loops).lib, *inputs), reference64(*inputs))


def test_a_small_batch_after_a_large_one_on_the_same_thread(threads):
    """The second call reuses the first's (larger) scratch, its state and parts left behind."""
    for lengths in ([129] * 7 + [2000], [513, 40]):
        inputs = case(lengths, torch.float32, len(lengths))
        assert_close(call(cpu_attention.KERNEL.lib, *inputs), reference64(*inputs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_without_its_scratch(dtype, loops):
    """The scratch holds about 4 parts' state (Hq * (2D + 2) floats each) per thread of omp_get_max_threads(): at
    2^31 - 1 threads, more bytes than a 47-bit address space has, so it cannot be allocated and the kernel runs
    each sequence whole, a kv head at a time, as one thread does."""
    lib = capped(cpu_attention.KERNEL, loops).lib
    inputs = case([3000, 1, 17, 130], dtype, 5)
    libc = ctypes.CDLL(None)
    libc.aligned_alloc.restype, libc.aligned_alloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t, ctypes.c_size_t]
    assert libc.aligned_alloc(64, 4 * (2**31 - 1) * HQ * (2 * D + 2) * 4) is None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    one_thread = call(lib, *inputs)
    torch.set_num_threads(2**31 - 1)  # nothing in between that would start a parallel region
    try:
        out = call(lib, *inputs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, one_thread)
    assert_close(out, reference64(*inputs))


def test_a_group_whose_scores_are_all_minus_infinity_gives_zeros(threads):
    """q . k = -inf where a key's first dim is -inf (the group's q there 1): such keys weigh nothing, and a group
    with no other key gives 0 (softmax would give NaN), whether its sequence is in one part or several."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k_cache, _, tables, lens, _ = inputs = case([1025, 40], dtype, 3)
        masked = {(0, 0): 500, (0, 1): 1025, (1, 2): 40}  # (sequence, kv head): its first keys at -inf
        group = HQ // HKV
        for (b, h), n in masked.items():
            q[b, h * group : (h + 1) * group, 0] = 1
            k_cache.view(-1, HKV, D)[slots(tables[b], n), h, 0] = float("-inf")
        exact = reference64(*inputs)
        for (b, h), n in masked.items():
            if n == lens[b]:
                exact[b, h * group : (h + 1) * group] = 0
        assert_close(call(cpu_attention.KERNEL.lib, *inputs), exact)
