"""NANOQWEN_GRAPH=cpugraph: the decode step's C kernel calls recorded once per batch bucket and
replayed (ops/cpu/graph.py, nanoqwen/runner/graphs.py); greedy tokens as transformers', the same
tokens and logprobs as the eager step in every weight format."""
from __future__ import annotations

import ctypes
import threading

import pytest
import torch

from engine_util import MIXED_PROMPTS as PROMPTS
from engine_util import collect, engine_step, generate, generate_together, greedy, hf_greedy, load_engine, run
from nanoqwen.choices import QUANTS
from nanoqwen.engine import SamplingParams
from nanoqwen.runner.graphs import GraphRunner
from nanoqwen.runner.inputs import StepInputBuffer
from ops.cpu import build as cpu_build
from ops.cpu import graph as cpu_graph
from ops.cpu import pointwise, sample
from quant_reference import load_quantised_hf_model

needs_c_kernels = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")



@pytest.fixture(scope="module")
def references(hf):
    return [hf_greedy(hf, p, 9) for p in PROMPTS + [list(range(2000, 2011))]]


def cpugraph_engine(checkpoint, **overrides):
    engine = load_engine(checkpoint, graph="cpugraph", max_batch=4, **overrides)
    assert engine.info()["graph"] == "cpugraph"
    assert sorted(engine.runner.graphs._cpu_greedy) == engine.runner.buckets  # greedy steps with their argmax
    # every bucket replays, each of its steps one call into replay.c
    assert engine.info()["cpu_replay"] == {"replay.c": engine.runner.buckets}
    return engine


def test_capture_records_c_calls_and_keeps_their_tensors():
    calls = []
    with cpu_graph.capture() as recording:
        x = torch.empty(4)
        y = x.view(2, 2)[1:]  # views and allocations may run beside the calls
        cpu_graph.call(lambda *args: calls.append(args), y, None, 3, 0.5)
    assert calls == [(y.data_ptr(), None, 3, 0.5)] and recording.tensors == [y]
    assert recording.packed is None  # a Python callable: replayed by the Python loop
    recording.replay()
    assert calls == [(y.data_ptr(), None, 3, 0.5)] * 2
    cpu_graph.call(lambda *args: calls.append(args), y)  # no capture active: called, not recorded
    assert len(recording.calls) == 1
    joined = recording + recording
    assert joined.calls == recording.calls * 2 and joined.tensors == [y, y]


def test_a_kernel_status_raises_when_called_and_when_replayed():
    """A function that returns a status (csrc/nanoqwen_cpu.h's `int` ones): 0 goes on; anything else, where the kernel
    wrote nothing, is MemoryError naming it, from the call and from a replay of its recording."""
    status = [0]

    def prefill_attention(*args: int) -> int:
        return status[0]

    with cpu_graph.capture() as recording:
        cpu_graph.call(prefill_attention, 1)
    recording.replay()
    status[0] = 1
    with pytest.raises(MemoryError, match="prefill_attention"):
        cpu_graph.call(prefill_attention, 1)
    with pytest.raises(MemoryError, match="prefill_attention"):
        recording.replay()


def c_kernels(*kernels: cpu_build.CKernel) -> None:
    """Builds `kernels` and replay.c's (ops.cpu.kernels, which an engine runs, builds every one)."""
    for kernel in (*kernels, cpu_graph.KERNEL):
        assert kernel.build(), kernel.error


def captured_copy(x: torch.Tensor) -> tuple[cpu_graph.Recording, torch.Tensor]:
    """A recording of one C call, x (bf16) copied as fp32 into the memory it returns."""
    with cpu_graph.capture() as recording:
        out = pointwise.to_fp32_cpu(x)
    return recording, out


@needs_c_kernels
def test_a_replay_is_one_c_call_over_the_calls_packed_at_capture():
    """replay.c issues the packed calls: the recorded ctypes functions are not called again (a stand-in proves it)."""
    c_kernels(pointwise.KERNEL)
    x = torch.randn(100, dtype=torch.bfloat16)
    recording, out = captured_copy(x)
    assert recording.packed is not None
    out.zero_()
    recording.calls = [(lambda *args: pytest.fail("the Python loop ran"), args) for _, args in recording.calls]
    recording.replay()
    assert torch.equal(out, x.float())


@needs_c_kernels
def test_without_the_replay_library_a_recording_replays_as_the_python_loop(monkeypatch):
    c_kernels(pointwise.KERNEL)
    monkeypatch.setattr(cpu_graph, "KERNEL", cpu_build.CKernel("cpu_replay", "missing.c", ()))  # never built
    x = torch.randn(100, dtype=torch.bfloat16)
    recording, out = captured_copy(x)
    assert recording.packed is None
    out.zero_()
    recording.replay()
    assert torch.equal(out, x.float())


@needs_c_kernels
def test_a_c_function_not_typed_as_the_header_declares_its_name_replays_as_the_python_loop():
    """A ctypes callback (no name) or a header name typed otherwise gets no thunk: the capture packs nothing and the
    replay calls them from Python."""
    c_kernels(pointwise.KERNEL)
    seen = []
    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(lambda pointer: seen.append(pointer) or 0)
    retyped = ctypes.CDLL(pointwise.KERNEL.lib._name).bf16_to_fp32  # a handle of its own: the kernel's types untouched
    retyped.restype, retyped.argtypes = None, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong)
    x, out = torch.randn(4, dtype=torch.bfloat16), torch.empty(4)
    with cpu_graph.capture() as recording:
        cpu_graph.call(callback, out)
        cpu_graph.call(retyped, x, out, 4)
    assert recording.packed is None
    out.zero_()
    recording.replay()
    assert seen == [out.data_ptr()] * 2 and torch.equal(out, x.float())


@needs_c_kernels
def test_a_joined_recording_replays_both_and_names_a_failing_call_in_the_middle():
    c_kernels(pointwise.KERNEL, sample.KERNEL)
    x = torch.randn(64, dtype=torch.bfloat16)
    (first, a), (last, b) = captured_copy(x), captured_copy(-x)
    joined = first + last
    assert joined.packed is not None and len(joined.calls) == 2
    a.zero_()
    b.zero_()
    joined.replay()
    assert torch.equal(a, x.float()) and torch.equal(b, -x.float())
    # sample_rows given no scratch returns its status before it reads anything: the replay stops there
    fn = sample.KERNEL.lib.sample_rows
    failing = cpu_graph.Recording()
    failing.calls = [(fn, tuple(t(0) for t in fn.argtypes))]  # NULL pointers, zero sizes
    failing.pack()
    assert failing.packed is not None
    a.zero_()
    b.zero_()
    with pytest.raises(MemoryError, match="sample_rows"):
        (first + failing + last).replay()
    assert torch.equal(a, x.float()) and not b.any()


def test_a_capture_records_only_its_own_thread():
    calls = []
    with cpu_graph.capture() as recording:
        other = threading.Thread(target=cpu_graph.call, args=(lambda *args: calls.append(args), 1))
        other.start()
        other.join()
        cpu_graph.call(lambda *args: calls.append(args), 2)
    assert calls == [(1,), (2,)] and [args for _, args in recording.calls] == [(2,)]


@pytest.mark.parametrize("op,work", [
    ("aten.add", lambda x: x + 1),
    ("aten.mul_", lambda x: x.mul_(2)),  # in place: its output is its input, still work
    ("aten.clone", lambda x: x.view(2, 2).t().contiguous()),
    ("aten.ones", lambda x: torch.ones(2)),
])
def test_capture_refuses_a_step_that_computes_with_torch(op, work):
    x = torch.ones(4)
    with pytest.raises(cpu_graph.NotCapturable, match=op), cpu_graph.capture():
        work(x)


def test_a_bucket_that_computes_with_torch_runs_eagerly():
    buffer = StepInputBuffer(max_batch=2, max_blocks_per_seq=4, block_size=16, device=torch.device("cpu"))
    kernel_calls = []

    def logits(inputs):
        out = torch.empty(inputs.input_ids.shape[0], 8)
        if out.shape[0] == 2:
            out.zero_()  # torch work: not recordable
        cpu_graph.call(lambda ptr: kernel_calls.append(ptr), out)
        return out

    def step(mode, inputs):
        return logits(inputs), torch.zeros(inputs.input_ids.shape[0], dtype=torch.int64)

    runner = GraphRunner(step, logits, torch.Tensor.float, "cpugraph", torch.device("cpu"), [1, 2], buffer.bucket, [4])
    assert list(runner._cpu_graphs) == [1]
    assert runner.cpu_replay == {"python": [1], "eager": [2]}  # a Python callable: the loop of its calls replays
    captured = len(kernel_calls)
    with torch.inference_mode():
        runner.run(1, "greedy", 4)
        assert kernel_calls[-1] == kernel_calls[0] and len(kernel_calls) == captured + 1  # replayed
        logits_2, _ = runner.run(2, "greedy", 4)
    assert logits_2.shape == (2, 8) and len(kernel_calls) == captured + 2


@needs_c_kernels
def test_greedy_matches_transformers(tiny_checkpoint, references):
    engine = cpugraph_engine(tiny_checkpoint)
    results = generate(engine, PROMPTS, greedy(9))  # bucket 4: 3 rows and a padded lane
    assert [r.choices[0].token_ids for r in results] == references[:3]
    [single] = generate(engine, PROMPTS[1:2], greedy(9))  # bucket 1
    assert single.choices[0].token_ids == references[1]


@needs_c_kernels
def test_sequences_that_finish_and_join_keep_the_recorded_buffers(tiny_checkpoint, references):
    """Rows leave (bucket 4 -> 2 -> 1) and a new prompt joins mid-run: the replays read the new rows."""
    engine = cpugraph_engine(tiny_checkpoint)
    lengths = [3, 9, 5]
    streams = [engine.submit(p, greedy(n))[1] for p, n in zip(PROMPTS, lengths)]
    engine_step(engine, 5)
    late = engine.submit(list(range(2000, 2011)), greedy(9))[1]
    run(engine)
    got = [collect(s).choices[0].token_ids for s in [*streams, late]]
    assert got == [ref[:n] for ref, n in zip(references, [*lengths, 9])]


@needs_c_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quant", QUANTS)
def test_replay_gives_the_eager_tokens_and_logprobs(tiny_checkpoint, quant, dtype):
    """The replay calls the eager step's kernels with the same arguments: its logits are the eager ones."""
    params = greedy(6, logprobs=True, top_logprobs=3)
    outputs = []
    for engine in (cpugraph_engine(tiny_checkpoint, quant=quant, dtype=dtype),
                   load_engine(tiny_checkpoint, graph="none", max_batch=4, quant=quant, dtype=dtype)):
        outputs.append([(r.choices[0].token_ids, r.choices[0].logprobs) for r in generate(engine, PROMPTS, params)])
    assert outputs[0] == outputs[1]


@needs_c_kernels
def test_a_greedy_step_without_logprobs_leaves_the_fp32_logits_unwritten(tiny_checkpoint, monkeypatch):
    """bf16: the greedy recording a step without logprobs replays reads the LM head's logits as they are (no
    bf16_to_fp32 pass); a step where a row wants logprobs, or one resampled (penalties, logit biases), replays the
    widening too. The eager step's tokens either way, and its logprobs."""
    engine = cpugraph_engine(tiny_checkpoint, dtype="bfloat16")
    for bare, widened, _ in engine.runner.graphs._cpu_greedy.values():
        assert [fn.__name__ for fn, _ in bare.calls if fn.__name__ in ("bf16_to_fp32", "argmax_rows")] == [
            "argmax_rows"]
        assert [fn.__name__ for fn, _ in widened.calls][-2:] == ["bf16_to_fp32", "argmax_rows"]
    eager = load_engine(tiny_checkpoint, graph="none", max_batch=4, dtype="bfloat16")
    run_graph, logits = engine.runner.graphs.run, []

    def run(*args):
        out = run_graph(*args)
        logits.append(out[0])
        return out

    monkeypatch.setattr(engine.runner.graphs, "run", run)
    for params, bare in ((greedy(6), True), (greedy(6, logprobs=True, top_logprobs=2), False),
                         (greedy(6, presence_penalty=1.5), False), (greedy(6, logit_bias={17: 5.0}), False)):
        logits.clear()
        got, want = ([(r.choices[0].token_ids, r.choices[0].logprobs) for r in generate(e, PROMPTS, params)]
                     for e in (engine, eager))
        assert got == want
        assert {x is None for x in logits} == {bare}


@needs_c_kernels
def test_int8_matches_the_quantised_reference(tiny_checkpoint):
    hf = load_quantised_hf_model(tiny_checkpoint, "int8")
    results = generate(cpugraph_engine(tiny_checkpoint, quant="int8"), PROMPTS, greedy(6))
    assert [r.choices[0].token_ids for r in results] == [hf_greedy(hf, p, 6) for p in PROMPTS]


@needs_c_kernels
def test_rows_with_penalties_and_logit_bias_resample_the_replayed_logits(tiny_checkpoint, references):
    forced = 4242
    batch = [
        greedy(8),
        greedy(8, presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3),
        greedy(8, logit_bias={forced: 100.0}),
        SamplingParams(temperature=0.9, seed=3, max_tokens=8, ignore_eos=True, presence_penalty=1.0),
    ]
    prompts = PROMPTS + [PROMPTS[0]]
    graphed = generate_together(cpugraph_engine(tiny_checkpoint), prompts, batch)
    eager = generate_together(load_engine(tiny_checkpoint, graph="none", max_batch=4), prompts, batch)
    assert graphed == eager
    assert graphed[0] == references[0][:8] and graphed[2] == [forced] * 8
