"""Execution modes on CUDA (skipped without a GPU): CUDA-graph replay and torch.compile must give
the eager step's tokens for every batch bucket, with Triton kernels and with torch ops, greedy and
with sampling (which runs inside the captured step)."""
from __future__ import annotations

import pytest
import torch

from checkpoints import load_hf_model, make_checkpoint
from engine_util import collect, generate, generate_together, greedy, hf_greedy, load_engine, run
from nanoqwen.engine import SamplingParams

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


MIXED = [
    greedy(12),
    SamplingParams(temperature=0.8, seed=1, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=1.2, top_p=0.8, top_k=30, min_p=0.01, seed=2, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.7, repetition_penalty=1.3, presence_penalty=0.5, seed=3, max_tokens=12,
                   ignore_eos=True),
]
# The captured sampler modes: "sample", "filter", "top_k", a penalised batch (greedy step, then
# eager penalties), and the same in bucket 8 with padded lanes (the eager reference pads on a GPU too:
# ModelRunner.step_rows).
MIXED_BATCHES = [MIXED[:2], MIXED[:3], [MIXED[0], MIXED[2]], MIXED, MIXED + MIXED[:3]]


def sampled_outputs(checkpoint, **mode) -> list[list[int]]:
    engine = load_engine(checkpoint, device="cuda", max_batch=MAX_BATCH, max_model_len=256, **mode)
    return [t for batch in MIXED_BATCHES for t in generate_together(engine, PROMPTS[: len(batch)], batch)]


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_graph_replay_equals_eager_for_every_bucket(checkpoint, kernels):
    for batch in (1, 2, 3, 4, 5, 8):  # every bucket, and padded lanes inside 4 and 8 (eager steps pad on a GPU too)
        eager = outputs(checkpoint, batch, kernels=kernels, graph="none")
        graph = outputs(checkpoint, batch, kernels=kernels, graph="cudagraph")
        assert graph == eager, f"batch {batch}"


def test_bf16_graph_replay_equals_eager_with_triton(checkpoint):
    """The served configuration: bf16 weights and activations, Triton kernels, replayed graphs."""
    for batch in (1, 3, 8):
        eager = outputs(checkpoint, batch, kernels="triton", graph="none", dtype="bfloat16")
        graph = outputs(checkpoint, batch, kernels="triton", graph="cudagraph", dtype="bfloat16")
        assert graph == eager, f"batch {batch}"


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_graph_sampling_equals_eager(checkpoint, kernels):
    eager = sampled_outputs(checkpoint, kernels=kernels, graph="none")
    assert sampled_outputs(checkpoint, kernels=kernels, graph="cudagraph") == eager
    assert eager[1] != eager[0]  # sampled, not greedy


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


def bf16_engine_kernels() -> list:
    """Every Triton kernel a bf16 engine launches."""
    from ops.triton import activation, decode_attention, prefill_attention, rms_norm, rope

    return [prefill_attention._prefill_kernel, rms_norm._rms_norm_kernel, rope._qk_norm_rope_store_kernel,
            activation._silu_mul_kernel, decode_attention._decode_split_kernel, decode_attention._decode_combine_kernel]


def compiled_variants() -> int:
    """Triton kernel variants compiled in this process so far, over every kernel a bf16 engine launches."""
    return sum(len(caches[0]) for kernel in bf16_engine_kernels() for caches in kernel.device_caches.values())


def test_a_chunked_prefill_compiles_nothing_after_load(checkpoint):
    """The GPU twin of tests/test_jit_variants.py: a stream decodes while a 256-token prompt (a 16-block table)
    arrives in chunks beside it, and no Triton kernel compiles (a compile stalled every stream 0.7 s on the H200)."""
    for kernel in bf16_engine_kernels():  # else the earlier tests' variants (both alignments) hide a missing warm-up
        kernel.device_caches.clear()
    engine = load_engine(checkpoint, device="cuda", dtype="bfloat16", graph="cudagraph", kernels="triton",
                         max_batch=4, max_model_len=512, max_step_tokens=64)
    loaded = compiled_variants()
    _, stream = engine.submit(PROMPTS[0], greedy(12))
    _, long_stream = engine.submit(list(range(2000, 2256)), greedy(2))
    run(engine)
    assert len(collect(stream).choices[0].token_ids) == 12 and len(collect(long_stream).choices[0].token_ids) == 2
    assert compiled_variants() == loaded, "Triton compiled kernels while serving"
