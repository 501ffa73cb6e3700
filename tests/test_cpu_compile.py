"""The one torch.compile policy of the C kernels: under torch.compile every one of them is its
custom op (the mutating one included), and the compiled code computes what eager code does."""
from __future__ import annotations

import pytest
import torch

import ops
from nanoqwen.layers.rotary import RotaryEmbedding
from ops import cpu
from ops.cpu import build as cpu_build

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

TOKENS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 2, 64, 4, 2, 16, 16
C_OPS = {f"nanoqwen.{name}.default" for name in (
    "rms_norm_cpu", "add_rms_norm_cpu", "linear_cpu", "qk_norm_rope_store_cpu", "decode_attention_cpu",
    "embedding_cpu", "silu_mul_cpu",
)}


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    for kernel in cpu.C_KERNELS:
        assert kernel.build(), kernel.error


def decode_layer(kernels: ops.Kernels):
    """A decode layer's kernels in order, from the kernel set the model would hold (and the embedding)."""

    def layer(x, residual, norm_w, qkv_w, q_w, k_w, cos_sin, positions, k_cache, v_cache, slots, tables, lens):
        embedded = kernels.embedding(positions, qkv_w)  # qkv_w as a table of 128 rows
        first, _ = kernels.rms_norm(x, norm_w, 1e-6)
        h, residual = kernels.rms_norm(x, norm_w, 1e-6, residual)
        qkv = kernels.linear(h, qkv_w)
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q, k, v = (t.view(TOKENS, -1, HEAD_DIM) for t in (q, k, v))
        kernels.qk_norm_rope_store(q, k, v, q_w, k_w, 1e-6, cos_sin, positions, k_cache, v_cache, slots)
        out = kernels.decode_attention(q, k_cache, v_cache, tables, lens, HEAD_DIM**-0.5)
        return embedded, first, residual, qkv, out, kernels.silu_mul(qkv)

    return layer


def inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(HEAD_DIM, 64, 1_000_000.0)
    rotary.build(torch.device("cpu"))
    positions = torch.tensor([3, 7], dtype=torch.int32)
    tables = torch.tensor([[1], [2]], dtype=torch.int32)
    return [
        torch.randn(TOKENS, HIDDEN, dtype=dtype), torch.randn(TOKENS, HIDDEN, dtype=dtype),
        (1 + 0.1 * torch.randn(HIDDEN)).to(dtype), torch.randn((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, dtype=dtype),
        (1 + 0.1 * torch.randn(HEAD_DIM)).to(dtype), (1 + 0.1 * torch.randn(HEAD_DIM)).to(dtype),
        rotary.cos_sin, positions,
        torch.randn(4, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype), torch.randn(4, BLOCK, KV_HEADS, HEAD_DIM, dtype=dtype),
        tables[:, 0] * BLOCK + positions, tables, positions + 1,
    ]


def cpu_kernels(dtype: torch.dtype) -> ops.Kernels:
    kernels = ops.select_kernels("torch", torch.device("cpu"), dtype, hidden_size=HIDDEN, head_dim=HEAD_DIM,
                                 num_heads=HEADS, num_kv_heads=KV_HEADS)
    assert not kernels.decode_attention_gathers  # the C kernels, not the references
    return kernels


def test_every_kernel_traces_as_its_custom_op():
    targets = []

    def record(gm: torch.fx.GraphModule, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(decode_layer(cpu_kernels(torch.float32)), backend=record, fullgraph=True)(*inputs(torch.float32))
    assert set(targets) >= C_OPS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matches_eager_to_the_bit(dtype):
    """aot_eager functionalizes the in-place q/k-norm + RoPE + store (views of qkv, the caches)."""
    layer = decode_layer(cpu_kernels(dtype))
    eager_args, compiled_args = inputs(dtype), inputs(dtype)
    eager = layer(*eager_args)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(*compiled_args)
    for a, b in zip([*eager, *eager_args[8:10]], [*compiled, *compiled_args[8:10]]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
