"""gunicorn settings and hooks for nanoqwen, importable from anywhere.

Read by `gunicorn server:app` in the repository root (gunicorn.conf.py imports this module) and by
`nanoqwen serve` (`gunicorn -c python:nanoqwen.gunicorn_conf`). One gevent worker holds the model;
the engine runs in its own OS thread inside that worker and request greenlets only wait on it, so
one worker serves many concurrent streams. With `--workers N` each worker takes a slot 0..N-1 and
with it a device (cuda:<slot>) or, on the CPU, a share of the cores (nanoqwen.placement); a
respawned worker takes its dead predecessor's slot, a reload's new worker an old one's.
"""
import os
import sys

from nanoqwen.api.shared_stats import finish_folds, forget_worker, heartbeat_dir, make_run_dir, remove_run_dir
from nanoqwen.boot_signals import exit_on_stop_signals
from nanoqwen.placement import SLOT_ENV, lowest_free_slot, place_worker
from nanoqwen.settings import GRACEFUL_TIMEOUT_S, WORKER_TIMEOUT_S, EngineConfig, env_setting

__all__ = [
    "bind", "worker_class", "workers", "worker_connections", "preload_app", "timeout", "graceful_timeout",
    "keepalive", "forwarder_headers", "control_socket_disable", "worker_tmp_dir", "accesslog", "access_log_format",
    "logger_class", "on_starting", "on_reload", "pre_fork", "post_fork", "child_exit", "on_exit",
]
# Here, not in a hook: `--preload` imports the app (and prometheus_client, which reads the
# multiprocess directory once, at import) before gunicorn runs any hook.
make_run_dir()
# In the child at once, before gunicorn logs its first line: post_fork's import of nanoqwen.worker (where `-k gevent`
# left it unimported) and the worker's of torch take seconds before gunicorn installs the worker's own handlers.
os.register_at_fork(after_in_child=exit_on_stop_signals)

bind = "127.0.0.1:8000"
worker_class = "nanoqwen.worker.NanoqwenWorker"
workers = 1  # each worker loads its own copy of the model
worker_connections = 1000
preload_app = False  # works too: the worker starts the engine after the fork either way
timeout = WORKER_TIMEOUT_S  # heartbeat of the worker's loop (and its boot), not a limit on long streams
graceful_timeout = GRACEFUL_TIMEOUT_S
keepalive = 75  # longer than common proxies' idle timeouts; shutdown closes idle connections 1 s after the stop
# gunicorn takes SCRIPT_NAME and PATH_INFO from a loopback peer's request headers by default: behind a proxy on this
# host that passes headers with underscores, any client turned any path (/health too) into a 500 ("does not start
# with SCRIPT_NAME"), or rewrote the path served. nanoqwen serves no root path.
forwarder_headers = ""
worker_tmp_dir = heartbeat_dir()  # the heartbeat file the worker's loop touches each second
control_socket_disable = True  # its default path is one per user: a second server would clash
accesslog = "-"
# method, path (no query string), status, response bytes, duration in ms, request id: never the prompt
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms request_id=%({x-request-id}o)s'
logger_class = "nanoqwen.access_log.AccessLogger"  # the path is percent-decoded: its control characters escaped


def on_starting(server) -> None:
    """Refuses gunicorn options it takes that nanoqwen cannot serve, before it listens (gunicorn prints the error and
    exits 1)."""
    refused = None
    if server.num_workers < 1:  # a master that listens and never forks, its connections queued for ever
        refused = f"nanoqwen needs at least one worker (--workers {server.num_workers})"
    elif "h2" in server.cfg.http_protocols:  # TLS's ALPN or, with --http2-cleartext, h2c: both need it
        # gunicorn serves HTTP/2 streams outside the worker's HTTP/1.1 handling: a client's cancel never reached the
        # engine (the answer generated to its end), and the send timeout and prefix checks were skipped
        refused = "nanoqwen serves HTTP/1.1 only: leave --http-protocols at h1 (put a proxy in front for HTTP/2)"
    if refused is not None:
        remove_run_dir()
        if server.pidfile is not None:  # gunicorn wrote it before this hook, and its exit on our error leaves it
            server.pidfile.unlink()
        raise RuntimeError(refused)


def on_reload(server) -> None:
    """SIGHUP: gunicorn forks the new workers, then stops the old ones. The old ones give up their slots, so that the
    new ones take 0..N-1 again (they took N..2N-1, and kept them); on CUDA, its KV pool sized from the free memory, a
    new one loads once the old one of its slot has gone (nanoqwen.worker's _wait_for_predecessors)."""
    for worker in server.WORKERS.values():
        worker.nanoqwen_retiring = True


def pre_fork(server, worker) -> None:
    finish_folds(server.log.exception)
    live = server.WORKERS.values()
    worker.nanoqwen_slot = lowest_free_slot({w.nanoqwen_slot for w in live if not w.nanoqwen_retiring})
    worker.nanoqwen_retiring = False
    worker.nanoqwen_predecessors = tuple(w.pid for w in live if w.nanoqwen_slot == worker.nanoqwen_slot)


def post_fork(server, worker) -> None:
    from gunicorn.workers.ggevent import GeventWorker

    from nanoqwen.worker import NanoqwenWorker

    if type(worker) is GeventWorker:  # `-k gevent` on the command line overrides worker_class
        worker.__class__ = NanoqwenWorker
    elif not isinstance(worker, NanoqwenWorker):
        server.log.error("nanoqwen needs gunicorn's gevent worker (-k gevent), not %s", type(worker).__name__)
        sys.exit(server.WORKER_BOOT_ERROR)

    os.environ[SLOT_ENV] = str(worker.nanoqwen_slot)
    requested = env_setting("device") or EngineConfig.device
    device, placed = place_worker(worker.nanoqwen_slot, server.num_workers, requested)
    os.environ["NANOQWEN_DEVICE"] = device
    if "nanoqwen.wsgi" in sys.modules:  # --preload built the engine's config in the master
        sys.modules["nanoqwen.wsgi"].engine.config.device = device
    server.log.info("worker %s: slot %s, %s", worker.pid, worker.nanoqwen_slot, placed)


def child_exit(server, worker) -> None:
    forget_worker(worker.pid, server.log.exception)


def on_exit(server) -> None:
    remove_run_dir()
