"""The hub's cost of the serving statistics (nanoqwen.api.metrics): a streamed token's record, a request's events and
finish (of one choice, and of 128: two tokens each; of one, then published: every histogram added to), a publish after
50 tokens, a /metrics scrape whole and with
`name[]` naming one series (a revision without the filter is not timed there); with `--base REV`, that revision's
metrics.py alternated with the tree's in this process (best of 3 rounds of 3 repeats each). Under gunicorn each
metric's update is a locked write to a map: PROMETHEUS_MULTIPROC_DIR (an empty directory) times that mode.

    python profiles/bench_metrics.py --base 3deb007
    PROMETHEUS_MULTIPROC_DIR=$(mktemp -d) python profiles/bench_metrics.py --base 3deb007
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoqwen.api import metrics  # noqa: E402
from nanoqwen.engine.request import Event, Usage  # noqa: E402


def revision(rev: str) -> ModuleType:
    """`rev`'s nanoqwen/api/metrics.py as a module of its own."""
    source = subprocess.run(["git", "show", f"{rev}:nanoqwen/api/metrics.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "base_metrics.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("base_metrics", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["base_metrics"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def per_token(mod: ModuleType) -> Callable[[], None]:
    stats = mod.ServerStats(lambda: None)
    return lambda: stats.record_tokens(1, 1.0, 0.02)


def per_request(mod: ModuleType, choices: int = 1, publish: bool = False) -> Callable[[], None]:
    """A request finished (`publish`: and published, every histogram then added to)."""
    stats = mod.ServerStats(lambda: None)
    stats.publish()
    submitted = "submitted" in inspect.signature(mod.ServerStats.finish).parameters
    prompts = "prompts" in getattr(mod, "Submitted", object).__dataclass_fields__ if submitted else False

    def one() -> None:
        trace = stats.begin()
        for index in range(choices):
            trace.on_event(Event(index=index, token_ids=[1]))
            trace.on_event(Event(index=index, token_ids=[2], finish_reason="length"))
        if prompts:
            stats.finish(trace, Usage(5, 2 * choices), mod.Submitted(choices, 16, [5]))
        elif submitted:
            stats.finish(trace, Usage(5, 2 * choices), mod.Submitted(choices, 16))
        else:
            stats.finish(trace, Usage(5, 2 * choices))
        if publish:
            stats.publish()
    return one


def per_publish(mod: ModuleType) -> Callable[[], None]:
    stats = mod.ServerStats(lambda: {"active_requests": 1, "queue_length": 0, "kv_usage": 0.1})
    stats.publish()

    def one() -> None:
        for _ in range(50):
            stats.record_tokens(1, 1.0, 0.02)
        stats.publish()
    return one


def per_scrape(mod: ModuleType, names: tuple[str, ...] | None = None) -> Callable[[], None] | None:
    """None where `mod`'s scrape takes no `name[]` filter."""
    if names is not None and "names" not in inspect.signature(mod.ServerStats.prometheus).parameters:
        return None
    stats = mod.ServerStats(lambda: {"active_requests": 1, "queue_length": 0, "kv_usage": 0.1})
    stats.publish()
    return functools.partial(stats.prometheus, *(() if names is None else (names,)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", help="a revision whose metrics.py is timed alongside")
    args = parser.parse_args()
    modules = {"tree": metrics, **({args.base: revision(args.base)} if args.base else {})}
    print(f"load {os.getloadavg()[0]:.1f}")
    for name, make, number in (("a streamed token", per_token, 200_000), ("a request", per_request, 20_000),
                               ("a request of 128 choices", functools.partial(per_request, choices=128), 200),
                               ("a publish after 50 tokens", per_publish, 2_000),
                               ("a request and a publish", functools.partial(per_request, publish=True), 2_000),
                               ("a scrape", per_scrape, 200),
                               ("a scrape of name[]=vllm:num_requests_running",
                                functools.partial(per_scrape, names=("vllm:num_requests_running",)), 200)):
        best: dict[str, float] = {}
        for _ in range(3):  # rounds, alternating the modules
            for label, module in modules.items():
                if (one := make(module)) is not None:
                    seconds = min(timeit.repeat(one, number=number, repeat=3)) / number
                    best[label] = min(best.get(label, seconds), seconds)
        print(f"{name}: " + ", ".join(f"{label} {us * 1e6:.2f} us" for label, us in best.items()))


if __name__ == "__main__":
    main()
