"""GeventEventStream: the engine's OS thread feeds a greenlet without blocking the hub."""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import resource
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import gevent
import gevent.select
import pytest

from hub_util import hub_ticks
from nanoqwen.api import serving as serving_module
from nanoqwen.api.channel import GeventEventStream
from nanoqwen.api.config import ServerConfig
from nanoqwen.api.metrics import Submitted
from nanoqwen.api.responses import ChunkBuilder, fingerprint
from nanoqwen.api.serving import Batch, ClientGone, Serving
from nanoqwen.engine.request import Event, Usage
from nanoqwen.engine.threads import NativeEvent, start_native_thread
from nanoqwen.engine.wakeups import HeldWakeups


def test_native_thread_wakes_the_greenlet_and_the_hub_keeps_running() -> None:
    stream = GeventEventStream()

    def produce() -> None:  # plays the engine thread: real OS thread, blocking sleeps
        for i in range(5):
            time.sleep(0.05)
            stream.put(Event(text=str(i), token_ids=[i]))
        stream.put(Event(usage=Usage(prompt_tokens=1, completion_tokens=5)))

    with hub_ticks() as ticks:
        start_native_thread(produce)
        events = gevent.spawn(lambda: list(stream)).get(timeout=5)
    assert "".join(e.text for e in events) == "01234" and events[-1].is_last
    assert len(ticks) >= 10  # the hub ran other greenlets while this one waited


def test_timeout() -> None:
    stream = GeventEventStream()
    with pytest.raises(TimeoutError):
        stream.get(timeout=0.05)
    stream.put(Event(text="late"))
    assert stream.get(timeout=1).text == "late"


def test_a_timed_wait_that_expires_with_an_event_there_returns_it() -> None:
    """An event whose wake-up the engine thread still holds (mid-step) is there when the reader's timeout fires: `get`
    returns it, as `_wait` promises (it raised TimeoutError)."""
    stream = GeventEventStream()
    go, step_ends, left = NativeEvent(), NativeEvent(), NativeEvent()

    def step() -> None:  # plays the engine thread, still in its step when the reader times out
        go.wait(5)
        with HeldWakeups():
            stream.put(Event(text="held"))
            step_ends.wait(5)
        left.set()

    start_native_thread(step)
    reader = gevent.spawn(stream.get, 0.2)
    gevent.sleep(0)  # the reader waits
    go.set()
    try:
        assert reader.get(timeout=5).text == "held"
    finally:
        step_ends.set()
        left.wait(5)
        gevent.sleep(0.05)  # the hub takes the step's signal here, not in a later test


def test_a_pass_cut_short_leaves_the_streams_after_it_to_the_next() -> None:
    """An exception escaping the waker's pass (an exit delivered in the hub) left the streams after it marked with no
    signal out: their readers waited for nothing (an untimed one forever)."""
    first, second = GeventEventStream(), GeventEventStream()
    waker = first._waker
    reader = gevent.spawn(second.get)
    gevent.sleep(0)  # the reader waits, untimed

    def wake_raises() -> None:
        raise KeyboardInterrupt

    first._wake = wake_raises  # type: ignore[method-assign]
    second._events.append(Event(text="b"))
    for stream in (first, second):  # both marked, the signal that would hand them out taken by the pass below
        stream._marked = True
        waker._ready.append(stream)
    with pytest.raises(KeyboardInterrupt):
        waker._dispatch()
    assert reader.get(timeout=2).text == "b"


def _counting_sends(stream: GeventEventStream, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of signals its hub's waker sends till the test ends, in a list of one."""
    sends = [0]
    signal = stream._waker._async

    class Counting:
        def send(self) -> None:
            sends[0] += 1
            signal.send()

        def __setattr__(self, name: str, value: object) -> None:  # ref
            setattr(signal, name, value)

    monkeypatch.setattr(stream._waker, "_async", Counting())
    return sends


def test_a_steps_events_wake_the_hub_once_when_the_step_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine thread's puts inside HeldWakeups (a step handing out its tokens) reach no reader till the step ends,
    then every stream's reader at once, with one signal to the hub however many streams and events."""
    streams = [GeventEventStream() for _ in range(6)]
    sends = _counting_sends(streams[0], monkeypatch)
    step_ended: list[float] = []

    def step() -> None:  # plays the engine thread
        with HeldWakeups():
            for i, stream in enumerate(streams):
                for j in range(i + 1):
                    stream.put(Event(text=str(j), token_ids=[j]))
                stream.put(Event(usage=Usage(prompt_tokens=1, completion_tokens=i + 1)))
            time.sleep(0.2)  # the rest of the step: the hub is free to run meanwhile
            step_ended.append(time.perf_counter())

    def read(stream: GeventEventStream) -> tuple[str, float]:
        text = "".join(event.text for event in stream)
        return text, time.perf_counter()

    readers = [gevent.spawn(read, stream) for stream in streams]
    gevent.idle()  # every reader waits (one that looks after the puts takes its events without a wake-up)
    with hub_ticks() as ticks:
        start_native_thread(step)
        results = [reader.get(timeout=5) for reader in readers]
    assert [text for text, _ in results] == ["".join(map(str, range(i + 1))) for i in range(len(streams))]
    assert min(t for _, t in results) >= step_ended[0]  # nothing before the step ended
    assert sends == [1] and len(ticks) >= 10


def test_streams_fed_by_a_racing_thread_each_get_their_events_in_order() -> None:
    """Bursts of steps back to back from a native thread, each with a few events for some of many streams, while the
    hub hands them out, and after each burst a wait till every event is read: every reader gets exactly its own
    events, in order, and none waits on a lost wake-up (its own timeout is far beyond the burst's). A stress test:
    the next one puts an event in the races' windows on purpose."""
    rng = random.Random(0)
    streams = [GeventEventStream() for _ in range(24)]
    bursts = [[[rng.randrange(len(streams)) for _ in range(rng.randrange(1, 40))] for _ in range(8)] for _ in range(40)]
    read_ids: list[list[int]] = [[] for _ in streams]
    lost: list[int] = []

    def produce() -> None:
        put = 0
        counts = [0] * len(streams)
        for burst in bursts:
            for i, targets in enumerate(burst):
                with HeldWakeups() if i % 2 else contextlib.nullcontext():  # a step's tokens, or an abort's
                    for k in targets:
                        streams[k].put(Event(token_ids=[counts[k]]))
                        counts[k] += 1
                        time.sleep(0)  # lets the hub in between two puts
                put += len(targets)
            deadline = time.monotonic() + 5
            while sum(map(len, read_ids)) < put and time.monotonic() < deadline:
                time.sleep(0.0005)
            if sum(map(len, read_ids)) < put:
                lost.append(put - sum(map(len, read_ids)))
                break
        for stream in streams:
            stream.put(Event(usage=Usage(prompt_tokens=1, completion_tokens=0)))

    def read(k: int) -> None:
        while not (event := streams[k].get(timeout=60)).is_last:
            read_ids[k] += event.token_ids
            if len(read_ids[k]) % 5 == 0:
                gevent.sleep(0)  # a reader busy elsewhere (writing) when its wake-up comes

    readers = [gevent.spawn(read, k) for k in range(len(streams))]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the GIL passed back and forth often: the producer's marks race the hub's passes
    try:
        start_native_thread(produce)
        gevent.joinall(readers, timeout=60, raise_error=True)
    finally:
        sys.setswitchinterval(interval)
    assert not lost, f"{lost[0]} events put were not read within 5 s"
    expected = [sum(targets.count(k) for burst in bursts for targets in burst) for k in range(len(streams))]
    assert read_ids == [list(range(n)) for n in expected]


class _PutBeforeWaiting(GeventEventStream):
    """Puts its `late` events one a wait, after its reader found none and before it waits: as the engine thread's put
    may land between the two, during the hub's pass over the ready streams."""

    def __init__(self, late: list[Event]) -> None:
        super().__init__()
        self.late = late

    def _wait(self, timeout: float | None) -> bool:
        if self.late:
            self.put(self.late.pop(0))
        return super()._wait(timeout)


def test_a_put_between_a_readers_look_and_its_wait_wakes_it() -> None:
    """Fails (the reader's timeout) with the stream's mark cleared after its reader ran, or the waker's signal
    re-armed after its pass: that put's wake-up was lost."""
    stream = _PutBeforeWaiting([Event(text="a"), Event(text="b"), Event(usage=Usage(1, 2))])

    def read() -> str:
        text = ""
        while not (event := stream.get(timeout=5)).is_last:
            text += event.text
        return text

    assert gevent.spawn(read).get(timeout=20) == "ab"


def test_an_untimed_wait_after_a_timed_one_does_not_time_out() -> None:
    stream = GeventEventStream()
    with pytest.raises(TimeoutError):
        stream.get(timeout=0.02)
    late = gevent.spawn_later(0.1, stream.put, Event(text="late"))
    assert stream.get().text == "late"  # the timed wait's timer, still running, did not end this one
    late.join()


def _timer_runs(stream: GeventEventStream) -> bool:
    return stream._timer is not None and stream._timer.active


@pytest.mark.parametrize("path", ["collect", "stream"])
def test_a_reader_that_leaves_leaves_no_timer_running(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collected answer whose client is gone while it is queued, and a stream whose client leaves after an event
    (gunicorn closes its generator): their repeating timer ran on, ref'd, to its next expiry (a poll period: the
    hub's exit waited for it)."""
    trace = SimpleNamespace(on_event=lambda event: None)
    serving = Serving(None, ServerConfig(disconnect_poll_s=0.05), SimpleNamespace(abort=lambda trace, submitted: None))  # type: ignore[arg-type]
    serving.abort = lambda batch: None  # type: ignore[method-assign]
    batch = Batch(Submitted(1, None, [1]))
    try:
        if path == "collect":
            def gone(environ: dict) -> bool:
                raise ClientGone

            monkeypatch.setattr(serving_module, "client_probe", gone)
            assert serving._collect(batch, None, trace, {}) is None  # type: ignore[arg-type]
        else:
            writes = serving._stream(batch, ChunkBuilder("m", "fp", include_usage=False), trace, {})
            next(writes)  # the opening
            gevent.spawn_later(0.01, batch.put, Event(index=0, text="hi", token_ids=[1]))
            assert "hi" in next(writes)
            assert _timer_runs(batch)  # the wait's, running on after the event woke it
            writes.close()
    finally:
        serving.encoding.stop()
    assert not _timer_runs(batch)


def test_a_stream_whose_reader_is_behind_the_engine_still_writes_as_it_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The frames of the events already waiting go out together, but held MAX_HOLD_S at most: a reader behind the
    engine (a loop saturated by its streams: every event it takes has another waiting behind it) wrote nothing after
    its opening until its end. A clock that moves a third of MAX_HOLD_S each time it is read stands for its pace."""
    ticks = itertools.count(0.0, serving_module.MAX_HOLD_S / 3)
    monkeypatch.setattr(serving_module, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    serving = Serving(None, ServerConfig(), SimpleNamespace(finish=lambda trace, usage, submitted: None))  # type: ignore[arg-type]
    batch = Batch(Submitted(1, None, [1]))
    for i in range(20):
        batch.put(Event(index=0, text=f"t{i} ", token_ids=[i]))
    batch.put(Event(index=0, finish_reason="length", usage=Usage(prompt_tokens=1, completion_tokens=20)))
    trace = SimpleNamespace(on_event=lambda event: None)
    try:
        opening, *writes = serving._stream(batch, ChunkBuilder("m", "fp", include_usage=False), trace, {})
    finally:
        serving.encoding.stop()
    assert len(writes) > 3 and "t0 " in writes[0] and "[DONE]" not in writes[0], writes
    assert writes[-1].endswith('"finish_reason":"length"}]}\n\ndata: [DONE]\n\n'), writes[-1][-300:]
    assert "".join(writes).count('"content":"t') == 20 and "error" not in "".join(writes)
    assert all(write.count('"content":"t') >= 2 for write in writes[:-1]), writes  # still several a write


@contextlib.contextmanager
def _client_socket(fd: int | None = None) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the server's end of a connection, at descriptor `fd` where given; the client's)."""
    ours, theirs = socket.socketpair()
    if fd is not None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= fd:
            pytest.skip(f"the descriptor limit ({hard}) holds no descriptor {fd}: no worker here gets one either")
        if soft <= fd:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd + 1, hard))
        os.dup2(ours.fileno(), fd)
        ours.close()
        ours = socket.socket(fileno=fd)
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


def test_the_client_probe_reads_a_socket_past_select_s_limit() -> None:
    """A worker holds up to 1000 connections besides its own files: a client's socket can be past select's FD_SETSIZE
    (1024), which select refused with a ValueError, taken for a client gone (its request aborted)."""
    with _client_socket(fd=1100) as (ours, theirs):
        environ = {"gunicorn.socket": ours}
        assert serving_module.client_probe(environ) is False
        theirs.sendall(b"GET /next")  # a pipelined request: no end of stream
        assert serving_module.client_probe(environ) is False
        theirs.shutdown(socket.SHUT_WR)
        ours.recv(64)
        assert serving_module.client_probe(environ) is True  # its end of stream, seen once
        assert serving_module.client_probe(environ) is False


class _NoFlagsRecv:
    """A socket whose recv takes no flags, as gevent's SSLSocket (gunicorn's TLS) refuses them with a ValueError."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, size: int, flags: int = 0) -> bytes:
        if flags:
            raise ValueError("non-zero flags not allowed in calls to recv() on <class 'gevent.ssl.SSLSocket'>")
        return self.sock.recv(size)

    def getsockopt(self, *args: int) -> int:
        return self.sock.getsockopt(*args)


@pytest.mark.parametrize("rdhup", [True, False], ids=["linux", "no-pollrdhup"])
def test_a_tls_client_that_sends_its_next_request_early_is_there(rdhup: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe peeked at a readable socket: a TLS one refuses the peek, which read as a client gone (a keep-alive
    client's collected answer aborted, a 499, for sending its next request while it was generated). Where the OS
    has no POLLRDHUP the peek stays, for plain sockets: a half-close is still seen there."""
    if not rdhup:
        monkeypatch.setattr(serving_module, "_RDHUP", 0)
    with _client_socket() as (ours, theirs):
        theirs.sendall(b"GET /next")
        assert serving_module.client_probe({"gunicorn.socket": _NoFlagsRecv(ours)}) is False
        assert serving_module.client_probe({"gunicorn.socket": ours}) is False
        theirs.shutdown(socket.SHUT_WR)
        ours.recv(64)
        assert serving_module.client_probe({"gunicorn.socket": ours}) is True


def test_a_client_that_sent_a_byte_then_reset_is_gone() -> None:
    """The peek read the unsent byte and took the client for there: its reset went unseen, its answer generated
    for no one."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        theirs = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
        with ours:
            theirs.sendall(b"x")
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            theirs.close()  # a reset
            assert select.select([ours], [], [], 5)[0]  # the reset has come
            with pytest.raises(ClientGone):
                serving_module.client_probe({"gunicorn.socket": ours})


def test_the_client_probe_runs_no_turn_of_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """With gevent's select in place (the worker patches it), a probe ran a turn of the loop at each call, a collected
    answer's every event: a poll never blocks, so the unpatched one does (the module takes it at import: this guards
    against a probe that looks select or poll up at call time again)."""
    monkeypatch.setattr(select, "select", gevent.select.select)
    monkeypatch.setattr(select, "poll", gevent.select.poll)
    ran: list[int] = []

    def count_turns() -> None:
        while True:
            ran.append(1)
            gevent.sleep(0)

    counter = gevent.spawn(count_turns)
    gevent.sleep(0)
    try:
        with _client_socket() as (ours, _):
            ran.clear()
            for _ in range(3):
                assert serving_module.client_probe({"gunicorn.socket": ours}) is False
            assert ran == []
    finally:
        counter.kill()


def test_the_served_info_is_kept_only_once_the_model_is_loaded() -> None:
    """Read before the model is ready, engine.info() is empty: kept, every later route would have found no
    max_model_len (and the fingerprint of nothing)."""
    engine = SimpleNamespace(ready=False, info=lambda: {"max_model_len": 64} if engine.ready else {})
    serving = Serving(engine, ServerConfig(), SimpleNamespace())  # type: ignore[arg-type]
    assert (serving.info, serving.fingerprint) == ({}, "")
    engine.ready = True
    assert serving.info == {"max_model_len": 64} and serving.fingerprint == fingerprint({"max_model_len": 64})
