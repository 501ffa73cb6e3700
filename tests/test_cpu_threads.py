"""The C kernels' thread pool (csrc/pool.h), OpenMP's wait policy beside it, and the linear kernels' AVX2 loops
on a CPU that would take AVX-512."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
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
from server_process import REPO_ROOT

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


# Calls every kernel library whose calls this size run on the pool (sample.c's too needs a sampler's scratch) in a
# fresh process with 3 threads, and prints how many threads those calls started: the helpers.
POOL_HELPERS = textwrap.dedent("""
    import os
    import torch
    from ops.cpu import attention, dequant, linear, linear_int4, linear_int8, pointwise

    torch.set_num_threads(3)
    for kernel in (linear, linear_int8, linear_int4, attention, pointwise, dequant):
        assert kernel.KERNEL.build(), kernel.KERNEL.error
    x, w = torch.randn(1, 1024).bfloat16(), torch.randn(4096, 1024).bfloat16()
    wq, scale = torch.randint(-127, 128, (4096, 1024), dtype=torch.int8), torch.rand(4096).bfloat16()
    w4, scale4, offset4 = torch.randint(0, 256, (4096, 512), dtype=torch.uint8), *torch.rand(2, 4096, 8)
    y, w4_out = torch.empty(1, 4096, dtype=torch.bfloat16), torch.empty(4096, 1024)
    k_cache = torch.randn(65, 16, 8, 64)
    q, tables, lens = torch.randn(1, 16, 64), torch.arange(1, 65).int().view(1, 64), torch.tensor([1024]).int()
    gate_up = torch.randn(256, 2 * 3072)
    torch.matmul(torch.randn(512, 512), torch.randn(512, 512))  # torch's own threads started before the count
    before = len(os.listdir("/proc/self/task"))
    linear.KERNEL.lib.linear(x.data_ptr(), w.data_ptr(), y.data_ptr(), 1, 4096, 1024, 1)
    linear_int8.KERNEL.lib.linear_int8(x.data_ptr(), wq.data_ptr(), scale.data_ptr(), y.data_ptr(), 1, 4096, 1024, 1)
    linear_int4.linear_int4(x.float(), w4, scale4, offset4)  # any bytes are weights in some layout
    attention.decode_attention_cpu(q, k_cache, k_cache, tables, lens, 0.125)
    pointwise.silu_mul_cpu(gate_up)
    dequant.KERNEL.lib.dequant_int4(w4.data_ptr(), scale4.data_ptr(), offset4.data_ptr(), w4_out.data_ptr(), 4096,
                                    1024, 128, 0)
    print(len(os.listdir("/proc/self/task")) - before)
""")


def test_every_kernel_library_shares_one_pool():
    """One pool a process (csrc/pool.c, ops/cpu/build.py): the libraries' calls start threads - 1 helpers between
    them, not threads - 1 each, so the helper one library keeps spinning serves the next library's call."""
    child = subprocess.run([sys.executable, "-c", POOL_HELPERS], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert int(child.stdout.split()[-1]) == 2


# A decode step's small kernels at 2 threads, each in a forked child (which has no pool helper: pool.c's atfork) called
# at batch 1, then at batch 8, by ctypes on inputs made before the fork (no torch op, whose OpenMP threads would count
# too); prints, per kernel, the threads each call left running: the pool's helper, started by a job of 2+ chunks.
SMALL_KERNELS = textwrap.dedent("""
    import os
    import torch
    from ops.cpu import norm_rope, pointwise, sample

    torch.set_num_threads(2)
    for kernel in (norm_rope, pointwise, sample):
        assert kernel.KERNEL.build(), kernel.KERNEL.error
    HIDDEN, HQ, HKV, D, INTER, VOCAB = 1024, 16, 8, 128, 3072, 151936
    x, gate_up, qkv = torch.randn(8, HIDDEN).bfloat16(), torch.randn(8, 2 * INTER).bfloat16(), torch.randn(8, 4096)
    out, act, weight, cos_sin = torch.empty_like(x), torch.empty(8, INTER).bfloat16(), torch.ones(D), torch.ones(8, D)
    weight16 = torch.ones(HIDDEN).bfloat16()
    cache, ids = torch.zeros(8, HKV * D), torch.arange(8, dtype=torch.int32)
    logits16, logits, tokens = torch.randn(8, VOCAB).bfloat16(), torch.empty(8, VOCAB), torch.empty(8).long()
    p = torch.Tensor.data_ptr
    calls = {
        "rms_norm": lambda n: norm_rope.KERNEL.lib.rms_norm(p(x), None, p(weight16), p(out), None, n, HIDDEN,
                                                            1e-6, 1),
        "qk_norm_rope_store": lambda n: norm_rope.KERNEL.lib.qk_norm_rope_store(
            p(qkv), p(qkv) + HQ * D * 4, p(qkv) + (HQ + HKV) * D * 4, p(weight), p(weight), 1e-6, p(cos_sin), p(ids),
            p(cache), p(cache), p(ids), n, HQ, HKV, D, 4096, 4096, 4096, 0),
        "silu_mul": lambda n: pointwise.KERNEL.lib.silu_mul(p(gate_up), p(act), n, INTER, 1),
        "bf16_to_fp32": lambda n: pointwise.KERNEL.lib.bf16_to_fp32(p(logits16), p(logits), n * VOCAB),
        "argmax_rows": lambda n: sample.KERNEL.lib.argmax_rows(p(logits), p(tokens), n, VOCAB),
    }
    for name, call in calls.items():
        read, write = os.pipe()
        if os.fork() == 0:
            started = []
            for rows in (1, 8):
                before = len(os.listdir("/proc/self/task"))
                call(rows)
                started.append(len(os.listdir("/proc/self/task")) - before)
            os.write(write, repr(started).encode())
            os._exit(0)
        os.close(write)
        print(name, os.read(read, 100).decode())
        os.wait()
""")


def test_a_decode_steps_small_kernels_go_to_the_pool_at_batch_8_not_at_batch_1():
    """pool.h's pool_row_chunk and the widening's and argmax's chunks: a batch-8 step's norms, q/k norm + RoPE,
    silu_mul, logits' widening and greedy argmax are jobs of several chunks, which start the helper; batch 1's are one
    chunk each, run on the caller without a hand-off (a job's costs more than half such a call)."""
    child = subprocess.run([sys.executable, "-c", SMALL_KERNELS], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    started = dict(line.split(" ", 1) for line in child.stdout.splitlines())
    assert started == {name: "[0, 1]" for name in
                       ("rms_norm", "qk_norm_rope_store", "silu_mul", "bf16_to_fp32", "argmax_rows")}, started


# A fresh process's first pooled call, 10 chunks of 30 ms (a Python callback through ctypes, the GIL let go while
# it sleeps) at 2 threads; prints how many threads ran its chunks.
FIRST_JOB = textwrap.dedent("""
    import ctypes
    import threading
    import time
    import torch
    from ops.cpu import build

    torch.set_num_threads(2)
    pool = build.load_pool(build.CSRC, build.resolve_cache_dir(), build.compiler())
    ran = []
    chunk_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_long)
    pool.nanoqwen_pool_run.argtypes = [chunk_fn, ctypes.c_void_p, ctypes.c_long]
    pool.nanoqwen_pool_run.restype = None

    @chunk_fn
    def chunk(ctx, c):
        ran.append(threading.get_native_id())
        time.sleep(0.03)

    pool.nanoqwen_pool_run(chunk, None, 10)
    print(len(set(ran)))
""")


def test_a_helper_started_for_a_job_takes_part_in_it():
    """pool_start creates a helper just before the job it is for is published: reading the generation when it
    starts, it took that job as seen and left every chunk of a process's first call (of a forked worker's, of the
    first after set_num_threads grew) to the caller. It starts from the generation before the job."""
    child = subprocess.run([sys.executable, "-c", FIRST_JOB], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert int(child.stdout.split()[-1]) == 2


# Jobs of 0-40 chunks and a few larger at 2, 3 and 5 threads: which chunks ran, and how often, a job.
EVERY_CHUNK = textwrap.dedent("""
    import collections
    import ctypes
    import torch
    from ops.cpu import build

    pool = build.load_pool(build.CSRC, build.resolve_cache_dir(), build.compiler())
    chunk_fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_long)
    pool.nanoqwen_pool_run.argtypes = [chunk_fn, ctypes.c_void_p, ctypes.c_long]
    pool.nanoqwen_pool_run.restype = None
    ran = []
    chunk = chunk_fn(lambda ctx, c: ran.append(c))
    wrong = []
    for threads in (2, 3, 5):
        torch.set_num_threads(threads)
        for chunks in [*range(41), 97, 1000]:
            ran.clear()
            pool.nanoqwen_pool_run(chunk, None, chunks)
            if sorted(ran) != list(range(chunks)):
                wrong.append((threads, chunks, sorted(collections.Counter(ran).items())[:8]))
    print(wrong or "ok")
""")


def test_a_job_runs_each_of_its_chunks_once():
    """A claim takes several chunks while many are left (pool_claim_size): each chunk of a job still runs exactly
    once, at the end of a job, for small jobs and at more threads than cores."""
    child = subprocess.run([sys.executable, "-c", EVERY_CHUNK], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert child.stdout.split()[-1] == "ok", child.stdout[-3000:]


SPEC = '{"method": "ngram", "num_speculative_tokens": 2}'


@pytest.mark.parametrize("spec,policy,expected", [(SPEC, None, "PASSIVE"), (SPEC, "ACTIVE", "ACTIVE"),
                                                    ("", None, "None"), ("", "PASSIVE", "PASSIVE")])
def test_openmp_threads_sleep_between_ops_when_drafting(spec, policy, expected):
    """Importing nanoqwen (before torch, as server.py and the CLI's gunicorn do) puts OpenMP's threads to sleep
    between ops when speculation is configured, and leaves OpenMP's default otherwise (asleep, quantised batch-1
    decode ran ~20% slower); a policy the user set wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NANOQWEN_SPECULATIVE_CONFIG")}
    env |= {"NANOQWEN_SPECULATIVE_CONFIG": spec} | ({"OMP_WAIT_POLICY": policy} if policy else {})
    out = subprocess.run([sys.executable, "-c", "import os, nanoqwen; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected
