"""Execution modes on CUDA (skipped without a GPU): CUDA-graph replay and torch.compile must give
the eager step's greedy tokens for every batch bucket, with Triton kernels and with torch ops."""
from __future__ import annotations

import pytest
import torch
from checkpoints import load_hf_model, make_checkpoint
from engine_util import generate, greedy, hf_greedy, load_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MAX_BATCH = 8
PROMPTS = [[1000 + 37 * i + j for j in range(5 + 3 * i)] for i in range(MAX_BATCH)]


@pytest.fixture(scope="module")
def checkpoint():
    return make_checkpoint(num_layers=2, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                           intermediate_size=512)


def outputs(checkpoint, batch: int, **mode) -> list[list[int]]:
    engine = load_engine(checkpoint, device="cuda", max_batch=MAX_BATCH, max_model_len=256, **mode)
    results = generate(engine, PROMPTS[:batch], greedy(12))
    return [r.choices[0].token_ids for r in results]


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_graph_replay_equals_eager_for_every_bucket(checkpoint, kernels):
    for batch in (1, 2, 3, 4, 5, 8):  # every bucket, and padded lanes inside 4 and 8
        eager = outputs(checkpoint, batch, kernels=kernels, graph="none")
        graph = outputs(checkpoint, batch, kernels=kernels, graph="cudagraph")
        assert graph == eager, f"batch {batch}"


def test_compiled_equals_eager(checkpoint):
    assert outputs(checkpoint, 3, graph="compile") == outputs(checkpoint, 3, graph="none")


def test_fp32_cuda_graph_matches_transformers(checkpoint):
    hf = load_hf_model(checkpoint)
    ours = outputs(checkpoint, 4, dtype="float32", graph="cudagraph")
    for prompt, tokens in zip(PROMPTS, ours):
        assert tokens == hf_greedy(hf, prompt, 12)


def test_bf16_graph_decode_is_default_on_cuda(checkpoint):
    engine = load_engine(checkpoint, device="cuda", dtype="bfloat16", graph="auto", kernels="auto", max_batch=4)
    assert engine.info()["graph"] == "cudagraph" and engine.info()["kernels"] == "triton"
    [result] = generate(engine, PROMPTS[:1], greedy(8))
    assert len(result.choices[0].token_ids) == 8
