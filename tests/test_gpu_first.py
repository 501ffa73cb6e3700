"""Dry run of profiles/gpu_first.sh with a stub interpreter: its steps' limits, the deadline's
skipping and the packing after every step, proven here because the GPU run gets one try.

The stub stands in for `python` in every step (PYTHON=stub) and, by STUB_PLAN, hangs or fails in
the named steps. GPU_FIRST_TIME_PERCENT shrinks every step's limit and minimum so the runs take
seconds; the deadline itself is given in real seconds."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from waits import wait_for

SCRIPT = Path(__file__).resolve().parents[1] / "profiles" / "gpu_first.sh"
STEPS = ["env", "deps", "kernels", "tests", "fixture", "decode_2k", "server", "decode", "bench", "quant", "trace",
         "compile"]
STUB = """#!/usr/bin/env bash
echo "stub python $*"
echo "$GPU_FIRST_STEP" > "$GPU_FIRST_STEP_DIR/out.txt"
case " ${STUB_PLAN:-} " in
    *" $GPU_FIRST_STEP:hang "*) exec sleep 1000 ;;
    *" $GPU_FIRST_STEP:fail "*) exit 3 ;;
    *" $GPU_FIRST_STEP:big "*) head -c 9000000 /dev/zero > "$GPU_FIRST_STEP_DIR/big.json" ;;
esac
"""


@pytest.fixture
def stub_env(tmp_path: Path) -> dict[str, str]:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "stub-1.0-py3-none-any.whl").touch()
    return {**os.environ, "PYTHON": str(stub), "GPU_FIRST_WHEELHOUSE": str(wheelhouse), "TMPDIR": str(tmp_path)}


def run(env: dict[str, str], out: Path, deadline: int, plan: str, percent: int) -> subprocess.CompletedProcess:
    env = {**env, "STUB_PLAN": plan, "GPU_FIRST_TIME_PERCENT": str(percent)}
    return subprocess.run(["bash", str(SCRIPT), str(out), str(deadline)], env=env, capture_output=True, text=True,
                          timeout=120)


def in_session(sid: int) -> list[int]:
    """The live processes of session `sid` (zombies are no longer running)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name: state, ppid, pgrp, session
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
    return pids


def statuses(out: Path) -> dict[str, str]:
    lines = (out / "summary.txt").read_text().splitlines()[2:]
    return {line.split()[0]: line.split()[1] for line in lines if not line.startswith("left out")}


def archived(out: Path) -> set[str]:
    with tarfile.open(out / "results.tar.gz") as tar:
        return {name.removeprefix("./") for name in tar.getnames()}


def test_help_prints_usage():
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "gpu_first.sh OUTDIR [DEADLINE_S]" in result.stdout


def test_a_hung_step_times_out_a_failed_one_is_recorded_and_the_rest_run(stub_env, tmp_path):
    out = tmp_path / "out"
    began = time.monotonic()
    result = run(stub_env, out, deadline=100, plan="kernels:hang tests:fail", percent=2)  # kernels' limit: 2 s
    assert time.monotonic() - began < 30
    assert result.returncode == 1
    assert sorted(os.listdir(out)) == ["results.tar.gz", "summary.txt"]
    expected = dict.fromkeys(STEPS, "ok") | {"kernels": "timeout", "tests": "failed(exit"}
    assert statuses(out) == expected
    names = archived(out)
    for step in STEPS:
        assert {f"{step}/log.txt", f"{step}/out.txt"} <= names
    with tarfile.open(out / "results.tar.gz") as tar:
        assert b"profiles/decode.py --modes none cudagraph --max-batch 32" in tar.extractfile("./decode/log.txt").read()


def test_an_output_too_big_to_come_back_stays_out_of_the_archive_and_is_named(stub_env, tmp_path):
    out = tmp_path / "out"
    assert run(stub_env, out, deadline=100, plan="trace:big", percent=2).returncode == 0
    assert "trace/big.json" not in archived(out) and "trace/log.txt" in archived(out)
    assert "left out of the archive (over 8 MiB): ./trace/big.json" in (out / "summary.txt").read_text()


def test_the_deadline_cuts_the_running_step_and_skips_the_rest(stub_env, tmp_path):
    out = tmp_path / "out"
    began = time.monotonic()
    # At 10% the server step's limit is 13 s, but only 20 - 10 (reserve) s of the deadline are left.
    result = run(stub_env, out, deadline=20, plan="server:hang", percent=10)
    elapsed = time.monotonic() - began
    assert result.returncode == 1
    assert elapsed < 20, "the run outlasted its deadline"
    got = statuses(out)
    assert [got[s] for s in STEPS[:6]] == ["ok"] * 6 and got["server"] == "timeout"
    assert all(got[s].startswith("skipped") for s in STEPS[7:])
    assert "server/log.txt" in archived(out) and "decode/log.txt" not in archived(out)


def test_a_run_killed_mid_step_leaves_every_finished_step_packed(stub_env, tmp_path):
    out = tmp_path / "out"
    env = {**stub_env, "STUB_PLAN": "tests:hang", "GPU_FIRST_TIME_PERCENT": "100"}
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), "500"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: (out / "summary.txt").exists() and statuses(out).get("tests") == "running", 30, 0.1,
                 "the tests step never showed as running")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as the device tool does at its limit: no cleanup runs
        proc.wait()
        # `timeout` moved the step (and the stub's sleep) into a process group of its own, in the run's session: it
        # would outlive the test by the step's limit. Killed until none is left: a step's shell still alive starts
        # its next command when the one before is killed
        wait_for(lambda: not _killed(in_session(proc.pid)), 10, 0.05, "the run's processes to end with the test")
    assert statuses(out) == {"env": "ok", "deps": "ok", "kernels": "ok", "tests": "running"}
    assert {"env/log.txt", "deps/log.txt", "kernels/out.txt"} <= archived(out)


def _killed(pids: list[int]) -> list[int]:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids
