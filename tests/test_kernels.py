"""The Triton kernels against their torch references: on CUDA, or on the CPU under the interpreter."""
from __future__ import annotations

import functools
import os

import pytest
import torch

import paged_inputs

triton = pytest.importorskip("triton")

from interpreter_bounds import bounds_checked  # noqa: E402
from ops import select_kernels  # noqa: E402
from ops.torch_ref.activation import silu_mul_torch  # noqa: E402
from ops.torch_ref.decode_attention import decode_attention_torch  # noqa: E402
from ops.torch_ref.linear_int4 import linear_int4_torch, repack_int4_torch  # noqa: E402
from ops.torch_ref.linear_int8 import linear_int8_torch  # noqa: E402
from ops.torch_ref.prefill_attention import prefill_attention_torch  # noqa: E402
from ops.torch_ref.rms_norm import rms_norm_torch  # noqa: E402
from ops.torch_ref.rope import qk_norm_rope_store_torch  # noqa: E402
from ops.triton import gemv as gemv_module  # noqa: E402
from ops.triton.activation import silu_mul_triton  # noqa: E402
from ops.triton.decode_attention import MAX_SPLITS, decode_attention_triton, default_num_splits  # noqa: E402
from ops.triton.gemv import FLOAT, INT4, INT8, gemv, gemv_plan  # noqa: E402
from ops.triton.linear_int4 import linear_int4_triton  # noqa: E402
from ops.triton.linear_int8 import linear_int8_triton  # noqa: E402
from ops.triton.prefill_attention import prefill_attention_triton, tile_list  # noqa: E402
from ops.triton.rms_norm import rms_norm_triton  # noqa: E402
from ops.triton.rope import qk_norm_rope_store_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without CUDA, Triton runs only under TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.slow
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture(autouse=True)
def in_bounds():
    """Under the interpreter, every load and store of every test stays inside the tensors its launch was given."""
    if CUDA:
        yield
        return
    with bounds_checked():
        yield


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE[expected.dtype])


@functools.cache
def rope_table(head_dim: int, max_positions: int, device: torch.device) -> torch.Tensor:
    """One table per shape, shared by a kernel and its reference: torch's CPU `cos` of the same input
    has come out differently (by ~1e-4 at angles in the thousands) from one call to the next."""
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)  # [P, D]


# ---------------------------------------------------------------- SiLU * up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 48), (3, 2 * 600), (2, 2, 2 * 64)])  # 600: two column blocks, masked
def test_silu_mul(shape, dtype):
    x = (3 * torch.randn(shape, generator=torch.Generator().manual_seed(0))).to(DEVICE, dtype)
    out = silu_mul_triton(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_close(out, silu_mul_torch(x))


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (2, 3, 128)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(shape, dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEVICE, dtype)
    residual = torch.randn(shape, generator=g).to(DEVICE, dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEVICE, dtype)
    out, new_residual = rms_norm_triton(x, weight, 1e-6, residual)
    expected, expected_residual = rms_norm_torch(x, weight, 1e-6, residual)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, expected)
    assert_close(new_residual, expected_residual)
    if residual is None:
        assert new_residual is x


def test_rms_norm_strided_rows():
    x = torch.randn(5, 160, device=DEVICE)[:, 16:112]  # row stride 160
    residual = torch.randn(5, 96, device=DEVICE)
    weight = torch.randn(96, device=DEVICE)
    for actual, expected in zip(rms_norm_triton(x, weight, 1e-5, residual), rms_norm_torch(x, weight, 1e-5, residual)):
        assert_close(actual, expected)


# ---------------------------------------------------------------- q/k norm + RoPE + cache store


def make_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, seed=0):
    """Strided q/k/v views of one fused projection output, as the attention layer makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return (
        qkv,
        q.view(num_tokens, num_q_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


def run_qk_norm_rope_store(impl, num_q_heads, num_kv_heads, head_dim, block_size, slots, positions, dtype):
    num_tokens = len(slots)
    qkv, q, k, v = make_qkv(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    g = torch.Generator().manual_seed(1)
    q_weight = (1 + 0.1 * torch.randn(head_dim, generator=g)).to(DEVICE, dtype)
    k_weight = (1 + 0.1 * torch.randn(head_dim, generator=g)).to(DEVICE, dtype)
    # Random, not zero: a cache slot that must stay untouched is then recognisable.
    k_cache = torch.randn(6, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(6, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    initial = k_cache.clone(), v_cache.clone()
    impl(
        q, k, v, q_weight, k_weight, 1e-6, rope_table(head_dim, 4096, DEVICE),
        torch.tensor(positions, device=DEVICE), k_cache, v_cache,
        torch.tensor(slots, dtype=torch.int32, device=DEVICE),
    )
    return qkv, k_cache, v_cache, initial


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim, block_size",
    [(2, 2, 16, 16), (4, 2, 32, 16), (8, 2, 128, 32), (6, 2, 32, 32)],
)
def test_qk_norm_rope_store(num_q_heads, num_kv_heads, head_dim, block_size, dtype):
    # Tokens of a batch: two padded lanes (slot -1), slots across blocks, block 0 never used.
    slots = [block_size, block_size + 1, -1, 3 * block_size - 1, 5 * block_size + 2, -1, 2 * block_size]
    positions = [0, 1, 0, 4095, 17, 0, block_size]
    args = num_q_heads, num_kv_heads, head_dim, block_size, slots, positions, dtype
    qkv, k_cache, v_cache, (k_initial, v_initial) = run_qk_norm_rope_store(qk_norm_rope_store_triton, *args)
    expected_qkv, expected_k, expected_v, _ = run_qk_norm_rope_store(qk_norm_rope_store_torch, *args)
    assert_close(qkv, expected_qkv)  # q, k in place; v untouched
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE).view(-1)
    written[[s for s in slots if s >= 0]] = True
    written = written.view(k_cache.shape[:2])
    assert_close(k_cache[written], expected_k[written])
    assert_close(v_cache[written], expected_v[written])
    # Everything else, the padded lanes' slot 0 included, is untouched.
    assert torch.equal(k_cache[~written], k_initial[~written])
    assert torch.equal(v_cache[~written], v_initial[~written])


# ---------------------------------------------------------------- decode attention


def make_decode_inputs(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, width=None, seed=0):
    """A shuffled paged cache. Length-1 lanes are padded lanes: they read the null block 0."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [0 if n == 1 else -(-n // block_size) for n in context_lens]
    width = width or max(max(blocks_needed), 1)
    num_blocks = 1 + sum(blocks_needed)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(DEVICE, dtype)
    order = (1 + torch.randperm(num_blocks - 1, generator=g)).tolist()
    block_tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    for row, needed in enumerate(blocks_needed):
        block_tables[row, :needed] = torch.tensor([order.pop() for _ in range(needed)], dtype=torch.int32)
    # A strided q, as the decode step's view of the fused qkv output is.
    q = torch.randn(len(context_lens), num_q_heads, 2 * head_dim, generator=g).to(DEVICE, dtype)[..., :head_dim]
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, block_tables.to(DEVICE), lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "context_lens, num_q_heads, num_kv_heads, head_dim, block_size",
    [
        ([1], 2, 2, 16, 16),  # batch 1, length 1, MHA
        ([16, 17, 1], 4, 2, 128, 16),  # exactly a block, a block + 1, a padded lane; Qwen3 head_dim
        ([5, 32, 33, 1, 64, 31, 1, 100], 8, 2, 16, 32),  # batch 8, GQA 4, block size 32
    ],
)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_attention(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, num_splits):
    q, k_cache, v_cache, block_tables, lens = make_decode_inputs(
        context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype
    )
    out = decode_attention_triton(q, k_cache, v_cache, block_tables, lens, head_dim**-0.5, num_splits=num_splits)
    expected = decode_attention_torch(q, k_cache, v_cache, block_tables, lens, head_dim**-0.5)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected)


@pytest.mark.parametrize("num_splits", [2, 3, 5])
def test_decode_attention_split_boundaries(num_splits):
    # Splits are whole 64-token tiles: lengths on either side of one and two tiles per split,
    # and lengths too short to reach the last splits (their partials stay neutral).
    context_lens = [63, 64, 65, 127, 128, 129, 192, 1]
    q, k_cache, v_cache, block_tables, lens = make_decode_inputs(context_lens, 4, 2, 16, 16, torch.float32)
    out = decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 0.25, num_splits=num_splits)
    assert_close(out, decode_attention_torch(q, k_cache, v_cache, block_tables, lens, 0.25))


def test_decode_attention_reads_only_the_context():
    """Cache past a sequence's length, in its last block and in table entries past it, is never read."""
    context_lens = [20, 1, 40]
    q, k_cache, v_cache, block_tables, lens = make_decode_inputs(context_lens, 4, 2, 16, 16, torch.float32, width=5)
    expected = decode_attention_torch(q, k_cache, v_cache, block_tables, lens, 0.25)
    poisoned = k_cache.shape[0]
    k_cache = torch.cat((k_cache, torch.full_like(k_cache[:1], float("nan"))))
    v_cache = torch.cat((v_cache, torch.full_like(v_cache[:1], float("nan"))))
    for row, length in enumerate(context_lens):
        used = -(-length // 16)
        last = block_tables[row, used - 1]
        k_cache[last, (length - 1) % 16 + 1 :] = float("nan")
        v_cache[last, (length - 1) % 16 + 1 :] = float("nan")
        block_tables[row, used:] = poisoned
    for num_splits in (1, 4):
        out = decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 0.25, num_splits=num_splits)
        assert_close(out, expected)


def test_decode_attention_bench_shape_in_bounds():
    """profiles/bench_kernels.py's decode shape (Hq 16, Hkv 8, D 128, blocks of 16) at full and ragged lengths, in
    one split as at B=64 ctx=4096 (where its first GPU run faulted; split paths: the tests above); in_bounds checks
    it (1,024 tokens, not 4,096: the interpreter's time)."""
    q, k_cache, v_cache, block_tables, lens = make_decode_inputs([1024, 1, 300, 17], 16, 8, 128, 16, torch.bfloat16)
    out = decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 128**-0.5, num_splits=1)
    assert_close(out, decode_attention_torch(q, k_cache, v_cache, block_tables, lens, 128**-0.5))


@pytest.mark.skipif(CUDA, reason="the interpreter's bounds check")
def test_a_stale_block_table_reads_out_of_bounds():
    """What the unsynchronized bench handed the kernel: a block table still holding an earlier tensor's words, here
    one past the cache. The check sees the read (on the GPU: an illegal memory access); a block id within the cache
    would be read silently."""
    q, k_cache, v_cache, block_tables, lens = make_decode_inputs([40, 20], 4, 2, 16, 16, torch.float32)
    block_tables[1, 0] = k_cache.shape[0]
    with pytest.raises(Exception, match="load addresses lie outside the launch"):  # wrapped by Triton
        decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 0.25, num_splits=1)


def test_default_num_splits():
    """The split-K plan for an H100 (the interpreter plans as for one): about two programs per SM."""
    cpu = torch.device("cpu")
    assert default_num_splits(1, 8, 4096, cpu) == 32  # 256 programs of 128 tokens at full length
    assert default_num_splits(8, 8, 4096, cpu) == 5
    assert default_num_splits(64, 8, 4096, cpu) == 1  # the batch alone fills the GPU
    assert default_num_splits(1, 8, 100, cpu) == 1  # short tables are not split
    assert default_num_splits(1, 1, 1 << 20, cpu) == MAX_SPLITS


def test_the_triton_kernel_set_runs_these_kernels():
    """The set ops.select_kernels makes for "triton" calls these kernels with the reference signatures."""
    torch.manual_seed(0)  # the inputs, not whatever tests ran before, decide fp32 rounding against the tolerance
    kernels = select_kernels("triton", DEVICE, torch.float32, hidden_size=32, head_dim=16, num_heads=4, num_kv_heads=2)
    assert kernels.name == "triton" and not kernels.decode_attention_gathers
    q, k_cache, v_cache, block_tables, lens = make_decode_inputs([3, 18], 4, 2, 16, 16, torch.float32)
    out = kernels.decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25)
    assert_close(out, decode_attention_torch(q, k_cache, v_cache, block_tables, lens, 0.25))
    x = torch.randn(3, 32, device=DEVICE)
    weight = torch.randn(32, device=DEVICE)
    assert_close(kernels.rms_norm(x, weight, 1e-6, x)[0], rms_norm_torch(x, weight, 1e-6, x)[0])
    assert_close(kernels.silu_mul(x), silu_mul_torch(x))
    _, q, k, v = make_qkv(2, 4, 2, 16, torch.float32)
    k_cache = torch.zeros(2, 16, 2, 16, device=DEVICE)
    args = (torch.ones(16, device=DEVICE), torch.ones(16, device=DEVICE), 1e-6, rope_table(16, 8, DEVICE),
            torch.tensor([0, 3], device=DEVICE))
    kernels.qk_norm_rope_store(q, k, v, *args, k_cache, torch.zeros_like(k_cache),
                               torch.tensor([16, 17], dtype=torch.int32, device=DEVICE))
    assert torch.equal(k_cache[1, :2], k)
    w8, scale = torch.randint(-127, 128, (40, 32), dtype=torch.int8, device=DEVICE), torch.rand(40, device=DEVICE) / 64
    assert_close(kernels.linear_int8(x, w8, scale), linear_int8_torch(x, w8, scale))
    assert kernels.prefill_attention is prefill_attention_triton
    args, _, _ = paged_inputs.paged([(3, 7), (1, 4)], 4, 2, 16, 4, device=DEVICE)
    assert_close(kernels.prefill_attention(*args), prefill_attention_torch(*args))
    assert kernels.repack_int4 is repack_int4_torch  # Triton reads the references' layout, also over the CPU set
    w4 = torch.randint(0, 256, (40, 32), dtype=torch.uint8, device=DEVICE)
    x4, s4, o4 = torch.randn(3, 64, device=DEVICE), torch.rand(40, 1, device=DEVICE) / 8, torch.randn(40, 1,
                                                                                              device=DEVICE)
    assert_close(kernels.linear_int4(x4, w4, s4, o4), linear_int4_torch(x4, w4, s4, o4))


# ---------------------------------------------------------------- paged prefill attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim, block_size, block_rows",
    [
        (4, 2, 16, 4, 16),  # GQA 2: 8 tokens a tile, so long rows span several tiles
        (6, 2, 32, 16, 32),  # GQA 3, padded to 4 rows a token
        (2, 2, 16, 4, 16),  # MHA
    ],
)
def test_prefill_attention(num_q_heads, num_kv_heads, head_dim, block_size, block_rows, dtype):
    args, _, _ = paged_inputs.paged(paged_inputs.MIXED, num_q_heads, num_kv_heads, head_dim, block_size, dtype,
                                    device=DEVICE)
    out = prefill_attention_triton(*args, block_rows=block_rows)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out, prefill_attention_torch(*args))


def test_prefill_attention_strided_q_reads_only_the_context():
    """q as the strided view of the fused qkv output; cache past each context (its last block's tail,
    unused table entries) is never read."""
    seqs = [(3, 10), (1, 5), (9, 9)]
    args, _, _ = paged_inputs.paged(seqs, 4, 2, 16, 4, device=DEVICE)
    q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale = args
    expected = prefill_attention_torch(*args)
    wide = torch.zeros(q.shape[0], q.shape[1], 2 * q.shape[2], device=DEVICE)
    wide[..., : q.shape[2]] = q
    k_cache, v_cache, tables = paged_inputs.poisoned(k_cache, v_cache, tables, context_lens)
    out = prefill_attention_triton(wide[..., : q.shape[2]], k, v, k_cache, v_cache, tables, query_lens,
                                   context_lens, scale, block_rows=16)
    assert_close(out, expected)


def test_prefill_tiles_longest_context_first():
    assert tile_list([3, 10, 1], [3, 14, 20], block_m=4) == [(2, 0), (1, 8), (1, 4), (1, 0), (0, 0)]


# ---------------------------------------------------------------- int8 weight-only linear


# (rows, N, K): decode tiles (1, 3 rows; N = 600 over column blocks even in the interpreter's 512; K of
# two k-blocks, one partial), prefill tiles (40 rows), a 3-d input
@pytest.mark.parametrize("x_shape, n", [((1, 96), 40), ((3, 200), 600), ((40, 64), 72), ((2, 3, 32), 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_int8(x_shape, n, dtype):
    torch.manual_seed(n)
    x = torch.randn(x_shape, device=DEVICE).to(dtype)
    weight = torch.randint(-127, 128, (n, x_shape[-1]), dtype=torch.int8, device=DEVICE)
    scale = (torch.rand(n, device=DEVICE) / 64).to(dtype)
    out = linear_int8_triton(x, weight, scale)
    assert out.shape == (*x_shape[:-1], n) and out.dtype == dtype
    assert_close(out, linear_int8_torch(x, weight, scale))


# ---------------------------------------------------------------- int4 weight-only linear


# (rows, N, K, group): decode tiles (1, 3 rows; N = 600 over column blocks even in the interpreter's 512;
# two groups of one block, one group of two), prefill tiles (40 rows), a 3-d input
@pytest.mark.parametrize("x_shape, n, group", [((1, 128), 40, 64), ((3, 128), 600, 128), ((40, 64), 72, 64),
                                               ((2, 3, 192), 33, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_int4(x_shape, n, group, dtype):
    torch.manual_seed(n)
    k = x_shape[-1]
    x = torch.randn(x_shape, device=DEVICE).to(dtype)
    weight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    scale = (torch.rand(n, k // group, device=DEVICE) / 64).to(dtype)
    offset = (-8 * scale + torch.randn(n, k // group, device=DEVICE).to(dtype) / 256).to(dtype)
    out = linear_int4_triton(x, weight, scale, offset)
    assert out.shape == (*x_shape[:-1], n) and out.dtype == dtype
    assert_close(out, linear_int4_torch(x, weight, scale, offset))


# ---------------------------------------------------------------- weight-only GEMV (decode-sized batches)


def gemv_inputs(fmt: int, rows: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """x, the weight arguments for `fmt`, and the reference output."""
    torch.manual_seed(rows * n + k)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    if fmt == FLOAT:
        weight = torch.randn(n, k, device=DEVICE).to(dtype)
        return x, (weight,), torch.nn.functional.linear(x.float(), weight.float()).to(dtype)
    if fmt == INT8:
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
        scale = (torch.rand(n, device=DEVICE) / 64).to(dtype)
        return x, (weight, scale), linear_int8_torch(x, weight, scale)
    weight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=DEVICE)
    scale = (torch.rand(n, k // 64, device=DEVICE) / 64).to(dtype)
    offset = (-8 * scale + torch.randn(n, k // 64, device=DEVICE).to(dtype) / 256).to(dtype)
    return x, (weight, scale, offset), linear_int4_torch(x, weight, scale, offset)


# K: float/int8 200 = 3 steps of 64 and a tail of 8; int4 192 = 3 blocks of 64 (its K is whole blocks): split
# in 2, the last split part-empty (float/int8: the tail; int4: one block of two), masked along K. K = 256: 4
# whole steps, 2 even splits, unmasked along K. N = 40 within one column block, 600 over two (the
# interpreter's 512).
# Not every combination: on a GPU each case is a compile. One pass only where K has a tail (K = 256 in one pass is
# the same path unmasked); split-K in bf16 not also over two column blocks (fp32 covers them).
GEMV_CASES = [
    pytest.param(fmt, k, rows, n, split, dtype, id=f"{name}-{rows}x{n}-{case}")
    for fmt, k, name in [(FLOAT, 200, "float"), (INT8, 200, "int8"), (INT4, 192, "int4"), (FLOAT, 256, "float-even"),
                         (INT8, 256, "int8-even"), (INT4, 256, "int4-even")]
    for rows, n in [(1, 40), (3, 600), (8, 40)]
    for split, dtype, case in [(False, torch.bfloat16, "one-pass-bf16"), (True, torch.float32, "split-k-fp32"),
                               (True, torch.bfloat16, "split-k-bf16")]
    if not (not split and k == 256) and not (split and dtype == torch.bfloat16 and n == 600)
]


@pytest.mark.parametrize("fmt, k, rows, n, split, dtype", GEMV_CASES)
def test_gemv(fmt, k, rows, n, split, dtype):
    x, weights, expected = gemv_inputs(fmt, rows, n, k, dtype)
    plan = gemv_plan(n, k, fmt, DEVICE, splits=2 if split else 1, block_k=64)
    assert plan.splits == (2 if split else 1)
    out = gemv(x, weights[0], fmt, *weights[1:], plan=plan)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert_close(out, expected)


def test_gemv_split_scratch_is_one_buffer_per_shape_for_every_row_count():
    """Decode steps of 1..8 rows share one preallocated split-K buffer per (splits, N): none allocated after
    the first call. No rows: an empty output, no launch."""
    plan = gemv_plan(40, 256, INT8, DEVICE, splits=2, block_k=64)
    buffers = []
    for rows in (8, 1, 3):
        x, weights, expected = gemv_inputs(INT8, rows, 40, 256, torch.float32)
        assert_close(gemv(x, *weights[:1], INT8, *weights[1:], plan=plan), expected)
        buffers.append(gemv_module._PARTIALS[(x.device, 2, 40)])
    assert all(b is buffers[0] for b in buffers)
    assert gemv(torch.zeros(0, 256, device=DEVICE), *weights[:1], INT8, *weights[1:]).shape == (0, 40)


@pytest.mark.parametrize("fmt", [FLOAT, INT8, INT4], ids=["float", "int8", "int4"])
def test_a_gemv_rows_output_is_the_same_bits_at_every_row_count(fmt):
    """A row's output does not depend on the rows beside it (rows padded to 1, 2, 4 or 8, unrolled): what makes a
    request's greedy tokens the same in any decode bucket up to 8. On a GPU the compiled unroll could fuse
    differently per padding; this checks it there."""
    x, weights, _ = gemv_inputs(fmt, 8, 40, 256, torch.bfloat16)
    plan = gemv_plan(40, 256, fmt, DEVICE, splits=2, block_k=64)
    alone = gemv(x[:1], weights[0], fmt, *weights[1:], plan=plan)
    for rows in (3, 8):
        assert torch.equal(gemv(x[:rows], weights[0], fmt, *weights[1:], plan=plan)[:1], alone), rows


def test_gemv_plan_fills_the_gpu_at_qwen3_shapes(monkeypatch):
    """On a 132-SM GPU every 0.6B decode linear gets at least 2 programs per SM (K split where N alone
    gives too few), each split whole steps of its tile; the 151,936-row LM head needs no split."""
    monkeypatch.setattr(gemv_module, "num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    for fmt in (FLOAT, INT8, INT4):
        for n, k in [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)]:
            plan = gemv_plan(n, k, fmt, cuda)
            programs = triton.cdiv(n, plan.block_n) * plan.splits
            assert programs >= 2 * 132, (fmt, n, k, plan)
            assert plan.block_k % 64 == 0
            assert plan.splits * plan.split_k == k  # whole steps, unmasked along K
        assert gemv_plan(151936, 1024, fmt, cuda).splits == 1


def test_float_gemv_is_the_triton_sets_linear_only_when_chosen():
    sizes = dict(hidden_size=32, head_dim=16, num_heads=4, num_kv_heads=2)
    plain = select_kernels("triton", DEVICE, torch.float32, **sizes)
    chosen = select_kernels("triton", DEVICE, torch.float32, float_gemv=True, **sizes)
    assert chosen.linear is not plain.linear
    for rows in (3, 9):  # the GEMV, then the base set's linear past GEMV_MAX_ROWS
        x, (weight,), expected = gemv_inputs(FLOAT, rows, 40, 64, torch.float32)
        assert_close(chosen.linear(x, weight), expected)
    with pytest.raises(ValueError, match="FLOAT_GEMV"):
        select_kernels("torch", DEVICE, torch.float32, float_gemv=True, **sizes)


def test_bench_linear_rows_run_and_check_every_kernel():
    """profiles/bench_linear.py's rows (bench_kernels.py's last) at small shapes: every kernel it times at both
    row counts, its fp64 check passing, so the one GPU run measures instead of failing on a script error."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "profiles"))
    from bench_linear import measure_linears

    rows = measure_linears(1000.0, lambda impl, copies, eager: 1.0, False, 2e-2, shapes=(("small", 128, 40),),
                           device=DEVICE.type)
    assert [(r.rows, r.impl) for r in rows] == [
        (1, "cublas bf16"), (1, "gemv bf16"), (1, "gemv int8"), (1, "gemv int4"), (8, "cublas bf16"),
        (8, "gemv bf16"), (8, "gemv int8"), (8, "gemv int4"), (8, "tl.dot int8"), (8, "tl.dot int4"),
    ]
    assert all(r.ok for r in rows), rows


# ---------------------------------------------------------------- GPU: Qwen3-0.6B shapes in bf16


@pytest.mark.parametrize("batch, max_context", [(1, 4096), (8, 512), (64, 1024)])
@pytest.mark.gpu
@requires_cuda
def test_decode_attention_qwen3_shapes_gpu(batch, max_context):
    g = torch.Generator().manual_seed(batch)
    context_lens = torch.randint(1, max_context + 1, (batch,), generator=g).tolist()
    context_lens[0] = max_context
    q, k_cache, v_cache, block_tables, lens = make_decode_inputs(
        context_lens, 16, 8, 128, 16, torch.bfloat16, width=max_context // 16
    )
    out = decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 128**-0.5)
    assert_close(out, decode_attention_torch(q, k_cache, v_cache, block_tables, lens, 128**-0.5))


@pytest.mark.gpu
@requires_cuda
def test_prefill_attention_qwen3_shapes_gpu():
    """A chunked-prefill step at 0.6B's shapes in bf16: a long prompt, a chunk after a long prefix, decode rows."""
    seqs = [(1000, 1000), (512, 3000), (1, 4096), (1, 17), (37, 40)]
    args, _, _ = paged_inputs.paged(seqs, 16, 8, 128, 16, torch.bfloat16, device=DEVICE)
    assert_close(prefill_attention_triton(*args), prefill_attention_torch(*args))


@pytest.mark.gpu
@requires_cuda
def test_decode_attention_cuda_graph_gpu():
    """Captured once, replayed with other lengths in the same buffers: nothing is data-dependent."""
    q, k_cache, v_cache, block_tables, lens = make_decode_inputs(
        [300, 1, 17, 1024], 16, 8, 128, 16, torch.bfloat16, width=64
    )
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm up (compile) outside the capture
        decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 128**-0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, k_cache, v_cache, block_tables, lens, 128**-0.5)
    for new_lens in ([1024, 16, 1, 999], [2, 700, 65, 1]):
        lens.copy_(torch.tensor(new_lens))
        graph.replay()
        assert_close(out, decode_attention_torch(q, k_cache, v_cache, block_tables, lens, 128**-0.5))


@pytest.mark.gpu
@requires_cuda
def test_norm_and_rope_qwen3_shapes_gpu():
    x = torch.randn(64, 1024, device=DEVICE, dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.randn(1024, device=DEVICE, dtype=torch.bfloat16)
    for actual, expected in zip(rms_norm_triton(x, weight, 1e-6, residual), rms_norm_torch(x, weight, 1e-6, residual)):
        assert_close(actual, expected)
    slots = list(range(16, 16 + 62)) + [-1, -1]
    positions = list(range(100, 164))
    args = 16, 8, 128, 16, slots, positions, torch.bfloat16
    qkv, k_cache, v_cache, (k_initial, _) = run_qk_norm_rope_store(qk_norm_rope_store_triton, *args)
    expected_qkv, expected_k, _, _ = run_qk_norm_rope_store(qk_norm_rope_store_torch, *args)
    assert_close(qkv, expected_qkv)
    assert_close(k_cache.view(-1, 8, 128)[16:78], expected_k.view(-1, 8, 128)[16:78])
    assert torch.equal(k_cache[0], k_initial[0])
