"""The model's inputs for a step.

Every decode input, the sampling settings included, lives in one preallocated buffer of 4-byte words,
so a step allocates nothing on the host side and copies its inputs with one (non-blocking, pinned)
transfer. Where a graph replays the step, torch.compile specialises on its shape or a GPU runs it, the
batch is padded to a bucket (1, 2, 4, 8, ...); an eager CPU step runs its own rows (ModelRunner.step_rows). A step
with prefill chunks packs every row's new tokens (a decode row's one) into one flat batch, built
per step; its sampling settings (a verify step's: one per position) have a static staging of their own.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from nanoqwen.layers.metadata import AttentionMetadata
from nanoqwen.sampler import SamplingRows

if TYPE_CHECKING:  # annotations only: the engine package imports the runner
    from nanoqwen.engine.sequence import Sequence


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

    def sampling_rows(self) -> SamplingRows:
        """Every row's sampling settings, as the sampler takes them."""
        return _sampling_rows(self._asdict())


ROW_FIELDS = StepInputs._fields[:-1]
SAMPLING_FIELDS = ROW_FIELDS[ROW_FIELDS.index("top_k"):]  # a packed step's run of words: StepInputs declares them last
FLOAT_FIELDS = ("temperature", "top_p", "min_p")
# SamplingRows' fields -> the step inputs' (by name: two fp32 fields swapped would go unnoticed)
SAMPLING_ROWS = {name: name for name in ("temperature", "top_p", "top_k", "min_p", "steps")} | {"keys": "seed_keys"}


def _field_views(words: torch.Tensor | np.ndarray, fields: tuple[str, ...], rows: int) -> dict:
    """`fields` as consecutive runs of `rows` words from words[0]: the float ones as fp32, the seed keys uint32 on
    the host."""
    host = isinstance(words, np.ndarray)
    views = dict(zip(fields, words[: len(fields) * rows].reshape(len(fields), rows)))
    for name in FLOAT_FIELDS:
        views[name] = views[name].view(np.float32 if host else torch.float32)
    if host:
        views["seed_keys"] = views["seed_keys"].view(np.uint32)
    return views


def _sampling_rows(fields: dict) -> SamplingRows:
    return SamplingRows(**{row: fields[name] for row, name in SAMPLING_ROWS.items()})


def step_input_views(words: torch.Tensor | np.ndarray, max_batch: int, width: int) -> StepInputs:
    return StepInputs(**_field_views(words, ROW_FIELDS, max_batch),
                      block_tables=words[len(ROW_FIELDS) * max_batch :].reshape(max_batch, width))


def batch_buckets(max_batch: int) -> list[int]:
    buckets = [1]
    while buckets[-1] < max_batch:
        buckets.append(min(buckets[-1] * 2, max_batch))
    return buckets


def slot(seq: Sequence, position: int, block_size: int) -> int:
    """The KV cache slot of `seq`'s token at `position`."""
    return seq.block_table[position // block_size] * block_size + position % block_size


class StepInputBuffer:
    """The host staging words and their device copy (the same tensor on the CPU), with StepInputs
    views over both: `host` is written by the engine thread, `device` is what the step reads.
    Apart, a packed step's sampling settings: up to `packed_rows` positions (every drafting row's)."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, block_size: int, device: torch.device,
                 packed_rows: int | None = None) -> None:
        self.max_batch = max_batch
        self.width = max_blocks_per_seq
        self.block_size = block_size
        self.device = device
        # CUDA stages a pageable source before a non-blocking copy returns; MPS may read it later,
        # after a temporary is freed (pytorch/pytorch#139550), so copies there block.
        self.non_blocking = device.type == "cuda"
        size = len(ROW_FIELDS) * max_batch + max_batch * max_blocks_per_seq
        self._host_words, self._words = self._staging(size)
        self.host = step_input_views(self._host_words.numpy(), max_batch, max_blocks_per_seq)
        self.device_views = step_input_views(self._words, max_batch, max_blocks_per_seq)
        # Made once: a decode step stages its sampling settings through the host's, and samples from the device's.
        self.host_sampling = self.host.sampling_rows()
        self._device_sampling = self.device_views.sampling_rows()
        # The device views of each size a step has run, (rows, table columns) and rows: made on its first step and
        # looked up after, so that a step builds no views (an eager CPU step runs any row count, unpadded).
        self._buckets: dict[tuple[int, int], StepInputs] = {}
        self._device_sampling_by_rows: dict[int, SamplingRows] = {}
        # A packed step stages n words per field, so that one copy of its first 6n words uploads them.
        self._packed_host, self._packed = self._staging(len(SAMPLING_FIELDS) * (packed_rows or max_batch))
        # Every row starts as a padded lane (what graph capture runs): no cache write, one null slot
        # read, greedy and unfiltered.
        self.host.slots[:] = -1
        self.host.context_lens[:] = 1
        self.host.top_p[:] = 1.0
        self.upload(0, size)
        self._row_tables: list[tuple[int, int] | None] = [None] * max_batch  # (allocation epoch, blocks) each row holds

    def _staging(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`size` words of host staging (pinned for CUDA) and their device copy: the same tensor on the CPU."""
        host = torch.zeros(size, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        return host, host if self.device.type == "cpu" else torch.zeros(size, dtype=torch.int32, device=self.device)

    def _copy(self, device: torch.Tensor, host: torch.Tensor, start: int, end: int) -> None:
        if device is not host:
            device[start:end].copy_(host[start:end], non_blocking=self.non_blocking)

    def upload(self, start: int, end: int) -> None:
        """Host staging words [start, end) -> the device buffer, in one copy (non-blocking on CUDA)."""
        self._copy(self._words, self._host_words, start, end)

    def upload_decode(self, bucket: int) -> None:
        """Every row field, and the block tables of the bucket's rows."""
        self.upload(0, len(ROW_FIELDS) * self.max_batch + bucket * self.width)

    def packed_sampling_host(self, n: int) -> SamplingRows:
        """The host staging of a packed step's `n` sampling positions."""
        return _sampling_rows(_field_views(self._packed_host.numpy(), SAMPLING_FIELDS, n))

    def upload_packed_sampling(self, n: int) -> SamplingRows:
        """A packed step's `n` staged sampling positions -> the device, in one copy; their device views."""
        self._copy(self._packed, self._packed_host, 0, len(SAMPLING_FIELDS) * n)
        return _sampling_rows(_field_views(self._packed, SAMPLING_FIELDS, n))

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        return host.to(self.device, non_blocking=self.non_blocking)

    def bucket(self, bucket: int, width: int) -> StepInputs:
        """The device views of the first `bucket` rows, with `width` block-table columns (made once per size)."""
        views = self._buckets.get((bucket, width))
        if views is None:
            inputs = self.device_views
            views = StepInputs(*[t[:bucket] for t in inputs[:-1]], block_tables=inputs.block_tables[:bucket, :width])
            self._buckets[bucket, width] = views
        return views

    def device_sampling(self, rows: int) -> SamplingRows:
        """The device sampling settings of a decode step's first `rows` rows (made once per row count)."""
        views = self._device_sampling_by_rows.get(rows)
        if views is None:
            views = self._device_sampling_by_rows[rows] = self._device_sampling[:rows]
        return views

    def stage_decode(self, seqs: list[Sequence], bucket: int) -> int:
        """Writes the model's inputs for `seqs`, padded to `bucket`, into the host staging; -> longest length.
        A drafting sequence fills a row per position, its last token's then each draft's, each attending to
        the positions up to its own: a verify step is a decode step over its positions."""
        h = self.host
        rows = [(seq, p) for seq in seqs for p in range(len(seq) - 1, len(seq) + len(seq.draft_ids))]
        n = len(rows)
        h.input_ids[:n] = [t for seq in seqs for t in (seq.token_ids[-1], *seq.draft_ids)]
        h.positions[:n] = [p for _, p in rows]
        h.slots[:n] = [slot(seq, p, self.block_size) for seq, p in rows]
        h.context_lens[:n] = h.positions[:n] + 1
        for i, (seq, _) in enumerate(rows):
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
        return max(p for _, p in rows) + 1


class PrefillInputs(NamedTuple):
    input_ids: torch.Tensor  # [T] int32: every row's new tokens, packed
    positions: torch.Tensor  # [T] int32
    meta: AttentionMetadata
    last: torch.Tensor  # [S] int64: the positions in the packed batch that sample (a row's last; a drafting row's all)


def prefill_inputs(rows: list[tuple[Sequence, int]], buffer: StepInputBuffer) -> PrefillInputs:
    """Each row's next `n` uncomputed tokens, after its computed (cached or earlier-chunk) ones; a
    drafting row's run on into its drafts."""
    block_size = buffer.block_size
    ids, pos, slots, query_lens, context_lens, last = [], [], [], [], [], []
    for seq, n in rows:
        start = seq.num_computed_tokens
        end = start + n
        ids += seq.token_ids[start:end] + seq.draft_ids[: max(0, end - len(seq))]
        pos += range(start, end)
        slots += [slot(seq, p, block_size) for p in range(start, end)]
        query_lens.append(n)
        context_lens.append(end)
        if end >= len(seq):
            last += range(len(ids) - 1 - (end - len(seq)), len(ids))
    width = max(len(seq.block_table) for seq, _ in rows)
    tables = torch.zeros(len(rows), width, dtype=torch.int32)
    for i, (seq, _) in enumerate(rows):
        tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table, dtype=torch.int32)
    to_device = buffer.to_device
    meta = AttentionMetadata(
        prefill=True,
        slot_mapping=to_device(torch.tensor(slots, dtype=torch.int32)),
        block_tables=to_device(tables),
        context_lens=to_device(torch.tensor(context_lens, dtype=torch.int32)),
        query_lens=query_lens,
        context_lens_host=context_lens,
    )
    return PrefillInputs(
        input_ids=to_device(torch.tensor(ids, dtype=torch.int32)),
        positions=to_device(torch.tensor(pos, dtype=torch.int32)),
        meta=meta,
        last=to_device(torch.tensor(last, dtype=torch.int64)),
    )
