"""Which kernel wrappers a dispatch called, and with how many activation rows."""
from __future__ import annotations

from types import ModuleType

import pytest


def record_rows(monkeypatch: pytest.MonkeyPatch, calls: list[tuple[str, int]],
                *targets: tuple[ModuleType, str]) -> None:
    """Each call of module.name appends (name, its first argument's rows) to `calls`, then runs."""
    for module, name in targets:
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda x, *a, real=real, name=name: calls.append((name, x.shape[0])) or real(x, *a))
