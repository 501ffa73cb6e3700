"""The tally of a differential or fuzzing run (differential.py, fuzz_schemas.py)."""
from __future__ import annotations


class Checks:
    """Counts the checks passed; prints and keeps each failure (`passed` and `failures` are the user's fields)."""

    passed: int
    failures: list[str]

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)
            print("FAIL", what, flush=True)
