"""gunicorn settings for tests (`-c tests/gunicorn_collections.py`): nanoqwen's, with a worker that logs, on stderr (in
the server's log), whether its imports before it serves took transformers in (`imported transformers: True`), and each
full collection that starts while the model loads with how many objects were frozen out of its walk then
(`load collection: frozen N`). Given by the environment: a test process must not import this file
(nanoqwen.gunicorn_conf makes the metrics' run directory)."""
import gc
import sys

from nanoqwen.gunicorn_conf import *  # noqa: F401,F403


def post_worker_init(_worker: object) -> None:
    from nanoqwen.wsgi import engine

    print(f"imported transformers: {'transformers' in sys.modules}", file=sys.stderr, flush=True)

    def logged(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2 and not engine.ready:
            print(f"load collection: frozen {gc.get_freeze_count()}", file=sys.stderr, flush=True)

    gc.callbacks.append(logged)
