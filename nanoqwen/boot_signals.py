"""A gunicorn worker's stop signals from its fork until gunicorn installs its own handlers (Worker.init_signals)."""
import os
import signal
from types import FrameType

from gunicorn.arbiter import Arbiter

# What the master sends a worker to stop it: SIGTERM (graceful), SIGQUIT (quick); SIGINT comes with Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)


def exit_on_stop_signals() -> None:
    """Until Worker.init_signals a forked worker runs the master's handlers, which queue the signal for a loop that
    only the master runs: a stop sent while the worker imports torch and gevent (seconds) was lost, and the worker
    loaded the model and served on until the master killed it at the graceful timeout. Nothing has started yet, so
    there is nothing to finish: exit at once. Only in such a worker (the master's handlers still in place): the
    at-fork hook stays for good, in the master's forks before its handlers and in any child a worker forks."""
    if not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), Arbiter):
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit)


def _exit(sig: int, frame: FrameType | None) -> None:
    os._exit(0)
