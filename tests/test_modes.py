"""Greedy equality with transformers in the other execution modes: Triton kernels under the
interpreter, and torch.compile of the decode step."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ops
from checkpoints import load_hf_model, make_checkpoint
from engine_util import INTERPRETED_TOKENS, generate, generate_together, greedy, hf_greedy, load_engine
from engine_util import MIXED_PROMPTS as PROMPTS
from nanoqwen.engine import SamplingParams
from nanoqwen.sampler import MODES


@pytest.fixture(scope="module")
def checkpoint():
    return make_checkpoint()


@pytest.fixture(scope="module")
def references(checkpoint):
    hf = load_hf_model(checkpoint)
    return [hf_greedy(hf, p, 6) for p in PROMPTS]


@pytest.mark.slow
@pytest.mark.skipif(not ops.triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (set by conftest without CUDA)")
@pytest.mark.parametrize("float_gemv", [False, True])  # True: the linears of decode steps by Triton's GEMV
def test_triton_interpreted_model_matches_transformers(checkpoint, references, float_gemv):
    # 256 positions: decode attention in 2 splits, not the 32 of the checkpoint's 4096, whose programs the
    # interpreter runs one by one. The combine kernel runs, but contexts of at most 21 tokens leave split 1
    # empty: test_kernels' split-boundary tests combine splits that both hold tokens
    engine = load_engine(checkpoint, kernels="triton", max_batch=4, max_model_len=256, float_gemv=float_gemv)
    assert engine.info()["kernels"] == "triton"
    assert (engine.runner.model.kernels.linear.__qualname__.startswith("float_linear")) == float_gemv
    results = generate(engine, PROMPTS, greedy(INTERPRETED_TOKENS))
    for result, ref in zip(results, references):
        assert result.choices[0].token_ids == ref[:INTERPRETED_TOKENS]


@pytest.mark.slow
@pytest.mark.parametrize("max_step_tokens", [None, 5])  # 5: prompts split, decode rows beside chunks
def test_compiled_decode_matches_transformers(checkpoint, references, max_step_tokens):
    engine = load_engine(checkpoint, graph="compile", max_batch=4, max_step_tokens=max_step_tokens)
    assert engine.info()["graph"] == "compile"
    results = generate(engine, PROMPTS, greedy(6))  # batch bucket 4 (3 rows + 1 padded lane)
    for result, ref in zip(results, references):
        assert result.choices[0].token_ids == ref
    [single] = generate(engine, PROMPTS[:1], greedy(6))  # bucket 1
    assert single.choices[0].token_ids == references[0]


def sampled_tokens(engine, batches: list[list[SamplingParams]]) -> list[list[int]]:
    """Each batch's requests run together on the first prompts; all their tokens, batch after batch."""
    return [t for batch in batches for t in generate_together(engine, PROMPTS[: len(batch)], batch)]


SAMPLED = SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True)
FILTERED = SamplingParams(temperature=1.2, top_p=0.8, top_k=30, min_p=0.01, seed=2, max_tokens=6, ignore_eos=True)
# The step's sampler mode: "sample" for the first batch, "filter" for the second, "top_k" for the third.
MIXED_BATCHES = [[greedy(6), SAMPLED, SAMPLED], [greedy(6), SAMPLED, FILTERED],
                 [greedy(6), greedy(6), FILTERED]]


@pytest.mark.slow
def test_compiled_sampling_modes_match_eager(checkpoint):
    """Sampling runs inside the compiled step: seeded and filtered rows give the eager step's tokens."""
    eager = sampled_tokens(load_engine(checkpoint, max_batch=4), MIXED_BATCHES)
    compiled = sampled_tokens(load_engine(checkpoint, graph="compile", max_batch=4), MIXED_BATCHES)
    assert compiled == eager
    assert eager[1] == eager[4]  # same seed and prompt, batch-mates in another mode: the same tokens
    assert eager[1] != eager[0]  # and they are sampled, not the greedy ones
    assert eager[5] == eager[8]  # a small top-k row: the same tokens in the "filter" and "top_k" steps


# Run in a fresh process: triton must be imported without TRITON_INTERPRET, so that the kernels are
# JIT functions that dynamo records as kernel calls, and dynamo's "has triton" check (a GPU) is faked.
TRACE_SCRIPT = textwrap.dedent("""
    import torch, torch.utils._triton
    torch.utils._triton.has_triton = lambda: True
    from checkpoints import make_checkpoint
    from engine_util import load_engine
    from ops import triton as triton_kernels
    from nanoqwen.sampler import MODES
    engine = load_engine(make_checkpoint(), max_batch=4)
    runner = engine.runner
    # The Triton set, as ops.select_kernels makes it on CUDA (it refuses the CPU without the interpreter).
    cpu_set = runner.model.kernels
    kernels = triton_kernels.kernels(cpu_set, torch.device("cpu"))
    for module in runner.model.modules():
        if getattr(module, "kernels", None) is cpu_set:
            module.kernels = kernels
    runner._narrow_tables = False
    def backend(gm, example_inputs):
        calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        print("kernels", sum("triton_kernel_wrapper" in c for c in calls))
        return lambda *args: None  # record only: there is no GPU to launch on
    for mode in MODES:
        torch._dynamo.reset()
        try:
            with torch.inference_mode():
                torch.compile(runner._decode_step, backend=backend, fullgraph=True)(
                    mode, runner._bucket_inputs(4, runner.max_blocks_per_seq))
        except TypeError:  # the recording backend returns no outputs
            pass
""")


def traced_kernel_counts(script: str) -> list[str]:
    """Runs `script` in a fresh process without the interpreter: the "kernels N" (and "static ...") lines it printed."""
    tests = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line for line in done.stdout.splitlines() if line.startswith(("kernels", "static"))]


@pytest.mark.slow
@pytest.mark.skipif(not ops.triton_available(), reason="needs triton")
def test_decode_step_traces_as_one_graph_with_the_triton_kernels():
    """What NANOQWEN_GRAPH=compile runs on CUDA: model, Triton kernels and sampler in one fullgraph
    trace for every sampler mode (a graph break there would be an error)."""
    # 2 layers x (2 RMSNorms, q/k norm + RoPE + store, split-K attention + combine, SiLU * up) + the final norm
    assert traced_kernel_counts(TRACE_SCRIPT) == ["kernels 13"] * len(MODES)


# The decode-sized linears as planned on a 132-SM GPU (K split: GEMV + reduce), traced as NANOQWEN_GRAPH=compile does.
GEMV_TRACE_SCRIPT = textwrap.dedent("""
    import torch, torch.utils._triton
    torch.utils._triton.has_triton = lambda: True
    from ops.triton import gemv
    from ops.triton.linear_int4 import linear_int4_triton
    from ops.triton.linear_int8 import linear_int8_triton
    plan = gemv.gemv_plan
    gemv.num_sms = lambda device: 132
    gemv.gemv_plan = lambda n, k, fmt, device, **kw: plan(n, k, fmt, torch.device("cuda"), **kw)
    w8, scale = torch.zeros(1024, 2048, dtype=torch.int8), torch.ones(1024)
    w4, groups = torch.zeros(1024, 1024, dtype=torch.uint8), torch.ones(1024, 32)
    def backend(gm, example_inputs):
        calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        print("kernels", sum("triton_kernel_wrapper" in c for c in calls))
        return lambda *args: None  # record only: there is no GPU to launch on
    for fmt, k in ((gemv.INT8, 2048), (gemv.INT4, 2048), (gemv.FLOAT, 2048)):  # the server's order: eager steps first
        gemv._partials(torch.device("cpu"), gemv.gemv_plan(1024, k, fmt, None).splits, 1024)
    print("static", all(hasattr(b, "_dynamo_static_input_type") for b in gemv._PARTIALS.values()))
    for linear in (lambda x: linear_int8_triton(x, w8, scale), lambda x: linear_int4_triton(x, w4, groups, groups),
                   lambda x: gemv.float_linear(None)(x, scale[:, None] * w8)):
        torch._dynamo.reset()
        try:
            with torch.inference_mode():
                torch.compile(linear, backend=backend, fullgraph=True)(torch.zeros(4, 2048))
        except TypeError:  # the recording backend returns no outputs
            pass
""")


@pytest.mark.slow
@pytest.mark.skipif(not ops.triton_available(), reason="needs triton")
def test_decode_sized_linears_trace_as_one_graph_with_split_k():
    """int8, int4 and NANOQWEN_FLOAT_GEMV's linears at 4 rows under torch.compile's fullgraph trace: the GEMV's
    plan and split buffer are Python dynamo follows, each linear the GEMV and its reduce. The buffers exist before
    the trace, as in the server, marked static (else torch.compile's CUDA graphs skip a step that writes them)."""
    assert traced_kernel_counts(GEMV_TRACE_SCRIPT) == ["static True"] + ["kernels 2"] * 3


@pytest.mark.skipif(not ops.triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton and TRITON_INTERPRET=1 (set by conftest without CUDA)")
def test_each_engine_keeps_the_kernels_it_selected(checkpoint, references, monkeypatch):
    """The kernel set belongs to the model: loading a Triton engine leaves a torch engine on its own kernels."""
    from triton.runtime.interpreter import InterpretedFunction

    torch_engine = load_engine(checkpoint, max_batch=4)
    triton_engine = load_engine(checkpoint, kernels="triton", max_batch=4)
    assert (torch_engine.info()["kernels"], triton_engine.info()["kernels"]) == ("torch", "triton")
    launches = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launches.append(self) or run(self, *a, **k))
    results = generate(torch_engine, PROMPTS, greedy(6))
    assert [r.choices[0].token_ids for r in results] == references and not launches


def test_triton_backend_is_refused_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sizes = dict(hidden_size=64, head_dim=16, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="Triton"):
        ops.select_kernels("triton", torch.device("cpu"), torch.float32, **sizes)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.select_kernels("cuda-magic", torch.device("cpu"), torch.float32, **sizes)


def test_cudagraph_mode_needs_cuda(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="cudagraph"):
        load_engine(checkpoint, graph="cudagraph")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_reference_ops_alone(checkpoint, references, dtype):
    """NANOQWEN_CPU_KERNELS=0 (or no C compiler): the torch reference path serves on its own."""
    from ops import torch_ref

    engine = load_engine(checkpoint, dtype=dtype, cpu_kernels=False)
    assert engine.runner.model.kernels is torch_ref.KERNELS and engine.runner._narrow_tables
    results = generate(engine, PROMPTS, greedy(6))
    if dtype == "float32":
        for result, ref in zip(results, references):
            assert result.choices[0].token_ids == ref
    else:
        assert all(len(r.choices[0].token_ids) == 6 for r in results)
