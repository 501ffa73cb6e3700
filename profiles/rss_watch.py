"""The worker's memory under long use, read from a server log that profiles/gil_watch_conf.py's memory watch wrote.

    NANOQWEN_PROFILE_MEMORY_WATCH_S=16 python profiles/flood_grammars.py --seconds 660 --out DIR
    GUNICORN_CMD_ARGS="-c profiles/gil_watch_conf.py" NANOQWEN_PROFILE_MEMORY_WATCH_S=16 \
        python profiles/soak.py --modes default --rounds 1 --round-seconds 600 --out DIR
    python profiles/rss_watch.py DIR/flood_grammars.log [--points 8]

Prints `--points` of the log's `memory_watch:` lines, evenly spaced from the first to the last: seconds since the
first, the worker's RSS and its anonymous part, what malloc has handed out and holds free (MB), Python's allocated
blocks, the grammars cached, the stored chat completions' and responses' counts and MB, the requests finished; then
the RSS growth a minute over the last half of the lines, and malloc's handed-out growth over it (a leak grows both;
memory freed but held by the allocator, RSS alone). With NANOQWEN_PROFILE_TRIM_S set, the first and the last
`malloc_trim:` lines too.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "profiles")]

from gil_watch_conf import MEMORY_WATCH_LINE, TRIM_LINE  # noqa: E402

FIELD = r"(\w+)=([\d.]+)(?:/(\d+))?"
# a whole line: another process's line written into it (the access log's, on the same file) leaves it out
LINE = re.compile(rf"{MEMORY_WATCH_LINE}([\d.]+)((?: {FIELD})+)$")


def rows(log: str) -> list[dict[str, Any]]:
    """Each memory_watch line's figures: t, rss_mb, malloc_used_mb, ..., chats and responses as (count, bytes)."""
    out = []
    for line in log.splitlines():
        if (m := LINE.match(line)) is None:
            continue
        row: dict[str, Any] = {"t": float(m[1])}
        for name, value, size in re.findall(FIELD, m[2]):
            row[name] = (int(value), int(size)) if size else float(value)
        out.append(row)
    return out


def per_minute(points: list[dict[str, Any]], name: str) -> float:
    """`name`'s growth a minute from the first of `points` to the last (at least two, apart in time)."""
    return (points[-1][name] - points[0][name]) * 60 / (points[-1]["t"] - points[0]["t"])


def slopes(half: list[dict[str, Any]]) -> str:
    """The growth a minute over `half`, the log's last half; "too short" where it spans no time."""
    seconds = half[-1]["t"] - half[0]["t"]
    if seconds <= 0:
        return f"last half ({len(half)} line{'s' * (len(half) != 1)}): too short for a slope"
    return (f"last half ({seconds:.0f} s): RSS {per_minute(half, 'rss_mb'):+.2f} MB/min, anonymous "
            f"{per_minute(half, 'anon_mb') if 'anon_mb' in half[0] else float('nan'):+.2f} MB/min, "
            f"malloc used {per_minute(half, 'malloc_used_mb'):+.2f} MB/min, malloc free "
            f"{per_minute(half, 'malloc_free_mb'):+.2f} MB/min, Python blocks {per_minute(half, 'py_blocks'):+.0f}/min")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--points", type=int, default=8)
    args = parser.parse_args()
    log = args.log.read_text(errors="replace")
    watched = rows(log)
    if len(watched) < 2:
        print(f"{args.log}: fewer than 2 {MEMORY_WATCH_LINE.strip()} lines")
        return 1
    picks = sorted({round(i * (len(watched) - 1) / max(args.points - 1, 1)) for i in range(args.points)})
    print("| s | RSS MB | anonymous MB | malloc used MB | malloc free MB | Python blocks | grammars | chats (MB) | "
          "responses (MB) | finished |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in (watched[i] for i in picks):
        chats, responses = row["chats"], row["responses"]
        print(f"| {row['t'] - watched[0]['t']:.0f} | {row['rss_mb']:.0f} | {row.get('anon_mb', 0):.0f} | "
              f"{row['malloc_used_mb']:.0f} | "
              f"{row['malloc_free_mb']:.0f} | {row['py_blocks']:.0f} | {row['grammars']:.0f} | "
              f"{chats[0]} ({chats[1] / 2**20:.1f}) | {responses[0]} ({responses[1] / 2**20:.1f}) | "
              f"{row['finished']:.0f} |")
    print(slopes(watched[len(watched) // 2:]))
    trims = [line for line in log.splitlines() if line.startswith(TRIM_LINE)]
    if trims:
        print(f"{len(trims)} trims; the first and the last:", trims[0], trims[-1], sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
