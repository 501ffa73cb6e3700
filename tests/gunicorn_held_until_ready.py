"""gunicorn settings for tests (`-c tests/gunicorn_held_until_ready.py`): nanoqwen's, with a worker that holds a
request sent with the header `X-Held-Until-Ready` after nanoqwen's worker has looked at whether the model loaded and
before gunicorn counts it (its pre_request hook), until the model has loaded: a request that began while the model
loaded and was answered as served, made on purpose. Given by the environment: a test process must not import this file
(nanoqwen.gunicorn_conf makes the metrics' run directory)."""
import gevent

from nanoqwen.gunicorn_conf import *  # noqa: F401,F403


def pre_request(worker: object, req: object) -> None:
    from nanoqwen.wsgi import engine

    if any(name == "X-HELD-UNTIL-READY" for name, _ in req.headers):
        while not engine.ready:
            gevent.sleep(0.01)
