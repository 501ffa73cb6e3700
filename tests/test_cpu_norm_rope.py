"""The compiled CPU RMSNorm and q/k-norm + RoPE + KV-store kernels against the torch references."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nanoqwen.layers.rotary import RotaryEmbedding
from ops.cpu import build as cpu_build
from ops.cpu import norm_rope as cpu_norm_rope
from ops.torch_ref.rms_norm import rms_norm_torch
from ops.torch_ref.rope import qk_norm_rope_store_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_norm_rope.KERNEL.build(), cpu_norm_rope.KERNEL.error


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 64), (3, 1024), (40, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, rows, hidden, with_residual):
    torch.manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, dtype=dtype)
    residual = torch.randn(rows, hidden, dtype=dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden)).to(dtype)
    ref_out, ref_res = rms_norm_torch(x, weight, 1e-6, residual)
    out, res = cpu_norm_rope.rms_norm_cpu(x, weight, 1e-6, residual)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)  # the add rounds exactly like torch
    torch.testing.assert_close(out, ref_out, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 2, 16), (5, 16, 8, 128), (20, 8, 8, 32)])
def test_qk_norm_rope_store(dtype, tokens, heads, kv_heads, head_dim):
    torch.manual_seed(tokens * heads + head_dim)
    block_size, num_blocks = 16, 8
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    rotary = RotaryEmbedding(head_dim, 4096, 1_000_000.0)
    rotary.build(torch.device("cpu"))
    positions = torch.randint(0, 4096, (tokens,))
    slots = torch.randperm(num_blocks * block_size)[:tokens].int()
    slots[0] = -1  # a padded lane
    q_w, k_w = (1 + 0.1 * torch.randn(head_dim)).to(dtype), (1 + 0.1 * torch.randn(head_dim)).to(dtype)
    results = []
    for impl in (qk_norm_rope_store_torch, cpu_norm_rope.qk_norm_rope_store_cpu):
        fused = qkv.clone()
        q, k, v = fused.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k, v = (t.view(tokens, -1, head_dim) for t in (q, k, v))
        k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), 7.0, dtype=dtype)
        v_cache = torch.full_like(k_cache, 7.0)
        assert impl is qk_norm_rope_store_torch or cpu_norm_rope.qk_layout(q, k, v, k_cache)  # the C kernel runs
        impl(q, k, v, q_w, k_w, 1e-6, rotary.cos_sin, positions, k_cache, v_cache, slots)
        results.append((fused, k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)))
    (ref, ref_k, ref_v), (out, out_k, out_v) = results
    torch.testing.assert_close(out, ref, atol=TOL[dtype], rtol=TOL[dtype])
    real = slots[1:].long()
    torch.testing.assert_close(out_k[real], ref_k[real], atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(out_v[real], ref_v[real], atol=0, rtol=0)
    untouched = torch.ones(out_k.shape[0], dtype=torch.bool)
    untouched[real] = False
    assert (out_k[untouched] == 7).all() and (out_v[untouched] == 7).all()  # slot -1 wrote nothing


def test_other_layouts_take_the_references():
    """The model passes contiguous rows; anything else gets the torch reference's result exactly."""
    torch.manual_seed(0)
    x = torch.randn(64, 6).t()  # [6, 64], not contiguous
    weight = 1 + 0.1 * torch.randn(64)
    assert not cpu_norm_rope.rms_norm_layout(x, None)
    for a, b in zip(cpu_norm_rope.rms_norm_cpu(x, weight, 1e-6, x), rms_norm_torch(x, weight, 1e-6, x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    rows = torch.randn(3, 60)  # not whole vectors of 8
    assert not cpu_norm_rope.rms_norm_layout(rows, None)
    torch.testing.assert_close(cpu_norm_rope.rms_norm_cpu(rows, weight[:60], 1e-6)[0],
                               rms_norm_torch(rows, weight[:60], 1e-6)[0], atol=0, rtol=0)
    assert not cpu_norm_rope.qk_layout(*(torch.randn(2, 2, 8) for _ in range(3)), torch.zeros(4, 16, 2, 8))
    rotary = RotaryEmbedding(16, 64, 1_000_000.0)
    rotary.build(torch.device("cpu"))
    positions, slots = torch.tensor([3, 9]), torch.tensor([17, -1], dtype=torch.int32)
    weights = (1 + 0.1 * torch.randn(16), 1 + 0.1 * torch.randn(16))
    results = []
    for impl in (qk_norm_rope_store_torch, cpu_norm_rope.qk_norm_rope_store_cpu):
        torch.manual_seed(1)
        q, k, v = torch.randn(4, 2, 16).transpose(0, 1), torch.randn(2, 2, 16), torch.randn(2, 2, 16)  # q: heads apart
        k_cache, v_cache = torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)
        assert not cpu_norm_rope.qk_layout(q, k, v, k_cache)
        impl(q, k, v, *weights, 1e-6, rotary.cos_sin, positions, k_cache, v_cache, slots)
        results.append((q, k, k_cache, v_cache))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_no_openmp_region_in_the_kernels():
    """Past 15 rows the rows went to an OpenMP region, whose spinning threads and the C kernels' pool helpers
    (csrc/pool.h) took each other's cores: a 16-row decode step cost 4-8x a 15-row one. They take the pool."""
    assert b"GOMP_parallel" not in Path(cpu_norm_rope.KERNEL.lib._name).read_bytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 3, 4, 5, 8, 16, 17, 33, 64, 300])
def test_rows_split_over_threads_give_the_references_and_the_one_thread_bits(dtype, rows):
    """The pool's chunks only divide the rows: every row written, each as one thread writes it. Decode's chunks
    (pool_row_chunk at these sizes): q/k norm 2 rows, one chunk at 2 and two from 3; rms_norm 4 rows, two from 5."""
    torch.manual_seed(rows)
    heads, kv_heads, head_dim, hidden = 16, 8, 128, 1024
    x, residual = torch.randn(rows, hidden, dtype=dtype), torch.randn(rows, hidden, dtype=dtype)
    weight, q_w, k_w = ((1 + 0.1 * torch.randn(n)).to(dtype) for n in (hidden, head_dim, head_dim))
    rotary = RotaryEmbedding(head_dim, 4096, 1_000_000.0)
    rotary.build(torch.device("cpu"))
    positions, slots = torch.randint(0, 4096, (rows,)), torch.randperm(rows + 16)[:rows].int()
    sizes = [heads * head_dim] + 2 * [kv_heads * head_dim]
    qkv = torch.randn(rows, sum(sizes), dtype=dtype)
    results = []
    before = torch.get_num_threads()
    for threads, norm, rope in ((2, rms_norm_torch, qk_norm_rope_store_torch),
                                (1, cpu_norm_rope.rms_norm_cpu, cpu_norm_rope.qk_norm_rope_store_cpu),
                                (2, cpu_norm_rope.rms_norm_cpu, cpu_norm_rope.qk_norm_rope_store_cpu)):
        torch.set_num_threads(threads)  # the pool's helpers: threads - 1
        try:
            fused, k_cache = qkv.clone(), torch.zeros(rows + 16, 1, kv_heads, head_dim, dtype=dtype)
            v_cache = torch.zeros_like(k_cache)
            q, k, v = (t.view(rows, -1, head_dim) for t in fused.split(sizes, -1))
            rope(q, k, v, q_w, k_w, 1e-6, rotary.cos_sin, positions, k_cache, v_cache, slots)
            results.append((*norm(x, weight, 1e-6, residual), fused, k_cache, v_cache))
        finally:
            torch.set_num_threads(before)
    reference, one, two = results
    for a, b in zip(two, reference):
        torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])
    assert all(torch.equal(a, b) for a, b in zip(one, two))
