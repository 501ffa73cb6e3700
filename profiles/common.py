"""Shared by the profile scripts: checkpoints, timed engine decode, machine facts, output files.

Also a fallback runner for pytest-style test files (`run_marked_tests`), which gpu_check.sh uses on
bare machines where pytest is not installed.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
OUT = REPO / "profiles" / "out"  # git-ignored default for --out
sys.path[:0] = [str(REPO), str(TESTS)]

from nanoqwen.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from nanoqwen.engine.stream import EventStream  # noqa: E402


# -- checkpoints and engines --------------------------------------------------------------
def add_engine_args(parser, dtype: bool = True) -> None:
    """The options every profile shares: where and how the engine runs, and where results go."""
    if dtype:
        parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--small", action="store_true", help="the 2-layer test model: a quick smoke run")
    parser.add_argument("--out", type=Path, default=OUT)


def checkpoint(small: bool) -> Path:
    """Qwen3-0.6B's shape in bf16 (built once, ~1.2 GB under .cache/), or the 2-layer test model."""
    from checkpoints import make_checkpoint, qwen3_0_6b_shape

    return make_checkpoint() if small else make_checkpoint(**qwen3_0_6b_shape(), dtype=torch.bfloat16)


def load_engine(
    model: Path, *, device: str, dtype: str, graph: str, kernels: str, max_batch: int, max_model_len: int
) -> Engine:
    engine = Engine(EngineConfig(
        model=str(model), device=device, dtype=dtype, graph=graph, kernels=kernels, max_batch=max_batch,
        max_queue=max_batch, max_model_len=max_model_len,
    ))
    engine.load()
    return engine


def release(device: torch.device) -> None:
    """Returns the memory of models just dropped, before the next one loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """Distinct prompts (no prefix-cache sharing) of ordinary token ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 150_000, (batch, length), generator=g).tolist()


@dataclass
class DecodeRun:
    batch: int
    step_s: list[float]  # wall time of each decode step (one token for every sequence)
    tokens: list[list[int]]  # generated ids per sequence, the prefill's first token included

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        """Aggregate decode throughput from the median step (robust to a noisy, shared machine)."""
        return self.batch / self.median_step_s

    @property
    def mean_tokens_per_s(self) -> float:
        return self.batch * len(self.step_s) / sum(self.step_s)


def engine_decode(engine: Engine, prompts: list[list[int]], new_tokens: int) -> DecodeRun:
    """Prefills every prompt in one step (untimed), then times each decode step of the whole batch.

    Each step is the engine's real `step()`: scheduling, input staging, the model, sampling and
    detokenisation; it ends with the sampled tokens on the host, so the wall time is the step's.
    """
    device = engine.runner.device
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    streams = [engine.submit(p, params)[1] for p in prompts]
    step_s = []
    with torch.inference_mode():
        engine._drain_inbox()
        engine.step()  # prefill: every prompt, and the first new token
        while engine.scheduler.has_work:
            if len(engine.scheduler.running) != len(prompts) or engine.scheduler.waiting:
                raise RuntimeError("a sequence was preempted or not prefilled with the others: enlarge the KV pool")
            synchronize(device)
            start = time.perf_counter()
            engine.step()
            synchronize(device)
            step_s.append(time.perf_counter() - start)
    return DecodeRun(len(prompts), step_s, [_generated(s) for s in streams])


def _generated(stream: EventStream) -> list[int]:
    tokens = []
    while stream._events:
        event = stream.get(timeout=0)
        if event.error:
            raise RuntimeError(event.error)
        tokens += event.token_ids
    return tokens


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes batch-1 decode must read per token: every weight once, except the embedding table.

    The lookup reads one row of it; when tied, the LM head reads the whole table (counted once).
    """
    embedding = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embedding
    total, seen = 0, set()
    for p in model.parameters():
        if p.data_ptr() in seen or (p is embedding and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total + embedding.shape[1] * embedding.element_size()


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Memory read bandwidth in bytes/s: the best of several sums over a buffer far larger than caches."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    del x
    release(device)
    return nbytes / best


# -- reporting ----------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, AttributeError):
        # Other busy processes stall torch's CPU threads: timings under load are not comparable.
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return info


def machine_line(info: dict) -> str:
    gpu = f"{info['gpu']}; " if "gpu" in info else ""
    libs = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers") if k in info)
    load = f"; load average {info['load_avg_1m']} at start" if "load_avg_1m" in info else ""
    return f"{gpu}{info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads); {libs}{load}"


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *rows])


def write_outputs(out: Path, stem: str, data: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown + "\n")


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- fallback test runner -----------------------------------------------------------------
# The subset of pytest the test files use: marks (parametrize, skipif, custom markers),
# pytest.param, fixtures (function/module/session scope, yield teardown, conftest.py),
# monkeypatch, tmp_path, raises, skip and importorskip.
class Skipped(Exception):
    pass


class _Mark:
    def __init__(self, name: str, args: tuple = (), kwargs: dict | None = None) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs or {}

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and (inspect.isfunction(args[0]) or inspect.isclass(args[0])):
            args[0].pytestmark = [*getattr(args[0], "pytestmark", []), self]
            return args[0]
        return _Mark(self.name, args, kwargs)


class _Param:
    def __init__(self, *values, marks=(), id: str | None = None) -> None:  # noqa: A002 (pytest's name)
        self.values, self.id = values, id
        self.marks = list(marks) if isinstance(marks, (list, tuple)) else [marks]


class _MonkeyPatch:
    def __init__(self) -> None:
        self._undo: list = []

    def setenv(self, name: str, value: str, prepend: str | None = None) -> None:
        old = os.environ.get(name)
        self._undo.append(lambda: _restore_env(name, old))
        os.environ[name] = f"{value}{prepend}{old}" if prepend and old else str(value)

    def delenv(self, name: str, raising: bool = True) -> None:
        if name not in os.environ:
            if raising:
                raise KeyError(name)
            return
        old = os.environ.pop(name)
        self._undo.append(lambda: _restore_env(name, old))

    def setattr(self, target, name: str, value, raising: bool = True) -> None:
        old = getattr(target, name) if raising or hasattr(target, name) else None
        self._undo.append(lambda: setattr(target, name, old))
        setattr(target, name, value)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _skip(reason: str = "", allow_module_level: bool = False) -> None:
    raise Skipped(reason)


def _importorskip(name: str, *_, **__):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise Skipped(f"could not import {name}") from None


@contextlib.contextmanager
def _raises(expected, match: str | None = None):
    info = types.SimpleNamespace(value=None, type=None)
    try:
        yield info
    except expected as exc:
        if match is not None and not re.search(match, str(exc)):
            raise AssertionError(f"{exc!r} does not match {match!r}") from exc
        info.value, info.type = exc, type(exc)
        return
    raise AssertionError(f"DID NOT RAISE {expected}")


def _fixture(func=None, *, scope: str = "function", autouse: bool = False, name: str | None = None):
    def mark(f):
        f._fixture = (name or f.__name__, scope, autouse)
        return f

    return mark(func) if func is not None else mark


class _MarkGenerator:
    def __getattr__(self, name: str) -> _Mark:
        return _Mark(name)


def _pytest_shim() -> types.ModuleType:
    shim = types.ModuleType("pytest")
    shim.mark = _MarkGenerator()
    shim.param, shim.fixture, shim.raises = _Param, _fixture, _raises
    shim.skip, shim.importorskip, shim.MonkeyPatch = _skip, _importorskip, _MonkeyPatch
    shim.skip.Exception = Skipped
    return shim


def _marks(obj) -> list[_Mark]:
    marks = getattr(obj, "pytestmark", [])
    return list(marks) if isinstance(marks, (list, tuple)) else [marks]


def _cases(marks: list[_Mark]) -> list[tuple[str, dict, list[_Mark]]]:
    """(id, arguments, marks) for each combination of the parametrize marks."""
    axes = []
    for mark in (m for m in marks if m.name == "parametrize"):
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        axis = []
        for value in values:
            param = value if isinstance(value, _Param) else _Param(*((value,) if len(names) == 1 else value))
            axis.append((param.id or "-".join(map(str, param.values)), dict(zip(names, param.values)), param.marks))
        axes.append(axis)
    cases = []
    for combo in itertools.product(*reversed(axes)):  # decorators apply bottom-up; ids read top-down
        cases.append(("-".join(c[0] for c in combo), {k: v for c in combo for k, v in c[1].items()},
                      [m for c in combo for m in c[2]]))
    return cases


def _skip_reason(marks: list[_Mark]) -> str | None:
    for mark in marks:
        if mark.name == "skip":
            return mark.kwargs.get("reason", "skipped")
        if mark.name == "skipif" and mark.args and mark.args[0]:
            return mark.kwargs.get("reason", "condition true")
    return None


SCOPES = {"function": "function", "class": "module", "module": "module", "package": "session", "session": "session"}
BUILTIN_FIXTURES = {"monkeypatch": _MonkeyPatch, "tmp_path": lambda: Path(tempfile.mkdtemp(prefix="test-"))}


class _Fixtures:
    """Fixture values per scope; yield fixtures are finalized when their scope ends."""

    def __init__(self, conftest: types.ModuleType | None) -> None:
        self.conftest = conftest
        self.values: dict[str, dict] = {"session": {}, "module": {}, "function": {}}
        self.finalizers: dict[str, list] = {"session": [], "module": [], "function": []}
        self.module: types.ModuleType | None = None

    def _definition(self, name: str):
        for source in (self.module, self.conftest):  # a test module's own fixture wins
            for obj in vars(source).values() if source is not None else ():
                if getattr(obj, "_fixture", (None,))[0] == name:
                    return obj
        return None

    def autouse(self) -> list[str]:
        sources = [vars(m).values() for m in (self.conftest, self.module) if m is not None]
        return [o._fixture[0] for o in itertools.chain(*sources) if getattr(o, "_fixture", (0, 0, False))[2]]

    def call(self, func, given: dict):
        kwargs = {}
        for name in inspect.signature(func).parameters:
            kwargs[name] = given[name] if name in given else self.value(name)
        return func(**kwargs)

    def value(self, name: str):
        definition = self._definition(name)
        if definition is None and name not in BUILTIN_FIXTURES:
            raise LookupError(f"fixture {name!r} not found")
        scope = SCOPES[definition._fixture[1]] if definition else "function"
        if name in self.values[scope]:
            return self.values[scope][name]
        if definition is None:
            value = BUILTIN_FIXTURES[name]()
            if isinstance(value, _MonkeyPatch):
                self.finalizers[scope].append(value.undo)
        else:
            value = self.call(definition, {})
            if inspect.isgenerator(value):
                gen, value = value, next(value)
                self.finalizers[scope].append(lambda: next(gen, None))
        self.values[scope][name] = value
        return value

    def end(self, scope: str) -> None:
        while self.finalizers[scope]:
            try:
                self.finalizers[scope].pop()()
            except Exception:
                print(f"ERROR in a {scope} fixture's teardown\n{traceback.format_exc()}", flush=True)
        self.values[scope].clear()


def _import(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def run_marked_tests(files: list[str], marker: str) -> int:
    """Runs the tests in `files` that carry `marker`, pytest-style, without pytest; 1 if any failed."""
    sys.modules["pytest"] = _pytest_shim()
    conftest_path = TESTS / "conftest.py"
    fixtures = _Fixtures(_import(conftest_path) if conftest_path.exists() else None)
    counts = {"passed": 0, "failed": 0, "skipped": 0}

    def report(outcome: str, test_id: str, detail: str = "") -> None:
        counts[outcome] += 1
        print(f"{outcome.upper()} {test_id}{' - ' + detail if detail else ''}", flush=True)

    for file in map(Path, files):
        try:
            fixtures.module = _import(file)
        except Skipped as exc:
            report("skipped", str(file), str(exc))
            continue
        except Exception:
            report("failed", str(file), "import error\n" + traceback.format_exc())
            continue
        module_marks = _marks(fixtures.module)
        for name, func in list(vars(fixtures.module).items()):
            if not name.startswith("test_") or not inspect.isfunction(func) or hasattr(func, "_fixture"):
                continue
            marks = module_marks + _marks(func)
            if marker not in {m.name for m in marks}:
                continue
            for case_id, args, case_marks in _cases(marks):
                test_id = f"{file}::{name}" + (f"[{case_id}]" if case_id else "")
                reason = _skip_reason(marks + case_marks)
                if reason is not None:
                    report("skipped", test_id, reason)
                    continue
                try:
                    for auto in fixtures.autouse():
                        fixtures.value(auto)
                    fixtures.call(func, args)
                    report("passed", test_id)
                except Skipped as exc:
                    report("skipped", test_id, str(exc))
                except Exception:
                    report("failed", test_id, "\n" + traceback.format_exc())
                finally:
                    fixtures.end("function")
        fixtures.end("module")
    fixtures.end("session")
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return 1 if counts["failed"] else 0
