"""How the decode step runs: eagerly, through torch.compile, replayed from CUDA graphs captured
once per (batch bucket, sampler mode), mini-sglang's graph runner in small, or on the CPU replayed
from the C kernel calls recorded once per batch bucket (ops/cpu/graph.py), the sampler after them."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from nanoqwen.runner.inputs import StepInputs
from nanoqwen.sampler import MODES, SamplingRows, sample
from ops.cpu import graph as cpu_graph
from ops.cpu.build import profiled

log = logging.getLogger("nanoqwen")

# (sampler mode, inputs) -> (logits [B, V] fp32, tokens [B])
DecodeStep = Callable[[str, StepInputs], tuple[torch.Tensor, torch.Tensor]]
# inputs -> the LM head's logits [B, V] in the model's dtype: the decode step without their widening to fp32 and the
# sampler
DecodeHead = Callable[[StepInputs], torch.Tensor]


class GraphRunner:
    def __init__(self, step: DecodeStep, head: DecodeHead, widen: Callable[[torch.Tensor], torch.Tensor], graph: str,
                 device: torch.device, buckets: list[int], inputs: Callable[[int, int], StepInputs],
                 widths: list[int]) -> None:
        """`step` = `head`, `widen` (the logits to fp32), then the sampler. `inputs(bucket, width)` -> the static
        inputs of `bucket` rows with `width` block-table columns; `widths`: those a step passes, ascending. Graphs are
        captured over the widest; torch.compile compiles what every (bucket, width, sampler mode) needs here, at
        load."""
        self.graph = graph
        self.compiles = 0  # torch.compile's graphs of the step: the load's, and any a request's step made after it
        self._step = step
        self._head = head
        self._widen = widen
        self._inputs = inputs
        # (bucket, sampling mode) -> the graph and its output buffers (logits [bucket, V], tokens [bucket])
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # bucket -> the recorded C calls, their logits [bucket, V] and the sampling settings of the static inputs
        self._cpu_graphs: dict[int, tuple[cpu_graph.Recording, torch.Tensor, SamplingRows]] = {}
        # bucket -> the greedy step recorded whole (the head's calls, then the argmax's; after the weights streamed
        # through the caches the sampler's Python alone took 0.15 ms a step), the same with the logits' widening, and
        # its tokens [bucket]: the argmax reads the head's logits as they are, so a step whose rows want no logprobs
        # skips the fp32 copy (at batch 8 a pass writing 4.9 MB)
        self._cpu_greedy: dict[int, tuple[cpu_graph.Recording, cpu_graph.Recording, torch.Tensor]] = {}
        # cpugraph: how each bucket's step runs, way -> buckets (_capture_cpu); None in another graph mode
        self.cpu_replay: dict[str, list[int]] | None = None
        self._loaded = False  # past the load: a compile now is one a request waits for
        if graph == "compile":
            cuda = device.type == "cuda"
            # One compile per (bucket, sampler mode, table width) on CUDA: past dynamo's limits (8 a function, 256
            # in all by default) it would silently run the step eagerly. 16 times that: engines loaded one after
            # another in one process (the tests') share the step's code object, and its count.
            config = torch._dynamo.config
            variants = 16 * len(buckets) * len(widths) * len(MODES)
            config.recompile_limit = max(config.recompile_limit, variants)
            config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, variants)
            self._step = torch.compile(
                step, mode="reduce-overhead" if cuda else None, dynamic=False if cuda else None, fullgraph=True,
            )
            # dynamo's counts (its graphs compiled in this process among them), imported once, here: the CPU
            # graphs' servers never load dynamo (tests/test_memory.py)
            from torch._dynamo.utils import counters

            self._dynamo_counters = counters
            self._compile(buckets, widths, cuda)
        elif graph == "cudagraph":
            self._capture(buckets, widths[-1])
        elif graph == "cpugraph":
            self._capture_cpu(buckets, widths[-1])
        self._loaded = True

    @torch.inference_mode()
    def _compile(self, buckets: list[int], widths: list[int], cuda: bool) -> None:
        """Runs the compiled step of every bucket, table width and sampler mode (an argument the trace specialises
        on), so that each compiles now, before the server is ready, not in a request's time (43-58 s each on 2 Zen 3
        cores: profiles/RESULTS.md, "hunt10"). CUDA: static shapes, each run twice, since reduce-overhead's CUDA
        graph trees run a new function eagerly at its first call and capture its graph at the second. The CPU: the
        rows and the width are marked dynamic from the first compile, so that a mode compiles twice, one row then any
        more (dynamo specialises a size of 1), not once per shape."""
        for bucket in buckets:
            for width in widths:
                inputs = self._inputs(bucket, width)
                if not cuda:
                    _mark_dynamic(inputs, rows=bucket > 1, width=len(widths) > 1)
                for mode in MODES:
                    for _ in range(2 if cuda else 1):
                        self._compiled(mode, inputs)

    def _compiled(self, mode: str, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled step, counting the graphs it compiled (one after the load is a variant _compile missed)."""
        before = self._dynamo_counters["stats"]["unique_graphs"]
        out = self._step(mode, inputs)
        compiled = self._dynamo_counters["stats"]["unique_graphs"] - before
        if compiled:
            self.compiles += compiled
            if self._loaded:
                log.warning("torch.compile compiled the decode step in a request's time (%d rows, %d table "
                            "columns, sampler mode %s): a variant the load's warm-up missed", len(inputs.input_ids),
                            inputs.block_tables.shape[1], mode)
        return out

    @torch.inference_mode()
    def _capture(self, buckets: list[int], width: int) -> None:
        pool = None
        for bucket in reversed(buckets):  # the largest first: smaller ones reuse its pool memory
            inputs = self._inputs(bucket, width)
            for mode in MODES:
                self._step(mode, inputs)  # warm-up: Triton compiles, the allocator grows
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits, tokens = self._step(mode, inputs)
                pool = graph.pool()
                self._graphs[bucket, mode] = graph, logits, tokens
        torch.cuda.synchronize()

    @torch.inference_mode()
    def _capture_cpu(self, buckets: list[int], width: int) -> None:
        """One recording per bucket, whatever the sampler mode: the C kernels read the block tables only
        up to each row's context length, so the full width serves every step; where the greedy argmax
        is a C call, the greedy step whole twice: bare (a step no row wants the logits of, run(logits_wanted=False))
        and with the logits' widening. A bucket whose step computes with torch (more rows than a C linear takes)
        stays eager."""
        for bucket in buckets:
            inputs = self._inputs(bucket, width)
            try:
                with cpu_graph.capture() as head:
                    head_logits = self._head(inputs)
                with cpu_graph.capture() as widening:
                    logits = self._widen(head_logits)
            except cpu_graph.NotCapturable as exc:
                log.info("cpugraph: batch bucket %d runs eagerly: %s", bucket, exc)
                continue
            sampling = inputs.sampling_rows()
            self._cpu_graphs[bucket] = head + widening, logits, sampling
            try:
                with cpu_graph.capture() as argmax:
                    tokens = sample(head_logits, sampling, "greedy")
            except cpu_graph.NotCapturable:  # torch's argmax: the sampler runs after the replay
                continue
            self._cpu_greedy[bucket] = head + argmax, head + widening + argmax, tokens
        self.cpu_replay = {}
        for bucket in buckets:
            self.cpu_replay.setdefault(self._replay_way(bucket), []).append(bucket)

    def _replay_way(self, bucket: int) -> str:
        """How `bucket`'s step runs: "replay.c" where each of its recordings replays as one call into csrc/replay.c,
        the GIL released; "python" where one replays as a Python loop of its calls (ops/cpu/graph.py says when);
        "eager" where the step was not captured."""
        if not self.replays(bucket):
            return "eager"
        recordings = [self._cpu_graphs[bucket][0], *self._cpu_greedy.get(bucket, ())[:2]]
        return "replay.c" if all(r.packed is not None for r in recordings) else "python"

    def replays(self, bucket: int) -> bool:
        """Whether `bucket`'s step replays a CPU graph (no bucket past the C linears' row limit does)."""
        return bucket in self._cpu_graphs

    def run(self, bucket: int, mode: str, width: int,
            logits_wanted: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One decode step over the staged inputs of `bucket` rows and `width` table columns (a
        replay reads the captured width). -> (logits [bucket, V] fp32, tokens [bucket]); the logits may be None
        where not `logits_wanted` (a CPU graph's greedy step then leaves them unwritten)."""
        if self.graph == "cudagraph":
            graph, logits, tokens = self._graphs[bucket, mode]
            graph.replay()
            return logits, tokens
        if bucket in self._cpu_graphs:
            recording, logits, sampling = self._cpu_graphs[bucket]
            tokens = None
            if mode == "greedy" and bucket in self._cpu_greedy:
                bare, widened, tokens = self._cpu_greedy[bucket]
                recording, logits = (widened, logits) if logits_wanted else (bare, None)
            with profiled("nanoqwen::cpugraph_replay"):
                recording.replay()
            return logits, tokens if tokens is not None else sample(logits, sampling, mode)
        if self.graph == "compile":
            return self._compiled(mode, self._inputs(bucket, width))
        return self._step(mode, self._inputs(bucket, width))


def replay_text(cpu_replay: dict[str, list[int]] | None) -> str:
    """GraphRunner.cpu_replay in one word of the `ready:` log line: `replay.c:1,2,4;eager:8`."""
    if cpu_replay is None:
        return "None"
    return ";".join(f"{way}:{','.join(map(str, buckets))}" for way, buckets in cpu_replay.items())


def _mark_dynamic(inputs: StepInputs, rows: bool, width: bool) -> None:
    """Marks the rows of every input and the block tables' width dynamic for torch.compile's next trace; where the
    trace specialises one after all, the step compiles per size again (maybe_: no error), each at load."""
    for tensor in inputs if rows else ():
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    if width:
        torch._dynamo.maybe_mark_dynamic(inputs.block_tables, 1)
