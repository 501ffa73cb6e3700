"""How the decode step runs: eagerly, through torch.compile, or replayed from CUDA graphs captured
once per (batch bucket, sampler mode), mini-sglang's graph runner in small."""
from __future__ import annotations

from collections.abc import Callable

import torch

from nanoqwen.runner.inputs import StepInputs
from nanoqwen.sampler import MODES

# (sampler mode, inputs) -> (logits [B, V] fp32, tokens [B])
DecodeStep = Callable[[str, StepInputs], tuple[torch.Tensor, torch.Tensor]]


class GraphRunner:
    def __init__(self, step: DecodeStep, graph: str, device: torch.device, buckets: list[int],
                 inputs: Callable[[int, int], StepInputs], capture_width: int) -> None:
        """`inputs(bucket, width)` -> the static inputs of `bucket` rows with `width` block-table
        columns; CUDA graphs are captured over `capture_width` columns."""
        self.graph = graph
        self._step = step
        self._inputs = inputs
        # (bucket, sampling mode) -> the graph and its output buffers (logits [bucket, V], tokens [bucket])
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
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

    def run(self, bucket: int, mode: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step over the staged inputs of `bucket` rows and `width` table columns (a
        replay reads the captured width). -> (logits [bucket, V], tokens [bucket])."""
        if self.graph == "cudagraph":
            graph, logits, tokens = self._graphs[bucket, mode]
            graph.replay()
            return logits, tokens
        return self._step(mode, self._inputs(bucket, width))
