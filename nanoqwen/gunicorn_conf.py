"""gunicorn settings and hooks for nanoqwen, importable from anywhere.

Read by `gunicorn server:app` in the repository root (gunicorn.conf.py imports this module) and by
`nanoqwen serve` (`gunicorn -c python:nanoqwen.gunicorn_conf`). One gevent worker holds the model;
the engine runs in its own OS thread inside that worker and request greenlets only wait on it, so
one worker serves many concurrent streams.
"""
import sys

__all__ = [
    "bind", "worker_class", "workers", "worker_connections", "preload_app", "timeout", "graceful_timeout",
    "keepalive", "control_socket_disable", "accesslog", "access_log_format", "post_fork",
]

bind = "127.0.0.1:8000"
worker_class = "nanoqwen.worker.NanoqwenWorker"
workers = 1  # each worker loads its own copy of the model
worker_connections = 1000
preload_app = False  # works too: the worker starts the engine after the fork either way
timeout = 120  # heartbeat of the worker's loop (and its boot: torch import), not a limit on long streams
graceful_timeout = 30  # SIGTERM: running streams get this long to finish, then end with an error event
keepalive = 75  # longer than common proxies' idle timeouts; shutdown closes idle connections at once
control_socket_disable = True  # its default path is one per user: a second server would clash
accesslog = "-"
# method, path (no query string), status, response bytes, duration in ms, request id: never the prompt
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms request_id=%({x-request-id}o)s'


def post_fork(server, worker) -> None:
    from gunicorn.workers.ggevent import GeventWorker

    from nanoqwen.worker import NanoqwenWorker

    if type(worker) is GeventWorker:  # `-k gevent` on the command line overrides worker_class
        worker.__class__ = NanoqwenWorker
    elif not isinstance(worker, NanoqwenWorker):
        server.log.error("nanoqwen needs gunicorn's gevent worker (-k gevent), not %s", type(worker).__name__)
        sys.exit(server.WORKER_BOOT_ERROR)
