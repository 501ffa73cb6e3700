"""A fallback runner for pytest-style test files, for bare GPU machines where pytest is not installed.

    python profiles/testrunner.py MARKER FILE...    runs the tests carrying MARKER; exit status 1 if any failed

gpu_check.sh uses it for the gpu-marked tests. It covers the subset of pytest the test files use:
marks (parametrize, skipif, custom markers), pytest.param, fixtures (function/module/session
scope, yield teardown, conftest.py), monkeypatch, tmp_path, raises, skip and importorskip.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import itertools
import os
import re
import sys
import tempfile
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path[:0] = [str(REPO), str(TESTS)]


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


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} MARKER FILE...")
    sys.exit(run_marked_tests(sys.argv[2:], sys.argv[1]))
