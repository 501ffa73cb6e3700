"""nginx with deploy/nginx.conf in front of replicas, in a subprocess on a free loopback port (for
tests and benchmarks). Needs the nginx binary (Debian: `apt-get install nginx-light`)."""
from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from server_process import REPO_ROOT, free_port, stop_process

SNIPPET = REPO_ROOT / "deploy" / "nginx.conf"
# Everything nginx writes stays in the run's directory: it runs unprivileged and in the foreground.
MAIN_CONF = """\
worker_processes 1;
pid nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/nanoqwen.conf;
}}
"""
UPSTREAM = re.compile(r"(upstream \w+ \{\n(?:    (?!server ).*\n)*)((?:    server .*\n)+)")


def render(snippet: str, replicas: Sequence[str], port: int) -> str:
    """The snippet with `replicas` (host:port) in every upstream, keeping its server options, on `port`."""
    options = re.search(r"    server \S+ (.*);", snippet).group(1)
    servers = "".join(f"    server {address} {options};\n" for address in replicas)
    snippet = UPSTREAM.sub(lambda m: m.group(1) + servers, snippet)
    return re.sub(r"listen \d+;", f"listen 127.0.0.1:{port};", snippet)


class Nginx:
    def __init__(self, run_dir: Path, replicas: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(run_dir).resolve()  # nginx reads -c relative to its -p prefix
        (self.dir / "nanoqwen.conf").write_text(render(SNIPPET.read_text(), replicas, self.port))
        self.conf = self.dir / "main.conf"
        self.conf.write_text(MAIN_CONF.format(dir=self.dir))
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> Nginx:
        """Starts nginx and waits for /health through it to answer 200."""
        with open(self.dir / "stderr.log", "wb") as stderr:
            self._proc = subprocess.Popen(["nginx", "-p", str(self.dir), "-c", str(self.conf), "-g", "daemon off;"],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"nginx did not start:\n{self.log()}")

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.dir / "stderr.log", self.dir / "error.log")
                       if p.exists())

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        stop_process(self._proc, signal.SIGQUIT, timeout=10)  # SIGQUIT: graceful, ends once the open streams are gone

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
