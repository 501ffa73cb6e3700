"""gunicorn settings for tests (`-c tests/gunicorn_collections.py`): nanoqwen's, with a worker that logs each full
collection that starts while the model loads, and how many objects were frozen out of its walk then (a line
`load collection: frozen N` on stderr, in the server's log). Given by the environment: a test process must not import
this file (nanoqwen.gunicorn_conf makes the metrics' run directory)."""
import gc
import sys

from nanoqwen.gunicorn_conf import *  # noqa: F401,F403


def post_worker_init(_worker: object) -> None:
    from nanoqwen.wsgi import engine

    def logged(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2 and not engine.ready:
            print(f"load collection: frozen {gc.get_freeze_count()}", file=sys.stderr, flush=True)

    gc.callbacks.append(logged)
