"""`ruff check` (configured in pyproject.toml) passes on the whole repository, and no script or test module hides
a package under its own name."""
import pkgutil
import subprocess
import sys

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
