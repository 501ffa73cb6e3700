"""The WSGI app and its engine, configured from NANOQWEN_* variables (`server.py` re-exports them).

Under nanoqwen's worker (named by nanoqwen's gunicorn config, or by `-k nanoqwen.worker.NanoqwenWorker`
without it: gunicorn imports the worker class before the app) the worker starts the engine thread
after the fork, so `--preload` can import this module in the master. Anywhere else, importing it
starts the engine: the model loads in that thread while `/health` already answers 503 (a child forked
after that, `--preload` with a plain worker, has no engine thread: its /health and requests say so).
"""
import atexit
import sys
from collections.abc import Callable

from nanoqwen.api.app import create_app
from nanoqwen.api.config import ServerConfig
from nanoqwen.engine import Engine, EngineConfig

engine = Engine(EngineConfig.from_env())
app = create_app(engine, ServerConfig.from_env(engine.config.model))


def start_engine(before_ready: Callable[[], None] | None = None) -> None:
    """Starts the engine thread (Engine.start refuses a second) and stops it at exit."""
    engine.start(before_ready)
    atexit.register(engine.shutdown)


if not {"nanoqwen.gunicorn_conf", "nanoqwen.worker"} & sys.modules.keys():
    start_engine()
