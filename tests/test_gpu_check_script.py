"""profiles/gpu_check.sh's command line: --help prints the usage, an option is never taken for OUTDIR."""
from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "profiles" / "gpu_check.sh"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=30)


def test_help_prints_usage_and_runs_nothing(tmp_path: Path) -> None:
    for flag in ("--help", "-h"):
        result = _run(flag, cwd=tmp_path)
        assert result.returncode == 0 and "OUTDIR [STEP ...]" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no "--help" output folder


def test_an_unknown_option_or_no_outdir_is_a_usage_error(tmp_path: Path) -> None:
    for args in (("--verbose",), ()):
        result = _run(*args, cwd=tmp_path)
        assert result.returncode == 2 and "usage:" in result.stderr
    assert list(tmp_path.iterdir()) == []
