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
from engine_util import torch_threads
from ops.cpu import attention as cpu_attention
from ops.cpu import build as cpu_build
from ops.cpu import linear as cpu_linear
from ops.cpu import linear_int4 as cpu_int4
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


# Pooled calls after one on other rows (left in the caller's scratch, where a chunk reading before its row is staged
# finds them): without pool_staged_wait 6 of 1,000 such calls at 8 bf16 rows x 4096 x 1024 differed (~4 s a 1,000).
STAGED_REPEATS = 800


@pytest.mark.parametrize("m", [1, 2, 8, 9])
@pytest.mark.parametrize("n,k,g", [(4096, 1024, 64), (777, 3072, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_quantised_linears_staged_and_cut_give_the_one_thread_bits(m, n, k, g, dtype):
    """The AVX2 int8 and int4 linears at 2 threads, their rows staged by the job's first chunks on both threads and the
    weight rows' last chunks cut smaller (pool.h), are the bits of one thread, where all runs in order on the caller;
    a row past the pieces' range among them (flagged by its staging) too. Each pooled call follows one on other rows,
    so that a chunk that read its rows before they were staged would read those (8 rows, bf16: many times)."""
    x, _, wq, scale = operands(m, n, k, dtype)
    x[m // 2, 3] = float("inf")
    other = torch.randn(m, k).to(dtype)
    w4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)  # any bytes are weights in some layout
    scale4, offset4 = (torch.rand(n, k // g) / 50).to(dtype), (torch.randn(n, k // g) / 10).to(dtype)
    int4, int8 = capped(cpu_int4.KERNEL, "avx2").lib, capped(cpu_int8.KERNEL, "avx2").lib

    def both(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(m, n, dtype=dtype)
        int4.linear_int4(rows.data_ptr(), w4.data_ptr(), scale4.data_ptr(), offset4.data_ptr(), out.data_ptr(), m, n,
                         k, g, int(dtype == torch.bfloat16), cpu_int4.PIECES[dtype])
        return call(int8, rows, wq, scale), out

    with torch_threads(1):
        alone = both(x)
    repeats, runs = STAGED_REPEATS if (m, n, dtype) == (8, 4096, torch.bfloat16) else 2, []
    with torch_threads(2):
        for _ in range(repeats):
            both(other)
            runs.append(both(x))
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # NaNs compared too
    differing = [i for i, pooled in enumerate(runs) if not all(torch.equal(p.view(bits), a.view(bits))
                                                                for p, a in zip(pooled, alone))]
    assert not differing, f"{len(differing)} of {repeats} pooled calls differ from one thread's"
    assert runs[0][0][m // 2].isinf().any() and runs[0][1][m // 2].isinf().any()


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


# The end of a script that defines `calls` (a name: a call at a number of rows): each called in a forked child (which
# has no pool helper: pool.c's atfork) at batch 1, then at batch 8; prints, per name, the threads each call left
# running: the pool's helper, started by a job of 2+ chunks.
STARTED_BY_CALLS = textwrap.dedent("""
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
        "argmax_rows": lambda n: sample.KERNEL.lib.argmax_rows(p(logits), p(tokens), n, VOCAB, 0),
    }
""") + STARTED_BY_CALLS


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


# The AVX2 int8 and int4 linears (bf16 rows, K 1024, N 64: one chunk of weights) at 2 threads, each in a forked child
# (no pool helper yet) called at batch 1, then at batch 8; prints, per kernel, the threads each call left running.
STAGED_ROWS = textwrap.dedent("""
    import os
    import torch
    from ops.cpu import build, linear_int4, linear_int8

    torch.set_num_threads(2)
    libs = {}
    for module in (linear_int4, linear_int8):
        kernel = build.CKernel(module.KERNEL.name, module.KERNEL.source.name, module.KERNEL.functions)
        assert kernel.build(isa="avx2"), kernel.error
        libs[module] = kernel.lib
    K, N = 1024, 64
    x, y = torch.randn(8, K).bfloat16(), torch.empty(8, N).bfloat16()
    w4 = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)  # any bytes are weights in some layout
    scale4, offset4 = (torch.rand(N, K // 64) / 50).bfloat16(), (torch.randn(N, K // 64) / 10).bfloat16()
    w8, scale8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).bfloat16()
    p = torch.Tensor.data_ptr
    calls = {
        "linear_int4": lambda m: libs[linear_int4].linear_int4(p(x), p(w4), p(scale4), p(offset4), p(y), m, N, K, 64,
                                                               1, linear_int4.PIECES[torch.bfloat16]),
        "linear_int8": lambda m: libs[linear_int8].linear_int8(p(x), p(w8), p(scale8), p(y), m, N, K, 1),
    }
""") + STARTED_BY_CALLS


def test_a_batch_of_rows_is_staged_on_the_pool_one_row_by_the_caller():
    """The AVX2 int8 and int4 linears' activation rows are made integers (act_quant16.h, act_block8.h) by the job's
    first chunks, a row each, on both threads (pool.h's pool_staged_wait), where the caller alone did it before the
    job: at batch 8 even one chunk of weights is a job that starts the helper; batch 1's row is the caller's, its one
    chunk run without a hand-off."""
    child = subprocess.run([sys.executable, "-c", STAGED_ROWS], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    started = dict(line.split(" ", 1) for line in child.stdout.splitlines())
    assert started == {"linear_int4": "[0, 1]", "linear_int8": "[0, 1]"}, started


# pool.h's pool_rows_cut for a few linears' rows, chunks and units; prints each case's chunks as start-end pairs.
ROWS_CUT = r"""
#include <stdio.h>
#include "pool.h"
int main(void) {
    const long cases[][3] = {{4096, 256, 4}, {1024, 88, 4}, {151936, 256, 4}, {6144, 256, 4}, {777, 128, 8},
                             {300, 128, 8}, {64, 256, 4}, {3, 256, 4}, {0, 256, 4}};
    for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct pool_rows s = pool_rows_cut(cases[i][0], cases[i][1], cases[i][2]);
        printf("%ld %ld %ld", cases[i][0], cases[i][1], cases[i][2]);
        for (long c = 0; c < pool_rows_chunks(&s); c++)
            printf(" %ld-%ld", pool_rows_start(&s, c), pool_rows_end(&s, c));
        printf("\n");
    }
    return 0;
}
"""


def test_a_linears_last_chunks_are_cut_smaller_and_every_row_is_in_one_chunk(tmp_path):
    """pool.h's pool_rows_cut: the weight rows in chunks of `rows` (whole units), but the last two chunks' rows in
    eight, so that two threads end a job within a quarter chunk of each other; the chunks cover the rows once, in
    order; rows that fit one chunk stay one (the caller's, no hand-off)."""
    source = tmp_path / "rows_cut.c"
    source.write_text(ROWS_CUT)
    binary = tmp_path / "rows_cut"
    subprocess.run([cpu_build.compiler(), "-O1", f"-I{cpu_build.CSRC}", "-mavx2", str(source), "-o", str(binary)],
                   check=True, timeout=120)
    lines = subprocess.run([str(binary)], capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert len(lines) == 9
    for line in lines:
        n, rows, unit, *spans = line.split()
        n, rows, unit = int(n), int(rows), int(unit)
        chunks = [tuple(map(int, span.split("-"))) for span in spans]
        whole = -(-n // rows)
        if whole <= 1:
            assert len(chunks) == whole and all(chunk == (0, n) for chunk in chunks), line
            continue
        assert [start for start, _ in chunks] == [0, *(end for _, end in chunks[:-1])] and chunks[-1][1] == n, line
        assert all(start % unit == 0 and start < end for start, end in chunks), line
        head, tail = chunks[:whole - 2], chunks[whole - 2:]
        assert len(tail) > 2 and all(end - start == rows for start, end in head), line
        assert all(end - start <= -(-rows // 4 // unit) * unit + unit for start, end in tail), line


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
