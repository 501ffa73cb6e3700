"""The CPU paged prefill attention (C kernel, and the CPU set's dispatch between it and SDPA) against the
torch reference, and through the engine after a prefix-cache hit against transformers."""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import paged_inputs
from chat_http import MODEL, completion_texts, cpu_env
from checkpoints import make_checkpoint
from cpu_isas import CPU_FLAGS, LOOPS, capped
from engine_util import generate, greedy, hf_greedy, load_engine, shared_tokenizer
from ops.cpu import build as cpu_build
from ops.cpu import prefill_attention as cpu_prefill
from ops.torch_ref.prefill_attention import prefill_attention_torch
from server_process import GunicornServer

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SHAPES = [  # num_q_heads, num_kv_heads, head_dim, block_size
    (4, 2, 16, 4),  # GQA 2, the tiny checkpoint's head dim: 32-column blocks padded
    (6, 1, 64, 16),  # GQA 6: a 64-row task holds 10 tokens and 4 padding rows
    (4, 4, 40, 16),  # MHA, a head dim off the 32-column blocks
    (16, 8, 128, 16),  # Qwen3-0.6B
    (2, 1, 256, 8),  # the largest head dim the tiles take
]


def setup_module() -> None:  # a compiler is here: a kernel that does not build fails, never skips
    assert cpu_prefill.KERNEL.build(), cpu_prefill.KERNEL.error


def kernel(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale, tiles=False) -> torch.Tensor:
    return cpu_prefill.prefill_attention_kernel(q, k_cache, v_cache, tables, query_lens, context_lens, scale, tiles)


# The tiles' edges (csrc/prefill_tiles.h: tasks of 512 query vectors, 256-key blocks, 32-row tiles): uncached runs
# longer than a task and off the tile and block sizes, chunks after a prefix that start mid-page and end off a
# block, a run of a whole task, decode rows and a one-token prompt beside them.
TILE_SEQS = [(300, 300), (130, 517), (257, 257), (1, 1), (65, 65), (33, 100), (1, 70), (128, 128)]
TILE_SHAPES = [  # num_q_heads, num_kv_heads, head_dim, block_size; head dims the tiles take (D % 32 == 0)
    (4, 2, 32, 4),  # GQA 2, 4-token pages: a 16-key tile spans 4 of them
    (6, 1, 64, 16),  # GQA 6: a task holds 85 tokens, 510 rows and 2 padding rows
    (16, 8, 128, 16),  # Qwen3-0.6B
    (2, 1, 256, 8),  # the largest head dim the tiles take
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype):
    # several sequences: nothing cached, short and long prefixes, query_len 1 rows, a chunk after
    # earlier chunks, contexts off the block size; plus one long enough for many 64-key tiles
    seqs = [*paged_inputs.MIXED, (70, 200)]
    args, _, _ = paged_inputs.paged(seqs, *shape, dtype=dtype)
    out = kernel(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    torch.testing.assert_close(out, prefill_attention_torch(*args), **TOLERANCE[dtype])


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=str)
def test_tiles_match_reference(monkeypatch, shape, loops):
    """bf16 on the tiles under each cap the CPU has: AMX's where it has them (built), vdpbf16ps on an AVX-512 BF16 CPU
    without AMX (built) or capped below AMX (avx512), the AVX2 loops where the tiles do not serve (avx2), which the same
    bounds hold."""
    monkeypatch.setattr(cpu_prefill, "KERNEL", capped(cpu_prefill.KERNEL, loops))
    args, _, _ = paged_inputs.paged(TILE_SEQS, *shape, dtype=torch.bfloat16)
    out = kernel(*args, tiles=True)
    assert out.shape == args[0].shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, prefill_attention_torch(*args), **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("loops", LOOPS)
def test_tiles_rescale_the_running_sums_when_a_later_block_outscores_the_first(monkeypatch, loops):
    """Queries x8: a later 256-key block's top score passes a row's running maximum by more than LAZY, so the tiles
    must rescale its accumulator and sum (at N(0, 0.6) scores they never do)."""
    monkeypatch.setattr(cpu_prefill, "KERNEL", capped(cpu_prefill.KERNEL, loops))
    args, _, _ = paged_inputs.paged([(300, 300), (130, 517)], 4, 2, 32, 4, dtype=torch.bfloat16)
    args = (args[0] * 8, *args[1:])
    torch.testing.assert_close(kernel(*args, tiles=True), prefill_attention_torch(*args), **TOLERANCE[torch.bfloat16])


def test_tiles_serve_where_the_cpu_has_avx512_bf16():
    """AMX-BF16 CPUs have AVX-512 BF16 too: its vdpbf16ps serve where AMX does not (or Linux refuses its tiles)."""
    ready = {"avx512f", "avx512bw", "avx512_bf16"} <= CPU_FLAGS
    assert cpu_prefill.tiles_serve(128) == cpu_prefill.tiles_serve(32) == ready
    # off the 32-column tiles, past 256: the AVX2 loops
    assert not cpu_prefill.tiles_serve(40) and not cpu_prefill.tiles_serve(288)
    for isa, serves in (("avx2", False), ("avx512", ready)):  # the cap below AMX keeps vdpbf16ps, AVX2's neither
        flag = ctypes.c_int(-1)
        capped(cpu_prefill.KERNEL, isa).lib.prefill_attention_tiles(128, ctypes.byref(flag))
        assert flag.value == serves


@pytest.mark.parametrize(("tiles", "loops"), [(False, "built"), *((True, loops) for loops in LOOPS)])
def test_kernel_reads_nothing_past_the_context(monkeypatch, tiles, loops):
    """NaN past each context: the tiles under every cap (AMX, vdpbf16ps, the AVX2 loops) zero the keys they pad."""
    monkeypatch.setattr(cpu_prefill, "KERNEL", capped(cpu_prefill.KERNEL, loops))
    seqs = [(3, 10), (1, 5), (9, 9), (70, 75)]
    dtype, head_dim = (torch.bfloat16, 32) if tiles else (torch.float32, 16)
    args, _, _ = paged_inputs.paged(seqs, 4, 2, head_dim, 4, dtype=dtype)
    q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale = args
    before = kernel(*args, tiles=tiles)
    k_cache, v_cache, tables = paged_inputs.poisoned(k_cache, v_cache, tables, context_lens)
    after = kernel(q, k, v, k_cache, v_cache, tables, query_lens, context_lens, scale, tiles=tiles)
    assert torch.equal(before, after)


def test_calls_of_any_size_from_two_threads_at_once_give_what_they_give_alone():
    """Its memory (a tile's Scratch per OpenMP thread and the task table) is each call's own: a small call, a larger
    one, the small one again (the same bits), and the same calls from two Python threads at once."""
    small, large = ([(1, 5), (3, 10)], [(40, 40), (70, 200), (1, 9)])
    calls = [paged_inputs.paged(seqs, 4, 2, 16, 4)[0] for seqs in (small, large, small)]
    alone = [kernel(*args) for args in calls]
    assert torch.equal(alone[0], alone[2])
    for args, out in zip(calls, alone, strict=True):
        torch.testing.assert_close(out, prefill_attention_torch(*args), **TOLERANCE[torch.float32])
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda args: kernel(*args), [*calls, *calls[::-1]]))
    assert all(torch.equal(a, b) for a, b in zip(together, [*alone, *alone[::-1]], strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_new", [0, 16, 10_000])  # all SDPA | the split | all C kernel
@pytest.mark.parametrize("scattered", [True, False])  # the split copies a prefix out of its blocks | views them
def test_dispatch_matches_reference(monkeypatch, dtype, max_new, scattered):
    """Every sequence to the C kernel or to SDPA (one causal call, or prefix and new tokens merged by
    their logsumexps), by C_MAX_NEW; the C kernel gets only cached sequences, in one call."""
    monkeypatch.setattr(cpu_prefill, "C_MAX_NEW", max_new)
    calls = []
    real = cpu_prefill.prefill_attention_kernel
    monkeypatch.setattr(cpu_prefill, "prefill_attention_kernel", lambda *a: calls.append(a[4]) or real(*a))
    seqs = [*paged_inputs.MIXED, (40, 300), (40, 44)]  # a long prefix (split) | a short one (padded)
    args, _, _ = paged_inputs.paged(seqs, 4, 2, 16, 4, dtype=dtype, scattered=scattered)
    out = cpu_prefill.prefill_attention_cpu(*args)
    torch.testing.assert_close(out, prefill_attention_torch(*args), **TOLERANCE[dtype])
    expected = [n for n, c in seqs if n < c and n <= max_new]
    assert calls == ([expected] if expected else [])


@pytest.mark.parametrize("max_new", [0, 16, 10_000])  # C_MAX_NEW: no sequence, some, all for the AVX2 loops elsewhere
def test_dispatch_takes_the_tiles_in_bf16(monkeypatch, max_new):
    """Where the tiles serve, every sequence goes to them in one call (decode rows and short chunks too: the tiles beat
    the AVX2 loops there), whatever C_MAX_NEW; none to the loops or SDPA."""
    if not cpu_prefill.tiles_serve(32):
        pytest.skip("no AVX-512 BF16 on this CPU: its dispatch is test_dispatch_matches_reference's")
    monkeypatch.setattr(cpu_prefill, "C_MAX_NEW", max_new)
    calls = []
    real = cpu_prefill.prefill_attention_kernel
    monkeypatch.setattr(cpu_prefill, "prefill_attention_kernel", lambda *a: calls.append((a[4], a[7])) or real(*a))
    monkeypatch.setattr(cpu_prefill, "_sdpa", None)
    seqs = [*paged_inputs.MIXED, (40, 300), (40, 44)]
    args, _, _ = paged_inputs.paged(seqs, 4, 2, 32, 4, dtype=torch.bfloat16)
    out = cpu_prefill.prefill_attention_cpu(*args)
    torch.testing.assert_close(out, prefill_attention_torch(*args), **TOLERANCE[torch.bfloat16])
    assert calls == [([n for n, _ in seqs], True)]


def test_the_cpu_kernel_set_takes_it_where_it_serves():
    for dtype in (torch.float32, torch.bfloat16):
        assert paged_inputs.cpu_kernels(dtype).prefill_attention is cpu_prefill.prefill_attention_cpu
    # fp16, a head dim not a multiple of 8, a GQA group over MAX_GROUP: the torch reference
    for other in (paged_inputs.cpu_kernels(torch.float16), paged_inputs.cpu_kernels(torch.float32, head_dim=12),
                  paged_inputs.cpu_kernels(torch.float32, num_heads=130)):
        assert other.prefill_attention is prefill_attention_torch


def test_prefix_cache_hits_through_the_engine_match_transformers(tiny_checkpoint, hf, monkeypatch):
    """A short and a long prompt after a cached system prompt: the C kernel and the split SDPA each
    serve a prefix hit, and greedy tokens stay transformers'."""
    calls = []
    real = cpu_prefill.prefill_attention_kernel
    monkeypatch.setattr(cpu_prefill, "prefill_attention_kernel", lambda *a: calls.append(a[4]) or real(*a))
    engine = load_engine(tiny_checkpoint)
    assert engine.runner.model.kernels.prefill_attention is cpu_prefill.prefill_attention_cpu
    system = list(range(3000, 3040))  # 2 full blocks of 16 cached after the first request
    prompts = [system + [9707, 1879], system + [100, 200, 300], system + list(range(500, 560))]
    results = [generate(engine, [prompt], greedy(8))[0] for prompt in prompts]
    assert [r.usage.cached_tokens for r in results] == [0, 32, 32]
    for prompt, result in zip(prompts, results):
        assert result.choices[0].token_ids == hf_greedy(hf, prompt, 8)
    assert [11] in calls  # the short prompt's 11 new tokens went to the C kernel


def test_the_tiles_through_the_engine_give_the_tokens_they_give_off(monkeypatch, tmp_path: Path):
    """A bf16 checkpoint at a head dim the tiles take (128): a 300-token prompt (rows over two 256-key blocks), the
    same with 2 more tokens (a prefix hit, 14 new) and its first 288 with 72 others (a prefix hit, 72 new): greedy
    tokens with the tiles the same as with them off (the AVX2 loops and SDPA), and the tiles served every prefill;
    the same tokens from a real gunicorn in bf16 (its worker's tiles: the same CPU and dispatch; decode replayed)."""
    if not cpu_prefill.tiles_serve(128):
        pytest.skip("no AVX-512 BF16 on this CPU: its engine runs are the other tests'")
    checkpoint = make_checkpoint(head_dim=128, dtype=torch.bfloat16, seed=7)
    first = list(range(1000, 1300))
    prompts = [first, first + [7, 8], first[:288] + list(range(2000, 2072))]
    calls = []
    real = cpu_prefill.prefill_attention_kernel
    monkeypatch.setattr(cpu_prefill, "prefill_attention_kernel", lambda *a: calls.append((a[4], a[7])) or real(*a))

    def run() -> list[list[int]]:
        engine = load_engine(checkpoint, dtype="bfloat16", kernels="auto")
        assert engine.runner.model.kernels.prefill_attention is cpu_prefill.prefill_attention_cpu
        results = [generate(engine, [prompt], greedy(16))[0] for prompt in prompts]
        assert [r.usage.cached_tokens for r in results] == [0, 288, 288]
        return [r.choices[0].token_ids for r in results]

    tiles = run()
    assert calls == [(new, True) for new in ([300], [14], [72]) for _layer in range(2)]
    monkeypatch.setattr(cpu_prefill, "tiles_serve", lambda head_dim: False)
    assert run() == tiles
    tokenizer = shared_tokenizer(checkpoint)
    body = dict(model=MODEL, temperature=0, max_tokens=16,
                extra_body={"ignore_eos": True, "skip_special_tokens": False})
    with GunicornServer(cpu_env(checkpoint, NANOQWEN_DTYPE="bfloat16"), tmp_path / "server.log") as srv:
        texts = [completion_texts(srv, {**body, "prompt": [prompt]}, False)[0] for prompt in prompts]
    assert texts == [tokenizer.decode(t, skip_special_tokens=False) for t in tiles]
