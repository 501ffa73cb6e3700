"""Which call of a large JSON Schema's admission holds the GIL longest: the grammar pool's phases for a strict
`response_format` (structured._json_schema's path, then llguidance's check and compile), each run alone on the main
thread while a watcher thread sleeps `--tick-ms` in a loop and records how late it wakes (a wake waits for the GIL: a
thread running Python hands it over at the switch interval; a C call that keeps it, only when it returns). A pure
Python busy loop is the baseline row: what the switch interval alone costs a waiting thread. Imported objects are
frozen first (gc.freeze, as the gunicorn worker does), so a phase's own collections are what the collector walks: its
full (generation 2) collections counted, and its longest collection given (CPU ms: the walk's own, whatever
the load). `--calls`: a second pass under sys.setprofile names each phase's longest C calls (wall: llguidance's
compile drops the GIL inside, which the wake column tells). `--put-off`: each phase run as the grammars' pool runs its
jobs, with full collections put off (nanoqwen/api/full_collections.py; one due then runs as the next phase starts,
in its wall and columns).

    python profiles/bench_gil_holds.py SCHEMA.json [SCHEMA.json ...] [--rounds 3] [--tick-ms 1] [--calls] [--put-off]

Prints, per schema and phase: the median over rounds of its wall ms, its longest wake delay (ms), the number of wakes
later than 10 ms, the full collections a run, and the longest collection (CPU ms, its generation); with --calls, the
three longest C calls.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from llguidance import LLMatcher  # noqa: E402

from checkpoints import EOS_IDS, VOCAB_SIZE, make_checkpoint  # noqa: E402
from gc_timing import timed_collections  # noqa: E402
from nanoqwen.api.full_collections import FULL_COLLECTIONS  # noqa: E402
from nanoqwen.api.schema_patterns import ecma_patterns  # noqa: E402
from nanoqwen.api.structured import _json_key  # noqa: E402
from nanoqwen.engine import grammar  # noqa: E402
from nanoqwen.engine.grammar_rows import schema_weight  # noqa: E402
from nanoqwen.engine.object_runs import Merges  # noqa: E402
from nanoqwen.loader import load_tokenizer  # noqa: E402
from nanoqwen.text import TokenBytes  # noqa: E402

PARAM = "response_format"
LATE_S = 0.010
BUSY_S = 0.3


@dataclass
class Watch:
    """The watcher thread's wake delays and the main thread's collections, of the phase now running."""

    tick: float
    delays: list[float] = field(default_factory=list)
    collections: list[tuple[float, int, int]] = field(default_factory=list)  # (CPU seconds, generation, collected)
    stop: threading.Event = field(default_factory=threading.Event)

    def watch(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            time.sleep(self.tick)
            self.delays.append(time.perf_counter() - started - self.tick)

    def collected(self, info: dict[str, int], wall: float, cpu: float) -> None:
        if threading.current_thread() is threading.main_thread():
            self.collections.append((cpu, info["generation"], info["collected"]))

    def run(self, fn: Callable[[], Any]) -> tuple[float, list[float], list[tuple[float, int, int]]]:
        """fn()'s wall seconds, the wake delays and the collections while it ran."""
        self.delays, self.collections = [], []
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started, self.delays, self.collections


def busy() -> None:
    deadline = time.perf_counter() + BUSY_S
    while time.perf_counter() < deadline:
        pass


def outcome(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn, its refusal (a 400's, a cut cycle's) its outcome."""
    def run() -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 — a refused schema is still a measured phase
            return exc
    return run


def phases(schema: dict[str, Any], tokenizer: Any) -> dict[str, Callable[[], Any]]:
    """The admission's steps, each on what the one before made (made once here, outside the timing)."""
    text = json.dumps(schema)
    merges = Merges()
    held = ecma_patterns(schema, PARAM, merges=merges)
    grammar_text = grammar._json_grammar(held, True, PARAM)
    return {
        "busy Python (baseline)": busy,
        "json.loads (the body)": lambda: json.loads(text),
        "cache key (json.dumps)": lambda: _json_key(schema, True, PARAM, False),
        "json copy (loads(dumps))": lambda: json.loads(json.dumps(schema)),
        "ecma_patterns": outcome(lambda: ecma_patterns(schema, PARAM, merges=Merges())),
        "grammar_from_json_schema": lambda: grammar._json_grammar(held, True, PARAM),
        "rules_bound": lambda: grammar.rules_bound(grammar_text),
        "schema_weight": outcome(lambda: schema_weight(held, Merges())),
        "schema_weight, merges shared": outcome(lambda: schema_weight(held, merges)),
        "llguidance validate_grammar": lambda: LLMatcher.validate_grammar(grammar_text),
        "llguidance compile": lambda: LLMatcher(tokenizer, grammar_text, log_level=0, limits=grammar.LIMITS),
        "gc.collect()": gc.collect,
    }


def longest_calls(fn: Callable[[], Any], top: int = 3) -> list[tuple[float, str]]:
    """fn's `top` longest C calls (wall), under sys.setprofile."""
    open_calls: list[tuple[float, str]] = []
    spent: list[tuple[float, str]] = []

    def profile(_frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            open_calls.append((time.perf_counter(), f"{getattr(arg, '__module__', None) or ''}.{arg.__qualname__}"))
        elif event in ("c_return", "c_exception") and open_calls:
            started, name = open_calls.pop()
            spent.append((time.perf_counter() - started, name))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return sorted(spent, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("schemas", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tick-ms", type=float, default=1.0)
    parser.add_argument("--calls", action="store_true", help="also name each phase's longest C calls")
    parser.add_argument("--put-off", action="store_true", help="full collections put off in each phase")
    args = parser.parse_args()
    checkpoint_tokenizer = load_tokenizer(make_checkpoint())
    grammars = grammar.Grammars(checkpoint_tokenizer, TokenBytes(checkpoint_tokenizer), VOCAB_SIZE, EOS_IDS)
    watch = Watch(args.tick_ms / 1e3)
    gc.collect()
    gc.freeze()
    gc.callbacks.append(timed_collections(watch.collected))
    watcher = threading.Thread(target=watch.watch, daemon=True)
    watcher.start()
    print(f"switch interval {sys.getswitchinterval() * 1e3:g} ms; tick {args.tick_ms:g} ms; rounds {args.rounds}; "
          f"full collections {'put off' if args.put_off else 'as Python runs them'}")
    for path in args.schemas:
        schema = json.loads(path.read_text())
        steps = phases(schema, grammars._tokenizer)
        print(f"\n{path.name}: {len(json.dumps(schema)) / 1e3:.0f} KB")
        print(f"{'phase':32s} {'wall ms':>8s} {'wake max':>8s} {'>10ms':>5s} {'full':>6s} {'gc cpu':>6s} longest's")
        for name, step in steps.items():
            runs = [watch.run(partial(FULL_COLLECTIONS.put_off, step) if args.put_off else step)
                    for _ in range(args.rounds)]
            wall = statistics.median(r[0] for r in runs) * 1e3
            late = max(max(r[1], default=0.0) for r in runs) * 1e3
            many = statistics.median(sum(d > LATE_S for d in r[1]) for r in runs)
            full = statistics.median(sum(c[1] == 2 for c in r[2]) for r in runs)
            worst = max((c for r in runs for c in r[2]), default=(0.0, 0, 0))
            print(f"{name:32s} {wall:8.1f} {late:8.1f} {many:5.0f} {full:6.0f} {worst[0] * 1e3:6.1f} "
                  f"{f'gen{worst[1]}, {worst[2]} collected' if worst[0] else ''}")
            if args.calls:
                calls = longest_calls(step)
                print("    " + "; ".join(f"{call} {seconds * 1e3:.1f} ms" for seconds, call in calls))
    watch.stop.set()


if __name__ == "__main__":
    main()
