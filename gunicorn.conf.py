"""gunicorn defaults, read by a bare `gunicorn server:app` run from the repository root.

One gevent worker holds the model; the engine runs in its own OS thread inside that worker and
request greenlets only wait on it, so one worker serves many concurrent streams.
"""

bind = "127.0.0.1:8000"
worker_class = "gevent"
workers = 1  # each worker would load its own copy of the model
worker_connections = 1000
preload_app = False  # server.py starts the engine thread: it must run in the worker, not the master
timeout = 120  # heartbeat of the worker's loop (and its boot: torch import), not a limit on long streams
graceful_timeout = 30
keepalive = 75
control_socket_disable = True  # its default path is one per user: a second server would clash


def post_fork(server, worker) -> None:
    # The gevent worker monkey-patches right after this hook. Importing the engine first keeps
    # torch/transformers on real threading primitives (they run in the engine's OS thread) and
    # out of reach of modules that break once patched (trio, pulled in by httpx, needs select.epoll).
    import warnings

    from gevent.monkey import MonkeyPatchWarning

    import nanoqwen.engine  # noqa: F401
    import ops

    ops.build_cpu_kernels()  # runs the C compiler: must happen before gevent patches subprocess

    # Expected after the import above: httpx's TLS modules keep the unpatched ssl (fine: Hub
    # downloads run in the engine thread), and gevent's scan of live objects trips a torch alias.
    warnings.filterwarnings("ignore", "Monkey-patching ssl after ssl", MonkeyPatchWarning)
    warnings.filterwarnings("ignore", ".*torch.distributed.reduce_op", FutureWarning)
