"""One device step: inputs -> model (eager | torch.compile | CUDA graphs) -> sampled tokens.

Decode is static-shaped: the batch is padded to a bucket (1, 2, 4, 8, ...) and every input, the
sampling settings included, lives in one preallocated buffer of 4-byte words, so a step allocates
nothing on the host side, copies its inputs with one (non-blocking, pinned) transfer, and runs the
model and the sampler as one function that can be compiled or replayed from a CUDA graph.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from nanoqwen.config import ModelConfig
from nanoqwen.layers.metadata import AttentionMetadata
from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.sampler import MODES, Penalties, SamplingRows, sample, top_logprobs

if TYPE_CHECKING:  # annotations only: the engine package imports this module
    from nanoqwen.engine.request import SamplingParams
    from nanoqwen.engine.sequence import Sequence

log = logging.getLogger("nanoqwen")


@dataclass
class StepOutput:
    tokens: list[int]  # one per sequence
    logprobs: list[float] | None = None  # chosen token's logprob, when any sequence asked
    top_values: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None


class StepInputs(NamedTuple):
    """The static inputs of a decode step: views of one flat buffer of 4-byte words, a row of
    max_batch words per field, then the block tables. The same views exist over the pinned host
    staging buffer (numpy, written by the engine thread) and over its device copy (torch)."""

    input_ids: torch.Tensor  # [mb] int32
    positions: torch.Tensor  # [mb] int32
    slots: torch.Tensor  # [mb] int32 cache slot of the new token; -1 = padded lane
    context_lens: torch.Tensor  # [mb] int32
    top_k: torch.Tensor  # [mb] int32; <= 0 = off
    seed_keys: torch.Tensor  # [mb] 32-bit keys: uint32 on the host, their int32 bit patterns on the device
    steps: torch.Tensor  # [mb] int32 output index of the token being sampled
    temperature: torch.Tensor  # [mb] fp32
    top_p: torch.Tensor  # [mb] fp32
    min_p: torch.Tensor  # [mb] fp32
    block_tables: torch.Tensor  # [mb, max_blocks_per_seq] int32

    def sampling(self) -> SamplingRows:
        return SamplingRows(self.temperature, self.top_p, self.top_k, self.min_p, self.seed_keys, self.steps)


ROW_FIELDS = StepInputs._fields[:-1]
FIRST_SAMPLING_ROW = ROW_FIELDS.index("top_k")  # sampling rows come last: prefill uploads only those
FLOAT_FIELDS = ("temperature", "top_p", "min_p")


def step_input_views(words: torch.Tensor | np.ndarray, max_batch: int, width: int) -> StepInputs:
    host = isinstance(words, np.ndarray)
    rows = dict(zip(ROW_FIELDS, words[: len(ROW_FIELDS) * max_batch].reshape(len(ROW_FIELDS), max_batch)))
    for name in FLOAT_FIELDS:
        rows[name] = rows[name].view(np.float32 if host else torch.float32)
    if host:
        rows["seed_keys"] = rows["seed_keys"].view(np.uint32)
    return StepInputs(**rows, block_tables=words[len(ROW_FIELDS) * max_batch :].reshape(max_batch, width))


def sampling_mode(params: list[SamplingParams]) -> str:
    """The cheapest of sampler.MODES that serves every row."""
    sampled = [p for p in params if not p.greedy]
    if not sampled:
        return "greedy"
    return "filter" if any(p.filters for p in sampled) else "sample"


def batch_buckets(max_batch: int) -> list[int]:
    buckets = [1]
    while buckets[-1] < max_batch:
        buckets.append(min(buckets[-1] * 2, max_batch))
    return buckets


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        *,
        device: torch.device,
        dtype: torch.dtype,
        graph: str,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        num_blocks: int,
    ) -> None:
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = dtype
        self.graph = graph
        self.max_batch = max_batch
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.buckets = batch_buckets(max_batch)
        # CUDA stages a pageable source before a non-blocking copy returns; MPS may read it later,
        # after a temporary is freed (pytorch/pytorch#139550), so copies there block.
        self._non_blocking = device.type == "cuda"
        self._allocate_kv_cache()
        self._allocate_step_inputs()
        self._narrow_tables = model.kernels.decode_attention_gathers
        # (bucket, sampling mode) -> the graph and its output buffers (logits [bucket, V], tokens [bucket])
        self._graphs: dict[tuple[int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._compiled = None
        if graph == "compile":
            # CUDA: static shapes, each captured as a CUDA graph by reduce-overhead. CPU: automatic
            # dynamic shapes, so a new batch bucket or table width recompiles once into a dynamic
            # kernel instead of once per shape (a cold compile of Qwen3-0.6B takes minutes on 2 cores).
            cuda = device.type == "cuda"
            # One compile per (bucket, sampler mode, table width) on CUDA: past dynamo's default of 8
            # per function it would silently run the step eagerly.
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, 16 * len(self.buckets) * len(MODES))
            self._compiled = torch.compile(
                self._decode_step, mode="reduce-overhead" if cuda else None, dynamic=False if cuda else None,
                fullgraph=True,
            )
        elif graph == "cudagraph":
            self._capture_graphs()

    # -- memory ---------------------------------------------------------------------------
    def _allocate_kv_cache(self) -> None:
        c = self.config
        shape = (c.num_hidden_layers, self.num_blocks, self.block_size, c.num_key_value_heads, c.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = self.k_cache[i]
            layer.self_attn.v_cache = self.v_cache[i]

    def _allocate_step_inputs(self) -> None:
        mb, width = self.max_batch, self.max_blocks_per_seq
        size = len(ROW_FIELDS) * mb + mb * width
        pin = self.device.type == "cuda"
        self._host_words = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        on_host = self.device.type == "cpu"
        self._words = self._host_words if on_host else torch.zeros(size, dtype=torch.int32, device=self.device)
        self._host = step_input_views(self._host_words.numpy(), mb, width)
        self._inputs = step_input_views(self._words, mb, width)
        # Every row starts as a padded lane (what graph capture runs): no cache write, one null slot
        # read, greedy and unfiltered.
        self._host.slots[:] = -1
        self._host.context_lens[:] = 1
        self._host.top_p[:] = 1.0
        self._upload(0, size)
        self._row_tables: list[tuple[int, int] | None] = [None] * mb  # (allocation epoch, blocks) each row holds

    def _upload(self, start: int, end: int) -> None:
        """Host staging words [start, end) -> the device buffer, in one copy (non-blocking on CUDA)."""
        if self._words is not self._host_words:
            self._words[start:end].copy_(self._host_words[start:end], non_blocking=self._non_blocking)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=self._non_blocking)

    # -- decode ---------------------------------------------------------------------------
    def _decode_step(self, mode: str, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured or compiled unit: the model, then the sampler. -> (logits [B, V] fp32, tokens [B])."""
        meta = AttentionMetadata(
            prefill=False, slot_mapping=inputs.slots, block_tables=inputs.block_tables,
            context_lens=inputs.context_lens,
        )
        logits = self.model.compute_logits(self.model(inputs.input_ids, inputs.positions, meta))
        return logits, sample(logits, inputs.sampling(), mode)

    def _bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _table_width(self, max_len: int) -> int:
        """Block-table columns a step passes to attention.

        The Triton and CPU kernels read each row only up to its context length, so they get the
        full (static) width; the torch reference gathers every column it is given, so it gets the
        power of two that covers the longest sequence.
        """
        if not self._narrow_tables:
            return self.max_blocks_per_seq
        needed = -(-max_len // self.block_size)
        width = 4
        while width < needed:
            width *= 2
        return min(width, self.max_blocks_per_seq)

    def _bucket_inputs(self, bucket: int, width: int) -> StepInputs:
        rows = [t[:bucket] for t in self._inputs[:-1]]
        return StepInputs(*rows, block_tables=self._inputs.block_tables[:bucket, :width])

    def _stage_decode(self, seqs: list[Sequence], bucket: int) -> int:
        """Writes the model's inputs for `seqs`, padded to `bucket`, into the host staging; -> longest length."""
        h = self._host
        n = len(seqs)
        lengths = [len(seq) for seq in seqs]
        h.input_ids[:n] = [seq.token_ids[-1] for seq in seqs]
        h.positions[:n] = [length - 1 for length in lengths]
        h.slots[:n] = [
            seq.block_table[(length - 1) // self.block_size] * self.block_size + (length - 1) % self.block_size
            for seq, length in zip(seqs, lengths)
        ]
        h.context_lens[:n] = lengths
        for i, seq in enumerate(seqs):
            if self._row_tables[i] != (seq.alloc_epoch, len(seq.block_table)):
                h.block_tables[i, : len(seq.block_table)] = seq.block_table
                self._row_tables[i] = (seq.alloc_epoch, len(seq.block_table))
        # Padded lanes: write nothing, attend to one slot of the never-allocated block 0.
        h.input_ids[n:bucket] = 0
        h.positions[n:bucket] = 0
        h.slots[n:bucket] = -1
        h.context_lens[n:bucket] = 1
        h.block_tables[n:bucket, 0] = 0
        self._row_tables[n:bucket] = [None] * (bucket - n)
        return max(lengths)

    def _stage_sampling(self, seqs: list[Sequence], bucket: int) -> tuple[str, bool]:
        """Writes each row's sampling settings into the host staging; padded lanes are greedy.
        -> (the sampler mode that serves every row, whether any row is penalised)."""
        h = self._host
        n = len(seqs)
        params = [seq.request.params for seq in seqs]
        vocab = self.config.vocab_size
        h.temperature[:n] = [p.temperature for p in params]
        h.top_p[:n] = [p.top_p for p in params]
        h.top_k[:n] = [min(p.top_k, vocab) for p in params]
        h.min_p[:n] = [p.min_p for p in params]
        h.seed_keys[:n] = [seq.seed_key for seq in seqs]
        h.steps[:n] = [seq.num_output_tokens for seq in seqs]
        h.temperature[n:bucket] = 0.0
        h.top_p[n:bucket] = 1.0
        h.top_k[n:bucket] = 0
        h.min_p[n:bucket] = 0.0
        return sampling_mode(params), any(p.penalized for p in params)

    def decode(self, seqs: list[Sequence]) -> StepOutput:
        n = len(seqs)
        bucket = self._bucket(n)
        max_len = self._stage_decode(seqs, bucket)
        mode, penalized = self._stage_sampling(seqs, bucket)
        self._upload(0, len(ROW_FIELDS) * self.max_batch + bucket * self.max_blocks_per_seq)
        # Penalties need every row's token history: the step samples greedily (cheapest) and the
        # penalised distribution is sampled afterwards from its logits.
        step_mode = "greedy" if penalized else mode
        if self.graph == "cudagraph":
            graph, logits, tokens = self._graphs[bucket, step_mode]
            graph.replay()
        else:
            step = self._compiled or self._decode_step
            logits, tokens = step(step_mode, self._bucket_inputs(bucket, self._table_width(max_len)))
        logits, tokens = logits[:n], tokens[:n]
        if penalized:
            tokens = sample(logits, self._inputs.sampling()[:n], mode, self._penalties(seqs))
        return self._output(seqs, logits, tokens)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        pool = None
        width = self._table_width(self.max_blocks_per_seq * self.block_size)
        for bucket in reversed(self.buckets):  # the largest first: smaller ones reuse its pool memory
            inputs = self._bucket_inputs(bucket, width)
            for mode in MODES:
                self._decode_step(mode, inputs)  # warm-up: Triton compiles, the allocator grows
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits, tokens = self._decode_step(mode, inputs)
                pool = graph.pool()
                self._graphs[bucket, mode] = graph, logits, tokens
        torch.cuda.synchronize()

    # -- prefill --------------------------------------------------------------------------
    def prefill(self, seqs: list[Sequence]) -> StepOutput:
        ids, pos, slots, query_lens, context_lens = [], [], [], [], []
        for seq in seqs:
            start = seq.num_cached_tokens
            length = len(seq)
            ids += seq.token_ids[start:]
            pos += range(start, length)
            for p in range(start, length):
                slots.append(seq.block_table[p // self.block_size] * self.block_size + p % self.block_size)
            query_lens.append(length - start)
            context_lens.append(length)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.zeros(len(seqs), width, dtype=torch.int32)
        for i, seq in enumerate(seqs):
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
        meta = AttentionMetadata(
            prefill=True,
            slot_mapping=self._to_device(torch.tensor(slots, dtype=torch.int32)),
            block_tables=self._to_device(tables),
            context_lens=self._to_device(torch.tensor(context_lens, dtype=torch.int32)),
            query_lens=query_lens,
            context_lens_host=context_lens,
        )
        input_ids = self._to_device(torch.tensor(ids, dtype=torch.int32))
        positions = self._to_device(torch.tensor(pos, dtype=torch.int32))
        n = len(seqs)
        mode, penalized = self._stage_sampling(seqs, n)
        self._upload(FIRST_SAMPLING_ROW * self.max_batch, len(ROW_FIELDS) * self.max_batch)
        hidden = self.model(input_ids, positions, meta)
        last = self._to_device(torch.tensor(query_lens).cumsum(0).sub_(1))
        logits = self.model.compute_logits(hidden[last])
        penalties = self._penalties(seqs) if penalized else None
        tokens = sample(logits, self._inputs.sampling()[:n], mode, penalties)
        return self._output(seqs, logits, tokens)

    # -- sampling -------------------------------------------------------------------------
    def _penalties(self, seqs: list[Sequence]) -> Penalties:
        """Every row's token history as counts and a seen-mask, built on the device from the ids."""
        params = [seq.request.params for seq in seqs]
        vocab = self.config.vocab_size
        longest = max(len(seq) for seq in seqs)
        # Column `vocab` is where the padding lands; it is cut off below.
        history = np.full((len(seqs), longest), vocab, dtype=np.int64)
        generated = np.zeros((len(seqs), longest), dtype=np.float32)
        for i, seq in enumerate(seqs):
            history[i, : len(seq)] = seq.token_ids
            generated[i, seq.num_prompt_tokens : len(seq)] = 1.0
        dev = self.device
        history_dev = self._to_device(torch.from_numpy(history))
        counts = torch.zeros(len(seqs), vocab + 1, dtype=torch.float32, device=dev)
        counts.scatter_add_(1, history_dev, self._to_device(torch.from_numpy(generated)))
        seen = torch.zeros(len(seqs), vocab + 1, dtype=torch.bool, device=dev)
        seen.scatter_(1, history_dev, True)

        def column(values: list[float]) -> torch.Tensor:
            return self._to_device(torch.tensor(values, dtype=torch.float32))

        return Penalties(
            presence=column([p.presence_penalty for p in params]),
            frequency=column([p.frequency_penalty for p in params]),
            repetition=column([p.repetition_penalty for p in params]),
            output_counts=counts[:, :vocab],
            seen=seen[:, :vocab],
        )

    def _output(self, seqs: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> StepOutput:
        want = [s.request.params for s in seqs if s.request.params.logprobs]
        if not want:
            return StepOutput(tokens=tokens.tolist())
        k = max(p.top_logprobs for p in want)
        chosen, values, ids = top_logprobs(logits, tokens, k)
        return StepOutput(
            tokens=tokens.tolist(), logprobs=chosen.tolist(), top_values=values.tolist(), top_ids=ids.tolist()
        )
