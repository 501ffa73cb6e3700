"""Continuous batching: which sequences run this step, and how many of their tokens.

A running sequence with one uncomputed token decodes it; one with more is still prefilling (a
prompt, or prompt + output when recomputed after preemption). With a step token budget (chunked
prefill) every step first decodes every running sequence, then spends what is left of the budget
on prefill: sequences already part-way through their prompt first, then waiting ones. A prompt
that finishes within what is left goes whole: its client gets a first token this step. A longer
one is split across steps, and while streams decode, its chunks are paced by time: sized so that a
step carrying one takes `prefill_stall` decode-only steps longer than a step carrying the smallest
chunk (measured, ChunkPacer), so a long prompt slows the streams by no more than that. Without a
budget, waiting sequences are prefilled whole, alone in their step, as soon as they fit. When the
KV pool runs dry during decode, the newest running sequence is preempted: its blocks are freed and
it is recomputed later. With speculative decoding, decode rows then get drafts (engine/ngram.py) from
what the prefill left of the budget and of the free KV blocks: drafts never preempt anyone nor keep a
prompt waiting. A step with drafts is the streams' step: the pacer times a chunk that rides with drafts
against drafting steps, one without against steps without (ChunkPacer).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from nanoqwen.engine.block_manager import BlockManager
from nanoqwen.engine.pacing import ChunkPacer
from nanoqwen.engine.sequence import Sequence, Status


@dataclass
class Batch:
    """One step: every row runs its sequence's next `num_tokens` uncomputed tokens."""

    decode: list[Sequence] = field(default_factory=list)  # one token each, then its drafts
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)

    @property
    def rows(self) -> list[tuple[Sequence, int]]:
        return [(seq, 1 + len(seq.draft_ids)) for seq in self.decode] + self.prefill

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences whose rows reach their last token (a drafting row goes past it): each gets a new
        token, a drafting one a token at each of its positions, in row order."""
        return [seq for seq, n in self.rows if n >= seq.num_uncomputed_tokens]

    @property
    def num_drafts(self) -> int:
        return sum(len(seq.draft_ids) for seq in self.decode)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch: int, max_prefill_tokens: int,
                 max_step_tokens: int = 0, prefill_stall: float = 0.0,
                 propose: Callable[[Sequence, int], list[int]] | None = None) -> None:
        """max_step_tokens: the token budget of a step (decode tokens, drafts, prefill chunks); 0 = no
        chunking, whole prefills of up to max_prefill_tokens tokens. prefill_stall: with streams
        decoding, the time a chunk of an unfinished prompt may add to a step, in decode-only steps;
        0 = none of that pacing (chunks fill the budget). propose: (decoding sequence, most tokens) ->
        its drafts; None = no speculative decoding."""
        self.blocks = block_manager
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_step_tokens = max_step_tokens
        self.pacer = ChunkPacer(prefill_stall, max_step_tokens) if max_step_tokens and prefill_stall else None
        self._paced = 0  # tokens of the scheduled step's paced chunks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.propose = propose

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        """The next step; empty when nothing can run."""
        if not self.max_step_tokens:
            prefill = self._schedule_prefill(self.max_prefill_tokens, self.max_prefill_tokens, chunked=False)
            if prefill:
                return Batch(prefill=prefill)
            decode = self._schedule_decode()
            self._draft(decode, self.max_prefill_tokens)
            return Batch(decode=decode)
        decode = self._schedule_decode()
        budget = self.max_step_tokens - len(decode)
        prefill = self._schedule_prefill(budget, self._partial_budget(decode, budget), chunked=True)
        self._draft(decode, budget - sum(n for _, n in prefill))
        return Batch(decode, prefill)

    def _draft(self, decode: list[Sequence], budget: int) -> None:
        """Drafts for the decode rows, within `budget` tokens and the free blocks, once every row has
        the slot of its own token and the step's prefill its blocks (so no draft takes a block a row or
        a waiting prompt needed)."""
        if self.propose is None:
            return
        drafted = 0
        for seq in decode:
            drafts = self.propose(seq, budget - drafted)
            if drafts:
                seq.draft_ids = drafts[: self.blocks.extend(seq, len(seq) + len(drafts)) - len(seq)]
                drafted += len(seq.draft_ids)

    def observe(self, batch: Batch, seconds: float) -> None:
        """The wall time of the step last scheduled, once its tokens are back (its device work done)."""
        if self.pacer is not None:  # drafts are the streams' step: a chunk is paced against what that costs
            self.pacer.observe(len(batch.decode), sum(n for _, n in batch.prefill), self._paced, seconds,
                               batch.num_drafts)

    def _partial_budget(self, decode: list[Sequence], budget: int) -> int:
        """Tokens this step may spend on chunks that leave their prompt unfinished."""
        return budget if self.pacer is None or not decode else min(budget, self.pacer.tokens)

    def _schedule_decode(self) -> list[Sequence]:
        decode: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.num_uncomputed_tokens > 1:  # preempted below; prefilling
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.append_slot(seq)
                self.blocks.register_full_blocks(seq, len(seq))
                decode.append(seq)
        return decode

    def _schedule_prefill(self, budget: int, partial: int, chunked: bool) -> list[tuple[Sequence, int]]:
        """Chunks of part-prefilled sequences, then of newly admitted ones, within `budget` tokens,
        of which at most `partial` go to chunks that leave their prompt unfinished. A part-prefilled
        sequence always takes a paced chunk (its last one included); a new prompt goes whole if it
        fits what is left, else starts with a paced chunk. Unchunked, whole prompts only, the first
        one whatever its length."""
        prefill: list[tuple[Sequence, int]] = []
        allowed = partial
        for seq in self.running:
            if budget <= 0 or partial <= 0:
                break
            if seq.num_uncomputed_tokens > 1:
                n = self._add_chunk(prefill, seq, min(budget, partial))
                budget -= n
                partial -= n
        while budget > 0 and self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if self._sibling_prefilling(seq) or not self.blocks.can_allocate(seq):
                break
            new_tokens = len(seq) - len(self.blocks.lookup(seq)) * self.blocks.block_size
            if chunked:
                n = new_tokens if new_tokens <= budget else min(partial, budget)
            else:
                n = 0 if prefill and new_tokens > budget else new_tokens
            if n <= 0:
                break
            self.blocks.allocate(seq)
            seq.status = Status.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            n = self._add_chunk(prefill, seq, n)
            budget -= n
            if n < new_tokens:
                partial -= n
        self._paced = allowed - partial
        return prefill

    def _add_chunk(self, prefill: list[tuple[Sequence, int]], seq: Sequence, budget: int) -> int:
        n = min(budget, seq.num_uncomputed_tokens)
        self.blocks.register_full_blocks(seq, seq.num_computed_tokens + n)
        prefill.append((seq, n))
        return n

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """Whether another choice of the request has prompt blocks not yet scheduled: they become
        prefix-cache hits for this one once that choice's last chunk is scheduled, so it waits for
        that rather than computing them again."""
        if not self.blocks.enable_prefix_caching:
            return False
        full_blocks = (seq.num_prompt_tokens - 1) // self.blocks.block_size
        return any(s.status is Status.RUNNING and len(s.block_hashes) < full_blocks for s in seq.request.sequences)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Removes a sequence (finished or aborted) wherever it is and frees its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
