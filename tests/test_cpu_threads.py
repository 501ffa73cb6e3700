"""The C kernels' thread pool (csrc/pool.h), OpenMP's wait policy beside it, and the linear kernels' AVX2 loops
on a CPU that would take AVX-512."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from cpu_isas import LOOPS, capped
from ops.cpu import attention as cpu_attention
from ops.cpu import build as cpu_build
from ops.cpu import linear as cpu_linear
from ops.cpu import linear_int8 as cpu_int8
from ops.torch_ref.decode_attention import decode_attention_torch
from ops.torch_ref.linear_int8 import linear_int8_torch

pytestmark = pytest.mark.skipif(cpu_build.unavailable() is not None, reason=f"{cpu_build.unavailable()}")

# Many chunks per call (pool_rows_per_chunk), activation rows over and under the AVX-512 loop's 8.
SHAPES = [(1, 4096, 1024), (3, 1024, 3072), (8, 777, 2048), (11, 300, 96)]


def setup_module() -> None:
    assert cpu_linear.KERNEL.build(), cpu_linear.KERNEL.error
    assert cpu_int8.KERNEL.build(), cpu_int8.KERNEL.error


def operands(m: int, n: int, k: int, dtype: torch.dtype):
    torch.manual_seed(m + n + k)
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    return x, w, torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) / 100).to(dtype)


def call(lib, x, w, scale=None):
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    if scale is None:
        lib.linear(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], w.shape[0], x.shape[1], bf16)
    else:
        lib.linear_int8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), out.data_ptr(), x.shape[0], w.shape[0],
                        x.shape[1], bf16)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loops", LOOPS)
def test_each_caps_loops_match_the_reference(dtype, loops):
    dense, int8 = capped(cpu_linear.KERNEL, loops), capped(cpu_int8.KERNEL, loops)
    tol = {"atol": 1e-5 * 32, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3 * 32, "rtol": 8e-3}
    for m, n, k in SHAPES:
        x, w, wq, scale = operands(m, n, k, dtype)
        torch.testing.assert_close(call(dense.lib, x, w).float(), F.linear(x.float(), w.float()), **tol)
        torch.testing.assert_close(call(int8.lib, x, wq, scale).float(), linear_int8_torch(x, wq, scale).float(),
                                   **tol)


def test_concurrent_callers_get_their_own_results():
    """ctypes releases the GIL: calls from several Python threads run at once and must not mix."""
    cases = [operands(*shape, torch.bfloat16) for shape in SHAPES]
    expected = [(call(cpu_linear.KERNEL.lib, x, w), call(cpu_int8.KERNEL.lib, x, wq, s)) for x, w, wq, s in cases]
    failures = []

    def worker(i: int) -> None:
        for _ in range(10):
            x, w, wq, s = cases[i]
            dense, int8 = call(cpu_linear.KERNEL.lib, x, w), call(cpu_int8.KERNEL.lib, x, wq, s)
            if not (torch.equal(dense, expected[i][0]) and torch.equal(int8, expected[i][1])):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(i % len(cases),)) for i in range(2 * len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and failures == []


def test_results_do_not_depend_on_the_thread_count():
    x, w, wq, s = operands(3, 4096, 1024, torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = call(cpu_linear.KERNEL.lib, x, w), call(cpu_int8.KERNEL.lib, x, wq, s)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(alone[0], call(cpu_linear.KERNEL.lib, x, w))
    assert torch.equal(alone[1], call(cpu_int8.KERNEL.lib, x, wq, s))


def _in_child(x, w, expected, done) -> None:
    done.put(torch.equal(call(cpu_linear.KERNEL.lib, x, w), expected))


def test_a_forked_child_still_computes():
    """A fork copies the pool's state but not its helper threads (gunicorn forks its workers)."""
    x, w, _, _ = operands(1, 4096, 1024, torch.bfloat16)
    expected = call(cpu_linear.KERNEL.lib, x, w)  # the parent's helpers are running now
    context = multiprocessing.get_context("fork")
    done = context.Queue()
    child = context.Process(target=_in_child, args=(x, w, expected, done))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0 and done.get(timeout=5)


def test_attention_over_long_contexts_runs_on_the_pool_and_matches():
    """Past attention.c's PARALLEL_MIN_PAIRS (token, kv head) pairs the tasks go to the pool."""
    assert cpu_attention.KERNEL.build(), cpu_attention.KERNEL.error
    torch.manual_seed(7)
    batch, heads, kv_heads, head_dim, block_size, width = 3, 16, 8, 64, 16, 32
    k_cache = torch.randn(batch * width + 1, block_size, kv_heads, head_dim)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, heads, head_dim)
    tables = (torch.randperm(batch * width) + 1).view(batch, width).int()
    context_lens = torch.tensor([width * block_size, 300, 257], dtype=torch.int32)  # 8,552 pairs
    scale = head_dim**-0.5
    out = cpu_attention.decode_attention_cpu(q, k_cache, v_cache, tables, context_lens, scale)
    ref = decode_attention_torch(q, k_cache, v_cache, tables, context_lens, scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", ["", '{"method": "ngram", "num_speculative_tokens": 2}'])
@pytest.mark.parametrize("policy,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_between_ops_unless_the_user_says(spec, policy, expected):
    """Importing nanoqwen (before torch, as server.py and the CLI's gunicorn do) puts OpenMP's threads to sleep
    between ops, drafting or not: spinning, they took the cores of the pool's helpers (an int8 decode step of 17-32
    rows, dequantised on the pool and multiplied by torch, cost about 10x more); a policy the user set wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NANOQWEN_SPECULATIVE_CONFIG")}
    env |= {"NANOQWEN_SPECULATIVE_CONFIG": spec} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    out = subprocess.run([sys.executable, "-c", "import os, nanoqwen; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected
