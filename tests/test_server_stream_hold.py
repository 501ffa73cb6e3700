"""A stream whose reader is behind the engine writes as it goes (Serving._stream's MAX_HOLD_S), through
`gunicorn -k gevent server:app`: the reader is put behind by profiles/timing_faults' LAG fault (each event taken
late), as a loop saturated by its streams puts it."""
from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from chat_http import MODEL, cpu_env, raw_request
from checkpoints import make_checkpoint
from server_process import REPO_ROOT, GunicornServer

LAG_S = 0.01
TOKENS = 300  # ~3 s behind the engine at LAG_S an event


@pytest.fixture(scope="module")
def lagging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    env = cpu_env(make_checkpoint(), TIMING_FAULT_LAG=str(LAG_S),
                  PYTHONPATH=str(REPO_ROOT / "profiles" / "timing_faults"))
    with GunicornServer(env, tmp_path_factory.mktemp("lagging") / "gunicorn.log") as srv:
        assert "timing faults in nanoqwen.api.serving: lag" in srv.log()  # else the reader keeps up: nothing held
        yield srv


def test_a_stream_behind_the_engine_writes_as_it_goes(lagging: GunicornServer) -> None:
    """Frames of events still waiting were held until none waited: a reader behind the engine found one waiting each
    time and sent nothing between the stream's opening and its end (its first token with its last, ~3 s in). Now
    they go out after MAX_HOLD_S (0.1 s) at most: the first token's frame comes in the stream's first half, and the
    frames in many writes."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "count"}], "max_tokens": TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    arrivals: list[tuple[float, bytes]] = []
    with socket.create_connection(("127.0.0.1", lagging.port), timeout=60) as sock:
        sock.sendall(raw_request(body))
        start = time.monotonic()
        while chunk := sock.recv(65536):
            arrivals.append((time.monotonic() - start, chunk))
            if b"data: [DONE]" in chunk:
                break
    received = b"".join(chunk for _, chunk in arrivals)
    assert received.startswith(b"HTTP/1.1 200 ") and b"data: [DONE]" in received, received[:500]
    first_content = next(at for at, chunk in arrivals if b'"content":"' in chunk.replace(b'"content":""', b""))
    end = arrivals[-1][0]
    assert end > TOKENS * LAG_S / 2, end  # the reader was behind the engine: the fault applies
    assert first_content < end / 2, (first_content, end)
    assert len(arrivals) >= 5, [at for at, _ in arrivals]
