"""Continuous batching: which sequences run this step, prefill or decode.

Waiting sequences are prefilled as soon as they fit; otherwise every running sequence decodes one
token (lock-step). When the KV pool runs dry during decode, the newest running sequence is
preempted: its blocks are freed and it is recomputed (prompt + output so far) later.
"""
from __future__ import annotations

from collections import deque

from nanoqwen.engine.block_manager import BlockManager
from nanoqwen.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch: int, max_prefill_tokens: int) -> None:
        self.blocks = block_manager
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """(sequences, is_prefill) for the next step; empty when nothing can run."""
        prefill: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            new_tokens = len(seq) - len(self.blocks.lookup(seq)) * self.blocks.block_size
            if prefill and tokens + new_tokens > self.max_prefill_tokens:
                break
            self.blocks.allocate(seq)
            tokens += len(seq) - seq.num_cached_tokens
            seq.status = Status.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            prefill.append(seq)
        if prefill:
            return prefill, True

        decode: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:  # preempted below while making room
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.append_slot(seq)
                decode.append(seq)
        return decode, False

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
