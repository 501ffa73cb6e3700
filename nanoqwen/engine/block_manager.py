"""Paged KV blocks: allocation, reference counts and the prefix cache.

Block 0 is never handed out: padded decode lanes point at it. A full block is identified by a
hash chain over (previous block's hash, its tokens); a hit is accepted only if the cached block
holds exactly the same tokens. Freed blocks keep their contents and hash until reused (LRU).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

from nanoqwen.config import blocks_for
from nanoqwen.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.prefix_hits = 0  # full prompt blocks served from the cache
        self.prefix_queries = 0  # full prompt blocks looked up
        self._epochs = itertools.count(1)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by running sequences (cached free blocks count as free)."""
        return 1.0 - len(self.free) / (self.num_blocks - 1)

    def _chain_hash(self, prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def lookup(self, seq: Sequence) -> list[tuple[int, int]]:
        """(hash, block) of the leading prompt blocks found in the cache.

        At least the last token is always recomputed, so the model yields logits for it; a sequence
        that scores its prompt recomputes all of it (as vLLM does).
        """
        hits: list[tuple[int, int]] = []
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return hits
        prev = None
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = self._chain_hash(prev, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            hits.append((h, block))
            prev = h
        return hits

    def _take_free_block(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.block_hash[block] is not None:
            if self.hash_to_block.get(self.block_hash[block]) == block:
                del self.hash_to_block[self.block_hash[block]]
            self.block_hash[block] = None
            self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def blocks_needed(self, seq: Sequence) -> int:
        hits = self.lookup(seq)
        total = blocks_for(len(seq), self.block_size)
        reused_free = sum(1 for _, b in hits if self.ref_counts[b] == 0)
        return total - len(hits) + reused_free

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_needed(seq) <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of a waiting sequence, reusing cached prompt blocks."""
        assert not seq.block_table
        seq.alloc_epoch = next(self._epochs)
        hits = self.lookup(seq)
        num_full_prompt = (len(seq) - 1) // self.block_size
        self.prefix_queries += num_full_prompt if seq.num_output_tokens == 0 else 0
        self.prefix_hits += len(hits) if seq.num_output_tokens == 0 else 0
        for h, block in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        for _ in range(len(hits), blocks_for(len(seq), self.block_size)):
            seq.block_table.append(self._take_free_block())

    def register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Hash every full block among the first num_tokens tokens not hashed yet.

        The scheduler calls it for the tokens a step computes, as it schedules them: a block is
        found by later lookups only once its k/v are written (by that step, whose layers store every
        new token's k/v before any attention reads them), never while a later chunk is pending.
        """
        if not self.enable_prefix_caching:
            return
        while len(seq.block_hashes) < num_tokens // self.block_size:
            i = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = self._chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            block = seq.block_table[i]
            seq.block_hashes.append(h)
            if self.block_hash[block] is None:
                self.block_hash[block] = h
                self.block_tokens[block] = tokens
                self.hash_to_block.setdefault(h, block)

    def can_append(self, seq: Sequence) -> bool:
        """Room for the k/v of the sequence's newest token."""
        return len(seq.block_table) * self.block_size >= len(seq) or bool(self.free)

    def append_slot(self, seq: Sequence) -> None:
        if len(seq.block_table) * self.block_size < len(seq):
            seq.block_table.append(self._take_free_block())

    def extend(self, seq: Sequence, num_tokens: int) -> int:
        """Free blocks for a decoding sequence's slots up to num_tokens (its drafts'), as many as there
        are. -> the tokens its blocks now hold."""
        while len(seq.block_table) * self.block_size < num_tokens and self.free:
            seq.block_table.append(self._take_free_block())
        return min(num_tokens, len(seq.block_table) * self.block_size)

    def trim(self, seq: Sequence) -> None:
        """Frees the blocks past the sequence's tokens (those rejected drafts held), for reuse first:
        they hold nothing a lookup could hit. A new epoch when it frees one: the table may grow back to the
        same length with another block, which the runner's staged rows must not miss."""
        keep = blocks_for(len(seq), self.block_size)
        if len(seq.block_table) > keep:
            seq.alloc_epoch = next(self._epochs)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            self.free[block] = None
            self.free.move_to_end(block, last=False)

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # reversed: a prefix's tail is evicted before its head
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def reset_prefix_cache(self) -> None:
        self.hash_to_block.clear()
        for b in range(self.num_blocks):
            self.block_hash[b] = None
            self.block_tokens[b] = None
