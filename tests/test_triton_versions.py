"""The Triton versions nanoqwen supports: 3.6 (the GPU machine's) up to the newest (what CI installs).

Without a GPU, each supported Triton must compile every kernel for sm_90 down to a cubin
(tests/triton_hopper.py), and run the kernel tests under its interpreter. The installed (newest)
Triton does both in every run; the oldest does when it is installed beside it, in a folder of its
own that PYTHONPATH puts first: `pip install --target .cache/triton-3.6 triton==3.6.0` (about 640 MB;
NANOQWEN_OLDEST_TRITON names another folder). It is a separate install because pip holds one
version per environment, and CI can afford it once per run: one wheel download, ~30 s of tests.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]
OLDEST = "3.6.0"
OLDEST_DIR = Path(os.environ.get("NANOQWEN_OLDEST_TRITON", REPO / ".cache" / "triton-3.6"))

pytestmark = pytest.mark.slow


def run(args: list[str], triton_dir: Path | None = None, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(triton_dir), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def assert_compiles_for_hopper(triton_dir: Path | None = None) -> str:
    result = run(["tests/triton_hopper.py"], triton_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "28 kernels compiled for sm_90" in result.stdout
    return result.stdout


def test_every_kernel_compiles_for_hopper():
    assert_compiles_for_hopper()


@pytest.mark.skipif(not (OLDEST_DIR / "triton").is_dir(),
                    reason=f"the oldest supported Triton is not installed: pip install --target {OLDEST_DIR} "
                           f"triton=={OLDEST}")
def test_the_oldest_supported_triton_compiles_and_interprets_every_kernel():
    version = run(["-c", "import triton; print(triton.__version__)"], OLDEST_DIR)
    assert version.stdout.strip() == OLDEST, version.stdout + version.stderr
    assert f"triton {OLDEST}:" in assert_compiles_for_hopper(OLDEST_DIR)
    tests = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"], OLDEST_DIR, interpret=True)
    assert tests.returncode == 0, tests.stdout[-5000:]
    assert " passed" in tests.stdout and " failed" not in tests.stdout
