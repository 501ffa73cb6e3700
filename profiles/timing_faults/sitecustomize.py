"""Timing faults for the suite's servers, to find the tests that pass only while the engine thread, the worker's
greenlets and the client keep the pace a quiet machine gives them (the suite's intermittent failures under load).

    TIMING_FAULT_JITTER=0.05 PYTHONPATH=$PWD/profiles/timing_faults \
        python -m pytest -q -n 0 tests/test_server_failures.py

Every server a test starts inherits PYTHONPATH (absolute: some start in a temporary folder), so Python imports this
file in each gunicorn worker, which alone is changed (a process that imported gunicorn counts as one: a test process
of test_deploy.py or test_request_line.py under `-n 0` takes the faults in its own engines after). Each fault is off
unless its variable is set (seconds):
- TIMING_FAULT_LAG: a request's reader takes each event this long late (its greenlet sleeps), the engine running on;
- TIMING_FAULT_JITTER: every request (a legacy completion's prompts, queued together, as one) is queued up to this
  long late, uniformly: concurrent ones reach the engine in any order;
- TIMING_FAULT_STEP: each engine step takes this long more (a slower machine);
- TIMING_FAULT_HOLD: a request's reader holds the event loop this long at each event (a blocking sleep: the stalled
  loop that /health's bounds are for, to check that they still fail).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

LAG, JITTER, STEP, HOLD = (float(os.environ.get(f"TIMING_FAULT_{name}", "0"))
                           for name in ("LAG", "JITTER", "STEP", "HOLD"))
_blocking_sleep = time.sleep  # taken before gevent patches time: a step sleeps in the engine's own thread, a hold on
# the loop


def _in_worker() -> bool:
    return "gunicorn" in sys.modules


def _engine(module: ModuleType) -> None:
    enqueue, step = module.Engine.enqueue, module.Engine.step

    def late_enqueue(self: Any, requests: list[Any]) -> None:
        if _in_worker():
            # gevent's sleep once the worker patched time: the loop serves others, the engine thread steps
            time.sleep(random.uniform(0, JITTER))
        enqueue(self, requests)

    def slow_step(self: Any) -> None:
        if _in_worker():
            _blocking_sleep(STEP)
        step(self)

    if JITTER:  # each patch only where its fault is set: a sleep of 0 still yields the loop or the GIL
        module.Engine.enqueue = late_enqueue
    if STEP:
        module.Engine.step = slow_step


def _serving(module: ModuleType) -> None:
    get = module.Batch.get

    def late_get(self: Any, *args: Any, **kwargs: Any) -> Any:
        event = get(self, *args, **kwargs)
        if _in_worker():
            if LAG:
                time.sleep(LAG)
            if HOLD:
                _blocking_sleep(HOLD)
        return event

    if LAG or HOLD:
        module.Batch.get = late_get


_PATCHES: dict[str, Callable[[ModuleType], None]] = {"nanoqwen.engine.engine": _engine,
                                                     "nanoqwen.api.serving": _serving}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _PATCHES[name](module)
            print(f"timing faults in {name}: lag {LAG}, jitter {JITTER}, step {STEP}, hold {HOLD} s", file=sys.stderr,
                  flush=True)

        spec.loader.exec_module = exec_module
        return spec


if LAG or JITTER or STEP or HOLD:
    sys.meta_path.insert(0, _PatchAfterImport())
