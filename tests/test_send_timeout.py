"""nanoqwen.send_timeout's TimedWrites on a gevent socket pair with small buffers: the limit is on a time without
progress, not on a write's whole time."""
from __future__ import annotations

import errno
import socket
import time

import gevent
import gevent.socket
import pytest

from health_poll import reported_schedstat, schedstat
from nanoqwen.send_timeout import SendTimeout, TimedWrites

TIMEOUT_S = 0.5
BUFFER = 16 << 10
DATA = bytes(range(256)) * 4096  # 1 MiB: 64 times what the buffers hold


def _pair() -> tuple[gevent.socket.socket, gevent.socket.socket]:
    writer, reader = gevent.socket.socketpair()
    for sock in (writer, reader):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    return writer, reader


def test_a_reader_that_stops_is_given_up_on_after_the_timeout() -> None:
    writer, reader = _pair()
    with writer, reader:
        started, (_, preempted) = time.monotonic(), reported_schedstat("/proc/thread-self/schedstat")
        # a timeout not applied fails here rather than hanging
        with pytest.raises(SendTimeout) as raised, gevent.Timeout(10 * TIMEOUT_S):
            TimedWrites(writer, TIMEOUT_S).sendall(DATA)
        elapsed = time.monotonic() - started
        # the buffers filled at once; less the seconds this thread (gevent's loop too) waited for a CPU, the machine's
        # load, it waited the timeout: 1.5 × is halfway to a wait counted twice
        held = elapsed - (schedstat("/proc/thread-self/schedstat")[1] - preempted)
        assert elapsed >= TIMEOUT_S and held < 1.5 * TIMEOUT_S, (elapsed, held)
        assert raised.value.errno == errno.ETIMEDOUT and isinstance(raised.value, OSError)
        assert writer.gettimeout() is None  # as it was: reads and the keep-alive wait keep their own deadlines


def test_a_slow_steady_reader_gets_a_write_that_takes_longer_than_the_timeout() -> None:
    writer, reader = _pair()
    received = bytearray()

    def read_slowly() -> None:  # 16 KiB every 25 ms: ~1.6 s for the whole write, no pause near the timeout
        deadline = time.monotonic() + 30
        while len(received) < len(DATA) and time.monotonic() < deadline:
            chunk = reader.recv(BUFFER)
            if not chunk:
                return
            received.extend(chunk)
            gevent.sleep(0.025)

    with writer, reader:
        reading = gevent.spawn(read_slowly)
        started = time.monotonic()
        TimedWrites(writer, TIMEOUT_S).sendall(DATA)
        elapsed = time.monotonic() - started
        reading.join(timeout=30)
    assert bytes(received) == DATA
    assert elapsed > 2 * TIMEOUT_S  # the one write took longer than the timeout, and was not cut


def test_a_reset_is_no_timeout() -> None:
    writer, reader = _pair()
    with writer:
        reader.close()
        with pytest.raises(OSError) as raised:
            TimedWrites(writer, TIMEOUT_S).sendall(DATA)
        assert not isinstance(raised.value, SendTimeout) and raised.value.errno in (errno.EPIPE, errno.ECONNRESET)
        assert writer.gettimeout() is None  # restored on every way out
