"""Waiting on a condition with a deadline, for the tests and profiles: a module of its own, below engine_util and
chat_http (chat_http imports engine_util, so neither can hold it for the other)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, poll: float = 0.05,
             what: str | Callable[[], str] = "condition not reached in time") -> T:
    """predicate()'s first truthy value, asked every `poll` s; past `timeout` the test fails saying `what` (a callable:
    what it says then, e.g. a server's log)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(poll)
    return value
