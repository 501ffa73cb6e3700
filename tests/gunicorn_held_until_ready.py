"""gunicorn settings for tests (`-c tests/gunicorn_held_until_ready.py`): nanoqwen's, with a worker that holds a request
until the model has loaded, made on purpose at the two ends of the loading window of nanoqwen's count of
--max-requests (a line in the server's log where it was):

- sent with the header `X-Held-Until-Ready`: after nanoqwen's worker has looked at whether the model loaded and before
  gunicorn counts it (its pre_request hook): a request that began while the model loaded and was answered as served
  (`held until ready`);
- sent with `X-Held-After-Its-Answer`: after its answer was written and before nanoqwen's worker counts it (the
  post_request hook), where the model was still loading then: a request answered "loading" whose worker found the
  model loaded at its end (`loaded after its answer`), as the loading thread makes it under load.

Given by the environment: a test process must not import this file (nanoqwen.gunicorn_conf makes the metrics' run
directory)."""
import sys

import gevent

from nanoqwen.gunicorn_conf import *  # noqa: F401,F403


def _held_until_ready(req: object, header: str, line: str) -> None:
    from nanoqwen.wsgi import engine

    if any(name == header for name, _ in req.headers) and not engine.ready:
        while not engine.ready:
            gevent.sleep(0.01)
        print(line, file=sys.stderr, flush=True)


def pre_request(worker: object, req: object) -> None:
    _held_until_ready(req, "X-HELD-UNTIL-READY", "held until ready")


def post_request(worker: object, req: object, environ: object, resp: object) -> None:
    _held_until_ready(req, "X-HELD-AFTER-ITS-ANSWER", "loaded after its answer")
