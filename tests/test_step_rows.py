"""The rows a decode step runs (ModelRunner.step_rows): its positions, padded to a bucket except where the CPU runs it
eagerly (graph none, or a CPU graph's bucket past the C linears' row limit), where a padded row would cost what a
real one does. Greedy tokens as transformers' either way."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_util import MIXED_PROMPTS, c_linear_rows, generate, greedy, hf_greedy, load_engine, sequence
from nanoqwen.engine.scheduler import Batch
from nanoqwen.runner.runner import ModelRunner, decode_buckets
from ops.cpu import build as cpu_build

MAX_TOKENS = 6
PROMPTS = [*MIXED_PROMPTS, *[list(range(100 * i, 100 * i + 4 + i)) for i in range(1, 7)]]


# (graph, rows, native bf16): 3 rows on graph none; 9 on cpugraph, whose bucket 16 is recorded only where the C
# linears take 16 fp32 rows: on a CPU without native bf16 (AVX2) the step pads to it and replays, on one with it
# (fp32 rows past 8 to torch's GEMM) the step runs its 9 rows eagerly
@pytest.mark.parametrize(("graph", "rows", "native_bf16"), [("none", 3, True), ("cpugraph", 9, True),
                                                            ("cpugraph", 9, False)])
def test_a_decode_step_pads_only_to_a_bucket_it_replays(tiny_checkpoint, hf, graph, rows, native_bf16, monkeypatch):
    if graph == "cpugraph" and cpu_build.unavailable():
        pytest.skip(f"{cpu_build.unavailable()}")
    limit = c_linear_rows(monkeypatch, native_bf16)
    engine = load_engine(tiny_checkpoint, graph=graph, max_batch=16)
    runner = engine.runner
    assert runner.buckets == ([] if graph == "none" else [1, 2, 4, 8, 16])
    assert sorted(runner.graphs._cpu_graphs) == [bucket for bucket in runner.buckets if bucket <= limit]
    padded = next((bucket for bucket in runner.buckets if bucket >= rows), rows)
    step = padded if runner.graphs.replays(padded) else rows
    assert (step == 16) == (graph == "cpugraph" and not native_bf16)
    buckets, run = [], runner.graphs.run
    monkeypatch.setattr(runner.graphs, "run", lambda bucket, *args: buckets.append(bucket) or run(bucket, *args))
    views, eager = [], runner.graphs._step
    monkeypatch.setattr(runner.graphs, "_step", lambda mode, inputs: views.append(inputs) or eager(mode, inputs))
    prompts = PROMPTS[:rows]
    for result, prompt in zip(generate(engine, prompts, greedy(MAX_TOKENS)), prompts, strict=True):
        assert result.choices[0].token_ids == hf_greedy(hf, prompt, MAX_TOKENS)
    assert buckets == [step] * (MAX_TOKENS - 1)  # every decode step: the prefill sampled the first tokens
    if step > rows:  # every step replayed its bucket's recording: none ran the model eagerly
        assert views == []
        return
    # every eager step read the views of its row count made on the first, none rebuilt
    first = views[0]
    assert len(views) == MAX_TOKENS - 1 and all(inputs is first for inputs in views)
    assert first.input_ids.shape == (rows,) and first is runner.inputs.bucket(rows, first.block_tables.shape[1])


def test_an_eager_decode_step_pads_off_the_cpu(tiny_checkpoint):
    """Off the CPU an eager step (graph none, the GPU tests' reference) pads to a bucket as the graphed steps do: the
    same row counts, the same cuBLAS/Triton kernels. The meta device stands for a GPU: a runner builds there."""
    engine = load_engine(tiny_checkpoint, max_batch=8)
    batch = Batch(decode=[sequence(prompt, f"r{i}") for i, prompt in enumerate(MIXED_PROMPTS)])
    assert (engine.runner.buckets, engine.runner.step_rows(batch)) == ([], 3)
    # a runner on meta allocates its KV cache there: `engine` is not used past this point
    gpu = ModelRunner(engine.runner.model, dataclasses.replace(engine.runtime, device=torch.device("meta")))
    assert (gpu.buckets, gpu.step_rows(batch)) == ([1, 2, 4, 8], 4)
    assert decode_buckets("none", torch.device("cuda"), 8, 1) == [1, 2, 4, 8]
    assert decode_buckets("none", torch.device("cpu"), 8, 1) == []
