"""profiles/rss_watch.py's slope over a log's last half: a log too short for one says so, not a flat +0.00."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from server_process import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "profiles"))
import rss_watch  # noqa: E402


def _printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             *points: tuple[float, float]) -> str:
    """rss_watch's last line for a log of memory_watch lines at (seconds, RSS MB), their other figures alike."""
    log = tmp_path / "server.log"
    log.write_text("".join(f"memory_watch: {t:.3f} rss_mb={rss:.0f} anon_mb=400 malloc_used_mb=300.0 "
                           "malloc_free_mb=9.0 py_blocks=1000 grammars=0 chats=0/0 responses=0/0 finished=0\n"
                           for t, rss in points))
    monkeypatch.setattr(sys, "argv", ["rss_watch.py", str(log)])
    assert rss_watch.main() == 0
    return capsys.readouterr().out.splitlines()[-1]


@pytest.mark.parametrize("points", [[(10.0, 500), (26.0, 560)], [(10.0, 500), (26.0, 530), (26.0, 560)]])
def test_a_last_half_that_spans_no_time_is_too_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str],
                                                     points: list[tuple[float, float]]) -> None:
    assert "too short" in _printed(tmp_path, monkeypatch, capsys, *points)


def test_a_last_half_of_two_lines_gives_its_slope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    printed = _printed(tmp_path, monkeypatch, capsys, (0.0, 480), (10.0, 500), (40.0, 530))
    assert printed.startswith("last half (30 s): RSS +60.00 MB/min")
