"""`ruff check` (configured in pyproject.toml) passes on the whole repository, no script or test module hides a
package under its own name, and each profile script imports its own checkout's nanoqwen."""
import pkgutil
import subprocess
import sys
from pathlib import Path

from server_process import REPO_ROOT


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_module_in_profiles_or_tests_shadows_an_installed_one() -> None:
    # Both folders go first on sys.path (a script's own folder; the tests that import the profiles' checkers), so a
    # profiles/kernels.py once hid the `kernels` package transformers 5 imports, and every checkpoint build failed.
    ours = {str(REPO_ROOT / "profiles"), str(REPO_ROOT / "tests"), str(REPO_ROOT)}
    installed = {m.name for m in pkgutil.iter_modules() if getattr(m.module_finder, "path", None) not in ours}
    installed |= set(sys.stdlib_module_names)
    clashes = [f"{folder}/{path.name}" for folder in ("profiles", "tests")
               for path in (REPO_ROOT / folder).glob("*.py") if path.stem in installed]
    assert not clashes, clashes


# Run in one process that forks a child per script after importing what they share, this checkout's nanoqwen included
# (a second a script at load, where a script's own costs a tenth): so each child's import of nanoqwen finds it loaded
# and looks for no file, the file it would find on the script's sys.path is checked at each import of it instead.
_IMPORT_EACH = """
import builtins, importlib.machinery, os, runpy, signal, sys
import openai, requests, torch, transformers
decoy, checkout, scripts = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, checkout)
import nanoqwen.api, nanoqwen.engine
del sys.path[0]
ours, imported = os.path.realpath(os.path.join(checkout, "nanoqwen", "__init__.py")), builtins.__import__

def checked(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0 and name.partition(".")[0] == "nanoqwen":
        spec = importlib.machinery.PathFinder.find_spec("nanoqwen", sys.path)
        found = spec and os.path.realpath(spec.origin)
        if found != ours:
            raise ImportError(f"nanoqwen from {found}, not from {ours}")
    return imported(name, globals, locals, fromlist, level)

failed = False
for script in scripts:
    pid = os.fork()
    if pid == 0:
        signal.alarm(120)  # a hung import fails its script, not the suite's timeout
        sys.path[:] = [os.path.dirname(script), decoy, *sys.path[1:]]  # as `PYTHONPATH=decoy python script`
        builtins.__import__ = checked
        try:
            runpy.run_path(script, run_name="__imported__")
        except BaseException as exc:
            print(os.path.basename(script), repr(exc)[:300], flush=True)
            os._exit(1)
        os._exit(0)
    failed |= os.waitpid(pid, 0)[1] != 0
sys.exit(failed)
"""
# Measures whichever checkout PYTHONPATH names (its docstring says so).
_ON_PYTHONPATH = {"bench_responses_stall.py"}


def test_each_profile_script_imports_its_own_checkouts_nanoqwen(tmp_path: Path) -> None:
    # `python profiles/x.py` puts only profiles/ first on sys.path: a script that does not put its checkout there too
    # imports whatever nanoqwen is installed (another checkout's, or none: bench_client_gone and fuzz_openapi stopped
    # on their first import where the editable install pointed elsewhere). A decoy package stands for that one here.
    (tmp_path / "nanoqwen").mkdir()
    (tmp_path / "nanoqwen" / "__init__.py").write_text("raise ImportError('not this checkout')\n")
    scripts = [str(path) for path in sorted((REPO_ROOT / "profiles").glob("*.py"))
               if path.name not in _ON_PYTHONPATH and '__name__ == "__main__"' in path.read_text()]
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, str(tmp_path), str(REPO_ROOT.resolve()), *scripts],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
