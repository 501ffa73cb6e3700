"""The device steps in order: stage inputs, run the model (a step with prefill chunks eagerly, its
decode rows included; a decode-only step through the GraphRunner, a verify step too where it replays CPU
graphs or runs eagerly), sample, bring the tokens back. Owns the KV cache."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from nanoqwen.config import RuntimeConfig, blocks_for
from nanoqwen.layers.metadata import AttentionMetadata
from nanoqwen.model import Qwen3ForCausalLM
from nanoqwen.runner.graphs import GraphRunner
from nanoqwen.runner.inputs import StepInputBuffer, StepInputs, batch_buckets, prefill_inputs
from nanoqwen.runner.penalties import PenaltyBuilder
from nanoqwen.runner.prompt_logprobs import prefill_prompt_logprobs
from nanoqwen.runner.sampling import (
    LogitAdjuster,
    StepOutput,
    sampled_positions,
    stage_sampling,
    step_output,
    wants_logprobs,
)
from nanoqwen.sampler import reserve as reserve_sampler
from nanoqwen.sampler import sample

if TYPE_CHECKING:  # annotations only: the engine package imports the runner
    from nanoqwen.engine.scheduler import Batch
    from nanoqwen.engine.sequence import Sequence

# A verify step run as a decode step reads a sequence's keys once per position, the packed path's prefill
# attention once per sequence: past about this many (draft, context token) pairs in the step the extra reads
# cost more than the packed path's own overhead (profiles/RESULTS.md, "vgraph").
VERIFY_MAX_DRAFT_KEYS = 8192
# The token counts of the packed steps _warm_up runs. Triton compiles a variant per integer argument equal to 1, one
# divisible by 16 and any other; the weight-only linears' row count (a packed step's tokens or sampled rows) also
# picks the GEMV, unrolled over rows padded to 1, 2, 4 or 8 (ops/triton/gemv.py), or a tiling of 9 to 16 rows or
# of more (ops/triton/linear_int8.py). The other kernels take it as their grid, and launch one variant whatever the
# step (ops/triton/prefill_attention.py).
WARM_UP_TOKENS = (1, 2, 4, 8, 9, 16, 17, 32)


def decode_buckets(graph: str, device: torch.device, max_batch: int, verify_rows: int) -> list[int]:
    """The row counts a decode step pads its positions to; [] where it runs them as they are: eagerly on the CPU
    (graph none), where a padded row costs what a real one does. A graph replays one step per bucket and
    torch.compile specialises on each; on a GPU an eager step pads too, so that it runs the row counts, and with
    them the cuBLAS/Triton kernels (split-K included), of the graphed steps it equals token for token.
    `verify_rows` > 1: a verify step of up to that many positions a row runs as a decode step, so the buckets go up
    to max_batch × verify_rows, and one row's every size has its own (a padded row costs ~10% of a 1-row step
    bf16 and 10-45% int8 on the CPU: profiles/RESULTS.md, "vgraph")."""
    if graph == "none" and device.type == "cpu":
        return []
    buckets = set(batch_buckets(max_batch))
    if verify_rows > 1:
        buckets |= {*batch_buckets(max_batch * verify_rows), *range(1, verify_rows + 1)}
    return sorted(buckets)


class ModelRunner:
    def __init__(self, model: Qwen3ForCausalLM, runtime: RuntimeConfig) -> None:
        self.model = model
        self.config = model.config
        self.device = device = runtime.device
        self.dtype = runtime.dtype
        self.graph = runtime.graph
        self.max_batch = runtime.max_batch
        self.block_size = runtime.block_size
        self.num_blocks = runtime.num_kv_blocks
        self.max_blocks_per_seq = runtime.max_blocks_per_seq
        # A verify step runs and samples each row's token and drafts: up to max_batch × (1 + k) positions; the
        # positions of a sequence share its bitmask row.
        per_row = 1 + (runtime.speculative.num_speculative_tokens if runtime.speculative else 0)
        positions = self.max_batch * per_row
        # Without CUDA graphs or torch.compile (whose captures and compiles per bucket a GPU lane would size),
        # a verify step is a decode step over its positions: the static inputs have a row for each. Elsewhere
        # verify steps run packed and a decode step has max_batch rows.
        self.verify_as_decode = per_row > 1 and self.graph in ("none", "cpugraph")
        self.buckets = decode_buckets(self.graph, device, self.max_batch, per_row if self.verify_as_decode else 1)
        self._allocate_kv_cache()
        self.inputs = StepInputBuffer(positions if self.verify_as_decode else self.max_batch, self.max_blocks_per_seq,
                                      self.block_size, device, packed_rows=positions)
        self.adjuster = LogitAdjuster(self.max_batch, self.config.vocab_size, self.inputs.to_device)
        self.penalties = PenaltyBuilder(self.inputs.to_device)
        reserve_sampler(self.config.vocab_size, device)
        self._narrow_tables = model.kernels.decode_attention_gathers
        self.graphs = GraphRunner(self._decode_step, self._decode_head, model.kernels.to_fp32, self.graph, device,
                                  self.buckets, self._bucket_inputs, self._table_widths())
        if model.kernels.compiles_at_first_launch:
            self._warm_up()

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Runs every kernel variant a step launches, so that each compiles now rather than in a request's time (a
        0.7 s stall on the H200: profiles/RESULTS.md, "gpuchunk"): a packed step of each WARM_UP_TOKENS count, whose
        tokens write no cache and attend to the null block 0, and an eager decode step of each bucket (captured
        graphs and torch.compile, GraphRunner._compile, have run theirs). At load
        only: on `graph=none` it steps the static decode inputs, which hold no sequence only then."""
        device = self.device
        for n in WARM_UP_TOKENS:
            meta = AttentionMetadata(
                prefill=True, slot_mapping=torch.full((n,), -1, dtype=torch.int32, device=device),
                block_tables=torch.zeros(1, blocks_for(n, self.block_size), dtype=torch.int32, device=device),
                context_lens=torch.tensor([n], dtype=torch.int32, device=device), query_lens=[n], context_lens_host=[n],
            )
            positions = torch.zeros(n, dtype=torch.int32, device=device)  # within any rotary table
            self.model.compute_logits(self.model(torch.zeros_like(positions), positions, meta))
        if self.graph == "none":  # the static inputs are still padded lanes
            for bucket in self.buckets:
                self.graphs.run(bucket, "greedy", self._table_width(self.max_blocks_per_seq * self.block_size))

    def _allocate_kv_cache(self) -> None:
        c = self.config
        shape = (c.num_hidden_layers, self.num_blocks, self.block_size, c.num_key_value_heads, c.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.model.layers):
            layer.self_attn.k_cache = self.k_cache[i]
            layer.self_attn.v_cache = self.v_cache[i]

    # -- decode ---------------------------------------------------------------------------
    def _decode_step(self, mode: str, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The captured or compiled unit: the model, then the sampler. -> (logits [B, V] fp32, tokens [B])."""
        logits = self.model.compute_logits(self._decode_hidden(inputs))  # [B, V] fp32
        return logits, sample(logits, inputs.sampling_rows(), mode)

    def _decode_head(self, inputs: StepInputs) -> torch.Tensor:
        """The model's part of the step up to the LM head, what a CPU graph records before the logits' widening.
        -> logits [B, V] in the model's dtype."""
        return self.model.head_logits(self._decode_hidden(inputs))

    def _decode_hidden(self, inputs: StepInputs) -> torch.Tensor:
        meta = AttentionMetadata(
            prefill=False, slot_mapping=inputs.slots, block_tables=inputs.block_tables,
            context_lens=inputs.context_lens,
        )
        return self.model(inputs.input_ids, inputs.positions, meta)  # [B, H]

    def _table_width(self, max_len: int) -> int:
        """Block-table columns a step passes to attention.

        The Triton and CPU kernels read each row only up to its context length, so they get the
        full (static) width; the torch reference gathers every column it is given, so it gets the
        power of two that covers the longest sequence.
        """
        if not self._narrow_tables:
            return self.max_blocks_per_seq
        needed = blocks_for(max_len, self.block_size)
        width = 4
        while width < needed:
            width *= 2
        return min(width, self.max_blocks_per_seq)

    def _table_widths(self) -> list[int]:
        """Every width _table_width gives, ascending."""
        return sorted({self._table_width(blocks * self.block_size) for blocks in range(1, self.max_blocks_per_seq + 1)})

    def _bucket_inputs(self, bucket: int, width: int) -> StepInputs:
        return self.inputs.bucket(bucket, width)

    def decode(self, seqs: list[Sequence], bucket: int) -> StepOutput:
        """One token for each of `seqs`, their positions padded to `bucket` rows (step_rows); a drafting one's
        positions are rows of their own (stage_decode), each sampled with the output index it would have had
        without drafts. -> a token per position, in order."""
        rows, steps = sampled_positions(seqs)
        n = len(rows)
        adjusted = self.adjuster.start(rows)  # grammar masks fill on the mask thread while the step is staged and runs
        max_len = self.inputs.stage_decode(seqs, bucket)
        mode, penalized = stage_sampling(self.inputs.host_sampling, rows, bucket, self.config.vocab_size, steps)
        self.inputs.upload_decode(bucket)
        # Penalties need every row's token history, biases and grammar masks change per step: the
        # step samples greedily (cheapest) and the adjusted distribution is sampled afterwards from
        # its logits, every row with the same mode and noise as in the step.
        resample = penalized or adjusted
        logits, tokens = self.graphs.run(bucket, "greedy" if resample else mode, self._table_width(max_len),
                                         resample or wants_logprobs(rows))
        if n < bucket:  # two torch views, 20-45 µs cold after a replay (it streamed the weights): only where they cut
            logits, tokens = (None if logits is None else logits[:n]), tokens[:n]
        if resample:
            tokens = sample(logits, self.inputs.device_sampling(n), mode,
                            self.penalties.build(rows) if penalized else None,
                            self.adjuster.build() if adjusted else None)
        return step_output(rows, logits, tokens)

    # -- steps with prefill chunks -------------------------------------------------------
    def step(self, batch: Batch) -> StepOutput:
        """One step of the scheduler's batch -> a token for each of batch.sampled, in order (a drafting row:
        one for each of its positions), and the sequences whose grammar failed (their tokens to drop)."""
        bucket = self.step_rows(batch)
        output = self.prefill(batch.rows, batch.sampled) if bucket is None else self.decode(batch.decode, bucket)
        output.grammar_failed = self.adjuster.failed
        return output

    def step_rows(self, batch: Batch) -> int | None:
        """The rows `batch` runs as a decode step, None where it runs packed (prefill chunks; drafts a decode step
        does not take). Its positions pad to a bucket (decode_buckets) except where the CPU runs the step eagerly:
        graph none, or a cpugraph bucket that does not replay. On cpugraph a verify step runs only a bucket that
        replays: past the C linears' row limit the decode step would run its positions through torch's GEMMs,
        each reading its sequence's keys (the packed path reads them once per sequence)."""
        seqs, drafts = batch.decode, batch.num_drafts
        if batch.prefill or drafts and (not self.verify_as_decode
                                        or sum(len(seq.draft_ids) * len(seq) for seq in seqs) > VERIFY_MAX_DRAFT_KEYS):
            return None
        n = len(seqs) + drafts
        if not self.buckets:
            return n
        bucket = next(b for b in self.buckets if b >= n)
        if self.graph != "cpugraph" or self.graphs.replays(bucket):
            return bucket
        return None if drafts else n

    def prefill(self, rows: list[tuple[Sequence, int]], sampled: list[Sequence]) -> StepOutput:
        """Every row's next tokens as one packed batch (decode rows are one-token chunks, drafting rows
        their token and drafts), run eagerly. A drafting row samples at every position, each with the output
        index it would have had without drafts: the token the step would sample there if the drafts before
        it are accepted."""
        positions, steps = sampled_positions(sampled)
        adjusted = self.adjuster.start(positions)  # grammar masks fill on the mask thread while the model runs
        packed = prefill_inputs(rows, self.inputs)
        hidden = self.model(packed.input_ids, packed.positions, packed.meta)
        seqs = [seq for seq, _ in rows]
        prompt_logprobs = prefill_prompt_logprobs(self.model, hidden, seqs, [seq.num_computed_tokens for seq in seqs],
                                                  packed.meta.query_lens, self.inputs.to_device)
        n = len(positions)
        if not n:  # only chunks before a prompt's last: their k/v (and prompt scores) are the step's result
            return StepOutput(tokens=[], prompt_logprobs=prompt_logprobs)
        mode, penalized = stage_sampling(self.inputs.packed_sampling_host(n), positions, n, self.config.vocab_size,
                                         steps)
        sampling = self.inputs.upload_packed_sampling(n)
        logits = self.model.compute_logits(hidden[packed.last])
        tokens = sample(logits, sampling, mode, self.penalties.build(positions) if penalized else None,
                        self.adjuster.build() if adjusted else None)
        output = step_output(positions, logits, tokens)
        output.prompt_logprobs = prompt_logprobs
        return output
