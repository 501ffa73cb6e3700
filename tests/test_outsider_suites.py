"""profiles/outsider_suites.py, vLLM's and llama.cpp's server cases re-expressed, against a real gunicorn server: run
by the suite, not only by hand, so a change that breaks what those servers' own tests expect fails here."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server_process import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "profiles"))
import outsider_suites  # noqa: E402


def test_other_servers_cases_are_answered_as_they_expect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failed = outsider_suites.main(tmp_path)
    printed = capsys.readouterr().out
    cases = len(outsider_suites.CASES) + len(outsider_suites.SERVER_CHECKS)
    assert failed == 0 and f"{cases} of {cases} as expected" in printed, printed
