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
# inputs -> logits [B, V] fp32: the decode step without its sampler
DecodeLogits = Callable[[StepInputs], torch.Tensor]


class GraphRunner:
    def __init__(self, step: DecodeStep, logits: DecodeLogits, graph: str, device: torch.device, buckets: list[int],
                 inputs: Callable[[int, int], StepInputs], capture_width: int) -> None:
        """`step` = `logits`, then the sampler. `inputs(bucket, width)` -> the static inputs of `bucket`
        rows with `width` block-table columns; graphs are captured over `capture_width` columns."""
        self.graph = graph
        self._step = step
        self._logits = logits
        self._inputs = inputs
        # (bucket, sampling mode) -> the graph and its output buffers (logits [bucket, V], tokens [bucket])
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # bucket -> the recorded C calls, their logits [bucket, V] and the sampling settings of the static inputs
        self._cpu_graphs: dict[int, tuple[cpu_graph.Recording, torch.Tensor, SamplingRows]] = {}
        # bucket -> the greedy step recorded whole (the logits' calls, then the argmax's) and its tokens [bucket]:
        # after the weights streamed through the caches the sampler's Python alone took 0.15 ms a step
        self._cpu_greedy: dict[int, tuple[cpu_graph.Recording, torch.Tensor]] = {}
        if graph == "compile":
            # CUDA: static shapes, each captured as a CUDA graph by reduce-overhead. CPU: automatic
            # dynamic shapes, so a new batch bucket or table width recompiles once into a dynamic
            # kernel instead of once per shape (a cold compile of Qwen3-0.6B takes minutes on 2 cores).
            cuda = device.type == "cuda"
            # One compile per (bucket, sampler mode, table width) on CUDA: past dynamo's default of 8
            # per function it would silently run the step eagerly.
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 16 * len(buckets) * len(MODES))
            self._step = torch.compile(
                step, mode="reduce-overhead" if cuda else None, dynamic=False if cuda else None, fullgraph=True,
            )
        elif graph == "cudagraph":
            self._capture(buckets, capture_width)
        elif graph == "cpugraph":
            self._capture_cpu(buckets, capture_width)

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
        is a C call, a second one of the greedy step whole. A bucket whose step computes with torch
        (more rows than a C linear takes) stays eager."""
        for bucket in buckets:
            inputs = self._inputs(bucket, width)
            try:
                with cpu_graph.capture() as recording:
                    logits = self._logits(inputs)
            except cpu_graph.NotCapturable as exc:
                log.info("cpugraph: batch bucket %d runs eagerly: %s", bucket, exc)
                continue
            sampling = inputs.sampling_rows()
            self._cpu_graphs[bucket] = recording, logits, sampling
            try:
                with cpu_graph.capture() as argmax:
                    tokens = sample(logits, sampling, "greedy")
            except cpu_graph.NotCapturable:  # torch's argmax: the sampler runs after the replay
                continue
            self._cpu_greedy[bucket] = recording + argmax, tokens

    def replays(self, bucket: int) -> bool:
        """Whether `bucket`'s step replays a CPU graph (no bucket past the C linears' row limit does)."""
        return bucket in self._cpu_graphs

    def run(self, bucket: int, mode: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step over the staged inputs of `bucket` rows and `width` table columns (a
        replay reads the captured width). -> (logits [bucket, V], tokens [bucket])."""
        if self.graph == "cudagraph":
            graph, logits, tokens = self._graphs[bucket, mode]
            graph.replay()
            return logits, tokens
        if bucket in self._cpu_graphs:
            recording, logits, sampling = self._cpu_graphs[bucket]
            tokens = None
            if mode == "greedy" and bucket in self._cpu_greedy:
                recording, tokens = self._cpu_greedy[bucket]
            with profiled("nanoqwen::cpugraph_replay"):
                recording.replay()
            return logits, tokens if tokens is not None else sample(logits, sampling, mode)
        return self._step(mode, self._inputs(bucket, width))
