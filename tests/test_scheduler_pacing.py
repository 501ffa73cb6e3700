"""The chunked-prefill policy on the scheduler alone, with step times fed in: prompts that finish
within the step budget go whole, a long prompt's chunks are paced by measured time while streams
decode and fill the budget when none do."""
from __future__ import annotations

import math

import pytest

from engine_util import sequence
from nanoqwen.engine import EngineConfig, SamplingParams
from nanoqwen.engine.block_manager import BlockManager
from nanoqwen.engine.pacing import MIN_CHUNK, ChunkPacer
from nanoqwen.engine.scheduler import Batch, Scheduler
from nanoqwen.engine.sequence import Sequence

BUDGET = 512
DECODE_S = 0.1  # a decode-only step: with stall 1.0 a step carrying a paced chunk aims at 0.2 s


def scheduler(stall: float = 1.0) -> Scheduler:
    return Scheduler(BlockManager(1024, 16), max_batch=16, max_prefill_tokens=8192, max_step_tokens=BUDGET,
                     prefill_stall=stall)


def submit(s: Scheduler, length: int, first_token: int) -> Sequence:
    seq = sequence(list(range(first_token, first_token + length)), f"r{first_token}", SamplingParams(max_tokens=100),
                   max_tokens=100)
    s.add(seq)
    return seq


def step(s: Scheduler, seconds: float | None = None) -> Batch:
    """Schedules a step and runs it as the engine does: its time observed, its tokens computed, a
    token appended to each sequence that samples."""
    batch = s.schedule()
    sampled = batch.sampled
    if seconds is not None:
        s.observe(batch, seconds)
    for seq, n in batch.rows:
        seq.num_computed_tokens += n
    for seq in sampled:
        seq.token_ids.append(7)
    return batch


def chunks(batch: Batch) -> list[int]:
    return [n for _, n in batch.prefill]


def with_streams(stall: float = 1.0, streams: int = 2) -> Scheduler:
    """A scheduler whose `streams` sequences decode, a decode-only step timed at DECODE_S."""
    s = scheduler(stall)
    for i in range(streams):
        submit(s, 20, 1000 * (i + 1))
    step(s)
    assert len(step(s, DECODE_S).decode) == streams
    return s


def test_a_long_prompt_is_paced_by_measured_step_time():
    s = with_streams()
    long_prompt = submit(s, 4000, 50_000)
    sizes = []
    for seconds in (0.1, 0.15, 0.4, 0.2, 0.25):
        batch = step(s, seconds)
        assert len(batch.decode) == 2  # the streams decode in every step
        sizes += chunks(batch)
    # from MIN_CHUNK, whose 0.1 s step sets the floor: faster than floor + 1 decode-only step = 0.2 s
    # grows (at most 2x a step), slower shrinks by target / time
    assert sizes == [MIN_CHUNK, 64, 85, 42, 42]
    assert long_prompt.num_computed_tokens == sum(sizes)
    assert s.pacer.tokens == 33  # 42 × 0.2 / 0.25


def test_a_slow_smallest_chunk_sets_the_floor():
    """A step with any chunk at all costing 3 decode-only steps (an eager step beside a captured decode
    graph): the chunk may add `stall` decode-only steps to that, so it still grows."""
    s = with_streams()
    submit(s, 4000, 50_000)
    assert chunks(step(s, 0.3)) == [MIN_CHUNK]
    assert s.pacer.plain.floor == pytest.approx(3.0)
    assert chunks(step(s, 0.32)) == [42]  # 32 × 0.4 / 0.3
    assert s.pacer.tokens == 52  # 42 × 0.4 / 0.32


def test_only_a_step_with_nothing_but_the_smallest_chunk_sets_the_floor():
    s = with_streams()
    submit(s, 4000, 50_000)
    submit(s, 100, 60_000)
    assert chunks(step(s, 3.0)) == [MIN_CHUNK, 100]  # a whole prompt beside it: a slow step, no floor
    assert s.pacer.plain.floor is None
    assert s.pacer.tokens == MIN_CHUNK


def test_short_prompts_go_whole_beside_a_paced_chunk():
    s = with_streams()
    submit(s, 4000, 50_000)
    step(s, 0.2)  # the long prompt's first chunk: the floor, the next chunk 32 × 0.3 / 0.2
    shorts = [submit(s, 100, 60_000 + 1000 * i) for i in range(5)]
    batch = step(s)
    # 2 decode rows, the long prompt's paced chunk, then whole prompts while they fit: 510 - 48 = 4 × 100 + 62
    assert chunks(batch) == [48, 100, 100, 100, 100]
    assert shorts[4] in s.waiting  # no pacing left for a partial chunk of it: it waits for the next step
    assert all(seq.num_uncomputed_tokens == 1 for seq in shorts[:4])  # each sampled its first token


def test_the_last_chunk_of_a_long_prompt_is_paced_too():
    s = with_streams()
    long_prompt = submit(s, 4000, 50_000)
    step(s, 0.2)
    long_prompt.num_computed_tokens = 4000 - 100  # 100 left: they would fit the budget, not the pacing
    assert chunks(step(s, 0.2)) == [48]


def test_without_streams_a_long_prompt_fills_the_budget():
    s = scheduler()
    submit(s, 4000, 50_000)
    assert chunks(step(s, 1.0)) == [BUDGET]


def test_stall_zero_fills_the_budget_beside_streams():
    s = with_streams(stall=0.0)
    submit(s, 4000, 50_000)
    assert chunks(step(s, 5.0)) == [BUDGET - 2]
    assert s.pacer is None


def test_the_pacer_grows_only_on_evidence():
    pacer = ChunkPacer(1.0, BUDGET)
    pacer.observe(decode_rows=0, prefill_tokens=40, paced_tokens=0, seconds=0.05)  # no decode-only step yet
    pacer.observe(decode_rows=4, prefill_tokens=40, paced_tokens=40, seconds=0.05)
    assert pacer.tokens == MIN_CHUNK
    pacer.observe(decode_rows=4, prefill_tokens=0, paced_tokens=0, seconds=DECODE_S)
    pacer.observe(decode_rows=4, prefill_tokens=10, paced_tokens=10, seconds=0.11)  # a prompt's short last chunk
    assert pacer.tokens == MIN_CHUNK
    for _ in range(6):  # steps stay fast whatever the chunk: it grows to the budget, no further
        pacer.observe(decode_rows=4, prefill_tokens=pacer.tokens, paced_tokens=pacer.tokens, seconds=0.12)
    assert pacer.tokens == BUDGET
    pacer.observe(decode_rows=4, prefill_tokens=BUDGET, paced_tokens=BUDGET, seconds=10.0)
    assert pacer.tokens == BUDGET // 2  # one slow step halves it at most


def test_the_largest_stall_grows_the_chunk_to_the_budget():
    """A stall of 1e308: its target overflowed the chunk's scaling (OverflowError), which failed every request in
    flight at each step carrying a paced chunk."""
    s = with_streams(stall=1e308)
    submit(s, 5000, 50_000)
    sizes = [chunks(step(s, 3 * DECODE_S))[0] for _ in range(6)]
    assert sizes == [MIN_CHUNK, 2 * MIN_CHUNK, 4 * MIN_CHUNK, 8 * MIN_CHUNK, BUDGET - 2, BUDGET - 2], sizes


def test_prefill_stall_setting():
    assert EngineConfig().prefill_stall == 1.0
    assert EngineConfig.from_env({"NANOQWEN_PREFILL_STALL": "2.5"}).prefill_stall == 2.5
    for stall in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="prefill_stall"):
            EngineConfig(prefill_stall=stall)
