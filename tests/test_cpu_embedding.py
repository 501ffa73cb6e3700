"""The compiled CPU embedding lookups (bf16/fp32, int8, int4 tables) against the torch references."""
from __future__ import annotations

import pytest
import torch

from cpu_isas import LOOPS, capped
from int4_packing import as_loaded
from nanoqwen.quant import quantize_int4_into, quantize_int8_into
from ops.cpu import build as cpu_build
from ops.cpu import embedding as cpu_embedding
from ops.cpu import linear_int4 as cpu_int4
from ops.torch_ref.embedding import embedding_int4_torch, embedding_int8_torch, embedding_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_embedding.KERNEL.build(), cpu_embedding.KERNEL.error
    assert cpu_int4.KERNEL.build(), cpu_int4.KERNEL.error  # as_loaded packs through it


VOCAB, HIDDEN = 302, 384  # int4 interleaved: the last 2 rows plain, each row a whole chunk and a 2-block one
# (tests/int4_packing.py)
IDS = [torch.tensor([7], dtype=torch.int32), torch.tensor([[0, 299, 5], [5, 17, 3]]), torch.tensor([1, 301, 250])]


def table(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(VOCAB, HIDDEN).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", IDS, ids=lambda t: str(tuple(t.shape)))
def test_embedding(dtype, ids):
    weight = table(dtype)
    out = cpu_embedding.embedding_cpu(ids, weight)
    assert out.shape == (*ids.shape, HIDDEN) and out.dtype == dtype
    assert torch.equal(out, embedding_torch(ids, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", IDS, ids=lambda t: str(tuple(t.shape)))
def test_embedding_int8(dtype, ids):
    q, scale = torch.empty(VOCAB, HIDDEN, dtype=torch.int8), torch.empty(VOCAB, dtype=dtype)
    quantize_int8_into(table(torch.float32), q, scale)
    out = cpu_embedding.embedding_int8_cpu(ids, q, scale)
    assert out.shape == (*ids.shape, HIDDEN) and out.dtype == dtype
    assert torch.equal(out, embedding_int8_torch(ids, q, scale))  # one rounding of an exact product


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("ids", IDS, ids=lambda t: str(tuple(t.shape)))
@pytest.mark.parametrize("loops", LOOPS)
def test_embedding_int4(dtype, group, ids, loops):
    """The table packed as the loader packs it for the build (the LM head's weight where tied; avx2: interleaved)."""
    packed = torch.empty(VOCAB, HIDDEN // 2, dtype=torch.uint8)
    scale, offset = torch.empty(VOCAB, HIDDEN // group, dtype=dtype), torch.empty(VOCAB, HIDDEN // group, dtype=dtype)
    quantize_int4_into(table(torch.float32), packed, scale, offset)
    if loops == "built":
        out = cpu_embedding.embedding_int4_cpu(ids, as_loaded(packed), scale, offset)
    else:
        flat, quads = ids.reshape(-1).to(torch.int32), as_loaded(packed, capped(cpu_int4.KERNEL, loops).lib)
        out = torch.empty(flat.shape[0], HIDDEN, dtype=dtype)
        capped(cpu_embedding.KERNEL, loops).lib.embedding_int4(
            flat.data_ptr(), quads.data_ptr(), scale.data_ptr(), offset.data_ptr(), out.data_ptr(), flat.shape[0],
            VOCAB, HIDDEN, group, int(dtype == torch.bfloat16))
        out = out.view(*ids.shape, HIDDEN)
    assert out.shape == (*ids.shape, HIDDEN) and out.dtype == dtype
    assert torch.equal(out, embedding_int4_torch(ids, packed, scale, offset))  # the reference's roundings, in order
