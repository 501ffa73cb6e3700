"""How soon a server notices a client that left while nothing was written to it, per source tree (servers run side by
side, measured alternately): (a) an auto tool-choice stream of `<tool_call>` tokens alone, its client closed after the
head; (b) a stream queued behind a full batch, closed likewise; (c) TLS ClientHello-shaped bytes (no line feed).
Prints seconds from the close (the send, for c) until the request left the engine (a, b) or the answer came (c),
with how it was counted and the tokens generated meanwhile.

`python profiles/bench_client_gone.py --trees /tmp/base . [--repeats 5] [--hello-timeout 80] [--env NAME=VALUE ...]`
(`--env`: settings for every server on top of the fp32 CPU ones, e.g. NANOQWEN_QUANT=int8 or NANOQWEN_DTYPE=bfloat16)
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from chat_http import CLIENT_HELLO, MODEL, cpu_env, engine_idle, raw_request, server_stats  # noqa: E402
from checkpoints import TOKEN_IDS, make_checkpoint  # noqa: E402
from nanoqwen.engine import EngineConfig  # noqa: E402
from server_process import GunicornServer, serving_together  # noqa: E402
from waits import wait_for  # noqa: E402

NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
USER = [{"role": "user", "content": "What is the best book?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_TOKENS = 700
TOOL_STREAM = {"model": MODEL, "messages": USER, "tools": TOOLS, "stream": True, "temperature": 0, "ignore_eos": True,
               "max_tokens": TOOL_TOKENS, "logit_bias": {str(TOKEN_IDS["<tool_call>"]): 100}, **NO_THINKING}
FILLER = {"model": MODEL, "prompt": "Once", "n": EngineConfig.max_batch, "max_tokens": 300, "temperature": 0,
          "stream": True, "ignore_eos": True}
QUEUED = {"model": MODEL, "prompt": "Hi", "stream": True, "max_tokens": 16}  # its head alone: closed, a FIN


def _send_read_head_close(srv: GunicornServer, body: dict[str, Any], path: str = "/v1/chat/completions",
                          before_close: Any = None) -> float:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
        sock.sendall(raw_request(body, path))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(1 << 16)
        if before_close is not None:
            before_close()
    return time.monotonic()


def _until(srv: GunicornServer, done: Any, limit: float = 120.0) -> tuple[float, dict[str, Any]]:
    start = time.monotonic()
    while not done(stats := server_stats(srv)):
        if time.monotonic() - start > limit:
            raise TimeoutError
        time.sleep(0.01)
    return time.monotonic() - start, stats


def tool_stream(srv: GunicornServer) -> str:
    before = server_stats(srv)
    closed = _send_read_head_close(srv, TOOL_STREAM)
    _, after = _until(srv, lambda s: s["requests_aborted"] + s["requests_served"] > before["requests_aborted"]
                      + before["requests_served"] and s["active_requests"] == 0)
    took = time.monotonic() - closed
    outcome = "aborted" if after["requests_aborted"] > before["requests_aborted"] else "served"
    tokens = after["engine_tokens_generated"] - before["engine_tokens_generated"]
    return f"{took:.3f} s {outcome} tokens={tokens}/{TOOL_TOKENS}"


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(1 << 16):
            pass


def queued_stream(srv: GunicornServer) -> str:
    filler = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
    queued: list[int] = []  # the queue's length before the close
    try:
        filler.sendall(raw_request(FILLER, "/v1/completions"))
        threading.Thread(target=_drain, args=(filler,), daemon=True).start()  # a filler read runs to its end
        wait_for(lambda: server_stats(srv)["active_requests"] == 1, timeout=30, poll=0.01)
        before = server_stats(srv)
        closed = _send_read_head_close(srv, QUEUED, "/v1/completions",
                                       lambda: queued.append(server_stats(srv)["queue_length"]))
        _, after = _until(srv, lambda s: s["requests_aborted"] > before["requests_aborted"] and s["queue_length"] == 0)
        took = time.monotonic() - closed
        running = "filler still running" if after["active_requests"] == 1 else "after the filler"
        return f"{took:.3f} s aborted {running}, queued={queued[0]}"
    finally:
        filler.close()
        wait_for(lambda: engine_idle(srv), timeout=120)


def hello(srv: GunicornServer, timeout: float) -> str:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as sock:
        start = time.monotonic()
        sock.sendall(CLIENT_HELLO)
        answer = b""
        try:
            while chunk := sock.recv(1 << 16):
                answer += chunk
        except TimeoutError:
            return f"> {timeout:.0f} s, no answer"
    return f"{time.monotonic() - start:.3f} s {answer.split(b' ', 2)[1].decode() if answer else 'closed, no answer'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs="+", type=Path, required=True, help="source trees to serve from")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hello-timeout", type=float, default=80.0)
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="more server settings")
    args = parser.parse_args()
    if bad := [setting for setting in args.env if "=" not in setting]:
        parser.error(f"--env takes NAME=VALUE, not {bad[0]!r}")
    env = dict(setting.split("=", 1) for setting in args.env)
    out = Path("profiles/out")
    out.mkdir(parents=True, exist_ok=True)
    servers = {}
    for i, tree in enumerate(args.trees):
        settings = {"NANOQWEN_MAX_MODEL_LEN": "1024", **env}
        srv = GunicornServer(cpu_env(make_checkpoint(), **settings), out / f"client_gone_{i}.log")
        srv._cwd = tree.resolve()
        servers[str(tree)] = srv
    print(f"load average at the start: {os.getloadavg()}; settings: {env}")
    with serving_together(servers) as running:
        results: dict[str, dict[str, list[str]]] = {t: {"tool": [], "queued": [], "hello": []} for t in running}
        for _ in range(args.repeats):
            for tree, srv in running.items():
                results[tree]["tool"].append(tool_stream(srv))
                results[tree]["queued"].append(queued_stream(srv))
        for tree, srv in running.items():
            results[tree]["hello"].append(hello(srv, args.hello_timeout))
    for tree, rows in results.items():
        print(f"== {tree}")
        for name, values in rows.items():
            seconds = [float(v.split()[0]) for v in values if not v.startswith(">")]
            median = f"median {statistics.median(seconds):.3f} s" if seconds else ""
            print(f"  {name}: {median}; " + " | ".join(values))
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
