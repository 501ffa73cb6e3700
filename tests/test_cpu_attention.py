"""The compiled CPU paged decode attention against the torch reference."""
from __future__ import annotations

import pytest
import torch

from ops.cpu import attention as cpu_attention
from ops.cpu import build as cpu_build
from ops.torch_ref.decode_attention import decode_attention_torch
from paged_inputs import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_attention.KERNEL.build(), cpu_attention.KERNEL.error


def test_the_cpu_kernel_set_takes_it_where_it_serves():
    kernels = cpu_kernels(torch.float32)
    assert kernels.decode_attention is cpu_attention.decode_attention_cpu
    assert kernels.decode_attention_gathers is False
    # fp16, a head dim not a multiple of 8, a GQA group over MAX_GROUP: the torch reference
    for other in (cpu_kernels(torch.float16), cpu_kernels(torch.float32, head_dim=12),
                  cpu_kernels(torch.bfloat16, num_heads=34)):
        assert other.decode_attention is decode_attention_torch and other.decode_attention_gathers is True


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,block_size", [
    (1, 4, 4, 16, 16), (3, 8, 2, 32, 16), (8, 16, 8, 128, 16), (2, 16, 1, 64, 32),
])
def test_matches_reference(dtype, tol, batch, heads, kv_heads, head_dim, block_size):
    torch.manual_seed(batch * heads + head_dim)
    num_blocks, width = 40, 8
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, heads, head_dim, dtype=dtype)
    tables = torch.stack([torch.randperm(num_blocks - 1)[:width] + 1 for _ in range(batch)]).int()
    # lengths: 1, exactly a block, a block + 1, and the full table
    lengths = [1, block_size, block_size + 1, width * block_size][:batch] + [5] * max(0, batch - 4)
    context_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim**-0.5
    ref = decode_attention_torch(q, k_cache, v_cache, tables, context_lens, scale)
    out = cpu_attention.decode_attention_cpu(q, k_cache, v_cache, tables, context_lens, scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # q as the model passes it: a view of the fused qkv rows, read in place
    qkv = torch.cat([q.view(batch, -1), torch.randn(batch, 2 * kv_heads * head_dim, dtype=dtype)], dim=1)
    view = qkv[:, : heads * head_dim].view(batch, heads, head_dim)
    assert batch == 1 or not view.is_contiguous()
    assert torch.equal(cpu_attention.decode_attention_cpu(view, k_cache, v_cache, tables, context_lens, scale), out)


def test_reads_nothing_past_the_context():
    k_cache = torch.randn(6, 16, 2, 16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(1, 4, 16)
    tables = torch.tensor([[3, 5, 0, 0]], dtype=torch.int32)
    lens = torch.tensor([20], dtype=torch.int32)
    before = cpu_attention.decode_attention_cpu(q, k_cache, v_cache, tables, lens, 0.25)
    k_cache[5, 4:] = float("nan")  # past position 20
    v_cache[0] = float("nan")  # unused table entries
    after = cpu_attention.decode_attention_cpu(q, k_cache, v_cache, tables, lens, 0.25)
    assert torch.equal(before, after)
