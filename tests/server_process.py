"""`gunicorn server:app` (or `nanoqwen serve`) in a subprocess on a free loopback port (for tests and benchmarks)."""
from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import openai

REPO_ROOT = Path(__file__).resolve().parents[1]


_HANDED_OUT: set[int] = set()
# ports handed out by any live process (the suite's two test processes), one file each holding its owner's pid
CLAIMS = Path(tempfile.gettempdir()) / "nanoqwen-test-ports"


def free_port() -> int:
    """A port free now and never handed out before in this process or another live one: servers launched together
    pick theirs before any of them binds, and the kernel may offer one port twice (a server that lost the race kept
    retrying its bind while the winner's /health answered its test)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT and _claim(port):
            _HANDED_OUT.add(port)
            return port


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists (signal 0 checks, sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _claim(port: int) -> bool:
    """Claims `port` for this process unless another live one has (a dead owner's claim is taken over)."""
    CLAIMS.mkdir(exist_ok=True)
    path = CLAIMS / str(port)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            os.kill(int(path.read_text()), 0)
            return False  # its owner lives
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            return _claim(port)
        except (ValueError, OSError):  # being written, or not ours to signal: taken
            return False
    with os.fdopen(fd, "w") as claim:
        claim.write(str(os.getpid()))
    return True


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Sends `sig`, then kills the process if it has not exited within `timeout` seconds."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def worker_run_dir(pid: int) -> Path:
    """The run directory of the worker: where its metrics' maps are (its environment is set after exec, unseen)."""
    mapped = {line.split(maxsplit=5)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()}
    metrics = {Path(path).parent for path in mapped if path.endswith(".db") and "/nanoqwen-" in path}
    assert len(metrics) == 1 and all(path.name == "metrics" for path in metrics), mapped
    return metrics.pop().parent


def copy_maps_as_dead(metrics: Path, pid: int, dead_pids: Iterable[int]) -> None:
    """Worker `pid`'s counter and histogram maps in the metrics directory `metrics` copied as those of dead workers of
    `dead_pids` (unfolded: no master reaped them): the scrapes read each as a dead worker's. Their used length only
    (the rest of a map is empty)."""
    from nanoqwen.api.metric_archive import FOLDED

    for kind in FOLDED:
        live = (metrics / f"{kind}_{pid}.db").read_bytes()
        used = live[:struct.unpack_from("i", live)[0]]
        for dead in dead_pids:
            (metrics / f"{kind}_{dead}.db").write_bytes(used)


class GunicornServer:
    def __init__(self, env: dict[str, str], log_path: Path, worker_class: str = "gevent",
                 args: Sequence[str] = ()) -> None:
        """`args`: more gunicorn options, e.g. ("--graceful-timeout", "2"); with `--certfile` it serves TLS (https,
        its certificate not checked by the clients here)."""
        self.port = free_port()
        self.tls = "--certfile" in args
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.env = {**os.environ, **env}  # what the server runs with
        self._cmd = [sys.executable, "-m", "gunicorn", "-k", worker_class, "-b", f"127.0.0.1:{self.port}",
                     *args, "server:app"]
        self._cwd = REPO_ROOT
        self._proc: subprocess.Popen | None = None

    @classmethod
    def cli(cls, args: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path) -> GunicornServer:
        """`python -m nanoqwen serve <args> --port <free>` started in `cwd`."""
        server = cls(env, log_path)
        server._cmd = [sys.executable, "-m", "nanoqwen", "serve", *args, "--port", str(server.port)]
        server._cwd = Path(cwd)
        return server

    @classmethod
    def without_config(cls, worker_class: str, env: dict[str, str], log_path: Path, cwd: Path) -> GunicornServer:
        """`gunicorn -k <worker_class> nanoqwen.wsgi:app` started in `cwd`, where no gunicorn.conf.py brings in
        nanoqwen's settings and hooks (but its control socket, one path per user: concurrent servers would clash)."""
        server = cls(env, log_path, worker_class, args=["--no-control-socket"])
        server._cmd[-1] = "nanoqwen.wsgi:app"
        server._cwd = Path(cwd)
        return server

    def openai_client(self, api_key: str = "unused", timeout: float = 120) -> openai.OpenAI:
        """The official client on this server, without retries (a retry would hide a failure)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=timeout,
                             http_client=openai.DefaultHttpxClient(verify=False) if self.tls else None)

    def launch(self) -> GunicornServer:
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(self._cmd, cwd=self._cwd, env=self.env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def start(self, timeout: float = 180.0) -> GunicornServer:
        """Starts gunicorn and waits for /health to answer 200; raises with the server log otherwise."""
        return self.launch().wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 180.0) -> GunicornServer:
        """After launch(): waits for /health to answer 200 (servers launched together load in parallel)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                context = ssl._create_unverified_context() if self.tls else None
                with urllib.request.urlopen(f"{self.url}/health", timeout=1, context=context) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn did not become healthy; log:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        """The gunicorn master's."""
        assert self._proc is not None
        return self._proc.pid

    def terminate(self) -> None:
        """SIGTERM: gunicorn's graceful shutdown."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)

    def hangup(self) -> None:
        """SIGHUP: gunicorn reloads, new workers replacing the old ones as they drain."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)

    def interrupt(self) -> None:
        """SIGINT: gunicorn's quick shutdown."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float) -> int:
        """The master's exit status; raises subprocess.TimeoutExpired if it runs past `timeout`."""
        assert self._proc is not None
        return self._proc.wait(timeout)

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        stop_process(self._proc, signal.SIGINT, timeout=20)  # SIGINT: quick shutdown of master and worker

    def __enter__(self) -> GunicornServer:
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


@contextmanager
def serving_together(servers: Mapping[str, GunicornServer]) -> Iterator[dict[str, GunicornServer]]:
    """Launches every server at once (they load in parallel), waits until each is healthy, stops them all after."""
    try:
        for srv in servers.values():
            srv.launch()
        yield {name: srv.wait_healthy() for name, srv in servers.items()}
    finally:
        for srv in servers.values():
            srv.stop()
