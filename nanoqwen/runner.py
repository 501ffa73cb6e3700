"""One device step: inputs -> model (eager | torch.compile | CUDA graphs) -> sampled tokens.

Decode is static-shaped: the batch is padded to a bucket (1, 2, 4, 8, ...) and every input lives
in one preallocated int32 buffer, so a step allocates nothing on the host side, copies its inputs
with one (non-blocking, pinned) transfer, and can be replayed from a CUDA graph.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import ops
from nanoqwen.config import ModelConfig
from nanoqwen.engine.sequence import Sequence
from nanoqwen.layers.metadata import AttentionMetadata
from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.sampler import SamplingBatch, sample, top_logprobs

log = logging.getLogger("nanoqwen")


@dataclass
class StepOutput:
    tokens: list[int]  # one per sequence
    logprobs: list[float] | None = None  # chosen token's logprob, when any sequence asked
    top_values: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None


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
        self._allocate_kv_cache()
        self._allocate_decode_inputs()
        c = self.config
        query = torch.empty(1, c.num_attention_heads, c.head_dim, dtype=dtype, device=device)
        self._narrow_tables = ops.decode_attention_gathers(query, self.k_cache[0])
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._compiled = None
        if graph == "compile":
            # CUDA: static shapes, each captured as a CUDA graph by reduce-overhead. CPU: automatic
            # dynamic shapes, so a new batch bucket or table width recompiles once into a dynamic
            # kernel instead of once per shape (a cold compile of Qwen3-0.6B takes minutes on 2 cores).
            cuda = device.type == "cuda"
            self._compiled = torch.compile(
                self._decode_forward, mode="reduce-overhead" if cuda else None, dynamic=False if cuda else None,
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

    def _allocate_decode_inputs(self) -> None:
        # One int32 buffer: rows [ids, positions, slots, context lens] of length max_batch,
        # then the [max_batch, max_blocks_per_seq] block tables, so that a bucket's inputs are a
        # prefix of it and travel in one copy.
        mb, width = self.max_batch, self.max_blocks_per_seq
        size = 4 * mb + mb * width
        pin = self.device.type == "cuda"
        self._host_inputs = torch.zeros(size, dtype=torch.int32, pin_memory=pin)
        self._inputs = self._host_inputs if self.device.type == "cpu" else torch.zeros(size, dtype=torch.int32, device=self.device)
        self._host_views = self._views(self._host_inputs.numpy())
        self._row_tables: list[tuple[int, int] | None] = [None] * mb  # (allocation epoch, blocks) each row holds
        self._views_dev = self._views(self._inputs)
        vocab = self.config.vocab_size
        self._logits = torch.zeros(mb, vocab, dtype=torch.float32, device=self.device)

    def _views(self, buf):  # works on the torch buffer and on its numpy view
        mb = self.max_batch
        rows = buf[: 4 * mb].reshape(4, mb)
        tables = buf[4 * mb :].reshape(mb, self.max_blocks_per_seq)
        return rows[0], rows[1], rows[2], rows[3], tables

    # -- decode ---------------------------------------------------------------------------
    def _decode_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        context_lens: torch.Tensor, block_tables: torch.Tensor,
    ) -> torch.Tensor:
        meta = AttentionMetadata(prefill=False, slot_mapping=slots, block_tables=block_tables, context_lens=context_lens)
        hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden)

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

    def decode(self, seqs: list[Sequence]) -> StepOutput:
        n = len(seqs)
        bucket = self._bucket(n)
        ids, pos, slots, ctx, tables = self._host_views
        max_len = 0
        for i, seq in enumerate(seqs):
            length = len(seq)
            ids[i] = seq.token_ids[-1]
            pos[i] = length - 1
            slots[i] = seq.block_table[(length - 1) // self.block_size] * self.block_size + (length - 1) % self.block_size
            ctx[i] = length
            if self._row_tables[i] != (seq.alloc_epoch, len(seq.block_table)):
                tables[i, : len(seq.block_table)] = seq.block_table
                self._row_tables[i] = (seq.alloc_epoch, len(seq.block_table))
            max_len = max(max_len, length)
        # Padded lanes: write nothing, attend to one slot of the never-allocated block 0.
        ids[n:bucket] = 0
        pos[n:bucket] = 0
        slots[n:bucket] = -1
        ctx[n:bucket] = 1
        tables[n:bucket, 0] = 0
        self._row_tables[n:bucket] = [None] * (bucket - n)
        if self._inputs is not self._host_inputs:
            used = 4 * self.max_batch + bucket * self.max_blocks_per_seq
            self._inputs[:used].copy_(self._host_inputs[:used], non_blocking=True)
        width = self._table_width(max_len)
        d_ids, d_pos, d_slots, d_ctx, d_tables = self._views_dev
        args = (d_ids[:bucket], d_pos[:bucket], d_slots[:bucket], d_ctx[:bucket], d_tables[:bucket, :width])
        if self.graph == "cudagraph":
            self._graphs[bucket].replay()
            logits = self._logits[:n]
        elif self._compiled is not None:
            logits = self._compiled(*args)[:n]
        else:
            logits = self._decode_forward(*args)[:n]
        return self._sample(logits, seqs)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        pool = None
        d_ids, d_pos, d_slots, d_ctx, d_tables = self._views_dev
        d_slots.fill_(-1)
        d_ctx.fill_(1)
        for bucket in reversed(self.buckets):
            width = self._table_width(self.max_blocks_per_seq * self.block_size)
            args = (d_ids[:bucket], d_pos[:bucket], d_slots[:bucket], d_ctx[:bucket], d_tables[:bucket, :width])
            self._logits[:bucket] = self._decode_forward(*args)  # warm-up: Triton autotune, allocator
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[:bucket] = self._decode_forward(*args)
            pool = graph.pool()
            self._graphs[bucket] = graph
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
        dev = self.device
        meta = AttentionMetadata(
            prefill=True,
            slot_mapping=torch.tensor(slots, dtype=torch.int32).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            context_lens=torch.tensor(context_lens, dtype=torch.int32).to(dev, non_blocking=True),
            query_lens=query_lens,
            context_lens_host=context_lens,
        )
        input_ids = torch.tensor(ids, dtype=torch.int32).to(dev, non_blocking=True)
        positions = torch.tensor(pos, dtype=torch.int32).to(dev, non_blocking=True)
        hidden = self.model(input_ids, positions, meta)
        last = torch.tensor(query_lens).cumsum(0).sub_(1).to(dev)
        logits = self.model.compute_logits(hidden[last])
        return self._sample(logits, seqs)

    # -- sampling -------------------------------------------------------------------------
    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        params = [s.request.params for s in seqs]
        dev = self.device

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        batch = SamplingBatch(
            temperature=column([p.temperature for p in params], torch.float32),
            top_p=column([p.top_p for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.int64),
            min_p=column([p.min_p for p in params], torch.float32),
            keys=column([s.seed_key for s in seqs], torch.int64),
            steps=column([s.num_output_tokens for s in seqs], torch.int64),
            all_greedy=all(p.temperature == 0 for p in params),
            needs_filter=any(p.top_p < 1 or p.top_k > 0 or p.min_p > 0 for p in params),
        )
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 for p in params):
            vocab = self.config.vocab_size
            counts = torch.zeros(len(seqs), vocab, dtype=torch.float32)
            seen = torch.zeros(len(seqs), vocab, dtype=torch.bool)
            for i, seq in enumerate(seqs):
                out = torch.tensor(seq.output_ids, dtype=torch.int64)
                counts[i].index_add_(0, out, torch.ones(len(out)))
                seen[i, torch.tensor(seq.token_ids, dtype=torch.int64)] = True
            batch.output_counts = counts.to(dev, non_blocking=True)
            batch.seen_mask = seen.to(dev, non_blocking=True)
            batch.presence = column([p.presence_penalty for p in params], torch.float32)
            batch.frequency = column([p.frequency_penalty for p in params], torch.float32)
            batch.repetition = column([p.repetition_penalty for p in params], torch.float32)
        return batch

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> StepOutput:
        tokens = sample(logits, self._sampling_batch(seqs))
        want = [s.request.params for s in seqs if s.request.params.logprobs]
        if not want:
            return StepOutput(tokens=tokens.tolist())
        k = max(p.top_logprobs for p in want)
        chosen, values, ids = top_logprobs(logits, tokens, k)
        return StepOutput(
            tokens=tokens.tolist(), logprobs=chosen.tolist(), top_values=values.tolist(), top_ids=ids.tolist()
        )
