"""profiles/bench_kernels.py's timing, without a GPU: what it hands Triton's benchmark."""
from __future__ import annotations

import sys

import pytest
import torch

from server_process import REPO_ROOT

testing = pytest.importorskip("triton.testing")
sys.path.insert(0, str(REPO_ROOT / "profiles"))
import bench_kernels  # noqa: E402


def test_time_us_waits_for_the_inputs_before_timing(monkeypatch):
    """do_bench_cudagraph runs the calls on a new stream that does not wait for the one the input copies were
    made on: the device must be synchronized first (unsynchronized, the first GPU run faulted at B=64 ctx=4096)."""
    events = []

    def bench(fn) -> float:
        events.append("bench")
        fn()
        return 0.5

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: events.append("synchronize"))
    monkeypatch.setattr(testing, "do_bench_cudagraph", bench)
    us = bench_kernels.time_us(lambda *args: events.append(("call", args)), [(1,), (2,)], eager=False)
    assert events == ["synchronize", "bench", ("call", (1,))] and us == 500.0
