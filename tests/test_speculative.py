"""n-gram speculative decoding: the config, the proposer's search, and the engine's output with drafts
against transformers and against the same engine without them (greedy, seeded sampling, logprobs, a
choice ending inside an accepted run, rows that may not draft beside ones that do, the step budget, KV blocks)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass

import pytest
import requests
import torch

import ops
from chat_http import assert_completions_greedy, cpu_env, server_stats
from engine_util import (
    MIXED_PROMPTS,
    c_linear_rows,
    collect,
    engine_step,
    generate,
    generate_together,
    greedy,
    hf_greedy,
    load_engine,
    sequence,
)
from nanoqwen.engine import SamplingParams
from nanoqwen.engine.block_manager import BlockManager
from nanoqwen.engine.ngram import NgramMatcher, NgramProposer
from nanoqwen.engine.scheduler import Batch
from nanoqwen.engine.sequence import Sequence
from nanoqwen.runner import runner as runner_module
from nanoqwen.runner.graphs import GraphRunner
from nanoqwen.runner.inputs import ROW_FIELDS, StepInputBuffer
from nanoqwen.runner.runner import ModelRunner
from nanoqwen.sampler import token_bitmask
from nanoqwen.settings import EngineConfig, SpeculativeConfig
from server_process import GunicornServer

SPEC = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1})
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def spec_engine(tiny_checkpoint):
    return load_engine(tiny_checkpoint, speculative_config=SPEC)


@pytest.fixture(scope="module")
def plain_engine(tiny_checkpoint):
    return load_engine(tiny_checkpoint)


@pytest.fixture(scope="module")
def looping(plain_engine) -> list[int]:
    """A prompt the random model's greedy answer goes on copying: its own answer to [9, 9], cut three
    tokens into the answer's longest run of one token (so drafts get accepted; the tests assert that they do)."""
    start = [9, 9]
    answer = generate(plain_engine, [start], greedy(60))[0].choices[0].token_ids
    runs = [i for i in range(len(answer)) if i == 0 or answer[i] != answer[i - 1]]  # where each run starts
    longest = max(runs, key=lambda i: next((j for j in runs if j > i), len(answer)) - i)
    return start + answer[: longest + 3]


@pytest.fixture(scope="module")
def prompts(looping) -> list[list[int]]:
    return [looping, [7, 8, 9, 10, 11] * 4 + [7, 8], *MIXED_PROMPTS]


def test_config_follows_vllm():
    assert SpeculativeConfig.parse("") is None
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}') == SpeculativeConfig(
        "ngram", 3, 5, 5)
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4}') \
        == SpeculativeConfig("ngram", 3, 4, 4)
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}') \
        == SpeculativeConfig("ngram", 3, 2, 2)
    bad = {
        '{"method": "eagle", "num_speculative_tokens": 3}': "speculative_config.method",
        '{"method": "ngram"}': "speculative_config.num_speculative_tokens",
        '{"method": "ngram", "num_speculative_tokens": 0}': "speculative_config.num_speculative_tokens",
        '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}':
            "speculative_config.prompt_lookup_min",
        '{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}': "speculative_config.model",
        '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": "3"}':
            "speculative_config.prompt_lookup_max",
        "ngram": "not valid JSON",
    }
    for raw, field in bad.items():
        with pytest.raises(ValueError, match=field):
            EngineConfig.from_env({"NANOQWEN_SPECULATIVE_CONFIG": raw})


def test_matcher_proposes_the_longest_latest_match_incrementally():
    matcher = NgramMatcher(1, 3)
    tokens = [1, 2, 3, 4, 1, 2, 5, 6, 1, 2]
    # suffix [1, 2] last occurred before at 4..5, followed by 5, 6, 1, 2 (the continuation past the end repeats)
    assert matcher.propose(tokens, 6) == [5, 6, 1, 2, 5, 6]
    tokens += [3]  # [2, 3] only matches at 1..2 now; the longer [1, 2, 3] does as well
    assert matcher.propose(tokens, 2) == [4, 1]
    assert matcher.length == len(tokens)
    assert NgramMatcher(2, 3).propose([1, 2, 3, 9], 4) == []  # no earlier [3, 9] or [2, 3, 9]


def longest_latest_match(tokens: list[int], low: int, high: int, limit: int) -> list[int]:
    """The proposal, by brute force."""
    length = len(tokens)
    for n in range(min(high, length - 1), low - 1, -1):
        for stop in range(length - 1, n - 1, -1):
            if tokens[stop - n : stop] == tokens[length - n :]:
                drafts: list[int] = []
                for i in range(stop, stop + limit):
                    drafts.append(tokens[i] if i < length else drafts[i - length])
                return drafts
    return []


@pytest.mark.parametrize(("low", "high"), [(1, 1), (1, 4), (2, 3), (3, 3)])
def test_matcher_agrees_with_brute_force(low, high):
    """Random tokens of a small vocabulary (many matches, of every length), appended a few at a time."""
    rng = random.Random(low * 10 + high)
    tokens: list[int] = []
    matcher = NgramMatcher(low, high)
    for _ in range(300):
        tokens += [rng.randrange(4) for _ in range(rng.randrange(1, 4))]
        assert matcher.propose(tokens, 5) == longest_latest_match(tokens, low, high, 5), tokens


@pytest.mark.parametrize(("low", "high"), [(1, 4), (5, 5)])
def test_matcher_on_runs_and_loops(low, high):
    """Runs of one token and short loops: the latest position of the last token ends the longest match."""
    matcher = NgramMatcher(low, high)
    tokens: list[int] = []
    for token in [5] * 30 + [1, 2, 3] * 10 + [5] * 3 + [1, 2] * 8:
        tokens.append(token)
        assert matcher.propose(tokens, 4) == longest_latest_match(tokens, low, high, 4), tokens


def test_drafts_stop_at_the_first_token_the_row_may_not_sample():
    """A draft outside allowed_token_ids or with a logit_bias of -100 could never be accepted: the row's drafts
    end before it (a bias above -100 bans nothing)."""
    proposer = NgramProposer(SpeculativeConfig("ngram", 4, 3, 1), max_model_len=100)

    def drafts(**params) -> list[int]:
        seq = sequence([1, 2, 3, 40, 1, 2], params=SamplingParams(**params), max_tokens=10)
        if seq.request.params.allowed_token_ids is not None:
            seq.request.allowed_mask = token_bitmask(seq.request.params.allowed_token_ids, 1000)
        return proposer.propose(seq, 10)

    assert drafts() == [3, 40, 1, 2]
    assert drafts(logit_bias={40: -100.0}) == [3]
    assert drafts(logit_bias={40: -99.0, 3: 5.0}) == [3, 40, 1, 2]
    assert drafts(allowed_token_ids=[1, 2, 3]) == [3]
    assert drafts(allowed_token_ids=[2, 3, 40]) == [3, 40]
    assert drafts(allowed_token_ids=[1, 2, 3, 40]) == [3, 40, 1, 2]


def test_draft_blocks_come_from_free_ones_and_go_back_first():
    blocks = BlockManager(6, 4)
    seq = sequence(list(range(6)), max_tokens=10)
    blocks.allocate(seq)  # 2 blocks: 6 tokens
    assert blocks.extend(seq, 6 + 4) == 10  # drafts to 10 tokens: a third block
    assert blocks.extend(seq, 100) == 20  # as many as the pool has free: 5 blocks in all
    assert len(blocks.free) == 0
    taken = seq.block_table[2:]
    seq.token_ids += [6, 7]  # 8 tokens verified: blocks 3.. were rejected drafts'
    blocks.trim(seq)
    assert len(seq.block_table) == 2
    assert list(blocks.free) == taken and all(blocks.ref_counts[b] == 0 for b in taken)  # first in line


def test_a_rejected_drafts_block_taken_by_another_sequence_is_restaged():
    """A's rejected draft block goes to B; A's next drafts get another block at the same table length,
    which its staged rows must hold (the buffer rewrites a row's table only when the sequence's epoch or
    its table's length changed)."""
    blocks = BlockManager(8, 4, enable_prefix_caching=False)
    buffer = StepInputBuffer(max_batch=8, max_blocks_per_seq=4, block_size=4, device=torch.device("cpu"))
    a, b = sequence(list(range(6)), "a"), sequence(list(range(4)), "b")
    blocks.allocate(a)
    blocks.allocate(b)
    a.draft_ids = [7, 7, 7, 7][: blocks.extend(a, 6 + 4) - 6]
    assert (a.block_table, b.block_table) == ([1, 2, 4], [3])
    buffer.stage_decode([a], 8)
    a.token_ids.append(6)  # every draft rejected
    a.draft_ids = []
    blocks.trim(a)
    b.token_ids.append(4)
    blocks.append_slot(b)
    assert b.block_table == [3, 4]
    a.draft_ids = [7, 7, 7][: blocks.extend(a, 7 + 3) - 7]
    assert a.block_table == [1, 2, 5]
    buffer.stage_decode([a], 8)
    assert buffer.host.block_tables[:4, :3].tolist() == [[1, 2, 5]] * 4


@pytest.fixture(scope="module")
def references(hf, prompts) -> list[list[int]]:
    """transformers' greedy answers to the looping prompt and another (its generate is slow)."""
    return [hf_greedy(hf, prompt, MAX_TOKENS) for prompt in prompts[:2]]


def packed_drafts(runner, monkeypatch) -> list[list[int]]:
    """Each step the packed path runs from now on: its rows' drafts, as the step starts."""
    packed: list[list[int]] = []
    prefill = runner.prefill

    def packing(rows, sampled):
        packed.append([len(seq.draft_ids) for seq, _ in rows])
        return prefill(rows, sampled)

    monkeypatch.setattr(runner, "prefill", packing)
    return packed


MODES = {
    "torch": dict(cpu_kernels=False),  # the torch references alone
    "none": dict(graph="none"),  # the C kernels, every step eager
    "cpugraph": dict(graph="auto"),  # the C kernels, decode steps replayed as a CPU graph
    # under TRITON_INTERPRET=1: slow, so few tokens; 256 positions: decode attention in 2 splits, not the 32 of the
    # checkpoint's 4096, whose programs the interpreter runs one by one
    "triton": dict(kernels="triton", max_model_len=256),
}


# (mode, native bf16): the C linears' fp32 row limit (c_linear_rows) matters only in cpugraph mode
@pytest.mark.parametrize(("mode", "native_bf16"), [("torch", True), ("none", True), ("cpugraph", True),
                                                   ("cpugraph", False), ("triton", True)])
def test_greedy_matches_transformers_in_every_mode(tiny_checkpoint, prompts, references, mode, native_bf16,
                                                   monkeypatch):
    """A verify step is a decode step over its positions (the packed path runs prompts only), replayed from
    its bucket's CPU graph in cpugraph mode."""
    if mode == "triton" and (not ops.triton_available() or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (set by conftest without CUDA)")
    limit = c_linear_rows(monkeypatch, native_bf16)
    engine = load_engine(tiny_checkpoint, speculative_config=SPEC, max_batch=2, **MODES[mode])
    runner = engine.runner
    packed, buckets, run = packed_drafts(runner, monkeypatch), [], runner.graphs.run
    monkeypatch.setattr(runner.graphs, "run", lambda bucket, *args: buckets.append(bucket) or run(bucket, *args))
    tokens = 4 if mode == "triton" else MAX_TOKENS
    batch = prompts[:1] if mode == "triton" else prompts[:2]
    for result, reference in zip(generate(engine, batch, greedy(tokens)), references, strict=False):
        assert result.choices[0].token_ids == reference[:tokens]
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert max(buckets) > 2  # verify steps: more positions than max_batch
    if mode != "cpugraph":
        assert packed and not any(drafts for rows in packed for drafts in rows)
        return
    assert engine.info()["graph"] == "cpugraph"
    for result in generate(engine, [prompts[0]] * 2, greedy(tokens)):  # both rows draft: 10 positions
        assert result.choices[0].token_ids == references[0][:tokens]
    verifying = [sum(1 + drafts for drafts in rows) for rows in packed if any(rows)]  # positions of each
    # a bucket for each size of one row's verify step; bucket 10 is recorded only where the C linears take 10 fp32
    # rows (no native bf16): a verify step of 9 or 10 positions pads to it and replays, else takes the packed path
    recorded = [bucket for bucket in runner.buckets if bucket <= limit]
    assert runner.buckets == [1, 2, 3, 4, 5, 8, 10] and sorted(runner.graphs._cpu_graphs) == recorded
    assert (10 in recorded) == (not native_bf16)
    assert any(2 < bucket <= 8 for bucket in buckets)  # verify steps replayed
    assert set(buckets) <= set(recorded) and (10 in buckets) == (10 in recorded)
    assert bool(verifying) == (10 not in recorded) and all(positions > 8 for positions in verifying)
    assert runner.inputs.max_batch == 10


@pytest.mark.parametrize("path", ["decode", "packed"])
def test_greedy_and_logprobs_match_without_drafts(spec_engine, plain_engine, prompts, path, monkeypatch):
    """Verify steps as decode steps over their positions, and (past VERIFY_MAX_DRAFT_KEYS) as packed steps."""
    if path == "packed":
        monkeypatch.setattr(runner_module, "VERIFY_MAX_DRAFT_KEYS", 0)
    packed = packed_drafts(spec_engine.runner, monkeypatch)
    results = generate(spec_engine, prompts, greedy(MAX_TOKENS, logprobs=True, top_logprobs=2))
    plain = generate(plain_engine, prompts, greedy(MAX_TOKENS, logprobs=True, top_logprobs=2))
    for result, reference in zip(results, plain, strict=True):
        assert result.choices[0].token_ids == reference.choices[0].token_ids
        for got, want in zip(result.choices[0].logprobs, reference.choices[0].logprobs, strict=True):
            assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
            assert [t.token_id for t in got.top_logprobs] == [t.token_id for t in want.top_logprobs]
    stats = spec_engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert 0 < stats["spec_decode_acceptance_rate"] <= 1
    assert spec_engine.block_manager.usage == 0.0  # every block back, the drafts' too
    assert any(drafts for rows in packed for drafts in rows) == (path == "packed")


def test_verify_steps_allocate_no_staging(spec_engine, plain_engine, prompts, monkeypatch):
    """Three rows of 1 + 4 positions, more than max_batch (8): their sampling rows go to the buffer the
    runner allocated at load, never to one made per step."""
    def refuse(*args):
        raise AssertionError("a StepInputBuffer allocated in a step")

    monkeypatch.setattr(runner_module, "StepInputBuffer", refuse)
    before = spec_engine.stats()["spec_decode_num_accepted_tokens"]
    batch = [prompts[0]] * 3
    steps = record_steps(spec_engine, monkeypatch)
    with_drafts = [r.choices[0].token_ids for r in generate(spec_engine, batch, greedy(MAX_TOKENS))]
    monkeypatch.undo()
    assert with_drafts == [r.choices[0].token_ids for r in generate(plain_engine, batch, greedy(MAX_TOKENS))]
    assert spec_engine.stats()["spec_decode_num_accepted_tokens"] > before
    assert max(positions(step) for step in steps) > 8
    assert spec_engine.runner.inputs.max_batch == 8 * (1 + 4)


def test_packed_verify_modes_stage_a_decode_steps_rows(tiny_checkpoint, prompts, references, monkeypatch):
    """CUDA's modes (torch.compile here, on the CPU; CUDA graphs only constructed) run verify steps packed: the
    static inputs hold max_batch rows, a decode step uploads those, a verify step's positions go packed."""
    monkeypatch.setattr(GraphRunner, "_compile", lambda self, buckets, widths, cuda: None)  # a cold one takes minutes
    engine = load_engine(tiny_checkpoint, speculative_config=SPEC, graph="compile", max_batch=2)
    runner = engine.runner
    monkeypatch.setattr(runner.graphs, "_step", runner._decode_step)  # uncompiled, as the load left it
    uploads, upload = [], runner.inputs.upload
    monkeypatch.setattr(runner.inputs, "upload", lambda start, end: uploads.append((start, end)) or upload(start, end))
    packed = packed_drafts(runner, monkeypatch)
    for result, reference in zip(generate(engine, prompts[:2], greedy(MAX_TOKENS)), references, strict=True):
        assert result.choices[0].token_ids == reference
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert max(sum(1 + drafts for drafts in rows) for rows in packed) > 2  # verify steps past the rows, packed
    assert (runner.verify_as_decode, runner.buckets, runner.inputs.max_batch) == (False, [1, 2], 2)
    assert len(runner.inputs.host.input_ids) == len(runner.inputs.device_views.steps) == 2
    decode_uploads = {(0, len(ROW_FIELDS) * 2 + rows * runner.inputs.width) for rows in (1, 2)}
    assert uploads and set(uploads) <= decode_uploads
    captured = []
    monkeypatch.setattr(GraphRunner, "_capture", lambda self, buckets, width: captured.append(buckets))
    cuda = ModelRunner(runner.model, dataclasses.replace(engine.runtime, graph="cudagraph"))
    assert (cuda.verify_as_decode, captured, cuda.inputs.max_batch) == (False, [[1, 2]], 2)


def test_packed_sampling_uploads_to_the_device_copy():
    """A packed (verify) step's sampling positions reach a device copy of their staging in one upload of 6 fields
    × n words: on the CPU the staging is its own device copy, so a separate tensor stands in for a GPU's here."""
    buf = StepInputBuffer(2, 4, 16, torch.device("cpu"), packed_rows=10)
    buf._packed = buf._packed_host.clone().zero_()
    buf._packed_host[:] = 7  # the words past the 7 positions' 6 × 7 are not uploaded
    host = buf.packed_sampling_host(7)
    host.temperature[:], host.top_p[:], host.min_p[:] = 0.5, 0.75, 0.125
    host.top_k[:], host.keys[:], host.steps[:] = 20, 2**32 - 1, range(7)
    device = buf.upload_packed_sampling(7)
    host.steps[:] = 0  # the device views read the copy, not the staging
    assert [device.temperature.tolist(), device.top_p.tolist(), device.min_p.tolist()] == [[0.5] * 7, [0.75] * 7,
                                                                                          [0.125] * 7]
    assert [device.top_k.tolist(), device.keys.tolist()] == [[20] * 7, [-1] * 7]  # the keys' int32 bit patterns
    assert device.steps.tolist() == list(range(7))
    assert buf._packed[6 * 7 :].tolist() == [0] * (6 * 10 - 6 * 7)


@pytest.mark.parametrize("path", ["none", "cpugraph", "packed"])
def test_seeded_sampling_matches_without_drafts(tiny_checkpoint, spec_engine, plain_engine, prompts, path,
                                                monkeypatch):
    """Verify steps sampled after an eager step, after a CPU graph's replay and (past VERIFY_MAX_DRAFT_KEYS)
    after the packed path."""
    if path == "cpugraph":
        spec_engine = load_engine(tiny_checkpoint, speculative_config=SPEC, graph=path)
    if path == "packed":
        monkeypatch.setattr(runner_module, "VERIFY_MAX_DRAFT_KEYS", 0)
    packed = packed_drafts(spec_engine.runner, monkeypatch)
    before = spec_engine.stats()["spec_decode_num_accepted_tokens"]
    # A random model's distribution is nearly flat: only a low temperature samples the loop's drafts
    for params in (SamplingParams(temperature=0.05, seed=3, max_tokens=MAX_TOKENS, ignore_eos=True),
                   SamplingParams(temperature=0.05, top_k=5, top_p=0.9, min_p=0.05, seed=5, max_tokens=MAX_TOKENS,
                                  ignore_eos=True, n=2),
                   SamplingParams(temperature=0.8, top_k=100, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True)):
        results = generate(spec_engine, prompts[:2], params)
        plain = generate(plain_engine, prompts[:2], params)
        assert [[c.token_ids for c in r.choices] for r in results] == [[c.token_ids for c in r.choices] for r in plain]
    assert spec_engine.stats()["spec_decode_num_accepted_tokens"] > before
    verifying = [sum(1 + drafts for drafts in rows) for rows in packed if any(rows)]  # positions of each
    if path == "cpugraph":  # fp32: only a step past the 8 rows a C linear takes
        assert all(n > 8 for n in verifying)
    else:
        assert bool(verifying) == (path == "packed")


def test_a_choice_ends_inside_an_accepted_run(spec_engine, plain_engine, prompts):
    before = spec_engine.stats()["spec_decode_num_accepted_tokens"]
    full = generate(plain_engine, prompts[:1], greedy(MAX_TOKENS))[0].choices[0].token_ids
    # max_tokens: drafts never run past it
    for max_tokens in range(2, 9):
        result = generate(spec_engine, prompts[:1], greedy(max_tokens))[0].choices[0]
        assert (result.token_ids, result.finish_reason) == (full[:max_tokens], "length")
    # a stop string that the third token completes: the first verify step's second token, with more
    # accepted drafts after it, which are dropped
    stop = generate(plain_engine, prompts[:1], greedy(3))[0].choices[0].text
    accepted = spec_engine.stats()["spec_decode_num_accepted_tokens"]
    got = generate(spec_engine, prompts[:1], greedy(MAX_TOKENS, stop=[stop]))[0].choices[0]
    assert (got.token_ids, got.finish_reason) == (full[:3], "stop")
    assert spec_engine.stats()["spec_decode_num_accepted_tokens"] - accepted >= 2
    # a stop token: the first token that ends the answer's leading run (a verify step's last)
    end = next(t for t in full if t != full[0])
    result = generate(spec_engine, prompts[:1], greedy(MAX_TOKENS, stop_token_ids=[end]))[0].choices[0]
    assert (result.token_ids, result.finish_reason) == (full[: full.index(end) + 1], "stop")
    assert spec_engine.stats()["spec_decode_num_accepted_tokens"] > before
    assert spec_engine.block_manager.usage == 0.0


@pytest.fixture(scope="module")
def cycling(plain_engine) -> tuple[list[int], list[int]]:
    """A prompt whose answer goes on round a loop of three different tokens: the random model's answer to
    [320, 321] (found by a search of starts), cut after the loop's first round. -> (prompt, the loop)"""
    start = [320, 321]
    answer = generate(plain_engine, [start], greedy(48))[0].choices[0].token_ids
    i = next(i for i in range(len(answer) - 6)
             if answer[i : i + 3] == answer[i + 3 : i + 6] and len(set(answer[i : i + 3])) == 3)
    return start + answer[: i + 3], answer[i : i + 3]


def test_a_stop_token_ends_a_choice_on_an_accepted_draft(spec_engine, plain_engine, cycling):
    """The loop's second token as a stop token: the first verify step accepts it and the drafts after it
    (the loop's next round), which are dropped."""
    prompt, loop = cycling
    params = greedy(MAX_TOKENS, stop_token_ids=[loop[1]])
    expected = generate(plain_engine, [prompt], params)[0].choices[0]
    before = spec_engine.stats()["spec_decode_num_accepted_tokens"]
    got = generate(spec_engine, [prompt], params)[0].choices[0]
    assert (got.token_ids, got.finish_reason) == (expected.token_ids, "stop") and got.token_ids == loop[:2]
    # the prefill samples the first token: more accepted drafts than the tokens after it
    assert spec_engine.stats()["spec_decode_num_accepted_tokens"] - before > len(got.token_ids) - 1
    assert spec_engine.block_manager.usage == 0.0


def test_rows_that_may_not_draft_decode_beside_drafting_ones(spec_engine, plain_engine, prompts, monkeypatch):
    """Penalties, a grammar and a min_tokens to reach keep a row from drafting; logit_bias and allowed_token_ids
    (the same at every position, applied at each of a verify step's) do not."""
    allowed = sorted(set(prompts[0]))  # the looping answer copies its prompt: drafts get accepted

    def params(engine) -> list[SamplingParams]:
        schema = engine.grammars.json_schema({"type": "object"}, strict=False, param="response_format")
        return [greedy(MAX_TOKENS), greedy(MAX_TOKENS, repetition_penalty=1.3), greedy(MAX_TOKENS, logit_bias={9: 5.0}),
                greedy(MAX_TOKENS, min_tokens=MAX_TOKENS, stop_token_ids=[8]), greedy(MAX_TOKENS, grammar=schema),
                greedy(MAX_TOKENS, allowed_token_ids=allowed)]

    batch = [prompts[0]] * 6
    rows = params(spec_engine)
    steps = record_steps(spec_engine, monkeypatch)
    with_drafts = generate_together(spec_engine, batch, rows)
    monkeypatch.undo()
    assert with_drafts == generate_together(plain_engine, batch, params(plain_engine))
    accepted = {id(rows[0]), id(rows[2]), id(rows[5])}
    assert {id(p.params) for step in steps for p in step.proposals if p.kept} == accepted
    # the allowed ids change the answer: the masked drafts were verified, not just the plain ones
    assert with_drafts[5] != with_drafts[0] and spec_engine.stats()["spec_decode_num_accepted_tokens"] > 0


def test_masked_rows_drafting_past_max_batch_positions(tiny_checkpoint, plain_engine, prompts, cycling, monkeypatch):
    """Two allowed_token_ids rows, each its own ids, drafting with max_batch=2: a step samples at more masked
    positions than max_batch, each with its own sequence's mask (the bitmask holds one row per sequence)."""
    engine = load_engine(tiny_checkpoint, speculative_config=SPEC, max_batch=2)
    batch = [prompts[0], cycling[0]]
    params = [greedy(MAX_TOKENS, allowed_token_ids=sorted(set(prompt))) for prompt in batch]
    steps = record_steps(engine, monkeypatch)
    with_drafts = generate_together(engine, batch, params)
    monkeypatch.undo()
    assert with_drafts == generate_together(plain_engine, batch, params)
    assert max(positions(step) for step in steps) > 2
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0


@dataclass
class Proposal:
    params: SamplingParams  # its row's
    offered: int  # the most tokens the scheduler asked for
    proposed: int
    kept: int  # drafts the row verifies (the free blocks allowing)


@dataclass
class Step:
    decode: int  # decode rows
    prefill: int  # prompt tokens
    proposals: list[Proposal]


def positions(step: Step) -> int:
    """The positions a step's decode rows sample at: each row's token and its kept drafts."""
    return step.decode + sum(p.kept for p in step.proposals)


def record_steps(engine, monkeypatch) -> list[Step]:
    """Every step scheduled from now on (until monkeypatch undoes it), with its drafts."""
    steps: list[Step] = []
    proposals: list[tuple[Sequence, int, int]] = []
    schedule, propose = engine.scheduler.schedule, engine.scheduler.propose

    def proposing(seq: Sequence, most: int) -> list[int]:
        drafts = propose(seq, most)
        proposals.append((seq, most, len(drafts)))
        return drafts

    def scheduling() -> Batch:
        batch = schedule()
        steps.append(Step(len(batch.decode), sum(n for _, n in batch.prefill),
                          [Proposal(seq.request.params, most, n, len(seq.draft_ids)) for seq, most, n in proposals]))
        proposals.clear()
        return batch

    monkeypatch.setattr(engine.scheduler, "propose", proposing)
    monkeypatch.setattr(engine.scheduler, "schedule", scheduling)
    return steps


@pytest.mark.parametrize("limit", ["budget", "blocks"])
def test_budget_and_blocks_limit_drafts(tiny_checkpoint, plain_engine, prompts, limit, monkeypatch):
    """A step token budget that runs out; a KV pool that holds the four answers and no block more (a draft
    taking a block another row needs would preempt it; a row's drafts never reach past its last position, so
    such a pool never cuts them: test_drafts_cut_to_the_free_blocks)."""
    blocks = 1 + 4 * -(-(len(prompts[0]) + MAX_TOKENS) // 16)
    overrides = dict(max_step_tokens=12) if limit == "budget" else dict(num_kv_blocks=blocks,
                                                                        enable_prefix_caching=False)
    engine = load_engine(tiny_checkpoint, speculative_config=SPEC, max_batch=4, **overrides)
    batch = [prompts[0]] * 4
    params = greedy(MAX_TOKENS)
    steps = record_steps(engine, monkeypatch)
    assert [r.choices[0].token_ids for r in generate(engine, batch, params)] == \
        [r.choices[0].token_ids for r in generate(plain_engine, batch, params)]
    stats = engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert stats["preemptions"] == 0
    assert engine.block_manager.usage == 0.0
    assert sum(p.kept for step in steps for p in step.proposals) == stats["spec_decode_num_draft_tokens"]
    if limit == "budget":
        for step in steps:
            assert step.decode + step.prefill + sum(p.kept for p in step.proposals) <= 12
        assert any(p.offered < 4 for step in steps for p in step.proposals)  # the budget ran out


def test_drafts_cut_to_the_free_blocks(tiny_checkpoint, plain_engine, prompts, monkeypatch):
    """8-token blocks and a pool the two prompts fill: B's first drafts reach into a block there is none of
    while A takes its last token (A may not draft: no room under max_tokens), so they are cut to the slots
    left in B's last block; A's blocks come back before B needs one for its own token: nobody is preempted."""
    a, b = prompts[1], prompts[0] + prompts[0][-1:] * 2  # B: two more tokens of the looping run
    room = -len(b) % 8 - 1  # B's slots left after its first token
    assert 0 < room < 4  # so that drafts are cut
    engine = load_engine(tiny_checkpoint, speculative_config=SPEC, max_batch=2, enable_prefix_caching=False,
                         block_size=8, num_kv_blocks=1 + -(-len(a) // 8) + -(-len(b) // 8))
    params = [greedy(2), greedy(MAX_TOKENS)]
    steps = record_steps(engine, monkeypatch)
    assert generate_together(engine, [a, b], params) == generate_together(plain_engine, [a, b], params)
    assert engine.stats()["preemptions"] == 0 and engine.stats()["spec_decode_num_accepted_tokens"] > 0
    cut = [p for step in steps for p in step.proposals if p.kept < p.proposed]
    assert cut and cut[0].params is params[1] and cut[0].kept == room
    assert engine.block_manager.usage == 0.0


def test_server_serves_the_same_tokens_with_drafts(tiny_checkpoint, hf, prompts, tmp_path):
    """A real gunicorn server with speculative decoding, its verify steps replayed from CPU graphs: the openai
    client, streamed and not, gets transformers' greedy answers; /health shows the setting, /stats and /metrics
    the accepted drafts. (Eager verify steps against transformers: test_greedy_matches_transformers_in_every_mode's
    "none"; nothing checked here depends on the mode.)"""
    env = cpu_env(tiny_checkpoint, NANOQWEN_SPECULATIVE_CONFIG=SPEC, NANOQWEN_MAX_BATCH="4", NANOQWEN_GRAPH="cpugraph")
    with GunicornServer(env, tmp_path / "server.log") as srv:
        assert " speculative={'method': 'ngram', 'num_speculative_tokens': 4" in srv.log()
        assert " graph=cpugraph " in srv.log()
        assert_completions_greedy(srv, tiny_checkpoint, hf, prompts[:2], MAX_TOKENS, streams=(False, True))
        info = requests.get(f"{srv.url}/health", timeout=10).json()["model_info"]
        assert info["speculative"] == json.loads(SPEC)
        stats = server_stats(srv)
        assert stats["spec_decode_num_accepted_tokens"] > 0 and 0 < stats["spec_decode_acceptance_rate"] <= 1
        metrics = requests.get(f"{srv.url}/metrics", timeout=10).text
        assert f"nanoqwen_spec_decode_num_accepted_tokens {float(stats['spec_decode_num_accepted_tokens'])}" in metrics
        for key in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"):
            assert f'vllm:{key}_total{{engine="0",model_name="qwen3-0.6b"}} {float(stats[key])}' in metrics, key


def test_preemption_and_abort_with_drafts(tiny_checkpoint, plain_engine, prompts):
    """A pool that holds four prompts and one block more, too few for their answers: rows are preempted
    and recomputed while others draft, the answers unchanged; a drafting request aborted between steps
    gives every block back."""
    blocks = 1 + 4 * -(-len(prompts[0]) // 16) + 1
    engine = load_engine(tiny_checkpoint, speculative_config=SPEC, max_batch=4, num_kv_blocks=blocks,
                         enable_prefix_caching=False)
    batch = [prompts[0]] * 4
    params = greedy(MAX_TOKENS)
    assert [r.choices[0].token_ids for r in generate(engine, batch, params)] == \
        [r.choices[0].token_ids for r in generate(plain_engine, batch, params)]
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["spec_decode_num_accepted_tokens"] > 0
    request_id, stream = engine.submit(prompts[0], params)
    for _ in range(MAX_TOKENS):
        if engine.stats()["spec_decode_num_drafts"] > stats["spec_decode_num_drafts"]:
            break
        engine_step(engine)
    else:
        pytest.fail(f"no draft in {MAX_TOKENS} steps")
    engine.abort(request_id)
    engine_step(engine)
    assert collect(stream).choices[0].finish_reason == "abort"
    assert engine.block_manager.usage == 0.0 and not engine.scheduler.has_work


def test_drafts_stop_at_max_model_len(tiny_checkpoint, plain_engine, prompts):
    """An answer that runs into the context limit: drafts never propose past it (its last slot)."""
    room = 10
    engine = load_engine(tiny_checkpoint, speculative_config=SPEC, max_model_len=len(prompts[0]) + room)
    full = generate(plain_engine, prompts[:1], greedy(room))[0].choices[0].token_ids
    result = generate(engine, prompts[:1], SamplingParams(temperature=0.0, ignore_eos=True))[0].choices[0]
    assert (result.token_ids, result.finish_reason) == (full, "length")
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
