"""profiles/bench_cpu_linear.py's clocks: on a loaded machine the CPU clock leaves out the time the caller waits."""
from __future__ import annotations

import sys
import time

from server_process import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "profiles"))
import bench_cpu_linear  # noqa: E402


def test_the_cpu_clock_leaves_out_time_not_running():
    """A kernel that sleeps 50 ms (as a thread does while other processes hold the cores) costs ~0 by --clock cpu and
    50 ms or more by wall, per pass and per shape."""
    ws = [("qkv", ()), ("o", ())]
    xs = {k: None for k in set(bench_cpu_linear.INPUTS.values())}
    passes = {}
    for clock in ("wall", "cpu"):
        times = dict.fromkeys(bench_cpu_linear.INPUTS, 0.0)
        passes[clock] = bench_cpu_linear.run_pass(
            lambda *_: time.sleep(0.05), ws, xs, times, bench_cpu_linear.CLOCKS[clock]
        )
        assert (times["qkv"] >= 0.05) == (clock == "wall") and (times["o"] >= 0.05) == (clock == "wall")
    assert passes["wall"] >= 0.1 and passes["cpu"] < 0.02
