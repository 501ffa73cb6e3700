"""The scheduler with drafting rows, no model: prompts are admitted before rows draft, and the chunk pacer
times a prompt's chunks against the streams' verify steps (drafts are no prefill)."""
from __future__ import annotations

import pytest

from engine_util import sequence
from nanoqwen.engine.block_manager import BlockManager
from nanoqwen.engine.pacing import MIN_CHUNK, ChunkPacer
from nanoqwen.engine.scheduler import Batch, Scheduler
from nanoqwen.engine.sequence import Sequence, Status

BLOCK = 4
K = 8  # drafts every decoding row proposes


def propose(seq: Sequence, most: int) -> list[int]:
    return [1] * min(K, most)


def prompt_of(prompt_len: int) -> Sequence:
    return sequence(list(range(prompt_len)), f"r{prompt_len}")


def complete(scheduler: Scheduler, batch: Batch) -> None:
    """What the engine does after the step: every row's tokens computed, drafts rejected, a token sampled."""
    for seq, n in batch.rows:
        seq.num_computed_tokens += n - len(seq.draft_ids)
    for seq in batch.sampled:
        seq.token_ids.append(2)
        seq.draft_ids = []
        scheduler.blocks.trim(seq)


def decoding(scheduler: Scheduler, prompt_len: int) -> Sequence:
    """A sequence admitted, prefilled and now decoding (one token sampled)."""
    seq = prompt_of(prompt_len)
    scheduler.add(seq)
    complete(scheduler, scheduler.schedule())
    assert seq.status is Status.RUNNING and seq.num_uncomputed_tokens == 1
    return seq


def test_waiting_prompt_gets_the_blocks_before_drafts():
    """A pool with room for the decoding row's own slot, the waiting prompt and one block more: the prompt
    is admitted in this step, the drafts get the block left."""
    blocks = BlockManager(1 + 3 + 2 + 1, BLOCK, enable_prefix_caching=False)
    scheduler = Scheduler(blocks, max_batch=2, max_prefill_tokens=64, max_step_tokens=64, propose=propose)
    running = decoding(scheduler, 8)  # 9 tokens: its slot takes a third block
    waiting = prompt_of(8)  # 2 blocks
    scheduler.add(waiting)
    batch = scheduler.schedule()
    assert batch.decode == [running] and batch.prefill == [(waiting, 8)]
    assert running.draft_ids == [1] * (4 * BLOCK - 9)  # the one free block left: up to 16 slots
    assert not blocks.free


def test_budget_left_by_prefill_goes_to_drafts():
    scheduler = Scheduler(BlockManager(64, BLOCK, False), max_batch=2, max_prefill_tokens=64, max_step_tokens=12,
                          propose=propose)
    running = decoding(scheduler, 8)
    scheduler.add(prompt_of(9))
    batch = scheduler.schedule()
    assert [n for _, n in batch.prefill] == [9] and len(running.draft_ids) == 12 - 1 - 9


def step_seconds(batch: Batch) -> float:
    """A made-up device: a decode-only step without drafts replays a graph (1 s), any other runs eagerly
    (2 s, and a little per token)."""
    tokens = sum(n for _, n in batch.rows)
    return 1.0 if tokens == len(batch.decode) else 2.0 + 0.001 * tokens


def test_chunks_are_paced_against_the_verify_step():
    """Streams that draft every step: a drafts-only step is what a chunk is timed against, so a long prompt's
    chunks grow from MIN_CHUNK to what the stall allows (counted as prefill, drafts kept them at MIN_CHUNK)."""
    scheduler = Scheduler(BlockManager(1024, BLOCK, False), max_batch=2, max_prefill_tokens=4096,
                          max_step_tokens=512, prefill_stall=1.0, propose=propose)
    decoding(scheduler, 8)
    for _ in range(3):
        batch = scheduler.schedule()
        assert batch.num_drafts == K and not batch.prefill
        seconds = step_seconds(batch)
        scheduler.observe(batch, seconds)
        complete(scheduler, batch)
    assert scheduler.pacer.drafting.decode_s == seconds and scheduler.pacer.plain.decode_s is None
    scheduler.add(prompt_of(3000))
    chunks = []
    for _ in range(6):
        batch = scheduler.schedule()
        chunks.append(batch.prefill[0][1])
        scheduler.observe(batch, step_seconds(batch))
        complete(scheduler, batch)
    assert chunks[0] == MIN_CHUNK and chunks[-1] >= 8 * MIN_CHUNK, chunks


def test_the_pacer_times_steps_against_their_own_kind():
    """Streams that draft on some steps (eager, 3 s) and not on others (a graph, 1 s): the two averages stay
    apart, and a chunk is judged against the decode-only step of its own step's kind."""
    pacer = ChunkPacer(1.0, 1024)
    for _ in range(4):
        pacer.observe(decode_rows=2, prefill_tokens=0, paced_tokens=0, seconds=1.0)
        pacer.observe(decode_rows=2, prefill_tokens=0, paced_tokens=0, seconds=3.0, drafts=K)
    assert (pacer.plain.decode_s, pacer.drafting.decode_s) == (1.0, 3.0)
    pacer.observe(decode_rows=2, prefill_tokens=MIN_CHUNK, paced_tokens=MIN_CHUNK, seconds=3.3, drafts=K)
    assert pacer.drafting.floor == pytest.approx(1.1) and pacer.plain.floor is None
    assert pacer.tokens == 61  # 32 × (1.1 + 1) × 3 / 3.3
    # a chunk step without drafts at (1 + stall) × its decode-only step: on target, the chunk holds
    pacer.observe(decode_rows=2, prefill_tokens=61, paced_tokens=61, seconds=2.0)
    assert pacer.tokens == 61
