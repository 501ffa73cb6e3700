"""gunicorn settings for tests (`-c tests/gunicorn_held_until_ready.py`): nanoqwen's, with a worker that holds a request
sent with the header `X-Held-Until-Ready` after nanoqwen's worker has looked at whether the model loaded and before
gunicorn counts it (its pre_request hook), until the model has loaded: a request that began while the model loaded
and was answered as served, made on purpose (`held until ready` in the server's log where it was). Given by the
environment: a test process must not import this file (nanoqwen.gunicorn_conf makes the metrics' run directory)."""
import sys

import gevent

from nanoqwen.gunicorn_conf import *  # noqa: F401,F403


def pre_request(worker: object, req: object) -> None:
    from nanoqwen.wsgi import engine

    if any(name == "X-HELD-UNTIL-READY" for name, _ in req.headers) and not engine.ready:
        while not engine.ready:
            gevent.sleep(0.01)
        print("held until ready", file=sys.stderr, flush=True)
