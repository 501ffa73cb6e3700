"""The rows a decode step runs (ModelRunner.step_rows): its positions, padded to a bucket only where a graph replays
it; run eagerly (graph none, or a CPU graph's bucket past the C linears' row limit) a padded row would cost what a
real one does. Greedy tokens as transformers' either way."""
from __future__ import annotations

import pytest

from engine_util import MIXED_PROMPTS, generate, greedy, hf_greedy, load_engine
from ops.cpu import build as cpu_build

MAX_TOKENS = 6
# 3 rows on graph none; 9 on cpugraph, where fp32 steps past 8 rows compute with torch: bucket 16 is not recorded
PROMPTS = [*MIXED_PROMPTS, *[list(range(100 * i, 100 * i + 4 + i)) for i in range(1, 7)]]


@pytest.mark.parametrize(("graph", "rows"), [("none", 3), ("cpugraph", 9)])
def test_an_eager_decode_step_runs_its_rows_unpadded(tiny_checkpoint, hf, graph, rows, monkeypatch):
    if graph == "cpugraph" and cpu_build.unavailable():
        pytest.skip(f"{cpu_build.unavailable()}")
    engine = load_engine(tiny_checkpoint, graph=graph, max_batch=16)
    runner = engine.runner
    assert runner.buckets == [1, 2, 4, 8, 16] and not runner.graphs.replays(16)
    buckets, run = [], runner.graphs.run
    monkeypatch.setattr(runner.graphs, "run", lambda bucket, *args: buckets.append(bucket) or run(bucket, *args))
    prompts = PROMPTS[:rows]
    for result, prompt in zip(generate(engine, prompts, greedy(MAX_TOKENS)), prompts, strict=True):
        assert result.choices[0].token_ids == hf_greedy(hf, prompt, MAX_TOKENS)
    assert buckets == [rows] * (MAX_TOKENS - 1)  # every decode step: the prefill sampled the first tokens
