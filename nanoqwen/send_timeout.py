"""A response's writes give up on a client that accepts nothing for a while, as nginx's `send_timeout` does.

gunicorn writes a response with the client socket's `sendall`, which under gevent waits for as long as the client's
TCP window stays shut: a client that stops reading (alive, not reset) held its connection (of worker_connections),
its greenlet and the frame being written (a background run's last one may be megabytes) for ever. Here `sendall`
sends what the kernel takes and waits at most `timeout_s` each time for room for more: the limit is on a time
without progress, so a slow but steady reader gets a frame of any size. The socket's timeout is set for the writes
alone: its reads and the keep-alive wait keep their own deadlines (NANOQWEN_BODY_TIMEOUT, gunicorn's keepalive).
"""
from __future__ import annotations

import errno
import socket
from typing import Any


class SendTimeout(OSError):
    """The client accepted no byte of a response for the send timeout."""


class TimedWrites:
    """The client socket, as gunicorn's response (and the app, through `gunicorn.socket`) sees it: its `sendall`
    raises SendTimeout when the client makes no room for `timeout_s` seconds; everything else is the socket's."""

    def __init__(self, sock: socket.socket, timeout_s: float) -> None:
        self._sock = sock
        self.timeout_s = timeout_s

    def sendall(self, data: bytes) -> None:
        sock = self._sock
        view = memoryview(data)
        previous = sock.gettimeout()
        # gevent's send, plain or TLS, waits for room within the socket's timeout each time it waits
        sock.settimeout(self.timeout_s)
        try:
            while view:
                view = view[sock.send(view):]
        except TimeoutError:
            raise SendTimeout(errno.ETIMEDOUT, f"the client read nothing for {self.timeout_s:g} seconds") from None
        finally:
            sock.settimeout(previous)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
