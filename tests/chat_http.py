"""What the end-to-end tests share: a CPU server's environment and the chat-completion requests they send it."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from server_process import GunicornServer

MODEL = "qwen3-0.6b"  # the served model name when NANOQWEN_SERVED_MODEL_NAME is unset
MAX_MODEL_LEN = 512


def cpu_env(checkpoint: Path, **env: str) -> dict[str, str]:
    """A server for `checkpoint` on the CPU in fp32 (exact against transformers), plus `env`."""
    return {"NANOQWEN_MODEL": str(checkpoint), "NANOQWEN_DEVICE": "cpu", "NANOQWEN_DTYPE": "float32",
            "NANOQWEN_MAX_MODEL_LEN": str(MAX_MODEL_LEN), **env}


def post_chat(srv: GunicornServer, body: Any, timeout: float = 300, **kwargs: Any) -> requests.Response:
    return requests.post(f"{srv.url}/v1/chat/completions", json=body, timeout=timeout, **kwargs)


def health_latencies(srv: GunicornServer, busy: threading.Thread, interval: float) -> list[float]:
    """Seconds each `GET /health` took, polled every `interval` while `busy` (already started) runs:
    the event loop's responsiveness meanwhile. Every answer must be 200."""
    session = requests.Session()
    latencies = []
    while busy.is_alive():
        t0 = time.perf_counter()
        assert session.get(f"{srv.url}/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(interval)
    return latencies


def sse_payloads(response: requests.Response) -> Iterator[str]:
    """The `data:` payloads of an SSE response as they arrive, checking the framing (one line, then a blank one)."""
    lines = response.iter_lines(decode_unicode=True)
    for line in lines:
        assert line.startswith("data: "), line
        assert next(lines) == ""
        yield line[len("data: "):]
