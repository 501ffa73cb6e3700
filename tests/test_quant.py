"""NANOQWEN_QUANT=int8: weights quantised at load time, and greedy output equal to the torch reference
of the same quantised model (transformers with dequantised weights) in every execution mode."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import ops
from checkpoints import make_checkpoint
from engine_util import generate, greedy, hf_greedy, load_engine
from nanoqwen.config import EngineConfig
from quant_reference import load_int8_hf_model

PROMPTS = [[9707, 1879, 11, 358, 1079], list(range(1000, 1019)), [151644, 872, 198]]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request):
    return make_checkpoint(tie_word_embeddings=request.param)


@pytest.fixture(scope="module")
def references(checkpoint):
    hf = load_int8_hf_model(checkpoint)
    return [hf_greedy(hf, p, 6) for p in PROMPTS]


def assert_matches(engine, references) -> None:
    assert engine.info()["quant"] == "int8"
    results = generate(engine, PROMPTS, greedy(6))
    assert [r.choices[0].token_ids for r in results] == references


def test_eager_int8_matches_reference(checkpoint, references):
    assert_matches(load_engine(checkpoint, quant="int8", max_batch=4), references)


@pytest.mark.slow
def test_compiled_int8_matches_reference(checkpoint, references):
    engine = load_engine(checkpoint, quant="int8", graph="compile", max_batch=4)
    assert_matches(engine, references)
    [single] = generate(engine, PROMPTS[:1], greedy(6))  # batch bucket 1
    assert single.choices[0].token_ids == references[0]


@pytest.mark.slow
@pytest.mark.skipif(not ops.triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (set by conftest without CUDA)")
def test_triton_interpreted_int8_matches_reference(checkpoint, references):
    assert_matches(load_engine(checkpoint, quant="int8", kernels="triton", max_batch=4), references)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_are_int8_with_a_scale_per_row(checkpoint, dtype):
    engine = load_engine(checkpoint, quant="int8", dtype=str(dtype).removeprefix("torch."))
    model, raw = engine.runner.model, load_file(checkpoint / "model.safetensors")
    attn = model.model.layers[1].self_attn
    assert attn.qkv_proj.weight.dtype == torch.int8 and attn.qkv_proj.scale.dtype == dtype
    q, k, v = (w.float() * s.float().unsqueeze(1) for w, s in zip(attn.qkv_proj.weight.split(attn.qkv_sizes),
                                                                    attn.qkv_proj.scale.split(attn.qkv_sizes)))
    expected = raw["model.layers.1.self_attn.k_proj.weight"].float()
    # each row rounded to a multiple of its scale, max|row| / 127 (plus the scale's own rounding in bf16)
    step = expected.abs().amax(dim=1, keepdim=True) / 127
    assert ((k - expected).abs() <= step * (0.5 if dtype == torch.float32 else 1.5)).all()
    assert k.abs().amax(dim=1).allclose(expected.abs().amax(dim=1), rtol=1e-2)
    embed = model.model.embed_tokens
    assert embed.weight.dtype == torch.int8 and model.lm_head.weight.dtype == torch.int8
    tied = "lm_head.weight" not in raw
    assert (model.lm_head.weight is embed.weight) == tied and (model.lm_head.scale is embed.scale) == tied


def test_unknown_quant_is_refused():
    with pytest.raises(ValueError, match="quant must be one of none, int8"):
        EngineConfig(quant="int3")
    assert EngineConfig.from_env({"NANOQWEN_QUANT": "int8"}).quant == "int8"
